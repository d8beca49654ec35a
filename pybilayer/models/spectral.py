"""Spectral normalisation of every Conv2d and Linear (official training), its removal, and a sane
random initialisation.

Training applies ``torch.nn.utils.spectral_norm`` (old-style hooks, eps=1e-7), whose state dict is
exactly the official ``weight_orig`` / ``weight_u`` / ``weight_v``. Inference removes it.

A freshly initialised network with random ``u``/``v`` has an arbitrary sigma estimate, and the
6-block generators overflow (official_bilayer.md 4.1.4). ``normalize_random_init_`` therefore runs
15 power iterations per layer and divides each weight by the resulting spectral norm (true norm
within ~3% of 1 afterwards), which is the weight a model trained with SN would use; with SN applied
it also stores the converged ``u``/``v``. A random model stays finite and unsaturated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import remove_spectral_norm as _remove
from torch.nn.utils import spectral_norm as _apply

SN_EPS = 1e-7
_NORMALISED = (nn.Conv2d, nn.Linear)


def _targets(module: nn.Module):
    # Exact type match, as the official rule (class name 'conv2d' / 'linear').
    return [m for m in module.modules() if type(m) in _NORMALISED]


def has_spectral_norm(module: nn.Module) -> bool:
    return any(hasattr(m, "weight_orig") for m in _targets(module))


def apply_spectral_norm(module: nn.Module, eps: float = SN_EPS) -> nn.Module:
    for m in _targets(module):
        if not hasattr(m, "weight_orig"):
            _apply(m, name="weight", n_power_iterations=1, eps=eps, dim=0)
    return module


def remove_spectral_norm(module: nn.Module) -> nn.Module:
    """W = W_orig / (u^T W_orig v) with the stored u, v (what the official infer.py does)."""
    for m in _targets(module):
        if hasattr(m, "weight_orig"):
            _remove(m, name="weight")
    return module


@torch.no_grad()
def _top_singular_pair(matrix: torch.Tensor, u: torch.Tensor, iterations: int, eps: float):
    """(u, v) of the largest singular value by plain power iteration (as spectral norm does)."""
    v = F.normalize(matrix.t() @ u, dim=0, eps=eps)
    for _ in range(iterations):
        u = F.normalize(matrix @ v, dim=0, eps=eps)
        v = F.normalize(matrix.t() @ u, dim=0, eps=eps)
    return u, v


@torch.no_grad()
def normalize_random_init_(module: nn.Module, iterations: int = 15, eps: float = SN_EPS,
                           generator: torch.Generator | None = None) -> nn.Module:
    """Divide every Conv2d/Linear weight by its spectral norm (power iteration); with spectral norm
    applied, also store the converged u and v. Meant for randomly initialised models only."""
    for m in _targets(module):
        weight = m.weight_orig if hasattr(m, "weight_orig") else m.weight
        if weight.is_meta:
            continue
        matrix = weight.reshape(weight.shape[0], -1)
        if hasattr(m, "weight_u"):
            start = m.weight_u
        else:
            start = torch.randn(matrix.shape[0], generator=generator, dtype=matrix.dtype).to(matrix.device)
        u, v = _top_singular_pair(matrix, F.normalize(start, dim=0, eps=eps), iterations, eps)
        sigma = torch.dot(u, matrix @ v)
        weight.div_(sigma)
        if hasattr(m, "weight_u"):
            # After the division the same u, v are still the top singular pair (sigma is now 1).
            m.weight_u.copy_(u)
            m.weight_v.copy_(v)
            m.weight.copy_(weight)  # the hook's cached tensor, used before the next forward
    return module
