"""FLUX.2 pipelines with random weights, built from configs with no download.

* :func:`build_tiny_flux2_pipeline`: the real ``Flux2Pipeline`` (Mistral-3 text encoder) or ``Flux2KleinPipeline``
  (Qwen3 text encoder; ``distilled`` sets the pipeline's ``is_distilled``) with a 1 + 2-block
  ``Flux2Transformer2DModel`` (2 heads x 16), a tiny ``AutoencoderKLFlux2`` (32 latent channels like the real one,
  random batch-norm statistics) and a tiny text encoder of the real class (hidden 32; 30 / 27 layers so that the
  pipelines' default hidden-state layers (10, 20, 30) / (9, 18, 27) exist). Prompts work offline: the in-memory
  byte tokenizer with a chat template set in code. Flux2Pipeline's tokenizer slot holds that tokenizer instead of
  a ``PixtralProcessor`` (which needs torchvision): the pipeline's text path only calls its
  ``apply_chat_template``, which a fast tokenizer provides for text-only conversations.
* :func:`build_flux2_pipeline`: ``"small"`` (a CPU latency-benchmark shape), ``"full"`` (FLUX.2-dev's published
  32 B transformer config) or ``"full-klein"`` (FLUX.2-klein 4B's), for FLOP counting on ``device="meta"``; no
  text encoder (give prompt embeddings).

Scheduler: FLUX.2-dev's / FLUX.2-klein's ``scheduler_config.json`` as published (FLUX.1-dev's values):
``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")``. With dynamic
shifting the pipelines pass their own ``mu = compute_empirical_mu(image_seq_len, num_steps)``, so only
``use_dynamic_shifting`` and ``time_shift_type`` matter.
"""
from __future__ import annotations

import torch

from . import building, text_embeds


# FLUX.2-dev transformer/config.json (also diffusers' Flux2Transformer2DModel defaults): 6144 hidden, 8 + 48 blocks,
# text = 3 Mistral-Small-3 layers x 5120
FLUX2_FULL = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                  num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
                  axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)
# FLUX.2-klein 4B: 3072 hidden, 5 + 20 blocks, text = 3 Qwen3-4B layers x 2560, no guidance embedding
FLUX2_KLEIN_4B = dict(FLUX2_FULL, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                      guidance_embeds=False)
FLUX2_SMALL = dict(FLUX2_FULL, num_layers=1, num_single_layers=3, num_attention_heads=3, joint_attention_dim=768)
# AutoencoderKLFlux2: 32 latent channels, factor 8, batch norm over the 2x2-packed 128 channels
VAE_FULL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
VAE_SMALL = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8)

TINY_TEXT_HIDDEN = 32
MISTRAL_TEMPLATE = (  # Mistral-style system / instruction markers around each text part (text-only conversations)
    "{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ part['text'] }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ part['text'] }}[/INST]{% endif %}{% endif %}{% endfor %}{% endfor %}"
)
QWEN_TEMPLATE = (  # Qwen3's turn markers; generation prompt with an empty think block (enable_thinking=False)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def flux2_scheduler():
    """FLUX.2's scheduler (values from the published scheduler_config.json of FLUX.2-dev / FLUX.2-klein)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096, time_shift_type="exponential")


def _vae(**shape):
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=32, **shape).eval()


def _randomize_bn(vae, seed: int) -> None:
    """Batch-norm running statistics away from (0, 1), so that the (de)normalisation is exercised."""
    g = torch.Generator().manual_seed(seed)
    n = vae.bn.running_mean.numel()
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn(n, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(n, generator=g))


def _mistral3(layers: int = 30):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    from . import VOCAB

    h = TINY_TEXT_HIDDEN
    text = MistralConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=h // 2, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=0, eos_token_id=2)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                                 head_dim=16, image_size=32, patch_size=16)
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=1, spatial_merge_size=1,
                         vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(cfg).eval()


def _qwen3(layers: int = 27):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from . import VOCAB

    h = TINY_TEXT_HIDDEN
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=h // 2, max_position_embeddings=1024,
                      pad_token_id=0, bos_token_id=0, eos_token_id=2)
    return Qwen3ForCausalLM(cfg).eval()


def _tokenizer(template: str):
    from . import byte_tokenizer

    tok = byte_tokenizer(512)
    tok.chat_template = template
    return tok


def build_tiny_flux2_pipeline(seed: int = 0, *, klein: bool = False, distilled: bool = False, device="cpu",
                              dtype=torch.float32, num_layers: int = 1, num_single_layers: int = 2):
    """A ``Flux2Pipeline`` (``klein=False``: guidance embedding, tiny Mistral-3) or ``Flux2KleinPipeline``
    (``klein=True``, ``is_distilled=distilled``: no guidance embedding, tiny Qwen3) with a ``num_layers`` +
    ``num_single_layers``-block transformer (2 heads x 16, rope axes (4, 4, 4, 4)), tiny VAE (factor 8, 32 latent
    channels) and the byte tokenizer with a chat template. ``distilled=True`` implies ``klein=True``."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

    klein = klein or distilled
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TINY_TEXT_HIDDEN,
        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
        guidance_embeds=not klein,
    ).eval()
    vae = _vae(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    _randomize_bn(vae, seed)
    if klein:
        pipe = Flux2KleinPipeline(scheduler=flux2_scheduler(), vae=vae, text_encoder=_qwen3(),
                                  tokenizer=_tokenizer(QWEN_TEMPLATE), transformer=transformer,
                                  is_distilled=distilled)
    else:
        pipe = Flux2Pipeline(scheduler=flux2_scheduler(), vae=vae, text_encoder=_mistral3(),
                             tokenizer=_tokenizer(MISTRAL_TEMPLATE), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


SIZES = ("small", "small-klein", "full", "full-klein")


def build_flux2_pipeline(size: str, *, device="cpu", dtype=torch.float32, seed: int = 0, klein: bool = False,
                         distilled: bool = False):
    """A FLUX.2 pipeline with random weights of shape ``size``: "small" (hidden 384, 1 + 3 blocks, small VAE),
    "full" (FLUX.2-dev: 8 + 48 blocks, 48 heads x 128, the real VAE shape) or "full-klein" (FLUX.2-klein 4B: 5 + 20
    blocks, 24 heads x 128). "full-klein" / "small-klein" / ``klein`` / ``distilled`` give a ``Flux2KleinPipeline``
    (``is_distilled=distilled``), else a ``Flux2Pipeline``. No text encoder. Built in ``dtype`` on ``device``
    directly (``"meta"``: no memory, for FLOP counting)."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed; choose one of {SIZES}")
    klein = klein or distilled or size.endswith("-klein")
    if size.startswith("full"):
        shape = FLUX2_KLEIN_4B if klein else FLUX2_FULL
    else:
        shape = dict(FLUX2_SMALL, guidance_embeds=not klein)
    torch.manual_seed(seed)
    with building(device, dtype):
        vae = _vae(**(VAE_FULL if size.startswith("full") else VAE_SMALL))
        tr = Flux2Transformer2DModel(**shape).eval()
        if klein:
            pipe = Flux2KleinPipeline(scheduler=flux2_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                      transformer=tr, is_distilled=distilled)
        else:
            pipe = Flux2Pipeline(scheduler=flux2_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                 transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(pipe, batch: int, text_len: int, *, seed: int = 0, device="cpu", dtype=torch.float32,
                  cfg: bool = False) -> dict:
    """``generate`` keyword arguments: ``prompt_embeds`` ``(batch, text_len, joint_attention_dim)`` (FLUX.2 takes
    no pooled embedding and no text mask); with ``cfg`` (undistilled klein) ``negative_prompt_embeds`` too."""
    return text_embeds(batch, text_len, pipe.transformer.config.joint_attention_dim, seed=seed, device=device,
                       dtype=dtype, cfg=cfg)
