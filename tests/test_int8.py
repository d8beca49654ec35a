"""Opt-in int8 onnxruntime path: close to the fp32 path on realistic poses, really quantised, bad options named."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from _tolerances import TOLERANCES
from pybilayer import Renderer
from pybilayer.backends.frame_graph import FrameWeights, build_folded_graph
from pybilayer.backends.int8 import calibration_keypoints, quantize_folded_graph
from _builders import random_drivers, random_photo, tiny_bilayer

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def renderers():
    model = tiny_bilayer(11, 64)
    fp32 = Renderer(model, backend="onnxruntime", device="cpu", threads=1)
    int8 = Renderer(model, backend="onnxruntime", device="cpu", threads=1,
                    backend_options={"onnxruntime": {"precision": "int8"}})
    return fp32, int8


def test_int8_is_close_to_fp32_on_held_out_poses(renderers, caplog, capfd):
    fp32, int8 = renderers
    avatar = fp32.create_avatar(*random_photo(4, 200))
    with caplog.at_level("WARNING"):
        int8._prepare(avatar)  # calibration and quantisation
    hints = [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert not hints and "pre-processing" not in capfd.readouterr().err
    drivers = random_drivers(12, seed=17)  # not the calibration poses (their own seed, their own image size)
    ref_image, ref_lf, _, ref_mask = fp32.render(avatar, drivers, output="layers")
    image, lf, _, mask = int8.render(avatar, drivers, output="layers")
    assert np.isfinite(image).all() and np.isfinite(lf).all()
    assert np.abs(lf - ref_lf).max() > 0, "int8 path gave fp32's exact outputs: not quantised"
    _, atol = TOLERANCES["int8_cpu_layers"]
    np.testing.assert_allclose(lf, ref_lf, rtol=0, atol=atol)
    np.testing.assert_allclose(mask, ref_mask, rtol=0, atol=atol)
    _, rms_bound = TOLERANCES["int8_cpu_image_rms"]
    assert np.sqrt(np.mean((image.astype(np.float64) - ref_image) ** 2)) <= rms_bound
    frames = int8.render(avatar, drivers)
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8


def test_quantisation_leaves_the_root_logger_as_it_was(monkeypatch):
    """An application without logging configuration keeps none: onnxruntime.quantization's module-level
    logging.warning would otherwise install a stderr handler on the root logger for good."""
    model = tiny_bilayer(11, 64)
    with torch.no_grad():
        params = model.inference_generator.project([torch.randn(1, c, 8, 8) for c in model.config.embedding_channels()])
    graph = build_folded_graph(FrameWeights.from_model(model), {k: v.numpy() for k, v in params.flatten().items()})
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    quantize_folded_graph(graph, "keypoints", calibration_keypoints(64, n=2))
    assert root.handlers == [] and root.filters == []


def test_calibration_poses_are_normalised_and_reproducible():
    a, b = calibration_keypoints(64, n=8), calibration_keypoints(64, n=8)
    assert a.shape == (8, 68, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= 1.0 and a.std() > 0.1


@pytest.mark.parametrize("options, match", [
    ({"precision": "int4"}, "precision must be"),
    ({"precision": "int8", "graph": "generic"}, "needs graph='folded'"),
])
def test_bad_int8_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        Renderer(tiny_bilayer(11, 64), backend="onnxruntime", device="cpu", backend_options={"onnxruntime": options})
