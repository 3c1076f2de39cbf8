"""Run a function in N local processes joined by a process group: context parallelism on one machine.

For tests and ``benchmarks/context_parallel.py`` (gloo on a CPU; NCCL with one GPU per process). Every worker gets
``MASTER_ADDR`` / ``MASTER_PORT`` (a free local port) and ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` like under
torchrun, selects ``cuda:<rank>`` for NCCL, joins ``init_process_group`` with a timeout (so a collective that never
completes fails instead of hanging), runs ``target(**kwargs)`` and returns its result (anything ``torch.save`` can
write) through a temporary folder. :func:`run_local` waits at most ``timeout`` seconds, terminates the workers it
started when that passes, and re-raises a worker's exception with its traceback. A worker that dies by a signal after every rank has saved its result and
passed the final barrier (a crash in the process group's teardown) is reported as a RuntimeWarning, not an error.

Workers start from a fork server by default (``start_method="forkserver"``): one clean process per parent that has
imported torch, diffusers' model classes and ralu once (:data:`PRELOAD`); each worker is forked from it, so a
4-rank run pays those imports (about 5 s of CPU per process) once per parent instead of once per worker. The fork
server never touches CUDA or torch's thread pools, so forking from it is safe for gloo and NCCL alike. Each worker
takes the caller's environment as it is at the call (the fork server's own is from its start).
``start_method="spawn"`` starts every worker from scratch.
"""
from __future__ import annotations

import datetime
import importlib
import os
import socket
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _resolve(target):
    if callable(target):
        return target
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


START_METHODS = ("forkserver", "spawn")

#: modules the fork server imports once (a missing one is skipped by multiprocessing): what every worker of ralu's
#: models needs, the expensive part being diffusers' transformer and autoencoder modules
PRELOAD = ("torch", "torch.distributed", "diffusers.models.transformers", "diffusers.models.autoencoders",
           "ralu_runtime.api", "ralu_runtime.parallel.launch")


def _entry(rank: int, target, world: int, port: int, kwargs: dict, folder: str, threads: int, timeout: float,
           backend: str = "gloo", environ: dict | None = None):
    if environ is not None:  # the caller's environment at the call (a fork server's is from its own start)
        os.environ.clear()
        os.environ.update(environ)
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
    try:
        result = _resolve(target)(**kwargs)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
        dist.barrier()
        (Path(folder) / f"rank{rank}.done").touch()  # every rank has its result: only the teardown is left
    finally:
        dist.destroy_process_group()


def run_local(target, world_size: int = 2, *, backend: str = "gloo", kwargs: dict | None = None,
              timeout: float = 300.0, threads: int = 1, start_method: str = "forkserver") -> list:
    """``target(**kwargs)`` in ``world_size`` processes joined by ``backend`` ("gloo", or "nccl" with one GPU per
    process); returns each rank's result (rank order).

    ``target``: a module-level function or ``"module:function"`` (the workers import it). ``threads``: torch
    threads per worker. ``start_method``: "forkserver" (workers forked from a server that preloaded
    :data:`PRELOAD`) or "spawn" (fresh interpreters). Raises ValueError for another start method, TimeoutError after
    ``timeout`` seconds (the workers are terminated), or the first worker's exception
    (``torch.multiprocessing.ProcessRaisedException`` with its traceback)."""
    if start_method not in START_METHODS:
        raise ValueError(f"start_method={start_method!r} is not supported: use one of {START_METHODS}")
    import torch.multiprocessing as mp

    if start_method == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ralu-workers-") as folder:
        ctx = mp.start_processes(_entry, args=(target, world_size, port, kwargs or {}, folder, threads, timeout,
                                               backend, dict(os.environ)),
                                 nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} {backend} workers did not finish within {timeout:.0f} s")
        except mp.ProcessExitedException as exc:  # killed by a signal, or exited without a Python exception
            if not all((Path(folder) / f"rank{r}.done").exists() for r in range(world_size)):
                raise
            # every rank had saved its result and passed the final barrier: the crash was in the process group's
            # teardown (gloo has aborted there: "terminate called without an active exception"), not in the work
            import warnings

            warnings.warn(f"a {backend} worker died after the work was done ({exc}); its results are kept",
                          RuntimeWarning, stacklevel=2)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        import torch

        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def run_gloo(target, world_size: int = 2, *, kwargs: dict | None = None, timeout: float = 300.0,
             threads: int = 1, start_method: str = "forkserver") -> list:
    """:func:`run_local` with gloo (CPU processes)."""
    return run_local(target, world_size, backend="gloo", kwargs=kwargs, timeout=timeout, threads=threads,
                     start_method=start_method)
