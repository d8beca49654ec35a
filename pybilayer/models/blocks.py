"""Building blocks shared by the bi-layer networks.

Module containers (``block_feats``, ``block``, ``skip`` as ``nn.Sequential``) reproduce the official
index layout exactly, because those indices are the state-dict keys of released checkpoints
(official_bilayer.md section 2.1). The forward passes are written out explicitly so that adaptive
layers can take their per-identity parameters as arguments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .params import AdaBNParams, AdaConvParams, AdaSpadeParams

NEGATIVE_SLOPE = 0.2  # LeakyReLU slope used everywhere in the official model


def activation() -> nn.Module:
    return nn.LeakyReLU(NEGATIVE_SLOPE)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


def conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


def upsample() -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="nearest")


def adaptive_conv1x1(x: Tensor, params: AdaConvParams) -> Tensor:
    """Per-identity 1x1 convolution as one batched matmul (exportable as MatMul + Add)."""
    b, c, h, w = x.shape
    y = torch.bmm(params.weight, x.reshape(b, c, h * w))
    y += params.bias[:, :, None]  # in place: baddbmm would first materialise the broadcast bias
    return y.view(b, -1, h, w)


class AdaptiveConv1x1(nn.Module):
    """Parameter-free slot for a per-identity 1x1 convolution (official ``AdaptiveConv2d``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: Tensor, params: AdaConvParams) -> Tensor:
        return adaptive_conv1x1(x, params)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"


class AdaBatchNorm(nn.Module):
    """Adaptive BatchNorm: BN without affine, then the identity's per-channel scale and bias."""

    def __init__(self, num_features: int, eps: float):
        super().__init__()
        self.norm_layer = nn.BatchNorm2d(num_features, eps=eps, affine=False)

    def forward(self, x: Tensor, params: AdaBNParams) -> Tensor:
        return torch.addcmul(params.bias[:, :, None, None], self.norm_layer(x), params.scale[:, :, None, None])


class AdaSpadeBatchNorm(nn.Module):
    """AdaSPADE-BN: BN(x) modulated by 1x1 per-identity convolutions of a learned map ``pixel_feats``."""

    def __init__(self, num_features: int, spatial_size: int, eps: float):
        super().__init__()
        self.pixel_feats = nn.Parameter(torch.empty(1, num_features, spatial_size, spatial_size))
        nn.init.kaiming_uniform_(self.pixel_feats, a=math.sqrt(5))
        self.norm_layer = nn.BatchNorm2d(num_features, eps=eps, affine=False)

    def modulation(self, params: AdaSpadeParams) -> tuple[Tensor, Tensor]:
        """Per-identity (scale, bias) maps of shape (B, C, S, S)."""
        b = params.scale_conv.weight.shape[0]
        feats = self.pixel_feats.expand(b, -1, -1, -1)
        scale = adaptive_conv1x1(feats, params.scale_conv) + 1.0
        bias = adaptive_conv1x1(feats, params.bias_conv)
        return scale, bias

    def forward(self, x: Tensor, params: AdaSpadeParams) -> Tensor:
        scale, bias = self.modulation(params)
        return torch.addcmul(bias, self.norm_layer(x), scale)


class ResBlock(nn.Module):
    """Pre-activation residual block without adaptive layers (embedder, enhancer, discriminator).

    ``resample`` is "none", "down" (AvgPool2d(2) after the second conv) or "up" (nearest, before the
    first conv). ``batch_norm`` adds affine BatchNorm before each activation (discriminator).
    ``forward`` returns ``(output, features)`` where ``features`` is the output of ``block_feats``.
    """

    def __init__(self, in_channels: int, out_channels: int, resample: str = "none", batch_norm: bool = False,
                 eps: float = 1e-7):
        super().__init__()
        if resample not in ("none", "down", "up"):
            raise ValueError(f"ResBlock: resample must be 'none', 'down' or 'up', got {resample!r}")
        feats: list[nn.Module] = []
        if batch_norm:
            feats.append(nn.BatchNorm2d(in_channels, eps=eps))
        feats.append(activation())
        if resample == "up":
            feats.append(upsample())
        feats.append(conv3x3(in_channels, out_channels))
        if batch_norm:
            feats.append(nn.BatchNorm2d(out_channels, eps=eps))
        feats.append(activation())
        self.block_feats = nn.Sequential(*feats)

        main: list[nn.Module] = [conv3x3(out_channels, out_channels)]
        if resample == "down":
            main.append(nn.AvgPool2d(2))
        self.block = nn.Sequential(*main)

        if in_channels != out_channels or resample != "none":
            skip: list[nn.Module] = []
            if resample == "up":
                skip.append(upsample())
            skip.append(conv1x1(in_channels, out_channels))
            if resample == "down":
                skip.append(nn.AvgPool2d(2))
            self.skip = nn.Sequential(*skip)
        else:
            self.skip = nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.block_feats(x)
        return self.block(feats) + self.skip(x), feats


class AdaptiveUpBlock(nn.Module):
    """Up-sampling residual block of the generators with adaptive norms and an adaptive 1x1 skip.

    ``norm`` is "ada_bn" (inference generator) or "ada_spade_bn" (texture generator). ``efficient``
    places the first convolution before the up-sampling (inference generator). The first norm of the
    generator's first block is a plain affine BatchNorm (``first_norm_plain``).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, efficient: bool, first_norm_plain: bool,
                 input_size: int, eps: float):
        super().__init__()
        if norm not in ("ada_bn", "ada_spade_bn"):
            raise ValueError(f"AdaptiveUpBlock: norm must be 'ada_bn' or 'ada_spade_bn', got {norm!r}")
        self.first_norm_plain = first_norm_plain
        self.efficient = efficient

        def adaptive_norm(channels: int, size: int) -> nn.Module:
            if norm == "ada_bn":
                return AdaBatchNorm(channels, eps)
            return AdaSpadeBatchNorm(channels, size, eps)

        norm1 = nn.BatchNorm2d(in_channels, eps=eps) if first_norm_plain else adaptive_norm(in_channels, input_size)
        if efficient:
            feats = [norm1, activation(), conv3x3(in_channels, out_channels),
                     adaptive_norm(out_channels, input_size), activation()]
            main = [upsample(), conv3x3(out_channels, out_channels)]
        else:
            feats = [norm1, activation(), upsample(), conv3x3(in_channels, out_channels),
                     adaptive_norm(out_channels, input_size * 2), activation()]
            main = [conv3x3(out_channels, out_channels)]
        self.block_feats = nn.Sequential(*feats)
        self.block = nn.Sequential(*main)
        self.skip = nn.Sequential(upsample(), AdaptiveConv1x1(in_channels, out_channels))

    @property
    def norm1(self) -> nn.Module:
        return self.block_feats[0]

    @property
    def norm2(self) -> nn.Module:
        return self.block_feats[3 if self.efficient else 4]

    def forward(self, x: Tensor, params) -> Tensor:
        """``params``: an InferenceBlockParams or TextureBlockParams (norm1 is None for the first block)."""
        h = self.norm1(x) if self.first_norm_plain else self.norm1(x, params.norm1)
        h = F.leaky_relu(h, NEGATIVE_SLOPE, inplace=True)
        if self.efficient:
            h = self.block_feats[2](h)
        else:
            h = self.block_feats[3](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = F.leaky_relu(self.norm2(h, params.norm2), NEGATIVE_SLOPE, inplace=True)
        if self.efficient:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = self.block[1](h)
        else:
            h = self.block[0](h)
        # 1x1 conv then nearest up-sampling equals the official up-sampling then 1x1 conv, at 1/4 the cost.
        skip = F.interpolate(adaptive_conv1x1(x, params.skip), scale_factor=2.0, mode="nearest")
        return h + skip


def adaptive_up_blocks(
    block_in: tuple[int, ...], block_out: tuple[int, ...], input_size: int, norm: str, efficient: bool, eps: float
) -> tuple[list[nn.Module], int]:
    """The generators' stack of adaptive up-blocks (block 0's first norm plain, as released) and the
    spatial size it ends at."""
    layers: list[nn.Module] = []
    size = input_size
    for j, (c_in, c_out) in enumerate(zip(block_in, block_out)):
        layers.append(AdaptiveUpBlock(c_in, c_out, norm, efficient=efficient, first_norm_plain=j == 0,
                                      input_size=size, eps=eps))
        size *= 2
    return layers, size


def adaptive_layer_names(generator: nn.Module, prefix: str, num_blocks: int) -> dict[str, str]:
    """Which module consumes each per-identity parameter set: ``{"blocks.1.norm1": "<prefix>.blocks.1.block_feats.0",
    ..., "final_norm": "<prefix>.blocks.<n>"}``, read off the modules the forward pass actually calls."""
    names = {id(module): f"{prefix}.{name}" for name, module in generator.named_modules()}
    layers = {}
    for j in range(num_blocks):
        block = generator.blocks[j]
        if not block.first_norm_plain:
            layers[f"blocks.{j}.norm1"] = names[id(block.norm1)]
        layers[f"blocks.{j}.norm2"] = names[id(block.norm2)]
        layers[f"blocks.{j}.skip"] = names[id(block.skip[1])]
    layers["final_norm"] = names[id(generator.blocks[num_blocks])]
    return layers


class Projector(nn.Module):
    """Predicts per-identity adaptive parameters from the identity embeddings (official ``Projector``).

    For generator block j, the (B, C_emb, 8, 8) embedding is average-pooled (replicated) to
    (pool, pool), cut into ``rows`` rows of ``row_length`` values, and every head, three Linear layers
    with no nonlinearity, maps each row to K weights and 1 bias. ``forward`` returns, per block, a
    list of AdaConvParams(weight (B, rows, K), bias (B, rows)) in head order.
    """

    def __init__(self, specs):
        super().__init__()
        self.specs = list(specs)
        self.fc_blocks = nn.ModuleList(
            nn.ModuleList(
                nn.Sequential(
                    nn.Linear(spec.row_length, spec.hidden),
                    nn.Linear(spec.hidden, spec.hidden),
                    nn.Linear(spec.hidden, width),
                )
                for width in spec.head_widths
            )
            for spec in self.specs
        )

    def forward(self, embeds: list[Tensor]) -> list[list[AdaConvParams]]:
        if len(embeds) != len(self.specs):
            raise ValueError(f"Projector: expected {len(self.specs)} embeddings, got {len(embeds)}")
        outputs = []
        for embed, spec, heads in zip(embeds, self.specs, self.fc_blocks):
            b = embed.shape[0]
            rows = F.adaptive_avg_pool2d(embed, (spec.pool_size, spec.pool_size)).reshape(b * spec.rows, -1)
            block = []
            for head in heads:
                values = head(rows).view(b, spec.rows, -1)
                block.append(AdaConvParams(weight=values[:, :, :-1], bias=values[:, :, -1]))
            outputs.append(block)
        return outputs


__all__ = [
    "AdaBatchNorm",
    "AdaSpadeBatchNorm",
    "AdaptiveConv1x1",
    "AdaptiveUpBlock",
    "Projector",
    "ResBlock",
    "activation",
    "adaptive_layer_names",
    "adaptive_conv1x1",
    "conv1x1",
    "conv3x3",
    "upsample",
]
