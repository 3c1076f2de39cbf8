"""Tiny random FLUX.1 Fill and FLUX.1 control (Canny / Depth) pipelines, built from configs with no download.

The components of :func:`ralu_runtime.tiny.build_tiny_flux_pipeline` (tiny VAE of factor 8 and 16 latent channels,
tiny CLIP and T5, byte-level tokenizers) with a 1+2-block FLUX transformer that takes the conditioning channels:
Fill ``in_channels`` 384 (64 latent + 64 masked-image latent + 256 mask), control 128 (64 + 64 control latent), both
``out_channels`` 64, as the released FLUX.1-Fill-dev / FLUX.1-Canny-dev / FLUX.1-Depth-dev configs.
"""
from __future__ import annotations

import torch


def _build(cls_name: str, extra: int, seed: int, device, dtype):
    import diffusers
    from diffusers import FluxTransformer2DModel

    from . import TEXT_DIM, build_tiny_flux_pipeline

    base = build_tiny_flux_pipeline(seed)
    torch.manual_seed(seed + 1)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64 + extra, out_channels=64, num_layers=1, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).eval()
    parts = {k: v for k, v in base.components.items() if k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                                   "text_encoder_2", "tokenizer_2")}
    pipe = getattr(diffusers, cls_name)(transformer=transformer, **parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_tiny_flux_fill_pipeline(seed: int = 0, *, device="cpu", dtype=torch.float32):
    """A ``FluxFillPipeline`` whose transformer takes 384 input channels (latent, masked-image latent, 8x8 mask)."""
    return _build("FluxFillPipeline", 64 + 256, seed, device, dtype)


def build_tiny_flux_control_pipeline(seed: int = 0, *, device="cpu", dtype=torch.float32):
    """A ``FluxControlPipeline`` whose transformer takes 128 input channels (latent, control-image latent)."""
    return _build("FluxControlPipeline", 64, seed, device, dtype)
