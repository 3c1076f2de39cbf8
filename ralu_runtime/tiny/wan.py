"""Wan 2.1 / 2.2 text-to-video pipelines with random weights, built from configs with no download.

* :func:`build_tiny_wan_pipeline`: the real ``WanPipeline`` with a 2-block ``WanTransformer3DModel`` (2 heads x 16,
  3-D RoPE split 8 / 4 / 4), a tiny ``AutoencoderKLWan`` (16 latent channels, spatial factor 8, temporal factor 4,
  the real latents_mean / latents_std), a tiny ``UMT5EncoderModel`` (hidden 32) and the in-memory byte tokenizer,
  so prompts work offline. ``two_experts=True`` gives the Wan 2.2 A14B layout: a second (low-noise) transformer
  ``transformer_2`` and ``boundary_ratio`` 0.875.
* :func:`build_wan_pipeline`: ``"small"`` (a CPU latency-benchmark shape), ``"full"`` (Wan 2.1 T2V 14B's published
  transformer config; each expert of Wan 2.2 T2V A14B has the same shape), ``"full-a14b"`` (that shape twice, as
  transformer and transformer_2) or ``"full-1.3b"`` (Wan 2.1 T2V 1.3B), for FLOP counting on ``device="meta"``; no
  text encoder (give prompt embeddings).

Scheduler. The published ``scheduler_config.json`` of Wan2.1-T2V-14B/1.3B-Diffusers (from the model cards / HF
configs, as we know them) is ``UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=3.0, solver_order=2, ...)``: shift 3.0 is Wan's 480p setting (the model card uses
5.0 for 720p). RALU presets integrate with ralu's own solvers (Euler by default), not UniPC, so the tiny pipeline
uses ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (the same shifted sigmas) by default; ``scheduler="unipc"`` gives
the published UniPC scheduler (the baseline then follows UniPC's step; see :mod:`ralu_runtime.adapters.wan`).
"""
from __future__ import annotations

import torch

from . import building, text_embeds

TEXT_LEN = 512            # the tiny tokenizer's length: the pipeline pads UMT5 states to max_sequence_length 512
FLOW_SHIFT = 3.0          # published UniPC flow_shift of Wan 2.1 T2V (its 480p setting; 5.0 at 720p)
BOUNDARY_RATIO = 0.875    # Wan 2.2 T2V A14B's boundary_ratio (model_index.json)

# Wan 2.1 T2V 14B transformer/config.json (diffusers' WanTransformer3DModel defaults): 5120 hidden, 40 blocks
WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
               rope_max_seq_len=1024)
WAN_1_3B = dict(WAN_14B, num_attention_heads=12, ffn_dim=8960, num_layers=30)   # 1536 hidden
WAN_SMALL = dict(WAN_14B, num_attention_heads=3, ffn_dim=1024, num_layers=2)    # 384 hidden
TINY = dict(WAN_14B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64,
            num_layers=2, rope_max_seq_len=256)
# AutoencoderKLWan: the real one is base_dim 96, dim_mult (1, 2, 4, 4), 2 res blocks (diffusers' defaults)
VAE_FULL = dict(base_dim=96, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
VAE_SMALL = dict(base_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
VAE_TINY = dict(base_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
SCHEDULERS = ("euler", "unipc")


def wan_scheduler(kind: str = "euler", flow_shift: float = FLOW_SHIFT):
    """``"unipc"``: Wan 2.1's published scheduler (UniPC with flow sigmas); ``"euler"``: FlowMatchEuler with the same
    shift (the sigmas ralu's default Euler solver integrates, and what the diffusers pipeline then runs too)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler={kind!r} is not allowed; choose one of {SCHEDULERS}")
    if kind == "unipc":
        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=flow_shift, solver_order=2,
                                       solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
                                       timestep_spacing="linspace", predict_x0=True)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)


def _vae(**shape):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(z_dim=16, temperal_downsample=[False, True, True], scale_factor_temporal=4,
                            scale_factor_spatial=8, **shape).eval()


def _umt5(d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    from . import VOCAB

    cfg = UMT5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0,
                     eos_token_id=2, decoder_start_token_id=0)
    return UMT5EncoderModel(cfg).eval()


def build_tiny_wan_pipeline(seed: int = 0, *, two_experts: bool = False, scheduler: str = "euler",
                            expand_timesteps: bool = False, num_layers: int = 2, device="cpu", dtype=torch.float32):
    """A ``WanPipeline`` with a ``num_layers``-block transformer (hidden 32), tiny Wan VAE, tiny UMT5 and the byte
    tokenizer. ``two_experts``: Wan 2.2 A14B's layout (``transformer_2``, ``boundary_ratio=0.875``);
    ``scheduler``: "euler" (FlowMatchEuler, shift 3) or "unipc" (the published UniPC, flow_shift 3);
    ``expand_timesteps``: the pipeline flag of Wan 2.2 TI2V 5B (per-token timesteps)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from . import byte_tokenizer

    torch.manual_seed(seed)
    shape = dict(TINY, num_layers=num_layers)
    transformer = WanTransformer3DModel(**shape).eval()
    transformer_2 = WanTransformer3DModel(**shape).eval() if two_experts else None
    pipe = WanPipeline(tokenizer=byte_tokenizer(TEXT_LEN), text_encoder=_umt5(), vae=_vae(**VAE_TINY),
                       scheduler=wan_scheduler(scheduler), transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=BOUNDARY_RATIO if two_experts else None, expand_timesteps=expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


SIZES = ("small", "full", "full-a14b", "full-1.3b")


def build_wan_pipeline(size: str, *, device="cpu", dtype=torch.float32, seed: int = 0, two_experts: bool = False,
                       flow_shift: float = FLOW_SHIFT):
    """A ``WanPipeline`` with random weights of shape ``size``: "small" (hidden 384, 2 blocks, small Wan VAE),
    "full" (Wan 2.1 T2V 14B: 40 blocks, 40 heads x 128, FFN 13824, text dim 4096, the real VAE shape), "full-a14b"
    (Wan 2.2 T2V A14B: two such experts, ``boundary_ratio`` 0.875) or "full-1.3b" (Wan 2.1 T2V 1.3B: 30 blocks,
    12 heads x 128, FFN 8960). ``two_experts``: two transformers of that shape and ``boundary_ratio`` 0.875 (Wan 2.2
    A14B's layout; implied by "full-a14b"). Scheduler: the published UniPC with ``flow_shift`` (3.0: the published
    config, Wan 2.1's 480p setting; the model card uses 5.0 at 720p). No text encoder. Built in ``dtype`` on
    ``device`` directly (``"meta"``: no memory, for FLOP counting)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    if size not in SIZES:
        raise ValueError(f"size={size!r} is not allowed; choose one of {SIZES}")
    shape = {"small": WAN_SMALL, "full": WAN_14B, "full-a14b": WAN_14B, "full-1.3b": WAN_1_3B}[size]
    two = two_experts or size == "full-a14b"
    torch.manual_seed(seed)
    scheduler = wan_scheduler("unipc", flow_shift)  # outside the device / dtype context: it keeps its tables on the CPU
    with building(device, dtype):
        vae = _vae(**(VAE_SMALL if size == "small" else VAE_FULL))
        tr = WanTransformer3DModel(**shape).eval()
        tr2 = WanTransformer3DModel(**shape).eval() if two else None
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler,
                           transformer=tr, transformer_2=tr2, boundary_ratio=BOUNDARY_RATIO if two else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_embeds(pipe, batch: int, text_len: int, *, seed: int = 0, device="cpu", dtype=torch.float32,
                  cfg: bool = False) -> dict:
    """``generate`` keyword arguments: ``prompt_embeds`` ``(batch, text_len, text_dim)`` (Wan takes no pooled embedding
    and no text mask: the pipeline zero-pads UMT5 states to 512 tokens); with ``cfg`` ``negative_prompt_embeds`` too
    (needed for CFG when the pipeline has no text encoder to encode the empty negative prompt)."""
    tr = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    return text_embeds(batch, text_len, tr.config.text_dim, seed=seed, device=device, dtype=dtype, cfg=cfg)
