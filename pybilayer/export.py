"""ONNX export of the per-frame network (keypoint MLP + inference generator + heads).

    from pybilayer.export import export_onnx
    export_onnx(model, "frame_fp32.onnx")                     # one graph for every avatar
    export_onnx(model, "frame_fp16.onnx", precision="fp16")   # what TensorRT 11 builds an fp16 engine from
    export_onnx(model, "me.onnx", avatar=avatar)              # one avatar folded in (fastest on a CPU)

The shared graph takes ``keypoints`` (N, 68, 2) float32 in [-1, 1] crop coordinates and every tensor of
``InferenceParams.flatten()`` (one row per frame, float32, e.g. ``blocks.3.skip.weight`` (N, 128, 256))
as inputs; it returns ``delta_uv`` (N, 2, S, S), ``lf`` (N, 3, S, S) and ``mask_logits`` (N, 1, S, S),
float32. N is the only dynamic dimension. The fp16 graph computes in fp16 with fp32 inputs and
outputs (casts at the edges); BatchNorm statistics are applied in the centred form (x - mean) * s
so no large terms cancel in fp16. The compositor (warp, add, mask, uint8) is not part of the graph:
it runs in pybilayer.ops on fp32 sampling coordinates.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .fileio import atomic_write_bytes

from .backends.frame_graph import (
    KEYPOINTS_INPUT,
    OUTPUT_NAMES,
    FrameWeights,
    build_folded_graph,
    build_generic_graph,
    param_input_shapes,
)

PRECISIONS = ("fp32", "fp16")


def build_onnx(model, precision: str = "fp32", avatar=None):
    """The ONNX ModelProto (see ``export_onnx``) without writing it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if model.spectral_norm:
        raise ValueError("export_onnx: the model still has spectral norm applied; call model.remove_spectral_norm() first")
    weights = FrameWeights.from_model(model)
    if avatar is None:
        return build_generic_graph(weights, precision)
    if precision != "fp32":
        raise ValueError("export_onnx: a graph with an avatar folded in is fp32 only (it is the CPU path)")
    return build_folded_graph(weights, avatar.flat_params())


def export_onnx(model, path: str | os.PathLike, precision: str = "fp32", avatar=None, check: bool = True) -> Path:
    """Write the per-frame network of ``model`` (a Bilayer) as ONNX to ``path``; returns the path.

    precision: "fp32" or "fp16" (fp16: computed in fp16, fp32 inputs/outputs).
    avatar: None for the shared graph (identity parameters as inputs), or an Avatar to fold in.
    check: run ``onnx.checker`` (full check, with shape inference) before writing.
    The write is atomic: ``path`` holds the old file or the complete new one.
    """
    import onnx

    proto = build_onnx(model, precision, avatar)
    if check:
        onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def psnr(a, b, peak: float = 2.0):
    """PSNR in dB per item of two (N, ...) float arrays in [-1, 1] (peak-to-peak 2); inf where identical."""
    import numpy as np

    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(peak**2 / mse)


def fp16_quality(model, avatar, landmarks_norm, batch: int = 50, threads: int | None = None) -> dict:
    """Run the fp32 and fp16 graphs in onnxruntime on (N, 68, 2) normalised landmarks with ``avatar``;
    composite both (pybilayer.ops, clamped to [-1, 1]) and compare. Returns min/median PSNR (dB) of the
    frames, the number of non-finite outputs of the fp16 graph, and the max abs differences per output."""
    import numpy as np

    from . import ops
    from .backends.onnxruntime import create_session

    sessions = {p: create_session(build_onnx(model, p), threads) for p in PRECISIONS}
    params = avatar.flat_params()
    texture = avatar.texture.detach().float().numpy()
    psnrs, nonfinite = [], 0
    max_abs = dict.fromkeys(OUTPUT_NAMES, 0.0)
    for start in range(0, len(landmarks_norm), batch):
        kp = np.ascontiguousarray(landmarks_norm[start:start + batch], dtype=np.float32)
        feeds = {KEYPOINTS_INPUT: kp, **{k: np.repeat(v, len(kp), axis=0) for k, v in params.items()}}
        out32 = sessions["fp32"].run(OUTPUT_NAMES, feeds)
        out16 = sessions["fp16"].run(OUTPUT_NAMES, feeds)
        nonfinite += int(sum((~np.isfinite(o)).sum() for o in out16))
        for name, a, b in zip(OUTPUT_NAMES, out32, out16):
            max_abs[name] = max(max_abs[name], float(np.abs(a - b).max()))
        images = [np.clip(ops.composite(texture, o[0], o[1], out="float32"), -1, 1) for o in (out32, out16)]
        psnrs.append(psnr(images[0], images[1]))
    psnrs = np.concatenate(psnrs)
    return {"frames": int(len(psnrs)), "psnr_min_db": float(psnrs.min()), "psnr_median_db": float(np.median(psnrs)),
            "fp16_nonfinite": nonfinite, "max_abs": max_abs}


def standing_statistics(model, keypoints, params) -> None:
    """Set the inference generator's BatchNorm running statistics to those of one batch (keypoints
    (N, 68, 2) normalised, params for N frames), as the official code's "standing statistics" did.
    A randomly initialised model then has the activation scales of a trained one; used by checks and
    benchmarks on random weights, never on a trained checkpoint."""
    import torch

    norms = [m for m in model.inference_generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: exactly the batch statistics after one pass
        m.train()
    try:
        with torch.no_grad():
            pose = model.keypoints_embedder(torch.as_tensor(keypoints))
            model.inference_generator.generate(pose, params)
    finally:
        for m in norms:
            m.momentum = 0.1
            m.eval()


def main(argv=None) -> int:
    """``python -m pybilayer.export --fp16-check N``: the fp16 quality check on N realistic poses."""
    import argparse
    import json

    import numpy as np

    parser = argparse.ArgumentParser(description="fp16 ONNX graph vs fp32, on realistic poses")
    parser.add_argument("--fp16-check", type=int, default=1000, metavar="N", help="number of poses")
    parser.add_argument("--checkpoint", default=None, help="model file (default: random released-size model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .renderer import Renderer
    from .synthetic import random_landmarks

    renderer = Renderer(args.checkpoint, backend="torch", device="cpu")
    rng = np.random.default_rng(args.seed)
    if args.checkpoint is None:
        import torch

        model = renderer.model
        embeds = [torch.randn(8, c, 8, 8) for c in model.config.embedding_channels()]
        with torch.no_grad():
            params = model.inference_generator.project(embeds)
        calibration = renderer.normalize_landmarks(random_landmarks(8, renderer.image_size, seed=args.seed + 2))
        standing_statistics(model, calibration, params)
    photo = rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
    avatar = renderer.create_avatar(photo, random_landmarks(1, 320, seed=args.seed)[0])
    if args.checkpoint is None:
        # A random texture generator's output is nearly flat, which would hide warp errors; a smooth
        # random texture (bicubic 16x16 noise) has the gradients of a face texture.
        import torch
        import torch.nn.functional as F

        generator = torch.Generator().manual_seed(args.seed)
        noise = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
        size = renderer.image_size
        texture = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(-1, 1)
        avatar = dataclasses.replace(avatar, texture=texture)
    poses = renderer.normalize_landmarks(random_landmarks(args.fp16_check, renderer.image_size, seed=args.seed + 1))
    print(json.dumps(fp16_quality(renderer.model, avatar, poses), indent=2))
    return 0


__all__ = ["KEYPOINTS_INPUT", "OUTPUT_NAMES", "PRECISIONS", "build_onnx", "export_onnx", "fp16_quality",
           "param_input_shapes", "psnr", "standing_statistics"]


if __name__ == "__main__":
    raise SystemExit(main())
