"""Z-Image adapter (ZImagePipeline / ZImageTransformer2DModel): Z-Image and Z-Image-Turbo.

The model: a single-stream DiT. Each image's latent ``(C, 1, H, W)`` is cut into 2x2 patches (channels last in a
patch), embedded, padded to a multiple of ``SEQ_MULTI_OF`` = 32 tokens with a learned ``x_pad_token`` at position
(0, 0, 0) and refined by a *noise refiner* (timestep-modulated blocks over the image tokens alone). Each caption
(a variable-length list of Qwen3 features) is embedded, padded to a multiple of 32 with ``cap_pad_token`` and
refined by a *context refiner* (unmodulated blocks over the caption alone). The main blocks run on the unified
sequence ``[image tokens + image pads, caption tokens + caption pads]``; captions of different padded lengths in a
batch are padded at the end and masked out of attention. Pad tokens are real participants (not masked).

Positions enter only through a 3-axis RoPE with integer ids: caption token j at (1 + j, 0, 0) (its pads continue
the count), image token at (row, col) at (T_c + 1, row, col) where T_c is that caption's padded length, image
pads at (0, 0, 0). The model looks the angles up in a table built on the integer grid; ralu evaluates the same
formula (angles ``id * theta**(-2k/d)`` in float64, rounded to float32, then ``polar``) at any real (row, col),
per image: bitwise the model's table on integer ids, and RALU stage 2's children at +0.5 get their fractional
angles. So the adapter runs the refiners and main blocks itself (:func:`z_image_block`, the operations of
diffusers' ``ZImageTransformerBlock`` and ``ZSingleStreamAttnProcessor`` in the same order) from packed tokens
``(B, L, C p p)`` with explicit per-image positions, calling the blocks' own layers (LoRA layers and hooks on
layers take effect); padding, pad tokens and masks are exactly the model's, for any token count L.

Sampling mirrors ``ZImagePipeline.__call__``: latents drawn and kept in float32; model time ``(1000 - t) / 1000``;
the model predicts ``-v``; classifier-free guidance (``guidance_scale > 0``) as ``pos + g (pos - neg)`` with the
negative captions batched after the positive ones; ``cfg_truncation`` / ``cfg_normalization`` (pipeline defaults
1.0 / False; ``generate`` does not take them: set them on the adapter, ``get_adapter(pipe).cfg_truncation = 0.5``).

Refused before any work (:meth:`ZImageAdapter.check_supported`): attention processors other than diffusers'
``ZSingleStreamAttnProcessor``, diffusers hook registries on the blocks (``enable_cache``, block-level group
offloading), transformers without the 2x2 (f 1) patch embedder the pipeline uses.
"""
from __future__ import annotations

import copy

import torch

from ..families import FAMILIES
from .base import (EAGER, Conditioning, DiTAdapter, ModelImpl, SplitBlocks, call_with_hooks, check_blocks,
                   scheduler_base_shift)

QKV = ("to_q", "to_k", "to_v")
PATCH_KEY = "2-1"  # ZImagePipeline calls the transformer with patch_size=2, f_patch_size=1


def _seq_multiple() -> int:
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    return int(SEQ_MULTI_OF)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``x (B, S, H, D)`` with per-image ``cos``/``sin`` ``(B, S, D/2)`` float32: the
    complex product of ``ZSingleStreamAttnProcessor`` (pairs (2k, 2k+1) as real/imaginary parts, float32) in real
    arithmetic, so that it compiles and exports."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    xr, xi = xf.unbind(-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(3)
    return out.type_as(x)


def z_image_attention(attn, hidden_states, attn_mask, cos, sin, qkv=None):
    """diffusers' ``ZSingleStreamAttnProcessor`` on ``attn`` with per-image rotary ``(cos, sin)`` ``(B, S, D/2)``
    and an optional key mask ``(B, S)`` bool. ``qkv``: fused ``(weight, bias)`` of to_q/to_k/to_v, or None."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if qkv is not None:
        query, key, value = torch.nn.functional.linear(hidden_states, qkv[0], qkv[1]).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = query.unflatten(-1, (attn.heads, -1))
    key = key.unflatten(-1, (attn.heads, -1))
    value = value.unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    query = apply_rope(query, cos, sin)
    key = apply_rope(key, cos, sin)
    dtype = query.dtype
    mask = attn_mask[:, None, None, :] if attn_mask is not None else None
    proc = attn.processor
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                backend=getattr(proc, "_attention_backend", None),
                                parallel_config=getattr(proc, "_parallel_config", None))
    out = out.flatten(2, 3).to(dtype)
    out = attn.to_out[0](out)
    if len(attn.to_out) > 1:
        out = attn.to_out[1](out)
    return out


def z_image_block(block, x, attn_mask, cos, sin, adaln, qkv=None):
    """diffusers' ``ZImageTransformerBlock.forward`` (global modulation, same operations and order) with
    :func:`z_image_attention`. ``x (B, S, D)``; ``adaln (B, 256)`` for modulated blocks (noise refiner, main
    layers), None for the context refiner's. Returns the new ``x``."""
    if block.modulation:
        mod = block.adaLN_modulation(adaln)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        attn_out = z_image_attention(block.attention, block.attention_norm1(x) * scale_msa, attn_mask, cos, sin, qkv)
        x = x + gate_msa * block.attention_norm2(attn_out)
        x = x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * scale_mlp))
    else:
        attn_out = z_image_attention(block.attention, block.attention_norm1(x), attn_mask, cos, sin, qkv)
        x = x + block.attention_norm2(attn_out)
        x = x + block.ffn_norm2(block.feed_forward(block.ffn_norm1(x)))
    return x


class ZImageAdapter(DiTAdapter):
    """Adapter for diffusers' ``ZImagePipeline`` (Z-Image: 50 steps, CFG 5.0; Z-Image-Turbo: same classes, run
    it with ``speedup="4step"`` / ``num_inference_steps=8`` (its release's 8 model calls) and ``guidance_scale=0``)."""

    family = "z-image"  # defaults: ralu_runtime.families
    default_preset = FAMILIES["z-image"].default_preset
    default_steps = FAMILIES["z-image"].default_steps
    default_guidance = FAMILIES["z-image"].default_guidance
    base_shift = FAMILIES["z-image"].base_shift
    default_size = FAMILIES["z-image"].default_size
    supports_negative_prompt = True
    takes_prompt_mask = True
    fuses_projections = True
    cfg_truncation: float | None = 1.0   # ZImagePipeline.__call__ defaults (not generate arguments)
    cfg_normalization: float | bool = False

    def __init__(self, pipe, *, weak: bool = False):
        super().__init__(pipe, weak=weak)
        self.transformer = pipe.transformer

    # ---- checks and geometry -----------------------------------------------------------------------------
    def _blocks(self):
        tr = self.transformer
        for kind in ("noise_refiner", "context_refiner", "layers"):
            for i, block in enumerate(getattr(tr, kind)):
                yield f"{kind}.{i}", block

    def check_supported(self) -> None:
        tr = self.transformer
        if PATCH_KEY not in tr.all_x_embedder or PATCH_KEY not in tr.all_final_layer:
            raise ValueError(f"this ZImageTransformer2DModel has no patch-2 (f 1) embedder (all_patch_size="
                             f"{tr.config.all_patch_size}, all_f_patch_size={tr.config.all_f_patch_size}); "
                             "ZImagePipeline and ralu use patch_size=2, f_patch_size=1")
        check_blocks(self._blocks(), ("ZSingleStreamAttnProcessor",), "Z-Image", attn="attention")

    def max_size(self) -> int:
        """The RoPE tables' image axes (``axes_lens[1:]`` tokens, 512 for Z-Image) in pixels."""
        lens = self.transformer.config.axes_lens
        return int(min(lens[1], lens[2])) * self.patch_size * self.vae_scale_factor

    def embed_dims(self) -> tuple[int, None]:
        return int(self.transformer.config.cap_feat_dim), None

    def preset_base_shift(self, height: int, width: int) -> float:
        """h_ori from the pipeline's scheduler at the image's fine token count (the pipeline's own ``mu`` formula is
        diffusers' ``calculate_shift``; the published config has no dynamic shifting: 3.0)."""
        p = self.patch_size * self.vae_scale_factor
        return scheduler_base_shift(self.pipe.scheduler.config, (height // p) * (width // p))

    @property
    def patch_size(self) -> int:
        return 2

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    # ---- prompts -------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale, max_sequence_length=None, prompt_embeds_mask=None,
                      negative_prompt_embeds_mask=None):
        """Caption features per image (the pipeline's ``encode_prompt`` for text; embeddings ``(B, T, D)`` with an
        optional 0/1 mask ``(B, T)`` of valid tokens, or lists of ``(T_i, D)`` like the pipeline takes).

        ``cond.data``: ``embeds`` ``(B2, T_c, D)`` (valid tokens first, zeros after; B2 = 2B with CFG: positives then
        negatives), ``cap_pad`` / ``cap_keep`` ``(B2, T_c)`` bool (cap_pad_token rows / rows inside the padded
        caption), ``img_t`` ``(B2,)`` float64 (the image tokens' first RoPE id), ``cap_cos`` / ``cap_sin``
        ``(B2, T_c, D_head/2)`` caption rotary tables, ``cap_tc`` (padded caption lengths), ``cfg``,
        ``guidance_scale``."""
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("Z-Image takes no pooled text embedding")
        cfg = guidance_scale > 0  # ZImagePipeline.do_classifier_free_guidance
        if prompt_embeds is not None:
            pos = self._embeds_list(prompt_embeds, prompt_embeds_mask)
            neg = []
            if cfg:
                if negative_prompt_embeds is None:
                    raise ValueError("Z-Image with guidance_scale > 0 runs classifier-free guidance: give "
                                     "negative_prompt_embeds together with prompt_embeds (as ZImagePipeline requires), "
                                     "or guidance_scale=0 (Z-Image-Turbo)")
                neg = self._embeds_list(negative_prompt_embeds, negative_prompt_embeds_mask)
                if len(neg) != len(pos):
                    raise ValueError(f"negative_prompt_embeds has {len(neg)} prompts, prompt_embeds {len(pos)}")
        else:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)  # a copy: the pipeline edits the list
            negs = None
            if cfg:
                negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else (
                    None if negative_prompt is None else list(negative_prompt))
                if negs is not None and len(negs) != len(prompts):
                    raise ValueError(f"got {len(negs)} negative prompts for {len(prompts)} prompts")
            pos, neg = self.pipe.encode_prompt(prompt=prompts, device=self.device, do_classifier_free_guidance=cfg,
                                               negative_prompt=negs, max_sequence_length=max_sequence_length or 512)
            pos, neg = list(pos), list(neg or [])
        # images are prompt-major, like the pipeline's repeat for num_images_per_prompt
        pos = [e for e in pos for _ in range(num_images_per_prompt)]
        neg = [e for e in neg for _ in range(num_images_per_prompt)]
        data = self._captions(pos + neg)
        data.update(cfg=bool(cfg), guidance_scale=float(guidance_scale))
        return Conditioning(len(pos), data)

    def _embeds_list(self, embeds, mask) -> list[torch.Tensor]:
        if isinstance(embeds, (list, tuple)):
            return [e for e in embeds]
        if mask is None:
            return list(embeds.unbind(0))
        return [e[m.to(device=e.device).bool()] for e, m in zip(embeds, mask)]

    def _captions(self, feats: list[torch.Tensor]) -> dict:
        """Dense padded captions, pad/keep masks and caption rotary tables for features ``[(T_i, D)]``."""
        mult = _seq_multiple()
        dev, dtype = self.device, self.dtype
        lens = [int(f.shape[0]) for f in feats]
        if min(lens) < 1:
            raise ValueError("every caption needs at least one token")
        tc = [n + (-n) % mult for n in lens]
        tmax = max(tc)
        axis0 = int(self.transformer.config.axes_lens[0])
        if tmax + 1 >= axis0:
            raise ValueError(f"a caption of {max(lens)} tokens is too long for Z-Image: its padded length {tmax} + 1 "
                             f"must stay below the RoPE table's first axis ({axis0})")
        dense = torch.zeros(len(feats), tmax, feats[0].shape[-1], device=dev, dtype=dtype)
        for i, f in enumerate(feats):
            dense[i, : lens[i]] = f.to(device=dev, dtype=dtype)
        idx = torch.arange(tmax, device=dev)
        n_t = torch.tensor(lens, device=dev)[:, None]
        tc_t = torch.tensor(tc, device=dev)[:, None]
        keep = idx < tc_t
        ids = torch.zeros(len(feats), tmax, 3, device=dev, dtype=torch.float64)
        ids[..., 0] = (idx + 1).to(torch.float64)
        cos, sin = self.rope_at(ids)
        return {"embeds": dense, "cap_pad": (idx >= n_t) & keep, "cap_keep": keep,
                "img_t": (tc_t[:, 0] + 1).to(torch.float64), "cap_cos": cos * keep[..., None],
                "cap_sin": sin * keep[..., None], "cap_tc": tuple(tc)}

    # ---- positions ---------------------------------------------------------------------------------------
    def rope_at(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary ``(cos, sin)`` ``(..., D_head/2)`` float32 at 3-axis ids ``(..., 3)`` (any real values).

        The model's ``RopeEmbedder`` formula: per axis, angles ``id * theta**(-arange(0, d, 2)/d)`` in float64, rounded
        to float32, then ``torch.polar`` (bitwise its table on integer ids; ``cos``/``sin`` while exporting to ONNX)."""
        cfg = self.transformer.config
        ids = ids.to(torch.float64)
        angles = []
        for i, d in enumerate(cfg.axes_dims):
            freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))
            angles.append((ids[..., i : i + 1] * freqs).float())
        angle = torch.cat(angles, dim=-1)
        if torch.onnx.is_in_onnx_export():
            return torch.cos(angle), torch.sin(angle)
        z = torch.polar(torch.ones_like(angle), angle)
        return z.real.contiguous(), z.imag.contiguous()

    def image_rope(self, positions: torch.Tensor, img_t: torch.Tensor, pad: int):
        """``(cos, sin)`` ``(B, L + pad, D_head/2)`` for image tokens at ``positions (B, L, 2)`` (row, col) with first
        id ``img_t (B,)``, then ``pad`` image pad tokens at (0, 0, 0)."""
        b, l, _ = positions.shape
        ids = torch.zeros(b, l + pad, 3, device=positions.device, dtype=torch.float64)
        ids[:, :l, 0] = img_t[:, None]
        ids[:, :l, 1:] = positions
        return self.rope_at(ids)

    def _guided(self, cond: Conditioning, t_norm: torch.Tensor) -> bool:
        """Whether this step runs classifier-free guidance (the pipeline's ``apply_cfg``, with cfg_truncation)."""
        if not cond.data["cfg"] or cond.data["guidance_scale"] <= 0:
            return False
        trunc = self.cfg_truncation
        if trunc is not None and float(trunc) < 1 and float(t_norm) > float(trunc):  # one host sync, only then
            return False
        return True

    # ---- model ---------------------------------------------------------------------------------------------
    def _run(self, fn, block, x, mask, rope, adaln, impl):
        qkv = impl.fused(block.attention, QKV)
        args = (block, x, mask, rope[0], rope[1], adaln, qkv)
        if block._forward_hooks or block._forward_pre_hooks:
            return call_with_hooks(block, fn, args, dict(x=x, attn_mask=mask, freqs_cis=rope, adaln_input=adaln))
        return fn(*args)

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        impl = impl or EAGER
        tr = self.transformer
        d = cond.data
        b, l, ct = tokens.shape
        p = self.patch_size
        c = ct // (p * p)
        t_norm = (1000 - timestep) / 1000  # the pipeline's model time, float32
        guided = self._guided(cond, t_norm)
        n = 2 * b if guided else b
        tc = d["cap_tc"][:n]
        tmax = max(tc)
        masked = len(set(tc)) > 1  # the model masks attention only where padded caption lengths differ
        rows = (slice(0, n), slice(0, tmax))

        x = tokens.to(self.dtype)
        positions = grid.positions
        if guided:
            x, positions = torch.cat([x, x]), torch.cat([positions, positions])
        # (c, py, px) token channels -> the model's patch order (py, px, c)
        x = x.view(n, l, c, p, p).permute(0, 1, 3, 4, 2).reshape(n, l, p * p * c)
        adaln = tr.t_embedder(t_norm.expand(n) * tr.t_scale).type_as(x)

        # image: embed, pad to a multiple of SEQ_MULTI_OF with x_pad_token, noise refiner
        hidden = tr.all_x_embedder[PATCH_KEY](x)
        pad = (-l) % _seq_multiple()
        if pad:
            hidden = torch.cat([hidden, tr.x_pad_token.to(hidden.dtype).expand(n, pad, -1)], dim=1)
        img_rope = self.image_rope(positions, d["img_t"][:n], pad)
        block_fn = impl.block("z_image_block", z_image_block)
        for block in tr.noise_refiner:
            hidden = self._run(block_fn, block, hidden, None, img_rope, adaln, impl)

        # caption: embed, cap_pad_token rows, zero rows past each padded caption, context refiner
        keep = d["cap_keep"][rows]
        cap = tr.cap_embedder(d["embeds"][rows])
        cap = torch.where(d["cap_pad"][rows][..., None], tr.cap_pad_token.to(cap.dtype), cap)
        cap = torch.where(keep[..., None], cap, torch.zeros((), dtype=cap.dtype, device=cap.device))
        cap_rope = (d["cap_cos"][rows], d["cap_sin"][rows])
        cap_mask = keep if masked else None
        for block in tr.context_refiner:
            cap = self._run(block_fn, block, cap, cap_mask, cap_rope, None, impl)
        cap = torch.where(keep[..., None], cap, torch.zeros((), dtype=cap.dtype, device=cap.device))

        # unified sequence [image + pads, caption + pads], main layers (through the call's feature cache)
        unified = torch.cat([hidden, cap], dim=1)
        rope = (torch.cat([img_rope[0], cap_rope[0]], dim=1), torch.cat([img_rope[1], cap_rope[1]], dim=1))
        mask = None
        if masked:
            mask = torch.cat([torch.ones(n, hidden.shape[1], dtype=torch.bool, device=keep.device), keep], dim=1)
        layers = list(tr.layers)

        def run(u, start, stop):
            for block in layers[start:stop]:
                u = self._run(block_fn, block, u, mask, rope, adaln, impl)
            return u

        def first():
            u = run(unified, 0, 1)
            return u[:, :l], u

        blocks = SplitBlocks(first, lambda u: run(u, 1, len(layers))[:, :l]) if layers else (lambda: unified[:, :l])
        hidden = self.run_blocks(blocks, unified[:, :l], timestep)
        out = tr.all_final_layer[PATCH_KEY](hidden, c=adaln)
        out = out.view(n, l, p, p, c).permute(0, 1, 4, 2, 3).reshape(n, l, ct)

        if not guided:
            return -out.float()
        pos, neg = out[:b].float(), out[b:].float()
        pred = pos + d["guidance_scale"] * (pos - neg)
        norm = self.cfg_normalization
        if norm and float(norm) > 0.0:  # the pipeline's renormalisation, per image
            ori = torch.linalg.vector_norm(pos, dim=(1, 2), keepdim=True)
            new = torch.linalg.vector_norm(pred, dim=(1, 2), keepdim=True)
            cap_norm = ori * float(norm)
            pred = torch.where(new > cap_norm, pred * (cap_norm / new), pred)
        return -pred

    # ---- schedule, noise, decode -----------------------------------------------------------------------------
    def prepare_noise(self, batch, height, width, generators, dtype):
        """``ZImagePipeline.prepare_latents``: float32 noise ``(B, C, H/8, W/8)`` whatever the model dtype (the
        pipeline keeps its latents in float32 and casts the model input)."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.latent_hw(height, width)
        return randn_tensor((batch, self.latent_channels, h, w), generator=generators, device=self.device,
                            dtype=torch.float32)

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,
                                                                   retrieve_timesteps)

        sched = copy.deepcopy(self.pipe.scheduler)
        cfg = sched.config
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, sigmas=get_default_z_image_sigmas(num_steps),
                                          mu=mu)
        return timesteps, sched.sigmas.to(self.device)

    def decode(self, latents, impl: ModelImpl | None = None):
        """The pipeline's decode: cast to the VAE dtype, then ``z / scaling_factor + shift_factor``."""
        vae = self.pipe.vae
        latents = latents.to(next(vae.parameters()).dtype)
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        fn = (impl or EAGER).vae_decode(vae)
        return fn(latents) if fn is not None else vae.decode(latents, return_dict=False)[0]
