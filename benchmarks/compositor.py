"""The compositor: native CPU twin against the PyTorch reference chain, and the CUDA twin where a GPU exists.

    python benchmarks/compositor.py                  # 256 and 512, batch 1 and 16, threads 1 and 2
    python benchmarks/compositor.py --quick          # smoke run: 256x256, batch 1, short timings
    python benchmarks/compositor.py --json results.json

Both sides do the same job: uint8 (B, H, W, 3) frames from a shared 3-channel texture, delta_uv,
lf and mask logits composited over black. The reference chain is grid_sample + add + sigmoid mask +
clamp/round + uint8 (+ the HWC permute), with its identity grid cached; the native side writes into a
preallocated frame buffer, as a per-frame loop would. delta_uv is a smooth field (upsampled noise, about
+-10% of the frame), like the network's. On a GPU: batch 64, achieved GB/s (bytes read + written)
against a measured device-to-device copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measure, print_table, run_metadata, write_json  # noqa: E402

try:
    from pybilayer import native, ops
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pybilayer import native, ops


def make_inputs(batch: int, size: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(size * 1000 + batch)
    coarse = torch.randn(batch, 2, 8, 8, generator=g) * 0.1
    inputs = dict(
        texture=torch.rand(3, size, size, generator=g) * 2 - 1,
        delta_uv=F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False),
        lf=torch.randn(batch, 3, size, size, generator=g) * 0.2,
        mask=torch.randn(batch, 1, size, size, generator=g) * 3,
    )
    return {k: v.to(device=device, dtype=dtype).contiguous() for k, v in inputs.items()}


def cpu_rows(sizes, batches, threads, min_time_s) -> list[dict]:
    rows = []
    for size in sizes:
        for batch in batches:
            x = make_inputs(batch, size)
            frames = torch.empty(batch, size, size, 3, dtype=torch.uint8)
            for n in threads:
                torch.set_num_threads(n)
                native_t = measure(
                    lambda: ops.composite(**x, mask_is_logits=True, out_buffer=frames, num_threads=n),
                    min_time_s=min_time_s,
                )
                reference_t = measure(lambda: ops.composite_reference(**x, mask_is_logits=True), min_time_s=min_time_s)
                pixels = batch * size * size
                rows.append(
                    dict(
                        device="cpu",
                        size=f"{size}x{size}",
                        batch=batch,
                        threads=n,
                        native_ms=native_t.median_s * 1e3,
                        native_p90_ms=native_t.p90_s * 1e3,
                        reference_ms=reference_t.median_s * 1e3,
                        reference_p90_ms=reference_t.p90_s * 1e3,
                        speedup=reference_t.median_s / native_t.median_s,
                        native_mpix_s=pixels / native_t.median_s / 1e6,
                    )
                )
    return rows


CPU_COLUMNS = [
    ("size", "size"),
    ("batch", "batch"),
    ("threads", "threads"),
    ("native_ms", "native ms"),
    ("native_p90_ms", "p90"),
    ("reference_ms", "torch chain ms"),
    ("reference_p90_ms", "p90"),
    ("speedup", "speed-up"),
    ("native_mpix_s", "native Mpix/s"),
]


def copy_bandwidth_gb_s(nbytes: int = 1 << 28) -> float:
    """Device-to-device copy of nbytes: (read + write) bytes per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), sync=torch.cuda.synchronize, min_time_s=0.5)
    return 2 * nbytes / t.median_s / 1e9


def cuda_rows(batch: int, sizes, min_time_s) -> list[dict]:
    copy = copy_bandwidth_gb_s()
    rows = []
    for size in sizes:
        for dtype in (torch.float32, torch.float16):
            x = make_inputs(batch, size, device="cuda", dtype=dtype)
            frames = torch.empty(batch, size, size, 3, dtype=torch.uint8, device="cuda")
            t = measure(
                lambda: ops.composite(**x, mask_is_logits=True, out_buffer=frames),
                sync=torch.cuda.synchronize,
                min_time_s=min_time_s,
            )
            reference = measure(
                lambda: ops.composite_reference(**x, mask_is_logits=True),
                sync=torch.cuda.synchronize,
                min_time_s=min_time_s,
            )
            # Bytes that must move: per-frame inputs read once, the shared texture once, frames written.
            moved = sum(x[k].numel() * x[k].element_size() for k in ("delta_uv", "lf", "mask", "texture"))
            moved += frames.numel()
            achieved = moved / t.median_s / 1e9
            rows.append(
                dict(
                    device=torch.cuda.get_device_name(),
                    size=f"{size}x{size}",
                    batch=batch,
                    dtype=str(dtype).removeprefix("torch."),
                    native_ms=t.median_s * 1e3,
                    native_p90_ms=t.p90_s * 1e3,
                    reference_ms=reference.median_s * 1e3,
                    speedup=reference.median_s / t.median_s,
                    achieved_gb_s=achieved,
                    copy_gb_s=copy,
                    copy_fraction=achieved / copy,
                )
            )
    return rows


CUDA_COLUMNS = [
    ("size", "size"),
    ("batch", "batch"),
    ("dtype", "inputs"),
    ("native_ms", "native ms"),
    ("native_p90_ms", "p90"),
    ("reference_ms", "torch chain ms"),
    ("speedup", "speed-up"),
    ("achieved_gb_s", "GB/s"),
    ("copy_gb_s", "copy GB/s"),
    ("copy_fraction", "of copy"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cuda-batch", type=int, default=64)
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per measurement")
    parser.add_argument("--quick", action="store_true", help="256x256, batch 1, 1 thread, short timings")
    parser.add_argument("--json", type=Path, help="also write {metadata, results} here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.threads, args.min_time, args.cuda_batch = [256], [1], [1], 0.2, 8

    caps = native.capabilities()
    metadata = run_metadata()
    print(
        f"# compositor benchmark  cpu: {metadata['cpu']}  load: {metadata['load_average']}  "
        f"torch {metadata['versions']['torch']}  git {metadata['git_sha']}"
    )
    if not caps.native:
        print(f"native extension unavailable: {caps.native_reason}", file=sys.stderr)
        return 1

    print("\n## CPU: native twin vs torch reference chain (uint8 frames, mask logits)")
    results = cpu_rows(args.sizes, args.batches, args.threads, args.min_time)
    print_table(results, CPU_COLUMNS)
    if caps.cuda and torch.cuda.is_available():
        print(f"\n## CUDA: {caps.cuda_device_name}, batch {args.cuda_batch}")
        rows = cuda_rows(args.cuda_batch, args.sizes, args.min_time)
        print_table(rows, CUDA_COLUMNS)
        results += rows
    else:
        reason = caps.cuda_reason if not caps.cuda else "torch has no CUDA"
        print(f"\n## CUDA: skipped ({reason})")
    if args.json:
        write_json(args.json, metadata, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
