"""The sequence-parallel plan of the running ``generate`` call: the ``sharding`` field of the call's
:class:`~ralu_runtime.execution.call.CallState` (this thread only)."""
from __future__ import annotations

import contextlib

from ..execution.call import call_scope, current_call, current_sharding


def current_parallel():
    """The :class:`~ralu_runtime.parallel.SequenceParallel` plan of the ``generate`` call running in this thread,
    or None (no context parallelism)."""
    return current_sharding()


@contextlib.contextmanager
def parallel_scope(plan):
    """Model calls in this block (this thread) run under ``plan`` (None: unsharded): set on the current call's state
    (a new one when no call is running)."""
    state = current_call()
    if state is None:
        with call_scope(sharding=plan) as new:
            yield new.sharding
        return
    before = state.sharding
    state.sharding = plan
    try:
        yield plan
    finally:
        state.sharding = before
