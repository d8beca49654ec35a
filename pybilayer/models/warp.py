"""The warp of the bi-layer model: sample the texture at ``identity_grid + delta_uv``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def identity_grid(size: int, device=None, dtype=torch.float32) -> Tensor:
    """(1, size, size, 2) pixel centres ``(i + 0.5) * 2 / size - 1`` in (x, y) order.

    Computed exactly (no linspace rounding), so sampling at it with align_corners=False returns the
    texture bit for bit. The official buffer holds the same values up to 1 ulp."""
    centres = (torch.arange(size, device=device, dtype=torch.float64) + 0.5) * (2.0 / size) - 1.0
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([u, v], dim=2)[None].to(dtype)


def sample_texture(texture: Tensor, delta_uv: Tensor, grid: Tensor | None = None) -> Tensor:
    """High-frequency layer: ``grid_sample(texture, grid + delta_uv)``, bilinear, zeros, align_corners=False.

    texture (N, C, Ht, Wt); delta_uv (N, 2, H, W); grid (1, H, W, 2) or None for ``identity_grid(H)``."""
    if grid is None:
        grid = identity_grid(delta_uv.shape[-1], device=delta_uv.device, dtype=delta_uv.dtype)
    uv = grid.to(delta_uv.dtype) + delta_uv.permute(0, 2, 3, 1)
    # Sampling coordinates are never rounded to a half-precision texture's dtype (DESIGN: fp32 warp).
    dtype = torch.promote_types(texture.dtype, uv.dtype)
    return F.grid_sample(texture.to(dtype), uv.to(dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
