"""FLUX.1's model call with its joint sequence sharded across ranks (what :meth:`FluxAdapter.velocity` runs under a
:class:`~ralu_runtime.parallel.SequenceParallel` plan).

The joint sequence ``[text (T) ; image (L)]`` of a call is cut into contiguous shards
(:func:`~ralu_runtime.parallel.attention.split_sizes` of ``T + L``); a rank holds rows ``[a, b)``: some text rows,
some image rows, possibly none of one kind. Everything per token (embedders, AdaLN, projections, MLPs, RoPE of its
own positions) runs on the rank's rows only; attention is :func:`~ralu_runtime.parallel.attention.sequence_attention`
(exact, all keys). The time/guidance/pooled embedding is per image and runs on every rank. At the end each rank's
image rows go through ``norm_out`` / ``proj_out`` and one all-gather assembles the velocity ``(B, L, C)``,
bitwise the same bytes on every rank.

The block functions below are :func:`ralu_runtime.adapters.flux.flux_double_block` /
:func:`~ralu_runtime.adapters.flux.flux_single_block` with the attention call replaced (same operations, same
order; ``tests/test_context_parallel.py`` checks them bitwise against those with a one-rank spec). Compiled
backends compile these functions (``impl.block("flux_double_sp", ...)``); the attention op is opaque to dynamo.

Feature caches (``generate(cache=...)``) see the whole sequence: the embedded input and the block stack's output (and,
for first-block caches, block 0's output) are all-gathered, so every rank holds the same cache state and takes the
same full/cached decision (a data-dependent decision taken on a shard could differ between ranks and hang them).
"""
from __future__ import annotations

import torch

from ..adapters.base import EAGER, SplitBlocks, call_with_hooks, current_cache
from ..adapters.flux import ADDED_QKV, QKV, _projections, apply_rope
from .attention import AttentionSpec, sequence_attention, split_sizes


def sp_flux_attention(attn, hidden_states, encoder_hidden_states, rope, qkv, added_qkv, total: int,
                      spec: AttentionSpec):
    """:func:`ralu_runtime.adapters.flux.flux_attention` on this rank's rows (``encoder_hidden_states``: its text
    rows, may be empty; ``rope``: its rows' rotary), attention over the ``total`` rows of all ranks."""
    query, key, value = _projections(attn, hidden_states, QKV, qkv)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq, ek, ev = _projections(attn, encoder_hidden_states, ADDED_QKV, added_qkv)
        eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
        ev = ev.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([eq, query], dim=1)
        key = torch.cat([ek, key], dim=1)
        value = torch.cat([ev, value], dim=1)
    if rope is not None:
        query = apply_rope(query, *rope)
        key = apply_rope(key, *rope)
    out = sequence_attention(query, key, value, total, spec)
    out = out.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return out
    enc, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]],
                                    dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(enc.contiguous())


def sp_flux_double_block(block, hidden_states, encoder_hidden_states, temb, rope, qkv, added_qkv, total: int,
                         spec: AttentionSpec):
    """``flux_double_block`` on this rank's rows. Returns ``(encoder_hidden_states, hidden_states)``."""
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
    attn_out, context_attn_out = sp_flux_attention(block.attn, norm_h, norm_e, rope, qkv, added_qkv, total, spec)

    hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
    norm_h = block.norm2(hidden_states)
    norm_h = norm_h * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    hidden_states = hidden_states + gate_mlp.unsqueeze(1) * block.ff(norm_h)

    encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_out
    norm_e = block.norm2_context(encoder_hidden_states)
    norm_e = norm_e * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * block.ff_context(norm_e)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def sp_flux_single_block(block, hidden_states, encoder_hidden_states, temb, rope, qkv, total: int,
                         spec: AttentionSpec):
    """``flux_single_block`` on this rank's rows. Returns ``(encoder_hidden_states, hidden_states)``."""
    text_len = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = x
    norm_x, gate = block.norm(x, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(norm_x))
    attn_out = sp_flux_attention(block.attn, norm_x, None, rope, qkv, None, total, spec)
    x = torch.cat([attn_out, mlp], dim=2)
    x = residual + gate.unsqueeze(1) * block.proj_out(x)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_len], x[:, text_len:]


def local_rotary(transformer, positions: torch.Tensor, text_len: int, start: int, stop: int):
    """Rotary ``(cos, sin)`` ``(B, stop - start, D)`` of joint rows ``[start, stop)`` (text ids all 0, image ids
    ``(0, row, col)`` from ``positions (B, L, 2)``): rows of :meth:`FluxAdapter.rotary`, computed for these only."""
    b = positions.shape[0]
    ids = torch.zeros(b, stop - start, 3, device=positions.device, dtype=torch.float32)
    lo = max(start, text_len)
    if stop > lo:
        ids[:, lo - start:, 1:] = positions[:, lo - text_len:stop - text_len]
    cos, sin = transformer.pos_embed(ids.reshape(-1, 3))
    return cos.view(b, stop - start, -1), sin.view(b, stop - start, -1)


class _ShardedBlocks(SplitBlocks):
    """The block stack for a feature cache, seen whole: ``first()`` -> (block 0's image output gathered, local
    state), ``rest(state)`` -> the stack's image output gathered; calling it runs all blocks with one gather."""

    def __init__(self, run, nblocks: int, gather):
        self._run, self._n, self._gather = run, nblocks, gather
        super().__init__(self._first, self._rest)

    def _first(self):
        state = self._run(None, 0, 1)
        return self._gather(state[1]), state

    def _rest(self, state):
        return self._gather(self._run(state, 1, self._n)[1])

    def __call__(self):
        return self._gather(self._run(None, 0, self._n)[1])


def sp_flux_velocity(adapter, plan, tokens, grid, timestep, cond, impl=None) -> torch.Tensor:
    """:meth:`FluxAdapter.velocity` with the joint sequence sharded across ``plan``'s ranks: ``(B, L, C)``, the same
    on every rank."""
    impl = impl or EAGER
    tr = adapter.transformer
    embeds, pooled, guidance = cond.data["embeds"], cond.data["pooled"], cond.data["guidance"]
    b, n_img = tokens.shape[:2]
    n_txt = embeds.shape[1]
    total = n_txt + n_img
    world, f = plan.world, plan.index
    if total < world:
        raise ValueError(f"a model call of {n_txt} text + {n_img} image tokens cannot be split over {world} ranks "
                         "(fewer rows than ranks)")
    sizes = split_sizes(total, world)
    a = sum(sizes[:f])
    z = a + sizes[f]
    ta, tz = min(a, n_txt), min(z, n_txt)                        # local text rows [ta, tz)
    ia, iz = max(a, n_txt) - n_txt, max(z, n_txt) - n_txt        # local image rows [ia, iz)
    img_sizes = [max(sum(sizes[:g + 1]), n_txt) - max(sum(sizes[:g]), n_txt) for g in range(world)]

    t = timestep.expand(b).to(tokens.dtype) / 1000
    hidden = tr.x_embedder(tokens[:, ia:iz])
    t = t.to(hidden.dtype) * 1000
    if guidance is None:
        temb = tr.time_text_embed(t, pooled)
    else:
        temb = tr.time_text_embed(t, guidance.to(hidden.dtype) * 1000, pooled)
    enc = tr.context_embedder(embeds[:, ta:tz])
    rope = local_rotary(tr, grid.positions, n_txt, a, z)
    spec = plan.attention_spec(tr)

    double = impl.block("flux_double_sp", sp_flux_double_block)
    single = impl.block("flux_single_sp", sp_flux_single_block)
    doubles = [(blk, double, (impl.fused(blk.attn, QKV), impl.fused(blk.attn, ADDED_QKV)))
               for blk in tr.transformer_blocks]
    singles = [(blk, single, (impl.fused(blk.attn, QKV),)) for blk in tr.single_transformer_blocks]
    nblocks = len(doubles) + len(singles)

    def run(state, start, stop):  # blocks [start, stop) on this rank's (text, image) rows
        e, h = (enc, hidden) if state is None else state
        for i in range(start, stop):
            blk, fn, extra = doubles[i] if i < len(doubles) else singles[i - len(doubles)]
            args = (blk, h, e, temb, rope, *extra, total, spec)
            if blk._forward_hooks or blk._forward_pre_hooks:
                e, h = call_with_hooks(blk, fn, args, dict(hidden_states=h, encoder_hidden_states=e, temb=temb,
                                                           image_rotary_emb=rope))
            else:
                e, h = fn(*args)
        return e, h

    def gather(h):
        return plan.gather_rows(h, img_sizes)

    if current_cache() is None:
        hidden = run(None, 0, nblocks)[1]
    else:  # the cache sees whole, identical tensors on every rank (see the module docstring)
        out = adapter.run_blocks(_ShardedBlocks(run, nblocks, gather), gather(hidden), timestep)
        hidden = out[:, ia:iz]
    v = plan.call_module(tr.proj_out, tr.norm_out(hidden, temb))
    return gather(v)
