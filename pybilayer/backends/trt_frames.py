"""The ``tensorrt`` backend seen through the FrameBackend contract.

The engine itself (plan build, cache, bindings) is ``pybilayer.backends.tensorrt.TensorRTBackend``;
this adapter turns avatars into its graph inputs (the ``InferenceParams.flatten()`` names, one row
per frame) and splits batches larger than the plan's profile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import FrameBackend, FrameOutputs, PreparedAvatar, split_outputs
from .frame_graph import KEYPOINTS_INPUT, OUTPUT_NAMES


def tensorrt_unavailable_reason(device: str = "cuda") -> str | None:
    if not str(device).startswith("cuda"):
        return f"the tensorrt backend runs on a CUDA device, not {device!r}"
    from ..trt import tensorrt_unavailable_reason as reason

    return reason()


class TensorRTFrameBackend(FrameBackend):
    name = "tensorrt"
    thread_safe = False

    def __init__(self, model, device: str = "cuda", precision: str = "fp16", max_batch: int = 8, **engine_options):
        from .tensorrt import TensorRTBackend

        self.engine = TensorRTBackend(model, device=device, precision=precision, max_batch=max_batch, **engine_options)
        self.torch_device = self.engine.device
        self.device = str(self.torch_device)
        self.max_batch = self.engine.max_batch

    def describe(self) -> str:
        return f"tensorrt on {self.device} ({self.engine.precision}, batch 1..{self.max_batch})"

    def prepare(self, avatar) -> PreparedAvatar:
        import torch

        params = {k: v.to(self.torch_device, torch.float32) for k, v in avatar.params.flatten().items()}
        return PreparedAvatar(texture=avatar.texture.to(self.torch_device, torch.float32), state=params)

    def run(self, groups: Sequence[tuple[PreparedAvatar, np.ndarray]]) -> list[FrameOutputs]:
        import torch

        sizes = [len(kp) for _, kp in groups]
        feeds = {KEYPOINTS_INPUT: torch.from_numpy(np.concatenate([kp for _, kp in groups])).to(self.torch_device)}
        for name in groups[0][0].state:
            feeds[name] = torch.cat([prepared.state[name].expand(n, *prepared.state[name].shape[1:])
                                     for (prepared, _), n in zip(groups, sizes)]).contiguous()
        total = sum(sizes)
        chunks = []
        for start in range(0, total, self.max_batch):
            chunk = {k: v[start:start + self.max_batch] for k, v in feeds.items()}
            chunks.append(self.engine.run(chunk))
        merged = [torch.cat([c[name] for c in chunks]) if len(chunks) > 1 else chunks[0][name] for name in OUTPUT_NAMES]
        return split_outputs(FrameOutputs(*merged), sizes)
