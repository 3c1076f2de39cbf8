"""What belongs to one ``generate`` call and nothing else, and how a model call is executed.

:class:`CallState` is the one per-call state object (a context variable; this thread only): the call's temporal
feature cache, its sharding across ranks (context parallelism) and a dictionary where adapters keep state of their
own for the call (e.g. Wan 2.2's expert choice). :func:`call_scope` sets it for the calls made in a ``with`` block.

:class:`ModelImpl` is how a model call is executed, chosen by the backend that runs it (:mod:`ralu_runtime.compile`).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class ModelImpl:
    """How a model call is executed, chosen by the backend that runs it (:mod:`ralu_runtime.compile`).

    The adapter's ``velocity`` asks it for each block kind's callable (:meth:`block`: the plain function, or a
    ``torch.compile`` of it owned by ralu), for fused projection weights (:meth:`fused`: None means "use the
    model's own layers") and for the VAE decode (:meth:`vae_decode`). The user's modules are never changed:
    compiled and fused objects live here. This base class is plain eager execution. ``packed_calls``: packed
    calls (:mod:`ralu_runtime.execution.packing`) may run with this impl (the plain :data:`EAGER` always may; a
    subclass says so explicitly).
    """

    packed_calls = False

    def block(self, name: str, fn: Callable) -> Callable:
        """The callable to run for block kind ``name`` whose eager implementation is ``fn``."""
        return fn

    def fused(self, module: torch.nn.Module, names: tuple[str, ...]):
        """``(weight, bias)`` concatenating ``module``'s Linear layers ``names`` (live weights), or None."""
        return None

    def vae_decode(self, vae) -> Callable | None:
        """A replacement for ``vae.decode(z, return_dict=False)[0]``, or None for the VAE's own."""
        return None


EAGER = ModelImpl()


def not_a_view(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when it is not a view (or None); else the same values in a tensor that is not a view: an alias of
    the same storage when autograd is off (``detach``: no copy), a copy when it records.

    Dynamo guards a view argument's base, so a compiled block function whose first call gets a view (a Linear's
    output on 3-D input: the embedded tokens) would compile a second graph for the blocks that follow, whose inputs
    are not views. :class:`~ralu_runtime.adapters.base.BlockStack` passes its first state through this."""
    if t is None or t._base is None:
        return t
    return t.clone() if torch.is_grad_enabled() else t.detach()


def static_dims(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Mark dimensions ``dims`` of ``t`` (negative counts from the end; none given: all) as static sizes for the
    compiled block functions, and return ``t``.

    Block functions are compiled with ``dynamic=True`` so that one graph serves every token count; under it dynamo
    gives *every* dimension of a plain tensor argument a symbolic size. The model's parameters are exempt, but a
    tensor that ralu computes or owns is not: fused q/k/v rows, a modulation vector ``(B, 6 D)``, a rotary table's
    head dimension. A symbolic model dimension spreads to the head count and the feature sizes of every kernel around
    it (index arithmetic with run-time divisions, no specialisation), so the sizes that never change with the tokens
    are marked static where these tensors are made. Token and batch dimensions stay symbolic."""
    import torch._dynamo

    n = t.dim()
    torch._dynamo.mark_static(t, [d % n for d in dims] if dims else None)
    return t


@dataclass
class CallState:
    """One ``generate`` call's state: ``cache`` (its temporal feature cache or None), ``sharding`` (its context
    parallelism plan, read by :class:`~ralu_runtime.execution.sharding.Sharded`, or None), ``adapter`` (state an
    adapter keeps for this call, keyed by the adapter's choice)."""

    cache: Any = None
    sharding: Any = None
    adapter: dict = field(default_factory=dict)


_CALL: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("ralu_call", default=None)


@contextlib.contextmanager
def call_scope(cache=None, sharding=None):
    """Model calls in this block (this thread) belong to a new :class:`CallState` with ``cache`` and ``sharding``."""
    token = _CALL.set(CallState(cache, sharding))
    try:
        yield _CALL.get()
    finally:
        _CALL.reset(token)


def current_call() -> CallState | None:
    """The :class:`CallState` of the ``generate`` call running in this thread, or None outside one."""
    return _CALL.get()


def current_cache():
    """The feature cache of the ``generate`` call running in this thread (None outside one, or without cache)."""
    state = _CALL.get()
    return None if state is None else state.cache


def current_sharding():
    """The sharding plan of the ``generate`` call running in this thread (None: unsharded)."""
    state = _CALL.get()
    return None if state is None else state.sharding


_INTERRUPT: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("ralu_interrupt", default=None)


@contextlib.contextmanager
def interrupt_scope(check: Callable[[], None] | None):
    """Model calls in this block (this thread / context) call ``check()`` before every transformer block; it raises
    to stop the call there (the serving engine's cancellation and deadlines: a request stops within one block, not
    one model call). None: no check (plain ``generate`` runs each block stack in one piece)."""
    token = _INTERRUPT.set(check)
    try:
        yield
    finally:
        _INTERRUPT.reset(token)


def current_interrupt() -> Callable[[], None] | None:
    """The check of the innermost :func:`interrupt_scope` (None outside one)."""
    return _INTERRUPT.get()


__all__ = ["CallState", "EAGER", "ModelImpl", "call_scope", "current_cache", "current_call", "current_interrupt",
           "current_sharding", "interrupt_scope", "not_a_view", "static_dims"]
