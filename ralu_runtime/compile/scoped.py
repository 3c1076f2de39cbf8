"""Process-wide settings that a ralu call needs while it runs, shared by concurrent calls.

Some of torch's switches are global to the process (the SDPA backend flags and priority order; torch's
dynamo/fx config, by contrast, is per thread and is simply patched around each call). A
:class:`SharedSetting` enters its context when the first concurrent user arrives and exits it (restoring what
it found) when the last one leaves, whichever thread that is, so overlapping calls in several threads never
restore each other's values half-way, and between ralu calls the switches are exactly as the user left them.
A user arriving while the setting is active under other arguments runs under the active ones.
"""
from __future__ import annotations

import contextlib
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
