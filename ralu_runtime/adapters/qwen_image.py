"""Qwen-Image adapter (QwenImagePipeline / QwenImageTransformer2DModel): a 20 B dual-stream MMDiT conditioned on
Qwen2.5-VL hidden states, 2x2 latent patches, 3-axis RoPE, true classifier-free guidance.

**Positions.** diffusers' transformer builds its rotary table from ``img_shapes`` (integer grids) with
``QwenEmbedRope(scale_rope=True)``: axes (frame, row, col) of ``axes_dims_rope`` dims; an image of ``H x W``
tokens has frame 0, rows ``i - (H - H // 2)`` and columns ``j - (W - W // 2)`` (centred: the upper half at
negative indices), and text token ``k`` has ``max(H // 2, W // 2) + k`` on all three axes. RALU needs per-image,
possibly fractional positions, so the adapter runs the block stack itself (:func:`qwen_image_block`, the same
operations in the same order as ``QwenImageTransformerBlock`` with ``QwenDoubleStreamAttnProcessor2_0``,
calling the blocks' own layers, so LoRA layers and hooks on layers take effect) with per-image rotary tables
``(B, T + L, D / 2)`` evaluated at each token's own position (:meth:`QwenImageAdapter.rotary`): equal to the
model's own tables on integer grids; a stage-2 child at coarse position ``p + 0.5`` gets the formula's value
there, with the centring of the grid it refers to (``TokenGrid.grid_hw``: the coarse grid in stages 1-2, the fine
grid in stage 3). Nothing on the user's model is replaced or patched.

**Text mask.** ``prompt_embeds_mask`` (``takes_prompt_mask``) is used exactly as diffusers 0.42.1 does: the
pipeline drops an all-ones mask (None); otherwise the boolean mask of the text tokens, followed by ones for the
image tokens, is the attention mask of every block (keys only). The text RoPE always covers the full (padded) text
length, as in the transformer (``compute_text_seq_len_from_mask`` returns the padded length).

**Guidance.** ``generate``'s ``guidance_scale`` is the pipeline's ``true_cfg_scale`` (default 4.0): true CFG runs
only when a negative prompt (or negative embeddings) is given and the scale is > 1, with the pipeline's rescale of
the combined prediction to the conditional prediction's norm per token. The conditional and unconditional passes
run as one batch of 2B (text lengths padded to the longer one with masked tokens: the same attention).
Guidance-distilled variants (``guidance_embeds=True``, the pipeline's ``guidance_scale``) are refused: diffusers
0.42.1's own forward cannot run them either.

**Execution modes** (:mod:`ralu_runtime.execution`; :func:`qwen_image_block` is written once against the mode,
the shared request handling is :class:`~ralu_runtime.adapters.double_stream.DoubleStreamAdapter`): one request
(``Dense``: the text mask as the joint ``(B, 1, 1, T + L)`` attention mask, exactly the call above); sharded across
ranks (context parallelism, ``generate(parallel=...)``: the joined [text ; image] sequence cut across ranks, the
mask as the sharded attention's ``(B, T + L)`` key mask; every rank holds the whole velocity); many requests packed
into one call (:meth:`~ralu_runtime.adapters.double_stream.DoubleStreamAdapter.packed_velocity`, the serving
engine's batched step: every image -- both CFG halves of a call included -- its own attention segment with its own
timestep, rotary positions and text; the mask is a hard key mask, so masked text tokens are left out of the packed
sequence and the others keep their rotary positions). Packed calls fall back to one call per request with a
feature cache or with hooks on the blocks or the output norm.

**Refused** (:meth:`QwenImageAdapter.check_supported`, before any work): attention processors other than
``QwenDoubleStreamAttnProcessor2_0``, diffusers hook registries on the blocks (``enable_cache``, block-level group
offloading), and the edit / layered transformer variants (``zero_cond_t``, ``use_additional_t_cond``,
``use_layer3d_rope``).
"""
from __future__ import annotations


import numpy as np
import torch

from ..families import FAMILIES
from ..execution.modes import DENSE, Mode
from .base import (EAGER, Conditioning, ModelImpl, TokenGrid, check_blocks, compute_dtype, named_blocks, pipeline_mu,
                   scheduler_base_shift, vae_lock)
from .common import ADDED_QKV, QKV, projections
from .double_stream import DoubleStreamAdapter, StreamInputs

TEXT, IMAGE = 0, 1  # Qwen-Image's streams, in the order of its joint sequence [text ; image]


def apply_rope_qwen(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``x (B, S, H, D)`` with per-token ``cos``/``sin`` ``(B, S, D / 2)`` float32.

    diffusers' ``apply_rotary_emb_qwen(use_real=False)`` (adjacent channel pairs as complex numbers times
    ``cos + i sin``) in real arithmetic, so compilers without complex support can take it."""
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(3).to(x.dtype)


def qwen_attention(attn, hidden_states, encoder_hidden_states, rope, ex: Mode = DENSE, qkv=None, added_qkv=None):
    """diffusers' ``QwenDoubleStreamAttnProcessor2_0`` on ``attn`` in mode ``ex`` (its text key mask is the mode's:
    ``Dense(attn_mask)`` / ``Sharded(key_mask=)``; a packed call holds valid text tokens only), with per-token
    ``rope = (cos, sin)`` ``(B, T + L, D / 2)`` of the joined [text ; image] sequence in ``ex``'s layout.
    ``qkv`` / ``added_qkv``: fused ``(weight, bias)`` of to_q/k/v and add_q/k/v_proj, or None.
    Returns ``(image output, text output)``."""
    head_dim = attn.inner_dim // attn.heads
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in projections(attn, hidden_states, QKV, qkv))
    tq, tk, tv = (t.unflatten(-1, (-1, head_dim))
                  for t in projections(attn, encoder_hidden_states, ADDED_QKV, added_qkv))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if attn.norm_added_q is not None:
        tq = attn.norm_added_q(tq)
    if attn.norm_added_k is not None:
        tk = attn.norm_added_k(tk)
    # joint order [text, image]; the rotation is per token, so rotating the joint q / k equals the processor's
    # separate text and image rotations
    query = apply_rope_qwen(ex.join(tq, q), *rope)
    key = apply_rope_qwen(ex.join(tk, k), *rope)
    proc = attn.processor
    out = ex.attend(query, key, ex.join(tv, v), backend=getattr(proc, "_attention_backend", None),
                    parallel_config=getattr(proc, "_parallel_config", None))
    out = out.flatten(2, 3).to(query.dtype)
    txt, img = ex.split(out, encoder_hidden_states.shape[1])
    img = attn.to_out[0](img.contiguous())
    if len(attn.to_out) > 1:
        img = attn.to_out[1](img)
    return img, attn.to_add_out(txt.contiguous())


def _modulate(x, params, ex: Mode, stream: int):
    """``x * (1 + scale) + shift`` and the gate, from per-image ``params (n_images, 3 D)`` = (shift, scale, gate),
    applied to the tokens of ``stream``."""
    shift, scale, gate = params.chunk(3, dim=-1)
    return x * (1 + ex.tok(scale, stream)) + ex.tok(shift, stream), ex.tok(gate, stream)


def qwen_image_block(block, hidden_states, encoder_hidden_states, temb, rope, ex: Mode = DENSE, qkv=None,
                     added_qkv=None):
    """diffusers' ``QwenImageTransformerBlock.forward`` (no ``zero_cond_t``; same operations, same order) with
    :func:`qwen_attention`, in mode ``ex``. Returns ``(encoder_hidden_states, hidden_states)``."""
    img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
    txt_mod1, txt_mod2 = block.txt_mod(temb).chunk(2, dim=-1)
    img_x, img_gate1 = _modulate(block.img_norm1(hidden_states), img_mod1, ex, IMAGE)
    txt_x, txt_gate1 = _modulate(block.txt_norm1(encoder_hidden_states), txt_mod1, ex, TEXT)
    img_attn, txt_attn = qwen_attention(block.attn, img_x, txt_x, rope, ex, qkv, added_qkv)
    hidden_states = hidden_states + img_gate1 * img_attn
    encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn

    img_x, img_gate2 = _modulate(block.img_norm2(hidden_states), img_mod2, ex, IMAGE)
    hidden_states = hidden_states + img_gate2 * block.img_mlp(img_x)
    txt_x, txt_gate2 = _modulate(block.txt_norm2(encoder_hidden_states), txt_mod2, ex, TEXT)
    encoder_hidden_states = encoder_hidden_states + txt_gate2 * block.txt_mlp(txt_x)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


class QwenImageAdapter(DoubleStreamAdapter):
    """Adapter for diffusers' ``QwenImagePipeline`` (Qwen-Image text-to-image).

    ``guidance_scale`` of :func:`ralu_runtime.generate` is the pipeline's ``true_cfg_scale`` (default 4.0),
    effective only with a negative prompt. ``default_size`` is the pipeline's own default (1024 px; the model card's
    native 1328 px is not a multiple of the 32-px coarse block, 1344 is the nearest that is)."""

    family = "qwen-image"  # defaults: ralu_runtime.families
    default_preset = FAMILIES["qwen-image"].default_preset
    default_steps = FAMILIES["qwen-image"].default_steps
    default_guidance = FAMILIES["qwen-image"].default_guidance
    default_size = FAMILIES["qwen-image"].default_size
    base_shift = FAMILIES["qwen-image"].base_shift  # presets use preset_base_shift(h, w)
    supports_negative_prompt = True
    takes_prompt_mask = True
    fuses_projections = True
    max_side_px = FAMILIES["qwen-image"].max_side_px  # 65536 fine tokens; Qwen-Image is trained up to about 1.8 MP
    default_max_sequence_length = 512  # QwenImagePipeline.__call__'s default

    def runs_cfg(self, guidance_scale: float, negative: bool) -> bool:
        """QwenImagePipeline's true CFG: ``guidance_scale > 1`` (its ``true_cfg_scale``) and a negative prompt given;
        without one it runs a single pass."""
        return guidance_scale > 1 and negative

    def __init__(self, pipe, *, weak: bool = False):
        super().__init__(pipe, weak=weak)
        self.transformer = pipe.transformer
        self._inv_freq: dict[torch.device, list[torch.Tensor]] = {}

    # ---- checks and geometry ---------------------------------------------------------------------------
    def check_supported(self) -> None:
        tr = self.transformer
        cfg = tr.config
        for flag, what in (("guidance_embeds", "guidance-distilled variants (diffusers 0.42.1's forward cannot run "
                                               "them either)"),
                           ("zero_cond_t", "the edit variant's zero-timestep conditioning"),
                           ("use_additional_t_cond", "the layered variant's additional timestep condition"),
                           ("use_layer3d_rope", "the layered variant's 3-D layer RoPE")):
            if getattr(cfg, flag, False):
                raise ValueError(f"this QwenImageTransformer2DModel has {flag}=True: ralu supports the Qwen-Image "
                                 f"text-to-image transformer only, not {what}")
        check_blocks(named_blocks(tr, "transformer_blocks"), ("QwenDoubleStreamAttnProcessor2_0",), "Qwen-Image")

    def embed_dims(self) -> tuple[int, None]:
        return int(self.transformer.config.joint_attention_dim), None

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def preset_base_shift(self, height: int, width: int) -> float:
        """exp(mu) of the pipeline's scheduler at the fine token count of ``height x width`` (the pipeline's mu is
        diffusers' calculate_shift line on the scheduler config; Qwen-Image: 0.5 at 256 tokens, 0.9 at 8192)."""
        return scheduler_base_shift(self.pipe.scheduler.config, self.fine_tokens(height, width))

    # ---- prompts -----------------------------------------------------------------------------------------
    def _embed(self, prompt, embeds, mask, n, max_len):
        """The pipeline's ``encode_prompt`` for a text prompt; for given embeddings the same steps written out
        (truncate to ``max_len``, ``n`` images per prompt prompt-major, an all-ones mask becomes None), so that
        meta-device embeddings (FLOP counting) work. Returns ``(embeds (B, T, D), bool mask (B, T) or None)``."""
        if embeds is None:
            embeds, mask = self.pipe.encode_prompt(prompt=prompt, device=self.device, num_images_per_prompt=n,
                                                   max_sequence_length=max_len)
        else:
            embeds = embeds.to(self.device)[:, :max_len].repeat_interleave(n, dim=0)
            if mask is not None:
                mask = mask.to(self.device)[:, :max_len].repeat_interleave(n, dim=0)
                if mask.device.type != "meta" and bool(mask.all()):
                    mask = None
        return embeds, (None if mask is None else mask.bool())

    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale, max_sequence_length=None, prompt_embeds_mask=None,
                      negative_prompt_embeds_mask=None):
        """Conditioning data: ``embeds (B or 2B, T, D)`` ([negative; positive] with CFG), ``mask`` bool
        ``(B or 2B, T)`` or None, ``cfg`` and ``guidance_scale`` (the pipeline's true_cfg_scale)."""
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("Qwen-Image takes no pooled text embedding")
        max_len = max_sequence_length or self.default_max_sequence_length
        n = num_images_per_prompt
        pe, pm = self._embed(prompt, prompt_embeds, prompt_embeds_mask, n, max_len)
        b = pe.shape[0]
        cfg = self.runs_cfg(guidance_scale, negative_prompt is not None or negative_prompt_embeds is not None)
        if not cfg:
            return Conditioning(b, {"embeds": pe, "mask": pm, "cfg": False, "guidance_scale": float(guidance_scale)})
        if negative_prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negative_prompt = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negative_prompt) == 1:
                negative_prompt = negative_prompt * len(prompts)
            if len(negative_prompt) != len(prompts):
                raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts (give one, "
                                 "or one per prompt)")
        ne, nm = self._embed(negative_prompt, negative_prompt_embeds, negative_prompt_embeds_mask, n, max_len)
        ne = ne.to(pe.dtype)
        t = max(pe.shape[1], ne.shape[1])
        mask = None
        if pm is not None or nm is not None or pe.shape[1] != ne.shape[1]:
            def full(e, m):  # pad to t text tokens; padding is masked out (keys only: the same attention)
                m = torch.ones(e.shape[:2], dtype=torch.bool, device=e.device) if m is None else m
                pad = t - e.shape[1]
                if pad:
                    e = torch.cat([e, e.new_zeros(e.shape[0], pad, e.shape[2])], dim=1)
                    m = torch.cat([m, m.new_zeros(m.shape[0], pad)], dim=1)
                return e, m

            (ne, nm), (pe, pm) = full(ne, nm), full(pe, pm)
            mask = torch.cat([nm, pm], dim=0)
        return Conditioning(b, {"embeds": torch.cat([ne, pe], dim=0), "mask": mask, "cfg": True,
                                "guidance_scale": float(guidance_scale)})

    # ---- positions -----------------------------------------------------------------------------------------
    def rope_frequencies(self, device=None) -> list[torch.Tensor]:
        """Per axis (frame, row, col): the inverse frequencies ``(d_a / 2,)`` float32, computed on the CPU with the
        arithmetic of ``QwenEmbedRope.rope_params`` (as the model's table is), kept per device (no host copy per
        call, e.g. inside a CUDA graph capture)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        freqs = self._inv_freq.get(device)
        if freqs is None:
            pe = self.transformer.pos_embed
            freqs = [(1.0 / torch.pow(pe.theta, torch.arange(0, d, 2).to(torch.float32).div(d))).to(device)
                     for d in pe.axes_dim]
            self._inv_freq[device] = freqs
        return freqs

    def rotary(self, grid: TokenGrid, text_len: int, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image rotary ``(cos, sin)``, each ``(B, T + L, D / 2)`` float32, for ``text_len`` text tokens then the
        image tokens at ``grid.positions``: image (frame 0, row - (H - H // 2), col - (W - W // 2)) and text
        ``max(H // 2, W // 2) + k`` on every axis, with ``(H, W) = grid.grid_hw`` (QwenEmbedRope's centred
        convention). ``repeat``: the positions' batch repeated this many times (2 for CFG's [negative; positive])."""
        pos = grid.positions.to(torch.float32)
        if repeat > 1:
            pos = pos.repeat(repeat, 1, 1)
        b, l, _ = pos.shape
        hh, ww = grid.grid_hw
        dev = pos.device
        txt = torch.arange(text_len, device=dev).to(torch.float32) + max(hh // 2, ww // 2)
        txt = txt.expand(b, text_len)
        coords = (torch.zeros(b, l, device=dev), pos[..., 0] - (hh - hh // 2), pos[..., 1] - (ww - ww // 2))
        angles = []
        for axis, inv in zip(coords, self.rope_frequencies(dev)):
            angles.append(torch.cat([txt, axis], dim=1)[..., None] * inv)
        ang = torch.cat(angles, dim=-1)
        return torch.cos(ang), torch.sin(ang)

    # ---- model ---------------------------------------------------------------------------------------------
    TEXT, IMAGE = TEXT, IMAGE

    def _inputs(self, x, grid, timestep, data) -> StreamInputs:
        """Image stream: tokens and the image rows of :meth:`rotary`; text stream: the prompt embeddings and the
        text rows of :meth:`rotary` (text token ``k`` keeps its rotary position ``k`` when masked tokens are left
        out of a packed call); the text mask; per image: ``timestep / 1000``."""
        embeds = data["embeds"]
        t_len = embeds.shape[1]
        b = x.shape[0]
        cos, sin = self.rotary(grid, t_len, b // grid.positions.shape[0])  # (B, T + L, D / 2): one graph per stage
        t = timestep.expand(b).to(x.dtype) / 1000
        return StreamInputs(image=(x, cos[:, t_len:], sin[:, t_len:]), text=(embeds, cos[:, :t_len], sin[:, :t_len]),
                            text_mask=data["mask"], per_image=(t,))

    def _forward(self, ex, image, text, per_image, impl, timestep=None, text_mask=None):
        tr = self.transformer
        tokens, cos_i, sin_i = image
        embeds, cos_t, sin_t = text
        hidden = tr.img_in(tokens)
        temb = tr.time_text_embed(per_image[0].to(hidden.dtype), hidden)
        enc = tr.txt_in(tr.txt_norm(embeds))
        rope = (ex.join(cos_t, cos_i), ex.join(sin_t, sin_i))
        block_fn = impl.block(ex.block_name("qwen_image_block"), qwen_image_block)
        blocks = [(blk, (impl.fused(blk.attn, QKV), impl.fused(blk.attn, ADDED_QKV))) for blk in tr.transformer_blocks]
        stack = self._block_stack(
            ex, block_fn, blocks, (enc, hidden), 1, lambda blk, s, extra: (blk, s[1], s[0], temb, rope, ex, *extra),
            lambda s: dict(hidden_states=s[1], encoder_hidden_states=s[0], encoder_hidden_states_mask=text_mask,
                           temb=temb, image_rotary_emb=rope))
        hidden = self.run_stack(stack, hidden, timestep)
        return ex.call(tr.proj_out, ex.ada_norm(tr.norm_out, hidden, temb, IMAGE))

    def _guide(self, out, data):
        """The pipeline's true CFG: ``neg + s (pos - neg)`` rescaled to the positive prediction's norm per token."""
        neg, pos = out.chunk(2)
        comb = neg + data["guidance_scale"] * (pos - neg)
        return comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def _bypassed_by_packing(self) -> list:
        tr = self.transformer
        return [tr.norm_out, *tr.transformer_blocks]

    def prepare_noise(self, batch, height, width, generators, dtype):
        """``(B, C, h, w)``: the pipeline's ``(B, 1, C, h, w)`` draw (same generator use) without its frame axis."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.latent_hw(height, width)
        shape = (batch, 1, self.latent_channels, h, w)
        return randn_tensor(shape, generator=generators, device=self.device, dtype=dtype)[:, 0]

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        sched = self.scheduler_copy()
        cfg = sched.config
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = pipeline_mu(calculate_shift, cfg, image_seq_len)
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, sigmas=sigmas, mu=mu)
        if not bool(torch.isfinite(sched.sigmas).all()):
            # e.g. one step with shift_terminal (Qwen-Image's 0.02): diffusers' stretch divides by 1 - sigma_last = 0
            raise ValueError(f"the pipeline's scheduler gives non-finite sigmas for num_inference_steps={num_steps} "
                             f"(shift_terminal={cfg.get('shift_terminal', None)}); use at least 2 steps")
        return timesteps, sched.sigmas.to(self.device)

    def decode(self, latents, impl: ModelImpl | None = None):
        """Latents ``(B, 16, h, w)`` -> images ``(B, 3, 8h, 8w)``: the pipeline's per-channel denormalisation
        (``latents / (1 / latents_std) + latents_mean``, in the VAE's dtype) and a one-frame VAE decode."""
        vae = self.pipe.vae
        dtype = compute_dtype(vae)
        z = latents.unsqueeze(2).to(dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, dtype)
        z = z / inv_std + mean
        fn = (impl or EAGER).vae_decode(vae)
        with vae_lock(vae):
            images = fn(z) if fn is not None else vae.decode(z, return_dict=False)[0]
        return images[:, :, 0]
