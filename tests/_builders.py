"""Small models and inputs shared by the serving tests (fresh random values, never zeros)."""

from __future__ import annotations

import numpy as np
import torch

from pybilayer.models import Bilayer, BilayerConfig
from pybilayer.synthetic import random_landmarks


def tiny_bilayer(seed: int, size: int) -> Bilayer:
    """A tiny random bi-layer model whose inference-generator BN statistics are not trivial (folding must
    handle them)."""
    torch.manual_seed(seed)
    model = Bilayer(BilayerConfig.tiny(size, discriminator=False))
    for m in model.inference_generator.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


def random_photo(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A random non-square uint8 photo and realistic (68, 2) landmarks inside it."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size + 13, 3), dtype=np.uint8), random_landmarks(1, size, seed=seed)[0]


def random_drivers(n: int, seed: int = 3) -> np.ndarray:
    """(n, 68, 2) realistic driving landmarks in pixels of a 300-px frame."""
    return random_landmarks(n, 300, seed=seed)
