"""The sequence-parallel plan of the running ``generate`` call (a context variable; this thread only).

Kept apart from the rest of :mod:`ralu_runtime.parallel` so that adapters can ask for it without importing
``torch.distributed`` machinery.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any

_PLAN: contextvars.ContextVar[Any] = contextvars.ContextVar("ralu_parallel_plan", default=None)


def current_parallel():
    """The :class:`~ralu_runtime.parallel.SequenceParallel` plan of the ``generate`` call running in this thread,
    or None (no context parallelism)."""
    return _PLAN.get()


@contextlib.contextmanager
def parallel_scope(plan):
    """Model calls in this block (this thread) run under ``plan`` (None: unsharded)."""
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)
