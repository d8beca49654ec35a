"""Temporal smoothing for driving landmarks, and stable crop boxes.

A landmark detector run frame by frame jitters by a pixel or two even on a still face, and the
official pipeline re-centres its crop on every frame's landmark box (official_bilayer.md section 6,
issue #14), so the jitter of the box moves the whole face. Two remedies, used together for video:

- :class:`LandmarkSmoother`: a One Euro filter (Casiez, Roussel and Vogel, CHI 2012) on the points:
  a low-pass filter whose cut-off rises with speed, so still faces are steady and fast motion lags little.
  Speed is measured in face sizes per second, so the parameters do not depend on the resolution.
- :class:`StableCrop`: the per-frame official box (:func:`pybilayer.geometry.crop_box`) smoothed with a
  slower One Euro filter plus a hysteresis, so the box stays put unless the head really moves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .geometry import CropBox, crop_box


def _alpha(cutoff_hz: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One Euro filter over arrays of any shape (each element filtered on its own).

    ``min_cutoff`` (Hz) sets the smoothing of slow motion; ``beta`` (Hz per unit/s of speed) how fast
    the cut-off rises with speed; ``d_cutoff`` (Hz) smooths the speed estimate itself.
    """

    def __init__(self, fps: float, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not min_cutoff > 0 or not d_cutoff > 0 or beta < 0:
            raise ValueError(
                f"need min_cutoff > 0, d_cutoff > 0, beta >= 0; got {min_cutoff}, {d_cutoff}, {beta}"
            )
        self.fps = float(fps)
        self.min_cutoff = float(min_cutoff)
        self.beta = float(beta)
        self.d_cutoff = float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        self._value: np.ndarray | None = None
        self._speed: np.ndarray | None = None
        self._time: float | None = None

    def __call__(self, value: np.ndarray, timestamp: float | None = None) -> np.ndarray:
        """Filter one sample; ``timestamp`` in seconds (default: one frame after the previous)."""
        value = np.asarray(value, dtype=np.float64)
        if self._value is None:
            self._value, self._speed = value.copy(), np.zeros_like(value)
            self._time = 0.0 if timestamp is None else float(timestamp)
            return value.copy()
        if value.shape != self._value.shape:
            raise ValueError(f"sample shape changed from {self._value.shape} to {value.shape}")
        dt = 1.0 / self.fps if timestamp is None else float(timestamp) - self._time
        if dt <= 0:  # repeated or out-of-order timestamp: nothing to learn about speed
            dt = 1.0 / self.fps
        self._time += dt
        speed = (value - self._value) / dt
        self._speed = self._speed + _alpha(self.d_cutoff, dt) * (speed - self._speed)
        cutoff = self.min_cutoff + self.beta * np.abs(self._speed)
        self._value = self._value + _alpha(cutoff, dt) * (value - self._value)
        return self._value.copy()


def face_size(landmarks: np.ndarray) -> float:
    """Larger side of the landmark bounding box, in pixels (at least 1)."""
    extent = landmarks.max(axis=0) - landmarks.min(axis=0)
    return max(1.0, float(extent.max()))


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (68, 2):
        raise ValueError(f"landmarks must have shape (68, 2), got {landmarks.shape}")
    if not np.all(np.isfinite(landmarks)):
        raise ValueError("landmarks contain NaN or infinite values")
    return landmarks


class LandmarkSmoother:
    """Streaming One Euro smoothing of (68, 2) pixel landmarks.

    ``beta`` is in Hz per (face size / s): with the defaults a still face gets a ~1 Hz low-pass, a head
    moving half a face per second a ~9 Hz one, and a mouth opening fast (1+ face/s) passes almost as is.
    (Tuned on pybilayer.synthetic.talking_head_sequence with 1-2 px noise: about half the frame-to-frame
    jitter, and less error than the raw detections despite a 2 Hz mouth.)
    """

    def __init__(self, fps: float, min_cutoff: float = 1.0, beta: float = 16.0, d_cutoff: float = 1.0):
        self.beta = float(beta)
        self._filter = OneEuroFilter(fps, min_cutoff=min_cutoff, beta=beta, d_cutoff=d_cutoff)
        self._face_size: float | None = None

    def reset(self) -> None:
        self._filter.reset()
        self._face_size = None

    def __call__(self, landmarks: np.ndarray, timestamp: float | None = None) -> np.ndarray:
        landmarks = _check_landmarks(landmarks)
        size = face_size(landmarks)
        # A slowly updated face size sets the speed unit; the per-frame size is itself noisy.
        self._face_size = size if self._face_size is None else 0.9 * self._face_size + 0.1 * size
        self._filter.beta = self.beta / self._face_size
        return self._filter(landmarks, timestamp).astype(np.float32)


def smooth_landmarks(
    sequence: np.ndarray, fps: float, min_cutoff: float = 1.0, beta: float = 16.0, d_cutoff: float = 1.0
) -> np.ndarray:
    """(N, 68, 2) landmarks of consecutive frames -> smoothed (N, 68, 2) float32."""
    sequence = np.asarray(sequence)
    if sequence.ndim != 3 or sequence.shape[1:] != (68, 2):
        raise ValueError(f"sequence must have shape (N, 68, 2), got {sequence.shape}")
    smoother = LandmarkSmoother(fps, min_cutoff=min_cutoff, beta=beta, d_cutoff=d_cutoff)
    out = np.empty(sequence.shape, dtype=np.float32)
    for i, frame in enumerate(sequence):
        out[i] = smoother(frame)
    return out


class StableCrop:
    """Crop boxes that follow the head without per-frame re-centring jitter.

    Each frame's official box (``geometry.crop_box``) is reduced to (centre x, centre y, half side),
    smoothed with a One Euro filter (slower than the landmark one: the box should barely move), and
    turned back into an integer square box; the integer box changes only when the smoothed value is
    more than ``hysteresis_px`` away from it, so a still head keeps the same box (with 1.5 px of
    independent noise per landmark, it changes about once a second instead of on every frame).
    """

    def __init__(
        self,
        fps: float,
        min_cutoff: float = 0.3,
        beta: float = 2.0,
        d_cutoff: float = 1.0,
        hysteresis_px: float = 1.5,
    ):
        self.beta = float(beta)
        self.hysteresis_px = float(hysteresis_px)
        self._filter = OneEuroFilter(fps, min_cutoff=min_cutoff, beta=beta, d_cutoff=d_cutoff)
        self._held: np.ndarray | None = None  # integer (cx, cy, half side) currently in use

    def reset(self) -> None:
        self._filter.reset()
        self._held = None

    def __call__(self, landmarks: np.ndarray, timestamp: float | None = None) -> CropBox:
        raw = crop_box(_check_landmarks(landmarks))
        half = raw.size / 2.0
        state = np.array([raw.left + half, raw.top + half, half])
        self._filter.beta = self.beta / max(1.0, 2.0 * half)  # speed in box sizes per second
        smoothed = self._filter(state, timestamp)
        if self._held is None:
            self._held = np.round(smoothed)
        else:
            moved = np.abs(smoothed - self._held) > self.hysteresis_px
            self._held = np.where(moved, np.round(smoothed), self._held)
        cx, cy, h = (int(v) for v in self._held)
        h = max(h, 1)
        return CropBox(cx - h, cy - h, cx + h, cy + h)


def stable_crop_boxes(sequence: Iterable[np.ndarray], fps: float, **kwargs) -> list[CropBox]:
    """One stable box per frame of a landmark sequence (see :class:`StableCrop`)."""
    stable = StableCrop(fps, **kwargs)
    return [stable(frame) for frame in sequence]
