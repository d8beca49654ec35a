"""Conversion of official saic-violet/bilayer-model checkpoints (issue 3, point 4)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from _tolerances import TOLERANCES
from test_models import NETWORKS, keypoints_batch, parse_official_state_dict, source_batch

from pybilayer.errors import CheckpointError
from pybilayer.models import Bilayer, BilayerAvatar, BilayerConfig
from pybilayer.official import (
    convert_official,
    convert_official_to_file,
    remove_official_spectral_norm,
)

RTOL, ATOL = TOLERANCES["fp32_exact_algebra"]
REQUIRED = ("identity_embedder", "texture_generator", "keypoints_embedder", "inference_generator")
EPOCH = 2225


def write_official(model: Bilayer, directory: Path, epoch: int = EPOCH, networks=NETWORKS) -> Path:
    """Write ``model`` (spectral norm applied) the way the official trainer does: one state dict per network."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in networks:
        torch.save(getattr(model, name).state_dict(), directory / f"{epoch}_{name}.pth")
    return directory


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """A tiny model trained-with-SN stand-in, its official-format files, and its config."""
    torch.manual_seed(0)
    config = BilayerConfig.tiny()
    model = Bilayer(config, spectral_norm=True)
    # Perturb u, v away from the top singular pair so sigma = u^T W v is not just the spectral norm.
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_u"):
                for vector in (module.weight_u, module.weight_v):
                    noise = torch.randn_like(vector) * (0.3 / vector.numel() ** 0.5)
                    vector.copy_(torch.nn.functional.normalize(vector + noise, dim=0))
    directory = write_official(model, tmp_path_factory.mktemp("official") / "checkpoints")
    return model, directory, config


def test_synthetic_released_checkpoint_converts_to_part_b(tmp_path):
    """Random tensors with exactly the Part A keys and shapes (SN buffers included), full size.

    The optional discriminator is left out (its absence is part of the contract, and it saves time)."""
    part_a, part_b = parse_official_state_dict("A"), parse_official_state_dict("B")
    generator = torch.Generator().manual_seed(0)
    originals = {}
    networks = [n for n in NETWORKS if n != "discriminator"]
    for network in networks:
        state = {}
        for key, shape in part_a[network].items():
            if key.endswith("num_batches_tracked"):
                state[key] = torch.tensor(7)
            elif key == "identity_grid":  # the official linspace-midpoint grid
                g = torch.linspace(-1, 1, 257)
                g = (g[1:] + g[:-1]) / 2
                v, u = torch.meshgrid(g, g, indexing="ij")
                state[key] = torch.stack([u, v], 2)[None]
            elif key.endswith("running_var"):
                state[key] = torch.rand(shape, generator=generator) + 0.5
            else:
                state[key] = torch.randn(shape, generator=generator)
        for key in [k for k in state if k.endswith("weight_orig")]:
            # u = W v / |W v| as after a power-iteration step: sigma > 0 and of the right scale.
            base, w = key[: -len("orig")], state[key]
            state[base + "u"] = torch.nn.functional.normalize(w.reshape(w.shape[0], -1) @ state[base + "v"], dim=0)
        originals[network] = state
        torch.save(state, tmp_path / f"{EPOCH}_{network}.pth")
    model = convert_official(tmp_path, EPOCH)
    assert model.texture_enhancer is not None and model.discriminator is None
    assert not model.spectral_norm and not model.training
    for network in networks:
        ours = getattr(model, network).state_dict()
        assert {k: tuple(v.shape) for k, v in ours.items()} == part_b[network], network
        state = originals[network]
        for key in part_b[network]:
            if key.endswith(".weight") and key.replace(".weight", ".weight_orig") in state:
                w_orig = state[key.replace(".weight", ".weight_orig")]
                u = state[key.replace(".weight", ".weight_u")]
                v = state[key.replace(".weight", ".weight_v")]
                sigma = torch.dot(u, w_orig.reshape(w_orig.shape[0], -1) @ v)
                torch.testing.assert_close(ours[key], w_orig / sigma, rtol=1e-5, atol=0.0)
            elif key != "identity_grid":
                assert torch.equal(ours[key], state[key]), key
    assert all(t.dtype == torch.float32 for k, t in model.state_dict().items() if "num_batches" not in k)
    # ... and runs: per-identity params from (small) embeddings, one rendered frame.
    embeds = [0.02 * torch.randn(1, c, 8, 8, generator=generator) for c in model.config.embedding_channels()]
    with torch.no_grad():
        avatar = BilayerAvatar(torch.rand(1, 3, 256, 256, generator=generator) * 2 - 1,
                               model.inference_generator.project(embeds))
        out = model.render(avatar, keypoints_batch(1))
    assert out.image.shape == (1, 3, 256, 256)
    assert all(torch.isfinite(t).all() for t in out)


def test_conversion_equals_torch_remove_spectral_norm():
    layer = torch.nn.utils.spectral_norm(torch.nn.Conv2d(5, 7, 3), eps=1e-7)
    layer.train()
    for _ in range(3):
        layer(torch.randn(1, 5, 8, 8))  # u, v move with power iterations as in training
    layer.eval()
    state = {f"net.0.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
    torch.nn.utils.remove_spectral_norm(layer)
    converted = remove_official_spectral_norm(state)
    assert set(converted) == {"net.0.weight", "net.0.bias"}
    torch.testing.assert_close(converted["net.0.weight"], layer.weight.detach(), rtol=1e-6, atol=1e-7)


def test_converted_tiny_checkpoint_loads_and_runs(official_tiny, tmp_path):
    model, directory, config = official_tiny
    converted = convert_official(directory.parent, EPOCH, config=config)  # run dir: finds checkpoints/
    assert converted.config == config and not converted.spectral_norm
    images, keypoints, masks = source_batch(2)
    targets = keypoints_batch(2, seed=4)
    with torch.no_grad():
        reference = model.render(model.create_avatar(images, keypoints, masks), targets)
        avatar = converted.create_avatar(images, keypoints, masks)
        out = converted.render(avatar, targets)
        enhanced = converted.create_avatar(images, keypoints, masks, enhance=True)
    for field in ("image", "delta_uv", "mask_logits"):
        torch.testing.assert_close(getattr(out, field), getattr(reference, field), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(enhanced.texture).all()
    converted.save(tmp_path / "model.safetensors")
    assert Bilayer.load(tmp_path / "model.safetensors").config == config


def test_harmonic_keypoint_mlp_is_detected_by_shape(tmp_path):
    torch.manual_seed(0)
    config = BilayerConfig.tiny(harmonic_encoding=True, texture_enhancer=False, discriminator=False)
    model = Bilayer(config, spectral_norm=True)
    write_official(model, tmp_path, networks=REQUIRED)
    converted = convert_official(tmp_path, EPOCH, config=BilayerConfig.tiny())
    assert converted.config.harmonic_encoding
    assert tuple(converted.keypoints_embedder.net.mlp[0].weight.shape) == (64, 1088)
    x = keypoints_batch(3)
    with torch.no_grad():
        torch.testing.assert_close(converted.keypoints_embedder(x), model.keypoints_embedder(x), rtol=1e-4, atol=1e-6)


def test_pytorch_1_0_format_with_weight_buffer(official_tiny, tmp_path):
    model, directory, config = official_tiny
    for name in REQUIRED:
        state = torch.load(directory / f"{EPOCH}_{name}.pth", weights_only=True)
        for key in [k for k in state if k.endswith("weight_v")]:
            base = key[: -len("weight_v")]
            w, u, v = state[base + "weight_orig"], state[base + "weight_u"], state.pop(key)
            # PyTorch 1.0 stored the normalised weight; make it differ from W_orig / (u^T W v).
            state[base + "weight"] = w / torch.dot(u, w.reshape(w.shape[0], -1) @ v) * 1.5
        torch.save(state, tmp_path / f"{EPOCH}_{name}.pth")
    converted = convert_official(tmp_path, EPOCH, config=config)
    expected = torch.load(tmp_path / f"{EPOCH}_keypoints_embedder.pth", weights_only=True)["net.mlp.2.weight"]
    assert torch.equal(converted.keypoints_embedder.net.mlp[2].weight, expected)


def test_optional_networks_may_be_absent_or_come_from_the_enhancer_run(official_tiny, tmp_path):
    model, directory, config = official_tiny
    write_official(model, tmp_path / "base", networks=REQUIRED)
    base_only = convert_official(tmp_path / "base", EPOCH, config=config)
    assert base_only.texture_enhancer is None and base_only.discriminator is None
    images, keypoints, _ = source_batch(1)
    with pytest.raises(ValueError, match="no texture enhancer"):
        base_only.create_avatar(images, keypoints, enhance=True)
    write_official(model, tmp_path / "enh", epoch=1225, networks=("texture_enhancer",))
    with_enhancer = convert_official(tmp_path / "base", EPOCH, enhancer_dir=tmp_path / "enh", enhancer_epoch=1225,
                                     config=config)
    assert with_enhancer.texture_enhancer is not None and with_enhancer.discriminator is None
    no_disc = convert_official(directory, EPOCH, config=config, include_discriminator=False)
    assert no_disc.discriminator is None and no_disc.texture_enhancer is not None
    with pytest.raises(CheckpointError, match="texture_enhancer"):
        convert_official(tmp_path / "base", EPOCH, enhancer_dir=tmp_path / "base", enhancer_epoch=1225, config=config)
    with pytest.raises(ValueError, match="together"):
        convert_official(tmp_path / "base", EPOCH, enhancer_dir=tmp_path / "enh", config=config)


def _copy_with(directory: Path, target: Path, network: str, edit) -> Path:
    target.mkdir()
    for path in directory.iterdir():
        state = torch.load(path, weights_only=True)
        if path.name == f"{EPOCH}_{network}.pth":
            edit(state)
        torch.save(state, target / path.name)
    return target


def test_unknown_missing_and_misshaped_keys_are_named(official_tiny, tmp_path):
    _, directory, config = official_tiny
    bad = _copy_with(directory, tmp_path / "unknown", "texture_generator",
                     lambda s: s.__setitem__("gen_tex.extra_layer.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unknown key 'gen_tex\.extra_layer\.bias'"):
        convert_official(bad, EPOCH, config=config)
    bad = _copy_with(directory, tmp_path / "missing", "inference_generator",
                     lambda s: s.pop("gen_inf.heads.2.0.bias"))
    with pytest.raises(CheckpointError, match=r"missing key 'gen_inf\.heads\.2\.0\.bias'"):
        convert_official(bad, EPOCH, config=config)
    bad = _copy_with(directory, tmp_path / "shape", "identity_embedder",
                     lambda s: s.__setitem__("net.enc.0.bias", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"'net\.enc\.0\.bias' has shape \(5,\)"):
        convert_official(bad, EPOCH, config=config)
    bad = _copy_with(directory, tmp_path / "sn", "keypoints_embedder", lambda s: s.pop("net.mlp.4.weight_u"))
    with pytest.raises(CheckpointError, match=r"net\.mlp\.4\.weight_orig has no net\.mlp\.4\.weight_u"):
        convert_official(bad, EPOCH, config=config)
    bad = _copy_with(directory, tmp_path / "grid", "inference_generator",
                     lambda s: s.__setitem__("identity_grid", s["identity_grid"] + 0.01))
    with pytest.raises(CheckpointError, match="identity_grid differs"):
        convert_official(bad, EPOCH, config=config)
    def odd_inputs(state):
        state["net.mlp.0.weight_orig"] = torch.randn(64, 300)
        state["net.mlp.0.weight_v"] = torch.randn(300)

    bad = _copy_with(directory, tmp_path / "inputs", "keypoints_embedder", odd_inputs)
    with pytest.raises(CheckpointError, match="net.mlp.0.weight has 300 inputs"):
        convert_official(bad, EPOCH, config=config)


class _Payload:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("unpickled!",))


def test_corrupt_and_foreign_files_are_rejected(official_tiny, tmp_path):
    _, directory, config = official_tiny
    with pytest.raises(CheckpointError, match="not found"):
        convert_official(tmp_path / "nowhere", EPOCH, config=config)
    target = _copy_with(directory, tmp_path / "absent", "discriminator", lambda s: None)
    (target / f"{EPOCH}_identity_embedder.pth").unlink()
    with pytest.raises(CheckpointError, match="identity_embedder.pth"):
        convert_official(target, EPOCH, config=config)
    for name, content in {
        "garbage": b"this is not a checkpoint",
        "code": pickle.dumps({"net.enc.0.bias": _Payload()}, protocol=2),
    }.items():
        target = _copy_with(directory, tmp_path / name, "discriminator", lambda s: None)
        (target / f"{EPOCH}_texture_generator.pth").write_bytes(content)
        with pytest.raises(CheckpointError, match="texture_generator.pth"):
            convert_official(target, EPOCH, config=config)
    target = _copy_with(directory, tmp_path / "tensor", "discriminator", lambda s: None)
    torch.save(torch.zeros(3), target / f"{EPOCH}_keypoints_embedder.pth")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        convert_official(target, EPOCH, config=config)


def test_convert_official_to_file_writes_a_loadable_model(official_tiny, tmp_path):
    _, directory, config = official_tiny
    output = tmp_path / "model.safetensors"
    model = convert_official_to_file(directory, EPOCH, output, include_discriminator=False, config=config)
    loaded = Bilayer.load(output)
    assert loaded.config == model.config and loaded.discriminator is None
    with pytest.raises(ValueError, match="output directory"):
        convert_official_to_file(directory, EPOCH, tmp_path / "no" / "such" / "dir.safetensors")
