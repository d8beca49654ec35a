"""Per-frame cost of the few-shot talking-head model (FSTH) against the bi-layer model, same machine, same run.

The bi-layer paper's central comparison: once the avatar exists, what does one more frame cost? Both
paths start from driver landmarks in pixels and end with a uint8 RGB frame:

- bi-layer: ``pybilayer.Renderer.render`` (crop-normalise, keypoint MLP + inference generator, native
  compositor), backend ``torch`` or ``onnxruntime``;
- FSTH: ``pybilayer.Renderer.render`` too (crop-normalise, rasterise the stickman, generator G with the
  avatar's AdaIN parameters, uint8); G runs in torch eager or in onnxruntime (``export_generator_onnx``,
  AdaIN parameters as graph inputs), see ``pybilayer/backends/fsth.py``.

Models are randomly initialised (timing does not depend on trained values). The paths are timed
round-robin, one frame per call, so load drifting during the run affects every row alike.

    python benchmarks/fsth.py            # paper sizes, 256 px
    python benchmarks/fsth.py --quick    # tiny models, a few seconds
    python benchmarks/fsth.py --json out.json --threads 4   # metadata from benchmarks/common.py

``compare(...)`` returns the rows; ``benchmarks/latency.py --model both`` prints the same table for the models
it has just benchmarked (``renderer_paths`` + ``compare_paths``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

try:
    import pybilayer  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_metadata, write_json  # noqa: E402  (benchmarks/common.py)

BACKENDS = ("torch", "onnxruntime")


@dataclass
class FramePath:
    model: str  # "bilayer" or "fsth"
    backend: str
    render: Callable[[np.ndarray], np.ndarray]  # (68, 2) driver landmarks in pixels -> (S, S, 3) uint8
    gflop: float  # convolutions and matmuls of the per-frame network, one frame
    image_size: int


def _gflop(fn) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def frame_gflop(model) -> float:
    """Convolutions and matmuls of one frame of ``model``'s per-frame network (FLOP counter, batch 1)."""
    import torch

    from pybilayer.models.fsth import FSTH

    keypoints = torch.rand(1, 68, 2) * 1.2 - 0.6
    with torch.no_grad():
        if isinstance(model, FSTH):
            adain_params = torch.randn(1, model.adain_layout.size) * 0.1
            landmark_images = model.draw_landmarks(keypoints)
            return _gflop(lambda: model.generator(landmark_images, adain_params))
        params = model.inference_generator.project([torch.randn(1, c, 8, 8) for c in model.config.embedding_channels()])
    return _gflop(lambda: model.inference_generator.generate(model.keypoints_embedder(keypoints), params))


def renderer_paths(model, backends: Sequence[str] = BACKENDS, threads: Optional[int] = None,
                   seed: int = 0) -> list[FramePath]:
    """One ``pybilayer.Renderer`` per backend over ``model`` (bi-layer or FSTH), each with one avatar made
    from a random photo: driver landmarks (px) -> uint8 frame, exactly what a user calls."""
    from pybilayer import Renderer
    from pybilayer.models.fsth import FSTH
    from pybilayer.synthetic import random_landmarks

    kind = "fsth" if isinstance(model, FSTH) else "bilayer"
    size = model.config.image_size
    photo = np.random.default_rng(seed).integers(0, 256, size=(2 * size, 2 * size, 3), dtype=np.uint8)
    photo_landmarks = random_landmarks(1, 2 * size, seed=seed)[0]
    gflop = frame_gflop(model)
    paths = []
    for backend in backends:
        renderer = Renderer(model, backend=backend, device="cpu", threads=threads if backend == "onnxruntime" else None)
        avatar = renderer.create_avatar(photo, photo_landmarks)
        paths.append(FramePath(kind, backend, lambda lm, r=renderer, a=avatar: r.render(a, lm), gflop, size))
    return paths


def random_models(quick: bool, seed: int = 0) -> dict:
    """{"bilayer": Bilayer, "fsth": FSTH}, randomly initialised: paper sizes, or tiny 64-px ones with ``quick``."""
    import torch

    from pybilayer.models import Bilayer, BilayerConfig
    from pybilayer.models.fsth import FSTH, FSTHConfig

    torch.manual_seed(seed)
    bilayer = Bilayer(BilayerConfig.tiny(image_size=64) if quick else BilayerConfig())
    return {"bilayer": bilayer, "fsth": FSTH(FSTHConfig.tiny() if quick else FSTHConfig())}


def time_paths(paths: Sequence[FramePath], driver_landmarks: np.ndarray, repeats: int, warmup: int = 2
               ) -> list[dict]:
    """Round-robin timing: each repeat renders one frame with every path in turn. Milliseconds per frame."""
    frames = len(driver_landmarks)
    for path in paths:
        for i in range(warmup):
            frame = path.render(driver_landmarks[i % frames])
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise RuntimeError(f"{path.model}/{path.backend} returned {frame.dtype} {frame.shape}, "
                                   "not an RGB uint8 frame")
    samples = {id(path): [] for path in paths}
    for r in range(repeats):
        for path in paths:
            start = time.perf_counter()
            path.render(driver_landmarks[r % frames])
            samples[id(path)].append((time.perf_counter() - start) * 1e3)
    rows = []
    for path in paths:
        median, p90 = np.percentile(samples[id(path)], [50, 90])
        rows.append({"model": path.model, "backend": path.backend, "ms_p50": float(median), "ms_p90": float(p90),
                     "fps": float(1e3 / median), "gflop_per_frame": path.gflop, "repeats": repeats})
    return rows


def compare_paths(paths: Sequence[FramePath], repeats: int) -> list[dict]:
    """Time ``paths`` round-robin on one talking-head driver sequence; each row gets ``vs_bilayer``, its
    per-frame time over the bi-layer path's on the same backend (None without one)."""
    from pybilayer.synthetic import talking_head_sequence

    sizes = {p.image_size for p in paths}
    if len(sizes) != 1:
        raise ValueError(f"all models must render the same size, got {sorted(sizes)}")
    image_size = sizes.pop()
    rows = time_paths(paths, talking_head_sequence(max(repeats, 8), image_size), repeats)
    reference = {r["backend"]: r["ms_p50"] for r in rows if r["model"] == "bilayer"}
    for row in rows:
        base = reference.get(row["backend"])
        row["vs_bilayer"] = row["ms_p50"] / base if base else None
        row["image_size"] = image_size
    return rows


def compare(quick: bool = False, threads: Optional[int] = None, repeats: Optional[int] = None,
            backends: Sequence[str] = BACKENDS, models: Sequence[str] = ("bilayer", "fsth")) -> list[dict]:
    """Per-frame rows of both models (paper sizes, or tiny ones with ``quick``), timed in one run.

    ``threads`` sets torch's intra-op threads and onnxruntime's (None: leave both at their defaults)."""
    import torch

    unknown = sorted(set(backends) - set(BACKENDS)) + sorted(set(models) - {"bilayer", "fsth"})
    if unknown:
        raise ValueError(f"unknown backend(s)/model(s) {unknown}; backends: {BACKENDS}, models: bilayer, fsth")
    if threads is not None:
        torch.set_num_threads(threads)
    built = random_models(quick)
    paths = [p for name in models for p in renderer_paths(built[name], backends, threads)]
    return compare_paths(paths, repeats or (5 if quick else 20))


def format_table(rows: Sequence[dict]) -> str:
    header = f"{'model':8} {'backend':12} {'p50 ms':>9} {'p90 ms':>9} {'fps':>7} {'GFLOP':>7} {'x bilayer':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = f"{r['vs_bilayer']:.1f}" if r.get("vs_bilayer") else "-"
        lines.append(f"{r['model']:8} {r['backend']:12} {r['ms_p50']:9.2f} {r['ms_p90']:9.2f} {r['fps']:7.1f} "
                     f"{r['gflop_per_frame']:7.2f} {ratio:>9}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny 64-px models, few repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=None, help="frames timed per path (default 20, quick 5)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--models", nargs="+", default=["bilayer", "fsth"], choices=["bilayer", "fsth"])
    parser.add_argument("--json", type=Path, default=None, help="also write rows + machine metadata here")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    rows = compare(args.quick, args.threads, args.repeats, args.backends, args.models)
    print(f"per-frame cost, landmarks (px) -> uint8 frame, batch 1, {rows[0]['image_size']} px"
          f"{' (quick: tiny models)' if args.quick else ''}")
    print(format_table(rows))
    if args.json:
        write_json(args.json, {**run_metadata(), "threads": args.threads, "quick": args.quick}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
