"""Video and image input/output: round trips, audio copy, atomic writes, unreadable files."""

from __future__ import annotations

import os

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV is not installed (pip install av==18.1.0)")

from pybilayer.errors import MediaError  # noqa: E402
from pybilayer.fileio import atomic_path  # noqa: E402
from pybilayer.video import (  # noqa: E402
    VideoReader,
    VideoWriter,
    add_caption,
    read_image,
    side_by_side,
    write_image,
)

FPS = 25


def _frames(n: int, width: int = 96, height: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth, distinct frames (H.264 keeps smooth content close to the original)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, 3)
        rgb = [127 + 100 * np.sin(x / 13 + y / 17 + phase[c] + i / 3) for c in range(3)]
        frames.append(np.stack(rgb, axis=-1).clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def make_video(path, frames: np.ndarray, fps: int = FPS, audio_codec: str | None = "aac", audio_seconds=None):
    """Write a test clip with PyAV directly (not through the code under test), optionally with a tone."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        audio = out.add_stream(audio_codec, rate=16000) if audio_codec else None
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        if audio is not None:
            seconds = audio_seconds if audio_seconds is not None else len(frames) / fps
            t = np.arange(int(16000 * seconds)) / 16000
            samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)[None]
            chunk = 1024
            for start in range(0, samples.shape[1], chunk):
                piece = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, start:start + chunk]),
                                                   format="s16", layout="mono")
                piece.sample_rate = 16000
                piece.pts = start
                for packet in audio.encode(piece):
                    out.mux(packet)
            for packet in audio.encode(None):
                out.mux(packet)
    return path


def _streams(path):
    with av.open(str(path)) as container:
        kinds = {s.type: s.codec_context.name for s in container.streams}
        duration = container.duration / av.time_base if container.duration else None
        frames = sum(1 for _ in container.decode(video=0))
        return kinds, duration, frames, dict(container.metadata)


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if ".part" in name]


def test_write_then_read_round_trip(tmp_path):
    frames = _frames(12)
    path = tmp_path / "out.mp4"
    with VideoWriter(path, FPS, metadata={"comment": "made by a test"}) as writer:
        for frame in frames:
            writer.write(frame)
    with VideoReader(path) as reader:
        assert (reader.info.width, reader.info.height) == (96, 64)
        assert reader.info.fps == pytest.approx(FPS)
        assert reader.info.frame_count == 12
        assert not reader.info.has_audio
        decoded = np.stack(list(reader))
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    # Lossy (H.264, 4:2:0 chroma) but close, and every frame in its place.
    errors = np.abs(decoded[:, None].astype(np.int16) - frames[None]).mean(axis=(2, 3, 4))
    assert errors.diagonal().max() < 6.0
    np.testing.assert_array_equal(errors.argmin(axis=1), np.arange(len(frames)))
    assert _streams(path)[3].get("comment") == "made by a test"
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not left private like a temporary file
    assert _leftovers(tmp_path) == []


def test_odd_frame_sizes_are_padded_to_even(tmp_path):
    path = tmp_path / "odd.mkv"
    with VideoWriter(path, FPS) as writer:
        for frame in _frames(3, width=33, height=21):
            writer.write(frame)
    with VideoReader(path) as reader:
        assert (reader.info.width, reader.info.height) == (34, 22)
        assert len(list(reader)) == 3


@pytest.mark.parametrize(
    "source_name, audio_codec, out_name, expected_audio",
    [
        ("aac.mp4", "aac", "out.mp4", "aac"),  # copied as is
        ("pcm.mkv", "pcm_s16le", "out.mp4", "aac"),  # mp4 does not take PCM: re-encoded
        ("pcm.mkv", "pcm_s16le", "out.mkv", "pcm_s16le"),  # Matroska takes anything: copied
    ],
)
def test_driver_audio_is_carried_over(tmp_path, source_name, audio_codec, out_name, expected_audio):
    frames = _frames(25)
    source = make_video(tmp_path / source_name, frames, audio_codec=audio_codec, audio_seconds=1.5)
    out = tmp_path / out_name
    with VideoReader(source) as reader:
        assert reader.info.has_audio
        with VideoWriter(out, reader.info.fps, audio_from=source) as writer:
            for frame in reader:
                writer.write(frame[:, ::-1])
    kinds, duration, n_frames, _ = _streams(out)
    assert kinds == {"video": "h264", "audio": expected_audio}
    assert n_frames == 25
    assert duration == pytest.approx(1.0, abs=0.15) or out_name.endswith(".mkv")  # audio cut at the video's end
    with av.open(str(out)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    assert samples >= 0.9 * 16000 * 1.0  # the sound is there, not an empty stream
    assert _leftovers(tmp_path) == []


def test_no_audio_stream_when_the_driver_has_none(tmp_path):
    source = make_video(tmp_path / "silent.mp4", _frames(5), audio_codec=None)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, FPS, audio_from=source) as writer:
        for frame in _frames(5):
            writer.write(frame)
    assert _streams(out)[0] == {"video": "h264"}


def test_interrupted_write_leaves_nothing_under_the_final_name(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out, FPS) as writer:
            for i, frame in enumerate(_frames(6)):
                if i == 3:
                    raise KeyboardInterrupt
                writer.write(frame)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(RuntimeError):
        with VideoWriter(out, FPS) as writer:
            writer.write(_frames(1)[0])
            raise RuntimeError("boom")
    assert out.read_bytes() == b"previous result"
    assert _leftovers(tmp_path) == []


def test_writer_refuses_bad_frames_and_paths(tmp_path):
    with pytest.raises(MediaError, match="unsupported video type '.avi'"):
        VideoWriter(tmp_path / "x.avi", FPS)
    with pytest.raises(MediaError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "x.mp4", FPS)
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(MediaError, match="is a directory"):
        VideoWriter(tmp_path / "dir.mp4", FPS)
    with pytest.raises(MediaError, match="uint8"):
        with VideoWriter(tmp_path / "x.mp4", FPS) as writer:
            writer.write(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(MediaError, match="size"):
        with VideoWriter(tmp_path / "y.mp4", FPS) as writer:
            writer.write(np.zeros((8, 8, 3), np.uint8))
            writer.write(np.zeros((10, 8, 3), np.uint8))
    with pytest.raises(MediaError, match="no frames"):
        with VideoWriter(tmp_path / "z.mp4", FPS):
            pass
    assert not any((tmp_path / name).exists() for name in ("x.mp4", "y.mp4", "z.mp4"))
    assert _leftovers(tmp_path) == []


def test_unreadable_videos_raise_media_error(tmp_path):
    with pytest.raises(MediaError, match="no such file"):
        VideoReader(tmp_path / "missing.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="not a readable video"):
        VideoReader(garbage)
    good = make_video(tmp_path / "good.mp4", _frames(10), audio_codec=None)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MediaError):
        with VideoReader(truncated) as reader:
            list(reader)
    audio_only = tmp_path / "audio.m4a"
    with av.open(str(audio_only), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            out.mux(packet)
    with pytest.raises(MediaError, match="no video stream"):
        VideoReader(audio_only)


def test_images_read_write_and_errors(tmp_path):
    image = _frames(1, 40, 30)[0]
    write_image(tmp_path / "a.png", image)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), image)
    with pytest.raises(MediaError, match="no such file"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(MediaError, match="not a readable image"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(MediaError, match="unsupported image type"):
        write_image(tmp_path / "a.xyz", image)


def test_atomic_path_replaces_only_on_success(tmp_path):
    final = tmp_path / "f.bin"
    final.write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_path(final) as tmp:
            open(tmp, "wb").write(b"half")
            raise ValueError
    assert final.read_bytes() == b"old"
    with atomic_path(final) as tmp:
        open(tmp, "wb").write(b"new")
    assert final.read_bytes() == b"new"
    assert _leftovers(tmp_path) == []


def test_side_by_side_and_caption():
    left = np.full((50, 40, 3), 10, np.uint8)
    right = np.full((100, 100, 3), 200, np.uint8)
    joined = side_by_side(left, right)
    assert joined.shape == (100, 180, 3)
    assert (joined[:, :80] == 10).all() and (joined[:, 80:] == 200).all()
    captioned = add_caption(right, "random weights")
    assert captioned.shape[1] == 100 and captioned.shape[0] > 100 and captioned.shape[0] % 2 == 0
    np.testing.assert_array_equal(captioned[:100], right)  # the picture itself is not covered
    assert captioned[100:].max() > 200  # white text in the strip
