"""Editing with RALU: img2img (``image=``, ``strength=``) and inpainting (``mask_image=``) for FLUX.1, SD3, Chroma,
Z-Image and Qwen-Image (design: ``docs/editing.md``; what differs per family: :data:`EDIT_FAMILY_TABLE`).

What a call does, in the diffusers pipelines' order (so ``speedup=None`` reproduces ``FluxImg2ImgPipeline`` and
``StableDiffusion3Img2ImgPipeline``):

1. the image is preprocessed by the pipeline's image processor to ``(n, 3, H, W)`` float32 in [-1, 1] (resized to
   ``height`` x ``width``, the pipeline's default size when not given);
2. it is VAE-encoded with a sample of the posterior drawn from the call's generator, then normalised
   ``(z - shift_factor) * scaling_factor`` and tiled to the batch (``n`` must divide it);
3. the full-resolution noise is drawn from the same generator (after the encode);
4. the start sigma ``sigma*`` is the pipeline's own: its schedule of ``steps`` steps (``num_inference_steps``, or the
   editing pipeline's default) with the first ``int(steps - steps * strength)`` steps dropped.

The baseline then runs the remaining steps from ``sigma* noise + (1 - sigma*) z`` (diffusers' ``scale_noise``).
RALU maps its three stages onto ``t in [t*, 1]`` with ``t* = 1 - sigma*`` (:func:`edit_stages`): it enters the
last stage whose start ``s_k <= t*`` (earlier stages are skipped; re-entering an earlier stage would only be
re-noised back above ``t*`` at its end), runs that stage's steps on ``[t*, e_k]`` (as many of its ``N_k`` steps as
the part of its interval left in its own unshifted time, rounded up; at least one), and the later stages as they
are. The entry latent is built at the entry stage's token set directly from the clean latent ``z``:
``sigma* n + (1 - sigma*) D(z)`` with i.i.d. unit noise ``n`` (the full-resolution noise: its nearest 2x subsample
for coarse tokens, as text-to-image stage 1) and ``D`` the 2x2 mean for coarse tokens, identity for fine ones. That
is what a stage transition's NT-Matching produces (i.i.d. noise of standard deviation ``1 - s``, signal ``s``) with
the exact signal in place of an upsampled copy, so no extra noise (no ``Z`` shift) is needed. Entering stage 2, the
regions upsampled first are chosen from the source image (Canny on its half-resolution version, or the latent Sobel
scores with ``region_source="latent"``) instead of stage 1's estimate.

Inpainting (FluxInpaintPipeline's and StableDiffusion3InpaintPipeline's math): after every step the kept part
(mask 0) is replaced by the source noised to the sigma the step reached (clean after the last step). With RALU the
masked coarse tokens, dilated by a block, are upsampled first (:func:`mask_boost`), and the blend runs in every
stage on that stage's token set.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .families import EDIT_PIPELINES
from .layout import TokenLayout, grid_positions
from .schedule import RaluSchedule


@dataclass(frozen=True)
class EditFamily:
    """What differs between the editing pipelines of one adapter family (everything else is shared): the diffusers
    img2img / inpainting classes (their defaults of ``strength``, ``num_inference_steps`` and guidance are read from
    their ``__call__``), ``pack``: transformer input channels per VAE latent channel of a blending model (4 where
    2x2 latent pixels are packed into a token before the transformer, 1 where the model patchifies itself),
    ``guidance``: the ``__call__`` argument ``generate``'s ``guidance_scale`` stands for, ``frames``: the VAE is a
    video VAE taking ``(B, 3, 1, H, W)`` with per-channel ``latents_mean`` / ``latents_std`` normalisation
    (Qwen-Image) instead of ``(z - shift_factor) * scaling_factor``, ``float_text_mask``: the pipelines cast the joint
    text + image attention mask to the latents' dtype, so a bool text mask acts as a float 0/1 one (an additive bias,
    not a hard mask: ChromaImg2ImgPipeline / ChromaInpaintPipeline, unlike ChromaPipeline), ``size_from_image``:
    ``height`` / ``width`` default to the image's own size (ZImageImg2ImgPipeline / ZImageInpaintPipeline preprocess
    the image without a size), not to the pipeline's default size (:func:`edit_size`)."""

    img2img: str
    inpaint: str
    pack: int
    guidance: str = "guidance_scale"
    frames: bool = False
    float_text_mask: bool = False
    size_from_image: bool = False


_FLUX_EDIT = EditFamily("FluxImg2ImgPipeline", "FluxInpaintPipeline", 4)
EDIT_FAMILY_TABLE = MappingProxyType({  # adapter family -> its editing pipelines (img2img and inpainting)
    "flux": _FLUX_EDIT,
    "flux-schnell": _FLUX_EDIT,
    "sd3": EditFamily("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline", 1),
    "chroma": EditFamily("ChromaImg2ImgPipeline", "ChromaInpaintPipeline", 4, float_text_mask=True),
    "z-image": EditFamily("ZImageImg2ImgPipeline", "ZImageInpaintPipeline", 1, size_from_image=True),
    "qwen-image": EditFamily("QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", 4, guidance="true_cfg_scale",
                             frames=True),
})
EDIT_FAMILIES = tuple(EDIT_FAMILY_TABLE)  # adapter families that take image= (img2img)
INPAINT_FAMILIES = EDIT_FAMILIES  # ... and mask_image= (inpainting)
INPAINT_REGION_CHOICES = ("mask-first", "edge-only")  # sample_ralu_edit(region_choice=...): see mask_boost


def _vae_channels(vae) -> int:
    """The VAE's latent channels (``latent_channels``, or ``z_dim`` for Qwen-Image's video VAE)."""
    cfg = vae.config
    return int(cfg.get("latent_channels", None) or cfg["z_dim"])


def edit_text_mask(adapter, mask):
    """A given ``(B, T)`` text-token mask as the family's editing pipelines read it: float32 where they cast a bool
    mask (:attr:`EditFamily.float_text_mask`), else (and None) unchanged."""
    fam = EDIT_FAMILY_TABLE.get(adapter.family)
    if mask is not None and fam is not None and fam.float_text_mask and mask.dtype == torch.bool:
        return mask.to(torch.float32)
    return mask


def edit_size(adapter, image, height, width):
    """``(height, width)`` of an edit: unchanged, except for a family whose editing pipelines default them to the
    image's size (:attr:`EditFamily.size_from_image`: the first image's size rounded down to the VAE factor, read
    from the image processor's output as those pipelines read it). ValueError naming that size when RALU cannot
    take it (not a multiple of the coarse block). An image the processor cannot read is left to :func:`check_edit`."""
    fam = EDIT_FAMILY_TABLE.get(adapter.family)
    pipe = getattr(adapter, "pipe", None)
    if image is None or fam is None or not fam.size_from_image or pipe is None or None not in (height, width):
        return height, width
    try:
        h, w = (int(v) for v in pipe.image_processor.preprocess(image).shape[-2:])
    except (TypeError, ValueError, AttributeError, OSError, IndexError, RuntimeError, NotImplementedError):
        return height, width
    height, width = (h if height is None else height), (w if width is None else width)
    blk = adapter.coarse_block_px
    if height % blk or width % blk:
        f = pipe.image_processor.config.vae_scale_factor
        raise ValueError(f"the image is {h}x{w} pixels (height x width, rounded down to multiples of {f}), the size "
                         f"{fam.img2img} / {fam.inpaint} edit at when height / width are not given; RALU needs "
                         f"multiples of {blk}: pass height= and width= (the image is resized to them)")
    return height, width


def edit_kind(pipe) -> str | None:
    """"img2img" / "inpaint" for an editing pipeline of :data:`ralu_runtime.families.EDIT_PIPELINES` (or a
    subclass), None for any other object."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in EDIT_PIPELINES:
            return EDIT_PIPELINES[cls.__name__][1]
    return None


def _call_default(cls_name: str, name: str):
    """Default of ``__call__`` argument ``name`` of diffusers pipeline class ``cls_name``."""
    import diffusers

    return inspect.signature(getattr(diffusers, cls_name).__call__).parameters[name].default


def start_index(steps: int, strength: float) -> int:
    """Steps the pipelines drop for ``strength``: ``int(max(steps - min(steps * strength, steps), 0))``."""
    return int(max(steps - min(steps * strength, steps), 0))


def check_steps_left(strength: float, steps: int) -> None:
    """ValueError naming ``strength`` when it leaves none of the ``steps`` (:func:`start_index` drops all of them when
    ``steps * strength`` vanishes next to ``steps``, e.g. strength 1e-17; diffusers' pipelines raise then too)."""
    if start_index(steps, strength) >= steps:
        raise ValueError(f"strength={strength!r} leaves none of the {steps} steps (the pipeline drops int({steps} - "
                         f"{steps} * strength) = {steps} of them): use a larger strength (1/{steps} runs one step)")


@dataclass(frozen=True)
class EditSpec:
    """A checked img2img / inpainting request: ``pixels`` ``(n, 3, H, W)`` float32 in [-1, 1] (CPU), ``strength``
    in (0, 1], ``steps``: the schedule length whose tail gives the start sigma (the baseline's steps), ``guidance``:
    the editing pipeline's default guidance (used when the call gives none), ``mask``: inpainting's binarised mask,
    ``max_sequence_length``: the editing pipeline's default text length (used when the call gives none)."""

    kind: str
    pixels: torch.Tensor
    strength: float
    steps: int
    guidance: float
    mask: torch.Tensor | None = None  # inpainting: (n_mask, 1, H, W) float32 in {0, 1}, 1 = repaint
    max_sequence_length: int | None = None  # the editing pipeline's default text length (None: it has none)


def check_edit(adapter, *, image, strength, mask_image, height: int, width: int, batch: int,
               num_inference_steps: int | None) -> EditSpec | None:
    """Check the editing arguments of a ``generate`` call (before any model work); None without ``image``.

    Raises ValueError / TypeError with the reason for what is not supported: an editing pipeline without
    ``image``, ``strength`` / ``mask_image`` without ``image``, a family not in :data:`EDIT_FAMILY_TABLE`, an inpainting
    pipeline without ``mask_image``, a model with mask input channels (Fill), strength outside (0, 1] or so small
    that ``int(N - N s)`` drops all ``N`` steps (:func:`check_steps_left`), an image or mask the pipeline's processors
    cannot read, a mask with nothing to repaint, image or mask counts that do not divide the batch."""
    pipe = getattr(adapter, "pipe", None)
    kind = edit_kind(pipe) if pipe is not None else None
    if image is None:
        if kind is not None:
            raise ValueError(f"{type(pipe).__name__} is an editing pipeline: give image= (and strength=), or use "
                             "the text-to-image pipeline")
        for name, value in (("strength", strength), ("mask_image", mask_image)):
            if value is not None:
                raise ValueError(f"{name}= goes with image= (img2img); got {name} without an image")
        return None
    if adapter.family not in EDIT_FAMILIES or adapter.is_video or pipe is None:
        raise ValueError(f"image= (img2img) is supported for the families {', '.join(EDIT_FAMILIES)} only; "
                         f"{adapter.family} takes no image (issue 23 lists the editing pipelines still to come)")
    fam = EDIT_FAMILY_TABLE[adapter.family]
    inpaint = kind == "inpaint" or mask_image is not None
    if inpaint and mask_image is None:
        raise ValueError(f"{type(pipe).__name__} is an inpainting pipeline: give mask_image= (white = repaint)")
    if inpaint and pipe.transformer.config.in_channels != _vae_channels(pipe.vae) * fam.pack:
        raise ValueError("inpainting models that take the mask and masked image as extra input channels do not run "
                         "as blending inpainting: run FLUX.1 Fill as FluxFillPipeline(**pipe.components); 33-channel "
                         "SD3 inpainting is not supported")
    cls = fam.inpaint if inpaint else fam.img2img
    if strength is None:
        strength = _call_default(cls, "strength")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
        raise TypeError(f"strength={strength!r} is not allowed: need a number in (0, 1]")
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength!r} is not allowed: need 0 < strength <= 1 (the fraction of the "
                         "schedule re-run from the noised image; 0 would leave the image as it is)")
    steps = int(_call_default(cls, "num_inference_steps") if num_inference_steps is None else num_inference_steps)
    check_steps_left(strength, steps)
    if isinstance(image, torch.Tensor) and image.ndim in (3, 4) and image.shape[-3] != 3:
        raise ValueError(f"image has shape {tuple(image.shape)}: give RGB pixels (3, H, W) or (n, 3, H, W) "
                         "(latents are not taken)")
    pixels = _preprocess(pipe.image_processor, image, "image", "image processor", 3, height, width,
                         "give a PIL image, a numpy array (H, W, 3), a float RGB tensor, or a list of them")
    n = pixels.shape[0]
    if batch % n:
        raise ValueError(f"got {n} images for a batch of {batch} (prompts x num_images_per_prompt): the number of "
                         "images must divide the batch (they are tiled over it, as the diffusers pipelines do)")
    mask = _check_mask(pipe, mask_image, height, width, batch) if inpaint else None
    import diffusers

    msl = inspect.signature(getattr(diffusers, cls).__call__).parameters.get("max_sequence_length")
    return EditSpec("inpaint" if inpaint else "img2img", pixels, strength, steps,
                    float(_call_default(cls, fam.guidance)), mask, None if msl is None else msl.default)


def check_not_empty(value, name: str) -> None:
    """ValueError naming argument ``name`` (and the list index) for an image without pixels: a PIL image of size 0 or
    an array / tensor with a zero dimension (an image processor would resize it into a blank image, or divide by its
    size), or an empty list."""
    if isinstance(value, list) and not value:
        raise ValueError(f"{name}=[] holds no image: give an image, or a list of at least one")
    for i, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
        dims = item.size if hasattr(item, "getbbox") else getattr(item, "shape", None)  # PIL: (W, H); arrays: shape
        if dims is not None and 0 in tuple(dims):
            where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
            raise ValueError(f"{where} is empty (size {tuple(dims)}): give an image with pixels")


def _preprocess(proc, value, name: str, proc_name: str, channels: int, height: int, width: int,
                hint: str) -> torch.Tensor:
    """``proc.preprocess(value)`` (a diffusers image processor) as ``(n, channels, height, width)`` float32 on the CPU;
    TypeError naming argument ``name`` for what the processor cannot read (``hint``: what to give instead),
    ValueError for another shape, or for an empty image (:func:`check_not_empty`)."""
    check_not_empty(value, name)
    try:
        out = proc.preprocess(value, height=height, width=width)
    except (TypeError, ValueError, AttributeError, OSError, RuntimeError, NotImplementedError) as e:
        raise TypeError(f"{name}={_kind(value)}: the pipeline's {proc_name} cannot read it ({e}); {hint}") from None
    out = out.to("cpu", torch.float32)
    if out.ndim != 4 or out.shape[1] != channels or tuple(out.shape[-2:]) != (height, width):
        modes = sorted({item.mode for item in (value if isinstance(value, (list, tuple)) else [value])
                        if hasattr(item, "getbbox") and hasattr(item, "mode")})  # PIL images
        hint = (f" (PIL image mode {', '.join(modes)}: convert it, e.g. image.convert('RGB'))"
                if channels == 3 and modes and modes != ["RGB"] else "")
        raise ValueError(f"{name} preprocessed to shape {tuple(out.shape)}; expected (n, {channels}, {height}, "
                         f"{width}){hint}")
    if not bool(torch.isfinite(out).all()):  # a mask's Inf is binarised to 1 by now; NaN is kept by every step
        raise ValueError(f"{name} contains NaN" + (" or Inf" if channels == 3 else "") + " values")
    if channels == 3:
        check_pixel_range(out, name)
    return out


def check_pixel_range(pixels: torch.Tensor, name: str) -> None:
    """ValueError naming argument ``name`` when preprocessed ``pixels`` leave [-1, 1] (NaN is left to the callers'
    finiteness check): the image processors map numpy / tensor pixels in [0, 1] to [-1, 1] (a tensor already in
    [-1, 1] is kept), so 8-bit values (0..255) would be VAE-encoded as garbage, without an error."""
    hi = float(pixels.abs().amax()) if pixels.numel() else 0.0
    if hi > 1.0 + 1e-3:
        raise ValueError(f"{name} has pixel values of magnitude up to {hi:g} after preprocessing (the image processor "
                         "maps [0, 1] to [-1, 1]): give numpy arrays and tensors as floats in [0, 1] (8-bit values "
                         "0..255: divide by 255, or give a PIL image)")


def _kind(value) -> str:
    """``value``'s type for an error message, with the dtype of a tensor or array (torch's resize takes no bool or
    integer tensors)."""
    dtype = getattr(value, "dtype", None)
    return type(value).__name__ + (f" of dtype {dtype}" if dtype is not None else "")


def _check_mask(pipe, mask_image, height: int, width: int, batch: int) -> torch.Tensor:
    """The inpainting mask as FluxInpaintPipeline reads it: grey, resized to ``height`` x ``width``, binarised at
    0.5 (white = repaint): ``(n, 1, H, W)`` float32 on the CPU. ValueError for a mask with no pixel to repaint or a
    count that does not divide the batch; TypeError for what the processor cannot read."""
    proc = getattr(pipe, "mask_processor", None)
    if proc is None:
        from diffusers.image_processor import VaeImageProcessor

        proc = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2,
                                 vae_latent_channels=_vae_channels(pipe.vae), do_normalize=False,
                                 do_binarize=True, do_convert_grayscale=True)
    mask = _preprocess(proc, mask_image, "mask_image", "mask processor", 1, height, width,
                       "give a PIL image, a numpy array or a float tensor (white = repaint)")
    if not bool((mask > 0.5).flatten(1).any(1).all()):
        raise ValueError(f"mask_image has no pixel to repaint at {width}x{height} (width x height; every mask needs "
                         "white pixels: white = repaint; a small white area can vanish when the mask is resized to "
                         "the output size)")
    if batch % mask.shape[0]:
        hint = (f" (a 3-D tensor is read as (n, H, W) masks: give one mask as (1, {height}, {width}) or (H, W))"
                if isinstance(mask_image, torch.Tensor) and mask_image.ndim == 3 else "")
        raise ValueError(f"got {mask.shape[0]} masks for a batch of {batch}: the number of masks must divide it"
                         + hint)
    return mask


# --------------------------------------------------------------------------------------------- encoding
def encode_images(adapter, spec: EditSpec, generator, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """VAE-encode the source: ``(batch, C, h, w)`` normalised latents in the VAE's output dtype (a video VAE's frame
    axis removed).

    ``generator``: one generator (one encode of the ``n`` images, tiled to ``batch``: the pipelines' way) or a list
    of ``batch`` (image ``i % n`` encoded with generator ``i``: each image of a batch equals its single run; with
    ``n == batch`` this is the pipelines' way, with fewer images FluxImg2ImgPipeline would draw all from
    generator 0 and SD3's pipeline fails)."""
    vae = adapter.pipe.vae
    frames = EDIT_FAMILY_TABLE[adapter.family].frames
    pixels = spec.pixels.to(adapter.device, dtype)
    n = pixels.shape[0]

    def sample(x, gen):
        out = vae.encode(x[:, :, None] if frames else x)  # a video VAE: one frame (B, 3, 1, H, W)
        dist = getattr(out, "latent_dist", None)
        return dist.sample(gen) if dist is not None else out.latents

    if isinstance(generator, (list, tuple)):
        z = torch.cat([sample(pixels[i % n: i % n + 1], g) for i, g in enumerate(generator)])
    else:
        z = sample(pixels, generator)
        if z.shape[0] < batch:
            z = torch.cat([z] * (batch // z.shape[0]))
    if frames:  # Qwen-Image: per-channel (z - latents_mean) / latents_std, in z's dtype, then the frame axis off
        shape = (1, z.shape[1], 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        return ((z - mean) * inv_std)[:, :, 0]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def start_sigma(adapter, spec: EditSpec, image_seq_len: int) -> tuple[int, torch.Tensor]:
    """``(t_start, sigma*)``: the dropped steps and the pipeline's sigma there (0-dim float32)."""
    t0 = start_index(spec.steps, spec.strength)
    _, sigmas = adapter.baseline_schedule(spec.steps, image_seq_len)
    return t0, sigmas[t0]


def noised(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """diffusers' ``scale_noise``: ``sigma noise + (1 - sigma) latents`` in ``latents``' dtype (noise cast to it, as
    the scheduler computes in the sample's dtype), cast to noise's."""
    s = sigma.to(latents.device, latents.dtype)
    return (s * noise.to(latents.dtype) + (1.0 - s) * latents).to(noise.dtype)


# --------------------------------------------------------------------------------------------- stage mapping
@dataclass(frozen=True)
class EditStages:
    """RALU stages of an edit starting at ``t_start`` (paper time, ``1 - sigma*``). ``entry``: the first stage
    run (0-based); ``sigmas[k]``: stage k's float64 sigmas ``(N'_k + 1,)`` (None for a skipped stage)."""

    entry: int
    t_start: float
    sigmas: tuple

    @property
    def steps(self) -> tuple[int, int, int]:
        """Model calls per stage (0 for skipped stages)."""
        return tuple(0 if s is None else len(s) - 1 for s in self.sigmas)


def truncated_sigmas(schedule: RaluSchedule, k: int, t_start: float) -> np.ndarray:
    """Stage ``k``'s sigmas from ``max(s_k, t_start)`` to ``e_k``: ``(n + 1,)`` float64, spaced uniformly in the
    stage's unshifted sigma (shift ``h_k``); ``n = ceil(N_k * f)`` (at least 1) where ``f`` is the part of the
    stage's unshifted sigma range left. Equals ``schedule.stage_sigmas(k)`` when ``t_start <= s_k``."""
    if t_start <= schedule.starts[k]:
        return schedule.stage_sigmas(k)
    h = schedule.shifts[k]
    full_hi, lo, hi = 1.0 - schedule.starts[k], 1.0 - schedule.ends[k], 1.0 - t_start
    unshift = lambda s: s / (h - (h - 1.0) * s)  # noqa: E731
    frac = (unshift(hi) - unshift(lo)) / (unshift(full_hi) - unshift(lo))
    n = max(1, math.ceil(schedule.steps[k] * frac - 1e-9))
    sig = np.linspace(unshift(hi), unshift(lo), n + 1)
    sig = h * sig / (1.0 + (h - 1.0) * sig)
    sig[0], sig[-1] = hi, lo
    return sig


def edit_stages(schedule: RaluSchedule, sigma_start: float) -> EditStages:
    """Map the three stages onto ``t in [1 - sigma_start, 1]``: enter the last stage ``k`` with ``s_k <= t*``
    (stages before it are skipped), truncate it (:func:`truncated_sigmas`), keep the later stages whole."""
    sigma_start = float(sigma_start)
    if not 0.0 < sigma_start <= 1.0:
        raise ValueError(f"sigma_start={sigma_start!r} is not allowed: need 0 < sigma <= 1")
    t = 1.0 - sigma_start
    entry = max(k for k in range(3) if schedule.starts[k] <= t)
    sig = tuple(None if k < entry else truncated_sigmas(schedule, k, t) if k == entry else schedule.stage_sigmas(k)
                for k in range(3))
    return EditStages(entry, t, sig)


def edit_cost(schedule: RaluSchedule, sigma_start: float, tokens_full: int) -> tuple[tuple[int, int], ...]:
    """``((model calls, image tokens per call), ...)`` of the three stages of an edit (0 calls when skipped)."""
    m, r = tokens_full, schedule.ratio
    k = int(m // 4 * r)
    per = (m // 4, 4 * k + (m // 4 - k), m)
    return tuple((n, per[i]) for i, n in enumerate(edit_stages(schedule, sigma_start).steps))


# --------------------------------------------------------------------------------------------- sampler
def run_edit(adapter, cond, noise: torch.Tensor, latents: torch.Tensor, plan, generators, *,
             velocity: Callable | None = None, decode: Callable | None = None):
    """Sample an editing :class:`~ralu_runtime.api.CallPlan` (``plan.edit`` set): the baseline's remaining steps
    from the noised source (``plan.schedule`` None; inpainting blends the unmasked part with the re-noised source
    after every step, as FluxInpaintPipeline) or :func:`sample_ralu_edit`. ``noise`` / ``latents``:
    ``(B, C, h, w)``. Returns the sampler's result."""
    from .sampler import sample_baseline

    p = adapter.patch_size
    spec = plan.edit
    t0, sigma = start_sigma(adapter, spec, (noise.shape[-2] // p) * (noise.shape[-1] // p))
    mask = None if spec.mask is None else mask_latents(spec, noise.shape[0], noise.shape[-2:], noise.dtype,
                                                       noise.device)
    if plan.schedule is None:
        if mask is None:
            return sample_baseline(adapter, cond, noised(latents, noise, sigma), plan.steps, solver=plan.solver,
                                   progress=plan.progress, velocity=velocity, start=t0)
        return _inpaint_baseline(adapter, cond, noise, latents, mask, plan, t0, velocity)
    from .channel_cond import region_mask

    regions = region_mask(getattr(plan, "channels", None), noise.shape[0], noise.shape[-2:], noise.device)
    return sample_ralu_edit(adapter, cond, noise, latents, spec, plan.schedule, float(sigma), generators,
                            noise_variant=plan.noise, edge_map=plan.edge_map, edge_detector=plan.edge_detector,
                            transition_impl=plan.transition_impl, solver=plan.solver, progress=plan.progress,
                            velocity=velocity, decode=decode, region_source=plan.region_source, mask=mask,
                            region_mask=regions)


def mask_latents(spec: EditSpec, batch: int, latent_hw, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The inpainting mask at latent resolution, as FluxInpaintPipeline makes it: nearest resize of the binarised
    mask to ``latent_hw``, cast to ``dtype`` on ``device``, tiled to ``batch``: ``(B, 1, h, w)`` (1 = repaint)."""
    m = F.interpolate(spec.mask, size=tuple(latent_hw))
    return torch.cat([m] * (batch // m.shape[0])).to(device=device, dtype=dtype)


def _blend(mask: torch.Tensor, source: Callable, sigmas: torch.Tensor) -> Callable:
    """``after_step(i, x)``: ``(1 - mask) source(sigmas[i + 1]) + mask x``, the pipeline's inpainting blend (the
    kept part is the source noised to the level the step reached; clean after the last step)."""
    def after_step(i, x):
        return (1 - mask) * source(sigmas[i + 1]) + mask * x
    return after_step


def _inpaint_baseline(adapter, cond, noise, latents, mask, plan, t0: int, velocity):
    """FluxInpaintPipeline's loop: the remaining steps from the noised source, blended after every step."""
    from .adapters.base import TokenGrid
    from .sampler import SamplerResult, Clock, check_finite, run_stage

    clock = Clock(noise.device)
    b, c = noise.shape[:2]
    n, z = adapter.pack(noise), adapter.pack(latents)
    m = adapter.pack(mask.expand(-1, c, -1, -1).contiguous())
    p = adapter.patch_size
    fine_hw = (noise.shape[-2] // p, noise.shape[-1] // p)
    timesteps, sigmas = adapter.baseline_schedule(plan.steps, fine_hw[0] * fine_hw[1])
    timesteps, sigmas = timesteps[t0:], sigmas[t0:]
    x = noised(z, n, sigmas[0])
    grid = TokenGrid(grid_positions(*fine_hw, device=x.device).expand(b, -1, -1), fine_hw, None, raster=True)
    with clock("baseline", steps=len(timesteps), tokens=x.shape[1]):
        x, _ = run_stage(adapter, x, grid, timesteps, sigmas, cond, solver=plan.solver, desc="inpaint",
                         progress=plan.progress, velocity=velocity,
                         after_step=_blend(m, lambda s: noised(z, n, s), sigmas))
    check_finite(x, "the baseline sampler")
    return SamplerResult(x, None, clock.records)


def _as_tensors(sig: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(sig[:-1] * 1000.0, dtype=torch.float32, device=device),
            torch.tensor(sig, dtype=torch.float32, device=device))


def _coarse(x: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Coarse (half-resolution) noised latent ``(B, C, h/2, w/2)``: the 2x2 mean of the clean latent ``x``, noised
    at ``sigma`` with the nearest 2x subsample of the full-resolution ``noise`` (float32 math, noise's dtype)."""
    data = F.avg_pool2d(x.to(torch.float32), 2)
    return (sigma * noise[..., ::2, ::2].to(torch.float32) + (1.0 - sigma) * data).to(noise.dtype)


def _fine(x: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """Full-resolution noised latent ``sigma noise + (1 - sigma) x`` (float32 math, noise's dtype)."""
    return (sigma * noise.to(torch.float32) + (1.0 - sigma) * x.to(torch.float32)).to(noise.dtype)


def _mixed_index(layout: TokenLayout):
    """Fine raster index of every stage-2 child ``(B, 4k)`` (q = 2 dy + dx) and the positions of the stage-2 tokens
    ``(B, L2, 2)`` float32 (coarse-grid units, children at ``+0.5 (dy, dx)``)."""
    hc, wc = layout.coarse_hw
    sel, rest = layout.selected, layout.rest                      # (B, k), (B, M - k)
    i, j = sel // wc, sel % wc
    dy = torch.tensor([0, 0, 1, 1], device=sel.device)
    dx = torch.tensor([0, 1, 0, 1], device=sel.device)
    rows = (2 * i[..., None] + dy).flatten(1)                     # (B, 4k) fine rows
    cols = (2 * j[..., None] + dx).flatten(1)
    pos = torch.cat([torch.stack([rows, cols], -1).float() / 2, torch.stack([rest // wc, rest % wc], -1).float()],
                    dim=1)
    return rows * (2 * wc) + cols, pos.contiguous()


def _mix(layout: TokenLayout, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """Stage-2 tokens ``(B, L2, C)`` from fine raster tokens ``(B, 4M, C)`` (the children) and coarse raster tokens
    ``(B, M, C)`` (the rest), in the layout's order."""
    fidx, _ = _mixed_index(layout)
    c = fine.shape[-1]
    return torch.cat([fine.gather(1, fidx[..., None].expand(-1, -1, c)),
                      coarse.gather(1, layout.rest[..., None].expand(-1, -1, c))], dim=1)


def mixed_start(adapter, layout: TokenLayout, latents: torch.Tensor, noise: torch.Tensor, sigma):
    """Stage-2 tokens and positions built from the clean latent at ``sigma``: children of the selected tokens are
    the noised full-resolution tokens, the others the noised 2x2-mean tokens (layout order, coarse-grid positions,
    children at ``+0.5 (dy, dx)``). Returns ``(tokens (B, L2, C), positions (B, L2, 2) float32)``."""
    x = _mix(layout, adapter.pack(_fine(latents, noise, sigma)), adapter.pack(_coarse(latents, noise, sigma)))
    return x, _mixed_index(layout)[1]


def mask_boost(adapter, mask: torch.Tensor) -> torch.Tensor:
    """Mask-first region choice: ``(B, M)`` float32, a large value on every coarse token that holds a pixel to
    repaint or touches one (dilated by one coarse block), 0 elsewhere; added to the edge scores, it puts those tokens
    first among the regions upsampled at the end of stage 1 (the edge scores still order the rest, and order the
    masked ones among themselves when they outnumber the budget). ``mask``: ``(B, 1, h, w)`` latent mask."""
    block = 2 * adapter.patch_size
    coarse = F.max_pool2d(mask.to(torch.float32), block)
    grown = F.max_pool2d(coarse, 3, stride=1, padding=1)
    return grown.flatten(1) * 1e6


def source_regions(adapter, spec: EditSpec, latents: torch.Tensor, k: int, m: int, generators, *, edge_map: str,
                   edge_detector: str, region_source: str, boost: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, k)`` coarse tokens to upsample first, chosen from the source image (stage 1 skipped): Canny on the
    image at half resolution (blocks of patch x VAE factor pixels, as stage 1's preview), or with
    ``region_source="latent"`` the Sobel scores of the 2x2-mean latents; ``boost`` ``(B, M)`` added (mask-first);
    jittered top-k per image."""
    from .edges import edge_scores, latent_edge_scores, select_top_blocks

    b = latents.shape[0]
    if not 0 < k < m:
        return torch.arange(m, device=latents.device).expand(b, m)[:, :k]
    if region_source == "latent":
        scores = latent_edge_scores(F.avg_pool2d(latents.to(torch.float32), 2), adapter.patch_size)
    else:
        px = spec.pixels
        px = torch.cat([px] * (b // px.shape[0]))
        half = F.interpolate(px, scale_factor=0.5, mode="area")
        scores = edge_scores(half, adapter.patch_size * adapter.vae_scale_factor, mapping=edge_map,
                             detector=edge_detector)
    scores = scores.reshape(b, m).to(torch.float32)
    if boost is not None:
        scores = scores + boost.to(scores.device)
    return select_top_blocks(scores.to(latents.device), k, generators)


def sample_ralu_edit(adapter, cond, noise: torch.Tensor, latents: torch.Tensor, spec: EditSpec,
                     schedule: RaluSchedule, sigma_start: float, generators, *, noise_variant: str = "reference",
                     edge_map: str = "unit", edge_detector: str = "opencv", transition_impl: str = "auto",
                     solver: str = "euler", progress: bool = True, velocity: Callable | None = None,
                     decode: Callable | None = None, region_source: str = "decode",
                     mask: torch.Tensor | None = None, region_mask: torch.Tensor | None = None,
                     region_choice: str = "mask-first") -> Any:
    """RALU img2img / inpainting: the stages of :func:`edit_stages` from the clean latents ``latents``
    ``(B, C, h, w)`` and the full-resolution ``noise`` (same shape) at ``sigma_start``.

    ``mask`` ``(B, 1, h, w)`` (inpainting, 1 = repaint): the regions upsampled first are the masked tokens dilated by
    a block (:func:`mask_boost`), then the edges; in every stage the kept part follows the pipeline's blend with the
    source re-noised at the stage's token set (2x2 mean for coarse tokens, max-pooled mask), after every step and at
    the start of a stage entered through a transition. ``region_mask`` ``(B, 1, h, w)`` (FLUX.1 Fill, whose model
    inpaints by itself): the mask-first region choice only, no blend. ``region_choice``: "mask-first" (default, the
    above) or "edge-only" (the mask is ignored for the region choice, the blend is unchanged: same tokens, same
    FLOPs; for measuring, ``benchmarks/inpaint_oracle.py``). Returns a :class:`ralu_runtime.sampler.SamplerResult` (final
    fine raster tokens; the layout when stage 2 ran)."""
    from .adapters.base import TokenGrid
    from .sampler import SamplerResult, Clock, apply_transition, check_finite, draw_seeds, run_stage, stage2_layout

    if region_choice not in INPAINT_REGION_CHOICES:
        raise ValueError(f"region_choice={region_choice!r} is not allowed; choose one of {INPAINT_REGION_CHOICES}")
    plan = edit_stages(schedule, sigma_start)
    sigma = float(sigma_start)
    clock = Clock(noise.device)
    b, ch = noise.shape[:2]
    latent_hw = noise.shape[-2:]
    p = adapter.patch_size
    coarse_hw = (latent_hw[0] // (2 * p), latent_hw[1] // (2 * p))
    fine_hw = (2 * coarse_hw[0], 2 * coarse_hw[1])
    m = coarse_hw[0] * coarse_hw[1]
    k = int(m * schedule.ratio)
    stage = dict(solver=solver, progress=progress, velocity=velocity)
    layout = None
    x = pos = None
    boost = None
    if (mask is not None or region_mask is not None) and region_choice == "mask-first":
        boost = mask_boost(adapter, mask if mask is not None else region_mask)
    if mask is not None:
        pack_mask = lambda t: adapter.pack(t.expand(-1, ch, -1, -1).contiguous())  # noqa: E731
        fine_m, coarse_m = pack_mask(mask), pack_mask(F.max_pool2d(mask, 2))
        fine_src = lambda s: adapter.pack(_fine(latents, noise, s))  # noqa: E731
        coarse_src = lambda s: adapter.pack(_coarse(latents, noise, s))  # noqa: E731

    def blended(k_stage, sig, x, enter: bool):
        """``(x, after_step)`` of stage ``k_stage``: x blended at the stage's start (``enter``), and the per-step
        blend; x and None without a mask."""
        if mask is None:
            return x, None
        if k_stage == 0:
            mk, src = coarse_m, coarse_src
        elif k_stage == 1:
            mk = _mix(layout, fine_m, coarse_m)
            src = lambda s: _mix(layout, fine_src(s), coarse_src(s))  # noqa: E731
        else:
            mk, src = fine_m, fine_src
        if enter:
            x = (1 - mk) * src(sig[0]) + mk * x
        return x, _blend(mk, src, sig)

    if plan.entry == 0:
        x = adapter.pack(_coarse(latents, noise, sigma))
        pos = grid_positions(*coarse_hw, device=x.device).expand(b, -1, -1).contiguous()
        ts, sig = _as_tensors(plan.sigmas[0], x.device)
        x, after = blended(0, sig, x, False)
        with clock("stage1", steps=len(ts), tokens=m):
            x, v = run_stage(adapter, x, TokenGrid(pos, coarse_hw, None, raster=True), ts, sig, cond,
                             desc="RALU edit stage 1/3", after_step=after, **stage)
        check_finite(x, "RALU stage 1")
        with clock("edges", tokens=k):
            layout = stage2_layout(adapter, x, v, float(sig[-1]), latent_hw, coarse_hw, k, m, generators,
                                   edge_map=edge_map, edge_detector=edge_detector, decode=decode,
                                   region_source=region_source, boost=boost)
        with clock("transition12", tokens=layout.stage_lengths[1]):
            x, pos = apply_transition(x, pos, layout.transition_12(), schedule.boundary(0),
                                      draw_seeds(generators, x.device), noise=noise_variant, impl=transition_impl)
    elif plan.entry == 1:
        with clock("edges", tokens=k):
            sel = source_regions(adapter, spec, latents, k, m, generators, edge_map=edge_map,
                                 edge_detector=edge_detector, region_source=region_source, boost=boost)
            layout = TokenLayout(coarse_hw, sel.to(noise.device))
        x, pos = mixed_start(adapter, layout, latents, noise, sigma)
    if plan.entry <= 1:
        ts, sig = _as_tensors(plan.sigmas[1], x.device)
        x, after = blended(1, sig, x, plan.entry == 0)
        with clock("stage2", steps=len(ts), tokens=x.shape[1]):
            x, v = run_stage(adapter, x, TokenGrid(pos, coarse_hw, layout.stage2_fine_mask()), ts, sig, cond,
                             desc="RALU edit stage 2/3", after_step=after, **stage)
        check_finite(x, "RALU stage 2")
        with clock("transition23", tokens=4 * m):
            x, pos = apply_transition(x, pos, layout.transition_23(), schedule.boundary(1),
                                      draw_seeds(generators, x.device), noise=noise_variant, impl=transition_impl)
    else:
        x = adapter.pack(_fine(latents, noise, sigma))
        pos = grid_positions(*fine_hw, device=x.device).expand(b, -1, -1).contiguous()
    ts, sig = _as_tensors(plan.sigmas[2], x.device)
    x, after = blended(2, sig, x, plan.entry <= 1)
    with clock("stage3", steps=len(ts), tokens=x.shape[1]):
        x, _ = run_stage(adapter, x, TokenGrid(pos, fine_hw, None, raster=True), ts, sig, cond,
                         desc="RALU edit stage 3/3", after_step=after, **stage)
    check_finite(x, "RALU stage 3")
    return SamplerResult(x, layout, clock.records)
