"""Realistic synthetic 68-point landmark sequences.

A 3-D mean face (68x3, iBUG 300-W order, x right, y down, z towards the camera; from insightface's
``meanshape_68``, MIT) is rotated, its jaw opened, and projected orthographically. Tests, the
ONNX fp16 check and the demo use it wherever "realistic poses" are needed instead of uniform noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

# Lower-face points that move with the jaw: jaw line 3..13 and the lower lips.
_JAW_POINTS = np.r_[3:14, 55:60, 65:68]


@lru_cache(maxsize=1)
def mean_face_3d() -> np.ndarray:
    """The 3-D mean face, (68, 3) float32, roughly unit scale, centred near the origin."""
    with resources.files("pybilayer.data").joinpath("mean_face_68.npy").open("rb") as f:
        return np.load(f).astype(np.float32)


@dataclass(frozen=True)
class Pose:
    yaw: float = 0.0  # degrees, positive turns the face to its left (image right)
    pitch: float = 0.0  # degrees, positive tilts the chin down
    roll: float = 0.0  # degrees, in-plane rotation
    mouth: float = 0.0  # jaw opening, 0 closed .. 1 wide open


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    y, p, r = np.deg2rad([yaw, pitch, roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def project(pose: Pose, center: tuple[float, float], scale: float) -> np.ndarray:
    """Landmarks (68, 2) float32 in pixels for one pose; ``scale`` is the face width in pixels / 1.25."""
    shape = mean_face_3d().astype(np.float64).copy()
    if pose.mouth:
        # Open the jaw by rotating the lower face about an axis near the ears.
        pivot = np.array([0.0, -0.1, -0.2])
        jaw = _rotation(0.0, 18.0 * pose.mouth, 0.0)
        shape[_JAW_POINTS] = (shape[_JAW_POINTS] - pivot) @ jaw.T + pivot
    rotated = shape @ _rotation(pose.yaw, pose.pitch, pose.roll).T
    xy = rotated[:, :2] * scale + np.asarray(center, dtype=np.float64)
    return xy.astype(np.float32)


def random_poses(
    n: int,
    seed: int = 0,
    max_yaw: float = 30.0,
    max_pitch: float = 15.0,
    max_roll: float = 10.0,
) -> list[Pose]:
    """``n`` poses spread around the frontal face: rotations within the limits, mouth 0..1."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-1.0, 1.0, size=(n, 3)) * np.array([max_yaw, max_pitch, max_roll])
    mouth = rng.beta(0.7, 1.5, size=n)
    return [Pose(float(a), float(b), float(c), float(m)) for (a, b, c), m in zip(angles, mouth)]


def random_landmarks(
    n: int,
    image_size: int = 256,
    seed: int = 0,
    jitter: float = 0.01,
) -> np.ndarray:
    """(n, 68, 2) float32 pixel landmarks of realistic faces in an ``image_size`` square frame.

    Position and scale vary a little around a centred face, and each point gets a small
    detector-like jitter (``jitter`` times the face size).
    """
    rng = np.random.default_rng(seed)
    out = np.empty((n, 68, 2), dtype=np.float32)
    for i, pose in enumerate(random_poses(n, seed=seed)):
        scale = image_size * rng.uniform(0.28, 0.36)
        center = image_size * (0.5 + rng.uniform(-0.05, 0.05, size=2))
        lm = project(pose, (float(center[0]), float(center[1])), scale)
        out[i] = lm + rng.normal(0.0, jitter * scale, size=lm.shape)
    return out


def talking_head_sequence(
    n_frames: int,
    image_size: int = 256,
    fps: float = 25.0,
) -> np.ndarray:
    """(n_frames, 68, 2) float32: a smooth clip of a head nodding, turning and talking."""
    t = np.arange(n_frames) / fps
    frames = []
    for ti in t:
        pose = Pose(
            yaw=20.0 * np.sin(2 * np.pi * 0.25 * ti),
            pitch=8.0 * np.sin(2 * np.pi * 0.4 * ti + 1.0),
            roll=5.0 * np.sin(2 * np.pi * 0.2 * ti + 2.0),
            mouth=float(np.clip(0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * ti), 0.0, 1.0)),
        )
        frames.append(project(pose, (image_size / 2, image_size * 0.52), image_size * 0.32))
    return np.stack(frames)
