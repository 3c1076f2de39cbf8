"""FLUX.1 Kontext (``diffusers.FluxKontextPipeline``): reference-image editing with RALU (design: docs/editing.md,
"FLUX.1 Kontext").

Kontext does not noise the image it edits: it generates from pure noise, as FLUX.1 text-to-image, with the reference
image's latent tokens appended to the image sequence as conditioning. What a call does, in the pipeline's order (so
``speedup=None`` reproduces ``FluxKontextPipeline``):

1. the output size: ``height`` / ``width`` (default the pipeline's ``default_sample_size * vae_scale_factor``) give
   only the aspect ratio ``a = width / height``; the size is ``round(sqrt(max_area a))`` x ``round(sqrt(max_area /
   a))`` rounded down to multiples of ``2 * vae_scale_factor`` (:func:`kontext_size`; ``max_area`` default 1024**2);
2. the reference: the first image's size, or with ``auto_resize`` (default) the preferred Kontext resolution of the
   nearest aspect ratio (diffusers' ``PREFERRED_KONTEXT_RESOLUTIONS``), rounded down to multiples of
   ``2 * vae_scale_factor``; every image resized to it and preprocessed to ``(n, 3, Hr, Wr)`` in [-1, 1];
3. it is VAE-encoded to the posterior's mode (no draw from the generator), normalised ``(z - shift) * scale``, tiled
   to the batch (``[i0, i1, i0, i1]``) and packed to ``(B, Lr, C)`` tokens with ids ``(1, row, col)`` (the first id
   coordinate 1 marks reference tokens; generated tokens have 0);
4. the noise is drawn and sampled as text-to-image: every model call runs on ``[generated ; reference]`` tokens
   with ids ``[generated ids ; reference ids]`` and the velocity of the generated tokens only is kept.

The reference tokens travel in the call's :class:`~ralu_runtime.adapters.base.Conditioning` (``data["ref_tokens"]``
``(B, Lr, C)``, ``data["ref_ids"]`` ``(B, Lr, 3)`` float32), which :meth:`FluxAdapter.velocity` appends to the
sequence and strips from the output; the sampler does not see them. With RALU only the generated tokens go coarse
-> mixed -> fine (their ids the stage's coarse / mixed / fine positions, as text-to-image); the reference tokens stay
at full resolution with the pipeline's ids through every stage.
"""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass

import numpy as np
import torch

KONTEXT_CLASS = "FluxKontextPipeline"


def is_kontext(pipe) -> bool:
    """True for a ``FluxKontextPipeline`` (or a subclass)."""
    return pipe is not None and any(c.__name__ == KONTEXT_CLASS for c in type(pipe).__mro__)


def kontext_default(name: str):
    """Default of ``FluxKontextPipeline.__call__`` argument ``name`` (steps 28, guidance 3.5, max_area 1024**2)."""
    import diffusers

    return inspect.signature(getattr(diffusers, KONTEXT_CLASS).__call__).parameters[name].default


@dataclass(frozen=True)
class KontextSpec:
    """A checked Kontext reference: ``pixels`` ``(n, 3, Hr, Wr)`` float32 in [-1, 1] on the CPU."""

    pixels: torch.Tensor


def _multiple(pipe) -> int:
    return 2 * pipe.vae_scale_factor


def kontext_size(pipe, height, width, max_area) -> tuple[int, int]:
    """The ``(height, width)`` pixels ``FluxKontextPipeline`` generates for these arguments (None: its defaults):
    the aspect ratio of ``height`` x ``width`` at ``max_area`` pixels, rounded down to multiples of ``2 x VAE
    factor``. TypeError / ValueError naming the value for a non-integer or non-positive size or area."""
    default = pipe.default_sample_size * pipe.vae_scale_factor
    height = default if height is None else height
    width = default if width is None else width
    max_area = kontext_default("max_area") if max_area is None else max_area
    for name, val in (("height", height), ("width", width), ("max_area", max_area)):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral):
            raise TypeError(f"{name}={val!r} is not allowed: need a positive integer number of pixels")
        if val <= 0:
            raise ValueError(f"{name}={val} is not allowed: need a positive number of pixels")
    a = width / height
    m = _multiple(pipe)
    w = round((max_area * a) ** 0.5) // m * m
    h = round((max_area / a) ** 0.5) // m * m
    if h <= 0 or w <= 0:
        raise ValueError(f"max_area={max_area} with height={height}, width={width} gives a {h}x{w} image: "
                         f"increase max_area")
    return int(h), int(w)


def check_kontext(pipe, *, image, strength, mask_image, batch: int, auto_resize) -> KontextSpec | None:
    """Check the reference arguments of a Kontext ``generate`` call (before any model work); None without ``image``
    (the pipeline's text-to-image). ValueError / TypeError with the reason for ``strength`` / ``mask_image`` (Kontext
    generates from pure noise and takes no mask), latents as ``image``, what the image processor cannot read, a
    count of images that does not divide the batch, a reference smaller than one token."""
    if strength is not None:
        raise ValueError(f"strength={strength!r} does not apply to FLUX.1 Kontext: it generates from pure noise with "
                         "the image as reference tokens (conditioning), not from the noised image; drop strength "
                         "(img2img with strength: FluxImg2ImgPipeline)")
    if mask_image is not None:
        raise ValueError("mask_image= does not apply to FLUX.1 Kontext (the prompt says what to change; it takes "
                         "no mask); drop mask_image (masked editing: FluxInpaintPipeline)")
    if auto_resize is not None and not isinstance(auto_resize, bool):
        raise TypeError(f"auto_resize={auto_resize!r}: use True or False")
    if image is None:
        return None
    auto_resize = kontext_default("_auto_resize") if auto_resize is None else auto_resize
    if isinstance(image, torch.Tensor) and image.ndim in (3, 4) and image.shape[-3] != 3:
        raise ValueError(f"image has shape {tuple(image.shape)}: give RGB pixels (3, H, W) or (n, 3, H, W) "
                         "(latents are not taken)")
    if isinstance(image, (list, tuple)) and len(image) == 0:
        raise ValueError("image is an empty list: give one reference image or a list of them")
    from .editing import _kind, check_not_empty

    check_not_empty(image, "image")
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    proc, m = pipe.image_processor, _multiple(pipe)
    # one image without a batch axis, numpy (H, W, 3) or a tensor (3, H, W): the processor's size reading and resize
    # take batched arrays only (they read (H, W, 3) as a batch of H grey images); a view with the axis added
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        image = image[None]
    elif isinstance(image, torch.Tensor) and image.ndim == 3:
        image = image[None]
    try:
        first = image[0] if isinstance(image, list) else image
        ih, iw = proc.get_default_height_width(first)  # rounded down to the VAE's multiple: 0 for a tiny image
        if ih <= 0 or iw <= 0:
            raise ValueError(f"the reference image is smaller than {m}x{m} pixels (one token) on a side")
        if auto_resize:
            _, iw, ih = min((abs(iw / ih - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        iw, ih = iw // m * m, ih // m * m
        if ih <= 0 or iw <= 0:
            raise ValueError(f"the reference image is smaller than {m}x{m} pixels (one token)")
        pixels = proc.preprocess(proc.resize(image, ih, iw), ih, iw)
    except ValueError as e:
        if "one token" in str(e):
            raise
        raise TypeError(f"image={_kind(image)}: the pipeline's image processor cannot read it ({e}); give a "
                        "PIL image, a numpy array (H, W, 3), a float RGB tensor, or a list of them") from None
    except (TypeError, AttributeError, OSError, IndexError, RuntimeError, NotImplementedError) as e:
        raise TypeError(f"image={_kind(image)}: the pipeline's image processor cannot read it ({e}); give a "
                        "PIL image, a numpy array (H, W, 3), a float RGB tensor, or a list of them") from None
    pixels = pixels.to("cpu", torch.float32)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"image preprocessed to shape {tuple(pixels.shape)}; expected (n, 3, {ih}, {iw})")
    if not bool(torch.isfinite(pixels).all()):
        raise ValueError("image contains NaN or Inf values")
    from .editing import check_pixel_range

    check_pixel_range(pixels, "image")
    if batch % pixels.shape[0]:
        raise ValueError(f"got {pixels.shape[0]} images for a batch of {batch} (prompts x num_images_per_prompt): the "
                         "number of reference images must divide the batch (they are tiled over it, as "
                         "FluxKontextPipeline does)")
    return KontextSpec(pixels)


def reference_ids(h: int, w: int, batch: int, device=None) -> torch.Tensor:
    """Ids of ``h`` x ``w`` reference tokens ``(batch, h w, 3)`` float32: ``(1, row, col)`` in raster order."""
    ids = torch.zeros(h, w, 3, dtype=torch.float32, device=device)
    ids[..., 0] = 1.0
    ids[..., 1] = torch.arange(h, dtype=torch.float32, device=device)[:, None]
    ids[..., 2] = torch.arange(w, dtype=torch.float32, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1).contiguous()


def encode_reference(adapter, spec: KontextSpec, generator, batch: int, dtype: torch.dtype):
    """The reference tokens ``(batch, Lr, C)`` in ``dtype`` and their ids ``(batch, Lr, 3)`` float32, as
    FluxKontextPipeline makes them: the posterior's mode of the ``n`` images (one encode, or one per image when
    ``generator`` is a list, the pipeline's two branches), normalised, tiled to ``batch``, packed 2x2."""
    vae = adapter.pipe.vae
    px = spec.pixels.to(adapter.device, dtype)

    def mode(x):
        out = vae.encode(x)
        dist = getattr(out, "latent_dist", None)
        return dist.mode() if dist is not None else out.latents

    if isinstance(generator, (list, tuple)):
        z = torch.cat([mode(px[i:i + 1]) for i in range(px.shape[0])])
    else:
        z = mode(px)
    z = (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    if z.shape[0] < batch:
        z = torch.cat([z] * (batch // z.shape[0]))
    p = adapter.patch_size
    tokens = adapter.pack(z)
    return tokens, reference_ids(z.shape[-2] // p, z.shape[-1] // p, batch, tokens.device)


def add_reference(adapter, cond, spec: KontextSpec, generator, dtype: torch.dtype):
    """``cond`` with the encoded reference (:func:`encode_reference`) as ``data["ref_tokens"]`` / ``["ref_ids"]``."""
    from .adapters.base import Conditioning

    tokens, ids = encode_reference(adapter, spec, generator, cond.batch, dtype)
    return Conditioning(cond.batch, {**cond.data, "ref_tokens": tokens, "ref_ids": ids})

