"""Channel-concatenated conditioning for FLUX.1 Fill (``FluxFillPipeline``) and FLUX.1 control (``FluxControlPipeline``,
Canny / Depth), with RALU (design: ``docs/editing.md``, section "FLUX.1 Fill and control").

Both pipelines feed the transformer ``[noisy latent tokens ; conditioning tokens]`` on the channel axis (the
transformer's ``in_channels`` are 64 + the conditioning's): FLUX.1 Fill's conditioning is the packed VAE latent of
the masked image (64 channels) and the packed pixel mask (8 x 8 pixels per latent pixel x 2 x 2 patch = 256 channels);
control's is the packed VAE latent of the control image (64 channels).

ralu builds the conditioning once per call at full resolution and at half resolution (:class:`ChannelCond`) and the
adapter concatenates, for every model call, the conditioning tokens of exactly the token set the call runs on
(:meth:`ChannelCond.tokens`: fine raster, coarse raster, or stage 2's mix of children and coarse tokens, read from the
call's :class:`~ralu_runtime.adapters.base.TokenGrid`), so every sampler, stage and layout gets it:

* fine tokens: the pipeline's own conditioning tokens;
* coarse tokens: the latents' 2x2 mean (the same measurement as RALU's coarse latent and as inpainting's coarse
  source), packed; Fill's mask channels are the pixel mask at **half resolution** (2x2 max: a half-resolution pixel
  with any pixel to repaint is repainted) regrouped 8 x 8 per coarse latent pixel, i.e. exactly the mask channels
  the model would get for the image at half size, in the binary form it was trained on (a 2x2 mean of the 64 mask
  channels would average pixels 8 apart and give fractional values the model never saw).

Draw order (so ``speedup=None`` reproduces the pipelines): Fill encodes the source image (its generator), draws the
noise, then encodes the masked image (``image * (1 - mask)``); control encodes the control image, then draws the
noise.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHANNEL_PIPELINES = {"FluxFillPipeline": "fill", "FluxControlPipeline": "control"}
_DEFAULTS = {"fill": ("FluxFillPipeline", "strength", "num_inference_steps", "guidance_scale"),
             "control": ("FluxControlPipeline", None, "num_inference_steps", "guidance_scale")}


def channel_kind(pipe) -> str | None:
    """"fill" / "control" for a ``FluxFillPipeline`` / ``FluxControlPipeline`` (or subclass), None otherwise."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in CHANNEL_PIPELINES:
            return CHANNEL_PIPELINES[cls.__name__]
    return None


@dataclass(frozen=True)
class ChannelSpec:
    """A checked Fill / control request. ``pixels``: Fill's source image ``(n, 3, H, W)`` float32 in [-1, 1], or the
    control image tiled to the batch ``(B, 3, H, W)``; ``mask``: Fill's binarised mask ``(n_m, 1, H, W)`` float32 in
    {0, 1} (1 = repaint), None for control."""

    kind: str
    pixels: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def after_noise(self) -> bool:
        """Whether the conditioning is encoded after the noise is drawn (Fill's masked image) or before (control)."""
        return self.kind == "fill"


def _extra_channels(pipe) -> int:
    """Input channels of the FLUX.1 transformer beyond the packed noisy latent (0 for text-to-image models)."""
    cfg = pipe.transformer.config
    return int(cfg.in_channels) - int(cfg.out_channels or cfg.in_channels)


def _control_pixels(pipe, control_image, height: int, width: int) -> torch.Tensor:
    """The control image as FluxControlPipeline's ``prepare_image`` takes it: ``(n, 3, height, width)`` float32 on the
    CPU. A tensor is taken as it is (already in the VAE's [-1, 1], of the output size: diffusers neither resizes nor
    rescales it); anything else goes through the image processor (resize, [0, 1] -> [-1, 1])."""
    if isinstance(control_image, torch.Tensor):
        if control_image.ndim != 4 or control_image.shape[1] != 3 or tuple(control_image.shape[-2:]) != (height, width):
            raise ValueError(f"control_image tensor of shape {tuple(control_image.shape)}: FluxControlPipeline takes a "
                             f"tensor as it is, so it must be (n, 3, {height}, {width}) pixels in [-1, 1] (no resize, "
                             "no rescale); give a PIL image or a numpy array to have it resized and rescaled")
        from .editing import check_pixel_range

        pixels = control_image.detach().to("cpu", torch.float32)
        check_pixel_range(pixels, "control_image")
        if not bool(torch.isfinite(pixels).all()):  # (the processor path checks in _preprocess)
            raise ValueError("control_image contains NaN or Inf values")
        return pixels
    from .editing import _preprocess

    return _preprocess(pipe.image_processor, control_image, "control_image", "image processor", 3, height, width,
                       "give a PIL image, a numpy array (H, W, 3), an (n, 3, H, W) tensor in [-1, 1], or a list of "
                       "images")


def check_channels(adapter, *, image, mask_image, control_image, strength, height: int, width: int, batch: int,
                   num_images_per_prompt: int, num_inference_steps):
    """Check a ``generate`` call on a Fill / control pipeline (before any model work).

    Returns ``(edit, channels)``: for Fill an img2img :class:`~ralu_runtime.editing.EditSpec` (strength, steps and
    guidance defaulting to FluxFillPipeline's 1.0, 50, 30.0) and its :class:`ChannelSpec`; for control ``(None,
    spec)`` (text-to-image; defaults 28 steps, guidance 3.5); ``(None, None)`` for other pipelines without
    ``control_image``. ValueError / TypeError naming the argument otherwise."""
    from .editing import EditSpec, _call_default, _check_mask, _preprocess, check_steps_left

    pipe = getattr(adapter, "pipe", None)
    kind = channel_kind(pipe) if pipe is not None else None
    if kind is None:
        if control_image is not None:
            raise ValueError(f"control_image= goes with a FluxControlPipeline (FLUX.1 Canny / Depth); "
                             f"{type(pipe).__name__} takes no control image")
        if pipe is not None and adapter.family in ("flux", "flux-schnell") and _extra_channels(pipe):
            raise ValueError(f"this FLUX.1 transformer takes {_extra_channels(pipe)} conditioning input channels "
                             f"(in_channels {pipe.transformer.config.in_channels}): run it as FluxFillPipeline(**pipe."
                             "components) with image= and mask_image=, or FluxControlPipeline with control_image=")
        return None, None
    cfg, vae = pipe.transformer.config, pipe.vae
    lat, f = int(vae.config.latent_channels), int(pipe.vae_scale_factor)
    want = {"fill": 4 * (lat + f * f), "control": 4 * lat}[kind]
    if _extra_channels(pipe) != want:
        raise ValueError(f"{type(pipe).__name__} needs a transformer with {want} conditioning channels beyond its "
                         f"{cfg.out_channels} output channels; this one has in_channels {cfg.in_channels}")
    cls = _DEFAULTS[kind][0]
    steps = int(_call_default(cls, "num_inference_steps") if num_inference_steps is None else num_inference_steps)
    if kind == "control":
        for name, value in (("image", image), ("mask_image", mask_image), ("strength", strength)):
            if value is not None:
                raise ValueError(f"{name}= is not taken by FluxControlPipeline (text-to-image with a control image); "
                                 "give control_image=")
        if control_image is None:
            raise ValueError("FluxControlPipeline needs control_image= (a Canny or depth map of the target size)")
        pixels = _control_pixels(pipe, control_image, height, width)
        n, prompts = pixels.shape[0], batch // num_images_per_prompt
        if n not in (1, prompts):
            raise ValueError(f"got {n} control images for {prompts} prompt(s): give one (used for every image) or "
                             "one per prompt (as FluxControlPipeline)")
        pixels = pixels.repeat_interleave(batch // n, dim=0)  # diffusers' prepare_image: prompt-major
        return None, ChannelSpec("control", pixels)
    # fill
    if control_image is not None:
        raise ValueError("control_image= goes with FluxControlPipeline; FluxFillPipeline takes image= and mask_image=")
    for name, value in (("image", image), ("mask_image", mask_image)):
        if value is None:
            raise ValueError(f"FluxFillPipeline needs {name}= (it takes image= and mask_image=, white = repaint)")
    if strength is None:
        strength = _call_default(cls, "strength")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
        raise TypeError(f"strength={strength!r} is not allowed: need a number in (0, 1]")
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength={strength!r} is not allowed: need 0 < strength <= 1 (FluxFillPipeline's default "
                         "is 1.0: start from pure noise)")
    check_steps_left(float(strength), steps)
    if isinstance(image, torch.Tensor) and image.ndim in (3, 4) and image.shape[-3] != 3:
        raise ValueError(f"image has shape {tuple(image.shape)}: give RGB pixels (3, H, W) or (n, 3, H, W)")
    pixels = _preprocess(pipe.image_processor, image, "image", "image processor", 3, height, width,
                         "give a PIL image, a numpy array (H, W, 3), a float RGB tensor, or a list of them")
    if batch % pixels.shape[0]:
        raise ValueError(f"got {pixels.shape[0]} images for a batch of {batch}: the number must divide the batch")
    mask = _check_mask(pipe, mask_image, height, width, batch)
    n, nm = pixels.shape[0], mask.shape[0]
    if n != nm and 1 not in (n, nm):
        raise ValueError(f"got {n} images and {nm} masks: give as many masks as images, or one of either "
                         "(the masked image is image * (1 - mask))")
    edit = EditSpec("img2img", pixels, float(strength), steps, float(_call_default(cls, "guidance_scale")))
    return edit, ChannelSpec("fill", pixels, mask)


def default_guidance(spec: ChannelSpec) -> float:
    """The pipeline's default guidance (Fill 30.0, control 3.5)."""
    from .editing import _call_default

    return float(_call_default(_DEFAULTS[spec.kind][0], "guidance_scale"))


def default_steps(spec: ChannelSpec) -> int:
    """The pipeline's default step count (Fill 50, control 28)."""
    from .editing import _call_default

    return int(_call_default(_DEFAULTS[spec.kind][0], "num_inference_steps"))


# --------------------------------------------------------------------------------------------- building
def _sample(vae, pixels: torch.Tensor, generator, batch: int) -> torch.Tensor:
    """VAE posterior samples of ``pixels`` ``(n, 3, H, W)``, normalised, tiled to ``batch``: one encode with one
    generator (tiled as the pipelines do), or image ``i % n`` encoded with generator ``i`` of a list."""
    def sample(x, gen):
        out = vae.encode(x)
        dist = getattr(out, "latent_dist", None)
        return dist.sample(gen) if dist is not None else out.latents

    n = pixels.shape[0]
    if isinstance(generator, (list, tuple)):
        z = torch.cat([sample(pixels[i % n: i % n + 1], g) for i, g in enumerate(generator)])
    else:
        z = sample(pixels, generator)
        z = torch.cat([z] * (batch // z.shape[0]))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def mask_channels(mask: torch.Tensor, f: int) -> torch.Tensor:
    """FluxFillPipeline's mask regrouping: pixel mask ``(B, 1, f h, f w)`` -> ``(B, f * f, h, w)``, channel
    ``dy * f + dx`` holding pixel ``(f y + dy, f x + dx)`` of latent pixel ``(y, x)``."""
    b, _, hh, ww = mask.shape
    h, w = hh // f, ww // f
    return mask[:, 0].reshape(b, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(b, f * f, h, w)


def build_channel_cond(adapter, spec: ChannelSpec, generator, batch: int, dtype: torch.dtype) -> "ChannelCond":
    """Encode the conditioning of ``spec`` (VAE samples from ``generator``, the pipelines' way) and pack it at full
    and half resolution: a :class:`ChannelCond` in ``dtype`` on the adapter's device."""
    pipe = adapter.pipe
    vae, f, dev = pipe.vae, int(pipe.vae_scale_factor), adapter.device
    if spec.kind == "control":
        z = _sample(vae, spec.pixels.to(dev, vae.dtype), generator, batch).to(dtype)
        fine_lat, coarse_lat = z, F.avg_pool2d(z.to(torch.float32), 2).to(dtype)
        fine, coarse = adapter.pack(fine_lat), adapter.pack(coarse_lat)
    else:
        pixels, mask = spec.pixels, spec.mask  # float32, CPU
        masked = (pixels * (1 - mask)).to(dev, dtype)
        z = _sample(vae, masked, generator, batch).to(dtype)
        m = torch.cat([mask] * (batch // mask.shape[0])).to(dev)
        fine_m = mask_channels(m, f).to(dtype)
        coarse_m = mask_channels(F.max_pool2d(m, 2), f).to(dtype)
        coarse_z = F.avg_pool2d(z.to(torch.float32), 2).to(dtype)
        fine = torch.cat([adapter.pack(z), adapter.pack(fine_m)], dim=-1)
        coarse = torch.cat([adapter.pack(coarse_z), adapter.pack(coarse_m)], dim=-1)
    p = adapter.patch_size
    fine_hw = (z.shape[-2] // p, z.shape[-1] // p)
    return ChannelCond(fine.contiguous(), coarse.contiguous(), fine_hw, (fine_hw[0] // 2, fine_hw[1] // 2))


class ChannelCond:
    """Conditioning tokens of one call at both resolutions: ``fine`` ``(B, 4M, C)`` (fine raster) and ``coarse``
    ``(B, M, C)`` (coarse raster), ``fine_hw`` / ``coarse_hw`` their token grids. :meth:`tokens` gives the
    conditioning of any RALU token set."""

    def __init__(self, fine: torch.Tensor, coarse: torch.Tensor, fine_hw, coarse_hw):
        self.fine, self.coarse = fine, coarse
        self.fine_hw, self.coarse_hw = tuple(fine_hw), tuple(coarse_hw)
        self._memo = None  # (positions tensor, tokens): the last grid's gather, reused for a stage's steps

    @property
    def channels(self) -> int:
        return int(self.fine.shape[-1])

    def tokens(self, grid) -> torch.Tensor:
        """``(B, L, C)`` conditioning tokens of the call's token set ``grid`` (a TokenGrid): fine-grid positions
        (stage 3, baseline) take the fine tokens; coarse-grid positions (stage 1) the coarse ones; stage 2's children
        (``fine_mask``, positions at ``+0.5``) the fine token at twice their position."""
        hw = tuple(grid.grid_hw)
        if grid.raster and hw == self.fine_hw and grid.positions.shape[1] == self.fine.shape[1]:
            return self.fine
        if grid.raster and hw == self.coarse_hw and grid.positions.shape[1] == self.coarse.shape[1]:
            return self.coarse
        memo = self._memo
        if memo is not None and memo[0] is grid.positions:
            return memo[1]
        pos = grid.positions.to(torch.float32)
        if hw == self.fine_hw:
            rc = pos.round().long()
            out = self._gather(self.fine, rc[..., 0] * self.fine_hw[1] + rc[..., 1])
        elif hw == self.coarse_hw:
            fine_rc = (2 * pos).round().long()
            coarse_rc = pos.floor().long()
            fi = self._gather(self.fine, fine_rc[..., 0] * self.fine_hw[1] + fine_rc[..., 1])
            ci = self._gather(self.coarse, coarse_rc[..., 0] * self.coarse_hw[1] + coarse_rc[..., 1])
            fm = grid.fine_mask
            out = ci if fm is None else torch.where(fm[..., None].to(fi.device), fi, ci)
        else:
            raise ValueError(f"the conditioning has token grids {self.fine_hw} / {self.coarse_hw}; a model call ran on "
                             f"grid {hw}")
        self._memo = (grid.positions, out)
        return out

    @staticmethod
    def _gather(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(src.device)
        if idx.shape[0] != src.shape[0]:
            idx = idx.expand(src.shape[0], -1)
        return src.gather(1, idx[..., None].expand(-1, -1, src.shape[-1]))


def attach(cond, channels: ChannelCond):
    """``cond`` (a Conditioning) with the conditioning tokens added (``data["channels"]``), a new object."""
    from .adapters.base import Conditioning

    return Conditioning(cond.batch, {**cond.data, "channels": channels})


def region_mask(spec: ChannelSpec | None, batch: int, latent_hw, device) -> torch.Tensor | None:
    """Fill's mask at latent resolution ``(B, 1, h, w)`` float32 (nearest, as the blending inpainting pipelines
    make it) for the mask-first region choice; None for control."""
    if spec is None or spec.mask is None:
        return None
    m = F.interpolate(spec.mask, size=tuple(latent_hw))
    return torch.cat([m] * (batch // m.shape[0])).to(device)
