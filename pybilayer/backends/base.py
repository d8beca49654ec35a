"""The contract every per-frame backend fulfils.

A backend runs the per-frame network (keypoint MLP + inference generator + heads) and nothing else:
the Renderer hands its outputs to ``pybilayer.ops.composite`` (native CPU or CUDA twin) for the warp,
the add, the mask and the uint8 conversion.

    prepared = backend.prepare(avatar)                 # once per avatar (folding, uploads, sessions)
    outputs = backend.run([(prepared, keypoints)])     # keypoints (n, 68, 2) float32 in [-1, 1]
    outputs[0].delta_uv, outputs[0].lf, outputs[0].mask_logits   # (n, 2|3|1, S, S) float32

``run`` takes several (avatar, keypoints) groups at once so that backends whose graph takes the
identity parameters as inputs can run every avatar of a call in one batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class PreparedAvatar:
    """A backend's per-avatar state. ``texture`` lives where the compositor will read it."""

    texture: Any  # numpy (3, S, S) float32 for CPU backends; torch tensor on the device for GPU ones
    state: Any  # backend-specific (a session, device tensors, ...)


@dataclass
class FrameOutputs:
    """Per-frame network outputs, float32, (n, C, S, S): numpy on CPU, torch tensors on a GPU."""

    delta_uv: Any
    lf: Any
    mask_logits: Any


class FrameBackend(ABC):
    """Base class of the per-frame backends; see the module docstring."""

    name: str = ""
    device: str = "cpu"
    # True when run() may be called from several threads at once. The Renderer serialises calls anyway.
    thread_safe: bool = False

    @abstractmethod
    def prepare(self, avatar) -> PreparedAvatar:
        """Per-avatar work, done once (counted as part of avatar creation)."""

    @abstractmethod
    def run(self, groups: Sequence[tuple[PreparedAvatar, np.ndarray]]) -> list[FrameOutputs]:
        """One FrameOutputs per group, in order; keypoints are (n, 68, 2) float32 in [-1, 1]."""

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def use_native_heads(requested: bool | None) -> bool:
    """Whether a folded-graph backend ends its graph early and runs ``ops.heads``: ``requested``, or where
    the native core is built when None. BackendUnavailableError when asked for and not built."""
    from .. import native

    if requested is None:
        return native.capabilities().native
    if not isinstance(requested, bool):
        raise ValueError(f"native_heads must be True, False or None, got {requested!r}")
    if requested and not native.capabilities().native:
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(f"native_heads=True needs the native core: {native.capabilities().native_reason}")
    return requested


# By default the native stage runs the keypoint MLP and every block, and no graph runs per frame: whole frames
# timed in turns on the 2-core AVX2 machine (released size, busy host), the stage through the 8 px block with
# the graph after it against the stage for every block: onnxruntime p50 42.0 -> 29.6 ms (minimum 35.8 ->
# 22.3), mnn p50 26.1 -> 24.7 ms (minimum 21.4 -> 19.7). The stage through block 1 / 2 / 3 / 4 with
# onnxruntime for the rest: p50 42.0 / 40.0 / 36.8 / 34.8 ms (Winograd conv1 from 16 px, before its chunks).
# Before the stage's Winograd conv1, chunks and shares by multiply-adds, MNN was faster from 16 px.
def use_native_blocks(requested: int | None, native_heads: bool, weights) -> int:
    """How many leading blocks (with the keypoint MLP) a folded-graph backend runs in the native stage
    (``ops.LowResStage``): ``requested``, or with None every block where the native heads run (0
    elsewhere). 0 keeps the whole network in the graph; every block leaves no graph (the stage feeds the
    heads)."""
    n = len(weights.blocks)
    if requested is None:
        return n if native_heads else 0
    if not isinstance(requested, int) or isinstance(requested, bool) or not 0 <= requested <= n:
        raise ValueError(f"native_blocks must be None or an int in [0, {n}], got {requested!r}")
    if requested and not native_heads:
        raise ValueError("native_blocks needs the native heads (native_heads=False was asked for, or the native "
                         "core is not built)")
    return requested


def describe_native_passes(native_heads: bool, native_blocks: int, num_blocks: int) -> str:
    """The part of a folded-graph backend's description that names its native passes."""
    text = ", native heads" if native_heads else ""
    if native_blocks:
        text += f", native MLP and {native_blocks} blocks"
        text += " (no graph per frame)" if native_blocks == num_blocks else ""
    return text


def split_outputs(outputs: FrameOutputs, sizes: Sequence[int]) -> list[FrameOutputs]:
    """Cut a batched FrameOutputs into consecutive groups of ``sizes`` frames (views, no copies)."""
    result, start = [], 0
    for n in sizes:
        result.append(FrameOutputs(outputs.delta_uv[start:start + n], outputs.lf[start:start + n],
                                   outputs.mask_logits[start:start + n]))
        start += n
    return result
