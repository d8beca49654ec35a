"""Per-frame backends and how one is chosen.

    backend, reason = select_backend("auto", model, device="auto")

``auto`` tries, in order, tensorrt > cuda > onnxruntime and takes the first that is usable, silently
skipping the others; ``reason`` records why each was skipped. A backend named explicitly that cannot
run here raises BackendUnavailableError saying why. ``torch`` (fp32 eager) is the reference; ``mnn``
(the folded graph in Alibaba MNN, CPU) is only used when named.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BackendUnavailableError
from .base import FrameBackend, FrameOutputs, PreparedAvatar

BACKENDS = ("tensorrt", "cuda", "onnxruntime", "mnn", "torch")
AUTO_ORDER = ("tensorrt", "cuda", "onnxruntime")
CPU_BACKENDS = ("torch", "onnxruntime", "mnn")  # probed and benchmarked on the CPU (torch also runs on a GPU)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; "cpu", "cuda", "cuda:N" are checked."""
    import torch

    if not isinstance(device, str):
        device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"device {device!r} was asked for but torch sees no CUDA GPU")
        return device
    raise BackendUnavailableError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def unavailable_reason(name: str, device: str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here, or None. Cheap: builds nothing."""
    if name == "torch":
        return None
    if name == "onnxruntime":
        if device != "cpu":
            return f"the onnxruntime backend runs on the CPU, not {device!r}"
        from .onnxruntime import onnxruntime_unavailable_reason

        return onnxruntime_unavailable_reason()
    if name == "mnn":
        if device != "cpu":
            return f"mnn runs on the CPU, not {device!r}"
        from .mnn import mnn_unavailable_reason

        return mnn_unavailable_reason()
    if name == "cuda":
        from .cuda import cuda_unavailable_reason

        return cuda_unavailable_reason(device)
    if name == "tensorrt":
        from .trt_frames import tensorrt_unavailable_reason

        return tensorrt_unavailable_reason(device)
    raise BackendUnavailableError(f"unknown backend {name!r}: choose one of {('auto',) + BACKENDS}")


def create_backend(name: str, model, device: str, options: dict[str, Any] | None = None) -> FrameBackend:
    """Build backend ``name`` (raises BackendUnavailableError with the reason when it cannot run here)."""
    options = dict(options or {})
    reason = unavailable_reason(name, device)
    if reason:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    if name == "torch":
        from .torch_reference import TorchBackend

        return TorchBackend(model, device=device, **options)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, **options)
    if name == "mnn":
        from .mnn import MnnBackend

        return MnnBackend(model, **options)
    if name == "cuda":
        from .cuda import CudaBackend

        return CudaBackend(model, device=device, **options)
    from .trt_frames import TensorRTFrameBackend

    return TensorRTFrameBackend(model, device=device, **options)


def _device_for(name: str, device: str) -> str:
    """The device backend ``name`` runs on when ``device`` was asked for ("auto": where it can run)."""
    if device != "auto":
        return resolve_device(device)
    if name in CPU_BACKENDS[1:]:
        return "cpu"
    if name in ("cuda", "tensorrt"):
        return "cuda"
    return resolve_device("auto")


def select_backend(name: str, model, device: str = "auto",
                   options: dict[str, dict[str, Any]] | None = None,
                   create: Callable[..., FrameBackend] = create_backend) -> tuple[FrameBackend, str]:
    """(backend, why it was chosen). ``options``: per-backend keyword arguments, by backend name.

    With ``device="auto"`` each backend runs where it can (onnxruntime and mnn on the CPU, cuda and
    tensorrt on the GPU); the chosen backend's ``device`` is then the renderer's device. ``create``
    builds one backend (``create_backend`` for the bi-layer model; ``fsth.create_backend`` for the
    few-shot model), raising BackendUnavailableError for one that cannot serve ``model`` here."""
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise BackendUnavailableError(f"unknown backend {name!r}: choose one of {('auto',) + BACKENDS}")
    if not isinstance(device, str):
        device = str(device)
    if device != "auto":
        resolve_device(device)  # an unknown or unusable device is an error even when auto would skip it
    options = options or {}
    if name != "auto":
        backend = create(name, model, _device_for(name, device), options.get(name))
        return backend, f"{backend.describe()}: asked for explicitly"
    skipped = []
    for candidate in AUTO_ORDER:
        try:
            backend = create(candidate, model, _device_for(candidate, device), options.get(candidate))
        except BackendUnavailableError as exc:
            skipped.append(f"{candidate}: {exc}")
            continue
        why = f"{backend.describe()}: auto (tensorrt > cuda > onnxruntime)"
        if skipped:
            why += "; skipped " + "; ".join(skipped)
        return backend, why
    raise BackendUnavailableError(f"no backend is usable on device {device!r}: " + "; ".join(skipped))


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "CPU_BACKENDS",
    "FrameBackend",
    "FrameOutputs",
    "PreparedAvatar",
    "create_backend",
    "resolve_device",
    "select_backend",
    "unavailable_reason",
]
