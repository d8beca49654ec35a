"""The ``mnn`` backend: the per-frame network on the CPU (fp32), in the native stage or in Alibaba MNN.

Where the native core is built, by default the native stage ``ops.LowResStage`` runs the keypoint MLP and
every block of each avatar's folded network (``frame_graph.folded_low_res_stage``, conv1 as Winograd) and
``ops.heads`` the last up-sampling convolution and the heads, as in the onnxruntime backend: measured
faster than MNN's graph for the blocks from 16 px (see ``base.use_native_blocks``). With ``native_blocks``
< the number of blocks (or without the native core) the avatar's parameters are folded into an ONNX graph
(``frame_graph.build_folded_frame``) for the blocks after the stage, MNN's converter turns it into an MNN
model, and MNN loads it as a module of its own; MNN runs the 3x3 convolutions with Winograd kernels.
Per frame, that path (released size, batch 1, 2 threads, 2-core AVX2, quiet): the stage for the 4 and 8 px
blocks ~1.6 ms, the forward ~15 ms and the heads ~4 ms, against ~23.3 ms for the full graph in MNN and
~45 ms for the full graph in onnxruntime; the warped image within ~3e-5 of the torch reference.
Precision "high": fp32 throughout, no fp16/bf16.

Cost per avatar of a graph (released size, measured under load): ~0.4 s, counted as avatar creation: folding
~0.06-0.14 s, writing the ONNX graph and converting it ~0.23 s, loading ~0.02 s, and one warm-up forward
~0.1 s (MNN's planning and weight transforms, which would otherwise delay the avatar's first frame). The
converter reads and writes files only (there is no in-memory route), so both live in a temporary
directory removed before ``prepare`` returns; the loaded module keeps its weights in memory, about as
much resident memory per live avatar as the onnxruntime folded graph (~100 MiB).

MNN's C++ code prints to stdout and stderr (at import, when converting and loading). Those calls run
with file descriptors 1 and 2 pointed at /dev/null, so nothing reaches a CLI's stdout; another thread's
output during those moments is lost too.

Graphs that are the same for every avatar (the identity embedder: ~2.5-3.3 s to convert) are converted once
and kept in a cache folder (``cache_dir``), keyed by what they were made from; see ``load_cached_module``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, EngineError
from .base import FrameBackend, FrameOutputs, PreparedAvatar, describe_native_passes, use_native_blocks, use_native_heads
from .frame_graph import (HEAD_CHANNELS, KEYPOINTS_INPUT, OUTPUT_NAMES, SKIP_OUTPUT, STAGE_INPUT, UPSAMPLE_INPUT,
                          FrameWeights, build_folded_frame)

INSTALL_HINT = "`pip install mnn==3.6.1`"
CACHE_DIR_ENV = "PYBILAYER_CACHE_DIR"
log = logging.getLogger(__name__)
# File descriptors are per process: two threads swapping them at once could leave stdout on /dev/null.
_FD_LOCK = threading.RLock()


def _flush_python_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()


@contextmanager
def silenced_output() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null for the duration (C++ prints bypass sys.stdout)."""
    with _FD_LOCK:
        _flush_python_streams()
        saved = [os.dup(1), os.dup(2)]
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            finally:
                os.close(devnull)
            yield
        finally:
            _flush_python_streams()  # Python-level writes made meanwhile go to /dev/null too, not later
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@functools.cache  # once: every frame asks for MNN.expr, and silencing swaps the process's stdout
def _import_mnn():
    """(MNN, its converter module ``_tools``); importing prints the CPU's features, silenced."""
    with silenced_output():
        import _tools
        import MNN

    return MNN, _tools


def mnn_unavailable_reason() -> str | None:
    try:
        _import_mnn()
    except (ImportError, OSError) as exc:
        return f"mnn is not installed ({exc}); {INSTALL_HINT}"
    return None


def convert_to_mnn(graph, directory: str) -> str:
    """Write the ONNX ``graph`` under ``directory`` and convert it; the path of the MNN model.

    Calls the converter's extension (``_tools.mnnconvert``) directly. MNN's ``mnnconvert`` command and
    ``MNN.tools.mnnconvert`` wrap it with a usage logger that runs ``pip install aliyun-log-python-sdk``
    when that package is missing (which downgrades protobuf below what onnx needs) and reports each
    conversion over the network: never call those."""
    _, tools = _import_mnn()
    src, dst = os.path.join(directory, "frame.onnx"), os.path.join(directory, "frame.mnn")
    with open(src, "wb") as f:
        f.write(graph.SerializeToString())
    args = ["mnnconvert", "-f", "ONNX", "--modelFile", src, "--MNNModel", dst, "--bizCode", "pybilayer"]
    try:
        with silenced_output():
            tools.mnnconvert(args)  # returns True even on failure: the model file tells
    except Exception as exc:
        raise EngineError(f"MNN failed to convert the ONNX graph to an MNN model: {exc}") from exc
    if not os.path.isfile(dst) or os.path.getsize(dst) == 0:
        raise EngineError("MNN failed to convert the ONNX graph to an MNN model "
                          "(mnnconvert wrote no model; its messages were silenced)")
    return dst


def create_runtime(threads: int):
    """An MNN CPU runtime manager (thread pool and scratch memory) with fp32 ("high") precision."""
    mnn, _ = _import_mnn()
    with silenced_output():  # prints the precision it chose
        return mnn.nn.create_runtime_manager(({"backend": "CPU", "precision": "high", "numThread": threads},))


def _load_file(path: str, inputs: list[str], outputs: list[str], runtime):
    mnn, _ = _import_mnn()
    try:
        with silenced_output():
            return mnn.nn.load_module_from_file(path, inputs, outputs, runtime_manager=runtime)
    except Exception as exc:  # MNN verifies the file: truncated or foreign models raise here
        raise EngineError(f"MNN failed to load the converted model {path}: {exc}") from exc


def load_module(graph, inputs: list[str], outputs: list[str], runtime):
    """The ONNX ``graph`` converted (in a temporary directory, always removed) and loaded as an MNN module."""
    with tempfile.TemporaryDirectory(prefix="pybilayer-mnn-") as directory:
        return _load_file(convert_to_mnn(graph, directory), inputs, outputs, runtime)


def cache_dir() -> Path:
    """Where converted MNN models are kept: $PYBILAYER_CACHE_DIR/mnn, else $XDG_CACHE_HOME/pybilayer/mnn,
    else ~/.cache/pybilayer/mnn."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "pybilayer")
    return Path(root).expanduser() / "mnn"


def _mnn_version() -> str:
    mnn, _ = _import_mnn()
    return str(mnn.version())


def cache_key(source_fingerprint: str) -> str:
    """File stem of a converted model: the sha256 of what the graph was made from and the MNN version
    that converted it (a model from another MNN version is converted again, never loaded)."""
    return hashlib.sha256(f"{source_fingerprint}|mnn {_mnn_version()}".encode()).hexdigest()[:32]


def load_cached_module(build_graph: Callable[[], object], source_fingerprint: str, inputs: list[str],
                       outputs: list[str], runtime, directory: Path | None = None):
    """``load_module(build_graph(), ...)`` through a cache of converted models under ``directory``
    (default ``cache_dir()``), keyed by ``cache_key(source_fingerprint)``: ``source_fingerprint`` must
    change whenever the graph would (weights, graph layout). The model is written atomically, so a
    crash or a concurrent process never leaves half a file under the final name; a cached file that MNN
    cannot load is converted again and replaced. Where the folder cannot be written, the model is
    converted in a temporary folder as ``load_module`` does."""
    from ..fileio import atomic_path

    path = (directory or cache_dir()) / f"{cache_key(source_fingerprint)}.mnn"
    if path.is_file():
        try:
            return _load_file(str(path), inputs, outputs, runtime)
        except EngineError as exc:
            log.warning("%s; converting again", exc)
    with tempfile.TemporaryDirectory(prefix="pybilayer-mnn-") as tmp:
        converted = convert_to_mnn(build_graph(), tmp)
        module = _load_file(converted, inputs, outputs, runtime)  # the module keeps its weights in memory
        try:
            with atomic_path(path, make_parents=True) as part:
                os.replace(converted, part)
        except (OSError, ValueError) as exc:  # read-only home, full disk: serve without caching
            log.warning("cannot cache the converted MNN model under %s (%s)", path.parent, exc)
    return module


def run_module(module, inputs: list[np.ndarray], copy: bool = True) -> list[np.ndarray]:
    """Forward float32 NCHW arrays; the outputs copied out of MNN's buffers, or with ``copy=False`` views of
    them, valid only until the module's next forward."""
    mnn, _ = _import_mnn()
    F = mnn.expr
    outputs = module.forward([F.const(np.ascontiguousarray(a, dtype=np.float32), list(a.shape), F.NCHW) for a in inputs])
    return [np.array(F.convert(var, F.NCHW).read(), dtype=np.float32, copy=copy) for var in outputs]


class MnnBackend(FrameBackend):
    """Per-frame network in MNN on the CPU, one module per avatar. ``threads``: MNN's and the native passes'
    threads per frame (None: ``os.cpu_count()``). ``native_heads``: finish each frame with the native heads
    kernel; None (default) wherever the native core is built, False for the graph's own heads.
    ``native_blocks``: how many first blocks (with the keypoint MLP) the native stage runs; None (default):
    every block with the native heads (no MNN graph per frame), 0 for none."""

    name = "mnn"
    device = "cpu"
    thread_safe = False  # modules share one runtime manager (thread pool, scratch memory); not verified concurrent

    def __init__(self, model, threads: int | None = None, native_heads: bool | None = None,
                 native_blocks: int | None = None):
        reason = mnn_unavailable_reason()
        if reason:
            raise BackendUnavailableError(reason)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.threads = threads
        self.num_threads = threads or os.cpu_count() or 1
        self.weights = FrameWeights.from_model(model)
        self.image_size = self.weights.image_size
        self._runtime = create_runtime(self.num_threads)
        self.native_heads = use_native_heads(native_heads)
        self.native_blocks = use_native_blocks(native_blocks, self.native_heads, self.weights)

    def describe(self) -> str:
        native = describe_native_passes(self.native_heads, self.native_blocks, len(self.weights.blocks))
        return f"mnn on cpu (folded graph{native}, fp32, {self.num_threads} threads)"

    def prepare(self, avatar) -> PreparedAvatar:
        texture = avatar.texture.detach().float().numpy()
        frame = build_folded_frame(self.weights, avatar.flat_params(), self.native_heads,
                                   native_blocks=self.native_blocks)
        outputs = [UPSAMPLE_INPUT, SKIP_OUTPUT] if self.native_heads else list(OUTPUT_NAMES)
        low_res = frame.low_res.stage() if frame.low_res else None
        if not frame.graphs:  # the native stage runs every block
            return PreparedAvatar(texture, (low_res, None, frame.heads))
        module = load_module(frame.graphs[0], [STAGE_INPUT if low_res else KEYPOINTS_INPUT], outputs, self._runtime)
        # MNN plans the graph and transforms the weights on the first forward (~80-130 ms at the released
        # size): pay it here, with the avatar, rather than as a hitch on its first frame.
        run_module(module, [self._graph_input(low_res, np.zeros((1, 68, 2), np.float32))], copy=False)
        return PreparedAvatar(texture, (low_res, module, frame.heads))

    def _graph_input(self, low_res, keypoints: np.ndarray) -> np.ndarray:
        """The graph's input: the keypoints, or the native stage's output for them."""
        if low_res is None:
            return keypoints
        return low_res(keypoints, num_threads=self.num_threads)

    def _forward(self, low_res, module, heads, keypoints: np.ndarray) -> list[np.ndarray]:
        """One frame's outputs: the graph's, or finished by the native heads kernel from the graph's."""
        if module is None:  # the native stage ran every block
            return list(heads.finish(*low_res(keypoints, num_threads=self.num_threads), self.num_threads,
                                     channels_last=True))
        x = self._graph_input(low_res, keypoints)
        if heads is None:
            return run_module(module, [x])
        upsample_input, skip = run_module(module, [x], copy=False)  # read before the next forward
        return list(heads.finish(upsample_input, skip, self.num_threads))

    def run(self, groups: Sequence[tuple[PreparedAvatar, np.ndarray]]) -> list[FrameOutputs]:
        size = self.image_size
        results = []
        for prepared, keypoints in groups:
            n = keypoints.shape[0]
            # One frame per forward: 8 frames in one forward measured 27.8 ms per frame against 23.6 ms as
            # singles (the batch's intermediates outgrow the caches), and the module is never re-planned
            # for a new batch size.
            singles = [self._forward(*prepared.state, keypoints[i:i + 1]) for i in range(n)]
            arrays = singles[0] if n == 1 else [np.concatenate(parts) for parts in zip(*singles)]
            for name, channels, array in zip(OUTPUT_NAMES, HEAD_CHANNELS, arrays):
                if array.shape != (n, channels, size, size):
                    raise EngineError(f"MNN returned {name} of shape {array.shape}, expected "
                                      f"{(n, channels, size, size)}")
            results.append(FrameOutputs(*arrays))
        return results


__all__ = ["MnnBackend", "cache_dir", "cache_key", "convert_to_mnn", "create_runtime", "load_cached_module",
           "load_module", "mnn_unavailable_reason", "run_module", "silenced_output"]
