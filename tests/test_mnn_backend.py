"""The ``mnn`` backend (the folded per-frame graph in Alibaba MNN) against the torch reference."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("MNN")

from _builders import random_photo, tiny_bilayer  # noqa: E402
from _tolerances import TOLERANCES, UINT8_MAX_LSB  # noqa: E402
from pybilayer import Renderer  # noqa: E402
from pybilayer.backends import create_backend, unavailable_reason  # noqa: E402
from pybilayer.backends import fsth as fsth_backends  # noqa: E402
from pybilayer.backends import mnn as mnn_backend  # noqa: E402
from pybilayer.errors import BackendUnavailableError, EngineError  # noqa: E402
from pybilayer.synthetic import random_landmarks  # noqa: E402

SIZE = 64
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return tiny_bilayer(21, SIZE)


@pytest.fixture(scope="module")
def reference(model):
    return Renderer(model, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def renderer(model):
    return Renderer(model, backend="mnn", threads=1)


def _photo(seed: int):
    return random_photo(seed, 200)


@pytest.fixture(scope="module")
def avatar(reference):
    return reference.create_avatar(*_photo(1))


@pytest.fixture(scope="module")
def avatar2(reference):
    return reference.create_avatar(*_photo(2))


def _drivers(n: int, seed: int) -> np.ndarray:
    return random_landmarks(n, 300, seed=seed)


def test_selected_by_name_on_the_cpu(renderer):
    assert renderer.backend == "mnn" and renderer.device == "cpu"
    assert "mnn" in renderer.backend_reason and "explicitly" in renderer.backend_reason
    assert "1 threads" in renderer.backend_reason  # Renderer(threads=...) reaches MNN


def test_matches_the_torch_reference(reference, renderer, avatar):
    drivers = _drivers(4, seed=5)
    ref = reference.render(avatar, drivers, output="layers")
    got = renderer.render(avatar, drivers, output="layers")
    _, atol = TOLERANCES["fast_cpu_render"]
    for name in ("image", "lf", "hf", "mask"):
        diff = np.abs(getattr(got, name) - getattr(ref, name)).max()
        assert diff <= atol, (name, diff)
    frames_ref, frames = reference.render(avatar, drivers), renderer.render(avatar, drivers)
    assert frames.dtype == np.uint8 and frames.shape == (4, SIZE, SIZE, 3)
    assert np.abs(frames.astype(int) - frames_ref).max() <= UINT8_MAX_LSB


def test_batch_of_n_equals_n_singles(renderer, avatar):
    drivers = _drivers(5, seed=6)
    together = renderer.render(avatar, drivers, output="layers").image
    singles = np.stack([renderer.render(avatar, d, output="layers").image for d in drivers])
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    np.testing.assert_allclose(together, singles, rtol=rtol, atol=atol)


def test_two_avatars_in_one_call(renderer, avatar, avatar2):
    drivers = _drivers(4, seed=7)
    order = [avatar, avatar2, avatar2, avatar]
    mixed = renderer.render(order, drivers, output="layers").image
    separate = np.stack([renderer.render(a, d, output="layers").image for a, d in zip(order, drivers)])
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    np.testing.assert_allclose(mixed, separate, rtol=rtol, atol=atol)
    assert np.abs(mixed[0] - mixed[1]).max() > 1e-3  # the two avatars really differ


def test_outputs_are_owned_float32_copies(renderer, avatar):
    """run() results survive the next forward (MNN reuses its buffers) and are contiguous float32."""
    backend, prepared = renderer._backend, renderer._prepare(avatar)
    keypoints = renderer.normalize_landmarks(_drivers(3, seed=8)).astype(np.float32)
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
    fresh = Renderer(model, backend="mnn", threads=1)  # runtime manager creation prints without silencing
    avatar = fresh.create_avatar(*_photo(3))  # prepare: fold, convert, load
    fresh.render(avatar, _drivers(2, seed=9))
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

    monkeypatch.setattr(mnn_backend, "build_folded_graph", lambda weights, params: NotOnnx())
    monkeypatch.setattr(mnn_backend.tempfile, "tempdir", str(tmp_path))
    with pytest.raises(EngineError, match="MNN failed to convert"):
        renderer._backend.prepare(avatar2)
    assert list(tmp_path.iterdir()) == []
