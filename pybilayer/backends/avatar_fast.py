"""Avatar creation (identity embedder, texture generator, projectors) with exact rewrites.

The model's own modules and weights, with three rewrites:

* Down blocks of the identity embedder: a 3x3 convolution followed by a 2x2 average pool is one 4x4
  convolution with stride 2 (kernel ``K[m, n] = 1/4 sum_{a, b in {0, 1}} W[m - a, n - b]``): 16 instead
  of 36 taps per output. The 1x1 skip convolution runs after the pool instead of before it.
* Up blocks of the texture generator: nearest 2x up-sampling followed by a 3x3 convolution is four
  small convolutions at the low resolution and a 2x2 box sum, 9 instead of 36 taps per 2x2 outputs
  (``frame_graph.upsample_conv_taps``).
* Projectors: each head's three Linear layers (no nonlinearity between them) are one matrix, composed
  as well with the average pooling that replicates the (C, 8, 8) embeddings into its input rows
  (``FoldedProjector``): 64 instead of 1024 inputs per row, ~50x fewer multiply-adds (released size:
  11.1 GMAC -> 0.2 GMAC).

Everything else (norms, AdaSPADE modulation, the decoder blocks) calls the modules
themselves, so the result equals ``Bilayer.create_avatar`` up to fp32 summation order (checked in tests).
On a CPU the identity embedder, pure convolutions with fixed weights, can run as an MNN or onnxruntime graph.
Only the single-source-frame, no-mask, no-enhancer case is rewritten; the Renderer uses the model's
own ``create_avatar`` otherwise.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.inference_generator import inference_params_from_heads
from ..models.params import AdaConvParams
from ..models.texture_generator import texture_params_from_heads
from .frame_graph import upsample_conv_taps

NEGATIVE_SLOPE = 0.2
# Bump when build_embedder_graph changes what it builds: cached conversions of the old graph are then unused.
EMBEDDER_GRAPH_VERSION = 1
_GROUP_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # grid positions of the ee, eo, oe, oo groups


def upsample_conv(h: Tensor, taps: list[tuple[Tensor, tuple[int, int, int, int]]], bias: Tensor | None) -> Tensor:
    """``conv3x3(nearest_up2(h))`` from its ``upsample_conv_taps``: four convs, interleave, box sum."""
    b, _, s, t = h.shape
    grid = h.new_empty((b, taps[0][0].shape[0], 2 * s + 2, 2 * t + 2))
    for (kernel, (top, left, bottom, right)), (py, px), group_bias in zip(taps, _GROUP_PHASES, (bias, None, None, None)):
        grid[:, :, py::2, px::2] = F.conv2d(F.pad(h, (left, right, top, bottom)), kernel, group_bias)
    rows = grid[:, :, 1:-1] + grid[:, :, 2:]
    return rows[..., 1:-1] + rows[..., 2:]


def _down_kernel(weight: Tensor) -> Tensor:
    """3x3 conv + 2x2 average pool -> 4x4 kernel for a stride-2 conv with padding 1."""
    out = weight.new_zeros(weight.shape[:2] + (4, 4))
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, a:a + 3, b:b + 3] += weight
    return out * 0.25


def build_embedder_graph(model):
    """The identity embedder (one source frame) as an ONNX graph with the down-block rewrite; fp32.

    Input ``inputs`` (B, 6, S, S) (``IdentityEmbedder.compose_input``); outputs ``embed.0`` ..
    ``embed.{n-1}``, the (B, C_j, 8, 8) embeddings."""
    import numpy as np
    from onnx import TensorProto

    from .frame_graph import _Builder

    def arr(t):
        return t.detach().to("cpu", torch.float32).numpy()

    net = model.identity_embedder.net
    s = model.config.image_size
    b = _Builder(np.float32)
    x = b.add_input("inputs", ["B", 6, s, s], TensorProto.FLOAT)
    x = b.conv(x, arr(net.enc[0].weight), arr(net.enc[0].bias), hint="enc0")
    for i, block in enumerate(net.enc[1:]):
        conv1, conv2 = block.block_feats[1], block.block[0]
        h = b.lrelu(b.conv(b.lrelu(x), arr(conv1.weight), arr(conv1.bias), hint=f"enc{i + 1}_conv1"))
        main = b.op("Conv", [h, b.const(arr(_down_kernel(conv2.weight.detach())), "down_w"), b.const(arr(conv2.bias), "down_b")],
                    kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])
        pooled = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
        if not isinstance(block.skip, torch.nn.Identity):
            conv = block.skip[0]
            pooled = b.conv(pooled, arr(conv.weight), arr(conv.bias), pads=(0, 0, 0, 0), hint=f"enc{i + 1}_skip")
        x = b.op("Add", [main, pooled])
    for j, block in enumerate(net.dec_blocks):
        conv1, conv2 = block.block_feats[1], block.block[0]
        feats = b.lrelu(b.conv(b.lrelu(x), arr(conv1.weight), arr(conv1.bias), hint=f"dec{j}_conv1"))
        b.add_output(feats, f"embed.{j}", ["B", conv1.out_channels, "H", "W"], TensorProto.FLOAT)
        if j + 1 < len(net.dec_blocks):  # the last block's output is not used
            skip = x if isinstance(block.skip, torch.nn.Identity) else b.conv(
                x, arr(block.skip[0].weight), arr(block.skip[0].bias), pads=(0, 0, 0, 0), hint=f"dec{j}_skip")
            x = b.op("Add", [b.conv(feats, arr(conv2.weight), arr(conv2.bias), hint=f"dec{j}_conv2"), skip])
    return b.model("bilayer_identity_embedder")


def _pooling_matrix(size: int, pooled: int) -> Tensor:
    """(pooled, size) matrix of 1-D adaptive average pooling (torch's bins), float64."""
    out = torch.zeros(pooled, size, dtype=torch.float64)
    for i in range(pooled):
        start, end = (i * size) // pooled, -((-(i + 1) * size) // pooled)
        out[i, start:end] = 1.0 / (end - start)
    return out


class FoldedProjector:
    """``Projector.forward`` with every head as one Linear on the raw embedding (see the module docstring).

    A projector row is ``k = row_length / pool**2`` consecutive channels of the pooled embedding, so
    composed with the pooling a head reads k channels of the (h, w) embedding directly. Folded once per
    embedding size, in float64, rounded to float32 once; returns what the module returns. A projector
    whose rows would split a channel's pooled map is called as it is."""

    def __init__(self, projector):
        self.projector = projector
        self.foldable = all(spec.row_length % spec.pool_size ** 2 == 0 for spec in projector.specs)
        self._folded: dict[tuple[int, int, int], list[tuple[Tensor, Tensor]]] = {}

    def _heads(self, j: int, h: int, w: int) -> list[tuple[Tensor, Tensor]]:
        key = (j, h, w)
        if key not in self._folded:
            spec, heads = self.projector.specs[j], self.projector.fc_blocks[j]
            pool = torch.kron(_pooling_matrix(h, spec.pool_size), _pooling_matrix(w, spec.pool_size))
            k = spec.row_length // spec.pool_size ** 2
            folded = []
            for head in heads:
                (w1, b1), (w2, b2), (w3, b3) = ((m.weight.detach().double(), m.bias.detach().double()) for m in head)
                # pooling first: it shrinks w1 from row_length to k*h*w columns before the larger products
                w1 = (w1.view(w1.shape[0], k, -1) @ pool).reshape(w1.shape[0], k * h * w)
                weight = w3 @ (w2 @ w1)
                bias = w3 @ (w2 @ b1 + b2) + b3
                folded.append((weight.float(), bias.float()))
            self._folded[key] = folded
        return self._folded[key]

    def __call__(self, embeds: list[Tensor]) -> list[list[AdaConvParams]]:
        specs = self.projector.specs
        if not self.foldable or len(embeds) != len(specs):
            return self.projector(embeds)  # the module's own checks and errors
        outputs = []
        for j, (embed, spec) in enumerate(zip(embeds, specs)):
            b, _, h, w = embed.shape
            rows = embed.reshape(b * spec.rows, -1)
            block = []
            for weight, bias in self._heads(j, h, w):
                values = F.linear(rows, weight.to(rows), bias.to(rows)).view(b, spec.rows, -1)
                block.append(AdaConvParams(weight=values[:, :, :-1], bias=values[:, :, -1]))
            outputs.append(block)
        return outputs


class FastAvatarCreator:
    """Precomputes the rewritten kernels of one model (build a new one if its weights change).

    ``embedder_runtime``: where the identity embedder, pure convolutions with fixed weights, runs:
    "torch" (the module with the rewrites), "onnxruntime" or "mnn" (``build_embedder_graph``, built on
    first use, once per model, so that a Renderer that only loads avatars never pays for it; 0.37 s and
    0.31 s per avatar on the 2-core CPU here, after a one-time build of ~0.8 s and ~3.3 s). MNN's
    conversion is kept on disk (``mnn.load_cached_module``, keyed by the embedder's weights), so only the
    first Renderer of a model on a machine pays it. The texture generator stays in torch: as an
    onnxruntime graph it measured no faster (its time goes to the per-identity AdaSPADE maps and
    full-resolution elementwise work, not convolutions)."""

    def __init__(self, model, threads: int | None = None, embedder_runtime: str = "torch"):
        if embedder_runtime not in ("torch", "onnxruntime", "mnn"):
            raise ValueError(f"embedder_runtime must be 'torch', 'onnxruntime' or 'mnn', got {embedder_runtime!r}")
        self.model = model
        self.threads = threads
        self.embedder_runtime = embedder_runtime

        enc = model.identity_embedder.net.enc
        self.down_kernels = []
        for block in enc[1:]:
            conv2 = block.block[0]
            self.down_kernels.append(_down_kernel(conv2.weight.detach()))
        self.up_taps = []
        gen = model.texture_generator.gen_tex
        for j in range(model.texture_generator.num_blocks):
            conv1 = gen.blocks[j].block_feats[3]
            taps = upsample_conv_taps(conv1.weight.detach().double().numpy())
            self.up_taps.append([(torch.from_numpy(k).to(conv1.weight), pads) for k, pads in taps])
        self.texture_projector = FoldedProjector(model.texture_generator.prj_tex)
        self.inference_projector = FoldedProjector(model.inference_generator.prj_inf)

    # ------------------------------------------------------------------ identity embedder
    @functools.cached_property
    def _run_embedder(self):
        """numpy (B, 6, S, S) -> the embeddings, in ``embedder_runtime`` (None for torch)."""
        if self.embedder_runtime == "onnxruntime":
            from .onnxruntime import create_session

            session = create_session(build_embedder_graph(self.model), self.threads)
            return lambda inputs: session.run(None, {"inputs": inputs})
        if self.embedder_runtime == "mnn":
            from ..avatar import weights_fingerprint
            from .mnn import create_runtime, load_cached_module, run_module

            names = [f"embed.{j}" for j in range(len(self.model.identity_embedder.net.dec_blocks))]
            graph = {"graph": "identity_embedder", "version": EMBEDDER_GRAPH_VERSION,
                     "image_size": self.model.config.image_size}
            source = weights_fingerprint(graph, {"identity_embedder": self.model.identity_embedder})
            module = load_cached_module(lambda: build_embedder_graph(self.model), source, ["inputs"], names,
                                        create_runtime(self.threads or os.cpu_count() or 1))
            return lambda inputs: run_module(module, [inputs])
        return None

    def embed(self, inputs: Tensor) -> list[Tensor]:
        """``IdentityEmbedder.forward`` for (B, 6, S, S) inputs (one source frame per identity)."""
        if self._run_embedder is not None:
            outputs = self._run_embedder(inputs.detach().to("cpu", torch.float32).contiguous().numpy())
            return [torch.from_numpy(o).to(inputs) for o in outputs]
        net = self.model.identity_embedder.net
        x = net.enc[0](inputs)
        for block, kernel in zip(net.enc[1:], self.down_kernels):
            conv1, conv2 = block.block_feats[1], block.block[0]
            h = F.leaky_relu(conv1(F.leaky_relu(x, NEGATIVE_SLOPE)), NEGATIVE_SLOPE)
            main = F.conv2d(h, kernel, conv2.bias, stride=2, padding=1)
            skip = block.skip
            if isinstance(skip, torch.nn.Identity):
                x = main + F.avg_pool2d(x, 2)
            else:
                x = main + skip[0](F.avg_pool2d(x, 2))  # 1x1 conv and 2x2 average commute
        embeds = []
        for block in net.dec_blocks:
            x, feats = block(x)
            embeds.append(feats)
        return embeds

    # ------------------------------------------------------------------ texture generator
    def _up_block(self, j: int, x: Tensor, params) -> Tensor:
        from ..models.blocks import adaptive_conv1x1

        block = self.model.texture_generator.gen_tex.blocks[j]
        h = block.norm1(x) if block.first_norm_plain else block.norm1(x, params.norm1)
        h = F.leaky_relu(h, NEGATIVE_SLOPE)
        up = upsample_conv(h, self.up_taps[j], block.block_feats[3].bias)
        h = F.leaky_relu(block.norm2(up, params.norm2), NEGATIVE_SLOPE)
        h = block.block[0](h)
        skip = F.interpolate(adaptive_conv1x1(x, params.skip), scale_factor=2.0, mode="nearest")
        return h + skip

    def texture(self, embeds: list[Tensor]) -> Tensor:
        """``TextureGenerator.forward``: embeddings -> texture (B, 3, S, S)."""
        tex = self.model.texture_generator
        params = texture_params_from_heads(self.texture_projector(embeds))
        x = tex.gen_tex_input.expand(params.batch_size, -1, -1, -1)
        for j in range(tex.num_blocks):
            x = self._up_block(j, x, params.blocks[j])
        x = F.leaky_relu(tex.gen_tex.blocks[tex.num_blocks](x, params.final_norm), NEGATIVE_SLOPE)
        return tex.gen_tex.heads[0](x)

    # ------------------------------------------------------------------ the avatar
    def create(self, source_image: Tensor, source_keypoints: Tensor):
        """``Bilayer.create_avatar(source_image (B, 3, S, S), source_keypoints (B, 68, 2))`` without mask
        or enhancer, with the rewrites. Returns a ``BilayerAvatar``."""
        from ..geometry import draw_stickmen
        from ..models import BilayerAvatar
        from ..models.identity_embedder import IdentityEmbedder

        s = self.model.config.image_size
        if source_image.dim() != 4 or source_image.shape[1:] != (3, s, s):
            raise ValueError(f"source_image must be (B, 3, {s}, {s}), got {tuple(source_image.shape)}")
        if source_keypoints.shape != (source_image.shape[0], 68, 2):
            raise ValueError(f"source_keypoints must be ({source_image.shape[0]}, 68, 2), got {tuple(source_keypoints.shape)}")
        stickmen = draw_stickmen(source_keypoints, s).to(source_image.dtype)
        embeds = self.embed(IdentityEmbedder.compose_input(source_image, stickmen))
        texture = self.texture(embeds)
        params = inference_params_from_heads(self.inference_projector(embeds))
        return BilayerAvatar(texture=texture, params=params)
