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

Execution modes (:mod:`ralu_runtime.execution`): the block function :func:`z_image_block` serves them all. A model
call has two streams, the image stream (an image's tokens + its pads) and the caption stream (a caption + its
pads), joined as the unified sequence; the noise refiner attends within the image stream, the context refiner
within the caption stream, the main layers over the joined sequence --

* one request (:class:`~ralu_runtime.execution.modes.Dense`, :meth:`ZImageAdapter.velocity`): the batch's captions
  padded to the longest padded caption; where their padded lengths differ, the rows past each caption are masked
  as keys (the context refiner's mask over the caption stream, the main layers' over the unified sequence: the
  model's own ``(B, S)`` bool masks, passed as ``(B, 1, 1, S)``), else nothing is masked, as in the model;
* many requests packed into one call (:class:`~ralu_runtime.execution.packing.Packed`,
  :meth:`ZImageAdapter.packed_velocity`): every image its own segment ``[image + pads ; caption + pads]``, with
  its own timestep, caption length and rotary ids; the masked rows are left out (the mask is a hard key mask:
  exact up to float rounding); under CFG a call's images appear twice (prompts, negatives);
* one request sharded across ranks (:class:`~ralu_runtime.execution.sharding.Sharded`, context parallelism): the
  unified sequence cut into contiguous shards of any size (a rank's share of a stream may be empty), the masks as
  key masks (the joined sequence's, and the caption stream's for the context refiner).

A feature cache sees the real image tokens of the request (not the image pads), as before the modes existed.

Refused before any work (:meth:`ZImageAdapter.check_supported`): attention processors other than diffusers'
``ZSingleStreamAttnProcessor``, diffusers hook registries on the blocks (``enable_cache``, block-level group
offloading), transformers without the 2x2 (f 1) patch embedder the pipeline uses.
"""
from __future__ import annotations


import torch

from ..families import FAMILIES
from ..execution.modes import DENSE, JOINT, Dense, Mode
from ..execution.packing import (HostSegments, Packed, PackedExecution, PackedSegments, can_pack, pad_rows,
                                 static_attention)
from ..execution.sharding import Sharded
from .base import (EAGER, BlockStack, Conditioning, DiTAdapter, ModelImpl, TokenGrid, VelocityCall, call_with_hooks,
                   check_blocks, check_velocity_calls, compute_dtype, current_sharding, pipeline_mu,
                   scheduler_base_shift)
from .common import QKV, projections

IMAGE, TEXT = 0, 1  # Z-Image's streams, in the order of its unified sequence [image + pads ; caption + pads]
PATCH_KEY = "2-1"  # ZImagePipeline calls the transformer with patch_size=2, f_patch_size=1


def _seq_multiple() -> int:
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    return int(SEQ_MULTI_OF)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``x (B, S, H, D)`` with per-token ``cos``/``sin`` ``(B, S, D/2)`` float32: the complex
    product of ``ZSingleStreamAttnProcessor`` (pairs (2k, 2k+1) as real/imaginary parts, float32) in real
    arithmetic, so that it compiles and exports."""
    xf = x.float().unflatten(-1, (-1, 2))  # (a rank's share of a stream may have no rows: no reshape by -1)
    xr, xi = xf.unbind(-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(3)
    return out.type_as(x)


def z_image_attention(attn, hidden_states, cos, sin, ex: Mode = DENSE, stream: int = JOINT, qkv=None):
    """diffusers' ``ZSingleStreamAttnProcessor`` on ``attn`` in mode ``ex``, attending within ``stream`` (the
    refiners: one stream; the main layers: :data:`JOINT`; masks are the mode's), with per-token rotary ``(cos, sin)``
    ``(B, S, D/2)``. ``qkv``: fused ``(weight, bias)`` of to_q/to_k/to_v, or None (the layers)."""
    query, key, value = projections(attn, hidden_states, QKV, qkv)
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
    proc = attn.processor
    out = ex.attend(query, key, value, stream=stream, backend=getattr(proc, "_attention_backend", None),
                    parallel_config=getattr(proc, "_parallel_config", None))
    out = out.flatten(2, 3).to(dtype)
    out = attn.to_out[0](out)
    if len(attn.to_out) > 1:
        out = attn.to_out[1](out)
    return out


def z_image_block(block, x, cos, sin, adaln, ex: Mode = DENSE, stream: int = JOINT, qkv=None):
    """diffusers' ``ZImageTransformerBlock.forward`` (global modulation, same operations and order) with
    :func:`z_image_attention` in mode ``ex`` over ``stream``. ``x (B, S, D)``; ``adaln (n_images, 256)`` for
    modulated blocks (noise refiner, main layers), None for the context refiner's. Returns the new ``x``."""
    if block.modulation:
        scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(adaln).chunk(4, dim=1)
        gate_msa, gate_mlp = ex.tok(gate_msa.tanh(), stream), ex.tok(gate_mlp.tanh(), stream)
        scale_msa, scale_mlp = ex.tok(1.0 + scale_msa, stream), ex.tok(1.0 + scale_mlp, stream)
        attn_out = z_image_attention(block.attention, block.attention_norm1(x) * scale_msa, cos, sin, ex, stream,
                                     qkv)
        x = x + gate_msa * block.attention_norm2(attn_out)
        x = x + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * scale_mlp))
    else:
        attn_out = z_image_attention(block.attention, block.attention_norm1(x), cos, sin, ex, stream, qkv)
        x = x + block.attention_norm2(attn_out)
        x = x + block.ffn_norm2(block.feed_forward(block.ffn_norm1(x)))
    return x


class _RealImage:
    """What a feature cache sees of the main layers in a one-request mode: the real image tokens of the whole request,
    i.e. the first ``n`` rows of the image stream without its ``pad`` pad tokens (as the model's output keeps them).
    The part of a :class:`~ralu_runtime.execution.modes.Mode` that :class:`BlockStack` and ``run_stack`` use."""

    def __init__(self, ex: Mode, n: int, pad: int):
        self.ex, self.n, self.pad, self.per_request = ex, n, pad, ex.per_request

    def whole(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """This mode's image-stream rows -> the whole request's real image rows ``(B, n, D)``."""
        return self.ex.whole(x, stream)[:, :self.n]

    def local(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """Inverse of :meth:`whole` (the pad rows come back as zeros: nothing reads them but the discarded output)."""
        if self.pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], self.pad, *x.shape[2:])], dim=1)
        return self.ex.local(x, stream)


class ZImageAdapter(DiTAdapter):
    """Adapter for diffusers' ``ZImagePipeline`` (Z-Image: 50 steps, CFG 5.0; Z-Image-Turbo: same classes, run
    it with ``speedup="4step"`` / ``num_inference_steps=8`` (its release's 8 model calls) and ``guidance_scale=0``)."""
    bypassed_modules = ("attention",)  # its attention runs as ralu's own code (hooks on the module would not)

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

    def runs_cfg(self, guidance_scale: float, negative: bool) -> bool:
        """ZImagePipeline's rule: guidance at any ``guidance_scale > 0`` (the negative prompt defaults to empty)."""
        return guidance_scale > 0

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
        return scheduler_base_shift(self.pipe.scheduler.config, self.fine_tokens(height, width))

    @property
    def patch_size(self) -> int:
        return 2

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
        cfg = self.runs_cfg(guidance_scale, negative_prompt is not None or negative_prompt_embeds is not None)
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
    def _run(self, fn, block, x, rope, adaln, ex: Mode, stream: int, impl: ModelImpl, masks: dict):
        """One block (``fn``: the block function) on ``x``, its hooks run around it in one-request modes."""
        args = (block, x, rope[0], rope[1], adaln, ex, stream, impl.fused(block.attention, QKV))
        if block._forward_hooks or block._forward_pre_hooks:
            return call_with_hooks(block, fn, args, dict(x=x, attn_mask=masks.get(stream), freqs_cis=rope,
                                                         adaln_input=adaln))
        return fn(*args)

    def _final(self, ex: Mode, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        """The model's ``FinalLayer`` (patch-2 head): the module in one-request modes (its hooks run), its operations
        with the per-image scale applied per token in packed calls."""
        head = self.transformer.all_final_layer[PATCH_KEY]
        if ex.per_request:
            return head(x, c=adaln)
        scale = 1.0 + head.adaLN_modulation(adaln)
        return head.linear(head.norm_final(x) * ex.tok(scale, IMAGE))

    def _forward(self, ex: Mode, x, img_pad, img_rope, cap, cap_pad, cap_keep, cap_rope, t, impl: ModelImpl,
                 timestep=None, image_len=None, masks=None) -> torch.Tensor:
        """The transformer in mode ``ex`` on its streams in ``ex``'s layout (packed: ``B = 1`` holding every image;
        sharded: this rank's rows): the image stream ``x (B, Lp, 4C)`` (patch order ``(py, px, c)``, pad rows any
        value) with ``img_pad`` ``(B or 1, Lp)`` bool (its pad-token rows), the caption stream ``cap (B, T, D_cap)``
        with ``cap_pad`` ``(B, T)`` bool (cap_pad_token rows) and ``cap_keep`` ``(B, T)`` bool (rows inside each
        padded caption; None: all), rotary ``(cos, sin)`` ``(B, S, D_head/2)`` per stream, per image model time ``t``
        ``(n_images,)``. One-request modes: ``timestep`` (for a feature cache), ``image_len`` ``(L, Lp)`` (real and
        padded image tokens of the whole request), ``masks`` (the ``(B, S)`` masks by stream that block hooks see).
        Returns the image stream's output ``(B, Lp, 4C)`` in ``ex``'s layout (pad rows included)."""
        tr = self.transformer
        masks = masks or {}
        adaln = tr.t_embedder(t * tr.t_scale).type_as(x)

        # image: embed, pad tokens, noise refiner (attention within each image's image stream)
        hidden = tr.all_x_embedder[PATCH_KEY](x)
        hidden = torch.where(img_pad[..., None], tr.x_pad_token.to(hidden.dtype), hidden)
        block = impl.block(ex.block_name("z_image_block"), z_image_block)
        for blk in tr.noise_refiner:
            hidden = self._run(block, blk, hidden, img_rope, adaln, ex, IMAGE, impl, masks)

        # caption: embed, cap_pad_token rows, zero rows past each padded caption, context refiner
        cap = tr.cap_embedder(cap)
        cap = torch.where(cap_pad[..., None], tr.cap_pad_token.to(cap.dtype), cap)
        zero = torch.zeros((), dtype=cap.dtype, device=cap.device)
        if cap_keep is not None:
            cap = torch.where(cap_keep[..., None], cap, zero)
        for blk in tr.context_refiner:
            cap = self._run(block, blk, cap, cap_rope, None, ex, TEXT, impl, masks)
        if cap_keep is not None:
            cap = torch.where(cap_keep[..., None], cap, zero)

        # unified sequence [image + pads ; caption + pads], main layers (through the call's feature cache)
        unified = ex.join(hidden, cap)
        rope = (ex.join(img_rope[0], cap_rope[0]), ex.join(img_rope[1], cap_rope[1]))
        layers, img_rows = list(tr.layers), hidden.shape[1]

        def run(u, start, stop):
            for blk in layers[start:stop]:
                u = self._run(block, blk, u, rope, adaln, ex, JOINT, impl, masks)
            return u

        view = ex if image_len is None else _RealImage(ex, image_len[0], image_len[1] - image_len[0])
        stack = BlockStack(run, len(layers), unified, lambda u: ex.split(u, img_rows)[0], view, IMAGE)
        hidden = self.run_stack(stack, hidden, timestep)
        return self._final(ex, hidden, adaln)

    def _inputs(self, tokens, grid: TokenGrid, timestep, cond: Conditioning):
        """A call's model inputs: ``(guided, n, x (n, L, 4C) in the model's patch order, positions (n, L, 2),
        t (n,) model time)`` with ``n`` images: ``2B`` under classifier-free guidance (prompts, then negatives)."""
        b, l, ct = tokens.shape
        p = self.patch_size
        t_norm = (1000 - timestep) / 1000  # the pipeline's model time, float32
        guided = self._guided(cond, t_norm)
        n = 2 * b if guided else b
        x, positions = tokens.to(self.dtype), grid.positions
        if guided:
            x, positions = torch.cat([x, x]), torch.cat([positions, positions])
        # (c, py, px) token channels -> the model's patch order (py, px, c)
        x = x.view(n, l, ct // (p * p), p, p).permute(0, 1, 3, 4, 2).reshape(n, l, ct)
        return guided, n, x, positions, t_norm.expand(n)

    def _velocity(self, out: torch.Tensor, cond: Conditioning, guided: bool, b: int) -> torch.Tensor:
        """The velocity ``(B, L, C p p)`` float32 from the model's output ``(n, L, 4C)`` on a call's ``n`` images:
        back to ralu's channel order, ``v = -output``, classifier-free guidance (with the pipeline's
        ``cfg_normalization``) when ``guided``."""
        n, l, ct = out.shape
        p = self.patch_size
        out = out.view(n, l, p, p, ct // (p * p)).permute(0, 1, 4, 2, 3).reshape(n, l, ct)
        if not guided:
            return -out.float()
        pos, neg = out[:b].float(), out[b:].float()
        pred = pos + cond.data["guidance_scale"] * (pos - neg)
        norm = self.cfg_normalization
        if norm and float(norm) > 0.0:  # the pipeline's renormalisation, per image
            ori = torch.linalg.vector_norm(pos, dim=(1, 2), keepdim=True)
            new = torch.linalg.vector_norm(pred, dim=(1, 2), keepdim=True)
            cap_norm = ori * float(norm)
            pred = torch.where(new > cap_norm, pred * (cap_norm / new), pred)
        return -pred

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        """One request's velocity ``(B, L, C p p)`` float32; sharded across ranks when the running ``generate`` call
        has a sharding plan (context parallelism: every rank returns the whole velocity)."""
        d = cond.data
        guided, n, x, positions, t = self._inputs(tokens, grid, timestep, cond)
        l = x.shape[1]
        pad = (-l) % _seq_multiple()
        tc = d["cap_tc"][:n]
        tmax = max(tc)
        rows = (slice(0, n), slice(0, tmax))
        keep = d["cap_keep"][rows]
        if pad:
            x = torch.cat([x, x.new_zeros(n, pad, x.shape[2])], dim=1)
        img_pad = (torch.arange(l + pad, device=x.device) >= l)[None]
        img_rope = self.image_rope(positions, d["img_t"][:n], pad)
        cap_rope = (d["cap_cos"][rows], d["cap_sin"][rows])
        masks = {}
        if len(set(tc)) > 1:  # the model masks attention only where padded caption lengths differ
            masks = {TEXT: keep, JOINT: torch.cat([torch.ones(n, l + pad, dtype=torch.bool, device=keep.device),
                                                   keep], dim=1)}
        plan = current_sharding()
        if plan is None:
            ex = Dense(masks[JOINT][:, None, None, :], stream_masks={TEXT: keep[:, None, None, :]}) if masks else DENSE
        else:
            ex = Sharded(plan, (l + pad, tmax), masks.get(JOINT), stream_key_masks={TEXT: keep} if masks else None)
        img = lambda v: ex.local(v, IMAGE)  # noqa: E731
        txt = lambda v: ex.local(v, TEXT)  # noqa: E731
        out = self._forward(ex, img(x), img(img_pad), tuple(map(img, img_rope)), txt(d["embeds"][rows]),
                            txt(d["cap_pad"][rows]), txt(keep), tuple(map(txt, cap_rope)), t, impl or EAGER,
                            timestep, (l, l + pad), masks)
        return self._velocity(ex.whole(out, IMAGE)[:, :l], cond, guided, tokens.shape[0])

    # ---- packed calls ------------------------------------------------------------------------------------
    packs = True
    shards = True
    packed_attention_backend = "auto"  # varlen_attention backend of packed_velocity ("auto", "sdpa", ...)

    def _bypassed_by_packing(self) -> list:
        """Modules the unpacked call runs as modules (hooks included) and the packed call decomposes."""
        return [self.transformer.all_final_layer[PATCH_KEY], *(blk for _, blk in self._blocks())]

    def packed_velocity(self, calls, impl: ModelImpl | None = None, *,
                        execution: PackedExecution | None = None) -> list[torch.Tensor]:
        """:meth:`velocity` of every call, all run as one transformer call over a packed token sequence.

        Every image is one attention segment ``[its image tokens + image pads ; its caption + caption pads]`` (the
        model's unified sequence), with its own timestep, caption length and rotary ids; under classifier-free
        guidance a call brings its images twice (prompts, then negatives, each with its own caption) and its result
        is combined with its own ``guidance_scale`` (``cfg_truncation`` decides per call). The noise refiner attends
        within each image's image stream, the context refiner within its caption, the main layers within its
        segment. The rows the unpacked call masks (past a caption's padded length, where the batch's captions
        differ) are not in the packed sequence: the mask is a hard key mask, so leaving them out is exact; pad tokens
        (``x_pad_token``, ``cap_pad_token``) are real participants and stay. Results equal the unpacked calls up to
        float rounding (fp32 on a CPU: within 2e-6 relative, see tests/test_modes_z_image.py).

        Compiled blocks: with a compile runner's impl, ``z_image_block_packed`` is compiled with a symbolic packed
        token dimension on a :class:`PackedSegments` layout (device tensors only; one padding segment for CUDA-graph
        buckets): a new mix of requests reuses the same graphs.

        Falls back to one :meth:`velocity` per call (correct, unpacked) when ``impl`` is neither None / EAGER nor a
        packing impl, when the calling ``generate`` has a feature cache (its state is per request), or when a block
        or the final layer (which the packed call decomposes) carries torch forward (pre-)hooks or diffusers hooks.
        """
        calls = check_velocity_calls(calls)
        execution = execution or PackedExecution(self, impl)
        if not can_pack(execution.impl, self._bypassed_by_packing()):
            return [execution.velocity(c) for c in calls]
        return self._packed_call(calls, execution)

    def _packed_call(self, calls: list[VelocityCall], execution: PackedExecution) -> list[torch.Tensor]:
        device, dtype = calls[0].tokens.device, calls[0].tokens.dtype
        parts = {k: [] for k in ("x", "img_pad", "img_cos", "img_sin", "cap", "cap_pad", "cap_cos", "cap_sin", "t")}
        image_lens, text_lens, shapes = [], [], []
        for c in calls:
            d = c.cond.data
            guided, n, x, positions, t = self._inputs(c.tokens, c.grid, c.timestep, c.cond)
            l = x.shape[1]
            pad = (-l) % _seq_multiple()
            parts["x"].append(torch.cat([x, x.new_zeros(n, pad, x.shape[2])], dim=1).flatten(0, 1))
            parts["img_pad"].append((torch.arange(l + pad, device=device) >= l).repeat(n))
            cos, sin = self.image_rope(positions, d["img_t"][:n], pad)
            parts["img_cos"].append(cos.flatten(0, 1))
            parts["img_sin"].append(sin.flatten(0, 1))
            for j, tc in enumerate(d["cap_tc"][:n]):  # each caption up to its padded length (no masked rows)
                for key, name in (("cap", "embeds"), ("cap_pad", "cap_pad"), ("cap_cos", "cap_cos"),
                                  ("cap_sin", "cap_sin")):
                    parts[key].append(d[name][j, :tc])
            parts["t"].append(t)
            image_lens += [l + pad] * n
            text_lens += list(d["cap_tc"][:n])
            shapes.append((guided, n, l, l + pad))
        flat = {k: torch.cat(v) for k, v in parts.items()}
        impl, backend = execution.impl, self.packed_attention_backend
        if not execution.static_layout:
            ex = Packed(HostSegments([image_lens, text_lens], device), backend)
            out = self._forward(ex, flat["x"][None], flat["img_pad"][None], (flat["img_cos"][None],
                                flat["img_sin"][None]), flat["cap"][None], flat["cap_pad"][None], None,
                                (flat["cap_cos"][None], flat["cap_sin"][None]), flat["t"], impl)
        else:
            n_img, n_txt, n_seg = len(flat["x"]), len(flat["cap"]), len(image_lens)
            pad_img, pad_txt = execution.pad("image", n_img) - n_img, execution.pad("text", n_txt) - n_txt
            segs = execution.pad("segments", n_seg + 1)
            kind = static_attention(backend, device, dtype)
            lay = PackedSegments.build([image_lens, text_lens], [pad_img, pad_txt], segs, device, kind)
            tensors = [*(pad_rows(flat[k], pad_img) for k in ("x", "img_pad", "img_cos", "img_sin")),
                       *(pad_rows(flat[k], pad_txt) for k in ("cap", "cap_pad", "cap_cos", "cap_sin")),
                       pad_rows(flat["t"], segs - n_seg), *lay.tensors()]

            def forward(*ts):  # the flat tensors only (a captured graph replays it for every mix of the same sizes)
                x, img_pad, img_cos, img_sin, cap, cap_pad, cap_cos, cap_sin, t = (v[None] for v in ts[:9])
                ex = Packed(PackedSegments.from_tensors(ts[9:], 2, kind), backend)
                return self._forward(ex, x, img_pad, (img_cos, img_sin), cap, cap_pad, None, (cap_cos, cap_sin),
                                     t[0], impl)

            out = execution.run(("z-image", kind, backend), forward, tensors)
        result, start = [], 0
        for c, (guided, n, l, lp) in zip(calls, shapes):  # every image's real rows: the first L of its Lp
            result.append(self._velocity(out[0, start:start + n * lp].view(n, lp, -1)[:, :l], c.cond, guided,
                                         c.tokens.shape[0]))
            start += n * lp
        return result

    # ---- schedule, noise, decode -----------------------------------------------------------------------------
    def prepare_noise(self, batch, height, width, generators, dtype):
        """``ZImagePipeline.prepare_latents``: float32 noise ``(B, C, H/8, W/8)`` whatever the model dtype (the
        pipeline keeps its latents in float32 and casts the model input)."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.latent_hw(height, width)
        return randn_tensor((batch, self.latent_channels, h, w), generator=generators, device=self.device,
                            dtype=torch.float32)

    def prepare_edit_noise(self, batch, height, width, generators, dtype):
        """``ZImageImg2ImgPipeline`` / ``ZImageInpaintPipeline``: the noise is drawn in the prompt embeddings' dtype
        ``dtype`` (the latents then run in float32), returned as float32. Not a rounded float32 draw: torch's CPU
        ``randn`` in bfloat16 draws other values than in float32 in some releases (2.11: sizes of 16 and more)."""
        return DiTAdapter.prepare_noise(self, batch, height, width, generators, dtype).float()

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,
                                                                   retrieve_timesteps)

        sched = self.scheduler_copy()
        cfg = sched.config
        mu = pipeline_mu(calculate_shift, cfg, image_seq_len)
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, sigmas=get_default_z_image_sigmas(num_steps),
                                          mu=mu)
        return timesteps, sched.sigmas.to(self.device)

    def decode(self, latents, impl: ModelImpl | None = None):
        """The pipeline's decode: cast to the VAE dtype, then ``z / scaling_factor + shift_factor``."""
        vae = self.pipe.vae
        latents = latents.to(compute_dtype(vae))
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        fn = (impl or EAGER).vae_decode(vae)
        return fn(latents) if fn is not None else vae.decode(latents, return_dict=False)[0]
