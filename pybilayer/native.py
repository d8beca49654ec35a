"""The native core, ``pybilayer._C``, and what it can do on this machine.

Importing this module never fails: a missing extension or a missing GPU is reported by
``capabilities()`` and raised (as ``BackendUnavailableError``) only when the feature is used.

    from pybilayer import native
    caps = native.capabilities()
    caps.native, caps.native_reason     # the compiled extension (CPU compositor and heads kernels)
    caps.cpu_isas                       # its CPU kernels' code paths this CPU runs, e.g. ("portable", "avx2")
    caps.cuda, caps.cuda_reason         # its CUDA twin and a usable GPU

Native objects for callers that manage GPU memory without torch (e.g. TensorRT bindings); both raise
``BackendUnavailableError`` where no GPU is usable:

- ``DeviceBuffer(shape, dtype="uint8")``: cudaMalloc'd memory, freed with the object. ``shape`` is a
  tuple or an int (bytes for uint8); dtypes uint8, int8, bool, int32, int64, float16, float32.
  Exposes ``__cuda_array_interface__`` (so ``torch.as_tensor(buf, device="cuda")`` and
  ``pybilayer.ops.composite`` take it without a copy), ``.ptr``, ``.nbytes``, ``.device``, ``.shape``,
  ``.copy_from_host(array)`` and ``.copy_to_host(array)`` (synchronous, exactly ``nbytes``).
- ``Stream()``: a non-blocking cudaStream_t; ``.handle`` (int, as TensorRT's ``execute_async_v3`` and
  ``composite(stream=...)`` take it), ``.device``, ``.synchronize()``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

from .errors import BackendUnavailableError

__all__ = ["Capabilities", "capabilities", "load"]  # plus DeviceBuffer and Stream, resolved on use


@dataclass(frozen=True)
class Capabilities:
    """What the native core can do here; each ``*_reason`` says why not (None when available)."""

    native: bool
    native_reason: str | None
    cuda: bool
    cuda_reason: str | None
    cpu_isas: tuple[str, ...] = ()  # the CPU kernels' code paths this CPU runs, narrowest first ("portable", "avx2", "avx512")
    cuda_built: bool = False  # the extension contains the CUDA twin
    cuda_architectures: str = ""  # as compiled, e.g. "75-real,80-real,...,90"
    cuda_device_count: int = 0
    cuda_device_name: str | None = None


def _import_extension() -> tuple[ModuleType | None, str | None]:
    try:
        from . import _C
    except ImportError as exc:
        return None, (
            f"pybilayer._C is not built or cannot be loaded ({exc}); "
            "install with `pip install -e .` (needs cmake and a C++17 compiler)"
        )
    return _C, None


@functools.cache
def capabilities() -> Capabilities:
    """Probe once: the extension, whether it has the CUDA twin, and the CUDA devices it sees."""
    module, reason = _import_extension()
    if module is None:
        return Capabilities(native=False, native_reason=reason, cuda=False, cuda_reason=reason)
    build = module.build_info()
    devices = module.cuda_devices()
    cuda = bool(build["cuda"]) and devices["count"] > 0
    return Capabilities(
        native=True,
        native_reason=None,
        cuda=cuda,
        cuda_reason=None if cuda else devices["error"],
        cpu_isas=tuple(module.cpu_isas()),
        cuda_built=bool(build["cuda"]),
        cuda_architectures=build["cuda_architectures"],
        cuda_device_count=devices["count"],
        cuda_device_name=devices["name"],
    )


def load() -> ModuleType:
    """The extension module, or BackendUnavailableError saying why it cannot be used."""
    module, reason = _import_extension()
    if module is None:
        raise BackendUnavailableError(reason)
    return module


def __getattr__(name: str):
    if name in ("DeviceBuffer", "Stream"):
        return getattr(load(), name)
    raise AttributeError(f"module 'pybilayer.native' has no attribute {name!r}")
