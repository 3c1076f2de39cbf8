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
``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock`` with ``Flux2AttnProcessor`` /
``Flux2ParallelSelfAttnProcessor``.

Refused (:meth:`Flux2Adapter.check_supported`, before any work): other attention processors (custom ones, or
anything that is not diffusers' Flux2 processor or its KV-cache variant used without a cache) and diffusers hook
registries on the blocks (``enable_cache``, block-level group offloading), which running the blocks' layers would
bypass. Reference-image conditioning (the pipelines' ``image=`` argument) is not supported.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..families import FAMILIES
from .base import (EAGER, Conditioning, DiTAdapter, ModelImpl, SplitBlocks, TokenGrid, call_with_hooks, check_blocks,
                   current_cache, named_blocks,
                   scheduler_base_shift)
from .common import apply_rope

QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
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


def split_modulation(mod: torch.Tensor, sets: int):
    """``Flux2Modulation.split``: ``(B, 3 sets D)`` -> ``sets`` triples (shift, scale, gate) of ``(B, 1, D)``."""
    if mod.ndim == 2:
        mod = mod.unsqueeze(1)
    parts = torch.chunk(mod, 3 * sets, dim=-1)
    return tuple(parts[3 * i : 3 * (i + 1)] for i in range(sets))


def _linear3(attn, x, names, fused):
    """Three projections of ``x``: ``attn``'s layers ``names``, or ralu's fused ``(weight, bias)`` of them."""
    if fused is not None:
        return torch.nn.functional.linear(x, fused[0], fused[1]).chunk(3, dim=-1)
    return tuple(getattr(attn, n)(x) for n in names)


def _dispatch(attn, query, key, value):
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    proc = attn.processor
    return dispatch_attention_fn(query, key, value, attn_mask=None, backend=getattr(proc, "_attention_backend", None),
                                 parallel_config=getattr(proc, "_parallel_config", None))


def flux2_attention(attn, hidden_states, encoder_hidden_states, rope, qkv=None, added_qkv=None):
    """diffusers' ``Flux2AttnProcessor`` on ``attn`` (a ``Flux2Attention``) with rotary ``rope = (cos, sin)`` of
    shape ``(T + L, D)`` or per image ``(B, T + L, D)``. Returns ``(image out, text out)``.

    ``qkv`` / ``added_qkv``: ralu's fused ``(weight, bias)`` of to_q/k/v and add_q/k/v_proj, or None (the layers).
    A model whose projections the user fused (``fuse_qkv_projections``) runs its own ``to_qkv`` / ``to_added_qkv``.
    """
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        enc_q, enc_k, enc_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = _linear3(attn, hidden_states, QKV, qkv)
        enc_q, enc_k, enc_v = _linear3(attn, encoder_hidden_states, ADDED_QKV, added_qkv)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    enc_q = attn.norm_added_q(enc_q.unflatten(-1, (-1, attn.head_dim)))
    enc_k = attn.norm_added_k(enc_k.unflatten(-1, (-1, attn.head_dim)))
    enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
    query = apply_rope(torch.cat([enc_q, query], dim=1), *rope)
    key = apply_rope(torch.cat([enc_k, key], dim=1), *rope)
    value = torch.cat([enc_v, value], dim=1)
    out = _dispatch(attn, query, key, value).flatten(2, 3).to(query.dtype)
    text_len = encoder_hidden_states.shape[1]
    enc, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
    return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(enc)


def flux2_double_block(block, hidden_states, encoder_hidden_states, mod_img, mod_txt, rope, qkv=None,
                       added_qkv=None):
    """diffusers' ``Flux2TransformerBlock.forward`` (same operations, same order) with :func:`flux2_attention`;
    ``mod_img`` / ``mod_txt``: the transformer's shared double-stream modulations ``(B, 6 D)``.
    Returns ``(encoder_hidden_states, hidden_states)``."""
    (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = split_modulation(mod_img, 2)
    (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = split_modulation(mod_txt, 2)

    norm_h = (1 + scale_msa) * block.norm1(hidden_states) + shift_msa
    norm_e = (1 + c_scale_msa) * block.norm1_context(encoder_hidden_states) + c_shift_msa
    attn_out, context_attn_out = flux2_attention(block.attn, norm_h, norm_e, rope, qkv, added_qkv)

    hidden_states = hidden_states + gate_msa * attn_out
    norm_h = block.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp
    hidden_states = hidden_states + gate_mlp * block.ff(norm_h)

    encoder_hidden_states = encoder_hidden_states + c_gate_msa * context_attn_out
    norm_e = block.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp) + c_shift_mlp
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp * block.ff_context(norm_e)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def flux2_single_block(block, hidden_states, mod, rope):
    """diffusers' ``Flux2SingleTransformerBlock.forward`` on the joined [text, image] stream ``hidden_states``
    (same operations, same order, ``Flux2ParallelSelfAttnProcessor`` inlined); ``mod``: the shared single-stream
    modulation ``(B, 3 D)``. Returns the joined stream."""
    shift, scale, gate = split_modulation(mod, 1)[0]
    norm_x = (1 + scale) * block.norm(hidden_states) + shift

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
    out = _dispatch(attn, query, key, value).flatten(2, 3).to(query.dtype)
    out = attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))

    hidden_states = hidden_states + gate * out
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states


def _is_klein(pipe) -> bool:
    return any(cls.__name__ == "Flux2KleinPipeline" for cls in type(pipe).__mro__)


class Flux2Adapter(DiTAdapter):
    """Adapter for diffusers' ``Flux2Pipeline`` (family "flux2": 50 steps, embedded guidance 4.0) and
    ``Flux2KleinPipeline`` (``is_distilled=True``: family "flux2-klein", 4 steps, no guidance; ``False``: family
    "flux2", 50 steps, true CFG at guidance 4.0 with a negative prompt)."""

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

    def embed_dims(self) -> tuple[int, None]:
        return int(self.transformer.config.joint_attention_dim), None

    def preset_base_shift(self, height: int, width: int) -> float:
        """exp(mu) of the pipeline's own ``compute_empirical_mu`` at the fine token count of ``height`` x ``width``
        and the default step count (50, or 4 for step-distilled klein)."""
        blk = self.patch_size * self.vae_scale_factor
        seq_len = (int(height) // blk) * (int(width) // blk)
        return scheduler_base_shift(self.pipe.scheduler.config, seq_len,
                                    mu=compute_empirical_mu(seq_len, self.default_steps))

    # ---- geometry ------------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return 2

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

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
        cfg = self.supports_negative_prompt and guidance_scale > 1
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
    def rotary(self, grid: TokenGrid, text_len: int):
        """Per-image rotary ``(cos, sin)`` of shape ``(B, T + L, D)`` float32 from the model's ``pos_embed``: text
        ids ``(0, 0, 0, i)`` then image ids ``(0, row, col, 0)`` at the grid's (possibly fractional) positions."""
        b, l, _ = grid.positions.shape
        dev = grid.positions.device
        ids = torch.zeros(b, text_len + l, 4, device=dev, dtype=torch.float32)
        ids[:, :text_len, 3] = torch.arange(text_len, device=dev, dtype=torch.float32)
        ids[:, text_len:, 1:3] = grid.positions
        cos, sin = self.transformer.pos_embed(ids.reshape(-1, 4))
        return cos.view(b, text_len + l, -1), sin.view(b, text_len + l, -1)

    def _forward(self, tokens, grid, timestep, embeds, guidance, impl):
        """One transformer pass (the model's forward with per-image positions): ``(B, L, 128)`` velocities."""
        tr = self.transformer
        b = tokens.shape[0]
        x = tokens.to(self.dtype)
        t = timestep.expand(b).to(tokens.dtype) / 1000        # the pipeline's timestep / 1000
        t = t.to(x.dtype) * 1000                               # the transformer's .to(hidden dtype) * 1000
        g = None if guidance is None else guidance.to(x.dtype) * 1000
        temb = tr.time_guidance_embed(t, g)
        mod_img = tr.double_stream_modulation_img(temb)
        mod_txt = tr.double_stream_modulation_txt(temb)
        mod_single = tr.single_stream_modulation(temb)
        hidden = tr.x_embedder(x)
        enc = tr.context_embedder(embeds)
        text_len = enc.shape[1]
        rope = self.rotary(grid, text_len)  # (B, T + L, D) always: one graph for all stages when compiled

        double = impl.block("flux2_double", flux2_double_block)
        single = impl.block("flux2_single", flux2_single_block)
        doubles = [(blk, (impl.fused(blk.attn, QKV), impl.fused(blk.attn, ADDED_QKV))) for blk in tr.transformer_blocks]
        singles = list(tr.single_transformer_blocks)
        nd = len(doubles)

        def run(state, start, stop):  # blocks [start, stop); state (text, image), or (None, joined) in single blocks
            e, h = state
            for i in range(start, stop):
                if i < nd:
                    blk, fused = doubles[i]
                    args = (blk, h, e, mod_img, mod_txt, rope, *fused)
                    if blk._forward_hooks or blk._forward_pre_hooks:
                        e, h = call_with_hooks(blk, double, args, dict(
                            hidden_states=h, encoder_hidden_states=e, temb_mod_img=mod_img, temb_mod_txt=mod_txt,
                            image_rotary_emb=rope))
                    else:
                        e, h = double(*args)
                    continue
                if e is not None:
                    h, e = torch.cat([e, h], dim=1), None
                blk = singles[i - nd]
                args = (blk, h, mod_single, rope)
                if blk._forward_hooks or blk._forward_pre_hooks:
                    h = call_with_hooks(blk, single, args, dict(hidden_states=h, encoder_hidden_states=None,
                                                                temb_mod=mod_single, image_rotary_emb=rope))
                else:
                    h = single(*args)
            return e, h

        def image(state):
            e, h = state
            return h if e is not None else h[:, text_len:]

        def first():
            state = run((enc, hidden), 0, 1)
            return image(state), state

        blocks = SplitBlocks(first, lambda state: image(run(state, 1, nd + len(singles))))
        hidden = self.run_blocks(blocks, hidden, timestep)
        return tr.proj_out(tr.norm_out(hidden, temb))

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        impl = impl or EAGER
        d = cond.data
        if not d["cfg"]:
            return self._forward(tokens, grid, timestep, d["embeds"], d["guidance"], impl)
        pos, neg = d["embeds"], d["neg_embeds"]
        if pos.shape[1] == neg.shape[1]:  # one pass on the batch [prompt, negative]
            both = TokenGrid(torch.cat([grid.positions] * 2), grid.grid_hw,
                             None if grid.fine_mask is None else torch.cat([grid.fine_mask] * 2), grid.raster)
            text, uncond = self._forward(torch.cat([tokens, tokens]), both, timestep, torch.cat([pos, neg]),
                                         None, impl).chunk(2)
        else:
            if current_cache() is not None:
                raise ValueError("a feature cache needs prompt and negative prompt embeddings of the same length")
            text = self._forward(tokens, grid, timestep, pos, None, impl)
            uncond = self._forward(tokens, grid, timestep, neg, None, impl)
        return uncond + d["guidance_scale"] * (text - uncond)

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.flux2.pipeline_flux2 import retrieve_timesteps

        sched = copy.deepcopy(self.pipe.scheduler)
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
        p = next(vae.parameters())
        z = self.denormalize(latents).to(p.device, p.dtype)
        fn = (impl or EAGER).vae_decode(vae)
        return fn(z) if fn is not None else vae.decode(z, return_dict=False)[0]
