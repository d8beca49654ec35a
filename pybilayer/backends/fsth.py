"""Serving the few-shot talking-head model (FSTH, ``pybilayer.models.fsth``) through the Renderer.

    renderer = Renderer("fsth.safetensors")          # or Renderer(fsth_model); the file's metadata says FSTH
    avatar = renderer.create_avatar(photo, landmarks)  # embedder E + projection P, once
    frames = renderer.render(avatar, driver_landmarks_px)   # stickman + generator G per frame, uint8

What differs from the bi-layer model lives here, behind the small adapter interface the Renderer uses
(``FSTHServing``; the bi-layer one is ``renderer.BilayerServing``):

- the avatar (``FewShotAvatar``) holds the AdaIN parameters ``P e_hat`` (and ``e_hat``) instead of a
  texture and inference parameters, and has its own file format;
- each frame's crop-normalised keypoints are rasterised into the stickman landmark image, and G outputs
  the whole image: there is no texture, no warp, no mask, so no ``background`` and no ``"layers"``;
- backends: ``torch`` (the model's generator, fp32, any device) and ``onnxruntime`` (one session over
  ``export_generator_onnx``, the AdaIN parameters a graph input, shared by every avatar). No cuda or
  tensorrt backend serves this model.

Avatar file (version 1): safetensors with tensors ``adain_params`` (1, P) and ``embedding`` (1, D), float32;
metadata ``format`` = "pybilayer.fsth.avatar", ``format_version`` = "1", ``model_fingerprint``,
``image_size``, ``crop_box`` (JSON or null). The fingerprint covers what rendering depends on: the
configuration and the generator's weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BackendUnavailableError, CheckpointError
from ..fileio import atomic_path
from .base import FrameBackend, PreparedAvatar

if TYPE_CHECKING:  # pragma: no cover
    import torch

AVATAR_FORMAT = "pybilayer.fsth.avatar"
AVATAR_FORMAT_VERSION = 1
SERVED_BY = ("torch", "onnxruntime")


def fsth_fingerprint(model) -> str:
    """The FSTH model's fingerprint: its configuration and its generator."""
    from ..avatar import weights_fingerprint

    return weights_fingerprint(json.loads(model.config.to_json()), {"generator": model.generator})


def to_uint8(images) -> np.ndarray:
    """(N, 3, S, S) float in [-1, 1] (numpy or torch) -> (N, S, S, 3) uint8, the compositor's rounding
    (``round(clamp((v + 1) * 127.5, 0, 255))``, ties to even)."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    scaled = np.clip((np.asarray(images, dtype=np.float32) + 1.0) * 127.5, 0.0, 255.0)
    return np.ascontiguousarray(np.rint(scaled).astype(np.uint8).transpose(0, 2, 3, 1))


def stickmen(keypoints: np.ndarray, size: int) -> np.ndarray:
    """(n, 68, 2) crop-normalised keypoints -> (n, 3, size, size) float32 landmark images."""
    from ..geometry import draw_stickman

    return np.stack([draw_stickman(k, size) for k in keypoints])


# ------------------------------------------------------------------------------------------ the avatar


@dataclass(eq=False)  # identity semantics: avatars are cache keys of per-backend prepared state
class FewShotAvatar:
    """One person for the few-shot model: the generator's AdaIN parameters (batch 1), plus metadata.

    A fine-tuned person (``training.fsth.fine_tune``: its own model copy and psi') is served by a Renderer
    of that model, with ``FewShotAvatar(result.avatar.adain_params, result.avatar.embedding,
    renderer.fingerprint, renderer.image_size)``."""

    adain_params: "torch.Tensor"  # (1, P) float32, CPU: psi = P e_hat
    embedding: "torch.Tensor"  # (1, D) float32, CPU: e_hat (kept for fine-tuning and inspection)
    model_fingerprint: str
    image_size: int
    crop_box: tuple[int, int, int, int] | None = None
    format_version: int = AVATAR_FORMAT_VERSION

    def save(self, path: str | os.PathLike) -> None:
        """Write the avatar (see the module docstring); atomic: a reader sees the old file or the new one."""
        import torch
        from safetensors.torch import save_file

        tensors = {"adain_params": self.adain_params.detach().to("cpu", torch.float32).contiguous(),
                   "embedding": self.embedding.detach().to("cpu", torch.float32).contiguous()}
        metadata = {"format": AVATAR_FORMAT, "format_version": str(self.format_version),
                    "model_fingerprint": self.model_fingerprint, "image_size": str(self.image_size),
                    "crop_box": json.dumps(None if self.crop_box is None else [int(v) for v in self.crop_box])}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: str | None = None) -> "FewShotAvatar":
        """Read an avatar file; CheckpointError names what is wrong (missing, truncated, foreign, other model)."""
        from ..avatar import FORMAT_NAME as BILAYER_AVATAR_FORMAT
        from ..avatar import read_avatar_file

        path = os.fspath(path)

        def foreign(kind: str | None) -> str:
            what = "a bi-layer avatar" if kind == BILAYER_AVATAR_FORMAT else f"not an avatar (format={kind!r})"
            return f"{path} is {what}; this renderer serves the few-shot (FSTH) model and reads only its avatars"

        tensors, metadata = read_avatar_file(path, AVATAR_FORMAT, AVATAR_FORMAT_VERSION, expected_fingerprint, foreign)
        fingerprint = metadata.get("model_fingerprint", "")
        for name in ("adain_params", "embedding"):
            if name not in tensors or tensors[name].dim() != 2 or tensors[name].shape[0] != 1:
                shape = tuple(tensors[name].shape) if name in tensors else None
                raise CheckpointError(f"{path}: tensor {name!r} must be (1, n), got {shape}")
        try:
            crop = json.loads(metadata.get("crop_box", "null"))
            image_size = int(metadata["image_size"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: invalid avatar metadata: {exc}") from exc
        return cls(adain_params=tensors["adain_params"].float().contiguous(),
                   embedding=tensors["embedding"].float().contiguous(), model_fingerprint=fingerprint,
                   image_size=image_size, crop_box=None if crop is None else tuple(int(v) for v in crop))

    def __repr__(self) -> str:
        return (f"FewShotAvatar(image_size={self.image_size}, model={self.model_fingerprint[:12]}, "
                f"crop_box={self.crop_box})")


# ------------------------------------------------------------------------------------------ backends
# run() returns, per group, the generated images (n, 3, S, S) float32: numpy on the CPU, torch on a GPU.


class FSTHTorchBackend(FrameBackend):
    """The model's generator in fp32 eager torch on ``device``: the reference."""

    name = "torch"
    thread_safe = True

    def __init__(self, model, device: str = "cpu"):
        import torch

        self.torch_device = torch.device(device)
        self.device = str(self.torch_device)
        self.generator = model.generator.to(self.torch_device, torch.float32).eval()
        self.image_size = model.config.image_size

    def prepare(self, avatar) -> PreparedAvatar:
        import torch

        return PreparedAvatar(texture=None, state=avatar.adain_params.to(self.torch_device, torch.float32))

    def run(self, groups: Sequence[tuple[PreparedAvatar, np.ndarray]]) -> list:
        import torch

        sizes = [len(kp) for _, kp in groups]
        images = torch.from_numpy(stickmen(np.concatenate([kp for _, kp in groups]), self.image_size))
        params = torch.cat([prepared.state.expand(n, -1) for (prepared, _), n in zip(groups, sizes)])
        with torch.inference_mode():
            out = self.generator(images.to(self.torch_device), params)
        if self.torch_device.type == "cpu":
            return np.split(out.numpy(), np.cumsum(sizes)[:-1])
        return list(out.split(sizes))


class FSTHOnnxRuntimeBackend(FrameBackend):
    """One onnxruntime session over ``export_generator_onnx`` (AdaIN parameters as a graph input), fp32 CPU."""

    name = "onnxruntime"
    device = "cpu"
    thread_safe = True

    def __init__(self, model, threads: int | None = None):
        import onnxruntime as ort

        from ..models.fsth import ONNX_INPUTS, ONNX_OUTPUT, export_generator_onnx
        from .onnxruntime import session_options

        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads
        self.image_size = model.config.image_size
        self._inputs, self._output = ONNX_INPUTS, ONNX_OUTPUT
        self._session = ort.InferenceSession(export_generator_onnx(model), session_options(threads),
                                             providers=["CPUExecutionProvider"])

    def describe(self) -> str:
        return f"onnxruntime on cpu (FSTH generator graph, {self.threads or 'default'} threads)"

    def prepare(self, avatar) -> PreparedAvatar:
        return PreparedAvatar(texture=None, state=avatar.adain_params.detach().float().numpy())

    def run(self, groups: Sequence[tuple[PreparedAvatar, np.ndarray]]) -> list:
        sizes = [len(kp) for _, kp in groups]
        images = stickmen(np.concatenate([kp for _, kp in groups]), self.image_size)
        if len(groups) == 1:  # one avatar: batch 1 parameters broadcast over the frames inside the graph
            params = groups[0][0].state
        else:
            params = np.concatenate([np.repeat(prepared.state, n, axis=0) for (prepared, _), n in zip(groups, sizes)])
        out = self._session.run([self._output], {self._inputs[0]: images, self._inputs[1]: params})[0]
        return np.split(out, np.cumsum(sizes)[:-1])


def create_backend(name: str, model, device: str, options: dict | None = None) -> FrameBackend:
    """Backend ``name`` for an FSTH model (BackendUnavailableError when it cannot serve it here)."""
    from . import unavailable_reason

    reason = unavailable_reason(name, device)
    if reason:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    if name not in SERVED_BY:
        raise BackendUnavailableError(f"backend {name!r} does not serve the few-shot (FSTH) model; "
                                      f"use one of {SERVED_BY}")
    options = dict(options or {})
    if name == "torch":
        return FSTHTorchBackend(model, device=device, **options)
    return FSTHOnnxRuntimeBackend(model, **options)


# ------------------------------------------------------------------------------------------ the adapter


class FSTHServing:
    """What the Renderer needs to know about the few-shot model (see ``renderer.BilayerServing``)."""

    kind = "few-shot talking-head (FSTH)"
    avatar_type = FewShotAvatar
    few_shot = True  # K source photos of one person, embeddings averaged
    create_backend = staticmethod(create_backend)

    def __init__(self, model, device: str, threads: int | None = None):
        self.model = model
        self.device = device
        self.image_size = int(model.config.image_size)
        self.fingerprint = fsth_fingerprint(model)

    def create(self, source_image, source_keypoints, crop_box, enhance: bool) -> FewShotAvatar:
        """(K, 3, S, S) crops of one person and their (K, 68, 2) keypoints on the device -> avatar: embedder E
        over the K frames, embeddings averaged, projection P."""
        import torch

        if enhance:
            raise ValueError("enhance=True runs the bi-layer texture enhancer; the few-shot (FSTH) model has none")
        with torch.no_grad():  # not inference_mode: avatar tensors may feed autograd later (fine-tuning)
            created = self.model.create_avatar(source_image, self.model.draw_landmarks(source_keypoints))
        return FewShotAvatar(adain_params=created.adain_params.to("cpu", torch.float32).contiguous(),
                             embedding=created.embedding.to("cpu", torch.float32).contiguous(),
                             model_fingerprint=self.fingerprint, image_size=self.image_size,
                             crop_box=tuple(int(v) for v in crop_box))

    def load_avatar(self, path) -> FewShotAvatar:
        return FewShotAvatar.load(path, expected_fingerprint=self.fingerprint)

    def check_render_options(self, output: str, background) -> None:
        if output != "uint8":
            raise ValueError("output='layers' is not available for the few-shot (FSTH) model: its generator "
                             "outputs the whole image, with no texture, low-frequency layer or mask")
        if background is not None:
            raise ValueError("background is not available for the few-shot (FSTH) model: it predicts no mask")

    def frames(self, prepared: PreparedAvatar, images, output: str, background) -> np.ndarray:
        return to_uint8(images)


__all__ = ["AVATAR_FORMAT", "FSTHOnnxRuntimeBackend", "FSTHServing", "FSTHTorchBackend", "FewShotAvatar",
           "create_backend", "fsth_fingerprint", "to_uint8"]
