"""Builds pybilayer and its native core, pybilayer._C, by driving CMake (CMakeLists.txt).

Environment:
    PYBILAYER_NO_CUDA=1         build CPU-only even where nvcc exists
    PYBILAYER_CUDA_ARCHS="..."  CMake CUDA architectures, default "75-real;80-real;86-real;89-real;90"
                                (SASS for sm_75..sm_90 plus PTX of compute_90)
    CUDACXX / CUDA_HOME         where to find nvcc (else PATH, then /usr/local/cuda)
    CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: all cores)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "75-real;80-real;86-real;89-real;90"


def read_version() -> str:
    text = (ROOT / "pybilayer" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("pybilayer/__init__.py has no __version__")
    return match.group(1)


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        output_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11  # a build requirement (pyproject.toml)

        no_cuda = os.environ.get("PYBILAYER_NO_CUDA", "") not in ("", "0")
        nvcc = None if no_cuda else find_nvcc()
        archs = os.environ.get("PYBILAYER_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
        build_type = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPYBILAYER_OUTPUT_DIR={output_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYBILAYER_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        if shutil.which("ninja"):
            args.append("-GNinja")
        reason = "PYBILAYER_NO_CUDA=1" if no_cuda else "nvcc not found (CUDACXX, PATH, CUDA_HOME)"
        print(
            f"pybilayer build: {build_type}, CUDA twin "
            + (f"ON (nvcc {nvcc}, architectures {archs})" if nvcc else f"OFF ({reason})")
            + f", output {output_dir}",
            flush=True,
        )
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    name="pybilayer",
    version=read_version(),
    description="One-shot bi-layer neural head avatars (Zakharov et al., ECCV 2020), rendered fast on CPU and GPU",
    python_requires=">=3.10",
    packages=find_packages(include=["pybilayer", "pybilayer.*"]),
    package_data={"pybilayer": ["data/*"]},
    ext_modules=[CMakeExtension("pybilayer._C")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["pybilayer = pybilayer.cli:main"]},
    install_requires=[
        "numpy>=1.24",
        "torch>=2.1",
        "safetensors>=0.4",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "PyYAML>=6.0",
        "pillow>=10",
        "opencv-python-headless>=4.8",
        "tqdm>=4.60",
        "av>=12",
    ],
    # Exact pins for reproducible installs live in requirements*.txt (scripts/setup.sh uses them).
    extras_require={"test": ["pytest==9.0.3"], "mnn": ["mnn>=3.6"]},  # mnn: the fastest CPU path, optional
    zip_safe=False,
)
