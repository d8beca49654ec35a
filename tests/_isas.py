"""The native CPU kernels' code paths as test parameters: a path this CPU cannot run is a skip that says so."""

from __future__ import annotations

import pytest

from pybilayer import native

_RUNS_HERE = native.capabilities().cpu_isas


def _param(isa: str):
    return pytest.param(isa, marks=pytest.mark.skipif(isa not in _RUNS_HERE, reason=f"this CPU has no {isa} code path"))


ISAS = [_param(isa) for isa in ("portable", "avx2", "avx512")]  # every path
VECTOR_ISAS = ISAS[1:]  # the SIMD paths (fused multiply-adds): they give one another's bits
