"""CUDA graphs of whole model calls, one pool of captured instances per input signature (packed calls of many
requests: per bucket of padded sizes, :mod:`.packed`).

A CUDA graph owns static input/output buffers. Each call checks an instance out of its signature's pool (a new
one is captured when every existing one is busy), copies its inputs in, replays, clones the output and hands
the instance back with a CUDA event that the next user's stream waits on: static buffers are never shared
between concurrent calls (threads or streams). :meth:`GraphPool.clear` drops every instance (the runner does
this when the model's layers or parameters were replaced: a captured graph would replay the old ones).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from .flatten import Spec, unflatten


class GraphInstance:
    """One captured CUDA graph of the model call with its own static inputs and output."""

    def __init__(self, fn: Callable, tensors: list[torch.Tensor], spec: Spec, warmup_iters: int = 2, *,
                 unpack: Callable = unflatten, pool=None):
        self.static = [t.clone() for t in tensors]
        args = unpack(self.static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_iters):  # first call compiles / autotunes: never inside the capture
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = fn(*args)
        self.ready: torch.cuda.Event | None = None

    def run(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.current_stream()
        if self.ready is not None:
            stream.wait_event(self.ready)
        for dst, src in zip(self.static, tensors):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        out = self.out.clone()
        self.ready = torch.cuda.Event()
        self.ready.record(stream)
        return out


class GraphPool:
    """Per-signature pools of graph instances; a call checks one out, so concurrent calls never share one."""

    _build_lock = threading.Lock()  # one capture at a time in the process

    def __init__(self):
        self._free: dict[Any, list[GraphInstance]] = {}
        self._count: dict[Any, int] = {}
        self._lock = threading.Lock()
        self._generation = 0

    def run(self, key, fn, tensors, spec, on_build: Callable[[Any, float], None], *, unpack: Callable = unflatten,
            pool=None) -> torch.Tensor:
        """Replay the graph of ``key`` on ``tensors`` (capturing one first if none is free). ``fn(*unpack(tensors,
        spec))`` is the call captured; ``pool``: a memory pool shared with other captures (their replays must then
        never overlap: the caller serialises them)."""
        with self._lock:
            free = self._free.setdefault(key, [])
            inst = free.pop() if free else None
            generation = self._generation
        if inst is None:
            t0 = time.perf_counter()
            with self._build_lock:
                inst = GraphInstance(fn, tensors, spec, unpack=unpack, pool=pool)
            torch.cuda.synchronize()
            on_build(key, time.perf_counter() - t0)
            with self._lock:
                self._count[key] = self._count.get(key, 0) + 1
        try:
            return inst.run(tensors)
        finally:
            with self._lock:
                if generation == self._generation:  # not cleared meanwhile: the instance may be reused
                    self._free.setdefault(key, []).append(inst)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._count.clear()
            self._generation += 1

    def instances(self) -> int:
        return sum(self._count.values())
