"""Qwen-Image pipelines with random weights, built from configs with no download.

* :func:`build_tiny_qwen_image_pipeline`: diffusers' ``QwenImagePipeline`` with a 2-block
  ``QwenImageTransformer2DModel`` (hidden 32), a tiny ``AutoencoderKLQwenImage`` (16 latent channels, factor 8),
  transformers' real ``Qwen2_5_VLForConditionalGeneration`` at toy size (hidden 32, 2 layers, a 1-block vision
  tower the text path never runs) and a real ``Qwen2Tokenizer`` built in memory: byte-level BPE whose merges spell
  the words of the pipeline's prompt template, so the template's system prefix is exactly
  ``prompt_template_encode_start_idx`` = 34 tokens, as with Qwen's own tokenizer (text prompts work offline and
  the pipeline drops exactly the template, not part of the prompt).
* :func:`build_qwen_image_pipeline`: "small" (CPU latency model: 4 blocks of 2 x 128 heads, small VAE) and
  "full" (the published Qwen-Image transformer: 60 blocks, 24 x 128 heads, text dim 3584, and the published VAE
  config; build it on ``device="meta"`` for FLOP counting). No text encoder: use prompt embeddings
  (:func:`random_embeds`).

Every pipeline gets Qwen-Image's published scheduler config (:data:`SCHEDULER_CONFIG`).
"""
from __future__ import annotations

import re

import torch

from . import building, byte_to_unicode, text_embeds

# Qwen-Image's native square size is 1328 px, which is not a multiple of RALU's 32-px coarse block (VAE factor 8
# x patch 2 x 2); 1344 is the nearest multiple (84 x 84 fine tokens)
TEXT_DIM = 32   # the tiny text encoder's hidden size (= the tiny transformer's joint_attention_dim)

# Qwen/Qwen-Image scheduler/scheduler_config.json (the model card's Hugging Face repo), as published
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                        time_shift_type="exponential")

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def qwen_tokenizer(template: str, max_length: int = 1024 + 34):
    """transformers' ``Qwen2Tokenizer`` (Qwen's pre-tokenizer regex, byte-level BPE) with an in-memory vocabulary:
    the 256 byte symbols (id = byte), one chain of merges per word of ``template`` (every prefix of the word a
    token, so each template word is one token as in Qwen's vocabulary), then the specials ``<|endoftext|>`` (pad),
    ``<|im_start|>``, ``<|im_end|>``. Any other text falls back to bytes and partial words."""
    from transformers import Qwen2Tokenizer

    sym = byte_to_unicode()
    vocab = {sym[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    probe = Qwen2Tokenizer(vocab=dict(vocab), merges=[])
    segments = re.split("|".join(re.escape(s) for s in SPECIALS), template.format(""))
    for segment in segments:  # the text between special tokens, pre-tokenized as the tokenizer will
        for piece, _span in probe.backend_tokenizer.pre_tokenizer.pre_tokenize_str(segment):
            for i in range(2, len(piece) + 1):
                if piece[:i] not in vocab:
                    vocab[piece[:i]] = len(vocab)
                    merges.append((piece[: i - 1], piece[i - 1]))
    for special in SPECIALS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length, padding_side="right",
                         additional_special_tokens=list(SPECIALS[1:]))
    return tok


def _text_encoder(vocab_size: int, pad_id: int, hidden: int = TEXT_DIM):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
                bos_token_id=None, eos_token_id=pad_id, pad_token_id=pad_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab_size - 1,
                           video_token_id=vocab_size - 1, vision_start_token_id=vocab_size - 1,
                           vision_end_token_id=vocab_size - 1)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def build_tiny_qwen_image_pipeline(seed: int = 0, *, device="cpu", dtype=torch.float32, num_layers: int = 2):
    """A ``QwenImagePipeline`` with a ``num_layers``-block transformer (2 heads x 16, RoPE axes (4, 6, 6), text dim
    32), a tiny VAE (16 latent channels, factor 8, the published latents_mean / latents_std), a toy Qwen2.5-VL text
    encoder and an offline Qwen2 tokenizer (see the module docstring); float32 on ``device`` unless ``dtype``."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    pipe = QwenImagePipeline(scheduler=_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    tok = qwen_tokenizer(pipe.prompt_template_encode)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    n_prefix = len(tok(prefix).input_ids)
    if n_prefix != pipe.prompt_template_encode_start_idx:  # pragma: no cover - a diffusers template change
        raise RuntimeError(f"the tiny Qwen tokenizer spells the template prefix in {n_prefix} tokens, the pipeline "
                           f"drops {pipe.prompt_template_encode_start_idx}")
    encoder = _text_encoder(len(tok), tok.pad_token_id)
    pipe.register_modules(text_encoder=encoder, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


SMALL = dict(num_layers=4, attention_head_dim=128, num_attention_heads=2, joint_attention_dim=3584,
             axes_dims_rope=(16, 56, 56))
FULL = dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
            axes_dims_rope=(16, 56, 56))  # Qwen/Qwen-Image transformer/config.json


def build_qwen_image_pipeline(size: str = "small", *, device="cpu", dtype=torch.float32, seed: int = 0):
    """A ``QwenImagePipeline`` with random weights of the given shape and no text encoder / tokenizer (use
    :func:`random_embeds`). ``size``: "small" (CPU latency model) or "full" (the published 20 B transformer and
    VAE configs; ``device="meta"`` builds it without memory). Built directly in ``dtype`` on ``device``."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    if size not in ("small", "full"):
        raise ValueError(f"size={size!r}: use 'small' or 'full'")
    torch.manual_seed(seed)
    with building(device, dtype):
        tr = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16,
                                         **(FULL if size == "full" else SMALL)).eval()
        if size == "full":
            vae = AutoencoderKLQwenImage().eval()  # the published VAE config is diffusers' default
        else:
            vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1).eval()
        pipe = QwenImagePipeline(scheduler=_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                 transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(pipe, batch: int, text_len: int, *, seed: int = 0, device="cpu", dtype=torch.float32,
                  cfg: bool = False) -> dict:
    """``generate`` keyword arguments: ``prompt_embeds (batch, text_len, joint_attention_dim)`` with an all-ones
    ``prompt_embeds_mask (batch, text_len)`` (int64, as the pipeline's encoder makes), plus the negative pair when
    ``cfg`` (true CFG runs only with a negative prompt). Deterministic per ``seed`` (drawn on the CPU; on
    ``device="meta"`` only shapes)."""
    return text_embeds(batch, text_len, int(pipe.transformer.config.joint_attention_dim), seed=seed, device=device,
                       dtype=dtype, cfg=cfg, mask=torch.ones(batch, text_len, dtype=torch.long))
