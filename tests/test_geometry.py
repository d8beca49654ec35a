"""Geometry with the official semantics (official_bilayer.md 1.2): crop, normalisation, stickman, grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pybilayer.geometry import (
    STICKMAN_PARTS,
    CropBox,
    crop_box,
    draw_stickman,
    draw_stickmen,
    identity_grid,
    normalize_keypoints,
    preprocess,
)
from pybilayer.synthetic import random_landmarks

BACKGROUND = (1 / 255 - 0.5) * 2  # the official canvas is np.ones(uint8)
SIZE = 128

# One semicircle per part (bottom half, y grows downwards): its closing segment is the diameter,
# whose midpoint (the centre) lies `radius` pixels from every drawn arc.
LAYOUT = {  # part index in STICKMAN_PARTS -> (centre x, centre y, radius)
    0: (20, 15, 8), 1: (60, 15, 8), 2: (100, 15, 8),  # jaw, brows
    3: (20, 50, 8), 4: (45, 75, 8),  # nose bridge, nostrils (the bridge also ends at point 33)
    5: (60, 50, 8), 6: (100, 50, 8),  # eyes
    7: (60, 95, 12), 8: (100, 95, 8),  # lips
}


def layout_pixels() -> np.ndarray:
    """(68, 2) integer pixel positions of the test layout."""
    pixels = np.zeros((68, 2))
    own_points = [range(0, 17), range(17, 22), range(22, 27), range(27, 31), range(31, 36),
                  range(36, 42), range(42, 48), range(48, 60), range(60, 68)]
    for part, indices in enumerate(own_points):
        cx, cy, r = LAYOUT[part]
        for k, i in enumerate(indices):
            theta = np.pi * k / (len(indices) - 1)
            pixels[i] = (round(cx + r * np.cos(theta)), round(cy + r * np.sin(theta)))
    return pixels


def to_normalized(pixels: np.ndarray, offset: float) -> np.ndarray:
    return ((pixels + offset) / SIZE * 2 - 1).astype(np.float32)


def colour(rgb) -> np.ndarray:
    return (np.asarray(rgb, np.float32) / 255 - 0.5) * 2


def test_stickman_parts_colours_and_closure():
    pixels = layout_pixels()
    stickman = draw_stickman(to_normalized(pixels, 0.5), SIZE)
    assert stickman.shape == (3, SIZE, SIZE) and stickman.dtype == np.float32
    assert np.allclose(stickman[:, SIZE - 1, SIZE - 1], BACKGROUND, atol=1e-7)
    values, counts = np.unique(stickman.reshape(3, -1).T, axis=0, return_counts=True)
    assert np.allclose(values[counts.argmax()], BACKGROUND)  # mostly background
    for part, (indices, closed, rgb) in enumerate(STICKMAN_PARTS):
        x, y = pixels[indices[1]].astype(int)
        np.testing.assert_allclose(stickman[:, y, x], colour(rgb), atol=1e-6, err_msg=f"part {part}")
        cx, cy, _ = LAYOUT[part]
        expected = colour(rgb) if closed else np.full(3, BACKGROUND, np.float32)
        np.testing.assert_allclose(stickman[:, cy, cx], expected, atol=1e-6, err_msg=f"closure of part {part}")
    assert [closed for _, closed, _ in STICKMAN_PARTS] == [False] * 5 + [True] * 4
    assert STICKMAN_PARTS[3][0] == (27, 28, 29, 30, 30, 33)


def test_stickman_thickness_is_two():
    keypoints = to_normalized(np.tile([[64.0, 64.0]], (68, 1)), 0.5)  # every point on one pixel
    stickman = draw_stickman(keypoints, SIZE)
    drawn = np.argwhere(np.abs(stickman - BACKGROUND).max(0) > 1e-6)
    # cv2 thickness 2 on a single point: a plus-shaped dot of radius 1 around (64, 64).
    assert sorted(map(tuple, drawn)) == [(63, 64), (64, 63), (64, 64), (64, 65), (65, 64)]
    np.testing.assert_allclose(stickman[:, 64, 64], colour((255, 255, 0)), atol=1e-6)  # lips drawn last


def test_stickman_truncates_coordinates_like_the_official_int32_cast():
    pixels = layout_pixels()
    base = draw_stickman(to_normalized(pixels, 0.5), SIZE)
    assert np.array_equal(draw_stickman(to_normalized(pixels, 0.9), SIZE), base)  # 0.9 truncates, not rounds
    assert not np.array_equal(draw_stickman(to_normalized(pixels, -0.2), SIZE), base)


def test_stickman_batch_and_validation():
    keypoints = torch.from_numpy(np.stack([to_normalized(layout_pixels(), 0.5)] * 2))
    batch = draw_stickmen(keypoints, SIZE)
    assert batch.shape == (2, 3, SIZE, SIZE) and batch.dtype == torch.float32
    assert np.array_equal(batch[1].numpy(), draw_stickman(keypoints[1].numpy(), SIZE))
    with pytest.raises(ValueError, match="keypoints_norm"):
        draw_stickman(np.zeros((67, 2)), SIZE)
    with pytest.raises(ValueError, match="NaN"):
        draw_stickman(np.full((68, 2), np.nan), SIZE)
    far = draw_stickman(np.full((68, 2), 1e9, np.float32), 32)  # off-canvas: nothing drawn, no overflow
    assert np.allclose(far, BACKGROUND)


def test_crop_box_follows_the_official_rule():
    landmarks = np.full((68, 2), 150.0)
    landmarks[0] = (100.0, 50.0)
    landmarks[1] = (201.0, 150.6)
    # centre = round((100 + 201) / 2, (50 + 150.6) / 2) = (150, 100) (round half to even: 150.5 -> 150)
    # size = int(max(101, 100.6)) = 101; centre y -= 101 // 6 = 16
    assert crop_box(landmarks) == CropBox(49, -17, 251, 185)
    landmarks[1] = (203.0, 150.6)  # 151.5 rounds to 152 (half to even)
    assert crop_box(landmarks).left == 152 - 103
    with pytest.raises(ValueError, match="landmarks_px"):
        crop_box(np.zeros((68, 3)))
    with pytest.raises(ValueError, match="span"):
        crop_box(np.zeros((68, 2)))


def test_normalize_keypoints_maps_the_box_to_minus_one_one():
    box = CropBox(10, -20, 110, 80)
    points = np.zeros((68, 2))
    points[0], points[1], points[2] = (10, -20), (110, 80), (60, 30)
    out = normalize_keypoints(points, box)
    assert out.dtype == np.float32 and out.shape == (68, 2)
    np.testing.assert_allclose(out[:3], [[-1, -1], [1, 1], [0, 0]], atol=1e-7)
    with pytest.raises(ValueError, match="square"):
        normalize_keypoints(points, CropBox(0, 0, 10, 20))


def test_preprocess_crops_with_black_padding_and_bicubic_resize():
    height, width = 240, 320
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    landmarks = random_landmarks(1, 240, seed=3)[0] + np.array([-60.0, 40.0])  # pushes the crop past the border
    crop, keypoints, box = preprocess(image, landmarks)
    assert box == crop_box(landmarks)
    assert box.left < 0 or box.bottom > height  # padding is exercised
    assert crop.shape == (3, 256, 256) and crop.dtype == np.float32
    assert crop.min() >= -1 and crop.max() <= 1
    manual = Image.fromarray(image).crop(tuple(box)).resize((256, 256), Image.BICUBIC)
    np.testing.assert_allclose(crop, (np.asarray(manual).transpose(2, 0, 1) / 255 - 0.5) * 2, atol=1e-6)
    np.testing.assert_array_equal(keypoints, normalize_keypoints(landmarks, box))
    # Far outside the image the crop is black (-1).
    if box.bottom > height:
        assert np.all(crop[:, -1, :] == -1)
    else:
        assert np.all(crop[:, :, 0] == -1)
    with pytest.raises(ValueError, match="image"):
        preprocess(image.astype(np.float32), landmarks)


def test_identity_grid_holds_pixel_centres():
    grid = identity_grid(256)
    assert grid.shape == (1, 256, 256, 2) and grid.dtype == torch.float32
    centres = (torch.arange(256, dtype=torch.float64) + 0.5) / 128 - 1
    assert torch.equal(grid[0, 0, :, 0].double(), centres)  # x varies along the width
    assert torch.equal(grid[0, :, 0, 1].double(), centres)  # y along the height
    assert torch.equal(grid[0, 5, :, 1], torch.full((256,), grid[0, 5, 0, 1].item()))
    # Same values as the official linspace-midpoint buffer up to fp32 rounding.
    g = torch.linspace(-1, 1, 257)
    g = (g[1:] + g[:-1]) / 2
    v, u = torch.meshgrid(g, g, indexing="ij")
    torch.testing.assert_close(grid, torch.stack([u, v], 2)[None], rtol=0, atol=1e-6)
