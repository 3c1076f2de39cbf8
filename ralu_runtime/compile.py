"""Per-stage compilation of the model call: ``backend="eager" | "inductor" | "onnx" | "tensorrt"``.

The sampler calls ``adapter.velocity(tokens, grid, timestep, cond)`` once per step. :func:`compile_adapter`
installs a :class:`StageRunner` in its place (an instance attribute; the sampler is unchanged). Within one
RALU stage every call has the same shapes, so each stage is compiled once and replayed:

``eager``
    The plain PyTorch model, with the fast defaults (fused QKV projections, SDPA backend choice).
``inductor``
    Regional compilation: ``torch.compile`` of the transformer's repeated blocks (FLUX: the double and the
    single block class; SD3: the joint block), so a cold compile traces one block of each kind instead of
    57 and takes seconds. The token and batch dimensions are symbolic (``dynamic=True``, duck sizing off),
    so a new resolution, RALU ratio or stage token count reuses the same kernels: no recompile. On CUDA
    each stage's whole model call (embeddings, all blocks, final projection) is then captured as one CUDA
    graph per input signature and replayed: one graph launch per step, no host work, no host sync.
``onnx``
    ``torch.onnx.export`` of the model call for one stage's static shapes (token positions, fine-token
    mask, timestep and prompt embeddings are graph inputs), run by onnxruntime: CPU execution provider on a
    CPU, CUDA (or TensorRT, when onnxruntime has it) on a GPU. One exported graph per input signature.
``tensorrt``
    ``torch_tensorrt`` (regional, per block) when importable; else TensorRT built from the ONNX graph
    (``tensorrt`` Python package, or onnxruntime's TensorRT execution provider). Neither present: an
    ImportError naming what to install.

Caching: compiled artifacts are cached per input signature (shapes, dtypes, device, and the non-tensor
settings of the call), i.e. per (model, resolution, schedule/ratio, batch, dtype), on the runner installed on
that model. :func:`warmup` builds them ahead of traffic and reports the compile seconds per stage.

Concurrency: a CUDA graph owns static input/output buffers. Each call checks a graph instance out of a
per-signature pool (a new instance is captured when every existing one is busy), copies its inputs in,
replays, clones the output and hands the instance back with a CUDA event that the next user's stream waits
on. So static buffers are never shared between concurrent calls (threads or streams).

Cross-process reuse (cold start): :func:`enable_persistent_cache` points inductor's FX-graph and autotune
caches at a persistent folder (default ``~/.cache/ralu/inductor``); :func:`save_compile_artifacts` /
:func:`load_compile_artifacts` write and read torch's portable cache bundle
(``torch.compiler.save_cache_artifacts``), so a fresh process skips the compile.

LoRA hot-swap: call ``pipe.enable_lora_hotswap(target_rank=R)`` before the first ``load_lora_weights`` and
compile afterwards; later ``load_lora_weights(..., hotswap=True, adapter_name=<same>)`` copies the new weights
into the compiled model's LoRA tensors in place: no recompile (checked by ``tests/test_compile.py``). Fused
QKV projections are skipped on models that carry LoRA layers (the LoRA sits on the unfused projections).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .adapters.base import Conditioning, DiTAdapter, TokenGrid

BACKENDS = ("eager", "inductor", "onnx", "tensorrt")
ATTN_BACKENDS = ("auto", "default", "cudnn", "flash", "efficient", "math")

__all__ = ["ATTN_BACKENDS", "BACKENDS", "StageRunner", "apply_fast_defaults", "available_backends", "compile_adapter",
           "compile_stats", "enable_persistent_cache", "ensure_backend", "load_compile_artifacts",
           "save_compile_artifacts", "sdpa_context", "uncompile_adapter", "warmup"]


# ----------------------------------------------------------------------------------------------- helpers
def _adapter_of(pipe_or_adapter) -> DiTAdapter:
    from .adapters import get_adapter

    return get_adapter(pipe_or_adapter)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run here (``device`` default: cuda when visible, else cpu)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = ["eager", "inductor"]
    try:
        import onnxruntime  # noqa: F401

        out.append("onnx")
    except ImportError:
        pass
    if dev.type == "cuda":
        try:
            _tensorrt_flavour()
            out.append("tensorrt")
        except ImportError:
            pass
    return out


def compile_stats() -> dict[str, int]:
    """torch._dynamo's global counters: ``unique_graphs`` (graphs compiled so far, recompiles included)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "calls_captured": int(counters["stats"]["calls_captured"])}


def sdpa_context(name: str, device: torch.device | str):
    """Context manager choosing the SDPA backend. ``auto``: cuDNN first on Hopper (sm90+; 2x faster than
    flash at FLUX's shape), flash first on other GPUs, torch's default on CPU. ``default``: torch's choice.
    ``cudnn`` / ``flash`` / ``efficient`` / ``math``: that backend only (an error where it cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend={name!r} is not allowed; choose one of {ATTN_BACKENDS}")
    dev = torch.device(device)
    if name == "default" or (name == "auto" and dev.type != "cuda"):
        return contextlib.nullcontext()
    if name == "auto":
        major = torch.cuda.get_device_capability(dev)[0]
        order = ([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if major >= 9 else
                 [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION])
        return sdpa_kernel(order + [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True)
    single = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([single])


def _has_lora(module: torch.nn.Module) -> bool:
    return any(hasattr(m, "lora_A") for m in module.modules())


def apply_fast_defaults(pipe_or_adapter, *, fused_qkv: bool | None = None) -> dict[str, Any]:
    """Fast model settings: fused QKV projections (``fused_qkv=None``: on CUDA only; never on a model carrying
    LoRA layers). Returns what was applied. bf16 is the pipeline's load dtype (``torch_dtype``); the SDPA
    backend is chosen per call by the runner (:func:`sdpa_context`)."""
    adapter = _adapter_of(pipe_or_adapter)
    tr = adapter.pipe.transformer
    if fused_qkv is None:
        fused_qkv = adapter.device.type == "cuda"
    applied = {"fused_qkv": False}
    if fused_qkv and hasattr(tr, "fuse_qkv_projections") and not _has_lora(tr):
        already = any(getattr(m, "fused_projections", False) for m in tr.modules())
        if not already:
            tr.fuse_qkv_projections()
        applied["fused_qkv"] = True
    return applied


# ------------------------------------------------------------------------------- persistent compile caches
def enable_persistent_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Keep inductor's FX-graph, AOT-autograd and autotune caches in ``cache_dir`` (default: ``$RALU_CACHE_DIR``
    or ``~/.cache/ralu/inductor``), so compiled kernels survive the process. Call before the first compile."""
    path = Path(cache_dir or os.environ.get("RALU_CACHE_DIR") or Path.home() / ".cache" / "ralu" / "inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as icfg

    icfg.fx_graph_cache = True
    for name in ("autotune_local_cache", "bundle_triton_into_fx_graph_cache"):
        if hasattr(icfg, name):
            setattr(icfg, name, True)
    try:
        import torch._functorch.config as fcfg

        fcfg.enable_autograd_cache = True
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        pass
    return path


def save_compile_artifacts(path: str | os.PathLike) -> int:
    """Write torch's portable compile-cache bundle (everything compiled in this process) to ``path``.
    Returns the number of bytes written (0: nothing to save)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, _info = saved
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return len(data)


def load_compile_artifacts(path: str | os.PathLike) -> bool:
    """Load a bundle written by :func:`save_compile_artifacts` (in a fresh process, before compiling).
    Returns False when the file does not exist."""
    p = Path(path)
    if not p.exists():
        return False
    torch.compiler.load_cache_artifacts(p.read_bytes())
    return True


# ------------------------------------------------------------------------ flattening a model call's inputs
@dataclass(frozen=True)
class _Spec:
    """Non-tensor structure of one ``velocity`` call; part of the cache key."""

    grid_hw: tuple[int, int]
    raster: bool
    has_mask: bool
    batch: int
    cond_keys: tuple[tuple[str, str, Any], ...]  # (key, "tensor" | "none" | "const", const value)


def _flatten(tokens, grid: TokenGrid, timestep, cond: Conditioning):
    tensors = [tokens, grid.positions, timestep if torch.is_tensor(timestep) else torch.tensor(timestep)]
    names = ["tokens", "positions", "timestep"]
    if grid.fine_mask is not None:
        tensors.append(grid.fine_mask)
        names.append("fine_mask")
    keys = []
    for k in sorted(cond.data):
        v = cond.data[k]
        if torch.is_tensor(v):
            keys.append((k, "tensor", None))
            tensors.append(v)
            names.append(f"cond_{k}")
        elif v is None:
            keys.append((k, "none", None))
        else:
            keys.append((k, "const", v))
    spec = _Spec(tuple(int(s) for s in grid.grid_hw), bool(grid.raster), grid.fine_mask is not None, int(cond.batch),
                 tuple(keys))
    return tensors, names, spec


def _unflatten(tensors, spec: _Spec):
    tokens, positions, timestep = tensors[0], tensors[1], tensors[2]
    i = 3
    mask = None
    if spec.has_mask:
        mask, i = tensors[3], 4
    data = {}
    for k, kind, val in spec.cond_keys:
        if kind == "tensor":
            data[k] = tensors[i]
            i += 1
        else:
            data[k] = None if kind == "none" else val
    return tokens, TokenGrid(positions, spec.grid_hw, mask, spec.raster), timestep, Conditioning(spec.batch, data)


def _signature(tensors, spec: _Spec):
    return (spec,) + tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)


# ---------------------------------------------------------------------------------------- CUDA graphs
class _GraphInstance:
    """One captured CUDA graph of the model call with its own static inputs and output."""

    def __init__(self, fn: Callable, tensors: list[torch.Tensor], spec: _Spec, warmup_iters: int = 2):
        self.static = [t.clone() for t in tensors]
        args = _unflatten(self.static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_iters):  # first call compiles / autotunes: never inside the capture
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = fn(*args)
        self.ready: torch.cuda.Event | None = None

    def run(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.current_stream()
        if self.ready is not None:
            stream.wait_event(self.ready)
        for dst, src in zip(self.static, tensors):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        out = self.out.clone()
        self.ready = torch.cuda.Event()
        self.ready.record(stream)
        return out


class _GraphPool:
    """Per-signature pools of graph instances; a call checks one out, so concurrent calls never share one."""

    _build_lock = threading.Lock()  # one capture at a time in the process

    def __init__(self):
        self._free: dict[Any, list[_GraphInstance]] = {}
        self._count: dict[Any, int] = {}
        self._lock = threading.Lock()

    def run(self, key, fn, tensors, spec, on_build: Callable[[Any, float], None]) -> torch.Tensor:
        with self._lock:
            free = self._free.setdefault(key, [])
            inst = free.pop() if free else None
        if inst is None:
            t0 = time.perf_counter()
            with self._build_lock:
                inst = _GraphInstance(fn, tensors, spec)
            torch.cuda.synchronize()
            on_build(key, time.perf_counter() - t0)
            with self._lock:
                self._count[key] = self._count.get(key, 0) + 1
        try:
            return inst.run(tensors)
        finally:
            with self._lock:
                self._free[key].append(inst)

    def instances(self) -> int:
        return sum(self._count.values())


# ---------------------------------------------------------------------------------------------- ONNX
class _VelocityModule(torch.nn.Module):
    """Module form of one stage's model call, for export: flat tensors in, velocity out."""

    def __init__(self, fn: Callable, transformer: torch.nn.Module, spec: _Spec):
        super().__init__()
        self.fn = fn
        self.transformer = transformer
        self.spec = spec

    def forward(self, *tensors):
        return self.fn(*_unflatten(list(tensors), self.spec))


_ORT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
              torch.bool: "bool_", torch.float64: "float64"}


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """ONNX for ``aten::rms_norm`` (the TorchScript exporter has none below opset 23): x / sqrt(mean(x^2) + eps) * w."""
    from torch.onnx import symbolic_helper as sh

    shape = sh._get_const(normalized_shape, "is", "normalized_shape")
    axes = g.op("Constant", value_t=torch.tensor(list(range(-len(shape), 0)), dtype=torch.long))
    eps_v = None if sh._is_none(eps) else sh._maybe_get_const(eps, "f")
    if eps_v is None or not isinstance(eps_v, (float, int)):
        eps_v = torch.finfo(torch.float32).eps
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes, keepdims_i=1)
    eps_c = g.op("CastLike", g.op("Constant", value_t=torch.tensor(float(eps_v), dtype=torch.float32)), x)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, eps_c)))
    if not sh._is_none(weight):
        y = g.op("Mul", y, weight)
    return y


_SYMBOLICS_DONE: set[int] = set()


def _register_symbolics(opset: int) -> None:
    if opset in _SYMBOLICS_DONE:
        return
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)
    _SYMBOLICS_DONE.add(opset)


def _export_onnx(fn, transformer, tensors, names, spec, path: Path, opset: int = 18) -> Path:
    _register_symbolics(opset)
    module = _VelocityModule(fn, transformer, spec).eval()
    with torch.no_grad(), contextlib.redirect_stdout(None):
        torch.onnx.export(module, tuple(tensors), str(path), dynamo=False, input_names=names,
                          output_names=["velocity"], opset_version=opset, do_constant_folding=True)
    return path


class _OrtStage:
    """An onnxruntime session of one exported stage call."""

    def __init__(self, path: Path, device: torch.device, providers: list | None):
        import numpy as np
        import onnxruntime as ort

        self.np = np
        avail = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda":
                providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in avail]
                if not providers:
                    raise ImportError("backend='onnx' on a CUDA device needs onnxruntime with the CUDA execution "
                                      "provider: pip install onnxruntime-gpu")
                providers = providers + ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.device = device
        self.gpu = device.type == "cuda" and self.session.get_providers()[0] != "CPUExecutionProvider"

    def __call__(self, tensors, names, out_like: torch.Tensor) -> torch.Tensor:
        by_name = dict(zip(names, tensors))
        if not self.gpu:
            feeds = {n: by_name[n].detach().cpu().numpy() for n in self.inputs}
            out = self.session.run(["velocity"], feeds)[0]
            return torch.from_numpy(out).to(out_like.device)
        binding = self.session.io_binding()
        keep = []
        for n in self.inputs:
            t = by_name[n].contiguous()
            keep.append(t)
            if t.dtype not in _ORT_TYPES:
                raise TypeError(f"backend='onnx' on CUDA cannot bind {t.dtype} inputs; load the pipeline in float16 "
                                "or float32, or use backend='inductor' / 'tensorrt' for bfloat16")
            binding.bind_input(n, "cuda", t.device.index or 0, getattr(self.np, _ORT_TYPES[t.dtype]), tuple(t.shape),
                               t.data_ptr())
        out = torch.empty_like(out_like)
        binding.bind_output("velocity", "cuda", out.device.index or 0, getattr(self.np, _ORT_TYPES[out.dtype]),
                            tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return out


class _TrtEngine:
    """A TensorRT engine built from one exported ONNX stage graph (``tensorrt`` Python API)."""

    def __init__(self, path: Path, dtype: torch.dtype):
        import tensorrt as trt

        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {path}: {errors}")
        config = builder.create_builder_config()
        if dtype == torch.float16:
            config.set_flag(trt.BuilderFlag.FP16)
        elif dtype == torch.bfloat16 and hasattr(trt.BuilderFlag, "BF16"):
            config.set_flag(trt.BuilderFlag.BF16)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {path}")
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()
        self.inputs = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)
                       if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT]

    def __call__(self, tensors, names, out_like: torch.Tensor) -> torch.Tensor:
        by_name = dict(zip(names, tensors))
        keep = []
        for n in self.inputs:
            t = by_name[n].contiguous()
            keep.append(t)
            self.context.set_tensor_address(n, t.data_ptr())
        out = torch.empty_like(out_like)
        self.context.set_tensor_address("velocity", out.data_ptr())
        self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return out


def _tensorrt_flavour() -> str:
    """'torch_tensorrt', 'tensorrt' or 'ort-trt' (onnxruntime's TensorRT provider); ImportError otherwise."""
    try:
        import torch_tensorrt  # noqa: F401

        return "torch_tensorrt"
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        return "tensorrt"
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        if "TensorrtExecutionProvider" in ort.get_available_providers():
            return "ort-trt"
    except ImportError:
        pass
    raise ImportError("backend='tensorrt' needs torch-tensorrt (pip install torch-tensorrt) or NVIDIA TensorRT "
                      "(pip install tensorrt onnx), or onnxruntime-gpu built with the TensorRT execution provider; "
                      "none of them is installed. backend='inductor' needs nothing extra.")


# ------------------------------------------------------------------------------------------ the runner
def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's repeated blocks: classes named in diffusers' ``_repeated_blocks``, else the entries of
    its ``transformer_blocks`` / ``single_transformer_blocks`` lists."""
    names = set(getattr(transformer, "_repeated_blocks", None) or [])
    if names:
        return [m for m in transformer.modules() if type(m).__name__ in names]
    out = []
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        out.extend(getattr(transformer, attr, None) or [])
    return out


@dataclass
class CompileOptions:
    backend: str = "inductor"
    cuda_graphs: bool | None = None      # None: on for inductor on CUDA devices (off for eager)
    mode: str = "default"                # inductor: "default" | "max-autotune" (CUDA graphs are ours)
    dynamic: bool = True                 # symbolic token / batch dims: no recompile across resolutions
    fused_qkv: bool | None = None        # None: on CUDA only
    compile_vae: bool | None = None      # torch.compile the VAE decoder; None: with inductor on CUDA
    attn_backend: str = "auto"
    dynamo_backend: Any = None           # override torch.compile's backend (tests: "eager" / a counter)
    onnx_dir: str | None = None          # where exported graphs go (default: a temporary folder)
    providers: list | None = None        # onnxruntime providers (default: by device)
    opset: int = 18

    def key(self):
        return tuple(sorted((k, repr(v)) for k, v in self.__dict__.items()))


@dataclass
class BuildRecord:
    """One compile/export/capture: which signature, what kind, seconds."""

    kind: str
    tokens: int
    batch: int
    seconds: float


class StageRunner:
    """Replacement for ``adapter.velocity``: runs each call through the chosen backend, caching per signature."""

    def __init__(self, adapter: DiTAdapter, options: CompileOptions):
        if options.backend not in BACKENDS:
            raise ValueError(f"backend={options.backend!r} is not allowed; choose one of {BACKENDS}")
        self.adapter = adapter
        self.options = options
        self.device = adapter.device
        self.fn = type(adapter).velocity.__get__(adapter)  # the adapter's own (eager) model call
        self.builds: list[BuildRecord] = []
        self._graphs = _GraphPool()
        self._exported: dict[Any, Any] = {}
        self._export_lock = threading.Lock()
        self._compiled_blocks: list[torch.nn.Module] = []
        self._tmp = None
        cuda = self.device.type == "cuda"
        default_graphs = cuda and options.backend in ("inductor", "tensorrt")
        self.cuda_graphs = (default_graphs if options.cuda_graphs is None else bool(options.cuda_graphs)) and \
            options.backend in ("eager", "inductor", "tensorrt")
        if self.cuda_graphs and not cuda:
            raise ValueError("cuda_graphs=True needs a CUDA device")
        if options.backend == "tensorrt":
            self.flavour = _tensorrt_flavour()  # ImportError naming what to install
            if not cuda:
                raise RuntimeError("backend='tensorrt' needs a CUDA device; the model is on "
                                   f"{self.device}. Use backend='inductor' or 'onnx' on a CPU.")
            if self.flavour != "torch_tensorrt":
                self.cuda_graphs = False
        if options.backend == "onnx":
            try:
                import onnx  # noqa: F401
                import onnxruntime  # noqa: F401
            except ImportError as exc:
                raise ImportError("backend='onnx' needs onnx and onnxruntime (pip install onnx onnxruntime; "
                                  "onnxruntime-gpu for CUDA)") from exc
        self.applied = apply_fast_defaults(adapter, fused_qkv=options.fused_qkv)
        if options.backend == "inductor" or (options.backend == "tensorrt" and self.flavour == "torch_tensorrt"):
            self._compile_blocks()
        self._compiled_vae = None
        compile_vae = (options.backend == "inductor" and cuda) if options.compile_vae is None else options.compile_vae
        if compile_vae:
            self._compile_vae_decoder()

    # ---- inductor / torch_tensorrt: regional compilation
    def _compile_blocks(self) -> None:
        o = self.options
        if o.backend == "tensorrt":
            import torch_tensorrt  # noqa: F401  (registers the backend)

            kwargs = dict(backend="torch_tensorrt", dynamic=False,
                          options={"enabled_precisions": {self.adapter.dtype}, "min_block_size": 1})
        else:
            kwargs = dict(backend=o.dynamo_backend or "inductor", dynamic=o.dynamic, fullgraph=True)
            if o.dynamo_backend is None and o.mode != "default":
                # the CUDA graphs are ours (one per stage call): inductor must not add its own
                kwargs["mode"] = {"max-autotune": "max-autotune-no-cudagraphs",
                                  "reduce-overhead": "default"}.get(o.mode, o.mode)
                if kwargs["mode"] == "default":
                    del kwargs["mode"]
        for block in repeated_blocks(self.adapter.pipe.transformer):
            block.compile(**kwargs)
            self._compiled_blocks.append(block)

    def _compile_vae_decoder(self) -> None:
        """The VAE decoder runs twice per RALU image (half-resolution edge preview, final decode) and once per
        baseline image; eager it costs ~0.1 s at 1024^2 on an H100, a fixed cost that caps the end-to-end ratio.
        Static shapes: one graph per latent size (two per resolution in RALU)."""
        decoder = getattr(getattr(self.adapter.pipe, "vae", None), "decoder", None)
        if decoder is None:
            return
        decoder.compile(backend=self.options.dynamo_backend or "inductor", dynamic=False)
        self._compiled_vae = decoder

    def _compile_context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(sdpa_context(self.options.attn_backend, self.device))
        if self._compiled_blocks:
            import torch._dynamo.config as dcfg
            import torch.fx.experimental._config as fxcfg

            # duck sizing would tie a token count to an equal model dimension (e.g. 16 tokens, head_dim 16)
            stack.enter_context(fxcfg.patch(use_duck_shape=False))
            # static mode: one graph per stage shape and block kind, more than the default limit of 8
            stack.enter_context(dcfg.patch(recompile_limit=max(dcfg.recompile_limit, 64)))
        return stack

    def uninstall(self) -> None:
        for block in self._compiled_blocks:
            block._compiled_call_impl = None
        self._compiled_blocks.clear()
        if self._compiled_vae is not None:
            self._compiled_vae._compiled_call_impl = None
            self._compiled_vae = None
        if self.adapter.__dict__.get("velocity") is self:
            del self.adapter.velocity

    def _record(self, kind, tensors, spec, seconds):
        self.builds.append(BuildRecord(kind, int(tensors[0].shape[1]), int(tensors[0].shape[0]), seconds))

    def compile_seconds(self) -> float:
        return sum(b.seconds for b in self.builds)

    # ---- the call
    def __call__(self, tokens, grid: TokenGrid, timestep, cond: Conditioning) -> torch.Tensor:
        with self._compile_context():
            if self.options.backend in ("onnx",) or (self.options.backend == "tensorrt" and
                                                      self.flavour != "torch_tensorrt"):
                return self._run_exported(tokens, grid, timestep, cond)
            if not self.cuda_graphs or self.adapter.feature_cache is not None or not tokens.is_cuda:
                return self.fn(tokens, grid, timestep, cond)  # stateful caches cannot be graphed
            tensors, _names, spec = _flatten(tokens, grid, timestep, cond)
            key = _signature(tensors, spec)
            return self._graphs.run(key, self.fn, tensors, spec,
                                    lambda k, s: self._record("cuda_graph", tensors, spec, s))

    def _run_exported(self, tokens, grid, timestep, cond):
        tensors, names, spec = _flatten(tokens, grid, timestep, cond)
        key = _signature(tensors, spec)
        runner = self._exported.get(key)
        if runner is None:
            with self._export_lock:
                runner = self._exported.get(key)
                if runner is None:
                    t0 = time.perf_counter()
                    runner = self._build_exported(tensors, names, spec, len(self._exported))
                    out = runner[0](tensors, names, runner[1])
                    self._exported[key] = runner
                    self._record(self.options.backend, tensors, spec, time.perf_counter() - t0)
                    return out
        return runner[0](tensors, names, runner[1])

    def _build_exported(self, tensors, names, spec, index: int):
        if self.options.onnx_dir is None and self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ralu-onnx-")
        folder = Path(self.options.onnx_dir or self._tmp.name) / f"stage{index}_L{tensors[0].shape[1]}_B{tensors[0].shape[0]}"
        folder.mkdir(parents=True, exist_ok=True)
        path = _export_onnx(self.fn, self.adapter.pipe.transformer, tensors, names, spec, folder / "velocity.onnx",
                            self.options.opset)
        with torch.no_grad():
            out_like = torch.empty_like(self.fn(*_unflatten(tensors, spec)))
        if self.options.backend == "tensorrt" and self.flavour == "tensorrt":
            return _TrtEngine(path, self.adapter.dtype), out_like
        providers = self.options.providers
        if self.options.backend == "tensorrt" and providers is None:
            providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        return _OrtStage(path, self.device, providers), out_like


def compile_adapter(pipe_or_adapter, backend: str = "inductor", **options) -> StageRunner:
    """Install a :class:`StageRunner` for ``backend`` on the pipeline's adapter (replacing any earlier one) and
    return it. Options: see :class:`CompileOptions` (``cuda_graphs``, ``mode``, ``dynamic``, ``fused_qkv``,
    ``attn_backend``, ``dynamo_backend``, ``onnx_dir``, ``providers``, ``opset``). Compilation itself is lazy:
    each new signature compiles on its first call; :func:`warmup` does it ahead of traffic."""
    adapter = _adapter_of(pipe_or_adapter)
    uncompile_adapter(adapter)
    runner = StageRunner(adapter, CompileOptions(backend=backend, **options))
    adapter.velocity = runner
    adapter._ralu_runner_key = (backend, CompileOptions(backend=backend, **options).key())
    return runner


def uncompile_adapter(pipe_or_adapter) -> None:
    """Remove an installed runner: the adapter runs eagerly again (fused QKV stays fused)."""
    adapter = _adapter_of(pipe_or_adapter)
    runner = adapter.__dict__.get("velocity")
    if isinstance(runner, StageRunner):
        runner.uninstall()
    adapter.__dict__.pop("_ralu_runner_key", None)


def ensure_backend(pipe_or_adapter, backend: str, **options) -> StageRunner | None:
    """What ``generate(backend=...)`` calls: keep the installed runner when backend and options match, else
    install a new one (``"eager"`` installs a runner that only applies the fast defaults)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {BACKENDS}")
    adapter = _adapter_of(pipe_or_adapter)
    key = (backend, CompileOptions(backend=backend, **options).key())
    if adapter.__dict__.get("_ralu_runner_key") == key:
        return adapter.__dict__["velocity"]
    return compile_adapter(adapter, backend, **options)


def _dummy_embeds(adapter: DiTAdapter, batch: int, text_len: int | None, device, dtype) -> dict:
    tr = adapter.pipe.transformer
    cfg = tr.config
    joint, pooled = cfg.joint_attention_dim, cfg.pooled_projection_dim
    if text_len is None:
        text_len = 512 if adapter.family.startswith("flux") else 77 + 256
    z = dict(device=device, dtype=dtype)
    out = {"prompt_embeds": torch.zeros(batch, text_len, joint, **z), "pooled_prompt_embeds": torch.zeros(batch, pooled, **z)}
    if adapter.family == "sd3":
        out["negative_prompt_embeds"] = torch.zeros(batch, text_len, joint, **z)
        out["negative_pooled_prompt_embeds"] = torch.zeros(batch, pooled, **z)
    return out


def warmup(pipe, height: int = 1024, width: int = 1024, speedup="default", batch: int = 1, *,
           backend: str | None = None, text_len: int | None = None, runs: int = 2, **generate_kwargs) -> dict:
    """Build every compiled graph a ``generate(pipe, height, width, speedup, batch)`` call needs, ahead of
    traffic, with zero prompt embeddings of ``text_len`` tokens (default: the length ``generate`` pads prompts to:
    512 for FLUX, 77 + 256 for SD3). ``backend``: install that backend first (options in ``generate_kwargs``'s
    ``compile_options``). Returns ``{"first_s", "warm_s", "compile_s", "stages": {name: {first_s, warm_s,
    compile_s}}, "builds": [...], "graphs_compiled": n}``: wall seconds of the first (compiling) run and of a
    second one, per stage, and the graphs torch._dynamo compiled."""
    from .api import generate

    adapter = _adapter_of(pipe)
    opts = generate_kwargs.pop("compile_options", None) or {}
    if backend is not None:
        ensure_backend(adapter, backend, **opts)
    runner = adapter.__dict__.get("velocity")
    n_builds = len(runner.builds) if isinstance(runner, StageRunner) else 0
    emb = _dummy_embeds(adapter, batch, text_len, adapter.device, adapter.dtype)
    before = compile_stats()["unique_graphs"]
    runs_out = []
    for i in range(max(1, runs)):
        t0 = time.perf_counter()
        out = generate(adapter, **emb, height=height, width=width, speedup=speedup, seed=i, output_type="pt",
                       progress=False, **generate_kwargs)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        runs_out.append((time.perf_counter() - t0, dict(out.timings)))
    first, warm = runs_out[0], runs_out[-1]
    stages = {name: {"first_s": sec, "warm_s": warm[1].get(name, float("nan")),
                     "compile_s": max(0.0, sec - warm[1].get(name, 0.0))} for name, sec in first[1].items()}
    builds = runner.builds[n_builds:] if isinstance(runner, StageRunner) else []
    return {"first_s": first[0], "warm_s": warm[0], "compile_s": max(0.0, first[0] - warm[0]), "stages": stages,
            "builds": [b.__dict__ for b in builds], "graphs_compiled": compile_stats()["unique_graphs"] - before}
