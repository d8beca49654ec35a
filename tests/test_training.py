"""Training runner: a tiny model trains on synthetic clips of a real photo, resumes exactly after
SIGTERM, matches one process under 2-process gloo DDP, and its export renders through the Renderer."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._tolerances import TOLERANCES

pytest.importorskip("skimage", reason="scikit-image provides the test photo (skimage.data.astronaut)")
pytest.importorskip("cv2", reason="opencv-python-headless draws the official stickman")

from training.config import ConfigError, config_from_dict, load_config  # noqa: E402
from training.data import BilayerFrames, StreamBatchSampler, low_discrepancy_frame  # noqa: E402
from training.synthetic_data import write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_dataset(root, "train", persons=2, videos=1, frames=6, canvas=80, crop=IMAGE_SIZE)
    write_dataset(root, "test", persons=1, videos=1, frames=4, canvas=80, crop=IMAGE_SIZE)
    return root


def tiny_config(data_root: Path, output_dir: Path, **overrides):
    values = {
        "output_dir": str(output_dir), "batch_size": 2, "steps": 4, "seed": 3, "progress": False,
        "log_every": 1, "image_every": 2, "checkpoint_every": 100, "eval_every": 0, "eval_batches": 1,
        "standing_stats_batches": 1, "identity_metric": False,
        "data": {"root": str(data_root), "num_workers": 0},
        "model": {"preset": "tiny", "image_size": IMAGE_SIZE},
    }
    for key, value in overrides.items():
        node = values
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return config_from_dict(values)


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory):
    """8 steps of the tiny base model, with evaluation and export at the end."""
    from training.trainer import run

    out = tmp_path_factory.mktemp("run")
    summary = run(tiny_config(data_root, out, steps=8, eval_every=8))
    return out, summary


# ---------------------------------------------------------------------------- configuration


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 8\nlosses:\n  adversarial: 1\ndata:\n  root: /a\n")
    config = load_config(path, ["data.root=/b", "optim.lr=1e-3", "model.overrides={texture_enhancer: false}"])
    assert config.batch_size == 8 and config.data.root == "/b"
    assert config.losses.adversarial == 1.0 and isinstance(config.losses.adversarial, float)
    assert config.optim.lr == 1e-3 and config.optim.beta1 == 0.5 and config.optim.eps == 1e-7
    assert config.model.overrides == {"texture_enhancer": False}
    assert config.losses.feature_matching == 10.0 and config.losses.warp_regulariser == 0.0  # released weights


@pytest.mark.parametrize("overrides, message", [
    (["losses.adversrial=1"], "unknown key"),
    (["batch_size=two"], "expected an integer"),
    (["stage=final"], "not one of"),
    (["amp=1"], "expected true/false"),
    (["batch_size"], "key.sub=value"),
    (["batch_size=0"], "must be > 0"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_train_py_rejects_unknown_keys(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "training" / "train.py"), "no_such_key=1"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "unknown key(s) ['no_such_key']" in result.stderr


# ---------------------------------------------------------------------------- data


def test_loader_reads_layout_with_official_sampling(data_root):
    dataset = BilayerFrames(data_root, "test", IMAGE_SIZE, num_frames=2, shuffle=False, with_stickmen=True)
    assert dataset.has_masks and len(dataset) == 1
    sample = dataset[0]
    assert sample["image"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and sample["keypoints"].shape == (2, 68, 2)
    assert sample["mask"].shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE) and sample["stickman"].shape == (2, 3, 64, 64)
    assert -1 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1
    assert 0 <= float(sample["mask"].min()) and float(sample["mask"].max()) <= 1 and float(sample["mask"].max()) > 0.9
    # The test split starts the sqrt(5) sequence at 0 (released behaviour): draws 1 and 2.
    frames = dataset.items[0].frames
    expected = [frames[int(round(((k + 1) * 5 ** 0.5) % 1 * (len(frames) - 1)))] for k in range(2)]
    stored = [np.load(data_root / "keypoints" / "test" / dataset.items[0].name / f"{s}.npy") for s in expected]
    for k in range(2):
        assert low_discrepancy_frame(k, len(frames), 0.0) == frames.index(expected[k])
        np.testing.assert_allclose(sample["keypoints"][k].numpy(), stored[k] / IMAGE_SIZE * 2 - 1, atol=1e-6)


def test_sampling_is_stateless_and_partitions_over_ranks(data_root):
    a = BilayerFrames(data_root, "train", IMAGE_SIZE, seed=5)
    b = BilayerFrames(data_root, "train", IMAGE_SIZE, seed=5)
    later = [b[g]["keypoints"] for g in (7, 3, 0)]  # any order, any instance: the same sample
    for g, keypoints in zip((7, 3, 0), later):
        torch.testing.assert_close(a[g]["keypoints"], keypoints, rtol=0, atol=0)
    assert not torch.equal(a[0]["image"], a[1]["image"])
    single = list(StreamBatchSampler(6, 0, 1, start_step=2, num_steps=2))
    ranks = [list(StreamBatchSampler(6, r, 3, start_step=2, num_steps=2)) for r in range(3)]
    assert single == [[12, 13, 14, 15, 16, 17], [18, 19, 20, 21, 22, 23]]
    assert [sum((r[s] for r in ranks), []) for s in range(2)] == single
    with pytest.raises(ValueError, match="not divisible"):
        StreamBatchSampler(5, 0, 2)


def test_corrupt_sample_is_skipped_with_warning(data_root, tmp_path, caplog):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(data_root, root)
    dataset = BilayerFrames(root, "train", IMAGE_SIZE, seed=0)
    item = dataset.items[dataset.item_index(0)]
    for stem in item.frames:  # every frame of the first sample's video is broken
        (root / "imgs" / "train" / item.name / f"{stem}.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="pybilayer.training"):
        sample = dataset[0]
    assert sample["image"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert any("skipping corrupt sample" in r.message and "unreadable image" in r.message for r in caplog.records)
    other = next(i for i in dataset.items if i != item)
    np.save(root / "keypoints" / "train" / other.name / f"{other.frames[0]}.npy", np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"keypoints must be \(>=68, >=2\), got shape \(5, 2\)"):
        dataset.load_frame(other, other.frames[0])
    from PIL import Image

    colour = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    colour[..., 0] = 200  # a colour-coded parsing map (issue #10 of the official repository), not a mask
    Image.fromarray(colour).save(root / "segs" / "train" / other.name / f"{other.frames[1]}.png")
    with pytest.raises(ValueError, match="segmentation must be single-channel"):
        dataset.load_frame(other, other.frames[1])


# ---------------------------------------------------------------------------- training


def test_tiny_model_trains_and_losses_fall(trained_run):
    out, summary = trained_run
    assert summary["step"] == 8 and not summary["interrupted"]
    history = summary["history"]
    assert len(history) == 8 and all(np.isfinite(v) for h in history for v in h.values())
    for name in ("loss/perceptual", "loss/pixelwise_lf", "loss/mask_bce"):
        values = [h[name] for h in history]
        assert np.mean(values[-3:]) < np.mean(values[:3]), (name, values)
    assert (out / "checkpoints" / "latest.pt").is_file() and (out / "model.safetensors").is_file()
    if importlib.util.find_spec("tensorboard") is not None:
        events = list((out / "tensorboard").glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 1000  # scalars and the image grid


def test_resume_after_sigterm_equals_uninterrupted_run(data_root, tmp_path):
    from training.trainer import CHECKPOINT_NAME, run

    straight = run(tiny_config(data_root, tmp_path / "straight"))
    assert straight["step"] == 4

    def interrupt(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = run(tiny_config(data_root, tmp_path / "resumed"), after_step=interrupt)
    assert first == {**first, "step": 2, "interrupted": True}
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # stopped before the end: no export
    second = run(tiny_config(data_root, tmp_path / "resumed"), resume=True)
    assert second["step"] == 4 and not second["interrupted"]

    a = torch.load(tmp_path / "straight" / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    assert a["step"] == b["step"] == 4
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for opt in ("optim_g", "optim_d"):
        for index, state in a[opt]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b[opt]["state"][index][name]), (opt, index, name)
    # The resumed run's second half saw exactly the uninterrupted run's last two steps.
    assert straight["history"][2:] == second["history"]

    with pytest.raises(ValueError, match="differs from the checkpoint"):
        run(tiny_config(data_root, tmp_path / "resumed", **{"losses.adversarial": 1.0}), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tiny_config(data_root, tmp_path / "never"), resume=True)


def test_two_process_ddp_matches_one_process(data_root, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) with batch 2+2 equals one process with batch 4. In float64,
    so that the comparison is not swamped by float32 rounding, which the ill-conditioned gradients of
    a freshly initialised texture generator (BatchNorm eps 1e-7) amplify past any useful tolerance."""
    from training.trainer import CHECKPOINT_NAME, run

    common = ["model.preset=tiny", f"model.image_size={IMAGE_SIZE}", f"data.root={data_root}", "data.num_workers=0",
              "batch_size=4", "steps=2", "seed=3", "progress=false", "eval_every=0", "standing_stats_batches=1",
              "precision=float64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 500),
         str(REPO / "training" / "train.py"), *common, f"output_dir={tmp_path / 'ddp'}"],
        capture_output=True, text=True, env=env, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run(load_config(None, common + [f"output_dir={tmp_path / 'single'}"]))

    ddp = torch.load(tmp_path / "ddp" / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    single = torch.load(tmp_path / "single" / "checkpoints" / CHECKPOINT_NAME, weights_only=True)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    rtol, atol = TOLERANCES["ddp_vs_single_fp64"]
    changed = 0
    for key, tensor in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], tensor, rtol=rtol, atol=atol, msg=key)
    # Both really trained: the optimiser moved the weights (Adam state present for every trained tensor).
    for state in single["optim_g"]["state"].values():
        changed += int(state["step"]) == 2
    assert changed == len(single["optim_g"]["state"]) > 100


def test_trained_checkpoint_renders_through_renderer(trained_run, data_root):
    from pybilayer import Renderer
    from pybilayer.geometry import preprocess
    from pybilayer.models import Bilayer
    from pybilayer.synthetic import talking_head_sequence
    from training.synthetic_data import astronaut, make_clip

    out, _ = trained_run
    model = Bilayer.load(out / "model.safetensors")
    assert not model.spectral_norm and model.config.image_size == IMAGE_SIZE
    # The export is the trained state: W = W_orig / (u^T W_orig v) of the training checkpoint.
    state = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["model"]
    prefix = "inference_generator.gen_inf.heads.1.0."
    w = state[prefix + "weight_orig"]
    sigma = torch.dot(state[prefix + "weight_u"], w.reshape(w.shape[0], -1) @ state[prefix + "weight_v"])
    torch.testing.assert_close(model.state_dict()[prefix + "weight"], w / sigma)

    photo, photo_landmarks = astronaut()
    landmarks = talking_head_sequence(3, 96)
    frames, _ = make_clip(photo, photo_landmarks, landmarks, 96)
    renderer = Renderer(out / "model.safetensors", backend="torch", device="cpu")
    avatar = renderer.create_avatar(frames[0], landmarks[0])
    images = renderer.render(avatar, landmarks)
    assert images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert images.std() > 1.0 and not np.array_equal(images[0], images[2])  # poses differ, output is not flat
    # Same numbers as the model itself on the same crops.
    source, source_kp, _ = preprocess(frames[0], landmarks[0], size=IMAGE_SIZE)
    drivers = np.stack([preprocess(frames[0], lm, size=IMAGE_SIZE)[1] for lm in landmarks])
    with torch.no_grad():
        created = model.create_avatar(torch.from_numpy(source)[None], torch.from_numpy(source_kp)[None])
        expected = model.render(created, torch.from_numpy(drivers)[None])
    layers = renderer.render(avatar, landmarks, output="layers")
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    np.testing.assert_allclose(layers.lf, expected.lf[0].numpy(), rtol=rtol, atol=atol)


def test_enhancer_stage_trains_only_the_enhancer(trained_run, data_root, tmp_path):
    from pybilayer.models import Bilayer
    from training.trainer import CHECKPOINT_NAME, run

    out, _ = trained_run
    summary = run(tiny_config(data_root, tmp_path / "enh", stage="enhancer", steps=2,
                              init_checkpoint=str(out / "model.safetensors")))
    assert summary["step"] == 2
    assert set(summary["history"][0]) >= {"loss/adversarial", "loss/feature_matching", "loss/perceptual"}
    assert "loss/pixelwise_lf" not in summary["history"][0]  # no gradient reaches the frozen LF layer
    before = Bilayer.load(out / "model.safetensors").state_dict()
    after = Bilayer.load(tmp_path / "enh" / "model.safetensors").state_dict()
    for key in before:
        if key.startswith(("identity_embedder", "texture_generator", "keypoints_embedder", "inference_generator")):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("texture_enhancer"))
    assert (tmp_path / "enh" / "checkpoints" / CHECKPOINT_NAME).is_file()
