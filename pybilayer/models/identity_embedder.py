"""Identity embedder: source image + stickman -> one 8x8 embedding per generator block."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import ResBlock, conv3x3


class IdentityEmbedder(nn.Module):
    """Official ``identity_embedder`` (keys ``net.enc.*``, ``net.dec_blocks.*``).

    ``encoder_channels``: widths of enc.0 and of each down block; ``embedding_channels``: widths of
    the same-resolution decoder blocks, whose ``block_feats`` outputs are the embeddings.
    """

    def __init__(self, encoder_channels: list[int], embedding_channels: list[int], eps: float = 1e-7):
        super().__init__()
        enc: list[nn.Module] = [conv3x3(6, encoder_channels[0])]
        for c_in, c_out in zip(encoder_channels[:-1], encoder_channels[1:]):
            enc.append(ResBlock(c_in, c_out, resample="down", eps=eps))
        dec = []
        c_in = encoder_channels[-1]
        for c_out in embedding_channels:
            dec.append(ResBlock(c_in, c_out, eps=eps))
            c_in = c_out
        # "net" exists only to reproduce the official state-dict prefix.
        self.net = nn.Module()
        self.net.enc = nn.Sequential(*enc)
        self.net.dec_blocks = nn.ModuleList(dec)

    @staticmethod
    def compose_input(images: Tensor, stickmen: Tensor, masks: Tensor | None = None) -> Tensor:
        """Official input: the image composited on -1 (black) with its mask, then the stickman: 6 channels."""
        if masks is not None:
            images = images * masks + (-1.0) * (1.0 - masks)
        return torch.cat([images, stickmen], dim=-3)

    def forward(self, inputs: Tensor) -> list[Tensor]:
        """``inputs`` (B, 6, S, S) or (B, K, 6, S, S); K source frames are averaged after the encoder."""
        if inputs.dim() == 4:
            inputs = inputs[:, None]
        if inputs.dim() != 5 or inputs.shape[2] != 6:
            raise ValueError(
                f"IdentityEmbedder: inputs must be (B, 6, S, S) or (B, K, 6, S, S), got {tuple(inputs.shape)}")
        b, k = inputs.shape[:2]
        x = self.net.enc[0](inputs.reshape(b * k, *inputs.shape[2:]))
        for block in self.net.enc[1:]:
            x, _ = block(x)
        if k > 1:  # official output_aggregated on the last encoder block
            x = x.view(b, k, *x.shape[1:]).mean(dim=1)
        embeds = []
        for block in self.net.dec_blocks:
            x, feats = block(x)
            embeds.append(feats)
        return embeds
