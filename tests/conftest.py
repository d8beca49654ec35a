"""Marks that turn into skips (with the reason) where the hardware or library is absent."""

from __future__ import annotations

import importlib.util

import pytest


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        from pybilayer import native
    except ImportError as exc:  # pragma: no cover - the package itself is broken
        return f"pybilayer.native failed to import: {exc}"
    caps = native.capabilities()
    if not caps.cuda:
        return f"pybilayer._C has no usable CUDA: {caps.cuda_reason}"
    return None


def _tensorrt_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (see README: TensorRT)"
    return _cuda_reason()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: needs an NVIDIA GPU and the CUDA twin of pybilayer._C")
    config.addinivalue_line("markers", "needs_tensorrt: needs TensorRT 10 or 11 and a GPU")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on the 2-core CI machine")


def pytest_collection_modifyitems(config, items):
    reasons = {}
    for item in items:
        for mark, probe in (("needs_cuda", _cuda_reason), ("needs_tensorrt", _tensorrt_reason)):
            if mark in item.keywords:
                if mark not in reasons:
                    reasons[mark] = probe()
                if reasons[mark]:
                    item.add_marker(pytest.mark.skip(reason=reasons[mark]))


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Caches (converted MNN models) go to a folder of this test session, never to the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cache")
        patch.setenv("PYBILAYER_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def photo_size() -> int:
    """Height of the random photos behind the shared avatar fixtures (a test module may override it)."""
    return 200


@pytest.fixture(scope="module")
def reference(model):
    """The torch reference Renderer of the test module's ``model``."""
    from pybilayer import Renderer

    return Renderer(model, backend="torch", device="cpu")


@pytest.fixture(scope="module")
def avatar(reference, photo_size):
    from _builders import random_photo

    return reference.create_avatar(*random_photo(1, photo_size))


@pytest.fixture(scope="module")
def avatar2(reference, photo_size):
    from _builders import random_photo

    return reference.create_avatar(*random_photo(2, photo_size))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a test module (module-scoped, so the module's own fixtures run under it
    too, and runs compared bit for bit use the same thread count): on the 2-core CI machine, two spinning OpenMP threads per
    process (and per DataLoader worker or DDP rank) cost several times the CPU time of one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Fresh but reproducible randomness per test; tests draw their own inputs from it."""
    try:
        import torch
    except ImportError:
        yield
        return
    torch.manual_seed(1234)
    yield
