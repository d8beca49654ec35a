"""Networks of issue 3: official structure (counts, keys, shapes), explicit per-identity parameters,
and the behaviour of the model API. Behaviour runs on the tiny configuration; the released
configuration is built on the meta device (no weights, no compute) wherever only structure matters."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _tolerances import TOLERANCES

from pybilayer.errors import CheckpointError
from pybilayer.geometry import crop_box, normalize_keypoints
from pybilayer.models import (
    AdaConvParams,
    Bilayer,
    BilayerAvatar,
    BilayerConfig,
    InferenceParams,
    RenderOutput,
)
from pybilayer.models.inference_generator import InferenceGenerator, inference_params_from_heads
from pybilayer.models.spectral import normalize_random_init_
from pybilayer.models.texture_generator import TextureGenerator, texture_params_from_heads
from pybilayer.models.warp import identity_grid, sample_texture
from pybilayer.synthetic import random_landmarks

NETWORKS = (
    "identity_embedder",
    "texture_generator",
    "keypoints_embedder",
    "inference_generator",
    "texture_enhancer",
    "discriminator",
)
OFFICIAL_COUNTS = {
    "identity_embedder": 31_442_304,
    "texture_generator": 55_664_993,
    "keypoints_embedder": 1_219_328,
    "inference_generator": 4_123_782 + 7_720_286,
    "texture_enhancer": 2_715_331,
    "discriminator": 19_517_633,
}
STATE_DICT_LIST = Path(__file__).parent / "data" / "official_state_dict.txt"
RTOL, ATOL = TOLERANCES["fp32_exact_algebra"]


def parse_official_state_dict(part: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """Part "A" (as saved, with spectral norm) or "B" (after removal): {network: {key: shape}}."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for line in STATE_DICT_LIST.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        prefix, rest = line.split(":: ", 1)
        key, shape, _dtype = rest.split("\t")
        if prefix.endswith(".pth") != (part == "A"):
            continue
        dims = tuple(int(d) for d in re.findall(r"\d+", shape))
        out.setdefault(prefix.removesuffix(".pth"), {})[key] = dims
    return out


def meta_model(**kwargs) -> Bilayer:
    config = kwargs.pop("config", BilayerConfig())
    with torch.device("meta"):
        return Bilayer(config, init_weights=False, **kwargs)


def keypoints_batch(n: int, seed: int = 0) -> torch.Tensor:
    landmarks = random_landmarks(n, 256, seed=seed)
    return torch.from_numpy(np.stack([normalize_keypoints(lm, crop_box(lm)) for lm in landmarks]))


@pytest.fixture(scope="module")
def tiny_model() -> Bilayer:
    torch.manual_seed(0)
    return Bilayer(BilayerConfig.tiny())


def source_batch(b: int, size: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    masks = torch.rand(b, 1, size, size, generator=g)
    return images, keypoints_batch(b, seed), masks


# --------------------------------------------------------------------------- structure (released config)
def test_parameter_counts_equal_official():
    model = meta_model()
    for name in NETWORKS:
        count = sum(p.numel() for p in getattr(model, name).parameters())
        assert count == OFFICIAL_COUNTS[name], name
    inference = model.inference_generator
    assert sum(p.numel() for p in inference.gen_inf.parameters()) == 4_123_782
    assert sum(p.numel() for p in inference.prj_inf.parameters()) == 7_720_286


def test_state_dict_keys_and_shapes_equal_part_b():
    official = parse_official_state_dict("B")
    assert set(official) == set(NETWORKS)
    model = meta_model()
    for name in NETWORKS:
        ours = {k: tuple(v.shape) for k, v in getattr(model, name).state_dict().items()}
        assert ours == official[name], name


def test_spectral_norm_state_dict_equals_part_a():
    official = parse_official_state_dict("A")
    model = meta_model(spectral_norm=True)
    assert model.spectral_norm
    for name in NETWORKS:
        ours = {k: tuple(v.shape) for k, v in getattr(model, name).state_dict().items()}
        assert ours == official[name], name


def test_harmonic_keypoint_variant_matches_appendix():
    model = meta_model(config=BilayerConfig(harmonic_encoding=True, texture_enhancer=False, discriminator=False))
    state = model.keypoints_embedder.state_dict()
    assert tuple(state["frequencies"].shape) == (1, 1, 4)
    assert tuple(state["net.mlp.0.weight"].shape) == (256, 1088)
    assert sum(p.numel() for p in model.keypoints_embedder.parameters()) == 1_463_040
    assert model.texture_enhancer is None and model.discriminator is None


def test_discriminator_returns_score_map_and_six_block_features():
    model = meta_model()
    images = torch.empty(2, 3, 256, 256, device="meta")
    scores, feats = model.discriminator(images, images)
    assert tuple(scores.shape) == (2, 1, 8, 8)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (128, 256, 256), (256, 128, 128), (512, 64, 64), (512, 32, 32), (512, 16, 16), (512, 8, 8)]


def test_every_conv_and_linear_gets_spectral_norm(tiny_model):
    model = Bilayer(BilayerConfig.tiny(), spectral_norm=True)
    layers = [m for m in model.modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert layers and all(hasattr(m, "weight_orig") for m in layers)
    assert all(m.eps == 1e-7 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    model.remove_spectral_norm()
    assert not model.spectral_norm


def test_tiny_config_follows_official_derivation():
    config = BilayerConfig.tiny(image_size=128)
    assert config.num_generator_blocks == 5  # log2(128 / 4)
    assert config.num_embedder_down_blocks == 4  # log2(128 / 8)
    model = Bilayer(config, init_weights=False)
    assert len(model.inference_generator.gen_inf.blocks) == 5 + 2
    assert len(model.identity_embedder.net.enc) == 1 + 4
    with pytest.raises(ValueError, match="power of two"):
        BilayerConfig(image_size=200)
    with pytest.raises(ValueError, match="unknown field"):
        BilayerConfig.from_dict({"image_size": 256, "bogus": 1})
    assert BilayerConfig.from_dict(config.to_dict()) == config


# --------------------------------------------------------------------------- per-identity parameters
SPEC_INFERENCE_TABLE = {  # official_bilayer.md 2.6, released 6-block layout
    **{(j, 0): f"gen_inf.blocks.{j}.block_feats.3" for j in range(6)},
    **{(j, 1): f"gen_inf.blocks.{j}.skip.1" for j in range(6)},
    **{(j, 2): f"gen_inf.blocks.{j + 1}.block_feats.0" for j in range(5)},
    (5, 2): "gen_inf.blocks.6",
}
SPEC_TEXTURE_TABLE = {
    **{(j, k): f"gen_tex.blocks.{j}.block_feats.4" for j in range(6) for k in (0, 1)},
    **{(j, 2): f"gen_tex.blocks.{j}.skip.1" for j in range(6)},
    **{(j, k): f"gen_tex.blocks.{j + 1}.block_feats.0" for j in range(5) for k in (3, 4)},
    (5, 3): "gen_tex.blocks.6",
    (5, 4): "gen_tex.blocks.6",
}


def _labelled_heads(generator):
    """Raw projector output in which every value of head (j, k) equals the label 100 * j + k + 10."""
    projector = generator.prj_inf if hasattr(generator, "prj_inf") else generator.prj_tex
    heads = []
    for j, spec in enumerate(projector.specs):
        heads.append([
            AdaConvParams(weight=torch.full((1, spec.rows, width - 1), 100.0 * j + k + 10),
                          bias=torch.full((1, spec.rows), 100.0 * j + k + 10))
            for k, width in enumerate(spec.head_widths)])
    return heads


def _label(name: str, tensor: torch.Tensor) -> int:
    value = tensor - 1.0 if name.endswith(".scale") else tensor  # AdaBN scale = weight + 1
    assert torch.all(value == value.flatten()[0]), name
    label = int(value.flatten()[0].item()) - 10
    return label // 100, label % 100


@pytest.mark.parametrize("kind", ["inference", "texture"])
def test_projector_heads_land_in_the_modules_the_spec_names(kind):
    # The released 6-block layout at small widths: only the assignment is under test.
    config = BilayerConfig.tiny(image_size=256, texture_enhancer=False, discriminator=False)
    if kind == "inference":
        generator = InferenceGenerator(config.inference_generator_spec(), config.projector_spec("inference"), 8)
        table, assemble = SPEC_INFERENCE_TABLE, inference_params_from_heads
    else:
        generator = TextureGenerator(config.texture_generator_spec(), config.projector_spec("texture"))
        table, assemble = SPEC_TEXTURE_TABLE, texture_params_from_heads
    modules = generator.adaptive_layer_names()
    landed: dict[tuple[int, int], set[str]] = {}
    for name, tensor in assemble(_labelled_heads(generator)).flatten().items():
        layer = re.sub(r"\.(scale|bias|weight)$", "", name)
        layer = re.sub(r"\.(scale_conv|bias_conv)$", "", layer)
        landed.setdefault(_label(name, tensor), set()).add(modules[layer])
    assert set(landed) == set(table)  # every head is used, each once
    for head, module in table.items():
        assert landed[head] == {module}, head
    if kind == "texture":  # heads 0/3 feed the scale conv, 1/4 the bias conv of an AdaSPADE layer
        flat = assemble(_labelled_heads(generator)).flatten()
        assert _label("", flat["blocks.2.norm2.scale_conv.weight"]) == (2, 0)
        assert _label("", flat["blocks.2.norm2.bias_conv.bias"]) == (2, 1)
        assert _label("", flat["blocks.3.norm1.scale_conv.bias"]) == (2, 3)
        assert _label("", flat["blocks.3.norm1.bias_conv.weight"]) == (2, 4)
        assert _label("", flat["final_norm.bias_conv.weight"]) == (5, 4)


def test_project_uses_the_official_assignment(tiny_model):
    generator = tiny_model.inference_generator
    embeds = [torch.randn(1, spec.embed_channels, 8, 8) for spec in generator.prj_inf.specs]
    with torch.no_grad():
        expected = inference_params_from_heads(generator.prj_inf(embeds)).flatten()
        for name, tensor in generator.project(embeds).flatten().items():
            assert torch.equal(tensor, expected[name]), name
        texture = tiny_model.texture_generator
        expected = texture_params_from_heads(texture.prj_tex(embeds)).flatten()
        for name, tensor in texture.project(embeds).flatten().items():
            assert torch.equal(tensor, expected[name]), name


def test_adabn_scale_includes_the_official_plus_one(tiny_model):
    projector = tiny_model.inference_generator.prj_inf
    embeds = [torch.randn(1, spec.embed_channels, 8, 8) for spec in projector.specs]
    with torch.no_grad():
        raw = projector(embeds)
        params = tiny_model.inference_generator.project(embeds)
    torch.testing.assert_close(params.blocks[0].norm2.scale, raw[0][0].weight[:, :, 0] + 1.0)
    torch.testing.assert_close(params.blocks[1].norm1.bias, raw[0][2].bias)
    torch.testing.assert_close(params.final_norm.scale, raw[-1][2].weight[:, :, 0] + 1.0)


def test_inference_params_flatten_names_are_stable_and_invertible(tiny_model):
    images, keypoints, masks = source_batch(2)
    with torch.no_grad():
        avatar = tiny_model.create_avatar(images, keypoints, masks)
    flat = avatar.params.flatten()
    assert list(flat)[:7] == [
        "blocks.0.norm2.scale", "blocks.0.norm2.bias", "blocks.0.skip.weight", "blocks.0.skip.bias",
        "blocks.1.norm1.scale", "blocks.1.norm1.bias", "blocks.1.norm2.scale"]
    assert list(flat)[-2:] == ["final_norm.scale", "final_norm.bias"]
    assert len(flat) == 4 + 6 * 3 + 2  # block 0 has no norm1; 4 blocks at 64 px
    assert flat["blocks.3.skip.weight"].shape == (2, 8, 16)
    rebuilt = InferenceParams.unflatten(flat)
    assert rebuilt.flatten().keys() == flat.keys()
    assert all(rebuilt.flatten()[k] is flat[k] for k in flat)
    with pytest.raises(ValueError, match="missing"):
        InferenceParams.unflatten({k: v for k, v in flat.items() if k != "blocks.2.skip.bias"})
    with pytest.raises(ValueError, match="unknown"):
        InferenceParams.unflatten({**flat, "blocks.0.norm1.scale": flat["blocks.1.norm1.scale"]})
    avatar_flat = avatar.flatten()
    assert BilayerAvatar.unflatten(avatar_flat).texture is avatar.texture
    assert avatar.params.select(1).batch_size == 1
    assert InferenceParams.cat([avatar.params.select(0), avatar.params.select(1)]).flatten().keys() == flat.keys()


def test_no_module_holds_identity_state(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    attributes = {name: set(vars(m)) for name, m in tiny_model.named_modules()}
    images, keypoints, masks = source_batch(1)
    with torch.no_grad():
        avatar = tiny_model.create_avatar(images, keypoints, masks)
        tiny_model.render(avatar, keypoints)
    assert {name: set(vars(m)) for name, m in tiny_model.named_modules()} == attributes
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- model behaviour (tiny)
def test_create_avatar_and_render_shapes_and_finiteness(tiny_model):
    images, keypoints, masks = source_batch(2)
    with torch.no_grad():
        avatar = tiny_model.create_avatar(images, keypoints, masks)
        out = tiny_model.render(avatar, keypoints_batch(2, seed=5))
    assert isinstance(out, RenderOutput)
    assert avatar.texture.shape == (2, 3, 64, 64)
    expected = {"image": 3, "lf": 3, "hf": 3, "delta_uv": 2, "mask": 1, "mask_logits": 1}
    for field, channels in expected.items():
        value = getattr(out, field)
        assert value.shape == (2, channels, 64, 64), field
        assert torch.isfinite(value).all(), field
    torch.testing.assert_close(out.image, out.lf + out.hf)
    torch.testing.assert_close(out.mask, torch.sigmoid(out.mask_logits))
    # Random init is sane: not saturated (tanh outputs well inside (-1, 1)) and not constant.
    for value in (avatar.texture, out.lf, out.delta_uv):
        assert value.abs().max() < 0.99 and value.std() > 1e-4


def test_render_accepts_frames_and_broadcasts_one_identity(tiny_model):
    images, keypoints, _ = source_batch(2)
    targets = keypoints_batch(6, seed=7).view(2, 3, 68, 2)
    with torch.no_grad():
        avatar = tiny_model.create_avatar(images, keypoints)
        out = tiny_model.render(avatar, targets)
        assert out.image.shape == (2, 3, 3, 64, 64) and out.mask.shape == (2, 3, 1, 64, 64)
        for b in range(2):
            for t in range(3):
                single = tiny_model.render(avatar.select(b), targets[b, t][None])
                torch.testing.assert_close(out.image[b, t], single.image[0], rtol=RTOL, atol=ATOL)
        one = avatar.select(1)
        frames = tiny_model.render(one, targets[1])
        torch.testing.assert_close(frames.image, out.image[1], rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="avatar batch"):
        tiny_model.render(avatar, keypoints_batch(3))
    with pytest.raises(ValueError, match="target_keypoints"):
        tiny_model.render(avatar, torch.zeros(2, 67, 2))


def test_batch_of_n_equals_n_singles(tiny_model):
    images, keypoints, masks = source_batch(3)
    targets = keypoints_batch(3, seed=9)
    with torch.no_grad():
        batch = tiny_model.create_avatar(images, keypoints, masks)
        out = tiny_model.render(batch, targets)
        for i in range(3):
            single = tiny_model.create_avatar(images[i:i + 1], keypoints[i:i + 1], masks[i:i + 1])
            torch.testing.assert_close(batch.texture[i:i + 1], single.texture, rtol=RTOL, atol=ATOL)
            for name, tensor in single.params.flatten().items():
                torch.testing.assert_close(batch.params.flatten()[name][i:i + 1], tensor, rtol=RTOL, atol=ATOL)
            rendered = tiny_model.render(single, targets[i:i + 1])
            for field in RenderOutput._fields:
                torch.testing.assert_close(getattr(out, field)[i:i + 1], getattr(rendered, field),
                                           rtol=RTOL, atol=ATOL)


def test_render_recomputes_nothing_per_identity(tiny_model, monkeypatch):
    images, keypoints, _ = source_batch(1)
    with torch.no_grad():
        avatar = tiny_model.create_avatar(images, keypoints)

        def forbidden(*args, **kwargs):
            raise AssertionError("per-identity network called during render")

        monkeypatch.setattr(tiny_model.identity_embedder, "forward", forbidden)
        monkeypatch.setattr(tiny_model.texture_generator, "forward", forbidden)
        monkeypatch.setattr(tiny_model.inference_generator.prj_inf, "forward", forbidden)
        out = tiny_model.render(avatar, keypoints)
    assert torch.isfinite(out.image).all()


def test_zero_delta_uv_reproduces_the_texture_exactly(tiny_model):
    for size in (64, 256):  # power-of-two sizes: the pixel centres are exact in fp32
        texture = torch.rand(2, 3, size, size) * 2 - 1
        hf = sample_texture(texture, torch.zeros(2, 2, size, size))
        assert torch.equal(hf, texture), size
    texture = torch.rand(1, 3, 37, 37) * 2 - 1  # odd size: exact up to fp32 rounding of the centres
    torch.testing.assert_close(sample_texture(texture, torch.zeros(1, 2, 37, 37)), texture, rtol=RTOL, atol=ATOL)
    grid = tiny_model.inference_generator.identity_grid
    assert torch.equal(grid, identity_grid(64))
    texture = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(sample_texture(texture, torch.zeros(1, 2, 64, 64), grid), texture)
    assert grid[0, 0, 0].tolist() == [-63 / 64, -63 / 64] and grid[0, 0, 1, 0].item() == -61 / 64


def test_several_source_frames_are_averaged_after_the_encoder(tiny_model):
    g = torch.Generator().manual_seed(3)
    inputs = torch.rand(1, 2, 6, 64, 64, generator=g) * 2 - 1
    embedder = tiny_model.identity_embedder
    with torch.no_grad():
        embeds = embedder(inputs)
        encoded = embedder.net.enc[0](inputs[0])
        for block in embedder.net.enc[1:]:
            encoded, _ = block(encoded)
        x = encoded.mean(dim=0, keepdim=True)
        for block, embed in zip(embedder.net.dec_blocks, embeds):
            x, feats = block(x)
            torch.testing.assert_close(embed, feats, rtol=RTOL, atol=ATOL)
        images, keypoints, _ = source_batch(1)
        two = tiny_model.create_avatar(torch.stack([images, images.flip(-1)], 1), torch.stack([keypoints] * 2, 1))
    assert two.texture.shape == (1, 3, 64, 64)


def test_source_mask_composites_on_black(tiny_model):
    images, keypoints, masks = source_batch(1)
    with torch.no_grad():
        masked = tiny_model.embed_identity(images, keypoints, masks)
        manual = tiny_model.embed_identity(images * masks - (1 - masks), keypoints)
    for a, b in zip(masked, manual):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_enhancer_refines_texture_with_gradients_forced_on(tiny_model, context):
    images, keypoints, masks = source_batch(2)
    manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with manager:
        plain = tiny_model.create_avatar(images, keypoints, masks)
        enhanced = tiny_model.create_avatar(images, keypoints, masks, enhance=True)
        single = tiny_model.create_avatar(images[1:], keypoints[1:], masks[1:], enhance=True)
    assert not enhanced.texture.requires_grad
    assert torch.isfinite(enhanced.texture).all()
    assert (enhanced.texture - plain.texture).abs().max() > 1e-3
    torch.testing.assert_close(enhanced.texture[1:], single.texture, rtol=1e-4, atol=1e-4)


def test_enhancer_update_matches_the_guided_gradient(tiny_model):
    enhancer = tiny_model.texture_enhancer
    g = torch.Generator().manual_seed(4)
    texture, image, lf = (torch.rand(1, 3, 64, 64, generator=g) * 2 - 1 for _ in range(3))
    delta_uv = (torch.rand(1, 2, 64, 64, generator=g) - 0.5) * 0.1
    mask = torch.rand(1, 1, 64, 64, generator=g)
    depth = enhancer.unrolling_depth
    try:
        enhancer.unrolling_depth = 1
        with torch.no_grad():
            result = enhancer.enhance(texture, image, delta_uv, lf, mask)
    finally:
        enhancer.unrolling_depth = depth
    # Guiding gradient of 0.5*||m*(I - lf - warp(T)) ... || written out by hand.
    t = texture.clone().requires_grad_(True)
    rendered = (lf + sample_texture(t, delta_uv)) * mask - (1 - mask)
    target = image * mask - (1 - mask)
    (0.5 * ((target - rendered) ** 2).sum()).backward()
    with torch.no_grad():
        expected = texture + enhancer.update(torch.cat([texture, t.grad], 1), 1)
    torch.testing.assert_close(result, expected, rtol=RTOL, atol=ATOL)


def test_enhancer_is_trainable_through_create_avatar():
    model = Bilayer(BilayerConfig.tiny(discriminator=False)).train()
    images, keypoints, masks = source_batch(2)
    enhanced = model.create_avatar(images, keypoints, masks, enhance=True)
    assert enhanced.texture.requires_grad
    enhanced.texture.square().mean().backward()
    for layer in (model.texture_enhancer.net.blocks[0], model.texture_enhancer.net.blocks[-1]):
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
        assert layer.weight.grad.abs().sum() > 0


def test_enhance_without_enhancer_is_an_error():
    model = Bilayer(BilayerConfig.tiny(texture_enhancer=False, discriminator=False))
    images, keypoints, _ = source_batch(1)
    with pytest.raises(ValueError, match="no texture enhancer"):
        model.create_avatar(images, keypoints, enhance=True)


def test_bad_inputs_name_the_argument(tiny_model):
    images, keypoints, _ = source_batch(1)
    with pytest.raises(ValueError, match="source_image"):
        tiny_model.create_avatar(images[:, :2], keypoints)
    with pytest.raises(ValueError, match="source_keypoints"):
        tiny_model.create_avatar(images, keypoints[:, :60])
    with pytest.raises(ValueError, match="source_mask"):
        tiny_model.create_avatar(torch.stack([images] * 2, 1), torch.stack([keypoints] * 2, 1),
                                 torch.ones(1, 1, 64, 64))
    with pytest.raises(ValueError, match="pose embeddings"):
        tiny_model.inference_generator.generate(torch.zeros(2, 64, 4, 4), tiny_model.create_avatar(
            images, keypoints).params)


# --------------------------------------------------------------------------- spectral norm and init
def test_spectral_norm_eval_equals_removed_weights():
    torch.manual_seed(0)
    model = Bilayer(BilayerConfig.tiny(discriminator=False), spectral_norm=True)
    images, keypoints, _ = source_batch(1)
    with torch.no_grad():
        with_sn = model.render(model.create_avatar(images, keypoints), keypoints)
        linear = model.keypoints_embedder.net.mlp[0]
        w_orig, u, v = linear.weight_orig.clone(), linear.weight_u.clone(), linear.weight_v.clone()
        model.remove_spectral_norm()
        torch.testing.assert_close(linear.weight, w_orig / torch.dot(u, w_orig @ v))
        without = model.render(model.create_avatar(images, keypoints), keypoints)
    torch.testing.assert_close(with_sn.image, without.image, rtol=1e-4, atol=1e-5)


def test_spectral_norm_training_step_runs():
    model = Bilayer(BilayerConfig.tiny(), spectral_norm=True).train()
    images, keypoints, masks = source_batch(2)
    avatar = model.create_avatar(images, keypoints, masks)
    out = model.render(avatar, keypoints)
    scores, feats = model.discriminator(out.image, images)
    loss = out.image.abs().mean() + scores.mean() + sum(f.mean() for f in feats)
    loss.backward()
    grad = model.identity_embedder.net.enc[0].weight_orig.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert scores.shape == (2, 1, 8, 8) and len(feats) == model.config.discriminator_num_blocks


# Identity embeddings at the scale the randomly initialised (spectrally normalised) identity
# embedder produces on [-1, 1] images: std 0.014-0.026, max |e| 0.08-0.13 at 256 px.
EMBEDDING_SCALE = 0.02


def test_random_init_full_size_inference_generator_is_sane():
    config = BilayerConfig(texture_enhancer=False, discriminator=False)
    torch.manual_seed(0)
    generator = normalize_random_init_(
        InferenceGenerator(config.inference_generator_spec(), config.projector_spec("inference"), 256)).eval()
    embeds = [EMBEDDING_SCALE * torch.randn(1, c, 8, 8) for c in config.embedding_channels()]
    with torch.no_grad():
        params = generator.project(embeds)
        delta_uv, lf, logits = generator.generate(torch.randn(1, 256, 4, 4), params)
    for value in (delta_uv, lf, logits):
        assert torch.isfinite(value).all()
    assert lf.abs().max() < 0.99 and delta_uv.abs().max() < 0.99 and lf.std() > 1e-4


@pytest.mark.slow
def test_random_init_released_model_is_sane_end_to_end():
    torch.manual_seed(0)
    model = Bilayer(BilayerConfig(texture_enhancer=False, discriminator=False))
    images = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        avatar = model.create_avatar(images, keypoints_batch(1))
        out = model.render(avatar, keypoints_batch(2, seed=3))
    for value in (avatar.texture, out.lf, out.delta_uv, out.mask_logits):
        assert torch.isfinite(value).all()
    for value in (avatar.texture, out.lf, out.delta_uv):
        assert value.abs().max() < 0.99 and value.std() > 1e-4


# --------------------------------------------------------------------------- files
def test_save_load_roundtrip(tiny_model, tmp_path):
    path = tmp_path / "tiny.safetensors"
    tiny_model.save(path)
    loaded = Bilayer.load(path)
    assert loaded.config == tiny_model.config and not loaded.training
    original = tiny_model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())
    images, keypoints, _ = source_batch(1)
    with torch.no_grad():
        a = tiny_model.render(tiny_model.create_avatar(images, keypoints), keypoints)
        b = loaded.render(loaded.create_avatar(images, keypoints), keypoints)
    torch.testing.assert_close(a.image, b.image, rtol=RTOL, atol=ATOL)  # same weights; GEMM paths may differ by an ulp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_save_load_keeps_spectral_norm(tmp_path):
    model = Bilayer(BilayerConfig.tiny(discriminator=False), spectral_norm=True)
    model.save(tmp_path / "sn.safetensors")
    loaded = Bilayer.load(tmp_path / "sn.safetensors")
    assert loaded.spectral_norm
    x = keypoints_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.keypoints_embedder(x), model.keypoints_embedder(x))


def test_load_rejects_missing_foreign_and_corrupt_files(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Bilayer.load(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not a pybilayer model"):
        Bilayer.load(tmp_path / "foreign.safetensors")
    tiny_model.save(tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        Bilayer.load(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        Bilayer.load(tmp_path / "garbage.safetensors")
    state = {k: v for k, v in tiny_model.state_dict().items() if "heads" not in k}
    with pytest.raises(CheckpointError, match="missing keys"):
        Bilayer.from_state_dict(tiny_model.config, state)
