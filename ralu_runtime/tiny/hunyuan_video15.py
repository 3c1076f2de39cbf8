"""HunyuanVideo 1.5 text-to-video pipelines with random weights, built from configs with no download.

* :func:`build_tiny_hunyuan_video15_pipeline`: diffusers' ``HunyuanVideo15Pipeline`` with a 2-block
  ``HunyuanVideo15Transformer3DModel`` (2 heads x 16, RoPE axes (4, 6, 6)), a tiny ``AutoencoderKLHunyuanVideo15``
  (4 latent channels, spatial factor 16, temporal factor 4, the published scaling factor), transformers' real
  ``Qwen2_5_VLTextModel`` at toy size (hidden 32, 2 layers) with an offline ``Qwen2Tokenizer`` (byte-level BPE whose
  merges spell the pipeline's system prompt, plus a Qwen2.5 chat template set in code) and a real
  ``T5EncoderModel`` (d_model 16, 1 layer) with transformers' ``ByT5Tokenizer`` (needs no files) for the glyph
  texts. Text prompts work offline. The tiny Qwen tokenizer spells the chat-template prefix in a different number of
  tokens than Qwen's own (108); the builder sets the pipeline's ``prompt_template_encode_start_idx`` to the tiny
  tokenizer's prefix length so that exactly the template is dropped, as with the real tokenizer.
* :func:`build_hunyuan_video15_pipeline`: "small" (CPU latency model) and "full" (the published 8.3 B 720p t2v
  transformer: 54 blocks, 16 x 128 heads, Qwen2.5-VL-7B text dim 3584, byT5 1472, and the published VAE config;
  build it on ``device="meta"`` for FLOP counting). No text encoders: use :func:`random_embeds`.

Every pipeline gets the published 720p t2v scheduler config (:data:`SCHEDULER_CONFIG`) and a
``ClassifierFreeGuidance`` guider at the published guidance scale 6.0.
"""
from __future__ import annotations

import re

import torch

from . import building, text_embeds

# the pipeline's own default for the 720p model (target_size 960, 16:9 bucket) is 720 x 1280; 720 px is not a multiple
# of RALU's 32-px coarse block (VAE factor 16 x patch 1 x 2), 704 is the nearest below
TEXT_DIM = 32         # the tiny Qwen text encoder's hidden size (= the tiny transformer's text_embed_dim)
TEXT_2_DIM = 16       # the tiny byT5 encoder's d_model (= text_embed_2_dim)

# hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v scheduler/scheduler_config.json as published (model
# card: flow shift 9 for 720p t2v, 5 for 480p); static shift, no dynamic shifting
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=9.0, use_dynamic_shifting=False)
GUIDANCE_SCALE = 6.0  # the published guider config (ClassifierFreeGuidance, guidance_scale 6.0)

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2.5's chat template (the parts the pipeline's system + user conversation with add_generation_prompt uses)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def _guider():
    from diffusers import ClassifierFreeGuidance

    return ClassifierFreeGuidance(guidance_scale=GUIDANCE_SCALE)


def _qwen_tokenizer(system_message: str, max_length: int):
    """transformers' ``Qwen2Tokenizer`` with an in-memory vocabulary: 256 byte symbols, merges making every word of
    the chat prefix (system message, role names) one token, the specials; :data:`CHAT_TEMPLATE` as chat template."""
    from transformers import Qwen2Tokenizer

    from . import byte_to_unicode

    sym = byte_to_unicode()
    vocab = {sym[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    probe = Qwen2Tokenizer(vocab=dict(vocab), merges=[])
    text = f"<|im_start|>system\n{system_message}<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    for segment in re.split("|".join(re.escape(s) for s in SPECIALS), text):
        for piece, _span in probe.backend_tokenizer.pre_tokenizer.pre_tokenize_str(segment):
            for i in range(2, len(piece) + 1):
                if piece[:i] not in vocab:
                    vocab[piece[:i]] = len(vocab)
                    merges.append((piece[: i - 1], piece[i - 1]))
    for special in SPECIALS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length, padding_side="right",
                         additional_special_tokens=list(SPECIALS[1:]))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _qwen_encoder(vocab_size: int, pad_id: int):
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    cfg = Qwen2_5_VLTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=2 * TEXT_DIM,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               max_position_embeddings=2048,
                               rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                "rope_theta": 1000000.0},
                               bos_token_id=None, eos_token_id=pad_id, pad_token_id=pad_id)
    return Qwen2_5_VLTextModel(cfg).eval()


def _byt5():
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tok = ByT5Tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=TEXT_2_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return tok, T5EncoderModel(cfg).eval()


def build_tiny_hunyuan_video15_pipeline(seed: int = 0, *, device="cpu", dtype=torch.float32, num_layers: int = 2):
    """A ``HunyuanVideo15Pipeline`` with a ``num_layers``-block transformer (hidden 32, 4 latent channels, t2v input
    of 2 x 4 + 1 channels), a tiny VAE (factor 16 spatial, 4 temporal), toy Qwen2.5-VL text and byT5 encoders with
    offline tokenizers (see the module docstring); float32 on ``device`` unless ``dtype``."""
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=num_layers,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_DIM,
        text_embed_2_dim=TEXT_2_DIM, image_embed_dim=16, rope_axes_dim=(4, 6, 6), target_size=64, task_type="t2v",
    ).eval()
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1).eval()
    tok2, enc2 = _byt5()
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                  scheduler=_scheduler(), text_encoder_2=enc2, tokenizer_2=tok2, guider=_guider())
    tok = _qwen_tokenizer(pipe.system_message, pipe.tokenizer_max_length + 256)
    prefix = tok.apply_chat_template([{"role": "system", "content": pipe.system_message},
                                      {"role": "user", "content": "@@"}], tokenize=False,
                                     add_generation_prompt=True).split("@@")[0]
    # the template's system prefix in the tiny tokenizer (Qwen's own: 108 tokens, the pipeline's default crop)
    pipe.prompt_template_encode_start_idx = len(tok(prefix).input_ids)
    pipe.register_modules(text_encoder=_qwen_encoder(len(tok), tok.pad_token_id), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


SMALL = dict(num_attention_heads=2, attention_head_dim=128, num_layers=4, num_refiner_layers=1)
# hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_t2v transformer/config.json (as published: 54 dual-stream
# blocks, 16 x 128 heads, 2 refiner blocks, patch 1, Qwen2.5-VL-7B text 3584, byT5 glyph 1472, SigLIP 1152)
FULL = dict(num_attention_heads=16, attention_head_dim=128, num_layers=54, num_refiner_layers=2)
COMMON = dict(in_channels=65, out_channels=32, mlp_ratio=4.0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
              text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152, rope_theta=256.0,
              rope_axes_dim=(16, 56, 56), target_size=960, task_type="t2v")


def build_hunyuan_video15_pipeline(size: str = "small", *, device="cpu", dtype=torch.float32, seed: int = 0):
    """A ``HunyuanVideo15Pipeline`` with random weights of the given shape and no text encoders / tokenizers (use
    :func:`random_embeds`). ``size``: "small" (CPU latency model) or "full" (the published 8.3 B transformer and VAE;
    ``device="meta"`` builds it without memory). Built directly in ``dtype`` on ``device``."""
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel

    if size not in ("small", "full"):
        raise ValueError(f"size={size!r}: use 'small' or 'full'")
    torch.manual_seed(seed)
    with building(device, dtype):
        tr = HunyuanVideo15Transformer3DModel(**COMMON, **(FULL if size == "full" else SMALL)).eval()
        if size == "full":
            vae = AutoencoderKLHunyuanVideo15().eval()  # the published VAE config is diffusers' default
        else:
            vae = AutoencoderKLHunyuanVideo15(block_out_channels=(16, 16, 32, 32, 32), layers_per_block=1).eval()
        pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=vae,
                                      scheduler=_scheduler(), text_encoder_2=None, tokenizer_2=None,
                                      guider=_guider())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(pipe, batch: int, text_len: int, *, seed: int = 0, device="cpu", dtype=torch.float32,
                  cfg: bool = False) -> dict:
    """``generate`` keyword arguments: Qwen ``prompt_embeds (batch, text_len, text_embed_dim)`` with an all-ones
    ``prompt_embeds_mask`` (int64), plus the negative pair when ``cfg``. No glyph (byT5) embeddings: generate cannot
    pass them; the adapter uses the pipeline's encoding of a prompt without quoted text (all byT5 tokens masked).
    Deterministic per ``seed`` (drawn on the CPU; on ``device="meta"`` only shapes)."""
    return text_embeds(batch, text_len, int(pipe.transformer.config.text_embed_dim), seed=seed, device=device,
                       dtype=dtype, cfg=cfg, mask=torch.ones(batch, text_len, dtype=torch.long))
