"""Edge-based region selection of RALU's mixed-resolution stage.

At the end of stage 1 the sampler VAE-decodes the Tweedie estimate (images in [-1, 1]) and calls
:func:`edge_scores` (Canny edge pixels per image block, one block = one coarse token) and
:func:`select_top_blocks` (jittered top-k, all randomness from the user's generators). The masks
(:func:`region_mask`) and :func:`overlay_mask` are for users and the CLI. With ``region_source="latent"`` the
sampler skips the decode and scores the Tweedie latents directly (:func:`latent_edge_scores`: Sobel magnitude per
coarse token), which saves the half-resolution preview decode (large for video VAEs).

Two detectors:

* ``"opencv"`` - ``cv2.Canny(gray_uint8, low, high)`` per image on the CPU (one device->host copy of the
  uint8 grayscale batch); what the reference implementation does.
* ``"gpu"`` - :func:`ralu_kernels.edge_scores.canny` + :func:`ralu_kernels.edge_scores.block_sum` on the
  images' device (no host copy of data). It reproduces OpenCV's Canny (aperture 3, L1 gradient).

Both detectors get the same uint8 grayscale image, built on the images' device by
:func:`images_to_uint8_gray` from the [-1, 1] RGB with one of two mappings:

* ``"unit"`` (default, correct): RGB mapped by ``(x + 1) / 2``, clamped to [0, 1], scaled by 255 and rounded
  to uint8, then OpenCV's 8-bit RGB->GRAY (``cv2.cvtColor(rgb_uint8, COLOR_RGB2GRAY)`` exactly).
* ``"clip"`` (the reference implementation's): grey from the raw [-1, 1] RGB first, in float32,
  ``(0.299f * R + 0.587f * G) + 0.114f * B``, then clipped to [0, 1], scaled by 255 and truncated to uint8
  (``np.clip(gray, 0, 1) * 255`` then ``astype(np.uint8)``). Everything below mid-grey becomes black and
  its edges vanish.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ralu_kernels import edge_scores as _k

__all__ = [
    "images_to_uint8_gray",
    "edge_scores",
    "latent_edge_scores",
    "select_top_blocks",
    "region_mask",
    "overlay_mask",
    "JITTER_SCALE",
]

JITTER_SCALE = 1e-3
"""Tie-breaking jitter is uniform in ``[0, JITTER_SCALE)``; edge counts are integers, so it only breaks ties."""

# OpenCV's fixed-point RGB->GRAY for 8-bit images: 0.299, 0.587, 0.114 scaled by 2^15, rounded descale
# (checked against cv2.cvtColor over all 2^24 RGB values with OpenCV 5.0; the older 2^14 table differs)
_R2Y, _G2Y, _B2Y, _GRAY_SHIFT = 9798, 19235, 3735, 15
# the same weights as float32 (OpenCV's float RGB->GRAY: 0.299f, 0.587f, 0.114f); exact as Python floats, so
# a tensor * scalar product is the correctly rounded float32 product on any device
_R2Y_F32, _G2Y_F32, _B2Y_F32 = (float(np.float32(c)) for c in (0.299, 0.587, 0.114))
_MAPPINGS = ("unit", "clip")
_DETECTORS = ("opencv", "gpu")


def _unit_gray_uint8(x: Tensor) -> Tensor:
    # as diffusers' image processor: (x + 1) / 2, clamp, * 255, round half to even; then OpenCV's 8-bit gray
    rgb = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.int32)
    gray = (rgb[:, 0] * _R2Y + rgb[:, 1] * _G2Y + rgb[:, 2] * _B2Y + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT
    return gray.to(torch.uint8)


def _clip_gray_uint8(x: Tensor) -> Tensor:
    # the reference's grey: float32 luma of the raw values, each product and sum a separate, correctly rounded
    # float32 operation (no fused multiply-add), then clip to [0, 1], * 255 and truncate
    gray = x[:, 0] * _R2Y_F32 + x[:, 1] * _G2Y_F32
    gray = gray + x[:, 2] * _B2Y_F32
    return (gray.clamp(0, 1) * 255).to(torch.uint8)   # float -> uint8 truncates; values are in [0, 255]


def images_to_uint8_gray(images: Tensor, *, mapping: str = "unit", as_numpy: bool = False) -> np.ndarray | Tensor:
    """VAE output ``(B, 3, H, W)`` in [-1, 1] -> uint8 grayscale ``(B, H, W)``.

    The images are first converted to float32 (exact for float16/bfloat16 inputs).

    ``mapping="unit"``: RGB mapped by ``(x + 1) / 2``, clamped to [0, 1], scaled by 255 and rounded (half to
    even) to uint8, then converted with OpenCV's RGB->GRAY weights (0.299, 0.587, 0.114) in OpenCV's
    fixed-point arithmetic, so the result equals ``cv2.cvtColor(rgb_uint8, cv2.COLOR_RGB2GRAY)`` exactly.

    ``mapping="clip"`` (the reference implementation's): no mapping of the RGB; the grey of the raw values
    ``R, G, B`` (about [-1, 1]) is computed first, in float32 with every operation correctly rounded
    (``*`` and ``+`` never fused), in this order::

        y = (R * 0.299f + G * 0.587f) + B * 0.114f        # 0.299f = float32(0.299), ...
        gray = uint8(trunc(clip(y, 0, 1) * 255f))         # truncation, not rounding

    i.e. ``(np.clip(y, 0, 1) * np.float32(255)).astype(np.uint8)`` of the float32 ``y``. Grey values below 0
    (below mid-grey after ``(x + 1) / 2``) become black. ``cv2.cvtColor`` on float32 RGB uses the same
    weights but may evaluate the sum in another order or with fused multiply-adds (its SIMD code does on
    x86 with FMA); its float result can then differ from ``y`` by one float32 ulp, which changes the
    truncated grey by one level only when ``y * 255`` is within an ulp of an integer: about 1 pixel in 10^6
    for continuous values, more for RGB on the 8-bit grid (``R = G = B = k / 127.5 - 1``: 6 of 256 levels).

    Returns a uint8 tensor on ``images.device``, or (``as_numpy=True``) a numpy array on the host.
    """
    if mapping not in _MAPPINGS:
        raise ValueError(f"mapping must be one of {_MAPPINGS}; got {mapping!r}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
    x = images.to(torch.float32)
    gray = _unit_gray_uint8(x) if mapping == "unit" else _clip_gray_uint8(x)
    if as_numpy:
        return gray.cpu().numpy()
    return gray


def _check_block(images: Tensor, block: int) -> tuple[int, int]:
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int; got {block!r}")
    h, w = images.shape[-2:]
    if h % block or w % block:
        raise ValueError(f"image height {h} and width {w} must be multiples of block={block}")
    return h // block, w // block


def edge_scores(images: Tensor, block: int, *, mapping: str = "unit", detector: str = "opencv",
                low: float = 100, high: float = 200) -> Tensor:
    """Number of Canny edge pixels per ``block x block`` image block.

    ``images`` ``(B, 3, H, W)`` in [-1, 1] (VAE output); returns ``(B, H // block, W // block)`` float32 on
    ``images.device``. Both detectors run Canny (``low``/``high``, aperture 3, L1 gradient) on the same uint8
    grayscale image, :func:`images_to_uint8_gray` with ``mapping`` (``"unit"``: ``(x + 1) / 2``, rounded RGB,
    OpenCV's 8-bit RGB->GRAY; ``"clip"``: the reference's float32 grey of the raw RGB, clipped to [0, 1],
    ``* 255``, truncated), computed on ``images.device``. ``detector="opencv"``: ``cv2.Canny`` on the CPU (one
    host copy of the uint8 grey batch); ``"gpu"``: :func:`ralu_kernels.edge_scores.canny` and the Triton block
    sum on the images' device. ``H`` and ``W`` must be multiples of ``block`` (ValueError otherwise).
    """
    if detector not in _DETECTORS:
        raise ValueError(f"detector must be one of {_DETECTORS}; got {detector!r}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
    hb, wb = _check_block(images, block)
    b = images.shape[0]
    if detector == "opencv":
        import cv2

        gray = images_to_uint8_gray(images, mapping=mapping, as_numpy=True)   # the one host copy
        edges = np.stack([cv2.Canny(np.ascontiguousarray(g), low, high) for g in gray]) if b else \
            np.zeros(gray.shape, np.uint8)
        counts = (edges > 0).reshape(b, hb, block, wb, block).sum(axis=(2, 4), dtype=np.int64)
        return torch.from_numpy(counts.astype(np.float32)).to(images.device)
    gray = images_to_uint8_gray(images, mapping=mapping)
    edges = _k.canny(gray, low, high)
    return _k.block_sum(edges, block)


_SOBEL = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
LATENT_SCORE_MAX = 1e4
"""Latent scores are scaled so each image's largest block scores this much (the top-k jitter is below 1e-3)."""


def latent_edge_scores(latents: Tensor, patch: int) -> Tensor:
    """Edge strength per coarse token, scored in latent space (no VAE decode).

    ``latents`` ``(B, C, h, w)`` (images) or ``(B, C, F, h, w)`` (video) half-resolution Tweedie latents; every
    ``patch x patch`` latent block is one coarse token. The score of a block is the sum over its pixels of the
    Sobel gradient magnitude ``sqrt(gx^2 + gy^2)`` summed over the channels (float32, replicated borders; video
    frames are filtered one by one, so no edge appears at a frame seam), scaled so that each image's highest
    block scores :data:`LATENT_SCORE_MAX`. Returns ``(B, F h / patch, w / patch)`` float32 on ``latents.device``:
    the block order of :func:`edge_scores` on the tall image of the decoded frames.
    """
    if latents.dim() not in (4, 5):
        raise ValueError(f"latents must be (B, C, h, w) or (B, C, F, h, w); got shape {tuple(latents.shape)}")
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a positive int; got {patch!r}")
    x = latents.to(torch.float32)
    if x.dim() == 5:
        b, c, f, h, w = x.shape
        x = x.transpose(1, 2).reshape(b * f, c, h, w)
    else:
        (b, c, h, w), f = x.shape, 1
    if h % patch or w % patch:
        raise ValueError(f"latent height {h} and width {w} must be multiples of patch={patch}")
    kx = torch.tensor(_SOBEL, dtype=torch.float32, device=x.device)
    weight = torch.stack([kx, kx.t()])[:, None].repeat(c, 1, 1, 1)          # (2C, 1, 3, 3): gx, gy per channel
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    g = torch.nn.functional.conv2d(padded, weight, groups=c).view(b * f, c, 2, h, w)
    mag = g.pow(2).sum(dim=2).sqrt().sum(dim=1)                               # (B F, h, w)
    hb, wb = h // patch, w // patch
    blocks = mag.view(b, f * hb, patch, wb, patch).sum(dim=(2, 4))
    top = blocks.flatten(1).amax(dim=1).clamp_min(1e-30)   # all-flat image: scores stay 0 (no 0 * inf)
    return blocks * (LATENT_SCORE_MAX / top)[:, None, None]


def _jitter(b: int, m: int, generators: Sequence[torch.Generator] | torch.Generator | None,
            device: torch.device) -> Tensor:
    if generators is None:
        gens = [torch.Generator().manual_seed(0)] * b   # one CPU generator, drawn from image by image
    elif isinstance(generators, torch.Generator):
        gens = [generators] * b
    else:
        gens = list(generators)
        if len(gens) != b:
            raise ValueError(f"need one generator per image: got {len(gens)} for a batch of {b}")
    rows = [torch.rand(m, generator=g, device=g.device, dtype=torch.float32) for g in gens]
    return torch.stack([r.to(device) for r in rows]) * JITTER_SCALE if b else torch.zeros(0, m, device=device)


def select_top_blocks(scores: Tensor, k: int,
                      generators: Sequence[torch.Generator] | torch.Generator | None = None) -> Tensor:
    """Raster indices ``(B, k)`` int64 of the ``k`` highest-scoring blocks of each image, sorted ascending.

    ``scores`` ``(B, Hb, Wb)`` or ``(B, M)``. Ties are broken by a jitter uniform in ``[0, 1e-3)`` added to
    the scores, drawn (``torch.rand(M)``, float32) from ``generators[b]`` for image ``b`` on that
    generator's device, then moved to ``scores.device``: the choice is deterministic per seed and all
    randomness comes from the user's generators. A single generator is used for every image in turn.
    With ``generators=None`` a CPU ``torch.Generator`` seeded 0 is used (deterministic, not tied to
    any user seed). ``k`` must be in ``[0, M]`` (ValueError otherwise); ``k == 0`` gives ``(B, 0)``.
    The top-k itself runs on ``scores.device`` (:func:`ralu_kernels.edge_scores.topk_blocks`).
    """
    if scores.dim() not in (2, 3):
        raise ValueError(f"scores must be (B, Hb, Wb) or (B, M); got shape {tuple(scores.shape)}")
    b = scores.shape[0]
    m = scores[0].numel() if b else int(np.prod(scores.shape[1:]))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= m:
        raise ValueError(f"k must be an int in [0, {m}]; got {k!r}")
    k = int(k)
    if k == 0:
        return torch.empty((b, 0), dtype=torch.int64, device=scores.device)
    jitter = _jitter(b, m, generators, scores.device)
    return _k.topk_blocks(scores.reshape(b, m), k, jitter)


def region_mask(indices: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """``(B, k)`` raster block indices -> ``(B, Hb, Wb)`` bool mask of the selected blocks."""
    hb, wb = grid_hw
    if indices.dim() != 2:
        raise ValueError(f"indices must be (B, k); got shape {tuple(indices.shape)}")
    mask = torch.zeros((indices.shape[0], hb * wb), dtype=torch.bool, device=indices.device)
    if indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= hb * wb:
            raise ValueError(f"indices out of range for a {hb}x{wb} grid")
        mask.scatter_(1, indices.to(torch.int64), True)
    return mask.view(indices.shape[0], hb, wb)


def overlay_mask(image_uint8_hwc: np.ndarray, mask_hw: np.ndarray, color=(255, 64, 64), alpha: float = 0.45) -> np.ndarray:
    """Tint the selected blocks of an RGB uint8 image ``(H, W, 3)``.

    ``mask_hw`` is the block grid ``(Hb, Wb)`` (bool; a tensor is accepted too), upscaled to ``(H, W)`` by
    nearest neighbour; selected pixels become ``(1 - alpha) * pixel + alpha * color``. Returns a new array.
    """
    img = np.asarray(image_uint8_hwc)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3); got shape {img.shape}")
    if isinstance(mask_hw, torch.Tensor):
        mask_hw = mask_hw.detach().cpu().numpy()
    mask = np.asarray(mask_hw).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (Hb, Wb); got shape {mask.shape}")
    h, w = img.shape[:2]
    hb, wb = mask.shape
    rows = (np.arange(h) * hb) // h
    cols = (np.arange(w) * wb) // w
    full = mask[rows[:, None], cols[None, :]]
    out = img.astype(np.float32)
    tint = np.asarray(color, dtype=np.float32)
    out[full] = (1.0 - alpha) * out[full] + alpha * tint
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
