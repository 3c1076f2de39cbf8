"""SD3 adapter (StableDiffusion3Pipeline / SD3Transformer2DModel): patch embedding per token, sin-cos
position embedding evaluated at each token's own position, classifier-free guidance.

SD3 adds a fixed 2-D sin-cos table (centre-cropped to the current token grid) after its patch
embedding. Stages 1 and 3 are plain grids and use the model's native path. In stage 2 the patch
embedding (a conv with kernel = stride = patch, i.e. a linear map of each token's flattened patch) is
applied per token, and the sin-cos formula is evaluated at fractional table indices on the coarse crop.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .base import EAGER, Conditioning, DiTAdapter, ModelImpl, SplitBlocks, TokenGrid


def sd3_joint_block(block, hidden_states, encoder_hidden_states, temb):
    """One ``JointTransformerBlock`` called as the module it is (its processor and hooks run as usual).
    Returns ``(encoder_hidden_states, hidden_states)``; a separate function so a backend can compile it
    without touching the user's module."""
    return block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb)


class SD3Adapter(DiTAdapter):
    """Adapter for diffusers' ``StableDiffusion3Pipeline`` (SD3 / SD3.5 transformers)."""

    family = "sd3"
    default_preset = "3x"
    default_steps = 28
    default_guidance = 7.0
    base_shift = 3.0

    supports_negative_prompt = True

    def __init__(self, pipe, *, weak: bool = False):
        super().__init__(pipe, weak=weak)
        self.transformer = pipe.transformer

    def max_size(self) -> int:
        """The sin-cos position table's side (``pos_embed_max_size`` tokens) in pixels."""
        return int(self.transformer.pos_embed.pos_embed_max_size) * self.patch_size * self.vae_scale_factor

    def embed_dims(self) -> tuple[int, int]:
        cfg = self.transformer.config
        return int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None, num_images_per_prompt=1,
                      guidance_scale, max_sequence_length=None):
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("SD3 needs pooled_prompt_embeds together with prompt_embeds")
        cfg = guidance_scale > 1
        pe, npe, pp, npp = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=num_images_per_prompt, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length or 256,
        )
        b = pe.shape[0]
        if cfg:
            pe, pp = torch.cat([npe, pe], dim=0), torch.cat([npp, pp], dim=0)
        return Conditioning(b, {"embeds": pe, "pooled": pp, "cfg": cfg, "guidance_scale": guidance_scale})

    # ---- position embedding ----------------------------------------------------------------------------
    def sincos_at(self, positions: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Sin-cos embedding ``(B, L, D)`` float32 at ``positions (B, L, 2)`` on the centre crop of ``grid_hw``.

        Same formula and precision (float64, then float32) as the model's table, at any real position.
        """
        from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

        pe = self.transformer.pos_embed
        max_size = pe.pos_embed_max_size
        if grid_hw[0] > max_size or grid_hw[1] > max_size:
            raise ValueError(f"token grid {grid_hw} exceeds the model's pos_embed_max_size={max_size}")
        dim = pe.pos_embed.shape[-1]
        top, left = (max_size - grid_hw[0]) // 2, (max_size - grid_hw[1]) // 2
        scale = (max_size / pe.base_size) * pe.interpolation_scale
        pos = positions.reshape(-1, 2).to(torch.float64)
        rows = ((pos[:, 0] + top) / scale)
        cols = ((pos[:, 1] + left) / scale)
        # diffusers' table: first half from the column coordinate, second half from the row coordinate
        emb = torch.cat([
            get_1d_sincos_pos_embed_from_grid(dim // 2, cols, output_type="pt"),
            get_1d_sincos_pos_embed_from_grid(dim // 2, rows, output_type="pt"),
        ], dim=1)
        return emb.float().view(*positions.shape[:2], dim)

    def embed_tokens(self, tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """Patch embedding plus position embedding of ``tokens (B, L, C p p)`` -> ``(B, L, D)``."""
        pe = self.transformer.pos_embed
        if grid.raster and grid.fine_mask is None:
            latent = self.unpack(tokens, grid.grid_hw[0] * self.patch_size, grid.grid_hw[1] * self.patch_size)
            return pe(latent)
        weight = pe.proj.weight.flatten(1)                      # (D, C p p), same (c, py, px) order as tokens
        hidden = F.linear(tokens, weight, pe.proj.bias)
        if pe.layer_norm:
            hidden = pe.norm(hidden)
        pos = self.sincos_at(grid.positions, grid.grid_hw).to(hidden.device)
        return (hidden + pos).to(hidden.dtype)

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        impl = impl or EAGER
        tr = self.transformer
        cfg = cond.data["cfg"]
        b, l, ct = tokens.shape
        x = torch.cat([tokens, tokens]) if cfg else tokens
        g2 = grid
        if cfg:
            g2 = TokenGrid(torch.cat([grid.positions] * 2), grid.grid_hw,
                           None if grid.fine_mask is None else torch.cat([grid.fine_mask] * 2), grid.raster)
        hidden = self.embed_tokens(x, g2).contiguous()
        temb = tr.time_text_embed(timestep.expand(x.shape[0]), cond.data["pooled"])
        enc = tr.context_embedder(cond.data["embeds"])

        stack = list(tr.transformer_blocks)
        joint = impl.block("sd3_joint", sd3_joint_block)

        def run(state, start, stop):  # blocks [start, stop) on state (encoder, image) hidden states
            e, h = state
            for block in stack[start:stop]:
                e, h = joint(block, h, e, temb)
            return e, h

        def first():
            state = run((enc, hidden), 0, 1)
            return state[1], state

        blocks = SplitBlocks(first, lambda state: run(state, 1, len(stack))[1])
        hidden = self.run_blocks(blocks, hidden, timestep)
        out = tr.proj_out(tr.norm_out(hidden, temb))
        p = self.patch_size
        out = out.view(x.shape[0], l, p, p, -1).permute(0, 1, 4, 2, 3).reshape(x.shape[0], l, -1)
        if cfg:
            uncond, text = out.chunk(2)
            out = uncond + cond.data["guidance_scale"] * (text - uncond)
        return out

    def baseline_schedule(self, num_steps, image_seq_len):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        sched = copy.deepcopy(self.pipe.scheduler)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            kwargs["mu"] = calculate_shift(image_seq_len, sched.config.get("base_image_seq_len", 256),
                                           sched.config.get("max_image_seq_len", 4096),
                                           sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(sched, num_steps, self.device, **kwargs)
        return timesteps, sched.sigmas.to(self.device)
