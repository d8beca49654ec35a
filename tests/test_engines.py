"""TensorRT engines: cache keys, invalidation, profiles, version branching, atomic writes, errors.

TensorRT cannot be installed on the CI machines, so the builder and runtime code runs against
`FakeTensorRT`: a stand-in `tensorrt` module with the documented 10.x/11.x Python API surface that
records every call. Its "engine" runs the real ONNX graph with onnxruntime, reading inputs from and
writing outputs to the raw addresses given to `set_tensor_address`, so the name-based I/O wiring is
checked end to end. Tests that need the real library carry `needs_tensorrt`.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from pybilayer import trt as trt_mod
from pybilayer.errors import BackendUnavailableError, EngineError
from pybilayer.trt import (
    CacheState,
    EngineCache,
    EngineSpec,
    GpuInfo,
    ProfileShape,
    _precision_plan,
    atomic_write_bytes,
    build_plan_from_onnx,
    graph_io,
    load_engine,
    onnx_sha256,
    profile_shapes,
    read_metadata,
)

from _tolerances import TOLERANCES  # noqa: E402  (tests/ is on sys.path under pytest)

H100 = GpuInfo("NVIDIA H100 80GB HBM3", (9, 0))
L4 = GpuInfo("NVIDIA L4", (8, 9))


# --------------------------------------------------------------------------- a small real ONNX graph


def write_tiny_graph(path: Path, dtype: int = TensorProto.FLOAT, scale: float = 2.0) -> Path:
    """keypoints (N,68,2), per-identity gain (N,1,2) and a static bias (1,68,2) -> two outputs.

    delta_uv = keypoints * gain * scale + bias;  lf = keypoints + gain
    """
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inputs = [
        helper.make_tensor_value_info("keypoints", dtype, ["batch", 68, 2]),
        helper.make_tensor_value_info("params.gain", dtype, ["batch", 1, 2]),
        helper.make_tensor_value_info("bias", dtype, [1, 68, 2]),
    ]
    outputs = [
        helper.make_tensor_value_info("delta_uv", dtype, ["batch", 68, 2]),
        helper.make_tensor_value_info("lf", dtype, ["batch", 68, 2]),
    ]
    scale_init = helper.make_tensor("scale", dtype, [], np.array([scale], dtype=np_dtype).tobytes(), raw=True)
    nodes = [
        helper.make_node("Mul", ["keypoints", "params.gain"], ["scaled0"]),
        helper.make_node("Mul", ["scaled0", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["delta_uv"]),
        helper.make_node("Add", ["keypoints", "params.gain"], ["lf"]),
    ]
    graph = helper.make_graph(nodes, "tiny_per_frame", inputs, outputs, initializer=[scale_init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def tiny_onnx(tmp_path) -> Path:
    return write_tiny_graph(tmp_path / "graph" / "model.onnx")


# --------------------------------------------------------------------------- the fake tensorrt module


class FakeTensorRT(types.ModuleType):
    """The parts of the TensorRT 10/11 Python API pybilayer uses, recording each call in `calls`.

    Version differences that matter to us are modelled: TensorRT 11 has no BuilderFlag.FP16 and no
    Builder.platform_has_fast_fp16, so code that touches them on 11 fails here as it would there.
    """

    def __init__(self, version: str):
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: list[tuple] = []
        major = int(version.split(".")[0])
        fake = self

        class Severity(enum.Enum):
            WARNING = 2

        class Logger:
            WARNING = Severity.WARNING

            def __init__(self, severity):
                fake.calls.append(("Logger", severity))

        class DataType(enum.Enum):
            FLOAT = 0
            HALF = 1
            INT32 = 3
            INT64 = 8

        class TensorIOMode(enum.Enum):
            NONE = 0
            INPUT = 1
            OUTPUT = 2

        class MemoryPoolType(enum.Enum):
            WORKSPACE = 0

        flags = {"TF32": 7} if major >= 11 else {"FP16": 0, "TF32": 7}
        BuilderFlag = enum.Enum("BuilderFlag", flags)
        NetworkDefinitionCreationFlag = enum.Enum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
        onnx_to_trt = {TensorProto.FLOAT: DataType.FLOAT, TensorProto.FLOAT16: DataType.HALF}

        class FakeITensor:
            def __init__(self, name, shape, dtype):
                self.name, self.shape, self.dtype = name, shape, dtype

        class Network:
            def __init__(self, flags):
                self.flags = flags
                self.inputs: list[FakeITensor] = []
                self.outputs: list[FakeITensor] = []
                self.onnx_path: str | None = None

            num_inputs = property(lambda self: len(self.inputs))
            num_outputs = property(lambda self: len(self.outputs))

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.errors: list[str] = []

            def parse_from_file(self, path):
                fake.calls.append(("OnnxParser.parse_from_file", path))
                try:
                    model = onnx.load(path)
                except Exception as exc:  # noqa: BLE001 - the real parser reports, never raises
                    self.errors.append(f"cannot read {path}: {exc}")
                    return False
                self.network.onnx_path = path

                def tensors(values):
                    out = []
                    for v in values:
                        dims = tuple(
                            d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim
                        )
                        out.append(FakeITensor(v.name, dims, onnx_to_trt[v.type.tensor_type.elem_type]))
                    return out

                self.network.inputs = tensors(model.graph.input)
                self.network.outputs = tensors(model.graph.output)
                return True

            num_errors = property(lambda self: len(self.errors))

            def get_error(self, i):
                return self.errors[i]

        class TimingCache:
            def __init__(self, data: bytes):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+entry"

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, min, opt, max):  # noqa: A002 - the TensorRT argument names
                fake.calls.append(("IOptimizationProfile.set_shape", name, tuple(min), tuple(opt), tuple(max)))
                self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

        class BuilderConfig:
            def __init__(self):
                self.flags = set()
                self.profiles = []
                self.timing_cache = None

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("IBuilderConfig.set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                fake.calls.append(("IBuilderConfig.set_flag", flag))
                self.flags.add(flag)

            def clear_flag(self, flag):
                fake.calls.append(("IBuilderConfig.clear_flag", flag))
                self.flags.discard(flag)

            def add_optimization_profile(self, profile):
                fake.calls.append(("IBuilderConfig.add_optimization_profile",))
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, data):
                fake.calls.append(("IBuilderConfig.create_timing_cache", bytes(data)))
                if bytes(data).startswith(b"corrupt"):
                    raise RuntimeError("timing cache blob is invalid")
                return TimingCache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("IBuilderConfig.set_timing_cache", ignore_mismatch))
                self.timing_cache = cache
                return True

            def get_timing_cache(self):
                return self.timing_cache

        class Builder:
            def __init__(self, logger):
                fake.calls.append(("Builder",))

            def create_network(self, flags=0):
                fake.calls.append(("Builder.create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                return BuilderConfig()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("Builder.build_serialized_network",))
                if fake.fail_build:
                    return None
                (profile,) = config.profiles
                plan = {
                    "onnx_path": network.onnx_path,
                    "fp16_flag": any(f.name == "FP16" for f in config.flags),
                    "profile": {k: [list(s) for s in v] for k, v in profile.shapes.items()},
                    "version": fake.__version__,
                }
                return bytearray(json.dumps(plan).encode())  # IHostMemory: a buffer

        if major < 11:
            Builder.platform_has_fast_fp16 = True

        class ExecutionContext:
            def __init__(self, engine):
                self.engine = engine
                self.shapes: dict[str, tuple[int, ...]] = {}
                self.addresses: dict[str, int] = {}

            def set_input_shape(self, name, shape):
                fake.calls.append(("IExecutionContext.set_input_shape", name, tuple(shape)))
                if name not in self.engine.profile:  # a static input: only its own shape is accepted
                    return tuple(shape) == self.engine.shapes[name]
                lo, _, hi = self.engine.profile[name]
                ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
                if ok:
                    self.shapes[name] = tuple(shape)
                return ok

            def set_tensor_address(self, name, address):
                fake.calls.append(("IExecutionContext.set_tensor_address", name))
                self.addresses[name] = int(address)

            def get_tensor_shape(self, name):
                batch = next(iter(self.shapes.values()))[0]
                return tuple(batch if d == -1 else d for d in self.engine.shapes[name])

            def execute_async_v3(self, stream_handle):
                fake.calls.append(("IExecutionContext.execute_async_v3", stream_handle))
                session = self.engine.session()
                feeds = {}
                for name in self.engine.input_names:
                    shape = self.shapes.get(name, self.engine.shapes[name])
                    feeds[name] = _read(self.addresses[name], shape, self.engine.np_dtypes[name]).copy()
                results = session.run(self.engine.output_names, feeds)
                for name, value in zip(self.engine.output_names, results):
                    target = _read(self.addresses[name], self.get_tensor_shape(name), self.engine.np_dtypes[name])
                    target[...] = value
                return True

        class Engine:
            def __init__(self, plan):
                self.onnx_path = plan["onnx_path"]
                self.profile = {k: tuple(tuple(s) for s in v) for k, v in plan["profile"].items()}
                model = onnx.load(self.onnx_path)
                self.input_names = [v.name for v in model.graph.input]
                self.output_names = [v.name for v in model.graph.output]
                self.shapes, self.dtypes, self.np_dtypes, self.modes = {}, {}, {}, {}
                for values, mode in (
                    (model.graph.input, TensorIOMode.INPUT),
                    (model.graph.output, TensorIOMode.OUTPUT),
                ):
                    for v in values:
                        tt = v.type.tensor_type
                        self.shapes[v.name] = tuple(
                            d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim
                        )
                        self.dtypes[v.name] = onnx_to_trt[tt.elem_type]
                        self.np_dtypes[v.name] = helper.tensor_dtype_to_np_dtype(tt.elem_type)
                        self.modes[v.name] = mode
                self.names = self.input_names + self.output_names

            num_io_tensors = property(lambda self: len(self.names))

            def session(self):
                import onnxruntime

                if getattr(self, "_session", None) is None:
                    options = onnxruntime.SessionOptions()
                    options.intra_op_num_threads = 1
                    self._session = onnxruntime.InferenceSession(
                        self.onnx_path, options, providers=["CPUExecutionProvider"]
                    )
                return self._session

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return self.modes[name]

            def get_tensor_dtype(self, name):
                return self.dtypes[name]

            def get_tensor_shape(self, name):
                return self.shapes[name]

            def create_execution_context(self):
                return ExecutionContext(self)

        class Runtime:
            def __init__(self, logger):
                fake.calls.append(("Runtime",))

            def deserialize_cuda_engine(self, data):
                fake.calls.append(("Runtime.deserialize_cuda_engine",))
                plan = json.loads(bytes(data))
                return Engine(plan) if plan["version"] == fake.__version__ else None

        self.fail_build = False
        self.Logger, self.DataType, self.TensorIOMode, self.MemoryPoolType = (
            Logger,
            DataType,
            TensorIOMode,
            MemoryPoolType,
        )
        self.BuilderFlag, self.NetworkDefinitionCreationFlag = BuilderFlag, NetworkDefinitionCreationFlag
        self.OnnxParser, self.Builder, self.Runtime = OnnxParser, Builder, Runtime

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def _read(address: int, shape, dtype) -> np.ndarray:
    count = int(np.prod(shape))
    buffer = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def fake_trt(version: str) -> FakeTensorRT:
    return FakeTensorRT(version)


def build(onnx_path, cache, trt, gpu=H100, **kw):
    return build_plan_from_onnx(onnx_path, cache=cache, gpu=gpu, trt=trt, **kw)


# --------------------------------------------------------------------------- version branching


@pytest.mark.parametrize(
    "version, precision, expected",
    [
        ("10.0.1.6", "fp16", ("fp32", True, False, True)),
        ("10.13.3.9", "fp32", ("fp32", False, False, False)),
        ("11.0.0", "fp16", ("fp16", False, True, True)),
        ("11.4.1.2", "fp32", ("fp32", False, True, False)),
    ],
)
def test_precision_plan_per_tensorrt_version(version, precision, expected):
    plan = _precision_plan(version, precision)
    assert (plan.onnx_precision, plan.use_fp16_flag, plan.strongly_typed, plan.allow_tf32) == expected


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "12.0.0", "ten"])
def test_unsupported_tensorrt_version_is_a_clear_error(version):
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        _precision_plan(version, "fp16")


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        _precision_plan("10.7.0", "int8")


def test_tensorrt10_fp16_sets_the_builder_flag_on_the_fp32_graph(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    build(tiny_onnx, EngineCache(tmp_path / "cache"), trt, precision="fp16")
    assert ("IBuilderConfig.set_flag", trt.BuilderFlag.FP16) in trt.calls
    assert ("Builder.create_network", 0) in trt.calls
    assert "IBuilderConfig.clear_flag" not in trt.names()


@pytest.mark.parametrize("version", ["10.7.0.23", "11.2.0"])
def test_fp32_plans_set_no_precision_flag_and_clear_tf32(tiny_onnx, tmp_path, version):
    trt = fake_trt(version)
    build(tiny_onnx, EngineCache(tmp_path / "cache"), trt, precision="fp32")
    assert "IBuilderConfig.set_flag" not in trt.names()
    assert ("IBuilderConfig.clear_flag", trt.BuilderFlag.TF32) in trt.calls


def test_tensorrt11_fp16_builds_strongly_typed_from_the_fp16_graph(tmp_path):
    fp16_graph = write_tiny_graph(tmp_path / "g16" / "model.onnx", dtype=TensorProto.FLOAT16)
    trt = fake_trt("11.2.0")
    assert not hasattr(trt.BuilderFlag, "FP16")  # the fake models its removal
    plan_path = build(fp16_graph, EngineCache(tmp_path / "cache"), trt, precision="fp16")
    assert "IBuilderConfig.set_flag" not in trt.names()
    metadata = read_metadata(plan_path)
    assert metadata.precision_plan.strongly_typed and not metadata.precision_plan.use_fp16_flag
    assert {t.dtype for t in metadata.inputs} == {"float16"}


# --------------------------------------------------------------------------- the builder's call sequence


def test_builder_call_sequence_follows_the_documented_api(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    build(
        tiny_onnx, EngineCache(tmp_path / "cache"), trt, precision="fp16", max_batch=6, opt_batch=2, workspace_mib=512
    )
    names = trt.names()
    order = [
        "Builder",
        "Builder.create_network",
        "OnnxParser.parse_from_file",
        "IBuilderConfig.set_memory_pool_limit",
        "IBuilderConfig.set_flag",
        "IOptimizationProfile.set_shape",
        "IBuilderConfig.add_optimization_profile",
        "IBuilderConfig.create_timing_cache",
        "IBuilderConfig.set_timing_cache",
        "Builder.build_serialized_network",
    ]
    positions = [names.index(n) for n in order]
    assert positions == sorted(positions), names
    assert ("IBuilderConfig.set_memory_pool_limit", trt.MemoryPoolType.WORKSPACE, 512 << 20) in trt.calls
    shapes = {c[1]: c[2:] for c in trt.calls if c[0] == "IOptimizationProfile.set_shape"}
    assert shapes == {
        "keypoints": ((1, 68, 2), (2, 68, 2), (6, 68, 2)),
        "params.gain": ((1, 1, 2), (2, 1, 2), (6, 1, 2)),
    }


def test_timing_cache_is_created_saved_and_reused(tiny_onnx, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    trt = fake_trt("10.7.0.23")
    build(tiny_onnx, cache, trt, max_batch=4)
    assert ("IBuilderConfig.create_timing_cache", b"") in trt.calls
    timing_path = cache.timing_cache_path("10.7.0.23", H100)
    assert timing_path.read_bytes() == b"+entry"
    build(tiny_onnx, cache, trt, max_batch=8)  # another plan, same GPU and TensorRT: the cache is reused
    assert ("IBuilderConfig.create_timing_cache", b"+entry") in trt.calls
    assert timing_path.read_bytes() == b"+entry+entry"
    assert cache.timing_cache_path("10.7.0.23", L4) != timing_path


def test_unreadable_timing_cache_only_costs_time(tiny_onnx, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    timing_path = cache.timing_cache_path("10.7.0.23", H100)
    atomic_write_bytes(timing_path, b"corrupt timing cache")
    trt = fake_trt("10.7.0.23")
    plan_path = build(tiny_onnx, cache, trt)
    assert cache.lookup(_spec_for(tiny_onnx)).state is CacheState.VALID and plan_path.exists()
    assert [c[1] for c in trt.calls if c[0] == "IBuilderConfig.create_timing_cache"] == [b"corrupt timing cache", b""]
    assert timing_path.read_bytes() == b"+entry"  # replaced by a fresh one


def test_failed_build_is_an_engine_error_and_writes_nothing(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    trt.fail_build = True
    cache = EngineCache(tmp_path / "cache")
    with pytest.raises(EngineError, match="failed to build"):
        build(tiny_onnx, cache, trt)
    assert not (cache.root / "plans").exists() or not any((cache.root / "plans").iterdir())


def test_unparsable_onnx_is_an_engine_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    trt = fake_trt("10.7.0.23")
    profile = (ProfileShape("keypoints", (1, 68, 2), (1, 68, 2), (2, 68, 2)),)
    with pytest.raises(EngineError, match="bad.onnx"):
        trt_mod.build_plan(trt, bad, _precision_plan("10.7.0.23", "fp16"), profile)
    assert "Builder.build_serialized_network" not in trt.names()


# --------------------------------------------------------------------------- profile shapes from the graph


def test_profile_shapes_cover_every_dynamic_batch_input(tiny_onnx):
    inputs, outputs = graph_io(tiny_onnx)
    assert [t.name for t in inputs] == ["keypoints", "params.gain", "bias"]
    assert inputs[0].shape == (-1, 68, 2) and inputs[2].shape == (1, 68, 2)
    assert [t.name for t in outputs] == ["delta_uv", "lf"]
    profile = profile_shapes(inputs, max_batch=8, opt_batch=4)
    assert profile == (
        ProfileShape("keypoints", (1, 68, 2), (4, 68, 2), (8, 68, 2)),
        ProfileShape("params.gain", (1, 1, 2), (4, 1, 2), (8, 1, 2)),
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter; onnxscript is not installed
def test_profile_shapes_from_a_torch_exported_graph(tmp_path):
    class PerFrame(torch.nn.Module):
        def forward(self, keypoints, weight):  # weight (3, 136): a static, non-batched input
            return torch.tanh(keypoints.flatten(1) @ weight.T)

    path = tmp_path / "torch.onnx"
    torch.onnx.export(
        PerFrame(),
        (torch.randn(2, 68, 2), torch.randn(3, 136)),
        str(path),
        input_names=["keypoints", "weight"],
        output_names=["out"],
        dynamic_axes={"keypoints": {0: "batch"}, "out": {0: "batch"}},
        dynamo=False,
    )
    inputs, _ = graph_io(path)
    profile = profile_shapes(inputs, max_batch=3)
    assert profile == (ProfileShape("keypoints", (1, 68, 2), (1, 68, 2), (3, 68, 2)),)


def test_dynamic_non_batch_dimension_is_an_error_naming_the_input(tmp_path):
    inputs = (trt_mod.TensorInfo("image", (-1, 3, -1, 256), "float32"),)
    with pytest.raises(EngineError, match="'image'"):
        profile_shapes(inputs, max_batch=4)


@pytest.mark.parametrize("max_batch, opt_batch", [(0, 1), (4, 5), (4, 0), (2.5, 1)])
def test_bad_batch_limits_are_rejected(tiny_onnx, max_batch, opt_batch):
    with pytest.raises(ValueError, match="batch"):
        profile_shapes(graph_io(tiny_onnx)[0], max_batch=max_batch, opt_batch=opt_batch)


# --------------------------------------------------------------------------- cache keys


def _spec(**changes) -> EngineSpec:
    base = dict(onnx_sha256="a" * 64, precision="fp16", max_batch=8, opt_batch=1, trt_version="10.7.0.23", gpu=H100)
    base.update(changes)
    return EngineSpec(**base)


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "b" * 64},
        {"trt_version": "10.8.0.43"},
        {"trt_version": "11.0.0"},
        {"gpu": GpuInfo("NVIDIA H200", (9, 0))},
        {"gpu": GpuInfo(H100.name, (8, 9))},
        {"precision": "fp32"},
        {"max_batch": 4},
        {"opt_batch": 2},
    ],
)
def test_every_part_of_the_spec_changes_the_key(change):
    base = _spec()
    changed = _spec(**change)
    assert changed.key() != base.key()
    assert changed.stem != base.stem
    assert EngineCache("/c").plan_path(changed) != EngineCache("/c").plan_path(base)


def test_key_is_stable_for_equal_specs():
    assert _spec().key() == _spec().key()
    assert len(_spec().key()) == 64


def test_onnx_hash_follows_the_bytes(tmp_path):
    a = write_tiny_graph(tmp_path / "a" / "model.onnx", scale=2.0)
    b = write_tiny_graph(tmp_path / "b" / "model.onnx", scale=3.0)
    a_again = write_tiny_graph(tmp_path / "c" / "model.onnx", scale=2.0)
    assert onnx_sha256(a) == onnx_sha256(a_again) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert onnx_sha256(a) != onnx_sha256(b)


def test_onnx_hash_covers_external_data(tmp_path):
    path = write_tiny_graph(tmp_path / "g" / "model.onnx")
    model = onnx.load(str(path))
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    before = onnx_sha256(path)
    weights = path.parent / "weights.bin"
    weights.write_bytes(np.array([5.0], dtype=np.float32).tobytes())
    assert onnx_sha256(path) != before


def test_changed_graph_builds_a_new_plan(tmp_path):
    cache = EngineCache(tmp_path / "cache")
    trt = fake_trt("10.7.0.23")
    first = build(write_tiny_graph(tmp_path / "a" / "model.onnx", scale=2.0), cache, trt)
    second = build(write_tiny_graph(tmp_path / "b" / "model.onnx", scale=3.0), cache, trt)
    assert first != second and first.exists() and second.exists()
    assert trt.names().count("Builder.build_serialized_network") == 2


# --------------------------------------------------------------------------- invalidation


def test_matching_plan_is_loaded_not_rebuilt(tiny_onnx, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    trt = fake_trt("10.7.0.23")
    first = build(tiny_onnx, cache, trt)
    second = build(tiny_onnx, cache, trt)
    assert first == second
    assert trt.names().count("Builder.build_serialized_network") == 1
    metadata = read_metadata(first)
    assert metadata.spec.gpu == H100 and metadata.spec.trt_version == "10.7.0.23"
    assert metadata.plan_sha256 == hashlib.sha256(first.read_bytes()).hexdigest()


def _rewrite_metadata(plan_path: Path, edit) -> None:
    meta_path = plan_path.with_suffix(".json")
    raw = json.loads(meta_path.read_text())
    edit(raw)
    meta_path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda p: _rewrite_metadata(p, lambda m: m["spec"].update(trt_version="10.6.0.26")), id="other-trt"
        ),
        pytest.param(
            lambda p: _rewrite_metadata(p, lambda m: m["spec"]["gpu"].update(name="NVIDIA L4")), id="other-gpu"
        ),
        pytest.param(
            lambda p: _rewrite_metadata(p, lambda m: m["spec"]["gpu"].update(compute_capability=[8, 0])), id="other-cc"
        ),
        pytest.param(lambda p: _rewrite_metadata(p, lambda m: m.update(schema=0)), id="old-schema"),
        pytest.param(lambda p: _rewrite_metadata(p, lambda m: m.pop("plan_sha256")), id="field-missing"),
        pytest.param(lambda p: p.with_suffix(".json").write_text('{"spec": {"onnx_sha'), id="corrupt-json"),
        pytest.param(lambda p: p.with_suffix(".json").write_bytes(b"\xff\xfe\x00"), id="not-text"),
        pytest.param(lambda p: p.with_suffix(".json").unlink(), id="metadata-missing"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-3]), id="plan-truncated"),
    ],
)
def test_stale_plan_is_rebuilt_never_loaded(tiny_onnx, tmp_path, damage):
    cache = EngineCache(tmp_path / "cache")
    trt = fake_trt("10.7.0.23")
    plan_path = build(tiny_onnx, cache, trt)
    good_plan = plan_path.read_bytes()
    damage(plan_path)
    lookup = cache.lookup(_spec_for(tiny_onnx))
    assert lookup.state is CacheState.STALE and lookup.reason
    rebuilt = build(tiny_onnx, cache, trt)
    assert rebuilt == plan_path
    assert trt.names().count("Builder.build_serialized_network") == 2
    assert rebuilt.read_bytes() == good_plan
    assert cache.lookup(_spec_for(tiny_onnx)).state is CacheState.VALID


def _spec_for(onnx_path, **changes) -> EngineSpec:
    return _spec(onnx_sha256=onnx_sha256(onnx_path), **changes)


def test_missing_plan_is_reported_missing(tiny_onnx, tmp_path):
    lookup = EngineCache(tmp_path).lookup(_spec_for(tiny_onnx))
    assert lookup.state is CacheState.MISSING


def test_force_rebuilds_a_valid_plan(tiny_onnx, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    trt = fake_trt("10.7.0.23")
    build(tiny_onnx, cache, trt)
    build(tiny_onnx, cache, trt, force=True)
    assert trt.names().count("Builder.build_serialized_network") == 2


def test_other_tensorrt_version_builds_its_own_plan(tiny_onnx, tmp_path):
    cache = EngineCache(tmp_path / "cache")
    old = build(tiny_onnx, cache, fake_trt("10.7.0.23"))
    new = build(tiny_onnx, cache, fake_trt("10.8.0.43"))
    assert old != new and read_metadata(new).spec.trt_version == "10.8.0.43"


def test_loading_a_plan_for_another_gpu_names_both(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    plan_path = build(tiny_onnx, EngineCache(tmp_path / "cache"), trt, gpu=H100)
    with pytest.raises(EngineError) as info:
        load_engine(plan_path, "cpu", trt=trt, gpu=L4)
    message = str(info.value)
    assert "NVIDIA H100 80GB HBM3 (sm_90)" in message and "NVIDIA L4 (sm_89)" in message
    assert "Runtime.deserialize_cuda_engine" not in trt.names()


def test_loading_a_plan_for_another_tensorrt_names_both(tiny_onnx, tmp_path):
    plan_path = build(tiny_onnx, EngineCache(tmp_path / "cache"), fake_trt("10.7.0.23"))
    newer = fake_trt("10.8.0.43")
    with pytest.raises(EngineError, match=r"TensorRT 10\.7\.0\.23.*TensorRT 10\.8\.0\.43"):
        load_engine(plan_path, "cpu", trt=newer, gpu=H100)
    assert "Runtime.deserialize_cuda_engine" not in newer.names()


def test_loading_a_plan_without_metadata_is_refused(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    plan_path = build(tiny_onnx, EngineCache(tmp_path / "cache"), trt)
    plan_path.with_suffix(".json").unlink()
    with pytest.raises(EngineError, match="missing"):
        load_engine(plan_path, "cpu", trt=trt, gpu=H100)


def test_loading_a_tampered_plan_is_refused(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    plan_path = build(tiny_onnx, EngineCache(tmp_path / "cache"), trt)
    plan_path.write_bytes(plan_path.read_bytes() + b" ")
    with pytest.raises(EngineError, match="sha256"):
        load_engine(plan_path, "cpu", trt=trt, gpu=H100)


# --------------------------------------------------------------------------- atomic writes


def test_interrupted_store_never_leaves_a_loadable_plan(tiny_onnx, tmp_path, monkeypatch):
    cache = EngineCache(tmp_path / "cache")
    trt = fake_trt("10.7.0.23")
    plan_path = build(tiny_onnx, cache, trt)
    spec = _spec_for(tiny_onnx)
    metadata = read_metadata(plan_path)
    new_plan = b"a different plan"
    new_metadata = trt_mod.dataclasses.replace(metadata, plan_sha256=hashlib.sha256(new_plan).hexdigest())
    real_write = trt_mod.atomic_write_bytes

    def crash_on_metadata(path, data):
        if path.suffix == ".json":
            raise KeyboardInterrupt  # the process dies between the plan and its metadata
        real_write(path, data)

    monkeypatch.setattr(trt_mod, "atomic_write_bytes", crash_on_metadata)
    with pytest.raises(KeyboardInterrupt):
        cache.store(new_metadata, new_plan)
    assert plan_path.read_bytes() == new_plan
    assert cache.lookup(spec).state is CacheState.STALE  # old metadata, new plan bytes: sha mismatch


# --------------------------------------------------------------------------- runtime through the fake engine


def poisoned_outputs(engine, batch: int) -> dict[str, torch.Tensor]:
    """Destination buffers filled with NaN, so a result the engine did not write shows up."""
    return {
        name: torch.full(shape, float("nan"), dtype=getattr(torch, engine.outputs_dtypes[name]))
        for name, shape in engine.output_shapes(batch).items()
    }


def _feeds(batch, dtype=torch.float32):
    return {
        "keypoints": torch.rand(batch, 68, 2, dtype=dtype) * 2 - 1,
        "params.gain": torch.randn(batch, 1, 2, dtype=dtype),
        "bias": torch.randn(1, 68, 2, dtype=dtype),
    }


@pytest.mark.parametrize("version", ["10.7.0.23", "11.2.0"])
def test_engine_runs_with_name_based_io(tiny_onnx, tmp_path, version):
    trt = fake_trt(version)
    plan_path = build(tiny_onnx, EngineCache(tmp_path / "cache"), trt, max_batch=5, precision="fp32")
    engine = load_engine(plan_path, "cpu", trt=trt, gpu=H100)
    assert [t.name for t in engine.inputs] == ["keypoints", "params.gain", "bias"]
    assert [t.name for t in engine.outputs] == ["delta_uv", "lf"]
    buffers = poisoned_outputs(engine, 5)  # allocated once at the largest batch, as the backend does
    for batch in (1, 3, 5):
        feeds = _feeds(batch)
        out = engine.run(feeds, buffers, stream_handle=1234)
        assert all(out[name].data_ptr() == buffers[name].data_ptr() for name in out)  # written in place
        kp, gain, bias = feeds["keypoints"], feeds["params.gain"], feeds["bias"]
        torch.testing.assert_close(out["delta_uv"], kp * gain * 2.0 + bias, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["lf"], kp + gain, rtol=1e-6, atol=1e-6)
    assert ("IExecutionContext.execute_async_v3", 1234) in trt.calls
    assert ("IExecutionContext.set_input_shape", "keypoints", (3, 68, 2)) in trt.calls


def test_engine_casts_inputs_to_the_engine_dtype(tmp_path):
    fp16_graph = write_tiny_graph(tmp_path / "g16" / "model.onnx", dtype=TensorProto.FLOAT16)
    trt = fake_trt("11.2.0")
    engine = load_engine(build(fp16_graph, EngineCache(tmp_path / "c"), trt), "cpu", trt=trt, gpu=H100)
    feeds = _feeds(2)  # float32 in, the fp16 engine gets half
    out = engine.run(feeds, poisoned_outputs(engine, 2), stream_handle=0)
    assert out["lf"].dtype == torch.float16
    torch.testing.assert_close(out["lf"].float(), feeds["keypoints"] + feeds["params.gain"], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.pop("bias"), "missing \\['bias'\\]"),
        (lambda f: f.update(extra=torch.zeros(1)), "unknown \\['extra'\\]"),
        (lambda f: f.update(keypoints=torch.zeros(2, 67, 2)), "'keypoints' has shape"),
        (lambda f: f.update({"params.gain": torch.zeros(3, 1, 2)}), "batch 3 but another input has batch 2"),
        (lambda f: f.update(keypoints=torch.zeros(2, 68, 2, 1)), "'keypoints' has shape"),
    ],
)
def test_engine_rejects_bad_feeds_naming_the_input(tiny_onnx, tmp_path, mutate, message):
    trt = fake_trt("10.7.0.23")
    engine = load_engine(build(tiny_onnx, EngineCache(tmp_path / "c"), trt, max_batch=4), "cpu", trt=trt, gpu=H100)
    feeds = _feeds(2)
    mutate(feeds)
    with pytest.raises(ValueError, match=message):
        engine.run(feeds, poisoned_outputs(engine, 4), stream_handle=0)
    assert "IExecutionContext.execute_async_v3" not in trt.names()


def test_batch_beyond_the_profile_runs_in_chunks_into_consecutive_rows(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    engine = load_engine(build(tiny_onnx, EngineCache(tmp_path / "c"), trt, max_batch=4), "cpu", trt=trt, gpu=H100)
    assert engine.feed_batch(_feeds(11)) == 11
    feeds = _feeds(11)
    out = engine.run(feeds, poisoned_outputs(engine, 12), stream_handle=7)  # room for 12, 11 used
    assert out["lf"].shape == (11, 68, 2)
    torch.testing.assert_close(out["lf"], feeds["keypoints"] + feeds["params.gain"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        out["delta_uv"], feeds["keypoints"] * feeds["params.gain"] * 2.0 + feeds["bias"], rtol=1e-6, atol=1e-6
    )
    shapes = [c[2] for c in trt.calls if c[0] == "IExecutionContext.set_input_shape" and c[1] == "keypoints"]
    assert shapes == [(4, 68, 2), (4, 68, 2), (3, 68, 2)]
    assert trt.names().count("IExecutionContext.execute_async_v3") == 3


def test_output_buffers_too_small_for_the_batch_are_refused(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    engine = load_engine(build(tiny_onnx, EngineCache(tmp_path / "c"), trt, max_batch=4), "cpu", trt=trt, gpu=H100)
    with pytest.raises(ValueError, match="needs >= \\(6, 68, 2\\)"):
        engine.run(_feeds(6), poisoned_outputs(engine, 4), stream_handle=0)
    assert "IExecutionContext.execute_async_v3" not in trt.names()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.pop("lf"), "output buffers are named"),
        (lambda b: b.update(lf=torch.zeros(4, 68, 2, dtype=torch.float64)), "'lf'"),
        (lambda b: b.update(lf=torch.zeros(1, 68, 2)), "'lf'"),  # smaller than the batch
        (lambda b: b.update(lf=torch.zeros(4, 2, 68).transpose(1, 2)), "'lf'"),  # not contiguous
    ],
)
def test_engine_rejects_bad_output_buffers(tiny_onnx, tmp_path, mutate, message):
    trt = fake_trt("10.7.0.23")
    engine = load_engine(build(tiny_onnx, EngineCache(tmp_path / "c"), trt, max_batch=4), "cpu", trt=trt, gpu=H100)
    buffers = poisoned_outputs(engine, 4)
    mutate(buffers)
    with pytest.raises(ValueError, match=message):
        engine.run(_feeds(2), buffers, stream_handle=0)
    assert "IExecutionContext.execute_async_v3" not in trt.names()


# --------------------------------------------------------------------------- build_engine and the CLI


@pytest.fixture()
def fake_export(monkeypatch):
    """pybilayer.export.export_onnx stand-in that writes the tiny graph in the precision asked for."""
    requests: list[str] = []

    def export_onnx(model, path, precision="fp32"):
        requests.append(precision)
        dtype = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        write_tiny_graph(Path(path), dtype=dtype)

    module = types.ModuleType("pybilayer.export")
    module.export_onnx = export_onnx
    monkeypatch.setitem(sys.modules, "pybilayer.export", module)
    monkeypatch.setattr(trt_mod, "detect_gpu", lambda device_index=None: H100)
    return requests


@pytest.mark.parametrize("version, graph_precision", [("10.7.0.23", "fp32"), ("11.2.0", "fp16")])
def test_build_engine_exports_the_graph_each_version_needs(
    tmp_path, monkeypatch, fake_export, version, graph_precision
):
    trt = fake_trt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    plan_path = trt_mod.build_engine(object(), precision="fp16", max_batch=3, cache_dir=tmp_path / "cache")
    assert fake_export == [graph_precision]
    assert plan_path.parent == tmp_path / "cache" / "plans"
    metadata = read_metadata(plan_path)
    onnx_files = list((tmp_path / "cache" / "onnx").glob("*/model.onnx"))
    assert len(onnx_files) == 1 and onnx_sha256(onnx_files[0]) == metadata.spec.onnx_sha256
    assert metadata.spec.max_batch == 3 and metadata.spec.precision == "fp16"
    # Second call: same graph bytes -> same key -> loaded, and no leftover export folders.
    assert trt_mod.build_engine(object(), precision="fp16", max_batch=3, cache_dir=tmp_path / "cache") == plan_path
    assert trt.names().count("Builder.build_serialized_network") == 1
    assert [p.name for p in (tmp_path / "cache" / "onnx").iterdir()] == [onnx_files[0].parent.name]


def test_build_engine_with_the_real_export_matches_the_torch_network(tmp_path, monkeypatch):
    """Checkpoint -> pybilayer.export -> plan (fake TensorRT) -> run, against the torch per-frame network.

    fp32 plans, so the fake engine (onnxruntime on the exported graph) must match torch to the ONNX
    tolerance; the batch of 6 exceeds the plan's max of 4 and runs as two chunks.
    """
    from pybilayer.models import Bilayer, BilayerConfig

    trt = fake_trt("10.7.0.23")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_mod, "detect_gpu", lambda device_index=None: H100)
    model = Bilayer(BilayerConfig.tiny()).eval()
    plan_path = trt_mod.build_engine(model, precision="fp32", max_batch=4, cache_dir=tmp_path / "cache")
    engine = load_engine(plan_path, "cpu", trt=trt, gpu=H100)

    size = model.config.image_size
    with torch.no_grad():
        avatar = model.create_avatar(torch.rand(1, 3, size, size) * 2 - 1, torch.rand(1, 68, 2) * 1.6 - 0.8)
        keypoints = torch.rand(6, 68, 2) * 1.6 - 0.8
        expected = model.inference_generator.generate(
            model.keypoints_embedder(keypoints), avatar.params.repeat_frames(6)
        )
    params = {name: value.expand(6, *value.shape[1:]).contiguous() for name, value in avatar.params.flatten().items()}
    assert {t.name for t in engine.inputs} == {"keypoints", *params}
    out = engine.run({"keypoints": keypoints, **params}, poisoned_outputs(engine, 8), stream_handle=0)
    rtol, atol = TOLERANCES["onnx_fp32"]
    for name, reference in zip(("delta_uv", "lf", "mask_logits"), expected):
        torch.testing.assert_close(out[name], reference, rtol=rtol, atol=atol)
    metadata = read_metadata(plan_path)
    assert {p.name for p in metadata.profile} == {t.name for t in engine.inputs}  # every input is batched


def test_tensorrt11_fp16_plan_is_built_from_the_fp16_export(tmp_path, monkeypatch):
    from pybilayer.models import Bilayer, BilayerConfig

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("11.2.0"))
    monkeypatch.setattr(trt_mod, "detect_gpu", lambda device_index=None: H100)
    plan_path = trt_mod.build_engine(
        Bilayer(BilayerConfig.tiny()).eval(), precision="fp16", max_batch=2, cache_dir=tmp_path / "cache"
    )
    sha = read_metadata(plan_path).spec.onnx_sha256
    graph = onnx.load(str(tmp_path / "cache" / "onnx" / sha[:24] / "model.onnx"))
    weight_types = {t.data_type for t in graph.graph.initializer if len(t.dims) == 4}  # conv weights
    assert weight_types == {TensorProto.FLOAT16}


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYBILAYER_ENGINE_DIR", str(tmp_path / "engines"))
    assert EngineCache().root == tmp_path / "engines"
    monkeypatch.delenv("PYBILAYER_ENGINE_DIR")
    checkout = Path(trt_mod.__file__).resolve().parent.parent
    assert EngineCache().root == checkout / "engines" / "cache"  # a source checkout has engines/
    assert EngineCache(tmp_path / "x").root == tmp_path / "x"


def test_without_tensorrt_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(BackendUnavailableError) as info:
        trt_mod.build_engine(tmp_path / "model.safetensors", cache_dir=tmp_path)
    message = str(info.value)
    assert "pip install" in message and "tensorrt-cu12" in message and "tensorrt-cu13" in message
    assert "10 or 11" in message
    assert not (tmp_path / "onnx").exists()  # failed before exporting anything
    assert trt_mod.tensorrt_unavailable_reason() == message


def test_unavailable_reason_names_the_missing_gpu_then_the_native_core(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("10.7.0.23"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs an NVIDIA GPU" in trt_mod.tensorrt_unavailable_reason()
    monkeypatch.setattr(trt_mod, "detect_gpu", lambda device_index=None: H100)
    from pybilayer import native

    caps = native.Capabilities(native=True, native_reason=None, cuda=False, cuda_reason="built without CUDA")
    monkeypatch.setattr(native, "capabilities", lambda: caps)
    assert (
        trt_mod.tensorrt_unavailable_reason()
        == "the TensorRT backend needs the CUDA twin of pybilayer._C: built without CUDA"
    )


def test_unsupported_installed_tensorrt_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt("8.6.1"))
    with pytest.raises(BackendUnavailableError, match="TensorRT 8.6.1 is not supported"):
        trt_mod.import_tensorrt()


def _load_build_script():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "engines" / "build.py"
    spec = importlib.util.spec_from_file_location("engines_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_script_passes_its_arguments_through(monkeypatch, tmp_path, capsys):
    script = _load_build_script()
    seen = {}

    def fake_build_engine(checkpoint, **kwargs):
        seen.update(checkpoint=checkpoint, **kwargs)
        return tmp_path / "x.plan"

    monkeypatch.setattr(script, "build_engine", fake_build_engine)
    argv = ["--checkpoint", "m.safetensors", "--precision", "fp32", "--max-batch", "4", "--cache-dir", str(tmp_path)]
    assert script.main(argv) == 0
    assert seen == {
        "checkpoint": Path("m.safetensors"),
        "precision": "fp32",
        "max_batch": 4,
        "cache_dir": tmp_path,
        "opt_batch": 1,
        "workspace_mib": trt_mod.DEFAULT_WORKSPACE_MIB,
        "force": False,
    }
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.plan")


def test_build_script_reports_errors_without_a_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    script = _load_build_script()
    assert script.main(["--checkpoint", str(tmp_path / "m.safetensors")]) == 2
    assert "pip install" in capsys.readouterr().err


# --------------------------------------------------------------------------- the backend class


class HostBuffer:
    """CPU stand-in for native.DeviceBuffer: owns its memory, exposes it through an array interface."""

    def __init__(self, shape, dtype):
        self.array = np.full(shape, np.nan, dtype=dtype)

    @property
    def __array_interface__(self):
        return self.array.__array_interface__


def host_pool(engine):
    from pybilayer.backends.tensorrt import OutputPool

    return OutputPool(
        engine.output_shapes,
        engine.outputs_dtypes,
        rows_step=engine.max_batch,
        allocate=HostBuffer,
        as_tensor=lambda buffer: torch.from_numpy(np.asarray(buffer)),  # keeps `buffer` referenced, like CUDA
    )


def test_output_pool_reuses_buffers_nobody_holds(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    engine = load_engine(build(tiny_onnx, EngineCache(tmp_path / "c"), trt, max_batch=4), "cpu", trt=trt, gpu=H100)
    pool = host_pool(engine)
    first = engine.run(_feeds(3), pool.views(3), stream_handle=0)
    address = first["lf"].data_ptr()
    del first  # consumed
    feeds = _feeds(4)
    second = engine.run(feeds, pool.views(4), stream_handle=0)
    assert second["lf"].data_ptr() == address and pool.allocations == 1
    torch.testing.assert_close(second["lf"], feeds["keypoints"] + feeds["params.gain"], rtol=1e-6, atol=1e-6)


def test_output_pool_never_overwrites_outputs_still_held(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    engine = load_engine(build(tiny_onnx, EngineCache(tmp_path / "c"), trt, max_batch=4), "cpu", trt=trt, gpu=H100)
    pool = host_pool(engine)
    feeds_a, feeds_b = _feeds(4), _feeds(4)
    kept_slice = engine.run(feeds_a, pool.views(4), stream_handle=0)["lf"][1:3]  # only a slice survives
    second = engine.run(feeds_b, pool.views(4), stream_handle=0)
    assert pool.allocations == 2 and second["lf"].data_ptr() != kept_slice.data_ptr()
    torch.testing.assert_close(kept_slice, (feeds_a["keypoints"] + feeds_a["params.gain"])[1:3], rtol=1e-6, atol=1e-6)
    del second, kept_slice
    engine.run(_feeds(2), pool.views(2), stream_handle=0)
    assert pool.allocations == 2  # the newest set is free again


def test_output_pool_grows_in_steps_of_the_max_batch(tiny_onnx, tmp_path):
    trt = fake_trt("10.7.0.23")
    engine = load_engine(build(tiny_onnx, EngineCache(tmp_path / "c"), trt, max_batch=4), "cpu", trt=trt, gpu=H100)
    pool = host_pool(engine)
    assert pool.views(1)["lf"].shape == (4, 68, 2)
    assert pool.views(9)["delta_uv"].shape == (12, 68, 2) and pool.rows == 12
    assert pool.views(5)["lf"].shape == (12, 68, 2) and pool.allocations == 2


def test_backend_needs_exactly_one_of_model_and_plan():
    from pybilayer.backends.tensorrt import TensorRTBackend

    with pytest.raises(ValueError, match="exactly one"):
        TensorRTBackend()
    with pytest.raises(ValueError, match="exactly one"):
        TensorRTBackend(object(), plan="x.plan")


def test_backend_refuses_a_cpu_device(tmp_path):
    from pybilayer.backends.tensorrt import TensorRTBackend

    with pytest.raises(BackendUnavailableError, match="CUDA device"):
        TensorRTBackend(plan=tmp_path / "x.plan", device="cpu")


# --------------------------------------------------------------------------- the real thing (GPU machines)


@pytest.mark.needs_tensorrt
def test_real_tensorrt_plan_matches_onnxruntime(tiny_onnx, tmp_path):
    import onnxruntime

    plan_path = build_plan_from_onnx(tiny_onnx, precision="fp32", max_batch=4, cache=EngineCache(tmp_path / "c"))
    engine = load_engine(plan_path, "cuda")
    feeds = _feeds(3)
    stream = torch.cuda.current_stream()
    buffers = {name: torch.full(shape, float("nan"), device="cuda") for name, shape in engine.output_shapes(3).items()}
    out = engine.run({k: v.cuda() for k, v in feeds.items()}, buffers, stream.cuda_stream)
    stream.synchronize()
    session = onnxruntime.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    expected = session.run(["delta_uv", "lf"], {k: v.numpy() for k, v in feeds.items()})
    for name, value in zip(["delta_uv", "lf"], expected):
        torch.testing.assert_close(out[name].cpu(), torch.from_numpy(value), rtol=1e-5, atol=1e-5)
    # A second lookup loads the plan instead of building it again.
    again = build_plan_from_onnx(tiny_onnx, precision="fp32", max_batch=4, cache=EngineCache(tmp_path / "c"))
    assert again == plan_path


@pytest.mark.needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_tensorrt_backend_matches_the_torch_network(tmp_path, precision):
    from pybilayer.backends.tensorrt import TensorRTBackend
    from pybilayer.export import psnr
    from pybilayer.models import Bilayer, BilayerConfig

    model = Bilayer(BilayerConfig.tiny()).eval()
    backend = TensorRTBackend(model, precision=precision, max_batch=4, cache_dir=tmp_path / "cache")
    size = model.config.image_size
    with torch.no_grad():
        avatar = model.create_avatar(torch.rand(1, 3, size, size) * 2 - 1, torch.rand(1, 68, 2) * 1.6 - 0.8)
        keypoints = torch.rand(6, 68, 2) * 1.6 - 0.8  # 6 > max_batch: two chunks
        expected = model.inference_generator.generate(
            model.keypoints_embedder(keypoints), avatar.params.repeat_frames(6)
        )
    feeds = {"keypoints": keypoints.cuda()}
    feeds.update({k: v.expand(6, *v.shape[1:]).contiguous().cuda() for k, v in avatar.params.flatten().items()})
    first = backend.run(feeds)  # sizes the native buffers for 6 rows
    addresses = {name: view.data_ptr() for name, view in first.items()}
    for name in list(first):
        first[name].fill_(float("nan"))  # poison them, then let go of them
    del first
    out = backend.run(feeds)
    assert {name: view.data_ptr() for name, view in out.items()} == addresses  # the poisoned set, reused
    held = backend.run(feeds)  # `out` is still held, so this run must get other buffers
    assert all(held[name].data_ptr() != out[name].data_ptr() for name in out)
    torch.cuda.current_stream().synchronize()
    for name, reference in zip(("delta_uv", "lf", "mask_logits"), expected):
        result = out[name].cpu()
        assert result.shape == reference.shape and torch.isfinite(result).all(), name
        if precision == "fp32":
            rtol, atol = TOLERANCES["tensorrt_fp32"]
            torch.testing.assert_close(result, reference, rtol=rtol, atol=atol)
        elif name != "mask_logits":  # bounded outputs: the fp16 gate, PSNR >= 40 dB
            assert psnr(result.numpy(), reference.numpy()).min() >= 40.0, name
    again = TensorRTBackend(model, precision=precision, max_batch=4, cache_dir=tmp_path / "cache")
    assert again.plan_path == backend.plan_path  # the valid cached plan is loaded, not rebuilt
