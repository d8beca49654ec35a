"""ONNX export of the per-frame network and the folded CPU graph, against the torch modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tolerances import TOLERANCES

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from pybilayer.backends.frame_graph import (  # noqa: E402
    MAX_FOLDED_SHIFT,
    OUTPUT_NAMES,
    PHASES_OUTPUT,
    SKIP_OUTPUT,
    UPSAMPLE_INPUT,
    FrameWeights,
    build_folded_graph,
    folded_heads,
    upsample_conv_taps,
)
from pybilayer import native  # noqa: E402
from pybilayer.backends.onnxruntime import create_session  # noqa: E402
from pybilayer.export import build_onnx, export_onnx, fp16_quality, psnr  # noqa: E402
from pybilayer.models import Bilayer, BilayerConfig, InferenceParams  # noqa: E402
from pybilayer.synthetic import random_landmarks  # noqa: E402


def _model(config: BilayerConfig, spread: float) -> Bilayer:
    model = Bilayer(config)
    # Non-trivial BatchNorm statistics, so that folding them is actually exercised; ``spread`` keeps the
    # 6-block released-size generator in the output range a trained one has (logits of order 1, not 100).
    for m in model.inference_generator.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-spread, spread)
            m.running_var.uniform_(1 - spread, 1 + spread)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.3)
    return model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(7)
    return _model(BilayerConfig.tiny(64, texture_enhancer=False, discriminator=False), spread=0.5)


@pytest.fixture(scope="module")
def full():
    """Released-size model with BatchNorm statistics measured on realistic poses (standing statistics),
    so activations have a trained model's scale and the 1e-4 bound is judged at realistic magnitudes."""
    from pybilayer.export import standing_statistics

    torch.manual_seed(8)
    model = Bilayer(BilayerConfig(texture_enhancer=False, discriminator=False))
    standing_statistics(model, _keypoints(model, 8, seed=11), _params(model, 8))
    return model


def _params(model: Bilayer, n: int) -> InferenceParams:
    """Per-identity parameters of n random identities, from the model's own projector."""
    embeds = [torch.randn(n, c, 8, 8) for c in model.config.embedding_channels()]
    with torch.no_grad():
        return model.inference_generator.project(embeds)


def _reference(model: Bilayer, keypoints: np.ndarray, params: InferenceParams):
    with torch.no_grad():
        pose = model.keypoints_embedder(torch.from_numpy(keypoints))
        return [t.numpy() for t in model.inference_generator.generate(pose, params)]


def _keypoints(model: Bilayer, n: int, seed: int) -> np.ndarray:
    from pybilayer.geometry import crop_box, normalize_keypoints

    return np.stack([normalize_keypoints(p, crop_box(p)) for p in random_landmarks(n, 256, seed=seed)])


def _feeds(keypoints, params: InferenceParams) -> dict:
    return {"keypoints": keypoints, **{k: v.numpy() for k, v in params.flatten().items()}}


def _max_abs(a, b) -> list[float]:
    return [float(np.abs(x - y).max()) for x, y in zip(a, b)]


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_generic_fp32_graph_passes_checker_and_matches_torch(which, request, tmp_path):
    model = request.getfixturevalue(which)
    path = export_onnx(model, tmp_path / "frame.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input][0] == "keypoints"
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    session = create_session(proto, threads=1)
    n = 3  # three frames of three different identities in one batch
    keypoints, params = _keypoints(model, n, seed=1), _params(model, n)
    ref = _reference(model, keypoints, params)
    out = session.run(OUTPUT_NAMES, _feeds(keypoints, params))
    _, atol = TOLERANCES["onnx_fp32"]
    assert max(_max_abs(out, ref)) <= atol, _max_abs(out, ref)
    assert all(np.abs(r).max() > 1e-3 for r in ref)  # the comparison is not between near-zero outputs


def test_generic_graph_has_dynamic_batch(tiny):
    session = create_session(build_onnx(tiny), threads=1)
    keypoints, params = _keypoints(tiny, 4, seed=2), _params(tiny, 4)
    together = session.run(OUTPUT_NAMES, _feeds(keypoints, params))
    for i in range(4):
        single = session.run(OUTPUT_NAMES, _feeds(keypoints[i:i + 1], params.select(i)))
        rtol, atol = TOLERANCES["fp32_exact_algebra"]
        for a, b in zip(single, together):
            np.testing.assert_allclose(a[0], b[i], rtol=rtol, atol=atol)


def test_upsample_conv_taps_equal_upsample_then_conv():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 7, 9)  # odd, non-square
    w = torch.randn(4, 5, 3, 3)
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
    taps = upsample_conv_taps(w.double().numpy())
    assert sum(k.shape[2] * k.shape[3] for k, _ in taps) == 9
    h, wd = x.shape[2], x.shape[3]
    grid = torch.full((2, 4, 2 * h + 2, 2 * wd + 2), float("nan"), dtype=torch.float64)
    for (k, (top, left, bottom, right)), (py, px) in zip(taps, [(0, 0), (0, 1), (1, 0), (1, 1)]):
        group = F.conv2d(F.pad(x.double(), (left, right, top, bottom)), torch.from_numpy(k))
        assert group.shape[2:] == (h + 1, wd + 1)
        grid[:, :, py::2, px::2] = group
    out = grid[:, :, 1:-1, 1:-1] + grid[:, :, 2:, 1:-1] + grid[:, :, 1:-1, 2:] + grid[:, :, 2:, 2:]
    torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-5)


def _with_edge_cases(params: InferenceParams) -> InferenceParams:
    """Negative scales (PReLU with slope 5), a zero scale and a tiny one (kept explicit) in every norm1."""
    flat = {k: v.clone() for k, v in params.flatten().items()}
    for name in flat:
        if name.endswith("norm1.scale") or name == "final_norm.scale":
            scale = flat[name]
            scale[:, 0::4] = -scale[:, 0::4].abs() - 0.1
            scale[:, 1] = 0.0
            scale[:, 2] = 1e-9
            flat[name.replace("scale", "bias")][:, 1:3] = 0.7
    return InferenceParams.unflatten(flat)


@pytest.mark.parametrize("which, subpixel", [("tiny", True), ("tiny", False), ("full", True)])
def test_folded_graph_matches_reference(which, subpixel, request):
    model = request.getfixturevalue(which)
    weights = FrameWeights.from_model(model)
    params = _with_edge_cases(_params(model, 1))
    flat = {k: v.numpy() for k, v in params.flatten().items()}
    proto = build_folded_graph(weights, flat, subpixel_blocks=None if subpixel else [])
    session = create_session(proto, threads=1)
    keypoints = _keypoints(model, 3, seed=4)
    ref = _reference(model, keypoints, params.repeat_frames(3))
    out = session.run(OUTPUT_NAMES, {"keypoints": keypoints})
    _, atol = TOLERANCES["onnx_fp32"]
    assert max(_max_abs(out, ref)) <= atol, _max_abs(out, ref)


@pytest.mark.skipif(not native.capabilities().native, reason=str(native.capabilities().native_reason))
@pytest.mark.parametrize("which", ["tiny", "full"])
def test_folded_graph_with_native_heads_matches_reference(which, request):
    """The graph up to the last block's up-sampling convolution, then the native heads kernel: the fast CPU
    split."""
    model = request.getfixturevalue(which)
    weights = FrameWeights.from_model(model)
    params = _with_edge_cases(_params(model, 1))  # the final norm too: explicit channels reach the kernel
    flat = {k: v.numpy() for k, v in params.flatten().items()}
    proto = build_folded_graph(weights, flat, native_heads=True)
    onnx.checker.check_model(proto)
    assert [o.name for o in proto.graph.output] == [UPSAMPLE_INPUT, SKIP_OUTPUT]
    keypoints = _keypoints(model, 3, seed=4)
    upsample_input, skip = create_session(proto, threads=1).run([UPSAMPLE_INPUT, SKIP_OUTPUT], {"keypoints": keypoints})
    out = folded_heads(weights, flat).finish(upsample_input, skip, num_threads=2)
    ref = _reference(model, keypoints, params.repeat_frames(3))
    _, atol = TOLERANCES["onnx_fp32"]
    assert max(_max_abs(out, ref)) <= atol, _max_abs(out, ref)
    assert folded_heads(weights, flat).scale.tolist().count(1.0) < weights.heads_weight.shape[1]  # explicit ones


@pytest.mark.skipif(not native.capabilities().native, reason=str(native.capabilities().native_reason))
@pytest.mark.parametrize("which", ["tiny", "full"])
def test_per_block_graphs_with_native_passes_match_reference(which, request):
    """One graph per block, joined by ops.depth_to_space_box and finished by ops.heads (onnxruntime's path)."""
    from pybilayer import ops
    from pybilayer.backends.frame_graph import STAGE_INPUT, build_folded_stages

    model = request.getfixturevalue(which)
    weights = FrameWeights.from_model(model)
    params = _with_edge_cases(_params(model, 1))  # norm1 edge cases now sit at graph boundaries
    flat = {k: v.numpy() for k, v in params.flatten().items()}
    stages = build_folded_stages(weights, flat)
    assert len(stages) == len(weights.blocks)
    keypoints = _keypoints(model, 3, seed=4)
    x, inputs = keypoints, []
    for stage in stages[:-1]:
        onnx.checker.check_model(stage)
        inputs.append(stage.graph.input[0].name)
        (phases,) = create_session(stage, threads=1).run([PHASES_OUTPUT], {inputs[-1]: x})
        x = ops.depth_to_space_box(phases, num_threads=2)
    onnx.checker.check_model(stages[-1])
    inputs.append(stages[-1].graph.input[0].name)
    upsample_input, skip = create_session(stages[-1], threads=1).run([UPSAMPLE_INPUT, SKIP_OUTPUT], {inputs[-1]: x})
    assert inputs == ["keypoints"] + [STAGE_INPUT] * (len(stages) - 1)
    out = folded_heads(weights, flat).finish(upsample_input, skip, num_threads=2)
    ref = _reference(model, keypoints, params.repeat_frames(3))
    _, atol = TOLERANCES["onnx_fp32"]
    assert max(_max_abs(out, ref)) <= atol, _max_abs(out, ref)


@pytest.fixture(scope="module")
def tiny_harmonic():
    torch.manual_seed(9)
    config = BilayerConfig.tiny(64, harmonic_encoding=True, texture_enhancer=False, discriminator=False)
    return _model(config, spread=0.5)


@pytest.mark.skipif(not native.capabilities().native, reason=str(native.capabilities().native_reason))
@pytest.mark.parametrize("which, per_block, every_block", [
    ("tiny", False, False), ("tiny", True, False), ("tiny", True, True), ("tiny_harmonic", False, False),
    ("full", False, False), ("full", True, False), ("full", False, True)])
def test_native_stage_then_graphs_match_reference(which, per_block, every_block, request):
    """The native stage (keypoint MLP and the 4 and 8 px blocks; or the backends' default, every block, conv1
    as Winograd from 8 px, and no graph) and the graphs from there on, with the norm1 edge cases inside the
    stage and at its boundary."""
    from pybilayer import ops
    from pybilayer.backends.frame_graph import STAGE_INPUT, build_folded_frame

    model = request.getfixturevalue(which)
    weights = FrameWeights.from_model(model)
    params = _with_edge_cases(_params(model, 1))
    flat = {k: v.numpy() for k, v in params.flatten().items()}
    assert weights.input_size == 4  # blocks 0 and 1 take inputs of 4 and 8 px, in both sizes
    native_blocks = len(weights.blocks) if every_block else 2
    frame = build_folded_frame(weights, flat, native_heads=True, per_block=per_block, native_blocks=native_blocks)
    assert len(frame.graphs) == (0 if every_block else len(weights.blocks) - native_blocks if per_block else 1)
    keypoints = _keypoints(model, 3, seed=4)
    x = frame.low_res.stage()(keypoints, num_threads=2)
    for graph in frame.graphs:
        onnx.checker.check_model(graph)
        assert [i.name for i in graph.graph.input] == [STAGE_INPUT]
    for graph in frame.graphs[:-1]:
        (phases,) = create_session(graph, threads=1).run([PHASES_OUTPUT], {STAGE_INPUT: x})
        x = ops.depth_to_space_box(phases, num_threads=2)
    if every_block:
        upsample_input, skip = x
    else:
        upsample_input, skip = create_session(frame.graphs[-1], threads=1).run([UPSAMPLE_INPUT, SKIP_OUTPUT],
                                                                              {STAGE_INPUT: x})
    out = frame.heads.finish(upsample_input, skip, num_threads=2, channels_last=every_block)
    ref = _reference(model, keypoints, params.repeat_frames(3))
    _, atol = TOLERANCES["onnx_fp32"]
    assert max(_max_abs(out, ref)) <= atol, _max_abs(out, ref)


def test_native_stage_output_is_the_stage_graphs_input(tiny):
    """folded_low_res_stage in plain PyTorch (ops.low_res_stage_reference, no native core needed) gives the
    input that the graph from block k expects: the output of the per-block graphs 0..k-1; with every block,
    the last graph's outputs for the native heads."""
    from pybilayer import ops
    from pybilayer.backends.frame_graph import STAGE_INPUT, build_folded_stages, folded_low_res_stage, mlp_features

    weights = FrameWeights.from_model(tiny)
    params = _with_edge_cases(_params(tiny, 1))
    flat = {k: v.numpy() for k, v in params.flatten().items()}
    keypoints = _keypoints(tiny, 2, seed=5)
    stages = build_folded_stages(weights, flat)
    for k in (1, 2, 3):
        low_res = folded_low_res_stage(weights, flat, k)
        as64 = lambda a: torch.from_numpy(a).double()  # noqa: E731
        got = ops.low_res_stage_reference(as64(mlp_features(weights.frequencies, keypoints)),
                                          [(as64(w), as64(b)) for w, b in low_res.mlp],
                                          [{name: as64(v) for name, v in b.items()} for b in low_res.blocks],
                                          low_res.input_size).numpy()
        x = keypoints
        for stage in stages[:k]:
            (phases,) = create_session(stage, threads=1).run([PHASES_OUTPUT], {stage.graph.input[0].name: x})
            x = ops.depth_to_space_box_reference(torch.from_numpy(phases)).numpy()
        assert got.shape == x.shape
        np.testing.assert_allclose(got, x, rtol=0, atol=2e-5 * max(1.0, float(np.abs(x).max())))
    n = len(weights.blocks)
    low_res = folded_low_res_stage(weights, flat, n)
    assert low_res.heads_inputs and "conv2_weight" not in low_res.blocks[-1]
    got = ops.low_res_stage_reference(as64(mlp_features(weights.frequencies, keypoints)),
                                      [(as64(w), as64(b)) for w, b in low_res.mlp],
                                      [{name: as64(v) for name, v in b.items()} for b in low_res.blocks],
                                      low_res.input_size, heads_inputs=True)
    x = keypoints
    for stage in stages[:-1]:
        (phases,) = create_session(stage, threads=1).run([PHASES_OUTPUT], {stage.graph.input[0].name: x})
        x = ops.depth_to_space_box_reference(torch.from_numpy(phases)).numpy()
    want = create_session(stages[-1], threads=1).run([UPSAMPLE_INPUT, SKIP_OUTPUT], {STAGE_INPUT: x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=0, atol=2e-5 * max(1.0, float(np.abs(b).max())))
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match="num_blocks must be in"):
            folded_low_res_stage(weights, flat, bad)


def test_per_block_graphs_need_native_heads(tiny):
    from pybilayer.backends.frame_graph import build_folded_frame

    weights = FrameWeights.from_model(tiny)
    flat = {k: v.numpy() for k, v in _params(tiny, 1).flatten().items()}
    with pytest.raises(ValueError, match="need native_heads"):
        build_folded_frame(weights, flat, native_heads=False, per_block=True)
    with pytest.raises(ValueError, match="need native_heads"):
        build_folded_frame(weights, flat, native_heads=False, native_blocks=1)


def test_folded_shift_threshold_is_relative_to_the_norm_scale():
    from pybilayer.backends.frame_graph import _InputNorm

    a = np.array([1.0, -2.0, 1e-12, 0.0, 1.0])
    c = np.array([0.5, 1.0, 1.0, 1.0, 2 * MAX_FOLDED_SHIFT])
    norm = _InputNorm.of(a, c, std=np.ones(5))
    assert norm.explicit.tolist() == [False, False, True, True, True]
    assert norm.slope.tolist() == [0.2, 5.0, 0.2, 0.2, 0.2]
    np.testing.assert_allclose(norm.gain, [1.0, -0.4, 1.0, 1.0, 1.0])


def test_fp16_graph_quality_on_realistic_poses(full):
    """fp16 graph vs fp32 graph in onnxruntime: PSNR >= 40 dB, no NaN/Inf (full config; the 1000-pose run
    is `python -m pybilayer.export --fp16-check 1000`).

    Realistic means: BatchNorm statistics measured on realistic poses (a trained model's standing
    statistics; the random init's unit statistics let activations drift through six blocks) and a smooth
    texture (a white-noise texture turns any sub-pixel offset into full-scale pixel errors)."""
    from pybilayer.avatar import Avatar

    model = full
    texture = F.interpolate(torch.rand(1, 3, 16, 16) * 2 - 1, size=(256, 256), mode="bicubic", align_corners=False)
    avatar = Avatar(texture=texture[0].clamp(-1, 1), params=_params(model, 1), model_fingerprint="test")
    stats = fp16_quality(model, avatar, _keypoints(model, 16, seed=6), batch=16, threads=1)
    assert stats["fp16_nonfinite"] == 0
    assert stats["psnr_min_db"] >= 40.0, stats


def test_fp16_graph_is_fp16_inside(tiny):
    proto = build_onnx(tiny, "fp16")
    onnx.checker.check_model(proto, full_check=True)
    float_kinds = {t.data_type for t in proto.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    assert float_kinds == {onnx.TensorProto.FLOAT16} or float_kinds == {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT}
    conv_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer if t.name in conv_weights)
    # inputs and outputs stay fp32 for the callers
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in list(proto.graph.input) + list(proto.graph.output))


def test_psnr_helper():
    a = np.zeros((2, 4))
    b = a.copy()
    b[1] += 0.02  # mse 4e-4 -> 10 log10(4 / 4e-4) = 40 dB
    values = psnr(a, b)
    assert np.isinf(values[0]) and values[1] == pytest.approx(40.0)


def test_export_is_atomic_and_validates(tiny, tmp_path):
    path = tmp_path / "frame.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match="precision"):
        export_onnx(tiny, path, precision="int4")
    assert path.read_bytes() == b"previous"
    export_onnx(tiny, path, precision="fp16")
    assert onnx.load(str(path)).graph.name == "bilayer_frame_generic"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_export_with_avatar_folds_it_in(tiny, tmp_path):
    from pybilayer.avatar import Avatar

    params = _params(tiny, 1)
    avatar = Avatar(texture=torch.zeros(3, 64, 64), params=params, model_fingerprint="x")
    path = export_onnx(tiny, tmp_path / "me.onnx", avatar=avatar)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["keypoints"]
    keypoints = _keypoints(tiny, 2, seed=9)
    out = create_session(proto, threads=1).run(OUTPUT_NAMES, {"keypoints": keypoints})
    ref = _reference(tiny, keypoints, params.repeat_frames(2))
    assert max(_max_abs(out, ref)) <= TOLERANCES["onnx_fp32"][1]
    with pytest.raises(ValueError, match="fp32 only"):
        export_onnx(tiny, tmp_path / "me16.onnx", precision="fp16", avatar=avatar)
