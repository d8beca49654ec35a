"""Train the bi-layer model, or the few-shot talking-head baseline (FSTH) with ``--model fsth``.

    python training/train.py --config training/configs/base.yaml data.root=/data/vox
    python training/train.py --model fsth --config training/configs/fsth.yaml data.root=/data/vox
    torchrun --nproc_per_node 8 training/train.py --config training/configs/base.yaml data.root=/data/vox
    python training/train.py --config ... --resume            # continue exactly where it stopped
    python training/train.py --config training/configs/enhancer.yaml init_checkpoint=runs/base/model.safetensors

Configuration: the dataclasses of training/config.py, from a YAML file plus ``key.sub=value``
overrides (values parsed as YAML); unknown keys and wrong types are errors. Outputs in output_dir:
checkpoints/latest.pt (atomic; model, optimisers, RNG, step), model.safetensors (the generator with
standing BatchNorm statistics and spectral norm removed, for ``Bilayer.load`` and
``pybilayer.Renderer``; with --model fsth the meta-learned FSTH for ``FSTH.load``), tensorboard/ and
train.log. SIGTERM or Ctrl-C saves and exits cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script (also under torchrun): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import ConfigError, load_config  # noqa: E402


def _setup_logging(output_dir: str, rank: int) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", handlers=handlers, force=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train the bi-layer model or the FSTH baseline "
                                     "(see training/config.py for keys).", allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with TrainConfig keys")
    parser.add_argument("--model", choices=("bilayer", "fsth"),
                        help="which model to train (the model_type key; default: the config's, else bilayer)")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest.pt")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. losses.adversarial=0.5")
    args = parser.parse_args(argv)
    try:
        overrides = ([f"model_type={args.model}"] if args.model else []) + args.overrides
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    rank = int(os.environ.get("RANK", "0"))
    _setup_logging(config.output_dir, rank)

    from training.trainer import run

    summary = run(config, resume=args.resume)
    if rank == 0:
        logging.getLogger("pybilayer.training").info(
            "done: step %d%s, %.3g samples/s", summary["step"], " (interrupted)" if summary["interrupted"] else "",
            summary["samples_per_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
