"""``backend="tensorrt"`` against fake ``tensorrt`` / ``torch_tensorrt`` / ``onnxruntime`` modules (CPU only).

No TensorRT is installed anywhere this project runs, so the fakes below stand in for it and enforce the documented
contracts ralu_runtime/compile/tensorrt.py relies on:

* TensorRT 8.x: the ONNX parser needs a network created with ``1 << EXPLICIT_BATCH``; no bfloat16.
* TensorRT 10.x: EXPLICIT_BATCH is deprecated (the fake rejects it), STRONGLY_TYPED exists, and a strongly typed
  network must not be given FP16/BF16 builder flags. TensorRT 11: no EXPLICIT_BATCH, no FP16/BF16 builder flags.
* An engine is unusable once the Runtime that deserialized it is gone (the Runtime must outlive its engines).
* Execution: tensor-name I/O; ``set_input_shape`` is needed before ``execute_async_v3`` when an input has dynamic
  dims; the engine reads/writes the dtypes *it* declares at the addresses it was given (the fake really does, in
  host memory, so CPU tensors stand in for device buffers); it runs on the stream handle it is given.
* torch_tensorrt >= 2.10 defaults to ``use_explicit_typing=True`` and then raises an AssertionError for
  ``enabled_precisions`` other than float32; older releases are weakly typed and drop unknown settings.
"""
from __future__ import annotations

import builtins
import ctypes
import gc
import importlib.metadata
import math
import sys
import types
import weakref

import pytest
import torch

from ralu_runtime.compile import tensorrt as rtrt

STREAM_HANDLE = 0x5EED


# ---------------------------------------------------------------------------------------------------- fake tensorrt
class _Member:
    """An enum member of the fake bindings (hashable, compared by identity like pybind11 enums)."""

    def __init__(self, owner: str, name: str, value: int):
        self.owner, self.name, self.value = owner, name, value

    def __int__(self):
        return self.value

    def __repr__(self):
        return f"{self.owner}.{self.name}"


def _enum(owner: str, **members: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: _Member(owner, k, v) for k, v in members.items()})


def _host_read(ptr: int, shape, dtype: torch.dtype) -> torch.Tensor:
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = bytearray((ctypes.c_char * nbytes).from_address(ptr))
    return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()


def _host_write(ptr: int, t: torch.Tensor) -> None:
    t = t.contiguous()
    ctypes.memmove(ptr, t.data_ptr(), t.numel() * t.element_size())


class Graph:
    """What the fake parser "finds" in the ONNX file: named, typed inputs/outputs (-1: a dynamic dim) and the
    computation, as a function of a dict of input tensors."""

    def __init__(self, inputs: dict, outputs: dict, fn, out_shape=None):
        self.inputs, self.outputs, self.fn = inputs, outputs, fn
        self.out_shape = out_shape  # input shapes -> output shape, for dynamic graphs


def make_trt(version: str, graph: Graph, *, fail_strongly_typed: bool = False) -> types.ModuleType:
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []  # (what, detail), in order
    trt.runtimes = []  # weakrefs to every Runtime made
    trt.contexts = []

    dtypes = dict(FLOAT=0, HALF=1, INT8=2, INT32=3, BOOL=4, UINT8=5)
    if major >= 9:
        dtypes["BF16"] = 7
    if major >= 10:
        dtypes["INT64"] = 8
    trt.DataType = _enum("DataType", **dtypes)
    to_torch = {"FLOAT": torch.float32, "HALF": torch.float16, "INT8": torch.int8, "INT32": torch.int32,
                "BOOL": torch.bool, "UINT8": torch.uint8, "BF16": torch.bfloat16, "INT64": torch.int64}
    torch_of = {getattr(trt.DataType, k): to_torch[k] for k in dtypes}
    trt.TensorIOMode = _enum("TensorIOMode", NONE=0, INPUT=1, OUTPUT=2)
    trt.MemoryPoolType = _enum("MemoryPoolType", WORKSPACE=0)
    if major < 10:
        creation = dict(EXPLICIT_BATCH=0, EXPLICIT_PRECISION=1)
        if major >= 9:
            creation["STRONGLY_TYPED"] = 2
    elif major == 10:
        creation = dict(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    else:
        creation = dict(STRONGLY_TYPED=0)  # retained, ignored: TensorRT 11 is always strongly typed
    trt.NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", **creation)
    builder_flags = dict(TF32=6, REFIT=4)
    if major <= 10:
        builder_flags.update(FP16=0, INT8=1)
        if major >= 9:
            builder_flags["BF16"] = 17
    trt.BuilderFlag = _enum("BuilderFlag", **builder_flags)
    precision_flags = {getattr(trt.BuilderFlag, k) for k in ("FP16", "BF16", "INT8") if k in builder_flags}

    def flag_set(flags: int, name: str) -> bool:
        member = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        return member is not None and bool(flags & (1 << int(member)))

    class Logger:
        WARNING = _Member("Severity", "WARNING", 2)
        Severity = types.SimpleNamespace(WARNING=WARNING)

        def __init__(self, severity=None):
            self.severity = severity

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.strongly_typed = major >= 11 or flag_set(flags, "STRONGLY_TYPED")
            self.parsed = None

    class Config:
        def __init__(self):
            self.flags, self.pools = set(), {}

        def set_flag(self, flag):
            self.flags.add(flag)
            trt.calls.append(("set_flag", flag))

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size
            trt.calls.append(("set_memory_pool_limit", (pool, size)))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            trt.calls.append(("create_network", flags))
            if major >= 10 and flag_set(flags, "EXPLICIT_BATCH"):
                raise TypeError("fake TensorRT 10: EXPLICIT_BATCH is deprecated; networks are always explicit batch")
            known = sum(1 << int(m) for m in vars(trt.NetworkDefinitionCreationFlag).values())
            if flags & ~known:
                raise TypeError(f"fake TensorRT {version}: unknown network creation flags {flags:#x}")
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            trt.calls.append(("build", (network.flags, frozenset(config.flags))))
            if network.parsed is None:
                return None
            if network.strongly_typed and config.flags & precision_flags:
                return None  # "precision flags are not allowed with a strongly typed network"
            if network.strongly_typed and fail_strongly_typed:
                return None
            return types.SimpleNamespace(graph=network.parsed, nbytes=1)

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            trt.calls.append(("parse", path))
            if major < 10 and not flag_set(self.network.flags, "EXPLICIT_BATCH"):
                self.errors.append("ModelImporter: network must have an explicit batch dimension (create it with "
                                   "1 << NetworkDefinitionCreationFlag.EXPLICIT_BATCH)")
                return False
            self.network.parsed = graph
            return True

    class Runtime:
        def __init__(self, logger):
            self.logger = logger
            trt.runtimes.append(weakref.ref(self))

        def deserialize_cuda_engine(self, serialized):
            return Engine(weakref.ref(self), serialized.graph)

    class Engine:
        def __init__(self, runtime_ref, g: Graph):
            self._runtime, self.graph = runtime_ref, g
            self.names = list(g.inputs) + list(g.outputs)

        def _alive(self):
            if self._runtime() is None:
                raise RuntimeError("fake TensorRT: the Runtime that deserialized this engine was destroyed")

        @property
        def num_io_tensors(self):
            self._alive()
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.graph.inputs else trt.TensorIOMode.OUTPUT

        def _spec(self, name):
            return self.graph.inputs.get(name) or self.graph.outputs[name]

        def get_tensor_dtype(self, name):
            return getattr(trt.DataType, self._spec(name)[0])

        def get_tensor_shape(self, name):
            return tuple(self._spec(name)[1])

        def create_execution_context(self):
            self._alive()
            ctx = Context(self)
            trt.contexts.append(ctx)
            return ctx

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.streams = engine, {}, {}, []

        def set_input_shape(self, name, shape):
            self.engine._alive()
            trt.calls.append(("set_input_shape", (name, tuple(shape))))
            want = self.engine.get_tensor_shape(name)
            if len(want) != len(shape) or any(w not in (-1, s) for w, s in zip(want, shape)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def _input_shape(self, name):
            static = self.engine.get_tensor_shape(name)
            return self.shapes.get(name, static)

        def get_tensor_shape(self, name):
            g = self.engine.graph
            if name in g.inputs:
                return self._input_shape(name)
            static = self.engine.get_tensor_shape(name)
            if -1 not in static:
                return static
            ins = {n: self._input_shape(n) for n in g.inputs}
            if any(-1 in s for s in ins.values()):
                return static  # unknown until every dynamic input has its shape
            return tuple(g.out_shape(ins))

        def execute_async_v3(self, stream_handle):
            self.engine._alive()
            self.streams.append(stream_handle)
            g = self.engine.graph
            ins = {}
            for name, (dt, _shape) in g.inputs.items():
                shape = self._input_shape(name)
                if -1 in shape or name not in self.addresses:
                    return False  # "not all input shapes / addresses are specified"
                ins[name] = _host_read(self.addresses[name], shape, torch_of[getattr(trt.DataType, dt)])
            (out_name, (out_dt, _)), = g.outputs.items()
            if out_name not in self.addresses:
                return False
            out = g.fn(ins).to(torch_of[getattr(trt.DataType, out_dt)])
            assert tuple(out.shape) == tuple(self.get_tensor_shape(out_name))
            _host_write(self.addresses[out_name], out)
            return True

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    return trt


def _velocity(ins):
    """The fake stage graph: velocity = 2 * hidden + timestep + sum of the token positions."""
    h = ins["hidden"].float()
    return 2 * h + ins["timestep"].float() + ins["positions"].float().sum(-1, keepdim=True)


def make_graph(hidden="BF16", positions="INT64", out="BF16", dynamic=False) -> Graph:
    tokens = -1 if dynamic else 4
    return Graph(inputs={"hidden": (hidden, (1, tokens, 3)), "timestep": ("FLOAT", (1,)),
                         "positions": (positions, (1, tokens, 2))},
                 outputs={"velocity": (out, (1, tokens, 3))}, fn=_velocity,
                 out_shape=lambda ins: ins["hidden"])


def stage_inputs(dtype=torch.bfloat16, tokens=4):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, 3, generator=g).to(dtype)
    timestep = torch.tensor([0.25])
    positions = torch.randint(0, 5, (1, tokens, 2), generator=g)  # int64, as the model makes them
    mask = torch.ones(1, tokens, dtype=torch.bool)  # a stage input the exported graph does not use
    names = ["hidden", "mask", "timestep", "positions"]
    return [hidden, mask, timestep, positions], names


class _Stream:
    cuda_stream = STREAM_HANDLE

    def synchronize(self):
        raise AssertionError("TrtEngine must not synchronize the stream")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch's current CUDA stream, faked for CPU tensors; synchronizing fails the test."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())

    def no_sync(*_a, **_k):
        raise AssertionError("TrtEngine must not synchronize the device")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "velocity.onnx"
    path.write_bytes(b"fake onnx")
    return path


def install(monkeypatch, **modules):
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)


# --------------------------------------------------------------------------------------------- TrtEngine: building
@pytest.mark.parametrize("version, dtype, strong, explicit_batch, precision", [
    ("8.6.1", torch.float16, False, True, "FP16"),
    ("9.3.0", torch.bfloat16, False, True, "BF16"),
    ("10.13.3.9", torch.bfloat16, True, False, None),
    ("10.0.1", torch.float16, True, False, None),
    ("11.0.0", torch.float16, True, False, None),
    ("11.0.0", torch.bfloat16, True, False, None),
])
def test_network_flags_follow_the_installed_tensorrt(monkeypatch, onnx_file, version, dtype, strong,
                                                     explicit_batch, precision):
    """8.x/9.x: EXPLICIT_BATCH and weak typing with the precision flag; 10+: strongly typed, no precision flags,
    no EXPLICIT_BATCH (the fake 10 rejects it, the fake 11 has no such flag or FP16/BF16 builder flags)."""
    trt = make_trt(version, make_graph(hidden="HALF" if dtype == torch.float16 else "BF16",
                                       out="HALF" if dtype == torch.float16 else "BF16",
                                       positions="INT32" if version.startswith("8") else "INT64"))
    install(monkeypatch, tensorrt=trt)
    eng = rtrt.TrtEngine(onnx_file, dtype)
    [flags] = [d for what, d in trt.calls if what == "create_network"]
    creation = trt.NetworkDefinitionCreationFlag
    if explicit_batch:
        assert flags & (1 << int(creation.EXPLICIT_BATCH))
    if hasattr(creation, "STRONGLY_TYPED"):
        assert bool(flags & (1 << int(creation.STRONGLY_TYPED))) == strong
    [(_, config_flags)] = [d for what, d in trt.calls if what == "build"]
    assert {f.name for f in config_flags} == ({precision} if precision else set())
    assert eng.inputs == ["hidden", "timestep", "positions"] and eng.output == "velocity"


def test_tensorrt8_onnx_parsing_needs_explicit_batch(monkeypatch, onnx_file):
    trt = make_trt("8.6.1", make_graph(hidden="HALF", out="HALF", positions="INT32"))
    install(monkeypatch, tensorrt=trt)
    rtrt.TrtEngine(onnx_file, torch.float16)  # parses: the fake 8.x refuses a network without EXPLICIT_BATCH
    assert ("parse", str(onnx_file)) in trt.calls


def test_tensorrt8_has_no_bfloat16_and_says_so(monkeypatch, onnx_file):
    install(monkeypatch, tensorrt=make_trt("8.6.1", make_graph()))
    with pytest.raises(RuntimeError, match=r"tensorrt 8\.6\.1 has no bfloat16.*TensorRT >= 9"):
        rtrt.TrtEngine(onnx_file, torch.bfloat16)


def test_tensorrt_older_than_8_5_is_refused_with_its_version(monkeypatch, onnx_file):
    install(monkeypatch, tensorrt=make_trt("8.4.3", make_graph(hidden="HALF", out="HALF")))
    with pytest.raises(RuntimeError, match=r"TensorRT >= 8\.5.*tensorrt 8\.4\.3 is installed"):
        rtrt.TrtEngine(onnx_file, torch.float16)


def test_strongly_typed_build_failure_falls_back_to_weak_typing_on_tensorrt10(monkeypatch, onnx_file, fake_cuda):
    trt = make_trt("10.13.3.9", make_graph(), fail_strongly_typed=True)
    install(monkeypatch, tensorrt=trt)
    with pytest.warns(RuntimeWarning, match=r"tensorrt 10\.13\.3.*BF16"):
        eng = rtrt.TrtEngine(onnx_file, torch.bfloat16)
    builds = [d for what, d in trt.calls if what == "build"]
    assert [(flags, {f.name for f in fl}) for flags, fl in builds] == [(1 << 1, set()), (0, {"BF16"})]
    tensors, names = stage_inputs()
    out = eng(tensors, names, torch.empty(1, 4, 3, dtype=torch.bfloat16))
    torch.testing.assert_close(out, _velocity(dict(zip(names, tensors))).to(torch.bfloat16))


def test_build_failure_and_parse_failure_name_the_version(monkeypatch, onnx_file):
    install(monkeypatch, tensorrt=make_trt("11.0.0", make_graph(), fail_strongly_typed=True))
    with pytest.raises(RuntimeError, match=r"tensorrt 11\.0\.0 failed to build an engine"):
        rtrt.TrtEngine(onnx_file, torch.bfloat16)  # TensorRT 11: nothing to fall back to


def test_workspace_limit_uses_the_memory_pool_api(monkeypatch, onnx_file):
    trt = make_trt("10.13.3.9", make_graph())
    install(monkeypatch, tensorrt=trt)
    rtrt.TrtEngine(onnx_file, torch.bfloat16, workspace_bytes=1 << 30)
    assert ("set_memory_pool_limit", (trt.MemoryPoolType.WORKSPACE, 1 << 30)) in trt.calls
    trt.calls.clear()
    rtrt.TrtEngine(onnx_file, torch.bfloat16)  # default: TensorRT's own limit
    assert not [c for c in trt.calls if c[0] == "set_memory_pool_limit"]


def test_runtime_outlives_the_engine(monkeypatch, onnx_file, fake_cuda):
    """The fake engine dies with its Runtime, as a real one must not outlive it: TrtEngine keeps the Runtime (and
    the logger it was made with)."""
    trt = make_trt("10.13.3.9", make_graph())
    install(monkeypatch, tensorrt=trt)
    eng = rtrt.TrtEngine(onnx_file, torch.bfloat16)
    gc.collect()
    [runtime] = [r() for r in trt.runtimes]
    assert runtime is not None and eng.runtime is runtime and runtime.logger is eng.logger
    tensors, names = stage_inputs()
    out = eng(tensors, names, torch.empty(1, 4, 3, dtype=torch.bfloat16))  # the engine is still usable
    torch.testing.assert_close(out, _velocity(dict(zip(names, tensors))).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- TrtEngine: calling
def test_call_runs_on_torchs_current_stream_without_synchronizing(monkeypatch, onnx_file, fake_cuda):
    trt = make_trt("10.13.3.9", make_graph())
    install(monkeypatch, tensorrt=trt)
    eng = rtrt.TrtEngine(onnx_file, torch.bfloat16)
    tensors, names = stage_inputs()
    out = eng(tensors, names, torch.empty(1, 4, 3, dtype=torch.bfloat16))
    assert trt.contexts[0].streams == [STREAM_HANDLE]
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 3)
    torch.testing.assert_close(out, _velocity(dict(zip(names, tensors))).to(torch.bfloat16))
    # every engine input got its shape (harmless for static engines, required for dynamic ones)
    assert [d[0] for what, d in trt.calls if what == "set_input_shape"] == ["hidden", "timestep", "positions"]


def test_dynamic_dims_get_input_shapes_before_execution(monkeypatch, onnx_file, fake_cuda):
    trt = make_trt("10.13.3.9", make_graph(dynamic=True))
    install(monkeypatch, tensorrt=trt)
    eng = rtrt.TrtEngine(onnx_file, torch.bfloat16)
    for tokens in (4, 6):
        tensors, names = stage_inputs(tokens=tokens)
        out = eng(tensors, names, torch.empty(1, tokens, 3, dtype=torch.bfloat16))
        torch.testing.assert_close(out, _velocity(dict(zip(names, tensors))).to(torch.bfloat16))


def test_output_dtype_of_the_engine_is_allocated_and_cast(monkeypatch, onnx_file, fake_cuda):
    """The engine's output type may differ from the stage's (here half vs float): allocate what the engine writes,
    then cast."""
    install(monkeypatch, tensorrt=make_trt("10.13.3.9", make_graph(hidden="FLOAT", out="HALF")))
    eng = rtrt.TrtEngine(onnx_file, torch.float32)
    tensors, names = stage_inputs(torch.float32)
    out = eng(tensors, names, torch.empty(1, 4, 3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _velocity(dict(zip(names, tensors))).half().float())


def test_inputs_are_cast_to_the_engine_dtype(monkeypatch, onnx_file, fake_cuda):
    """TensorRT 8 has no int64: its parser makes int64 graph inputs int32; the engine must be fed int32."""
    install(monkeypatch, tensorrt=make_trt("8.6.1", make_graph(hidden="HALF", out="HALF", positions="INT32")))
    eng = rtrt.TrtEngine(onnx_file, torch.float16)
    tensors, names = stage_inputs(torch.float16)
    out = eng(tensors, names, torch.empty(1, 4, 3, dtype=torch.float16))
    torch.testing.assert_close(out, _velocity(dict(zip(names, tensors))).half())


def test_shape_mismatch_and_missing_input_are_clear_errors(monkeypatch, onnx_file, fake_cuda):
    install(monkeypatch, tensorrt=make_trt("10.13.3.9", make_graph()))
    eng = rtrt.TrtEngine(onnx_file, torch.bfloat16)
    tensors, names = stage_inputs(tokens=5)
    with pytest.raises(ValueError, match=r"rejected shape \(1, 5, 3\) for input 'hidden'"):
        eng(tensors, names, torch.empty(1, 5, 3, dtype=torch.bfloat16))
    tensors, names = stage_inputs()
    with pytest.raises(ValueError, match=r"shape \(1, 4, 3\).*expects \(1, 4, 4\)"):
        eng(tensors, names, torch.empty(1, 4, 4, dtype=torch.bfloat16))
    with pytest.raises(KeyError, match="positions"):
        eng(tensors[:3], names[:3], torch.empty(1, 4, 3, dtype=torch.bfloat16))


def test_failed_enqueue_raises(monkeypatch, onnx_file, fake_cuda):
    trt = make_trt("10.13.3.9", make_graph())
    install(monkeypatch, tensorrt=trt)
    eng = rtrt.TrtEngine(onnx_file, torch.bfloat16)
    monkeypatch.setattr(type(eng.context), "execute_async_v3", lambda self, stream: False)
    tensors, names = stage_inputs()
    with pytest.raises(RuntimeError, match=r"tensorrt 10\.13\.3 failed to enqueue"):
        eng(tensors, names, torch.empty(1, 4, 3, dtype=torch.bfloat16))


# ------------------------------------------------------------------------------------------- torch_tensorrt options
def make_torch_trt(version: str | None, *, explicit_field: bool = True) -> types.ModuleType:
    """A fake torch_tensorrt whose ``settings`` does what its torch.compile backend does with ``options``: unknown
    keys are dropped (parse_dynamo_kwargs), then explicit typing with a non-float32 precision set is an
    AssertionError (the check torch_tensorrt has carried since 2.8; 2.10 made explicit typing the default)."""
    mod = types.ModuleType("torch_tensorrt")
    if version is not None:
        mod.__version__ = version
    v = rtrt._version_tuple(version) if version else (2, 9, 0)
    defaults = {"enabled_precisions": {torch.float32}, "min_block_size": 5}
    if explicit_field:
        defaults["use_explicit_typing"] = v[:2] >= (2, 10)

    def settings(kwargs):
        assert kwargs["backend"] == "torch_tensorrt"
        opts = kwargs.get("options", {})
        s = dict(defaults, **{k: val for k, val in opts.items() if k in defaults})
        if s.get("use_explicit_typing") and set(s["enabled_precisions"]) - {torch.float32}:
            raise AssertionError(
                f"use_explicit_typing was set to True, however found that enabled_precisions was also specified "
                f"(saw: {s['enabled_precisions']}, expected: dtype.f32, dtype.f4). enabled_precisions should not be "
                "used when use_explicit_typing=True")
        return s

    mod.settings = settings
    return mod


@pytest.mark.parametrize("version", ["2.10.0", "2.10.0+cu130", "2.12.0.dev20260301+cu130", "3.0.0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_tensorrt_2_10_and_newer_compile_explicitly_typed(monkeypatch, version, dtype):
    fake = make_torch_trt(version)
    install(monkeypatch, torch_tensorrt=fake)
    kwargs = rtrt.torch_tensorrt_compile_kwargs(dtype)
    s = fake.settings(kwargs)  # raises torch_tensorrt's AssertionError for enabled_precisions={dtype}
    assert kwargs["backend"] == "torch_tensorrt" and kwargs["dynamic"] is False
    assert "enabled_precisions" not in kwargs["options"]
    assert s["use_explicit_typing"] is True and s["min_block_size"] == 1


@pytest.mark.parametrize("version", ["2.9.0", "2.8.0+cu128", "2.5.0"])
def test_older_torch_tensorrt_gets_enabled_precisions_weakly_typed(monkeypatch, version):
    fake = make_torch_trt(version)
    install(monkeypatch, torch_tensorrt=fake)
    s = fake.settings(rtrt.torch_tensorrt_compile_kwargs(torch.bfloat16))
    assert s["use_explicit_typing"] is False and s["enabled_precisions"] == {torch.bfloat16}
    assert s["min_block_size"] == 1


def test_torch_tensorrt_without_the_explicit_typing_setting(monkeypatch):
    fake = make_torch_trt("2.4.0", explicit_field=False)
    install(monkeypatch, torch_tensorrt=fake)
    s = fake.settings(rtrt.torch_tensorrt_compile_kwargs(torch.float16))
    assert s["enabled_precisions"] == {torch.float16} and "use_explicit_typing" not in s


def test_torch_tensorrt_version_from_package_metadata(monkeypatch):
    install(monkeypatch, torch_tensorrt=make_torch_trt(None))
    seen = []

    def version(name):
        seen.append(name)
        if name in ("torch-tensorrt", "torch_tensorrt"):
            return "2.9.1"
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert rtrt.torch_tensorrt_compile_kwargs(torch.float16)["options"]["enabled_precisions"] == {torch.float16}
    assert seen and seen[0] in ("torch-tensorrt", "torch_tensorrt")


# ------------------------------------------------------------------------------------------------ tensorrt_flavour
def fake_ort(*providers):
    mod = types.ModuleType("onnxruntime")
    mod.get_available_providers = lambda: list(providers)
    return mod


def test_flavour_prefers_torch_tensorrt(monkeypatch):
    install(monkeypatch, torch_tensorrt=make_torch_trt("2.10.0"), tensorrt=make_trt("10.13.3.9", make_graph()))
    assert rtrt.tensorrt_flavour() == "torch_tensorrt"


def test_flavour_tensorrt_then_ort_trt(monkeypatch):
    install(monkeypatch, torch_tensorrt=None, tensorrt=make_trt("8.6.1", make_graph()),
            onnxruntime=fake_ort("TensorrtExecutionProvider", "CUDAExecutionProvider"))
    assert rtrt.tensorrt_flavour() == "tensorrt"
    install(monkeypatch, tensorrt=None)
    assert rtrt.tensorrt_flavour() == "ort-trt"


def test_flavour_none_names_what_to_install(monkeypatch):
    install(monkeypatch, torch_tensorrt=None, tensorrt=None, onnxruntime=fake_ort("CPUExecutionProvider"))
    with pytest.raises(ImportError, match=r"torch-tensorrt.*pip install tensorrt.*none of them is installed"):
        rtrt.tensorrt_flavour()
    install(monkeypatch, onnxruntime=None)
    with pytest.raises(ImportError, match=r"pip install torch-tensorrt"):
        rtrt.tensorrt_flavour()


def test_flavour_skips_a_too_old_tensorrt_and_says_why(monkeypatch):
    install(monkeypatch, torch_tensorrt=None, tensorrt=make_trt("8.4.3", make_graph()), onnxruntime=None)
    with pytest.raises(ImportError, match=r"tensorrt 8\.4\.3 is installed but too old.*>= 8\.5"):
        rtrt.tensorrt_flavour()
    install(monkeypatch, onnxruntime=fake_ort("TensorrtExecutionProvider"))
    assert rtrt.tensorrt_flavour() == "ort-trt"


def test_flavour_survives_a_torch_tensorrt_that_does_not_load(monkeypatch):
    """An ABI mismatch makes ``import torch_tensorrt`` fail with OSError (a shared library): fall through."""
    monkeypatch.delitem(sys.modules, "torch_tensorrt", raising=False)
    install(monkeypatch, tensorrt=make_trt("10.13.3.9", make_graph()))
    real_import = builtins.__import__

    def importer(name, *args, **kwargs):
        if name == "torch_tensorrt":
            raise OSError("libtorchtrt.so: undefined symbol")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", importer)
    assert rtrt.tensorrt_flavour() == "tensorrt"
    install(monkeypatch, tensorrt=None, onnxruntime=None)
    with pytest.raises(ImportError, match=r"torch-tensorrt is installed but does not load \(libtorchtrt"):
        rtrt.tensorrt_flavour()
