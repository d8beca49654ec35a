"""The ``torch`` backend: the model's own modules, fp32, eager. The reference every other backend matches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import FrameBackend, FrameOutputs, PreparedAvatar, split_outputs


class TorchBackend(FrameBackend):
    """Runs ``keypoints_embedder`` + ``inference_generator.generate`` in fp32 on ``device`` (CPU or CUDA)."""

    name = "torch"
    thread_safe = True  # eval-mode forward under inference_mode shares no mutable state

    def __init__(self, model, device: str = "cpu"):
        import torch

        self.torch_device = torch.device(device)
        self.device = str(self.torch_device)
        self.model = model
        # Only the per-frame networks move to the device; the model stays where the caller keeps it.
        self.keypoints_embedder = model.keypoints_embedder.to(self.torch_device, torch.float32).eval()
        self.inference_generator = model.inference_generator.to(self.torch_device, torch.float32).eval()

    def prepare(self, avatar) -> PreparedAvatar:
        import torch

        params = avatar.params.to(self.torch_device, torch.float32)
        if self.torch_device.type == "cpu":
            texture = avatar.texture.detach().float().numpy()
        else:
            texture = avatar.texture.to(self.torch_device, torch.float32)
        return PreparedAvatar(texture=texture, state=params)

    def run(self, groups: Sequence[tuple[PreparedAvatar, np.ndarray]]) -> list[FrameOutputs]:
        import torch

        from ..models import InferenceParams

        sizes = [len(kp) for _, kp in groups]
        keypoints = torch.from_numpy(np.concatenate([kp for _, kp in groups])).to(self.torch_device)
        params = InferenceParams.cat([prepared.state.repeat_frames(n) for (prepared, _), n in zip(groups, sizes)])
        with torch.inference_mode():
            pose = self.keypoints_embedder(keypoints)
            delta_uv, lf, mask_logits = self.inference_generator.generate(pose, params)
        if self.torch_device.type == "cpu":
            out = FrameOutputs(delta_uv.numpy(), lf.numpy(), mask_logits.numpy())
        else:
            out = FrameOutputs(delta_uv, lf, mask_logits)
        return split_outputs(out, sizes)
