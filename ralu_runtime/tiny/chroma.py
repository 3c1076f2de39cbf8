"""Chroma pipelines with random weights, built from configs with no download.

* :func:`build_tiny_chroma_pipeline`: the real ``ChromaPipeline`` with a 1 + 2-block transformer (hidden 32), a tiny
  VAE, a tiny T5 encoder and the in-memory byte tokenizer (prompts work offline); a whole generate takes seconds on
  a CPU.
* :func:`build_chroma_pipeline`: ``"small"`` (a CPU latency-benchmark shape) or ``"full"`` (Chroma1-HD's published
  8.9 B transformer config, for FLOP counting on ``device="meta"``); no text encoder (give prompt embeddings).

Scheduler: Chroma1-HD's ``scheduler_config.json`` as published (the same values as FLUX.1-dev's):
``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)``.
"""
from __future__ import annotations

import torch

from . import building, text_embeds
from .flux import VAE_SCALING, sd_vae  # Chroma uses FLUX.1's VAE unchanged


# Chroma1-HD transformer/config.json (ChromaTransformer2DModel; also diffusers' defaults)
CHROMA_FULL = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                   approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)
CHROMA_SMALL = dict(CHROMA_FULL, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                    joint_attention_dim=256, axes_dims_rope=(8, 28, 28), approximator_hidden_dim=512,
                    approximator_layers=2)


def chroma_scheduler():
    """Chroma1-HD's scheduler (values from its published scheduler_config.json)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def build_tiny_chroma_pipeline(seed: int = 0, *, device="cpu", dtype=torch.float32, num_layers: int = 1,
                               num_single_layers: int = 2, latent_channels: int = 16):
    """A ChromaPipeline with a ``num_layers`` + ``num_single_layers``-block transformer (2 heads x 16, text dim 32,
    approximator 32 channels / hidden 32 / 2 layers), tiny VAE (factor 8), tiny T5 and the byte tokenizer."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    from . import TEXT_DIM, byte_tokenizer, tiny_t5, tiny_vae

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=32, approximator_hidden_dim=32, approximator_layers=2,
    ).eval()
    pipe = ChromaPipeline(scheduler=chroma_scheduler(), vae=tiny_vae(latent_channels, 0.1159), text_encoder=tiny_t5(),
                          tokenizer=byte_tokenizer(512), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_chroma_pipeline(size: str, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """A ChromaPipeline with random weights of shape ``size``: "small" (hidden 256, 2 + 4 blocks, small VAE) or
    "full" (Chroma1-HD: 19 + 38 blocks, 24 heads x 128, FLUX.1's VAE); no text encoder. Built in ``dtype`` on
    ``device`` directly (``"meta"``: no memory, for FLOP counting)."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    if size not in ("small", "full"):
        raise ValueError(f"size={size!r} is not allowed; choose 'small' or 'full'")
    torch.manual_seed(seed)
    with building(device, dtype):
        vae = sd_vae(size, VAE_SCALING)
        tr = ChromaTransformer2DModel(**(CHROMA_FULL if size == "full" else CHROMA_SMALL)).eval()
        pipe = ChromaPipeline(scheduler=chroma_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                              transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(pipe, batch: int, text_len: int, *, seed: int = 0, device="cpu", dtype=torch.float32,
                  cfg: bool = False) -> dict:
    """``generate`` keyword arguments: ``prompt_embeds`` ``(batch, text_len, joint_attention_dim)`` and its
    ``prompt_embeds_mask`` ``(batch, text_len)`` in ``dtype`` like the pipeline's own T5 mask (the first half of
    the tokens valid: a prompt plus its one unmasked padding token; the rest padding); with ``cfg`` the negative
    pair too. Chroma always runs with a text mask, so benchmarks should too."""
    valid = max(1, text_len // 2)
    mask = (torch.arange(text_len) < valid).to(dtype).expand(batch, -1).contiguous()
    return text_embeds(batch, text_len, pipe.transformer.config.joint_attention_dim, seed=seed, device=device,
                       dtype=dtype, cfg=cfg, mask=mask)
