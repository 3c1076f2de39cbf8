"""Model adapters: one file per DiT family, registered by pipeline class name in :mod:`ralu_runtime.families`.

:func:`get_adapter` keeps one adapter per pipeline in a table owned by ralu (weakly keyed: nothing is stored
on the pipeline, and the adapter goes away with it). An adapter holds the components it was built for
(:meth:`DiTAdapter.components`); when the pipeline's components are swapped (``pipe.transformer = other``) the
next call builds a new adapter, so a stale model never runs.
"""
from __future__ import annotations

import threading
import weakref

from ..families import EDIT_PIPELINES, FAMILIES, load_object
from .base import (CallState, Conditioning, DiTAdapter, ModelImpl, TokenGrid, VelocityCall, call_scope,
                   current_cache, scheduler_base_shift)

# pipeline class name -> "module:AdapterClass" (imported lazily so diffusers loads only when needed), from the family
# registry; subclasses of these pipelines are accepted (the first registered class in the pipeline's MRO decides)
ADAPTERS: dict[str, str] = {cls: fam.adapter for fam in FAMILIES.values() for cls in fam.pipelines}

_TABLE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def adapter_class_name(pipe) -> str | None:
    """The registered pipeline class ``pipe`` is (or derives from), or None. An editing pipeline of
    :data:`ralu_runtime.families.EDIT_PIPELINES` (e.g. FluxImg2ImgPipeline) maps to its text-to-image class."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in ADAPTERS:
            return cls.__name__
        if cls.__name__ in EDIT_PIPELINES:
            return EDIT_PIPELINES[cls.__name__][0]
    return None


def get_adapter(pipe) -> DiTAdapter:
    """Return the adapter for a loaded diffusers pipeline, or the adapter itself.

    The adapter holds the pipeline by weak reference (the caller keeps the pipeline; ralu never keeps one
    alive). Raises ValueError naming the class and the supported ones for anything else.
    """
    if isinstance(pipe, DiTAdapter):
        return pipe
    name = adapter_class_name(pipe)
    if name is None:
        from ..refusals import check_refused_pipeline

        check_refused_pipeline(pipe)  # a known pipeline ralu does not run: the reason and what works instead
        raise ValueError(f"unsupported model class {type(pipe).__name__!r}: ralu supports {sorted(ADAPTERS)} and "
                         "their subclasses (or pass a ralu_runtime.adapters.DiTAdapter)")
    with _LOCK:
        try:
            cached = _TABLE.get(pipe)
        except TypeError:  # pragma: no cover - an unhashable pipeline: no table entry
            cached = None
        if cached is not None and _same(cached.components(), cached.read_components()):
            return cached
        _check_transformer(pipe)
        adapter = load_object(ADAPTERS[name])(pipe, weak=True)
        if cached is not None:  # a component was replaced: the user's settings and backend stay with the pipeline
            adapter.take_settings(cached)
        try:
            _TABLE[pipe] = adapter
        except TypeError:  # pragma: no cover
            pass
        return adapter


def _check_transformer(pipe) -> None:
    """ValueError when ``pipe.transformer`` is missing or not the class the pipeline declares (an SD3 transformer
    in a FluxPipeline): the adapter would fail on a missing attribute. A torch.compile'd module is left to
    :meth:`DiTAdapter.check_forwards`, which says what to do instead."""
    import inspect

    import torch

    param = inspect.signature(type(pipe).__init__).parameters.get("transformer")
    want = None if param is None else param.annotation
    if not isinstance(want, type):  # not declared, or a Union (Wan: its adapter checks)
        return
    model = getattr(pipe, "transformer", None)
    if model is None:
        raise ValueError(f"pipe.transformer is None: {type(pipe).__name__} runs a {want.__name__}; set "
                         "pipe.transformer")
    if not isinstance(model, (want, torch._dynamo.eval_frame.OptimizedModule)):
        raise ValueError(f"pipe.transformer is a {type(model).__name__}; {type(pipe).__name__} runs a "
                         f"{want.__name__} (or a subclass): use the pipeline class of that model")


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


__all__ = ["ADAPTERS", "CallState", "Conditioning", "DiTAdapter", "ModelImpl", "TokenGrid", "VelocityCall",
           "adapter_class_name", "call_scope", "current_cache", "get_adapter", "scheduler_base_shift"]
