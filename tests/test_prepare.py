"""training/prepare.py: videos and image sequences -> the official layout, read back by the loader."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("skimage", reason="scikit-image provides the test photo (skimage.data.astronaut)")
pytest.importorskip("av", reason="PyAV writes and reads the test video")
pytest.importorskip("cv2", reason="opencv-python-headless draws the official stickman")

from pybilayer.errors import BackendUnavailableError  # noqa: E402
from training.data import BilayerFrames  # noqa: E402
from training.prepare import crop_frame, main, prepare  # noqa: E402
from training.synthetic_data import astronaut, clip_landmarks, make_clip  # noqa: E402

CANVAS = 160
SIZE = 64


@pytest.fixture(scope="module")
def detector():
    from pybilayer.landmarks import create_detector

    try:
        return create_detector("auto")
    except BackendUnavailableError as exc:
        pytest.skip(f"no landmark detector is installed: {exc}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """alice/clip.mp4 (8 frames, exact landmarks), bob/seq/*.png (3 frames + 1 corrupt file),
    broken.mp4 (not a video), nobody/gray.mp4 (no face)."""
    from pybilayer.video import VideoWriter, write_image

    root = tmp_path_factory.mktemp("inputs")
    photo, photo_landmarks = astronaut()
    landmarks = clip_landmarks(8, CANVAS)
    frames, _ = make_clip(photo, photo_landmarks, landmarks, CANVAS)
    (root / "alice").mkdir()
    with VideoWriter(root / "alice" / "clip.mp4", fps=25) as writer:
        for frame in frames:
            writer.write(frame)
    seq = root / "bob" / "seq"
    seq.mkdir(parents=True)
    mirrored = frames[:3, :, ::-1].copy()
    for i, frame in enumerate(mirrored):
        write_image(seq / f"{i:03d}.png", frame)
    (seq / "999.png").write_bytes(b"\x89PNG broken")
    (root / "broken.mp4").write_bytes(b"this is not a video" * 10)
    (root / "nobody").mkdir()
    with VideoWriter(root / "nobody" / "gray.mp4", fps=25) as writer:
        for _ in range(3):
            writer.write(np.full((CANVAS, CANVAS, 3), 128, np.uint8))
    return root, landmarks


def test_prepare_writes_the_layout_the_loader_reads(inputs, detector, tmp_path, caplog):
    root, landmarks = inputs
    out = tmp_path / "data"
    with caplog.at_level(logging.INFO, logger="pybilayer.prepare"):
        reports = prepare(root, out, split="train", size=SIZE, detector=detector, masks="auto", progress=False)
    assert set(reports) == {"alice/clip", "bob/seq", "broken/broken", "nobody/gray"}
    # The detector may miss a strongly turned synthetic frame: that frame is skipped, not fatal.
    alice = reports["alice/clip"]
    assert alice.frames_read == 8 and alice.frames_written >= 6 and alice.frames_written + alice.faceless == 8
    assert reports["bob/seq"].frames_written == 3
    assert reports["broken/broken"].error and reports["broken/broken"].frames_written == 0
    assert reports["nobody/gray"].frames_written == 0 and reports["nobody/gray"].faceless == 3
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "broken.mp4 skipped: unreadable input" in messages
    assert "gray.mp4 skipped: no face in any of its 3 frames" in messages
    assert "skipped an unreadable image" in messages and "999.png" in messages

    dataset = BilayerFrames(out, "train", SIZE, num_frames=2, shuffle=False, with_stickmen=True)
    assert [item.name for item in dataset.items] == ["alice/clip", "bob/seq"]
    assert len(dataset.items[0].frames) == alice.frames_written
    sample = dataset[0]
    assert sample["image"].shape == (2, 3, SIZE, SIZE) and sample["keypoints"].shape == (2, 68, 2)
    if dataset.has_masks:  # mediapipe installed: single-channel soft masks that cover the face
        from PIL import Image

        with Image.open(out / "segs" / "train" / "alice" / "clip" / "00000" / "000000.png") as mask:
            assert mask.mode == "L" and mask.size == (SIZE, SIZE)
            assert np.asarray(mask)[SIZE // 2, SIZE // 2] > 128

    # The stored keypoints are the detected landmarks in pixels of the official crop: close to the
    # exact landmarks of each frame, mapped through the same rule.
    blank = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    errors = []
    for path in sorted((out / "keypoints" / "train" / "alice" / "clip").rglob("*.npy")):
        stored = np.load(path)
        _, exact = crop_frame(blank, landmarks[int(path.stem)], SIZE)
        assert stored.shape == (68, 2) and stored.dtype == np.float32
        errors.append(np.linalg.norm(stored - exact, axis=1).mean())
    assert len(errors) == alice.frames_written and np.mean(errors) < 0.05 * SIZE, errors


def test_prepare_resumes_and_cli(inputs, detector, tmp_path, monkeypatch):
    root, _ = inputs
    out = tmp_path / "data"
    monkeypatch.setattr("pybilayer.landmarks.create_detector", lambda *a, **k: detector)
    assert main([str(root), str(out), "--size", str(SIZE), "--every", "2", "--masks", "none", "--no-progress"]) == 0
    assert not (out / "segs").exists()  # --masks none: no segs tree; the loader then yields full masks
    files = sorted((out / "imgs").rglob("*.jpg"))
    bob = sorted((out / "imgs" / "train" / "bob").rglob("*.jpg"))
    assert [f.name for f in bob] == ["000000.jpg", "000002.jpg"]  # every second frame of 3
    assert 3 <= len(files) - len(bob) <= 4  # and of alice's 8 (the detector may miss one)
    dataset = BilayerFrames(out, "train", SIZE)
    assert not dataset.has_masks and float(dataset[0]["mask"].min()) == 1.0

    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert prepare(root, out, size=SIZE, every=2, detector=detector, masks="none", progress=False) == {}
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # nothing redone
    (out / ".prepare" / "train" / "bob" / "seq.json").unlink()  # an interrupted clip is done again
    redone = prepare(root, out, size=SIZE, every=2, detector=detector, masks="none", progress=False)
    assert list(redone) == ["bob/seq"] and redone["bob/seq"].frames_written == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(tmp_path / "missing", out)
