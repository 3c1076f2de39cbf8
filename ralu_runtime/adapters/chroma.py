"""Chroma adapter (ChromaPipeline / ChromaTransformer2DModel): FLUX.1-schnell-like MMDiT, 2x2 latent patches,
RoPE position ids per token, a T5 text-token attention mask, true classifier-free guidance.

Chroma replaces FLUX's per-block AdaLN linears by one *approximator* (``distilled_guidance_layer``): an MLP that
maps a timestep embedding plus a per-slot index embedding to all the blocks' shift/scale/gate vectors at once
(``(B, 3 n_single + 12 n_double + 2, D)``); each block takes its slice. The adapter computes that input exactly
as ``ChromaTransformer2DModel.forward`` does and calls the model's own approximator (:meth:`ChromaAdapter.modulation`).

Blocks: Chroma's blocks are FLUX's with another modulation source and an attention mask, so the adapter runs FLUX's
block functions (:func:`~ralu_runtime.adapters.flux.flux_double_block`,
:func:`~ralu_runtime.adapters.flux.flux_single_block`: the same operations in the same order as diffusers'
``ChromaTransformerBlock`` / ``ChromaSingleTransformerBlock`` with ``FluxAttnProcessor``) on Chroma's blocks, calling
their own layers (LoRA layers and hooks on layers take effect); :class:`ChromaModulation` hands a double block's
``ChromaAdaLayerNormZeroPruned`` modules their halves of its modulation (diffusers' ``temb[:, :6]`` / ``temb[:, 6:]``)
and the mode ``ex`` carries the mask. Nothing on the user's model is replaced.

Positions: like FLUX, text ids are 0 and image ids are ``(0, row, col)``; RALU stage 2 gives every image its own
(fractional) positions, so the rotary tables are per token of every image.

Text mask: the pipeline extends the T5 mask (valid tokens plus one padding token) with ones for the image tokens
and every block gives attention ``m_i * m_j`` ``(B, 1, S, S)``. diffusers' own mask is float 0/1, which
scaled-dot-product attention *adds* to the logits (a +1 bias between valid tokens, not a hard mask: padding text
tokens still take part); a bool mask is a hard mask. Both are mirrored as given, in every mode, as a *pair mask*
``(B, T + L)`` whose ``m_i * m_j`` the attention builds itself (:func:`~ralu_runtime.execution.modes.pair_mask_4d`).

Execution modes (:mod:`ralu_runtime.execution`), one transformer body (:meth:`ChromaAdapter._forward`) for all:

* one request (:class:`~ralu_runtime.execution.modes.Dense` with ``pair_mask``; :meth:`ChromaAdapter.velocity`):
  classifier-free guidance runs negative and positive prompt as one batch when their text lengths and masks match,
  else as two text *groups*, each its own batch (and mode), block by block;
* many requests packed into one call (:class:`~ralu_runtime.execution.packing.Packed`,
  :meth:`ChromaAdapter.packed_velocity`): every image (each CFG half too) one attention segment ``[its text ; its
  image]`` with its own timestep, modulation, text length, mask and positions. A float mask becomes the packed
  call's pair mask (0 for the segments without one: no mask), which exact attention needs per segment (host layouts:
  one SDPA call per segment; static layouts: kind "dense"); a bool mask is hard, so its padding text tokens are left
  out of the packed sequence (they never reach a valid token; exact up to float rounding) and the segment needs no
  mask;
* one request sharded across ranks (:class:`~ralu_runtime.execution.sharding.Sharded` with ``pair_mask``, when the
  running ``generate`` call has a sharding plan): every text group sharded on its own.

Refused before any work (:meth:`ChromaAdapter.check_supported`): attention processors other than diffusers'
``FluxAttnProcessor`` (IP-Adapter, custom processors) and diffusers hook registries on the blocks
(``enable_cache``, block-level group offloading), which running the blocks' layers would bypass.
"""
from __future__ import annotations


import numpy as np
import torch

from ..families import FAMILIES
from ..execution.call import static_dims
from ..execution.modes import DENSE, JOINT, Dense, Mode
from ..execution.packing import (HostSegments, Packed, PackedExecution, PackedSegments, can_pack, pad_rows,
                                 split_calls, static_attention)
from ..execution.sharding import Sharded
from .base import (EAGER, Conditioning, DiTAdapter, ModelImpl, VelocityCall, call_with_hooks, check_blocks,
                   check_velocity_calls, current_sharding, double_then_single_stack, named_blocks,
                   pipeline_mu, scheduler_base_shift, side_by_side)
from .common import ADDED_QKV, QKV
from .flux import IMAGE, TEXT, FluxAdapter, flux_double_block, flux_single_block


class ChromaModulation(Mode):
    """Mode ``ex`` for FLUX's block functions on Chroma's blocks: a double block's modulation ``(n, 12, D)`` is
    ``[image 6 ; text 6]``; its ``ChromaAdaLayerNormZeroPruned`` modules get their half by stream (diffusers'
    ``temb[:, :6]`` for ``norm1``, ``temb[:, 6:]`` for ``norm1_context``). Everything else is ``ex``'s."""

    def __init__(self, ex: Mode):
        self.ex = ex
        self.suffix, self.per_request = ex.suffix, ex.per_request

    def ada_norm(self, norm, x, emb, stream):
        if type(norm).__name__ == "ChromaAdaLayerNormZeroPruned":
            emb = emb[:, :6] if stream == IMAGE else emb[:, 6:]
        return self.ex.ada_norm(norm, x, emb, stream)

    def tok(self, v, stream):
        return self.ex.tok(v, stream)

    def join(self, *streams):
        return self.ex.join(*streams)

    def split(self, x, first_len):
        return self.ex.split(x, first_len)

    def attend(self, q, k, v, *, stream=JOINT, backend=None, parallel_config=None, scale=None):
        return self.ex.attend(q, k, v, stream=stream, backend=backend, parallel_config=parallel_config, scale=scale)

    def cross_attend(self, q, k, v, *, q_stream, kv_stream, backend=None, scale=None):
        return self.ex.cross_attend(q, k, v, q_stream=q_stream, kv_stream=kv_stream, backend=backend, scale=scale)

    def local(self, x, stream):
        return self.ex.local(x, stream)

    def whole(self, x, stream):
        return self.ex.whole(x, stream)

    def call(self, module, x):
        return self.ex.call(module, x)


class _Groups:
    """The text groups of one model call (Dense / Sharded: the CFG halves when their text lengths or masks differ;
    packed: one) seen by a feature cache as one batch: :meth:`whole` concatenates every group's whole image rows on
    the batch dim, :meth:`local` splits such a tensor back into the groups' own rows (what
    :class:`~ralu_runtime.adapters.base.BlockStack` asks of its mode)."""

    def __init__(self, modes: list[Mode], batches: list[int]):
        self.modes, self.batches = modes, batches
        self.per_request = modes[0].per_request

    def whole(self, parts, stream: int) -> torch.Tensor:
        parts = [ex.whole(p, stream) for ex, p in zip(self.modes, parts)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def local(self, x: torch.Tensor, stream: int) -> list[torch.Tensor]:
        return [ex.local(c, stream) for ex, c in zip(self.modes, x.split(self.batches))]


def _joint_mask(text_mask: torch.Tensor | None, image_tokens: int) -> torch.Tensor | None:
    """The pipeline's attention mask: the text mask ``(B, T)`` extended with ones (bool, as diffusers does: the
    dtype promotes to the text mask's) for the image tokens -> ``(B, T + L)``; None without a text mask."""
    if text_mask is None:
        return None
    return torch.cat([text_mask, torch.ones(text_mask.shape[0], image_tokens, device=text_mask.device,
                                            dtype=torch.bool)], dim=1)


def _image_ids(positions: torch.Tensor) -> torch.Tensor:
    """Rotary ids ``(B, L, 3)`` float32 ``(0, row, col)`` of image tokens at ``positions (B, L, 2)``."""
    ids = positions.new_zeros(*positions.shape[:2], 3, dtype=torch.float32)
    ids[..., 1:] = positions
    return ids


class ChromaAdapter(DiTAdapter):
    """Adapter for diffusers' ``ChromaPipeline`` (Chroma1-HD / Chroma1-Base)."""
    bypassed_modules = ("attn",)  # its attention runs as ralu's own code (hooks on the module would not)

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

    def dummy_embeds(self, batch: int, text_len: int | None = None, *, device=None, dtype=None,
                     negative: bool | None = None) -> dict:
        """The base's zero embeddings plus all-ones text masks in the embeddings' dtype: prompts always come with a
        mask (float, like the pipeline's own T5 mask), so a warm-up compiles the graphs real calls use."""
        out = super().dummy_embeds(batch, text_len, device=device, dtype=dtype, negative=negative)
        for key in ("prompt_embeds", "negative_prompt_embeds"):
            if key not in out:
                continue
            e = out[key]
            out[key + "_mask"] = torch.ones(e.shape[:2], device=e.device, dtype=e.dtype)
        return out

    def preset_base_shift(self, height: int, width: int) -> float:
        """h_ori = exp(mu) of the pipeline's dynamic shifting at the fine image token count of ``height x width``."""
        return scheduler_base_shift(self.pipe.scheduler.config, self.fine_tokens(height, width))

    @property
    def patch_size(self) -> int:
        return 2

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
        cfg = self.runs_cfg(guidance_scale, negative_prompt is not None or negative_prompt_embeds is not None)
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
    def _rope(self, ex: Mode, txt_ids: torch.Tensor, img_ids: torch.Tensor):
        """Rotary ``(cos, sin)`` per token of the joined sequence ``ex.join(text, image)`` of the rotary ids
        ``txt_ids (B, T, 3)`` and ``img_ids (B, L, 3)``, by the model's own ``pos_embed``: ``(B, T + L, D)``."""
        ids = ex.join(txt_ids, img_ids)
        cos, sin = self.transformer.pos_embed(ids.reshape(-1, 3))
        return cos.view(*ids.shape[:2], -1), sin.view(*ids.shape[:2], -1)

    def rotary(self, positions: torch.Tensor, text_len: int):
        """Per-image rotary ``(cos, sin)`` of shape ``(B, T + L, D)``: text ids (all 0), then image ids
        ``(0, row, col)`` at ``positions (B, L, 2)`` (any real values), by the model's own ``pos_embed``."""
        img = _image_ids(positions)
        return self._rope(DENSE, img.new_zeros(img.shape[0], text_len, 3), img)

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

    def _forward(self, groups, impl: ModelImpl, timestep=None) -> torch.Tensor:
        """The transformer's blocks and output layers on text *groups* (model batches that run side by side, block
        by block), each ``(ex, hidden, enc, mod, rope, mask)``: its mode (a :class:`ChromaModulation`), the embedded
        image tokens ``(B_g, L, D)`` and text ``(B_g, T_g, D)`` in the mode's layout (packed: ``B = 1`` holding every
        image; sharded: this rank's rows), the approximator output per image ``(n_g, K, D)``, the rotary tables per
        token of its joined sequence, and its ``(B_g, T_g + L)`` mask or None (what block hooks see as
        ``attention_mask``; attention reads the mode's). ``timestep``: the call's 0-dim timestep for a feature cache
        (one-request modes). Returns the output projection of every group's image tokens, whole (not sharded), the
        groups concatenated on the batch dim."""
        tr = self.transformer
        ex0 = groups[0][0]
        double = impl.block(ex0.block_name("chroma_double"), flux_double_block)
        single = impl.block(ex0.block_name("chroma_single"), flux_single_block)
        doubles = [(blk, (impl.fused(blk.attn, QKV), impl.fused(blk.attn, ADDED_QKV))) for blk in tr.transformer_blocks]
        singles = [(blk, (impl.fused(blk.attn, QKV),)) for blk in tr.single_transformer_blocks]
        nd, ns = len(doubles), len(singles)
        img_off, txt_off = 3 * ns, 3 * ns + 6 * nd

        def group_stack(group):  # one group's blocks: its own mode, text length, modulation rows, rotary table and mask
            ex, hidden, enc, mod, rope, mask = group

            def double_step(i, e, h):
                blk, extra = doubles[i]
                temb = static_dims(torch.cat((mod[:, img_off + 6 * i: img_off + 6 * i + 6],
                                              mod[:, txt_off + 6 * i: txt_off + 6 * i + 6]), dim=1), 1, 2)
                args = (blk, h, e, temb, rope, ex, *extra)
                if blk._forward_hooks or blk._forward_pre_hooks:
                    return call_with_hooks(blk, double, args, dict(
                        hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope,
                        attention_mask=mask))
                return double(*args)

            def single_step(j, x):
                blk, extra = singles[j]
                temb = static_dims(mod[:, 3 * j: 3 * j + 3], 1, 2)
                args = (blk, x, temb, rope, ex, *extra)
                if blk._forward_hooks or blk._forward_pre_hooks:
                    return call_with_hooks(blk, single, args, dict(hidden_states=x, temb=temb, image_rotary_emb=rope,
                                                                   attention_mask=mask))
                return single(*args)

            return double_then_single_stack(ex, nd, ns, double_step, single_step, enc, hidden, IMAGE)

        rows = _Groups([g[0] for g in groups], [g[1].shape[0] for g in groups])
        stack = side_by_side([group_stack(g) for g in groups], rows, IMAGE)
        hidden = rows.whole(self.run_stack(stack, [g[1] for g in groups], timestep), IMAGE)
        mod = groups[0][3] if len(groups) == 1 else torch.cat([g[3] for g in groups])
        return ex0.call(tr.proj_out, ex0.ada_norm(tr.norm_out, hidden, mod[:, -2:], IMAGE))

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        """One request's velocity ``(B, L, C)`` (true CFG as the pipeline combines it); sharded across ranks when the
        running ``generate`` call has a sharding plan (every text group on its own; every rank returns the whole
        velocity)."""
        impl = impl or EAGER
        tr = self.transformer
        data = cond.data
        b, l, _ = tokens.shape
        t = timestep.expand(b).to(tokens.dtype) / 1000  # what the pipeline gives the transformer
        hidden = tr.x_embedder(tokens)
        mod = self.modulation(t.to(hidden.dtype) * 1000)
        img_ids = _image_ids(grid.positions)
        plan = current_sharding()

        texts = [(data["embeds"], data["mask"])]  # text conditions, one model batch each
        if data["neg_embeds"] is not None:
            texts.insert(0, (data["neg_embeds"], data["neg_mask"]))
        groups = []
        for embeds, text_mask in texts:
            r = embeds.shape[0] // b  # 2 for a [negative; positive] batch, else 1
            rep = (lambda x: x) if r == 1 else (lambda x: x.repeat(r, 1, 1))  # noqa: E731
            mask = _joint_mask(text_mask, l)
            if plan is None:
                base = DENSE if mask is None else Dense(pair_mask=mask)
            else:
                base = Sharded(plan, (embeds.shape[1], l), pair_mask=mask)
            ex = ChromaModulation(base)
            ids = rep(img_ids)
            rope = self._rope(ex, ex.local(ids.new_zeros(ids.shape[0], embeds.shape[1], 3), TEXT),
                              ex.local(ids, IMAGE))  # per token always: one graph for all stages when compiled
            groups.append((ex, ex.local(rep(hidden), IMAGE), tr.context_embedder(ex.local(embeds, TEXT)), rep(mod),
                           rope, mask))
        out = self._forward(groups, impl, timestep)
        if data["cfg"]:
            uncond, text = out.chunk(2)
            out = uncond + data["guidance_scale"] * (text - uncond)
        return out

    # ---- packed and sharded calls ------------------------------------------------------------------------
    packs = True
    shards = True
    packed_attention_backend = "auto"  # varlen_attention backend of unmasked packed calls ("auto", "sdpa", ...)

    # the modules the unpacked call runs as modules (hooks included) and the packed call decomposes: FLUX's list
    _bypassed_by_packing = FluxAdapter._bypassed_by_packing

    def packed_velocity(self, calls, impl: ModelImpl | None = None, *,
                        execution: PackedExecution | None = None) -> list[torch.Tensor]:
        """:meth:`velocity` of every call, all run as one transformer call over a packed token sequence.

        Every image of every call -- under CFG its negative and its positive half -- is one attention segment
        ``[its text tokens ; its image tokens]`` with its own timestep (the approximator's modulation per image),
        text length, rotary positions (``grid.positions``) and text mask: a bool mask leaves the segment's padding
        text tokens out, a float mask enters the call's pair mask (see the module docstring). Results equal the
        unpacked calls up to float rounding (fp32 on a CPU: about 1e-7 relative, tests/test_modes_chroma.py).
        Attention: :func:`ralu_kernels.attention.varlen_attention` (backend :attr:`packed_attention_backend`)
        without a float mask, one SDPA call per segment with one.

        Compiled blocks: with ``impl`` a compile runner's impl (``impl.packed_calls``; ``StageRunner.packed`` passes
        its ``execution``), FLUX's block functions run through ``impl.block("chroma_double_packed", ...)`` /
        ``impl.block("chroma_single_packed", ...)`` (compiled with a symbolic packed token dimension) on a
        :class:`PackedSegments` layout (device tensors only, one padding segment; kind "dense" when a float mask is
        in the call, as masked attention needs), so a new mix of requests reuses the same graphs.

        Falls back to one :meth:`velocity` per call (correct, unpacked) when ``impl`` is neither None / EAGER nor a
        packing impl, when the calling ``generate`` has a feature cache (its state is per request), or when a block
        or an AdaLN module the packed call decomposes carries torch forward (pre-)hooks or diffusers hooks.
        """
        calls = check_velocity_calls(calls)
        execution = execution or PackedExecution(self, impl)
        if not can_pack(execution.impl, self._bypassed_by_packing()):
            return [execution.velocity(c) for c in calls]
        return self._packed_call(calls, execution)

    def _packed_call(self, calls: list[VelocityCall], execution: PackedExecution) -> list[torch.Tensor]:
        device, dtype = calls[0].tokens.device, calls[0].tokens.dtype
        tokens, positions, texts, t, counts = [], [], [], [], []
        text_bias, image_bias = [], []  # per token (float masks only), 0 for a segment without one
        for c in calls:
            data, b, l = c.cond.data, c.tokens.shape[0], c.tokens.shape[1]
            groups = [(data["embeds"], data["mask"])]
            if data["neg_embeds"] is not None:
                groups.insert(0, (data["neg_embeds"], data["neg_mask"]))
            for embeds, mask in groups:  # images [negative ; positive] under CFG, as velocity orders them
                for j in range(embeds.shape[0]):
                    text, m = embeds[j], None if mask is None else mask[j]
                    if m is not None and m.dtype == torch.bool:
                        text, m = text[m], None  # a hard mask: its padding tokens reach no valid token
                    texts.append(text)
                    text_bias.append(text.new_zeros(len(text)) if m is None else m.to(text.dtype))
                    image_bias.append(text.new_full((l,), 0.0 if m is None else 1.0))
                    tokens.append(c.tokens[j % b])
                    positions.append(c.grid.positions[j % b])
            n = sum(e.shape[0] for e, _ in groups)
            counts.append(n)
            t.append(c.timestep.reshape(()).expand(n).to(dtype) / 1000)  # what the pipeline gives the transformer
        biased = any(c.cond.data[k] is not None and c.cond.data[k].dtype != torch.bool
                     for c in calls for k in ("mask", "neg_mask"))
        text_lens, image_lens = [len(x) for x in texts], [len(x) for x in tokens]
        tokens, positions, texts, t = torch.cat(tokens), torch.cat(positions), torch.cat(texts), torch.cat(t)
        text_bias, image_bias = (torch.cat(text_bias), torch.cat(image_bias)) if biased else (None, None)
        impl, backend = execution.impl, self.packed_attention_backend
        if not execution.static_layout:
            lay = HostSegments([text_lens, image_lens], device)
            pair = None if not biased else lay.gather(text_bias, image_bias)[None]
            out = self._packed_forward(Packed(lay, backend, pair), tokens, positions, texts, t, impl)
            return self._guided(calls, split_calls(out, calls, counts))

        n_img, n_txt, n_seg = len(tokens), len(texts), len(image_lens)
        pad_img, pad_txt = execution.pad("image", n_img) - n_img, execution.pad("text", n_txt) - n_txt
        segs = execution.pad("segments", n_seg + 1)
        kind = "dense" if biased else static_attention(backend, device, dtype)
        lay = PackedSegments.build([text_lens, image_lens], [pad_txt, pad_img], segs, device, kind)
        tensors = [pad_rows(tokens, pad_img), pad_rows(positions, pad_img), pad_rows(texts, pad_txt),
                   pad_rows(t, segs - n_seg)]
        if biased:
            tensors += [pad_rows(text_bias, pad_txt), pad_rows(image_bias, pad_img)]
        tensors += lay.tensors()

        def forward(*ts):  # the flat tensors only (a captured graph replays it for every mix of the same sizes)
            k = 6 if biased else 4
            layout = PackedSegments.from_tensors(ts[k:], 2, kind)
            ex = Packed(layout, backend, layout.gather(ts[4], ts[5])[None] if biased else None)
            return self._packed_forward(ex, *ts[:4], impl)

        out = execution.run(("chroma", biased, kind, backend), forward, tensors)
        return self._guided(calls, split_calls(out[:, :n_img], calls, counts))

    def _packed_forward(self, ex: Packed, tokens, positions, texts, t, impl: ModelImpl) -> torch.Tensor:
        """The transformer on a packed call: image ``tokens (N_img, C)`` at ``positions (N_img, 2)``, text
        ``texts (N_txt, D_text)`` (every image's tokens one after another), ``t (n_images,)`` timestep / 1000 per
        image, in mode ``ex``. Returns ``(1, N_img, C)``."""
        tr = self.transformer
        hidden = tr.x_embedder(tokens[None])
        mod = self.modulation(t.to(hidden.dtype) * 1000)
        enc = tr.context_embedder(texts[None])
        ids = _image_ids(positions[None])
        rope = self._rope(ex, ids.new_zeros(1, texts.shape[0], 3), ids)
        return self._forward([(ChromaModulation(ex), hidden, enc, mod, rope, None)], impl)

    @staticmethod
    def _guided(calls, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every call's images ``[negative ; positive]`` combined with its guidance scale under CFG."""
        result = []
        for c, o in zip(calls, outs):
            if c.cond.data["cfg"]:
                uncond, text = o.chunk(2)
                o = uncond + c.cond.data["guidance_scale"] * (text - uncond)
            result.append(o)
        return result

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift, retrieve_timesteps

        sched = self.scheduler_copy()
        cfg = sched.config
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = pipeline_mu(calculate_shift, cfg, image_seq_len)
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps, sched.sigmas.to(self.device)
