"""The ``cuda`` backend: the model's per-frame modules on an NVIDIA GPU in fp16, replayed as CUDA graphs.

Convolutions, the MLP and the per-identity parameters run in fp16; BatchNorm statistics stay fp32
(their variances can exceed the fp16 range) and the outputs are widened to fp32 before the
compositor, whose sampling coordinates are fp32 (DESIGN: warp convention). One CUDA graph is captured
per batch size (LRU of ``max_graphs``) on first use; inputs are copied into its static buffers and
the graph is replayed on the current stream, the same stream the compositor's CUDA twin launches on.
Where capture fails, that batch size runs eagerly and the reason is logged.

Not thread-safe on its own (static buffers): the Renderer serialises calls.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ..errors import BackendUnavailableError
from .base import FrameBackend, FrameOutputs, PreparedAvatar, split_outputs

log = logging.getLogger("pybilayer.backends.cuda")


def cuda_unavailable_reason(device: str = "cuda") -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not str(device).startswith("cuda"):
        return f"the cuda backend runs on a CUDA device, not {device!r}"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    return None


class _Graph:
    """A captured forward for one batch size: static inputs, static outputs, the graph."""

    def __init__(self, graph, keypoints, params, outputs):
        self.graph, self.keypoints, self.params, self.outputs = graph, keypoints, params, outputs
        # The (prepared avatar, frame count) groups whose rows the params buffers hold; the references keep
        # those avatars alive, so an identity check cannot be fooled by a recycled id().
        self.filled_with: list[tuple[object, int]] | None = None


class CudaBackend(FrameBackend):
    name = "cuda"
    thread_safe = False

    def __init__(self, model, device: str = "cuda", cuda_graphs: bool = True, max_graphs: int = 8):
        import torch

        reason = cuda_unavailable_reason(device)
        if reason:
            raise BackendUnavailableError(reason)
        self.torch_device = torch.device(device)
        if self.torch_device.index is None:
            self.torch_device = torch.device("cuda", torch.cuda.current_device())
        self.device = str(self.torch_device)
        self.keypoints_embedder = self._half_copy(model.keypoints_embedder)
        self.inference_generator = self._half_copy(model.inference_generator)
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[int, _Graph | None] = OrderedDict()

    def _half_copy(self, module):
        import torch

        module = copy.deepcopy(module).to(self.torch_device).half().eval()
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.float()
        return module

    def describe(self) -> str:
        return f"cuda on {self.device} (fp16, {'CUDA graphs' if self.cuda_graphs else 'eager'})"

    def prepare(self, avatar) -> PreparedAvatar:
        import torch

        params = avatar.params.to(self.torch_device, torch.float16)
        texture = avatar.texture.to(self.torch_device, torch.float32)
        return PreparedAvatar(texture=texture, state=params)

    # ------------------------------------------------------------------ forward
    def _forward(self, keypoints, params):
        import torch

        with torch.no_grad():
            pose = self.keypoints_embedder(keypoints)
            outputs = self.inference_generator.generate(pose, params)
            return tuple(t.float() for t in outputs)

    def _capture(self, n: int, params_example) -> _Graph | None:
        import torch

        keypoints = torch.zeros((n, 68, 2), device=self.torch_device, dtype=torch.float16)
        params = params_example.map(lambda t: t.clone())
        try:
            side = torch.cuda.Stream(self.torch_device)
            side.wait_stream(torch.cuda.current_stream(self.torch_device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph (cuDNN autotuning, lazy init)
                    self._forward(keypoints, params)
            torch.cuda.current_stream(self.torch_device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._forward(keypoints, params)
        except RuntimeError as exc:  # capture is an optimisation: fall back to eager, say why
            log.warning("CUDA graph capture failed for batch %d, running eagerly: %s", n, exc)
            return None
        return _Graph(graph, keypoints, params, outputs)

    def run(self, groups: Sequence[tuple[PreparedAvatar, np.ndarray]]) -> list[FrameOutputs]:
        import torch

        from ..models import InferenceParams

        sizes = [len(kp) for _, kp in groups]
        n = sum(sizes)
        keypoints = torch.from_numpy(np.concatenate([kp for _, kp in groups])).to(self.torch_device, non_blocking=True)
        keypoints = keypoints.half()
        key = [(prepared, size) for (prepared, _), size in zip(groups, sizes)]

        def frame_params():
            return InferenceParams.cat([prepared.state.repeat_frames(size) for (prepared, _), size in zip(groups, sizes)])

        if not self.cuda_graphs:
            return split_outputs(FrameOutputs(*self._forward(keypoints, frame_params())), sizes)
        if n not in self._graphs:
            self._graphs[n] = self._capture(n, frame_params())
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(n)
        graph = self._graphs[n]
        if graph is None:
            return split_outputs(FrameOutputs(*self._forward(keypoints, frame_params())), sizes)
        graph.keypoints.copy_(keypoints)
        same = graph.filled_with is not None and len(graph.filled_with) == len(key) and all(
            a is b and m == n for (a, m), (b, n) in zip(graph.filled_with, key))
        if not same:  # the same avatars as last time: their rows are already in place
            flat_static, flat_new = graph.params.flatten(), frame_params().flatten()
            for name, tensor in flat_static.items():
                tensor.copy_(flat_new[name])
            graph.filled_with = key
        graph.graph.replay()
        return split_outputs(FrameOutputs(*graph.outputs), sizes)
