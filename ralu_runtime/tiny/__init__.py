"""Tiny randomly initialised pipelines of every supported family, built from configs with no download.

They have the real diffusers classes (transformer, VAE, text encoders, scheduler) at toy sizes, and
byte-level tokenizers built in code, so prompts work offline. Used by the demo and the tests; the
images they make are noise-like (random weights), but every code path is the production one.

The tiny FLUX.1 and SD3 builders live here; each further family has its own module (``ralu_runtime.tiny.<family>``)
with its tiny builder. Every published model of :data:`ralu_runtime.families.MODELS` has a benchmark-size /
full-size builder (``build_<module>_pipeline(size)``: "small" for CPU latency ratios, "full" = the published
transformer config for FLOP counting on meta tensors) and ``random_embeds`` in its module (FLUX.1-dev:
:mod:`.flux`, SD3 Medium: :mod:`.sd3`). The built-in models of ``ralu generate --model tiny-...`` are
:data:`ralu_runtime.families.TINY_MODELS`; :func:`build_tiny` builds them.
"""
from __future__ import annotations

import contextlib

import torch

from ..families import TINY_MODELS

TEXT_DIM = 32
VOCAB = 300  # 256 byte symbols + specials, rounded up
SPECIAL_TOKENS = ("<pad>", "<unk>", "</s>")


@contextlib.contextmanager
def building(device, dtype):
    """Build modules on ``device`` in ``dtype`` directly (torch's default dtype and device for the block; the
    default dtype is restored after): no float32 copy of a full-size model on the way."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def text_embeds(batch: int, text_len: int, dim: int, *, seed: int, device, dtype, cfg: bool,
                mask: torch.Tensor | None = None) -> dict:
    """Random prompt embeddings as ``generate`` keyword arguments: ``prompt_embeds (batch, text_len, dim)`` in
    ``dtype`` on ``device``, then ``negative_prompt_embeds`` when ``cfg``, drawn in that order from one CPU generator
    seeded with ``seed`` (deterministic per seed on any device; ``device="meta"``: shapes only, nothing drawn).
    ``mask`` ``(batch, text_len)`` (any dtype): added as ``prompt_embeds_mask`` (and a copy as the negative's)."""
    g = torch.Generator("cpu").manual_seed(seed)

    def draw():
        if torch.device(device).type == "meta":
            return torch.empty(batch, text_len, dim, device="meta", dtype=dtype)
        return torch.randn(batch, text_len, dim, generator=g).to(device=device, dtype=dtype)

    out = {"prompt_embeds": draw()}
    if mask is not None:
        out["prompt_embeds_mask"] = mask.to(device)
    if cfg:
        out["negative_prompt_embeds"] = draw()
        if mask is not None:
            out["negative_prompt_embeds_mask"] = mask.clone().to(device)
    return out


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the symbols of ``tokenizers``' ByteLevel pre-tokenizer).

    Printable Latin-1 bytes map to themselves, the other 68 to U+0100... in byte order.
    """
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # "!".."~", "¡".."¬", "®".."ÿ"
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(shifted)) for b in range(256)}


def byte_tokenizer(max_length: int):
    """A byte-level BPE tokenizer with no merges (every UTF-8 byte is one token), built in memory.

    Ids are fixed: 0-2 the specials, then byte ``b`` -> ``3 + b`` in every process (``ByteLevel.alphabet()``
    is a set, whose order changes with the process's hash seed, so it is not used for the order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in byte_to_unicode().items():
        vocab[ch] = len(SPECIAL_TOKENS) + b
    if set(vocab) - set(SPECIAL_TOKENS) != set(pre_tokenizers.ByteLevel.alphabet()):  # pragma: no cover
        raise RuntimeError("tokenizers' ByteLevel alphabet is not GPT-2's byte map; byte_tokenizer needs updating")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=max_length)


def tiny_clip(with_projection: bool, hidden: int = TEXT_DIM, projection: int = TEXT_DIM):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
                         bos_token_id=0, eos_token_id=2, pad_token_id=0)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def tiny_t5(d_model: int = TEXT_DIM):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    return T5EncoderModel(cfg).eval()


def tiny_vae(latent_channels: int, shift_factor: float | None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
        scaling_factor=1.5, shift_factor=shift_factor, use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    ).eval()


def build_tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = True, latent_channels: int = 16,
                             num_layers: int = 1, num_single_layers: int = 2, device="cpu", dtype=torch.float32,
                             kontext: bool = False):
    """A FluxPipeline with a 1+2-block transformer (hidden 32), tiny VAE (factor 8), tiny CLIP and T5;
    ``kontext``: the same components in a ``FluxKontextPipeline`` (FLUX.1 Kontext: reference-image editing)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if guidance_embeds else 1.0, use_dynamic_shifting=guidance_embeds,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = (FluxKontextPipeline if kontext else FluxPipeline)(
        scheduler=scheduler, vae=tiny_vae(latent_channels, 0.1159), text_encoder=tiny_clip(False),
        tokenizer=byte_tokenizer(77), text_encoder_2=tiny_t5(), tokenizer_2=byte_tokenizer(512),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def build_tiny_sd3_pipeline(seed: int = 0, *, latent_channels: int = 16, num_layers: int = 2, device="cpu",
                            dtype=torch.float32):
    """A StableDiffusion3Pipeline with a 2-block transformer, tiny VAE, two tiny CLIPs and a tiny T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=latent_channels, num_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=2 * TEXT_DIM, out_channels=latent_channels, pos_embed_max_size=96,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        scheduler=scheduler, vae=tiny_vae(latent_channels, 0.0609), text_encoder=tiny_clip(True),
        tokenizer=byte_tokenizer(77), text_encoder_2=tiny_clip(True), tokenizer_2=byte_tokenizer(77),
        text_encoder_3=tiny_t5(), tokenizer_3=byte_tokenizer(512),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


# CLI name -> ("module:function", keyword arguments): the built-in random models (ralu_runtime.families.TINY_MODELS)
TINY_BUILDERS: dict[str, tuple[str, dict]] = {name: (t.builder, dict(t.kwargs)) for name, t in TINY_MODELS.items()}


def build_tiny(name: str, **kwargs):
    """Build the built-in random model ``name`` (a key of :data:`TINY_BUILDERS`); ``kwargs``: device, dtype, seed."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(TINY_MODELS)}")
    return TINY_MODELS[name].build(**kwargs)
