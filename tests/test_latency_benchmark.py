"""benchmarks/latency.py: the official-style eager baseline computes what the model computes, and the
script runs end to end for both models (tiny random models, ``--quick``). Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _builders import random_photo, tiny_bilayer
from _tolerances import TOLERANCES
from pybilayer import Renderer

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _latency_module():
    spec = importlib.util.spec_from_file_location("pybilayer_latency_benchmark", REPO / "benchmarks" / "latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_benchmark_runs_for_fsth(tmp_path, capsys):
    latency = _latency_module()
    out = tmp_path / "latency.json"
    assert latency.main(["--model", "fsth", "--quick", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    results = payload["models"]["fsth"]["results"]
    assert {r["backend"] for r in results} == {"torch", "onnxruntime"}
    assert set(payload["models"]["fsth"]["skipped"]) == {"cuda", "tensorrt", "mnn"} or torch.cuda.is_available()
    for r in results:
        assert r["model"] == "fsth" and r["batch1"]["p50_ms"] > 0 and r["compositor_share"] is None
        assert f"fsth     {r['backend']}" in printed
    assert "bilayer" not in payload["models"]




def test_latency_benchmark_compares_both_models(tmp_path, capsys):
    latency = _latency_module()
    out = tmp_path / "both.json"
    argv = ["--model", "both", "--quick", "--threads", "1", "--backends", "torch,onnxruntime", "--json", str(out)]
    assert latency.main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["comparison"]
    assert sorted((r["model"], r["backend"]) for r in rows) == [
        ("bilayer", "onnxruntime"), ("bilayer", "torch"), ("fsth", "onnxruntime"), ("fsth", "torch")]
    for r in rows:
        assert r["ms_p50"] > 0 and r["gflop_per_frame"] > 0 and r["vs_bilayer"] > 0 and r["image_size"] == 64
    fsth_gflop = {r["gflop_per_frame"] for r in rows if r["model"] == "fsth"}
    bilayer_gflop = {r["gflop_per_frame"] for r in rows if r["model"] == "bilayer"}
    assert min(fsth_gflop) > max(bilayer_gflop)  # the few-shot generator is the heavier network
    assert "per-frame cost, bi-layer vs few-shot talking-head" in printed


def test_official_op_order_computes_what_the_model_computes():
    latency = _latency_module()
    model = tiny_bilayer(31, 64)
    avatar = Renderer(model, backend="torch", device="cpu").create_avatar(*random_photo(3, 90))
    params = avatar.params
    pose = torch.randn(2, model.inference_generator.gen_inf.blocks[0].norm1.num_features, 4, 4,
                       generator=torch.Generator().manual_seed(4))
    params = params.repeat_frames(2)
    with torch.no_grad():
        official = latency.official_gen_inf(model.inference_generator.gen_inf, params, pose)
        own = model.inference_generator.generate(pose, params)
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    for a, b in zip(official, own):
        assert a.abs().max() > 1e-3  # not a degenerate output
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_latency_benchmark_runs_for_bilayer(tmp_path, capsys):
    latency = _latency_module()
    out = tmp_path / "latency.json"
    assert latency.main(["--quick", "--threads", "1", "--backends", "torch,onnxruntime", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())["models"]["bilayer"]
    eager = payload["eager_reference"]
    assert eager["p50_ms"] > 0 and eager["pybilayer_modules"]["p50_ms"] > 0
    assert {r["backend"] for r in payload["results"]} == {"torch", "onnxruntime"}
    for r in payload["results"]:
        assert r["eager_interleaved"]["p50_ms"] > 0
        assert np.isclose(r["speedup_vs_eager"], r["eager_interleaved"]["p50_ms"] / r["batch1"]["p50_ms"])
        assert f"bilayer  {r['backend']}" in printed
    assert "official op order" in printed
