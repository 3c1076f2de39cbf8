"""Packed model calls under an installed backend: :meth:`StageRunner.packed` (the serving engine's batched step).

The serving engine runs the model calls of many requests -- each at its own stage, resolution, timestep and text
length -- as one packed transformer call (``adapter.packed_velocity``). With a backend installed the runner runs it:

* **inductor**: the adapter's packed block functions (``flux_double_packed``, ``flux_single_packed``,
  ``sd3_joint_packed``) are compiled by the runner's :class:`~.impl.BackendImpl` with ``dynamic=True``: the packed
  token and segment counts are symbolic and the segment layout is device tensors only
  (:class:`ralu_runtime.execution.packing.PackedSegments`), so a new mix of requests runs the graphs already compiled
  (no recompile; counted by ``tests/test_packed_compile.py``). Fused q/k/v projections where the unpacked call uses
  them.
* **CUDA graphs** (inductor on CUDA by default, or ``cuda_graphs=True``): the whole packed call is captured once per
  *bucket* -- the packed image-token count, text-token count and segment count each rounded up
  (:class:`PackedBuckets`) -- and replayed for every mix that falls in it. The padding is one extra attention segment
  of its own (padding tokens attend only to padding; real tokens never see it) and is sliced off the output, so it
  changes no real result. The packed captures share one memory pool and run one at a time per runner.
* **eager**: the plain packed call (CUDA graphs per bucket when ``cuda_graphs=True``).
* **onnx / tensorrt**: no packed call (an exported graph has fixed structure per input signature); :meth:`packed`
  runs the calls one by one through the runner, as before.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from ..adapters.base import VelocityCall
from ..execution.packing import PackedExecution
from .options import BuildRecord


@dataclass(frozen=True)
class PackedBuckets:
    """How packed lengths are rounded up for CUDA-graph capture (one graph per bucket of every dimension).

    Tokens (image and text streams alike): buckets start at ``min_tokens`` and grow by ``growth`` (rounded up to a
    multiple of ``align``): 256, 320, 448, 576, 768, 960, 1216, 1536, 1920, 2432, 3072, 3840, 4800, 6016, 7552,
    9472, 11840, 14848, 18560, ... with the defaults, so padding costs at most ``growth - 1`` (25 %) of a call plus
    the alignment, and the tokens of a 16 k-token budget fall into ~18 buckets. Segments (images + the padding
    segment): powers of two from ``min_segments``."""

    min_tokens: int = 256
    growth: float = 1.25
    align: int = 64
    min_segments: int = 2

    def __post_init__(self):
        if self.min_tokens < 1 or self.align < 1 or self.min_segments < 2 or not self.growth > 1:
            raise ValueError(f"{self}: need min_tokens >= 1, align >= 1, min_segments >= 2, growth > 1")

    def tokens(self, n: int) -> int:
        """The token bucket of ``n`` tokens: the smallest bucket >= n."""
        b = _align(self.min_tokens, self.align)
        while b < n:
            b = _align(math.ceil(b * self.growth), self.align)
        return b

    def segments(self, n: int) -> int:
        b = self.min_segments
        while b < n:
            b *= 2
        return b

    def size(self, kind: str, n: int) -> int:
        return self.segments(n) if kind == "segments" else self.tokens(n)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _as_args(tensors, _spec):
    return tensors


class RunnerExecution(PackedExecution):
    """The adapter's :class:`PackedExecution` for a :class:`StageRunner`: its impl (compiled blocks, fused weights),
    CUDA graphs per bucket when ``graphs``, and the runner's own call as the per-call fallback."""

    def __init__(self, runner, graphs: bool):
        super().__init__(runner.adapter, runner.impl)
        self.runner = runner
        self.graphs = graphs
        self.static_layout = graphs or runner.impl.compiles_blocks

    def pad(self, kind: str, n: int) -> int:
        return self.runner.packed_buckets.size(kind, n) if self.graphs else n

    def run(self, key, forward, tensors):
        if not self.graphs:
            return forward(*tensors)
        runner = self.runner
        sig = ("packed", key) + tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)

        def built(_key, seconds):
            # tokens: the padded image stream; batch: the segments (the layout's cu_seqlens come last)
            runner._record_build(BuildRecord("cuda_graph_packed", int(tensors[0].shape[0]),
                                             int(tensors[-1].shape[0]) - 1, seconds))

        return runner._graphs.run(sig, forward, tensors, None, built, unpack=_as_args, pool=runner._packed_pool())

    def velocity(self, call: VelocityCall) -> torch.Tensor:
        return self.runner(call.tokens, call.grid, call.timestep, call.cond)


class PackedState:
    """A runner's packed-call state: the shared memory pool of its packed CUDA graphs and the lock that keeps their
    replays one at a time (graphs sharing a pool must not run concurrently)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pool = None

    def pool_handle(self):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        return self.pool


__all__ = ["PackedBuckets", "PackedState", "RunnerExecution"]
