"""How an installed backend executes the adapter's model call: :class:`BackendImpl`.

Regional compilation without touching the user's model: the adapter runs its transformer as a loop over
*block functions* (``flux_double_block(block, ...)``, ``sd3_joint_block(block, ...)``: plain functions taking
the block module as an argument). For ``inductor`` (and ``torch_tensorrt``) this object hands out a
``torch.compile`` of each such function, created once per block kind and owned by ralu; dynamo inlines the
block's layers with their parameters as graph inputs, so the one compiled function serves every block of the
kind (FLUX: one double-block and one single-block graph for 57 blocks), and a LoRA loaded later, or a weight
changed in place, is read live. The user's modules are never compiled, fused or patched: after
:func:`ralu_runtime.compile.uncompile_adapter` (or with no backend) a plain ``pipe(...)`` runs exactly as before.

fp8 (``precision="fp8"``, :mod:`.fp8`): every block callable is handed out wrapped so that it receives ralu's fp8
*shadow* of the user's block (shared non-Linear submodules, Linear layers replaced by :class:`~.fp8.Fp8Linear` with
quantized copies) instead of the block itself; :meth:`BackendImpl.fused` then returns None (the shadows' fp8 q, k and
v layers run as three fp8 products: the fused-weight path of the block functions takes a plain weight tensor).
diffusers' layerwise casting under a compiled backend (:mod:`.cast_layers`): compiled block callables receive the
block's *cast shadow* (cast Linear layers as :class:`~.cast_layers.CastLinear`) while the model carries casting.

Attention backend measured per shape (``attn_backend="measure"``, :mod:`.sdpa`): the runner sets the call's chosen
backend (:func:`attention_tag`); compiled block functions are kept per (block kind, backend), since the SDPA kernel
is chosen when a graph is traced and dynamo does not guard on it.

Packed calls (many requests in one model call, :meth:`ralu_runtime.compile.StageRunner.packed`): the adapters' packed
block functions come through :meth:`BackendImpl.block` under the block's name with the mode's suffix
(``flux_double_packed``, ``sd3_joint_packed``, ``wan_block_packed``, ...) and are always compiled with
``dynamic=True`` (their token and segment counts change with every mix of requests), whatever
``CompileOptions.dynamic`` says for the unpacked blocks. Sharded calls' blocks (suffix ``_sp``) follow it.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable

import torch

from ..adapters.base import ModelImpl
from ..adapters.fused import FusedProjections
from .cast_layers import CastShadows
from .fp8 import Fp8Shadows

_ATTN_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("ralu_attn_tag", default=None)
_PLAIN_BLOCKS: contextvars.ContextVar[bool] = contextvars.ContextVar("ralu_plain_blocks", default=False)


@contextlib.contextmanager
def attention_tag(tag: str | None, *, plain: bool = False):
    """Calls in this block (this thread) run compiled block functions kept under attention backend ``tag`` (None:
    the runner's fixed policy); ``plain=True``: the uncompiled block functions (a measured call's first run)."""
    t1, t2 = _ATTN_TAG.set(tag), _PLAIN_BLOCKS.set(plain)
    try:
        yield
    finally:
        _PLAIN_BLOCKS.reset(t2)
        _ATTN_TAG.reset(t1)


class BackendImpl(ModelImpl):
    """Block callables (compiled with ``compile_kwargs``, or plain when None), ralu-owned fused projections
    (``fused=True``) and a compiled VAE decode (``compile_vae`` kwargs, or None). ``packed_calls``: the adapters may
    run packed calls (``packed_velocity``) with this impl (the inductor and eager backends; not torch_tensorrt).
    ``fp8``: ralu's fp8 block shadows (:class:`~.fp8.Fp8Shadows`), or None for the model's own dtype."""

    PACKED_SUFFIX = "_packed"  # block names of packed calls: compiled with dynamic=True

    def __init__(self, compile_kwargs: dict | None = None, *, fused: bool = False, compile_vae: dict | None = None,
                 packed_calls: bool = False, fp8: Fp8Shadows | None = None, cast: CastShadows | None = None):
        self.compile_kwargs = compile_kwargs
        self.fp8 = fp8
        self.cast = cast if fp8 is None else None
        self.packed_calls = packed_calls
        self.compile_vae = compile_vae
        self.fused_store = FusedProjections() if fused and fp8 is None else None
        self._compiled: dict[str, Callable] = {}
        self._shadowed: dict[tuple[str, int], Callable] = {}
        self._vae = None
        self._vae_fn = None
        self._lock = threading.Lock()

    def block(self, name: str, fn: Callable) -> Callable:
        run = self._compiled_block(name, fn)
        shadows = self.fp8 if self.fp8 is not None else self.cast if run is not fn else None
        if shadows is None:
            return run
        key = (name if run is fn else self._key(name), id(run))
        wrapped = self._shadowed.get(key)
        if wrapped is None:

            def wrapped(block, *args, **kwargs):  # the block's fp8 / cast shadow in place of the user's block
                return run(shadows.shadow(block), *args, **kwargs)

            with self._lock:
                wrapped = self._shadowed.setdefault(key, wrapped)
        return wrapped

    @staticmethod
    def _key(name: str) -> str:
        tag = _ATTN_TAG.get()
        return name if tag is None else f"{name}@{tag}"

    def _compiled_block(self, name: str, fn: Callable) -> Callable:
        if self.compile_kwargs is None or _PLAIN_BLOCKS.get():
            return fn
        key = self._key(name)
        compiled = self._compiled.get(key)
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get(key)
                if compiled is None:
                    kwargs = self.compile_kwargs
                    if name.endswith(self.PACKED_SUFFIX) and "dynamic" in kwargs:
                        kwargs = {**kwargs, "dynamic": True}
                    compiled = torch.compile(fn, **kwargs)
                    self._compiled[key] = compiled
        return compiled

    @property
    def compiles_blocks(self) -> bool:
        """True when :meth:`block` hands out compiled functions (their inputs must not change Python-side per call)."""
        return self.compile_kwargs is not None

    def fused(self, module, names):
        """Fused ``(weight, bias)`` of ``module``'s layers ``names`` (ralu's copies), or None: always None under fp8
        (the shadows' fp8 layers run instead)."""
        return None if self.fused_store is None else self.fused_store.get(module, names)

    def vae_decode(self, vae):
        """A compiled ``vae.decode`` (static shapes: one graph per latent size, two per resolution in RALU). The
        VAE decoder runs twice per RALU image (half-resolution edge preview, final decode); eager it costs
        ~0.1 s at 1024^2 on an H100, a fixed cost that caps the end-to-end ratio."""
        if self.compile_vae is None:
            return None
        with self._lock:
            if self._vae is not vae:

                def decode(z):
                    return vae.decode(z, return_dict=False)[0]

                self._vae, self._vae_fn = vae, torch.compile(decode, **self.compile_vae)
            return self._vae_fn

    @property
    def compiled_blocks(self) -> list[str]:
        return sorted(self._compiled)

    def has_copies(self) -> bool:
        """Whether ralu holds copies of the model's weights (fused q/k/v, fp8 shadows) that :meth:`refresh` keeps
        up to date."""
        return bool(self.fused_store is not None and len(self.fused_store)) or bool(self.fp8 is not None
                                                                                     and len(self.fp8))

    def copied_tensors(self) -> list[torch.Tensor]:
        """The user's tensors that ralu's copies (fused q/k/v, fp8) are made from."""
        out = self.fused_store.source_tensors() if self.fused_store is not None else []
        return out + (self.fp8.source_tensors() if self.fp8 is not None else [])

    def invalidate_copies(self) -> None:
        """The next :meth:`refresh` copies every fused and fp8 weight again (their sources changed unseen)."""
        if self.fused_store is not None:
            self.fused_store.invalidate()
        if self.fp8 is not None:
            self.fp8.invalidate()

    def refresh(self) -> bool:
        """Before each ``generate`` call: bring the fused copies and fp8 shadows up to date with the live weights.
        Returns True when a tensor that a captured CUDA graph may read was replaced (the runner drops its graphs)."""
        if self.fused_store is not None:
            self.fused_store.refresh()
        return self.fp8.refresh() if self.fp8 is not None else False

    def release(self) -> None:
        """Drop the compiled callables and fused copies (memory goes back)."""
        with self._lock:
            self._compiled.clear()
            self._shadowed.clear()
            self._vae = self._vae_fn = None
        if self.fused_store is not None:
            self.fused_store.clear()
        if self.cast is not None:
            self.cast.clear()
        if self.fp8 is not None:
            self.fp8.clear()
