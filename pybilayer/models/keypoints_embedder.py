"""Keypoints embedder: 68 landmarks in [-1, 1] -> the (C, 4, 4) input tensor of the inference generator."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .blocks import activation
from .config import NUM_KEYPOINTS


def harmonic_frequencies(num_harmonics: int) -> Tensor:
    """(1, 1, H) buffer ``pi * 2**k``, k = 0..H-1 (official ``frequencies``)."""
    return (math.pi * 2.0 ** torch.arange(num_harmonics, dtype=torch.float32))[None, None]


class KeypointsEmbedder(nn.Module):
    """Official ``keypoints_embedder``: an MLP (keys ``net.mlp.{0,2,4,6}``), optionally with the
    harmonic encoding ``[sin(x*pi*2^k), cos(x*pi*2^k)]`` (buffer ``frequencies``, 1088 inputs)."""

    def __init__(self, hidden_channels: int, num_layers: int, output_channels: int, output_size: int,
                 num_harmonics: int = 0):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"KeypointsEmbedder: num_layers must be >= 2, got {num_layers}")
        self.output_channels, self.output_size = output_channels, output_size
        in_features = NUM_KEYPOINTS * 2 * (2 * num_harmonics if num_harmonics else 1)
        if num_harmonics:
            self.register_buffer("frequencies", harmonic_frequencies(num_harmonics))
        else:
            self.frequencies = None
        layers: list[nn.Module] = [nn.Linear(in_features, hidden_channels)]
        for _ in range(num_layers - 2):
            layers += [activation(), nn.Linear(hidden_channels, hidden_channels)]
        layers += [activation(), nn.Linear(hidden_channels, output_channels * output_size**2)]
        self.net = nn.Module()  # official state-dict prefix
        self.net.mlp = nn.Sequential(*layers)

    def forward(self, keypoints: Tensor) -> Tensor:
        """``keypoints`` (N, 68, 2) in [-1, 1] crop coordinates -> (N, C, s, s)."""
        if keypoints.dim() != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 2):
            raise ValueError(f"KeypointsEmbedder: keypoints must be (N, 68, 2), got {tuple(keypoints.shape)}")
        n = keypoints.shape[0]
        x = keypoints.reshape(n, NUM_KEYPOINTS * 2)  # [x0, y0, x1, y1, ...]
        if self.frequencies is not None:
            x = (x[..., None] * self.frequencies).reshape(n, -1)
            x = torch.cat([torch.sin(x), torch.cos(x)], dim=1)
        return self.net.mlp(x).view(n, self.output_channels, self.output_size, self.output_size)
