"""``ralu_runtime.generate``: RALU (or the ordinary baseline) on a diffusers FLUX or SD3 pipeline."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import DiTAdapter, get_adapter
from .sampler import NOISE_VARIANTS, SOLVERS, StageRecord, sample_baseline, sample_ralu
from .schedule import RaluSchedule, get_preset

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
EDGE_MAPS = ("unit", "clip")


@dataclass
class RaluOutput:
    """Result of :func:`generate`.

    images: list of PIL images, ``(B, H, W, 3)`` float numpy in [0, 1], ``(B, 3, H, W)`` tensor, or latents
    ``(B, C, h, w)`` for ``output_type="latent"``. masks: ``(B, Hc, Wc)`` bool coarse-token mask of the regions
    upsampled first (``return_masks=True`` and a RALU run), else None. timings: ordered ``name -> seconds``
    (text encoding, stages, edges, transitions, VAE decode). schedule: the schedule used (None for baseline).
    """

    images: Any
    masks: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    records: list[StageRecord] = field(default_factory=list)
    schedule: RaluSchedule | None = None
    cache_stats: dict | None = None  # feature cache's full/cached step counts (see ralu_runtime.cache), if one ran


def load_pipeline(path: str, *, torch_dtype=None, device=None):
    """Load a local diffusers FLUX or SD3 pipeline folder with ``DiffusionPipeline.from_pretrained``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype)
    get_adapter(pipe)  # fail early on unsupported classes
    if device is not None:
        pipe.to(device)
    return pipe


def resolve_schedule(speedup, adapter: DiTAdapter) -> RaluSchedule | None:
    """``speedup`` ("4x", "7x", ... preset of the model family; "default" = the family's fastest preset;
    a RaluSchedule; or None for the baseline) -> schedule."""
    if speedup is None or isinstance(speedup, RaluSchedule):
        return speedup
    if isinstance(speedup, str):
        return get_preset(adapter.family, adapter.default_preset if speedup == "default" else speedup)
    raise ValueError(f"speedup={speedup!r} is not allowed: use a preset name such as '7x', a RaluSchedule, or None")


def _generators(generator, seed, batch: int, device) -> tuple[Any, list[torch.Generator]]:
    """(generator argument for the initial noise, per-image generator list for RALU's own draws)."""
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(int(seed) if seed is not None else
                                                       int(torch.randint(0, 2**62, (1,)).item()))
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images")
        return generator, generator
    return generator, [generator] * batch


_KEEP = object()  # generate(cache=None): keep whatever cache is attached to the adapter


@contextlib.contextmanager
def _call_cache(adapter: DiTAdapter, cache):
    """Attach ``cache`` (a cache object, None for no cache, or ``_KEEP``) for one call; yields the active cache."""
    previous = adapter.feature_cache
    active = previous if cache is _KEEP else cache
    if hasattr(active, "reset_stats"):
        active.reset_stats()
    adapter.feature_cache = active
    try:
        yield active
    finally:
        adapter.feature_cache = previous


def _prompt_batch(prompt, prompt_embeds) -> None:
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("give exactly one of prompt and prompt_embeds (got "
                         f"{'both' if prompt is not None else 'neither'})")


@torch.no_grad()
def generate(pipe, prompt: str | list[str] | None = None, *, height: int | None = None, width: int | None = None,
             speedup: str | RaluSchedule | None = "default", num_inference_steps: int | None = None,
             guidance_scale: float | None = None, negative_prompt=None, prompt_embeds=None,
             pooled_prompt_embeds=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
             num_images_per_prompt: int = 1, generator=None, seed: int | None = None, output_type: str = "pil",
             return_masks: bool = False, cache=None, noise: str = "reference", edge_map: str = "unit",
             edge_detector: str = "opencv", solver: str = "euler", transition_impl: str = "auto",
             max_sequence_length: int | None = None, progress: bool = True, torch_dtype=None,
             device=None, backend: str | None = None, compile_options: dict | None = None) -> RaluOutput:
    """Generate images with RALU (``speedup`` preset or schedule) or the ordinary sampler (``speedup=None``).

    ``speedup="default"`` is the family's fastest preset: "7x" for FLUX.1-dev, "3x" for SD3, "4step" for
    FLUX.1-schnell.

    pipe: a loaded diffusers ``FluxPipeline`` / ``StableDiffusion3Pipeline``, a local model folder (loaded
    with ``from_pretrained``), or a :class:`~ralu_runtime.adapters.DiTAdapter`. Give ``prompt`` (str or list)
    or ``prompt_embeds`` (+ pooled), not both. ``generator``: a torch.Generator or one per image (a batch of
    two with generators [g1, g2] equals two single runs with g1 and g2); ``seed`` makes a CPU generator.
    ``num_inference_steps`` applies to the baseline only (RALU's steps come from its schedule).
    ``noise``: "reference" (N(0, I) for tokens not upsampled at a boundary) or "exact" (N(0, (1 - c) I)).
    ``edge_map``: "unit" maps the decoded [-1, 1] image by (x + 1) / 2; "clip" reproduces the reference
    implementation's clipping. ``edge_detector``: "opencv" (CPU Canny) or "gpu" (on-device Canny).
    ``cache``: temporal feature cache for this call (see :mod:`ralu_runtime.cache`): "taylorseer:W[:order]",
    "fbcache:threshold", a cache object, or "none"; None keeps whatever :func:`ralu_runtime.cache.set_cache`
    attached (nothing by default). The cache is reset at every stage; its step counts land in ``cache_stats``.
    ``backend``: "eager", "inductor", "onnx" or "tensorrt" (see :mod:`ralu_runtime.compile`): installs a per-stage
    compiled model call on the pipeline, kept for later calls with the same backend and ``compile_options``;
    None keeps whatever is installed (plain eager if nothing).
    """
    _prompt_batch(prompt, prompt_embeds)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is not allowed; choose one of {OUTPUT_TYPES}")
    if noise not in NOISE_VARIANTS:
        raise ValueError(f"noise={noise!r} is not allowed; choose one of {NOISE_VARIANTS}")
    if edge_map not in EDGE_MAPS:
        raise ValueError(f"edge_map={edge_map!r} is not allowed; choose one of {EDGE_MAPS}")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not allowed; choose one of {tuple(SOLVERS)}")
    if cache is None:
        cache = _KEEP
    else:
        from .cache import make_cache

        cache = make_cache(cache)  # parsed once, before any work: a bad spec raises ValueError here
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be an integer >= 1")
    if isinstance(pipe, str):
        pipe = load_pipeline(pipe, torch_dtype=torch_dtype, device=device)
    adapter = get_adapter(pipe)
    if backend is not None:
        from .compile import ensure_backend

        ensure_backend(adapter, backend, **(compile_options or {}))
    schedule = resolve_schedule(speedup, adapter)
    if schedule is not None and num_inference_steps is not None:
        raise ValueError("num_inference_steps applies to speedup=None only; a RALU schedule fixes its own steps")
    steps = num_inference_steps if num_inference_steps is not None else adapter.default_steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps={steps!r} must be an integer >= 1")
    height = height or 1024
    width = width or 1024
    adapter.check_size(height, width)
    guidance = adapter.default_guidance if guidance_scale is None else guidance_scale

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cond = adapter.encode_prompt(prompt, negative_prompt, prompt_embeds=prompt_embeds,
                                 pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                 negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                                 num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance,
                                 max_sequence_length=max_sequence_length)
    timings["text_encode"] = time.perf_counter() - t0
    batch = cond.batch
    noise_gen, per_image = _generators(generator, seed, batch, adapter.device)
    dtype = cond.data["embeds"].dtype if "embeds" in cond.data else adapter.dtype
    noise_latents = adapter.prepare_noise(batch, height, width, noise_gen, dtype)

    with _call_cache(adapter, cache) as fcache:
        if schedule is None:
            result = sample_baseline(adapter, cond, noise_latents, steps, solver=solver, progress=progress)
        else:
            result = sample_ralu(adapter, cond, noise_latents, schedule, per_image, noise_variant=noise,
                                 edge_map=edge_map, edge_detector=edge_detector, transition_impl=transition_impl,
                                 solver=solver, progress=progress)
    cache_stats = fcache.stats() if hasattr(fcache, "stats") else None
    for rec in result.records:
        timings[rec.name] = rec.seconds
    latents = adapter.unpack(result.tokens, *noise_latents.shape[-2:])
    masks = result.layout.selected_mask() if (return_masks and result.layout is not None) else None
    if output_type == "latent":
        return RaluOutput(latents, masks, timings, result.records, schedule, cache_stats)
    t0 = time.perf_counter()
    images = adapter.decode(latents)
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    timings["vae_decode"] = time.perf_counter() - t0
    return RaluOutput(adapter.postprocess(images, output_type), masks, timings, result.records, schedule, cache_stats)
