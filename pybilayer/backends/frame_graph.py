"""ONNX graphs of the per-frame network (keypoint MLP + inference generator + heads), built from weights.

Two graphs come from the same weights (`FrameWeights`, read once from a Bilayer):

* `build_generic_graph`: the per-identity parameters (``InferenceParams.flatten()`` names, one row per
  frame) are graph inputs, so one graph (and one TensorRT engine) serves every avatar. fp32 or fp16;
  its layout follows the torch modules (conv, nearest up-sampling, conv; 1x1 skip before the
  up-sampling, which is exact).
* `build_folded_graph`: one avatar's parameters are folded into the weights (the fast CPU path). Exact
  rewrites, each verified against the torch reference in tests:

  1. AdaBN after a convolution (norm2) scales that convolution's output channels.
  2. AdaBN + LeakyReLU before a convolution (norm1 of the next block, the final norm):
     ``lrelu(a*x + c) = g * prelu_s(x + c/a)`` per channel, with ``g = a, s = 0.2`` for ``a > 0`` and
     ``g = 0.2*a, s = 5`` for ``a < 0``; ``g`` scales the next convolution's input channels (zero
     padding stays zero) and the shift ``c/a`` moves into the biases of whatever produced ``x``
     (the skip convolution, which reads ``x`` itself, takes ``-W c/a`` into its bias). Channels with
     ``|a|`` too small for the shift to be well conditioned keep an explicit affine.
  3. Nearest 2x up-sampling + 3x3 convolution = four small convolutions at the low resolution (1x1,
     1x2, 2x1, 2x2: 9 taps per 2x2 outputs instead of 36, or 16 for four 2x2 phase kernels), a
     depth-to-space and a 2x2 box sum (``upsample_conv_taps``).
  4. The 1x1 skip convolution runs before the up-sampling; it and the bias enter the 1x1 group only.
  5. The first norm (a fixed affine BatchNorm) and the first block's skip fold into the last Linear of
     the keypoint MLP.
  6. The three heads are one convolution with 6 output channels.

  With ``native_heads`` the graph stops before the last block's up-sampling convolution (outputs
  ``upsample_input`` and ``skip``), and the native kernel ``ops.heads`` does the rest in one pass (that
  convolution as tap groups, box sum, final activation, heads, tanh) with ``folded_heads``: a graph
  runtime would write the tap groups and the full-resolution activation out and read them back several
  times (in turns, whole frames: mnn 25.8 -> 24.1 ms with the graph's tap groups, onnxruntime
  44.1 -> 36.3 ms; computing the last tap groups natively as well: mnn 24.4 -> 23.4 ms, onnxruntime
  34.0 -> 31.8 ms per block).
  ``build_folded_stages`` goes further for runtimes with slow depth-to-space: one graph per block, with
  ``ops.depth_to_space_box`` between them (onnxruntime: 41.3 -> 37.3 ms more, in turns).
  ``build_folded_frame(native_blocks=k)`` also leaves the keypoint MLP and the first k blocks to the native
  stage ``ops.LowResStage`` (``folded_low_res_stage``: the same folding, in the stage's form), and its
  graphs start at block k from the stage's output (input ``x``); with every block (the backends' default)
  the stage stops where the native heads take over and no graph is left. Graph runtimes run the small,
  wide maps of the first blocks far below the CPU's multiply-add rate (in turns, whole frames, the stage
  for the 4-8 px blocks: mnn 22.8 -> 22.3 ms, onnxruntime 34.2 -> 33.2 ms); with conv1 as Winograd and
  its passes shared well between the cores, the stage for every block beat both (``base.use_native_blocks``).

Graph I/O (both, whole): input ``keypoints`` (N, 68, 2) float32 in [-1, 1] crop coordinates; outputs
``delta_uv`` (N, 2, S, S), ``lf`` (N, 3, S, S), ``mask_logits`` (N, 1, S, S), float32. Only the batch
dimension N is dynamic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

NEGATIVE_SLOPE = 0.2
OPSET = 17
IR_VERSION = 8  # opset 17; readable by onnxruntime >= 1.13 and TensorRT 10/11
OUTPUT_NAMES = ("delta_uv", "lf", "mask_logits")
PHASES_OUTPUT = "phases"  # a per-block folded graph's output at a block boundary: the four tap groups
# The folded graph's outputs when the native kernel runs the last block's up-sampling convolution and the heads
UPSAMPLE_INPUT, SKIP_OUTPUT = "upsample_input", "skip"
STAGE_INPUT = "x"  # input of the per-block folded graphs after the first: the previous block's output
KEYPOINTS_INPUT = "keypoints"
HEAD_CHANNELS = (2, 3, 1)
# A norm1 channel whose shift c/a exceeds this (in units of its BN standard deviation) keeps an explicit
# affine: folding it would cost the skip path ~1e-7 * |c/a| of absolute precision.
MAX_FOLDED_SHIFT = 1e3

Precision = Literal["fp32", "fp16"]


# --------------------------------------------------------------------------- weights


@dataclass
class BlockWeights:
    conv1_weight: np.ndarray  # (C, Cin, 3, 3), at the block's input resolution
    conv1_bias: np.ndarray
    norm2_mean: np.ndarray  # running statistics of the adaptive BN after conv1
    norm2_var: np.ndarray
    conv2_weight: np.ndarray  # (C, C, 3, 3), after the nearest up-sampling
    conv2_bias: np.ndarray
    norm1_mean: np.ndarray | None  # adaptive BN at the block input (None for block 0)
    norm1_var: np.ndarray | None

    @property
    def channels(self) -> tuple[int, int]:
        return int(self.conv1_weight.shape[1]), int(self.conv1_weight.shape[0])


@dataclass
class FrameWeights:
    """Identity-independent weights of the per-frame network, float64 numpy (folding is done in float64)."""

    mlp: list[tuple[np.ndarray, np.ndarray]]  # Linear (out, in) weights and biases; LeakyReLU between them
    frequencies: np.ndarray | None  # harmonic encoding (None: raw 136 inputs)
    input_channels: int  # C of the (C, s, s) pose embedding
    input_size: int  # s
    first_norm_scale: np.ndarray  # block 0's plain BatchNorm as an affine: y = x * scale + shift
    first_norm_shift: np.ndarray
    blocks: list[BlockWeights]
    final_norm_mean: np.ndarray
    final_norm_var: np.ndarray
    heads_weight: np.ndarray  # (6, C_last, 3, 3): delta_uv (2), lf (3), mask logits (1)
    heads_bias: np.ndarray
    eps: float

    @property
    def image_size(self) -> int:
        return self.input_size * 2 ** len(self.blocks)

    def conv2_taps(self, j: int):
        """``upsample_conv_taps`` of block j's second conv; identity-independent, so computed once."""
        cache = self.__dict__.setdefault("_conv2_taps_cache", {})
        if j not in cache:
            cache[j] = upsample_conv_taps(self.blocks[j].conv2_weight)
        return cache[j]

    @classmethod
    def from_model(cls, model) -> "FrameWeights":
        """Read the weights from a Bilayer (its keypoints_embedder and inference_generator.gen_inf)."""
        import torch

        def arr(t) -> np.ndarray:
            return t.detach().to(device="cpu", dtype=torch.float64).numpy().copy()

        kp = model.keypoints_embedder
        linears = [m for m in kp.net.mlp if isinstance(m, torch.nn.Linear)]
        freq = getattr(kp, "frequencies", None)
        gen = model.inference_generator.gen_inf
        n = model.inference_generator.num_blocks
        blocks = []
        first = gen.blocks[0].block_feats[0]
        eps = float(first.eps)
        first_scale = arr(first.weight) / np.sqrt(arr(first.running_var) + eps)
        first_shift = arr(first.bias) - arr(first.running_mean) * first_scale
        for j in range(n):
            block = gen.blocks[j]
            conv1, norm2, conv2 = block.block_feats[2], block.block_feats[3].norm_layer, block.block[1]
            norm1 = None if j == 0 else block.block_feats[0].norm_layer
            blocks.append(
                BlockWeights(
                    conv1_weight=arr(conv1.weight),
                    conv1_bias=arr(conv1.bias),
                    norm2_mean=arr(norm2.running_mean),
                    norm2_var=arr(norm2.running_var),
                    conv2_weight=arr(conv2.weight),
                    conv2_bias=arr(conv2.bias),
                    norm1_mean=None if norm1 is None else arr(norm1.running_mean),
                    norm1_var=None if norm1 is None else arr(norm1.running_var),
                )
            )
        final = gen.blocks[n].norm_layer
        heads = [head[0] for head in gen.heads]
        return cls(
            mlp=[(arr(m.weight), arr(m.bias)) for m in linears],
            frequencies=None if freq is None else arr(freq).reshape(-1),
            input_channels=int(kp.output_channels),
            input_size=int(kp.output_size),
            first_norm_scale=first_scale,
            first_norm_shift=first_shift,
            blocks=blocks,
            final_norm_mean=arr(final.running_mean),
            final_norm_var=arr(final.running_var),
            heads_weight=np.concatenate([arr(h.weight) for h in heads]),
            heads_bias=np.concatenate([arr(h.bias) for h in heads]),
            eps=eps,
        )


def avatar_affines(weights: FrameWeights, flat_params: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (a, c) of every adaptive BN of one identity: ``BN(x)*scale + bias = a*x + c``."""

    def affine(mean, var, prefix):
        scale, bias = flat_params[prefix + ".scale"].reshape(-1), flat_params[prefix + ".bias"].reshape(-1)
        a = scale / np.sqrt(var + weights.eps)
        return a, bias - mean * a

    out = {}
    for j, b in enumerate(weights.blocks):
        out[f"blocks.{j}.norm2"] = affine(b.norm2_mean, b.norm2_var, f"blocks.{j}.norm2")
        if j:
            out[f"blocks.{j}.norm1"] = affine(b.norm1_mean, b.norm1_var, f"blocks.{j}.norm1")
    out["final_norm"] = affine(weights.final_norm_mean, weights.final_norm_var, "final_norm")
    return out


# --------------------------------------------------------------------------- a small graph builder


class _Builder:
    def __init__(self, dtype: np.dtype):
        import onnx  # noqa: F401  (fail here, not half-way)

        self.dtype = np.dtype(dtype)
        self.nodes = []
        self.initializers = []
        self.inputs = []
        self.outputs = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "c", dtype=None) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        array = np.asarray(value, dtype=self.dtype if dtype is None else dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values, hint: str = "shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint, dtype=np.int64)

    def op(self, op_type: str, inputs, hint: str | None = None, outputs: int = 1, **attrs):
        from onnx import helper

        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def add_input(self, name: str, shape, elem_type) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, source: str, name: str, shape, elem_type) -> None:
        from onnx import helper

        self.nodes.append(helper.make_node("Identity", [source], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def model(self, graph_name: str, doc: str = ""):
        from onnx import helper

        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers, doc_string=doc)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pybilayer")
        model.ir_version = IR_VERSION
        return model

    # layers
    def lrelu(self, x: str) -> str:
        return self.op("LeakyRelu", [x], alpha=NEGATIVE_SLOPE)

    def conv(self, x: str, weight: np.ndarray, bias: np.ndarray | None, pads=(1, 1, 1, 1), hint="conv") -> str:
        inputs = [x, self.const(weight, hint + "_w")]
        if bias is not None:
            inputs.append(self.const(bias, hint + "_b"))
        return self.op("Conv", inputs, hint=hint, pads=list(pads), kernel_shape=list(weight.shape[2:]))

    def linear(self, x: str, weight: np.ndarray, bias: np.ndarray, hint="fc") -> str:
        return self.op("Gemm", [x, self.const(weight, hint + "_w"), self.const(bias, hint + "_b")], hint=hint, transB=1)

    def upsample2(self, x: str) -> str:
        scales = self.const(np.array([1, 1, 2, 2], dtype=np.float32), "scales", dtype=np.float32)
        return self.op(
            "Resize", [x, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"
        )


def _onnx_type(dtype: np.dtype) -> int:
    from onnx import TensorProto

    return TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT


def _pose_embedding(b: _Builder, weights: FrameWeights, keypoints: str, without_last: bool = False) -> str:
    """The keypoint MLP; with ``without_last``, up to the activation before its last Linear."""
    x = b.op("Reshape", [keypoints, b.ints([-1, weights.mlp[0][0].shape[1] if weights.frequencies is None else 136])])
    if weights.frequencies is not None:
        # [sin(x * f_k), cos(x * f_k)] with x-major, frequency-minor order, as the torch module.
        scaled = b.op("Mul", [b.op("Unsqueeze", [x, b.ints([2])]), b.const(weights.frequencies)])
        scaled = b.op("Reshape", [scaled, b.ints([0, -1])])
        x = b.op("Concat", [b.op("Sin", [scaled]), b.op("Cos", [scaled])], axis=1)
    layers = weights.mlp[:-1] if without_last else weights.mlp
    for i, (w, bias) in enumerate(layers):
        x = b.linear(x, w, bias, hint=f"mlp{i}")
        if i < len(weights.mlp) - 1:
            x = b.lrelu(x)
    return x


def _cast_in(b: _Builder, name: str) -> str:
    return b.op("Cast", [name], to=_onnx_type(b.dtype)) if b.dtype == np.float16 else name


def _heads(b: _Builder, x: str, weight: np.ndarray, bias: np.ndarray, size: int) -> None:
    """One conv for the three heads -> delta_uv (tanh), lf (tanh), mask_logits, as fp32 graph outputs."""
    from onnx import TensorProto

    y = b.conv(x, weight, bias, hint="heads")
    parts = b.op("Split", [y, b.ints(list(HEAD_CHANNELS))], outputs=3, axis=1)
    parts = [b.op("Tanh", [parts[0]]), b.op("Tanh", [parts[1]]), parts[2]]
    for part, name, c in zip(parts, OUTPUT_NAMES, HEAD_CHANNELS):
        if b.dtype == np.float16:
            part = b.op("Cast", [part], to=TensorProto.FLOAT)
        b.add_output(part, name, ["N", c, size, size], TensorProto.FLOAT)


# --------------------------------------------------------------------------- the generic graph


def param_input_shapes(weights: FrameWeights) -> dict[str, list]:
    """Name -> shape (batch dim "N") of every per-identity graph input, in InferenceParams.flatten() order."""
    shapes: dict[str, list] = {}
    for j, block in enumerate(weights.blocks):
        c_in, c_out = block.channels
        if j:
            shapes[f"blocks.{j}.norm1.scale"] = ["N", c_in]
            shapes[f"blocks.{j}.norm1.bias"] = ["N", c_in]
        shapes[f"blocks.{j}.norm2.scale"] = ["N", c_out]
        shapes[f"blocks.{j}.norm2.bias"] = ["N", c_out]
        shapes[f"blocks.{j}.skip.weight"] = ["N", c_out, c_in]
        shapes[f"blocks.{j}.skip.bias"] = ["N", c_out]
    c_last = weights.blocks[-1].channels[1]
    shapes["final_norm.scale"] = ["N", c_last]
    shapes["final_norm.bias"] = ["N", c_last]
    return shapes


def build_generic_graph(weights: FrameWeights, precision: Precision = "fp32"):
    """The per-frame network with per-identity parameters as inputs (see the module docstring)."""
    from onnx import TensorProto

    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    b = _Builder(np.float16 if precision == "fp16" else np.float32)
    kp = _cast_in(b, b.add_input(KEYPOINTS_INPUT, ["N", 68, 2], TensorProto.FLOAT))
    params = {
        name: _cast_in(b, b.add_input(name, shape, TensorProto.FLOAT))
        for name, shape in param_input_shapes(weights).items()
    }

    def ada_bn(x: str, mean: np.ndarray, var: np.ndarray, prefix: str) -> str:
        # (x - mean) * (scale / std) + bias: the centred form keeps fp16 free of cancellation.
        c = mean.shape[0]
        a = b.op("Mul", [params[prefix + ".scale"], b.const(1.0 / np.sqrt(var + weights.eps))])
        a = b.op("Reshape", [a, b.ints([-1, c, 1, 1])])
        bias = b.op("Reshape", [params[prefix + ".bias"], b.ints([-1, c, 1, 1])])
        centred = b.op("Sub", [x, b.const(mean.reshape(1, c, 1, 1))])
        return b.op("Add", [b.op("Mul", [centred, a]), bias])

    x = _pose_embedding(b, weights, kp)
    s, c0 = weights.input_size, weights.input_channels
    x = b.op("Reshape", [x, b.ints([-1, c0, s, s])])
    for j, blk in enumerate(weights.blocks):
        c_in, c_out = blk.channels
        if j == 0:
            h = b.op("Add", [b.op("Mul", [x, b.const(weights.first_norm_scale.reshape(1, -1, 1, 1))]),
                             b.const(weights.first_norm_shift.reshape(1, -1, 1, 1))])
        else:
            h = ada_bn(x, blk.norm1_mean, blk.norm1_var, f"blocks.{j}.norm1")
        h = b.conv(b.lrelu(h), blk.conv1_weight, blk.conv1_bias, hint=f"b{j}_conv1")
        h = b.lrelu(ada_bn(h, blk.norm2_mean, blk.norm2_var, f"blocks.{j}.norm2"))
        h = b.conv(b.upsample2(h), blk.conv2_weight, blk.conv2_bias, hint=f"b{j}_conv2")
        # per-frame 1x1 skip as a batched MatMul at the low resolution, then up-sampled
        flat = b.op("Reshape", [x, b.ints([0, c_in, s * s])])
        skip = b.op("MatMul", [params[f"blocks.{j}.skip.weight"], flat])
        skip = b.op("Add", [skip, b.op("Unsqueeze", [params[f"blocks.{j}.skip.bias"], b.ints([2])])])
        skip = b.upsample2(b.op("Reshape", [skip, b.ints([0, c_out, s, s])]))
        x = b.op("Add", [h, skip])
        s *= 2
    x = b.lrelu(ada_bn(x, weights.final_norm_mean, weights.final_norm_var, "final_norm"))
    _heads(b, x, weights.heads_weight, weights.heads_bias, s)
    return b.model("bilayer_frame_generic", doc=f"pybilayer per-frame network, {precision}, params as inputs")


# --------------------------------------------------------------------------- the folded graph


def upsample_conv_taps(weight: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """Nearest 2x up-sampling + 3x3 convolution (padding 1) as four convolutions at the low resolution.

    Nearest up-sampling is zero insertion followed by a 2x2 box filter, and the box commutes with the
    convolution. In 1-D, with ``u = up(x)``: ``y[n] = sum_k w[k] u[n+k-1] = v[n] + v[n-1]`` where
    ``v[2p] = w1 x[p]`` and ``v[2p+1] = w0 x[p] + w2 x[p+1]``: 3 taps per two outputs instead of 4 (the
    four 2x2 phase kernels of a sub-pixel convolution). In 2-D, rows and columns each pick the even
    (``[w1]``) or odd (``[w0, w2]``) taps: groups ee 1x1, eo 1x2, oe 2x1, oo 2x2, 9 taps in all.

    Every group is computed on a grid g = 0..s (so s+1 outputs per axis) holding v[2g-2] (even) or
    v[2g-1] (odd); interleaved (DepthToSpace, DCR, in the returned order ee, eo, oe, oo) they give
    ``V[m] = v[m-2]``, and ``y[n] = V[n+1] + V[n+2]`` per axis: a 2x2 box sum over ``V[1:, 1:]``.
    Each output's box holds exactly one ee value, so a bias (or an up-sampled skip, padded by one at
    the top and left) added to the ee group alone reaches every output once.

    Returns (kernel (Cout, Cin, kh, kw), ONNX pads (top, left, bottom, right)) per group.
    """
    taps = {"e": ([1], (1, 0)), "o": ([0, 2], (1, 1))}  # kernel rows/columns, (pad before, pad after)
    out = []
    for rows in "eo":
        for cols in "eo":
            (ky, (top, bottom)), (kx, (left, right)) = taps[rows], taps[cols]
            out.append((weight[:, :, ky][:, :, :, kx], (top, left, bottom, right)))
    return out


@dataclass
class _InputNorm:
    """How a block input x (pre-activation) becomes lrelu(a*x + c): ``g * prelu_s(x' )`` (see docstring)."""

    shift: np.ndarray  # added to x by its producer: x' = x + shift
    gain: np.ndarray  # g, folded into the consumer conv's input channels
    slope: np.ndarray  # per-channel negative slope of the PRelu
    explicit: np.ndarray  # bool: channels kept as an explicit affine (a, c) instead
    a: np.ndarray
    c: np.ndarray

    @classmethod
    def of(cls, a: np.ndarray, c: np.ndarray, std: np.ndarray) -> "_InputNorm":
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = c / a
        explicit = ~np.isfinite(shift) | (np.abs(shift) > MAX_FOLDED_SHIFT * std)
        shift = np.where(explicit, 0.0, shift)
        negative = a < 0
        gain = np.where(explicit, 1.0, np.where(negative, NEGATIVE_SLOPE * a, a))
        slope = np.where(negative & ~explicit, 1.0 / NEGATIVE_SLOPE, NEGATIVE_SLOPE)
        return cls(shift, gain, slope, explicit, a, c)

    def apply(self, b: _Builder, x: str) -> str:
        """Graph ops from x' to prelu_s(x') (the gain is folded into the consumer)."""
        c = self.shift.shape[0]
        if self.explicit.any():
            # explicit channels: x' = x there, and a*x + c with g = 1, slope 0.2 gives lrelu(a x + c)
            a = np.where(self.explicit, self.a, 1.0).reshape(1, c, 1, 1)
            cc = np.where(self.explicit, self.c, 0.0).reshape(1, c, 1, 1)
            x = b.op("Add", [b.op("Mul", [x, b.const(a)]), b.const(cc)])
        if np.all(self.slope == NEGATIVE_SLOPE):
            return b.lrelu(x)
        return b.op("PRelu", [x, b.const(self.slope.reshape(1, c, 1, 1))])


def _input_norm(weights: FrameWeights, affines: dict, j: int) -> _InputNorm:
    """How block j's input (j = number of blocks: the final norm before the heads) is normalised."""
    if j < len(weights.blocks):
        a, c = affines[f"blocks.{j}.norm1"]
        var = weights.blocks[j].norm1_var
    else:
        a, c = affines["final_norm"]
        var = weights.final_norm_var
    # std of x under the norm's running statistics: the scale at which the shift is judged
    return _InputNorm.of(a, c, np.sqrt(var + weights.eps))


def fold_inputs(x_norm: _InputNorm, weight: np.ndarray) -> np.ndarray:
    """The consumer conv's weights with the input gain folded in."""
    return weight * x_norm.gain[None, :, None, None]


@dataclass(frozen=True)
class HeadsWeights:
    """One avatar's last up-sampling convolution, final activation and heads in the form of the native
    heads kernel (``ops.heads``): ``x = conv3x3(up2(upsample_input), conv_weight) + conv_bias + up2(skip)``,
    ``t = prelu(x * scale + shift, slope)`` per channel, then the three heads as one 3x3 convolution."""

    conv_weight: np.ndarray  # (C, Cin, 3, 3) float32: the last block's convolution after its up-sampling
    conv_bias: np.ndarray  # (C,) float32, the final norm's folded shift included
    scale: np.ndarray  # (C,) float32: the final norm's affine where it could not be folded, else 1
    shift: np.ndarray  # (C,) float32: ... else 0
    slope: np.ndarray  # (C,) float32
    weight: np.ndarray  # (6, C, 3, 3) float32, the final norm's gain folded in
    bias: np.ndarray  # (6,) float32

    def finish(self, upsample_input: np.ndarray, skip: np.ndarray, num_threads: int | None = None,
               channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(delta_uv, lf, mask_logits) from the folded graph's ``upsample_input`` and ``skip`` outputs, or with
        ``channels_last`` from the native stage's (``KeypointStage``)."""
        from .. import ops

        groups = ops.UpsampleConv(upsample_input, self.conv_weight, self.conv_bias, skip, channels_last)
        return ops.heads(groups, self.scale, self.shift, self.slope, self.weight, self.bias, num_threads=num_threads)


def _params_and_affines(weights: FrameWeights, flat_params: dict[str, np.ndarray]):
    p = {k: np.asarray(v, dtype=np.float64).reshape(np.asarray(v).shape[1:]) for k, v in flat_params.items()}
    return p, avatar_affines(weights, {k: v[None] for k, v in p.items()})


def folded_heads(weights: FrameWeights, flat_params: dict[str, np.ndarray]) -> HeadsWeights:
    """The last block's up-sampling convolution and the heads, which ``build_folded_graph(...,
    native_heads=True)`` leaves to the native kernel."""
    _, affines = _params_and_affines(weights, flat_params)
    final = _input_norm(weights, affines, len(weights.blocks))
    f32 = functools.partial(np.ascontiguousarray, dtype=np.float32)
    last = weights.blocks[-1]
    return HeadsWeights(
        conv_weight=f32(last.conv2_weight),
        conv_bias=f32(last.conv2_bias + final.shift),
        scale=f32(np.where(final.explicit, final.a, 1.0)),
        shift=f32(np.where(final.explicit, final.c, 0.0)),
        slope=f32(final.slope),
        weight=f32(weights.heads_weight * final.gain[None, :, None, None]),
        bias=f32(weights.heads_bias),
    )


def mlp_features(frequencies: np.ndarray | None, keypoints: np.ndarray) -> np.ndarray:
    """The keypoint MLP's input (N, F) float32 from keypoints (N, 68, 2): flattened, or harmonic features
    ``[sin(x * f_k), cos(x * f_k)]`` (x-major, frequency-minor) as the torch module computes them."""
    x = np.asarray(keypoints, dtype=np.float32).reshape(len(keypoints), -1)
    if frequencies is None:
        return np.ascontiguousarray(x)
    scaled = (x[:, :, None] * np.asarray(frequencies, dtype=np.float32)).reshape(len(x), -1)
    return np.ascontiguousarray(np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1), dtype=np.float32)


@dataclass(frozen=True)
class LowResWeights:
    """One avatar's keypoint MLP and first blocks in the form of the native stage (``ops.LowResStage``,
    convention in ``csrc/lowres/lowres.h``); the graphs of ``build_folded_frame(native_blocks=len(blocks))``
    continue from its output, the input x' of the next block (its norm's shift included). With
    ``heads_inputs`` it holds every block and ends with the last one's ``upsample_input`` and ``skip``."""

    mlp: list  # [(weight (out, in), bias (out,))] float32; LeakyReLU between layers
    blocks: list  # [dict(scale, shift, slope, conv1_weight, conv1_bias, conv2_weight, conv2_bias, skip_weight,
    #                     skip_bias)] float32; no conv2 in the last block with heads_inputs
    input_size: int
    frequencies: np.ndarray | None  # harmonic encoding of the keypoints (None: raw)
    heads_inputs: bool = False

    def stage(self) -> "KeypointStage":
        from .. import ops

        stage = ops.LowResStage(self.mlp, self.blocks, self.input_size, winograd_min_size=WINOGRAD_MIN_SIZE,
                                heads_inputs=self.heads_inputs, sweep_min_size=SWEEP_MIN_SIZE)
        return KeypointStage(stage, self.frequencies)


class KeypointStage(NamedTuple):
    """One avatar's native stage called on keypoints (N, 68, 2): the keypoint MLP's input features
    (``mlp_features``), then the native kernel; returns the first graph's ``STAGE_INPUT``, or with
    ``heads_inputs`` the heads' ``upsample_input`` and ``skip``, channels-last (``HeadsWeights.finish``)."""

    kernel: object  # ops.LowResStage
    frequencies: np.ndarray | None

    def __call__(self, keypoints: np.ndarray, num_threads: int | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return self.kernel(mlp_features(self.frequencies, keypoints), num_threads=num_threads)


def folded_low_res_stage(weights: FrameWeights, flat_params: dict[str, np.ndarray], num_blocks: int) -> LowResWeights:
    """The keypoint MLP and blocks 0..num_blocks-1 of one avatar, folded as ``_FoldedGraphs`` folds them, for
    the native stage. With every block (num_blocks = the number of blocks) the last one stops where the
    native heads take over (``heads_inputs``): no graph is left."""
    n = len(weights.blocks)
    if not 1 <= num_blocks <= n:
        raise ValueError(f"num_blocks must be in [1, {n}], got {num_blocks}")
    p, affines = _params_and_affines(weights, flat_params)
    f32 = functools.partial(np.ascontiguousarray, dtype=np.float32)
    blocks = []
    for j in range(num_blocks):
        blk = weights.blocks[j]
        sw, sb = p[f"blocks.{j}.skip.weight"], p[f"blocks.{j}.skip.bias"]
        if j == 0:  # the first norm is a fixed affine on the MLP's output, followed by LeakyReLU
            scale, shift = weights.first_norm_scale, weights.first_norm_shift
            slope, gain, skip_bias = np.full(blk.channels[0], NEGATIVE_SLOPE), np.ones(blk.channels[0]), sb
        else:
            x_norm = _input_norm(weights, affines, j)
            scale = np.where(x_norm.explicit, x_norm.a, 1.0)
            shift = np.where(x_norm.explicit, x_norm.c, 0.0)
            slope, gain, skip_bias = x_norm.slope, x_norm.gain, sb - sw @ x_norm.shift
        a2, c2 = affines[f"blocks.{j}.norm2"]
        blocks.append({
            "scale": f32(scale), "shift": f32(shift), "slope": f32(slope),
            "conv1_weight": f32(blk.conv1_weight * gain[None, :, None, None] * a2[:, None, None, None]),
            "conv1_bias": f32(blk.conv1_bias * a2 + c2),
            "skip_weight": f32(sw), "skip_bias": f32(skip_bias),
        })
        if j < n - 1:  # the last block's up-sampling convolution is the heads kernel's (folded_heads)
            blocks[-1]["conv2_weight"] = f32(blk.conv2_weight)
            blocks[-1]["conv2_bias"] = f32(blk.conv2_bias + _input_norm(weights, affines, j + 1).shift)
    return LowResWeights(mlp=[(f32(w), f32(b)) for w, b in weights.mlp], blocks=blocks, input_size=weights.input_size,
                         frequencies=weights.frequencies, heads_inputs=num_blocks == n)


# The native stage computes conv1 as Winograd on maps of at least this size (F(2x2, 3x3) at 8 px, F(4x4, 3x3)
# from 16 px: lowres_cpu.cpp). Released size, 2-core AVX2 machine, in turns: the stage through block 4, 15.8
# against 19.7 ms (minimum of 60) from 16 px than with direct convolutions; the whole stage from 8 px against
# from 16 px, minimum and p50 faster in four runs of five (by 0.4-0.9 ms), 300 calls each (from 32 px: slower,
# once); F(2x2, 3x3) rather than F(4x4, 3x3) at 8 px: 0.1-1.0 ms faster in four runs.
WINOGRAD_MIN_SIZE = 8

# The blocks on maps of at least this size run depth first, a band of rows at a time (lowres_cpu.cpp, run_sweep):
# at the released size the 64 and 128 px blocks, whose maps (2-7 MB each) outgrow the L2 caches. Released size,
# 2-core AVX2 machine: the stage alone in turns against whole-map passes, p50 0.36-0.56 ms faster (5 runs of
# 300 calls in both orders), frames 0.63-0.78 ms (3 runs, two avatars alternating in one process). From 32 px
# (its conv1 over the whole map first: its 4.7 MB of Winograd weights, re-read for every strip, made it 1.2 ms
# slower) 0.1-0.3 ms slower than from 64 px: the 32 px groups' 1.2 MB of weights are re-read for every band;
# from 128 px 0.3-0.5 ms slower: the 64 px maps go through memory again.
SWEEP_MIN_SIZE = 64


class FoldedFrame(NamedTuple):
    """What a folded-graph backend prepares per avatar (``build_folded_frame``), run in this order."""

    low_res: LowResWeights | None  # the native stage's weights: its output is the first graph's STAGE_INPUT
    graphs: list  # ONNX graphs: one, or one per block joined by ops.depth_to_space_box
    heads: HeadsWeights | None  # the native heads, run on the last graph's UPSAMPLE_INPUT and SKIP_OUTPUT


def build_folded_frame(weights: FrameWeights, flat_params: dict[str, np.ndarray], native_heads: bool,
                       per_block: bool = False, native_blocks: int = 0) -> FoldedFrame:
    """What a folded-graph backend prepares per avatar: with ``native_blocks`` > 0 the native stage's weights
    for the keypoint MLP and that many first blocks (``folded_low_res_stage``); its graphs (one, or with
    ``per_block`` one per block, see ``build_folded_stages``; none when the stage runs every block), from the
    keypoints or from the stage's output; and with ``native_heads`` the heads that ``HeadsWeights.finish``
    runs on the ``upsample_input`` and ``skip`` of the last graph, or of the stage (else None)."""
    if (per_block or native_blocks) and not native_heads:
        raise ValueError("per_block graphs and native_blocks need native_heads (they run native kernels)")
    split = "blocks" if per_block else "heads" if native_heads else "none"
    return FoldedFrame(
        low_res=folded_low_res_stage(weights, flat_params, native_blocks) if native_blocks else None,
        graphs=_folded_graphs(weights, flat_params, None, split, first_block=native_blocks),
        heads=folded_heads(weights, flat_params) if native_heads else None,
    )


def build_folded_graph(weights: FrameWeights, flat_params: dict[str, np.ndarray], subpixel_blocks=None,
                       native_heads: bool = False):
    """One identity's per-frame network with its parameters folded into the weights (fp32).

    ``flat_params``: ``InferenceParams.flatten()`` of one identity as numpy arrays (batch dim 1).
    ``subpixel_blocks``: indices of blocks whose up-sampling + conv runs at the low resolution
    (``upsample_conv_taps``; default all), the others up-sample first. With ``native_heads`` the last
    block's up-sampling convolution is the native kernel's, whichever blocks are named.
    ``native_heads``: the graph ends before the last block's up-sampling convolution (outputs
    ``upsample_input`` (N, C, S/2, S/2) and ``skip`` (N, C, S/2, S/2)); the native kernel ``ops.heads``
    with ``folded_heads`` finishes the frame.
    """
    (graph,) = _folded_graphs(weights, flat_params, subpixel_blocks, "heads" if native_heads else "none")
    return graph


def build_folded_stages(weights: FrameWeights, flat_params: dict[str, np.ndarray]) -> list:
    """The folded network as one graph per block, each ending at its block's four tap groups (``phases``),
    the last one as ``build_folded_graph(..., native_heads=True)``. The first takes ``keypoints``; each
    later one takes ``x`` (N, C, S, S), the previous block's output, which ``ops.depth_to_space_box`` makes
    from the previous ``phases``; ``HeadsWeights.finish`` finishes the last.
    onnxruntime runs depth-to-space, slice and box slowly (with layout reorders around them: ~9 ms of its
    37 ms graph); the native pass takes ~0.3 ms at the largest boundary."""
    return _folded_graphs(weights, flat_params, None, "blocks")


def _folded_graphs(weights: FrameWeights, flat_params: dict[str, np.ndarray], subpixel_blocks,
                   split: Literal["none", "heads", "blocks"], first_block: int = 0) -> list:
    return _FoldedGraphs(weights, flat_params, subpixel_blocks, split).build(first_block)


class _FoldedGraphs:
    """Builds the folded graphs of one avatar (see ``build_folded_graph`` and ``build_folded_stages``)."""

    def __init__(self, weights: FrameWeights, flat_params: dict[str, np.ndarray], subpixel_blocks,
                 split: Literal["none", "heads", "blocks"]):
        self.weights = weights
        self.params, self.affines = _params_and_affines(weights, flat_params)
        n = len(weights.blocks)
        self.subpixel_blocks = set(range(n)) if subpixel_blocks is None else set(subpixel_blocks)
        self.split = split
        self.doc = {"heads": "up to the last up-sampling convolution", "blocks": "one block"}.get(split, "")
        self.graphs = []

    def build(self, first_block: int) -> list:
        from onnx import TensorProto

        weights, p = self.weights, self.params
        if first_block == len(weights.blocks):  # the native stage runs every block
            return []
        b = _Builder(np.float32)
        if first_block:  # the native stage (folded_low_res_stage) ran the MLP and the blocks before
            s = weights.input_size * 2 ** first_block
            x = b.add_input(STAGE_INPUT, ["N", weights.blocks[first_block].channels[0], s, s], TensorProto.FLOAT)
            return self.blocks(b, first_block, s, *self.enter_block(b, first_block, x))
        kp = b.add_input(KEYPOINTS_INPUT, ["N", 68, 2], TensorProto.FLOAT)

        # Block 0: its first norm is a fixed affine (a0, c0); fold it and block 0's skip into the last Linear.
        s, c0 = weights.input_size, weights.input_channels
        w_last, b_last = weights.mlp[-1]  # (c0*s*s, hidden)
        a0 = np.repeat(weights.first_norm_scale, s * s)
        c0_shift = np.repeat(weights.first_norm_shift, s * s)
        skip_w, skip_b = p["blocks.0.skip.weight"], p["blocks.0.skip.bias"]  # (C, c0), (C,)
        c_out0 = skip_w.shape[0]
        # skip(x0)[o, pix] = sum_i W[o, i] x0[i, pix] + b[o], with x0[i, pix] = row i*s*s + pix of the Linear
        w3 = w_last.reshape(c0, s * s, -1)
        b3 = b_last.reshape(c0, s * s)
        skip_rows_w = (skip_w @ w3.reshape(c0, -1)).reshape(c_out0 * s * s, -1)  # BLAS, not einsum: 0.27 GMAC
        skip_rows_b = (skip_w @ b3 + skip_b[:, None]).reshape(-1)
        fused_w = np.concatenate([w_last * a0[:, None], skip_rows_w])
        fused_b = np.concatenate([b_last * a0 + c0_shift, skip_rows_b])
        h = _pose_embedding(b, weights, kp, without_last=True)
        h = b.linear(h, fused_w, fused_b, hint="mlp_last_fused")
        x_act_in, skip = b.op("Split", [h, b.ints([c0 * s * s, c_out0 * s * s])], outputs=2, axis=1)
        t = b.lrelu(b.op("Reshape", [x_act_in, b.ints([-1, c0, s, s])]))  # lrelu(norm1(x0)), gain 1
        skip = b.op("Reshape", [skip, b.ints([-1, c_out0, s, s])])
        return self.blocks(b, 0, s, skip, t, np.ones(c0))

    def enter_block(self, b: _Builder, j: int, x: str) -> tuple[str, str, np.ndarray]:
        """Block j (>= 1) from its input x' = x + shift: its skip, its activated input and its input gain."""
        x_norm = _input_norm(self.weights, self.affines, j)
        sw, sb = self.params[f"blocks.{j}.skip.weight"], self.params[f"blocks.{j}.skip.bias"]
        skip = b.conv(x, sw[:, :, None, None], sb - sw @ x_norm.shift, pads=(0, 0, 0, 0), hint=f"b{j}_skip")
        return skip, x_norm.apply(b, x), x_norm.gain

    def blocks(self, b: _Builder, first_block: int, s: int, skip: str, t: str, gain: np.ndarray) -> list:
        """Blocks ``first_block``.. to the end, from that block's skip, activated input ``t`` and input gain."""
        from onnx import TensorProto

        weights, split, doc = self.weights, self.split, self.doc
        n = len(weights.blocks)
        for j in range(first_block, n):
            blk = weights.blocks[j]
            c_in, c_out = blk.channels
            a2, c2 = self.affines[f"blocks.{j}.norm2"]
            w1 = blk.conv1_weight * gain[None, :, None, None] * a2[:, None, None, None]
            b1 = blk.conv1_bias * a2 + c2
            h = b.lrelu(b.conv(t, w1, b1, hint=f"b{j}_conv1"))  # conv + norm2 + lrelu (fused by ORT)
            nxt = _input_norm(weights, self.affines, j + 1)
            b2 = blk.conv2_bias + nxt.shift  # the next norm's shift moves into this block's output
            if split != "none" and j == n - 1:  # the native kernel takes over
                b.add_output(h, UPSAMPLE_INPUT, ["N", c_out, s, s], TensorProto.FLOAT)
                b.add_output(skip, SKIP_OUTPUT, ["N", c_out, s, s], TensorProto.FLOAT)
                name = f"bilayer_frame_folded_block{j}" if split == "blocks" else "bilayer_frame_folded_heads"
                self.graphs.append(b.model(name, doc=f"pybilayer per-frame network with one avatar folded in, {doc}"))
                return self.graphs
            if j in self.subpixel_blocks:
                groups = []
                for g, (k, pads) in enumerate(weights.conv2_taps(j)):
                    groups.append(b.conv(h, k, b2 if g == 0 else None, pads=pads, hint=f"b{j}_conv2"))
                groups[0] = b.op("Add", [groups[0], b.op("Pad", [skip, b.ints([0, 0, 1, 1, 0, 0, 0, 0])])])
                phases = b.op("Concat", groups, axis=1)
                if split == "blocks":
                    b.add_output(phases, PHASES_OUTPUT, ["N", 4 * c_out, s + 1, s + 1], TensorProto.FLOAT)
                    self.graphs.append(b.model(f"bilayer_frame_folded_block{j}",
                                               doc=f"pybilayer per-frame network with one avatar folded in, {doc}"))
                    b = _Builder(np.float32)
                    x = b.add_input(STAGE_INPUT, ["N", c_out, 2 * s, 2 * s], TensorProto.FLOAT)
                else:
                    v = b.op("DepthToSpace", [phases], blocksize=2, mode="DCR")
                    v = b.op("Slice", [v, b.ints([1, 1]), b.ints([2 * s + 2, 2 * s + 2]), b.ints([2, 3])])
                    box = np.ones((c_out, 1, 2, 2))
                    x = b.op("Conv", [v, b.const(box, "box")], hint=f"b{j}_box", kernel_shape=[2, 2], group=c_out)
            else:
                up = b.conv(b.upsample2(h), blk.conv2_weight, b2, hint=f"b{j}_conv2")
                x = b.op("Add", [up, b.upsample2(skip)])
            s *= 2
            # x here is x' = x + shift of the next norm
            if j + 1 < n:
                skip, t, gain = self.enter_block(b, j + 1, x)
            else:
                t, gain = nxt.apply(b, x), nxt.gain
        _heads(b, t, weights.heads_weight * gain[None, :, None, None], weights.heads_bias, s)
        return [b.model("bilayer_frame_folded", doc="pybilayer per-frame network with one avatar folded in")]
