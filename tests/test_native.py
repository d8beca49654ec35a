"""The native core's report of itself, its CUDA objects without a GPU, and the CPU-only build switch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pybilayer import native
from pybilayer.errors import BackendUnavailableError

ROOT = Path(__file__).resolve().parents[1]
CAPS = native.capabilities()


def test_extension_is_built():
    # The project's own install (scripts/setup.sh, pip install .) builds pybilayer._C; the compositor
    # tests skip without it, so this one fails loudly instead of letting a broken build pass unnoticed.
    assert CAPS.native, CAPS.native_reason


def test_capabilities_report():
    assert CAPS is native.capabilities()  # probed once
    assert isinstance(CAPS.native, bool) and isinstance(CAPS.cuda, bool)
    if CAPS.native:
        assert CAPS.native_reason is None
    else:
        assert "pybilayer._C" in CAPS.native_reason
    if CAPS.cuda:
        assert CAPS.cuda_reason is None and CAPS.cuda_built
        assert CAPS.cuda_device_count >= 1 and CAPS.cuda_device_name
    else:
        assert isinstance(CAPS.cuda_reason, str) and CAPS.cuda_reason
        assert CAPS.cuda_device_count == 0


@pytest.mark.skipif(not CAPS.native, reason=str(CAPS.native_reason))
@pytest.mark.skipif(not CAPS.native, reason=str(CAPS.native_reason))
def test_cpu_code_paths_and_a_bad_one_named():
    """The CPU kernels' paths this CPU runs, narrowest first; one it lacks, or a made-up name, is a ValueError
    that names it (before any array is read)."""
    import numpy as np

    from pybilayer import ops

    assert CAPS.cpu_isas[0] == "portable" and CAPS.cpu_isas == ("portable", "avx2", "avx512")[:len(CAPS.cpu_isas)]
    phases = np.random.default_rng(0).standard_normal((1, 8, 5, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="isa='sse4': expected 'best', 'avx512', 'avx2' or 'portable'"):
        ops.depth_to_space_box(phases, isa="sse4")
    for missing in ("avx2", "avx512")[len(CAPS.cpu_isas) - 1:]:
        with pytest.raises(ValueError, match=f"isa='{missing}': this CPU's widest code path is '{CAPS.cpu_isas[-1]}'"):
            ops.depth_to_space_box(phases, isa=missing)
    for isa in (*CAPS.cpu_isas, "best"):
        np.testing.assert_array_equal(ops.depth_to_space_box(phases, isa=isa), ops.depth_to_space_box(phases))


def test_build_info_agrees_with_capabilities():
    from pybilayer import _C

    info = _C.build_info()
    assert info["cuda"] == CAPS.cuda_built
    if info["cuda"]:
        assert "75" in info["cuda_architectures"] or os.environ.get("PYBILAYER_CUDA_ARCHS")
        if not CAPS.cuda:
            assert "cudaGetDeviceCount" in CAPS.cuda_reason  # the CUDA runtime's own words
    else:
        assert info["cuda_architectures"] == ""
        assert "without CUDA" in CAPS.cuda_reason


@pytest.mark.skipif(CAPS.cuda or not CAPS.native, reason="needs the extension and no usable GPU")
@pytest.mark.parametrize(
    "make",
    [lambda: native.DeviceBuffer(16), lambda: native.DeviceBuffer((2, 3), "float32"), lambda: native.Stream()],
    ids=["buffer", "shaped_buffer", "stream"],
)
def test_cuda_objects_without_gpu_raise_clearly(make):
    with pytest.raises(BackendUnavailableError) as raised:
        make()
    message = str(raised.value)
    assert "cudaGetDeviceCount" in message or "without CUDA" in message
    assert isinstance(raised.value, RuntimeError)  # BackendUnavailableError is a RuntimeError too


@pytest.mark.needs_cuda
def test_device_buffer_and_stream_on_a_gpu():
    import numpy as np
    import torch

    buffer = native.DeviceBuffer((4, 5), "float32")
    interface = buffer.__cuda_array_interface__
    assert interface["shape"] == (4, 5) and interface["typestr"] == "<f4" and interface["data"][0] == buffer.ptr
    assert buffer.nbytes == 80
    source = np.arange(20, dtype=np.float32).reshape(4, 5)
    buffer.copy_from_host(source)
    view = torch.as_tensor(buffer, device="cuda")  # zero-copy through __cuda_array_interface__
    assert view.data_ptr() == buffer.ptr
    torch.testing.assert_close(view.cpu(), torch.from_numpy(source))
    back = np.zeros_like(source)
    buffer.copy_to_host(back)
    np.testing.assert_array_equal(back, source)
    stream = native.Stream()
    assert stream.handle != 0
    stream.synchronize()


def test_import_never_needs_the_extension():
    """`import pybilayer` and `capabilities()` work when pybilayer._C cannot be imported."""
    code = (
        "import sys; sys.modules['pybilayer._C'] = None\n"
        "import pybilayer, pybilayer.native as n\n"
        "c = n.capabilities(); assert not c.native and not c.cuda and 'pybilayer._C' in c.native_reason\n"
        "import numpy as np, warnings\n"
        "from pybilayer import ops\n"
        "t = np.random.rand(3, 8, 8).astype('f4'); d = np.zeros((1, 2, 8, 8), 'f4'); lf = np.zeros((1, 3, 8, 8), 'f4')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = ops.composite(t, d, lf)\n"
        "assert out.shape == (1, 8, 8, 3) and w and 'falls back' in str(w[0].message)\n"
        "try:\n"
        "    n.DeviceBuffer(8)\n"
        "except pybilayer.BackendUnavailableError as e:\n"
        "    assert 'pybilayer._C' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpu_only_switch_configures_without_cuda(tmp_path):
    """PYBILAYER_WITH_CUDA=OFF (what PYBILAYER_NO_CUDA=1 passes) configures no CUDA language at all."""
    pybind11 = pytest.importorskip("pybind11")
    result = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(tmp_path),
            "-DPYBILAYER_WITH_CUDA=OFF",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA twin OFF" in result.stdout
    cache = (tmp_path / "CMakeCache.txt").read_text()
    assert "CMAKE_CUDA_COMPILER:" not in cache
