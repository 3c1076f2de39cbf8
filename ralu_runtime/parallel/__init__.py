"""Context parallelism: one image's model calls split across several GPUs (``generate(..., parallel=...)``).

Launch one process per GPU (``torchrun --nproc-per-node N``), initialise ``torch.distributed`` (NCCL on GPUs, gloo
on CPUs), and call ``generate`` on every rank with the same arguments and a diffusers
``ContextParallelConfig(ulysses_degree=U, ring_degree=R)`` with ``U * R`` = the number of ranks::

    from diffusers import ContextParallelConfig
    out = ralu_runtime.generate(pipe, prompt, seed=0, parallel=ContextParallelConfig(ulysses_degree=4))

A transformer on which ``enable_parallelism(config=ContextParallelConfig(...))`` was called is run under that
config without ``parallel=`` (its process groups are used; its hooks are not: ralu runs the blocks itself and does
its own sharding).

Why ralu shards itself: ralu runs each family's blocks with its own attention call and per-token positions and
never calls ``transformer.forward``, where diffusers' ``_cp_plan`` hooks split the inputs; and RALU's token counts
change per stage and are rarely divisible by the number of GPUs. Here every model call's joint ``[text ; image]``
sequence is cut into contiguous shards of any sizes; attention is exact (Ulysses all-to-all over heads, K/V
all-gather across ring groups, padding removed before the softmax: :mod:`ralu_runtime.execution.sharding`); the
velocity is all-gathered so every rank holds the same state, and the ranks' inputs are compared at each stage
(:mod:`.plan`). The blocks run in the ``Sharded`` execution mode that this package's plan drives.

Supported: every family (FLUX.1, SD3/SD3.5, FLUX.2, Qwen-Image, Z-Image, Chroma, Wan, HunyuanVideo 1.5), eager
and ``backend="inductor"`` (the attention is one custom op inside the compiled block graphs), feature caches
(``cache="taylorseer:..."``, ``"fbcache:..."``), any ulysses x ring factorisation, token counts and head counts
that do not divide. Refused before any work: the onnx / tensorrt backends, the serving engine's batched calls,
diffusers tensor parallelism, configs that do not match the process group, a model whose sharded call cannot run
(``adapter.check_shardable``: SD3 with another attention processor or hooks on its blocks), a Wan size whose smallest
model call has fewer image tokens than ranks (Wan shards the image tokens only).
"""
from __future__ import annotations

import numbers

from ..execution.sharding import AttentionSpec, sequence_attention, shard_range, split_sizes
from .plan import RanksDivergedError, SequenceParallel

EXPORTED_BACKENDS = ("onnx", "tensorrt")


def _context_config_class():
    try:
        from diffusers import ContextParallelConfig
    except ImportError:  # pragma: no cover - diffusers without context parallelism
        return None
    return ContextParallelConfig


def _shards(adapter) -> bool:
    """True when the adapter's model call runs sharded (``adapter.shards``: its blocks take a
    :class:`~ralu_runtime.execution.sharding.Sharded` mode)."""
    return bool(getattr(adapter, "shards", False))


def resolve_parallel(parallel, adapter, *, backend: str | None = None):
    """The :class:`SequenceParallel` plan of a ``generate`` call, or None. Checks only (no collective, no group).

    ``parallel``: None, or a diffusers ``ContextParallelConfig``. With None, a transformer that carries a diffusers
    context-parallel config (``enable_parallelism``) is run under it. ``backend``: the call's compile backend (None:
    the installed one).
    Raises TypeError / ValueError naming the problem.
    """
    tr = getattr(adapter, "transformer", None)
    pconf = getattr(tr, "_parallel_config", None) if tr is not None else None
    model_cfg = getattr(pconf, "context_parallel_config", None)
    if getattr(pconf, "tensor_parallel_config", None) is not None:
        raise ValueError("the transformer carries a diffusers tensor-parallel config (enable_parallelism with "
                         "TensorParallelConfig): ralu runs the blocks' layers itself and does not support tensor "
                         "parallelism; use context parallelism (generate(parallel=ContextParallelConfig(...)))")
    if parallel is None and model_cfg is None:
        return None
    cls = _context_config_class()
    if parallel is not None and (cls is None or not isinstance(parallel, cls)):
        raise TypeError(f"parallel={parallel!r} is not allowed: give a diffusers ContextParallelConfig(ulysses_degree="
                        "..., ring_degree=...) or None")
    if parallel is not None and model_cfg is not None and \
            (parallel.ulysses_degree, parallel.ring_degree) != (model_cfg.ulysses_degree, model_cfg.ring_degree):
        raise ValueError(f"parallel= asks for ulysses_degree={parallel.ulysses_degree}, ring_degree="
                         f"{parallel.ring_degree} but the transformer was set up by enable_parallelism with "
                         f"ulysses_degree={model_cfg.ulysses_degree}, ring_degree={model_cfg.ring_degree}: pass the "
                         "same degrees, or none (the model's config is then used)")
    cfg = model_cfg if model_cfg is not None else parallel
    where = "parallel=" if model_cfg is None else "the transformer's context-parallel config"
    for name in ("ulysses_degree", "ring_degree"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{where}: {name}={value!r} is not allowed: give an int >= 1 (ulysses_degree x "
                             "ring_degree ranks)")
    if not _shards(adapter):
        raise ValueError(f"{where}: context parallelism is not implemented for "
                         f"{getattr(adapter, 'family', type(adapter).__name__)} ({type(adapter).__name__}); run it "
                         "unsharded (no parallel=)")
    check = getattr(adapter, "check_shardable", None)
    if check is not None:  # what this model's sharded call cannot run (SD3: custom attention processors, hooks)
        check()
    if backend is None and getattr(adapter, "runner", None) is not None:
        backend = adapter.runner.options.backend
    if backend in EXPORTED_BACKENDS:
        raise ValueError(f"{where}: backend={backend!r} exports the model call as one graph, which cannot hold the "
                         "cross-rank collectives; use backend='eager' or 'inductor'")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{where}: torch.distributed is not initialised: launch with torchrun (one process per "
                         "GPU) and call torch.distributed.init_process_group() (NCCL on GPUs, gloo on CPUs) before "
                         "generate")
    ulysses, ring = int(cfg.ulysses_degree or 1), int(cfg.ring_degree or 1)
    mesh = getattr(cfg, "_mesh", None) or getattr(cfg, "mesh", None)
    if mesh is not None:
        names = tuple(mesh.mesh_dim_names or ())
        if "ring" not in names or "ulysses" not in names:
            raise ValueError(f"{where}: the device mesh needs dimensions named 'ring' and 'ulysses' (got {names})")
        sizes = (mesh["ring"].size(), mesh["ulysses"].size())
        if sizes != (ring, ulysses):
            raise ValueError(f"{where}: the mesh's ring x ulysses sizes are {sizes}, the config asks for "
                             f"({ring}, {ulysses})")
    elif ulysses * ring != dist.get_world_size():
        raise ValueError(f"{where}: ulysses_degree x ring_degree = {ulysses} x {ring} = {ulysses * ring}, but the "
                         f"process group has {dist.get_world_size()} ranks: they must be equal (or give a device mesh)")
    device = adapter.device
    comm = str(dist.get_backend()).lower()
    need = {"cpu": ("gloo", "mpi"), "cuda": ("nccl",)}.get(device.type)
    if need is not None and not any(n in comm for n in need):
        raise ValueError(f"{where}: the model is on {device.type} but torch.distributed uses {comm!r}: use "
                         f"{' or '.join(need)} for {device.type} tensors (init_process_group(backend=...))")
    return SequenceParallel(cfg, ulysses=ulysses, ring=ring, device=device,
                            source="argument" if model_cfg is None else "model")


__all__ = ["AttentionSpec", "RanksDivergedError", "SequenceParallel", "resolve_parallel", "sequence_attention",
           "shard_range", "split_sizes"]
