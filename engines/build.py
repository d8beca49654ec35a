"""Build (or find in the cache) the TensorRT plan of a checkpoint's per-frame network.

    python engines/build.py --checkpoint model.safetensors --precision fp16 --max-batch 8

Prints the plan's path. The work is pybilayer.trt.build_engine; this script only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import pybilayer  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pybilayer.errors import PybilayerError
from pybilayer.trt import DEFAULT_WORKSPACE_MIB, PRECISIONS, build_engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="model .safetensors file")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch the plan accepts (profile 1..N)")
    parser.add_argument("--opt-batch", type=int, default=1, help="batch the tactics are tuned for")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $PYBILAYER_ENGINE_DIR or engines/cache")
    parser.add_argument("--workspace-mib", type=int, default=DEFAULT_WORKSPACE_MIB, help="TensorRT workspace limit")
    parser.add_argument("--force", action="store_true", help="rebuild even when a valid plan is cached")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every I/O shape and profile")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        plan = build_engine(
            args.checkpoint,
            precision=args.precision,
            max_batch=args.max_batch,
            cache_dir=args.cache_dir,
            opt_batch=args.opt_batch,
            workspace_mib=args.workspace_mib,
            force=args.force,
        )
    except (PybilayerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
