"""68-point facial landmarks (iBUG 300-W order, float pixels) behind one interface.

Backends, each optional:

- ``face-alignment``: FAN 2D, the detector of the official pipeline. Used only when its weights are
  already on disk (``$TORCH_HOME/hub/checkpoints``); this module never lets it download.
- ``dlib``: HOG face detector + ``shape_predictor_68_face_landmarks.dat`` from ``face_recognition_models``.
  That model was trained on iBUG 300-W, whose licence excludes commercial use.
- ``mediapipe``: 0.10.21's face mesh (478 points, models inside the wheel, Apache-2.0), mapped to 68.
  Its jaw line follows the visible contour differently from iBUG's (about 0.1 of the inter-ocular distance);
  the inner 51 points agree with dlib closely.

``create_detector("auto")`` takes the first usable backend in that order and never triggers a download.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import BackendUnavailableError, MediaError, NoFaceError

DETECTOR_NAMES = ("face-alignment", "dlib", "mediapipe")

DLIB_LICENCE_NOTE = (
    "dlib's 68-point model was trained on iBUG 300-W, whose licence excludes commercial use"
)


@runtime_checkable
class LandmarkDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[np.ndarray]:
        """All faces in a uint8 RGB (H, W, 3) image as (68, 2) float32 pixel arrays, largest face first."""
        ...


@dataclass(frozen=True)
class DetectorStatus:
    name: str
    available: bool
    reason: str  # why it is unusable; "usable" when it is
    licence: str


def as_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Validate an image and return it as a C-contiguous uint8 (H, W, 3) RGB array."""
    if not isinstance(image, np.ndarray):
        raise MediaError(f"{what}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise MediaError(f"{what}: expected dtype uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise MediaError(f"{what}: expected an (H, W, 3) RGB image, got shape {tuple(image.shape)}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise MediaError(f"{what}: image of {image.shape[1]}x{image.shape[0]} pixels is too small")
    return np.ascontiguousarray(image)


def _order_largest_first(faces: list[np.ndarray], scores: list[float]) -> list[np.ndarray]:
    """Sort by landmark bounding-box area, then detector score (ties happen: dlib boxes are quantised)."""
    def key(i: int) -> tuple[float, float]:
        extent = faces[i].max(axis=0) - faces[i].min(axis=0)
        return (-float(extent[0] * extent[1]), -scores[i])

    return [faces[i] for i in sorted(range(len(faces)), key=key)]


# ---------------------------------------------------------------- dlib


def _dlib_model_path() -> str:
    # `import face_recognition_models` needs pkg_resources (gone in setuptools >= 81): locate it instead.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise BackendUnavailableError(
            "dlib landmarks need face_recognition_models==0.3.0 (pip install face_recognition_models)"
        )
    path = os.path.join(os.path.dirname(spec.origin), "models", "shape_predictor_68_face_landmarks.dat")
    if not os.path.isfile(path):
        raise BackendUnavailableError(f"face_recognition_models is installed but {path} is missing")
    return path


def _dlib_status() -> str | None:
    if importlib.util.find_spec("dlib") is None:
        return "dlib is not installed (pip install dlib-bin==20.0.1.post1)"
    try:
        _dlib_model_path()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


@lru_cache(maxsize=1)
def _dlib_models():
    """HOG face detector and 68-point model (each takes seconds to load), shared by every DlibDetector,
    with the lock that serialises their use (dlib objects are not documented as thread-safe)."""
    import dlib

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(_dlib_model_path()), threading.Lock()


class DlibDetector:
    """dlib HOG face detector + 68-point shape predictor.

    Detection runs on a copy scaled so that its longer side is at most ``detect_max_side`` (HOG cost grows
    with pixels; faces in a photo are rarely small), upsampled once when the image is small so that faces
    down to ~40 px are found. The shape predictor runs on the full-resolution image.
    """

    name = "dlib"
    licence = DLIB_LICENCE_NOTE

    def __init__(self, detect_max_side: int = 640, upsample: int | None = None):
        reason = _dlib_status()
        if reason:
            raise BackendUnavailableError(reason)
        import dlib

        self._dlib = dlib
        self._face_detector, self._predictor, self._lock = _dlib_models()
        self._detect_max_side = detect_max_side
        self._upsample = upsample  # None: once for small images, else not at all

    def detect(self, image: np.ndarray) -> list[np.ndarray]:
        image = as_rgb_uint8(image)
        height, width = image.shape[:2]
        scale = min(1.0, self._detect_max_side / max(height, width))
        small = image if scale == 1.0 else _resize(image, scale)
        upsample = self._upsample
        if upsample is None:
            upsample = 1 if max(small.shape[:2]) <= 400 else 0
        with self._lock:
            rects, scores, _ = self._face_detector.run(small, upsample, 0.0)
            faces = []
            for rect in rects:
                full = self._dlib.rectangle(
                    int(round(rect.left() / scale)),
                    int(round(rect.top() / scale)),
                    int(round(rect.right() / scale)),
                    int(round(rect.bottom() / scale)),
                )
                shape = self._predictor(image, full)
                faces.append(
                    np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
                )
        return _order_largest_first(faces, list(scores))


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    height, width = image.shape[:2]
    size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


# ---------------------------------------------------------------- mediapipe

# Face-mesh vertex (or the mean of two) for each iBUG point: jaw 0-16, brows 17-26, nose 27-35,
# eyes 36-47, outer lips 48-59, inner lips 60-67. iBUG's left/right are the subject's.
MEDIAPIPE_TO_IBUG68: tuple[tuple[int, ...], ...] = (
    (127,), (234,), (93,), (132, 58), (58, 172), (136,), (150,), (176,), (152,),
    (400,), (379,), (365,), (397, 288), (361,), (323,), (454,), (356,),
    (70,), (63,), (105,), (66,), (107,),
    (336,), (296,), (334,), (293,), (300,),
    (168, 6), (197, 195), (5,), (4,),
    (75,), (97,), (2,), (326,), (305,),
    (33,), (160,), (158,), (133,), (153,), (144,),
    (362,), (385,), (387,), (263,), (373,), (380,),
    (61,), (39,), (37,), (0,), (267,), (269,), (291,), (405,), (314,), (17,), (84,), (181,),
    (78,), (82,), (13,), (312,), (308,), (317,), (14,), (87,),
)


def mediapipe_to_ibug68(mesh: np.ndarray) -> np.ndarray:
    """(468 or 478, 2) face-mesh points -> (68, 2) float32 in iBUG order."""
    if mesh.ndim != 2 or mesh.shape[0] < 468:
        raise ValueError(f"mesh: expected (>=468, 2) points, got {tuple(mesh.shape)}")
    return np.stack([mesh[list(idx), :2].mean(axis=0) for idx in MEDIAPIPE_TO_IBUG68]).astype(np.float32)


@lru_cache(maxsize=1)
def _mediapipe_status() -> str | None:
    if importlib.util.find_spec("mediapipe") is None:
        return (
            "mediapipe is not installed (pip install --no-deps mediapipe==0.10.21; "
            "then protobuf==6.33.6 absl-py matplotlib)"
        )
    try:
        mp = _import_mediapipe()
    except Exception as exc:  # a broken install raises anything (protobuf, numpy ABI ...)
        return f"mediapipe failed to import: {type(exc).__name__}: {exc}"
    if not hasattr(mp, "solutions") or not hasattr(mp.solutions, "face_mesh"):
        return (
            f"mediapipe {getattr(mp, '__version__', '?')} has no solutions.face_mesh "
            "(0.10.30 and later ship no models; install mediapipe==0.10.21)"
        )
    return None


def _import_mediapipe():
    # Its native module prints a harmless protobuf message on stderr at import; keep the CLI's stderr clean.
    with _silenced_stderr():
        import mediapipe

    return mediapipe


@contextlib.contextmanager
def _silenced_stderr():
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


@lru_cache(maxsize=1)
def _warmup_face() -> np.ndarray:
    from importlib import resources

    from PIL import Image

    with resources.files("pybilayer.data").joinpath("demo_source.jpg").open("rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


class MediapipeDetector:
    """mediapipe face mesh (legacy ``solutions.face_mesh``), 478 points mapped to 68.

    ``video=True`` lets mediapipe track between calls (faster, smoother) and assumes consecutive frames.
    """

    name = "mediapipe"
    licence = "Apache-2.0 (mediapipe code and face-mesh model)"

    def __init__(self, max_faces: int = 4, video: bool = False, min_confidence: float = 0.5):
        reason = _mediapipe_status()
        if reason:
            raise BackendUnavailableError(reason)
        mp = _import_mediapipe()
        # Building the graph makes its threads log several lines straight to stderr, some of them only
        # once the first image has run through: run a blank one while stderr is silenced.
        with _silenced_stderr():
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=not video,
                max_num_faces=max_faces,
                refine_landmarks=False,
                min_detection_confidence=min_confidence,
            )
            self._mesh.process(_warmup_face())
            if video:  # forget the warm-up face: tracking must start from the caller's first frame
                self._mesh.reset()
                self._mesh.process(np.zeros((64, 64, 3), np.uint8))
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[np.ndarray]:
        image = as_rgb_uint8(image)
        height, width = image.shape[:2]
        with self._lock:
            result = self._mesh.process(image)
        faces = []
        for face in result.multi_face_landmarks or []:
            mesh = np.array([[p.x * width, p.y * height] for p in face.landmark], dtype=np.float32)
            faces.append(mediapipe_to_ibug68(mesh))
        return _order_largest_first(faces, [0.0] * len(faces))

    def close(self) -> None:
        self._mesh.close()


# ---------------------------------------------------------------- face-alignment


def _torch_hub_checkpoints() -> str:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch"
    )
    return os.path.join(torch_home, "hub", "checkpoints")


def face_alignment_weight_files() -> list[str]:
    """Paths face-alignment (2D FAN + S3FD) loads its weights from; it downloads them when absent."""
    from urllib.parse import urlparse

    import face_alignment.api as fa_api
    import face_alignment.detection.sfd.sfd_detector as fa_sfd

    urls = (fa_api.models_urls["2DFAN-4"], fa_sfd.models_urls["s3fd"])
    return [os.path.join(_torch_hub_checkpoints(), os.path.basename(urlparse(u).path)) for u in urls]


def _face_alignment_status() -> str | None:
    if importlib.util.find_spec("face_alignment") is None:
        return "face_alignment is not installed (pip install --no-deps face-alignment==1.5.0)"
    try:
        files = face_alignment_weight_files()
    except Exception as exc:
        return f"face_alignment failed to import: {type(exc).__name__}: {exc}"
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        return (
            "face-alignment weights are not on disk (it would download them; pybilayer never does): "
            + ", ".join(missing)
        )
    return None


class FaceAlignmentDetector:
    """face-alignment's FAN 2D with its S3FD detector, on weights already in the torch hub cache."""

    name = "face-alignment"
    licence = "BSD-3-Clause code; FAN/S3FD weights under their authors' terms"

    def __init__(self, device: str = "cpu"):
        reason = _face_alignment_status()
        if reason:
            raise BackendUnavailableError(reason)
        import face_alignment

        # compile=False: torch.compile costs ~70 s on first construction and gains little on CPU.
        self._fa = face_alignment.FaceAlignment(
            face_alignment.LandmarksType.TWO_D, device=device, flip_input=True, compile=False
        )
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> list[np.ndarray]:
        image = as_rgb_uint8(image)
        with self._lock:
            landmarks, scores, boxes = self._fa.get_landmarks_from_image(
                image, return_bboxes=True, return_landmark_score=False
            )
        if landmarks is None:
            return []
        faces = [np.asarray(lm[:, :2], dtype=np.float32) for lm in landmarks]
        box_scores = [float(b[-1]) if b is not None and len(b) > 4 else 0.0 for b in boxes]
        return _order_largest_first(faces, box_scores)


# ---------------------------------------------------------------- selection

_STATUS_PROBES = {
    "face-alignment": (_face_alignment_status, FaceAlignmentDetector.licence),
    "dlib": (_dlib_status, DLIB_LICENCE_NOTE),
    "mediapipe": (_mediapipe_status, MediapipeDetector.licence),
}


def detector_statuses() -> list[DetectorStatus]:
    """Every backend, whether it is usable here and why not; in ``auto``'s order of preference."""
    out = []
    for name in DETECTOR_NAMES:
        probe, licence = _STATUS_PROBES[name]
        reason = probe()
        out.append(DetectorStatus(name, reason is None, reason or "usable", licence))
    return out


def create_detector(name: str = "auto", *, video: bool = False, max_faces: int = 4) -> LandmarkDetector:
    """A landmark detector by name (``auto``, ``face-alignment``, ``dlib``, ``mediapipe``).

    ``auto`` takes the first usable backend in the order of :data:`DETECTOR_NAMES`, checking availability
    without downloading anything. ``video=True`` allows a backend to track across consecutive calls.
    """
    if name == "auto":
        statuses = detector_statuses()
        for status in statuses:
            if status.available:
                return create_detector(status.name, video=video, max_faces=max_faces)
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in statuses)
        raise BackendUnavailableError(f"no landmark detector is usable here ({reasons})")
    if name == "dlib":
        return DlibDetector()
    if name == "mediapipe":
        return MediapipeDetector(max_faces=max_faces, video=video)
    if name == "face-alignment":
        return FaceAlignmentDetector()
    raise BackendUnavailableError(
        f"unknown landmark detector {name!r}; choose one of auto, {', '.join(DETECTOR_NAMES)}"
    )


@lru_cache(maxsize=1)
def _default_detector() -> LandmarkDetector:
    return create_detector("auto")


def detect_one(
    image: np.ndarray, detector: LandmarkDetector | None = None, index: int = 0
) -> np.ndarray:
    """The (68, 2) float32 landmarks of one face: the largest (``index=0``) or the ``index``-th by size.

    Raises NoFaceError when there is no face, or fewer than ``index + 1`` faces.
    """
    if index < 0:
        raise ValueError(f"index: expected a face index >= 0, got {index}")
    detector = detector if detector is not None else _default_detector()
    faces = detector.detect(image)
    if not faces:
        raise NoFaceError(f"no face found in the image (landmark detector: {detector.name})")
    if index >= len(faces):
        raise NoFaceError(
            f"face index {index} requested but only {len(faces)} face(s) found "
            f"(landmark detector: {detector.name}; faces are numbered from 0, largest first)"
        )
    return faces[index]


def _center(landmarks: np.ndarray) -> np.ndarray:
    return (landmarks.min(axis=0) + landmarks.max(axis=0)) / 2


@dataclass(frozen=True)
class SequenceLandmarks:
    landmarks: np.ndarray  # (N, 68, 2) float32; frames without the face hold their nearest detection
    found: np.ndarray  # (N,) bool: whether the face was detected in that frame


class FaceFollower:
    """Picks the same face in consecutive frames.

    The first frame with at least ``index + 1`` faces picks face ``index`` (largest first); later frames
    pick the face nearest to the previous pick, provided it lies within one face size of it, so a
    second person entering the picture never takes over. Returns None for a frame without that face.
    """

    def __init__(self, detector: LandmarkDetector, index: int = 0):
        if index < 0:
            raise ValueError(f"index: expected a face index >= 0, got {index}")
        self.detector = detector
        self.index = index
        self._previous: np.ndarray | None = None

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        faces = self.detector.detect(frame)
        if self._previous is None:
            if len(faces) <= self.index:
                return None
            chosen = faces[self.index]
        else:
            if not faces:
                return None
            previous_center = _center(self._previous)
            distances = [float(np.linalg.norm(_center(f) - previous_center)) for f in faces]
            best = int(np.argmin(distances))
            size = float((self._previous.max(axis=0) - self._previous.min(axis=0)).max())
            if distances[best] > max(size, 1.0):
                return None
            chosen = faces[best]
        self._previous = chosen
        return chosen


def fill_missing(per_frame: list[np.ndarray | None]) -> SequenceLandmarks:
    """Frames without landmarks take those of the nearest frame that has them (earlier one on ties).

    Raises NoFaceError when no frame has any.
    """
    found = np.array([lm is not None for lm in per_frame], dtype=bool)
    if not found.any():
        raise NoFaceError(f"no face found in any of the {len(per_frame)} frame(s)")
    detected = np.flatnonzero(found)
    out = np.empty((len(per_frame), 68, 2), dtype=np.float32)
    for i in range(len(per_frame)):
        nearest = detected[np.argmin(np.abs(detected - i))]
        out[i] = per_frame[nearest]
    return SequenceLandmarks(out, found)


def load_landmarks(path: str | os.PathLike) -> np.ndarray:
    """A landmark file (.npy of (N, 68, 2) or (68, 2) pixels) as (N, 68, 2) float32; MediaError if not."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MediaError(f"{path}: no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise MediaError(f"{path}: not a readable .npy landmark file ({exc})") from exc
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise MediaError(f"{path}: expected a numeric array of landmarks, got dtype {getattr(array, 'dtype', '?')}")
    if array.shape == (68, 2):
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (68, 2) or array.shape[0] == 0:
        raise MediaError(f"{path}: expected landmarks of shape (N, 68, 2) or (68, 2), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise MediaError(f"{path}: landmarks contain NaN or infinite values")
    return array.astype(np.float32)


def save_landmarks(path: str | os.PathLike, landmarks: np.ndarray) -> None:
    """Write (N, 68, 2) float32 landmarks to a .npy file atomically."""
    from .fileio import atomic_path

    path = os.fspath(path)
    if not path.endswith(".npy"):
        raise MediaError(f"{path}: landmark files are .npy")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(landmarks, dtype=np.float32))
