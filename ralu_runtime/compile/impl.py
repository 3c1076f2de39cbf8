"""How an installed backend executes the adapter's model call: :class:`BackendImpl`.

Regional compilation without touching the user's model: the adapter runs its transformer as a loop over
*block functions* (``flux_double_block(block, ...)``, ``sd3_joint_block(block, ...)``: plain functions taking
the block module as an argument). For ``inductor`` (and ``torch_tensorrt``) this object hands out a
``torch.compile`` of each such function, created once per block kind and owned by ralu; dynamo inlines the
block's layers with their parameters as graph inputs, so the one compiled function serves every block of the
kind (FLUX: one double-block and one single-block graph for 57 blocks), and a LoRA loaded later, or a weight
changed in place, is read live. The user's modules are never compiled, fused or patched: after
:func:`ralu_runtime.compile.uncompile_adapter` (or with no backend) a plain ``pipe(...)`` runs exactly as before.

Packed calls (many requests in one model call, :meth:`ralu_runtime.compile.StageRunner.packed`): the adapters' packed
block functions come through :meth:`BackendImpl.block` under their own names (``flux_double_packed``,
``flux_single_packed``, ``sd3_joint_packed``) and are always compiled with ``dynamic=True`` (their token and segment
counts change with every mix of requests), whatever ``CompileOptions.dynamic`` says for the unpacked blocks.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from ..adapters.base import ModelImpl
from ..adapters.fused import FusedProjections


class BackendImpl(ModelImpl):
    """Block callables (compiled with ``compile_kwargs``, or plain when None), ralu-owned fused projections
    (``fused=True``) and a compiled VAE decode (``compile_vae`` kwargs, or None). ``packed_calls``: the adapters may
    run packed calls (``packed_velocity``) with this impl (the inductor and eager backends; not torch_tensorrt)."""

    PACKED_SUFFIX = "_packed"  # block names of packed calls: compiled with dynamic=True

    def __init__(self, compile_kwargs: dict | None = None, *, fused: bool = False, compile_vae: dict | None = None,
                 packed_calls: bool = False):
        self.compile_kwargs = compile_kwargs
        self.packed_calls = packed_calls
        self.compile_vae = compile_vae
        self.fused_store = FusedProjections() if fused else None
        self._compiled: dict[str, Callable] = {}
        self._vae = None
        self._vae_fn = None
        self._lock = threading.Lock()

    def block(self, name: str, fn: Callable) -> Callable:
        if self.compile_kwargs is None:
            return fn
        compiled = self._compiled.get(name)
        if compiled is None:
            with self._lock:
                compiled = self._compiled.get(name)
                if compiled is None:
                    kwargs = self.compile_kwargs
                    if name.endswith(self.PACKED_SUFFIX) and "dynamic" in kwargs:
                        kwargs = {**kwargs, "dynamic": True}
                    compiled = torch.compile(fn, **kwargs)
                    self._compiled[name] = compiled
        return compiled

    @property
    def compiles_blocks(self) -> bool:
        """True when :meth:`block` hands out compiled functions (their inputs must not change Python-side per call)."""
        return self.compile_kwargs is not None

    def fused(self, module, names):
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

    def refresh(self) -> None:
        """Before each ``generate`` call: bring the fused copies up to date with the live weights."""
        if self.fused_store is not None:
            self.fused_store.refresh()

    def release(self) -> None:
        """Drop the compiled callables and fused copies (memory goes back)."""
        with self._lock:
            self._compiled.clear()
            self._vae = self._vae_fn = None
        if self.fused_store is not None:
            self.fused_store.clear()
