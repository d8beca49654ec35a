"""The ``mnn`` backend (by default the native stage for every block; with fewer native blocks, the folded
per-frame graph in Alibaba MNN): what is particular to it. Its agreement with the torch reference, batches
and several avatars per call are checked with the other CPU backends in test_renderer.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("MNN")

from _builders import random_drivers, random_photo, tiny_bilayer  # noqa: E402
from _tolerances import TOLERANCES  # noqa: E402
from pybilayer import Renderer  # noqa: E402
from pybilayer.backends import create_backend, unavailable_reason  # noqa: E402
from pybilayer.backends import fsth as fsth_backends  # noqa: E402
from pybilayer.backends import mnn as mnn_backend  # noqa: E402
from pybilayer.backends.frame_graph import FoldedFrame  # noqa: E402
from pybilayer.errors import BackendUnavailableError, EngineError  # noqa: E402

SIZE = 64
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return tiny_bilayer(21, SIZE)


@pytest.fixture(scope="module")
def renderer(model):
    return Renderer(model, backend="mnn", threads=1)


@pytest.fixture(scope="module")
def graph_renderer(model):
    """MNN runs the blocks after the 4 and 8 px ones (the default runs no MNN graph per frame)."""
    return Renderer(model, backend="mnn", threads=1, backend_options={"mnn": {"native_blocks": 2}})


def _photo(seed: int):
    return random_photo(seed, 200)


def test_selected_by_name_on_the_cpu(renderer):
    assert renderer.backend == "mnn" and renderer.device == "cpu"
    assert "mnn" in renderer.backend_reason and "explicitly" in renderer.backend_reason
    assert "1 threads" in renderer.backend_reason  # Renderer(threads=...) reaches MNN


def test_prepare_runs_the_first_forward(graph_renderer, avatar2, monkeypatch):
    """MNN's first forward plans the graph: it belongs to avatar preparation, not to the first frame."""
    calls = []
    run = mnn_backend.run_module
    monkeypatch.setattr(mnn_backend, "run_module",
                        lambda module, inputs, copy=True: calls.append(inputs) or run(module, inputs, copy))
    backend = graph_renderer._backend
    prepared = backend.prepare(avatar2)
    assert backend.native_blocks == 2  # the native stage runs the MLP and the 4 and 8 px blocks; the graph the rest
    assert len(calls) == 1 and calls[0][0].shape == (1, 32, 16, 16)
    keypoints = graph_renderer.normalize_landmarks(random_drivers(1, seed=9))
    assert backend.run([(prepared, keypoints)])[0].lf.shape == (1, 3, SIZE, SIZE)


def test_default_runs_no_graph_per_frame(renderer, avatar2, monkeypatch):
    """By default the native stage runs every block: no MNN module is made for the avatar or run per frame."""
    monkeypatch.setattr(mnn_backend, "load_module", lambda *a, **k: pytest.fail("no MNN graph expected"))
    monkeypatch.setattr(mnn_backend, "run_module", lambda *a, **k: pytest.fail("no MNN forward expected"))
    backend = renderer._backend
    blocks = renderer.model.inference_generator.num_blocks
    assert backend.native_blocks == blocks and f"native MLP and {blocks} blocks" in renderer.backend_reason
    prepared = backend.prepare(avatar2)
    keypoints = renderer.normalize_landmarks(random_drivers(2, seed=9))
    assert backend.run([(prepared, keypoints)])[0].lf.shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize("which", ["renderer", "graph_renderer"])
def test_outputs_are_owned_float32_copies(which, avatar, request):
    """run() results survive the next forward (MNN reuses its buffers) and are contiguous float32."""
    renderer = request.getfixturevalue(which)
    backend, prepared = renderer._backend, renderer._prepare(avatar)
    keypoints = renderer.normalize_landmarks(random_drivers(3, seed=8)).astype(np.float32)
    first = backend.run([(prepared, keypoints)])[0]
    kept = [a.copy() for a in (first.delta_uv, first.lf, first.mask_logits)]
    second = backend.run([(prepared, keypoints[::-1].copy())])[0]  # same batch size: same buffers
    for array, copy, channels in zip((first.delta_uv, first.lf, first.mask_logits), kept, (2, 3, 1)):
        assert array.dtype == np.float32 and array.flags.c_contiguous and array.shape == (3, channels, SIZE, SIZE)
        np.testing.assert_array_equal(array, copy)
    rtol, atol = TOLERANCES["fp32_exact_algebra"]  # a frame's result hardly depends on its place in the batch
    np.testing.assert_allclose(second.lf[2], first.lf[0], rtol=rtol, atol=atol)
    # the second call computed other frames (the tiny random model is weakly pose-dependent: ~1e-4)
    assert np.abs(second.delta_uv[0] - first.delta_uv[0]).max() > 1e-5


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads_are_rejected(model, threads):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        Renderer(model, backend="mnn", threads=threads)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        Renderer(model, backend="mnn", backend_options={"mnn": {"threads": threads}})


def test_cpu_only_and_not_for_the_few_shot_model():
    assert unavailable_reason("mnn", "cuda") == "mnn runs on the CPU, not 'cuda'"
    with pytest.raises(BackendUnavailableError, match="mnn runs on the CPU"):
        create_backend("mnn", None, "cuda")
    with pytest.raises(BackendUnavailableError, match="does not serve the few-shot"):
        fsth_backends.create_backend("mnn", None, "cpu")


def test_missing_mnn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "MNN", None)  # makes `import MNN` raise ImportError
    mnn_backend._import_mnn.cache_clear()  # a failed import is not cached: later tests import again
    reason = mnn_backend.mnn_unavailable_reason()
    assert reason.startswith("mnn is not installed") and "pip install mnn==3.6.1" in reason
    with pytest.raises(BackendUnavailableError, match="mnn is not installed"):
        create_backend("mnn", None, "cpu")


def test_prepare_prints_nothing(model, renderer, capfd):
    capfd.readouterr()
    # runtime manager creation prints without silencing; the graph is converted with fewer native blocks
    fresh = Renderer(model, backend="mnn", threads=1, backend_options={"mnn": {"native_blocks": 2}})
    avatar = fresh.create_avatar(*_photo(3))  # prepare: fold, convert, load
    fresh.render(avatar, random_drivers(2, seed=9))
    out, err = capfd.readouterr()
    assert out == "", out
    assert "MNN" not in err and "Convert" not in err, err


def test_silenced_output_always_restores_stdout(capfd):
    with pytest.raises(RuntimeError, match="inside"):
        with mnn_backend.silenced_output():
            os.write(1, b"hidden\n")
            raise RuntimeError("inside")

    def many():
        for _ in range(50):
            with mnn_backend.silenced_output():
                os.write(2, b"hidden\n")

    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.write(1, b"shown\n")
    os.write(2, b"shown too\n")
    out, err = capfd.readouterr()
    assert out == "shown\n" and err == "shown too\n", (out, err)


def test_import_prints_nothing():
    """MNN prints the CPU's features when imported; the backend's probe must keep stdout clean."""
    code = "from pybilayer.backends.mnn import mnn_unavailable_reason as r; assert r() is None, r()"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "device supports" not in done.stderr, (done.stdout, done.stderr)


def test_failed_conversion_is_an_engine_error_and_leaves_no_files(renderer, avatar2, monkeypatch, tmp_path):
    class NotOnnx:
        def SerializeToString(self) -> bytes:
            return b"not an onnx model"

    monkeypatch.setattr(mnn_backend, "build_folded_frame",
                        lambda weights, params, native_heads, **options: FoldedFrame(None, [NotOnnx()], None))
    monkeypatch.setattr(mnn_backend.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(EngineError, match="MNN failed to convert"):
        renderer._backend.prepare(avatar2)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the cache of converted models


def _small_graph(seed: int):
    """A one-convolution ONNX graph ``x`` (1, 3, 8, 8) -> ``y`` with random weights, and its numpy twin."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, lambda x: np.einsum("oi,nihw->nohw", weight[:, :, 0, 0], x)


def _load_small(seed: int, directory: Path, runtime, fingerprint: str | None = None):
    graph, reference = _small_graph(seed)
    module = mnn_backend.load_cached_module(lambda: graph, fingerprint or f"small {seed}", ["x"], ["y"], runtime,
                                            directory)
    x = np.random.default_rng(seed + 100).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(mnn_backend.run_module(module, [x])[0], reference(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def runtime():
    return mnn_backend.create_runtime(1)


def _forbid_conversion(monkeypatch):
    def convert(graph, directory):
        raise AssertionError("converted again instead of loading the cached model")

    monkeypatch.setattr(mnn_backend, "convert_to_mnn", convert)


def test_cache_converts_once_then_loads(runtime, tmp_path, monkeypatch):
    _load_small(1, tmp_path, runtime)
    files = list(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".mnn"] and files[0].stat().st_size > 0
    _forbid_conversion(monkeypatch)
    _load_small(1, tmp_path, runtime)  # the same graph, loaded from the file
    assert list(tmp_path.iterdir()) == files


def test_cache_keys_follow_the_source_and_the_mnn_version(runtime, tmp_path, monkeypatch):
    _load_small(1, tmp_path, runtime)
    _load_small(2, tmp_path, runtime)  # other weights: another key, its own (correct) model
    monkeypatch.setattr(mnn_backend, "_mnn_version", lambda: "0.0.0-other")
    _load_small(1, tmp_path, runtime)  # converted again for the other MNN version
    assert len(list(tmp_path.glob("*.mnn"))) == 3
    assert mnn_backend.cache_key("a") != mnn_backend.cache_key("b")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_cached_model_is_converted_again(runtime, tmp_path, monkeypatch, damage):
    _load_small(3, tmp_path, runtime)
    (path,) = tmp_path.iterdir()
    good = path.read_bytes()
    path.write_bytes({"truncated": good[: len(good) // 2], "garbage": b"not a model" * 10, "empty": b""}[damage])
    _load_small(3, tmp_path, runtime)  # still the right outputs
    assert list(tmp_path.iterdir()) == [path] and path.stat().st_size == len(good)
    _forbid_conversion(monkeypatch)
    _load_small(3, tmp_path, runtime)  # the replaced file is whole: it loads


def test_an_unwritable_cache_still_serves(runtime, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    _load_small(4, blocker / "mnn", runtime)
    assert blocker.read_text() == "a file where the cache folder would be"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(mnn_backend.CACHE_DIR_ENV, str(tmp_path / "c"))
    assert mnn_backend.cache_dir() == tmp_path / "c" / "mnn"
    monkeypatch.delenv(mnn_backend.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mnn_backend.cache_dir() == tmp_path / "xdg" / "pybilayer" / "mnn"


def test_the_identity_embedder_conversion_is_cached(model, private_cache_dir, monkeypatch):
    import torch

    from pybilayer.backends.avatar_fast import FastAvatarCreator

    Renderer(model, backend="mnn", threads=1).create_avatar(*_photo(5))
    cached = list((private_cache_dir / "mnn").glob("*.mnn"))
    assert cached, "the embedder's MNN model was not cached"
    _forbid_conversion(monkeypatch)  # a second creator of the same model loads it
    creator = FastAvatarCreator(model, threads=1, embedder_runtime="mnn")
    inputs = np.random.default_rng(6).standard_normal((1, 6, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        got = creator.embed(torch.from_numpy(inputs))
        want = model.identity_embedder(torch.from_numpy(inputs))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
