"""Few-shot talking-head model (Zakharov et al., ICCV 2019): the heavy baseline of the bi-layer model.

The two phases, as for the bi-layer model::

    model = FSTH(FSTHConfig())
    avatar = model.create_avatar(frames, landmark_images)   # once per person: embedder E + projection P
    images = model.render(avatar, landmark_images)           # once per frame: generator G only

Serving (landmarks in pixels -> uint8 frames, torch or onnxruntime, avatar files): ``pybilayer.Renderer``
over this model, see ``pybilayer/backends/fsth.py``.

Networks (images in [-1, 1]; landmark images are rasterised stickmen, 3 channels, see
``pybilayer.geometry.draw_stickman``):

- Embedder E: frame + landmark image (6 channels) -> conv3x3 -> residual downsampling blocks without
  normalisation (the shared ``blocks.ResBlock``), self-attention after the block that reaches
  ``attention_resolution`` -> ReLU -> global pooling -> one ``embedding_dim`` vector per frame. The K frames
  of a person are averaged (e_hat).
- Projection P: one learned matrix, ``adain_params = P e_hat``, holding every AdaIN scale and shift of G.
- Generator G: landmark image -> conv3x3 -> residual downsampling blocks with instance normalisation
  (self-attention at ``attention_resolution``) -> residual blocks with AdaIN -> residual upsampling blocks
  with AdaIN (self-attention at ``generator_attention_up_resolution``) -> AdaIN -> activation -> conv3x3 ->
  tanh. The AdaIN parameters are an argument of ``forward``; no module holds per-person state.
- Discriminator: E's layout plus one residual block at the lowest resolution gives V(x, y); the realism
  score is ``r = V(x, y) . (W_i + w0) + b`` (projection discriminator; row i of the per-video matrix W is the
  paper's column W_i). Its block outputs are the feature-matching taps.

AdaIN parameter layout (the order in which P's output is sliced; `AdaINLayout` is its single source):
``residual.0.norm1``, ``residual.0.norm2``, ... ``residual.{R-1}.norm2``, then ``up.0.norm1``, ``up.0.norm2``,
... ``up.{U-1}.norm2``, then ``final``. Each slot holds ``channels`` scales followed by ``channels`` shifts;
the instance-normalised activation is multiplied by ``1 + scale`` (so P = 0 is plain instance
normalisation) and ``shift`` is added.

From the paper: 6-channel embedder input; residual down/up blocks (instance norm in G's downsampling part,
AdaIN in the rest of G); self-attention at 32x32 in every downsampling part and at 64x64 in G's upsampling
part; spectral norm on every conv and linear layer; N = 512; the discriminator's extra residual block at
4x4; W_i + w0; fine-tuning from psi' = P e_new and w' = w0 + e_new (training/fsth.py).
Our choices where the paper leaves them open: G goes down to 16x16 at 256 px and has 5 residual blocks;
global *max* pooling after ReLU (``pooling="sum"`` gives the paper's sum pooling followed by ReLU); the
package's LeakyReLU(0.2) blocks; attention keys/values pooled 2x2 (BigGAN) so the 64x64 attention stays
affordable; P is a plain matrix without spectral norm (it is a matrix in the paper's notation, not a layer).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..fileio import atomic_path, atomic_write_bytes, read_tensor_file
from .blocks import NEGATIVE_SLOPE, ResBlock, conv1x1, conv3x3
from .config import NUM_KEYPOINTS
from .spectral import apply_spectral_norm, has_spectral_norm, normalize_random_init_, remove_spectral_norm

Pooling = Literal["max", "sum"]

FORMAT_NAME = "pybilayer.fsth"
FORMAT_VERSION = "1"
ONNX_INPUTS = ("landmark_images", "adain_params")
ONNX_OUTPUT = "image"
ONNX_OPSET = 17
INSTANCE_NORM_EPS = 1e-5


# --------------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class FSTHConfig:
    """Sizes of the few-shot talking-head networks; the defaults are the paper's 256x256 model.

    Channel tuples start with the stem convolution's width; every further entry is one residual block
    that halves (down) or doubles (up) the resolution.
    """

    image_size: int = 256
    embedding_dim: int = 512  # N in the paper: E's output, V's output, rows of W
    # embedder E: stem + 6 downsampling blocks (256 -> 4 px)
    embedder_channels: tuple[int, ...] = (64, 64, 128, 256, 512, 512, 512)
    # discriminator V: the same, plus one residual block at 4x4
    discriminator_channels: tuple[int, ...] = (64, 64, 128, 256, 512, 512, 512)
    attention_resolution: int = 32  # self-attention after the downsampling block that reaches this size
    # generator G: stem + 4 instance-norm downsampling blocks (256 -> 16 px)
    generator_down_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    generator_residual_blocks: int = 5  # AdaIN, at the bottleneck
    generator_up_channels: tuple[int, ...] = (256, 128, 64, 32)  # AdaIN, 16 -> 256 px
    generator_attention_up_resolution: int = 64
    pooling: Pooling = "max"  # global pooling of E and V, applied after ReLU
    num_videos: int = 1  # rows of the discriminator's W (number of training videos)

    def __post_init__(self):
        # tuples come back from JSON as lists; normalise so equality and hashing work
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        if self.pooling not in ("max", "sum"):
            raise ValueError(f"FSTHConfig.pooling must be 'max' or 'sum', got {self.pooling!r}")
        if self.num_videos < 1:
            raise ValueError(f"FSTHConfig.num_videos must be >= 1, got {self.num_videos}")
        for name in ("embedder_channels", "discriminator_channels"):
            channels = getattr(self, name)
            if channels[-1] != self.embedding_dim:
                raise ValueError(f"FSTHConfig.{name} must end with embedding_dim={self.embedding_dim}, "
                                 f"got {channels}")
            _check_down(self.image_size, channels, self.attention_resolution, name)
        _check_down(self.image_size, self.generator_down_channels, self.attention_resolution,
                    "generator_down_channels")
        bottleneck = self.image_size >> (len(self.generator_down_channels) - 1)
        up_sizes = [bottleneck << (i + 1) for i in range(len(self.generator_up_channels))]
        if not up_sizes or up_sizes[-1] != self.image_size:
            raise ValueError(f"FSTHConfig.generator_up_channels must upsample the {bottleneck}-px bottleneck back "
                             f"to image_size {self.image_size} (one block per doubling), got "
                             f"{self.generator_up_channels}")
        if self.generator_attention_up_resolution not in up_sizes:
            raise ValueError(f"FSTHConfig.generator_attention_up_resolution={self.generator_attention_up_resolution}"
                             f" is not reached by the upsampling blocks (sizes {up_sizes})")

    @classmethod
    def tiny(cls, num_videos: int = 4) -> FSTHConfig:
        """A 64-px configuration with few channels, for tests and smoke training on a CPU."""
        return cls(
            image_size=64,
            embedding_dim=64,
            embedder_channels=(16, 16, 32, 64, 64),
            discriminator_channels=(16, 16, 32, 64, 64),
            attention_resolution=16,
            generator_down_channels=(8, 16, 32, 64),
            generator_residual_blocks=2,
            generator_up_channels=(32, 16, 8),
            generator_attention_up_resolution=32,
            num_videos=num_videos,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FSTHConfig:
        data = json.loads(text)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise CheckpointError(f"FSTH config has unknown fields {unknown}; written by a newer pybilayer?")
        return cls(**data)


def _check_down(image_size: int, channels: tuple[int, ...], attention_resolution: int, name: str) -> None:
    blocks = len(channels) - 1
    if blocks < 1 or image_size % (1 << blocks):
        raise ValueError(f"FSTHConfig.{name}: image_size {image_size} cannot be halved {blocks} times")
    sizes = [image_size >> (i + 1) for i in range(blocks)]
    if attention_resolution not in sizes:
        raise ValueError(f"FSTHConfig.attention_resolution={attention_resolution} is not reached by {name} "
                         f"(sizes {sizes})")


# --------------------------------------------------------------------------------------------------------
# building blocks (the shared ResBlock has no instance-norm or AdaIN variant; these add them)


def _act(x: Tensor) -> Tensor:
    return F.leaky_relu(x, NEGATIVE_SLOPE)


class SelfAttention(nn.Module):
    """SAGAN self-attention; keys and values are max-pooled 2x2 (BigGAN) to cut the cost by 4.

    ``x + gamma * out(v softmax(q^T k))``; ``gamma`` starts at 0, so a fresh block is the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        key_channels, value_channels = max(channels // 8, 1), max(channels // 2, 1)
        self.query = conv1x1(channels, key_channels)
        self.key = conv1x1(channels, key_channels)
        self.value = conv1x1(channels, value_channels)
        self.out = conv1x1(value_channels, channels)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        query = self.query(x).flatten(2)  # (B, Ck, HW)
        key = F.max_pool2d(self.key(x), 2).flatten(2)  # (B, Ck, HW/4)
        value = F.max_pool2d(self.value(x), 2).flatten(2)  # (B, Cv, HW/4)
        attention = torch.softmax(torch.bmm(query.transpose(1, 2), key), dim=-1)  # (B, HW, HW/4)
        attended = torch.bmm(value, attention.transpose(1, 2)).view(batch, -1, height, width)
        return x + self.gamma * self.out(attended)


class InstanceNormDownBlock(nn.Module):
    """Residual downsampling block with instance norm (G's landmark encoder).

    ``IN -> act -> conv3x3 -> IN -> act -> conv3x3 -> avgpool2`` plus ``conv1x1 -> avgpool2``.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = nn.InstanceNorm2d(in_channels, eps=INSTANCE_NORM_EPS, affine=True)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = nn.InstanceNorm2d(out_channels, eps=INSTANCE_NORM_EPS, affine=True)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.skip = conv1x1(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_act(self.norm1(x)))
        h = F.avg_pool2d(self.conv2(_act(self.norm2(h))), 2)
        return h + F.avg_pool2d(self.skip(x), 2)


def adaptive_instance_norm(x: Tensor, params: Tensor) -> Tensor:
    """AdaIN: ``instance_norm(x) * (1 + scale) + shift``; ``params`` is (B or 1, 2C) = [scales, shifts]."""
    scale, shift = params[:, :, None, None].chunk(2, dim=1)
    return torch.addcmul(shift, F.instance_norm(x, eps=INSTANCE_NORM_EPS), 1.0 + scale)


class AdaINResBlock(nn.Module):
    """Residual block with AdaIN, optionally upsampling 2x (nearest) before its first convolution.

    ``AdaIN1 -> act -> [up] -> conv3x3 -> AdaIN2 -> act -> conv3x3`` plus ``[up] -> [conv1x1]``; the two
    AdaIN parameter sets are arguments of ``forward``.
    """

    def __init__(self, in_channels: int, out_channels: int, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.conv1 = conv3x3(in_channels, out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.skip = conv1x1(in_channels, out_channels) if in_channels != out_channels else None
        self.norm_channels = (in_channels, out_channels)  # widths of the AdaIN slots norm1, norm2

    def forward(self, x: Tensor, norm1: Tensor, norm2: Tensor) -> Tensor:
        h = _act(adaptive_instance_norm(x, norm1))
        skip = x
        if self.upsample:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = self.conv2(_act(adaptive_instance_norm(self.conv1(h), norm2)))
        if self.skip is not None:
            skip = self.skip(skip)  # 1x1 conv before the upsampling: same result, a quarter of the work
        if self.upsample:
            skip = F.interpolate(skip, scale_factor=2.0, mode="nearest")
        return h + skip


def _global_pool(features: Tensor, pooling: Pooling) -> Tensor:
    if pooling == "max":
        return F.relu(features).amax(dim=(2, 3))
    return F.relu(features.sum(dim=(2, 3)))


def _check_images(images: Tensor, name: str, size: int) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"{name} must be (N, 3, {size}, {size}), got {tuple(images.shape)}")


# --------------------------------------------------------------------------------------------------------
# AdaIN parameter layout


class AdaINSlot(NamedTuple):
    name: str  # "residual.0.norm1", "up.3.norm2", "final"
    channels: int
    offset: int  # start of this slot's 2 * channels values (scales, then shifts) in the flat vector


@dataclass(frozen=True)
class AdaINLayout:
    """Where each AdaIN layer's parameters sit in the flat vector P produces (see the module docstring)."""

    slots: tuple[AdaINSlot, ...]

    @classmethod
    def from_channels(cls, named_channels: list[tuple[str, int]]) -> AdaINLayout:
        slots, offset = [], 0
        for name, channels in named_channels:
            slots.append(AdaINSlot(name, channels, offset))
            offset += 2 * channels
        return cls(tuple(slots))

    @property
    def size(self) -> int:
        last = self.slots[-1]
        return last.offset + 2 * last.channels

    def split(self, params: Tensor) -> dict[str, Tensor]:
        """Flat (B, size) parameters -> {slot name: (B, 2 * channels)} views."""
        if params.dim() != 2 or params.shape[1] != self.size:
            raise ValueError(f"adain_params must have shape (B, {self.size}), got {tuple(params.shape)}")
        return {s.name: params[:, s.offset : s.offset + 2 * s.channels] for s in self.slots}


# --------------------------------------------------------------------------------------------------------
# networks


class _DownStack(nn.Module):
    """conv3x3 stem + residual downsampling blocks, SelfAttention after the block reaching the given size."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], image_size: int, attention_resolution: int,
                 instance_norm: bool):
        super().__init__()
        self.stem = conv3x3(in_channels, channels[0])
        self.shared_blocks = not instance_norm  # the shared ResBlock returns (output, inner features)
        blocks, size = [], image_size
        self.attention_after = -1
        for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            blocks.append(InstanceNormDownBlock(c_in, c_out) if instance_norm else ResBlock(c_in, c_out, "down"))
            size //= 2
            if size == attention_resolution:
                self.attention_after = index
                self.attention = SelfAttention(c_out)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """-> (output, output of every block)."""
        h, outputs = self.stem(x), []
        for index, block in enumerate(self.blocks):
            h = block(h)[0] if self.shared_blocks else block(h)
            if index == self.attention_after:
                h = self.attention(h)
            outputs.append(h)
        return h, outputs


class FSTHEmbedder(nn.Module):
    """E(x, y): frames and their landmark images -> person embedding (mean over the K frames)."""

    def __init__(self, image_size: int, channels: tuple[int, ...], attention_resolution: int, pooling: Pooling):
        super().__init__()
        self.image_size = image_size
        self.pooling = pooling
        self.encoder = _DownStack(6, channels, image_size, attention_resolution, instance_norm=False)

    def embed_frames(self, frames: Tensor, landmark_images: Tensor) -> Tensor:
        """(N, 3, S, S) frames + (N, 3, S, S) landmark images -> (N, D) per-frame embeddings."""
        _check_images(frames, "frames", self.image_size)
        _check_images(landmark_images, "landmark_images", self.image_size)
        if frames.shape[0] != landmark_images.shape[0]:
            raise ValueError(f"frames ({frames.shape[0]}) and landmark_images ({landmark_images.shape[0]}) "
                             "differ in count")
        features, _ = self.encoder(torch.cat([frames, landmark_images], dim=1))
        return _global_pool(features, self.pooling)

    def forward(self, frames: Tensor, landmark_images: Tensor) -> Tensor:
        """(B, K, 3, S, S) frames + landmark images -> (B, D): the K per-frame embeddings averaged."""
        if frames.dim() != 5 or landmark_images.shape != frames.shape:
            raise ValueError("frames and landmark_images must both be (B, K, 3, S, S); got "
                             f"{tuple(frames.shape)} and {tuple(landmark_images.shape)}")
        batch, shots = frames.shape[:2]
        per_frame = self.embed_frames(frames.flatten(0, 1), landmark_images.flatten(0, 1))
        return per_frame.view(batch, shots, -1).mean(dim=1)


class FSTHGenerator(nn.Module):
    """G(y, psi): landmark images + explicit AdaIN parameters -> images in [-1, 1]."""

    def __init__(self, image_size: int, down_channels: tuple[int, ...], residual_blocks: int,
                 up_channels: tuple[int, ...], attention_down_resolution: int, attention_up_resolution: int):
        super().__init__()
        self.image_size = image_size
        self.encoder = _DownStack(3, down_channels, image_size, attention_down_resolution, instance_norm=True)
        width = down_channels[-1]
        self.residual = nn.ModuleList(AdaINResBlock(width, width, upsample=False) for _ in range(residual_blocks))
        self.up = nn.ModuleList()
        self.up_attention_after = -1
        size = image_size >> (len(down_channels) - 1)
        for index, out_channels in enumerate(up_channels):
            self.up.append(AdaINResBlock(width, out_channels, upsample=True))
            size *= 2
            if size == attention_up_resolution:
                self.up_attention_after = index
                self.up_attention = SelfAttention(out_channels)
            width = out_channels
        self.to_rgb = conv3x3(width, 3)
        named = []
        for prefix, blocks in (("residual", self.residual), ("up", self.up)):
            for index, block in enumerate(blocks):
                named += [(f"{prefix}.{index}.norm1", block.norm_channels[0]),
                          (f"{prefix}.{index}.norm2", block.norm_channels[1])]
        named.append(("final", width))
        self.adain_layout = AdaINLayout.from_channels(named)

    def forward(self, landmark_images: Tensor, adain_params: Tensor) -> Tensor:
        """(N, 3, S, S) landmark images, (N or 1, P) AdaIN parameters -> (N, 3, S, S) images."""
        _check_images(landmark_images, "landmark_images", self.image_size)
        if adain_params.dim() == 2 and adain_params.shape[0] not in (1, landmark_images.shape[0]):
            raise ValueError(f"adain_params has batch {adain_params.shape[0]}; expected 1 or the number of "
                             f"landmark images ({landmark_images.shape[0]})")
        params = self.adain_layout.split(adain_params)
        h, _ = self.encoder(landmark_images)
        for index, block in enumerate(self.residual):
            h = block(h, params[f"residual.{index}.norm1"], params[f"residual.{index}.norm2"])
        for index, block in enumerate(self.up):
            h = block(h, params[f"up.{index}.norm1"], params[f"up.{index}.norm2"])
            if index == self.up_attention_after:
                h = self.up_attention(h)
        return torch.tanh(self.to_rgb(_act(adaptive_instance_norm(h, params["final"]))))


class AdaINProjection(nn.Module):
    """P: embedding (B, D) -> flat AdaIN parameters (B, layout.size); one matrix, no bias."""

    def __init__(self, embedding_dim: int, num_params: int):
        super().__init__()
        # small init: a fresh P gives near-plain instance norm (scale ~ 1, shift ~ 0)
        self.matrix = nn.Parameter(torch.randn(num_params, embedding_dim) * (0.02 / embedding_dim**0.5))

    def forward(self, embedding: Tensor) -> Tensor:
        return embedding @ self.matrix.t()


class DiscriminatorOutput(NamedTuple):
    score: Tensor  # (B,) realism score r
    features: tuple[Tensor, ...]  # block outputs, the feature-matching taps


class FSTHDiscriminator(nn.Module):
    """Projection discriminator ``r = V(x, y) . video_vector + b``.

    Meta-learning passes ``video_vector(video_index) = W_i + w0``; fine-tuning passes its own trainable
    ``w'`` (initialised to ``w0 + e_new``). The vector is an argument, so no per-person tensor is assigned
    into the module.
    """

    def __init__(self, image_size: int, channels: tuple[int, ...], attention_resolution: int, pooling: Pooling,
                 num_videos: int):
        super().__init__()
        self.image_size = image_size
        self.pooling = pooling
        self.encoder = _DownStack(6, channels, image_size, attention_resolution, instance_norm=False)
        self.tail = ResBlock(channels[-1], channels[-1])
        embedding_dim = channels[-1]
        # W (row i = W_i) and w0 at unit expected norm, so that a fresh score already responds to V's features
        self.video_embeddings = nn.Parameter(torch.randn(num_videos, embedding_dim) / embedding_dim**0.5)
        self.w0 = nn.Parameter(torch.randn(embedding_dim) / embedding_dim**0.5)
        self.bias = nn.Parameter(torch.zeros(()))

    def video_vector(self, video_index: Tensor) -> Tensor:
        """(B,) integer training-video indices -> (B, D) ``W_i + w0``."""
        if video_index.dtype not in (torch.int32, torch.int64) or video_index.dim() != 1:
            raise ValueError(f"video_index must be a 1-D integer tensor, got {video_index.dtype} "
                             f"{tuple(video_index.shape)}")
        num_videos = self.video_embeddings.shape[0]
        if video_index.numel() and (int(video_index.min()) < 0 or int(video_index.max()) >= num_videos):
            raise ValueError(f"video_index out of range [0, {num_videos}): {video_index.tolist()}")
        return self.video_embeddings[video_index] + self.w0

    def features(self, images: Tensor, landmark_images: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """V(x, y) -> ((B, D) pooled vector, feature-matching taps)."""
        _check_images(images, "images", self.image_size)
        _check_images(landmark_images, "landmark_images", self.image_size)
        h, taps = self.encoder(torch.cat([images, landmark_images], dim=1))
        h, _ = self.tail(h)
        return _global_pool(h, self.pooling), (*taps, h)

    def forward(self, images: Tensor, landmark_images: Tensor, video_vector: Tensor) -> DiscriminatorOutput:
        """Realism scores of (B, 3, S, S) images given their landmark images and (B or 1, D) video vectors."""
        pooled, taps = self.features(images, landmark_images)
        if video_vector.dim() != 2 or video_vector.shape[1] != pooled.shape[1] \
                or video_vector.shape[0] not in (1, pooled.shape[0]):
            raise ValueError(f"video_vector must be ({pooled.shape[0]} or 1, {pooled.shape[1]}), "
                             f"got {tuple(video_vector.shape)}")
        return DiscriminatorOutput((pooled * video_vector).sum(dim=1) + self.bias, taps)


# --------------------------------------------------------------------------------------------------------
# the model and its avatar


@dataclass
class FSTHAvatar:
    """Per-person tensors of the few-shot model: what `FSTH.render` needs, computed once.

    A fine-tuned person also has its own generator weights (training.fsth.fine_tune returns them with the
    avatar); such an avatar belongs to that fine-tuned model.
    """

    embedding: Tensor  # (B, D) e_hat, the mean over the K frames
    adain_params: Tensor  # (B, P) psi = P e_hat (or the fine-tuned psi')

    def flatten(self) -> dict[str, Tensor]:
        return {"embedding": self.embedding, "adain_params": self.adain_params}

    @classmethod
    def unflatten(cls, tensors: dict[str, Tensor]) -> FSTHAvatar:
        missing = sorted({"embedding", "adain_params"} - set(tensors))
        if missing:
            raise CheckpointError(f"FSTH avatar tensors missing {missing}")
        return cls(tensors["embedding"], tensors["adain_params"])

    def to(self, *args, **kwargs) -> FSTHAvatar:
        return FSTHAvatar(self.embedding.to(*args, **kwargs), self.adain_params.to(*args, **kwargs))


class FSTH(nn.Module):
    """The few-shot talking-head model: embedder, projection P, generator and discriminator.

    Like ``Bilayer``: ``FSTH(config)`` is randomly initialised, numerically sane (every conv/linear weight
    divided by its spectral norm) and in eval mode; ``spectral_norm=True`` keeps spectral norm applied for
    training (``remove_spectral_norm()`` before serving or exporting).
    """

    def __init__(self, config: FSTHConfig | None = None, spectral_norm: bool = False, init_weights: bool = True):
        super().__init__()
        config = FSTHConfig() if config is None else config
        if not isinstance(config, FSTHConfig):
            raise TypeError(f"config must be an FSTHConfig, got {type(config).__name__}")
        self.config = config
        self.embedder = FSTHEmbedder(config.image_size, config.embedder_channels, config.attention_resolution,
                                     config.pooling)
        self.generator = FSTHGenerator(config.image_size, config.generator_down_channels,
                                       config.generator_residual_blocks, config.generator_up_channels,
                                       config.attention_resolution, config.generator_attention_up_resolution)
        self.projection = AdaINProjection(config.embedding_dim, self.generator.adain_layout.size)
        self.discriminator = FSTHDiscriminator(config.image_size, config.discriminator_channels,
                                               config.attention_resolution, config.pooling, config.num_videos)
        if spectral_norm:
            apply_spectral_norm(self)
        if init_weights:
            normalize_random_init_(self)
        self.eval()

    @property
    def spectral_norm(self) -> bool:
        return has_spectral_norm(self)

    def apply_spectral_norm(self) -> FSTH:
        apply_spectral_norm(self)
        return self

    def remove_spectral_norm(self) -> FSTH:
        """Fold spectral norm into plain weights with the stored u, v (what eval mode computes)."""
        remove_spectral_norm(self)
        return self

    def clone(self) -> FSTH:
        """An independent copy in eval mode on the same device, spectral norm kept as it is. (deepcopy fails
        once old-style spectral norm has cached a weight computed with autograd, after any training step.)"""
        copied = FSTH(self.config, spectral_norm=self.spectral_norm, init_weights=False)
        copied.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()})
        return copied.to(next(self.parameters()).device).eval()

    @property
    def adain_layout(self) -> AdaINLayout:
        return self.generator.adain_layout

    def draw_landmarks(self, keypoints: Tensor) -> Tensor:
        """(N, 68, 2) keypoints in [-1, 1] crop coordinates -> (N, 3, S, S) landmark images (stickmen)."""
        from ..geometry import draw_stickmen

        if keypoints.dim() != 3 or tuple(keypoints.shape[1:]) != (NUM_KEYPOINTS, 2):
            raise ValueError(f"keypoints must be (N, 68, 2), got {tuple(keypoints.shape)}")
        return draw_stickmen(keypoints, self.config.image_size)

    # ---- phase 1: once per person
    def create_avatar(self, frames: Tensor, landmark_images: Tensor) -> FSTHAvatar:
        """K frames of one person (K, 3, S, S), or of B people (B, K, 3, S, S), with their landmark images
        -> avatar; runs E and P."""
        if frames.dim() == 4:
            frames, landmark_images = frames[None], landmark_images[None]
        embedding = self.embedder(frames, landmark_images)
        return FSTHAvatar(embedding, self.projection(embedding))

    # ---- phase 2: once per frame
    def render(self, avatar: FSTHAvatar, landmark_images: Tensor) -> Tensor:
        """(N, 3, S, S) landmark images -> (N, 3, S, S) images in [-1, 1]; runs G only.

        An avatar of batch 1 drives all N frames; an avatar batch of N pairs person n with frame n.
        """
        if not isinstance(avatar, FSTHAvatar):
            raise TypeError(f"avatar must be an FSTHAvatar, got {type(avatar).__name__}")
        return self.generator(landmark_images, avatar.adain_params)

    # ---- files: one safetensors file, the config (JSON) and the spectral-norm flag in its metadata
    def save(self, path: str | os.PathLike) -> None:
        """Write all weights atomically: an existing file survives any error."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": self.config.to_json(),
                    "spectral_norm": "true" if self.spectral_norm else "false"}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> FSTH:
        """Load a file written by ``save``; raises CheckpointError naming what is wrong."""
        path = os.fspath(path)
        state, metadata = read_tensor_file(path, FORMAT_NAME, "FSTH model file")
        try:
            config = FSTHConfig.from_json(metadata["config"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: invalid FSTH config in metadata: {exc}") from exc
        model = cls(config, spectral_norm=metadata.get("spectral_norm") == "true", init_weights=False)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise CheckpointError(f"{path} does not match its config: missing {missing[:5]}, unexpected "
                                  f"{unexpected[:5]}, wrong shape {wrong[:5]}")
        model.load_state_dict(state, strict=True)
        return model.to(device)


# --------------------------------------------------------------------------------------------------------
# ONNX export of the per-frame generator


def export_generator_onnx(model: FSTH, path: str | os.PathLike | None = None, opset: int = ONNX_OPSET) -> bytes:
    """The per-frame generator as an ONNX graph whose AdaIN parameters are graph inputs.

    Inputs ``landmark_images`` (N, 3, S, S) float32 in [-1, 1] and ``adain_params`` (B, P) float32 with
    B = 1 (one avatar drives every frame) or B = N; output ``image`` (N, 3, S, S) float32 in [-1, 1].
    N and B are dynamic. Spectral norm is folded on a copy; ``model`` is not changed. Returns the
    serialised model and, with ``path``, also writes it atomically.
    """
    generator = model.clone().remove_spectral_norm().generator.float().cpu()
    size, num_params = model.config.image_size, model.adain_layout.size
    landmark_images = torch.rand(2, 3, size, size) * 2 - 1
    adain_params = torch.randn(2, num_params) * 0.1
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about the shape checks (constant under tracing) and the exporter about
        # InstanceNormalization using input statistics, which is what instance norm does in eval too
        warnings.simplefilter("ignore")
        torch.onnx.export(
            generator, (landmark_images, adain_params), buffer, dynamo=False, opset_version=opset,
            input_names=list(ONNX_INPUTS), output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUTS[0]: {0: "N"}, ONNX_INPUTS[1]: {0: "B"}, ONNX_OUTPUT: {0: "N"}},
        )
    data = buffer.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data


__all__ = [
    "AdaINLayout",
    "AdaINProjection",
    "AdaINSlot",
    "DiscriminatorOutput",
    "FSTH",
    "FSTHAvatar",
    "FSTHConfig",
    "FSTHDiscriminator",
    "FSTHEmbedder",
    "FSTHGenerator",
    "adaptive_instance_norm",
    "export_generator_onnx",
]
