"""The native passes of the CPU frame: each kernel against its PyTorch reference, and whole frames with and
without them.

    python benchmarks/native_passes.py            # released size: the kernels, then frames on onnxruntime and mnn
    python benchmarks/native_passes.py --quick    # smoke run: tiny random model, few frames
    python benchmarks/native_passes.py --json results.json

Kernels, fp32, on the same random inputs as their references:
- ``ops.heads`` from a random input of the model's last up-sampling convolution (``ops.UpsampleConv``, as the
  backends call it) against ``ops.heads_reference`` (torch: nearest up-sampling, 3x3 convolution,
  activation, 3x3 convolution, tanh);
- ``ops.LowResStage`` (the keypoint MLP and every block up to the heads' inputs, one random avatar folded in,
  as the backends build it) against ``ops.low_res_stage_reference`` (torch: linear layers, convolutions, nearest
  up-sampling).
Frames: ``Renderer.render``, landmarks in -> uint8 frame out, batch 1, for each folded-graph backend in
three variants timed in alternating turns in one process, so that a shared host's slow phases hit them
alike: the graph computes everything (``native_heads=False``); the native heads finish the frame from the
last block's up-sampling convolution (``native_blocks=0``; onnxruntime also runs one graph per block
joined by ``ops.depth_to_space_box``); and the default, where the native stage runs the keypoint MLP and
every block, and no graph runs per frame.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TURN_FRAMES, interleaved_times, measure, print_table, run_metadata, write_json  # noqa: E402

try:
    from pybilayer import Renderer, native, ops
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pybilayer import Renderer, native, ops

from pybilayer.backends import unavailable_reason  # noqa: E402
from pybilayer.models import Bilayer, BilayerConfig  # noqa: E402
from pybilayer.synthetic import random_landmarks  # noqa: E402

FRAME_BACKENDS = ("onnxruntime", "mnn")


def kernel_rows(channels: int, low_size: int, threads: list[int], min_time_s: float) -> list[dict]:
    in_channels = channels  # the last block's convolution after its up-sampling: C -> C
    rng = np.random.default_rng(0)
    conv = ops.UpsampleConv(
        input=rng.standard_normal((1, in_channels, low_size, low_size)).astype(np.float32),
        weight=(rng.standard_normal((channels, in_channels, 3, 3)) / np.sqrt(4 * in_channels)).astype(np.float32),
        bias=rng.standard_normal(channels).astype(np.float32),
        skip=rng.standard_normal((1, channels, low_size, low_size)).astype(np.float32),
    )
    inputs = (
        conv,
        rng.uniform(0.5, 2.0, channels).astype(np.float32),
        rng.standard_normal(channels).astype(np.float32),
        np.full(channels, 0.2, np.float32),
        (rng.standard_normal((6, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32),
        rng.standard_normal(6).astype(np.float32),
    )
    tensors = [conv.arrays(torch.from_numpy)] + [torch.from_numpy(a) for a in inputs[1:]]
    rows, torch_threads = [], torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            kernel = measure(lambda: ops.heads(*inputs, num_threads=n), min_time_s=min_time_s)
            with torch.no_grad():
                reference = measure(lambda: ops.heads_reference(*tensors), min_time_s=min_time_s)
            rows.append(dict(kind="kernel", kernel="heads", size=f"{2 * low_size}x{2 * low_size}", channels=channels,
                             threads=n, native_ms=kernel.median_s * 1e3, reference_ms=reference.median_s * 1e3,
                             speedup=reference.median_s / kernel.median_s))
    finally:
        torch.set_num_threads(torch_threads)
    return rows


def stage_rows(model: Bilayer, threads: list[int], min_time_s: float) -> list[dict]:
    from pybilayer.backends.frame_graph import FrameWeights, folded_low_res_stage, mlp_features

    weights = FrameWeights.from_model(model)
    embeds = [torch.randn(1, c, 8, 8) for c in model.config.embedding_channels()]
    with torch.no_grad():
        params = model.inference_generator.project(embeds)
    blocks = len(weights.blocks)  # the backends' stage: every block
    low_res = folded_low_res_stage(weights, {k: v.numpy() for k, v in params.flatten().items()}, blocks)
    stage = low_res.stage().kernel
    features = mlp_features(weights.frequencies, np.random.default_rng(0).uniform(-0.8, 0.8, (1, 68, 2)))
    as_tensor = torch.from_numpy
    tensors = (as_tensor(features), [(as_tensor(w), as_tensor(b)) for w, b in low_res.mlp],
               [{k: as_tensor(v) for k, v in b.items()} for b in low_res.blocks], low_res.input_size,
               low_res.heads_inputs)
    rows, torch_threads = [], torch.get_num_threads()
    size, _, channels = stage.output_shape  # every block: the heads' inputs, channels-last
    try:
        for n in threads:
            torch.set_num_threads(n)
            kernel = measure(lambda: stage(features, num_threads=n), min_time_s=min_time_s)
            with torch.no_grad():
                reference = measure(lambda: ops.low_res_stage_reference(*tensors), min_time_s=min_time_s)
            rows.append(dict(kind="kernel", kernel=f"stage: MLP + {blocks} blocks", size=f"{size}x{size}",
                             channels=channels, threads=n, native_ms=kernel.median_s * 1e3,
                             reference_ms=reference.median_s * 1e3, speedup=reference.median_s / kernel.median_s))
    finally:
        torch.set_num_threads(torch_threads)
    return rows


# (label, backend options): the graph alone, the native heads, the default (native heads and stage)
FRAME_VARIANTS = (("graph", {"native_heads": False}), ("heads", {"native_blocks": 0}), ("stage", {}))


def frame_rows(model: Bilayer, backends: list[str], threads: int, repeats: int) -> list[dict]:
    size = model.config.image_size
    photo_size = int(size * 1.25)
    photo = np.random.default_rng(3).integers(0, 256, (photo_size, photo_size, 3), dtype=np.uint8)
    photo_landmarks = random_landmarks(1, photo_size, seed=3)[0]
    landmarks = random_landmarks(64, 256, seed=5)
    rows = []
    for name in backends:
        reason = unavailable_reason(name, "cpu")
        if reason:
            print(f"  {name}: skipped ({reason})")
            continue
        renderers = [Renderer(model, backend=name, device="cpu", threads=threads, backend_options={name: options})
                     for _, options in FRAME_VARIANTS]
        avatar = renderers[0].create_avatar(photo, photo_landmarks)
        for renderer in renderers[1:]:
            renderer._prepare(avatar)  # the same avatar, prepared for the other renderers too (not timed)
        frame = iter(range(1 << 30))

        def render(renderer):
            return lambda: renderer.render(avatar, landmarks[next(frame) % len(landmarks)])

        times = interleaved_times([render(r) for r in renderers], repeats)
        images = [r.render(avatar, landmarks[:4], output="layers").image for r in renderers]
        row = dict(kind="frame", backend=name, size=f"{size}x{size}", threads=threads,
                   max_abs_image_difference=float(max(np.abs(image - images[0]).max() for image in images[1:])))
        for (label, _), ms in zip(FRAME_VARIANTS, times):
            row[f"{label}_ms"], row[f"{label}_min_ms"] = float(np.median(ms)), float(ms.min())
        row["heads_speedup"] = row["graph_ms"] / row["heads_ms"]
        row["stage_speedup"] = row["heads_ms"] / row["stage_ms"]
        rows.append(row)
    return rows


KERNEL_COLUMNS = [("kernel", "kernel"), ("size", "output"), ("channels", "C"), ("threads", "threads"),
                  ("native_ms", "native ms"), ("reference_ms", "torch ms"), ("speedup", "speed-up")]
FRAME_COLUMNS = [("backend", "backend"), ("size", "size"), ("graph_ms", "graph p50"), ("graph_min_ms", "min"),
                 ("heads_ms", "+ native heads p50"), ("heads_min_ms", "min"), ("heads_speedup", "speed-up"),
                 ("stage_ms", "+ native stage p50"), ("stage_min_ms", "min"), ("stage_speedup", "speed-up"),
                 ("max_abs_image_difference", "max abs image diff")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the frames (kernel: 1 and this)")
    parser.add_argument("--repeats", type=int, default=200, help="timed frames per variant and backend")
    parser.add_argument("--backends", default=",".join(FRAME_BACKENDS))
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed kernel calls")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few frames, short timings")
    parser.add_argument("--json", type=Path, help="also write {metadata, results} here")
    args = parser.parse_args(argv)

    caps = native.capabilities()
    if not caps.native:
        print(f"native extension unavailable: {caps.native_reason}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    if args.quick:
        config = BilayerConfig.tiny(64, texture_enhancer=False, discriminator=False)
        args.repeats, args.min_time = 2 * TURN_FRAMES, 0.1
    else:
        config = BilayerConfig(texture_enhancer=False, discriminator=False)
    model = Bilayer(config).eval()
    spec = config.inference_generator_spec()
    metadata = run_metadata()
    metadata["threads"] = args.threads
    print(f"# native passes  cpu: {metadata['cpu']}  load: {metadata['load_average']}  git {metadata['git_sha']}")

    print("\n## kernels against their torch references (same inputs, fp32)")
    threads = sorted({1, args.threads})
    results = kernel_rows(spec.block_out[-1], config.image_size // 2, threads, args.min_time)
    results += stage_rows(model, threads, args.min_time)
    print_table(results, KERNEL_COLUMNS)

    print(f"\n## frames: Renderer.render, batch 1, {args.threads} threads, the graph alone, + native heads, + native "
          f"stage, in turns of {TURN_FRAMES} frames, {args.repeats} frames each")
    rows = frame_rows(model, [b for b in args.backends.split(",") if b], args.threads, args.repeats)
    print_table(rows, FRAME_COLUMNS)
    results += rows
    if args.json:
        write_json(args.json, metadata, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
