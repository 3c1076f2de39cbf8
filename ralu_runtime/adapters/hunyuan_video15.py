"""HunyuanVideo 1.5 adapter (HunyuanVideo15Pipeline / HunyuanVideo15Transformer3DModel, text-to-video): an 8.3 B
dual-stream DiT on 32-channel video latents (VAE: 16x spatial, 4x temporal compression), 1x1x1 patches, conditioned
on Qwen2.5-VL hidden states (refined by a token refiner) plus byT5 embeddings of quoted glyph text, classifier-free
guidance through the pipeline's ``ClassifierFreeGuidance`` guider.

**Latents and tokens.** Latents are ``(B, C, F, h, w)``; tokens are frame-major raster ``(B, F (h/p) (w/p), C p p)``.
For t2v the pipeline feeds the transformer ``[latents, zeros (C), zeros (1)]`` (condition latents and mask): the
adapter appends the same zero channels to every token and runs the model's own patch embedding (``x_embedder``)
on them.

**Positions.** The transformer builds 3-D RoPE (axes frame, row, col; dims ``rope_axes_dim``, theta 256, diffusers'
``get_1d_rotary_pos_embed`` with real interleaved tables) from the integer latent grid. RALU gives a tall grid
(frames stacked vertically, :class:`TokenGrid` with ``frames``): a token at tall row ``r`` is in frame
``r // R`` (``R = grid_hw[0] // frames``) at row ``r - frame R``; the rotary tables are evaluated per image and
per token at (frame, row, col), fractional rows / cols for stage-2 children, by the model's own rope function.
Equal to the model's table on integer full grids. Text tokens get no RoPE (as in the model).

**Text.** As in the transformer: Qwen tokens go through ``context_embedder`` (token refiner, with their mask) and
byT5 tokens through ``context_embedder_2``; the joint text sequence is [valid byT5, valid Qwen] tokens (the t2v
image-embedding tokens are all masked). Masked text tokens never reach a valid token in diffusers, so the adapter
drops the ones that are masked in every image of the batch and masks the rest as attention keys (diffusers'
(S x S) mask gives the same outputs for every valid token). ``generate`` cannot pass byT5 embeddings: with
``prompt_embeds`` the glyph stream is the pipeline's encoding of a prompt without quoted text (all masked); text
prompts use the pipeline's own encoders (both streams). :meth:`HunyuanVideo15Adapter.encode_prompt` takes
``prompt_embeds_2`` / ``prompt_embeds_mask_2`` (and negative ones) for direct callers.

**Guidance.** ``guidance_scale`` is the guider's ``guidance_scale`` (default: ``pipe.guider.guidance_scale``, 6.0
published), with the guider's formulation (``use_original_formulation``) and ``guidance_rescale``; CFG is off when
the guider is disabled or the scale is 1 (0 in the original formulation), as the guider decides. The negative
prompt defaults to the empty prompt (encoded by the pipeline). Both halves run as one batch of 2B.

**Execution modes** (:mod:`ralu_runtime.execution`; :func:`hv15_block` is written once against the mode, the
shared request handling is :class:`~ralu_runtime.adapters.double_stream.DoubleStreamAdapter`): one request
(``Dense``: the text validity as the joint ``(B, 1, 1, L + T)`` key mask above); sharded across ranks (context
parallelism, ``generate(parallel=...)``, the mode that matters for long videos: the joined [image ; text] sequence,
the video as its tall grid of frames, cut into contiguous row ranges across ranks, the validity as the sharded
attention's ``(B, L + T)`` key mask, the rotary tables computed for the whole grid and sliced to each rank's rows;
every rank holds the whole velocity); many requests packed into one call
(:meth:`~ralu_runtime.adapters.double_stream.DoubleStreamAdapter.packed_velocity`: every video -- both CFG halves
included -- its own attention segment with its own timestep, text states and rotary tables from its own grid and
frame count; masked text tokens are left out, exact as above). Packed calls fall back to one call per request with
a feature cache or with hooks on the blocks, their AdaLN modules or the output norm.

**Refused** (:meth:`HunyuanVideo15Adapter.check_supported`, before any work): attention processors other than
``HunyuanVideo15AttnProcessor2_0``, diffusers hook registries on the blocks, temporal patches (``patch_size_t``
> 1), inputs other than t2v's ``2 C + 1`` channels, guiders other than ``ClassifierFreeGuidance`` or with a
step window (``start``/``stop``), which RALU's stages cannot map. ralu integrates with its own solvers (Euler by
default), which is what the pipeline's FlowMatchEulerDiscreteScheduler does.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..families import FAMILIES
from ..execution.modes import DENSE, Mode
from .base import EAGER, Conditioning, ModelImpl, TokenGrid, compute_dtype, scheduler_base_shift, vae_lock
from .double_stream import DoubleStreamAdapter, StreamInputs

IMAGE, TEXT = 0, 1  # HunyuanVideo 1.5's streams, in the order of its joint sequence [image ; text]


def apply_rope_hv(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(use_real=True, sequence_dim=1)`` on ``x (B, L, H, D)`` with per-token tables
    ``cos`` / ``sin`` ``(B, L, D)`` float32 (interleaved pairs)."""
    xr, xi = x.unflatten(-1, (-1, 2)).unbind(-1)  # not reshape(-1): a sharded rank may hold no image rows
    rot = torch.stack([-xi, xr], dim=-1).flatten(3)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * c + rot.float() * s).to(x.dtype)


def hv15_attention(attn, hidden_states, encoder_hidden_states, cos, sin, ex: Mode = DENSE):
    """diffusers' ``HunyuanVideo15AttnProcessor2_0`` on ``attn`` in mode ``ex`` (its text key mask is the mode's:
    ``Dense(attn_mask)`` / ``Sharded(key_mask=)``; a packed call holds valid text tokens only), with per-token
    rotary ``cos``/``sin`` ``(B, L, D)`` on the image tokens (in ``ex``'s layout of the image stream), image tokens
    first. Returns ``(image output, text output)``."""
    q = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
    k = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
    v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k = apply_rope_hv(q, cos, sin), apply_rope_hv(k, cos, sin)
    tq = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    tk = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    tv = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
    if attn.norm_added_q is not None:
        tq = attn.norm_added_q(tq)
    if attn.norm_added_k is not None:
        tk = attn.norm_added_k(tk)
    query, key, value = ex.join(q, tq), ex.join(k, tk), ex.join(v, tv)
    proc = attn.processor
    out = ex.attend(query, key, value, backend=getattr(proc, "_attention_backend", None),
                    parallel_config=getattr(proc, "_parallel_config", None))
    out = out.flatten(2, 3).to(query.dtype)
    img, txt = ex.split(out, hidden_states.shape[1])
    img = attn.to_out[1](attn.to_out[0](img))
    return img, attn.to_add_out(txt)


def hv15_block(block, hidden_states, encoder_hidden_states, temb, cos, sin, ex: Mode = DENSE):
    """diffusers' ``HunyuanVideo15TransformerBlock.forward`` (same operations, same order) with
    :func:`hv15_attention`, in mode ``ex``. Returns ``(hidden_states, encoder_hidden_states)``."""
    x, gate_msa, shift_mlp, scale_mlp, gate_mlp = ex.ada_norm(block.norm1, hidden_states, temb, IMAGE)
    c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ex.ada_norm(block.norm1_context, encoder_hidden_states,
                                                                      temb, TEXT)
    attn_out, ctx_out = hv15_attention(block.attn, x, c, cos, sin, ex)
    hidden_states = hidden_states + attn_out * ex.tok(gate_msa, IMAGE)
    encoder_hidden_states = encoder_hidden_states + ctx_out * ex.tok(c_gate_msa, TEXT)
    x = block.norm2(hidden_states) * (1 + ex.tok(scale_mlp, IMAGE)) + ex.tok(shift_mlp, IMAGE)
    c = block.norm2_context(encoder_hidden_states) * (1 + ex.tok(c_scale_mlp, TEXT)) + ex.tok(c_shift_mlp, TEXT)
    hidden_states = hidden_states + ex.tok(gate_mlp, IMAGE) * block.ff(x)
    encoder_hidden_states = encoder_hidden_states + ex.tok(c_gate_mlp, TEXT) * block.ff_context(c)
    return hidden_states, encoder_hidden_states


def _bool_mask(mask, like: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, T)`` mask (any dtype, None = all valid) -> bool on ``like``'s device, ``n`` images per prompt."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.to(like.device).bool().repeat_interleave(n, dim=0)


class HunyuanVideo15Adapter(DoubleStreamAdapter):
    """Adapter for diffusers' ``HunyuanVideo15Pipeline`` (text-to-video). See the module docstring."""

    family = "hunyuan-video-1.5"  # defaults: ralu_runtime.families
    default_preset = FAMILIES["hunyuan-video-1.5"].default_preset
    default_steps = FAMILIES["hunyuan-video-1.5"].default_steps
    default_guidance = FAMILIES["hunyuan-video-1.5"].default_guidance  # without a guider (guidance_default)
    default_text_len = FAMILIES["hunyuan-video-1.5"].default_text_len  # Qwen embeddings padded to tokenizer_max_length
    supports_negative_prompt = True
    takes_max_sequence_length = False  # HunyuanVideo15Pipeline pads to tokenizer_max_length (Qwen) and 256 (byT5)
    takes_prompt_mask = True
    is_video = True
    default_frames = FAMILIES["hunyuan-video-1.5"].default_frames
    temporal_factor = FAMILIES["hunyuan-video-1.5"].temporal_factor
    max_side_px = FAMILIES["hunyuan-video-1.5"].max_side_px

    def __init__(self, pipe, *, weak: bool = False):
        super().__init__(pipe, weak=weak)
        self.transformer = pipe.transformer
        self.temporal_factor = int(getattr(pipe, "vae_scale_factor_temporal", 4))

    def guidance_default(self) -> float:
        """The pipeline's guider's ``guidance_scale`` as it is now (the pipeline reads it on every call; a guider
        replaced or changed after an earlier call counts), else :attr:`default_guidance` (the published 6.0)."""
        pipe = self.pipe
        guider = getattr(pipe, "guider", None) if pipe is not None else None
        if guider is not None and hasattr(guider, "guidance_scale"):
            return float(guider.guidance_scale)
        return self.default_guidance

    def runs_cfg(self, guidance_scale: float, negative: bool) -> bool:
        """As the guider decides: off when it is disabled or the scale is 1 (0 in the original formulation)."""
        guider = self.pipe.guider
        orig = bool(getattr(guider, "use_original_formulation", False))
        return bool(getattr(guider, "_enabled", True)) and not math.isclose(guidance_scale, 0.0 if orig else 1.0)

    # ---- checks and geometry -------------------------------------------------------------------------------
    def check_supported(self) -> None:
        tr = self.transformer
        cfg = tr.config
        if cfg.patch_size_t != 1:
            raise ValueError(f"patch_size_t={cfg.patch_size_t}: ralu supports HunyuanVideo 1.5 with temporal patch 1")
        if cfg.in_channels != 2 * cfg.out_channels + 1:
            raise ValueError(f"in_channels={cfg.in_channels}: the t2v transformer takes 2 x {cfg.out_channels} + 1 "
                             "channels (latents, condition latents, mask)")
        guider = self.pipe.guider
        if type(guider).__name__ != "ClassifierFreeGuidance":
            raise ValueError(f"pipe.guider is {type(guider).__name__}: ralu runs HunyuanVideo 1.5 with diffusers' "
                             "ClassifierFreeGuidance only (guidance_scale is generate's)")
        if guider._start != 0.0 or guider._stop != 1.0:
            raise ValueError(f"pipe.guider has a step window (start={guider._start}, stop={guider._stop}); RALU's "
                             "stages cannot map it: use start=0, stop=1")
        for i, block in enumerate(tr.transformer_blocks):
            proc = getattr(block.attn, "processor", None)
            if type(proc).__name__ != "HunyuanVideo15AttnProcessor2_0":
                raise ValueError(f"transformer_blocks.{i}.attn has attention processor {type(proc).__name__}; ralu "
                                 "runs HunyuanVideo 1.5 attention itself and supports only diffusers' "
                                 "HunyuanVideo15AttnProcessor2_0: restore it with pipe.transformer."
                                 "set_attn_processor(HunyuanVideo15AttnProcessor2_0())")
            hooks = getattr(block, "_diffusers_hook", None)
            if hooks is not None and getattr(hooks, "hooks", None):
                raise ValueError(f"transformer_blocks.{i} carries diffusers hooks ({', '.join(map(str, hooks.hooks))}:"
                                 " e.g. enable_cache or block-level group offloading); ralu runs the blocks' layers "
                                 "itself and would bypass them. Remove them and use generate(cache=...)")

    def embed_dims(self) -> tuple[int, None]:
        return int(self.transformer.config.text_embed_dim), None

    @property
    def default_size(self) -> int:
        """Square default (pixels) for generate without height / width: the transformer's ``target_size`` rounded
        down to the 32-px coarse block (the pipeline's own default is a 16:9 bucket of that area, see
        :meth:`default_hw`)."""
        blk = self.coarse_block_px
        return max(blk, int(self.transformer.config.target_size) // blk * blk)

    def default_hw(self) -> tuple[int, int]:
        """The pipeline's own default (height, width) (16:9 bucket of ``target_size``), rounded down to multiples of
        the 32-px coarse block (720 x 1280 -> 704 x 1280, 480 x 848 -> 480 x 832)."""
        p = self.pipe
        h, w = p.video_processor.calculate_default_height_width(p.default_aspect_ratio[1], p.default_aspect_ratio[0],
                                                                p.target_size)
        blk = self.coarse_block_px
        return max(blk, h // blk * blk), max(blk, w // blk * blk)

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.out_channels)

    def preset_base_shift(self, height: int, width: int) -> float:
        """The scheduler's static shift (the pipeline passes plain linspace sigmas; 9.0 for the 720p t2v model, 5.0
        for 480p); with dynamic shifting the scheduler's mu line at the fine token count of the default frames."""
        frames = (self.default_frames - 1) // self.temporal_factor + 1
        return scheduler_base_shift(self.pipe.scheduler.config, self.fine_tokens(height, width, frames))

    # ---- tokens --------------------------------------------------------------------------------------------
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, h, w)`` -> ``(B, F (h/p) (w/p), C p p)`` tokens, frame-major raster, channels (c, py, px)."""
        b, c, f, h, w = latents.shape
        p = self.patch_size
        x = latents.reshape(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, f * (h // p) * (w // p), c * p * p)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of :meth:`pack`; the frame count comes from the token count."""
        b, n, ct = tokens.shape
        p = self.patch_size
        c = ct // (p * p)
        f = n // ((h // p) * (w // p))
        x = tokens.reshape(b, f, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, f, h, w)

    # ---- prompts -------------------------------------------------------------------------------------------
    def _encode(self, prompt, batch, embeds, mask, embeds_2, mask_2, n):
        """``(qwen embeds (B, T, D), bool mask, byT5 embeds (B, T2, D2) or None, bool mask or None)`` for ``B =
        batch n`` images: the pipeline's encode_prompt for text (or for the missing parts of given embeddings),
        the given tensors repeated prompt-major otherwise."""
        pipe, dev, dtype = self.pipe, self.device, self.dtype
        if embeds is None:
            if getattr(pipe, "text_encoder", None) is None:
                raise ValueError("this pipeline has no text encoder: give prompt_embeds (and negative_prompt_embeds "
                                 "with classifier-free guidance)")
            e, m, e2, m2 = pipe.encode_prompt(prompt=prompt, device=dev, dtype=dtype, batch_size=batch,
                                              num_videos_per_prompt=n, prompt_embeds_2=embeds_2,
                                              prompt_embeds_mask_2=mask_2)
            return e, m.bool(), e2, m2.bool()
        e = embeds.to(dev).repeat_interleave(n, dim=0)
        m = _bool_mask(mask, e, n)
        if embeds_2 is None:
            return e, m, None, None
        e2 = embeds_2.to(dev).repeat_interleave(n, dim=0)
        return e, m, e2, _bool_mask(mask_2, e2, n)

    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale, max_sequence_length=None, prompt_embeds_mask=None,
                      negative_prompt_embeds_mask=None, prompt_embeds_2=None, prompt_embeds_mask_2=None,
                      negative_prompt_embeds_2=None, negative_prompt_embeds_mask_2=None):
        """Conditioning data (``B`` videos, ``2B`` rows [negative; positive] with CFG): ``embeds`` Qwen ``(rows,
        T, D)``, ``mask`` float ``(rows, T)``, ``embeds_2`` byT5 ``(rows, T2, D2)`` or None (no glyph text),
        ``order`` ``(rows, S)`` int64 indices into [byT5; Qwen] tokens and ``valid`` ``(rows, S)`` bool: the joint
        text sequence ([valid byT5, valid Qwen], trimmed to the longest), ``cfg``, ``guidance_scale``.

        ``prompt_embeds_2`` / ``prompt_embeds_mask_2`` (and negative ones): byT5 glyph embeddings ``(B, T2,
        text_embed_2_dim)`` with masks, for direct callers (generate cannot pass them); without them given
        embeddings come with no glyph text, as the pipeline encodes a prompt without quoted text."""
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("HunyuanVideo 1.5 takes no pooled text embedding")
        n = num_images_per_prompt
        prompts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        pos = self._encode(prompts, batch, prompt_embeds, prompt_embeds_mask, prompt_embeds_2,
                           prompt_embeds_mask_2, n)
        guider = self.pipe.guider
        orig = bool(getattr(guider, "use_original_formulation", False))
        cfg = self.runs_cfg(guidance_scale, negative_prompt is not None or negative_prompt_embeds is not None)
        rows = [pos]
        if cfg:
            if negative_prompt is not None:
                neg_prompts = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(neg_prompts) == 1:
                    neg_prompts = neg_prompts * batch
                if len(neg_prompts) != batch:
                    raise ValueError(f"got {len(neg_prompts)} negative prompts for {batch} prompts")
            elif negative_prompt_embeds is None:
                neg_prompts = [""] * batch  # the pipeline's default negative: encode_prompt(prompt=None)
            else:
                neg_prompts = None
            rows.insert(0, self._encode(neg_prompts, batch, negative_prompt_embeds, negative_prompt_embeds_mask,
                                        negative_prompt_embeds_2, negative_prompt_embeds_mask_2, n))
        dtype = pos[0].dtype
        t1 = max(r[0].shape[1] for r in rows)
        meta = pos[0].device.type == "meta"  # shapes only (FLOP counting): every given token counts as valid
        glyph = [r for r in rows if r[2] is not None and (meta or bool(r[3].any()))]
        t2 = max((r[2].shape[1] for r in glyph), default=0)
        embeds, masks, embeds_2, masks_2 = [], [], [], []
        for e, m, e2, m2 in rows:  # pad to common lengths with masked tokens (they never reach a valid token)
            embeds.append(torch.cat([e.to(dtype), e.new_zeros(e.shape[0], t1 - e.shape[1], e.shape[2])], 1))
            masks.append(torch.cat([m, m.new_zeros(m.shape[0], t1 - m.shape[1])], 1))
            if t2:
                if e2 is None or not (meta or bool(m2.any())):
                    e2 = e.new_zeros(e.shape[0], t2, int(self.transformer.config.text_embed_2_dim))
                    m2 = m.new_zeros(e.shape[0], t2)
                embeds_2.append(torch.cat([e2.to(dtype), e2.new_zeros(e2.shape[0], t2 - e2.shape[1], e2.shape[2])],
                                          1))
                masks_2.append(torch.cat([m2, m2.new_zeros(m2.shape[0], t2 - m2.shape[1])], 1))
        mask = torch.cat(masks)
        mask_2 = torch.cat(masks_2) if t2 else mask.new_zeros(mask.shape[0], 0)
        joint = torch.cat([mask_2, mask], dim=1)  # [byT5; Qwen] token validity
        if meta:
            order = torch.arange(joint.shape[1], device=joint.device).expand(joint.shape[0], -1)
            valid = torch.ones_like(joint)
            all_valid = True
        else:
            count = joint.sum(1)
            s = max(int(count.max()), 1)
            # stable sort: valid tokens first in their own order (byT5 then Qwen), as the transformer reorders them
            order = torch.sort((~joint).to(torch.int8), dim=1, stable=True).indices[:, :s]
            valid = torch.arange(s, device=mask.device)[None, :] < count[:, None]
            all_valid = bool(valid.all())
        data = {"embeds": torch.cat(embeds), "mask": mask.to(dtype), "embeds_2": torch.cat(embeds_2) if t2 else None,
                "order": order, "valid": valid, "all_valid": all_valid, "cfg": cfg,
                "guidance_scale": float(guidance_scale), "original": orig,
                "guidance_rescale": float(getattr(guider, "guidance_rescale", 0.0))}
        return Conditioning(batch * n, data)

    # ---- positions -----------------------------------------------------------------------------------------
    def rotary(self, grid: TokenGrid, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image rotary ``(cos, sin)``, each ``(B, L, D)`` float32, at every token's (frame, row, col) from the
        tall-grid ``grid.positions`` (frame = row // rows per frame), by the model's ``get_1d_rotary_pos_embed``
        per axis (``rope_axes_dim``, ``rope_theta``). ``repeat``: batch repeats (2 for CFG)."""
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        pos = grid.positions.to(torch.float32)
        if repeat > 1:
            pos = pos.repeat(repeat, 1, 1)
        b, l, _ = pos.shape
        rpf = grid.grid_hw[0] // max(int(grid.frames), 1)
        row, col = pos[..., 0], pos[..., 1]
        frame = torch.floor(row / rpf)
        coords = (frame, row - frame * rpf, col)
        rope = self.transformer.rope
        cos, sin = [], []
        for axis, dim in zip(coords, rope.rope_dim):
            c, s = get_1d_rotary_pos_embed(dim, axis.reshape(-1), rope.theta, use_real=True)
            cos.append(c.view(b, l, -1))
            sin.append(s.view(b, l, -1))
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)

    # ---- model ---------------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, C p p)`` tokens + t2v's zero condition channels -> ``(B, L, inner)`` by the model's
        ``x_embedder`` (a (1, p, p) conv run on the tokens laid side by side). No tokens (a rank of a sharded call
        that holds only text rows): ``(B, 0, inner)``, which the conv itself refuses."""
        tr = self.transformer
        b, l, ct = tokens.shape
        if l == 0:
            return tokens.new_empty(b, 0, tr.x_embedder.proj.out_channels)
        p = self.patch_size
        cin = int(tr.config.in_channels)
        x = torch.cat([tokens, tokens.new_zeros(b, l, (cin * p * p) - ct)], dim=-1)
        x = x.view(b, l, cin, p, p).permute(0, 2, 3, 1, 4).reshape(b, cin, 1, p, l * p)
        return tr.x_embedder(x)

    def text_states(self, data: dict, timestep: torch.Tensor) -> torch.Tensor:
        """The joint text sequence ``(rows, S, inner)`` as the transformer builds it (refined Qwen tokens + type
        embedding 0, byT5 projection + type embedding 1), valid tokens gathered by ``data["order"]``, invalid ones
        zeroed."""
        tr = self.transformer
        enc = tr.context_embedder(data["embeds"], timestep, data["mask"])
        enc = enc + tr.cond_type_embed(torch.zeros_like(enc[:, :, 0], dtype=torch.long))
        if data["embeds_2"] is not None:
            enc2 = tr.context_embedder_2(data["embeds_2"])
            enc2 = enc2 + tr.cond_type_embed(torch.ones_like(enc2[:, :, 0], dtype=torch.long))
            enc = torch.cat([enc2, enc], dim=1)
        order = data["order"]
        txt = torch.gather(enc, 1, order[..., None].expand(-1, -1, enc.shape[-1]))
        return txt if data["all_valid"] else txt * data["valid"][..., None].to(txt.dtype)

    TEXT, IMAGE = TEXT, IMAGE

    def _inputs(self, x, grid, timestep, data) -> StreamInputs:
        """Image stream: tokens and the rotary tables of :meth:`rotary` (each token at its frame, row and column of
        the tall grid); text stream: :meth:`text_states` (valid tokens first); the text validity (None when every
        token of every row is valid); per image: the timestep."""
        b = x.shape[0]
        t = timestep.expand(b).to(x.dtype)
        cos, sin = self.rotary(grid, b // grid.positions.shape[0])  # (B, L, D) always: one graph for all stages
        return StreamInputs(image=(x, cos, sin), text=(self.text_states(data, t),),
                            text_mask=None if data["all_valid"] else data["valid"], per_image=(t,))

    def _forward(self, ex, image, text, per_image, impl, timestep=None, text_mask=None):
        tr = self.transformer
        tokens, cos, sin = image
        (enc,) = text
        temb = tr.time_embed(per_image[0])
        hidden = self.embed_tokens(tokens)
        block_fn = impl.block(ex.block_name("hunyuan_video15_block"), hv15_block)
        blocks = [(blk, ()) for blk in tr.transformer_blocks]

        def hook_kwargs(state):  # diffusers' block forward: the joint key mask (B, 1, 1, L + T), as its processor
            mask = None
            if text_mask is not None:
                ones = torch.ones(text_mask.shape[0], state[0].shape[1], dtype=torch.bool, device=text_mask.device)
                mask = torch.cat([ones, text_mask], 1)[:, None, None]
            return dict(hidden_states=state[0], encoder_hidden_states=state[1], temb=temb, attention_mask=mask,
                        freqs_cis=(cos, sin))

        stack = self._block_stack(ex, block_fn, blocks, (hidden, enc), 0,
                                  lambda blk, s, extra: (blk, s[0], s[1], temb, cos, sin, ex), hook_kwargs)
        hidden = self.run_stack(stack, hidden, timestep)
        return ex.call(tr.proj_out, ex.ada_norm(tr.norm_out, hidden, temb, IMAGE))

    def _guide(self, out, data):
        """The guider's CFG: ``neg + s (pos - neg)`` (``pos + s (pos - neg)`` in the original formulation), then
        its ``guidance_rescale`` when > 0."""
        neg, pos = out.chunk(2)
        comb = (pos if data["original"] else neg) + data["guidance_scale"] * (pos - neg)
        if data["guidance_rescale"] > 0:
            from diffusers.guiders.guider_utils import rescale_noise_cfg

            comb = rescale_noise_cfg(comb, pos, data["guidance_rescale"])
        return comb

    def _bypassed_by_packing(self) -> list:
        tr = self.transformer
        mods = [tr.norm_out]
        for blk in tr.transformer_blocks:
            mods += [blk, blk.norm1, blk.norm1_context]
        return mods

    def prepare_noise(self, batch, height, width, generators, dtype, num_frames=None):
        """``(B, C, (num_frames - 1) // 4 + 1, h, w)``: the pipeline's ``prepare_latents`` draw."""
        from diffusers.utils.torch_utils import randn_tensor

        num_frames = self.default_frames if num_frames is None else num_frames
        h, w = self.latent_hw(height, width)
        f = self.latent_frames(num_frames)
        return randn_tensor((batch, self.latent_channels, f, h, w), generator=generators, device=self.device,
                            dtype=dtype)

    def baseline_schedule(self, num_steps, image_seq_len):
        """The pipeline's ``sigmas = linspace(1, 0, N + 1)[:-1]`` through (a copy of) its scheduler."""
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import retrieve_timesteps

        sched = self.scheduler_copy()
        sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, sigmas=sigmas)
        return timesteps, sched.sigmas.to(self.device)

    def decode(self, latents, impl: ModelImpl | None = None):
        """Latents ``(B, C, F, h, w)`` -> video ``(B, 3, 4 (F - 1) + 1, 16 h, 16 w)``: the pipeline's ``latents /
        scaling_factor`` in the VAE's dtype and VAE decode, one video at a time (diffusers 0.42.1's
        ``AutoencoderKLHunyuanVideo15`` mid-block attention breaks for a batch of more than one video unless
        ``vae.enable_slicing()``, which decodes one at a time too), one decode at a time per VAE
        (:func:`~ralu_runtime.adapters.base.vae_lock`: a causal 3-D VAE, never run from two threads at once)."""
        vae = self.pipe.vae
        z = latents.to(compute_dtype(vae)) / vae.config.scaling_factor
        fn = (impl or EAGER).vae_decode(vae)
        if fn is None:
            def fn(x):
                return vae.decode(x, return_dict=False)[0]
        with vae_lock(vae):
            return torch.cat([fn(zi) for zi in z.split(1)]) if z.shape[0] > 1 else fn(z)

    def edge_images(self, latents, decode):
        """One decoded frame per latent frame (decoded frame ``4 f`` for latent frame ``f``, clipped), stacked
        vertically: ``(B, 3, F H, W)``."""
        video = decode(latents)
        f = latents.shape[2]
        idx = torch.clamp(torch.arange(f) * self.temporal_factor, max=video.shape[2] - 1).to(video.device)
        frames = video.index_select(2, idx)  # (B, 3, F, H, W)
        b, c, _, hh, ww = frames.shape
        return frames.reshape(b, c, f * hh, ww)

    def postprocess(self, images, output_type):
        """Video ``(B, 3, T, H, W)`` in [-1, 1] -> what the pipeline returns (``video_processor.postprocess_video``)."""
        return self.pipe.video_processor.postprocess_video(images, output_type=output_type)
