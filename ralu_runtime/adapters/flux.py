"""FLUX adapter (FluxPipeline / FluxTransformer2DModel): 2x2 latent patches, RoPE position ids per token.

RALU stage 2 gives every image its own token positions, so rotary embeddings are per image ``(B, L, D)``;
diffusers' FluxAttnProcessor only broadcasts ``(L, D)``. The adapter therefore runs the transformer's blocks itself
(:func:`flux_double_block`, :func:`flux_single_block`: the same operations in the same order as diffusers'
``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` and ``FluxAttnProcessor``, bitwise equal to them when all
images share positions), calling the blocks' own layers, so LoRA layers and hooks on layers take effect. Nothing
on the user's model is replaced or patched: not the attention processors, not the projections (fused q/k/v weights,
when a backend asks for them, are ralu's own copies: :mod:`ralu_runtime.adapters.fused`).

One block function per block kind, for every execution mode (:mod:`ralu_runtime.execution`): the mode ``ex``
decides how the text and image streams are joined, how attention runs and how per-image modulation reaches the
tokens -- one request (:class:`~ralu_runtime.execution.modes.Dense`), many requests packed into one call
(:class:`~ralu_runtime.execution.packing.Packed`: every image its own attention segment ``[text ; image]`` with its
own timestep, guidance, pooled embedding, text length and rotary positions; :meth:`FluxAdapter.packed_velocity`), or
one request sharded across ranks (:class:`~ralu_runtime.execution.sharding.Sharded`: context parallelism, when the
running ``generate`` call has a sharding plan).

Torch forward hooks on the blocks still run in one-request calls
(:func:`~ralu_runtime.adapters.base.call_with_hooks`). Not supported (refused before any work,
:meth:`FluxAdapter.check_supported`): attention processors other than diffusers' ``FluxAttnProcessor`` (IP-Adapter,
custom processors) and diffusers hook registries on the blocks (``enable_cache``, block-level group offloading),
which running the blocks' layers would bypass.
"""
from __future__ import annotations


import numpy as np
import torch

from ..execution.modes import DENSE, JOINT, Mode
from ..execution.packing import (HostSegments, Packed, PackedExecution, PackedSegments, can_pack, pad_rows,
                                 split_calls, static_attention)
from ..execution.sharding import Sharded
from .base import (EAGER, Conditioning, DiTAdapter, ModelImpl, TokenGrid, VelocityCall, call_with_hooks, check_blocks,
                   check_velocity_calls, current_sharding, double_then_single_stack, named_blocks, pipeline_mu)
from .common import ADDED_QKV, QKV, apply_rope, projections

from ..families import FAMILIES

TEXT, IMAGE = 0, 1  # FLUX's streams, in the order of its joint sequence [text ; image]


def flux_attention(attn, hidden_states, encoder_hidden_states, rope, ex: Mode = DENSE, qkv=None, added_qkv=None):
    """diffusers' ``FluxAttnProcessor`` on ``attn`` with per-image or shared rotary ``rope = (cos, sin)``, in mode
    ``ex``. Double blocks: ``hidden_states`` the image stream, ``encoder_hidden_states`` the text stream; returns
    ``(image out, text out)``. Single blocks: ``hidden_states`` the joined sequence, ``encoder_hidden_states`` None;
    returns its output. ``qkv`` / ``added_qkv``: fused ``(weight, bias)`` of to_q/to_k/to_v and add_q/k/v_proj, or
    None."""
    query, key, value = projections(attn, hidden_states, QKV, qkv)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq, ek, ev = projections(attn, encoder_hidden_states, ADDED_QKV, added_qkv)
        eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
        ev = ev.unflatten(-1, (-1, attn.head_dim))
        query, key, value = ex.join(eq, query), ex.join(ek, key), ex.join(ev, value)
    if rope is not None:
        query = apply_rope(query, *rope)
        key = apply_rope(key, *rope)
    proc = attn.processor
    out = ex.attend(query, key, value, backend=getattr(proc, "_attention_backend", None),
                    parallel_config=getattr(proc, "_parallel_config", None))
    out = out.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return out
    enc, out = ex.split(out, encoder_hidden_states.shape[1])
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(enc.contiguous())


def flux_double_block(block, hidden_states, encoder_hidden_states, temb, rope, ex: Mode = DENSE, qkv=None,
                      added_qkv=None):
    """diffusers' ``FluxTransformerBlock.forward`` (same operations, same order) with :func:`flux_attention`, in
    mode ``ex``. Returns ``(encoder_hidden_states, hidden_states)``."""
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = ex.ada_norm(block.norm1, hidden_states, temb, IMAGE)
    norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ex.ada_norm(block.norm1_context,
                                                                           encoder_hidden_states, temb, TEXT)
    attn_out, context_attn_out = flux_attention(block.attn, norm_h, norm_e, rope, ex, qkv, added_qkv)

    hidden_states = hidden_states + ex.tok(gate_msa, IMAGE) * attn_out
    norm_h = block.norm2(hidden_states)
    norm_h = norm_h * (1 + ex.tok(scale_mlp, IMAGE)) + ex.tok(shift_mlp, IMAGE)
    hidden_states = hidden_states + ex.tok(gate_mlp, IMAGE) * block.ff(norm_h)

    encoder_hidden_states = encoder_hidden_states + ex.tok(c_gate_msa, TEXT) * context_attn_out
    norm_e = block.norm2_context(encoder_hidden_states)
    norm_e = norm_e * (1 + ex.tok(c_scale_mlp, TEXT)) + ex.tok(c_shift_mlp, TEXT)
    encoder_hidden_states = encoder_hidden_states + ex.tok(c_gate_mlp, TEXT) * block.ff_context(norm_e)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def flux_single_block(block, x, temb, rope, ex: Mode = DENSE, qkv=None):
    """diffusers' ``FluxSingleTransformerBlock.forward`` (same operations, same order) with :func:`flux_attention`
    on the joined ``[text ; image]`` sequence ``x``, in mode ``ex``; returns the new ``x``. (diffusers joins and
    splits the two streams in every block: the same values; here they stay joined across the single blocks.)"""
    residual = x
    norm_x, gate = ex.ada_norm(block.norm, x, temb, JOINT)
    mlp = block.act_mlp(block.proj_mlp(norm_x))
    attn_out = flux_attention(block.attn, norm_x, None, rope, ex, qkv)
    x = torch.cat([attn_out, mlp], dim=2)
    x = residual + ex.tok(gate, JOINT) * block.proj_out(x)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x


class FluxAdapter(DiTAdapter):
    """Adapter for diffusers' ``FluxPipeline`` (FLUX.1-dev with guidance embedding, FLUX.1-schnell without)."""
    bypassed_modules = ("attn",)  # its attention runs as ralu's own code (hooks on the module would not)

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

    def guidance_ignored(self) -> str | None:
        if not getattr(self.transformer.config, "guidance_embeds", True):
            return "FLUX.1-schnell's transformer has no guidance embedding (guidance_embeds=False)"
        return None

    def check_supported(self) -> None:
        check_blocks(named_blocks(self.transformer, "transformer_blocks", "single_transformer_blocks"),
                     ("FluxAttnProcessor",), "FLUX")

    packs = True
    shards = True
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
        packed call decomposes carries torch forward (pre-)hooks or diffusers hooks, or when a call carries FLUX.1
        Kontext reference tokens (``cond.data["ref_tokens"]``: not packed yet).
        """
        calls = check_velocity_calls(calls)
        execution = execution or PackedExecution(self, impl)
        if not can_pack(execution.impl, self._bypassed_by_packing()) or any(
                c.cond.data.get("ref_tokens") is not None for c in calls):  # Kontext references: one call each
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

        tokens = torch.cat([self._with_channels(c.tokens, c.grid, c.cond).reshape(-1, tr.config.in_channels)
                            for c in calls])
        positions = torch.cat([c.grid.positions.reshape(-1, 2) for c in calls])
        embeds = torch.cat([c.cond.data["embeds"].reshape(-1, c.cond.data["embeds"].shape[-1]) for c in calls])
        t = torch.cat([c.timestep.reshape(()).expand(b).to(dtype) / 1000 for c, b in zip(calls, counts)])
        guidance = torch.cat([c.cond.data["guidance"] for c in calls]) if guided else None
        pooled = torch.cat([c.cond.data["pooled"] for c in calls])
        impl, backend = execution.impl, self.packed_attention_backend
        if not execution.static_layout:
            ex = Packed(HostSegments([text_lens, image_lens], device), backend)
            out = self._forward(ex, tokens[None], embeds[None], *self._ids(positions[None], len(embeds)), t,
                                guidance, pooled, impl)
            return split_calls(out, calls)

        n_img, n_txt, n_seg = len(tokens), len(embeds), len(image_lens)
        pad_img, pad_txt = execution.pad("image", n_img) - n_img, execution.pad("text", n_txt) - n_txt
        segs = execution.pad("segments", n_seg + 1)
        kind = static_attention(backend, device, dtype)
        lay = PackedSegments.build([text_lens, image_lens], [pad_txt, pad_img], segs, device, kind)
        per_seg = [t, guidance, pooled]
        tensors = [pad_rows(tokens, pad_img), pad_rows(positions, pad_img), pad_rows(embeds, pad_txt),
                   *[pad_rows(x, segs - n_seg) for x in per_seg if x is not None], *lay.tensors()]

        def forward(*ts):  # the flat tensors only (a captured graph replays it for every mix of the same sizes)
            tok, pos, emb, tt = ts[:4]
            g, pool = (ts[4], ts[5]) if guided else (None, ts[4])
            ex = Packed(PackedSegments.from_tensors(ts[5 + guided:], 2, kind), backend)
            return self._forward(ex, tok[None], emb[None], *self._ids(pos[None], len(emb)), tt, g, pool, impl)

        out = execution.run(("flux", guided, kind, backend), forward, tensors)
        return split_calls(out[:, :n_img], calls)

    @staticmethod
    def _with_channels(tokens, grid, cond):
        """``tokens (B, L, C)`` with the call's channel conditioning (FLUX.1 Fill / control:
        :class:`ralu_runtime.channel_cond.ChannelCond` in ``cond.data["channels"]``, or its tensor for this token set
        from a compiled runner's flattened call) of the same token set concatenated on the channel axis, as the
        pipelines feed ``x_embedder``; ``tokens`` as given without one."""
        extra = cond.data.get("channels")
        if extra is None:
            return tokens
        extra = extra if torch.is_tensor(extra) else extra.tokens(grid)
        return torch.cat([tokens, extra.to(tokens.dtype)], dim=-1)

    @staticmethod
    def _ids(positions: torch.Tensor, text_len: int):
        """Rotary ids of the text ``(B, T, 3)`` (all 0) and image ``(B, L, 3)`` (``(0, row, col)``) tokens from image
        ``positions (B, L, 2)`` (float32)."""
        b = positions.shape[0]
        img = positions.new_zeros(b, positions.shape[1], 3, dtype=torch.float32)
        img[..., 1:] = positions
        return img.new_zeros(b, text_len, 3), img

    def _forward(self, ex: Mode, tokens, embeds, txt_ids, img_ids, t, guidance, pooled, impl: ModelImpl,
                 timestep=None) -> torch.Tensor:
        """The transformer in mode ``ex``: image ``tokens (B, L, C)`` and text ``embeds (B, T, D)`` in ``ex``'s
        layout (packed: ``B = 1`` holding every image; sharded: this rank's rows), their rotary ids, per image
        ``t`` (timestep / 1000), ``guidance`` (or None) and ``pooled``; ``timestep``: the call's 0-dim timestep for a
        feature cache (one-request modes). Returns the image tokens' velocity in ``ex``'s layout."""
        tr = self.transformer
        hidden = tr.x_embedder(tokens)
        t = t.to(hidden.dtype) * 1000
        if guidance is None:
            temb = tr.time_text_embed(t, pooled)
        else:
            temb = tr.time_text_embed(t, guidance.to(hidden.dtype) * 1000, pooled)
        enc = tr.context_embedder(embeds)
        ids = ex.join(txt_ids, img_ids)
        cos, sin = tr.pos_embed(ids.reshape(-1, 3))
        rope = (cos.view(*ids.shape[:2], -1), sin.view(*ids.shape[:2], -1))  # per token always: one graph

        double = impl.block(ex.block_name("flux_double"), flux_double_block)
        single = impl.block(ex.block_name("flux_single"), flux_single_block)
        doubles = [(blk, (impl.fused(blk.attn, QKV), impl.fused(blk.attn, ADDED_QKV))) for blk in tr.transformer_blocks]
        singles = [(blk, (impl.fused(blk.attn, QKV),)) for blk in tr.single_transformer_blocks]
        text_len = enc.shape[1]

        def double_step(i, e, h):
            blk, extra = doubles[i]
            args = (blk, h, e, temb, rope, ex, *extra)
            if blk._forward_hooks or blk._forward_pre_hooks:
                return call_with_hooks(blk, double, args, dict(hidden_states=h, encoder_hidden_states=e, temb=temb,
                                                               image_rotary_emb=rope))
            return double(*args)

        def single_step(j, x):
            blk, extra = singles[j]
            args = (blk, x, temb, rope, ex, *extra)
            if blk._forward_hooks or blk._forward_pre_hooks:  # hooks see diffusers' (text, image) interface
                e2, h2 = ex.split(x, text_len)
                e2, h2 = call_with_hooks(blk, lambda *a: ex.split(single(*a), text_len), args,
                                         dict(hidden_states=h2, encoder_hidden_states=e2, temb=temb,
                                              image_rotary_emb=rope))
                return ex.join(e2, h2)
            return single(*args)

        stack = double_then_single_stack(ex, len(doubles), len(singles), double_step, single_step, enc, hidden, IMAGE)
        hidden = self.run_stack(stack, hidden, timestep)
        return ex.call(tr.proj_out, ex.ada_norm(tr.norm_out, hidden, temb, IMAGE))

    fuses_projections = True
    max_side_px = FAMILIES["flux"].max_side_px  # 65536 fine tokens; FLUX.1 is trained up to about 2 MP

    def embed_dims(self) -> tuple[int, int]:
        cfg = self.transformer.config
        return int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)

    @property
    def patch_size(self) -> int:
        return 2

    @property
    def latent_channels(self) -> int:
        cfg = self.transformer.config  # FLUX.1 Fill / control take conditioning channels beyond the output's
        return (cfg.out_channels or cfg.in_channels) // 4

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
        txt, img = self._ids(grid.positions, text_len)
        ids = torch.cat([txt, img], dim=1)
        cos, sin = self.transformer.pos_embed(ids.reshape(-1, 3))
        return cos.view(*ids.shape[:2], -1), sin.view(*ids.shape[:2], -1)

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        """One request's velocity ``(B, L, C)``; sharded across ranks when the running ``generate`` call has a
        sharding plan (context parallelism: every rank returns the whole velocity). FLUX.1 Kontext: ``cond.data``'s
        ``ref_tokens`` ``(B, Lr, C)`` and ``ref_ids`` ``(B, Lr, 3)`` (:mod:`ralu_runtime.kontext`) are appended after
        the tokens and their ids, and only the first ``L`` rows of the output are returned."""
        embeds, pooled, guidance = cond.data["embeds"], cond.data["pooled"], cond.data["guidance"]
        tokens = self._with_channels(tokens, grid, cond)  # FLUX.1 Fill / control: conditioning channels
        b, n = tokens.shape[:2]
        t = timestep.expand(b).to(tokens.dtype) / 1000
        txt_ids, img_ids = self._ids(grid.positions, embeds.shape[1])
        plan = current_sharding()
        ref = cond.data.get("ref_tokens")
        if ref is not None:  # FLUX.1 Kontext: reference tokens appended with their own ids (ralu_runtime.kontext)
            if plan is not None:
                raise ValueError("FLUX.1 Kontext reference tokens do not run with context parallelism")
            tokens = torch.cat([tokens, ref.to(tokens.dtype)], dim=1)
            img_ids = torch.cat([img_ids, cond.data["ref_ids"].to(img_ids.dtype)], dim=1)
        ex = DENSE if plan is None else Sharded(plan, (embeds.shape[1], tokens.shape[1]))
        out = self._forward(ex, ex.local(tokens, IMAGE), ex.local(embeds, TEXT), ex.local(txt_ids, TEXT),
                            ex.local(img_ids, IMAGE), t, guidance, pooled, impl or EAGER, timestep)
        out = ex.whole(out, IMAGE)
        return out if ref is None else out[:, :n]  # the generated tokens' velocity only

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sched = self.scheduler_copy()
        cfg = sched.config
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(cfg, "use_flow_sigmas", False):
            sigmas = None
        mu = pipeline_mu(calculate_shift, cfg, image_seq_len)
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps, sched.sigmas.to(self.device)
