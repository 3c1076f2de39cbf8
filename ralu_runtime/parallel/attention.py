"""Exact attention over a sequence sharded across ranks, and the row gathers around it.

Layout: the joint sequence of one model call (FLUX: ``[text ; image]``, ``total`` rows) is cut into
``world = ring * ulysses`` contiguous shards with ``torch.tensor_split`` sizes (:func:`split_sizes`: the first
``total % world`` shards one row longer), shard ``f`` on the rank whose flattened index is
``f = ring_rank * ulysses + ulysses_rank`` (diffusers' ``("ring", "ulysses")`` device-mesh order). Every rank knows
every shard's size from ``total`` alone, so nothing about shapes is ever exchanged (no host sync, and the sizes are
plain ints for ``torch.compile``). Uneven shards are padded to the longest one (``P`` rows) for the collectives and
the padding is removed again before it can reach a softmax.

:func:`sequence_attention` (the ``ralu::sequence_attention`` custom op, opaque to dynamo so a compiled block stays
one graph): with local ``q, k, v (B, S_f, H, D)``,

1. Ulysses (``ulysses > 1``): one all-to-all in the ulysses group trades rows for heads: every rank then holds the
   rows of its ulysses group for ``ceil(H / ulysses)`` heads (heads zero-padded to a multiple of ``ulysses``);
2. ring (``ring > 1``): one all-gather of K and V in the ring group (the ranks with the same head slice) completes
   the key set (diffusers' ring attention with ``rotate_method="allgather"`` gathers the same K/V; here one softmax
   runs over all keys instead of merging per-chunk log-sum-exps);
3. padded key rows are dropped (the keys are then in the original ``[text ; image]`` order) and the attention runs
   with diffusers' ``dispatch_attention_fn`` (the processor's backend, as in the single-process call);
4. Ulysses again: the reverse all-to-all returns every rank its own rows with all heads.

Exact: every query attends to exactly the keys of the unsharded call, in the same order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist


def split_sizes(total: int, parts: int) -> list[int]:
    """Row counts of ``torch.tensor_split(range(total), parts)``: the first ``total % parts`` one longer."""
    q, r = divmod(int(total), int(parts))
    return [q + (1 if i < r else 0) for i in range(parts)]


def shard_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` rows of shard ``index`` of :func:`split_sizes`."""
    sizes = split_sizes(total, parts)
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass(frozen=True)
class AttentionSpec:
    """What the attention op needs besides tensors: process-group names (``""``: no group), degrees, and the
    diffusers attention backend name (``""``: diffusers' active default). Instances are interned (:func:`spec`), so
    a compiled block function sees the same object in every call."""

    ulysses_group: str = ""
    ring_group: str = ""
    ulysses: int = 1
    ring: int = 1
    backend: str = ""


@functools.lru_cache(maxsize=None)
def spec(ulysses_group: str = "", ring_group: str = "", ulysses: int = 1, ring: int = 1,
         backend: str = "") -> AttentionSpec:
    """The interned :class:`AttentionSpec` with these fields."""
    return AttentionSpec(ulysses_group, ring_group, int(ulysses), int(ring), backend or "")


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def all_gather_flat(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``x`` (same shape on every rank) in ``group``: ``(world, *x.shape)`` in group-rank order."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.13 / older
    gather(out, x.reshape(-1), group=group)
    return out.view(world, *x.shape)


def all_to_all_flat(x: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of ``x (world, ...)`` in ``group``: block ``i`` goes to group rank ``i``; returns the blocks
    received, block ``j`` from group rank ``j``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


_INDEX: dict = {}


def _valid_rows(sizes: tuple[int, ...], pad: int, device) -> torch.Tensor:
    """Positions of the real rows in the padded layout ``len(sizes) x pad`` (shard-major), in shard order."""
    key = (sizes, pad, str(device))
    idx = _INDEX.get(key)
    if idx is None:
        idx = torch.cat([torch.arange(s, device=device) + i * pad for i, s in enumerate(sizes)])
        if len(_INDEX) > 256:
            _INDEX.clear()
        _INDEX[key] = idx
    return idx


def gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """``x (B, sizes[f], C...)`` on the rank of shard ``f`` -> ``(B, sum(sizes), C...)`` on every rank (rows
    concatenated in shard order; uneven shards padded for the collective and unpadded after)."""
    pad = max(sizes)
    if x.shape[1] < pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad - x.shape[1], *x.shape[2:])], dim=1)
    g = all_gather_flat(x, group)                                # (N, B, P, ...)
    g = g.transpose(0, 1).reshape(x.shape[0], len(sizes) * pad, *x.shape[2:])
    if all(s == pad for s in sizes):
        return g
    return g.index_select(1, _valid_rows(tuple(sizes), pad, x.device))


def _attend(q, k, v, backend: str):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(q, k, v, attn_mask=None, backend=backend or None)


def sequence_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, total: int,
                            ulysses_group: str, ring_group: str, ulysses: int, ring: int, backend: str) -> torch.Tensor:
    """Eager body of the ``ralu::sequence_attention`` op (see the module docstring). ``q, k, v (B, S_f, H, D)``:
    this rank's rows of a ``total``-row sequence; returns ``(B, S_f, H, D)``."""
    world = ulysses * ring
    if world == 1:
        return _attend(q, k, v, backend)
    b, s, h, d = q.shape
    if ulysses > 1:
        ug = _group(ulysses_group)
        f = dist.get_rank(_group(ring_group)) * ulysses + dist.get_rank(ug) if ring > 1 else dist.get_rank(ug)
    else:
        f = dist.get_rank(_group(ring_group))
    sizes = split_sizes(total, world)
    if sizes[f] != s:
        raise RuntimeError(f"sequence_attention: this rank (shard {f} of {world}) holds {s} rows, but a {total}-row "
                           f"sequence gives it {sizes[f]}: the ranks disagree about the call's shapes")
    pad = max(sizes)
    hp = -(-h // ulysses) * ulysses  # heads padded to a multiple of the ulysses degree
    hl = hp // ulysses
    x = torch.stack([q, k, v])                                   # (3, B, S, H, D)
    if pad > s or hp > h:
        x = torch.nn.functional.pad(x, (0, 0, 0, hp - h, 0, pad - s))
    if ulysses > 1:  # rows for heads: block u of the send buffer = head slice u
        x = x.view(3, b, pad, ulysses, hl, d).permute(3, 0, 1, 2, 4, 5)
        x = all_to_all_flat(x, ug)                               # (U, 3, B, P, hl, D): block j = rank j's rows
        x = x.permute(1, 2, 0, 3, 4, 5).reshape(3, b, ulysses * pad, hl, d)
    q2, kv = x[0], x[1:]
    if ring > 1:  # the other ulysses groups' rows of the same head slice
        kv = all_gather_flat(kv, _group(ring_group))             # (R, 2, B, U*P, hl, D)
        kv = kv.permute(1, 2, 0, 3, 4, 5).reshape(2, b, world * pad, hl, d)
    if any(n != pad for n in sizes):
        kv = kv.index_select(2, _valid_rows(tuple(sizes), pad, q.device))
    out = _attend(q2, kv[0], kv[1], backend)                     # (B, U*P, hl, D)
    if ulysses > 1:  # back: block j of the send buffer = rank j's rows
        out = out.reshape(b, ulysses, pad, hl, d).permute(1, 0, 2, 3, 4)
        out = all_to_all_flat(out, ug)                           # (U, B, P, hl, D): block j = head slice j
        out = out.permute(1, 2, 0, 3, 4).reshape(b, pad, hp, d)
    return out[:, :s, :h]


@torch.library.custom_op("ralu::sequence_attention", mutates_args=())
def _sequence_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, total: int, ulysses_group: str,
                           ring_group: str, ulysses: int, ring: int, backend: str) -> torch.Tensor:
    return sequence_attention_impl(q, k, v, total, ulysses_group, ring_group, ulysses, ring, backend).contiguous()


@_sequence_attention_op.register_fake
def _(q, k, v, total, ulysses_group, ring_group, ulysses, ring, backend):
    return torch.empty_like(q)


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, total: int,
                       spec: AttentionSpec) -> torch.Tensor:
    """Attention of this rank's rows ``q, k, v (B, S_f, H, D)`` of a ``total``-row sequence sharded as in
    :func:`split_sizes`, against the keys of all ranks: ``(B, S_f, H, D)``. One custom op (``torch.compile``
    keeps a block with it as one graph); the plain attention call when ``spec`` has no group."""
    if spec.ulysses * spec.ring == 1:
        return _attend(q, k, v, spec.backend)
    return _sequence_attention_op(q, k, v, total, spec.ulysses_group, spec.ring_group, spec.ulysses, spec.ring,
                                  spec.backend)
