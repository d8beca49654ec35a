"""TensorRT backend of the per-frame network (keypoint MLP + inference generator and heads).

    backend = TensorRTBackend(model, device="cuda", precision="fp16", max_batch=8)
    outputs = backend.run({"keypoints": kp, **avatar_params})   # names as in the exported ONNX graph
    delta_uv, lf, mask_logits = (outputs[n] for n in ("delta_uv", "lf", "mask_logits"))

Interface (the same feed -> outputs contract as an onnxruntime session over the same ONNX graph):
`name`, `device`, `input_names`, `output_names`, `max_batch`, `run(feeds, stream=None) -> dict`.

- Feeds: torch tensors on `device`, by graph input name (cast to the engine's input dtypes here).
- Stream: by default torch's current CUDA stream of `device`, the stream the compositor's CUDA twin
  is launched on for torch tensors, so network and compositor are ordered without a synchronisation.
  `stream=` takes a cudaStream_t handle (e.g. `pybilayer.native.Stream().handle`) whose work the feeds
  are already ordered with.
- Batch: any N >= 1. The plan's profile covers 1..max_batch; a larger batch runs as consecutive
  chunks, each written into its own rows of the output buffers (so do not split it yourself).
- Outputs: float32 torch views (zero-copy, `torch.as_tensor` of `__cuda_array_interface__`) of device
  buffers that the native core owns (`pybilayer.native.DeviceBuffer`); see `OutputPool`. A buffer is
  reused only once no view of it is left, so outputs a caller keeps are never overwritten; a caller
  that consumes them before the next `run` (the compositor does, on the same stream) costs no
  allocation. Calls from several threads are serialised while they enqueue; each gets its own buffers
  while it holds its outputs.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import native
from ..errors import BackendUnavailableError
from ..trt import DEFAULT_WORKSPACE_MIB, Precision, TrtEngine, build_engine, import_tensorrt, load_engine

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TensorRTBackend:
    """Runs a TensorRT plan of the per-frame network; builds (or reuses from the cache) the plan first.

    model: a loaded Bilayer or a checkpoint path, from which the plan is built or looked up in the
    cache; or None with `plan` naming a built plan (its metadata must match this GPU and TensorRT).
    """

    name = "tensorrt"

    def __init__(
        self,
        model: Any = None,
        *,
        plan: str | Path | None = None,
        device: Any = "cuda",
        precision: Precision = "fp16",
        max_batch: int = 8,
        cache_dir: str | Path | None = None,
        workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    ):
        import torch

        if (model is None) == (plan is None):
            raise ValueError("TensorRTBackend needs exactly one of model (Bilayer or checkpoint path) or plan")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendUnavailableError(f"the TensorRT backend runs on a CUDA device, not {self.device}")
        if not torch.cuda.is_available():
            raise BackendUnavailableError("the TensorRT backend needs a CUDA GPU visible to torch; none is visible")
        caps = native.capabilities()
        if not caps.cuda:  # output buffers and the compositor's CUDA twin come from the native core
            raise BackendUnavailableError(
                f"the TensorRT backend needs the CUDA twin of pybilayer._C: {caps.cuda_reason}"
            )
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        trt = import_tensorrt()
        with torch.cuda.device(self.device):
            if plan is None:
                plan = build_engine(model, precision, max_batch, cache_dir, workspace_mib=workspace_mib)
            self.plan_path = Path(plan)
            self._engine: TrtEngine = load_engine(self.plan_path, self.device, trt=trt)
        self.precision = self._engine.metadata.spec.precision
        self.max_batch = self._engine.max_batch
        self._pool = OutputPool(
            self._engine.output_shapes,
            self._engine.outputs_dtypes,
            rows_step=self.max_batch,
            allocate=self._allocate,
            as_tensor=lambda buffer: torch.as_tensor(buffer, device=self.device),
        )
        self._lock = threading.Lock()

    def _allocate(self, shape: tuple[int, ...], dtype: str) -> Any:
        import torch

        with torch.cuda.device(self.device):
            return native.DeviceBuffer(tuple(shape), dtype)  # cudaMalloc'd by the native core, no pycuda

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._engine.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._engine.outputs)

    def run(self, feeds: Mapping[str, torch.Tensor], stream: int | None = None) -> dict[str, torch.Tensor]:
        """Enqueue the network (see the module docstring); float32 outputs by graph output name."""
        import torch

        handle = torch.cuda.current_stream(self.device).cuda_stream if stream is None else int(stream)
        with self._lock:  # two threads must not be handed the same idle buffer set
            outputs = self._engine.run(feeds, self._pool.views(self._engine.feed_batch(feeds)), handle)
        # The exported graphs keep float32 outputs even at fp16; a plan with fp16 outputs is widened
        # here because sampling offsets stay fp32 (DESIGN: conventions). float() of float32 is a no-op.
        return {name: tensor.float() for name, tensor in outputs.items()}

    def __repr__(self) -> str:
        return f"TensorRTBackend(plan={str(self.plan_path)!r}, precision={self.precision!r}, device={self.device})"


class OutputPool:
    """Output buffers handed out as zero-copy torch views, never written while a view of them lives.

    allocate(shape, dtype) makes a buffer object (a native DeviceBuffer on a GPU); as_tensor(buffer)
    makes a torch view of it that holds a reference to that object until its last view (slices
    included) dies. So a buffer's reference count beyond the pool's own says whether outputs of an
    earlier call are still in use (kept by a caller, or being assembled into a larger batch): then a
    new set is allocated and the old one is freed with its last view. Sets have room for a multiple
    of `rows_step` rows, at least the batch asked for.
    """

    def __init__(
        self,
        shapes: Callable[[int], dict[str, tuple[int, ...]]],
        dtypes: Mapping[str, str],
        *,
        rows_step: int,
        allocate: Callable[[tuple[int, ...], str], Any],
        as_tensor: Callable[[Any], torch.Tensor],
    ):
        self._shapes = shapes
        self._dtypes = dict(dtypes)
        self._rows_step = rows_step
        self._allocate = allocate
        self._as_tensor = as_tensor
        self._buffers: dict[str, Any] = {}
        self._idle_refcounts: dict[str, int] = {}
        self.rows = 0
        self.allocations = 0  # how many buffer sets were made (diagnostics and tests)

    def views(self, batch: int) -> dict[str, torch.Tensor]:
        """Torch views, by output name, of a buffer set with room for `batch` rows and no other user."""
        if batch > self.rows or self._refcounts() != self._idle_refcounts:
            rows = max(self.rows, -(-batch // self._rows_step) * self._rows_step)
            self._buffers = {
                name: self._allocate(shape, self._dtypes[name]) for name, shape in self._shapes(rows).items()
            }
            self._idle_refcounts = self._refcounts()
            self.rows = rows
            self.allocations += 1
        return {name: self._as_tensor(buffer) for name, buffer in self._buffers.items()}

    def _refcounts(self) -> dict[str, int]:
        # One code path for measuring and comparing, so its own temporary references cancel out.
        return {name: sys.getrefcount(self._buffers[name]) for name in self._buffers}
