"""Avatar: everything per-frame rendering needs from one identity, and its file format.

    avatar = renderer.create_avatar(photo)      # once per identity
    avatar.save("me.avatar")                   # atomic
    avatar = renderer.load_avatar("me.avatar")  # checks it was made by this renderer's model

File format (version 1): one safetensors file.
  tensors   ``texture`` (3, S, S) float32 in [-1, 1]; ``params.<name>`` for every tensor of
            ``InferenceParams.flatten()`` (batch dimension 1), float32.
  metadata  ``format`` = "pybilayer.avatar", ``format_version`` = "1", ``model_fingerprint``,
            ``image_size``, ``crop_box`` (JSON [left, top, right, bottom] in source pixels or null),
            ``enhanced`` ("true"/"false").

The model fingerprint covers exactly what rendering an avatar depends on: the configuration and the
weights of the per-frame networks (keypoints embedder, inference generator). An avatar made by a
model whose per-frame networks differ is refused with a CheckpointError.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import CheckpointError
from .fileio import atomic_path, read_tensor_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .models import InferenceParams

FORMAT_NAME = "pybilayer.avatar"
FORMAT_VERSION = 1


def weights_fingerprint(config: dict, modules: dict) -> str:
    """sha256 of a configuration and the state of the named modules (names, dtypes, shapes, bytes):
    what an avatar's rendering depends on, so an avatar is never served by another model."""
    import torch

    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            if name.endswith("num_batches_tracked") or name == "identity_grid":  # training counter; recomputable
                continue
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{prefix}.{name}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """The bi-layer model's fingerprint: its configuration and its per-frame networks."""
    return weights_fingerprint(
        model.config.to_dict(),
        {"keypoints_embedder": model.keypoints_embedder, "inference_generator": model.inference_generator},
    )


# Identity semantics and frozen: avatars are cache keys of per-backend prepared state, which a changed field
# would leave stale (``dataclasses.replace`` makes a new avatar instead).
@dataclass(eq=False, frozen=True)
class Avatar:
    """One identity: texture (3, S, S) and inference parameters (batch 1), plus metadata. Immutable."""

    texture: "torch.Tensor"  # (3, S, S) float32, CPU
    params: "InferenceParams"  # batch 1, float32, CPU
    model_fingerprint: str
    crop_box: tuple[int, int, int, int] | None = None  # source-photo pixels of the crop it was made from
    enhanced: bool = False
    format_version: int = FORMAT_VERSION
    _flat_params: dict | None = field(default=None, init=False, repr=False)

    @property
    def image_size(self) -> int:
        return int(self.texture.shape[-1])

    def flat_params(self) -> dict[str, np.ndarray]:
        """``InferenceParams.flatten()`` as float32 numpy arrays (batch dim 1), cached."""
        if self._flat_params is None:
            flat = {k: v.detach().cpu().float().numpy() for k, v in self.params.flatten().items()}
            object.__setattr__(self, "_flat_params", flat)  # a cache of the frozen fields
        return self._flat_params

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the avatar (see the module docstring); atomic: a reader sees the old file or the new one."""
        import torch
        from safetensors.torch import save_file

        tensors = {"texture": self.texture.detach().to("cpu", torch.float32).contiguous()}
        for name, tensor in self.params.flatten().items():
            tensors[f"params.{name}"] = tensor.detach().to("cpu", torch.float32).contiguous()
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(self.format_version),
            "model_fingerprint": self.model_fingerprint,
            "image_size": str(self.image_size),
            "crop_box": json.dumps(None if self.crop_box is None else [int(v) for v in self.crop_box]),
            "enhanced": "true" if self.enhanced else "false",
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None) -> "Avatar":
        """Read an avatar file; CheckpointError names what is wrong (missing, truncated, foreign, other model)."""
        from .models import InferenceParams

        path = os.fspath(path)
        tensors, metadata = read_avatar_file(
            path, FORMAT_NAME, FORMAT_VERSION, expected_fingerprint,
            foreign=lambda kind: f"{path} is not a pybilayer avatar file (metadata format={kind!r})",
        )
        fingerprint = metadata.get("model_fingerprint", "")
        if "texture" not in tensors:
            raise CheckpointError(f"{path}: no 'texture' tensor")
        try:
            params = InferenceParams.unflatten({k[len("params."):]: v for k, v in tensors.items() if k.startswith("params.")})
            crop = json.loads(metadata.get("crop_box", "null"))
        except ValueError as exc:
            raise CheckpointError(f"{path}: invalid avatar contents: {exc}") from exc
        texture = tensors["texture"]
        if texture.dim() != 3 or texture.shape[0] != 3 or texture.shape[1] != texture.shape[2]:
            raise CheckpointError(f"{path}: texture must be (3, S, S), got {tuple(texture.shape)}")
        if params.batch_size != 1:
            raise CheckpointError(f"{path}: parameters hold {params.batch_size} identities, expected 1")
        return cls(
            texture=texture.float().contiguous(),
            params=params.map(lambda t: t.float().contiguous()),
            model_fingerprint=fingerprint,
            crop_box=None if crop is None else tuple(int(v) for v in crop),
            enhanced=metadata.get("enhanced") == "true",
        )

    def __repr__(self) -> str:
        return (f"Avatar(image_size={self.image_size}, model={self.model_fingerprint[:12]}, "
                f"crop_box={self.crop_box}, enhanced={self.enhanced})")


def read_avatar_file(
    path: str,
    format_name: str,
    format_version: int,
    expected_fingerprint: str | None,
    foreign: Callable[[str | None], str],
) -> tuple[dict, dict]:
    """(tensors, metadata) of an avatar file of ``format_name``; CheckpointError for a missing, truncated or
    foreign file (``foreign(kind)`` words that message), another format version, or another model."""
    tensors, metadata = read_tensor_file(path, format_name, "avatar file", foreign)
    version = metadata.get("format_version")
    if version != str(format_version):
        raise CheckpointError(f"{path}: {format_name} format version {version!r} is not supported "
                              f"(this pybilayer reads {format_version})")
    fingerprint = metadata.get("model_fingerprint", "")
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise CheckpointError(
            f"{path} was made by a different model (fingerprint {fingerprint[:12]}..., this model "
            f"{expected_fingerprint[:12]}...); create the avatar again with this model"
        )
    return tensors, metadata


__all__ = ["Avatar", "FORMAT_NAME", "FORMAT_VERSION", "model_fingerprint", "read_avatar_file"]
