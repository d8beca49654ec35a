"""Geometry with the official semantics (official_bilayer.md 1.2): crop box, keypoint normalisation,
the 68-point stickman, the identity grid, and ``preprocess``.

Landmarks are (68, 2) float pixel coordinates (iBUG 300-W order) at the public edge and [-1, 1] crop
coordinates inside. The stickman is drawn with OpenCV (``cv2.polylines``, LINE_8, thickness 2), the
rasteriser the official model was trained with, so its pixels match exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .models.config import NUM_KEYPOINTS
from .models.warp import identity_grid

IMAGE_SIZE = 256
STICKMAN_THICKNESS = 2
STICKMAN_BACKGROUND = 1  # the canvas is np.ones(..., uint8): 1/255, not 0

# (points, closed, RGB colour) per part, in drawing order (later parts overwrite earlier ones).
STICKMAN_PARTS: tuple[tuple[tuple[int, ...], bool, tuple[int, int, int]], ...] = (
    (tuple(range(0, 17)), False, (255, 255, 255)),  # jaw
    (tuple(range(17, 22)), False, (255, 0, 0)),  # right brow
    (tuple(range(22, 27)), False, (0, 255, 0)),  # left brow
    (tuple(range(27, 31)) + (30, 33), False, (0, 0, 255)),  # nose bridge
    (tuple(range(31, 36)), False, (0, 0, 255)),  # nostrils
    (tuple(range(36, 42)), True, (255, 0, 255)),  # right eye
    (tuple(range(42, 48)), True, (0, 255, 255)),  # left eye
    (tuple(range(48, 60)), True, (255, 255, 0)),  # outer lips
    (tuple(range(60, 68)), True, (255, 255, 0)),  # inner lips
)


class CropBox(NamedTuple):
    """Square crop (left, top, right, bottom) in source pixels; may extend past the image."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> int:
        return self.right - self.left


def _landmarks(landmarks_px, name: str = "landmarks_px") -> np.ndarray:
    array = np.asarray(landmarks_px, dtype=np.float64)
    if array.shape != (NUM_KEYPOINTS, 2):
        raise ValueError(f"{name} must have shape (68, 2), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def crop_box(landmarks_px) -> CropBox:
    """Official crop: centre of the landmark bounding box (rounded half-to-even), half-side
    ``size = int(max(bbox_w, bbox_h))``, centre moved up by ``size // 6``; side ``2 * size``."""
    points = _landmarks(landmarks_px).astype(np.float32)  # the official detector's dtype and arithmetic
    lo, hi = points.min(0), points.max(0)
    center = np.round((lo + hi) / 2).astype(int)
    size = int(max(hi[0] - lo[0], hi[1] - lo[1]))
    if size < 1:
        raise ValueError("landmarks_px span less than one pixel: cannot define a crop")
    center[1] -= size // 6
    cx, cy = int(center[0]), int(center[1])
    return CropBox(cx - size, cy - size, cx + size, cy + size)


def normalize_keypoints(landmarks_px, box: CropBox) -> np.ndarray:
    """Pixel landmarks -> [-1, 1] coordinates of the square crop ``box`` (float32, (68, 2))."""
    points = _landmarks(landmarks_px)
    box = CropBox(*box)
    if box.size <= 0 or box.bottom - box.top != box.size:
        raise ValueError(f"box must be a non-empty square (left, top, right, bottom), got {tuple(box)}")
    normalized = (points - np.array([box.left, box.top], dtype=np.float64)) / float(box.size)
    return ((normalized - 0.5) * 2).astype(np.float32)


def draw_stickman(keypoints_norm, size: int = IMAGE_SIZE) -> np.ndarray:
    """The official 68-point stickman of [-1, 1] keypoints as (3, size, size) float32 in [-1, 1].

    Points become ``int32((p + 1) / 2 * size)`` (truncation), each part is a ``cv2.polylines`` of
    thickness 2 in its colour, on a canvas of value 1 (so the background is 1/255 -> -0.99216)."""
    import cv2  # opencv-python-headless: the official rasteriser

    points = np.asarray(keypoints_norm, dtype=np.float32)
    if points.shape != (NUM_KEYPOINTS, 2):
        raise ValueError(f"keypoints_norm must have shape (68, 2), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("keypoints_norm contains NaN or infinite values")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    # float32 arithmetic as in the official code; far-away points are clipped so the int32 cast cannot
    # overflow (anything this far is off-canvas anyway).
    pixels = np.clip((points + np.float32(1)) / np.float32(2) * np.float32(size), -(2**20), 2**20).astype(np.int32)
    canvas = np.full((size, size, 3), STICKMAN_BACKGROUND, np.uint8)
    for indices, closed, color in STICKMAN_PARTS:
        cv2.polylines(canvas, [pixels[list(indices)].reshape(-1, 1, 2)], closed, color, thickness=STICKMAN_THICKNESS)
    return (canvas.transpose(2, 0, 1).astype(np.float32) / 255.0 - 0.5) * 2.0


def draw_stickmen(keypoints_norm, size: int = IMAGE_SIZE):
    """Batched ``draw_stickman`` for torch: (N, 68, 2) tensor -> (N, 3, size, size) tensor on its device."""
    import torch

    cpu = keypoints_norm.detach().to("cpu", torch.float32).numpy()
    stickmen = np.stack([draw_stickman(k, size) for k in cpu]) if len(cpu) else np.zeros((0, 3, size, size), np.float32)
    return torch.from_numpy(stickmen).to(device=keypoints_norm.device, dtype=keypoints_norm.dtype)


def crop_image(image_uint8_hwc: np.ndarray, box: CropBox, size: int = IMAGE_SIZE) -> np.ndarray:
    """PIL crop (black outside the image) and bicubic resize to ``size``: uint8 (size, size, 3)."""
    from PIL import Image

    image = np.asarray(image_uint8_hwc)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    cropped = Image.fromarray(image).crop(tuple(int(v) for v in box))
    return np.asarray(cropped.resize((size, size), Image.BICUBIC))


def preprocess(image_uint8_hwc: np.ndarray, landmarks_px, size: int = IMAGE_SIZE):
    """Official preprocessing of one frame.

    Returns ``(image, keypoints, box)``: image (3, size, size) float32 in [-1, 1]; keypoints (68, 2)
    float32 in [-1, 1] crop coordinates; box the ``CropBox`` in source pixels."""
    box = crop_box(landmarks_px)
    crop = crop_image(image_uint8_hwc, box, size)
    image = (crop.transpose(2, 0, 1).astype(np.float32) / 255.0 - 0.5) * 2.0
    return image, normalize_keypoints(landmarks_px, box), box


__all__ = [
    "CropBox",
    "IMAGE_SIZE",
    "STICKMAN_PARTS",
    "crop_box",
    "crop_image",
    "draw_stickman",
    "draw_stickmen",
    "identity_grid",
    "normalize_keypoints",
    "preprocess",
]
