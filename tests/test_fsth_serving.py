"""The few-shot talking-head model served through the Renderer (issue 7 item 4): torch and onnxruntime
backends, avatar files, model detection, mixing models up (its latency benchmark: test_latency_benchmark.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _builders import random_drivers, random_photo
from _tolerances import TOLERANCES, UINT8_MAX_LSB
from pybilayer import Renderer
from pybilayer.backends.fsth import FewShotAvatar
from pybilayer.errors import CheckpointError
from pybilayer.geometry import preprocess
from pybilayer.models import Bilayer, BilayerConfig
from pybilayer.models.fsth import FSTH, FSTHAvatar, FSTHConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_fsth(seed: int) -> FSTH:
    """Random tiny model with attention switched on and random affine norms (fresh blocks are identities)."""
    torch.manual_seed(seed)
    model = FSTH(FSTHConfig.tiny())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(0.5)
            elif "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
        model.projection.matrix.normal_(0.0, 0.3)  # AdaIN parameters that differ visibly between people
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_fsth(5)


@pytest.fixture(scope="module")
def ort(model):
    return Renderer(model, backend="onnxruntime", device="cpu", threads=1)


PHOTO_SIZE = 90


@pytest.fixture(scope="module")
def photo_size() -> int:
    return PHOTO_SIZE


def _photo(seed: int, size: int = PHOTO_SIZE):
    return random_photo(seed, size)


def test_avatar_is_embedder_and_projection_of_the_model(model, reference, avatar):
    photo, landmarks = _photo(1)
    image, keypoints, box = preprocess(photo, landmarks, size=model.config.image_size)
    with torch.no_grad():
        landmark_images = model.draw_landmarks(torch.from_numpy(keypoints)[None])
        expected = model.create_avatar(torch.from_numpy(image)[None], landmark_images)
    assert isinstance(avatar, FewShotAvatar) and avatar.crop_box == tuple(int(v) for v in box)
    assert avatar.adain_params.shape == (1, model.adain_layout.size)
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    torch.testing.assert_close(avatar.adain_params, expected.adain_params, rtol=rtol, atol=atol)
    torch.testing.assert_close(avatar.embedding, expected.embedding, rtol=rtol, atol=atol)


def test_frames_have_the_right_shape_and_follow_the_model(model, reference, avatar, avatar2):
    drivers = random_drivers(4)
    frame = reference.render(avatar, drivers[0])
    frames = reference.render(avatar, drivers)
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    assert np.abs(frames[0].astype(int) - frame).max() <= UINT8_MAX_LSB  # batch of N = N singles
    # the renderer is the model: stickman of each frame's own crop, generator with the avatar's parameters
    keypoints = torch.from_numpy(reference.normalize_landmarks(drivers))
    with torch.no_grad():
        images = model.render(FSTHAvatar(avatar.embedding, avatar.adain_params), model.draw_landmarks(keypoints))
    expected = np.rint(np.clip((images.numpy() + 1) * 127.5, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(frames, expected)  # same batch, same ops: bit for bit, same rounding
    assert frames.std() > 5  # not a flat image
    assert np.abs(frames[0].astype(int) - frames[1]).mean() > 0.5  # the pose drives the frame
    other = reference.render(avatar2, drivers[0])
    assert np.abs(other.astype(int) - frame).mean() > 0.5  # the person does too


def test_onnxruntime_backend_matches_torch(reference, ort, avatar, avatar2):
    assert ort.backend == "onnxruntime" and "FSTH generator graph" in ort.backend_reason
    drivers = random_drivers(3, seed=7)
    keypoints = reference.normalize_landmarks(drivers)
    rtol, atol = TOLERANCES["onnx_fp32"]
    groups = [(avatar, keypoints[:2]), (avatar2, keypoints[2:])]  # two people in one batch, then one alone
    for selection in (groups, groups[:1]):
        expected = reference._backend.run([(reference._prepare(a), k) for a, k in selection])
        got = ort._backend.run([(ort._prepare(a), k) for a, k in selection])
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)
    mixed = [avatar, avatar, avatar2]
    frames_torch, frames_ort = reference.render(mixed, drivers), ort.render(mixed, drivers)
    assert frames_ort.shape == (3, 64, 64, 3) and frames_ort.dtype == np.uint8
    assert np.abs(frames_torch.astype(int) - frames_ort).max() <= UINT8_MAX_LSB
    # frame i of a list is avatar i's single render
    assert np.abs(frames_ort[2].astype(int) - ort.render(avatar2, drivers[2])).max() <= UINT8_MAX_LSB


def test_avatar_save_load_round_trip(reference, ort, avatar, tmp_path, monkeypatch):
    path = tmp_path / "person.avatar"
    avatar.save(path)
    loaded = ort.load_avatar(path)
    assert isinstance(loaded, FewShotAvatar) and loaded.crop_box == avatar.crop_box
    torch.testing.assert_close(loaded.adain_params, avatar.adain_params, rtol=0, atol=0)
    torch.testing.assert_close(loaded.embedding, avatar.embedding, rtol=0, atol=0)
    drivers = random_drivers(2)
    np.testing.assert_array_equal(ort.render(loaded, drivers), ort.render(avatar, drivers))
    # another FSTH model's renderer refuses it, naming why
    other = Renderer(_tiny_fsth(6), backend="torch", device="cpu")
    with pytest.raises(CheckpointError, match="different model"):
        other.load_avatar(path)
    with pytest.raises(CheckpointError, match="different model"):
        other.render(avatar, drivers[0])
    # a failed save leaves the previous file intact
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        avatar.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["person.avatar"]


def test_model_file_is_detected_from_its_metadata(model, reference, avatar, tmp_path):
    path = tmp_path / "fsth.safetensors"
    model.save(path)
    from_file = Renderer(str(path), backend="torch", device="cpu")
    assert "FSTH" in from_file.model_kind and isinstance(from_file.model, FSTH)
    assert from_file.fingerprint == reference.fingerprint  # same weights: avatars carry over
    driver = random_drivers(1)[0]
    np.testing.assert_array_equal(from_file.render(avatar, driver), reference.render(avatar, driver))
    auto = Renderer(str(path), device="cpu")
    assert auto.backend == "onnxruntime" and "skipped" in auto.backend_reason
    random = Renderer(None, backend="torch", device="cpu", config=FSTHConfig.tiny())
    assert isinstance(random.model, FSTH) and random.image_size == 64


def test_avatars_of_the_other_model_are_clear_errors(reference, avatar, tmp_path):
    torch.manual_seed(0)
    bilayer = Renderer(Bilayer(BilayerConfig.tiny(64, discriminator=False)), backend="torch", device="cpu")
    bilayer_avatar = bilayer.create_avatar(*_photo(1))
    drivers = random_drivers(1)[0]
    with pytest.raises(TypeError, match="serves the few-shot talking-head .* avatar of the bi-layer model"):
        reference.render(bilayer_avatar, drivers)
    with pytest.raises(TypeError, match="serves the bi-layer model, got an avatar of the few-shot"):
        bilayer.render(avatar, drivers)
    with pytest.raises(TypeError, match="bi-layer"):
        reference.render([avatar, bilayer_avatar], random_drivers(2))
    bilayer_avatar.save(tmp_path / "bilayer.avatar")
    avatar.save(tmp_path / "fsth.avatar")
    with pytest.raises(CheckpointError, match="is a bi-layer avatar"):
        reference.load_avatar(tmp_path / "bilayer.avatar")
    with pytest.raises(CheckpointError, match="avatar of the few-shot"):
        bilayer.load_avatar(tmp_path / "fsth.avatar")


def test_unsupported_options_are_named(model, reference, avatar):
    drivers = random_drivers(1)[0]
    with pytest.raises(ValueError, match="output='layers' is not available for the few-shot"):
        reference.render(avatar, drivers, output="layers")
    with pytest.raises(ValueError, match="background is not available"):
        reference.render(avatar, drivers, background=(0, 0, 0))
    with pytest.raises(ValueError, match="enhance"):
        reference.create_avatar(*_photo(1), enhance=True)
    with pytest.raises(TypeError, match="FewShotAvatar"):
        reference.render("me.avatar", drivers)
    with pytest.raises(ValueError, match="spectral norm"):
        Renderer(FSTH(FSTHConfig.tiny(), spectral_norm=True), backend="torch", device="cpu")


def test_few_shot_avatar_averages_the_embeddings_of_k_photos(model, reference, avatar):
    (photo1, landmarks1), (photo2, landmarks2) = _photo(1), _photo(4, size=110)
    two_shot = reference.create_avatar([photo1, photo2], [landmarks1, landmarks2])
    crops = [preprocess(p, lm, size=model.config.image_size) for p, lm in ((photo1, landmarks1), (photo2, landmarks2))]
    frames = torch.from_numpy(np.stack([c[0] for c in crops]))
    keypoints = torch.from_numpy(np.stack([c[1] for c in crops]))
    with torch.no_grad():
        per_frame = model.embedder.embed_frames(frames, model.draw_landmarks(keypoints))
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    torch.testing.assert_close(two_shot.embedding, per_frame.mean(dim=0, keepdim=True), rtol=rtol, atol=atol)
    torch.testing.assert_close(two_shot.adain_params, model.projection(two_shot.embedding), rtol=rtol, atol=atol)
    assert two_shot.crop_box == avatar.crop_box  # the first photo's
    assert (two_shot.embedding - avatar.embedding).abs().max() > 1e-3  # the second photo counts
    with pytest.raises(ValueError, match="2 photos but 1 landmark sets"):
        reference.create_avatar([photo1, photo2], [landmarks1])
    with pytest.raises(ValueError, match=r"photo\[1\] must be a uint8"):
        reference.create_avatar([photo1, photo2.astype(np.float32)], [landmarks1, landmarks2])
    torch.manual_seed(0)
    bilayer = Renderer(Bilayer(BilayerConfig.tiny(64, discriminator=False)), backend="torch", device="cpu")
    with pytest.raises(ValueError, match="bi-layer model makes an avatar from one photo, got 2"):
        bilayer.create_avatar([photo1, photo2], [landmarks1, landmarks2])
