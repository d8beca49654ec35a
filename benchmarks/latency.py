"""Latency of avatar creation and per-frame rendering, for every backend usable here.

    python benchmarks/latency.py                      # random-weight released-size model, all backends
    python benchmarks/latency.py --checkpoint model.safetensors --json results.json
    python benchmarks/latency.py --quick              # smoke test: few repetitions

Per backend: avatar creation (embedder + texture generator + projector + the backend's per-avatar
preparation), per-frame p50/p90 and fps at batch 1 and batch 8 (landmarks in, uint8 frames out,
including landmark normalisation and the compositor), the compositor's share, and the peak RSS so far.
In the same run it times the official-style eager PyTorch per-frame path (keypoint MLP + gen_inf with
the projector output cached + grid_sample + add, fp32) and reports each backend's speed-up over it.
Nothing is downloaded; tests never assert timings, this script only reports them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

try:
    import pybilayer  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _metadata(threads: int) -> dict:
    """Machine metadata: benchmarks/common.run_metadata() when present, else a minimal local version."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import run_metadata  # type: ignore[import-not-found]

        meta = dict(run_metadata())
    except ImportError:
        meta = _minimal_metadata()
    meta["threads"] = threads
    return meta


def _minimal_metadata() -> dict:
    import subprocess

    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("onnxruntime", "onnx", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": versions,
        "git_sha": sha,
        "platform": platform.platform(),
    }


def _times(fn, repeats: int, warmup: int = 2) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - start
    return out * 1e3  # ms


def _stats(ms: np.ndarray, frames: int = 1) -> dict:
    p50, p90 = np.percentile(ms, [50, 90])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "min_ms": float(ms.min()),
            "fps": float(frames * 1e3 / p50), "per_frame_p50_ms": float(p50 / frames)}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def eager_reference(model, avatar, keypoints_1, repeats: int) -> dict:
    """The official-style eager per-frame path at batch 1, fp32 (projector output cached)."""
    import torch
    import torch.nn.functional as F

    from pybilayer.models.warp import identity_grid

    texture = avatar.texture[None]
    params = avatar.params
    grid = identity_grid(model.config.image_size)
    keypoints = torch.from_numpy(keypoints_1)

    def step():
        with torch.no_grad():
            pose = model.keypoints_embedder(keypoints)
            delta_uv, lf, _ = model.inference_generator.generate(pose, params)
            hf = F.grid_sample(texture, grid + delta_uv.permute(0, 2, 3, 1), mode="bilinear",
                               padding_mode="zeros", align_corners=False)
            return lf + hf

    return _stats(_times(step, repeats))


def bench_backend(name: str, model, photo, landmarks, drivers, args) -> dict:
    from pybilayer import Renderer, ops

    start = time.perf_counter()
    renderer = Renderer(model, backend=name, device="cpu" if name in ("torch", "onnxruntime") else "auto",
                        threads=args.threads)
    result = {"backend": renderer.backend, "reason": renderer.backend_reason,
              "renderer_init_ms": (time.perf_counter() - start) * 1e3}
    creation = _times(lambda: renderer.create_avatar(photo, landmarks), args.creation_repeats, warmup=1)
    result["avatar_creation_ms"] = float(np.median(creation))
    avatar = renderer.create_avatar(photo, landmarks)
    i = [0]

    def one():
        i[0] = (i[0] + 1) % len(drivers)
        renderer.render(avatar, drivers[i[0]])

    result["batch1"] = _stats(_times(one, args.repeats))
    batch = drivers[: args.batch]
    result[f"batch{args.batch}"] = _stats(_times(lambda: renderer.render(avatar, batch), max(3, args.repeats // 4)), args.batch)
    # compositor share at batch 1: the same call on this backend's outputs
    prepared = renderer._prepare(avatar)
    keypoints = renderer.normalize_landmarks(drivers[:1])
    out = renderer._backend.run([(prepared, keypoints)])[0]
    composite = _times(lambda: ops.composite(prepared.texture, out.delta_uv, out.lf, out="uint8"), args.repeats)
    result["compositor_p50_ms"] = float(np.median(composite))
    result["compositor_share"] = float(np.median(composite) / result["batch1"]["p50_ms"])
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="model file (default: random released-size model)")
    parser.add_argument("--backends", default="auto",
                        help="comma-separated backends, or 'auto' for every one usable here (torch, onnxruntime, cuda, tensorrt)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and onnxruntime)")
    parser.add_argument("--repeats", type=int, default=50, help="timed frames at batch 1")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size")
    parser.add_argument("--creation-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke test: few repetitions")
    parser.add_argument("--json", type=Path, default=None, help="also write the results and machine metadata here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.creation_repeats = 5, 1

    import torch

    from pybilayer.backends import BACKENDS, unavailable_reason
    from pybilayer.renderer import _load_model
    from pybilayer.synthetic import random_landmarks

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = _load_model(args.checkpoint, None)
    size = model.config.image_size
    rng = np.random.default_rng(args.seed)
    photo = rng.integers(0, 256, (int(size * 1.25), int(size * 1.25), 3), dtype=np.uint8)
    landmarks = random_landmarks(1, int(size * 1.25), seed=args.seed)[0]
    drivers = random_landmarks(max(args.batch, 16), 480, seed=args.seed + 1)

    names = list(BACKENDS) if args.backends == "auto" else [b.strip() for b in args.backends.split(",")]
    skipped = {}
    for name in list(names):
        reason = unavailable_reason(name, "cpu" if name in ("torch", "onnxruntime") else "cuda")
        if reason:
            skipped[name] = reason
            names.remove(name)

    from pybilayer import Renderer

    reference_renderer = Renderer(model, backend="torch", device="cpu")
    avatar = reference_renderer.create_avatar(photo, landmarks)
    keypoints_1 = reference_renderer.normalize_landmarks(drivers[:1])
    eager = eager_reference(model, avatar, keypoints_1, args.repeats)

    results = []
    for name in names:
        r = bench_backend(name, model, photo, landmarks, drivers, args)
        r["speedup_vs_eager"] = eager["p50_ms"] / r["batch1"]["p50_ms"]
        results.append(r)

    meta = _metadata(args.threads)
    print(f"pybilayer latency: image {size}, {args.threads} threads, {meta.get('cpu')}, load average "
          f"{os.getloadavg()[0]:.1f}, gpu {meta.get('gpu')}")
    print(f"eager PyTorch per-frame path (MLP + gen_inf + grid_sample + add), batch 1: p50 {eager['p50_ms']:.1f} ms, "
          f"p90 {eager['p90_ms']:.1f} ms, min {eager['min_ms']:.1f} ms")
    b = f"batch{args.batch}"
    header = (f"{'backend':<12} {'init ms':>8} {'avatar ms':>9} {'b1 p50':>8} {'b1 p90':>8} {'b1 min':>8} {'b1 fps':>7} "
              f"{b + ' p50/frame':>16} {b + ' fps':>10} {'comp. share':>11} {'speed-up':>8} {'peak RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['backend']:<12} {r['renderer_init_ms']:>8.0f} {r['avatar_creation_ms']:>9.0f} {r['batch1']['p50_ms']:>8.2f} "
              f"{r['batch1']['p90_ms']:>8.2f} {r['batch1']['min_ms']:>8.2f} {r['batch1']['fps']:>7.1f} "
              f"{r[b]['per_frame_p50_ms']:>16.2f} {r[b]['fps']:>10.1f} {r['compositor_share']:>10.1%} "
              f"{r['speedup_vs_eager']:>7.2f}x {r['peak_rss_mib']:>12.0f}")
    for name, reason in skipped.items():
        print(f"{name:<12} skipped: {reason}")
    if args.json:
        payload = {"metadata": meta, "image_size": size, "checkpoint": args.checkpoint, "eager_reference": eager,
                   "results": results, "skipped": skipped, "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
