"""FLUX adapter (FluxPipeline / FluxTransformer2DModel): 2x2 latent patches, RoPE position ids per token.

RALU stage 2 gives every image its own token positions, so rotary embeddings are per image
``(B, L, D)``; diffusers' FluxAttnProcessor only broadcasts ``(L, D)``. The adapter therefore runs the
transformer's blocks itself (:func:`flux_double_block`, :func:`flux_single_block`: the same operations in
the same order as diffusers' ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` and
``FluxAttnProcessor``, bitwise equal to them when all images share positions), calling the blocks' own
layers, so LoRA layers and hooks on layers take effect. Nothing on the user's model is replaced or
patched: not the attention processors, not the projections (fused q/k/v weights, when a backend asks
for them, are ralu's own copies: :mod:`ralu_runtime.adapters.fused`).

Torch forward hooks on the blocks still run (:func:`~ralu_runtime.adapters.base.call_with_hooks`). Not
supported (refused before any work, :meth:`FluxAdapter.check_supported`): attention processors other than
diffusers' ``FluxAttnProcessor`` (IP-Adapter, custom processors) and diffusers hook registries on the blocks
(``enable_cache``, block-level group offloading), which running the blocks' layers would bypass.

Packed calls (:meth:`FluxAdapter.packed_velocity`, for serving many requests at once): the ``*_packed`` block
functions below are the same operations on one packed token sequence in which every image is its own attention
segment ``[text ; image]`` with its own timestep, guidance, pooled embedding, text length and rotary positions;
attention is :func:`ralu_kernels.attention.varlen_attention`. The helpers :func:`per_token`, :func:`can_pack` and
:func:`ada_norm_continuous_packed` serve the SD3 adapter's packed call as well.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from ralu_kernels.attention import StreamSegments

from ..families import FAMILIES
from ..parallel.context import current_parallel
from .base import (EAGER, Conditioning, DiTAdapter, ModelImpl, SplitBlocks, TokenGrid, VelocityCall, call_with_hooks,
                   check_blocks, check_velocity_calls, current_cache, named_blocks)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``x (B, S, H, D)`` with ``cos``/``sin`` of shape ``(S, D)`` or ``(B, S, D)``.

    Same arithmetic as diffusers' ``apply_rotary_emb(use_real=True, sequence_dim=1)`` (interleaved pairs).
    """
    if cos.ndim == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def _projections(attn, x, names, fused):
    """q, k, v of ``x`` from ``attn``'s layers ``names`` (or their fused weights ``(w, b)``)."""
    if fused is not None:
        return torch.nn.functional.linear(x, fused[0], fused[1]).chunk(3, dim=-1)
    return tuple(getattr(attn, n)(x) for n in names)


def flux_attention(attn, hidden_states, encoder_hidden_states, rope, qkv=None, added_qkv=None):
    """diffusers' ``FluxAttnProcessor`` on ``attn`` with per-image or shared rotary ``rope = (cos, sin)``.

    ``qkv`` / ``added_qkv``: fused ``(weight, bias)`` of to_q/to_k/to_v and add_q/k/v_proj, or None.
    """
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    query, key, value = _projections(attn, hidden_states, ("to_q", "to_k", "to_v"), qkv)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq, ek, ev = _projections(attn, encoder_hidden_states, ("add_q_proj", "add_k_proj", "add_v_proj"), added_qkv)
        eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
        ev = ev.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([eq, query], dim=1)
        key = torch.cat([ek, key], dim=1)
        value = torch.cat([ev, value], dim=1)
    if rope is not None:
        query = apply_rope(query, *rope)
        key = apply_rope(key, *rope)
    proc = attn.processor
    out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=getattr(proc, "_attention_backend", None),
                                parallel_config=getattr(proc, "_parallel_config", None))
    out = out.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return out
    enc, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]],
                                    dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(enc.contiguous())


def flux_double_block(block, hidden_states, encoder_hidden_states, temb, rope, qkv=None, added_qkv=None):
    """diffusers' ``FluxTransformerBlock.forward`` (same operations, same order) with :func:`flux_attention`.
    Returns ``(encoder_hidden_states, hidden_states)``."""
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states, emb=temb)
    attn_out, context_attn_out = flux_attention(block.attn, norm_h, norm_e, rope, qkv, added_qkv)

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


def flux_single_block(block, hidden_states, encoder_hidden_states, temb, rope, qkv=None):
    """diffusers' ``FluxSingleTransformerBlock.forward`` (same operations, same order) with
    :func:`flux_attention`. Returns ``(encoder_hidden_states, hidden_states)``."""
    text_len = encoder_hidden_states.shape[1]
    x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = x
    norm_x, gate = block.norm(x, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(norm_x))
    attn_out = flux_attention(block.attn, norm_x, None, rope, qkv)
    x = torch.cat([attn_out, mlp], dim=2)
    x = residual + gate.unsqueeze(1) * block.proj_out(x)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_len], x[:, text_len:]


QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")


# ---- packed batches: many images (of many requests) in one call --------------------------------------------------
# Layout: every image is one attention segment. Image tokens of all images are kept one after another in one
# (1, N_img, D) tensor, text tokens likewise in (1, N_txt, D); per-image vectors (temb, modulation) are (n_images, D)
# and reach their tokens through the segment index of every token (StreamSegments.segment_ids).
def per_token(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-image rows ``x (n_images, D)`` -> per-token ``(1, N, D)``, ``rows (N,)`` the image of every token."""
    return x.index_select(0, rows).unsqueeze(0)


def has_hooks(module: torch.nn.Module) -> bool:
    """True when ``module`` carries torch forward (pre-)hooks or a diffusers hook registry with hooks."""
    registry = getattr(module, "_diffusers_hook", None)
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(registry, "hooks", None))


def can_pack(impl: ModelImpl | None, bypassed) -> bool:
    """Whether a packed call may run: plain eager execution (``impl`` None or EAGER) or an impl that declares packed
    calls (``impl.packed_calls``: the compile runner's inductor / eager backends), no feature cache on the calling
    ``generate`` (its state is per request), and no hooks on the modules ``bypassed`` -- those the unpacked call runs
    as modules but the packed call decomposes into their layers (so their hooks would not run)."""
    if impl is not None and impl is not EAGER and not getattr(impl, "packed_calls", False):
        return False
    if current_cache() is not None:
        return False
    return not any(has_hooks(m) for m in bypassed)


class PackedExecution:
    """How :meth:`FluxAdapter.packed_velocity` / :meth:`SD3Adapter.packed_velocity` execute a packed call. This
    default runs it directly with ``impl``; :class:`ralu_runtime.compile.StageRunner` passes its own (CUDA graphs per
    token-count bucket).

    ``static_layout``: the packed forward is compiled or captured, so its segment layout must be device tensors only
    (:class:`PackedSegments`, one extra padding segment) instead of :class:`~ralu_kernels.attention.StreamSegments`
    (host lists); true when ``impl`` compiles its blocks (``impl.compiles_blocks``). :meth:`pad` rounds the packed
    token and segment counts up (identity here), :meth:`run` executes the packed forward on its flat tensor inputs
    (``key``: everything else it depends on, hashable), :meth:`velocity` is the per-call fallback."""

    def __init__(self, adapter, impl: ModelImpl | None = None):
        self.adapter = adapter
        self.impl = impl or EAGER
        self.static_layout = bool(getattr(self.impl, "compiles_blocks", False))

    def pad(self, kind: str, n: int) -> int:
        """Padded size of ``n`` for ``kind`` "image" / "text" (tokens of that stream) or "segments"."""
        return n

    def run(self, key, forward, tensors: list[torch.Tensor]) -> torch.Tensor:
        return forward(*tensors)

    def velocity(self, call: VelocityCall) -> torch.Tensor:
        return self.adapter.velocity(call.tokens, call.grid, call.timestep, call.cond, self.impl)


def static_attention(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention of :class:`PackedSegments` for adapter backend name ``backend`` (checked as
    :func:`ralu_kernels.attention.select_backend` checks it): ``"torch_varlen"`` (torch's flash varlen kernel; CUDA,
    fp16/bf16) where it is available and ``backend`` is "auto", "torch_varlen" or "flash_attn" (the same kernel
    family), else ``"dense"`` (one SDPA call over the whole packed sequence with a block-diagonal mask: exact, but
    memory grows with the square of the packed length)."""
    from ralu_kernels.attention import available_backends, select_backend

    name = select_backend(backend, device, dtype)
    if name in ("flash_attn", "torch_varlen") and "torch_varlen" in available_backends(device, dtype):
        return "torch_varlen"
    return "dense"


class PackedSegments:
    """The attention segments of a packed call as device tensors only: what a compiled or CUDA-graph-captured packed
    forward takes instead of :class:`~ralu_kernels.attention.StreamSegments` (same methods: :meth:`segment_ids`,
    :meth:`gather`, :meth:`split`, :meth:`attend`). Nothing here reads a value on the host or holds a Python number
    that changes with the mix of requests, so a compiled block function with symbolic token dimensions serves every
    mix without a recompile, and a captured graph is valid for any mix of the same padded sizes.

    :meth:`build` lays out the real segments, then one padding segment (``pads[s]`` tokens of every stream: the
    padding of the packed lengths up to a bucket; real tokens never attend to it and it changes no real output),
    then empty segments up to ``num_segments``. Attention (``kind``): "dense" (SDPA, mask ``segment[q] ==
    segment[k]``) or "torch_varlen" (``cu_seqlens`` on the device, the packed length as the max segment length).
    """

    def __init__(self, kind: str, ids, pos, order, seg_ids, cu_seqlens):
        self.kind = kind
        self.ids = tuple(ids)          # per stream: (N_s,) segment of every token
        self.pos = tuple(pos)          # per stream: (N_s,) its place in the segment-major order (2+ streams)
        self.order = order             # (total,) segment-major -> index into the streams concatenated (2+ streams)
        self.seg_ids = seg_ids         # (total,) segment of every token, segment-major
        self.cu_seqlens = cu_seqlens   # (num_segments + 1,) int32
        self.num_streams = len(self.ids)

    @classmethod
    def build(cls, stream_lens, pads, num_segments: int, device, kind: str) -> "PackedSegments":
        streams = [list(s) for s in stream_lens]
        n = len(streams[0])
        if num_segments < n + 1:
            raise ValueError(f"num_segments={num_segments}: need room for {n} segments and the padding segment")
        lens = [s + [int(p)] + [0] * (num_segments - n - 1) for s, p in zip(streams, pads)]
        host = StreamSegments(lens)
        seg_ids = torch.repeat_interleave(torch.arange(num_segments), torch.tensor(host.segment_lens))
        pos = [host.positions(s) for s in range(len(lens))]
        order = None
        if len(lens) > 1:
            order = torch.empty(host.total, dtype=torch.long)
            order[torch.cat(pos)] = torch.arange(host.total)
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        return cls(kind, [to(host.segment_ids(s)) for s in range(len(lens))],
                   [to(p) for p in pos] if len(lens) > 1 else [], to(order), to(seg_ids), to(host.cu_seqlens_host))

    def tensors(self) -> list[torch.Tensor]:
        """The flat tensors of this layout (:meth:`from_tensors` rebuilds it from them)."""
        if self.num_streams == 1:
            return [self.seg_ids, self.cu_seqlens]
        return [*self.ids, *self.pos, self.order, self.seg_ids, self.cu_seqlens]

    @classmethod
    def from_tensors(cls, tensors, num_streams: int, kind: str) -> "PackedSegments":
        if num_streams == 1:
            seg_ids, cu = tensors
            return cls(kind, [seg_ids], [], None, seg_ids, cu)
        k = num_streams
        return cls(kind, tensors[:k], tensors[k:2 * k], tensors[2 * k], tensors[2 * k + 1], tensors[2 * k + 2])

    @staticmethod
    def count(num_streams: int) -> int:
        return 2 if num_streams == 1 else 2 * num_streams + 3

    def joined(self) -> "PackedSegments":
        """The same segments as one stream (the segment-major sequence itself)."""
        return PackedSegments(self.kind, [self.seg_ids], [], None, self.seg_ids, self.cu_seqlens)

    def segment_ids(self, stream: int) -> torch.Tensor:
        return self.ids[stream]

    def gather(self, *streams: torch.Tensor) -> torch.Tensor:
        if len(streams) == 1:
            return streams[0]
        return torch.cat(streams).index_select(0, self.order)

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.num_streams == 1:
            return (packed,)
        return tuple(packed.index_select(0, p) for p in self.pos)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
               backend: str | None = None) -> torch.Tensor:
        """Attention of segment-major ``(total, heads, head_dim)`` q, k, v within each segment (``backend`` is
        ignored: the kind was chosen when the layout was built)."""
        if self.kind == "torch_varlen":
            from torch.nn.attention.varlen import varlen_attn

            n = q.shape[0]  # any upper bound of the segment lengths is valid; this one never changes the graph
            return varlen_attn(q, k, v, self.cu_seqlens, self.cu_seqlens, n, n, scale=scale)
        mask = self.seg_ids[:, None] == self.seg_ids[None, :]
        o = torch.nn.functional.scaled_dot_product_attention(
            q.permute(1, 0, 2)[None], k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None], attn_mask=mask, scale=scale)
        return o[0].permute(1, 0, 2)


def pad_rows(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``x`` with ``n`` zero rows appended on dim 0 (None stays None)."""
    if x is None or n == 0:
        return x
    return torch.cat([x, x.new_zeros(n, *x.shape[1:])])


def ada_norm_continuous_packed(norm, x: torch.Tensor, emb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """diffusers' ``AdaLayerNormContinuous`` (FLUX / SD3 ``norm_out``, SD3's last ``norm1_context``) with per-image
    conditioning ``emb (n_images, D)`` on packed tokens ``x (1, N, D)`` (same operations, same order)."""
    emb = norm.linear(norm.silu(emb).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return norm.norm(x) * per_token(1 + scale, rows) + per_token(shift, rows)


def flux_attention_packed(attn, hidden_states, encoder_hidden_states, rope, segments: StreamSegments,
                          backend: str = "auto", qkv=None, added_qkv=None):
    """:func:`flux_attention` on a packed batch, attention within each image's segment only.

    Joint blocks: ``hidden_states (1, N_img, D)`` and ``encoder_hidden_states (1, N_txt, D)`` hold the images' tokens
    one after another, ``segments`` has the streams (text, image), so segment i is ``[text_i ; image_i]`` as in the
    unpacked call. Single-stream blocks: ``hidden_states`` is the segment-major joint sequence itself,
    ``encoder_hidden_states`` None, ``segments`` of that one stream. ``rope = (cos, sin)``, each ``(total, D_head)``
    in segment-major order. ``segments`` may also be a :class:`PackedSegments` (compiled / captured calls);
    ``qkv`` / ``added_qkv``: fused projection weights as in :func:`flux_attention`. Returns what
    :func:`flux_attention` returns, in the packed layout.
    """
    query, key, value = _projections(attn, hidden_states, QKV, qkv)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    if joint:
        eq, ek, ev = _projections(attn, encoder_hidden_states, ADDED_QKV, added_qkv)
        eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
        ev = ev.unflatten(-1, (-1, attn.head_dim))
        query = segments.gather(eq[0], query[0])[None]
        key = segments.gather(ek[0], key[0])[None]
        value = segments.gather(ev[0], value[0])[None]
    if rope is not None:
        query = apply_rope(query, *rope)
        key = apply_rope(key, *rope)
    out = segments.attend(query[0], key[0], value[0], backend=backend)
    out = out.flatten(1, 2).to(query.dtype)
    if encoder_hidden_states is None:
        return out[None]
    enc, out = segments.split(out)
    out = attn.to_out[1](attn.to_out[0](out[None]))
    return out, attn.to_add_out(enc[None])


def flux_double_block_packed(block, hidden_states, encoder_hidden_states, temb, rope, segments: StreamSegments,
                             backend: str = "auto", qkv=None, added_qkv=None):
    """:func:`flux_double_block` on a packed batch (same operations, same order): ``temb (n_images, D)`` one row per
    image, AdaLN shift/scale/gate applied per token of its image; layout as in :func:`flux_attention_packed`
    (``segments``: streams (text, image)). Returns ``(encoder_hidden_states, hidden_states)``, packed."""
    txt, img = segments.segment_ids(0), segments.segment_ids(1)
    emb = block.norm1.linear(block.norm1.silu(temb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    norm_h = block.norm1.norm(hidden_states) * per_token(1 + scale_msa, img) + per_token(shift_msa, img)
    cemb = block.norm1_context.linear(block.norm1_context.silu(temb))
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cemb.chunk(6, dim=1)
    norm_e = (block.norm1_context.norm(encoder_hidden_states) * per_token(1 + c_scale_msa, txt)
              + per_token(c_shift_msa, txt))
    attn_out, context_attn_out = flux_attention_packed(block.attn, norm_h, norm_e, rope, segments, backend, qkv,
                                                       added_qkv)

    hidden_states = hidden_states + per_token(gate_msa, img) * attn_out
    norm_h = block.norm2(hidden_states)
    norm_h = norm_h * per_token(1 + scale_mlp, img) + per_token(shift_mlp, img)
    hidden_states = hidden_states + per_token(gate_mlp, img) * block.ff(norm_h)

    encoder_hidden_states = encoder_hidden_states + per_token(c_gate_msa, txt) * context_attn_out
    norm_e = block.norm2_context(encoder_hidden_states)
    norm_e = norm_e * per_token(1 + c_scale_mlp, txt) + per_token(c_shift_mlp, txt)
    encoder_hidden_states = encoder_hidden_states + per_token(c_gate_mlp, txt) * block.ff_context(norm_e)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def flux_single_block_packed(block, x, temb, rope, segments: StreamSegments, backend: str = "auto", qkv=None):
    """:func:`flux_single_block` on a packed batch (same operations, same order) on the segment-major joint sequence
    ``x (1, total, D)`` (``[text_i ; image_i]`` per image), which stays joined across the single-stream blocks (the
    unpacked block joins and splits the two streams each time: the same values). ``segments``: the one-stream
    segments of ``x``. Returns the new ``x``."""
    rows = segments.segment_ids(0)
    residual = x
    emb = block.norm.linear(block.norm.silu(temb))
    shift, scale, gate = emb.chunk(3, dim=1)
    norm_x = block.norm.norm(x) * per_token(1 + scale, rows) + per_token(shift, rows)
    mlp = block.act_mlp(block.proj_mlp(norm_x))
    attn_out = flux_attention_packed(block.attn, norm_x, None, rope, segments, backend, qkv)
    x = torch.cat([attn_out, mlp], dim=2)
    x = residual + per_token(gate, rows) * block.proj_out(x)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x


def split_calls(out: torch.Tensor, calls: list[VelocityCall], batches: list[int] | None = None) -> list[torch.Tensor]:
    """Packed per-token output ``(1, N, C)`` -> one ``(n_i, L_i, C)`` view per call (``n_i`` = ``batches[i]``,
    default the call's batch)."""
    batches = batches or [c.tokens.shape[0] for c in calls]
    sizes = [n * c.tokens.shape[1] for n, c in zip(batches, calls)]
    return [o.view(n, c.tokens.shape[1], -1) for o, n, c in zip(out[0].split(sizes), batches, calls)]


class FluxAdapter(DiTAdapter):
    """Adapter for diffusers' ``FluxPipeline`` (FLUX.1-dev with guidance embedding, FLUX.1-schnell without)."""

    family = "flux"  # defaults: ralu_runtime.families (FLUX.1-schnell's in __init__)
    default_steps = FAMILIES["flux"].default_steps
    default_guidance = FAMILIES["flux"].default_guidance
    base_shift = FAMILIES["flux"].base_shift

    def __init__(self, pipe, *, weak: bool = False):
        super().__init__(pipe, weak=weak)
        self.transformer = pipe.transformer
        if not getattr(self.transformer.config, "guidance_embeds", True):
            schnell = FAMILIES["flux-schnell"]
            self.family, self.default_preset = schnell.name, schnell.default_preset
            self.default_steps, self.base_shift = schnell.default_steps, schnell.base_shift

    def check_supported(self) -> None:
        check_blocks(named_blocks(self.transformer, "transformer_blocks", "single_transformer_blocks"),
                     ("FluxAttnProcessor",), "FLUX")

    packs = True
    packed_attention_backend = "auto"  # varlen_attention backend of packed_velocity ("auto", "sdpa", ...)

    def _bypassed_by_packing(self) -> list:
        """Modules the unpacked call runs as modules (hooks included) and the packed call decomposes."""
        tr = self.transformer
        mods = [tr.norm_out]
        for blk in tr.transformer_blocks:
            mods += [blk, blk.norm1, blk.norm1_context]
        for blk in tr.single_transformer_blocks:
            mods += [blk, blk.norm]
        return mods

    def packed_velocity(self, calls, impl: ModelImpl | None = None, *,
                        execution: PackedExecution | None = None) -> list[torch.Tensor]:
        """:meth:`velocity` of every call, all run as one transformer call over a packed token sequence.

        Every image of every call is one attention segment ``[its text tokens ; its image tokens]``; time, guidance
        and pooled embeddings are computed per image and its AdaLN shift/scale/gate applied to the tokens of its
        segment; rotary embeddings per image from ``grid.positions`` (:meth:`rotary`); text lengths may differ
        between calls. Attention: :func:`ralu_kernels.attention.varlen_attention` (backend
        :attr:`packed_attention_backend`). Results equal the unpacked calls up to float rounding (fp32 on a CPU:
        about 1e-7 relative, see tests/test_packed_velocity.py).

        Compiled blocks: with ``impl`` a compile runner's impl (``impl.packed_calls``; ``StageRunner.packed`` passes
        its ``execution``), the packed block functions run through ``impl.block("flux_double_packed", ...)`` /
        ``impl.block("flux_single_packed", ...)`` (compiled with a symbolic packed token dimension) with the fused
        projections of ``impl.fused``, on a :class:`PackedSegments` layout (device tensors only; one padding segment,
        CUDA graphs pad the packed lengths up to a bucket): a new mix of requests reuses the same graphs.

        Falls back to one :meth:`velocity` per call (correct, unpacked) when ``impl`` is neither None / EAGER nor a
        packing impl, when the calling ``generate`` has a feature cache, or when a block or an AdaLN module the
        packed call decomposes carries torch forward (pre-)hooks or diffusers hooks.
        """
        calls = check_velocity_calls(calls)
        execution = execution or PackedExecution(self, impl)
        if not can_pack(execution.impl, self._bypassed_by_packing()):
            return [execution.velocity(c) for c in calls]
        return self._packed_call(calls, execution)

    def _packed_call(self, calls: list[VelocityCall], execution: PackedExecution) -> list[torch.Tensor]:
        tr = self.transformer
        guided = bool(tr.config.guidance_embeds)
        for i, c in enumerate(calls):
            if (c.cond.data["guidance"] is not None) != guided:
                raise ValueError(f"calls[{i}].cond {'lacks' if guided else 'has'} a guidance value but this FLUX "
                                 f"transformer has guidance_embeds={guided}: encode its prompt with this adapter")
        device, dtype = calls[0].tokens.device, calls[0].tokens.dtype
        counts = [c.tokens.shape[0] for c in calls]
        per_image = lambda lens: [n for n, b in zip(lens, counts) for _ in range(b)]  # noqa: E731
        text_lens = per_image([c.cond.data["embeds"].shape[1] for c in calls])
        image_lens = per_image([c.tokens.shape[1] for c in calls])

        tokens = torch.cat([c.tokens.reshape(-1, c.tokens.shape[-1]) for c in calls])
        positions = torch.cat([c.grid.positions.reshape(-1, 2) for c in calls])
        embeds = torch.cat([c.cond.data["embeds"].reshape(-1, c.cond.data["embeds"].shape[-1]) for c in calls])
        t = torch.cat([c.timestep.reshape(()).expand(b).to(dtype) / 1000 for c, b in zip(calls, counts)])
        guidance = torch.cat([c.cond.data["guidance"] for c in calls]) if guided else None
        pooled = torch.cat([c.cond.data["pooled"] for c in calls])
        impl, backend = execution.impl, self.packed_attention_backend
        if not execution.static_layout:
            joint = StreamSegments([text_lens, image_lens], device)
            out = self._packed_forward(tokens, positions, embeds, t, guidance, pooled, joint,
                                       StreamSegments([joint.segment_lens], device), impl, backend)
            return split_calls(out, calls)

        n_img, n_txt, n_seg = len(tokens), len(embeds), len(image_lens)
        pad_img, pad_txt = execution.pad("image", n_img) - n_img, execution.pad("text", n_txt) - n_txt
        segs = execution.pad("segments", n_seg + 1)
        kind = static_attention(backend, device, dtype)
        joint = PackedSegments.build([text_lens, image_lens], [pad_txt, pad_img], segs, device, kind)
        per_seg = [t, guidance, pooled]
        tensors = [pad_rows(tokens, pad_img), pad_rows(positions, pad_img), pad_rows(embeds, pad_txt),
                   *[pad_rows(x, segs - n_seg) for x in per_seg if x is not None], *joint.tensors()]

        def forward(*ts):  # the flat tensors only (a captured graph replays it for every mix of the same sizes)
            tok, pos, emb, tt = ts[:4]
            g, pool = (ts[4], ts[5]) if guided else (None, ts[4])
            lay = PackedSegments.from_tensors(ts[5 + guided:], 2, kind)
            return self._packed_forward(tok, pos, emb, tt, g, pool, lay, lay.joined(), impl, backend)

        out = execution.run(("flux", guided, kind, backend), forward, tensors)
        return split_calls(out[:, :n_img], calls)

    def _packed_forward(self, tokens, positions, embeds, t, guidance, pooled, joint, single, impl: ModelImpl,
                        backend: str) -> torch.Tensor:
        """The transformer on a packed batch: ``tokens (N_img, C)`` and their ``positions (N_img, 2)`` (every image's
        tokens one after another), text ``embeds (N_txt, D)``, per image ``t`` (timestep / 1000), ``guidance``
        (or None) and ``pooled``; ``joint``: the segments of the streams (text, image), ``single``: the same segments
        as one stream. Returns the packed output ``(1, N_img, C)``."""
        tr = self.transformer
        hidden = tr.x_embedder(tokens[None])
        t = t.to(hidden.dtype) * 1000
        if guidance is not None:
            temb = tr.time_text_embed(t, guidance.to(hidden.dtype) * 1000, pooled)
        else:
            temb = tr.time_text_embed(t, pooled)
        enc = tr.context_embedder(embeds[None])
        if hidden._base is not None:  # views (Linear on 3-D input): a compiled block would guard their base
            hidden = hidden.clone()
        if enc._base is not None:
            enc = enc.clone()
        # rotary per token, segment-major ([text ; image] per image): text ids 0, image ids (0, row, col)
        ids = positions.new_zeros(positions.shape[0], 3, dtype=torch.float32)
        ids[:, 1:] = positions
        rope = tr.pos_embed(joint.gather(ids.new_zeros(embeds.shape[0], 3), ids))

        double = impl.block("flux_double_packed", flux_double_block_packed)
        single_fn = impl.block("flux_single_packed", flux_single_block_packed)
        for blk in tr.transformer_blocks:
            enc, hidden = double(blk, hidden, enc, temb, rope, joint, backend, impl.fused(blk.attn, QKV),
                                 impl.fused(blk.attn, ADDED_QKV))
        if len(tr.single_transformer_blocks):
            x = joint.gather(enc[0], hidden[0])[None].clone()  # not a view: every single block gets one graph
            for blk in tr.single_transformer_blocks:
                x = single_fn(blk, x, temb, rope, single, backend, impl.fused(blk.attn, QKV))
            hidden = joint.split(x[0])[1][None]
        return tr.proj_out(ada_norm_continuous_packed(tr.norm_out, hidden, temb, joint.segment_ids(1)))

    fuses_projections = True
    max_side_px = FAMILIES["flux"].max_side_px  # 65536 fine tokens; FLUX.1 is trained up to about 2 MP

    def embed_dims(self) -> tuple[int, int]:
        cfg = self.transformer.config
        return int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)

    @property
    def patch_size(self) -> int:
        return 2

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale, max_sequence_length=None):
        if negative_prompt is not None or negative_prompt_embeds is not None:
            raise ValueError("negative prompts are not supported for FLUX (it uses a guidance embedding, not CFG)")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("FLUX needs pooled_prompt_embeds together with prompt_embeds")
        if prompt_embeds is not None:  # cached embeddings: no text encoder, and no diffusers call (its dtype lookup
            # walks every submodule); images are prompt-major like diffusers' own repeat for text prompts
            embeds = prompt_embeds.to(self.device).repeat_interleave(num_images_per_prompt, dim=0)
            pooled = pooled_prompt_embeds.to(self.device).repeat_interleave(num_images_per_prompt, dim=0)
        else:
            embeds, pooled, _text_ids = self.pipe.encode_prompt(
                prompt=prompt, prompt_2=None, device=self.device, num_images_per_prompt=num_images_per_prompt,
                max_sequence_length=max_sequence_length or 512,
            )
        b = embeds.shape[0]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32).expand(b)
        return Conditioning(b, {"embeds": embeds, "pooled": pooled, "guidance": guidance})

    def rotary(self, grid: TokenGrid, text_len: int):
        """Per-image rotary ``(cos, sin)`` of shape ``(B, T + L, D)`` for text ids (all 0) then image ids."""
        b, l, _ = grid.positions.shape
        ids = torch.zeros(b, text_len + l, 3, device=grid.positions.device, dtype=torch.float32)
        ids[:, text_len:, 1:] = grid.positions
        cos, sin = self.transformer.pos_embed(ids.reshape(-1, 3))
        return cos.view(b, text_len + l, -1), sin.view(b, text_len + l, -1)

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        plan = current_parallel()
        if plan is not None:  # context parallelism: this rank's shard of the sequence (ralu_runtime.parallel)
            return plan.velocity(self, tokens, grid, timestep, cond, impl)
        impl = impl or EAGER
        tr = self.transformer
        embeds, pooled, guidance = cond.data["embeds"], cond.data["pooled"], cond.data["guidance"]
        b = tokens.shape[0]
        t = timestep.expand(b).to(tokens.dtype) / 1000
        hidden = tr.x_embedder(tokens)
        t = t.to(hidden.dtype) * 1000
        if guidance is None:
            temb = tr.time_text_embed(t, pooled)
        else:
            temb = tr.time_text_embed(t, guidance.to(hidden.dtype) * 1000, pooled)
        enc = tr.context_embedder(embeds)
        rope = self.rotary(grid, enc.shape[1])  # (B, T + L, D) always: one graph for all stages when compiled

        double = impl.block("flux_double", flux_double_block)
        single = impl.block("flux_single", flux_single_block)
        doubles = [(blk, double, (impl.fused(blk.attn, QKV), impl.fused(blk.attn, ADDED_QKV)))
                   for blk in tr.transformer_blocks]
        singles = [(blk, single, (impl.fused(blk.attn, QKV),)) for blk in tr.single_transformer_blocks]

        def run(state, start, stop):  # blocks [start, stop) on state (encoder, image) hidden states
            e, h = state
            for i in range(start, stop):
                blk, fn, extra = doubles[i] if i < len(doubles) else singles[i - len(doubles)]
                args = (blk, h, e, temb, rope, *extra)
                if blk._forward_hooks or blk._forward_pre_hooks:
                    e, h = call_with_hooks(blk, fn, args, dict(hidden_states=h, encoder_hidden_states=e, temb=temb,
                                                               image_rotary_emb=rope))
                else:
                    e, h = fn(*args)
            return e, h

        def first():
            state = run((enc, hidden), 0, 1)
            return state[1], state

        blocks = SplitBlocks(first, lambda state: run(state, 1, len(doubles) + len(singles))[1])
        hidden = self.run_blocks(blocks, hidden, timestep)
        return tr.proj_out(tr.norm_out(hidden, temb))

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sched = copy.deepcopy(self.pipe.scheduler)
        cfg = sched.config
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(cfg, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps, sched.sigmas.to(self.device)
