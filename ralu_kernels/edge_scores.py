"""Edge-score kernels for RALU's region selection, all on the device.

* :func:`block_sum` - per-block sums of an edge map ``(B, H, W) -> (B, H/bs, W/bs)`` float32: a Triton
  kernel (one launch for the whole batch) and :func:`block_sum_reference` in torch.
* :func:`canny` - a Canny edge detector written in torch tensor ops (runs on CUDA or the CPU, never
  leaves the tensor's device). It follows OpenCV's ``cv2.Canny(img, low, high)`` with its defaults
  (``apertureSize=3``, ``L2gradient=False``):

  1. 3x3 Sobel ``dx``, ``dy`` with replicated borders (exact integers);
  2. L1 magnitude ``|dx| + |dy|``; magnitudes outside the image count as 0;
  3. non-maximum suppression in 4 directions with OpenCV's fixed-point sector test
     (``tan 22.5deg`` as ``13573 / 2^15``) and its comparisons: horizontal and vertical sectors keep
     ``m > previous and m >= next`` (asymmetric), diagonal sectors keep ``m >`` both neighbours;
  4. double threshold with ``floor(low)``, ``floor(high)`` and strict ``>``;
  5. hysteresis: 8-connected growth of the strong edges through the weak ones by iterated 3x3
     dilation until a fixed point (checked every ``check_every`` iterations; each check is one
     scalar device->host sync) or ``max_iter`` iterations.

* :func:`topk_blocks` - jittered top-k block choice on the device (``torch.topk`` + sort).

This module imports nothing from ``ralu_runtime``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton  # optional: the torch references work without it

__all__ = [
    "block_sum",
    "block_sum_reference",
    "block_sum_triton",
    "canny",
    "sobel3x3",
    "topk_blocks",
    "HAS_TRITON",
]

# OpenCV canny.cpp: CANNY_SHIFT = 15, TG22 = (int)(tan(22.5 deg) * 2^15 + 0.5)
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)


# ---------------------------------------------------------------------------------------------
# block sum
# ---------------------------------------------------------------------------------------------
def _check_block_args(edge_map: torch.Tensor, block: int) -> tuple[int, int, int]:
    if edge_map.dim() != 3:
        raise ValueError(f"edge_map must be (B, H, W); got shape {tuple(edge_map.shape)}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int; got {block!r}")
    b, h, w = edge_map.shape
    if h % block or w % block:
        raise ValueError(f"H={h} and W={w} must be multiples of block={block}")
    return b, h, w


def block_sum_reference(edge_map: torch.Tensor, block: int) -> torch.Tensor:
    """Torch reference: ``(B, H, W)`` (float/uint8/bool) -> ``(B, H//block, W//block)`` float32 block sums."""
    b, h, w = _check_block_args(edge_map, block)
    x = edge_map.to(torch.float32)
    return x.reshape(b, h // block, block, w // block, block).sum(dim=(2, 4))


if HAS_TRITON:

    @triton.jit
    def _block_sum_kernel(
        x_ptr, out_ptr,
        H, W, HB, WB,
        stride_b, stride_h, stride_w,
        BS: tl.constexpr, BS_P2: tl.constexpr, TILE_WB: tl.constexpr,
    ):
        # program (pid0, pid1): image b = pid0 // HB, block row hb = pid0 % HB, block columns
        # [pid1 * TILE_WB, pid1 * TILE_WB + TILE_WB).
        pid0 = tl.program_id(0)
        pid1 = tl.program_id(1)
        b = pid0 // HB
        hb = pid0 % HB
        r = tl.arange(0, BS_P2)                       # row inside the block
        wb = pid1 * TILE_WB + tl.arange(0, TILE_WB)   # block column
        c = tl.arange(0, BS_P2)                       # column inside the block
        rows = hb * BS + r
        cols = wb[:, None] * BS + c[None, :]           # (TILE_WB, BS_P2)
        mask = (r[:, None, None] < BS) & (wb[None, :, None] < WB) & (c[None, None, :] < BS)
        ptrs = (x_ptr + b.to(tl.int64) * stride_b + rows[:, None, None].to(tl.int64) * stride_h
                + cols[None, :, :].to(tl.int64) * stride_w)
        vals = tl.load(ptrs, mask=mask, other=0).to(tl.float32)   # (BS_P2, TILE_WB, BS_P2)
        s = tl.sum(tl.sum(vals, axis=2), axis=0)                 # (TILE_WB,)
        out_offs = pid0.to(tl.int64) * WB + wb
        tl.store(out_ptr + out_offs, s, mask=wb < WB)


def block_sum_triton(edge_map: torch.Tensor, block: int) -> torch.Tensor:
    """Triton block sums (one launch for the batch). Works on CUDA, or on the CPU under ``TRITON_INTERPRET=1``."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    b, h, w = _check_block_args(edge_map, block)
    x = edge_map
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    hb, wb = h // block, w // block
    out = torch.empty((b, hb, wb), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    bs_p2 = triton.next_power_of_2(block)
    # keep one program's tile around 4K elements
    tile_wb = max(1, min(triton.next_power_of_2(wb), 4096 // (bs_p2 * bs_p2)))
    grid = (b * hb, triton.cdiv(wb, tile_wb))
    _block_sum_kernel[grid](
        x, out, h, w, hb, wb,
        x.stride(0), x.stride(1), x.stride(2),
        BS=block, BS_P2=bs_p2, TILE_WB=tile_wb,
    )
    return out


def block_sum(edge_map: torch.Tensor, block: int, *, use_triton: bool | None = None) -> torch.Tensor:
    """Per-block sums ``(B, H, W) -> (B, H//block, W//block)`` float32.

    ``use_triton=None`` dispatches: CUDA tensors (with triton installed) -> Triton kernel, anything else
    -> :func:`block_sum_reference`. ``True`` forces Triton (on the CPU that needs ``TRITON_INTERPRET=1``),
    ``False`` forces the reference.
    """
    if use_triton is None:
        use_triton = HAS_TRITON and edge_map.is_cuda
    if use_triton:
        return block_sum_triton(edge_map, block)
    return block_sum_reference(edge_map, block)


# ---------------------------------------------------------------------------------------------
# Canny
# ---------------------------------------------------------------------------------------------
def sobel3x3(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's 3x3 Sobel (``ksize=3``, ``BORDER_REPLICATE``) of ``(B, H, W)`` -> int32 ``dx``, ``dy``."""
    g = gray.to(torch.int32)
    p = F.pad(g.unsqueeze(1).to(torch.float32), (1, 1, 1, 1), mode="replicate").squeeze(1).to(torch.int32)
    h, w = g.shape[-2:]
    tl_, tc, tr = p[:, 0:h, 0:w], p[:, 0:h, 1:w + 1], p[:, 0:h, 2:w + 2]
    ml, mr = p[:, 1:h + 1, 0:w], p[:, 1:h + 1, 2:w + 2]
    bl, bc, br = p[:, 2:h + 2, 0:w], p[:, 2:h + 2, 1:w + 1], p[:, 2:h + 2, 2:w + 2]
    dx = (tr - tl_) + 2 * (mr - ml) + (br - bl)
    dy = (bl - tl_) + 2 * (bc - tc) + (br - tr)
    return dx, dy


def _dilate3x3(x: torch.Tensor) -> torch.Tensor:
    """8-connected 3x3 dilation of a (B, H, W) bool map (zero padding)."""
    return F.max_pool2d(x.unsqueeze(1).to(torch.float16 if x.is_cuda else torch.float32), 3, 1, 1).squeeze(1) > 0


def canny(
    gray: torch.Tensor,
    low: float = 100,
    high: float = 200,
    *,
    max_iter: int | None = None,
    check_every: int = 16,
    return_iters: bool = False,
):
    """Canny edges of ``(B, H, W)`` grayscale (uint8 or uint8-valued float) -> ``(B, H, W)`` bool.

    Mirrors ``cv2.Canny(gray, low, high)`` (aperture 3, L1 gradient), see the module docstring; it need
    not be pixel-identical to OpenCV (ties at sector boundaries and hysteresis limits may differ).

    Hysteresis runs until a fixed point, tested every ``check_every`` dilation steps (one scalar sync per
    test; ``check_every=0`` never tests and runs exactly ``max_iter`` steps, sync-free). ``max_iter``
    defaults to ``H * W`` (enough for any chain). With ``return_iters=True`` also returns the number of
    dilation steps run.
    """
    if gray.dim() == 2:
        gray = gray.unsqueeze(0)
    if gray.dim() != 3:
        raise ValueError(f"gray must be (B, H, W); got shape {tuple(gray.shape)}")
    if gray.is_floating_point():
        gray = gray.round()
    b, h, w = gray.shape
    lo, hi = math.floor(low), math.floor(high)
    if lo > hi:
        lo, hi = hi, lo   # as OpenCV does

    dx, dy = sobel3x3(gray)
    ax, ay = dx.abs(), dy.abs()
    mag = ax + ay                                   # int32, <= 2040
    mp = F.pad(mag, (1, 1, 1, 1))                   # zeros outside the image (OpenCV's mag buffer)
    left, right = mp[:, 1:h + 1, 0:w], mp[:, 1:h + 1, 2:w + 2]
    up, down = mp[:, 0:h, 1:w + 1], mp[:, 2:h + 2, 1:w + 1]
    ul, ur = mp[:, 0:h, 0:w], mp[:, 0:h, 2:w + 2]
    dl, dr = mp[:, 2:h + 2, 0:w], mp[:, 2:h + 2, 2:w + 2]

    # OpenCV's fixed-point sector test (exact in int32: |d| <= 1020, 1020 * 2^15 < 2^31)
    y = ay << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    horiz = y < tg22x
    vert = (~horiz) & (y > tg67x)
    diag = ~(horiz | vert)
    same_sign = (dx ^ dy) >= 0
    keep_h = (mag > left) & (mag >= right)
    keep_v = (mag > up) & (mag >= down)
    keep_d = torch.where(same_sign, (mag > ul) & (mag > dr), (mag > ur) & (mag > dl))   # both strict here
    nms = (horiz & keep_h) | (vert & keep_v) | (diag & keep_d)
    weak = nms & (mag > lo)
    strong = nms & (mag > hi)

    # hysteresis: grow strong through weak (8-connected)
    if max_iter is None:
        max_iter = h * w
    edges = strong
    iters = 0
    while iters < max_iter:
        n = max_iter - iters if check_every <= 0 else min(check_every, max_iter - iters)
        prev = edges
        for _ in range(n):
            edges = _dilate3x3(edges) & weak
        iters += n
        if check_every > 0 and torch.equal(edges, prev):
            break
    edges = edges | strong
    if return_iters:
        return edges, iters
    return edges


# ---------------------------------------------------------------------------------------------
# top-k
# ---------------------------------------------------------------------------------------------
def topk_blocks(scores: torch.Tensor, k: int, jitter: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``(B, k)`` int64 of the ``k`` highest ``scores + jitter`` per row, sorted ascending.

    ``scores`` ``(B, M)`` or ``(B, Hb, Wb)`` (flattened in raster order); ``jitter`` broadcastable to the
    flattened scores (tie-breaker). Computed in float64 so a jitter of 1e-3 still separates ties of large
    counts. Everything stays on ``scores.device``.
    """
    s = scores.reshape(scores.shape[0], -1).to(torch.float64)
    m = s.shape[1]
    if not 0 <= k <= m:
        raise ValueError(f"k must be in [0, {m}]; got {k}")
    if jitter is not None:
        s = s + jitter.reshape(jitter.shape[0], -1).to(device=s.device, dtype=torch.float64)
    if k == 0:
        return torch.empty((s.shape[0], 0), dtype=torch.int64, device=s.device)
    idx = torch.topk(s, k, dim=1, largest=True, sorted=False).indices
    return torch.sort(idx, dim=1).values
