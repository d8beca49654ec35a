"""Opt-in int8 variant of the ``onnxruntime`` backend's folded per-avatar graph.

Static QDQ quantisation (onnxruntime.quantization): weights int8 per output channel, activations uint8
with ranges calibrated per avatar (MinMax) on realistic poses from ``pybilayer.synthetic``. U8S8 is the
kernel ORT runs fastest on AVX2; ``reduce_range`` keeps the weights to 7 bits so that AVX2's
VPMADDUBSW (no VNNI) cannot saturate its 16-bit pair sums.

Measured on the released-size random-weight model, batch 1, 2 AVX2 cores, same run: 27.2 vs 39.4 ms
per frame for the fp32 folded graph, both finished by the native heads in fp32 (benchmarks/RESULTS.md;
the fp32 path has since become ~34 ms, one graph per block, which int8 does not use);
uint8 frames at 55.9-62.5 dB PSNR against the fp32 path over 200 held-out poses (random weights give
low-contrast outputs, so quality is indicative only); calibration + quantisation add ~3.5 s per avatar.
Lossy: outside the 2e-3 bound of the fp32 paths, so never the default.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

CALIBRATION_POSES = 32
CALIBRATION_SEED = 20201


def calibration_keypoints(image_size: int, n: int = CALIBRATION_POSES, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """(n, 68, 2) float32 keypoints in [-1, 1], each normalised to its own crop as at render time."""
    from ..geometry import crop_box, normalize_keypoints
    from ..synthetic import random_landmarks

    points = random_landmarks(n, image_size, seed=seed)
    return np.stack([normalize_keypoints(p, crop_box(p)) for p in points]).astype(np.float32)


class _DropPreprocessingHint(logging.Filter):
    """quantize_static logs "Please consider (to run) pre-processing before quantization" at WARNING on the
    root logger on every call, i.e. once per avatar here: advice to run its optional pre-processing pass,
    which this path does not use (its measured speed and quality are in benchmarks/RESULTS.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextmanager
def _quiet_quantizer_logging() -> Iterator[None]:
    """Drops that advice. Where the root logger has no handler, a placeholder also keeps the module-level
    ``logging.warning`` from calling ``basicConfig()``, which would leave a stderr handler on the root
    logger, and reformat every later warning of the process, after the first int8 avatar."""
    root, hint = logging.getLogger(), _DropPreprocessingHint()
    placeholder = None if root.handlers else logging.NullHandler()
    root.addFilter(hint)
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeFilter(hint)
        if placeholder is not None:
            root.removeHandler(placeholder)


def quantize_folded_graph(model_proto, keypoints_input: str, calibration: np.ndarray):
    """The fp32 folded graph -> its int8 QDQ twin (an onnx ModelProto), calibrated on ``calibration``."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class _Poses(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter([{keypoints_input: k[None]} for k in calibration])

        def get_next(self):
            return next(self._feeds, None)

    # quantize_static works on files: keep ours private (its calibration graph goes to its own temp dir)
    with tempfile.TemporaryDirectory(prefix="pybilayer_int8_") as tmp:
        source, target = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model_proto, source)
        with _quiet_quantizer_logging():
            quantize_static(source, target, _Poses(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(target)
