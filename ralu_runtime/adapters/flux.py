"""FLUX adapter (FluxPipeline / FluxTransformer2DModel): 2x2 latent patches, RoPE position ids per token.

RALU stage 2 gives every image its own token positions, so rotary embeddings are per image
``(B, L, D)``; diffusers' FluxAttnProcessor only broadcasts ``(L, D)``. The adapter therefore runs the
transformer's blocks itself with :class:`BatchedRopeFluxAttnProcessor`, which is numerically the same
as diffusers' processor when all images share positions.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from .base import Conditioning, DiTAdapter, SplitBlocks, TokenGrid


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


class BatchedRopeFluxAttnProcessor:
    """FLUX attention processor accepting per-image rotary embeddings ``(B, S, D)``."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query = apply_rope(query, cos, sin)
            key = apply_rope(key, cos, sin)
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxAdapter(DiTAdapter):
    """Adapter for diffusers' ``FluxPipeline`` (FLUX.1-dev with guidance embedding, FLUX.1-schnell without)."""

    family = "flux"
    default_steps = 28
    default_guidance = 3.5
    base_shift = 3.0

    def __init__(self, pipe):
        super().__init__(pipe)
        self.transformer = pipe.transformer
        if not getattr(self.transformer.config, "guidance_embeds", True):
            self.family = "flux-schnell"
            self.default_preset = "4step"
            self.default_steps = 4
            self.base_shift = 1.0
        self._install_processors()

    def _install_processors(self) -> None:
        for module in self.transformer.modules():
            proc = getattr(module, "processor", None)
            if proc is not None and type(proc).__name__ == "FluxAttnProcessor":
                new = BatchedRopeFluxAttnProcessor()
                new._attention_backend = getattr(proc, "_attention_backend", None)
                new._parallel_config = getattr(proc, "_parallel_config", None)
                module.processor = new

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

    def velocity(self, tokens, grid, timestep, cond):
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
        rope = self.rotary(grid, enc.shape[1])

        stack = list(tr.transformer_blocks) + list(tr.single_transformer_blocks)

        def run(state, start, stop):  # blocks [start, stop) on state (encoder, image) hidden states
            e, h = state
            for block in stack[start:stop]:
                e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
            return e, h

        def first():
            state = run((enc, hidden), 0, 1)
            return state[1], state

        blocks = SplitBlocks(first, lambda state: run(state, 1, len(stack))[1])
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
