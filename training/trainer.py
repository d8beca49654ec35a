"""The training runner: both stages, one process or DistributedDataParallel, resumable.

``Runner`` is the loop (checkpoints, resume, signals, logging, evaluation and export) for either model;
``BilayerTrainer`` is the bi-layer model's part, ``training.fsth.FSTHRunner`` the few-shot baseline's
(``model_type: fsth``). ``run`` picks one.

Stage "base" trains identity_embedder, texture_generator, keypoints_embedder, inference_generator
and the discriminator with the released losses. Stage "enhancer" starts from a base run, freezes the
base networks (eval mode, standing statistics) and trains texture_enhancer + discriminator, with the
corrections the released script needed (official_bilayer.md 3.2): the predictions on the source
frames feed the enhancer, the discriminator judges the *enhanced* image, and the perceptual loss is
taken on the enhanced image with its low-frequency layer detached.

One step (both stages), as released: D is updated from real vs detached fake; the G terms go through
a second D pass with D's parameters frozen; every optimiser steps once. Differences from the released
code, on purpose: relativistic means are taken over the global batch (exact DDP equivalence), the data
stream is stateless (exact resume), and evaluation/export use a copy of the generator with standing
BatchNorm statistics, so they never perturb training.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pybilayer.fileio import atomic_path
from training import losses as L
from training.config import TrainConfig, bilayer_config, config_from_dict, config_to_dict
from training.data import BilayerFrames, StreamBatchSampler
from training.distributed import DistContext, batchnorm_layers, convert_batchnorm
from training.perceptual import LPIPS, build_perceptual_terms

log = logging.getLogger("pybilayer.training")

CHECKPOINT_NAME = "latest.pt"
EXPORT_NAME = "model.safetensors"
BASE_NETWORKS = ("identity_embedder", "texture_generator", "keypoints_embedder", "inference_generator")
# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = {"steps", "log_every", "image_every", "checkpoint_every", "eval_every", "eval_batches",
                     "progress", "identity_metric", "data.num_workers", "output_dir", "data.root"}


class StopRequested:
    """SIGTERM / SIGINT set a flag; the loop saves at the end of the current step and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class GeneratorStep(nn.Module):
    """The generator side of one step, as a module for DistributedDataParallel to wrap."""

    def __init__(self, model: nn.Module, enhance: bool):
        super().__init__()
        self.model = model
        self.enhance = enhance

    def forward(self, source_image: Tensor, source_keypoints: Tensor, source_mask: Optional[Tensor],
                target_keypoints: Tensor):
        avatar = self.model.create_avatar(source_image, source_keypoints, source_mask, enhance=self.enhance)
        return self.model.render(avatar, target_keypoints)


class DiscriminatorStep(nn.Module):
    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, images: Tensor, stickmen: Tensor):
        return self.discriminator(images, stickmen)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(obj):
    """torch.load(weights_only=True) returns lists where tuples were saved; random.setstate needs tuples."""
    if isinstance(obj, list):
        return tuple(_tuplify(x) for x in obj)
    return obj


def atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path, make_parents=True) as tmp:
        torch.save(obj, tmp)


def _flatten_config(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "overrides":
            out.update(_flatten_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def image_grid(rows: list[Tensor]) -> Tensor:
    """(3, H, W) in [0, 1]: each row is a list of (N, 3, S, S) columns, N samples stacked vertically."""
    columns = [c.detach().float().clamp(-1, 1).add(1).div(2).cpu() for c in rows]
    per_sample = torch.cat(columns, dim=3)  # (N, 3, S, S * cols)
    return torch.cat(list(per_sample), dim=1)


class Runner:
    """The training loop of one process (one rank of a torchrun job, or alone), for either model:
    checkpoints (atomic), exact resume, SIGTERM/Ctrl-C, TensorBoard, progress, evaluation and export.

    A subclass supplies the model through ``build(checkpoint)`` (model, optimisers, ``train_set``,
    ``dtype``; the checkpoint's training state when resuming), ``train_step(batch) -> (scalars named
    loss/..., images for the preview grid)``, ``training_state()`` (the checkpoint's model and optimiser
    part), ``inference_copy()`` (a model with ``save``), ``test_set()`` and ``predict(model, batch,
    has_masks) -> (fake, real)`` for evaluation, ``run_name`` and ``progress_keys`` for the progress bar.
    """

    progress_keys: tuple[str, ...] = ()

    def __init__(self, config: TrainConfig, ctx: DistContext, resume: bool = False,
                 after_step: Optional[Callable[[int], None]] = None):
        self.config = config
        self.ctx = ctx
        self.after_step = after_step
        self.device = ctx.device
        self.output_dir = Path(config.output_dir)
        self.checkpoint_path = self.output_dir / "checkpoints" / CHECKPOINT_NAME
        if config.batch_size % ctx.world_size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {ctx.world_size} processes")
        self.local_batch = config.batch_size // ctx.world_size

        checkpoint = None
        if resume:
            if not self.checkpoint_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}")
            checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
            self._check_resumable(checkpoint)
        self.build(checkpoint)
        self.step = 0
        if checkpoint is not None:
            self.step = int(checkpoint["step"])
            states = checkpoint["rng"]
            state = states[ctx.rank] if len(states) == ctx.world_size else states[0]
            state["python"] = _tuplify(state["python"])
            _set_rng_state(state)
            if ctx.is_main:
                log.info("resumed from %s at step %d", self.checkpoint_path, self.step)
        self.writer = self._summary_writer() if ctx.is_main else None

    # ------------------------------------------------------------------ the model's part
    @property
    def run_name(self) -> str:
        raise NotImplementedError

    def build(self, checkpoint: Optional[dict]) -> None:
        raise NotImplementedError

    def train_step(self, batch: dict) -> tuple[dict[str, float], dict[str, Tensor]]:
        raise NotImplementedError

    def training_state(self) -> dict:
        raise NotImplementedError

    def inference_copy(self) -> nn.Module:
        raise NotImplementedError

    def test_set(self) -> BilayerFrames:
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: dict, has_masks: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ set-up helpers
    def _check_resumable(self, checkpoint: dict) -> None:
        saved = _flatten_config(checkpoint["config"])
        now = _flatten_config(config_to_dict(self.config))
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise ValueError(f"--resume: the configuration differs from the checkpoint's in {changed}; "
                             "resume with the same settings (only steps, logging, workers may change)")
        if checkpoint["world_size"] * int(checkpoint["local_batch"]) != self.config.batch_size:
            raise ValueError("--resume: global batch differs from the checkpoint's")

    def _summary_writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: no TensorBoard logs")
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))

    def _loader(self, dataset: BilayerFrames, start_step: int, num_steps: Optional[int], workers: int) -> DataLoader:
        sampler = StreamBatchSampler(self.config.batch_size, self.ctx.rank, self.ctx.world_size, start_step, num_steps)
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        states = [None] * self.ctx.world_size
        if self.ctx.distributed:
            dist.all_gather_object(states, _rng_state())
        else:
            states = [_rng_state()]
        if self.ctx.is_main:
            atomic_torch_save({
                **self.training_state(),
                "step": self.step,
                "rng": states,
                "world_size": self.ctx.world_size,
                "local_batch": self.local_batch,
                "config": config_to_dict(self.config),
            }, self.checkpoint_path)
            log.info("checkpoint: step %d -> %s", self.step, self.checkpoint_path)
        self.ctx.barrier()

    # ------------------------------------------------------------------ evaluation, export
    def evaluate_and_export(self, export: bool = True) -> dict[str, float]:
        copy = self.inference_copy()
        metrics: dict[str, float] = {}
        if self.ctx.is_main:
            if self.config.eval_batches and self.config.eval_every:
                metrics = self.evaluate(copy)
                for key, value in metrics.items():
                    if self.writer is not None:
                        self.writer.add_scalar(f"eval/{key}", value, self.step)
                log.info("eval at step %d: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if export:
                path = self.output_dir / EXPORT_NAME
                copy.to("cpu", torch.float32).save(path)
                log.info("exported the model to %s (%s.load)", path, type(copy).__name__)
        self.ctx.barrier()
        return metrics

    def evaluate(self, model) -> dict[str, float]:
        from training.metrics import IdentitySimilarity, psnr, ssim

        try:
            test_set = self.test_set()
        except FileNotFoundError as exc:
            log.warning("no evaluation: %s", exc)
            return {}
        lpips = LPIPS().to(self.device, self.dtype)
        identity = IdentitySimilarity.create() if self.config.identity_metric else None
        sampler = StreamBatchSampler(self.local_batch, 0, 1, 0, self.config.eval_batches)
        totals: dict[str, list[Tensor]] = {"lpips": [], "ssim": [], "psnr": []}
        if identity is not None:
            totals["identity_similarity"] = []
        with torch.no_grad():
            for batch in DataLoader(test_set, batch_sampler=sampler, num_workers=0):
                batch = {k: v.to(self.device, self.dtype if v.is_floating_point() else None)
                         for k, v in batch.items()}
                fake, real = self.predict(model, batch, test_set.has_masks)
                totals["lpips"].append(lpips(fake.clamp(-1, 1), real).cpu())
                totals["ssim"].append(ssim(fake, real).cpu())
                totals["psnr"].append(psnr(fake, real).cpu())
                if identity is not None:
                    totals["identity_similarity"].append(identity(fake, real, batch["keypoints"][:, -1]))
        return {k: float(torch.cat(v).mean()) for k, v in totals.items() if v}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.config
        if self.step >= cfg.steps:
            log.info("nothing to do: step %d >= steps %d", self.step, cfg.steps)
            return {"step": self.step, "interrupted": False}
        loader = self._loader(self.train_set, self.step, cfg.steps - self.step, cfg.data.num_workers)
        bar = None
        if self.ctx.is_main and cfg.progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                           desc=self.run_name)
            except ImportError:
                pass
        interrupted = False
        history: deque[dict[str, float]] = deque(maxlen=10000)
        start_time, start_step = time.perf_counter(), self.step
        last_log_time, last_log_step = start_time, self.step
        with StopRequested() as stop:
            for batch in loader:
                scalars, visuals = self.train_step(batch)
                self.step += 1
                history.append(scalars)
                if not all(math.isfinite(v) for v in scalars.values()):
                    raise FloatingPointError(f"non-finite loss at step {self.step}: {scalars}")
                if self.ctx.is_main:
                    self._log(scalars, visuals, bar)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        now = time.perf_counter()
                        rate = (self.step - last_log_step) * cfg.batch_size / max(now - last_log_time, 1e-9)
                        last_log_time, last_log_step = now, self.step
                        log.info("step %d/%d  %.3g samples/s (%.3g s/step)  %s", self.step, cfg.steps, rate,
                                 cfg.batch_size / rate,
                                 "  ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()))
                        if self.writer is not None:
                            self.writer.add_scalar("throughput/samples_per_s", rate, self.step)
                if self.after_step is not None:
                    self.after_step(self.step)
                if self._agree(stop.requested):
                    interrupted = True
                    self.save_checkpoint()
                    log.warning("stopped at step %d; continue with --resume", self.step)
                    break
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.evaluate_and_export(export=True)
        elapsed = time.perf_counter() - start_time
        if bar is not None:
            bar.close()
        if not interrupted:
            self.save_checkpoint()
            self.evaluate_and_export(export=True)
        if self.writer is not None:
            self.writer.flush()
        steps_done = self.step - start_step
        return {"step": self.step, "interrupted": interrupted, "history": list(history),
                "samples_per_s": steps_done * cfg.batch_size / elapsed if steps_done else 0.0}

    def _agree(self, flag: bool) -> bool:
        """Every rank stops at the same step: a stop request on any rank stops all."""
        if not self.ctx.distributed:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def _log(self, scalars: dict, visuals: dict, bar) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k[5:][:10]: f"{v:.3f}" for k, v in scalars.items() if k in self.progress_keys})
        if self.writer is None:
            return
        if self.step % self.config.log_every == 0 or self.step == 1:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, self.step)
        if self.step % self.config.image_every == 0 or self.step == 1:
            n = min(4, next(iter(visuals.values())).shape[0])
            columns = [image[:n] for image in visuals.values()]
            self.writer.add_image(f"train/{'|'.join(visuals)}", image_grid(columns), self.step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class BilayerTrainer(Runner):
    """The bi-layer model's part of the runner: either stage, one process or DistributedDataParallel."""

    progress_keys = ("loss/generator_total", "loss/discriminator", "loss/perceptual")

    @property
    def run_name(self) -> str:
        return f"train {self.config.stage}"

    def build(self, checkpoint: Optional[dict]) -> None:
        from pybilayer.models import Bilayer
        from pybilayer.models.spectral import apply_spectral_norm, normalize_random_init_

        config, ctx = self.config, self.ctx
        self.enhance = config.stage == "enhancer"
        self.model_config = bilayer_config(config.model)
        if self.enhance and not self.model_config.texture_enhancer:
            raise ValueError("stage=enhancer needs a model with a texture enhancer (model.overrides.texture_enhancer)")
        if not self.model_config.discriminator:
            raise ValueError("training needs the discriminator (model.overrides.discriminator must stay true)")

        torch.manual_seed(config.seed)
        model = Bilayer(self.model_config, spectral_norm=False)
        spectral = self.spectral_networks() if config.spectral_norm else ()
        if checkpoint is not None:
            for name in spectral:
                apply_spectral_norm(getattr(model, name), self.model_config.eps)
            model.load_state_dict(checkpoint["model"])
        else:
            if config.init_checkpoint:
                self._load_init(model, config.init_checkpoint)
            for name in spectral:  # converged u, v; weights divided by their spectral norm (about 1 if trained so)
                apply_spectral_norm(getattr(model, name), self.model_config.eps)
                normalize_random_init_(getattr(model, name), eps=self.model_config.eps)
        self.dtype = torch.float64 if config.precision == "float64" else torch.float32
        if config.amp and self.dtype == torch.float64:
            raise ValueError("amp=true and precision=float64 exclude each other")
        model.to(device=self.device, dtype=self.dtype)
        refresh_spectral_weights(model)
        if ctx.distributed:
            convert_batchnorm(model, self.device)
        self.model = model

        trained = ["texture_enhancer"] if self.enhance else list(BASE_NETWORKS)
        for name in BASE_NETWORKS + ("texture_enhancer",):
            module = getattr(model, name)
            if module is not None:
                module.requires_grad_(name in trained)
                module.train(name in trained)
        model.discriminator.train()
        # The last embedder block contributes only its block_feats (the embedding); its main path and
        # skip produce an output nothing reads, so those parameters never get a gradient (as released).
        last = len(model.identity_embedder.net.dec_blocks) - 1
        dead = (f"identity_embedder.net.dec_blocks.{last}.block.", f"identity_embedder.net.dec_blocks.{last}.skip.")
        self.generator_parameters = [p for n, p in model.named_parameters()
                                     if n.startswith(tuple(trained)) and not n.startswith(dead)]
        trained_ids = {id(p) for p in self.generator_parameters}

        self.g_step = GeneratorStep(model, self.enhance)
        self.d_step = DiscriminatorStep(model.discriminator)
        if ctx.distributed:
            ignore = [f"model.{n}" for n, p in model.named_parameters() if id(p) not in trained_ids]
            ignore += [f"model.{n}" for n, _ in model.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.g_step, ignore)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.g_ddp = DistributedDataParallel(self.g_step, device_ids=device_ids, broadcast_buffers=False)
            self.d_ddp = DistributedDataParallel(self.d_step, device_ids=device_ids, broadcast_buffers=False)
        else:
            self.g_ddp, self.d_ddp = self.g_step, self.d_step

        o = config.optim
        self.opt_g = torch.optim.Adam(self.generator_parameters, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp and self.device.type == "cuda")

        p = config.perceptual
        self.perceptual, self.perceptual_face, what = build_perceptual_terms(
            p.vgg19_weights, p.vggface_weights, p.vgg16_weights)
        self.perceptual.to(device=self.device, dtype=self.dtype)
        if self.perceptual_face is not None:
            self.perceptual_face.to(device=self.device, dtype=self.dtype)
        if ctx.is_main:
            log.info("perceptual loss: %s", what)

        self.train_set = BilayerFrames(config.data.root, config.data.train_split, self.model_config.image_size,
                                       num_frames=2, shuffle=True, seed=config.seed,
                                       max_retries=config.data.max_retries, with_stickmen=True)
        self.has_masks = self.train_set.has_masks
        if not self.has_masks and ctx.is_main:
            log.warning("data has no segs tree: mask BCE is off and sources are not masked")

        if checkpoint is not None:
            self.opt_g.load_state_dict(checkpoint["optim_g"])
            self.opt_d.load_state_dict(checkpoint["optim_d"])
            if checkpoint["scaler"]:
                self.scaler.load_state_dict(checkpoint["scaler"])

    def training_state(self) -> dict:
        return {"model": self.model.state_dict(), "optim_g": self.opt_g.state_dict(),
                "optim_d": self.opt_d.state_dict(), "scaler": self.scaler.state_dict(),
                "model_config": self.model_config.to_dict()}

    # ------------------------------------------------------------------ set-up helpers
    def spectral_networks(self) -> tuple[str, ...]:
        """Networks trained with spectral norm: all of them in the base stage (as released); in the
        enhancer stage the trained ones only, so the frozen base networks keep their exact weights."""
        if self.enhance:
            return ("texture_enhancer", "discriminator")
        return BASE_NETWORKS + ("discriminator",) + (("texture_enhancer",) if self.model_config.texture_enhancer else ())

    def _load_init(self, model: nn.Module, path: str) -> None:
        """Weights from a model file (.safetensors) or a training checkpoint (.pt), spectral norm folded."""
        from pybilayer.models import Bilayer

        if str(path).endswith(".safetensors"):
            source = Bilayer.load(path)
            if source.config != self.model_config:
                raise ValueError(f"init_checkpoint {path}: its model configuration differs from model.*")
            state = folded_state_dict(source)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            state = folded_state_dict(checkpoint["model"])
        model.load_state_dict(state)
        if self.ctx.is_main:
            log.info("initialised from %s", path)

    def _autocast(self):
        if not self.config.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ one step
    def _split(self, batch: dict) -> dict:
        batch = {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in batch.items()}
        return {
            "source_image": batch["image"][:, 0], "source_keypoints": batch["keypoints"][:, 0],
            "source_mask": batch["mask"][:, 0] if self.has_masks else None,
            "target_image": batch["image"][:, 1], "target_keypoints": batch["keypoints"][:, 1],
            "target_mask": batch["mask"][:, 1], "target_stickman": batch["stickman"][:, 1],
            "source_stickman": batch["stickman"][:, 0],
        }

    def train_step(self, batch: dict) -> tuple[dict[str, float], dict]:
        cfg, w = self.config, self.config.losses
        b = self._split(batch)
        with self._autocast():
            out = self.g_ddp(b["source_image"], b["source_keypoints"], b["source_mask"], b["target_keypoints"])
            fake, lf = out.image, out.lf
            fake_lf_detached = out.lf.detach() + out.hf
            target = b["target_image"]
            if cfg.apply_masks:
                fake, lf, fake_lf_detached, target = (
                    L.composite_on_background(x, out.mask) for x in (fake, lf, fake_lf_detached, target))
            stickmen = torch.cat([b["target_stickman"]] * 2)
            scores, _ = self.d_ddp(torch.cat([target, fake.detach()]), stickmen)
            real_scores, fake_scores = scores.to(self.dtype).chunk(2)
            loss_d = w.adversarial * L.ragan_hinge_discriminator(real_scores, fake_scores)
        self.scaler.scale(loss_d).backward()

        with self._autocast():
            self.d_step.discriminator.requires_grad_(False)
            try:
                scores, feats = self.d_step(torch.cat([target, fake]), stickmen)
            finally:
                self.d_step.discriminator.requires_grad_(True)
            real_scores, fake_scores = scores.to(self.dtype).chunk(2)
            pairs = [f.to(self.dtype).chunk(2) for f in feats]
            terms = {
                "adversarial": L.ragan_hinge_generator(real_scores, fake_scores),
                "feature_matching": L.feature_matching([r for r, _ in pairs], [f for _, f in pairs]),
            }
        terms["perceptual"] = self.perceptual(fake_lf_detached.to(self.dtype), target.to(self.dtype))
        if self.perceptual_face is not None:
            terms["perceptual_face"] = self.perceptual_face(fake_lf_detached.to(self.dtype), target.to(self.dtype))
        if not self.enhance:  # the LF layer, mask and warp get no gradient in the enhancer stage
            terms["pixelwise_lf"] = L.pixelwise_l1(lf.to(self.dtype), target.to(self.dtype))
            if self.has_masks:
                terms["mask_bce"] = L.mask_bce(out.mask_logits.to(self.dtype), b["target_mask"])
            if w.warp_regulariser:
                terms["warp_regulariser"] = L.warp_regulariser(out.delta_uv.to(self.dtype))
        loss_g = sum(getattr(w, name) * value for name, value in terms.items())
        self.scaler.scale(loss_g).backward()

        self.scaler.step(self.opt_g)
        self.scaler.step(self.opt_d)
        self.scaler.update()
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)

        scalars = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        scalars["loss/discriminator"] = float(loss_d.detach())
        scalars["loss/generator_total"] = float(loss_g.detach())
        visuals = {"source": b["source_image"], "stickman": b["target_stickman"], "lf": out.lf, "hf": out.hf,
                   "output": out.image, "target": b["target_image"]}
        return scalars, visuals

    # ------------------------------------------------------------------ standing statistics, eval
    def test_set(self) -> BilayerFrames:
        return BilayerFrames(self.config.data.root, self.config.data.test_split, self.model_config.image_size,
                             num_frames=2, shuffle=False, seed=self.config.seed, with_stickmen=False)

    def predict(self, model, batch: dict, has_masks: bool) -> tuple[Tensor, Tensor]:
        masks = batch["mask"] if has_masks else None
        avatar = model.create_avatar(batch["image"][:, 0], batch["keypoints"][:, 0],
                                     masks[:, 0] if masks is not None else None, enhance=self.enhance)
        out = model.render(avatar, batch["keypoints"][:, 1])
        fake, real = out.image, batch["image"][:, 1]
        if self.config.apply_masks:
            fake = L.composite_on_background(fake, out.mask)
            if masks is not None:
                real = L.composite_on_background(real, masks[:, 1])
        return fake, real

    def inference_copy(self):
        """A copy of the model without spectral norm, with standing BatchNorm statistics, in eval mode."""
        from pybilayer.models import Bilayer

        copy = Bilayer.from_state_dict(self.model_config, folded_state_dict(self.model))
        copy.to(device=self.device, dtype=self.dtype)
        if self.ctx.distributed:
            convert_batchnorm(copy, self.device)
        copy.requires_grad_(False)
        networks = [getattr(copy, n) for n in BASE_NETWORKS + ("texture_enhancer",) if getattr(copy, n) is not None]
        if self.config.standing_stats_batches:
            standing = networks if not self.enhance else []  # the enhancer has no BatchNorm; base nets are frozen
            layers = [bn for net in standing for bn in batchnorm_layers(net)]
            momenta = [bn.momentum for bn in layers]
            for bn in layers:
                bn.reset_running_stats()
                bn.momentum = None  # cumulative average over the batches below
            for net in standing:
                net.train()
            loader = self._loader(self.train_set, self.step, self.config.standing_stats_batches, 0)
            with torch.no_grad():
                for batch in loader:
                    b = self._split(batch)
                    avatar = copy.create_avatar(b["source_image"], b["source_keypoints"], b["source_mask"],
                                                enhance=self.enhance)
                    copy.render(avatar, b["target_keypoints"])
            for bn, momentum in zip(layers, momenta):
                bn.momentum = momentum
        return copy.eval()

def refresh_spectral_weights(model: nn.Module) -> None:
    """Old-style spectral norm caches ``weight`` as a plain attribute, recomputed only in forward;
    ``Module.to`` does not convert it. Recompute it so code that reads ``.weight`` before a forward
    (e.g. for its dtype) sees the converted tensor."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_orig"):
                w = module.weight_orig
                sigma = torch.dot(module.weight_u, w.reshape(w.shape[0], -1) @ module.weight_v)
                module.weight = w / sigma


def folded_state_dict(source) -> dict[str, Tensor]:
    """A module's (or state dict's) tensors, copied, with every spectral-normalised weight replaced by
    ``weight_orig / (u^T weight_orig v)``, the weight its forward uses without power iteration."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    out = {}
    for key, tensor in state.items():
        if key.endswith(("weight_u", "weight_v")):
            continue
        if key.endswith("weight_orig"):
            base = key[: -len("_orig")]
            u, v = state[base + "_u"], state[base + "_v"]
            sigma = torch.dot(u, tensor.reshape(tensor.shape[0], -1) @ v)
            out[base] = (tensor / sigma).detach().clone()
        else:
            out[key] = tensor.detach().clone()
    return out


def run(config: TrainConfig, resume: bool = False, after_step: Optional[Callable[[int], None]] = None) -> dict:
    """Train in this process (reads torchrun's environment for the rank); returns a summary."""
    from training.distributed import init_distributed

    ctx = init_distributed(config.device)
    if ctx.is_main:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    if config.model_type == "fsth":
        from training.fsth import FSTHRunner as runner_class
    else:
        runner_class = BilayerTrainer
    trainer = runner_class(config, ctx, resume=resume, after_step=after_step)
    try:
        return trainer.fit()
    finally:
        trainer.close()


__all__ = ["Runner", "BilayerTrainer", "run", "config_from_dict"]
