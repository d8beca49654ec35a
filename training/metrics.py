"""Evaluation metrics on images in [-1, 1]: PSNR, SSIM, LPIPS and (when dlib's models are installed)
identity similarity, a CSIM stand-in.

The official test used LPIPS (VGG, linear heads) and CSIM (InsightFace). LPIPS here is computed from
the same offline VGG16 + heads (training/perceptual.py). InsightFace's weights cannot be had offline,
so identity similarity uses dlib's CC0 face-recognition ResNet (in ``face_recognition_models``): the
cosine similarity of the 128-d descriptors of output and target, aligned with the known target
landmarks (no detection). It is not comparable in absolute value with the paper's CSIM.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """(N,) PSNR in dB of images in [-1, 1] (peak-to-peak 2), after clamping to the displayable range."""
    a, b = a.clamp(-1, 1), b.clamp(-1, 1)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, like: Tensor) -> Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """(N,) SSIM (Wang et al. 2004, Gaussian window 11 / 1.5, valid region) on [0, 1]-mapped images."""
    a = (a.clamp(-1, 1) + 1) / 2
    b = (b.clamp(-1, 1) + 1) / 2
    c = a.shape[1]
    w = _gaussian_window(min(window, a.shape[-1]), sigma, c, a)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)


class IdentitySimilarity:
    """Cosine similarity of dlib face descriptors of two images sharing known 68 landmarks."""

    def __init__(self, model_path: str | Path):
        import dlib

        self._dlib = dlib
        self._net = dlib.face_recognition_model_v1(str(model_path))

    @classmethod
    def create(cls) -> Optional["IdentitySimilarity"]:
        """None when dlib or face_recognition_models is not installed."""
        if importlib.util.find_spec("dlib") is None:
            return None
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            return None
        # Its __init__ needs pkg_resources (gone in setuptools >= 81): locate the file directly.
        path = Path(list(spec.submodule_search_locations)[0]) / "models" / "dlib_face_recognition_resnet_model_v1.dat"
        return cls(path) if path.is_file() else None

    def _descriptor(self, image_uint8: np.ndarray, landmarks_px: np.ndarray) -> np.ndarray:
        dlib = self._dlib
        x0, y0 = np.floor(landmarks_px.min(0)).astype(int)
        x1, y1 = np.ceil(landmarks_px.max(0)).astype(int)
        rect = dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
        points = [dlib.point(int(round(x)), int(round(y))) for x, y in landmarks_px]
        shape = dlib.full_object_detection(rect, points)
        return np.asarray(self._net.compute_face_descriptor(image_uint8, shape), dtype=np.float64)

    def __call__(self, fake: Tensor, real: Tensor, keypoints: Tensor) -> Tensor:
        """(N,) similarities; images (N, 3, S, S) in [-1, 1], keypoints (N, 68, 2) in [-1, 1] of the crop."""
        size = fake.shape[-1]
        out = []
        for f, r, k in zip(fake, real, keypoints):
            lm = ((k.detach().cpu().numpy() + 1) / 2 * size).astype(np.float64)
            to_u8 = lambda t: np.ascontiguousarray(  # noqa: E731
                ((t.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            )
            df, dr = self._descriptor(to_u8(f), lm), self._descriptor(to_u8(r), lm)
            out.append(float(df @ dr / (np.linalg.norm(df) * np.linalg.norm(dr) + 1e-12)))
        return torch.tensor(out)
