"""The model families of the GPU smoke step (benchmarks/gpu_smoke.py): how to build each one, its inputs, and how to
call its diffusers pipeline for the ``speedup=None`` parity check.

Two sizes per family, built by one function (:func:`build`):

``smoke`` (the GPU run)
    The published transformer config (hidden size, heads, text dim, patch, RoPE axes: ``ralu_runtime.tiny.<family>``'s
    full-size builder, or ``benchmarks/latency.py``'s for FLUX.1 / SD3) with the depth cut to 2 blocks of each kind
    (:attr:`SmokeFamily.depth`), the published VAE config, random weights, built directly on the device in the
    target dtype. Method: the full pipeline is built on the ``meta`` device (no memory), then its transformer(s) and
    VAE are rebuilt from their configs (depth overridden) on the device and registered in its place
    (``register_modules``), so the pipeline class, scheduler and pipeline config (Wan 2.2's ``boundary_ratio``,
    klein's ``is_distilled``, HunyuanVideo 1.5's guider) are the published ones.
``dry`` (the CPU dry run)
    The same function and the same published configs, with the width cut too (:attr:`SmokeFamily.dry_width`: the
    family's CPU latency-model widths, e.g. 4 x 64 heads for FLUX.1) and a small VAE of the same class
    (:data:`DRY_VAE`), float32: the dry run goes through exactly the code the GPU run does (meta build, rebuild,
    ``register_modules``, the family's hooks). It also builds the ``smoke`` size on the ``meta`` device (no memory):
    its depth overrides and configs are valid (:func:`meta_shape`).

Inputs: random prompt embeddings of the family's real text length (``TEXT_LEN`` of its tiny module; 512 for FLUX.1
and Chroma, 333 for SD3/3.5, 128 valid Qwen tokens for Qwen-Image / HunyuanVideo 1.5, ...), with the negative pair
where the family runs true CFG at its default guidance.

This module imports ``ralu_runtime`` only for its tiny builders (``ralu_runtime.tiny``) and the public adapter lookup
used to bring ralu's latents into the form a pipeline returns for ``output_type="latent"`` (``pack`` /
``denormalize``, as the family test files do).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

IMAGE_HW = (1024, 1024)      # the smoke run's image size (1024^2: every image family's real resolution)
VIDEO_HW = (480, 832)        # 480p (832: the nearest multiple of RALU's 32-px block to 848 / 854)
VIDEO_FRAMES = 17            # 5 latent frames (temporal factor 4)
DRY_IMAGE_HW = (128, 128)    # tiny models on the CPU: 16 coarse tokens for FLUX (the 7x preset upsamples 1)
DRY_VIDEO_HW = (64, 96)
DRY_VIDEO_FRAMES = 9         # 3 latent frames, as tests/test_wan.py
DRY_TEXT_LEN = 12


@dataclass
class SmokeFamily:
    """One family of the smoke step.

    ``full_builder``: ``"module:function"`` plus keyword arguments, called with ``device="meta"``; ``depth``:
    transformer config overrides of the smoke size (2 blocks of each kind); ``dry_width``: further overrides of the
    dry run (width); ``post_build``: a hook on the built pipeline (random pad tokens, batch-norm statistics);
    ``embeds``: ``"flux"`` / ``"sd3"`` (``benchmarks.latency.prompt_embeds``) or a ``ralu_runtime.tiny`` module
    with ``random_embeds``; ``guidance``: the guidance scale of every call (the family's default); ``cfg``: the
    embeddings carry a negative pair (true CFG); ``preset``: the RALU preset run; ``ref_form``: how ralu's latents
    ``(B, C, [F,] h, w)`` compare with the pipeline's ``output_type="latent"`` result ("direct", "pack": the pipeline
    returns packed tokens, "denormalize": FLUX.2-klein's de-normalised latents, "unpack": Chroma's packed tokens
    unpacked with the pipeline's own ``_unpack_latents``); ``masked``: the family takes a text-token mask (the
    masks-under-CUDA-graphs check); ``level``: "inductor" (the real inductor compile with CUDA graphs) or "dynamo"
    (dynamo traces ralu's block functions but runs them eagerly: ``dynamo_backend="eager"``; with CUDA graphs);
    ``compile_vae``: also compile the VAE decode (inductor level only); ``expected_s``: expected seconds of each
    check on the H200 (see :mod:`benchmarks.gpu_smoke`)."""

    key: str
    label: str
    full_builder: tuple[str, dict]
    depth: dict
    dry_width: dict
    embeds: str
    text_len: int
    guidance: float
    cfg: bool
    preset: str
    ref_form: str = "direct"
    masked: bool = False
    video: bool = False
    level: str = "dynamo"
    compile_vae: bool = False
    scheduler: Callable | None = None   # a replacement scheduler factory, e.g. Wan's Euler
    post_build: Callable | None = None
    expected_s: dict = field(default_factory=dict)
    notes: str = ""


def _call(target: str, **kwargs):
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)(**kwargs)


def _flux_full(device, dtype, schnell: bool = False):
    from benchmarks.latency import build_pipeline

    pipe = build_pipeline("flux", "full", device=device, dtype=dtype)
    if schnell:  # FLUX.1-schnell: no guidance embedding, scheduler shift 1 without dynamic shifting
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.register_modules(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0))
    return pipe


def _sd3_full(device, dtype):
    from benchmarks.latency import build_pipeline

    return build_pipeline("sd3", "full", device=device, dtype=dtype)


def _wan_euler():
    from ralu_runtime.tiny.wan import FLOW_SHIFT, wan_scheduler

    return wan_scheduler("euler", FLOW_SHIFT)


def _random_pad_tokens(pipe) -> None:
    """Z-Image: its learned image / caption pad tokens are zeros at init; random ones show where padding goes."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token"):
            t = getattr(pipe.transformer, name)
            t.copy_(torch.randn(t.shape, generator=g).to(t.device, t.dtype))


def _random_batch_norm(pipe) -> None:
    """FLUX.2's VAE batch-norm statistics away from (0, 1), so the latents' (de)normalisation is exercised."""
    g = torch.Generator().manual_seed(2)
    bn = pipe.vae.bn
    n = bn.running_mean.numel()
    with torch.no_grad():
        bn.running_mean.copy_((0.3 * torch.randn(n, generator=g)).to(bn.running_mean))
        bn.running_var.copy_((0.5 + torch.rand(n, generator=g)).to(bn.running_var))


# The dry run's VAE widths per class (the tiny modules' VAE_SMALL shapes).
_KL_SMALL = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
DRY_VAE = {"AutoencoderKL": _KL_SMALL, "AutoencoderKLFlux2": _KL_SMALL,
           "AutoencoderKLQwenImage": dict(base_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1),
           "AutoencoderKLWan": dict(base_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1),
           "AutoencoderKLHunyuanVideo15": dict(block_out_channels=(16, 16, 32, 32, 32), layers_per_block=1)}

# The dry run's transformer widths (the families' CPU latency models: benchmarks/latency.py, ralu_runtime.tiny SMALL)
_FLUX_W = dict(attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128,
               axes_dims_rope=(8, 28, 28))
_SD3_W = dict(num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=256)
_FLUX2_W = dict(num_attention_heads=3, joint_attention_dim=768)
_Z_W = dict(dim=256, n_heads=4, n_kv_heads=4, cap_feat_dim=256, axes_dims=(16, 24, 24))


# Expected seconds on the H200 per check (see gpu_smoke's docstring for how they were estimated): build includes
# the process start (import torch + diffusers with 7 siblings doing the same), parity the diffusers pipeline and
# ralu's baseline, compile the first compiled call (dynamo trace + inductor codegen + Triton compile + CUDA-graph
# capture).
def _expected(build=20, parity=6, ralu_eager=6, compile_base=10, compile_ralu=6, preset=3, recompile=3, masks=0):
    out = dict(build=build, parity_diffusers=parity, ralu_eager=ralu_eager, compiled_baseline=compile_base,
               compiled_ralu=compile_ralu, compiled_preset=preset, no_recompile=recompile)
    if masks:
        out["text_masks_graphs"] = masks
    return out


FAMILIES: dict[str, SmokeFamily] = {f.key: f for f in (
    SmokeFamily("flux-dev", "FLUX.1-dev", ("benchmarks.smoke_families:_flux_full", {}),
                dict(num_layers=2, num_single_layers=2), _FLUX_W, "flux", 512, 3.5, False, "7x", ref_form="pack",
                level="inductor", compile_vae=True, expected_s=_expected(compile_base=60, compile_ralu=8, preset=40),
                notes="the compiled path users run: inductor + CUDA graphs + compiled VAE decode (compiled in the "
                      "first preset call: the ratio-1 schedule upsamples everything, so it decodes no preview)"),
    SmokeFamily("flux-schnell", "FLUX.1-schnell", ("benchmarks.smoke_families:_flux_full", {"schnell": True}),
                dict(num_layers=2, num_single_layers=2, guidance_embeds=False), _FLUX_W, "flux", 512, 0.0, False,
                "4step", ref_form="pack", expected_s=_expected(compile_base=20)),
    SmokeFamily("sd3-medium", "SD3-medium", ("benchmarks.smoke_families:_sd3_full", {}), dict(num_layers=3),
                _SD3_W, "sd3", 333, 7.0, True, "3x", expected_s=_expected(compile_base=20)),
    SmokeFamily("sd35-large", "SD3.5 Large", ("ralu_runtime.tiny.sd35:build_sd35_pipeline",
                                              {"size": "full", "variant": "large"}),
                dict(num_layers=3), _SD3_W, "sd35", 333, 7.0, True, "3x", expected_s=_expected(compile_base=20)),
    SmokeFamily("sd35-medium", "SD3.5 Medium", ("ralu_runtime.tiny.sd35:build_sd35_pipeline",
                                                {"size": "full", "variant": "medium"}),
                dict(num_layers=4, dual_attention_layers=(0, 1)), _SD3_W, "sd35", 333, 7.0, True, "3x",
                expected_s=_expected(compile_base=25),
                notes="2 dual-attention + 1 joint + the last (context_pre_only) block: every SD3 block kind"),
    SmokeFamily("flux2-dev", "FLUX.2-dev", ("ralu_runtime.tiny.flux2:build_flux2_pipeline", {"size": "full"}),
                dict(num_layers=2, num_single_layers=2), _FLUX2_W, "flux2", 512, 4.0, False, "7x", ref_form="pack",
                level="inductor", post_build=_random_batch_norm, expected_s=_expected(build=25, compile_base=72)),
    SmokeFamily("flux2-klein", "FLUX.2-klein 4B (distilled)",
                ("ralu_runtime.tiny.flux2:build_flux2_pipeline", {"size": "full-klein", "distilled": True}),
                dict(num_layers=2, num_single_layers=2), _FLUX2_W, "flux2", 512, 1.0, False, "4step",
                ref_form="denormalize", post_build=_random_batch_norm, expected_s=_expected(compile_base=20)),
    SmokeFamily("qwen-image", "Qwen-Image", ("ralu_runtime.tiny.qwen_image:build_qwen_image_pipeline",
                                            {"size": "full"}),
                dict(num_layers=2), dict(num_attention_heads=2), "qwen_image", 128, 4.0, True, "7x", ref_form="pack",
                masked=True, level="inductor", expected_s=_expected(compile_base=60, masks=8)),
    SmokeFamily("z-image", "Z-Image", ("ralu_runtime.tiny.z_image:build_z_image_pipeline", {"size": "full"}),
                dict(n_layers=2, n_refiner_layers=2), _Z_W, "z_image", 128, 5.0, True, "7x", masked=True,
                level="inductor", post_build=_random_pad_tokens, expected_s=_expected(compile_base=45, masks=8)),
    SmokeFamily("z-image-turbo", "Z-Image-Turbo", ("ralu_runtime.tiny.z_image:build_z_image_pipeline",
                                                   {"size": "full"}),
                dict(n_layers=2, n_refiner_layers=2), _Z_W, "z_image", 128, 0.0, False, "4step", masked=True,
                post_build=_random_pad_tokens, expected_s=_expected(compile_base=20, masks=6),
                notes="no CFG (guidance 0), few-step preset"),
    SmokeFamily("chroma", "Chroma1-HD", ("ralu_runtime.tiny.chroma:build_chroma_pipeline", {"size": "full"}),
                dict(num_layers=2, num_single_layers=2),
                dict(_FLUX_W, approximator_hidden_dim=512, approximator_layers=2, pooled_projection_dim=None),
                "chroma", 512, 5.0, True, "5x", ref_form="unpack", masked=True,
                expected_s=_expected(compile_base=25, masks=8)),
    SmokeFamily("wan21", "Wan 2.1 T2V 14B", ("ralu_runtime.tiny.wan:build_wan_pipeline", {"size": "full"}),
                dict(num_layers=2), dict(num_attention_heads=3, ffn_dim=1024), "wan", 512, 5.0, True, "7x",
                video=True, level="inductor", scheduler=_wan_euler,
                expected_s=_expected(build=25, parity=8, ralu_eager=12, compile_base=58, compile_ralu=12, preset=8,
                                     recompile=8),
                notes="Euler scheduler (flow shift 3) for the parity check: ralu's sampler is Euler; the published "
                      "UniPC is a solver choice, not a model path"),
    SmokeFamily("wan22", "Wan 2.2 T2V A14B (two experts)", ("ralu_runtime.tiny.wan:build_wan_pipeline",
                                                            {"size": "full-a14b"}),
                dict(num_layers=2), dict(num_attention_heads=3, ffn_dim=1024), "wan", 512, 5.0, True, "7x",
                video=True, scheduler=_wan_euler,
                expected_s=_expected(build=30, parity=8, ralu_eager=12, compile_base=22, compile_ralu=12, preset=8,
                                     recompile=8)),
    SmokeFamily("hunyuan-video15", "HunyuanVideo 1.5 T2V",
                ("ralu_runtime.tiny.hunyuan_video15:build_hunyuan_video15_pipeline", {"size": "full"}),
                dict(num_layers=2, num_refiner_layers=2), dict(num_attention_heads=2), "hunyuan_video15", 128, 6.0,
                True, "7x", masked=True, video=True, level="inductor",
                expected_s=_expected(build=25, parity=10, ralu_eager=15, compile_base=77, compile_ralu=15, preset=10,
                                     recompile=10, masks=12)),
)}


# ------------------------------------------------------------------------------------------------------- building
def _rebuilt(model, overrides: dict):
    """``type(model)`` from its config with ``overrides`` (an override of None drops the key). The private keys are
    left out: diffusers' ``from_config`` takes the constructor's defaults for every key named in ``_use_default_values``
    (all of them for a model built with defaults), which would silently undo an override of such a key."""
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    cfg.update(overrides)
    cfg = {k: v for k, v in cfg.items() if v is not None or k not in overrides}
    new = type(model).from_config(cfg).eval()
    for k, v in overrides.items():
        if v is None:
            continue
        got = new.config.get(k)
        same = list(got) == list(v) if isinstance(v, (list, tuple)) and isinstance(got, (list, tuple)) else got == v
        if not same:
            raise RuntimeError(f"{type(model).__name__}: override {k}={v!r} did not take effect ({got!r})")
    return new


def build(fam: SmokeFamily, size: str, device, dtype, seed: int = 0):
    """The family's pipeline: ``size="smoke"`` (published width, reduced depth) or ``"dry"`` (width cut too, a small
    VAE of the same class). The published pipeline is built on the meta device, then its transformer(s) (config +
    overrides) and VAE are rebuilt on ``device`` in ``dtype`` with random weights and registered in place of the
    meta ones; ``device="meta"`` stops before allocating anything (a shape check)."""
    from ralu_runtime.tiny import building

    if size not in ("smoke", "dry"):
        raise ValueError(f"size={size!r}: use 'smoke' or 'dry'")
    target, kw = fam.full_builder
    pipe = _call(target, device="meta", dtype=dtype, **kw)
    overrides = dict(fam.depth, **(fam.dry_width if size == "dry" else {}))
    meta = torch.device(device).type == "meta"
    torch.manual_seed(seed)
    new = {}
    with building(device, dtype):
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is not None:
                new[name] = _rebuilt(model, overrides)
        new["vae"] = _rebuilt(pipe.vae, DRY_VAE[type(pipe.vae).__name__] if size == "dry" else {})
    pipe.register_modules(**new)
    if meta:
        return pipe
    if fam.scheduler is not None:
        pipe.register_modules(scheduler=fam.scheduler())
    for name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module) and any(p.is_meta for p in comp.parameters()):
            raise RuntimeError(f"{name} still has meta parameters after the rebuild")
    if fam.post_build is not None:
        fam.post_build(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def meta_shape(fam: SmokeFamily) -> dict:
    """Width, heads, depth and parameter count of the smoke-size transformer, built on the meta device (no memory)."""
    pipe = build(fam, "smoke", "meta", torch.bfloat16)
    cfg = dict(pipe.transformer.config)
    keys = ("num_attention_heads", "attention_head_dim", "dim", "n_heads", "joint_attention_dim", "text_dim",
            "cap_feat_dim", "text_embed_dim", *fam.depth)
    out = {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in keys if k in cfg}
    out["params"] = sum(p.numel() for p in pipe.transformer.parameters())
    out["experts"] = 2 if getattr(pipe, "transformer_2", None) is not None else 1
    return out


# --------------------------------------------------------------------------------------------------------- inputs
def sizes(fam: SmokeFamily, dry: bool) -> dict:
    """``generate`` size keywords: height, width (and num_frames for video)."""
    if fam.video:
        h, w = DRY_VIDEO_HW if dry else VIDEO_HW
        return dict(height=h, width=w, num_frames=DRY_VIDEO_FRAMES if dry else VIDEO_FRAMES)
    h, w = DRY_IMAGE_HW if dry else IMAGE_HW
    return dict(height=h, width=w)


def embeds(fam: SmokeFamily, pipe, batch: int, dry: bool, device, dtype, seed: int = 0) -> dict:
    """``generate`` keyword arguments for the prompt: random embeddings of the family's text length (real length on
    the GPU, :data:`DRY_TEXT_LEN` on the tiny models), negatives when the family runs true CFG."""
    text_len = DRY_TEXT_LEN if dry else fam.text_len
    if fam.embeds in ("flux", "sd3"):
        from benchmarks.latency import prompt_embeds

        return prompt_embeds(pipe, fam.embeds, batch, text_len, device, dtype, seed=seed)
    mod = importlib.import_module(f"ralu_runtime.tiny.{fam.embeds}")
    emb = mod.random_embeds(pipe, batch, text_len, seed=seed, device=device, dtype=dtype, cfg=fam.cfg)
    emb.pop("guidance_scale", None)  # Z-Image's no-CFG marker: every call here sets guidance_scale itself
    return emb


MASK_KEYS = ("prompt_embeds_mask", "negative_prompt_embeds_mask")


def with_valid_lengths(emb: dict, lengths: list[int]) -> dict:
    """A copy of ``emb`` whose text masks (both, where present) mark the first ``lengths[i]`` tokens of image ``i``
    valid (mask dtype kept); the padded embeddings are zeroed, as the pipelines' encoders leave them. Families that
    take no mask from ``random_embeds`` (Z-Image) get an int64 mask."""
    out = dict(emb)
    t = emb["prompt_embeds"].shape[1]
    for key, src in zip(MASK_KEYS, ("prompt_embeds", "negative_prompt_embeds")):
        if src not in emb:
            continue
        ref = emb.get(key)
        dtype = ref.dtype if ref is not None else torch.long
        rows = [torch.arange(t) < n for n in lengths]
        mask = torch.stack(rows).to(device=emb[src].device, dtype=dtype)
        out[key] = mask
        out[src] = emb[src] * mask.to(emb[src].dtype)[..., None]
    return out


# --------------------------------------------------------------------------------------- the diffusers pipeline call
def pipeline_latents(fam: SmokeFamily, pipe, emb: dict, *, steps: int, seeds: list[int], **size) -> torch.Tensor:
    """The diffusers pipeline's own ``output_type="latent"`` result for ``generate``'s keyword arguments ``emb``, the
    same guidance and one CPU generator per image (what ``generate(..., generator=[...])`` draws its noise from)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    kw = dict(size, num_inference_steps=steps, generator=gens, output_type="latent")
    emb = dict(emb)
    if fam.embeds == "qwen_image":
        return pipe(**emb, true_cfg_scale=fam.guidance, **kw).images
    if fam.embeds == "z_image":  # captions as a list of (T_i, D) tensors, cut to their valid tokens
        lists = {}
        for src, key in (("prompt_embeds", "prompt_embeds_mask"), ("negative_prompt_embeds",
                                                                   "negative_prompt_embeds_mask")):
            if src in emb:
                mask = emb.pop(key, None)
                lists[src] = [e if mask is None else e[mask[i].bool()] for i, e in enumerate(emb.pop(src))]
        return pipe(**lists, **emb, guidance_scale=fam.guidance, **kw).images
    if fam.embeds == "chroma":
        names = {"prompt_embeds_mask": "prompt_attention_mask",
                 "negative_prompt_embeds_mask": "negative_prompt_attention_mask"}
        ref = pipe(**{names.get(k, k): v for k, v in emb.items()}, guidance_scale=fam.guidance, **kw).images
        return pipe._unpack_latents(ref, size["height"], size["width"], pipe.vae_scale_factor)
    if fam.embeds == "hunyuan_video15":  # no glyph text: the byT5 stream all masked, as the pipeline encodes it
        b = emb["prompt_embeds"].shape[0]
        tr = pipe.transformer
        dim = int(tr.config.text_embed_2_dim)
        dev, dt = emb["prompt_embeds"].device, emb["prompt_embeds"].dtype
        glyph = {"prompt_embeds_2": torch.zeros(b, 256, dim, device=dev, dtype=dt),
                 "prompt_embeds_mask_2": torch.zeros(b, 256, device=dev)}
        if "negative_prompt_embeds" in emb:
            glyph.update(negative_prompt_embeds_2=glyph["prompt_embeds_2"],
                         negative_prompt_embeds_mask_2=glyph["prompt_embeds_mask_2"])
        before = pipe.guider.guidance_scale
        pipe.guider.guidance_scale = fam.guidance
        try:
            return pipe(**emb, **glyph, **kw).frames
        finally:
            pipe.guider.guidance_scale = before
    if getattr(pipe, "transformer_2", None) is not None:  # Wan 2.2's low-noise expert: the adapter's guidance
        from ralu_runtime.adapters import get_adapter

        g2 = get_adapter(pipe).guidance_scale_2
        kw["guidance_scale_2"] = fam.guidance if g2 is None else g2
    out = pipe(**emb, guidance_scale=fam.guidance, **kw)
    return out.frames if fam.video else out.images


def as_pipeline_form(fam: SmokeFamily, pipe, latents: torch.Tensor) -> torch.Tensor:
    """ralu's ``output_type="latent"`` result in the form :func:`pipeline_latents` returns."""
    if fam.ref_form in ("direct", "unpack"):
        return latents
    from ralu_runtime.adapters import get_adapter

    adapter = get_adapter(pipe)
    return adapter.pack(latents) if fam.ref_form == "pack" else adapter.denormalize(latents)
