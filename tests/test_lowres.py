"""The native low-resolution stage (keypoint MLP + first up-sampling blocks, ``ops.LowResStage``) against its
PyTorch reference (``ops.low_res_stage_reference``, float64).

Fresh random weights and inputs every run, channel counts that are not multiples of the kernel's 16-channel
step, grids that are not multiples of its 6- or 12-pixel steps, every code path the CPU has (the portable one,
AVX2+FMA, AVX-512), several thread counts, and outputs poisoned with NaN before the call. Its agreement with
the whole network, folded from a model, is checked in test_export.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _isas import ISAS, VECTOR_ISAS
from _tolerances import TOLERANCES

from pybilayer import native, ops

pytestmark = pytest.mark.skipif(not native.capabilities().native, reason=str(native.capabilities().native_reason))


def make_stage(rng: np.random.Generator, features: int, hidden: tuple[int, ...], channels: tuple[int, ...],
               input_size: int):
    """Random weights: MLP features -> hidden... -> channels[0] x s0 x s0, then blocks channels[j] -> [j+1]."""
    widths = (features, *hidden, channels[0] * input_size * input_size)
    mlp = [((rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32), (0.1 * rng.standard_normal(o)).astype(np.float32))
           for i, o in zip(widths[:-1], widths[1:])]
    blocks = []
    for cin, c in zip(channels[:-1], channels[1:]):
        scale = rng.uniform(0.5, 2.0, cin)
        scale[::3] = 1.0
        blocks.append({
            "scale": scale, "shift": rng.standard_normal(cin), "slope": rng.choice([0.2, 5.0], cin),
            "conv1_weight": rng.standard_normal((c, cin, 3, 3)) / np.sqrt(9 * cin),
            "conv1_bias": 0.1 * rng.standard_normal(c),
            "conv2_weight": rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c),
            "conv2_bias": 0.1 * rng.standard_normal(c),
            "skip_weight": rng.standard_normal((c, cin)) / np.sqrt(cin),
            "skip_bias": 0.1 * rng.standard_normal(c),
        })
        blocks[-1] = {k: v.astype(np.float32) for k, v in blocks[-1].items()}
    return mlp, blocks


def reference(features, mlp, blocks, input_size) -> np.ndarray:
    as64 = lambda a: torch.from_numpy(a).double()  # noqa: E731
    return ops.low_res_stage_reference(as64(features), [(as64(w), as64(b)) for w, b in mlp],
                                       [{k: as64(v) for k, v in b.items()} for b in blocks], input_size).numpy()


def run_poisoned(stage: ops.LowResStage, features: np.ndarray, **options) -> np.ndarray:
    out = np.full((len(features), *stage.output_shape), np.nan, np.float32)
    stage._stage.run(features, out, **options)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(1 << 30, ()).item()))


@pytest.mark.parametrize("sweep_min_size", [0, 1])  # whole-map passes; every block depth first (run_sweep)
@pytest.mark.parametrize("winograd_min_size", [0, 4])  # conv1 direct everywhere; Winograd on maps of 4k px
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("features, hidden, channels, input_size, batch", [
    (136, (32, 24), (16, 32, 16), 4, 2),  # multiples of 16
    (7, (5,), (5, 7, 3), 3, 3),  # odd channels and grids
    (9, (), (20, 12), 1, 1),  # one layer, one block from a 1x1 map
    (12, (33,), (3, 17, 18, 6), 2, 2),  # three blocks
    (10, (24,), (16, 24, 8), 16, 1),  # larger maps: 16 and 32 px
    (6, (), (9, 5), 18, 2),  # odd channels on an 18 px map
    (8, (), (5, 4, 3), 9, 1),  # odd maps with pairs of rows (9 px), then of rows and columns (18 px)
    (5, (), (6, 7), 17, 1),  # an odd map with pairs of rows
    (4, (), (20, 128), 17, 1),  # an odd map with pairs of rows and columns (128 channels and more)
    (4, (), (9, 130), 18, 1),  # the same on an even map (the last row and column directly)
])
def test_matches_reference(features, hidden, channels, input_size, batch, isa, winograd_min_size,
                           sweep_min_size, rng):
    mlp, blocks = make_stage(rng, features, hidden, channels, input_size)
    stage = ops.LowResStage(mlp, blocks, input_size, winograd_min_size=winograd_min_size, sweep_min_size=sweep_min_size)
    size = input_size * 2 ** len(blocks)
    assert stage.output_shape == (channels[-1], size, size)
    x = rng.standard_normal((batch, features)).astype(np.float32)
    ref = reference(x, mlp, blocks, input_size)
    rtol, atol = TOLERANCES["heads_fp32"]
    for threads in (1, 2, 3):
        out = run_poisoned(stage, x, num_threads=threads, isa=isa)
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol * max(1.0, float(np.abs(ref).max())))
    assert np.abs(ref).max() > 0.1  # not a comparison of near-zero outputs
    np.testing.assert_allclose(stage(x[:1]), ref[:1], rtol=rtol, atol=atol * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("sweep_min_size", [0, 8])
@pytest.mark.parametrize("winograd_min_size", [0, 4])
def test_paths_and_thread_counts_agree(winograd_min_size, sweep_min_size, rng):
    """The vector paths fuse multiply-adds, the portable one does not: they agree to rounding; one path gives
    the same bits on any thread count (each output is summed by one worker, in one order)."""
    mlp, blocks = make_stage(rng, 40, (48,), (32, 32, 16), 4)
    stage = ops.LowResStage(mlp, blocks, 4, winograd_min_size=winograd_min_size, sweep_min_size=sweep_min_size)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    one = stage(x, num_threads=1)
    np.testing.assert_array_equal(stage(x, num_threads=2), one)
    np.testing.assert_array_equal(stage(x, num_threads=4), one)
    scale = max(1.0, float(np.abs(one).max()))  # Winograd's rounding grows with the outputs (~3e-6 of them here)
    np.testing.assert_allclose(stage(x, num_threads=2, isa="portable"), one, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.skipif("avx512" not in native.capabilities().cpu_isas, reason="this CPU has no avx512 code path")
@pytest.mark.parametrize("heads_inputs", [False, True])
@pytest.mark.parametrize("features, channels, input_size, winograd_min_size, sweep_min_size", [
    (7, (5, 7, 3), 3, 0, 0),  # direct, odd channels and grids
    (12, (33, 17, 18, 6), 2, 4, 0),  # Winograd F(2x2) then F(4x4), whole-map passes
    (8, (5, 4, 3), 9, 4, 9),  # odd maps with pairs of rows and columns, swept
    (4, (20, 130), 17, 0, 17),  # pairs of rows and columns (128 channels and more), direct, swept
    (10, (16, 24, 8), 16, 16, 0),  # larger maps: 16 and 32 px
    (8, (256, 256, 8), 2, 0, 2),  # weights past 256 KB: output blocks outer, two a step
])
def test_avx512_gives_the_avx2_bits(features, channels, input_size, winograd_min_size, sweep_min_size, heads_inputs,
                                    rng):
    """The AVX-512 path (16 channels a register; a step runs two of the AVX2 path's items: 12 pixels of one
    output block, or 6 pixels of two) sums every output in the AVX2 path's order: the same bits, on any number
    of workers (whose chunks of items split those pairs anywhere)."""
    mlp, blocks = make_stage(rng, features, (), channels, input_size)
    if heads_inputs:
        del blocks[-1]["conv2_weight"], blocks[-1]["conv2_bias"]
    stage = ops.LowResStage(mlp, blocks, input_size, winograd_min_size=winograd_min_size, heads_inputs=heads_inputs,
                            sweep_min_size=sweep_min_size)
    x = rng.standard_normal((3, features)).astype(np.float32)
    want = stage(x, num_threads=1, isa="avx2")
    for threads in (1, 2, 3):
        got = stage(x, num_threads=threads, isa="avx512")
        for a, b in (zip(got, want) if heads_inputs else [(got, want)]):
            assert np.abs(b).max() > 0.1
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("input_size, channels", [(8, (256, 256, 128)), (16, (256, 128, 64))])
def test_winograd_matches_direct_on_released_widths(input_size, channels, rng):
    """conv1 as Winograd F(2x2, 3x3) (8 px) and F(4x4, 3x3) (16-32 px) against direct, at the widths and sizes
    they serve, with the tap groups' pairs of rows and columns: the transforms add rounding, not error beyond
    the kernel's tolerance."""
    mlp, blocks = make_stage(rng, 24, (), channels, input_size)
    x = rng.standard_normal((1, 24)).astype(np.float32)
    ref = reference(x, mlp, blocks, input_size)
    rtol, atol = TOLERANCES["heads_fp32"]
    for min_size in (0, input_size):
        out = ops.LowResStage(mlp, blocks, input_size, winograd_min_size=min_size)(x, num_threads=2)
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("sweep_min_size", [0, 4])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("winograd_min_size", [0, 4])
@pytest.mark.parametrize("channels", [9, 16])
def test_heads_inputs_match_reference(channels, winograd_min_size, isa, sweep_min_size, rng):
    """heads_inputs: the last block stops after conv1 and its skip (no conv2 given): h and skip, channels-last
    (9 channels: the stage's 16 less its padding; 16: written straight to the outputs, as at the released
    size)."""
    mlp, blocks = make_stage(rng, 12, (20,), (16, 24, channels), 4)
    del blocks[-1]["conv2_weight"], blocks[-1]["conv2_bias"]
    stage = ops.LowResStage(mlp, blocks, 4, winograd_min_size=winograd_min_size, heads_inputs=True,
                            sweep_min_size=sweep_min_size)
    assert stage.output_shape == (8, 8, channels)
    x = rng.standard_normal((2, 12)).astype(np.float32)
    as64 = lambda a: torch.from_numpy(a).double()  # noqa: E731
    want = ops.low_res_stage_reference(as64(x), [(as64(w), as64(b)) for w, b in mlp],
                                       [{k: as64(v) for k, v in b.items()} for b in blocks], 4, heads_inputs=True)
    rtol, atol = TOLERANCES["heads_fp32"]
    for threads in (1, 2):
        got = stage(x, num_threads=threads, isa=isa)
        for a, b in zip(got, want):
            b = b.permute(0, 2, 3, 1).numpy()
            assert a.shape == b.shape == (2, 8, 8, channels) and np.abs(b).max() > 0.1
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(np.abs(b).max())))
    out = np.zeros((2, 8, 8, channels), np.float32)
    with pytest.raises(ValueError, match="this stage \\(heads_inputs\\) writes a skip array"):
        stage._stage.run(x, out)
    with pytest.raises(ValueError, match=r"blocks\[1\].conv2_weight: missing"):  # needed without heads_inputs
        ops.LowResStage(mlp, blocks, 4)


@pytest.mark.parametrize("heads_inputs", [False, True])
@pytest.mark.parametrize("features, channels, input_size, winograd_min_size, sweep_min_size", [
    (12, (16, 24, 16, 8), 4, 4, 8),  # from the second block, Winograd F(2x2) then F(4x4), pairs of rows
    (6, (9, 130, 12), 9, 4, 9),  # odd maps, pairs of rows and columns, conv1 direct then F(2x2)
    (8, (128, 128, 16), 16, 16, 16),  # the first swept conv1 too heavy to re-read: over the whole map first
    (8, (256, 256, 8), 2, 0, 2),  # the same where it is direct
    (5, (7, 5, 6, 3), 3, 0, 6),  # direct everywhere, odd sides
])
def test_sweep_gives_the_same_bits_as_whole_map_passes(features, channels, input_size, winograd_min_size,
                                                       sweep_min_size, heads_inputs, rng):
    """The depth-first sweep (run_sweep) sums every output as the whole-map passes do: the same bits, on any
    number of workers (pairs taking strips from both ends, an odd one alone, meeting points and their seams
    anywhere)."""
    mlp, blocks = make_stage(rng, features, (), channels, input_size)
    if heads_inputs:
        del blocks[-1]["conv2_weight"], blocks[-1]["conv2_bias"]
    whole = ops.LowResStage(mlp, blocks, input_size, winograd_min_size=winograd_min_size, heads_inputs=heads_inputs)
    swept = ops.LowResStage(mlp, blocks, input_size, winograd_min_size=winograd_min_size, heads_inputs=heads_inputs,
                            sweep_min_size=sweep_min_size)
    x = rng.standard_normal((2, features)).astype(np.float32)
    for isa in native.capabilities().cpu_isas:
        want = whole(x, num_threads=2, isa=isa)
        for threads in (1, 2, 3, 4, 5):
            got = swept(x, num_threads=threads, isa=isa)
            for a, b in (zip(got, want) if heads_inputs else [(got, want)]):
                assert np.abs(b).max() > 0.1
                np.testing.assert_array_equal(a, b)


def test_batch_items_are_independent(rng):
    mlp, blocks = make_stage(rng, 10, (16,), (8, 8), 2)
    stage = ops.LowResStage(mlp, blocks, 2)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    together = stage(x, num_threads=2)
    for i in range(4):
        np.testing.assert_array_equal(stage(x[i:i + 1], num_threads=2)[0], together[i])


def test_nan_spreads_to_its_item_only(rng):
    mlp, blocks = make_stage(rng, 10, (16,), (8, 8), 2)
    stage = ops.LowResStage(mlp, blocks, 2)
    x = rng.standard_normal((2, 10)).astype(np.float32)
    x[1, 3] = np.nan
    out = stage(x, num_threads=2)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_bad_weights_and_inputs_name_the_problem(rng):
    mlp, blocks = make_stage(rng, 10, (16,), (8, 6), 2)
    with pytest.raises(ValueError, match=r"blocks\[0\].skip_weight: expected shape \(6, 8\)"):
        ops.LowResStage(mlp, [{**blocks[0], "skip_weight": blocks[0]["skip_weight"].T.copy()}], 2)
    with pytest.raises(ValueError, match=r"blocks\[0\].conv2_bias: missing"):
        ops.LowResStage(mlp, [{k: v for k, v in blocks[0].items() if k != "conv2_bias"}], 2)
    with pytest.raises(ValueError, match="the last MLP layer must have C0 \\* s0 \\* s0 outputs"):
        ops.LowResStage(mlp, blocks, 3)
    with pytest.raises(ValueError, match="MLP layer 1 does not fit"):
        ops.LowResStage([mlp[0], (mlp[1][0][:, :5].copy(), mlp[1][1])], blocks, 2)
    with pytest.raises(ValueError, match="block 1 does not fit"):
        ops.LowResStage(mlp, [blocks[0], blocks[0]], 2)
    stage = ops.LowResStage(mlp, blocks, 2)
    with pytest.raises(ValueError, match=r"features: expected shape \(1, 10\), got \(1, 11\)"):
        stage(np.zeros((1, 11), np.float32))
    with pytest.raises(ValueError, match="features: expected \\(B, F\\)"):
        stage(np.zeros(10, np.float32))
    out = np.zeros((1, 6, 8, 8), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: the output array is read-only"):
        stage._stage.run(np.zeros((1, 10), np.float32), out)
    with pytest.raises(ValueError, match="out: expected float32, got float16"):
        stage._stage.run(np.zeros((1, 10), np.float32), np.zeros((1, 6, 8, 8), np.float16))
