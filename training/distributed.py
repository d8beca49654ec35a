"""Process-group set-up and synchronised BatchNorm for CPU (gloo) and GPU (NCCL).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so on CPU the BatchNorm layers become
``CrossProcessBatchNorm2d``: batch statistics are summed over all processes with a differentiable
all-reduce, which is the same computation SyncBatchNorm does on GPUs. Both keep BatchNorm2d's
state-dict keys, so checkpoints do not depend on how the model was trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(device: str) -> DistContext:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); start NCCL on GPU, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but torch sees no CUDA GPU")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return DistContext(rank, local_rank, world_size, torch_device)


class _SumAcrossProcesses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossProcessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of all processes (gloo or NCCL)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # Two passes (mean, then the centred second moment): E[x^2] - E[x]^2 loses the gradient to
        # cancellation in float32 where activations have a large mean.
        channels = x.shape[1]
        first = _SumAcrossProcesses.apply(torch.cat([x.sum(dim=(0, 2, 3)), x.new_full((1,), float(x.numel() // channels))]))
        count = first[-1]
        mean = first[:channels] / count
        centred = x - mean[None, :, None, None]
        var = _SumAcrossProcesses.apply(centred.pow(2).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp_min(1.0)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        y = centred * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d by torch's SyncBatchNorm (CUDA) or CrossProcessBatchNorm2d (CPU)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, (CrossProcessBatchNorm2d, nn.SyncBatchNorm)):
            cls = nn.SyncBatchNorm if device.type == "cuda" else CrossProcessBatchNorm2d
            like = next(iter(child.state_dict().values()))
            replacement = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                              device=device, dtype=like.dtype if like.is_floating_point() else None)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child, device)
    return module


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]
