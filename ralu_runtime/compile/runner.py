"""The installed backend of an adapter: :class:`StageRunner`, and installing / removing / reusing one."""
from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ..adapters.base import Conditioning, DiTAdapter, TokenGrid, VelocityCall, check_velocity_calls, current_cache
from ..execution.call import current_sharding
from ..offload import check_offload, offloaded_models
from .cast_layers import CastShadows
from .cuda_graphs import GraphPool
from .flatten import flatten, signature, unflatten
from .fp8 import Fp8Shadows, check_fp8_device, resolve_kernel
from .impl import BackendImpl, attention_tag
from .options import BACKENDS, BuildRecord, CompileOptions, check_flavour_options, make_options
from .packed import PackedBuckets, PackedState, RunnerExecution
from .scoped import dynamo_settings
from .sdpa import SDPA_SINGLE, SdpaRecorder, check_attn_backend, choose_backend, sdpa_context

_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check_backend_for(options: CompileOptions, adapter) -> None:
    """ValueError, before any work, for a backend the adapter's family cannot run (``onnx`` where the family's
    model call does not export: :attr:`DiTAdapter.onnx_refusal`; ``onnx`` for a bfloat16 model, which
    onnxruntime cannot run: no bfloat16 kernels on its CPU provider, no bfloat16 numpy type for its inputs), and for
    an ``attn_backend`` with no attention kernel on the model's device (:func:`.sdpa.check_attn_backend`), for
    ``fused_qkv=True`` where the family fuses no projections (it would be ignored), and for a traced backend, CUDA
    graphs, a compiled VAE or fp8 on float8 storage under diffusers' layerwise casting
    (:meth:`DiTAdapter.check_layerwise_casting`), and for anything but eager calls on a model under diffusers'
    model offload (:func:`~ralu_runtime.offload.check_offload`)."""
    refusal = getattr(adapter, "onnx_refusal", None)
    if options.backend == "onnx" and refusal:
        raise ValueError(f"backend='onnx' is not available for {adapter.family}: {refusal}")
    if options.attn_backend in SDPA_SINGLE and isinstance(getattr(adapter, "dtype", None), torch.dtype):
        check_attn_backend(options.attn_backend, adapter.device, adapter.dtype)  # e.g. cudnn on a CPU
    if options.fused_qkv and not getattr(adapter, "fuses_projections", True):
        raise ValueError(f"fused_qkv=True: {adapter.family}'s model call has no fused q/k/v projections for ralu to "
                         "run; leave fused_qkv at None")
    if hasattr(adapter, "check_layerwise_casting"):  # diffusers' enable_layerwise_casting: not exported/captured
        cuda = getattr(getattr(adapter, "device", None), "type", None) == "cuda"
        adapter.check_layerwise_casting(f"backend={options.backend!r}" if options.backend in ("onnx", "tensorrt")
                                        else "cuda_graphs=True" if cuda_graphs_on(options, cuda) else None,
                                        "compile_vae" if compile_vae_on(options, cuda) else None,
                                        fp8=options.precision == "fp8", compiled_blocks=options.backend == "inductor")
    if hasattr(adapter, "named_model_modules"):  # diffusers' enable_model_cpu_offload: eager calls only
        cuda = getattr(getattr(adapter, "device", None), "type", None) == "cuda"
        check_offload(adapter, backend=options.backend, cuda_graphs=cuda_graphs_on(options, cuda),
                      compile_vae=compile_vae_on(options, cuda), fused_qkv=bool(options.fused_qkv),
                      fp8=options.precision == "fp8")
    if options.backend == "onnx" and getattr(adapter, "dtype", None) == torch.bfloat16:
        raise ValueError("backend='onnx' cannot run a torch.bfloat16 model (onnxruntime has no bfloat16 kernels "
                         "or input type); move the pipeline to float16 or float32, or use backend='eager' or "
                         "'inductor'")


def cuda_graphs_on(options: CompileOptions, cuda: bool) -> bool:
    """Whether ``options`` capture CUDA graphs on a model on a CUDA device (``cuda``) or not: ``cuda_graphs``, by
    default on for inductor and TensorRT on CUDA; never for onnx (TensorRT flavours without them aside:
    :class:`StageRunner`)."""
    default = cuda and options.backend in ("inductor", "tensorrt")
    on = default if options.cuda_graphs is None else bool(options.cuda_graphs)
    return on and options.backend in ("eager", "inductor", "tensorrt")


def compile_vae_on(options: CompileOptions, cuda: bool) -> bool:
    """Whether ``options`` compile the VAE decode: ``compile_vae``, by default on for inductor on CUDA."""
    return (options.backend == "inductor" and cuda) if options.compile_vae is None else bool(options.compile_vae)


def resolve_precision(options: CompileOptions, dtype: torch.dtype, device) -> tuple[str, str | None]:
    """``(precision, fp8 kernel or None)`` that ``options`` give a model of ``dtype`` on ``device``: precision is
    "fp8" or the model's own dtype ("bfloat16", ...). Raises before any work: ValueError when ``options.precision``
    names a dtype that is not the model's, RuntimeError when fp8 cannot run on ``device``, ValueError / ImportError
    when the fp8 kernel named cannot (``generate``'s ``prepare`` calls this too, so a call fails up front)."""
    if options.precision in _PRECISION_DTYPES and _PRECISION_DTYPES[options.precision] != dtype:
        raise ValueError(f"precision={options.precision!r} but the model is {dtype}: ralu runs the model in its own "
                         "dtype (load or move it in the dtype you want) or in fp8 (precision='fp8'); "
                         "precision='auto' is the model's own")
    if options.precision != "fp8":
        return str(dtype).replace("torch.", ""), None
    check_fp8_device(device)  # RuntimeError naming the device and its compute capability
    return "fp8", resolve_kernel(options.fp8_kernel, device)

_INSTALL_LOCK = threading.Lock()


def _adapter_of(pipe_or_adapter) -> DiTAdapter:
    from ..adapters import get_adapter

    return get_adapter(pipe_or_adapter)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run here (``device`` default: cuda when visible, else cpu)."""
    from .tensorrt import tensorrt_flavour

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = ["eager", "inductor"]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        out.append("onnx")
    except ImportError:
        pass
    if dev.type == "cuda":
        try:
            tensorrt_flavour()
            out.append("tensorrt")
        except ImportError:
            pass
    return out


def compile_stats() -> dict[str, int]:
    """torch._dynamo's global counters: ``unique_graphs`` (graphs compiled so far, recompiles included)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "calls_captured": int(counters["stats"]["calls_captured"])}


_TUNER_TYPES: dict[type, bool] = {}


def _is_tuner_layer(cls: type) -> bool:
    """Whether modules of ``cls`` are peft adapter layers (LoRA...): Python state outside any tensor decides what
    they compute (cached per class)."""
    known = _TUNER_TYPES.get(cls)
    if known is None:
        known = _TUNER_TYPES[cls] = cls.__module__.startswith("peft.") and hasattr(cls, "active_adapters")
    return known


def _tuner_state(m) -> tuple:
    """What a peft adapter layer applies besides its tensors: adapters disabled, merged, active, and their scales
    (``set_adapters`` weights, ``disable_lora``, ``fuse_lora`` change only these)."""
    scaling = getattr(m, "scaling", None) or {}
    return (bool(getattr(m, "disable_adapters", False)), tuple(getattr(m, "merged_adapters", ()) or ()),
            tuple(m.active_adapters), tuple((k, float(v)) for k, v in scaling.items()))


def model_state(module: torch.nn.Module) -> tuple[list, list]:
    """``(identity, versions)`` of a model, in one walk of ``_modules`` (no qualified names).

    ``identity``: every module's type, object, hook count, train/eval flag and instance-level ``forward`` override
    (None without one), a peft adapter layer's adapter state
    (:func:`_tuner_state`), every parameter and buffer's object and storage address; ``versions``: their in-place
    modification counters. Equal identities: a captured CUDA graph (which reads the tensors' storage when replayed)
    is still valid; equal versions as well: an exported graph (which holds the weights as constants) and ralu's own
    weight copies (fused q/k/v, fp8) are too. ~1.4 ms for FLUX.1-dev's 1279 modules and 1160 parameters on a
    2-core CPU (best of 40; the walk it replaced took ~3.8 ms and missed the adapter state); the instance-level
    ``forward`` check added ~12 % (an A/B in one run at that shape on the meta device: 2.7 -> 3.0 ms)."""
    ident: list = []
    vers: list = []
    add, addv = ident.append, vers.append
    stack = [module]
    pop, push = stack.pop, stack.extend
    tuner = _TUNER_TYPES
    while stack:
        m = pop()
        if m is None:  # a submodule set to None
            continue
        cls = m.__class__
        add((cls, id(m), len(m._forward_hooks) + len(m._forward_pre_hooks), m.training,
             id(m.__dict__.get("forward"))))  # a forward set on the instance (fp8 shadows copy instance attributes)
        is_tuner = tuner.get(cls)
        if is_tuner is None:
            is_tuner = _is_tuner_layer(cls)
        if is_tuner:
            add(_tuner_state(m))
        for t in m._parameters.values():
            if t is not None:
                add((id(t), t.data_ptr()))
                addv(t._version)
        if m._buffers:
            for t in m._buffers.values():
                if t is not None:
                    add((id(t), t.data_ptr()))
                    addv(t._version)
        push(m._modules.values())
    return ident, vers


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NORMED = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def bits_sum(t: torch.Tensor) -> torch.Tensor:
    """The wrapping int64 sum of ``t``'s bytes read as 8-byte words (an int64 scalar on its device; 44x faster on a
    CPU than summing bf16 elements as integers: 7 vs 303 ms for 100 M), or of its elements' bits when its bytes do
    not split into aligned words."""
    t = t.detach()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    t = t.contiguous().reshape(-1)
    try:
        return t.view(torch.uint8).view(torch.int64).sum()
    except RuntimeError:   # a size or storage offset that is not a multiple of 8 bytes
        if (t.is_floating_point() or t.is_complex()) and t.element_size() in _WORDS:
            t = t.view(_WORDS[t.element_size()])
        return t.sum(dtype=torch.int64)


def content_stamp(tensors) -> bytes:
    """A stamp of the values of ``tensors`` that changes when any of them is written, also through ``.data`` (which
    version counters do not see: peft's fuse_lora merges and its LoRA hot-swap copy that way). On a GPU the L1 norms
    in float32 (``torch._foreach_norm``: a few launches for all the tensors of one dtype), elsewhere each tensor's
    :func:`bits_sum`; one transfer to the host per device. Meta tensors count by shape only."""
    groups: dict = {}
    for t in tensors:
        if not t.is_meta:
            groups.setdefault((t.device, t.dtype), []).append(t)
    parts = []
    with torch.no_grad():
        for (device, dtype), ts in sorted(groups.items(), key=lambda kv: str(kv[0])):
            if device.type == "cuda" and dtype in _NORMED:
                parts.append(torch.stack(torch._foreach_norm(ts, 1, dtype=torch.float32)).view(torch.int32).long())
            else:
                parts.append(torch.stack([bits_sum(t) for t in ts]))
    return b"".join(p.cpu().numpy().tobytes() for p in parts)


def model_fingerprint(module: torch.nn.Module, *, versions: bool) -> tuple:
    """:func:`model_state` as one comparable tuple: the identity, and (``versions=True``) the versions too. Equal
    fingerprints: a graph built from the model (a captured CUDA graph; with versions, an exported ONNX graph with
    baked-in weights) is still valid."""
    ident, vers = model_state(module)
    return (tuple(ident), tuple(vers)) if versions else tuple(ident)


class StageRunner:
    """One installed backend: runs each model call through it, caching compiled artifacts per input signature.

    Not a patch on the user's model: it is what ``generate`` calls instead of the adapter's plain model call,
    and everything it builds (compiled block functions, fused weights, fp8 weight copies, CUDA graphs, ONNX
    sessions) is its own.

    ``options.precision="fp8"``: the blocks' Linear layers run in fp8 on ralu's quantized copies (:mod:`.fp8`);
    refused here, before any work, on a device without fp8 support. ``options.attn_backend="measure"``: the first
    call of each input signature runs uncompiled while its attention shapes are recorded, then the fastest
    attention backend for them is measured and used for the signature's later calls (:mod:`.sdpa`;
    :meth:`attention_choices`).
    """

    def __init__(self, adapter: DiTAdapter, options: CompileOptions):
        from .tensorrt import tensorrt_flavour, torch_tensorrt_compile_kwargs

        check_backend_for(options, adapter)
        self.adapter = adapter
        self.options = options
        self.device = adapter.device
        self.builds: list[BuildRecord] = []
        self._graphs = GraphPool()
        self._exported: dict[Any, Any] = {}
        self._export_lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._fingerprint = None
        self._stamp = None  # (ids, content_stamp) of the copies' sources at the last call's start or end
        self._seen = None  # model_state at the end of the last begin_call that checked it
        self._tmp = None
        self.flavour = None
        cuda = self.device.type == "cuda"
        self.cuda_graphs = cuda_graphs_on(options, cuda)
        if self.cuda_graphs and not cuda:
            raise ValueError("cuda_graphs=True needs a CUDA device")
        if options.backend == "tensorrt":
            self.flavour = tensorrt_flavour()  # ImportError naming what to install
            check_flavour_options(options, self.flavour)
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
                raise ImportError("backend='onnx' needs onnx and onnxruntime (pip install 'ralu[onnx]', i.e. onnx "
                                  "onnxruntime; onnxruntime-gpu for CUDA)") from exc
        self.precision, self.fp8_kernel, fp8 = self._precision(options)
        # None: on CUDA, unless diffusers' model offload moves the weights (the fused copies would stay put)
        default_fused = cuda and not offloaded_models(adapter)
        fused = (default_fused if options.fused_qkv is None else options.fused_qkv) and adapter.fuses_projections \
            and fp8 is None  # under fp8 the shadows' fp8 q/k/v layers run (BackendImpl.fused returns None)
        compile_kwargs = None
        if options.backend == "inductor":
            compile_kwargs = dict(backend=options.dynamo_backend or "inductor", dynamic=options.dynamic, fullgraph=True)
            if options.dynamo_backend is None and options.mode != "default":
                # the CUDA graphs are ours (one per stage call): inductor must not add its own
                mode = {"max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": "default"}[options.mode]
                if mode != "default":
                    compile_kwargs["mode"] = mode
        elif self.flavour == "torch_tensorrt":
            compile_kwargs = torch_tensorrt_compile_kwargs(adapter.dtype)
        compile_vae = compile_vae_on(options, cuda)
        vae_kwargs = dict(backend=options.dynamo_backend or "inductor", dynamic=False) if compile_vae else None
        packed_calls = options.backend in ("eager", "inductor")  # exported graphs have a fixed structure
        cast = None  # diffusers' layerwise casting under compiled blocks: cast shadows (compile/cast_layers.py)
        if options.backend == "inductor" and fp8 is None:
            cast_at = adapter.layerwise_cast_modules()[0] if hasattr(adapter, "layerwise_cast_modules") else None
            cast = CastShadows(active=cast_at is not None)
        self.impl = BackendImpl(compile_kwargs, fused=fused, compile_vae=vae_kwargs, packed_calls=packed_calls,
                                fp8=fp8, cast=cast)
        self.measure_attention = options.attn_backend == "measure" and options.backend in ("eager", "inductor")
        self._attn: dict[Any, tuple[str, dict]] = {}  # input signature -> (measured choice, details)
        self.packed_buckets = PackedBuckets()  # CUDA-graph buckets of packed calls (replaceable)
        self._packed = PackedState()
        self.applied = {"fused_qkv": bool(fused), "compiled_blocks": compile_kwargs is not None,
                        "compile_vae": bool(compile_vae), "cuda_graphs": self.cuda_graphs,
                        "packed_calls": packed_calls and bool(getattr(adapter, "packs", False)),
                        "precision": self.precision, "fp8_kernel": self.fp8_kernel,
                        "attn_backend": options.attn_backend}

    def _precision(self, options: CompileOptions):
        """``(precision, fp8 kernel or None, Fp8Shadows or None)`` for ``options`` (see :func:`resolve_precision`)."""
        precision, kernel = resolve_precision(options, self.adapter.dtype, self.device)
        return precision, kernel, (Fp8Shadows(kernel) if kernel is not None else None)

    # ---- per generate call
    def note_layerwise_casting(self, present: bool) -> None:
        """Whether the model carries diffusers' layerwise casting (:meth:`DiTAdapter.check_forwards` walks it at every
        call): while it does, compiled blocks run their cast shadows (:mod:`.cast_layers`)."""
        if self.impl.cast is not None:
            self.impl.cast.active = present

    def begin_call(self) -> None:
        """Before each ``generate`` call: drop what was built from layers or tensors the model no longer has
        (CUDA graphs; for exported graphs also weights changed in place, which they hold as constants), and
        refresh ralu's weight copies (fused q/k/v, fp8) from the live ones. One walk of the model
        (:func:`model_state`) when something is built or copied; nothing more when the model is as the last call
        left it (the serving case); nothing at all while nothing is built or copied (eager, CPU). While something
        is, also a :func:`content_stamp` of the copies' sources: values written without a version counter seeing it
        (``.data``: peft's fuse_lora, its LoRA hot-swap) make every copy again."""
        with self._call_lock:
            if self.impl.cast is not None and self.impl.cast.active:
                self.impl.cast.refresh()  # a block whose layers or casting changed gets a new shadow
            if self._fingerprint is None and not self.impl.has_copies():
                self._seen = self._stamp = None
                return
            state = self._model_state()
            stamp = self._sources_stamp()
            if state == self._seen and stamp == self._stamp:
                return
            if self._stamp is not None and stamp[0] == self._stamp[0] and stamp[1] != self._stamp[1]:
                # the same sources hold other values: written without a version counter seeing it (through .data:
                # peft's fuse_lora, its LoRA hot-swap): the copies and exported graphs (weights as constants) are
                # made again from the live tensors
                self.impl.invalidate_copies()
                with self._export_lock:
                    if self._exported:
                        self._exported.clear()
                        self._graphs.clear()
                        self._fingerprint = None
            if self._fingerprint is not None and self._fingerprint != self._fingerprint_of(state):
                self._graphs.clear()
                with self._export_lock:
                    self._exported.clear()
                self._fingerprint = None  # taken again when something is built
            if self.impl.refresh():  # an fp8 copy got new storage (a graph would read the old one)
                self._graphs.clear()
            self._seen = state
            self._restamp(stamp)  # what the copies are made of now (the refresh may have changed which)

    def end_call(self) -> None:
        """After a ``generate`` call's model calls: stamp the sources of copies made during the call (made lazily at
        their first use), so that a write through ``.data`` before the next call is found (:meth:`begin_call`).
        Nothing when the call made no new copy."""
        with self._call_lock:
            if self._stamp is None and self._fingerprint is None and not self.impl.has_copies():
                return
            self._restamp(self._stamp)

    def _restamp(self, known: tuple[tuple, bytes] | None) -> None:
        """Keep ``known`` (``(ids, content_stamp)`` taken of the sources' current values) as the stamp while the
        sources are the same tensors; stamp them afresh when they are not (copies made or dropped)."""
        tensors = self._sources()
        ids = tuple(map(id, tensors))
        self._stamp = known if known is not None and ids == known[0] else (ids, content_stamp(tensors))

    def _sources(self) -> list[torch.Tensor]:
        """What ralu's copies and exported graphs are made from: the fused / fp8 sources, and every parameter and
        buffer while an exported graph (weights as constants) is held."""
        tensors = self.impl.copied_tensors()
        if self._exported:
            tensors += [t for m in self.adapter.model_modules() for t in (*m.parameters(), *m.buffers())]
        return tensors

    def _sources_stamp(self) -> tuple[tuple, bytes]:
        """``(ids of the source tensors, their content_stamp)``."""
        tensors = self._sources()
        return tuple(map(id, tensors)), content_stamp(tensors)

    def _model_state(self) -> tuple[list, list]:
        """:func:`model_state` of every module a model call runs (:meth:`DiTAdapter.model_modules`)."""
        modules = self.adapter.model_modules()
        if len(modules) == 1:
            return model_state(modules[0])
        ident, vers = [], []
        for m in modules:
            i, v = model_state(m)
            ident += i
            vers += v
        return ident, vers

    def _fingerprint_of(self, state: tuple[list, list]):
        """What a built graph depends on: the identity; for exported graphs (weights as constants) the versions too."""
        exported = self.options.backend == "onnx" or self.flavour in ("tensorrt", "ort-trt")
        return state if exported else state[0]

    def _model_fingerprint(self):
        return self._fingerprint_of(self._model_state())

    def _compile_context(self, attn: str | None = None):
        stack = contextlib.ExitStack()
        stack.enter_context(sdpa_context(attn or self.options.attn_backend, self.device))
        if self.impl.compile_kwargs is not None:
            stack.enter_context(dynamo_settings())
        return stack

    def uninstall(self) -> None:
        self._graphs.clear()
        with self._export_lock:
            self._exported.clear()
        self.impl.release()

    def _record(self, kind, tensors, seconds):
        """A graph was built from the model as it is now: remember its fingerprint (first build since a drop)."""
        self._record_build(BuildRecord(kind, int(tensors[0].shape[1]), int(tensors[0].shape[0]), seconds))

    def _record_build(self, record: BuildRecord) -> None:
        self.builds.append(record)
        with self._call_lock:
            if self._fingerprint is None:
                self._fingerprint = self._model_fingerprint()

    def compile_seconds(self) -> float:
        return sum(b.seconds for b in self.builds)

    def _eager(self, tokens, grid, timestep, cond):
        return self.adapter.velocity(tokens, grid, timestep, cond, impl=self.impl)

    # ---- the call
    def __call__(self, tokens, grid: TokenGrid, timestep, cond: Conditioning) -> torch.Tensor:
        cond = self.adapter.specialize_call(timestep, cond)  # host-side choices become constants of the key
        if self.measure_attention and current_sharding() is None:
            tensors, _names, spec = flatten(tokens, grid, timestep, cond)
            key = signature(tensors, spec)
            choice = self._attn.get(key)
            if choice is None:
                return self._measured_first_call(key, tokens, grid, timestep, cond)
            with attention_tag(choice[0]):
                return self._call(tokens, grid, timestep, cond, choice[0])
        return self._call(tokens, grid, timestep, cond)

    def _measured_first_call(self, key, tokens, grid, timestep, cond) -> torch.Tensor:
        """The first call of a signature under ``attn_backend="measure"``: run with uncompiled block functions
        (policy "auto") recording the attention shapes, then measure the backends on them and keep the fastest for
        the signature's later calls."""
        recorder = SdpaRecorder()
        with self._compile_context("auto"), attention_tag(None, plain=True), recorder:
            out = self._eager(tokens, grid, timestep, cond)
        choice = choose_backend(recorder.calls, self.device)
        with self._call_lock:
            self._attn.setdefault(key, choice)
        return out

    def attention_choices(self) -> list[dict]:
        """Under ``attn_backend="measure"``: per input signature (image tokens, batch) the chosen backend, the
        total attention milliseconds per backend over one call, and the call's attention shapes with counts."""
        with self._call_lock:
            items = list(self._attn.items())
        out = []
        for key, (name, details) in items:  # key: (spec, (tokens shape, dtype, device), ...)
            out.append({"tokens_shape": list(key[1][0]), "backend": name,
                        "total_ms": {k: round(v, 4) for k, v in details["total_ms"].items()},
                        "shapes": details["shapes"]})
        return out

    def install_copy_on(self, adapter: DiTAdapter) -> "StageRunner":
        """Install on ``adapter`` (rebuilt for the same pipeline after a component was replaced:
        :meth:`DiTAdapter.take_settings`) a runner with this one's backend and options; it builds its artifacts anew
        for the new components on its first calls. This runner stays on its adapter (a call running there finishes;
        it is freed with it). No install lock: ``adapter`` is not published yet (get_adapter calls this under its
        own lock, which compile_adapter never holds with the install lock)."""
        runner = StageRunner(adapter, self.options)
        adapter.runner = runner
        adapter._ralu_runner_key = self.adapter.__dict__.get("_ralu_runner_key")
        return runner

    def report(self) -> dict:
        """What this runner applies: :attr:`applied` (its precision: "fp8" or the model's dtype now, which follows a
        ``pipe.to(dtype)`` after the install), the fp8 copies (layers, MiB) and the measured attention choices."""
        fp8 = self.impl.fp8
        precision = self.precision if fp8 is not None else str(self.adapter.dtype).replace("torch.", "")
        return {**self.applied, "precision": precision,
                "fp8_layers": 0 if fp8 is None else len(fp8.layers()),
                "fp8_mib": 0.0 if fp8 is None else round(fp8.nbytes() / 2**20, 3),
                "attention": self.attention_choices()}

    def _call(self, tokens, grid, timestep, cond, attn: str | None = None) -> torch.Tensor:
        with self._compile_context(attn):
            if self.options.backend == "onnx" or self.flavour in ("tensorrt", "ort-trt"):
                return self._run_exported(tokens, grid, timestep, cond)
            if not self.cuda_graphs or current_cache() is not None or not tokens.is_cuda:
                return self._eager(tokens, grid, timestep, cond)  # stateful caches cannot be graphed
            tensors, _names, spec = flatten(tokens, grid, timestep, cond)
            key = signature(tensors, spec)
            return self._graphs.run(key, self._eager, tensors, spec, lambda k, s: self._record("cuda_graph", tensors, s))

    # ---- packed calls (many requests' model calls in one; the serving engine)
    @property
    def packs(self) -> bool:
        """True when :meth:`packed` runs its calls as one packed model call: the inductor or eager backend on a family
        with a packed call (``adapter.packs``). onnx / tensorrt: False (:meth:`packed` runs them one by one)."""
        return self.impl.packed_calls and bool(getattr(self.adapter, "packs", False))

    def packed(self, calls) -> list[torch.Tensor]:
        """What :meth:`__call__` gives for each of ``calls`` (:class:`~ralu_runtime.adapters.VelocityCall`), run as one
        packed model call through this backend (:mod:`.packed`): compiled packed blocks with symbolic token counts
        (inductor), CUDA graphs per bucket of padded sizes (on CUDA when the runner uses CUDA graphs and no feature
        cache is active). Falls back to one :meth:`__call__` per call where :attr:`packs` is False, and per call where
        the adapter cannot pack (hooks, a feature cache, ...)."""
        calls = check_velocity_calls(calls)
        calls = [VelocityCall(c.tokens, c.grid, c.timestep, self.adapter.specialize_call(c.timestep, c.cond))
                 for c in calls]
        if not self.packs:
            return [self(c.tokens, c.grid, c.timestep, c.cond) for c in calls]
        graphs = self.cuda_graphs and current_cache() is None and calls[0].tokens.is_cuda
        execution = RunnerExecution(self, graphs)
        with self._compile_context():
            if not graphs:
                return self.adapter.packed_velocity(calls, execution=execution)
            with self._packed.lock:  # the packed graphs share one memory pool: one replay at a time
                return self.adapter.packed_velocity(calls, execution=execution)

    def _packed_pool(self):
        return self._packed.pool_handle()

    def _run_exported(self, tokens, grid, timestep, cond):
        tensors, names, spec = flatten(tokens, grid, timestep, cond)
        key = signature(tensors, spec)
        runner = self._exported.get(key)
        if runner is None:
            with self._export_lock:
                runner = self._exported.get(key)
                if runner is None:
                    t0 = time.perf_counter()
                    runner = self._build_exported(tensors, names, spec, len(self.builds))
                    self._exported[key] = runner
                    self._record(self.options.backend, tensors, time.perf_counter() - t0)
        return runner[0](tensors, names, runner[1])

    def _build_exported(self, tensors, names, spec, index: int):
        from .onnx import OrtStage, export_onnx
        from .tensorrt import TrtEngine

        if self.options.onnx_dir is None and self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ralu-onnx-")
        if self.options.onnx_dir is not None:  # graphs are written, then loaded back by path: a folder of this
            from .artifacts import _private_dir  # user's, private, with nothing planted in it (ArtifactError)

            _private_dir(Path(self.options.onnx_dir))
        folder = Path(self.options.onnx_dir or self._tmp.name) / f"stage{index}_L{tensors[0].shape[1]}_B{tensors[0].shape[0]}"
        folder.mkdir(parents=True, exist_ok=True)

        # exported graphs hold the eager call (fused weights, if any, become constants too)
        path = export_onnx(self._eager, self.adapter.pipe.transformer, tensors, names, spec,
                           folder / "velocity.onnx", self.options.opset)
        with torch.no_grad():
            out_like = torch.empty_like(self._eager(*unflatten(tensors, spec)))
        if self.flavour == "tensorrt":
            return TrtEngine(path, self.adapter.dtype), out_like
        providers = self.options.providers
        if self.flavour == "ort-trt" and providers is None:
            providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        return OrtStage(path, self.device, providers, backend=self.options.backend), out_like


def compile_adapter(pipe_or_adapter, backend: str = "inductor", **options) -> StageRunner:
    """Install a :class:`StageRunner` for ``backend`` on the pipeline's adapter (replacing any earlier one) and
    return it. Options: see :class:`CompileOptions` (``cuda_graphs``, ``mode``, ``dynamic``, ``fused_qkv``,
    ``compile_vae``, ``attn_backend`` (``"measure"``: fastest per shape), ``precision`` (``"fp8"``: fp8 linears),
    ``fp8_kernel``, ``dynamo_backend``, ``onnx_dir``, ``providers``, ``opset``). Compilation itself
    is lazy: each new signature compiles on its first call; :func:`ralu_runtime.warmup.warmup` does it ahead of
    traffic. The user's pipeline is not modified."""
    opts = make_options(backend, options)
    adapter = _adapter_of(pipe_or_adapter)
    with _INSTALL_LOCK:
        old = adapter.runner
        runner = StageRunner(adapter, opts)
        adapter.runner = runner
        adapter._ralu_runner_key = (backend, opts.key())
    if old is not None:
        old.uninstall()
    return runner


def uncompile_adapter(pipe_or_adapter) -> None:
    """Remove the installed runner and free what it built: calls run the plain eager model again."""
    adapter = _adapter_of(pipe_or_adapter)
    with _INSTALL_LOCK:
        runner, adapter.runner = adapter.runner, None
        adapter.__dict__.pop("_ralu_runner_key", None)
    if runner is not None:
        runner.uninstall()


def ensure_backend(pipe_or_adapter, backend: str, **options) -> StageRunner:
    """What ``generate(backend=...)`` calls: keep the installed runner when backend and options match, else
    install a new one (``"eager"`` installs a runner that only applies the fast defaults). E.g.
    ``ensure_backend(pipe, "inductor", precision="fp8")``: compiled blocks with fp8 linears."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {BACKENDS}")
    adapter = _adapter_of(pipe_or_adapter)
    key = (backend, make_options(backend, options).key())
    runner = adapter.runner
    if runner is not None and adapter.__dict__.get("_ralu_runner_key") == key:
        return runner
    return compile_adapter(adapter, backend, **options)


__all__ = ["StageRunner", "available_backends", "compile_adapter", "compile_stats", "ensure_backend",
           "model_fingerprint", "model_state", "uncompile_adapter"]
