"""Z-Image pipelines with random weights, built from configs with no download.

* :func:`build_tiny_z_image_pipeline`: the real ``ZImagePipeline`` with a toy ``ZImageTransformer2DModel``
  (hidden 32), a tiny ``AutoencoderKL``, a tiny ``Qwen3Model`` text encoder and a byte-level tokenizer with a
  Qwen3-style chat template set in code, so text prompts work offline (tests, demo).
* :func:`build_z_image_pipeline`: "small" (a CPU latency benchmark model) or "full" (the published 6B transformer
  config, for FLOP counting on ``device="meta"``); no text encoder (use :func:`random_embeds`).
"""
from __future__ import annotations

import torch

from . import TEXT_DIM, VOCAB, building, byte_tokenizer, text_embeds, tiny_vae
from .flux import VAE_SCALING, sd_vae  # Z-Image decodes with the FLUX.1 VAE


# Z-Image(-Turbo) scheduler_config.json (HF model repos Tongyi-MAI/Z-Image(-Turbo)): shift 3, no dynamic shifting.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

# The published transformer/config.json of Z-Image(-Turbo) (6.15 B parameters).
TRANSFORMER_FULL = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                        n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                        rope_theta=256.0, t_scale=1000.0, axes_dims=(32, 48, 48), axes_lens=(1536, 512, 512))
TRANSFORMER_SMALL = dict(TRANSFORMER_FULL, dim=256, n_layers=4, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                         cap_feat_dim=256, axes_dims=(16, 24, 24))

# Qwen3's chat template reduced to what ZImagePipeline uses (one user turn, generation prompt, enable_thinking);
# with enable_thinking=False Qwen3 appends an empty think block, with True (what ZImagePipeline passes) nothing.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\n\n</think>\n\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen3_tokenizer(max_length: int = 512):
    """The byte-level tokenizer of :mod:`ralu_runtime.tiny` with the chat template above."""
    tok = byte_tokenizer(max_length)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _qwen3(hidden: int = TEXT_DIM):
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=None, eos_token_id=2)
    return Qwen3Model(cfg).eval()


def build_tiny_z_image_pipeline(seed: int = 0, *, device="cpu", dtype=torch.float32, num_layers: int = 2,
                                n_refiner_layers: int = 1, latent_channels: int = 16):
    """A ``ZImagePipeline``: 1+1 refiner and 2 main blocks (hidden 32, 2 heads, rope axes (4, 6, 6)), tiny VAE
    (factor 8), tiny Qwen3 (hidden 32) with a byte tokenizer and chat template; the real scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=32, n_layers=num_layers,
        n_refiner_layers=n_refiner_layers, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=TEXT_DIM, rope_theta=256.0, t_scale=1000.0, axes_dims=(4, 6, 6), axes_lens=(1536, 512, 512),
    ).eval()
    with torch.no_grad():  # the pad tokens are zeros at init; make them distinct so tests see where they go
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                          vae=tiny_vae(latent_channels, 0.1159), text_encoder=_qwen3(), tokenizer=qwen3_tokenizer(512),
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_z_image_pipeline(size: str, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """A ``ZImagePipeline`` with random weights of shape ``size`` ("small" or "full") and no text encoder.
    ``device="meta"`` builds it without memory (FLOP counting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    if size not in ("small", "full"):
        raise ValueError(f"size={size!r} is not allowed; choose 'small' or 'full'")
    torch.manual_seed(seed)
    with building(device, dtype):
        vae = sd_vae(size, VAE_SCALING)
        tr = ZImageTransformer2DModel(**(TRANSFORMER_FULL if size == "full" else TRANSFORMER_SMALL)).eval()
        pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                              text_encoder=None, tokenizer=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(pipe, batch: int, text_len: int, *, seed: int = 0, device="cpu", dtype=torch.float32,
                  cfg: bool = False) -> dict:
    """``generate`` keyword arguments with random caption features ``(batch, text_len, cap_feat_dim)``.

    ``cfg=True`` adds ``negative_prompt_embeds`` (Z-Image's default guidance 5.0 runs classifier-free guidance);
    ``cfg=False`` adds ``guidance_scale=0.0`` (no CFG, as Z-Image-Turbo runs), since with embeddings and guidance
    the pipeline needs negative embeddings."""
    emb = text_embeds(batch, text_len, pipe.transformer.config.cap_feat_dim, seed=seed, device=device, dtype=dtype,
                      cfg=cfg)
    return emb if cfg else {**emb, "guidance_scale": 0.0}
