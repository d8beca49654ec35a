"""TensorRT plans of the per-frame network: build, cache, load, run.

    from pybilayer.trt import build_engine, load_engine
    plan = build_engine("model.safetensors", precision="fp16", max_batch=8)   # once per GPU / TensorRT
    engine = load_engine(plan, device="cuda")
    out = engine.run({"keypoints": kp, **params}, output_buffers, stream_handle)  # torch CUDA tensors

(pybilayer.backends.tensorrt.TensorRTBackend does the last two steps for the Renderer, with output
buffers owned by the native core.)

The pipeline is a chain of small typed steps:
ONNX export (pybilayer.export) -> `EngineSpec` (what makes a plan valid) -> `EngineCache.lookup`
-> `build_plan` (TensorRT builder calls) -> `EngineCache.store` (plan, metadata JSON) -> `TrtEngine`.

Convention: a plan is valid only for the exact ONNX bytes, TensorRT version, GPU name and compute
capability, precision and batch profile it was built for. All of these form the cache key; the
metadata JSON beside a plan repeats them with the plan's sha256, and anything that does not match
(or cannot be read) makes the plan stale: it is rebuilt, never loaded.

TensorRT 10 and 11 differ in one place, `_precision_plan`: TensorRT 11 removed `BuilderFlag.FP16`
(every network is strongly typed), so an fp16 engine comes from an fp16 ONNX graph there; TensorRT 10
builds an fp16 engine from the fp32 graph with the FP16 builder flag.

Nothing here imports tensorrt, torch or onnx at module import; each is imported where it is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from .errors import BackendUnavailableError, EngineError
from .fileio import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("pybilayer.trt")

Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
SUPPORTED_TRT_MAJORS: tuple[int, ...] = (10, 11)
# Bumped when the cache layout or the metadata schema changes: old entries then count as stale.
CACHE_SCHEMA = 1
ENGINE_DIR_ENV = "PYBILAYER_ENGINE_DIR"
DEFAULT_WORKSPACE_MIB = 2048

INSTALL_HINT = (
    "TensorRT is not installed (or cannot be imported). pybilayer needs TensorRT 10 or 11 with a "
    "CUDA GPU: install the wheel for your CUDA major version from NVIDIA's index, e.g. "
    "`pip install --extra-index-url https://pypi.nvidia.com 'tensorrt-cu12>=10,<12'` (CUDA 12) or "
    "`pip install --extra-index-url https://pypi.nvidia.com 'tensorrt-cu13>=10,<12'` (CUDA 13). "
    "Without it use backend='cuda' or backend='onnxruntime'."
)


# --------------------------------------------------------------------------- TensorRT import, versions


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or BackendUnavailableError that says how to install it."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer / the driver is not
        raise BackendUnavailableError(f"{INSTALL_HINT} (import error: {exc})") from exc
    trt_major(tensorrt.__version__)  # rejects unsupported versions with a clear message
    return tensorrt


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT backend cannot be used here (cheap: builds nothing), or None when it can."""
    from . import native

    try:
        import_tensorrt()
        detect_gpu()
    except BackendUnavailableError as exc:
        return str(exc)
    caps = native.capabilities()
    if not caps.cuda:  # output buffers and the compositor's CUDA twin come from the native core
        return f"the TensorRT backend needs the CUDA twin of pybilayer._C: {caps.cuda_reason}"
    return None


def trt_major(trt_version: str) -> int:
    """Major version of a TensorRT version string ("10.7.0.23" -> 10); only 10 and 11 are supported."""
    try:
        major = int(str(trt_version).split(".")[0])
    except ValueError:
        raise BackendUnavailableError(f"cannot parse the TensorRT version {trt_version!r}") from None
    if major not in SUPPORTED_TRT_MAJORS:
        raise BackendUnavailableError(
            f"TensorRT {trt_version} is not supported; pybilayer supports TensorRT 10.x and 11.x. {INSTALL_HINT}"
        )
    return major


@dataclass(frozen=True)
class PrecisionPlan:
    """How a requested engine precision is obtained from a given TensorRT version."""

    onnx_precision: Precision  # which graph pybilayer.export.export_onnx writes
    use_fp16_flag: bool  # set BuilderFlag.FP16 (TensorRT 10 only; the flag no longer exists in 11)
    strongly_typed: bool  # the network follows the graph's own types (always so in TensorRT 11)
    allow_tf32: bool  # TF32 (on by default in TensorRT) is cleared for fp32 plans: fp32 means fp32


def _precision_plan(trt_version: str, precision: str) -> PrecisionPlan:
    """The only place that branches on the TensorRT version.

    TensorRT 10: weakly typed network from the fp32 graph; fp16 via BuilderFlag.FP16.
    TensorRT 11: every network is strongly typed (the STRONGLY_TYPED creation flag is ignored, so it is
    not passed) and BuilderFlag.FP16 is gone: the graph itself carries the precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    fp16 = precision == "fp16"
    if trt_major(trt_version) == 10:
        return PrecisionPlan(onnx_precision="fp32", use_fp16_flag=fp16, strongly_typed=False, allow_tf32=fp16)
    return PrecisionPlan(onnx_precision=precision, use_fp16_flag=False, strongly_typed=True, allow_tf32=fp16)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- GPU identity


@dataclass(frozen=True)
class GpuInfo:
    """What identifies a GPU for a TensorRT plan: tactics are chosen per model and architecture."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def label(self) -> str:
        return f"{self.name} (sm_{self.compute_capability[0]}{self.compute_capability[1]})"


def detect_gpu(device_index: int | None = None) -> GpuInfo:
    """Name and compute capability of the CUDA device TensorRT will build for / run on."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError("torch is needed to query the GPU for TensorRT") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "the TensorRT backend needs an NVIDIA GPU visible to a CUDA build of torch; none is visible here"
        )
    index = torch.cuda.current_device() if device_index is None else device_index
    major, minor = torch.cuda.get_device_capability(index)
    return GpuInfo(name=torch.cuda.get_device_name(index), compute_capability=(int(major), int(minor)))


# --------------------------------------------------------------------------- ONNX graph facts


@dataclass(frozen=True)
class TensorInfo:
    """A graph or engine I/O tensor. Dynamic dimensions are -1."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy-style name: "float32", "float16", "int64", ...


@dataclass(frozen=True)
class ProfileShape:
    """One input's min/opt/max shape in the optimisation profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def onnx_sha256(onnx_path: str | Path) -> str:
    """sha256 of an ONNX file and, in the order the graph names them, of its external-data files."""
    import onnx

    onnx_path = Path(onnx_path)
    digest = hashlib.sha256(onnx_path.read_bytes())
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations: list[str] = []
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in locations:
                locations.append(entry.value)
    for location in locations:
        digest.update(location.encode())
        digest.update((onnx_path.parent / location).read_bytes())
    return digest.hexdigest()


def graph_io(onnx_path: str | Path) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """(inputs, outputs) of an ONNX graph; symbolic or unknown dimensions become -1."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}  # old exporters list weights as inputs too

    def info(value: Any) -> TensorInfo:
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim)
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        return TensorInfo(name=value.name, shape=shape, dtype=dtype)

    inputs = tuple(info(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(info(v) for v in model.graph.output)
    return inputs, outputs


def profile_shapes(inputs: Sequence[TensorInfo], max_batch: int, opt_batch: int = 1) -> tuple[ProfileShape, ...]:
    """min/opt/max shapes (batch 1 / opt_batch / max_batch) for every input whose batch dimension is dynamic.

    Inputs with a fully static shape need no profile entry. A dynamic dimension other than the
    first cannot be given a range here and is an error naming the input.
    """
    _check_batches(max_batch, opt_batch)
    shapes = []
    for tensor in inputs:
        if not tensor.shape or -1 not in tensor.shape:
            continue
        if -1 in tensor.shape[1:]:
            raise EngineError(
                f"ONNX input {tensor.name!r} has shape {tensor.shape}: only its first (batch) dimension may be "
                "dynamic for a TensorRT profile"
            )
        rest = tuple(tensor.shape[1:])
        shapes.append(ProfileShape(tensor.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest)))
    if not shapes:
        raise EngineError("the ONNX graph has no input with a dynamic batch dimension; export it with dynamic batch")
    return tuple(shapes)


def _check_batches(max_batch: int, opt_batch: int) -> None:
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if not isinstance(opt_batch, int) or isinstance(opt_batch, bool) or not 1 <= opt_batch <= max_batch:
        raise ValueError(f"opt_batch must be an integer in [1, max_batch={max_batch}], got {opt_batch!r}")


# --------------------------------------------------------------------------- spec, metadata, cache


@dataclass(frozen=True)
class EngineSpec:
    """Everything a plan depends on. Two specs with the same key may share a plan."""

    onnx_sha256: str
    precision: Precision
    max_batch: int
    opt_batch: int
    trt_version: str
    gpu: GpuInfo

    def key(self) -> str:
        material = json.dumps({"schema": CACHE_SCHEMA, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()

    @property
    def stem(self) -> str:
        """File name stem of the plan: readable prefix, then the key."""
        return f"bilayer_{self.precision}_b{self.max_batch}_{self.key()[:24]}"


@dataclass(frozen=True)
class EngineMetadata:
    """The JSON written beside each plan."""

    spec: EngineSpec
    precision_plan: PrecisionPlan
    plan_sha256: str
    profile: tuple[ProfileShape, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    created_utc: str
    schema: int = CACHE_SCHEMA

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> EngineMetadata:
        """Parse metadata; any missing field or wrong type raises ValueError (the plan is then stale)."""
        try:
            raw = json.loads(text)
            spec_raw = raw["spec"]
            gpu_raw = spec_raw["gpu"]
            spec = EngineSpec(
                onnx_sha256=str(spec_raw["onnx_sha256"]),
                precision=spec_raw["precision"],
                max_batch=int(spec_raw["max_batch"]),
                opt_batch=int(spec_raw["opt_batch"]),
                trt_version=str(spec_raw["trt_version"]),
                gpu=GpuInfo(name=str(gpu_raw["name"]), compute_capability=_int_tuple(gpu_raw["compute_capability"])),
            )
            return EngineMetadata(
                spec=spec,
                precision_plan=PrecisionPlan(**raw["precision_plan"]),
                plan_sha256=str(raw["plan_sha256"]),
                profile=tuple(
                    ProfileShape(p["name"], _int_tuple(p["min"]), _int_tuple(p["opt"]), _int_tuple(p["max"]))
                    for p in raw["profile"]
                ),
                inputs=tuple(TensorInfo(t["name"], _int_tuple(t["shape"]), str(t["dtype"])) for t in raw["inputs"]),
                outputs=tuple(TensorInfo(t["name"], _int_tuple(t["shape"]), str(t["dtype"])) for t in raw["outputs"]),
                created_utc=str(raw["created_utc"]),
                schema=int(raw["schema"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"engine metadata is malformed: {exc!r}") from exc


def _int_tuple(values: Any) -> tuple[int, ...]:
    if not isinstance(values, list):
        raise TypeError(f"expected a list of integers, got {values!r}")
    return tuple(int(v) for v in values)


class CacheState(Enum):
    VALID = "valid"
    MISSING = "missing"
    STALE = "stale"


@dataclass(frozen=True)
class CacheLookup:
    state: CacheState
    plan_path: Path
    reason: str  # why the plan is not usable ("" when valid)


def default_cache_dir() -> Path:
    """$PYBILAYER_ENGINE_DIR, else engines/cache/ of a source checkout, else ~/.cache/pybilayer/engines."""
    env = os.environ.get(ENGINE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    checkout_engines = Path(__file__).resolve().parent.parent / "engines"
    if checkout_engines.is_dir():
        return checkout_engines / "cache"
    return Path.home() / ".cache" / "pybilayer" / "engines"


class EngineCache:
    """Folder of plans, their metadata, exported graphs and timing caches.

    <root>/plans/<stem>.plan, <root>/plans/<stem>.json   the plan and its metadata (EngineSpec.stem)
    <root>/onnx/<sha256[:24]>/model.onnx                  exported graphs, keyed by their content
    <root>/timing/<trt version>_<gpu>.cache               TensorRT timing caches, one per TensorRT x GPU
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def plan_path(self, spec: EngineSpec) -> Path:
        return self.root / "plans" / f"{spec.stem}.plan"

    @staticmethod
    def metadata_path(plan_path: Path) -> Path:
        return plan_path.with_suffix(".json")

    def timing_cache_path(self, trt_version: str, gpu: GpuInfo) -> Path:
        slug = "".join(c if c.isalnum() else "-" for c in gpu.name).strip("-")
        return (
            self.root
            / "timing"
            / f"trt{trt_version}_{slug}_sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}.cache"
        )

    def lookup(self, spec: EngineSpec) -> CacheLookup:
        """Whether the plan for `spec` is present and valid; if not, why."""
        plan_path = self.plan_path(spec)
        if not plan_path.exists():
            return CacheLookup(CacheState.MISSING, plan_path, "no plan built yet")
        try:
            metadata = read_metadata(plan_path)
        except EngineError as exc:
            return CacheLookup(CacheState.STALE, plan_path, str(exc))
        if metadata.schema != CACHE_SCHEMA:
            return CacheLookup(CacheState.STALE, plan_path, f"metadata schema {metadata.schema} != {CACHE_SCHEMA}")
        if metadata.spec != spec:
            return CacheLookup(
                CacheState.STALE, plan_path, f"metadata differs: {_spec_differences(metadata.spec, spec)}"
            )
        plan_sha = hashlib.sha256(plan_path.read_bytes()).hexdigest()
        if plan_sha != metadata.plan_sha256:
            return CacheLookup(CacheState.STALE, plan_path, "plan bytes do not match the sha256 in its metadata")
        return CacheLookup(CacheState.VALID, plan_path, "")

    def store(self, metadata: EngineMetadata, plan: bytes) -> Path:
        """Write plan then metadata, each atomically. The metadata (with the plan's sha256) goes last, so
        an interrupted store leaves a plan that lookup() reports stale, never one that loads."""
        plan_path = self.plan_path(metadata.spec)
        if hashlib.sha256(plan).hexdigest() != metadata.plan_sha256:
            raise EngineError("internal error: plan bytes and metadata.plan_sha256 disagree")
        atomic_write_bytes(plan_path, plan)
        atomic_write_bytes(self.metadata_path(plan_path), metadata.to_json().encode())
        return plan_path

    def add_onnx(self, exported_dir: Path) -> tuple[Path, str]:
        """Move a folder holding a freshly exported model.onnx (and any external data) into onnx/<sha>/."""
        onnx_path = exported_dir / "model.onnx"
        sha = onnx_sha256(onnx_path)
        target = self.root / "onnx" / sha[:24]
        if target.exists() and not ((target / "model.onnx").exists() and onnx_sha256(target / "model.onnx") == sha):
            shutil.rmtree(target)
        if not target.exists():
            try:
                os.replace(exported_dir, target)  # a folder rename: another reader sees all of it or none
            except OSError:
                if not target.exists():  # not a concurrent export of the same graph: a real failure
                    raise
        shutil.rmtree(exported_dir, ignore_errors=True)
        return target / "model.onnx", sha


def _spec_differences(found: EngineSpec, wanted: EngineSpec) -> str:
    parts = []
    for field in dataclasses.fields(EngineSpec):
        a, b = getattr(found, field.name), getattr(wanted, field.name)
        if a != b:
            parts.append(f"{field.name}: plan has {a!r}, here {b!r}")
    return "; ".join(parts)


def read_metadata(plan_path: str | Path) -> EngineMetadata:
    """Metadata beside a plan; EngineError when it is missing or unreadable."""
    meta_path = EngineCache.metadata_path(Path(plan_path))
    try:
        return EngineMetadata.from_json(meta_path.read_text())
    except FileNotFoundError:
        raise EngineError(f"metadata {meta_path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EngineError(f"metadata {meta_path} is unreadable: {exc}") from exc


# --------------------------------------------------------------------------- building


def build_plan(
    trt: ModuleType,
    onnx_path: Path,
    precision_plan: PrecisionPlan,
    profile: Sequence[ProfileShape],
    timing_cache: bytes = b"",
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
) -> tuple[bytes, bytes]:
    """TensorRT builder calls: ONNX file -> (serialized plan, serialized timing cache)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode since TensorRT 10 and TensorRT 11 networks are always strongly
    # typed; on 10 we build weakly typed (the FP16 flag needs it), so no creation flag is ever needed.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors or 'no error reported'}")
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        log.info("input  %s %s %s", tensor.name, tuple(tensor.shape), tensor.dtype)
    for i in range(network.num_outputs):
        tensor = network.get_output(i)
        log.info("output %s %s %s", tensor.name, tuple(tensor.shape), tensor.dtype)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision_plan.use_fp16_flag:
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated during 10.x; absent means yes
            raise EngineError(
                "this GPU has no fast FP16 (TensorRT platform_has_fast_fp16 is False); use precision='fp32'"
            )
        config.set_flag(trt.BuilderFlag.FP16)
    if not precision_plan.allow_tf32:
        config.clear_flag(trt.BuilderFlag.TF32)

    optimization_profile = builder.create_optimization_profile()
    for shape in profile:
        log.info("profile %s min %s opt %s max %s", shape.name, shape.min, shape.opt, shape.max)
        optimization_profile.set_shape(shape.name, shape.min, shape.opt, shape.max)
    config.add_optimization_profile(optimization_profile)

    _attach_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build a plan from {onnx_path} (see the TensorRT log above)")
    return _to_bytes(serialized), _to_bytes(config.get_timing_cache().serialize())


def _attach_timing_cache(config: Any, data: bytes) -> None:
    """Start from the saved timing cache; a blob TensorRT cannot read costs time, never the build."""
    try:
        cache = config.create_timing_cache(data)
        accepted = cache is not None and config.set_timing_cache(cache, False)
    except (RuntimeError, TypeError, ValueError) as exc:  # the bindings raise on an unreadable blob
        log.warning("TensorRT could not read the timing cache (%s)", exc)
        accepted = False
    if not accepted:
        log.warning("building with an empty timing cache")
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _to_bytes(host_memory: Any) -> bytes:
    return memoryview(host_memory).tobytes()  # IHostMemory exposes the buffer protocol


def build_plan_from_onnx(
    onnx_path: str | Path,
    *,
    onnx_sha: str | None = None,
    precision: Precision = "fp16",
    max_batch: int = 8,
    opt_batch: int = 1,
    cache: EngineCache | None = None,
    gpu: GpuInfo | None = None,
    trt: ModuleType | None = None,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    force: bool = False,
) -> Path:
    """Plan for an exported ONNX graph: from the cache when valid, otherwise built and stored.

    The graph must already be the one `_precision_plan` asks for (fp16 graph for fp16 on TensorRT 11).
    """
    onnx_path = Path(onnx_path)
    _check_batches(max_batch, opt_batch)
    trt = trt or import_tensorrt()
    precision_plan = _precision_plan(trt.__version__, precision)
    gpu = gpu or detect_gpu()
    cache = cache or EngineCache()
    spec = EngineSpec(
        onnx_sha256=onnx_sha or onnx_sha256(onnx_path),
        precision=precision,
        max_batch=max_batch,
        opt_batch=opt_batch,
        trt_version=trt.__version__,
        gpu=gpu,
    )
    found = cache.lookup(spec)
    if found.state is CacheState.VALID and not force:
        log.info("TensorRT plan from cache: %s", found.plan_path)
        return found.plan_path
    log.info("building TensorRT plan %s (%s)", found.plan_path.name, "forced" if force else found.reason)

    inputs, outputs = graph_io(onnx_path)
    profile = profile_shapes(inputs, max_batch, opt_batch)
    timing_path = cache.timing_cache_path(trt.__version__, gpu)
    timing_in = timing_path.read_bytes() if timing_path.exists() else b""
    plan, timing_out = build_plan(trt, onnx_path, precision_plan, profile, timing_in, workspace_mib)
    metadata = EngineMetadata(
        spec=spec,
        precision_plan=precision_plan,
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        profile=profile,
        inputs=inputs,
        outputs=outputs,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    plan_path = cache.store(metadata, plan)
    atomic_write_bytes(timing_path, timing_out)
    log.info("TensorRT plan written: %s", plan_path)
    return plan_path


def build_engine(
    checkpoint: Any,
    precision: Precision = "fp16",
    max_batch: int = 8,
    cache_dir: str | Path | None = None,
    *,
    opt_batch: int = 1,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    force: bool = False,
) -> Path:
    """Export the per-frame network of `checkpoint` (a path or a loaded Bilayer) and build its TensorRT plan.

    Returns the plan's path under `cache_dir` (default: `default_cache_dir()`). A valid cached plan is
    reused; a stale one is rebuilt. Raises BackendUnavailableError without TensorRT or a GPU.
    """
    _check_batches(max_batch, opt_batch)
    trt = import_tensorrt()  # before the export: fail fast, with the install hint
    precision_plan = _precision_plan(trt.__version__, precision)
    gpu = detect_gpu()
    cache = EngineCache(cache_dir)
    onnx_path, sha = export_to_cache(checkpoint, precision_plan.onnx_precision, cache)
    return build_plan_from_onnx(
        onnx_path,
        onnx_sha=sha,
        precision=precision,
        max_batch=max_batch,
        opt_batch=opt_batch,
        cache=cache,
        gpu=gpu,
        trt=trt,
        workspace_mib=workspace_mib,
        force=force,
    )


def export_to_cache(checkpoint: Any, onnx_precision: Precision, cache: EngineCache) -> tuple[Path, str]:
    """Export the per-frame ONNX graph into the cache's onnx/ folder; returns (path, sha256)."""
    from .export import export_onnx

    model = _load_model(checkpoint)
    staging_root = cache.root / "onnx"
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=staging_root, prefix=".export-"))
    try:
        export_onnx(model, staging / "model.onnx", precision=onnx_precision)
        return cache.add_onnx(staging)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _load_model(checkpoint: Any) -> Any:
    if isinstance(checkpoint, (str, os.PathLike)):
        from .models import Bilayer

        return Bilayer.load(checkpoint)
    return checkpoint


# --------------------------------------------------------------------------- runtime


_TRT_TO_TORCH_DTYPE = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


def check_plan_environment(metadata: EngineMetadata, trt_version: str, gpu: GpuInfo, plan_path: Path) -> None:
    """EngineError naming both sides when a plan was built for another TensorRT version or GPU."""
    problems = []
    if metadata.spec.trt_version != trt_version:
        problems.append(f"TensorRT {metadata.spec.trt_version} (this machine has TensorRT {trt_version})")
    if metadata.spec.gpu != gpu:
        problems.append(f"GPU {metadata.spec.gpu.label} (this machine has {gpu.label})")
    if problems:
        raise EngineError(
            f"plan {plan_path} was built for " + " and ".join(problems) + "; rebuild it with "
            "`python engines/build.py --checkpoint ...` or pybilayer.trt.build_engine()"
        )


def load_engine(
    plan_path: str | Path, device: Any = "cuda", *, trt: ModuleType | None = None, gpu: GpuInfo | None = None
) -> TrtEngine:
    """Deserialize a plan after checking its metadata against this machine's TensorRT and GPU."""
    import torch

    plan_path = Path(plan_path)
    trt = trt or import_tensorrt()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # tensors report cuda:N; compare like with like
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = gpu or detect_gpu(device.index)
    metadata = read_metadata(plan_path)
    check_plan_environment(metadata, trt.__version__, gpu, plan_path)
    try:
        plan = plan_path.read_bytes()
    except OSError as exc:
        raise EngineError(f"cannot read plan {plan_path}: {exc}") from exc
    if hashlib.sha256(plan).hexdigest() != metadata.plan_sha256:
        raise EngineError(f"plan {plan_path} does not match the sha256 in its metadata (truncated or replaced)")
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return TrtEngine(plan, metadata, trt=trt, device=device)


class TrtEngine:
    """A deserialized plan and one execution context, run with the 10.x name-based I/O API.

    `run` reads the input tensors and writes into caller-owned output buffers (the TensorRT backend
    hands it buffers of the native core); nothing is allocated per call unless an input needs a cast.
    Work is enqueued with `execute_async_v3` on the stream the caller names and is not synchronized.
    One context serves one call at a time: `run` holds a lock while it binds and enqueues.
    """

    def __init__(self, plan: bytes, metadata: EngineMetadata, *, trt: ModuleType, device: torch.device):
        import torch

        self.metadata = metadata
        self.device = device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineError("TensorRT could not deserialize the plan (see the TensorRT log)")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError("TensorRT could not create an execution context")
        inputs, outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype_name = self._engine.get_tensor_dtype(name).name
            if dtype_name not in _TRT_TO_TORCH_DTYPE:
                raise EngineError(f"engine tensor {name!r} has unsupported dtype {dtype_name}")
            info = TensorInfo(
                name, tuple(int(d) for d in self._engine.get_tensor_shape(name)), _TRT_TO_TORCH_DTYPE[dtype_name]
            )
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(info)
        self.inputs: tuple[TensorInfo, ...] = tuple(inputs)
        self.outputs: tuple[TensorInfo, ...] = tuple(outputs)
        self._torch_dtypes = {t.name: getattr(torch, t.dtype) for t in (*inputs, *outputs)}
        self._lock = threading.Lock()
        self._in_flight: dict[str, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.metadata.spec.max_batch

    @property
    def outputs_dtypes(self) -> dict[str, str]:
        return {t.name: t.dtype for t in self.outputs}

    def feed_batch(self, feeds: Mapping[str, torch.Tensor]) -> int:
        """The batch of `feeds` as `run` will see it (1 for a plan without a dynamic batch); unchecked."""
        for info in self.inputs:
            tensor = feeds.get(info.name)
            if info.shape and info.shape[0] == -1 and tensor is not None and tensor.dim() > 0:
                return max(1, int(tensor.shape[0]))
        return 1

    def output_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Output shapes for a batch; every output's dynamic dimension must be its first (the batch)."""
        shapes = {}
        for info in self.outputs:
            if -1 in info.shape[1:]:
                raise EngineError(f"engine output {info.name!r} has shape {info.shape}: only the batch may be dynamic")
            shapes[info.name] = tuple(batch if d == -1 else d for d in info.shape)
        return shapes

    def run(
        self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor], stream_handle: int
    ) -> dict[str, torch.Tensor]:
        """Enqueue one batch of any size on `stream_handle`.

        feeds: input tensors by name on the engine's device (cast to the engine's dtypes here).
        outputs: destination tensors by name, C-contiguous, the engine's dtypes, batch >= this batch.
        A batch larger than the plan's max runs as consecutive chunks into consecutive rows.
        Returns the first `batch` rows of each destination; they hold the results once the stream
        reaches them, until the destinations are written again.
        """
        bound, batch = self._bind_inputs(feeds)
        targets = self._bind_outputs(outputs, batch)
        batched = {t.name for t in self.inputs if t.shape and t.shape[0] == -1}
        with self._lock:
            for start in range(0, batch, self.max_batch):
                stop = min(start + self.max_batch, batch)
                self._enqueue(
                    {name: tensor[start:stop] if name in batched else tensor for name, tensor in bound.items()},
                    {name: target[start:stop] for name, target in targets.items()},
                    stream_handle,
                )
            # Inputs cast or made contiguous here are temporaries: keep them alive until the next call,
            # the stream may still be reading them.
            self._in_flight = bound
        return targets

    def _enqueue(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], stream_handle: int) -> None:
        for info in self.inputs:
            tensor = inputs[info.name]
            if -1 in info.shape and not self._context.set_input_shape(info.name, tuple(tensor.shape)):
                raise EngineError(f"TensorRT rejected shape {tuple(tensor.shape)} for input {info.name!r}")
            self._context.set_tensor_address(info.name, tensor.data_ptr())
        for name, target in targets.items():
            resolved = tuple(int(d) for d in self._context.get_tensor_shape(name))
            if resolved != tuple(target.shape):
                raise EngineError(f"engine output {name!r} has shape {resolved}, expected {tuple(target.shape)}")
            self._context.set_tensor_address(name, target.data_ptr())
        if not self._context.execute_async_v3(stream_handle):
            raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _bind_inputs(self, feeds: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        expected = {t.name for t in self.inputs}
        missing = sorted(expected - set(feeds))
        unknown = sorted(set(feeds) - expected)
        if missing or unknown:
            raise ValueError(
                f"engine inputs mismatch: missing {missing}, unknown {unknown}; expected {sorted(expected)}"
            )
        batch: int | None = None
        bound = {}
        for info in self.inputs:
            tensor = feeds[info.name]
            if tensor.device != self.device:
                raise ValueError(f"input {info.name!r} is on {tensor.device}; the engine runs on {self.device}")
            if tensor.dim() != len(info.shape) or any(
                want != -1 and got != want for got, want in zip(tensor.shape, info.shape)
            ):
                raise ValueError(
                    f"input {info.name!r} has shape {tuple(tensor.shape)}; the engine expects {info.shape} (-1: any)"
                )
            if info.shape and info.shape[0] == -1:
                n = int(tensor.shape[0])
                if n < 1:
                    raise ValueError(f"input {info.name!r} has an empty batch")
                if batch is not None and n != batch:
                    raise ValueError(f"input {info.name!r} has batch {n} but another input has batch {batch}")
                batch = n
            bound[info.name] = tensor.to(self._torch_dtypes[info.name]).contiguous()
        return bound, batch or 1

    def _bind_outputs(self, outputs: Mapping[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        shapes = self.output_shapes(batch)
        if set(outputs) != set(shapes):
            raise ValueError(f"output buffers are named {sorted(outputs)}; the engine writes {sorted(shapes)}")
        targets = {}
        for name, shape in shapes.items():
            buffer = outputs[name]
            if (
                buffer.device != self.device
                or buffer.dtype != self._torch_dtypes[name]
                or not buffer.is_contiguous()
                or buffer.dim() != len(shape)
                or tuple(buffer.shape[1:]) != shape[1:]
                or buffer.shape[0] < shape[0]
            ):
                raise ValueError(
                    f"output buffer {name!r} is {tuple(buffer.shape)} {buffer.dtype} on {buffer.device} "
                    f"(contiguous: {buffer.is_contiguous()}); "
                    f"needs >= {shape} {self._torch_dtypes[name]} on {self.device}"
                )
            targets[name] = buffer[: shape[0]]
        return targets
