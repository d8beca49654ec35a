"""Landmark backends, face choice across frames, landmark files, One Euro smoothing and stable crops."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from pybilayer.errors import BackendUnavailableError, MediaError, NoFaceError
from pybilayer.geometry import crop_box
from pybilayer.landmarks import (
    MEDIAPIPE_TO_IBUG68,
    FaceFollower,
    _dlib_status,
    _face_alignment_status,
    _mediapipe_status,
    create_detector,
    detect_one,
    detector_statuses,
    fill_missing,
    load_landmarks,
    save_landmarks,
)
from pybilayer.smoothing import OneEuroFilter, StableCrop, smooth_landmarks, stable_crop_boxes
from pybilayer.synthetic import Pose, project, talking_head_sequence

needs_dlib = pytest.mark.skipif(_dlib_status() is not None, reason=str(_dlib_status()))
needs_mediapipe = pytest.mark.skipif(_mediapipe_status() is not None, reason=str(_mediapipe_status()))
needs_skimage = pytest.mark.skipif(
    importlib.util.find_spec("skimage") is None, reason="scikit-image (astronaut photo) is not installed"
)

# The astronaut's face in skimage.data.astronaut(): dlib's HOG box is about (175, 76)-(265, 166).
ASTRONAUT_FACE = (150, 50, 300, 200)  # generous (left, top, right, bottom)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image (astronaut photo) is not installed")
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="module")
def dlib_detector():
    if _dlib_status() is not None:
        pytest.skip(_dlib_status())
    return create_detector("dlib")


def _inter_ocular(landmarks: np.ndarray) -> float:
    return float(np.linalg.norm(landmarks[36:42].mean(0) - landmarks[42:48].mean(0)))


# ---------------------------------------------------------------- detectors


@needs_dlib
def test_dlib_finds_68_points_in_the_face_region(astronaut, dlib_detector):
    faces = dlib_detector.detect(astronaut)
    assert len(faces) >= 1
    landmarks = faces[0]
    assert landmarks.shape == (68, 2) and landmarks.dtype == np.float32
    left, top, right, bottom = ASTRONAUT_FACE
    assert np.all((landmarks[:, 0] > left) & (landmarks[:, 0] < right))
    assert np.all((landmarks[:, 1] > top) & (landmarks[:, 1] < bottom))
    # iBUG anatomy: brows above eyes above nose tip above mouth above chin; subject's right eye on image left.
    brows, eyes, nose_tip, mouth, chin = (landmarks[17:27, 1].mean(), landmarks[36:48, 1].mean(),
                                          landmarks[30, 1], landmarks[48:68, 1].mean(), landmarks[8, 1])
    assert brows < eyes < nose_tip < mouth < chin
    assert landmarks[36:42, 0].mean() < landmarks[42:48, 0].mean()
    assert 30 < _inter_ocular(landmarks) < 70


@needs_dlib
def test_detect_one_on_a_blank_image_raises_no_face(dlib_detector):
    blank = np.full((240, 320, 3), 128, np.uint8)
    assert dlib_detector.detect(blank) == []
    with pytest.raises(NoFaceError, match="no face found.*dlib"):
        detect_one(blank, dlib_detector)


@needs_dlib
def test_several_faces_largest_first_and_index_choice(astronaut, dlib_detector):
    from PIL import Image

    from pybilayer.landmarks import DlibDetector

    face = astronaut[0:288, 80:368]
    small = np.asarray(Image.fromarray(face).resize((216, 216), Image.BILINEAR))
    canvas = np.full((288, 288 + 216, 3), 200, np.uint8)
    canvas[:, 288:][36:252] = small  # the smaller copy on the right
    canvas[:, :288] = face
    detector = DlibDetector(upsample=1)
    faces = detector.detect(canvas)
    assert len(faces) == 2
    sizes = [np.ptp(f, axis=0).max() for f in faces]
    assert sizes[0] > sizes[1] * 1.2
    assert faces[0][:, 0].mean() < 288 < faces[1][:, 0].mean()
    np.testing.assert_array_equal(detect_one(canvas, detector, index=1), faces[1])
    with pytest.raises(NoFaceError, match="face index 2 requested but only 2 face"):
        detect_one(canvas, detector, index=2)
    with pytest.raises(ValueError, match="index"):
        detect_one(canvas, detector, index=-1)


@needs_dlib
@needs_mediapipe
def test_mediapipe_mapping_agrees_with_dlib(astronaut, dlib_detector):
    mp_faces = create_detector("mediapipe").detect(astronaut)
    assert len(mp_faces) == 1
    reference = dlib_detector.detect(astronaut)[0]
    error = np.linalg.norm(mp_faces[0] - reference, axis=1) / _inter_ocular(reference)
    # offline_assets.md: inner 51 points agree within ~0.03-0.04 of the inter-ocular distance; the jaw
    # line follows a different contour (0.08-0.19). A wrong index in the map gives errors of 0.3 and more.
    assert error[17:].mean() < 0.06 and error[17:].max() < 0.15
    assert error[:17].mean() < 0.25


@needs_mediapipe
def test_mediapipe_blank_image_has_no_face():
    detector = create_detector("mediapipe")
    assert detector.detect(np.zeros((200, 200, 3), np.uint8)) == []


def test_mediapipe_index_map_is_well_formed():
    assert len(MEDIAPIPE_TO_IBUG68) == 68
    assert all(1 <= len(group) <= 2 and all(0 <= i < 468 for i in group) for group in MEDIAPIPE_TO_IBUG68)


def test_detector_statuses_and_unknown_name():
    statuses = {s.name: s for s in detector_statuses()}
    assert set(statuses) == {"face-alignment", "dlib", "mediapipe"}
    assert "commercial" in statuses["dlib"].licence
    for status in statuses.values():
        assert status.available == (status.reason == "usable")
    with pytest.raises(BackendUnavailableError, match="unknown landmark detector 'nope'"):
        create_detector("nope")


def test_auto_detector_is_the_first_usable_one():
    usable = [s.name for s in detector_statuses() if s.available]
    if not usable:
        with pytest.raises(BackendUnavailableError, match="no landmark detector is usable"):
            create_detector("auto")
        return
    assert create_detector("auto").name == usable[0]


def test_face_alignment_is_refused_without_weights_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: nothing may be downloaded
    reason = _face_alignment_status()
    assert reason is not None
    with pytest.raises(BackendUnavailableError):
        create_detector("face-alignment")


_FAKE_FACE_ALIGNMENT = {
    "__init__.py": (
        "import enum\n"
        "from . import api\n"
        "class LandmarksType(enum.IntEnum):\n    TWO_D = 1\n"
        "class FaceAlignment:\n"
        "    constructed = []\n"
        "    def __init__(self, landmarks_type, **kwargs):\n"
        "        FaceAlignment.constructed.append(kwargs)\n"
        "    def get_landmarks_from_image(self, image, return_bboxes=False, return_landmark_score=False):\n"
        "        import numpy as np\n"
        "        small = np.stack([np.arange(68.0), np.arange(68.0)], 1)\n"
        "        large = small * 3\n"
        "        return [small, large], None, [np.array([0, 0, 67, 67, 0.9]), np.array([0, 0, 201, 201, 0.8])]\n"
    ),
    "api.py": "models_urls = {'2DFAN-4': 'https://example.invalid/python-fan/2DFAN4-11f355bf06.pth.tar'}\n",
    "detection/__init__.py": "",
    "detection/sfd/__init__.py": "",
    "detection/sfd/sfd_detector.py": "models_urls = {'s3fd': 'https://example.invalid/python-fan/s3fd-619a316812.pth'}\n",
}


def test_face_alignment_adapter_uses_weights_on_disk_only(tmp_path, monkeypatch):
    """A stand-in face_alignment package (the real one needs numba and downloaded weights)."""
    import sys

    for name, text in _FAKE_FACE_ALIGNMENT.items():
        (tmp_path / "pkgs" / "face_alignment" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkgs" / "face_alignment" / name).write_text(text)
    for module in [m for m in sys.modules if m == "face_alignment" or m.startswith("face_alignment.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"

    reason = _face_alignment_status()
    assert "not on disk" in reason and "2DFAN4-11f355bf06.pth.tar" in reason and "s3fd-619a316812.pth" in reason
    with pytest.raises(BackendUnavailableError, match="never does"):
        create_detector("face-alignment")

    checkpoints.mkdir(parents=True)
    (checkpoints / "2DFAN4-11f355bf06.pth.tar").write_bytes(b"weights")
    assert "s3fd" in _face_alignment_status()  # one file is not enough
    (checkpoints / "s3fd-619a316812.pth").write_bytes(b"weights")
    assert _face_alignment_status() is None
    detector = create_detector("face-alignment")
    import face_alignment

    assert face_alignment.FaceAlignment.constructed[-1]["compile"] is False  # no 70 s torch.compile
    faces = detector.detect(np.zeros((210, 210, 3), np.uint8))
    assert [f.shape for f in faces] == [(68, 2), (68, 2)] and faces[0].dtype == np.float32
    assert faces[0][:, 0].max() == pytest.approx(201.0)  # largest first


def test_bad_images_are_refused(dlib_detector):
    with pytest.raises(MediaError, match="uint8"):
        dlib_detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(MediaError, match="RGB"):
        dlib_detector.detect(np.zeros((64, 64, 5), np.uint8))


# ---------------------------------------------------------------- faces across frames


class _ScriptedDetector:
    """Returns prepared faces per call, as a detector would (largest first)."""

    name = "scripted"

    def __init__(self, frames):
        self._frames = iter(frames)

    def detect(self, image):
        return next(self._frames)


def _face(center, scale=60.0):
    return project(Pose(), center, scale)


def test_face_follower_keeps_the_same_face():
    a, b = _face((100, 100), 60), _face((300, 100), 80)  # b is larger: first in a detector's list
    frames = [[b, a], [b, _face((104, 100), 60)], [], [_face((108, 101), 60), b], [b]]
    follower = FaceFollower(_ScriptedDetector(frames), index=1)  # choose a, the second largest
    picks = [follower(None) for _ in frames]
    assert picks[0] is a
    assert np.allclose(picks[1].mean(0), _face((104, 100)).mean(0))
    assert picks[2] is None  # no face at all
    assert np.allclose(picks[3].mean(0), _face((108, 101)).mean(0))
    assert picks[4] is None  # only the other person left: not taken over


def test_fill_missing_uses_nearest_detection():
    a, b = _face((100, 100)), _face((150, 100))
    filled = fill_missing([None, a, None, None, b, None])
    np.testing.assert_array_equal(filled.found, [False, True, False, False, True, False])
    for i, expected in enumerate([a, a, a, b, b, b]):
        np.testing.assert_array_equal(filled.landmarks[i], expected)
    with pytest.raises(NoFaceError, match="no face found in any of the 3 frame"):
        fill_missing([None, None, None])


# ---------------------------------------------------------------- landmark files


def test_landmark_files_round_trip_and_bad_files(tmp_path):
    sequence = talking_head_sequence(5)
    path = tmp_path / "lm.npy"
    save_landmarks(path, sequence)
    np.testing.assert_array_equal(load_landmarks(path), sequence)
    single = tmp_path / "one.npy"
    np.save(single, sequence[0])
    assert load_landmarks(single).shape == (1, 68, 2)

    np.save(tmp_path / "wrong.npy", np.zeros((4, 5)))
    with pytest.raises(MediaError, match=r"shape \(N, 68, 2\).*\(4, 5\)"):
        load_landmarks(tmp_path / "wrong.npy")
    bad = sequence.copy()
    bad[2, 3, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(MediaError, match="NaN"):
        load_landmarks(tmp_path / "nan.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MediaError):
        load_landmarks(tmp_path / "objects.npy")  # pickles are never loaded
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(MediaError, match="not a readable"):
        load_landmarks(tmp_path / "text.npy")
    with pytest.raises(MediaError, match="no such file"):
        load_landmarks(tmp_path / "missing.npy")


# ---------------------------------------------------------------- smoothing


def _noisy(truth: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    return (truth + np.random.default_rng(seed).normal(0.0, sigma, truth.shape)).astype(np.float32)


def test_one_euro_reduces_jitter_and_follows_a_step():
    fps, n = 25.0, 100
    truth = np.repeat(_face((128, 130), 80)[None], n, axis=0).astype(np.float64)
    truth[50:] += np.array([30.0, 0.0])  # the head jumps by about a third of its size
    noisy = _noisy(truth, 1.5)
    smoothed = smooth_landmarks(noisy, fps)

    still = slice(10, 50)
    rms_raw = np.sqrt(((noisy - truth)[still] ** 2).mean())
    rms_smooth = np.sqrt(((smoothed - truth)[still] ** 2).mean())
    assert rms_smooth < 0.6 * rms_raw
    jitter_raw = np.abs(np.diff(noisy[still], axis=0)).mean()
    jitter_smooth = np.abs(np.diff(smoothed[still], axis=0)).mean()
    assert jitter_smooth < 0.35 * jitter_raw
    # Follows the step: more than halfway after 2 frames, within the noise after 5.
    error_after = np.abs(smoothed - truth)[50:].mean(axis=(1, 2))
    assert error_after[1] < 15.0
    assert error_after[5] < 1.5 * 1.5


def test_one_euro_on_a_moving_head_tracks_it():
    truth = talking_head_sequence(100)  # nods, turns, and a mouth opening at 2 Hz
    noisy = _noisy(truth, 1.5, seed=1)
    smoothed = smooth_landmarks(noisy, 25.0)
    rms_raw = np.sqrt(((noisy - truth)[5:] ** 2).mean())
    rms_smooth = np.sqrt(((smoothed - truth)[5:] ** 2).mean())
    assert rms_smooth < 0.9 * rms_raw  # less error than the detector noise, despite the motion
    jitter_raw = np.abs(np.diff(noisy - truth, axis=0)).mean()
    jitter_smooth = np.abs(np.diff(smoothed - truth, axis=0)).mean()
    assert jitter_smooth < 0.6 * jitter_raw


def test_one_euro_filter_arguments():
    with pytest.raises(ValueError, match="fps"):
        OneEuroFilter(0.0)
    with pytest.raises(ValueError, match="min_cutoff"):
        OneEuroFilter(25.0, min_cutoff=0.0)
    f = OneEuroFilter(25.0)
    first = f(np.array([1.0, 2.0]))
    np.testing.assert_array_equal(first, [1.0, 2.0])  # the first sample passes unchanged
    with pytest.raises(ValueError, match="shape"):
        f(np.zeros(3))


def test_stable_crop_is_still_on_a_still_head_and_follows_a_move():
    fps, n = 25.0, 120
    truth = np.repeat(_face((128, 130), 80)[None], n, axis=0).astype(np.float64)
    truth[60:] += np.array([40.0, 10.0])
    noisy = _noisy(truth, 1.5, seed=2)
    raw = [crop_box(lm) for lm in noisy]
    stable = stable_crop_boxes(noisy, fps)
    def changes(boxes):
        return sum(a != b for a, b in zip(boxes[:-1], boxes[1:]))

    assert changes(raw[20:60]) > 25  # the official per-frame crop jitters on nearly every frame
    assert changes(stable[20:60]) <= 1  # the stable one (after settling from the first frame) barely moves
    target = crop_box(truth[-1])
    assert np.abs(np.subtract(stable[70], target)).max() <= 5  # 10 frames after the move
    assert np.abs(np.subtract(stable[-1], target)).max() <= 2
    assert all(b.right - b.left == b.bottom - b.top for b in stable)


def test_stable_crop_streaming_matches_the_batch_helper():
    sequence = _noisy(talking_head_sequence(30), 1.0, seed=3)
    stable = StableCrop(25.0)
    assert [stable(lm) for lm in sequence] == stable_crop_boxes(sequence, 25.0)
