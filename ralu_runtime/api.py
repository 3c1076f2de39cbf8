"""``ralu_runtime.generate``: RALU (or the ordinary baseline) on a diffusers pipeline of a supported family.

``generate(pipe, prompt, **kw)`` is ``run(prepare(pipe, prompt, **kw))``: :func:`prepare` checks every argument and
resolves the call (adapter, sizes, batch, schedule, steps, guidance, frames, feature cache, backend options, parallel
plan) into a :class:`CallPlan` without any model work; :func:`run` executes a plan. The serving engine prepares a
request when it arrives and runs it later with its own ``model_call`` / ``final_decode`` hooks (see :func:`run`).

Guarantees (tested in ``tests/test_safety.py``):

* **The pipeline is left as found.** ralu never replaces, patches, compiles or fuses anything on the user's
  pipeline: attention processors, modules, parameters, hooks and the global torch RNG (when a ``seed`` or
  ``generator`` is given) are the same before and after a call, and a plain ``pipe(...)`` afterwards gives
  bitwise the same result as before. Compiled functions, fused weights, CUDA graphs and exported graphs belong
  to ralu's runner (:mod:`ralu_runtime.compile`) and follow the live model (a LoRA loaded later takes effect).
* **Thread-safe.** One pipeline may serve ``generate`` calls from several threads: per-call state (feature
  cache, chosen backend, generators) belongs to the call; text encoding with the pipeline's tokenizers is
  serialised per pipeline; a cache *object* shared by calls is used by one call at a time.
* **Bad input fails fast**: every argument is checked before any model is loaded or run, with a ValueError or
  TypeError naming the argument, the value and what is allowed.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .adapters import DiTAdapter, call_scope, get_adapter
from .sampler import (NOISE_VARIANTS, REGION_MODES, REGION_SOURCES, SOLVERS, StageRecord, check_finite_decode,
                      sample_baseline, sample_ralu, scheduler_integration)
from .offload import check_offload, free_models, keeping_models, offloaded_components, onloading
from .limits import MAX_GUIDANCE_SCALE, MAX_SEED, MAX_SEQUENCE_LENGTH, MAX_STEPS
from .text import lone_surrogate
from .schedule import RaluSchedule, get_preset

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
EDGE_MAPS = ("unit", "clip")
EDGE_DETECTORS = ("opencv", "gpu")
TRANSITION_IMPLS = ("auto", "cuda", "triton", "torch")


@dataclass(frozen=True)
class CallPlan:
    """One checked ``generate`` call, resolved and ready to :func:`run` (made by :func:`prepare`; no model work).

    Resolved: ``adapter`` (the pipeline's :class:`~ralu_runtime.adapters.DiTAdapter`), ``height`` / ``width``
    (pixels), ``batch`` (images in the call: prompts x ``num_images_per_prompt``), ``schedule`` (None: the
    baseline), ``steps`` (baseline steps), ``guidance``, ``num_frames`` (None: images), ``region_mode``, ``cache``
    (the call's feature-cache object, None for none: a spec string is parsed into a fresh object, ``cache=None``
    takes the pipeline's default set with :func:`ralu_runtime.cache.set_cache` at prepare time), ``compile``
    (:class:`~ralu_runtime.compile.CompileOptions` of ``backend=``, None: keep what is installed) and ``parallel``
    (the :class:`~ralu_runtime.parallel.SequenceParallel` plan, None: unsharded). The other fields are
    ``generate``'s arguments as given (checked).

    A plan holds the caller's objects (embeddings, generators, cache object): running it twice continues those
    generators and reuses that cache object (one call at a time).
    """

    adapter: DiTAdapter
    height: int
    width: int
    batch: int
    schedule: RaluSchedule | None
    steps: int
    guidance: float
    num_frames: int | None
    region_mode: str
    cache: Any
    compile: Any
    parallel: Any
    # text: a prompt or embeddings (checked against the model's sizes)
    prompt: Any = None
    negative_prompt: Any = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    prompt_embeds_mask: torch.Tensor | None = None
    negative_prompt_embeds_mask: torch.Tensor | None = None
    num_images_per_prompt: int = 1
    max_sequence_length: int | None = None
    # randomness
    generator: Any = None
    seed: int | None = None
    # sampler and output options
    output_type: str = "pil"
    return_masks: bool = False
    noise: str = "reference"
    edge_map: str = "unit"
    edge_detector: str = "opencv"
    solver: str = "euler"
    transition_impl: str = "auto"
    region_source: str = "decode"
    progress: bool = True
    integration: str = "own"  # "follow": the baseline steps with the pipeline's scheduler (scheduler_integration)
    edit: Any = None  # img2img request (ralu_runtime.editing.EditSpec), None for text-to-image
    channels: Any = None  # FLUX.1 Fill / control conditioning (ralu_runtime.channel_cond.ChannelSpec), or None
    reference: Any = None  # FLUX.1 Kontext reference (ralu_runtime.kontext.KontextSpec), None without one

    @property
    def backend(self) -> str | None:
        """The compile backend this call installs (None: whatever is installed runs)."""
        return None if self.compile is None else self.compile.backend


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


# ------------------------------------------------------------------------------------------- loading
_LOADED: dict[tuple, Any] = {}
_LOAD_LOCK = threading.Lock()


def load_pipeline(path: str | os.PathLike, *, torch_dtype=None, device=None, reuse: bool = True):
    """Load a local diffusers FLUX or SD3 pipeline folder with ``DiffusionPipeline.from_pretrained`` (never from
    the Hub: a missing folder is an error). With ``reuse=True`` (what ``generate(path, ...)`` uses) a folder is
    loaded once per process and ``(torch_dtype, device)``, and later calls get the same pipeline."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {str(path)!r} (ralu loads local diffusers folders only; "
                                "nothing is downloaded)")
    if not (folder / "model_index.json").exists():
        raise ValueError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json)")
    key = (str(folder.resolve()), str(torch_dtype), str(device))
    with _LOAD_LOCK:
        if reuse and key in _LOADED:
            return _LOADED[key]
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch_dtype, local_files_only=True)
        get_adapter(pipe)  # fail early on unsupported classes
        if device is not None:
            pipe.to(device)
        if reuse:
            _LOADED[key] = pipe
        return pipe


def resolve_schedule(speedup, adapter: DiTAdapter, height: int | None = None,
                     width: int | None = None) -> RaluSchedule | None:
    """``speedup`` ("4x", "7x", ... preset of the model family; "default" = the family's default preset;
    a RaluSchedule; or None for the baseline) -> schedule. Presets solved for the model's own timestep shift use
    the adapter's h_ori at ``height`` x ``width`` (default: the model's default size)."""
    if speedup is None or isinstance(speedup, RaluSchedule):
        return speedup
    if isinstance(speedup, str):
        name = adapter.default_preset if speedup == "default" else speedup
        get_preset(adapter.family, name, 3.0)  # an unknown preset fails here, before the shift is computed
        dh, dw = adapter.default_hw()
        h = dh if height is None else height
        w = dw if width is None else width
        return get_preset(adapter.family, name, adapter.preset_base_shift(h, w))
    raise ValueError(f"speedup={speedup!r} is not allowed: use a preset name such as '7x', a RaluSchedule, or None")


# ---------------------------------------------------------------------------------------- validation
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _shown(value) -> str:
    """``repr`` of a scalar; a tensor, array or other object by its type (an error line must not print a tensor)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return repr(value)
    shape = getattr(value, "shape", None)
    return f"<{type(value).__name__}{'' if shape is None else ' of shape ' + str(tuple(shape))}>"


def _check_choice(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={_shown(value)} is not allowed; choose one of {tuple(allowed)}")


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise (TypeError if not _is_int(value) else ValueError)(f"{name}={value!r} is not allowed: need an integer {rng}")


def _check_prompt(prompt, name: str = "prompt") -> int | None:
    """Number of prompts, or None for no prompt. A prompt is one string or a non-empty list (or tuple) of strings."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        _check_text(prompt, name)
        return 1
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        for i, p in enumerate(prompt):
            _check_text(p, f"{name}[{i}]")
        return len(prompt)
    shown = repr(prompt) if len(repr(prompt)) <= 200 else repr(prompt)[:200] + "..."
    raise TypeError(f"{name}={shown} is not allowed: give a string or a non-empty list of strings")


def _check_text(text: str, name: str) -> None:
    """ValueError for a string no tokenizer takes: one with a lone surrogate (``"\\ud800"``; non-UTF-8 bytes of a
    command line decode to such), which the tokenizers refuse with a TypeError naming no argument."""
    at = lone_surrogate(text)
    if at is not None:
        raise ValueError(f"{name} is not valid Unicode text: it holds a lone surrogate ({text[at]!r} at character "
                         f"{at}; text from bytes that are not UTF-8 decodes to such)")


def _prompt_lists(prompt, negative_prompt):
    """The one prompt rule of every family, after :func:`_validate`: a tuple becomes a list; a single negative
    prompt string with a list of prompts is repeated for each (a list of negative prompts has one per prompt)."""
    if isinstance(prompt, tuple):
        prompt = list(prompt)
    if isinstance(negative_prompt, tuple):
        negative_prompt = list(negative_prompt)
    if isinstance(prompt, list) and isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompt)
    return prompt, negative_prompt


def _check_embeds(name: str, t, ndim: int, dim: int | None, batch: int | None = None) -> int:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    shape_doc = "(batch, tokens, dim)" if ndim == 3 else "(batch, dim)"
    if t.ndim != ndim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape_doc}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected a floating-point tensor")
    if t.shape[0] < 1 or (ndim == 3 and t.shape[1] < 1):
        raise ValueError(f"{name} has shape {tuple(t.shape)}: the batch (and token) size must be >= 1")
    if dim is not None and t.shape[-1] != dim:
        raise ValueError(f"{name} has last dimension {t.shape[-1]}; this model expects {dim} ({shape_doc})")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has batch {t.shape[0]}; prompt_embeds has batch {batch} (they must be equal)")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values): give real tensors")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return int(t.shape[0])


def _check_generator(generator, batch: int):
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        bad = [i for i, g in enumerate(generator) if not isinstance(g, torch.Generator)]
        if bad:
            raise TypeError(f"generator[{bad[0]}]={generator[bad[0]]!r}: every entry must be a torch.Generator")
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images "
                             "(len(prompts) x num_images_per_prompt)")
        return
    raise TypeError(f"generator={generator!r} is not allowed: give a torch.Generator, a list of them (one per "
                    "image), or None (and seed= for a seeded CPU generator)")


def _check_mask(name: str, mask, embeds_name: str, embeds) -> None:
    """A ``(B, T)`` 0/1 mask of ``embeds`` ``(B, T, D)``'s valid tokens, with at least one valid token per row."""
    if embeds is None:
        raise ValueError(f"{name} goes with {embeds_name}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(embeds.shape[:2])} (batch, tokens) "
                         f"of {embeds_name}")
    if mask.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (a shape without values): give a real tensor")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold 0/1 (or True/False) only")
    if not bool(mask.bool().any(dim=1).all()):
        raise ValueError(f"{name} has a row with no valid token (every prompt needs at least one)")


def _validate(adapter: DiTAdapter, *, prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt,
              negative_prompt_embeds, negative_pooled_prompt_embeds, height, width, num_images_per_prompt,
              guidance_scale, generator, seed, max_sequence_length, num_inference_steps, schedule,
              prompt_embeds_mask=None, negative_prompt_embeds_mask=None) -> tuple[int, int, int]:
    """Check the model-dependent arguments; returns ``(height, width, batch)``."""
    n_prompts = _check_prompt(prompt)
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("give exactly one of prompt and prompt_embeds (got "
                         f"{'both' if prompt is not None else 'neither'})")
    dims = adapter.embed_dims()
    pooled = dims is None or dims[1] is not None  # the model takes a pooled embedding (or nothing is known)
    if not pooled:
        for name, value in (("pooled_prompt_embeds", pooled_prompt_embeds),
                            ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds)):
            if value is not None:
                raise ValueError(f"{name} is not allowed: {adapter.family} takes no pooled text embedding")
    for name, value, embeds_name, embeds in (
            ("prompt_embeds_mask", prompt_embeds_mask, "prompt_embeds", prompt_embeds),
            ("negative_prompt_embeds_mask", negative_prompt_embeds_mask, "negative_prompt_embeds",
             negative_prompt_embeds)):
        if value is not None:
            if not adapter.takes_prompt_mask:
                raise ValueError(f"{name} is not allowed: {adapter.family} takes no text-token mask")
            _check_mask(name, value, embeds_name, embeds)
    if prompt_embeds is not None:
        if pooled_prompt_embeds is None and dims is not None and pooled:
            raise ValueError(f"{adapter.family} needs pooled_prompt_embeds together with prompt_embeds")
        n_prompts = _check_embeds("prompt_embeds", prompt_embeds, 3, dims and dims[0])
        if pooled_prompt_embeds is not None:
            _check_embeds("pooled_prompt_embeds", pooled_prompt_embeds, 2, dims and dims[1], n_prompts)
    elif pooled_prompt_embeds is not None:
        raise ValueError("pooled_prompt_embeds goes with prompt_embeds, not with a text prompt")
    negative = negative_prompt is not None or negative_prompt_embeds is not None or \
        negative_pooled_prompt_embeds is not None
    if negative and not adapter.supports_negative_prompt:
        raise ValueError(f"negative prompts are not supported for {adapter.family}: it does not use classifier-free "
                         "guidance (a guidance embedding or a step-distilled model)")
    if negative_prompt is not None:
        n_neg = _check_prompt(negative_prompt, "negative_prompt")
        if prompt is None:
            raise ValueError("negative_prompt goes with prompt; with prompt_embeds give negative_prompt_embeds")
        if not isinstance(negative_prompt, str) and n_neg != n_prompts:
            raise ValueError(f"got {n_neg} negative prompts for {n_prompts} prompt{'s' * (n_prompts != 1)}: give one "
                             "negative prompt string (used for every prompt) or a list with one per prompt")
    if negative_prompt_embeds is not None:
        if prompt_embeds is None:
            raise ValueError("negative_prompt_embeds goes with prompt_embeds")
        _check_embeds("negative_prompt_embeds", negative_prompt_embeds, 3, dims and dims[0], n_prompts)
        if pooled:
            if negative_pooled_prompt_embeds is None:
                raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds")
            _check_embeds("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, 2, dims and dims[1],
                          n_prompts)
    _check_int("num_images_per_prompt", num_images_per_prompt, 1, 4096)
    batch = n_prompts * num_images_per_prompt
    if guidance_scale is not None and (not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool)
                                       or not 0.0 <= guidance_scale <= MAX_GUIDANCE_SCALE):
        raise ValueError(f"guidance_scale={guidance_scale!r} is not allowed: need a number in "
                         f"[0, {MAX_GUIDANCE_SCALE:g}] (ralu_runtime.limits.MAX_GUIDANCE_SCALE)")
    _check_generator(generator, batch)
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either generator or seed, not both")
        _check_int("seed", seed, 0, MAX_SEED)
    if max_sequence_length is not None:
        _check_int("max_sequence_length", max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
        if not adapter.takes_max_sequence_length:
            raise ValueError(f"max_sequence_length={max_sequence_length} does not apply to "
                             f"{type(adapter.pipe).__name__}: its pipeline takes no max_sequence_length (prompts are "
                             "padded to its tokenizers' lengths); leave it out")
    if num_inference_steps is not None:
        if schedule is not None:
            raise ValueError("num_inference_steps applies to speedup=None only; a RALU schedule fixes its own steps")
        _check_int("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
    dh, dw = adapter.default_hw()
    height = dh if height is None else height
    width = dw if width is None else width
    adapter.check_size(height, width)
    return int(height), int(width), batch


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_model_device(adapter: DiTAdapter) -> None:
    """ValueError when the pipeline's transformer or VAE is on the meta device (no weights to run), before any work."""
    pipe = adapter.pipe
    for name in ("transformer", "transformer_2", "vae"):
        module = getattr(pipe, name, None) if pipe is not None else None
        p = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
        if p is not None and p.device.type == "meta":
            raise ValueError(f"the pipeline's {name} is on the meta device (shapes without weights): ralu cannot run "
                             "it; load real weights (DiffusionPipeline.from_pretrained) or build it on a real device")


def _cast_embeds(adapter: DiTAdapter, embeds: dict) -> dict:
    """``embeds`` (argument name -> tensor or None) in the transformer's dtype: a cast that keeps every value
    (float16 / bfloat16 -> float32, anything -> float64) is made; a lossy one (float32 -> bfloat16, float64 ->
    float32, float16 <-> bfloat16) is refused with a TypeError naming the argument. Models of another dtype (e.g. a
    float8 storage dtype) take the embeddings as given."""
    target = adapter.dtype
    if target not in _FLOAT_DTYPES:
        return embeds
    out = dict(embeds)
    for name, t in embeds.items():
        if t is None or t.dtype == target:
            continue
        if torch.promote_types(t.dtype, target) != target:
            raise TypeError(f"{name} has dtype {t.dtype} but the model runs in {target}: casting would lose precision "
                            f"or range; cast it yourself ({name}.to({target})) or give {target} embeddings")
        out[name] = t.to(target)
    return out


def _check_work(adapter: DiTAdapter, bounds, batch: int, height: int, width: int, num_frames, steps: int,
                schedule) -> None:
    """ValueError when the call's images or latent tokens x model calls exceed ``bounds``
    (:class:`ralu_runtime.limits.Limits`), before any work (adapters with ``bounded_work = False``, the analytic
    oracles, are not bounded)."""
    from .limits import token_steps

    if not adapter.bounded_work:
        return
    if batch > bounds.max_images:
        raise ValueError(f"this call makes {batch} images (prompts x num_images_per_prompt); the limit is "
                         f"max_images={bounds.max_images}: split the call, or raise it with limits={{'max_images': N}} "
                         "or ralu_runtime.limits.set_limits(max_images=N)")
    frames = adapter.latent_frames(num_frames)
    tokens = adapter.fine_tokens(height, width, frames)
    work = token_steps(batch, tokens, steps, schedule)
    if work > bounds.max_token_steps:
        calls = f"{steps} steps" if schedule is None else f"RALU steps {tuple(schedule.steps)}"
        raise ValueError(f"this call's work is {work} latent tokens x model calls ({batch} image(s) of {tokens} "
                         f"tokens, {calls}); the limit is max_token_steps={bounds.max_token_steps}: use fewer "
                         "images, steps or pixels, or raise it with limits={'max_token_steps': N} or "
                         "ralu_runtime.limits.set_limits(max_token_steps=N)")


def _warn_no_early_regions(adapter: DiTAdapter, schedule, height: int, width: int, num_frames, region_mode) -> None:
    """A logged warning when ``schedule.ratio > 0`` upsamples no region in stage 2 at this size (``ratio`` x the
    coarse blocks is under one block, per frame with ``region_mode="clip"``): stage 2 then runs all at the coarse
    resolution, as ``ratio=0`` would."""
    from .sampler import early_regions

    frames = adapter.latent_frames(num_frames)
    blocks = adapter.fine_tokens(height, width, frames) // 4
    if early_regions(blocks, frames, schedule.ratio, region_mode) == 0:
        per = f" per latent frame (region_mode={region_mode!r})" if region_mode == "clip" else ""
        logging.getLogger("ralu").warning(
            "speedup=%r upsamples no region early at %dx%d: ratio %g of %d coarse blocks%s is under one block, so "
            "stage 2 runs at the coarse resolution only (as ratio=0); use a larger size%s",
            schedule.name or "(a schedule)", height, width, schedule.ratio,
            blocks // frames if region_mode == "clip" else blocks, per,
            " or region_mode='frame'" if region_mode == "clip" else "")


def _check_video(adapter: DiTAdapter, num_frames, region_mode) -> tuple[int | None, str]:
    """``(num_frames, region_mode)`` checked for the adapter: video adapters take ``num_frames = 1 + k *
    temporal_factor`` (default: the pipeline's) and ``region_mode`` "frame" (default) or "clip"; images take neither."""
    if not adapter.is_video:
        if num_frames is not None:
            raise ValueError(f"num_frames={num_frames!r} is not allowed: {adapter.family} makes images")
        if region_mode is not None:
            raise ValueError(f"region_mode={region_mode!r} is not allowed: {adapter.family} makes images")
        return None, "frame"
    region_mode = "frame" if region_mode is None else region_mode
    _check_choice("region_mode", region_mode, REGION_MODES)
    num_frames = adapter.default_frames if num_frames is None else num_frames
    _check_int("num_frames", num_frames, 1, 4096)
    f = adapter.temporal_factor
    if (num_frames - 1) % f:
        raise ValueError(f"num_frames={num_frames} is not allowed: {adapter.family} needs 1 + a multiple of {f} "
                         f"frames (e.g. {1 + (num_frames - 1) // f * f} or {1 + ((num_frames - 1) // f + 1) * f})")
    latent, cap = adapter.latent_frames(num_frames), adapter.max_latent_frames()
    if cap is not None and latent > cap:
        raise ValueError(f"num_frames={num_frames} gives {latent} latent frames; the model's position tables cover "
                         f"{cap} (at most {1 + (cap - 1) * f} frames)")
    return int(num_frames), region_mode


def _generators(generator, seed, batch: int) -> tuple[Any, list[torch.Generator]]:
    """(generator argument for the initial noise, per-image generator list for RALU's own draws: see
    :func:`_ralu_streams`)."""
    if generator is None:
        # no seed: one draw from the global RNG, like diffusers' own pipelines without a generator
        generator = torch.Generator("cpu").manual_seed(int(seed) if seed is not None else
                                                       int(torch.randint(0, 2**62, (1,)).item()))
    if isinstance(generator, (list, tuple)):
        return list(generator), _ralu_streams(list(generator))
    return generator, _ralu_streams([generator] * batch)


def _ralu_streams(gens: list[torch.Generator]) -> list[torch.Generator]:
    """Per image, a generator (on its generator's device) for RALU's own draws (edge-score jitter, transition
    noise seeds), seeded from the state the image's generator had when the call began and the image's place among
    the images sharing that generator. The noise is drawn from the user's generators as the pipeline draws it, so
    with one generator image 0 of a batch has the noise of a single-image call; these streams give it the same
    RALU draws too (drawn from the shared generator after the noise, they depended on the batch size), and
    ``[g1, g2]`` stays two single calls. The user's generators advance by the noise (and VAE) draws only."""
    digests: dict[int, bytes] = {}
    seen: dict[int, int] = {}
    out = []
    for g in gens:
        key = id(g)
        if key not in digests:
            digests[key] = hashlib.blake2b(g.get_state().numpy().tobytes(), digest_size=16).digest()
        k = seen.get(key, 0)
        seen[key] = k + 1
        word = hashlib.blake2b(digests[key] + k.to_bytes(8, "little"), digest_size=8).digest()
        out.append(torch.Generator(g.device).manual_seed(int.from_bytes(word, "little") >> 1))
    return out


# ---------------------------------------------------------------------------------------- per-call state
_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()
_FALLBACK_LOCK = threading.RLock()


def _lock_for(obj) -> threading.RLock:
    """One lock per object (pipeline: its tokenizers; a shared cache object), kept by ralu, not on the object."""
    with _LOCKS_LOCK:
        try:
            lock = _LOCKS.get(obj)
            if lock is None:
                lock = _LOCKS[obj] = threading.RLock()
        except TypeError:  # not weak-referenceable: one global lock
            lock = _FALLBACK_LOCK
        return lock


@contextlib.contextmanager
def _call_state(cache, sharding):
    """The call's state (:func:`call_scope`): its feature cache (an object, or None) and its sharding plan (or
    None). A cache object used by several calls is held by one call at a time; its counters are cleared."""
    hold = _lock_for(cache) if cache is not None else contextlib.nullcontext()
    with hold:
        if hasattr(cache, "reset_stats"):
            cache.reset_stats()
        with call_scope(cache, sharding=sharding) as state:
            yield state


# ---------------------------------------------------------------------------------------------- generate


def check_call_options(*, output_type: str = "pil", noise: str = "reference", edge_map: str = "unit",
                       edge_detector: str = "opencv", solver: str = "euler", transition_impl: str = "auto",
                       region_source: str = "decode", return_masks: bool = False, progress: bool = True,
                       compile_options: dict | None = None, precision: str | None = None, backend: str | None = None,
                       limits=None, cache=None) -> tuple:
    """The checks of :func:`prepare` that need no model (choices, flags, the backend and its options, limits, the
    cache spec), with its defaults; ValueError / TypeError as ``prepare``. Also run by the serving ``Engine`` on its
    default arguments when it is built. Returns ``(options or None, keep_backend, compile_options, bounds, cache,
    default_cache)``: the parsed backend options (None: no backend asked for), whether ``precision`` alone re-dresses
    the installed backend, the compile options with ``precision`` folded in, the resolved limits, the parsed cache
    and whether the pipeline's default cache applies."""
    for name, value, allowed in (("output_type", output_type, OUTPUT_TYPES), ("noise", noise, NOISE_VARIANTS),
                                 ("edge_map", edge_map, EDGE_MAPS), ("edge_detector", edge_detector, EDGE_DETECTORS),
                                 ("solver", solver, tuple(SOLVERS)), ("transition_impl", transition_impl,
                                                                      TRANSITION_IMPLS),
                                 ("region_source", region_source, REGION_SOURCES)):
        _check_choice(name, value, allowed)
    for name, value in (("return_masks", return_masks), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}={value!r}: use True or False")
    if compile_options is not None and not isinstance(compile_options, dict):
        raise TypeError(f"compile_options={compile_options!r}: give a dict of ralu_runtime.compile.CompileOptions "
                        "fields, or None")
    if precision is not None:
        from .compile.options import PRECISIONS

        _check_choice("precision", precision, PRECISIONS)
        if compile_options and compile_options.get("precision", precision) != precision:
            raise ValueError(f"precision={precision!r} and compile_options['precision']="
                             f"{compile_options['precision']!r} disagree: give one")
        compile_options = {**(compile_options or {}), "precision": precision}
    keep_backend = precision is not None and backend is None  # the installed backend (eager if none) re-dressed
    if compile_options and backend is None and not keep_backend:
        raise ValueError("compile_options need backend= (the backend they configure)")
    options = None
    if backend is not None or keep_backend:
        from .compile import BACKENDS
        from .compile.options import make_options

        if backend is not None:
            _check_choice("backend", backend, BACKENDS)
        options = make_options(backend or "eager", compile_options)  # unknown fields, bad values: here, before work
    from .limits import resolve_limits

    bounds = resolve_limits(limits)
    default_cache = cache is None  # the pipeline's default (set_cache), read once the adapter is known
    if not default_cache:
        from .cache import make_cache

        cache = make_cache(cache)  # parsed once, before any work: a bad spec raises ValueError here
    return options, keep_backend, compile_options, bounds, cache, default_cache


def prepare(pipe, prompt: str | list[str] | None = None, *, height: int | None = None, width: int | None = None,
            speedup: str | RaluSchedule | None = "default", num_inference_steps: int | None = None,
            guidance_scale: float | None = None, negative_prompt=None, prompt_embeds=None,
            pooled_prompt_embeds=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
            num_images_per_prompt: int = 1, generator=None, seed: int | None = None, output_type: str = "pil",
            return_masks: bool = False, cache=None, noise: str = "reference", edge_map: str = "unit",
            edge_detector: str = "opencv", solver: str = "euler", transition_impl: str = "auto",
            max_sequence_length: int | None = None, progress: bool = True, torch_dtype=None,
            device=None, backend: str | None = None, compile_options: dict | None = None,
            prompt_embeds_mask=None, negative_prompt_embeds_mask=None, num_frames: int | None = None,
            region_mode: str | None = None, region_source: str = "decode", parallel=None,
            precision: str | None = None, limits=None, image=None, strength: float | None = None,
            mask_image=None, control_image=None, max_area: int | None = None,
            auto_resize: bool | None = None) -> CallPlan:
    """Check every argument of a :func:`generate` call (the same arguments) and resolve it into a
    :class:`CallPlan`, before any work: no text encoding, no noise, no model call, no backend install (a model
    folder given as ``pipe`` is loaded). Raises what ``generate`` raises for bad arguments (ValueError / TypeError
    naming the argument, the value and what is allowed). ``run(prepare(...))`` is ``generate(...)``."""
    # ---- model-independent arguments
    options, keep_backend, compile_options, bounds, cache, default_cache = check_call_options(
        output_type=output_type, noise=noise, edge_map=edge_map, edge_detector=edge_detector, solver=solver,
        transition_impl=transition_impl, region_source=region_source, return_masks=return_masks, progress=progress,
        compile_options=compile_options, precision=precision, backend=backend, limits=limits, cache=cache)
    if isinstance(pipe, (str, os.PathLike)):
        pipe = load_pipeline(pipe, torch_dtype=torch_dtype, device=device)
    elif torch_dtype is not None or device is not None:
        raise ValueError("torch_dtype and device apply when pipe is a model folder; move a loaded pipeline yourself "
                         "(pipe.to(device, dtype)): ralu does not change the pipeline it is given")
    adapter = get_adapter(pipe)
    from .refusals import check_edit_request

    check_edit_request(adapter, image=image, mask_image=mask_image, control_image=control_image)
    adapter.check_supported()
    adapter.check_forwards()
    _check_model_device(adapter)
    if keep_backend and adapter.runner is not None:
        options = _installed_with(adapter.runner.options, compile_options)
        backend = options.backend
    if options is not None:
        from .compile.runner import check_backend_for, resolve_precision

        check_backend_for(options, adapter)  # a backend the family cannot run
        resolve_precision(options, adapter.dtype, adapter.device)  # a dtype that is not the model's; fp8 support
    if default_cache:
        cache = adapter.feature_cache
    region_mode_given = region_mode is not None
    num_frames, region_mode = _check_video(adapter, num_frames, region_mode)
    if speedup is not None and not isinstance(speedup, (str, RaluSchedule)):
        resolve_schedule(speedup, adapter)  # raises the ValueError naming what is allowed
    from .kontext import is_kontext, kontext_default, kontext_size

    kontext = is_kontext(adapter.pipe)
    if kontext:  # the pipeline's own output size: the aspect ratio of height x width at max_area pixels
        asked = (height, width)
        height, width = kontext_size(adapter.pipe, height, width, max_area)
        if (height, width) != asked and (height % adapter.coarse_block_px or width % adapter.coarse_block_px):
            raise ValueError(f"FluxKontextPipeline makes {height}x{width} pixels for height={asked[0]}, width="
                             f"{asked[1]}, max_area={max_area}; RALU needs multiples of {adapter.coarse_block_px}: "
                             "choose height, width and max_area (e.g. max_area=height*width) that give them")
    elif max_area is not None or auto_resize is not None:
        raise ValueError("max_area= and auto_resize= are FluxKontextPipeline's arguments; this pipeline is "
                         f"{type(adapter.pipe).__name__}")
    else:  # Z-Image's editing pipelines: height / width default to the image's size
        from .editing import edit_size

        height, width = edit_size(adapter, image, height, width)
    height, width, batch = _validate(
        adapter, prompt=prompt, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
        negative_prompt=negative_prompt, negative_prompt_embeds=negative_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, height=height, width=width,
        num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale, generator=generator, seed=seed,
        max_sequence_length=max_sequence_length, num_inference_steps=num_inference_steps, schedule=speedup,
        prompt_embeds_mask=prompt_embeds_mask, negative_prompt_embeds_mask=negative_prompt_embeds_mask)
    prompt, negative_prompt = _prompt_lists(prompt, negative_prompt)
    cast = _cast_embeds(adapter, dict(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                                      negative_prompt_embeds=negative_prompt_embeds,
                                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds))
    prompt_embeds, pooled_prompt_embeds = cast["prompt_embeds"], cast["pooled_prompt_embeds"]
    negative_prompt_embeds, negative_pooled_prompt_embeds = (cast["negative_prompt_embeds"],
                                                             cast["negative_pooled_prompt_embeds"])
    schedule = resolve_schedule(speedup, adapter, height, width)
    if schedule is None and region_mode_given:
        raise ValueError(f"region_mode={region_mode!r} applies to RALU runs; speedup=None chooses no regions")
    if schedule is None and noise != "reference":  # the default cannot be told from a given "reference"
        raise ValueError(f"noise={noise!r} applies to RALU runs (the noise of its stage transitions); speedup=None "
                         "makes no transitions: leave noise at its default, or give a RALU speedup")
    if schedule is not None and adapter.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"speedup={getattr(speedup, 'name', speedup)!r}: RALU's stage transitions run float32, "
                         f"bfloat16 or float16 models; this one is {adapter.dtype} (speedup=None runs it, or move "
                         "the pipeline to one of those dtypes)")
    if adapter.pipe is not None and getattr(adapter.pipe, "vae", None) is None:  # (an adapter without a pipeline
        # decodes and schedules itself: the Gaussian oracle)
        needs = [why for why, given in (
            (f"output_type={output_type!r} (the final decode)", output_type != "latent"),
            ("region_source='decode' (RALU's preview decode for the region choice)",
             schedule is not None and region_source == "decode"),
            ("image= / control_image= (encoded by the VAE)", image is not None or control_image is not None))
            if given]
        if needs:
            raise ValueError(f"pipe.vae is None, and this call needs a VAE for {'; '.join(needs)}: set pipe.vae, or "
                             "run without one: output_type='latent'" + (", region_source='latent'"
                                                                      if schedule is not None else ""))
    if schedule is not None and transition_impl in ("cuda", "triton"):
        from ralu_kernels.transition import impl_unusable

        why = impl_unusable(transition_impl, adapter.device)
        if why:
            raise ValueError(f"transition_impl={transition_impl!r} cannot run here: {why}; use 'auto' (the fastest "
                             "one that runs) or 'torch'")
    if (schedule is None or image is not None) and adapter.pipe is not None and \
            getattr(adapter.pipe, "scheduler", None) is None:
        needs = ("speedup=None runs the pipeline's own sampler, which needs it" if schedule is None
                 else "an edit's starting noise level comes from it")
        raise ValueError(f"pipe.scheduler is None: {needs}; set pipe.scheduler (RALU's text-to-image presets follow "
                         "their own schedule and run without one)")
    integration = scheduler_integration(adapter, schedule is not None, solver)
    from .channel_cond import check_channels, default_guidance, default_steps
    from .editing import check_edit

    edit = reference = channels = None
    if kontext:
        from .kontext import check_kontext

        reference = check_kontext(adapter.pipe, image=image, strength=strength, mask_image=mask_image, batch=batch,
                                  auto_resize=auto_resize)
        num_inference_steps = (kontext_default("num_inference_steps") if num_inference_steps is None
                               else num_inference_steps)
        guidance_scale = kontext_default("guidance_scale") if guidance_scale is None else guidance_scale
    else:
        edit, channels = check_channels(adapter, image=image, mask_image=mask_image, control_image=control_image,
                                        strength=strength, height=height, width=width, batch=batch,
                                        num_images_per_prompt=num_images_per_prompt,
                                        num_inference_steps=num_inference_steps)
        if channels is None:
            edit = check_edit(adapter, image=image, strength=strength, mask_image=mask_image, height=height,
                              width=width, batch=batch, num_inference_steps=num_inference_steps)
    if edit is not None and integration != "own":
        raise ValueError(f"image= (img2img / inpainting) runs with the pipeline's Euler flow scheduler only; this "
                         f"pipeline has {type(adapter.pipe.scheduler).__name__}")
    steps = edit.steps if edit is not None else (num_inference_steps if num_inference_steps is not None
                                                 else adapter.default_steps)
    if channels is not None and edit is None:  # control: FluxControlPipeline's defaults
        steps = default_steps(channels) if num_inference_steps is None else num_inference_steps
    if schedule is None or edit is not None:  # the pipeline's own schedule runs (edits: then truncated)
        adapter.check_baseline_steps(int(steps))
    if schedule is None and integration == "follow":
        _check_followed_scheduler(adapter, int(steps), height, width)
    default = adapter.guidance_default() if edit is None else edit.guidance  # the editing pipeline's
    default = default_guidance(channels) if channels is not None else default
    guidance = default if guidance_scale is None else float(guidance_scale)
    ignored = adapter.guidance_ignored() if guidance_scale is not None and guidance > 1 else None
    if ignored:
        logging.getLogger("ralu").warning("guidance_scale=%s is ignored: %s", guidance_scale, ignored)
    if (negative_prompt is not None or negative_prompt_embeds is not None) and not adapter.runs_cfg(guidance, True):
        logging.getLogger("ralu").warning(
            "the negative prompt is ignored: at guidance_scale=%g %s runs no classifier-free guidance (as its "
            "diffusers pipeline); raise guidance_scale to use it", guidance, adapter.family)
    _check_work(adapter, bounds, batch, height, width, num_frames, int(steps), schedule)
    if schedule is not None and schedule.ratio > 0 and adapter.bounded_work:
        _warn_no_early_regions(adapter, schedule, height, width, num_frames, region_mode)
    _warn_idle_cache(cache, schedule.steps if schedule is not None else (int(steps),), edit is not None)
    from .parallel import resolve_parallel

    plan = resolve_parallel(parallel, adapter, backend=backend)
    if (edit is not None or reference is not None) and plan is not None:
        raise ValueError("image= (img2img, Kontext) does not run with context parallelism yet; drop parallel=")
    if channels is not None and plan is not None:
        raise ValueError(f"{type(adapter.pipe).__name__} (conditioning channels) does not run with context "
                         "parallelism yet; drop parallel=")
    if plan is not None:
        check_offload(adapter, parallel=True)
        _check_shard_rows(adapter, plan, height, width, num_frames, schedule)
    if edit is not None:  # text masks and the default text length as the editing pipeline has them
        from .editing import edit_text_mask  # (Chroma: float masks, never bool; ChromaInpaintPipeline: 256 tokens)

        prompt_embeds_mask = edit_text_mask(adapter, prompt_embeds_mask)
        negative_prompt_embeds_mask = edit_text_mask(adapter, negative_prompt_embeds_mask)
        if max_sequence_length is None:
            max_sequence_length = edit.max_sequence_length
    return CallPlan(
        adapter, height, width, batch, schedule, int(steps), guidance, num_frames, region_mode, cache, options, plan,
        prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
        negative_prompt_embeds_mask=negative_prompt_embeds_mask, num_images_per_prompt=num_images_per_prompt,
        max_sequence_length=max_sequence_length, generator=generator, seed=seed, output_type=output_type,
        return_masks=return_masks, noise=noise, edge_map=edge_map, edge_detector=edge_detector, solver=solver,
        transition_impl=transition_impl, region_source=region_source, progress=progress, integration=integration,
        edit=edit, channels=channels, reference=reference)


def _installed_with(installed, overrides: dict):
    """The installed runner's :class:`CompileOptions` with ``overrides`` (``precision=`` given without
    ``backend=``: the backend the user installed keeps running, in the precision asked for). A precision change
    resets what belongs to the old one (``fp8_kernel``; ``fused_qkv=True``, which fp8 does not run)."""
    from dataclasses import fields

    from .compile.options import make_options

    base = {f.name: getattr(installed, f.name) for f in fields(installed) if f.name != "backend"}
    if overrides.get("precision", base["precision"]) != base["precision"]:
        base["fp8_kernel"] = "auto"
        if overrides["precision"] == "fp8" and base["fused_qkv"]:
            base["fused_qkv"] = None
    return make_options(installed.backend, {**base, **overrides})


def _warn_idle_cache(cache, stage_steps: tuple[int, ...], edit: bool) -> None:
    """A warning when a cache with a fixed plan of full / cached steps (TaylorSeer's) would run every step of
    every stage in full (a warm-up as long as each stage, or an interval of 1): the call costs what an uncached
    one does, which the user asked the cache to avoid. Edits run a truncated plan: not checked."""
    plan = getattr(cache, "plan", None)
    if plan is None or edit or any("C" in plan(n) for n in stage_steps):
        return
    logging.getLogger("ralu").warning(
        "cache=%r caches no step: its plan runs every step of stages of %s steps in full (warm-up %s, interval "
        "%s); lower warmup / raise interval, or drop the cache", cache, "/".join(map(str, stage_steps)),
        getattr(cache, "warmup", "?"), getattr(cache, "interval", "?"))


def _check_shard_rows(adapter: DiTAdapter, sp, height: int, width: int, num_frames, schedule) -> None:
    """ValueError when a model call of a sharded sequence that holds image tokens only (``adapter.sharded_text`` is
    False: Wan) has fewer rows than ranks; the other families shard ``[text ; image]``."""
    if getattr(adapter, "sharded_text", True):
        return
    frames = adapter.latent_frames(num_frames)
    tokens = adapter.fine_tokens(height, width, frames)
    least = tokens if schedule is None else tokens // 4  # RALU's stage 1: a quarter of the tokens
    if least < sp.world:
        stage = "" if schedule is None else " in RALU's first stage (a quarter of the tokens)"
        raise ValueError(f"parallel=: {height}x{width} pixels x {frames} latent frame(s) make {least} image tokens"
                         f"{stage}, fewer than the {sp.world} ranks ({adapter.family} shards the image tokens only); "
                         "every rank needs at least one: use a larger size or more frames, or fewer ranks")


def _check_followed_scheduler(adapter: DiTAdapter, steps: int, height: int, width: int) -> None:
    """A baseline that follows the pipeline's own (non-Euler) scheduler: set its timesteps now, on the copy the
    baseline uses, so that a scheduler the pipeline cannot drive either (FlowMatchHeun takes no custom sigmas, which
    FluxPipeline passes) is refused before any work, not after the text encoding."""
    side = adapter.patch_size * adapter.vae_scale_factor
    try:
        adapter.baseline_schedule(steps, max(1, (height // side) * (width // side)))
    except (ValueError, TypeError) as e:
        name = type(adapter.pipe.scheduler).__name__
        raise ValueError(f"the pipeline's {name} cannot run the {adapter.family} baseline schedule (diffusers' "
                         f"pipeline fails the same way): {e}; use FlowMatchEulerDiscreteScheduler, or a RALU preset "
                         "(ralu's solver on its own schedule)") from None


ModelCallHook = Callable[[DiTAdapter, Callable], Callable]
FinalDecodeHook = Callable[[Callable], Callable]


@torch.no_grad()
def run(plan: CallPlan, *, model_call: ModelCallHook | None = None,
        final_decode: FinalDecodeHook | None = None) -> RaluOutput:
    """Execute a :class:`CallPlan` from :func:`prepare`: install its backend, encode the prompt, draw the noise,
    sample (baseline or RALU) and decode. Returns the :class:`RaluOutput`.

    Hooks for a caller that runs the model calls itself (the serving engine batches them across requests):

    * ``model_call(adapter, velocity) -> velocity``: called once with the call's model call
      ``velocity(tokens, grid, timestep, cond) -> velocity tensor`` (the plain adapter call, or the installed
      backend's runner); what it returns is called instead for every model call (same arguments, same result shape:
      ``tokens`` ``(B, L, C)`` in, ``(B, L, C)`` out).
    * ``final_decode(decode) -> decode``: called once with the final VAE decode ``decode(latents) -> images``
      (``(B, C, h, w)`` or video ``(B, C, F, h, w)`` latents in; the decoded tensor out); what it returns decodes the
      final latents instead (the region-choice preview decode of a RALU run is not routed through it).

    Context parallelism (``plan.parallel``) cannot run with a ``model_call`` hook (ValueError).
    """
    if not isinstance(plan, CallPlan):
        raise TypeError(f"plan={plan!r}: give the CallPlan that ralu_runtime.prepare(...) returns")
    for name, hook in (("model_call", model_call), ("final_decode", final_decode)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{name}={hook!r}: give a callable or None")
    if model_call is not None and plan.parallel is not None:
        raise ValueError("context parallelism cannot run with a model_call hook such as the serving engine's (its "
                         "batched model calls pack several requests into one call); run generate directly on every "
                         "rank")
    pipe = plan.adapter.pipe
    if model_call is None and pipe is not None and offloaded_components(pipe):
        # enable_model_cpu_offload: one call at a time (its hooks move models), every model offloaded at the end
        with _lock_for(pipe):
            try:
                return _run(plan, model_call, final_decode, offloaded=True)
            finally:
                free_models(pipe)
    return _run(plan, model_call, final_decode)


def _run(plan: CallPlan, model_call: ModelCallHook | None, final_decode: FinalDecodeHook | None, *,
         offloaded: bool = False) -> RaluOutput:
    """:func:`run` after its checks. ``offloaded``: the pipeline's models are offloaded by diffusers' model offload
    (:mod:`ralu_runtime.offload`): each model call first onloads its model; the preview decode keeps it there."""
    adapter, schedule = plan.adapter, plan.schedule
    # ---- the call's own state: backend runner, feature cache, generators
    if plan.compile is not None:
        from dataclasses import fields

        from .compile import ensure_backend

        opts = plan.compile
        ensure_backend(adapter, opts.backend, **{f.name: getattr(opts, f.name) for f in fields(opts)
                                                 if f.name != "backend"})
    runner = adapter.runner
    compiled_before = _compiled_so_far(runner)
    if runner is not None:
        runner.begin_call()
    impl = runner.impl if runner is not None else None
    velocity = runner if runner is not None else adapter.velocity
    if model_call is not None:
        velocity = model_call(adapter, velocity)
    if offloaded:
        velocity = onloading(adapter, velocity)

    def decode(latents):
        return adapter.decode(latents, impl=impl)

    preview_decode = decode
    if offloaded:  # the region-choice decode inside the run leaves the transformer where it is

        def preview_decode(latents):
            with keeping_models(getattr(adapter.pipe, "vae", None)):
                return decode(latents)

    generator, seed = plan.generator, plan.seed
    sp = plan.parallel
    if sp is not None:  # every rank runs this call; rank 0's decodes and seed are shared (ralu_runtime.parallel)
        sp.setup(_rank_settings(plan))
        velocity, decode = sp.wrap_velocity(velocity), sp.wrap_decode(decode)
        if generator is None and seed is None:
            seed = sp.shared_seed()

    masks = {}
    if adapter.takes_prompt_mask:
        masks = dict(prompt_embeds_mask=plan.prompt_embeds_mask,
                     negative_prompt_embeds_mask=plan.negative_prompt_embeds_mask)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # the tokenizers run for text prompts, and also for the empty negative prompt a CFG family encodes itself when
    # it gets prompt_embeds without negative ones: hold the pipeline's text lock whenever that can happen
    text = plan.prompt is not None or plan.negative_prompt is not None or (
        adapter.supports_negative_prompt and plan.negative_prompt_embeds is None)
    with (_lock_for(adapter.pipe if adapter.pipe is not None else adapter) if text else contextlib.nullcontext()):
        cond = adapter.encode_prompt(plan.prompt, plan.negative_prompt, prompt_embeds=plan.prompt_embeds,
                                     pooled_prompt_embeds=plan.pooled_prompt_embeds,
                                     negative_prompt_embeds=plan.negative_prompt_embeds,
                                     negative_pooled_prompt_embeds=plan.negative_pooled_prompt_embeds,
                                     num_images_per_prompt=plan.num_images_per_prompt, guidance_scale=plan.guidance,
                                     max_sequence_length=plan.max_sequence_length, **masks)
    timings["text_encode"] = time.perf_counter() - t0
    batch = cond.batch
    noise_gen, per_image = _generators(generator, seed, batch)
    dtype = cond.data["embeds"].dtype if "embeds" in cond.data else adapter.dtype
    video = dict(num_frames=plan.num_frames) if adapter.is_video else {}
    if plan.reference is not None:  # Kontext: the reference tokens ride in cond (the posterior's mode: no draw)
        from .kontext import add_reference

        cond = add_reference(adapter, cond, plan.reference, noise_gen, dtype)
    if plan.edit is not None:  # the source is encoded before the noise is drawn (the pipelines' order of draws)
        from .editing import encode_images, run_edit

        source = encode_images(adapter, plan.edit, noise_gen, batch, dtype)
    if plan.channels is not None:  # FLUX.1 Fill / control: encoded before (control) or after (Fill) the noise
        from .channel_cond import attach, build_channel_cond
    if plan.channels is not None and not plan.channels.after_noise:
        cond = attach(cond, build_channel_cond(adapter, plan.channels, noise_gen, batch, dtype))
    draw = adapter.prepare_noise if plan.edit is None else adapter.prepare_edit_noise
    noise_latents = draw(batch, plan.height, plan.width, noise_gen, dtype, **video)
    if plan.channels is not None and plan.channels.after_noise:
        cond = attach(cond, build_channel_cond(adapter, plan.channels, noise_gen, batch, dtype))

    with _call_state(plan.cache, sp) as state:
        if plan.edit is not None:
            result = run_edit(adapter, cond, noise_latents, source, plan, per_image, velocity=velocity,
                                decode=preview_decode)
        elif schedule is None:
            result = sample_baseline(adapter, cond, noise_latents, plan.steps, solver=plan.solver,
                                     progress=plan.progress, velocity=velocity,
                                     follow_scheduler=plan.integration == "follow")
        else:
            result = sample_ralu(adapter, cond, noise_latents, schedule, per_image, noise_variant=plan.noise,
                                 edge_map=plan.edge_map, edge_detector=plan.edge_detector,
                                 transition_impl=plan.transition_impl, region_mode=plan.region_mode,
                                 region_source=plan.region_source, solver=plan.solver, progress=plan.progress,
                                 velocity=velocity, decode=preview_decode)
        cache_stats = state.cache.stats() if hasattr(state.cache, "stats") else None
    for rec in result.records:
        timings[rec.name] = rec.seconds
    if runner is not None:
        runner.end_call()  # stamps the sources of weight copies this call made (a later .data write is found)
    latents = adapter.unpack(result.tokens, *noise_latents.shape[-2:])
    masks = result.layout.selected_mask() if (plan.return_masks and result.layout is not None) else None
    if masks is not None and noise_latents.ndim == 5:  # tall grid -> (B, F, hc, wc)
        masks = masks.view(masks.shape[0], noise_latents.shape[2], -1, masks.shape[-1])
    if plan.output_type == "latent":
        _settle_after_compiling(runner, compiled_before)
        return RaluOutput(latents, masks, timings, result.records, schedule, cache_stats)
    t0 = time.perf_counter()
    images = (final_decode(decode) if final_decode is not None else decode)(latents)
    check_finite_decode(images, "the final latents")
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    timings["vae_decode"] = time.perf_counter() - t0
    _settle_after_compiling(runner, compiled_before)
    return RaluOutput(adapter.postprocess(images, plan.output_type), masks, timings, result.records, schedule,
                      cache_stats)


def _rank_settings(plan: CallPlan) -> dict:
    """The call's settings that every rank of a context-parallel call must share (compared before any collective,
    :meth:`~ralu_runtime.parallel.SequenceParallel.agree`): the seed and generator states, the sizes, the schedule,
    guidance and sampler options, the feature cache, the model's weights (a digest). The tensors are compared at
    each stage's first model call."""
    gens = plan.generator if isinstance(plan.generator, (list, tuple)) else [plan.generator]
    states = [None if g is None else hashlib.sha256(g.get_state().numpy().tobytes()).hexdigest() for g in gens]
    cache = plan.cache
    cache = type(cache).__qualname__ if type(cache).__repr__ is object.__repr__ else repr(cache)
    from .parallel.plan import weights_digest

    return dict(weights=weights_digest(plan.adapter.model_modules()),  # a rank with other weights would mix in
                seed=plan.seed, generator=states, height=plan.height, width=plan.width, batch=plan.batch,
                num_frames=plan.num_frames, speedup=plan.schedule, steps=plan.steps, guidance_scale=plan.guidance,
                cache=cache, noise=plan.noise, solver=plan.solver, region_mode=plan.region_mode,
                region_source=plan.region_source, edge_map=plan.edge_map, edge_detector=plan.edge_detector,
                transition_impl=plan.transition_impl, integration=plan.integration, output_type=plan.output_type)


def _compiled_so_far(runner) -> tuple[int, int]:
    """(dynamo graphs compiled in this process, graphs ``runner`` built): what a call that compiles increases."""
    if runner is None:
        return (0, 0)
    from .compile import compile_stats

    return compile_stats()["unique_graphs"], len(runner.builds)


def _settle_after_compiling(runner, before: tuple[int, int]) -> None:
    """A call that compiled or captured something ends with a full garbage collection (:mod:`ralu_runtime.heap`):
    the compiler's garbage would otherwise make one due in a later call. Outside the call's stage timings."""
    if runner is not None and _compiled_so_far(runner) != before:
        from .heap import settle_heap

        settle_heap()


def generate(pipe, prompt: str | list[str] | None = None, *, height: int | None = None, width: int | None = None,
             speedup: str | RaluSchedule | None = "default", num_inference_steps: int | None = None,
             guidance_scale: float | None = None, negative_prompt=None, prompt_embeds=None,
             pooled_prompt_embeds=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
             num_images_per_prompt: int = 1, generator=None, seed: int | None = None, output_type: str = "pil",
             return_masks: bool = False, cache=None, noise: str = "reference", edge_map: str = "unit",
             edge_detector: str = "opencv", solver: str = "euler", transition_impl: str = "auto",
             max_sequence_length: int | None = None, progress: bool = True, torch_dtype=None,
             device=None, backend: str | None = None, compile_options: dict | None = None,
             prompt_embeds_mask=None, negative_prompt_embeds_mask=None, num_frames: int | None = None,
             region_mode: str | None = None, region_source: str = "decode", parallel=None,
             precision: str | None = None, limits=None, image=None, strength: float | None = None,
             mask_image=None, control_image=None, max_area: int | None = None,
             auto_resize: bool | None = None) -> RaluOutput:
    """Generate images (or videos) with RALU (``speedup`` preset or schedule) or the ordinary sampler
    (``speedup=None``): ``run(prepare(pipe, prompt, ...))`` with the same arguments.

    ``speedup="default"`` is the family's default preset: "7x" for FLUX.1-dev, "3x" for SD3, "4step" for
    FLUX.1-schnell (every family's in :mod:`ralu_runtime.families`).

    pipe: a loaded diffusers pipeline of a supported family (``ralu_runtime.adapters.ADAPTERS``: FLUX.1, SD3/3.5,
    FLUX.2, Qwen-Image, Z-Image, Chroma, Wan, HunyuanVideo 1.5, or a subclass), a local model folder
    (loaded once per process with :func:`load_pipeline`; ``torch_dtype`` / ``device`` apply to that load only),
    or a :class:`~ralu_runtime.adapters.DiTAdapter`. Give ``prompt`` (str or list) or ``prompt_embeds`` (+ pooled),
    not both. The same prompt rule for every family: ``prompt`` a string or a non-empty list (or tuple, taken as a
    list) of strings; ``negative_prompt`` None, one string (used for every prompt) or a list with one per prompt. ``height`` / ``width``: pixels, multiples of the model's coarse block (32 for FLUX and SD3), at most
    the model's limit (FLUX 4096, SD3 its position table); default 1024. ``generator``: a torch.Generator or one per
    image (a batch of two with generators [g1, g2] equals two single runs with g1 and g2: the same noise, latents
    within float rounding, regions the same unless edge scores tie within it); ``seed=s`` is
    ``generator=torch.Generator().manual_seed(s)``. ``num_inference_steps`` applies to the baseline only (RALU's
    steps come from its schedule).
    ``noise``: "reference" (N(0, I) for tokens not upsampled at a boundary) or "exact" (N(0, (1 - c) I)).
    ``edge_map``: "unit" maps the decoded [-1, 1] image by (x + 1) / 2; "clip" is the reference
    implementation's grey mapping (see :mod:`ralu_runtime.edges`). ``edge_detector``: "opencv" (CPU Canny) or
    "gpu" (on-device Canny). ``edge_map`` / ``edge_detector`` / ``region_source`` / ``transition_impl`` /
    ``return_masks`` are about RALU's regions and transitions: ``speedup=None`` accepts them and has none, so that
    one set of arguments serves a baseline and a RALU call side by side (``noise="exact"`` and ``region_mode``,
    which change what a RALU call computes, are refused there; the CLI refuses its flags for them with --speedup
    none, the server its region_source).
    ``cache``: temporal feature cache for this call (see :mod:`ralu_runtime.cache`):
    "taylorseer:W[:order]", "fbcache:threshold" (a fresh cache for this call), a cache object, or "none"; None
    uses what :func:`ralu_runtime.cache.set_cache` set as the default (nothing by default). The cache is reset at
    every stage; its step counts land in ``cache_stats``. ``backend``: "eager", "inductor", "onnx" or "tensorrt"
    (see :mod:`ralu_runtime.compile`): installs ralu's runner for this pipeline, kept for later calls with the
    same backend and ``compile_options``; None keeps whatever is installed (plain eager if nothing).
    ``precision``: "fp8" runs the Linear layers of the transformer's blocks in fp8 (e4m3, per-row weight scales,
    per-token activation scales) on ralu's own quantized copies (the model is left as it is; a LoRA loaded later is
    followed); it needs a GPU of compute capability >= 8.9 (the CPU runs it for tests) and refuses others before any
    work. "auto" / "bf16" / "fp16" / "fp32": the model's own dtype. Sets ``compile_options["precision"]`` (see
    :mod:`ralu_runtime.compile.fp8`); with ``backend=None`` the installed backend keeps running (its options, this
    precision), the eager one when none is installed.
    Embeddings in another dtype than the transformer's are cast where every value is kept (float16 / bfloat16 on a
    float32 model) and refused otherwise (TypeError naming the argument: float32 on a bfloat16 model, float64 on a
    float32 one); embeddings or a pipeline on the meta device are refused (ValueError).
    ``prompt_embeds_mask`` / ``negative_prompt_embeds_mask``: ``(B, T)`` 0/1 valid-token masks of given embeddings,
    for families that take one (Qwen-Image, Z-Image, Chroma). Video families: ``num_frames`` (default: the
    pipeline's), ``region_mode`` "frame" (default: each latent frame its own regions; the better Fréchet distance
    on the video oracle) or "clip" (the same spatial regions in every latent frame); ``images`` then holds the
    video as the pipeline returns it. ``region_source``: "decode" (default; Canny on the VAE-decoded half-resolution
    preview of stage 1's estimate, as the reference) or "latent" (Sobel gradient magnitude of the latents per coarse
    token: no preview decode, the cheaper choice for video VAEs; ``edge_map`` / ``edge_detector`` then do not apply).

    Raises ValueError / TypeError for bad arguments before any work, and FloatingPointError when a stage produces
    non-finite latents (naming the stage) or a VAE decode non-finite pixels (naming the decode: the region-choice
    preview or the final one).

    ``limits``: bounds on the call's work (:mod:`ralu_runtime.limits`: at most 64 images and 2**24 latent tokens x
    model calls by default), a :class:`~ralu_runtime.limits.Limits`, a dict of its fields, or None (the process-wide
    defaults, :func:`ralu_runtime.limits.set_limits`); a call beyond them is refused before any work.

    ``parallel``: a diffusers ``ContextParallelConfig(ulysses_degree=U, ring_degree=R)`` to split every model call's
    token sequence over the ``U * R`` ranks of an initialised ``torch.distributed`` group (FLUX.1; launch with
    torchrun and call ``generate`` with the same arguments on every rank; see :mod:`ralu_runtime.parallel`). None: a
    transformer set up with diffusers' ``enable_parallelism`` runs under that config, any other unsharded.

    ``image`` / ``strength`` (img2img: FLUX.1, SD3, Chroma, Z-Image, Qwen-Image; ``pipe`` an img2img pipeline or its
    text-to-image pipeline): start from the image noised to the pipeline's sigma for ``strength`` (default the
    pipeline's); ``speedup=None`` equals the family's img2img pipeline (``FluxImg2ImgPipeline``, ...), a RALU preset
    skips the stages that end before that start (:mod:`ralu_runtime.editing`, docs/editing.md). ``mask_image``
    (inpainting, the same families; white = repaint): ``speedup=None`` equals the family's inpainting pipeline
    (``FluxInpaintPipeline``, ...); RALU upsamples
    the masked regions first. With a ``FluxFillPipeline`` (``image`` + ``mask_image``) or a ``FluxControlPipeline``
    (``control_image``: a Canny / depth map) the conditioning latents are concatenated to every stage's tokens on the
    channel axis (:mod:`ralu_runtime.channel_cond`); ``speedup=None`` equals those pipelines. Editing ralu does not
    run (other families' editing pipelines, ``image=`` on a family without editing, ``control_image=`` on a pipeline
    that takes none) is refused before any work with the reason (:mod:`ralu_runtime.refusals`).

    ``pipe`` a ``FluxKontextPipeline`` (FLUX.1 Kontext): ``image`` is the reference, appended as conditioning tokens
    at full resolution through every stage; the output size is the pipeline's (the aspect ratio of ``height`` x
    ``width`` at ``max_area`` pixels, default 1024**2); ``auto_resize`` (default True) resizes the reference to the
    preferred Kontext resolution of its aspect ratio; ``strength`` and ``mask_image`` are refused
    (:mod:`ralu_runtime.kontext`, docs/editing.md).
    """
    arguments = dict(locals())  # exactly the parameters above (nothing else is defined yet)
    return run(prepare(**arguments))
