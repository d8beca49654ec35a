"""Texture generator: identity embeddings -> the high-frequency texture (3, S, S), once per avatar."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (
    NEGATIVE_SLOPE,
    AdaSpadeBatchNorm,
    Projector,
    activation,
    adaptive_layer_names,
    adaptive_up_blocks,
    conv3x3,
)
from .config import GeneratorSpec, ProjectorBlockSpec
from .params import AdaConvParams, AdaSpadeParams, TextureBlockParams, TextureParams


def _spade(scale_head: AdaConvParams, bias_head: AdaConvParams) -> AdaSpadeParams:
    return AdaSpadeParams(scale_conv=scale_head, bias_conv=bias_head)


def texture_params_from_heads(heads: list[list[AdaConvParams]]) -> TextureParams:
    """Official positional assignment (spec 2.6): heads j.0/j.1 -> block j norm2, j.2 -> block j skip,
    j.3/j.4 -> block j+1 norm1 (the final norm for the last j)."""
    n = len(heads)
    norm1 = [None] + [_spade(heads[j][3], heads[j][4]) for j in range(n - 1)]
    blocks = tuple(
        TextureBlockParams(norm1=norm1[j], norm2=_spade(heads[j][0], heads[j][1]), skip=heads[j][2])
        for j in range(n)
    )
    return TextureParams(blocks=blocks, final_norm=_spade(heads[n - 1][3], heads[n - 1][4]))


class _TextureGeneratorNet(nn.Module):
    def __init__(self, spec: GeneratorSpec, eps: float):
        super().__init__()
        layers, size = adaptive_up_blocks(spec.block_in, spec.block_out, spec.input_size, "ada_spade_bn", False, eps)
        layers += [AdaSpadeBatchNorm(spec.block_out[-1], size, eps), activation()]
        self.blocks = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Sequential(conv3x3(spec.block_out[-1], 3), nn.Tanh())])


class TextureGenerator(nn.Module):
    """Official ``texture_generator``: learned input ``gen_tex_input``, ``gen_tex`` and ``prj_tex``."""

    def __init__(self, spec: GeneratorSpec, projector: list[ProjectorBlockSpec], eps: float = 1e-7):
        super().__init__()
        self.num_blocks = len(spec.block_out)
        self.gen_tex_input = nn.Parameter(torch.randn(1, spec.input_channels, spec.input_size, spec.input_size))
        self.gen_tex = _TextureGeneratorNet(spec, eps)
        self.prj_tex = Projector(projector)

    def adaptive_layer_names(self) -> dict[str, str]:
        """Parameter-set name (as in ``flatten()``) -> the module of ``gen_tex`` that consumes it."""
        return adaptive_layer_names(self.gen_tex, "gen_tex", self.num_blocks)

    def project(self, embeds: list[Tensor]) -> TextureParams:
        return texture_params_from_heads(self.prj_tex(embeds))

    def generate(self, params: TextureParams) -> Tensor:
        """Per-identity params -> texture (B, 3, S, S) in [-1, 1] (tanh)."""
        blocks = self.gen_tex.blocks
        x = self.gen_tex_input.expand(params.batch_size, -1, -1, -1)
        for j in range(self.num_blocks):
            x = blocks[j](x, params.blocks[j])
        x = F.leaky_relu(blocks[self.num_blocks](x, params.final_norm), NEGATIVE_SLOPE, inplace=True)
        return self.gen_tex.heads[0](x)

    def forward(self, embeds: list[Tensor]) -> Tensor:
        return self.generate(self.project(embeds))
