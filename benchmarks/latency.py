"""Latency of avatar creation and per-frame rendering, for every backend usable here.

    python benchmarks/latency.py                      # random-weight released-size model, all backends
    python benchmarks/latency.py --checkpoint model.safetensors --json results.json
    python benchmarks/latency.py --quick              # smoke test: tiny random models, few repetitions
    python benchmarks/latency.py --model fsth         # the few-shot talking-head baseline (paper sizes)
    python benchmarks/latency.py --model both         # both, plus one table comparing their per-frame cost

Per model and backend: avatar creation (bi-layer: embedder + texture generator + projector; FSTH: embedder
+ AdaIN projection; plus the backend's per-avatar preparation), per-frame p50/p90 and fps at batch 1 and
batch 8 (landmarks in, uint8 frames out, including landmark normalisation and the compositor or the
stickman rasterisation), the compositor's share (bi-layer), and the peak RSS so far. In the same run it
times each model's eager PyTorch per-frame path (bi-layer: keypoint MLP + gen_inf in the official op
order, ``official_gen_inf``, with the projector output cached + grid_sample + add; FSTH: stickman +
generator) and reports each backend's speed-up over it, both timed in turns of a few frames so that load
changes hit both alike. ``--model both`` then times both models' CPU paths round-robin, one frame each, in
one table (``benchmarks/fsth.py``): the bi-layer paper's central comparison, on this machine in this run.
Nothing is downloaded; tests never assert timings, this script only reports them.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

try:
    import pybilayer  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TURN_FRAMES, interleaved_times, run_metadata, write_payload  # noqa: E402  (benchmarks/common.py)
from fsth import BACKENDS as COMPARED_BACKENDS  # noqa: E402  (benchmarks/fsth.py: the comparison table)
from fsth import compare_paths, format_table, renderer_paths  # noqa: E402


def _metadata(threads: int) -> dict:
    meta = dict(run_metadata())
    meta["threads"] = threads
    return meta


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


def eager_step(model, avatar, keypoints_1):
    """One frame of the model's eager per-frame path at batch 1, fp32 (per-identity parameters cached)."""
    from pybilayer.models.fsth import FSTH

    if isinstance(model, FSTH):
        return _eager_fsth_step(model, avatar, keypoints_1)
    return eager_bilayer_step(model, avatar, keypoints_1)


def _eager_fsth_step(model, avatar, keypoints_1):
    """Stickman + generator G, fp32."""
    import torch

    from pybilayer.models.fsth import FSTHAvatar

    fsth_avatar = FSTHAvatar(avatar.embedding, avatar.adain_params)
    keypoints = torch.from_numpy(keypoints_1)

    def step():
        with torch.no_grad():
            return model.render(fsth_avatar, model.draw_landmarks(keypoints))

    return step


def official_gen_inf(gen_inf, params, pose_embed):
    """``gen_inf`` computed in the official code's order and ops (spec sections 2.1 and 2.5), for the baseline.

    Per ResBlock: AdaBN as BatchNorm without affine, then ``* scale + bias``; LeakyReLU; conv3x3 at the low
    resolution; AdaBN; LeakyReLU; nearest up-sampling; conv3x3. The skip up-samples first and then applies
    the per-identity 1x1 convolution as a batched matmul at the high resolution (the official
    ``Upsample -> AdaptiveConv2d``; pybilayer's own module swaps the two, which is exact and 4x cheaper).
    """
    import torch.nn.functional as F

    from pybilayer.models.blocks import NEGATIVE_SLOPE, adaptive_conv1x1

    def ada_bn(norm, x, p):
        y = F.batch_norm(x, norm.norm_layer.running_mean, norm.norm_layer.running_var, eps=norm.norm_layer.eps)
        return y * p.scale[:, :, None, None] + p.bias[:, :, None, None]

    def up(x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    blocks = gen_inf.blocks
    n = len(params.blocks)
    x = pose_embed
    for j in range(n):
        block, p = blocks[j], params.blocks[j]
        h = block.norm1(x) if p.norm1 is None else ada_bn(block.norm1, x, p.norm1)
        h = F.leaky_relu(h, NEGATIVE_SLOPE, inplace=True)
        h = F.leaky_relu(ada_bn(block.norm2, block.block_feats[2](h), p.norm2), NEGATIVE_SLOPE, inplace=True)
        h = block.block[1](up(h))
        x = h + adaptive_conv1x1(up(x), p.skip)  # the bmm, at the high resolution
    x = F.leaky_relu(ada_bn(blocks[n], x, params.final_norm), NEGATIVE_SLOPE, inplace=True)
    return tuple(head(x) for head in gen_inf.heads)


def eager_bilayer_step(model, avatar, keypoints_1, official: bool = True):
    """One frame of the eager per-frame path (keypoint MLP + gen_inf + grid_sample + add), fp32: the official
    op order (``official_gen_inf``), or pybilayer's own modules with ``official=False``."""
    import torch
    import torch.nn.functional as F

    from pybilayer.models.warp import identity_grid

    texture = avatar.texture[None]
    params = avatar.params
    grid = identity_grid(model.config.image_size)
    keypoints = torch.from_numpy(keypoints_1)
    gen_inf = model.inference_generator.gen_inf

    def step():
        with torch.no_grad():
            pose = model.keypoints_embedder(keypoints)
            if official:
                delta_uv, lf, _ = official_gen_inf(gen_inf, params, pose)
            else:
                delta_uv, lf, _ = model.inference_generator.generate(pose, params)
            hf = F.grid_sample(texture, grid + delta_uv.permute(0, 2, 3, 1), mode="bilinear",
                               padding_mode="zeros", align_corners=False)
            return lf + hf

    return step


def bench_backend(name: str, model, photo, landmarks, drivers, eager, args, options=None, label=None) -> dict:
    """``eager``: the eager path's one-frame function, timed in turn with the backend's batch-1 frames (the
    speed-up is the ratio of those medians); ``options``: that backend's keyword arguments; ``label``: its
    name in the table (default: the backend's)."""
    from pybilayer import Renderer, ops
    from pybilayer.backends import CPU_BACKENDS

    start = time.perf_counter()
    renderer = Renderer(model, backend=name, device="cpu" if name in CPU_BACKENDS else "auto",
                        threads=args.threads, backend_options={name: options} if options else None)
    result = {"backend": label or renderer.backend, "reason": renderer.backend_reason,
              "renderer_init_ms": (time.perf_counter() - start) * 1e3}
    creation = _times(lambda: renderer.create_avatar(photo, landmarks), args.creation_repeats, warmup=1)
    result["avatar_creation_ms"] = float(np.median(creation))
    avatar = renderer.create_avatar(photo, landmarks)
    i = [0]

    def one():
        i[0] = (i[0] + 1) % len(drivers)
        renderer.render(avatar, drivers[i[0]])

    backend_ms, eager_ms = interleaved_times([one, eager], args.repeats)
    result["batch1"], result["eager_interleaved"] = _stats(backend_ms), _stats(eager_ms)
    result["speedup_vs_eager"] = result["eager_interleaved"]["p50_ms"] / result["batch1"]["p50_ms"]
    batch = drivers[: args.batch]
    result[f"batch{args.batch}"] = _stats(_times(lambda: renderer.render(avatar, batch), max(3, args.repeats // 4)), args.batch)
    result["compositor_p50_ms"] = result["compositor_share"] = None
    prepared = renderer._prepare(avatar)
    if prepared.texture is not None:  # bi-layer (FSTH has no compositor): its share at batch 1
        keypoints = renderer.normalize_landmarks(drivers[:1])
        out = renderer._backend.run([(prepared, keypoints)])[0]
        composite = _times(lambda: ops.composite(prepared.texture, out.delta_uv, out.lf, out="uint8"), args.repeats)
        result["compositor_p50_ms"] = float(np.median(composite))
        result["compositor_share"] = float(np.median(composite) / result["batch1"]["p50_ms"])
    result["peak_rss_mib"] = _peak_rss_mib()
    return result


MODELS = ("bilayer", "fsth")


def load_model(kind: str, checkpoint, quick: bool):
    """The model to benchmark: ``checkpoint`` (which must hold a ``kind`` model), else a random one of the
    released / paper size (tiny with ``quick``)."""
    from pybilayer.models import Bilayer, BilayerConfig
    from pybilayer.models.fsth import FSTH, FSTHConfig
    from pybilayer.renderer import _load_model

    model_type = FSTH if kind == "fsth" else Bilayer
    if checkpoint is None:
        if kind == "fsth":
            return _load_model(None, FSTHConfig.tiny() if quick else FSTHConfig())
        return _load_model(None, BilayerConfig.tiny(image_size=64) if quick else BilayerConfig())
    model = _load_model(checkpoint, None)
    if not isinstance(model, model_type):
        flag = "--fsth-checkpoint" if kind == "fsth" else "--checkpoint"
        raise SystemExit(f"{flag} {checkpoint}: holds a {type(model).__name__} model, expected {model_type.__name__}")
    return model


def bench_model(kind: str, model, names: list[str], args) -> tuple[dict, list[dict], dict]:
    """(eager reference, one result per usable backend, {skipped backend: why}) for one model."""
    from pybilayer import Renderer
    from pybilayer.backends import CPU_BACKENDS, unavailable_reason
    from pybilayer.backends.fsth import SERVED_BY
    from pybilayer.synthetic import random_landmarks

    size = model.config.image_size
    rng = np.random.default_rng(args.seed)
    photo = rng.integers(0, 256, (int(size * 1.25), int(size * 1.25), 3), dtype=np.uint8)
    landmarks = random_landmarks(1, int(size * 1.25), seed=args.seed)[0]
    drivers = random_landmarks(max(args.batch, 16), 480, seed=args.seed + 1)
    skipped = {}
    usable = []
    for name in names:
        reason = unavailable_reason(name, "cpu" if name in CPU_BACKENDS else "cuda")
        if reason is None and kind == "fsth" and name not in SERVED_BY:
            reason = f"does not serve the FSTH model (served by {', '.join(SERVED_BY)})"
        if reason:
            skipped[name] = reason
        else:
            usable.append(name)

    reference_renderer = Renderer(model, backend="torch", device="cpu")
    avatar = reference_renderer.create_avatar(photo, landmarks)
    keypoints_1 = reference_renderer.normalize_landmarks(drivers[:1])
    step = eager_step(model, avatar, keypoints_1)
    eager = _stats(_times(step, args.repeats))
    if kind == "bilayer":  # for comparison: pybilayer's own eager modules (exact rewrites of the official order)
        modules = eager_bilayer_step(model, avatar, keypoints_1, official=False)
        eager["pybilayer_modules"] = _stats(_times(modules, args.repeats))
    runs = [(name, None, None) for name in usable]
    if args.int8 and kind == "bilayer" and "onnxruntime" in usable:  # opt-in lossy path, its own row
        runs.append(("onnxruntime", {"precision": "int8"}, "ort-int8"))
    results = []
    for name, options, label in runs:
        r = bench_backend(name, model, photo, landmarks, drivers, step, args, options, label)
        r["model"] = kind
        results.append(r)
    return eager, results, skipped


EAGER_PATHS = {"bilayer": "MLP + gen_inf in the official op order + grid_sample + add", "fsth": "stickman + generator"}


def print_results(kind: str, size: int, eager: dict, results: list[dict], skipped: dict, batch: int) -> None:
    print(f"{kind} ({size} px): eager PyTorch per-frame path ({EAGER_PATHS[kind]}), batch 1: "
          f"p50 {eager['p50_ms']:.1f} ms, p90 {eager['p90_ms']:.1f} ms, min {eager['min_ms']:.1f} ms")
    if "pybilayer_modules" in eager:
        own = eager["pybilayer_modules"]
        print(f"  the same with pybilayer's own eager modules (skip before up-sampling): p50 {own['p50_ms']:.1f} ms, "
              f"min {own['min_ms']:.1f} ms")
    print(f"  speed-up: the eager path and each backend timed in turns of {TURN_FRAMES} frames; eager p50 / backend "
          "batch-1 p50 over those turns")
    b = f"batch{batch}"
    header = (f"{'model':<8} {'backend':<12} {'init ms':>8} {'avatar ms':>9} {'b1 p50':>8} {'b1 p90':>8} {'b1 min':>8} "
              f"{'b1 fps':>7} {b + ' p50/frame':>16} {b + ' fps':>10} {'comp. share':>11} {'eager p50':>9} "
              f"{'speed-up':>8} "
              f"{'peak RSS MiB':>12}")
    print(header)
    print("-" * len(header))
    for r in results:
        share = "-" if r["compositor_share"] is None else f"{r['compositor_share']:.1%}"
        print(f"{kind:<8} {r['backend']:<12} {r['renderer_init_ms']:>8.0f} {r['avatar_creation_ms']:>9.0f} "
              f"{r['batch1']['p50_ms']:>8.2f} {r['batch1']['p90_ms']:>8.2f} {r['batch1']['min_ms']:>8.2f} "
              f"{r['batch1']['fps']:>7.1f} {r[b]['per_frame_p50_ms']:>16.2f} {r[b]['fps']:>10.1f} {share:>11} "
              f"{r['eager_interleaved']['p50_ms']:>9.1f} {r['speedup_vs_eager']:>7.2f}x {r['peak_rss_mib']:>12.0f}")
    for name, reason in skipped.items():
        print(f"{kind:<8} {name:<12} skipped: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS + ("both",), default="bilayer",
                        help="bilayer, fsth (the few-shot talking-head baseline) or both, with a comparison table")
    parser.add_argument("--checkpoint", default=None, help="bi-layer model file (default: random released-size model)")
    parser.add_argument("--fsth-checkpoint", default=None, help="FSTH model file (default: random paper-size model)")
    parser.add_argument("--backends", default="auto",
                        help="comma-separated backends, or 'auto' for every one usable here "
                             "(torch, onnxruntime, mnn, cuda, tensorrt)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch, onnxruntime and mnn)")
    parser.add_argument("--repeats", type=int, default=50, help="timed frames at batch 1")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size")
    parser.add_argument("--creation-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny random models (where no checkpoint is given), few repetitions")
    parser.add_argument("--json", type=Path, default=None, help="also write the results and machine metadata here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--int8", action="store_true",
                        help="also time the opt-in int8 onnxruntime path (bi-layer; lossy)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.creation_repeats = 5, 1

    import torch

    from pybilayer.backends import BACKENDS

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    kinds = MODELS if args.model == "both" else (args.model,)
    checkpoints = {"bilayer": args.checkpoint, "fsth": args.fsth_checkpoint}
    models = {kind: load_model(kind, checkpoints[kind], args.quick) for kind in kinds}
    names = list(BACKENDS) if args.backends == "auto" else [b.strip() for b in args.backends.split(",")]

    meta = _metadata(args.threads)
    isas = meta.get("pybilayer_native", {}).get("cpu_isas") or ["none"]
    print(f"pybilayer latency: {args.threads} threads, {meta.get('cpu')}, native CPU kernels {isas[-1]}, "
          f"load average {os.getloadavg()[0]:.1f}, gpu {meta.get('gpu')}")
    payload = {"metadata": meta, "checkpoints": checkpoints, "models": {},
               "args": {k: str(v) for k, v in vars(args).items()}}
    for kind, model in models.items():
        eager, results, skipped = bench_model(kind, model, names, args)
        print_results(kind, model.config.image_size, eager, results, skipped, args.batch)
        payload["models"][kind] = {"image_size": model.config.image_size, "eager_reference": eager,
                                   "results": results, "skipped": skipped}
    if args.model == "both":
        payload["comparison"] = compare_models(models, names, args)
    if args.json:
        write_payload(args.json, payload)
    return 0


def compare_models(models: dict, names: list[str], args) -> list[dict] | str:
    """Both models' CPU per-frame paths timed round-robin (``benchmarks/fsth.py``); printed, and returned as
    rows (or the reason there is no table)."""
    backends = [b for b in COMPARED_BACKENDS if b in names]
    sizes = {m.config.image_size for m in models.values()}
    if not backends or len(sizes) != 1:
        why = "no CPU backend (torch, onnxruntime) selected" if not backends else f"image sizes differ {sorted(sizes)}"
        print(f"no per-frame comparison table: {why}")
        return why
    paths = [p for model in models.values() for p in renderer_paths(model, backends, args.threads, args.seed)]
    rows = compare_paths(paths, args.repeats)
    print(f"\nper-frame cost, bi-layer vs few-shot talking-head, landmarks (px) -> uint8 frame, batch 1, "
          f"{sizes.pop()} px, timed round-robin on the CPU in this run:")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    sys.exit(main())
