"""The native heads kernel (box sum + activation + heads + tanh) and the block output kernels (tap groups
given, or computed from the up-sampling convolution's input) against their PyTorch references.

Fresh random inputs every run, shapes whose width is not a multiple of the vector step, every code path
the CPU has (the portable one, AVX2+FMA, AVX-512), and outputs poisoned with NaN before the call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _isas import ISAS, VECTOR_ISAS
from _tolerances import TOLERANCES

from pybilayer import native, ops

pytestmark = pytest.mark.skipif(not native.capabilities().native, reason=str(native.capabilities().native_reason))


def make_inputs(batch: int, channels: int, low_size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    side = low_size + 1
    phases = rng.standard_normal((batch, 4 * channels, side, side)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    scale[::3] = 1.0  # folded channels: scale 1, shift 0
    shift = rng.standard_normal(channels).astype(np.float32)
    shift[::3] = 0.0
    slope = rng.choice(np.array([0.2, 5.0], np.float32), channels)
    weight = (rng.standard_normal((6, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    return phases, scale, shift, slope, weight, bias


def reference(inputs) -> list[np.ndarray]:
    return [t.numpy() for t in ops.heads_reference(*(torch.from_numpy(a).double() for a in inputs))]


def run_poisoned(inputs, **kwargs) -> list[np.ndarray]:
    batch, size = inputs[0].shape[0], 2 * (inputs[0].shape[2] - 1)
    outputs = [np.full((batch, c, size, size), np.nan, np.float32) for c in (2, 3, 1)]
    native.load().heads(*inputs, *outputs, **kwargs)
    return outputs


def heads_tolerance(isa: str) -> tuple[float, float]:
    """The heads' vector paths run their convolution as Winograd F(4, 3) along rows (heads_cpu.cpp)."""
    return TOLERANCES["heads_fp32" if isa == "portable" else "heads_winograd_fp32"]


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(1 << 30, ()).item()))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch, channels, low_size", [(1, 32, 64), (2, 5, 13), (3, 8, 24), (1, 3, 1), (2, 1, 9)])
def test_matches_reference(batch, channels, low_size, isa, rng):
    inputs = make_inputs(batch, channels, low_size, rng)
    ref = reference(inputs)
    rtol, atol = heads_tolerance(isa)
    for threads in (1, 3):
        out = run_poisoned(inputs, num_threads=threads, isa=isa)
        for o, r in zip(out, ref):
            np.testing.assert_allclose(o, r, rtol=rtol, atol=atol)
    assert all(np.abs(r).max() > 0.1 for r in ref)  # not a comparison of near-zero outputs


def test_paths_and_thread_counts_agree(rng):
    inputs = make_inputs(2, 16, 40, rng)
    base = run_poisoned(inputs, num_threads=1, isa="portable")
    rtol, atol = heads_tolerance("best")
    for kwargs in ({"num_threads": 1}, {"num_threads": 2}, {"num_threads": 7}, {"num_threads": 2, "isa": "portable"}):
        for o, b in zip(run_poisoned(inputs, **kwargs), base):
            np.testing.assert_allclose(o, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch, channels, low_size", [(1, 16, 32), (2, 5, 13), (3, 1, 1)])
def test_depth_to_space_box_matches_reference(batch, channels, low_size, isa, rng):
    phases = make_inputs(batch, channels, low_size, rng)[0]
    ref = ops.depth_to_space_box_reference(torch.from_numpy(phases).double()).numpy()
    rtol, atol = TOLERANCES["heads_fp32"]
    for threads in (1, 3):
        out = np.full((batch, channels, 2 * low_size, 2 * low_size), np.nan, np.float32)
        native.load().depth_to_space_box(phases, out, num_threads=threads, isa=isa)
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(ops.depth_to_space_box(phases, isa="portable"), ops.depth_to_space_box(phases))


def test_heads_are_the_box_then_activation_and_convolution(rng):
    """The two kernels share one convention: heads = activation + 3x3 convolution of depth_to_space_box."""
    phases, scale, shift, slope, weight, bias = make_inputs(1, 6, 11, rng)
    x = torch.from_numpy(ops.depth_to_space_box(phases)).double()
    v = x * torch.from_numpy(scale).double().view(1, -1, 1, 1) + torch.from_numpy(shift).double().view(1, -1, 1, 1)
    t = torch.where(v < 0, v * torch.from_numpy(slope).double().view(1, -1, 1, 1), v)
    h = torch.nn.functional.conv2d(t, torch.from_numpy(weight).double(), torch.from_numpy(bias).double(), padding=1)
    rtol, atol = heads_tolerance("best")
    for o, r in zip(ops.heads(phases, scale, shift, slope, weight, bias), (h[:, :2].tanh(), h[:, 2:5].tanh(), h[:, 5:])):
        np.testing.assert_allclose(o, r.numpy(), rtol=rtol, atol=atol)


def test_ops_wrapper_allocates_and_matches(rng):
    inputs = make_inputs(1, 4, 10, rng)
    delta_uv, lf, mask_logits = ops.heads(*inputs, num_threads=2)
    assert (delta_uv.shape, lf.shape, mask_logits.shape) == ((1, 2, 20, 20), (1, 3, 20, 20), (1, 1, 20, 20))
    rtol, atol = heads_tolerance("best")
    for o, r in zip((delta_uv, lf, mask_logits), reference(inputs)):
        np.testing.assert_allclose(o, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("isa", ISAS)
def test_tanh_saturates_and_nan_propagates(isa, rng):
    inputs = list(make_inputs(1, 4, 12, rng))
    inputs[0] = inputs[0] * 1e4  # heads far into tanh's saturation
    inputs[0][0, 5, 6, 6] = np.nan
    ref = reference(inputs)
    out = run_poisoned(inputs, num_threads=2, isa=isa)
    for o, r in zip(out, ref):
        assert np.isnan(r).any() and not np.isnan(r).all()
        if isa == "portable":
            np.testing.assert_array_equal(np.isnan(o), np.isnan(r))
            continue
        # Winograd along rows: a NaN reaches the reference's NaN and at most the rest of their 4-row bands
        assert np.isnan(o[np.isnan(r)]).all()
        bands = np.isnan(r).reshape(*r.shape[:2], -1, 4, r.shape[3]).any(axis=3, keepdims=True)
        assert not np.isnan(o[~np.broadcast_to(bands, (*r.shape[:2], r.shape[2] // 4, 4, r.shape[3])).reshape(r.shape)]).any()
    finite = ~np.isnan(ref[0]) & ~np.isnan(out[0])
    np.testing.assert_allclose(out[0][finite], ref[0][finite], rtol=0, atol=1e-6)
    assert np.abs(out[0][finite]).max() <= 1.0


@pytest.mark.parametrize(
    "index, shape, dtype, match",
    [
        (0, (1, 30, 9, 9), np.float32, "phases: expected \\(B, 4C, s\\+1, s\\+1\\)"),
        (0, (1, 32, 9, 8), np.float32, "phases"),
        (1, (7,), np.float32, "scale: expected shape \\(8,\\)"),
        (4, (6, 8, 1, 1), np.float32, "weight: expected shape \\(6, 8, 3, 3\\)"),
        (5, (6,), np.float64, "bias: unsupported dtype"),
        (5, (6,), np.float16, "bias: expected float32, got float16"),
        (7, (1, 3, 15, 15), np.float32, "lf: expected shape \\(1, 3, 16, 16\\)"),
    ],
)
def test_bad_arguments_name_the_argument(index, shape, dtype, match, rng):
    inputs = list(make_inputs(1, 8, 8, rng))
    outputs = [np.zeros((1, c, 16, 16), np.float32) for c in (2, 3, 1)]
    arguments = inputs + outputs
    arguments[index] = np.zeros(shape, dtype)
    with pytest.raises(ValueError, match=match):
        native.load().heads(*arguments)


def test_depth_to_space_box_names_bad_arguments(rng):
    phases = make_inputs(1, 4, 6, rng)[0]
    with pytest.raises(ValueError, match="out: expected shape \\(1, 4, 12, 12\\)"):
        native.load().depth_to_space_box(phases, np.zeros((1, 4, 12, 13), np.float32))
    with pytest.raises(ValueError, match="phases: expected \\(B, 4C, s\\+1, s\\+1\\)"):
        native.load().depth_to_space_box(phases[:, :15], np.zeros((1, 4, 12, 12), np.float32))
    with pytest.raises(ValueError, match="phases: expected \\(B, 4C, s\\+1, s\\+1\\)"):
        ops.depth_to_space_box(phases[0])


def test_read_only_output_is_rejected(rng):
    inputs = make_inputs(1, 2, 4, rng)
    outputs = [np.zeros((1, c, 8, 8), np.float32) for c in (2, 3, 1)]
    outputs[2].flags.writeable = False
    with pytest.raises(ValueError, match="mask_logits: the output array is read-only"):
        native.load().heads(*inputs, *outputs)


def test_benchmark_runs_end_to_end(tmp_path, capsys):
    """benchmarks/native_passes.py --quick: the kernels against their references, and frames with the native
    passes off, the heads on, and the stage on too, for every folded-graph backend usable here (tiny random
    model). Timings are never asserted."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "native_passes.py"
    spec = importlib.util.spec_from_file_location("pybilayer_native_passes_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "native.json"
    assert module.main(["--quick", "--threads", "1", "--backends", "onnxruntime", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    kernel = [r for r in results if r["kind"] == "kernel"]
    frames = [r for r in results if r["kind"] == "frame"]
    assert [(r["kernel"].split(":")[0], r["threads"]) for r in kernel] == [("heads", 1), ("stage", 1)]
    assert all(r["native_ms"] > 0 and r["reference_ms"] > 0 for r in kernel)
    assert [r["backend"] for r in frames] == ["onnxruntime"]
    assert all(frames[0][f"{v}_ms"] > 0 for v in ("graph", "heads", "stage"))
    assert frames[0]["max_abs_image_difference"] <= TOLERANCES["fast_cpu_render"][1]
    assert "+ native stage p50" in capsys.readouterr().out


# --- tap groups computed from the up-sampling convolution's input (ops.UpsampleConv) ------------------


def make_conv(batch: int, in_channels: int, channels: int, low_size: int, rng: np.random.Generator,
              with_skip: bool = True) -> ops.UpsampleConv:
    return ops.UpsampleConv(
        input=rng.standard_normal((batch, in_channels, low_size, low_size)).astype(np.float32),
        weight=(rng.standard_normal((channels, in_channels, 3, 3)) / np.sqrt(4 * in_channels)).astype(np.float32),
        bias=rng.standard_normal(channels).astype(np.float32),
        skip=rng.standard_normal((batch, channels, low_size, low_size)).astype(np.float32) if with_skip else None,
    )


def conv_reference(conv: ops.UpsampleConv) -> np.ndarray:
    return ops.upsample_conv_reference(*conv.arrays(lambda a: torch.from_numpy(a).double())[:4]).numpy()


def run_conv_poisoned(conv: ops.UpsampleConv, **kwargs) -> np.ndarray:
    batch, size = conv.input.shape[0], 2 * conv.input.shape[2]
    out = np.full((batch, conv.weight.shape[0], size, size), np.nan, np.float32)
    native.load().upsample_conv(*conv[:4], out, **kwargs)
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch, in_channels, channels, low_size, with_skip",
                         [(1, 32, 32, 40, True), (2, 5, 3, 13, True), (1, 4, 7, 7, False), (2, 3, 2, 15, True),
                          (1, 2, 1, 1, True), (3, 6, 5, 24, False)])
def test_upsample_conv_matches_reference(batch, in_channels, channels, low_size, with_skip, isa, rng):
    """Odd channel counts (a half-used channel pair), s + 1 a multiple of the vector step or not, s = 1."""
    conv = make_conv(batch, in_channels, channels, low_size, rng, with_skip)
    ref = conv_reference(conv)
    rtol, atol = TOLERANCES["heads_fp32"]
    for threads in (1, 3):
        np.testing.assert_allclose(run_conv_poisoned(conv, num_threads=threads, isa=isa), ref,
                                   rtol=rtol, atol=atol)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(ops.upsample_conv(*conv[:4], num_threads=2, isa=isa), ref, rtol=rtol,
                               atol=atol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch, in_channels, channels, low_size", [(1, 16, 32, 20), (2, 3, 5, 9), (1, 2, 3, 1)])
def test_heads_from_upsample_conv_match_reference(batch, in_channels, channels, low_size, isa, rng):
    conv = make_conv(batch, in_channels, channels, low_size, rng)
    params = make_inputs(batch, channels, low_size, rng)[1:]
    ref = ops.heads_reference(conv.arrays(lambda a: torch.from_numpy(a).double()),
                              *(torch.from_numpy(a).double() for a in params))
    rtol, atol = heads_tolerance(isa)
    for threads in (1, 3):
        out = ops.heads(conv, *params, num_threads=threads, isa=isa)
        for o, r in zip(out, ref):
            np.testing.assert_allclose(o, r.numpy(), rtol=rtol, atol=atol)
    # the same frame as from the tap groups that the graph used to compute (phases)
    phases = _phases_of(conv)
    rtol, atol = heads_tolerance("best")
    for o, p in zip(ops.heads(conv, *params, num_threads=2), ops.heads(phases, *params, num_threads=2)):
        np.testing.assert_allclose(o, p, rtol=rtol, atol=atol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("batch, in_channels, channels, low_size, with_skip",
                         [(1, 32, 32, 40, True), (2, 3, 5, 9, True), (1, 8, 3, 17, False), (1, 2, 3, 1, True)])
def test_heads_from_channels_last_inputs_are_the_same(batch, in_channels, channels, low_size, with_skip,
                                                      isa, rng):
    """The native stage's layout (UpsampleConv.channels_last): the same bits as from (B, C, s, s) arrays, and
    the reference takes it too."""
    conv = make_conv(batch, in_channels, channels, low_size, rng, with_skip)
    last = conv._replace(input=np.ascontiguousarray(conv.input.transpose(0, 2, 3, 1)), channels_last=True,
                         skip=None if conv.skip is None else np.ascontiguousarray(conv.skip.transpose(0, 2, 3, 1)))
    params = make_inputs(batch, channels, low_size, rng)[1:]
    for threads in (1, 3):
        for a, b in zip(ops.heads(last, *params, num_threads=threads, isa=isa),
                        ops.heads(conv, *params, num_threads=threads, isa=isa)):
            assert np.isfinite(b).all() and np.abs(b).max() > 0.1
            np.testing.assert_array_equal(a, b)
    as64 = lambda a: torch.from_numpy(a).double()  # noqa: E731
    for a, b in zip(ops.heads_reference(last.arrays(as64), *map(as64, params)),
                    ops.heads_reference(conv.arrays(as64), *map(as64, params))):
        torch.testing.assert_close(a, b)  # float64: other convolution paths for other strides
    with pytest.raises(ValueError, match=r"input: expected \(B, s, s, Cin\)"):
        ops.heads(last._replace(input=conv.input[:, :, :, :-1].copy()), *params)
    if with_skip and channels != low_size:  # a (B, C, s, s) skip
        with pytest.raises(ValueError, match="skip"):
            ops.heads(last._replace(skip=conv.skip), *params)


@pytest.mark.skipif("avx512" not in native.capabilities().cpu_isas, reason="this CPU has no avx512 code path")
@pytest.mark.parametrize("batch, in_channels, channels, low_size",
                         [(1, 16, 32, 40), (2, 5, 3, 13), (1, 8, 7, 24), (1, 3, 2, 1), (1, 4, 5, 8)])
def test_avx512_gives_the_avx2_bits(batch, in_channels, channels, low_size, rng):
    """The AVX-512 heads and group rows run the AVX2 kernels' sums 16 lanes a register (steps of 32 pixels, a
    last 16 alone, the same columns vectorised): the same bits, from tap groups given or computed."""
    conv = make_conv(batch, in_channels, channels, low_size, rng)
    last = conv._replace(input=np.ascontiguousarray(conv.input.transpose(0, 2, 3, 1)), channels_last=True,
                         skip=np.ascontiguousarray(conv.skip.transpose(0, 2, 3, 1)))
    phases, *params = make_inputs(batch, channels, low_size, rng)
    for groups in (conv, last, phases):
        for threads in (1, 3):
            wide = ops.heads(groups, *params, num_threads=threads, isa="avx512")
            for a, b in zip(wide, ops.heads(groups, *params, num_threads=threads, isa="avx2")):
                assert np.abs(b).max() > 0.1
                np.testing.assert_array_equal(a, b)
    want = ops.upsample_conv(*conv[:4], isa="avx2")
    assert np.abs(want).max() > 0.5
    np.testing.assert_array_equal(ops.upsample_conv(*conv[:4], num_threads=3, isa="avx512"), want)


def _phases_of(conv: ops.UpsampleConv) -> np.ndarray:
    """The four tap groups of frame_graph.upsample_conv_taps, computed in float64 torch."""
    from pybilayer.backends.frame_graph import upsample_conv_taps

    x = torch.from_numpy(conv.input).double()
    groups = [F.conv2d(F.pad(x, (left, right, top, bottom)), torch.from_numpy(np.ascontiguousarray(k)).double())
              for k, (top, left, bottom, right) in upsample_conv_taps(conv.weight.astype(np.float64))]
    groups[0] = groups[0] + torch.from_numpy(conv.bias).double().view(1, -1, 1, 1)
    if conv.skip is not None:
        groups[0] = groups[0] + F.pad(torch.from_numpy(conv.skip).double(), (1, 0, 1, 0))
    return torch.cat(groups, 1).float().numpy()


@pytest.mark.parametrize("isa", ISAS)
def test_upsample_conv_spreads_nan_as_the_reference(isa, rng):
    conv = make_conv(1, 4, 3, 11, rng)
    conv.input[0, 2, 5, 0] = np.nan  # a border column too
    conv.input[0, 1, 8, 7] = np.nan
    ref = conv_reference(conv)
    out = run_conv_poisoned(conv, num_threads=2, isa=isa)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert 0 < np.isnan(ref).sum() < ref.size / 4


def test_upsample_conv_names_bad_arguments(rng):
    conv = make_conv(1, 4, 3, 6, rng)
    out = np.zeros((1, 3, 12, 12), np.float32)
    bad = {
        "input": (conv.input[:, :, :, :5], "input: expected \\(B, Cin, s, s\\)"),
        "weight": (conv.weight[:, :3], "conv_weight: expected shape \\(3, 4, 3, 3\\)"),
        "bias": (conv.bias[:2], "conv_bias: expected shape \\(3,\\)"),
        "skip": (conv.skip[:, :, :5], "skip: expected shape \\(1, 3, 6, 6\\)"),
    }
    for argument, (wrong, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            native.load().upsample_conv(*conv._replace(**{argument: np.ascontiguousarray(wrong)})[:4], out)
    with pytest.raises(ValueError, match="out: expected shape \\(1, 3, 12, 12\\)"):
        native.load().upsample_conv(*conv[:4], np.zeros((1, 3, 12, 11), np.float32))
    with pytest.raises(ValueError, match="input: expected \\(B, Cin, s, s\\)"):
        ops.upsample_conv(conv.input[0], conv.weight, conv.bias)
