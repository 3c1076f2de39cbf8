"""FLUX.2 adapter (Flux2Pipeline: FLUX.2-dev; Flux2KleinPipeline: FLUX.2-klein) on ``Flux2Transformer2DModel``.

The model: a 32-channel VAE latent (``AutoencoderKLFlux2``, factor 8) packed in 2x2 patches into 128-channel tokens
and normalised per token channel with the VAE's batch-norm running statistics; double-stream blocks, then
single-stream ("parallel") blocks on the joined [text, image] stream; the timestep (+ guidance for FLUX.2-dev)
embedding feeds three modulation layers shared by all blocks of a kind (``double_stream_modulation_img/_txt``,
``single_stream_modulation``). Text: Mistral-3 (dev) or Qwen3 (klein) hidden states of three layers, no pooled
embedding, no text mask. Timesteps: the scheduler with ``mu = compute_empirical_mu(image_seq_len, num_steps)``.
Guidance: FLUX.2-dev embeds it (no negative prompt); FLUX.2-klein base (``is_distilled=False``) runs true CFG
with a negative prompt ("" unless given) when guidance_scale > 1; step-distilled klein ignores guidance.

Latents as ralu sees them: ``(B, 32, h, w)`` *normalised* VAE latents (the pipeline's packed tokens unpacked and
unpatchified), so tokens ``(B, L, 128)`` are exactly the pipeline's (``(channel, py, px)`` order) and the coarse
stage takes the 2x nearest downsample of the latent like FLUX.1. :meth:`Flux2Adapter.decode` undoes the
batch-norm normalisation as the pipeline does before the VAE decode.

Positions: 4-axis RoPE ids ``(t, h, w, l)``: image tokens ``(0, row, col, 0)``, text tokens ``(0, 0, 0, i)``. The
model takes one id table for the whole batch, so the adapter runs the blocks itself with per-image rotary tables
``(B, T + L, D)`` evaluated by the model's own ``pos_embed`` at each token's (possibly fractional) position,
calling the blocks' own layers (LoRA and layer hooks work; nothing on the user's model is replaced or patched).
:func:`flux2_double_block` / :func:`flux2_single_block` do the same operations in the same order as diffusers'
``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock`` with ``Flux2AttnProcessor`` (FLUX.1's
:func:`~ralu_runtime.adapters.flux.flux_attention`: the same operations) / ``Flux2ParallelSelfAttnProcessor``;
the parity with diffusers is bitwise on a CPU in float32.

Execution modes (:mod:`ralu_runtime.execution`): one block function per block kind serves them all, the mode ``ex``
deciding how the text and image streams are joined, how attention runs and how the per-image modulations reach the
tokens --

* one request (:class:`~ralu_runtime.execution.modes.Dense`): :meth:`Flux2Adapter.velocity`; true CFG runs prompt
  and negative prompt as one batch when their embeddings have the same length, else as two passes;
* many requests packed into one call (:class:`~ralu_runtime.execution.packing.Packed`,
  :meth:`Flux2Adapter.packed_velocity`): every image its own attention segment ``[text ; image]`` with its own
  timestep, guidance, text length and rotary ids; under CFG a call's images appear twice (prompt, negative prompt,
  each with its own length); eager and static (compiled / CUDA-graph) layouts;
* one request sharded across ranks (:class:`~ralu_runtime.execution.sharding.Sharded`, context parallelism when the
  running ``generate`` call has a sharding plan): the joined sequence cut into contiguous shards of any size.

Masks: FLUX.2's pipelines attend to every text token (no text mask), so no mode masks anything.

Refused (:meth:`Flux2Adapter.check_supported`, before any work): other attention processors (custom ones, or
anything that is not diffusers' Flux2 processor or its KV-cache variant used without a cache), diffusers hook
registries on the blocks (``enable_cache``, block-level group offloading), which running the blocks' layers would
bypass, and projections fused by ``fuse_qkv_projections`` that are not plain Linear layers (read as weights).
Reference-image conditioning (the pipelines' ``image=`` argument) is not supported.
"""
from __future__ import annotations


import numpy as np
import torch

from ..families import FAMILIES
from ..execution.call import static_dims
from ..execution.modes import DENSE, JOINT, Mode
from ..execution.packing import (HostSegments, Packed, PackedExecution, PackedSegments, can_pack, pad_rows,
                                 split_calls, static_attention)
from ..execution.sharding import Sharded
from ..offload import module_device
from .base import (EAGER, Conditioning, DiTAdapter, ModelImpl, TokenGrid, VelocityCall, call_with_hooks, check_blocks,
                   check_velocity_calls, compute_dtype, current_cache, current_sharding, double_then_single_stack,
                   named_blocks, scheduler_base_shift)
from .common import ADDED_QKV, QKV, apply_rope
from .flux import flux_attention

TEXT, IMAGE = 0, 1  # FLUX.2's streams, in the order of its joint sequence [text ; image]
DOUBLE_PROCESSORS = ("Flux2AttnProcessor", "Flux2KVAttnProcessor")
SINGLE_PROCESSORS = ("Flux2ParallelSelfAttnProcessor", "Flux2KVParallelSelfAttnProcessor")


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The FLUX.2 pipelines' timestep shift ``mu`` (diffusers' ``pipeline_flux2.compute_empirical_mu``)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as mu

    return float(mu(image_seq_len=int(image_seq_len), num_steps=int(num_steps)))


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, 4C, h/2, w/2)``, channel ``4c + 2py + px`` (the pipelines' ``_patchify_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify` (the pipelines' ``_unpatchify_latents``)."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def _user_fused(attn, name: str):
    """``(weight, bias)`` of the projection ``name`` (``to_qkv`` / ``to_added_qkv``) the user fused with diffusers'
    ``fuse_qkv_projections``, or None when the projections are not fused (read live, every call)."""
    if not getattr(attn, "fused_projections", False):
        return None
    layer = getattr(attn, name)
    return layer.weight, layer.bias


def _modulated_mlp(ex: Mode, stream: int, x, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm, ff):
    """The second half of a FLUX.2 double block for one stream: gated attention residual, then the modulated MLP
    residual (``Flux2TransformerBlock.forward``'s operations in its order); per-image vectors ``(n_images, D)``."""
    x = x + ex.tok(gate_msa, stream) * attn_out
    h = norm(x) * (1 + ex.tok(scale_mlp, stream)) + ex.tok(shift_mlp, stream)
    return x + ex.tok(gate_mlp, stream) * ff(h)


def flux2_double_block(block, hidden_states, encoder_hidden_states, mod_img, mod_txt, rope, ex: Mode = DENSE,
                       qkv=None, added_qkv=None):
    """diffusers' ``Flux2TransformerBlock.forward`` (same operations, same order) in mode ``ex``; attention is
    FLUX.1's :func:`~ralu_runtime.adapters.flux.flux_attention` (``Flux2AttnProcessor`` does the same operations).
    ``mod_img`` / ``mod_txt``: the transformer's shared double-stream modulations ``(n_images, 6 D)``; ``rope``:
    ``(cos, sin)`` per token of the joined sequence; ``qkv`` / ``added_qkv``: fused ``(weight, bias)`` of to_q/k/v and
    add_q/k/v_proj (the user's ``to_qkv`` / ``to_added_qkv``, or ralu's copies), or None (the layers).
    Returns ``(encoder_hidden_states, hidden_states)``."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod_img.chunk(6, dim=-1)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mod_txt.chunk(6, dim=-1)

    norm_h = (1 + ex.tok(scale_msa, IMAGE)) * block.norm1(hidden_states) + ex.tok(shift_msa, IMAGE)
    norm_e = (1 + ex.tok(c_scale_msa, TEXT)) * block.norm1_context(encoder_hidden_states) + ex.tok(c_shift_msa, TEXT)
    attn_out, context_attn_out = flux_attention(block.attn, norm_h, norm_e, rope, ex, qkv, added_qkv)

    hidden_states = _modulated_mlp(ex, IMAGE, hidden_states, attn_out, gate_msa, shift_mlp, scale_mlp, gate_mlp,
                                   block.norm2, block.ff)
    encoder_hidden_states = _modulated_mlp(ex, TEXT, encoder_hidden_states, context_attn_out, c_gate_msa, c_shift_mlp,
                                           c_scale_mlp, c_gate_mlp, block.norm2_context, block.ff_context)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def flux2_single_block(block, x, mod, rope, ex: Mode = DENSE):
    """diffusers' ``Flux2SingleTransformerBlock.forward`` on the joined ``[text ; image]`` sequence ``x`` (same
    operations, same order, ``Flux2ParallelSelfAttnProcessor`` inlined: one fused q/k/v + MLP-in projection, one
    fused attention + MLP-out projection) in mode ``ex``; ``mod``: the shared single-stream modulation
    ``(n_images, 3 D)``. Returns the new joined sequence."""
    shift, scale, gate = mod.chunk(3, dim=-1)
    norm_x = (1 + ex.tok(scale, JOINT)) * block.norm(x) + ex.tok(shift, JOINT)

    attn = block.attn
    proj = attn.to_qkv_mlp_proj(norm_x)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    qkv, mlp = torch.split(proj, [local_qkv, proj.shape[-1] - local_qkv], dim=-1)
    query, key, value = qkv.chunk(3, dim=-1)
    query = apply_rope(attn.norm_q(query.unflatten(-1, (-1, attn.head_dim))), *rope)
    key = apply_rope(attn.norm_k(key.unflatten(-1, (-1, attn.head_dim))), *rope)
    value = value.unflatten(-1, (-1, attn.head_dim))
    proc = attn.processor
    out = ex.attend(query, key, value, backend=getattr(proc, "_attention_backend", None),
                    parallel_config=getattr(proc, "_parallel_config", None))
    out = attn.to_out(torch.cat([out.flatten(2, 3).to(query.dtype), attn.mlp_act_fn(mlp)], dim=-1))

    x = x + ex.tok(gate, JOINT) * out
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x


def _is_klein(pipe) -> bool:
    return any(cls.__name__ == "Flux2KleinPipeline" for cls in type(pipe).__mro__)


class Flux2Adapter(DiTAdapter):
    """Adapter for diffusers' ``Flux2Pipeline`` (family "flux2": 50 steps, embedded guidance 4.0) and
    ``Flux2KleinPipeline`` (``is_distilled=True``: family "flux2-klein", 4 steps, no guidance; ``False``: family
    "flux2", 50 steps, true CFG at guidance 4.0 with a negative prompt)."""
    bypassed_modules = ("attn",)  # its attention runs as ralu's own code (hooks on the module would not)

    family = "flux2"  # defaults: ralu_runtime.families (FLUX.2-klein distilled's in __init__)
    default_preset = FAMILIES["flux2"].default_preset
    default_steps = FAMILIES["flux2"].default_steps
    default_guidance = FAMILIES["flux2"].default_guidance
    default_size = FAMILIES["flux2"].default_size
    default_text_len = FAMILIES["flux2"].default_text_len
    fuses_projections = True
    max_side_px = FAMILIES["flux2"].max_side_px  # 65536 fine tokens; FLUX.2 is trained up to about 4 MP

    def __init__(self, pipe, *, weak: bool = False):
        super().__init__(pipe, weak=weak)
        self.transformer = pipe.transformer
        self.klein = _is_klein(pipe)
        self.distilled = self.klein and bool(getattr(pipe.config, "is_distilled", False))
        if self.distilled:
            klein = FAMILIES["flux2-klein"]
            self.family, self.default_preset, self.default_steps = klein.name, klein.default_preset, klein.default_steps
        self.supports_negative_prompt = self.klein and not self.distilled
        self.base_shift = self.preset_base_shift(self.default_size, self.default_size)

    # ---- support -------------------------------------------------------------------------------------------
    def check_supported(self) -> None:
        check_blocks(named_blocks(self.transformer, "transformer_blocks"), DOUBLE_PROCESSORS, "FLUX.2")
        check_blocks(named_blocks(self.transformer, "single_transformer_blocks"), SINGLE_PROCESSORS, "FLUX.2")
        for name, blk in named_blocks(self.transformer, "transformer_blocks"):
            if not getattr(blk.attn, "fused_projections", False):
                continue
            for layer in ("to_qkv", "to_added_qkv"):  # read as (weight, bias): a wrapped layer would be bypassed
                kind = type(getattr(blk.attn, layer)).__name__
                if kind != "Linear":
                    raise ValueError(f"{name}.attn.{layer} is a {kind}, not a plain Linear: ralu reads the projections "
                                     "fused by fuse_qkv_projections as weights and would bypass it; call "
                                     "pipe.transformer.unfuse_qkv_projections() (LoRA on to_q / to_k / to_v works)")

    def embed_dims(self) -> tuple[int, None]:
        return int(self.transformer.config.joint_attention_dim), None

    def preset_base_shift(self, height: int, width: int) -> float:
        """exp(mu) of the pipeline's own ``compute_empirical_mu`` at the fine token count of ``height`` x ``width``
        and the default step count (50, or 4 for step-distilled klein)."""
        seq_len = self.fine_tokens(int(height), int(width))
        return scheduler_base_shift(self.pipe.scheduler.config, seq_len,
                                    mu=compute_empirical_mu(seq_len, self.default_steps))

    # ---- geometry ------------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return 2

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def prepare_noise(self, batch, height, width, generators, dtype):
        """The pipeline's ``randn_tensor((B, 4C, h/2, w/2))`` (same draws), unpatchified to ``(B, C, h, w)``."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.latent_hw(height, width)
        noise = randn_tensor((batch, 4 * self.latent_channels, h // 2, w // 2), generator=generators,
                             device=self.device, dtype=dtype)
        return unpatchify(noise)

    # ---- text ----------------------------------------------------------------------------------------------
    def _encode(self, prompt, embeds, num_images_per_prompt, max_sequence_length):
        """``(B * n, T, D)`` embeddings of ``prompt`` (the pipeline's own text encoding) or given ``embeds``."""
        if embeds is not None:  # images prompt-major, like the pipeline's repeat + view
            return embeds.to(self.device).repeat_interleave(num_images_per_prompt, dim=0)
        if getattr(self.pipe, "text_encoder", None) is None or getattr(self.pipe, "tokenizer", None) is None:
            raise ValueError("this pipeline has no text encoder / tokenizer: pass prompt_embeds (and "
                             "negative_prompt_embeds for classifier-free guidance)")
        embeds, _text_ids = self.pipe.encode_prompt(prompt=prompt, device=self.device,
                                                    num_images_per_prompt=num_images_per_prompt,
                                                    max_sequence_length=max_sequence_length)
        return embeds

    def guidance_ignored(self) -> str | None:
        return "a step-distilled FLUX.2-klein runs no guidance" if self.distilled else None

    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale, max_sequence_length=None, prompt_embeds_mask=None,
                      negative_prompt_embeds_mask=None):
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("FLUX.2 takes no pooled text embedding")
        if prompt_embeds_mask is not None or negative_prompt_embeds_mask is not None:
            raise ValueError("FLUX.2 takes no text-token mask (its pipelines attend to every text token)")
        negative = negative_prompt is not None or negative_prompt_embeds is not None
        if negative and not self.supports_negative_prompt:
            raise ValueError(f"negative prompts are not supported for {type(self.pipe).__name__}"
                             + (" (step-distilled: no guidance)" if self.distilled else
                                " (it uses a guidance embedding, not classifier-free guidance)"))
        msl = max_sequence_length or 512
        embeds = self._encode(prompt, prompt_embeds, num_images_per_prompt, msl)
        b = embeds.shape[0]
        cfg = self.runs_cfg(guidance_scale, negative)
        neg = None
        if cfg:
            if negative_prompt_embeds is not None:
                neg = self._encode(None, negative_prompt_embeds, num_images_per_prompt, msl)
            else:  # the pipeline's negative prompt is "" (one per prompt); a given negative_prompt replaces it
                count = prompt_embeds.shape[0] if prompt_embeds is not None else (
                    1 if isinstance(prompt, str) else len(prompt))
                negs = negative_prompt if negative_prompt is not None else ""
                negs = [negs] * count if isinstance(negs, str) else list(negs)
                if len(negs) != count:
                    raise ValueError(f"got {len(negs)} negative prompts for {count} prompts")
                neg = self._encode(negs, None, num_images_per_prompt, msl)
        guidance = None
        if getattr(self.transformer.time_guidance_embed, "guidance_embedder", None) is not None:
            guidance = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32).expand(b)
        return Conditioning(b, {"embeds": embeds, "neg_embeds": neg, "guidance": guidance, "cfg": cfg,
                                "guidance_scale": float(guidance_scale)})

    # ---- model ---------------------------------------------------------------------------------------------
    @staticmethod
    def _ids(positions: torch.Tensor, text_index: torch.Tensor):
        """4-axis rotary ids ``(t, h, w, l)`` float32: text ``(..., T, 4)`` = ``(0, 0, 0, i)`` from ``text_index``
        ``(..., T)`` (each token's index in its prompt), image ``(..., L, 4)`` = ``(0, row, col, 0)`` from
        ``positions (..., L, 2)``."""
        img = positions.new_zeros(*positions.shape[:-1], 4, dtype=torch.float32)
        img[..., 1:3] = positions
        txt = img.new_zeros(*text_index.shape, 4)
        txt[..., 3] = text_index
        return txt, img

    def rotary(self, grid: TokenGrid, text_len: int):
        """Per-image rotary ``(cos, sin)`` of shape ``(B, T + L, D)`` float32 from the model's ``pos_embed``: text
        ids ``(0, 0, 0, i)`` then image ids ``(0, row, col, 0)`` at the grid's (possibly fractional) positions."""
        pos = grid.positions
        index = torch.arange(text_len, device=pos.device, dtype=torch.float32).expand(pos.shape[0], text_len)
        ids = torch.cat(self._ids(pos, index), dim=1)
        cos, sin = self.transformer.pos_embed(ids.reshape(-1, 4))
        return cos.view(*ids.shape[:2], -1), sin.view(*ids.shape[:2], -1)

    def _forward(self, ex: Mode, tokens, embeds, txt_ids, img_ids, t, guidance, impl: ModelImpl,
                 timestep=None) -> torch.Tensor:
        """The transformer in mode ``ex`` (the model's forward with per-image positions): image ``tokens (B, L, 128)``
        and text ``embeds (B, T, D)`` in ``ex``'s layout (packed: ``B = 1`` holding every image; sharded: this rank's
        rows), their rotary ids (:meth:`_ids`), per image ``t`` (timestep / 1000) and ``guidance`` (or None);
        ``timestep``: the call's 0-dim timestep for a feature cache (one-request modes). Returns the image tokens'
        velocity in ``ex``'s layout."""
        tr = self.transformer
        x = tokens.to(self.dtype)
        t = t.to(x.dtype) * 1000                               # the transformer's .to(hidden dtype) * 1000
        g = None if guidance is None else guidance.to(x.dtype) * 1000
        temb = tr.time_guidance_embed(t, g)
        # (n_images, 6 D) / (n_images, 3 D), shared by all double / single blocks; 6 D / 3 D static when compiled
        mod_img = static_dims(tr.double_stream_modulation_img(temb), -1)
        mod_txt = static_dims(tr.double_stream_modulation_txt(temb), -1)
        mod_single = static_dims(tr.single_stream_modulation(temb), -1)
        enc = tr.context_embedder(embeds)
        hidden = tr.x_embedder(x)
        ids = ex.join(txt_ids, img_ids)
        cos, sin = tr.pos_embed(ids.reshape(-1, 4))
        rope = (cos.view(*ids.shape[:2], -1), sin.view(*ids.shape[:2], -1))  # per token always: one graph

        double = impl.block(ex.block_name("flux2_double"), flux2_double_block)
        single = impl.block(ex.block_name("flux2_single"), flux2_single_block)
        doubles = [(blk, (_user_fused(blk.attn, "to_qkv") or impl.fused(blk.attn, QKV),
                          _user_fused(blk.attn, "to_added_qkv") or impl.fused(blk.attn, ADDED_QKV)))
                   for blk in tr.transformer_blocks]
        singles = list(tr.single_transformer_blocks)

        def double_step(i, e, h):
            blk, projections = doubles[i]
            args = (blk, h, e, mod_img, mod_txt, rope, ex, *projections)
            if blk._forward_hooks or blk._forward_pre_hooks:
                return call_with_hooks(blk, double, args, dict(
                    hidden_states=h, encoder_hidden_states=e, temb_mod_img=mod_img, temb_mod_txt=mod_txt,
                    image_rotary_emb=rope))
            return double(*args)

        def single_step(j, x):
            blk = singles[j]
            args = (blk, x, mod_single, rope, ex)
            if blk._forward_hooks or blk._forward_pre_hooks:  # the joined sequence, as diffusers' FLUX.2 passes it
                return call_with_hooks(blk, single, args, dict(hidden_states=x, encoder_hidden_states=None,
                                                               temb_mod=mod_single, image_rotary_emb=rope))
            return single(*args)

        stack = double_then_single_stack(ex, len(doubles), len(singles), double_step, single_step, enc, hidden, IMAGE)
        hidden = self.run_stack(stack, hidden, timestep)
        return ex.call(tr.proj_out, ex.ada_norm(tr.norm_out, hidden, temb, IMAGE))

    def _request(self, tokens, positions, timestep, embeds, guidance, impl: ModelImpl) -> torch.Tensor:
        """One transformer pass of one request ``(B, L, 128)``: Dense, or sharded across ranks when the running
        ``generate`` call has a sharding plan (context parallelism: every rank returns the whole velocity)."""
        b, text_len = tokens.shape[0], embeds.shape[1]
        t = timestep.expand(b).to(tokens.dtype) / 1000        # the pipeline's timestep / 1000
        index = torch.arange(text_len, device=tokens.device, dtype=torch.float32).expand(b, text_len)
        txt_ids, img_ids = self._ids(positions, index)
        plan = current_sharding()
        ex = DENSE if plan is None else Sharded(plan, (text_len, tokens.shape[1]))
        out = self._forward(ex, ex.local(tokens, IMAGE), ex.local(embeds, TEXT), ex.local(txt_ids, TEXT),
                            ex.local(img_ids, IMAGE), t, guidance, impl, timestep)
        return ex.whole(out, IMAGE)

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        """One request's velocity ``(B, L, 128)`` (true CFG for klein base: prompt and negative prompt in one pass
        when their embeddings have the same length, else two); sharded when the ``generate`` call is."""
        impl = impl or EAGER
        d = cond.data
        if not d["cfg"]:
            return self._request(tokens, grid.positions, timestep, d["embeds"], d["guidance"], impl)
        pos, neg = d["embeds"], d["neg_embeds"]
        if pos.shape[1] == neg.shape[1]:  # one pass on the batch [prompt, negative]
            text, uncond = self._request(torch.cat([tokens, tokens]), torch.cat([grid.positions] * 2), timestep,
                                         torch.cat([pos, neg]), None, impl).chunk(2)
        else:
            if current_cache() is not None:
                raise ValueError("a feature cache needs prompt and negative prompt embeddings of the same length")
            text = self._request(tokens, grid.positions, timestep, pos, None, impl)
            uncond = self._request(tokens, grid.positions, timestep, neg, None, impl)
        return uncond + d["guidance_scale"] * (text - uncond)

    # ---- packed calls ------------------------------------------------------------------------------------
    packs = True
    shards = True
    packed_attention_backend = "auto"  # varlen_attention backend of packed_velocity ("auto", "sdpa", ...)

    def _bypassed_by_packing(self) -> list:
        """Modules the unpacked call runs as modules (hooks included) and the packed call decomposes."""
        tr = self.transformer
        return [tr.norm_out, *tr.transformer_blocks, *tr.single_transformer_blocks]

    def packed_velocity(self, calls, impl: ModelImpl | None = None, *,
                        execution: PackedExecution | None = None) -> list[torch.Tensor]:
        """:meth:`velocity` of every call, all run as one transformer call over a packed token sequence.

        Every image is one attention segment ``[its text tokens ; its image tokens]`` with its own timestep,
        guidance (FLUX.2-dev), text length and rotary ids (text ``(0, 0, 0, i)``, image positions from its grid); the
        shared modulations are computed per image and reach the tokens of its segment. Under true CFG (klein base) a
        call brings its images twice, prompt then negative prompt (each with its own text length), and its result
        is combined with its own ``guidance_scale``. Attention: :func:`ralu_kernels.attention.varlen_attention`
        (backend :attr:`packed_attention_backend`). Results equal the unpacked calls up to float rounding (fp32 on
        a CPU: within 2e-6 relative, see tests/test_modes_flux2.py).

        Compiled blocks: with a compile runner's impl (``impl.packed_calls``; ``StageRunner.packed`` passes its
        ``execution``), ``flux2_double_packed`` / ``flux2_single_packed`` are compiled with a symbolic packed token
        dimension and run on a :class:`PackedSegments` layout (device tensors only; one padding segment, CUDA graphs
        pad the packed lengths up to a bucket): a new mix of requests reuses the same graphs.

        Falls back to one :meth:`velocity` per call (correct, unpacked) when ``impl`` is neither None / EAGER nor a
        packing impl, when the calling ``generate`` has a feature cache (its state is per request), or when a block
        or the output AdaLN module (which the packed call decomposes) carries torch forward (pre-)hooks or diffusers
        hooks; for a CFG call on a model with a guidance embedding (no diffusers pipeline makes one: its unpacked
        CFG passes embed no guidance).
        """
        calls = check_velocity_calls(calls)
        execution = execution or PackedExecution(self, impl)
        if not can_pack(execution.impl, self._bypassed_by_packing()):
            return [execution.velocity(c) for c in calls]
        guided = getattr(self.transformer.time_guidance_embed, "guidance_embedder", None) is not None
        out: list[torch.Tensor | None] = [None] * len(calls)
        packed = []
        for i, c in enumerate(calls):
            if (c.cond.data["guidance"] is not None) != guided:
                raise ValueError(f"calls[{i}].cond {'lacks' if guided else 'has'} a guidance value but this FLUX.2 "
                                 f"transformer {'has' if guided else 'has no'} guidance embedding: encode its prompt "
                                 "with this adapter")
            if c.cond.data["cfg"] and guided:
                out[i] = execution.velocity(c)
            else:
                packed.append(i)
        if packed:
            for i, v in zip(packed, self._packed_call([calls[i] for i in packed], execution, guided)):
                out[i] = v
        return out

    def _packed_call(self, calls: list[VelocityCall], execution: PackedExecution, guided: bool) -> list[torch.Tensor]:
        device, dtype = calls[0].tokens.device, calls[0].tokens.dtype
        tokens, positions, embeds, text_index, t, guidance = [], [], [], [], [], []
        text_lens, image_lens, counts = [], [], []
        for c in calls:
            d = c.cond.data
            texts = [d["embeds"], d["neg_embeds"]] if d["cfg"] else [d["embeds"]]
            b, l, _ = c.tokens.shape
            for e in texts:  # CFG: the call's images twice, prompt then negative prompt
                tokens.append(c.tokens.reshape(-1, c.tokens.shape[-1]))
                positions.append(c.grid.positions.reshape(-1, 2))
                embeds.append(e.reshape(-1, e.shape[-1]))
                text_index.append(torch.arange(e.shape[1], device=device, dtype=torch.float32).repeat(b))
                t.append(c.timestep.reshape(()).expand(b).to(dtype) / 1000)
                if guided:
                    guidance.append(d["guidance"])
                text_lens += [e.shape[1]] * b
                image_lens += [l] * b
            counts.append(b * len(texts))
        tokens, positions, embeds = torch.cat(tokens), torch.cat(positions), torch.cat(embeds)
        text_index, t = torch.cat(text_index), torch.cat(t)
        guidance = torch.cat(guidance) if guided else None
        impl, backend = execution.impl, self.packed_attention_backend
        if not execution.static_layout:
            ex = Packed(HostSegments([text_lens, image_lens], device), backend)
            out = self._forward(ex, tokens[None], embeds[None], *self._ids(positions[None], text_index[None]), t,
                                guidance, impl)
        else:
            n_img, n_txt, n_seg = len(tokens), len(embeds), len(image_lens)
            pad_img, pad_txt = execution.pad("image", n_img) - n_img, execution.pad("text", n_txt) - n_txt
            segs = execution.pad("segments", n_seg + 1)
            kind = static_attention(backend, device, dtype)
            lay = PackedSegments.build([text_lens, image_lens], [pad_txt, pad_img], segs, device, kind)
            per_seg = [t] + ([guidance] if guided else [])
            tensors = [pad_rows(tokens, pad_img), pad_rows(positions, pad_img), pad_rows(embeds, pad_txt),
                       pad_rows(text_index, pad_txt), *[pad_rows(x, segs - n_seg) for x in per_seg], *lay.tensors()]
            k = 5 + guided

            def forward(*ts):  # the flat tensors only (a captured graph replays it for every mix of the same sizes)
                tok, pos, emb, index, tt = ts[:5]
                ex = Packed(PackedSegments.from_tensors(ts[k:], 2, kind), backend)
                return self._forward(ex, tok[None], emb[None], *self._ids(pos[None], index[None]), tt,
                                     ts[5] if guided else None, impl)

            out = execution.run(("flux2", guided, kind, backend), forward, tensors)[:, :n_img]
        result = []
        for c, o in zip(calls, split_calls(out, calls, counts)):
            if c.cond.data["cfg"]:
                text, uncond = o.chunk(2)
                o = uncond + c.cond.data["guidance_scale"] * (text - uncond)
            result.append(o)
        return result

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.flux2.pipeline_flux2 import retrieve_timesteps

        sched = self.scheduler_copy()
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(sched.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len, num_steps)
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps, sched.sigmas.to(self.device)

    # ---- decoding ------------------------------------------------------------------------------------------
    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, C, h, w)`` -> the VAE's latents ``(B, C, h, w)``: the pipelines' batch-norm
        denormalisation (``x * sqrt(running_var + eps) + running_mean`` per packed channel). This is what
        ``Flux2KleinPipeline(output_type="latent")`` returns."""
        vae = self.pipe.vae
        x = patchify(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.device, x.dtype)
        return unpatchify(x * std + mean)

    def decode(self, latents, impl: ModelImpl | None = None):
        vae = self.pipe.vae
        z = self.denormalize(latents).to(module_device(vae), compute_dtype(vae))
        fn = (impl or EAGER).vae_decode(vae)
        return fn(z) if fn is not None else vae.decode(z, return_dict=False)[0]
