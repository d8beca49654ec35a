"""The ``onnxruntime`` backend: the embedded CPU default.

Two graph modes (see ``frame_graph``):

* ``"folded"`` (default): at ``prepare`` each avatar's parameters are folded into the weights (AdaBN into
  the convolutions, up-sampling convolutions at the low resolution, skips there too, the first norm and
  skip inside the keypoint MLP). Where the native core is built (fp32), by default the native stage
  (``ops.LowResStage``) runs the keypoint MLP and every block and ``ops.heads`` the last up-sampling
  convolution with the heads, so no onnxruntime graph runs per frame (``base.use_native_blocks``). With
  fewer ``native_blocks``, one graph per remaining block is given its own session (counted as avatar
  creation), joined by ``ops.depth_to_space_box``; without the native core, one graph does everything.
* ``"generic"``: one session over the exported graph whose inputs include the per-identity parameters
  (the graph TensorRT builds from), shared by all avatars; several avatars run in one batch.

Cost of "folded" per avatar (released size): with the native stage for every block, ~0.1-0.2 s to fold and
pack, and ~75 MiB of resident memory (the stage's packed and Winograd-transformed weights and its maps:
measured +69 and +145 MiB for two and three more live avatars); with onnxruntime sessions, ~100-120 MiB
(ORT keeps the weights in its blocked NCHWc layout, prepacked). For more than a handful of live avatars
use "generic" (~1 MiB per avatar, one session).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .. import ops
from ..errors import BackendUnavailableError
from .base import (FrameBackend, FrameOutputs, PreparedAvatar, describe_native_passes, split_outputs,
                   use_native_blocks, use_native_heads)
from .frame_graph import (KEYPOINTS_INPUT, OUTPUT_NAMES, PHASES_OUTPUT, SKIP_OUTPUT, STAGE_INPUT, UPSAMPLE_INPUT,
                          FrameWeights, build_folded_frame, build_generic_graph)
from .int8 import calibration_keypoints, quantize_folded_graph

GraphMode = Literal["folded", "generic"]
Precision = Literal["fp32", "int8"]


def onnxruntime_unavailable_reason() -> str | None:
    try:
        import onnxruntime
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc}); `pip install onnxruntime`"
    if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime has no CPUExecutionProvider"
    return None


def session_options(threads: int | None):
    """Session options of every pybilayer ORT session: all graph optimisations, one inter-op thread, and
    worker threads that sleep when a run ends (spinning would take the cores the caller renders, decodes
    or runs other runtimes on between frames)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT warns about harmless initializer handling
    return options


def create_session(model_proto, threads: int | None):
    import onnxruntime as ort

    return ort.InferenceSession(model_proto.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


class OnnxRuntimeBackend(FrameBackend):
    """Per-frame network in onnxruntime on the CPU. ``threads``: intra-op threads (None: ORT's default).

    ``precision``: "fp32" (default, within 2e-3 of the reference) or "int8" (opt-in, folded graph only:
    lossy, ~1.25x faster per frame, a few seconds more per avatar; see ``int8``).
    ``native_heads`` (folded graph): finish each frame with the native heads kernel; None (default)
    wherever the native core is built, False for the graph's own heads. ``native_blocks`` (folded fp32
    graph with native heads): how many first blocks (with the keypoint MLP) the native stage
    ``ops.LowResStage`` runs before the graphs; None (default): every block, so that no graph runs per frame.
    """

    name = "onnxruntime"
    device = "cpu"
    thread_safe = True  # InferenceSession.run is safe to call concurrently

    def __init__(self, model, threads: int | None = None, graph: GraphMode = "folded",
                 precision: Precision = "fp32", native_heads: bool | None = None, native_blocks: int | None = None):
        reason = onnxruntime_unavailable_reason()
        if reason:
            raise BackendUnavailableError(reason)
        if graph not in ("folded", "generic"):
            raise ValueError(f"graph must be 'folded' or 'generic', got {graph!r}")
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'fp32' or 'int8', got {precision!r}")
        if native_heads and graph != "folded":
            raise ValueError("native_heads=True needs graph='folded' (the generic graph keeps its heads)")
        if precision == "int8" and graph != "folded":
            raise ValueError("precision='int8' needs graph='folded' (activation ranges are calibrated per avatar)")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads
        self.graph = graph
        self.precision = precision
        self.weights = FrameWeights.from_model(model)
        self._shared = create_session(build_generic_graph(self.weights), threads) if graph == "generic" else None
        self.native_heads = graph == "folded" and use_native_heads(native_heads)
        folded_fp32 = graph == "folded" and precision == "fp32"
        if native_blocks and not folded_fp32:
            raise ValueError("native_blocks needs graph='folded' and precision='fp32'")
        self.native_blocks = use_native_blocks(native_blocks, self.native_heads, self.weights) if folded_fp32 else 0

    def describe(self) -> str:
        native = describe_native_passes(self.native_heads, self.native_blocks, len(self.weights.blocks))
        return (f"onnxruntime on cpu ({self.graph} graph{native}, {self.precision}, "
                f"{self.threads or 'default'} threads)")

    def prepare(self, avatar) -> PreparedAvatar:
        texture = avatar.texture.detach().float().numpy()
        flat = avatar.flat_params()
        if self.graph == "folded":
            # fp32 with the native core: one graph per block (int8 calibrates one graph on keypoints alone)
            per_block = self.native_heads and self.precision == "fp32"
            frame = build_folded_frame(self.weights, flat, self.native_heads, per_block=per_block,
                                       native_blocks=self.native_blocks)
            graphs = frame.graphs
            if self.precision == "int8":
                graphs = [quantize_folded_graph(graphs[0], KEYPOINTS_INPUT,
                                                calibration_keypoints(self.weights.image_size))]
            low_res = frame.low_res.stage() if frame.low_res else None
            return PreparedAvatar(texture, (low_res, [create_session(g, self.threads) for g in graphs], frame.heads))
        return PreparedAvatar(texture, flat)

    def run(self, groups: Sequence[tuple[PreparedAvatar, np.ndarray]]) -> list[FrameOutputs]:
        if self.graph == "folded":
            results = []
            for prepared, keypoints in groups:
                low_res, sessions, heads = prepared.state
                if heads is None:
                    results.append(FrameOutputs(*sessions[0].run(OUTPUT_NAMES, {KEYPOINTS_INPUT: keypoints})))
                    continue
                channels_last = not sessions  # the native stage ran every block
                if channels_last:
                    upsample_input, skip = low_res(keypoints, num_threads=self.threads)
                else:
                    if low_res is None:
                        feed = {KEYPOINTS_INPUT: keypoints}
                    else:
                        feed = {STAGE_INPUT: low_res(keypoints, num_threads=self.threads)}
                    for session in sessions[:-1]:  # per-block graphs: the native pass joins them
                        (phases,) = session.run([PHASES_OUTPUT], feed)
                        feed = {STAGE_INPUT: ops.depth_to_space_box(phases, num_threads=self.threads)}
                    upsample_input, skip = sessions[-1].run([UPSAMPLE_INPUT, SKIP_OUTPUT], feed)
                results.append(FrameOutputs(*heads.finish(upsample_input, skip, self.threads, channels_last)))
            return results
        sizes = [len(kp) for _, kp in groups]
        feeds = {KEYPOINTS_INPUT: np.concatenate([kp for _, kp in groups])}
        for name in groups[0][0].state:
            feeds[name] = np.concatenate([np.repeat(prepared.state[name], n, axis=0)
                                          for (prepared, _), n in zip(groups, sizes)])
        delta_uv, lf, mask_logits = self._shared.run(OUTPUT_NAMES, feeds)
        return split_outputs(FrameOutputs(delta_uv, lf, mask_logits), sizes)
