"""SD3 Medium pipelines with random weights at benchmark and published size, built from configs with no download.

:func:`build_sd3_pipeline`: ``"full"`` (stable-diffusion-3-medium's published transformer: 24 joint blocks, hidden
1536; the real-size VAE) or ``"small"`` (4 blocks of hidden 256, small VAE); no text encoders (use
:func:`random_embeds`). SD3.5 Large / Medium: :mod:`.sd35`. The tiny pipeline with text encoders is
:func:`ralu_runtime.tiny.build_tiny_sd3_pipeline`.
"""
from __future__ import annotations

import torch

from . import building
from .flux import sd_vae

# transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers
FULL = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=192)
SMALL = dict(FULL, num_layers=4, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
             caption_projection_dim=256, pooled_projection_dim=256, sample_size=64)
VAE_SCALING = (1.5305, 0.0609)  # vae/config.json: scaling and shift factors
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # scheduler/scheduler_config.json
SIZES = ("small", "full")


def build_sd3_pipeline(size: str, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """A ``StableDiffusion3Pipeline`` with random weights of shape ``size`` ("small" or "full") and no text encoders,
    built in ``dtype`` on ``device`` directly (``"meta"``: no memory, for FLOP counting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed; choose one of {SIZES}")
    torch.manual_seed(seed)
    with building(device, dtype):
        vae = sd_vae(size, VAE_SCALING)
        tr = SD3Transformer2DModel(**(FULL if size == "full" else SMALL)).eval()
        pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                        text_encoder_3=None, tokenizer_3=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(pipe, batch: int, text_len: int, *, seed: int = 0, device="cpu", dtype=torch.float32,
                  cfg: bool = True) -> dict:
    """``generate`` keyword arguments: prompt and pooled embeddings (standard normal), with ``cfg`` the negative
    pair too (the pipeline's classifier-free guidance)."""
    c = pipe.transformer.config
    g = torch.Generator("cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    emb = {"prompt_embeds": r(batch, text_len, c.joint_attention_dim),
           "pooled_prompt_embeds": r(batch, c.pooled_projection_dim)}
    if cfg:
        emb["negative_prompt_embeds"] = r(batch, text_len, c.joint_attention_dim)
        emb["negative_pooled_prompt_embeds"] = r(batch, c.pooled_projection_dim)
    return emb
