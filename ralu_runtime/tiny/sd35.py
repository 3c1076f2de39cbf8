"""Stable Diffusion 3.5 (Large and Medium) pipelines with random weights, built from configs with no download.

Both are diffusers' ``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel`` (ralu family "sd3", adapter
:class:`ralu_runtime.adapters.sd3.SD3Adapter`): SD3.5 Large has 38 joint blocks with RMSNorm on q/k; SD3.5 Medium
(MMDiT-X) has 24, the first 13 with a second image-only self-attention, and a 384-cell position table.

* :func:`build_tiny_sd35_pipeline`: toy sizes with every component (two tiny CLIPs and a tiny T5 with byte-level
  tokenizers, so prompts work offline), for tests and the CLI's ``--model tiny-sd35``.
* :func:`build_sd35_pipeline`: ``"small"`` (a CPU latency model) or ``"full"`` (the published transformer config,
  for FLOP counting on ``device="meta"``), text encoders None: use :func:`random_embeds`.
"""
from __future__ import annotations

import torch

from . import building, byte_tokenizer, tiny_clip, tiny_t5, tiny_vae

TEXT_LEN = 77 + 256  # the pipeline's prompt embeddings: 77 CLIP tokens then 256 T5 tokens (max_sequence_length)
VARIANTS = ("large", "medium")

# transformer/config.json of stabilityai/stable-diffusion-3.5-large and -medium as published (the same values as
# diffusers' single-file loader infers from the checkpoints: 38 resp. 24 joint blocks of 64-dim heads, q/k RMSNorm,
# attn2 in blocks 0-12 of Medium, a 192^2 resp. 384^2 position table)
LARGE_FULL = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                  qk_norm="rms_norm")
MEDIUM_FULL = dict(LARGE_FULL, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)))
# the CPU latency models: 4 blocks of hidden 256 with the published position tables and block kinds
LARGE_SMALL = dict(LARGE_FULL, num_layers=4, num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256,
                   pooled_projection_dim=256)
MEDIUM_SMALL = dict(MEDIUM_FULL, num_layers=4, num_attention_heads=4, joint_attention_dim=256,
                    caption_projection_dim=256, pooled_projection_dim=256, dual_attention_layers=(0, 1))
CONFIGS = {("large", "full"): LARGE_FULL, ("medium", "full"): MEDIUM_FULL, ("large", "small"): LARGE_SMALL,
           ("medium", "small"): MEDIUM_SMALL}

# vae/config.json (both releases): AutoencoderKL, 16 latent channels, scaling 1.5305, shift 0.0609, no quant convs
VAE_FULL = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False, sample_size=1024)
VAE_SMALL = dict(VAE_FULL, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
# scheduler/scheduler_config.json (both releases): FlowMatchEulerDiscreteScheduler with a fixed shift of 3.0
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# tiny models: CLIP-L-like (hidden 16) and CLIP-G-like (hidden 32) encoders, pooled 16 + 32 = 48; T5 width 64,
# wider than the two CLIPs' 48 together, as 4096 > 768 + 1280 in the real models (the pipeline pads CLIP to T5's
# width). Position tables keep the published ratio to the training grid (base 32 tokens: Large 96 = 3x as
# 192 / 64, Medium 192 = 6x as 384 / 64).
TINY_CLIP = ((16, 16), (32, 32))
TINY_T5 = 64
TINY = {"large": dict(sample_size=64, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=TINY_T5, caption_projection_dim=32,
                      pooled_projection_dim=sum(p for _, p in TINY_CLIP), out_channels=16, pos_embed_max_size=96,
                      dual_attention_layers=(), qk_norm="rms_norm"),
        "medium": None}
TINY["medium"] = dict(TINY["large"], num_layers=4, pos_embed_max_size=192, dual_attention_layers=(0, 1))


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {VARIANTS}")


def build_tiny_sd35_pipeline(seed: int = 0, *, variant: str = "large", device="cpu", dtype=torch.float32):
    """A StableDiffusion3Pipeline shaped like SD3.5 ``variant`` at toy size: Large 2 joint blocks, Medium 4 (blocks
    0-1 with dual attention, as blocks 0-12 of 24), q/k RMSNorm, hidden 32; tiny VAE, two CLIPs and a T5 with
    byte-level tokenizers; the published scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _check_variant(variant)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TINY[variant]).eval()
    (h1, p1), (h2, p2) = TINY_CLIP
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=tiny_vae(16, 0.0609),
        text_encoder=tiny_clip(True, h1, p1), tokenizer=byte_tokenizer(77),
        text_encoder_2=tiny_clip(True, h2, p2), tokenizer_2=byte_tokenizer(77),
        text_encoder_3=tiny_t5(TINY_T5), tokenizer_3=byte_tokenizer(512), transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_sd35_pipeline(size: str, *, variant: str = "large", device="cpu", dtype=torch.float32, seed: int = 0):
    """SD3.5 ``variant`` with random weights and no text encoders: ``size="small"`` (4 blocks of hidden 256, small
    VAE: CPU latency) or ``"full"`` (the published transformer and VAE configs; ``device="meta"`` builds it without
    memory, for FLOP counting). Built directly in ``dtype`` on ``device``."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    _check_variant(variant)
    if size not in ("small", "full"):
        raise ValueError(f"size={size!r}: choose 'small' or 'full'")
    torch.manual_seed(seed)
    with building(device, dtype):
        transformer = SD3Transformer2DModel(**CONFIGS[(variant, size)]).eval()
        vae = AutoencoderKL(**(VAE_FULL if size == "full" else VAE_SMALL)).eval()
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(pipe, batch: int, text_len: int = TEXT_LEN, *, seed: int = 0, device="cpu", dtype=torch.float32,
                  cfg: bool = True) -> dict:
    """``generate`` keyword arguments for ``pipe``: ``prompt_embeds (batch, text_len, joint_attention_dim)`` and
    ``pooled_prompt_embeds (batch, pooled_projection_dim)``, plus the negative pair with ``cfg`` (SD3.5 runs
    classifier-free guidance by default; without negative embeddings the pipeline would need its text encoders)."""
    cfg_ = pipe.transformer.config
    g = torch.Generator("cpu").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    out = {"prompt_embeds": r(batch, text_len, cfg_.joint_attention_dim),
           "pooled_prompt_embeds": r(batch, cfg_.pooled_projection_dim)}
    if cfg:
        out["negative_prompt_embeds"] = r(batch, text_len, cfg_.joint_attention_dim)
        out["negative_pooled_prompt_embeds"] = r(batch, cfg_.pooled_projection_dim)
    return out
