"""The bi-layer model: avatar creation once per identity, rendering once per frame."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..fileio import atomic_path, read_tensor_file
from .config import NUM_KEYPOINTS, BilayerConfig
from .discriminator import Discriminator
from .identity_embedder import IdentityEmbedder
from .inference_generator import InferenceGenerator
from .keypoints_embedder import KeypointsEmbedder
from .params import InferenceParams
from .spectral import apply_spectral_norm, has_spectral_norm, normalize_random_init_, remove_spectral_norm
from .texture_enhancer import TextureEnhancer
from .texture_generator import TextureGenerator
from .warp import sample_texture

FORMAT_NAME = "pybilayer.model"
FORMAT_VERSION = "1"


class RenderOutput(NamedTuple):
    """One rendered batch. Leading dims follow the keypoints: (B, ...) or (B, T, ...).

    image = lf + hf (not clamped, nominally [-2, 2]); mask = sigmoid(mask_logits)."""

    image: Tensor  # (..., 3, S, S)
    lf: Tensor  # (..., 3, S, S) low-frequency RGB, tanh
    hf: Tensor  # (..., 3, S, S) warped texture
    delta_uv: Tensor  # (..., 2, S, S) tanh, added to the identity grid
    mask: Tensor  # (..., 1, S, S) in [0, 1]
    mask_logits: Tensor  # (..., 1, S, S)


@dataclass
class BilayerAvatar:
    """Everything per-frame rendering needs from one or more identities (batch B)."""

    texture: Tensor  # (B, 3, S, S) in [-1, 1]
    params: InferenceParams

    @property
    def batch_size(self) -> int:
        return self.texture.shape[0]

    def to(self, *args, **kwargs) -> "BilayerAvatar":
        return BilayerAvatar(self.texture.to(*args, **kwargs), self.params.to(*args, **kwargs))

    def select(self, index) -> "BilayerAvatar":
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return BilayerAvatar(self.texture[index], self.params.select(index))

    def flatten(self) -> dict[str, Tensor]:
        """``texture`` plus ``params.<name>`` for every InferenceParams tensor."""
        flat = {"texture": self.texture}
        flat.update({f"params.{name}": t for name, t in self.params.flatten().items()})
        return flat

    @classmethod
    def unflatten(cls, flat: dict[str, Tensor]) -> "BilayerAvatar":
        if "texture" not in flat:
            raise ValueError("BilayerAvatar.unflatten: missing 'texture'")
        unknown = sorted(k for k in flat if k != "texture" and not k.startswith("params."))
        if unknown:
            raise ValueError(f"BilayerAvatar.unflatten: unknown tensors {unknown}")
        params = InferenceParams.unflatten({k[len("params."):]: v for k, v in flat.items() if k.startswith("params.")})
        return cls(flat["texture"], params)


def _check_image_batch(name: str, tensor: Tensor, channels: int, size: int) -> Tensor:
    """(B, C, S, S) -> (B, 1, C, S, S); (B, K, C, S, S) kept."""
    if tensor.dim() == 4:
        tensor = tensor[:, None]
    if tensor.dim() != 5 or tensor.shape[2:] != (channels, size, size):
        raise ValueError(f"{name} must be (B, {channels}, {size}, {size}) or (B, K, {channels}, {size}, {size}), "
                         f"got {tuple(tensor.shape)}")
    return tensor


class Bilayer(nn.Module):
    """The six networks of the bi-layer model and the two phases that use them.

    ``Bilayer(config)`` is randomly initialised, numerically sane (every Conv2d/Linear weight divided
    by its spectral norm) and in eval mode; ``spectral_norm=True`` keeps spectral norm applied for
    training (``remove_spectral_norm()`` before serving). ``Bilayer.load`` / ``Bilayer.from_official``
    give trained models.
    """

    def __init__(self, config: BilayerConfig | None = None, spectral_norm: bool = False,
                 init_weights: bool = True):
        super().__init__()
        config = BilayerConfig() if config is None else config
        if not isinstance(config, BilayerConfig):
            raise TypeError(f"config must be a BilayerConfig, got {type(config).__name__}")
        self.config = config
        c = config
        tex_spec, inf_spec = c.texture_generator_spec(), c.inference_generator_spec()
        self.identity_embedder = IdentityEmbedder(c.embedder_encoder_channels(), c.embedding_channels(), c.eps)
        self.texture_generator = TextureGenerator(tex_spec, c.projector_spec("texture"), c.eps)
        self.keypoints_embedder = KeypointsEmbedder(
            c.keypoints_hidden_channels, c.keypoints_num_layers, c.inference_max_channels, c.inference_input_size,
            c.num_harmonics if c.harmonic_encoding else 0)
        self.inference_generator = InferenceGenerator(inf_spec, c.projector_spec("inference"), c.image_size, c.eps)
        self.texture_enhancer = (
            TextureEnhancer(c.enhancer_min_channels, c.enhancer_max_channels,
                            c.num_enhancer_down_blocks,
                            c.enhancer_num_blocks, c.enhancer_unrolling_depth, c.eps)
            if c.texture_enhancer else None)
        self.discriminator = (
            Discriminator(c.discriminator_min_channels, c.discriminator_max_channels,
                          c.num_discriminator_down_blocks,
                          c.discriminator_num_blocks, c.eps)
            if c.discriminator else None)
        if spectral_norm:
            apply_spectral_norm(self, c.eps)
        if init_weights:
            normalize_random_init_(self, eps=c.eps)
        self.eval()

    # ------------------------------------------------------------------ spectral norm
    @property
    def spectral_norm(self) -> bool:
        return has_spectral_norm(self)

    def apply_spectral_norm(self) -> "Bilayer":
        apply_spectral_norm(self, self.config.eps)
        return self

    def remove_spectral_norm(self) -> "Bilayer":
        remove_spectral_norm(self)
        return self

    # ------------------------------------------------------------------ phase 1: once per identity
    def embed_identity(self, source_image: Tensor, source_keypoints: Tensor,
                       source_mask: Tensor | None = None) -> list[Tensor]:
        """Identity embeddings (one (B, C_j, 8, 8) per generator block) from K >= 1 source frames."""
        from ..geometry import draw_stickmen

        s = self.config.image_size
        images = _check_image_batch("source_image", source_image, 3, s)
        b, k = images.shape[:2]
        keypoints = self._check_keypoints("source_keypoints", source_keypoints, b, k)
        stickmen = draw_stickmen(keypoints.reshape(b * k, NUM_KEYPOINTS, 2), s).to(images.dtype)
        masks = None
        if source_mask is not None:
            masks = _check_image_batch("source_mask", source_mask, 1, s)
            if masks.shape[:2] != (b, k):
                raise ValueError(f"source_mask has (B, K) = {tuple(masks.shape[:2])}, source_image ({b}, {k})")
            masks = masks.reshape(b * k, 1, s, s)
        inputs = IdentityEmbedder.compose_input(images.reshape(b * k, 3, s, s), stickmen, masks)
        return self.identity_embedder(inputs.view(b, k, 6, s, s))

    def create_avatar(self, source_image: Tensor, source_keypoints: Tensor, source_mask: Tensor | None = None,
                      enhance: bool = False) -> BilayerAvatar:
        """Run the per-identity networks once.

        source_image (B, 3, S, S) or (B, K, 3, S, S) in [-1, 1]; source_keypoints (B, 68, 2) or
        (B, K, 68, 2) in [-1, 1] crop coordinates; source_mask (B[, K], 1, S, S) in [0, 1] or None
        (no background removal). K source frames are averaged as in the official embedder.
        ``enhance=True`` refines the texture with the texture enhancer (needs one).
        """
        if enhance and self.texture_enhancer is None:
            raise ValueError("create_avatar(enhance=True): this model has no texture enhancer")
        embeds = self.embed_identity(source_image, source_keypoints, source_mask)
        texture = self.texture_generator(embeds)
        params = self.inference_generator.project(embeds)
        if enhance:
            texture = self._enhance(texture, params, source_image, source_keypoints)
        return BilayerAvatar(texture=texture, params=params)

    def _enhance(self, texture: Tensor, params: InferenceParams, source_image: Tensor,
                 source_keypoints: Tensor) -> Tensor:
        s = self.config.image_size
        images = _check_image_batch("source_image", source_image, 3, s)
        b, k = images.shape[:2]
        keypoints = self._check_keypoints("source_keypoints", source_keypoints, b, k)
        pose = self.keypoints_embedder(keypoints.reshape(b * k, NUM_KEYPOINTS, 2).to(images.dtype))
        delta_uv, lf, mask_logits = self.inference_generator.generate(pose, params.repeat_frames(k))
        return self.texture_enhancer.enhance(texture, images.reshape(b * k, 3, s, s), delta_uv, lf,
                                             torch.sigmoid(mask_logits))

    # ------------------------------------------------------------------ phase 2: once per frame
    def render(self, avatar: BilayerAvatar, target_keypoints: Tensor) -> RenderOutput:
        """Render target poses. target_keypoints (B, 68, 2) or (B, T, 68, 2) in [-1, 1]; B must equal
        the avatar batch, or the avatar holds one identity (then B frames of it are rendered)."""
        if not isinstance(avatar, BilayerAvatar):
            raise TypeError(f"avatar must be a BilayerAvatar, got {type(avatar).__name__}")
        if target_keypoints.dim() not in (3, 4) or target_keypoints.shape[-2:] != (NUM_KEYPOINTS, 2):
            raise ValueError(
                f"target_keypoints must be (B, 68, 2) or (B, T, 68, 2), got {tuple(target_keypoints.shape)}")
        lead = target_keypoints.shape[:-2]
        b = lead[0]
        frames = lead[1] if len(lead) == 2 else 1
        if avatar.batch_size not in (1, b):
            raise ValueError(f"target_keypoints batch {b} does not match the avatar batch {avatar.batch_size}")
        n = b * frames
        repeats = n // avatar.batch_size
        weight = self.keypoints_embedder.net.mlp[0].weight
        keypoints = target_keypoints.reshape(n, NUM_KEYPOINTS, 2).to(weight.device, weight.dtype)
        pose = self.keypoints_embedder(keypoints)
        delta_uv, lf, mask_logits = self.inference_generator.generate(pose, avatar.params.repeat_frames(repeats))
        texture = avatar.texture.repeat_interleave(repeats, dim=0) if repeats > 1 else avatar.texture
        grid = self.inference_generator.identity_grid
        hf = sample_texture(texture, delta_uv, grid if grid.shape[1] == delta_uv.shape[-2] else None)
        image = lf + hf
        outputs = (image, lf, hf, delta_uv, torch.sigmoid(mask_logits), mask_logits)
        return RenderOutput(*(t.reshape(*lead, *t.shape[1:]) for t in outputs))

    @staticmethod
    def _check_keypoints(name: str, keypoints: Tensor, b: int, k: int) -> Tensor:
        if keypoints.dim() == 3:
            keypoints = keypoints[:, None]
        if keypoints.dim() != 4 or keypoints.shape[2:] != (NUM_KEYPOINTS, 2) or keypoints.shape[:2] != (b, k):
            raise ValueError(f"{name} must be ({b}, 68, 2) or ({b}, {k}, 68, 2) to match the images, "
                             f"got {tuple(keypoints.shape)}")
        return keypoints

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file; the config (JSON) and the spectral-norm flag in its metadata. Atomic."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "spectral_norm": "true" if self.spectral_norm else "false",
        }
        with atomic_path(path) as tmp:
            save_file(state, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Bilayer":
        """Load a file written by ``save``; raises CheckpointError naming what is wrong."""
        path = os.fspath(path)
        state, metadata = read_tensor_file(path, FORMAT_NAME, "pybilayer model file", device=str(device))
        try:
            config = BilayerConfig.from_dict(json.loads(metadata["config"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: invalid config in metadata: {exc}") from exc
        return cls.from_state_dict(config, state, spectral_norm=metadata.get("spectral_norm") == "true",
                                   source=path)

    @classmethod
    def from_state_dict(cls, config: BilayerConfig, state: dict[str, Tensor], spectral_norm: bool = False,
                        source: str = "state dict") -> "Bilayer":
        """Build a model of ``config`` holding exactly ``state`` (keys and shapes checked)."""
        with torch.device("meta"):
            model = cls(config, spectral_norm=spectral_norm, init_weights=False)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                  f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for key, tensor in expected.items():
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise CheckpointError(f"{source}: {key} has shape {tuple(state[key].shape)}, "
                                      f"expected {tuple(tensor.shape)}")
        model.load_state_dict(state, strict=True, assign=True)
        if spectral_norm:
            # Old-style spectral norm caches the normalised weight as a plain attribute: refresh it.
            for module in model.modules():
                if hasattr(module, "weight_orig"):
                    with torch.no_grad():
                        u, v, w = module.weight_u, module.weight_v, module.weight_orig
                        sigma = torch.dot(u, w.reshape(w.shape[0], -1) @ v)
                        module.weight = w / sigma
        return model.eval()

    @classmethod
    def from_official(cls, ckpt_dir, epoch: int, enhancer_dir=None, enhancer_epoch: int | None = None,
                      **kwargs) -> "Bilayer":
        """Convert the released checkpoints of saic-violet/bilayer-model (see ``pybilayer.official``)."""
        from ..official import convert_official

        return convert_official(ckpt_dir, epoch, enhancer_dir=enhancer_dir, enhancer_epoch=enhancer_epoch, **kwargs)

    def extra_repr(self) -> str:
        return f"image_size={self.config.image_size}, spectral_norm={self.spectral_norm}"
