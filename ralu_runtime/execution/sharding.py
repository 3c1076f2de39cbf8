"""The sharded execution mode: one request's model call with its joined sequence cut across ranks, and the exact
attention and row gathers it needs. Model independent; a family's block functions run on it unchanged
(:class:`Sharded`, a :class:`~ralu_runtime.execution.modes.Mode`).

Layout: the joined sequence of one model call (FLUX: ``[text ; image]``, ``total`` rows) is cut into
``world = ring * ulysses`` contiguous shards with ``torch.tensor_split`` sizes (:func:`split_sizes`: the first
``total % world`` shards one row longer), shard ``f`` on the rank whose flattened index is
``f = ring_rank * ulysses + ulysses_rank`` (diffusers' ``("ring", "ulysses")`` device-mesh order). Every rank knows
every shard's size from the stream lengths alone, so nothing about shapes is ever exchanged (no host sync, and the
sizes are plain ints for ``torch.compile``). Uneven shards are padded to the longest one (``P`` rows) for the
collectives and the padding is removed again before it can reach a softmax.

:func:`sequence_attention` (the ``ralu::sequence_attention`` custom op, opaque to dynamo so a compiled block stays
one graph): with local ``q, k, v (B, S_f, H, D)``,

1. Ulysses (``ulysses > 1``): one all-to-all in the ulysses group trades rows for heads: every rank then holds the
   rows of its ulysses group for ``ceil(H / ulysses)`` heads (heads zero-padded to a multiple of ``ulysses``);
2. ring (``ring > 1``): one all-gather of K and V in the ring group (the ranks with the same head slice) completes
   the key set (diffusers' ring attention with ``rotate_method="allgather"`` gathers the same K/V; here one softmax
   runs over all keys instead of merging per-chunk log-sum-exps);
3. padded key rows are dropped (the keys are then in the original order), an optional key mask ``(B, total)`` is
   applied, and the attention runs with diffusers' ``dispatch_attention_fn`` (the processor's backend);
4. Ulysses again: the reverse all-to-all returns every rank its own rows with all heads.

Exact: every query attends to exactly the keys of the unsharded call, in the same order.

Who owns what: the process groups, the consistency checks across ranks and ``generate(parallel=...)`` belong to
:mod:`ralu_runtime.parallel`, which builds the :class:`ShardPlan`-like object this module reads (``world``,
``index``, ``attention_spec(backend)``, ``gather_rows``, ``call_module``). Adapters see only :class:`Sharded`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .modes import DENSE, JOINT, PerRequest, pair_mask_4d


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

    def with_backend(self, backend) -> "AttentionSpec":
        """This spec with diffusers attention ``backend`` (an ``AttentionBackendName``, its string, or None)."""
        name = "" if backend is None else str(getattr(backend, "value", backend))
        return spec(self.ulysses_group, self.ring_group, self.ulysses, self.ring, name)


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
    import torch.distributed as dist

    world = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.13 / older
    gather(out, x.reshape(-1), group=group)
    return out.view(world, *x.shape)


def all_to_all_flat(x: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of ``x (world, ...)`` in ``group``: block ``i`` goes to group rank ``i``; returns the blocks
    received, block ``j`` from group rank ``j``."""
    import torch.distributed as dist

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


def attend_all(q, k, v, backend: str, key_mask: torch.Tensor | None = None, pair=None):
    """Plain attention of ``(B, S, H, D)`` q against all of k, v with diffusers' ``dispatch_attention_fn``
    (``backend`` its name, "" for its default); ``key_mask (B, S_k)`` bool: keys to keep (None: all); ``pair``:
    ``(query rows (B, S_q), key rows (B, S_k))`` of a per-token pair mask (:func:`~.modes.pair_mask_4d`: float values
    added to the logits, bool a hard mask), or None."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    mask = None if key_mask is None else key_mask[:, None, None, :]
    if pair is not None:
        both = pair_mask_4d(*pair)
        if mask is None:
            mask = both
        elif both.dtype == torch.bool:
            mask = both & mask
        else:
            mask = both.masked_fill(~mask, float("-inf"))
    return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend or None)


def _query_rows(pair_mask: torch.Tensor, sizes: list[int], pad: int, first: int, count: int) -> torch.Tensor:
    """The rows of ``pair_mask (B, total)`` for the queries of shards ``first .. first + count - 1``, each padded to
    ``pad`` rows (padding: 0 / False), concatenated: what a rank holds after the Ulysses all-to-all."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total = pair_mask.shape[1]
    idx = []
    for g in range(first, first + count):
        idx += list(range(starts[g], starts[g] + sizes[g])) + [total] * (pad - sizes[g])
    padded = torch.cat([pair_mask, pair_mask.new_zeros(pair_mask.shape[0], 1)], dim=1)
    return padded[:, torch.tensor(idx, device=pair_mask.device)]


def sequence_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: list[int],
                            key_mask: torch.Tensor | None, ulysses_group: str, ring_group: str, ulysses: int,
                            ring: int, backend: str, pair_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eager body of the ``ralu::sequence_attention`` op (see the module docstring). ``q, k, v (B, S_f, H, D)``:
    this rank's rows of a sequence whose shards have ``sizes`` rows (one per rank, in shard order); ``key_mask``:
    ``(B, sum(sizes))`` bool or None; ``pair_mask``: ``(B, sum(sizes))`` per-token pair mask of the whole sequence
    (:func:`~.modes.pair_mask_4d` of its query and key rows) or None; returns ``(B, S_f, H, D)``."""
    import torch.distributed as dist

    world = ulysses * ring
    if world == 1:
        return attend_all(q, k, v, backend, key_mask, None if pair_mask is None else (pair_mask, pair_mask))
    b, s, h, d = q.shape
    if ulysses > 1:
        ug = _group(ulysses_group)
        f = dist.get_rank(_group(ring_group)) * ulysses + dist.get_rank(ug) if ring > 1 else dist.get_rank(ug)
    else:
        f = dist.get_rank(_group(ring_group))
    sizes = [int(n) for n in sizes]
    if len(sizes) != world or sizes[f] != s:
        raise RuntimeError(f"sequence_attention: this rank (shard {f} of {world}) holds {s} rows, but the shard sizes "
                           f"are {sizes}: the ranks disagree about the call's shapes")
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
    pair = None
    if pair_mask is not None:  # the queries here: the shards of this rank's ulysses group, each padded to P rows
        pair = (_query_rows(pair_mask, sizes, pad, f - f % ulysses, ulysses), pair_mask)
    out = attend_all(q2, kv[0], kv[1], backend, key_mask, pair)  # (B, U*P, hl, D)
    if ulysses > 1:  # back: block j of the send buffer = rank j's rows
        out = out.reshape(b, ulysses, pad, hl, d).permute(1, 0, 2, 3, 4)
        out = all_to_all_flat(out, ug)                           # (U, B, P, hl, D): block j = head slice j
        out = out.permute(1, 2, 0, 3, 4).reshape(b, pad, hp, d)
    return out[:, :s, :h]


@torch.library.custom_op("ralu::sequence_attention", mutates_args=())
def _sequence_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: list[int],
                           key_mask: torch.Tensor | None, ulysses_group: str, ring_group: str, ulysses: int,
                           ring: int, backend: str, pair_mask: torch.Tensor | None = None) -> torch.Tensor:
    return sequence_attention_impl(q, k, v, sizes, key_mask, ulysses_group, ring_group, ulysses, ring,
                                   backend, pair_mask).contiguous()


@_sequence_attention_op.register_fake
def _(q, k, v, sizes, key_mask, ulysses_group, ring_group, ulysses, ring, backend, pair_mask=None):
    return torch.empty_like(q)


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes, spec: AttentionSpec,
                       key_mask: torch.Tensor | None = None, pair_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of this rank's rows ``q, k, v (B, S_f, H, D)`` of a sequence sharded into ``sizes`` rows per rank
    (an int ``total`` means :func:`split_sizes` of it), against the keys of all ranks: ``(B, S_f, H, D)``.
    ``key_mask``: ``(B, total)`` bool, the keys every query may see (None: all). ``pair_mask``: ``(B, total)``, a
    per-token pair mask of the whole sequence (:func:`~.modes.pair_mask_4d` of every query's and key's values: float
    added to the logits, bool hard; every rank holds all of it), or None. One custom op (``torch.compile`` keeps a
    block with it as one graph); the plain attention call when ``spec`` has no group."""
    world = spec.ulysses * spec.ring
    if world == 1:
        return attend_all(q, k, v, spec.backend, key_mask, None if pair_mask is None else (pair_mask, pair_mask))
    if isinstance(sizes, int):
        sizes = split_sizes(sizes, world)
    return _sequence_attention_op(q, k, v, list(sizes), key_mask, spec.ulysses_group, spec.ring_group, spec.ulysses,
                                  spec.ring, spec.backend, pair_mask)


# ------------------------------------------------------------------------------------------------ the mode
class Sharded(PerRequest):
    """One request's model call on this rank's rows of its joined sequence (see the module docstring).

    ``plan``: the call's sharding (``world``, ``index``, ``attention_spec(backend)``, ``gather_rows(x, sizes)``,
    ``call_module(module, x)``; :class:`ralu_runtime.parallel.SequenceParallel`). ``stream_lens``: token counts of
    the streams that form the joined sequence, in order (FLUX ``(T, L)``), all images of the batch alike; a stream
    outside the joined sequence (Wan's cross-attention text) is not sharded: every rank holds it whole.
    ``key_mask``: ``(B, sum(stream_lens))`` bool over the joined sequence or None. ``pair_mask``: ``(B,
    sum(stream_lens))`` per-token pair mask of the joined sequence (``Dense(pair_mask=...)``, e.g. Chroma's text mask
    extended with ones; the whole sequence on every rank) or None. ``stream_key_masks``:
    ``{stream: (B, stream_lens[stream]) bool}``, the key masks of attention over one stream (e.g. Z-Image's caption
    refiner); streams not in it (or None) attend unmasked.

    Attributes: ``ranges[s]`` = ``(start, stop)`` of this rank's rows within stream ``s``; ``sizes`` the joined rows
    of every rank; ``stream_sizes[s]`` stream ``s``'s rows of every rank.
    """

    suffix = "_sp"

    def __init__(self, plan, stream_lens, key_mask: torch.Tensor | None = None, pair_mask: torch.Tensor | None = None,
                 stream_key_masks: dict | None = None):
        self.plan = plan
        lens = [int(n) for n in stream_lens]
        self.total = sum(lens)
        world, f = plan.world, plan.index
        if self.total < world:
            raise ValueError(f"a model call of {' + '.join(map(str, lens))} tokens cannot be split over {world} "
                             "ranks (fewer rows than ranks)")
        self.sizes = split_sizes(self.total, world)
        bounds = [sum(self.sizes[:g]) for g in range(world + 1)]
        offs = [sum(lens[:s]) for s in range(len(lens) + 1)]

        def clip(s, a, z):  # rows [a, z) of the joined sequence that fall into stream s, in stream coordinates
            lo, hi = offs[s], offs[s + 1]
            return min(max(a, lo), hi) - lo, min(max(z, lo), hi) - lo

        self.ranges = [clip(s, bounds[f], bounds[f + 1]) for s in range(len(lens))]
        self.stream_sizes = [[clip(s, bounds[g], bounds[g + 1])[1] - clip(s, bounds[g], bounds[g + 1])[0]
                              for g in range(world)] for s in range(len(lens))]
        self.key_mask = key_mask
        self.pair_mask = pair_mask
        self.stream_key_masks = stream_key_masks or {}
        self._spec = plan.attention_spec()

    def local(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """This rank's rows (dim 1) of stream ``stream`` of a whole-call tensor."""
        a, z = self.ranges[stream]
        return x[:, a:z]

    def whole(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """Every rank's rows of stream ``stream`` gathered: the whole stream on every rank."""
        return self.plan.gather_rows(x, self.stream_sizes[stream])

    def attend(self, q, k, v, *, stream=JOINT, backend=None, parallel_config=None, scale=None):
        if scale is not None:
            raise NotImplementedError("sharded attention with a custom softmax scale")
        sp = self._spec.with_backend(backend)
        if stream == JOINT:
            return sequence_attention(q, k, v, self.sizes, sp, self.key_mask, self.pair_mask)
        return sequence_attention(q, k, v, self.stream_sizes[stream], sp, self.stream_key_masks.get(stream))

    def cross_attend(self, q, k, v, *, q_stream, kv_stream, backend=None, scale=None):
        # the key stream is not sharded: every rank holds all of it
        return DENSE.cross_attend(q, k, v, q_stream=q_stream, kv_stream=kv_stream, backend=backend, scale=scale)

    def call(self, module, x):
        """``module(x)`` without a diffusers context-parallel gather hook (ralu gathers itself)."""
        return self.plan.call_module(module, x)


__all__ = ["AttentionSpec", "Sharded", "all_gather_flat", "all_to_all_flat", "attend_all", "gather_rows",
           "sequence_attention", "shard_range", "spec", "split_sizes"]
