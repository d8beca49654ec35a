"""Synthetic talking-head clips with exact landmarks, made from one real photo.

The photo is first aligned (similarity) to the frontal mean face of ``pybilayer.synthetic``, then each
frame warps it piecewise-affinely (Delaunay triangles over the 68 points plus border anchors) onto
that frame's projected landmarks, so every frame's landmarks are exact by construction. Hidden cheeks
and the mouth interior are not real, which is fine for tests and smoke runs.

Default photo: ``skimage.data.astronaut()`` (public domain), whose 68 landmarks (dlib, rounded) are
below. Used by the tests and by ``python training/synthetic_data.py DATA_ROOT`` for a smoke run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ASTRONAUT_LANDMARKS = np.array(
    [[179, 104], [179, 116], [180, 127], [181, 139], [185, 151], [191, 160], [200, 169], [209, 176], [221, 178],
     [232, 177], [243, 171], [253, 164], [260, 154], [265, 144], [268, 132], [270, 120], [272, 108], [186, 94],
     [192, 88], [200, 87], [208, 89], [216, 92], [236, 93], [244, 91], [252, 91], [260, 92], [265, 98], [225, 103],
     [225, 111], [225, 119], [225, 127], [214, 131], [219, 132], [224, 134], [229, 133], [234, 132], [195, 101],
     [200, 98], [207, 98], [212, 104], [206, 104], [199, 104], [238, 105], [244, 101], [250, 101], [255, 104],
     [250, 107], [244, 106], [201, 140], [209, 139], [218, 139], [223, 141], [229, 140], [237, 140], [245, 141],
     [237, 151], [229, 155], [222, 156], [216, 155], [208, 150], [204, 141], [217, 143], [223, 144], [229, 143],
     [243, 142], [229, 150], [223, 150], [217, 150]],
    dtype=np.float32,
)


def astronaut() -> tuple[np.ndarray, np.ndarray]:
    """(512, 512, 3) uint8 photo and its (68, 2) landmarks in pixels."""
    from skimage import data

    return data.astronaut(), ASTRONAUT_LANDMARKS.copy()


def _anchors(size: int) -> np.ndarray:
    s = size - 1
    h = s / 2
    return np.array([[0, 0], [h, 0], [s, 0], [0, h], [s, h], [0, s], [h, s], [s, s]], dtype=np.float64)


def _head_mask(landmarks: np.ndarray, size: int) -> np.ndarray:
    """A soft-edged ellipse over face and hair: the stand-in person mask of the aligned photo."""
    lo, hi = landmarks.min(0), landmarks.max(0)
    center = (lo + hi) / 2 - np.array([0.0, 0.18 * (hi[1] - lo[1])])
    axes = np.array([0.68 * (hi[0] - lo[0]), 0.85 * (hi[1] - lo[1])])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.sqrt(((xx - center[0]) / axes[0]) ** 2 + ((yy - center[1]) / axes[1]) ** 2)
    return np.clip((1.1 - r) / 0.2, 0.0, 1.0)


def _piecewise_affine_coords(dst_points: np.ndarray, src_points: np.ndarray, size: int) -> np.ndarray:
    """For each output pixel (x, y), its position in the source: the affine map of the Delaunay
    triangle of ``dst_points`` that holds it, onto the same triangle of ``src_points``. (size, size, 2).

    Triangles are rasterised here: scipy's ``find_simplex`` spends about a second per triangulation
    building its barycentric transforms when the face has near-degenerate (closed-mouth) triangles."""
    from scipy.spatial import Delaunay

    tri = Delaunay(dst_points)
    vertices = dst_points[tri.simplices]  # (T, 3, 2)
    edges = np.stack([vertices[:, 0] - vertices[:, 2], vertices[:, 1] - vertices[:, 2]], axis=2)  # (T, 2, 2)
    det = edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0]
    usable = np.abs(det) > 1e-9  # zero-area triangles cover no pixel
    inverse = np.zeros_like(edges)
    inverse[usable] = np.linalg.inv(edges[usable])
    simplex = np.full((size, size), -1, dtype=np.int64)
    bary = np.zeros((size, size, 3))
    for t in np.flatnonzero(usable):
        (x0, y0), (x1, y1) = np.floor(vertices[t].min(0)).astype(int), np.ceil(vertices[t].max(0)).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size - 1), min(y1, size - 1)
        if x1 < x0 or y1 < y0:
            continue
        yy, xx = np.mgrid[y0:y1 + 1, x0:x1 + 1].astype(np.float64)
        b2 = np.einsum("ij,hwj->hwi", inverse[t], np.stack([xx, yy], axis=-1) - vertices[t, 2])
        b = np.concatenate([b2, 1 - b2.sum(-1, keepdims=True)], axis=-1)
        inside = (b >= -1e-9).all(-1) & (simplex[y0:y1 + 1, x0:x1 + 1] < 0)
        simplex[y0:y1 + 1, x0:x1 + 1][inside] = t
        bary[y0:y1 + 1, x0:x1 + 1][inside] = b[inside]
    missing = simplex < 0  # only possible through rounding at the frame border: keep those pixels in place
    corners = src_points[tri.simplices[np.maximum(simplex, 0)]]  # (size, size, 3, 2)
    coords = np.einsum("hwk,hwkd->hwd", bary, corners)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    coords[missing] = np.stack([xx, yy], axis=-1)[missing]
    return coords


def _bilinear(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Sample (H, W, C) float ``image`` at pixel ``coords`` (..., 2) as (x, y), edge-clamped."""
    h, w = image.shape[:2]
    x = np.clip(coords[..., 0], 0, w - 1)
    y = np.clip(coords[..., 1], 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def make_clip(photo: np.ndarray, photo_landmarks: np.ndarray, landmarks: np.ndarray, size: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Frames (N, size, size, 3) uint8 and masks (N, size, size) float32 showing ``photo`` with the
    given per-frame ``landmarks`` (N, 68, 2), which are then exact for every frame."""
    from pybilayer.synthetic import Pose, project

    frontal = project(Pose(), (size / 2, size * 0.52), size * 0.32).astype(np.float64)
    # Similarity (Umeyama) from the canvas to the photo, aligning the frontal mean face with the photo's.
    src, dst = frontal, photo_landmarks.astype(np.float64)
    src_c, dst_c = src - src.mean(0), dst - dst.mean(0)
    u, sigma, vt = np.linalg.svd(dst_c.T @ src_c)
    rotation = u @ vt
    scale = sigma.sum() / (src_c**2).sum()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    canvas = np.stack([xx, yy], axis=-1)
    aligned = _bilinear(photo.astype(np.float64) / 255.0, (canvas - src.mean(0)) @ (scale * rotation).T + dst.mean(0))
    aligned_landmarks = (dst - dst.mean(0)) @ np.linalg.inv(scale * rotation).T + src.mean(0)
    stack = np.concatenate([aligned, _head_mask(aligned_landmarks, size)[..., None]], axis=2)
    anchors = _anchors(size)
    frames, masks = [], []
    for points in np.asarray(landmarks, np.float64):
        coords = _piecewise_affine_coords(np.vstack([points, anchors]), np.vstack([aligned_landmarks, anchors]), size)
        out = _bilinear(stack, coords)
        frames.append(np.clip(np.round(out[..., :3] * 255), 0, 255).astype(np.uint8))
        masks.append(out[..., 3].astype(np.float32))
    return np.stack(frames), np.stack(masks)


def clip_landmarks(n_frames: int, size: int, phase: float = 0.0) -> np.ndarray:
    """A talking-head landmark sequence (N, 68, 2); ``phase`` (frames) makes clips differ."""
    from pybilayer.synthetic import talking_head_sequence

    skip = int(round(phase))
    return talking_head_sequence(n_frames + skip, size)[skip:]


def write_dataset(root: str | Path, split: str = "train", persons: int = 2, videos: int = 1, frames: int = 8,
                  canvas: int = 160, crop: int = 128, with_masks: bool = True,
                  photo: Optional[np.ndarray] = None, photo_landmarks: Optional[np.ndarray] = None) -> Path:
    """Write clips in the official layout (official crop of each canvas frame, exact keypoints).

    Persons differ by a mirror image and a colour shift of the photo; videos by their phase."""
    from training.prepare import crop_frame, write_sample

    if photo is None:
        photo, photo_landmarks = astronaut()
    root = Path(root)
    for p in range(persons):
        image, points = photo, photo_landmarks
        if p % 2 == 1:
            image = image[:, ::-1].copy()
            points = points.copy()
            points[:, 0] = image.shape[1] - 1 - points[:, 0]
            points = points[_MIRROR]
        if p >= 2:
            shift = np.array([(p * 37) % 60 - 30, (p * 53) % 60 - 30, (p * 71) % 60 - 30])
            image = np.clip(image.astype(np.int16) + shift, 0, 255).astype(np.uint8)
        for v in range(videos):
            landmarks = clip_landmarks(frames, canvas, phase=7 * v + 3 * p)
            clip, masks = make_clip(image, points, landmarks, canvas)
            for index, (frame, lm, mask) in enumerate(zip(clip, landmarks, masks)):
                cropped, keypoints = crop_frame(frame, lm, crop)
                cropped_mask = None
                if with_masks:
                    mask_rgb = np.repeat(np.round(mask * 255).astype(np.uint8)[..., None], 3, axis=2)
                    cropped_mask = crop_frame(mask_rgb, lm, crop)[0][..., 0].astype(np.float32) / 255.0
                write_sample(root, split, f"id{p:05d}/video{v:03d}", "00000", f"{index:06d}", cropped, keypoints,
                             cropped_mask)
    return root


# iBUG 68 left-right correspondence, for mirrored photos.
_MIRROR = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65]
)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic data set (official layout) from one photo.")
    parser.add_argument("data_root")
    parser.add_argument("--persons", type=int, default=4)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="side of the stored crops")
    args = parser.parse_args(argv)
    for split, persons in (("train", args.persons), ("test", 1)):
        write_dataset(args.data_root, split, persons, args.videos, args.frames, canvas=int(args.size * 1.25),
                      crop=args.size)
    print(f"wrote {args.data_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
