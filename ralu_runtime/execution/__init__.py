"""Execution modes of a model call, below the adapters: a family's block functions are written once against
:class:`Mode` and run unchanged as one request (:class:`Dense`), as many requests packed into one call
(:class:`~.packing.Packed`) or as one request sharded across ranks (:class:`~.sharding.Sharded`).

Model independent; imports nothing from the adapters, the sampler, ``parallel/`` or ``serving/`` (except the
adapters' per-call state where a packing check reads it). Submodules: :mod:`.modes` (the interface, Dense),
:mod:`.packing` (packed layouts, padding, the packed mode), :mod:`.sharding` (shard sizes, the exact sharded
attention op, row gathers, the sharded mode).
"""
from .modes import DENSE, JOINT, Dense, Mode, PerRequest

__all__ = ["DENSE", "Dense", "JOINT", "Mode", "PerRequest"]
