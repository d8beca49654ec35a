"""The pybilayer command: every subcommand on small generated inputs, and bad input as one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("av", reason="PyAV is not installed (pip install av==18.1.0)")
torch = pytest.importorskip("torch")

from pybilayer import cli  # noqa: E402
from pybilayer.landmarks import detector_statuses  # noqa: E402
from pybilayer.synthetic import talking_head_sequence  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_DETECTOR = any(s.available for s in detector_statuses())
needs_detector = pytest.mark.skipif(not HAS_DETECTOR, reason="no landmark detector installed (dlib-bin or mediapipe)")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    """Non-zero status, no traceback, and the error is exactly one line, the last (progress logs may precede)."""
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("pybilayer: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert fragment in errors[0], err


# ---------------------------------------------------------------- inputs made for the tests


@pytest.fixture(scope="module", autouse=True)
def _one_renderer_per_arguments():
    """Building a Renderer (tested in test_renderer.py) costs seconds here; the CLI tests share them."""
    import pybilayer.renderer as renderer_module

    real_renderer = renderer_module.Renderer
    cache: dict = {}

    def shared_renderer(checkpoint=None, backend="auto", device="auto"):
        key = (checkpoint, backend, device)
        if key not in cache:
            cache[key] = real_renderer(checkpoint, backend=backend, device=device)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(renderer_module, "Renderer", shared_renderer)
        yield


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    from pybilayer.models import Bilayer, BilayerConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    Bilayer(BilayerConfig.tiny()).save(path)
    return str(path)


@pytest.fixture(scope="module")
def photo() -> str:
    return cli.demo_asset("demo_source.jpg")


@pytest.fixture(scope="module")
def driver_npy(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("driver") / "driver.npy"
    np.save(path, talking_head_sequence(6, 256))
    return str(path)


@pytest.fixture(scope="module")
def driver_video(tmp_path_factory) -> str:
    """8 frames of the demo face drifting a few pixels, at 25 fps, with a 440 Hz tone."""
    import av
    from PIL import Image

    face = np.asarray(Image.open(cli.demo_asset("demo_source.jpg")).convert("RGB").resize((200, 200)))
    path = tmp_path_factory.mktemp("video") / "driver.mp4"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 200, 200, "yuv420p"
        audio = out.add_stream("aac", rate=16000)
        for i in range(8):
            frame = np.roll(face, (i % 3, 2 * (i % 4)), axis=(0, 1))
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(5120) / 16000) * 32767).astype(np.int16)
        for start in range(0, len(tone), 1024):
            piece = av.AudioFrame.from_ndarray(tone[None, start:start + 1024].copy(), format="s16", layout="mono")
            piece.sample_rate, piece.pts = 16000, start
            for packet in audio.encode(piece):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return str(path)


def _video(path) -> tuple[list[np.ndarray], set[str], dict]:
    import av

    with av.open(str(path)) as container:
        kinds = {s.type for s in container.streams}
        metadata = dict(container.metadata)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames, kinds, metadata


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if ".part" in name]


# ---------------------------------------------------------------- subcommands


def test_animate_photo_with_landmark_file(tmp_path, capsys, tiny_checkpoint, photo, driver_npy):
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(capsys, "animate", "--source", photo, "--source-landmarks",
                           cli.demo_asset("demo_source_landmarks.npy"), "--driver", driver_npy,
                           "--out", out, "--checkpoint", tiny_checkpoint, "--backend", "torch", "--batch-size", "4")
    assert code == 0, err
    frames, kinds, metadata = _video(out)
    assert len(frames) == 6 and frames[0].shape == (64, 64, 3)  # tiny model: 64 px, no caption
    assert kinds == {"video"}
    assert "weights: tiny.safetensors" in metadata["comment"]
    assert "fps" in err and "wrote" in err  # the speed is reported
    assert np.std(np.stack(frames).astype(np.float32)) > 1.0  # rendered content, not a blank video
    assert _leftovers(tmp_path) == []


@needs_detector
def test_animate_video_driver_side_by_side_keeps_audio(tmp_path, capsys, tiny_checkpoint, photo, driver_video):
    out = tmp_path / "side.mp4"
    code, _, err = run_cli(capsys, "animate", "--source", photo, "--driver", driver_video, "--out", out,
                           "--checkpoint", tiny_checkpoint, "--side-by-side")
    assert code == 0, err
    frames, kinds, _ = _video(out)
    assert len(frames) == 8
    assert frames[0].shape == (64, 128, 3)  # driver frame scaled to 64 px | rendered frame
    assert kinds == {"video", "audio"}


def test_demo_with_random_weights_says_so(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    import pybilayer.renderer as renderer_module

    real_renderer = renderer_module.Renderer

    def tiny_random_renderer(checkpoint, **kwargs):  # the released-size random model is too slow for a test
        assert checkpoint is None
        return real_renderer(tiny_checkpoint, **kwargs)

    monkeypatch.setattr(renderer_module, "Renderer", tiny_random_renderer)
    out = tmp_path / "demo.mp4"
    still = tmp_path / "still.png"
    code, _, err = run_cli(capsys, "animate", "--out", out, "--max-frames", "4", "--backend", "torch",
                           "--still", still)
    assert code == 0, err
    assert cli.RANDOM_WEIGHTS_NOTE in err
    frames, _, metadata = _video(out)
    from pybilayer.video import read_image

    assert read_image(still).shape == frames[2].shape  # the middle frame, caption included
    assert len(frames) == 4
    height, width = frames[0].shape[:2]
    assert width == 192 and height > 64  # source | stickman | result, with a caption strip below
    assert frames[0][64:].max() > 200  # white caption text
    assert "random weights" in metadata["comment"]


@needs_detector
def test_landmarks_command_on_video_and_photo(tmp_path, capsys, driver_video, photo):
    out = tmp_path / "lm.npy"
    code, _, err = run_cli(capsys, "landmarks", driver_video, "-o", out)
    assert code == 0, err
    landmarks = np.load(out)
    assert landmarks.shape == (8, 68, 2) and landmarks.dtype == np.float32
    assert np.all((landmarks > 0) & (landmarks < 200))
    code, _, err = run_cli(capsys, "landmarks", photo, "-o", tmp_path / "photo.npy", "--no-smooth")
    assert code == 0, err
    assert np.load(tmp_path / "photo.npy").shape == (1, 68, 2)


@needs_detector
def test_avatar_create_then_animate_from_it(tmp_path, capsys, tiny_checkpoint, photo, driver_npy):
    from pybilayer.avatar import Avatar

    avatar_path = tmp_path / "me.avatar"
    code, _, err = run_cli(capsys, "avatar", "create", photo, "-o", avatar_path, "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert Avatar.load(avatar_path).image_size == 64
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(capsys, "animate", "--source", avatar_path, "--driver", driver_npy, "--out", out,
                           "--checkpoint", tiny_checkpoint, "--backend", "torch")
    assert code == 0, err
    assert len(_video(out)[0]) == 6


def test_convert_official_on_a_tiny_official_run(tmp_path, capsys):
    from pybilayer.models import Bilayer, BilayerConfig

    config = BilayerConfig.tiny()
    official = Bilayer(config, spectral_norm=True)  # weight_orig / weight_u / weight_v, as the official files
    run_dir = tmp_path / "run" / "checkpoints"
    run_dir.mkdir(parents=True)
    for net in ("identity_embedder", "texture_generator", "keypoints_embedder", "inference_generator"):
        torch.save(getattr(official, net).state_dict(), run_dir / f"7_{net}.pth")
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "model.safetensors"
    code, _, err = run_cli(capsys, "convert-official", tmp_path / "run", "--epoch", "7", "--config", config_path,
                           "-o", out)
    assert code == 0, err
    model = Bilayer.load(out)
    assert model.config.image_size == 64 and not model.spectral_norm
    assert model.texture_enhancer is None  # absent from the run: optional


def test_export_command(tmp_path, capsys, tiny_checkpoint):
    import onnx

    out = tmp_path / "frame.onnx"
    code, _, err = run_cli(capsys, "export", "--checkpoint", tiny_checkpoint, "-o", out)
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(out)))


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_build_engine_without_tensorrt_says_how_to_get_it(capsys, tiny_checkpoint):
    code, _, err = run_cli(capsys, "-q", "build-engine", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "TensorRT")


def test_info_lists_backends_devices_and_detectors(capsys):
    code, out, err = run_cli(capsys, "info")
    assert code == 0, err
    for expected in ("native core", "devices: cpu", "onnxruntime", "tensorrt", "dlib", "mediapipe",
                     "face-alignment", "commercial", "video: ", "webcam: "):
        assert expected in out
    assert len([line for line in out.splitlines() if "unavailable" in line]) >= 1  # and says why


def test_webcam_without_camera_or_display_fails_clearly(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    code, _, err = run_cli(capsys, "-q", "webcam", "--checkpoint", tiny_checkpoint, "--camera", "9")
    assert_one_line_error(code, err, "")
    assert "window" in err or "camera" in err
    monkeypatch.setattr(cli, "window_unavailable_reason", lambda: None)
    code, _, err = run_cli(capsys, "-q", "webcam", "--checkpoint", tiny_checkpoint, "--camera", "9")
    assert_one_line_error(code, err, "camera 9 could not be opened")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(2048))
    code, _, err = run_cli(capsys, "-q", "webcam", "--checkpoint", tiny_checkpoint, "--camera", garbage)
    assert_one_line_error(code, err, "garbage.mp4 could not be opened")
    code, _, err = run_cli(capsys, "-q", "webcam", "--checkpoint", tiny_checkpoint, "--virtual-camera",
                           "--camera", "9")
    has_pyvirtualcam = cli._virtual_camera_reason() is None
    assert_one_line_error(code, err, "camera 9 could not be opened" if has_pyvirtualcam else "pyvirtualcam")


@needs_detector
def test_webcam_loop_on_a_video_as_camera(capsys, monkeypatch, tiny_checkpoint, driver_video):
    shown: list[np.ndarray] = []

    class CollectingSink:
        def __init__(self):
            pass

        def __call__(self, frame):
            shown.append(frame)
            return True

        def close(self):
            shown.append(None)

    monkeypatch.setattr(cli, "window_unavailable_reason", lambda: None)
    monkeypatch.setattr(cli, "WindowSink", CollectingSink)
    code, _, err = run_cli(capsys, "webcam", "--checkpoint", tiny_checkpoint, "--camera", driver_video,
                           "--max-frames", "5", "--backend", "torch", "--side-by-side")
    assert code == 0, err
    assert len(shown) == 6 and shown[-1] is None  # five frames, then the sink was closed
    assert all(frame.shape == (64, 128, 3) and frame.dtype == np.uint8 for frame in shown[:-1])


# ---------------------------------------------------------------- bad input: one line, non-zero, no traceback


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    from PIL import Image

    root = tmp_path_factory.mktemp("bad")
    files = {
        "garbage_video": root / "garbage.mp4",
        "blank_photo": root / "blank.jpg",
        "wrong_landmarks": root / "wrong.npy",
        "garbage_model": root / "garbage.safetensors",
        "out_dir": root / "existing_dir.mp4",
    }
    files["garbage_video"].write_bytes(os.urandom(4096))
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(files["blank_photo"])
    np.save(files["wrong_landmarks"], np.zeros((10, 5), np.float32))
    files["garbage_model"].write_bytes(b"\x00" * 100)
    files["out_dir"].mkdir()
    return {k: str(v) for k, v in files.items()} | {"root": str(root)}


BAD_INPUTS = {
    "missing source": (["--source", "{root}/missing.jpg", "--driver", "{driver}"], "no such file"),
    "unreadable video": (["--source", "{photo}", "--source-landmarks", "{photo_lm}", "--driver", "{garbage_video}"],
                         "not a readable video"),
    "wrong landmark file": (["--source", "{photo}", "--source-landmarks", "{photo_lm}",
                             "--driver", "{wrong_landmarks}"], "shape (N, 68, 2) or (68, 2), got (10, 5)"),
    "no output directory": (["--driver", "{driver}", "--out", "{root}/nowhere/out.mp4"], "does not exist"),
    "output is a directory": (["--driver", "{driver}", "--out", "{out_dir}"], "is a directory"),
    "unsupported output": (["--driver", "{driver}", "--out", "{root}/out.avi"], "unsupported"),
    "missing checkpoint": (["--driver", "{driver}", "--checkpoint", "{root}/none.safetensors"], "no such file"),
    "corrupt checkpoint": (["--driver", "{driver}", "--checkpoint", "{garbage_model}"], "garbage.safetensors"),
    "negative face index": (["--face-index", "-1"], "--face-index must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_animate_bad_input_is_one_line(case, tmp_path, capsys, bad_files, tiny_checkpoint, photo, driver_npy):
    argv, fragment = BAD_INPUTS[case]
    values = dict(bad_files, photo=photo, photo_lm=cli.demo_asset("demo_source_landmarks.npy"), driver=driver_npy)
    argv = [a.format(**values) for a in argv]
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", tiny_checkpoint]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.mp4")]
    code, _, err = run_cli(capsys, "-q", "animate", "--backend", "torch", *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out.mp4").exists()


@needs_detector
def test_photo_without_a_face_is_one_line(tmp_path, capsys, bad_files, tiny_checkpoint, driver_npy):
    code, _, err = run_cli(capsys, "-q", "animate", "--source", bad_files["blank_photo"], "--driver", driver_npy,
                           "--out", tmp_path / "out.mp4", "--checkpoint", tiny_checkpoint, "--backend", "torch")
    assert_one_line_error(code, err, "no face found")
    code, _, err = run_cli(capsys, "-q", "avatar", "create", bad_files["blank_photo"], "-o", tmp_path / "a.avatar",
                           "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "no face found")
    code, _, err = run_cli(capsys, "-q", "landmarks", bad_files["blank_photo"], "-o", tmp_path / "lm.npy")
    assert_one_line_error(code, err, "no face found")
    assert not any((tmp_path / n).exists() for n in ("out.mp4", "a.avatar", "lm.npy"))


@pytest.mark.parametrize(
    "argv, fragment, status",
    [
        (["frobnicate"], "invalid choice", 2),
        (["animate", "--batch-size", "0"], "--batch-size must be >= 1", 2),
        (["animate", "--source", "{blank_photo}", "--driver", "{wrong_landmarks}"], "--out is required", 2),
        (["animate", "--fps", "abc"], "invalid float value", 2),
        (["landmarks", "{root}/missing.mp4", "-o", "{root}/x.npy"], "no such file", 1),
        (["landmarks", "{garbage_video}", "-o", "{root}/x.npy"], "not a readable video", 1),
        (["landmarks", "{garbage_video}", "-o", "{root}/x.txt"], "unsupported file type", 1),
        (["avatar", "create", "{root}/missing.jpg", "-o", "{root}/a.avatar"], "no such file", 1),
        (["avatar"], "required", 2),
        (["convert-official", "{root}/nope", "--epoch", "1", "-o", "{root}/m.safetensors"], "not a directory", 1),
        (["convert-official", "{root}", "--epoch", "1", "-o", "{root}/m.safetensors"], "not found", 1),
        (["export", "--checkpoint", "{root}/missing.safetensors", "-o", "{root}/x.onnx"], "no such file", 1),
        (["export", "--checkpoint", "{garbage_model}", "-o", "{root}/x.onnx"], "garbage.safetensors", 1),
        (["webcam", "--source", "{root}/missing.jpg", "--camera", "{garbage_video}"], "no such file", 1),
    ],
)
def test_other_bad_input_is_one_line(argv, fragment, status, capsys, bad_files):
    code, _, err = run_cli(capsys, "-q", *[a.format(**bad_files) for a in argv])
    assert_one_line_error(code, err, fragment)
    assert code == status


def test_interrupted_animate_leaves_no_file(tmp_path, capsys, monkeypatch, tiny_checkpoint, photo, driver_npy):
    from pybilayer import video

    real_write = video.VideoWriter.write
    calls = {"n": 0}

    def write_then_interrupt(self, frame):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the video
        real_write(self, frame)

    monkeypatch.setattr(video.VideoWriter, "write", write_then_interrupt)
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(capsys, "-q", "animate", "--source", photo, "--source-landmarks",
                           cli.demo_asset("demo_source_landmarks.npy"), "--driver", driver_npy, "--out", out,
                           "--checkpoint", tiny_checkpoint, "--backend", "torch")
    assert code == 130
    assert_one_line_error(code, err, "interrupted")
    assert calls["n"] == 3
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary file either


def test_real_subprocess_error_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "pybilayer", "animate", "--source", str(tmp_path / "missing.jpg"),
         "--driver", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "out.mp4")],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert_one_line_error(result.returncode, result.stderr, "missing.jpg: no such file")
    assert result.stdout == ""


class _RecordingRenderer:
    """Stands in for a Renderer whose render takes per-frame crop boxes; records what it is given."""

    def __init__(self):
        self.calls: list = []

    def create_avatar(self, photo, landmarks=None, enhance=False):
        return object()

    def render(self, avatar, landmarks, crop_boxes=None):
        self.calls.append((np.array(landmarks), crop_boxes))
        return np.full((len(landmarks), 32, 32, 3), 100, np.uint8)


@pytest.mark.parametrize("per_frame", [False, True])
def test_animate_passes_stable_crops_when_the_renderer_takes_them(per_frame, tmp_path, capsys, monkeypatch, photo):
    from pybilayer.geometry import crop_box

    still = np.repeat(talking_head_sequence(1, 256), 40, axis=0)
    noisy = still + np.random.default_rng(0).normal(0.0, 1.5, still.shape).astype(np.float32)
    driver = tmp_path / "noisy.npy"
    np.save(driver, noisy)
    renderer = _RecordingRenderer()
    monkeypatch.setattr(cli, "load_renderer", lambda engine: renderer)
    argv = ["animate", "--source", photo, "--source-landmarks", cli.demo_asset("demo_source_landmarks.npy"),
            "--driver", driver, "--out", tmp_path / "out.mp4", "--smooth", "on"]
    code, _, err = run_cli(capsys, *argv, *(["--per-frame-crop"] if per_frame else []))
    assert code == 0, err
    landmarks = np.concatenate([call[0] for call in renderer.calls])
    assert len(landmarks) == 40
    assert np.abs(np.diff(landmarks, axis=0)).mean() < 0.6 * np.abs(np.diff(noisy, axis=0)).mean()  # smoothed
    if per_frame:
        assert all(call[1] is None for call in renderer.calls)  # the renderer's own (official) crop
        return
    boxes = [box for call in renderer.calls for box in call[1]]
    assert len(boxes) == 40 and len(set(boxes[20:])) == 1  # settled, then still
    assert len({crop_box(lm) for lm in noisy[20:]}) > 5  # where per-frame crops would have jittered


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--debug", "landmarks", tmp_path / "missing.mp4", "-o", tmp_path / "x.npy")
    assert code == 1
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("pybilayer: error: ")
