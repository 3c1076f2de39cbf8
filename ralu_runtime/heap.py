"""Python heap hygiene after compiling: :func:`settle_heap`.

Compiling (dynamo, inductor, CUDA-graph capture) creates hundreds of thousands of Python objects. Afterwards a full
(generation-2) garbage collection is due soon, and it pauses whichever call triggers it: measured on a 2-core CPU
(small FLUX, RALU 7x, 16 or 40 calls after a dynamo warm-up), one collection of 294-311 ms in 3 of 6 runs; none in
5 runs after one ``gc.collect()``. ``generate`` collects at the end of a call that compiled something (so a
:func:`ralu_runtime.warmup.warmup` does too), and ``ralu serve`` / Ray replicas (processes of ralu's own) also
freeze the heap after warm-up.
"""
from __future__ import annotations

import gc
import time


def settle_heap(freeze: bool = False) -> float:
    """A full garbage collection (``gc.collect()``), and with ``freeze`` ``gc.freeze()``: seconds taken.

    Collecting once after compiling moves the full collection the compiler's garbage makes due out of the traffic
    (see the module docstring).
    ``freeze=True`` (for a server's own process: ``ralu serve``, Ray replicas) also moves every object alive now to
    the permanent generation, so later collections never scan the model, the compiled code and the libraries again
    (process-wide, and those objects are never freed: not for a library to do in a user's process)."""
    t0 = time.perf_counter()
    gc.collect()
    if freeze:
        gc.freeze()
    return time.perf_counter() - t0
