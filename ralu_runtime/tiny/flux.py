"""FLUX.1-dev pipelines with random weights at benchmark and published size, built from configs with no download.

:func:`build_flux_pipeline`: ``"full"`` (FLUX.1-dev's published transformer: 19 double + 38 single blocks, hidden
3072, 24 heads; the real-size VAE) or ``"small"`` (a FLUX-shaped model small enough for a CPU: 2 + 4 blocks,
hidden 256, small VAE); no text encoders (use :func:`random_embeds`). The tiny pipeline with text encoders is
:func:`ralu_runtime.tiny.build_tiny_flux_pipeline`.
"""
from __future__ import annotations

import torch

from . import building

# transformer/config.json of black-forest-labs/FLUX.1-dev (RALU_DESIGN 7: matches the published config)
FULL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
SMALL = dict(FULL, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
             joint_attention_dim=256, pooled_projection_dim=128, axes_dims_rope=(8, 28, 28))
# vae/config.json: 16 latent channels, scaling 0.3611, shift 0.1159, no quant convs
VAE_FULL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
VAE_SMALL = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
VAE_SCALING = (0.3611, 0.1159)
# scheduler/scheduler_config.json: shift 3.0 with dynamic shifting 0.5 / 1.15 over 256 / 4096 tokens
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
SIZES = ("small", "full")


def sd_vae(size: str, scaling: tuple[float, float]):
    """The FLUX / SD3 ``AutoencoderKL`` shape (16 latent channels, factor 8) at ``size``, with (scaling, shift)."""
    from diffusers import AutoencoderKL

    scale, shift = scaling
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         scaling_factor=scale, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False,
                         **(VAE_FULL if size == "full" else VAE_SMALL)).eval()


def build_flux_pipeline(size: str, *, device="cpu", dtype=torch.float32, seed: int = 0, **transformer_overrides):
    """A ``FluxPipeline`` with random weights of shape ``size`` ("small" or "full") and no text encoders, built in
    ``dtype`` on ``device`` directly (``"meta"``: no memory, for FLOP counting). Seeded: the same ``seed`` gives the
    same weights in every process. ``transformer_overrides``: transformer config keys replacing the shape's (e.g.
    ``num_layers=4, num_single_layers=8``: full width at reduced depth)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed; choose one of {SIZES}")
    torch.manual_seed(seed)
    with building(device, dtype):  # in the target dtype directly: no float32 copy of 12 B parameters
        vae = sd_vae(size, VAE_SCALING)
        tr = FluxTransformer2DModel(**{**(FULL if size == "full" else SMALL), **transformer_overrides}).eval()
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(pipe, batch: int, text_len: int, *, seed: int = 0, device="cpu", dtype=torch.float32,
                  cfg: bool = False) -> dict:
    """``generate`` keyword arguments: ``prompt_embeds`` ``(batch, text_len, joint_attention_dim)`` and
    ``pooled_prompt_embeds`` ``(batch, pooled_projection_dim)``, standard normal (FLUX.1-dev runs no CFG: ``cfg`` is
    accepted for a common signature and ignored)."""
    cfg_ = pipe.transformer.config
    g = torch.Generator("cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return {"prompt_embeds": r(batch, text_len, cfg_.joint_attention_dim),
            "pooled_prompt_embeds": r(batch, cfg_.pooled_projection_dim)}
