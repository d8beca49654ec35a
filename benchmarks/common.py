"""What every benchmark shares: timing (warm-up, then median and p90), machine metadata, JSON output.

    from common import interleaved_times, measure, run_metadata, write_json
    timing = measure(lambda: work(), sync=torch.cuda.synchronize)   # Timing(median_s, p90_s, runs)
    a_ms, b_ms = interleaved_times([run_a, run_b], repeats=100)    # A/B in alternating turns
    write_json(path, run_metadata(), rows)                            # {"metadata": ..., "results": ...}

Never time a single call; numbers taken on a loaded machine say so (metadata carries the load average).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pybilayer.fileio import atomic_write_bytes

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Timing:
    median_s: float
    p90_s: float
    runs: int


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    min_runs: int = 5,
    min_time_s: float = 0.5,
    max_runs: int = 10_000,
    sync: Callable[[], object] | None = None,
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then at least ``min_runs`` times and for at least
    ``min_time_s``; each call is timed alone (with ``sync`` inside the timed region for async devices)."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - started < min_time_s):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    values = np.asarray(times)
    return Timing(float(np.median(values)), float(np.percentile(values, 90)), len(times))


TURN_FRAMES = 5


def interleaved_times(fns: list[Callable[[], object]], repeats: int) -> list[np.ndarray]:
    """Each of ``fns`` timed in turn, ``TURN_FRAMES`` calls at a time, so that load drifts (a shared host's
    slow phases last seconds) hit all of them alike; ``repeats`` times in ms per function. Every turn
    starts with one untimed call: the other runtime's worker threads may still be spinning from the
    previous turn (OpenMP's and MNN's do) and would slow its first call."""
    rounds = -(-repeats // TURN_FRAMES)
    out = np.empty((len(fns), rounds * TURN_FRAMES))
    for r in range(rounds):
        for k, fn in enumerate(fns):
            fn()
            for i in range(r * TURN_FRAMES, (r + 1) * TURN_FRAMES):
                start = time.perf_counter()
                fn()
                out[k, i] = time.perf_counter() - start
    return [row[:repeats] * 1e3 for row in out]


def _cpu_model() -> str:
    """The model name, with its family and model numbers (virtual machines may name only the vendor's line:
    "AMD EPYC" is family 25 for Zen 3 and 4, 26 for Zen 5)."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's fields only
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def _git_sha() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = result.stdout.strip()
    return (sha + ("-dirty" if dirty.stdout.strip() else "")) if sha else None


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)  # reads the installed metadata; imports nothing
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return __import__(name).__version__  # e.g. tensorrt, whose distribution is named per CUDA version
    except ImportError:
        return None


def run_metadata() -> dict:
    """Where and with what the numbers were taken: CPU, threads, load, library versions, GPU, git sha."""
    meta: dict = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "git_sha": _git_sha(),
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("numpy", "torch", "onnxruntime", "onnx", "mnn", "tensorrt")},
        },
        "gpu": None,
    }
    try:
        import torch

        meta["torch_threads"] = torch.get_num_threads()
        meta["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name()
            meta["versions"]["cuda_torch"] = torch.version.cuda
    except ImportError:
        pass
    try:
        from pybilayer import native

        caps = native.capabilities()
        meta["pybilayer_native"] = {
            "native": caps.native,
            "cuda": caps.cuda,
            "cuda_reason": caps.cuda_reason,
            "cuda_architectures": caps.cuda_architectures,
            "cpu_isas": list(caps.cpu_isas),  # the widest is the CPU kernels' code path
        }
        if caps.cuda and meta["gpu"] is None:
            meta["gpu"] = caps.cuda_device_name
    except ImportError:
        pass
    return meta


def write_json(path: str | os.PathLike, metadata: dict, results: list[dict]) -> None:
    """Write {"metadata", "results"} with ``write_payload``."""
    write_payload(path, {"metadata": metadata, "results": results})


def write_payload(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (a crash never leaves a half-written file) and say where."""
    atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
    print(f"\nwrote {path}")


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Rows of dicts as an aligned text table; ``columns`` is [(key, header)]; floats get 3 significant digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "-" if value is None else str(value)

    table = [[header for _, header in columns]] + [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for i, r in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
