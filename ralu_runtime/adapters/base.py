"""The model-adapter interface: everything the RALU sampler needs from a diffusion transformer.

An adapter knows its model family (how tokens are packed, how positions enter the model, how the
prompt is encoded, how latents are decoded) and nothing of the sampler's stages. A new DiT is one
file implementing :class:`DiTAdapter`.

Conventions: tokens are ``(B, L, C_tok)`` with ``C_tok = latent_channels * patch_size**2`` in
``(channel, py, px)`` order; latents are ``(B, latent_channels, h, w)``; velocities follow diffusers'
flow-matching convention ``v = noise - data`` with ``x_sigma = (1 - sigma) * data + sigma * noise``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TokenGrid:
    """Where the tokens of one forward pass sit.

    positions: ``(B, L, 2)`` float32 ``(row, col)`` in units of the cells of ``grid_hw``.
    grid_hw: ``(rows, cols)`` of the token grid the positions refer to (the coarse grid in RALU stages 1
        and 2, the fine grid in stage 3 and in the full-resolution baseline).
    fine_mask: ``(B, L)`` bool, True for tokens one level finer than ``grid_hw`` (stage-2 children);
        None when every token is at the grid's own resolution.
    raster: True when the tokens are exactly the grid in raster order (stage 1, stage 3, baseline), so an
        adapter may use the model's native full-grid path.
    """

    positions: torch.Tensor
    grid_hw: tuple[int, int]
    fine_mask: torch.Tensor | None = None
    raster: bool = False


class SplitBlocks:
    """A transformer block stack split after its first block, for first-block caches.

    ``first()`` runs block 0 and returns ``(image hidden after block 0, state)``; ``rest(state)`` runs the other
    blocks and returns the final image hidden states. Calling the object runs both (the whole stack), so it
    can be passed wherever a plain ``blocks_fn`` is expected.
    """

    def __init__(self, first, rest):
        self.first, self.rest = first, rest

    def __call__(self):
        return self.rest(self.first()[1])


@dataclass
class Conditioning:
    """Encoded prompts of a batch of ``batch`` images; ``data`` is adapter-specific."""

    batch: int
    data: dict[str, Any]


class DiTAdapter(ABC):
    """Base class of model adapters.

    Class attributes a subclass sets: ``family`` (preset family name), ``default_steps`` and
    ``default_guidance`` (the pipeline's own defaults), ``default_preset`` (preset used for speedup="default"), ``base_shift`` (h_ori, the model's timestep shift
    used by NT-Matching).
    """

    family: str = ""
    default_preset: str = "7x"
    default_steps: int = 28
    default_guidance: float = 3.5
    base_shift: float = 3.0

    def __init__(self, pipe):
        self.pipe = pipe
        self.feature_cache = None  # optional ralu_runtime cache object (temporal acceleration), see run_blocks

    # ---- temporal-cache hooks ----------------------------------------------------------------------------
    def begin_stage(self) -> None:
        """Called by the sampler at the start of every stage: the token set changes, caches are invalid."""
        if self.feature_cache is not None:
            self.feature_cache.reset()

    def run_blocks(self, blocks_fn, hidden: torch.Tensor, timestep: torch.Tensor):
        """Run the transformer's block stack ``blocks_fn()`` -> image hidden states, through the cache if set.

        ``blocks_fn`` may be a :class:`SplitBlocks` (first block / remaining blocks), which first-block caches need.
        """
        if self.feature_cache is None:
            return blocks_fn()
        return self.feature_cache(blocks_fn, hidden, timestep)

    # ---- geometry ------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def patch_size(self) -> int:
        """Latent pixels per token side."""

    @property
    @abstractmethod
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel."""

    @property
    @abstractmethod
    def latent_channels(self) -> int: ...

    @property
    def token_channels(self) -> int:
        return self.latent_channels * self.patch_size**2

    @property
    def coarse_block_px(self) -> int:
        """Image pixels per side of one coarse (stage-1) token: height and width must be multiples."""
        return 2 * self.patch_size * self.vae_scale_factor

    def _first_parameter(self):
        """The transformer's first parameter, or None where diffusers hooks (e.g. group offloading) decide the
        execution device. diffusers' own ``.device`` / ``.dtype`` walk every submodule looking for offload hooks:
        ~10 ms per call on FLUX.1-dev, read several times per image, so the plain case takes this shortcut."""
        tr = self.pipe.transformer
        if getattr(tr, "_diffusers_hook", None) is not None:
            return None
        return next(tr.parameters(), None)

    @property
    def device(self) -> torch.device:
        p = self._first_parameter()
        return p.device if p is not None else self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        p = self._first_parameter()
        return p.dtype if p is not None and p.is_floating_point() else self.pipe.transformer.dtype

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless height and width are positive multiples of :attr:`coarse_block_px`."""
        blk = self.coarse_block_px
        for name, val in (("height", height), ("width", width)):
            if not isinstance(val, (int, np.integer)) or val <= 0 or val % blk:
                raise ValueError(
                    f"{name}={val} is not allowed: RALU needs a positive multiple of {blk} pixels for this model "
                    f"(VAE factor {self.vae_scale_factor} x patch {self.patch_size} x 2 for the coarse stage)"
                )

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    # ---- tokens --------------------------------------------------------------------------------------
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, (h/p)(w/p), C p p)`` tokens in raster order."""
        b, c, h, w = latents.shape
        p = self.patch_size
        x = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of :meth:`pack`: raster tokens -> ``(B, C, h, w)`` latents."""
        b, _, ct = tokens.shape
        p = self.patch_size
        c = ct // (p * p)
        x = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    # ---- model ---------------------------------------------------------------------------------------
    @abstractmethod
    def encode_prompt(self, prompt, negative_prompt, *, prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                      num_images_per_prompt: int = 1, guidance_scale: float, max_sequence_length: int | None = None
                      ) -> Conditioning:
        """Encode prompts (or take embeddings) for ``batch = len(prompts) * num_images_per_prompt`` images."""

    def prepare_noise(self, batch: int, height: int, width: int, generators, dtype) -> torch.Tensor:
        """Full-resolution latent noise ``(B, C, h, w)``, drawn exactly like the diffusers pipeline does."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = self.latent_hw(height, width)
        return randn_tensor((batch, self.latent_channels, h, w), generator=generators, device=self.device, dtype=dtype)

    @abstractmethod
    def velocity(self, tokens: torch.Tensor, grid: TokenGrid, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Flow velocity ``(B, L, C_tok)`` for tokens at ``timestep = 1000 * sigma`` (0-dim float32 tensor)."""

    @abstractmethod
    def baseline_schedule(self, num_steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The diffusers pipeline's own ``(timesteps (N,), sigmas (N+1,))`` float32 for a full-resolution run."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` -> images ``(B, 3, 8h, 8w)`` float in about [-1, 1]."""
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]

    def postprocess(self, images: torch.Tensor, output_type: str):
        """Images in [-1, 1] -> the requested ``output_type`` ("pil", "np", "pt")."""
        return self.pipe.image_processor.postprocess(images, output_type=output_type)
