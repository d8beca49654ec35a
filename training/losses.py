"""The released losses (official_bilayer.md section 3.1), each on explicit tensors.

Means are per element over the *global* batch: under DistributedDataParallel every rank's loss is
its local mean and DDP averages gradients, which equals the global mean for equal local batches.
The relativistic averages of RaGAN are the one cross-sample statistic; ``global_mean`` computes them
over all processes (the official code used each GPU's own mean), so N processes train exactly like
one process with the same global batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over all its elements on all processes; differentiable (gradients reach every rank)."""
    world = _world_size()
    if world == 1:
        return x.mean()
    from torch.distributed.nn.functional import all_reduce

    stats = torch.stack([x.sum(), x.new_tensor(float(x.numel()))])
    stats = all_reduce(stats)
    return stats[0] / stats[1]


def ragan_hinge_discriminator(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """relu(1 - (r - mean f)) + relu(1 + (f - mean r)); ``fake_scores`` come from detached fakes."""
    return F.relu(1.0 - (real_scores - global_mean(fake_scores))).mean() + F.relu(
        1.0 + (fake_scores - global_mean(real_scores))
    ).mean()


def ragan_hinge_generator(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """relu(1 - (f - mean r)) + relu(1 + (r - mean f)), real scores detached."""
    real_scores = real_scores.detach()
    return F.relu(1.0 - (fake_scores - global_mean(real_scores))).mean() + F.relu(
        1.0 + (real_scores - global_mean(fake_scores))
    ).mean()


def feature_matching(real_features: Sequence[Tensor], fake_features: Sequence[Tensor]) -> Tensor:
    """Mean over discriminator blocks of L1(fake, real.detach())."""
    if len(real_features) != len(fake_features) or not real_features:
        raise ValueError(
            f"feature_matching: got {len(real_features)} real and {len(fake_features)} fake feature maps"
        )
    total = sum(F.l1_loss(f, r.detach()) for r, f in zip(real_features, fake_features))
    return total / len(real_features)


def pixelwise_l1(low_frequency: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(low_frequency, target)


def mask_bce(mask_logits: Tensor, target_mask: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(mask_logits, target_mask)


def warp_regulariser(delta_uv: Tensor) -> Tensor:
    return delta_uv.abs().mean()


def composite_on_background(image: Tensor, mask: Tensor) -> Tensor:
    """``image * m + (-1) * (1 - m)`` with the mask detached, as the released training did."""
    mask = mask.detach()
    return image * mask - (1.0 - mask)
