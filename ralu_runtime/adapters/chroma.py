"""Chroma adapter (ChromaPipeline / ChromaTransformer2DModel): FLUX.1-schnell-like MMDiT, 2x2 latent patches,
RoPE position ids per token, a T5 text-token attention mask, true classifier-free guidance.

Chroma replaces FLUX's per-block AdaLN linears by one *approximator* (``distilled_guidance_layer``): an MLP that
maps a timestep embedding plus a per-slot index embedding to all the blocks' shift/scale/gate vectors at once
(``(B, 3 n_single + 12 n_double + 2, D)``); each block takes its slice. The adapter computes that input exactly
as ``ChromaTransformer2DModel.forward`` does and calls the model's own approximator.

Positions: like FLUX, text ids are 0 and image ids are ``(0, row, col)``; RALU stage 2 gives every image its own
(fractional) positions, so the rotary tables are per image ``(B, T + L, D)`` and the adapter runs the blocks
itself (:func:`chroma_double_block`, :func:`chroma_single_block`: the same operations in the same order as
diffusers' ``ChromaTransformerBlock`` / ``ChromaSingleTransformerBlock`` with ``FluxAttnProcessor``), calling the
blocks' own layers, so LoRA layers and hooks on layers take effect. Nothing on the user's model is replaced.

Text mask: the pipeline extends the T5 mask (valid tokens plus one padding token) with ones for the image tokens
and every block passes ``m_i * m_j`` ``(B, 1, S, S)`` to attention; the adapter does the same. Note diffusers' own
mask is float 0/1, which scaled-dot-product attention *adds* to the logits (a +1 bias
between valid tokens, not a hard mask); a bool mask is a hard mask. Both are mirrored as given.

Refused before any work (:meth:`ChromaAdapter.check_supported`): attention processors other than diffusers'
``FluxAttnProcessor`` (IP-Adapter, custom processors) and diffusers hook registries on the blocks
(``enable_cache``, block-level group offloading), which running the blocks' layers would bypass.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..families import FAMILIES
from .base import (EAGER, Conditioning, DiTAdapter, ModelImpl, SplitBlocks, call_with_hooks, check_blocks, named_blocks,
                   scheduler_base_shift)
from .common import ADDED_QKV, QKV, apply_rope
from .common import projections as _projections


def chroma_attention(attn, hidden_states, encoder_hidden_states, rope, mask, qkv=None, added_qkv=None):
    """diffusers' ``FluxAttnProcessor`` on ``attn`` with rotary ``rope = (cos, sin)`` ``(B, S, D)`` and the
    attention mask ``mask`` ``(B, 1, S, S)`` (or None), as Chroma's blocks call it.

    ``qkv`` / ``added_qkv``: fused ``(weight, bias)`` of to_q/to_k/to_v and add_q/k/v_proj, or None.
    Returns the image output (single blocks) or ``(image output, text output)`` (double blocks).
    """
    from diffusers.models.attention_dispatch import dispatch_attention_fn

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
    query = apply_rope(query, *rope)
    key = apply_rope(key, *rope)
    proc = attn.processor
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, backend=getattr(proc, "_attention_backend", None),
                                parallel_config=getattr(proc, "_parallel_config", None))
    out = out.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return out
    enc, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]],
                                    dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(enc.contiguous())


def chroma_double_block(block, hidden_states, encoder_hidden_states, temb, rope, mask, qkv=None, added_qkv=None):
    """diffusers' ``ChromaTransformerBlock.forward`` (same operations, same order) with :func:`chroma_attention`.

    temb: ``(B, 12, D)`` image then text modulation; mask: the joint sequence's ``(B, S)`` mask or None.
    Returns ``(encoder_hidden_states, hidden_states)``."""
    mask = _pair_mask(mask)
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb[:, :6])
    norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(encoder_hidden_states,
                                                                                    emb=temb[:, 6:])
    attn_out, context_attn_out = chroma_attention(block.attn, norm_h, norm_e, rope, mask, qkv, added_qkv)

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


def chroma_single_block(block, hidden_states, temb, rope, mask, qkv=None):
    """diffusers' ``ChromaSingleTransformerBlock.forward`` (same operations, same order) on the joint text + image
    sequence ``(B, T + L, D)`` with :func:`chroma_attention`. temb: ``(B, 3, D)``; mask: ``(B, S)`` or None.
    Returns the new sequence."""
    mask = _pair_mask(mask)
    residual = hidden_states
    norm_x, gate = block.norm(hidden_states, emb=temb)
    mlp = block.act_mlp(block.proj_mlp(norm_x))
    attn_out = chroma_attention(block.attn, norm_x, None, rope, mask, qkv)
    x = torch.cat([attn_out, mlp], dim=2)
    x = residual + gate.unsqueeze(1) * block.proj_out(x)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x


def _pair_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """What Chroma's blocks give attention: ``m_i * m_j`` ``(B, 1, S, S)`` of the joint mask ``(B, S)``. Made inside
    each block function as diffusers does (inductor also fails to lower CPU attention on a 4-D mask input whose
    sizes are symbols of their own)."""
    return None if mask is None else mask[:, None, None, :] * mask[:, None, :, None]


def _joint_mask(text_mask: torch.Tensor | None, image_tokens: int) -> torch.Tensor | None:
    """The pipeline's attention mask: the text mask ``(B, T)`` extended with ones (bool, as diffusers does: the
    dtype promotes to the text mask's) for the image tokens -> ``(B, T + L)``; None without a text mask."""
    if text_mask is None:
        return None
    return torch.cat([text_mask, torch.ones(text_mask.shape[0], image_tokens, device=text_mask.device,
                                            dtype=torch.bool)], dim=1)


class ChromaAdapter(DiTAdapter):
    """Adapter for diffusers' ``ChromaPipeline`` (Chroma1-HD / Chroma1-Base)."""

    family = "chroma"  # defaults: ralu_runtime.families
    default_preset = FAMILIES["chroma"].default_preset
    default_steps = FAMILIES["chroma"].default_steps
    default_guidance = FAMILIES["chroma"].default_guidance
    base_shift = FAMILIES["chroma"].base_shift
    default_size = FAMILIES["chroma"].default_size
    default_text_len = FAMILIES["chroma"].default_text_len
    supports_negative_prompt = True
    takes_prompt_mask = True
    fuses_projections = True
    max_side_px = FAMILIES["chroma"].max_side_px  # 65536 fine tokens, as FLUX

    def __init__(self, pipe, *, weak: bool = False):
        super().__init__(pipe, weak=weak)
        self.transformer = pipe.transformer

    def check_supported(self) -> None:
        check_blocks(named_blocks(self.transformer, "transformer_blocks", "single_transformer_blocks"),
                     ("FluxAttnProcessor",), "Chroma")

    def embed_dims(self) -> tuple[int, None]:
        return int(self.transformer.config.joint_attention_dim), None

    def dummy_embeds(self, batch: int, text_len: int | None = None, *, device=None, dtype=None) -> dict:
        """The base's zero embeddings plus all-ones text masks in the embeddings' dtype: prompts always come with a
        mask (float, like the pipeline's own T5 mask), so a warm-up compiles the graphs real calls use."""
        out = super().dummy_embeds(batch, text_len, device=device, dtype=dtype)
        for key in ("prompt_embeds", "negative_prompt_embeds"):
            e = out[key]
            out[key + "_mask"] = torch.ones(e.shape[:2], device=e.device, dtype=e.dtype)
        return out

    def preset_base_shift(self, height: int, width: int) -> float:
        """h_ori = exp(mu) of the pipeline's dynamic shifting at the fine image token count of ``height x width``."""
        cell = self.vae_scale_factor * self.patch_size
        return scheduler_base_shift(self.pipe.scheduler.config, (height // cell) * (width // cell))

    @property
    def patch_size(self) -> int:
        return 2

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    # ---- prompts -----------------------------------------------------------------------------------------
    def _mask(self, mask, embeds, n):
        """A given ``(B, T)`` mask on the device, repeated per image; bool stays bool (a hard mask), anything else
        becomes the embeddings' dtype like the pipeline's own T5 mask (float 0/1)."""
        if mask is None:
            return None
        mask = mask.to(embeds.device)
        if mask.dtype != torch.bool:
            mask = mask.to(embeds.dtype)
        return mask.repeat_interleave(n, dim=0)

    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale, max_sequence_length=None, prompt_embeds_mask=None,
                      negative_prompt_embeds_mask=None):
        """The pipeline's own T5 encoding (prompt and negative prompt, "" by default), or the given embeddings
        ``(B, T, joint_attention_dim)`` with their ``(B, T)`` masks (None: every token valid). Classifier-free
        guidance when ``guidance_scale > 1``; both halves run as one batch when their text lengths and masks
        match, else as two passes."""
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("Chroma takes no pooled text embedding")
        cfg = guidance_scale > 1
        n = num_images_per_prompt
        msl = max_sequence_length or 512
        dev = self.device
        npe = nm = None
        if prompt_embeds is None:
            pe, _ids, pm, npe, _nids, nm = self.pipe.encode_prompt(
                prompt=prompt, negative_prompt=negative_prompt, device=dev, num_images_per_prompt=n,
                do_classifier_free_guidance=cfg, max_sequence_length=msl)
        else:  # images are prompt-major like the pipeline's own repeat for text prompts
            pe = prompt_embeds.to(dev).repeat_interleave(n, dim=0)
            pm = self._mask(prompt_embeds_mask, pe, n)
            if cfg and negative_prompt_embeds is not None:
                npe = negative_prompt_embeds.to(dev).repeat_interleave(n, dim=0)
                nm = self._mask(negative_prompt_embeds_mask, npe, n)
            elif cfg:  # the pipeline encodes the empty negative prompt
                if getattr(self.pipe, "text_encoder", None) is None:
                    raise ValueError("guidance_scale > 1 with prompt_embeds needs negative_prompt_embeds when the "
                                     "pipeline has no text encoder (it would encode the empty negative prompt)")
                npe, _ids, nm, *_ = self.pipe.encode_prompt(
                    prompt=[""] * prompt_embeds.shape[0], device=dev, num_images_per_prompt=n,
                    do_classifier_free_guidance=False, max_sequence_length=msl)
        b = pe.shape[0]
        data = {"embeds": pe, "mask": pm, "neg_embeds": None, "neg_mask": None, "cfg": cfg,
                "guidance_scale": float(guidance_scale)}
        if cfg:
            same = npe.shape[1:] == pe.shape[1:] and npe.dtype == pe.dtype and (nm is None) == (pm is None) and \
                (nm is None or nm.dtype == pm.dtype)
            if same:  # one batch [negative; positive]
                data["embeds"] = torch.cat([npe, pe])
                data["mask"] = None if pm is None else torch.cat([nm, pm])
            else:
                data["neg_embeds"], data["neg_mask"] = npe, nm
        return Conditioning(b, data)

    # ---- model -------------------------------------------------------------------------------------------
    def rotary(self, positions: torch.Tensor, text_len: int):
        """Per-image rotary ``(cos, sin)`` of shape ``(B, T + L, D)``: text ids (all 0), then image ids
        ``(0, row, col)`` at ``positions (B, L, 2)`` (any real values), by the model's own ``pos_embed``."""
        b, l, _ = positions.shape
        ids = torch.zeros(b, text_len + l, 3, device=positions.device, dtype=torch.float32)
        ids[:, text_len:, 1:] = positions
        cos, sin = self.transformer.pos_embed(ids.reshape(-1, 3))
        return cos.view(b, text_len + l, -1), sin.view(b, text_len + l, -1)

    def modulation(self, timestep: torch.Tensor) -> torch.Tensor:
        """The approximator's output ``(B, 3 n_single + 12 n_double + 2, D)`` for ``timestep`` ``(B,)`` (1000 sigma,
        model dtype): ``ChromaCombinedTimestepTextProjEmbeddings`` written out (its guidance input, a constant 0, is
        made on the timestep's device instead of the CPU, which CUDA graph capture forbids), then the model's
        ``distilled_guidance_layer``."""
        tr = self.transformer
        tte = tr.time_text_embed
        b = timestep.shape[0]
        n = tte.mod_proj.shape[0]
        t_proj = tte.time_proj(timestep).to(dtype=timestep.dtype)
        g_proj = tte.guidance_proj(torch.zeros(b, dtype=torch.long, device=timestep.device)).to(dtype=timestep.dtype)
        mod = tte.mod_proj.to(dtype=t_proj.dtype, device=t_proj.device).repeat(b, 1, 1)
        tg = torch.cat([t_proj, g_proj], dim=1).unsqueeze(1).repeat(1, n, 1)
        return tr.distilled_guidance_layer(torch.cat([tg, mod], dim=-1).to(timestep.dtype))

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        impl = impl or EAGER
        tr = self.transformer
        data = cond.data
        b, l, _ = tokens.shape
        t = timestep.expand(b).to(tokens.dtype) / 1000  # what the pipeline gives the transformer
        hidden = tr.x_embedder(tokens)
        pooled = self.modulation(t.to(hidden.dtype) * 1000)

        groups = [(data["embeds"], data["mask"])]  # text conditions, one model batch each
        if data["neg_embeds"] is not None:
            groups.insert(0, (data["neg_embeds"], data["neg_mask"]))
        reps = [e.shape[0] // b for e, _ in groups]  # 2 for a [negative; positive] batch, else 1
        positions = grid.positions
        inputs = []
        for (embeds, text_mask), r in zip(groups, reps):
            enc = tr.context_embedder(embeds)
            pos = positions if r == 1 else positions.repeat(r, 1, 1)
            rope = self.rotary(pos, enc.shape[1])  # (B, T + L, D) always: one graph for all stages when compiled
            mask = _joint_mask(text_mask, l)
            h = hidden if r == 1 else hidden.repeat(r, 1, 1)
            temb = pooled if r == 1 else pooled.repeat(r, 1, 1)
            inputs.append((enc, h, temb, rope, mask))

        nd, ns = len(tr.transformer_blocks), len(tr.single_transformer_blocks)
        double = impl.block("chroma_double", chroma_double_block)
        single = impl.block("chroma_single", chroma_single_block)
        doubles = [(blk, (impl.fused(blk.attn, QKV), impl.fused(blk.attn, ADDED_QKV))) for blk in tr.transformer_blocks]
        singles = [(blk, (impl.fused(blk.attn, QKV),)) for blk in tr.single_transformer_blocks]
        img_off, txt_off = 3 * ns, 3 * ns + 6 * nd

        def step(g, state, i):  # block i of the stack on one group's state (e, h) or joint sequence x
            _enc, _h, temb, rope, mask = inputs[g]
            if i < nd:
                e, h = state
                blk, extra = doubles[i]
                mod = torch.cat((temb[:, img_off + 6 * i: img_off + 6 * i + 6],
                                 temb[:, txt_off + 6 * i: txt_off + 6 * i + 6]), dim=1)
                args = (blk, h, e, mod, rope, mask, *extra)
                if blk._forward_hooks or blk._forward_pre_hooks:
                    return call_with_hooks(blk, double, args, dict(
                        hidden_states=h, encoder_hidden_states=e, temb=mod, image_rotary_emb=rope,
                        attention_mask=mask))
                return double(*args)
            x = torch.cat(state, dim=1) if i == nd else state  # the joint sequence enters the single blocks
            blk, extra = singles[i - nd]
            mod = temb[:, 3 * (i - nd): 3 * (i - nd) + 3]
            args = (blk, x, mod, rope, mask, *extra)
            if blk._forward_hooks or blk._forward_pre_hooks:
                return call_with_hooks(blk, single, args, dict(hidden_states=x, temb=mod, image_rotary_emb=rope,
                                                               attention_mask=mask))
            return single(*args)

        def image_part(g, state, i):  # image hidden states of a state after block i - 1
            return state[1] if i <= nd else state[:, inputs[g][0].shape[1]:]

        def run(states, start, stop):
            for i in range(start, stop):
                states = [step(g, s, i) for g, s in enumerate(states)]
            return states

        def joined(states, i):
            parts = [image_part(g, s, i) for g, s in enumerate(states)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        def first():
            states = run([(inp[0], inp[1]) for inp in inputs], 0, 1)
            return joined(states, 1), states

        blocks = SplitBlocks(first, lambda states: joined(run(states, 1, nd + ns), nd + ns))
        all_hidden = hidden if len(inputs) == 1 and reps[0] == 1 else torch.cat([inp[1] for inp in inputs])
        out = self.run_blocks(blocks, all_hidden, timestep)
        temb_all = torch.cat([inp[2] for inp in inputs]) if len(inputs) > 1 else inputs[0][2]
        out = tr.proj_out(tr.norm_out(out, temb_all[:, -2:]))
        if data["cfg"]:
            uncond, text = out.chunk(2)
            out = uncond + data["guidance_scale"] * (text - uncond)
        return out

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift, retrieve_timesteps

        sched = copy.deepcopy(self.pipe.scheduler)
        cfg = sched.config
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps, sched.sigmas.to(self.device)
