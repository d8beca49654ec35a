"""Discriminator: image + stickman -> 8x8 realism scores and the block features for feature matching."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import ResBlock, activation, conv1x1, conv3x3


class Discriminator(nn.Module):
    """Official ``discriminator`` (keys ``net.first_conv``, ``net.blocks.*``, ``net.final_block``, ``net.linear``)."""

    def __init__(self, min_channels: int, max_channels: int, num_down: int, num_blocks: int, eps: float = 1e-7):
        super().__init__()
        c = min_channels
        blocks = []
        for i in range(1, num_down + 1):
            c_out = min(int(min_channels * 2**i), max_channels)
            blocks.append(ResBlock(c, c_out, resample="down", batch_norm=True, eps=eps))
            c = c_out
        for _ in range(num_down, num_blocks):
            blocks.append(ResBlock(c, c, batch_norm=True, eps=eps))
        self.net = nn.Module()  # official state-dict prefix
        self.net.first_conv = conv3x3(6, min_channels)
        self.net.blocks = nn.ModuleList(blocks)
        self.net.final_block = nn.Sequential(nn.BatchNorm2d(c, eps=eps), activation())
        self.net.linear = conv1x1(c, 1)

    def forward(self, images: Tensor, stickmen: Tensor) -> tuple[Tensor, list[Tensor]]:
        """images, stickmen (N, 3, S, S) -> (scores (N, 1, s, s), [features of each block])."""
        x = self.net.first_conv(torch.cat([images, stickmen], dim=1))
        feats = []
        for block in self.net.blocks:
            x, block_feats = block(x)
            feats.append(block_feats)
        return self.net.linear(self.net.final_block(x)), feats
