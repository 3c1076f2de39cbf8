"""Process-wide settings that a ralu call needs while it runs, shared by concurrent calls.

Some of torch's switches are global to the process: the SDPA backend flags and priority order always, and the
dynamo/fx config before torch keeps it per thread (torch 2.11 does not, 2.13 does; :func:`config_is_per_thread`
asks the running torch). A :class:`SharedSetting` enters its context when the first concurrent user arrives and
exits it (restoring what it found) when the last one leaves, whichever thread that is, so overlapping calls in
several threads never restore each other's values half-way, and between ralu calls the switches are exactly as
the user left them. A user arriving while the setting is active under other arguments runs under the active ones.
Where a switch is global, another thread's own work (the user's torch.compile) sees ralu's values while a ralu
call runs; where torch keeps config per thread, :func:`dynamo_settings` patches the calling thread only.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable


class SharedSetting:
    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0
        self._ctx = None

    @contextlib.contextmanager
    def __call__(self, factory: Callable[[], contextlib.AbstractContextManager]):
        with self._lock:
            if self._count == 0:
                ctx = factory()
                ctx.__enter__()
                self._ctx = ctx
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1
                if self._count == 0:
                    ctx, self._ctx = self._ctx, None
                    ctx.__exit__(None, None, None)

    @property
    def active(self) -> bool:
        return self._count > 0


# ------------------------------------------------------------------------------------------------ dynamo / fx config
@functools.lru_cache(maxsize=None)
def config_is_per_thread() -> bool:
    """Whether this torch keeps its dynamo/fx config per thread (context variables): a value patched in this thread
    is not seen by a new thread. Probed once, with a patch held for the probe thread's lifetime only."""
    import torch.fx.experimental._config as fxcfg

    seen = []
    with fxcfg.patch(use_duck_shape=not fxcfg.use_duck_shape):
        patched = fxcfg.use_duck_shape
        probe = threading.Thread(target=lambda: seen.append(fxcfg.use_duck_shape), name="ralu-config-probe")
        probe.start()
        probe.join()
    return seen[0] != patched


def _patched_dynamo_config() -> contextlib.ExitStack:
    import torch._dynamo.config as dcfg
    import torch.fx.experimental._config as fxcfg

    stack = contextlib.ExitStack()
    # duck sizing would tie a token count to an equal model dimension (e.g. 16 tokens, head_dim 16)
    stack.enter_context(fxcfg.patch(use_duck_shape=False))
    # static mode: one graph per stage shape and block kind, more than the default limit of 8
    stack.enter_context(dcfg.patch(recompile_limit=max(dcfg.recompile_limit, 64)))
    # the block modules are arguments, so their float attributes (norm eps, dropout p) would become symbolic floats
    # that a later pass specialises by restarting the trace: one extra trace per block kind at a cold compile. No
    # float that changes between calls enters a block function (timesteps and scales are tensors)
    stack.enter_context(dcfg.patch(specialize_float=True))
    return stack


_DYNAMO = SharedSetting()


def dynamo_settings() -> contextlib.AbstractContextManager:
    """The dynamo/fx switches a compiled ralu call needs (no duck sizing, recompile limit at least 64, specialised
    floats), put back when the call ends: for the calling thread only where torch keeps config per thread, else
    process-wide as a :class:`SharedSetting` (held from the first concurrent call's start to the last one's end)."""
    if config_is_per_thread():
        return _patched_dynamo_config()
    return _DYNAMO(_patched_dynamo_config)
