"""Renderer and Avatar: API round trips, every CPU backend against the reference, errors, memory, threads."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from _builders import random_drivers, random_photo, tiny_bilayer
from _tolerances import TOLERANCES, UINT8_MAX_LSB
from pybilayer import Renderer, native
from pybilayer.errors import BackendUnavailableError, CheckpointError
from pybilayer.models import Bilayer, BilayerAvatar, BilayerConfig
from pybilayer.synthetic import random_landmarks

SIZE = 64


def _tiny_model(seed: int) -> Bilayer:
    return tiny_bilayer(seed, SIZE)


@pytest.fixture(scope="module")
def model():
    return _tiny_model(11)


@pytest.fixture(scope="module")
def fast(model):
    return Renderer(model, backend="onnxruntime", device="cpu", threads=1)


@pytest.fixture(scope="module")
def generic(model):
    return Renderer(model, backend="onnxruntime", device="cpu", threads=1,
                    backend_options={"onnxruntime": {"graph": "generic"}})


@pytest.fixture(scope="module")
def mnn(model):
    pytest.importorskip("MNN")
    return Renderer(model, backend="mnn", device="cpu", threads=1)


@pytest.fixture(scope="module")
def fast_graph_heads(model):
    """The folded graph with its own heads: what runs where the native core is not built."""
    return Renderer(model, backend="onnxruntime", device="cpu", threads=1,
                    backend_options={"onnxruntime": {"native_heads": False}})


@pytest.fixture(scope="module")
def mnn_graph_heads(model):
    pytest.importorskip("MNN")
    return Renderer(model, backend="mnn", device="cpu", threads=1, backend_options={"mnn": {"native_heads": False}})


@pytest.fixture(scope="module")
def fast_graph_blocks(model):
    """Native heads, but the keypoint MLP and the first blocks in the graphs too (native_blocks=0)."""
    return Renderer(model, backend="onnxruntime", device="cpu", threads=2,
                    backend_options={"onnxruntime": {"native_blocks": 0}})


@pytest.fixture(scope="module")
def mnn_graph_blocks(model):
    pytest.importorskip("MNN")
    return Renderer(model, backend="mnn", device="cpu", threads=2, backend_options={"mnn": {"native_blocks": 0}})


def _photo(seed: int, size: int = 200):
    return random_photo(seed, size)


# ------------------------------------------------------------------ API


def test_render_shapes_and_types(reference, avatar):
    drivers = random_drivers(3)
    frame = reference.render(avatar, drivers[0])
    assert frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
    frames = reference.render(avatar, drivers)
    assert frames.shape == (3, SIZE, SIZE, 3)
    layers = reference.render(avatar, drivers, output="layers")
    assert layers.image.shape == layers.lf.shape == layers.hf.shape == (3, 3, SIZE, SIZE)
    assert layers.mask.shape == (3, 1, SIZE, SIZE) and 0 <= layers.mask.min() and layers.mask.max() <= 1
    single = reference.render(avatar, drivers[0], output="layers")
    assert single.image.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(layers.image, layers.lf + layers.hf, atol=1e-6)
    assert reference.backend == "torch" and "explicitly" in reference.backend_reason


def test_torch_backend_is_the_model_itself(model, reference, avatar):
    """The Renderer's torch path equals Bilayer.render on the same normalised keypoints."""
    drivers = random_drivers(2)
    layers = reference.render(avatar, drivers, output="layers")
    keypoints = torch.from_numpy(reference.normalize_landmarks(drivers))
    with torch.no_grad():
        out = model.render(BilayerAvatar(avatar.texture[None], avatar.params), keypoints)
    rtol, atol = TOLERANCES["composite_fp32"]
    np.testing.assert_allclose(layers.image, out.image.numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(layers.mask, out.mask.numpy(), rtol=rtol, atol=atol)


def test_driver_landmarks_are_normalised_to_their_own_crop(reference, avatar):
    drivers = random_drivers(1)[0]
    moved = drivers * 1.7 + np.array([40.0, -25.0])  # same face, bigger and elsewhere in the frame
    a = reference.render(avatar, drivers, output="layers").image
    b = reference.render(avatar, moved, output="layers").image
    np.testing.assert_allclose(a, b, atol=2e-3)  # equal up to the crop's integer rounding


def test_explicit_crop_boxes(reference, avatar):
    from pybilayer.geometry import crop_box

    drivers = random_drivers(3, seed=14)
    own = [crop_box(d) for d in drivers]
    np.testing.assert_array_equal(reference.render(avatar, drivers, crop_boxes=own), reference.render(avatar, drivers))
    shifted = [(b.left + 9, b.top, b.right + 9, b.bottom) for b in own]
    assert np.abs(reference.render(avatar, drivers, crop_boxes=shifted).astype(int) - reference.render(avatar, drivers)).max() > 0
    single = reference.render(avatar, drivers[0], crop_boxes=own[0])
    np.testing.assert_array_equal(single, reference.render(avatar, drivers[0]))
    with pytest.raises(ValueError, match="crop_boxes has 2 boxes for 3"):
        reference.render(avatar, drivers, crop_boxes=own[:2])
    with pytest.raises(ValueError, match="frame 0"):
        reference.render(avatar, drivers, crop_boxes=[(0, 0, 10, 20)] * 3)  # not square


@pytest.mark.parametrize("backend", ["fast", "generic", "mnn", "fast_graph_heads", "mnn_graph_heads",
                                     "fast_graph_blocks", "mnn_graph_blocks"])
def test_cpu_backends_match_the_reference(backend, request, reference, avatar):
    renderer = request.getfixturevalue(backend)
    drivers = random_drivers(4, seed=5)
    ref = reference.render(avatar, drivers, output="layers")
    got = renderer.render(avatar, drivers, output="layers")
    _, atol = TOLERANCES["fast_cpu_render"]
    for name in ("image", "lf", "hf", "mask"):
        diff = np.abs(getattr(got, name) - getattr(ref, name)).max()
        assert diff <= atol, (name, diff)
    frames_ref, frames = reference.render(avatar, drivers), renderer.render(avatar, drivers)
    assert frames.dtype == np.uint8 and frames.shape == (4, SIZE, SIZE, 3)
    assert np.abs(frames.astype(int) - frames_ref).max() <= UINT8_MAX_LSB


def test_fast_path_holds_the_bound_on_a_demanding_avatar():
    """The default CPU path against the reference where its rounding shows: a released-size model whose heads
    give pre-tanh outputs of order 1 (a random model's are ~0.05, which hides relative errors), and a photo as
    the texture, whose sharp edges turn any error in the warp into image error. On such an avatar,
    half-precision weights in the native stage's first blocks gave 2.6e-3 (1.4e-5 on a random model) and
    float32 1.8e-4 (RESULTS.md, eleventh session): this test tells them apart."""
    from PIL import Image

    from pybilayer.cli import demo_asset

    torch.manual_seed(5)
    model = Bilayer(BilayerConfig(texture_enhancer=False, discriminator=False))
    with torch.no_grad():
        for head in model.inference_generator.gen_inf.heads:
            for p in head.parameters():
                if p.ndim == 4:
                    p.mul_(30.0)
    reference = Renderer(model, backend="torch", device="cpu", threads=2)
    fast = Renderer(model, backend="onnxruntime", device="cpu", threads=2)
    photo = np.asarray(Image.open(demo_asset("demo_source.jpg")).convert("RGB"))
    avatar = reference.create_avatar(photo, landmarks=np.load(demo_asset("demo_source_landmarks.npy")))
    size = avatar.texture.shape[-1]
    texture = np.asarray(Image.fromarray(photo).resize((size, size), Image.BILINEAR), np.float32) / 127.5 - 1
    avatar = dataclasses.replace(avatar, texture=torch.from_numpy(texture).permute(2, 0, 1).contiguous())
    drivers = random_drivers(3, seed=9)
    ref, got = reference.render(avatar, drivers, output="layers"), fast.render(avatar, drivers, output="layers")
    assert ref.lf.max() - ref.lf.min() > 0.5  # the heads work in tanh's curved range
    assert np.abs(np.diff(avatar.texture.numpy(), axis=-1)).max() > 0.5  # edges of half the range in a pixel
    _, atol = TOLERANCES["fast_cpu_render"]
    for name in ("image", "lf", "hf", "mask"):
        diff = np.abs(getattr(got, name) - getattr(ref, name)).max()
        assert diff <= atol, (name, diff)


@pytest.mark.skipif(not native.capabilities().native, reason=str(native.capabilities().native_reason))
@pytest.mark.parametrize("backend, default", [("fast", True), ("mnn", True), ("fast_graph_heads", False),
                                              ("mnn_graph_heads", False), ("generic", False)])
def test_native_heads_are_used_where_built_and_said(backend, default, request, avatar):
    renderer = request.getfixturevalue(backend)
    assert renderer._backend.native_heads is default
    assert ("native heads" in renderer.backend_reason) is default
    if backend == "fast":  # onnxruntime fp32: the native stage for every block, no graph per frame
        low_res, sessions, heads = renderer._prepare(avatar).state
        blocks = renderer.model.inference_generator.num_blocks
        assert renderer._backend.native_blocks == blocks and f"native MLP and {blocks} blocks" in renderer.backend_reason
        assert low_res is not None and heads is not None and sessions == []


@pytest.mark.skipif(not native.capabilities().native, reason=str(native.capabilities().native_reason))
@pytest.mark.parametrize("backend", ["fast", "mnn"])
def test_native_stage_gives_the_graphs_frames(backend, request, avatar):
    """The native stage (MLP and first blocks) against the same network all in the graph: same frames."""
    renderer = request.getfixturevalue(backend)
    graph_only = request.getfixturevalue(f"{backend}_graph_blocks")
    assert renderer._backend.native_blocks == renderer.model.inference_generator.num_blocks
    assert graph_only._backend.native_blocks == 0
    drivers = random_drivers(3, seed=21)
    a, b = renderer.render(avatar, drivers, output="layers"), graph_only.render(avatar, drivers, output="layers")
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    np.testing.assert_allclose(a.image, b.image, rtol=rtol, atol=atol)
    np.testing.assert_allclose(a.mask, b.mask, rtol=rtol, atol=atol)


@pytest.mark.parametrize("options, match", [
    ({"native_blocks": 5}, r"native_blocks must be None or an int in \[0, 4\]"),
    ({"native_blocks": -1}, r"native_blocks must be None or an int in \[0, 4\]"),
    ({"native_blocks": True}, "native_blocks must be None or an int"),
    ({"native_blocks": 1, "native_heads": False}, "native_blocks needs the native heads"),
    ({"native_blocks": 1, "graph": "generic"}, "native_blocks needs graph='folded' and precision='fp32'"),
    ({"native_blocks": 1, "precision": "int8"}, "native_blocks needs graph='folded' and precision='fp32'"),
])
def test_native_blocks_option_is_checked(model, options, match):
    with pytest.raises(ValueError, match=match):
        Renderer(model, backend="onnxruntime", backend_options={"onnxruntime": options})


def test_native_heads_option_is_checked(model, monkeypatch):
    with pytest.raises(ValueError, match="native_heads=True needs graph='folded'"):
        Renderer(model, backend="onnxruntime", backend_options={"onnxruntime": {"graph": "generic", "native_heads": True}})
    with pytest.raises(ValueError, match="native_heads must be"):
        Renderer(model, backend="onnxruntime", backend_options={"onnxruntime": {"native_heads": "yes"}})
    missing = native.Capabilities(native=False, native_reason="not built here", cuda=False, cuda_reason="not built here")
    monkeypatch.setattr(native, "capabilities", lambda: missing)
    with pytest.raises(BackendUnavailableError, match="native_heads=True needs the native core: not built here"):
        Renderer(model, backend="onnxruntime", backend_options={"onnxruntime": {"native_heads": True}})
    assert Renderer(model, backend="onnxruntime")._backend.native_heads is False  # default: the graph's heads


def test_auto_backend_on_cpu_is_onnxruntime_and_says_why(model):
    renderer = Renderer(model, backend="auto", device="auto")
    assert renderer.backend == "onnxruntime"
    if not torch.cuda.is_available():
        assert "skipped" in renderer.backend_reason and "tensorrt" in renderer.backend_reason


@pytest.mark.parametrize("backend", ["fast", "generic", "reference", "mnn"])
def test_batch_of_n_equals_n_singles(backend, request, avatar):
    renderer = request.getfixturevalue(backend)
    drivers = random_drivers(5, seed=6)
    together = renderer.render(avatar, drivers, output="layers").image
    singles = np.stack([renderer.render(avatar, d, output="layers").image for d in drivers])
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    np.testing.assert_allclose(together, singles, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["fast", "generic", "reference", "mnn"])
def test_many_avatars_in_one_call(backend, request, avatar, avatar2):
    renderer = request.getfixturevalue(backend)
    drivers = random_drivers(4, seed=7)
    order = [avatar, avatar2, avatar2, avatar]
    mixed = renderer.render(order, drivers, output="layers").image
    separate = np.stack([renderer.render(a, d, output="layers").image for a, d in zip(order, drivers)])
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    np.testing.assert_allclose(mixed, separate, rtol=rtol, atol=atol)
    assert np.abs(mixed[0] - mixed[1]).max() > 1e-3  # the two avatars really differ
    one_pose = renderer.render([avatar, avatar2], drivers[0])
    assert one_pose.shape == (2, SIZE, SIZE, 3)
    # torch picks its convolution kernels by batch size: the reference's sums may round to the other side of .5
    lsb = UINT8_MAX_LSB if backend == "reference" else 0
    assert np.abs(one_pose[1].astype(int) - renderer.render(avatar2, drivers[0])).max() <= lsb


def test_background_composites_with_the_mask(reference, avatar):
    drivers = random_drivers(2, seed=8)
    layers = reference.render(avatar, drivers, output="layers", background=(255, 255, 255))
    expected = (layers.lf + layers.hf) * layers.mask + 1.0 * (1 - layers.mask)
    np.testing.assert_allclose(layers.image, expected, atol=1e-5)
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    frame = reference.render(avatar, drivers[0], background=image)
    assert frame.shape == (SIZE, SIZE, 3)


# ------------------------------------------------------------------ avatars


def test_avatar_save_load_round_trip(reference, fast, avatar, tmp_path):
    path = tmp_path / "me.avatar"
    avatar.save(path)
    loaded = fast.load_avatar(path)
    assert loaded.crop_box == avatar.crop_box and loaded.model_fingerprint == avatar.model_fingerprint
    assert not loaded.enhanced and loaded.image_size == SIZE
    torch.testing.assert_close(loaded.texture, avatar.texture, rtol=0, atol=0)
    for name, tensor in avatar.params.flatten().items():
        torch.testing.assert_close(loaded.params.flatten()[name], tensor, rtol=0, atol=0)
    drivers = random_drivers(2, seed=9)
    np.testing.assert_array_equal(fast.render(loaded, drivers), fast.render(avatar, drivers))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_avatar_is_immutable(reference, avatar):
    """Renderers cache per-avatar state (folded weights, the texture where the compositor reads it): a changed
    field would leave it stale, so an avatar refuses changes and a changed copy is a new avatar."""
    reference.render(avatar, random_drivers(1)[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        avatar.texture = -avatar.texture
    negated = dataclasses.replace(avatar, texture=-avatar.texture)
    a, b = reference.render(avatar, random_drivers(1)[0]), reference.render(negated, random_drivers(1)[0])
    assert np.abs(a.astype(int) - b).max() > 0


def test_avatar_save_is_atomic(avatar, tmp_path, monkeypatch):
    path = tmp_path / "me.avatar"
    avatar.save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        avatar.save(path)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_avatar_of_another_model_is_refused(avatar, tmp_path):
    other = Renderer(_tiny_model(99), backend="torch", device="cpu")
    path = tmp_path / "me.avatar"
    avatar.save(path)
    with pytest.raises(CheckpointError, match="different model"):
        other.load_avatar(path)
    with pytest.raises(CheckpointError, match="different model"):
        other.render(avatar, random_drivers(1)[0])


def test_truncated_or_foreign_files(reference, avatar, tmp_path):
    path = tmp_path / "me.avatar"
    avatar.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.avatar").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|cannot read"):
        reference.load_avatar(tmp_path / "cut.avatar")
    with pytest.raises(CheckpointError, match="not found"):
        reference.load_avatar(tmp_path / "missing.avatar")
    (tmp_path / "junk.avatar").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError):
        reference.load_avatar(tmp_path / "junk.avatar")


def test_truncated_model_file(model, tmp_path):
    path = tmp_path / "model.safetensors"
    model.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError):
        Renderer(path, backend="torch", device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        Renderer(tmp_path / "nothing.safetensors", backend="torch", device="cpu")


@pytest.mark.parametrize("size, embedder_runtime", [(SIZE, "torch"), (SIZE, "onnxruntime"), (128, "onnxruntime"),
                                                    (SIZE, "mnn")])
def test_fast_avatar_creation_equals_the_model(size, embedder_runtime):
    """Exact rewrites of phase 1 (stride-2 4x4 down convs, 9-tap up convs, folded projectors) vs
    Bilayer.create_avatar."""
    from pybilayer.backends.avatar_fast import FastAvatarCreator

    torch.manual_seed(size)
    model = Bilayer(BilayerConfig.tiny(size, discriminator=False, texture_enhancer=False))
    image = torch.rand(2, 3, size, size) * 2 - 1
    keypoints = torch.from_numpy(random_landmarks(2, size, seed=size)) / size * 2 - 1
    with torch.no_grad():
        ref = model.create_avatar(image, keypoints)
        if embedder_runtime == "mnn":
            pytest.importorskip("MNN")
        creator = FastAvatarCreator(model, threads=1, embedder_runtime=embedder_runtime)
        assert "_run_embedder" not in creator.__dict__  # built on first use, not at start-up
        got = creator.create(image, keypoints)
    rtol, atol = TOLERANCES["fp32_exact_algebra"]
    torch.testing.assert_close(got.texture, ref.texture, rtol=rtol, atol=atol)
    for name, tensor in ref.params.flatten().items():
        torch.testing.assert_close(got.params.flatten()[name], tensor, rtol=rtol, atol=atol * 10)


def test_fast_avatar_creator_rejects_an_unknown_embedder_runtime():
    from pybilayer.backends.avatar_fast import FastAvatarCreator

    with pytest.raises(ValueError, match="embedder_runtime must be"):
        FastAvatarCreator(_tiny_model(5), embedder_runtime="tensorrt")


@pytest.mark.parametrize("size", [SIZE, 128])
def test_folded_projectors_equal_the_modules(size):
    from pybilayer.backends.avatar_fast import FoldedProjector

    torch.manual_seed(size + 1)
    model = Bilayer(BilayerConfig.tiny(size, discriminator=False, texture_enhancer=False))
    for projector in (model.texture_generator.prj_tex, model.inference_generator.prj_inf):
        folded = FoldedProjector(projector)
        assert folded.foldable  # the fold, not the fallback, is under test
        embeds = [torch.randn(3, spec.embed_channels, 8, 8) for spec in projector.specs]
        with torch.no_grad():
            ref, got = projector(embeds), folded(embeds)
        rtol, atol = TOLERANCES["fp32_exact_algebra"]
        for ref_block, got_block in zip(ref, got, strict=True):
            for r, g in zip(ref_block, got_block, strict=True):
                torch.testing.assert_close(g.weight, r.weight, rtol=rtol, atol=atol * 10)
                torch.testing.assert_close(g.bias, r.bias, rtol=rtol, atol=atol * 10)


def test_create_avatar_detects_landmarks_lazily(reference, monkeypatch):
    photo, landmarks = _photo(4)
    calls = []

    def fake_detect_one(image, detector=None, index=0):
        calls.append(image.shape)
        return landmarks

    monkeypatch.setattr("pybilayer.landmarks.detect_one", fake_detect_one)
    detected = reference.create_avatar(photo)
    given = reference.create_avatar(photo, landmarks)
    assert calls == [photo.shape]
    torch.testing.assert_close(detected.texture, given.texture)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "landmarks, match",
    [
        (np.zeros((68, 3)), "shape"),
        (np.zeros((2, 67, 2)), "shape"),
        (np.zeros((0, 68, 2)), "shape"),
        (np.zeros(136), "shape"),
        (np.full((68, 2), np.nan), "NaN"),
        (np.full((3, 68, 2), np.inf), "NaN or infinite"),
        (np.full((68, 2), 1e30), "beyond"),
        (np.ones((68, 2), dtype=bool), "dtype bool"),
        (np.array([["a", "b"]] * 68), "dtype"),
        (np.full((68, 2), 5.0), "span less than one pixel"),
        ("landmarks", "dtype"),
    ],
)
def test_bad_driver_landmarks_are_named(reference, avatar, landmarks, match):
    with pytest.raises(ValueError, match=match):
        reference.render(avatar, landmarks)


def test_bad_arguments_are_named(model, reference, avatar):
    with pytest.raises(BackendUnavailableError, match="unknown backend 'magic'"):
        Renderer(model, backend="magic")
    with pytest.raises(BackendUnavailableError, match="unknown device"):
        Renderer(model, backend="torch", device="tpu")
    with pytest.raises(ValueError, match="output"):
        reference.render(avatar, random_drivers(1)[0], output="png")
    with pytest.raises(ValueError, match="2 avatars but 3 landmark sets"):
        reference.render([avatar, avatar], random_drivers(3))
    with pytest.raises(TypeError, match="Avatar"):
        reference.render("me.avatar", random_drivers(1)[0])
    with pytest.raises(ValueError, match="photo must be a uint8"):
        reference.create_avatar(np.zeros((50, 50, 3), np.float32), random_drivers(1)[0])
    with pytest.raises(ValueError, match="background"):
        reference.render(avatar, random_drivers(1)[0], background=(1.5, 0, 0))
    with pytest.raises(TypeError, match="checkpoint"):
        Renderer(42)


@pytest.mark.needs_cuda
def test_cuda_backend_matches_reference_in_fp16(model, avatar):
    cuda = Renderer(model, backend="cuda", device="cuda")
    reference = Renderer(model, backend="torch", device="cuda")
    drivers = random_drivers(3, seed=10)
    ref = reference.render(avatar, drivers, output="layers")
    for _ in range(2):  # first call captures the CUDA graph, the second replays it
        got = cuda.render(avatar, drivers, output="layers")
        assert np.abs(got.image - ref.image).max() <= 2e-2
    mixed = cuda.render([avatar, avatar], drivers[:2], output="layers")
    np.testing.assert_allclose(mixed.image, got.image[:2], atol=1e-5)


# ------------------------------------------------------------------ memory and threads


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_memory_stays_flat_over_many_frames(fast, avatar):
    drivers = random_drivers(20, seed=12)
    for i in range(30):  # warm-up: arenas and caches reach their steady size
        fast.render(avatar, drivers[i % 20])
    start = _rss_bytes()
    for i in range(300):
        fast.render(avatar, drivers[i % 20])
    growth = _rss_bytes() - start
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 300 frames"


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_one_renderer_shared_by_threads(backend, request, avatar, avatar2):
    renderer = request.getfixturevalue(backend)
    drivers = random_drivers(6, seed=13)
    avatars = [avatar, avatar2]
    expected = [renderer.render(avatars[i % 2], drivers[i]) for i in range(6)]
    results: dict[int, np.ndarray] = {}
    errors = []

    def work(i):
        try:
            for _ in range(3):
                results[i] = renderer.render(avatars[i % 2], drivers[i])
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(6):
        np.testing.assert_array_equal(results[i], expected[i])
