"""``backend="tensorrt"``: torch_tensorrt (regional, per block) when importable; else a TensorRT engine built from
the ONNX graph of each stage call (``tensorrt`` Python API), or onnxruntime's TensorRT execution provider.
Neither present: an ImportError naming what to install.

Never run on this project's machines (no TensorRT there): written against the documented APIs and tested with
fakes that enforce them (``tests/test_tensorrt.py``). Versions targeted:

* torch_tensorrt, ``torch.compile(backend="torch_tensorrt")``: >= 2.10 compiles with explicit (strong) typing, its
  default there: the precision is the model's own dtype, and ``enabled_precisions`` is not passed (2.10 and newer
  reject it next to ``use_explicit_typing=True``). Older releases get ``use_explicit_typing=False`` with
  ``enabled_precisions={dtype}`` (their default, weakly typed mode).
* tensorrt (ONNX path): 8.5 or newer (the tensor-name I/O API). TensorRT >= 10 builds a strongly typed network (the
  ONNX graph's dtypes decide; TensorRT 11 knows no other mode), falling back to the weakly typed build with the
  FP16/BF16 builder flag on 10.x when the strongly typed build fails; 8.x/9.x build a weakly typed network with
  the ``EXPLICIT_BATCH`` creation flag their ONNX parser needs. bfloat16 needs TensorRT >= 9.
"""
from __future__ import annotations

import re
import threading
import warnings
from pathlib import Path

import torch

from ..versions import installed_version

_MIN_TRT = (8, 5)
_TORCH_TRT_EXPLICIT_TYPING = (2, 10)  # torch_tensorrt release whose default became use_explicit_typing=True


def _version_tuple(text) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version string such as ``2.10.0+cu130`` or ``10.13.3.9``; None if unreadable."""
    m = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text or ""))
    if not m:
        return None
    return tuple(int(g or 0) for g in m.groups())


def _trt_version(trt) -> tuple[int, int, int] | None:
    return _version_tuple(getattr(trt, "__version__", None) or installed_version("tensorrt", "tensorrt-cu12",
                                                                             "tensorrt-cu13", "tensorrt-cu11"))


def _torch_tensorrt_version(mod) -> tuple[int, int, int] | None:
    return _version_tuple(getattr(mod, "__version__", None) or installed_version("torch-tensorrt", "torch_tensorrt"))


def _fmt(v) -> str:
    return ".".join(map(str, v)) if v else "unknown"


def tensorrt_flavour() -> str:
    """'torch_tensorrt', 'tensorrt' or 'ort-trt' (onnxruntime's TensorRT provider); ImportError otherwise."""
    why: list[str] = []
    try:
        import torch_tensorrt  # noqa: F401

        return "torch_tensorrt"
    except ImportError:
        pass
    except OSError as exc:  # installed, but its shared libraries do not load (a torch / CUDA mismatch)
        why.append(f"torch-tensorrt is installed but does not load ({exc})")
    try:
        import tensorrt

        version = _trt_version(tensorrt)
        if version is None or version[:2] >= _MIN_TRT:
            return "tensorrt"
        why.append(f"tensorrt {_fmt(version)} is installed but too old: ralu needs TensorRT >= 8.5 "
                   "(the tensor-name I/O API)")
    except ImportError:
        pass
    except OSError as exc:
        why.append(f"tensorrt is installed but does not load ({exc})")
    try:
        import onnxruntime as ort

        if "TensorrtExecutionProvider" in ort.get_available_providers():
            return "ort-trt"
    except ImportError:
        pass
    detail = ("; ".join(why) + ". ") if why else "none of them is installed. "
    raise ImportError("backend='tensorrt' needs torch-tensorrt (pip install torch-tensorrt) or NVIDIA TensorRT >= 8.5 "
                      "(pip install tensorrt onnx), or onnxruntime-gpu built with the TensorRT execution provider; "
                      + detail + "backend='inductor' needs nothing extra.")


def torch_tensorrt_compile_kwargs(dtype: torch.dtype) -> dict:
    """``torch.compile`` keyword arguments for the torch_tensorrt dynamo backend (static shapes per stage), for a
    model already cast to ``dtype``.

    torch_tensorrt >= 2.10 defaults to ``use_explicit_typing=True`` (strongly typed TensorRT networks: every layer
    runs in the dtype the model gives it) and then rejects ``enabled_precisions`` other than float32 with an
    AssertionError; its documentation marks ``enabled_precisions`` deprecated and says to cast the model instead,
    which this model is. So from 2.10 explicit typing is asked for outright and no precision set is passed. Older
    releases are weakly typed by default and need ``enabled_precisions`` to allow fp16/bf16 kernels at all; they
    get ``use_explicit_typing=False`` (ignored by releases without the setting) and ``enabled_precisions={dtype}``.
    """
    import torch_tensorrt  # registers the "torch_tensorrt" torch.compile backend

    options: dict = {"min_block_size": 1}
    version = _torch_tensorrt_version(torch_tensorrt)
    if version is None or version[:2] >= _TORCH_TRT_EXPLICIT_TYPING:
        options["use_explicit_typing"] = True
    else:
        options["use_explicit_typing"] = False
        options["enabled_precisions"] = {dtype}
    return dict(backend="torch_tensorrt", dynamic=False, options=options)


def _torch_dtypes(trt) -> dict:
    """TensorRT DataType -> torch dtype, for the members the installed TensorRT has."""
    pairs = [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16), ("INT8", torch.int8),
             ("INT32", torch.int32), ("INT64", torch.int64), ("BOOL", torch.bool), ("UINT8", torch.uint8)]
    if hasattr(torch, "float8_e4m3fn"):
        pairs.append(("FP8", torch.float8_e4m3fn))
    out = {}
    for name, tdt in pairs:
        member = getattr(trt.DataType, name, None)
        if member is not None:
            out[member] = tdt
    return out


def _current_stream(device: torch.device) -> int:
    """The handle of torch's current CUDA stream on ``device`` (engines run on it, ordered with torch's work)."""
    return torch.cuda.current_stream(device).cuda_stream


class TrtEngine:
    """A TensorRT engine built from one exported ONNX stage graph (``tensorrt`` Python API, TensorRT >= 8.5).

    Called as ``engine(tensors, names, out_like)``: the flat stage inputs with their graph names, and a tensor with
    the shape, dtype and device the velocity must have. Runs on torch's current CUDA stream without synchronizing.
    ``workspace_bytes``: cap on the builder's scratch memory (TensorRT's default: the whole device memory).
    """

    def __init__(self, path: Path, dtype: torch.dtype, workspace_bytes: int | None = None):
        import tensorrt as trt

        self.trt = trt
        self.version = _trt_version(trt)
        where = f"tensorrt {_fmt(self.version)}"
        if self.version is not None and self.version[:2] < _MIN_TRT:
            raise RuntimeError(f"backend='tensorrt' needs TensorRT >= 8.5 (execute_async_v3 and the tensor-name I/O "
                               f"API); {where} is installed. Upgrade it (pip install -U tensorrt), or install "
                               "torch-tensorrt.")
        major = self.version[0] if self.version is not None else 10
        if dtype == torch.bfloat16 and major < 9:
            raise RuntimeError(f"{where} has no bfloat16 (TensorRT >= 9 has): upgrade TensorRT (pip install -U "
                               "tensorrt), load the pipeline in float16, or install torch-tensorrt.")
        self.path = Path(path)
        self.dtype = dtype
        # Lifetimes (TensorRT "Object Lifetimes"): the logger must outlive every object made with it, and the
        # runtime every engine it deserializes; all are kept on the instance. Builder, network, parser and config
        # may go once the serialized engine exists.
        self.logger = trt.Logger(trt.Logger.WARNING)
        precision = {torch.float16: "FP16", torch.bfloat16: "BF16"}.get(dtype)
        flag_enum = trt.NetworkDefinitionCreationFlag
        if major >= 10:
            # strongly typed: the graph's dtypes decide, no precision flags. TensorRT 11 knows no other mode (and
            # has neither FP16/BF16 builder flags nor EXPLICIT_BATCH); STRONGLY_TYPED is asked for where it exists.
            strong = getattr(flag_enum, "STRONGLY_TYPED", None)
            serialized, error = self._build(0 if strong is None else 1 << int(strong), None, workspace_bytes)
            if serialized is None and precision is not None and hasattr(trt.BuilderFlag, precision):
                warnings.warn(f"{where} could not build a strongly typed engine from {self.path} ({error}); "
                              f"retrying weakly typed with the {precision} builder flag", RuntimeWarning, stacklevel=2)
                serialized, error = self._build(0, precision, workspace_bytes)
        else:  # TensorRT 8/9: weakly typed; their ONNX parser needs an explicit-batch network (implicit in 10)
            flags = 1 << int(flag_enum.EXPLICIT_BATCH)
            if precision is not None and not hasattr(trt.BuilderFlag, precision):
                raise RuntimeError(f"{where} has no BuilderFlag.{precision}: cannot build a {dtype} engine")
            serialized, error = self._build(flags, precision, workspace_bytes)
        if serialized is None:
            raise RuntimeError(f"{where} failed to build an engine from {self.path}: {error}")
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise RuntimeError(f"{where} could not deserialize the engine it built from {self.path}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{where} could not create an execution context (out of device memory?)")
        self.types = _torch_dtypes(trt)
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name)
            if mode == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
            elif mode == trt.TensorIOMode.OUTPUT:
                self.outputs.append(name)
        if "velocity" in self.outputs:
            self.output = "velocity"
        elif len(self.outputs) == 1:
            self.output = self.outputs[0]
        else:
            raise RuntimeError(f"the engine built from {self.path} has outputs {self.outputs}; expected one, "
                               "'velocity'")
        self._lock = threading.Lock()  # one execution context: its tensor addresses are per call

    def _build(self, network_flags: int, precision: str | None, workspace_bytes: int | None):
        """Parse the ONNX file into a network made with ``network_flags`` and build it; (serialized or None, why)."""
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(network_flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"tensorrt {_fmt(self.version)} could not parse {self.path}: {errors or 'no detail'}")
        config = builder.create_builder_config()
        if workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if precision is not None:
            config.set_flag(getattr(trt.BuilderFlag, precision))
        serialized = builder.build_serialized_network(network, config)
        return serialized, ("see the TensorRT log above" if serialized is None else "")

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt_dtype = self.engine.get_tensor_dtype(name)
        try:
            return self.types[trt_dtype]
        except KeyError:
            raise TypeError(f"tensor {name!r} of the engine built from {self.path} has TensorRT type {trt_dtype}, "
                            "which has no torch equivalent here") from None

    def __call__(self, tensors, names, out_like: torch.Tensor) -> torch.Tensor:
        by_name = dict(zip(names, tensors))
        device = out_like.device
        with self._lock:
            keep = []  # the tensors whose addresses TensorRT reads; allocated on the stream the engine runs on
            for n in self.inputs:
                if n not in by_name:
                    raise KeyError(f"the engine built from {self.path} takes input {n!r}; the stage call gave "
                                   f"{sorted(by_name)}")
                want = self._torch_dtype(n)
                t = by_name[n].to(device=device, dtype=want).contiguous()  # e.g. int64 -> int32 on TensorRT 8
                keep.append(t)
                if self.context.set_input_shape(n, tuple(t.shape)) is False:
                    raise ValueError(f"tensorrt {_fmt(self.version)} rejected shape {tuple(t.shape)} for input {n!r} "
                                     f"(engine shape {tuple(self.engine.get_tensor_shape(n))})")
                if self.context.set_tensor_address(n, t.data_ptr()) is False:
                    raise RuntimeError(f"tensorrt {_fmt(self.version)} rejected the address of input {n!r}")
            shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output))
            if shape != tuple(out_like.shape):
                raise ValueError(f"the engine built from {self.path} makes {self.output!r} of shape {shape}; "
                                 f"the stage call expects {tuple(out_like.shape)}")
            out = torch.empty(shape, dtype=self._torch_dtype(self.output), device=device)
            if self.context.set_tensor_address(self.output, out.data_ptr()) is False:
                raise RuntimeError(f"tensorrt {_fmt(self.version)} rejected the address of output {self.output!r}")
            if not self.context.execute_async_v3(_current_stream(device)):
                raise RuntimeError(f"tensorrt {_fmt(self.version)} failed to enqueue the engine built from "
                                   f"{self.path} (see the TensorRT log)")
        # no synchronize: the result is ordered on torch's current stream, and so is the reuse of ``keep``'s memory
        return out if out.dtype == out_like.dtype else out.to(out_like.dtype)
