"""torch's intra-op CPU thread count for a block of code.

:func:`one_thread` runs a block with ``torch.set_num_threads(1)``: batched small LAPACK calls (the analytic oracles'
Cholesky solves and eigendecompositions of many small matrices) run far faster single-threaded on a busy CPU, with no
OpenMP spin-waits. The setting is process-wide: calls from other threads during the block run single-threaded too.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["one_thread"]


@contextlib.contextmanager
def one_thread():
    """Run the block with torch's intra-op thread count at 1, restoring the previous count after (exceptions too)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
