"""Texture enhancer: unrolled, gradient-guided refinement of the texture (once per avatar)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import ResBlock, activation, conv3x3
from .warp import sample_texture


def _width(min_channels: int, exponent: int, max_channels: int) -> int:
    return min(int(min_channels * 2**exponent), max_channels)


class TextureEnhancer(nn.Module):
    """Official ``texture_enhancer`` (keys ``net.blocks.*``).

    Layout: conv(6->c), ``num_down`` down blocks, ``num_blocks`` same-resolution blocks (the source
    frames are averaged after the last one), ``num_down`` up blocks, Identity, LeakyReLU, conv(c->3).
    """

    def __init__(self, min_channels: int, max_channels: int, num_down: int, num_blocks: int,
                 unrolling_depth: int, eps: float = 1e-7):
        super().__init__()
        self.unrolling_depth = unrolling_depth
        self.num_down, self.num_blocks = num_down, num_blocks
        layers: list[nn.Module] = [conv3x3(6, min_channels)]
        c = min_channels
        for i in range(1, num_down + 1):
            layers.append(ResBlock(c, _width(min_channels, i, max_channels), resample="down", eps=eps))
            c = _width(min_channels, i, max_channels)
        for _ in range(num_blocks):
            layers.append(ResBlock(c, c, eps=eps))
        for i in range(num_down - 1, -1, -1):
            layers.append(ResBlock(c, _width(min_channels, i, max_channels), resample="up", eps=eps))
            c = _width(min_channels, i, max_channels)
        layers += [nn.Identity(), activation(), conv3x3(c, 3)]
        self.net = nn.Module()  # official state-dict prefix
        self.net.blocks = nn.Sequential(*layers)

    def update(self, inputs: Tensor, frames: int) -> Tensor:
        """(B*K, 6, S, S) texture + guiding gradient -> texture update (B, 3, S, S) in [-1, 1]."""
        blocks = self.net.blocks
        x = blocks[0](inputs)
        aggregate_at = self.num_down + self.num_blocks
        for index in range(1, aggregate_at + self.num_down + 1):
            x, _ = blocks[index](x)
            if index == aggregate_at and frames > 1:
                x = x.view(-1, frames, *x.shape[1:]).mean(dim=1)
        for layer in list(blocks)[aggregate_at + self.num_down + 1:]:
            x = layer(x)
        return torch.tanh(x[:, :3])

    def enhance(self, texture: Tensor, source_images: Tensor, source_delta_uv: Tensor, source_lf: Tensor,
                source_mask: Tensor | None) -> Tensor:
        """Refine ``texture`` (B, 3, S, S) so that re-rendering the K source frames matches them.

        source_images, source_lf: (B*K, 3, S, S); source_delta_uv: (B*K, 2, S, S); source_mask:
        (B*K, 1, S, S) predicted source mask in [0, 1] or None. Each of ``unrolling_depth`` steps takes
        the gradient of 0.5 * sum((I_src - (lf + warp(T)))**2) w.r.t. T (gradients are enabled for it
        even under no_grad / inference_mode callers) and adds ``tanh(net([T, dL/dT]))``.
        """
        keep_graph = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        b = texture.shape[0]
        frames = source_images.shape[0] // b
        if frames * b != source_images.shape[0]:
            raise ValueError(f"TextureEnhancer: {source_images.shape[0]} source frames for {b} textures")
        source_delta_uv, source_lf = source_delta_uv.detach(), source_lf.detach()
        targets = source_images.detach()
        if source_mask is not None:
            source_mask = source_mask.detach()
            targets = targets * source_mask + (-1.0) * (1.0 - source_mask)
        texture = texture.detach()
        with torch.inference_mode(False), torch.enable_grad():
            # Tensors made under inference_mode cannot enter autograd: clone them out of it.
            targets, source_delta_uv, source_lf, texture = (
                t.clone() for t in (targets, source_delta_uv, source_lf, texture))
            if source_mask is not None:
                source_mask = source_mask.clone()
            for _ in range(self.unrolling_depth):
                repeated = texture.repeat_interleave(frames, dim=0)
                # The guiding gradient is taken w.r.t. a detached copy; when the enhancer is trained,
                # gradients still flow through ``repeated`` into earlier unrolling steps (as officially).
                leaf = repeated.detach().requires_grad_(True)
                rendered = source_lf + sample_texture(leaf, source_delta_uv)
                if source_mask is not None:
                    rendered = rendered * source_mask + (-1.0) * (1.0 - source_mask)
                loss = 0.5 * ((targets - rendered) ** 2).sum()
                (gradient,) = torch.autograd.grad(loss, leaf)
                texture = texture + self.update(torch.cat([repeated, gradient], dim=1), frames)
        return texture if keep_graph else texture.detach()
