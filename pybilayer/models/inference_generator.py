"""Inference generator: the per-frame network (pose embedding -> delta-uv, low-frequency RGB, mask logits)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import NEGATIVE_SLOPE, AdaBatchNorm, Projector, activation, adaptive_layer_names, adaptive_up_blocks, conv3x3
from .config import GeneratorSpec, ProjectorBlockSpec
from .params import AdaBNParams, AdaConvParams, InferenceBlockParams, InferenceParams
from .warp import identity_grid


def _ada_bn(head: AdaConvParams) -> AdaBNParams:
    # A K=1 head: one weight and one bias per channel; the official code applies weight + 1.
    return AdaBNParams(scale=head.weight[:, :, 0] + 1.0, bias=head.bias)


def inference_params_from_heads(heads: list[list[AdaConvParams]]) -> InferenceParams:
    """Official positional assignment (spec 2.6), shifted by the non-adaptive first norm:
    head j.0 -> block j norm2, j.1 -> block j skip, j.2 -> block j+1 norm1 (final norm for the last j)."""
    n = len(heads)
    norm1 = [None] + [_ada_bn(heads[j][2]) for j in range(n - 1)]
    blocks = tuple(
        InferenceBlockParams(norm1=norm1[j], norm2=_ada_bn(heads[j][0]), skip=heads[j][1]) for j in range(n)
    )
    return InferenceParams(blocks=blocks, final_norm=_ada_bn(heads[n - 1][2]))


class _InferenceGeneratorNet(nn.Module):
    def __init__(self, spec: GeneratorSpec, eps: float):
        super().__init__()
        layers, _ = adaptive_up_blocks(spec.block_in, spec.block_out, spec.input_size, "ada_bn", True, eps)
        layers += [AdaBatchNorm(spec.block_out[-1], eps), activation()]
        self.blocks = nn.Sequential(*layers)
        c = spec.block_out[-1]
        self.heads = nn.ModuleList([
            nn.Sequential(conv3x3(c, 2), nn.Tanh()),  # delta-uv
            nn.Sequential(conv3x3(c, 3), nn.Tanh()),  # low-frequency RGB
            nn.Sequential(conv3x3(c, 1)),  # mask logits
        ])


class InferenceGenerator(nn.Module):
    """Official ``inference_generator``: ``gen_inf`` (per frame), ``prj_inf`` (per identity) and the
    ``identity_grid`` buffer (kept for state-dict compatibility; recomputed exactly)."""

    def __init__(self, spec: GeneratorSpec, projector: list[ProjectorBlockSpec], image_size: int, eps: float = 1e-7):
        super().__init__()
        self.num_blocks = len(spec.block_out)
        self.gen_inf = _InferenceGeneratorNet(spec, eps)
        self.prj_inf = Projector(projector)
        self.register_buffer("identity_grid", identity_grid(image_size))

    def adaptive_layer_names(self) -> dict[str, str]:
        """Parameter-set name (as in ``flatten()``) -> the module of ``gen_inf`` that consumes it."""
        return adaptive_layer_names(self.gen_inf, "gen_inf", self.num_blocks)

    def project(self, embeds: list[Tensor]) -> InferenceParams:
        """Per-identity parameters from the identity embeddings (run once per avatar)."""
        return inference_params_from_heads(self.prj_inf(embeds))

    def generate(self, pose_embed: Tensor, params: InferenceParams) -> tuple[Tensor, Tensor, Tensor]:
        """(N, C, 4, 4) pose embedding and N identities' params -> (delta_uv (N,2,S,S) tanh,
        lf (N,3,S,S) tanh, mask_logits (N,1,S,S))."""
        if params.batch_size != pose_embed.shape[0]:
            raise ValueError(
                f"InferenceGenerator.generate: {pose_embed.shape[0]} pose embeddings but params for "
                f"{params.batch_size} identities (repeat them with params.repeat_frames)"
            )
        blocks = self.gen_inf.blocks
        x = pose_embed
        for j in range(self.num_blocks):
            x = blocks[j](x, params.blocks[j])
        x = F.leaky_relu(blocks[self.num_blocks](x, params.final_norm), NEGATIVE_SLOPE, inplace=True)
        delta_uv, lf, mask_logits = (head(x) for head in self.gen_inf.heads)
        return delta_uv, lf, mask_logits

    def forward(self, pose_embed: Tensor, params: InferenceParams) -> tuple[Tensor, Tensor, Tensor]:
        return self.generate(pose_embed, params)
