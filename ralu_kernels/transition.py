"""Fused RALU stage transition: gather -> nearest upsample -> correlated noise -> scale -> scatter.

One call turns the tokens of a finishing stage into the tokens of the next stage, for a whole
batch, and writes their position ids. For every image ``b``, output token ``i``, channel ``ch``
(float32 math, result cast to the output dtype)::

    p, g, q = src_index[b, i], group[b, i], child[b, i]
    q >= 0:  (u0, u1, u2, u3) = normal4(seeds[b], g * C + ch)                 # int32 Philox counter
             n = fma(alpha, ((u0 + u1) + u2) + u3, u_q)         # alpha = (sqrt(1 - 4c) - 1) / 4
    q <  0:  (u0, u1, u2, u3) = normal4(seeds[b], g * C + 4 * (ch // 4))
             n = sqrt(v) * u_(ch % 4)                           # v = 1, or 1 - c with exact_noise
    x_out[b, i, ch] = fma(a, x[b, p, ch], b * n)
    pos_out[b, i]   = pos_scale * (pos[b, p] + child_step * (q // 2, q % 2))   (q >= 0)
                      pos_scale * pos[b, p]                                      (q <  0)

``normal4(seed, off)`` is Triton's ``tl.randn4x``: Philox4x32-10 keyed by the seed, four uniforms,
two Box-Muller pairs. One call serves the 4 children of a group (per channel) or 4 channels of a
kept token: 4x fewer Philox/Box-Muller evaluations than one call per output element. The 4
children of one parent get noise with covariance ``I - c J`` per channel; kept tokens get i.i.d.
``N(0, v)``; the noise depends only on (seed, group, child, channel), not on the output order.

Work order. The Triton kernel and the CUDA op are group-major: they walk ``order`` (B, Ld) int32,
per image the output rows of the ``num_up`` upsampled groups (4 rows each, children 0..3 in order)
and then the kept rows (:func:`group_major_order` builds it from the per-row maps;
``ralu_runtime.layout`` builds it directly). They need complete groups of 4 children; the torch
reference works row by row on any maps.

Float details. The evaluation order above (and float32 scalars ``a``, ``b``, ``alpha``, ``sqrt(v)``
computed in float64 on the host) is the one of the CUDA op in ``csrc/stage_transition.cu``. Compiled
for an NVIDIA GPU, both kernels evaluate the Box-Muller transform with the MUFU approximations
(``lg2/sin/cos/sqrt.approx.ftz.f32``, absolute error ~2^-21: the noise is rounded to bf16/fp16 or
added to float32 latents, where that is far below one ulp of the result) and round to bf16 with
``cvt.rn``; they are meant to be bitwise equal to each other. The torch reference and the Triton
interpreter use accurate float32 ``log``/``cos``/``sin`` (numpy on CPU: bitwise equal to each
other), so on a GPU reference and kernels agree to ~1e-5 absolute, not bitwise.

Implementations (all with the signature of :func:`stage_transition`):

* :func:`stage_transition_triton`: one Triton launch, grid ``(up programs + kept programs, B)``;
  an up program takes ``BLOCK_G`` groups x all ``C`` channels (one ``normal4`` per group and
  channel, 4 rows written), a kept program ``BLOCK_K`` tokens x ``C`` channels (one ``normal4`` per
  4 channels); positions in the same launch; tile sizes by problem size (see ``_tiles``), no
  autotuning, compiled with ``enable_fp_fusion=False``.
* :func:`stage_transition_reference`: pure torch (CPU or CUDA), memory O(tokens * C) processed in
  chunks, noise from :mod:`ralu_kernels.philox`.
* the CUDA op ``torch.ops.ralu.stage_transition`` from ``csrc/`` (via ``ralu_kernels._csrc``).

:func:`stage_transition` dispatches (``impl="auto"``): CUDA op if built and ``x`` is on CUDA, else
Triton on CUDA, else the torch reference.

This module imports nothing from ``ralu_runtime``.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from . import philox

from ._triton import HAS_TRITON, libdevice, tl, triton  # optional: the torch references work without it

__all__ = [
    "stage_transition",
    "stage_transition_reference",
    "stage_transition_triton",
    "group_major_order",
    "correlated_noise_alpha",
    "dense_mvn_noise",
    "example_transition_maps",
    "HAS_TRITON",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# scalars and validation
# ---------------------------------------------------------------------------------------------
def _check_c(c: float) -> float:
    c = float(c)
    if not (0.0 <= c <= 0.25):  # also rejects NaN
        raise ValueError(f"c must satisfy 0 <= c <= 1/4 (covariance I - c*J of 4 children must be PSD); got c={c!r}")
    return c


def correlated_noise_alpha(c: float) -> float:
    """``alpha = (sqrt(1 - 4c) - 1) / 4``: ``u_i + alpha * sum_j u_j`` has covariance ``I - c J`` (4x4)."""
    c = _check_c(c)
    return (math.sqrt(1.0 - 4.0 * c) - 1.0) / 4.0


def _noise_std(c: float, exact_noise: bool) -> float:
    return math.sqrt(1.0 - c) if exact_noise else 1.0


def _validate(x, pos, src_index, group, child, seeds, a, b, c, pos_scale, child_step, out, pos_out,
              check_values) -> Tuple[int, int, int, int]:
    """Shape/dtype/device checks; returns (B, Ls, Ld, C)."""
    tensors = dict(x=x, pos=pos, src_index=src_index, group=group, child=child, seeds=seeds)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be (B, Ls, C); got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16; got {x.dtype}")
    bsz, src_len, channels = x.shape
    if pos.shape != (bsz, src_len, 2):
        raise ValueError(f"pos must be (B, Ls, 2) = {(bsz, src_len, 2)}; got {tuple(pos.shape)}")
    if pos.dtype != torch.float32:
        raise TypeError(f"pos must be float32; got {pos.dtype}")
    if src_index.dim() != 2 or src_index.shape[0] != bsz:
        raise ValueError(f"src_index must be (B, Ld) with B={bsz}; got {tuple(src_index.shape)}")
    dst_len = src_index.shape[1]
    for name, t, dt in (("src_index", src_index, torch.int32), ("group", group, torch.int32),
                        ("child", child, torch.int8)):
        if t.shape != (bsz, dst_len):
            raise ValueError(f"{name} must be (B, Ld) = {(bsz, dst_len)} like src_index; got {tuple(t.shape)}")
        if t.dtype != dt:
            raise TypeError(f"{name} must be {dt}; got {t.dtype}")
    if seeds.shape != (bsz,):
        raise ValueError(f"seeds must be (B,) = ({bsz},); got {tuple(seeds.shape)}")
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be int64; got {seeds.dtype}")
    dev = x.device
    for name, t in tensors.items():
        if t.device != dev:
            raise ValueError(f"all inputs must be on one device: x is on {dev}, {name} on {t.device}")
    _check_c(c)
    for name, v in (("a", a), ("b", b), ("pos_scale", pos_scale), ("child_step", child_step)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite; got {v!r}")
    if out is not None:
        if out.shape != (bsz, dst_len, channels):
            raise ValueError(f"out must be (B, Ld, C) = {(bsz, dst_len, channels)}; got {tuple(out.shape)}")
        if out.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"out must be float32, bfloat16 or float16; got {out.dtype}")
        if out.device != dev or not out.is_contiguous():
            raise ValueError("out must be contiguous and on x's device")
    if pos_out is not None:
        if pos_out.shape != (bsz, dst_len, 2) or pos_out.dtype != torch.float32:
            raise ValueError(f"pos_out must be float32 (B, Ld, 2) = {(bsz, dst_len, 2)}; got "
                             f"{pos_out.dtype} {tuple(pos_out.shape)}")
        if pos_out.device != dev or not pos_out.is_contiguous():
            raise ValueError("pos_out must be contiguous and on x's device")
    if bsz * dst_len > 0 and src_len == 0:
        raise ValueError("x has no source tokens (Ls = 0) but Ld > 0 outputs were asked for")
    if channels > 0 and bsz * dst_len > 0:
        if check_values is None:
            check_values = dev.type == "cpu"  # free on the CPU; a device sync on CUDA
        if check_values:
            g_min, g_max = int(group.min()), int(group.max())
            if g_min < 0:
                raise ValueError(f"group ids must be >= 0; got min {g_min}")
            if (g_max + 1) * channels > _INT32_MAX + 1:
                raise ValueError(f"G*C must be < 2^31 (Philox offsets are int32): max group {g_max}, C={channels}")
            s_min, s_max = int(src_index.min()), int(src_index.max())
            if s_min < 0 or s_max >= src_len:
                raise ValueError(f"src_index out of range [0, {src_len}): min {s_min}, max {s_max}")
            if int(child.max()) > 3:
                raise ValueError(f"child must be in -1..3; got max {int(child.max())}")
        elif channels > _INT32_MAX:
            raise ValueError(f"C={channels} too large for int32 Philox offsets")
    return bsz, src_len, dst_len, channels


def _alloc_outputs(x, bsz, dst_len, channels, out, pos_out):
    if out is None:
        out = torch.empty((bsz, dst_len, channels), dtype=x.dtype, device=x.device)
    if pos_out is None:
        pos_out = torch.empty((bsz, dst_len, 2), dtype=torch.float32, device=x.device)
    return out, pos_out


# ---------------------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------------------
def _fma_f32(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Exact float32 fused multiply-add (one rounding), like ``tl.fma`` / ``__fmaf_rn``.

    The float32 product is exact in float64; the float64 sum is made exact with TwoSum and
    rounded to odd, after which the rounding to float32 is correct (53 >= 24 + 2 bits).
    """
    p = x.double() * y.double()
    z64 = z.double()
    s = p + z64
    bb = s - p
    err = (p - (s - bb)) + (z64 - bb)
    even = (s.view(torch.int64) & 1) == 0
    fix = (err != 0) & even
    toward = torch.where(err > 0, torch.full_like(s, math.inf), torch.full_like(s, -math.inf))
    s = torch.where(fix, torch.nextafter(s, toward), s)
    return s.float()


def _f32(v: float, device) -> torch.Tensor:
    return torch.tensor(float(v), dtype=torch.float32, device=device)


def stage_transition_reference(
    x: torch.Tensor,
    pos: torch.Tensor,
    src_index: torch.Tensor,
    group: torch.Tensor,
    child: torch.Tensor,
    seeds: torch.Tensor,
    *,
    a: float,
    b: float,
    c: float,
    pos_scale: float = 1.0,
    child_step: float = 0.5,
    exact_noise: bool = False,
    out: Optional[torch.Tensor] = None,
    pos_out: Optional[torch.Tensor] = None,
    order: Optional[torch.Tensor] = None,
    num_up: Optional[int] = None,
    check_values: Optional[bool] = None,
    chunk_elements: int = 1 << 20,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch stage transition (same semantics and float32 evaluation order as the kernels).

    Works token by token on any maps (``order``/``num_up``, the kernels' work order, are accepted
    and ignored).

    Works on any device; temporaries are bounded by ``chunk_elements`` (tokens x channels per
    chunk). ``check_values`` (default: on for CPU tensors, off on CUDA where it would sync)
    checks index ranges and ``G*C < 2^31``.
    """
    bsz, _, dst_len, channels = _validate(x, pos, src_index, group, child, seeds, a, b, c, pos_scale,
                                          child_step, out, pos_out, check_values)
    out, pos_out = _alloc_outputs(x, bsz, dst_len, channels, out, pos_out)
    if bsz * dst_len == 0:
        return out, pos_out
    dev = x.device
    alpha = _f32(correlated_noise_alpha(c), dev)
    nstd = _f32(_noise_std(c, exact_noise), dev)
    fa, fb = _f32(a, dev), _f32(b, dev)
    fscale, fstep = _f32(pos_scale, dev), _f32(child_step, dev)

    # positions (tiny): pos_scale * (pos[p] + child_step * (q >> 1, q & 1))
    p_all = src_index.long()
    q_all = child.long()
    ps = torch.gather(pos, 1, p_all[..., None].expand(bsz, dst_len, 2))
    d = torch.stack(((q_all >> 1) & 1, q_all & 1), dim=-1).to(torch.float32)
    up = (q_all >= 0)[..., None]
    pos_out.copy_(fscale * torch.where(up, ps + fstep * d, ps))

    if channels == 0:
        return out, pos_out
    ch = torch.arange(channels, device=dev, dtype=torch.int64)
    step = max(1, chunk_elements // channels)
    for bi in range(bsz):
        seed = seeds[bi]
        for t0 in range(0, dst_len, step):
            t1 = min(dst_len, t0 + step)
            p = p_all[bi, t0:t1]
            g = group[bi, t0:t1].long()
            q = q_all[bi, t0:t1][:, None]
            xv = x[bi].index_select(0, p).to(torch.float32)  # (T, C)
            # children: counter g*C + ch, value u_q mixed with the group sum; kept tokens: counter
            # g*C + 4*(ch // 4), value u_(ch % 4) (one Philox call per 4 channels in the kernels)
            up = q >= 0
            off = g[:, None] * channels + torch.where(up, ch[None, :], ch[None, :] & ~3)  # < 2^31
            w0, w1, w2, w3 = philox.randint4x(seed, off)
            u0, u1 = philox.pair_uniform_to_normal(philox.uint_to_uniform_float(w0),
                                                   philox.uint_to_uniform_float(w1))
            u2, u3 = philox.pair_uniform_to_normal(philox.uint_to_uniform_float(w2),
                                                   philox.uint_to_uniform_float(w3))
            s = ((u0 + u1) + u2) + u3
            slot = torch.where(up, q, ch[None, :] & 3)
            uq = torch.where(slot == 0, u0, torch.where(slot == 1, u1, torch.where(slot == 2, u2, u3)))
            n = torch.where(up, _fma_f32(alpha.expand_as(s), s, uq), nstd * uq)
            y = _fma_f32(fa.expand_as(xv), xv, fb * n)
            out[bi, t0:t1].copy_(y)
    return out, pos_out


# ---------------------------------------------------------------------------------------------
# Triton kernel (group-major)
# ---------------------------------------------------------------------------------------------
# Tiles (C = 64 bf16, 4 warps, sm_90, read off the SASS of Triton 3.9 compiled without a GPU):
# large tiles (16 groups / 64 kept tokens per program) need ~39 instructions per output element,
# 64 registers, no spills; small tiles (4 / 16) ~56 but give 4x more programs, which matters when
# the whole transition is a few dozen programs (FLUX 1024^2: Ld = 4096). Not yet timed on a GPU.
_LARGE_TILES = (16, 64)   # (BLOCK_G, BLOCK_K) for C = 64; scaled by 64 / BLOCK_C for other C
_SMALL_TILES = (4, 16)
_MIN_PROGRAMS_FOR_LARGE = 264  # two waves of 132 SMs (H100)
_NUM_WARPS = 4
# Register cap of the built-in large tiles at C = 64 (ptxas .maxnreg): 64 keeps 8 programs of 4 warps per SM. The
# 64-bit Philox products (_philox4x32_10) let ptxas use up to 80 registers there (Triton 3.6 and 3.9, sm_90), which
# would leave 6 programs per SM; capped at 64 they compile without spills (static SASS, no GPU run yet).
_MAX_REGISTERS = 64


def _tiles(num_up: int, kept: int, batch: int, block_c: int, block_c4: int) -> Tuple[int, int, int, int]:
    """``(BLOCK_G, BLOCK_K, up_programs, kept_programs)`` for one launch."""
    def programs(tiles):
        bg = max(1, tiles[0] * 64 // block_c)
        bk = max(1, tiles[1] * 16 // block_c4)
        return bg, bk, -(-num_up // bg), -(-kept // bk)

    large = programs(_LARGE_TILES)
    if (large[2] + large[3]) * batch >= _MIN_PROGRAMS_FOR_LARGE:
        return large
    return programs(_SMALL_TILES)


if HAS_TRITON:

    @triton.jit
    def _box_muller(u_first, u_second, FAST: tl.constexpr):
        """Triton's pair_uniform_to_normal; ``FAST``: MUFU approximations (lg2/cos/sin.approx.ftz)."""
        v = tl.maximum(1.0e-7, u_first)
        th = 6.283185307179586 * u_second
        if FAST:
            # lg2.approx has an absolute error (~2^-22) near 1, where log(v) ~ -1e-7: clamp so that it can
            # never reach sqrt as a negative number (NaN); csrc/ralu_philox.cuh does the same (max.f32)
            r = tl.sqrt(tl.maximum(-2.0 * libdevice.fast_logf(v), 0.0))
            return r * libdevice.fast_cosf(th), r * libdevice.fast_sinf(th)
        else:
            r = tl.sqrt(-2.0 * tl.log(v))
            return r * tl.cos(th), r * tl.sin(th)

    @triton.jit
    def _philox4x32_10(seed, off):
        """``tl.randint4x(seed, off)`` for an int32 counter ``off`` (>= 0), bit for bit: Philox4x32-10 on the
        counter ``(off, 0, 0, 0)`` with the key ``(seed & 0xffffffff, seed >> 32)``. Each round's two 32 x 32-bit
        products are taken as one 64-bit product (``mul.wide.u32``: high and low word from one IMAD.WIDE) where
        Triton's own computes the high word (``umulhi``) and the low word apart: fewer instructions, the same bits."""
        seed = seed.to(tl.uint64)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = (seed >> 32).to(tl.uint32)
        c0 = off.to(tl.uint32)
        zero = c0 * 0
        c1 = zero
        c2 = zero
        c3 = zero
        for _ in tl.static_range(10):
            p0 = c2.to(tl.uint64) * 0xCD9E8D57  # PHILOX_ROUND_B
            p1 = c0.to(tl.uint64) * 0xD2511F53  # PHILOX_ROUND_A
            c0 = (p0 >> 32).to(tl.uint32) ^ c1 ^ k0
            c2 = (p1 >> 32).to(tl.uint32) ^ c3 ^ k1
            c1 = p0.to(tl.uint32)
            c3 = p1.to(tl.uint32)
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)  # PHILOX_KEY_A
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)  # PHILOX_KEY_B
        return c0, c1, c2, c3

    @triton.jit
    def _normal4(seed, off, FAST: tl.constexpr, TL_PHILOX: tl.constexpr = False):
        """Four N(0, 1) float32 from one Philox4x32-10 call at int32 counter ``off`` (= tl.randn4x's).
        ``TL_PHILOX``: Triton's own ``tl.randint4x`` (the same bits; a timing ablation)."""
        if TL_PHILOX:
            w0, w1, w2, w3 = tl.randint4x(seed, off)
        else:
            w0, w1, w2, w3 = _philox4x32_10(seed, off)
        n0, n1 = _box_muller(tl.random.uint_to_uniform_float(w0), tl.random.uint_to_uniform_float(w1), FAST)
        n2, n3 = _box_muller(tl.random.uint_to_uniform_float(w2), tl.random.uint_to_uniform_float(w3), FAST)
        return n0, n1, n2, n3

    @triton.jit
    def _to_out(y, out_ptr, OUT_BF16: tl.constexpr, FAST: tl.constexpr):
        if OUT_BF16 and not FAST:
            # float32 -> bfloat16 rounded to nearest even with integer ops: the same bits as the GPU's
            # cvt.rn.bf16.f32 (used when compiled), here for TRITON_INTERPRET=1, whose float32 -> bf16 cast truncates.
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return y.to(out_ptr.dtype.element_ty)

    @triton.jit
    def _upsampled_groups(x_ptr, pos_ptr, src_ptr, group_ptr, order_ptr, out_ptr, pos_out_ptr, seed, img, pid,
                          src_len, dst_len, C, num_up, a, b, alpha, pos_scale, child_step,
                          BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, OUT_BF16: tl.constexpr, FAST: tl.constexpr,
                          NOISE: tl.constexpr, DIRECT: tl.constexpr, TL_PHILOX: tl.constexpr,
                          WORK_MAPS: tl.constexpr):
        """BLOCK_G upsampled groups x all C channels: one normal4 per (group, channel), 4 output rows.
        ``NOISE=False`` / ``DIRECT=True``: timing ablations only (wrong output, see :func:`transition_ablation`)."""
        img_rows = img * dst_len  # first output row of this image (int64)
        gi = pid * BLOCK_G + tl.arange(0, BLOCK_G)
        gmask = gi < num_up
        work = img_rows + 4 * gi.to(tl.int64)
        if DIRECT:  # rows, source and counter from the work index: no dependent loads of the maps
            r0 = work
            r1 = work + 1
            r2 = work + 2
            r3 = work + 3
            p = gi % src_len
            g = gi
        else:
            r0 = img_rows + tl.load(order_ptr + work, mask=gmask, other=0)
            r1 = img_rows + tl.load(order_ptr + work + 1, mask=gmask, other=0)
            r2 = img_rows + tl.load(order_ptr + work + 2, mask=gmask, other=0)
            r3 = img_rows + tl.load(order_ptr + work + 3, mask=gmask, other=0)
            if WORK_MAPS:  # src_index / group given in work order: loaded with order, not after it
                p = tl.load(src_ptr + work, mask=gmask, other=0)
                g = tl.load(group_ptr + work, mask=gmask, other=0)
            else:
                p = tl.load(src_ptr + r0, mask=gmask, other=0)
                g = tl.load(group_ptr + r0, mask=gmask, other=0)
        src_row = img * src_len + p.to(tl.int64)
        py = tl.load(pos_ptr + src_row * 2, mask=gmask, other=0.0)
        px = tl.load(pos_ptr + src_row * 2 + 1, mask=gmask, other=0.0)
        py1 = py + child_step
        px1 = px + child_step
        tl.store(pos_out_ptr + r0 * 2, pos_scale * py, mask=gmask)
        tl.store(pos_out_ptr + r0 * 2 + 1, pos_scale * px, mask=gmask)
        tl.store(pos_out_ptr + r1 * 2, pos_scale * py, mask=gmask)
        tl.store(pos_out_ptr + r1 * 2 + 1, pos_scale * px1, mask=gmask)
        tl.store(pos_out_ptr + r2 * 2, pos_scale * py1, mask=gmask)
        tl.store(pos_out_ptr + r2 * 2 + 1, pos_scale * px, mask=gmask)
        tl.store(pos_out_ptr + r3 * 2, pos_scale * py1, mask=gmask)
        tl.store(pos_out_ptr + r3 * 2 + 1, pos_scale * px1, mask=gmask)

        ch = tl.arange(0, BLOCK_C)
        cols = ch[None, :]
        m = gmask[:, None] & (ch < C)[None, :]
        xv = tl.load(x_ptr + src_row[:, None] * C + cols, mask=m, other=0.0).to(tl.float32)
        if NOISE:
            u0, u1, u2, u3 = _normal4(seed, g[:, None] * C + cols, FAST, TL_PHILOX)  # int32 counter (G*C < 2^31)
        else:
            u0 = tl.zeros((BLOCK_G, BLOCK_C), tl.float32)
            u1 = u0
            u2 = u0
            u3 = u0
        s = ((u0 + u1) + u2) + u3
        tl.store(out_ptr + r0[:, None] * C + cols, _to_out(tl.fma(xv, a, b * tl.fma(s, alpha, u0)), out_ptr, OUT_BF16, FAST),
                 mask=m)
        tl.store(out_ptr + r1[:, None] * C + cols, _to_out(tl.fma(xv, a, b * tl.fma(s, alpha, u1)), out_ptr, OUT_BF16, FAST),
                 mask=m)
        tl.store(out_ptr + r2[:, None] * C + cols, _to_out(tl.fma(xv, a, b * tl.fma(s, alpha, u2)), out_ptr, OUT_BF16, FAST),
                 mask=m)
        tl.store(out_ptr + r3[:, None] * C + cols, _to_out(tl.fma(xv, a, b * tl.fma(s, alpha, u3)), out_ptr, OUT_BF16, FAST),
                 mask=m)

    @triton.jit
    def _kept_tokens(x_ptr, pos_ptr, src_ptr, group_ptr, order_ptr, out_ptr, pos_out_ptr, seed, img, pid,
                     src_len, dst_len, C, num_up, a, b, noise_std, pos_scale,
                     BLOCK_K: tl.constexpr, BLOCK_C4: tl.constexpr, OUT_BF16: tl.constexpr, FAST: tl.constexpr,
                     NOISE: tl.constexpr, DIRECT: tl.constexpr, TL_PHILOX: tl.constexpr, WORK_MAPS: tl.constexpr):
        """BLOCK_K kept tokens x C channels: one normal4 per (token, aligned quad of channels).
        ``NOISE=False`` / ``DIRECT=True``: timing ablations only (wrong output, see :func:`transition_ablation`)."""
        img_rows = img * dst_len
        ki = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ki < dst_len - 4 * num_up
        if DIRECT:  # row, source and counter from the work index: no dependent loads of the maps
            row = img_rows + 4 * num_up + ki
            p = (4 * num_up + ki) % src_len
            g = num_up + ki
        else:
            row = img_rows + tl.load(order_ptr + img_rows + 4 * num_up + ki, mask=kmask, other=0)
            if WORK_MAPS:  # src_index / group given in work order: loaded with order, not after it
                p = tl.load(src_ptr + img_rows + 4 * num_up + ki, mask=kmask, other=0)
                g = tl.load(group_ptr + img_rows + 4 * num_up + ki, mask=kmask, other=0)
            else:
                p = tl.load(src_ptr + row, mask=kmask, other=0)
                g = tl.load(group_ptr + row, mask=kmask, other=0)
        src_row = img * src_len + p.to(tl.int64)
        py = tl.load(pos_ptr + src_row * 2, mask=kmask, other=0.0)
        px = tl.load(pos_ptr + src_row * 2 + 1, mask=kmask, other=0.0)
        tl.store(pos_out_ptr + row * 2, pos_scale * py, mask=kmask)
        tl.store(pos_out_ptr + row * 2 + 1, pos_scale * px, mask=kmask)

        c4 = tl.arange(0, BLOCK_C4)
        if NOISE:
            n0, n1, n2, n3 = _normal4(seed, g[:, None] * C + 4 * c4[None, :], FAST, TL_PHILOX)  # (BLOCK_K, BLOCK_C4)
            n = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # [k, c4, i, j] = n_(2i + j): channel 4 c4 + 2i + j
            n = tl.reshape(n, (BLOCK_K, 4 * BLOCK_C4))
        else:
            n = tl.zeros((BLOCK_K, 4 * BLOCK_C4), tl.float32)
        ch = tl.arange(0, 4 * BLOCK_C4)
        m = kmask[:, None] & (ch < C)[None, :]
        xv = tl.load(x_ptr + src_row[:, None] * C + ch[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.fma(xv, a, b * (noise_std * n))
        tl.store(out_ptr + row[:, None] * C + ch[None, :], _to_out(y, out_ptr, OUT_BF16, FAST), mask=m)

    @triton.jit
    def _stage_transition_kernel(
        x_ptr, pos_ptr, src_ptr, group_ptr, order_ptr, seeds_ptr, out_ptr, pos_out_ptr,
        src_len, dst_len, C, num_up, up_programs,
        a, b, alpha, noise_std, pos_scale, child_step,
        BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C4: tl.constexpr,
        OUT_BF16: tl.constexpr, FAST: tl.constexpr, NOISE: tl.constexpr = True, DIRECT: tl.constexpr = False,
        TL_PHILOX: tl.constexpr = False, WORK_MAPS: tl.constexpr = False,
    ):
        """Grid (up_programs + kept programs, B): upsampled groups first, then kept tokens. ``NOISE`` / ``DIRECT`` /
        ``TL_PHILOX`` / ``WORK_MAPS``: True / False / False / False except in :func:`transition_ablation`."""
        pid = tl.program_id(0)
        img = tl.program_id(1).to(tl.int64)
        seed = tl.load(seeds_ptr + img)
        if pid < up_programs:
            _upsampled_groups(x_ptr, pos_ptr, src_ptr, group_ptr, order_ptr, out_ptr, pos_out_ptr, seed, img, pid,
                              src_len, dst_len, C, num_up, a, b, alpha, pos_scale, child_step,
                              BLOCK_G, BLOCK_C, OUT_BF16, FAST, NOISE, DIRECT, TL_PHILOX, WORK_MAPS)
        else:
            _kept_tokens(x_ptr, pos_ptr, src_ptr, group_ptr, order_ptr, out_ptr, pos_out_ptr, seed, img,
                         pid - up_programs, src_len, dst_len, C, num_up, a, b, noise_std, pos_scale,
                         BLOCK_K, BLOCK_C4, OUT_BF16, FAST, NOISE, DIRECT, TL_PHILOX, WORK_MAPS)


def _triton_usable(device: torch.device) -> bool:
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def stage_transition_triton(
    x: torch.Tensor,
    pos: torch.Tensor,
    src_index: torch.Tensor,
    group: torch.Tensor,
    child: torch.Tensor,
    seeds: torch.Tensor,
    *,
    a: float,
    b: float,
    c: float,
    pos_scale: float = 1.0,
    child_step: float = 0.5,
    exact_noise: bool = False,
    out: Optional[torch.Tensor] = None,
    pos_out: Optional[torch.Tensor] = None,
    order: Optional[torch.Tensor] = None,
    num_up: Optional[int] = None,
    check_values: Optional[bool] = None,
    tiles: Optional[Tuple[int, int, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused transition as one Triton launch (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    ``order``/``num_up``: the group-major work order (see :func:`group_major_order`, which computes
    it when they are not given, at the cost of a few extra launches and a host sync).
    ``tiles``: ``(BLOCK_G, BLOCK_K, num_warps)`` instead of the built-in choice (tuning only:
    ``benchmarks/tune_transition.py``); powers of two. The output does not depend on the tiles.
    """
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    if tiles is not None and (len(tiles) != 3 or any(int(t) < 1 or int(t) & (int(t) - 1) for t in tiles)):
        raise ValueError(f"tiles={tiles!r}: (BLOCK_G, BLOCK_K, num_warps), each a power of two >= 1")
    if isinstance(x, torch.Tensor) and not _triton_usable(x.device):
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (x is on {x.device}); CPU tensors run only under the "
            "Triton interpreter: set TRITON_INTERPRET=1 before importing triton")
    out, pos_out, order, num_up, done = _kernel_prologue(
        x, pos, src_index, group, child, seeds, a=a, b=b, c=c, pos_scale=pos_scale, child_step=child_step,
        exact_noise=exact_noise, out=out, pos_out=pos_out, order=order, num_up=num_up, check_values=check_values)
    if done:
        return out, pos_out
    _launch_triton(x, pos, src_index, group, seeds, out, pos_out, order, num_up, a=a, b=b, c=c, pos_scale=pos_scale,
                   child_step=child_step, exact_noise=exact_noise, tiles=tiles)
    return out, pos_out


def _launch_triton(x, pos, src_index, group, seeds, out, pos_out, order, num_up: int, *, a, b, c, pos_scale,
                   child_step, exact_noise, tiles, noise: bool = True, direct: bool = False,
                   tl_philox: bool = False, work_maps: bool = False) -> None:
    """One launch of the kernel into ``out`` / ``pos_out`` (checked arguments, the work order given).
    ``noise`` / ``direct`` / ``tl_philox`` / ``work_maps``: the timing ablations of :func:`transition_ablation`
    (``work_maps``: ``src_index`` and ``group`` are given in work order, see :func:`work_order_maps`)."""
    bsz, src_len, channels = x.shape
    dst_len = src_index.shape[1]
    block_c = triton.next_power_of_2(channels)
    block_c4 = triton.next_power_of_2(triton.cdiv(channels, 4))
    kept = dst_len - 4 * num_up
    num_warps = _NUM_WARPS
    if tiles is None:
        block_g, block_k, up_programs, kept_programs = _tiles(num_up, kept, bsz, block_c, block_c4)
    else:
        block_g, block_k, num_warps = (int(t) for t in tiles)
        up_programs, kept_programs = -(-num_up // block_g), -(-kept // block_k)
    grid = (up_programs + kept_programs, bsz)
    if grid[0] > 2**31 - 1 or bsz > 65535:
        raise ValueError(f"too many tokens for one launch: B={bsz}, Ld={dst_len}")
    fast = x.device.type == "cuda" and libdevice is not None
    # the register cap where it was analysed (the built-in large tiles at C = 64, the runtime's case): elsewhere
    # ptxas chooses as before
    capped = tiles is None and block_c == 64 and block_g == _LARGE_TILES[0] and x.device.type == "cuda"
    limits = {"maxnreg": _MAX_REGISTERS} if capped else {}
    _stage_transition_kernel[grid](
        x.contiguous(), pos.contiguous(), src_index.contiguous(), group.contiguous(), order,
        seeds.contiguous(), out, pos_out,
        src_len, dst_len, channels, num_up, up_programs,
        float(a), float(b), correlated_noise_alpha(c), _noise_std(c, exact_noise), float(pos_scale),
        float(child_step),
        BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_C4=block_c4, OUT_BF16=out.dtype == torch.bfloat16,
        FAST=fast, NOISE=bool(noise), DIRECT=bool(direct), TL_PHILOX=bool(tl_philox), WORK_MAPS=bool(work_maps),
        num_warps=num_warps,
        num_stages=1, enable_fp_fusion=False,
        **limits,
    )


ABLATIONS = {  # variant -> (noise, direct, tl_philox, work_maps)
    "kernel": (True, False, False, False), "tl_philox": (True, False, True, False),
    "work_maps": (True, False, False, True), "no_noise": (False, False, False, False),
    "direct": (True, True, False, False), "direct_no_noise": (False, True, False, False)}


def work_order_maps(src_index: torch.Tensor, group: torch.Tensor, order: torch.Tensor):
    """``(src_index, group)`` (B, Ld) int32 permuted into the kernel's work order ``order`` (B, Ld): entry ``k`` of
    each is the map of output row ``order[k]``. With them the kernel loads a work item's source row and Philox
    counter together with its output row instead of after it."""
    idx = order.long()
    return (torch.gather(src_index, 1, idx).to(torch.int32).contiguous(),
            torch.gather(group, 1, idx).to(torch.int32).contiguous())


def transition_ablation(variant: str, x, pos, src_index, group, child, seeds, *, a, b, c, pos_scale=1.0,
                        child_step=0.5, order, num_up, out, pos_out, tiles=None, work_maps=None) -> None:
    """A timing ablation of the Triton kernel (``benchmarks/transition_ablation.py``), writing into ``out`` /
    ``pos_out``:

    * ``"kernel"``: the kernel as :func:`stage_transition_triton` launches it;
    * ``"tl_philox"``: the same with Triton's own ``tl.randint4x`` (the same bits: the output is correct) instead of
      :func:`_philox4x32_10`'s 64-bit products: the kernel before 2026-12-06;
    * ``"work_maps"``: ``src_index`` / ``group`` in work order (:func:`work_order_maps`, given as ``work_maps`` or
      computed here): one dependent load fewer before the noise and the x rows can start (the output is correct);
    * ``"no_noise"``: no Philox / Box-Muller (zero noise): what the noise costs;
    * ``"direct"``: output rows, source rows and noise counters taken from the work index instead of loaded through
      ``order`` -> ``src_index`` / ``group`` (a chain of dependent loads): what the indirection costs;
    * ``"direct_no_noise"``: both: the gather / scatter of the bytes alone.

    Same grid, tiles, bytes of x, positions and output as the kernel. Never used by the runtime. ``"kernel"``,
    ``"tl_philox"`` and ``"work_maps"`` compute the transition; the others write wrong values on purpose."""
    if variant not in ABLATIONS:
        raise ValueError(f"variant={variant!r}: one of {sorted(ABLATIONS)}")
    if not HAS_TRITON:
        raise RuntimeError("transition_ablation needs the triton package (pip install triton)")
    if not _triton_usable(x.device):
        raise RuntimeError(f"transition_ablation needs CUDA tensors, or TRITON_INTERPRET=1 on a CPU (x is on "
                           f"{x.device})")
    noise, direct, tl_philox, by_work = ABLATIONS[variant]
    if by_work:
        src_index, group = work_maps if work_maps is not None else work_order_maps(src_index, group, order)
    _launch_triton(x, pos, src_index, group, seeds, out, pos_out, order, int(num_up), a=a, b=b, c=c,
                   pos_scale=pos_scale, child_step=child_step, exact_noise=False, tiles=tiles, noise=noise,
                   direct=direct, tl_philox=tl_philox, work_maps=by_work)


# ---------------------------------------------------------------------------------------------
# group-major work order
# ---------------------------------------------------------------------------------------------
def group_major_order(src_index: torch.Tensor, group: torch.Tensor, child: torch.Tensor, *,
                      check: bool = True) -> Tuple[torch.Tensor, int]:
    """Work order of the group-major kernels for per-row maps: ``(order (B, Ld) int32, num_up)``.

    Per image, ``order`` lists the rows of upsampled children sorted by ``(group, child)`` (so
    entries ``4j .. 4j+3`` are children ``q = 0..3`` of the ``j``-th group), then the rows with
    ``child < 0`` in ascending order. ``num_up`` (the number of upsampled groups) must be the same for
    every image. With ``check`` (a host sync) it raises ``ValueError`` unless every upsampled group
    has exactly the children 0, 1, 2, 3 and they share one source token; the kernels need complete
    groups (RALU always upsamples a token into 4), the torch reference does not.
    """
    bsz, dst_len = child.shape
    dev = child.device
    up = child >= 0
    rows = torch.arange(dst_len, device=dev, dtype=torch.int64).expand(bsz, dst_len)
    # up rows: key = group * 4 + q < 2^33; kept rows after every up row, in row order
    key = torch.where(up, group.long() * 4 + child.long().clamp_min(0), (1 << 34) + rows)
    order = torch.argsort(key, dim=1, stable=True)
    counts = up.sum(1)
    if bsz == 0:
        return order.to(torch.int32).contiguous(), 0
    n_up_rows = int(counts[0])
    if check:
        if bool((counts != n_up_rows).any()):
            raise ValueError(f"every image must upsample the same number of tokens; child >= 0 counts per image: "
                             f"{counts.tolist()}")
        _check_quads(order, n_up_rows, src_index, group, child)
    elif n_up_rows % 4:
        raise ValueError(f"{n_up_rows} upsampled rows per image is not a multiple of 4")
    return order.to(torch.int32).contiguous(), n_up_rows // 4


def _check_quads(order: torch.Tensor, n_up_rows: int, src_index, group, child) -> None:
    if n_up_rows % 4:
        raise ValueError(f"{n_up_rows} rows with child >= 0 per image is not a multiple of 4: every upsampled "
                         "group needs its 4 children")
    bsz = order.shape[0]
    quads = order[:, :n_up_rows].long().view(bsz, -1, 4)
    q = torch.gather(child, 1, quads.flatten(1)).view_as(quads).long()
    wrong = (q != torch.arange(4, device=q.device)).any(-1)  # (B, U)
    if bool(wrong.any()):
        b, j = (int(i) for i in torch.nonzero(wrong)[0])
        raise ValueError(f"upsampled groups must have exactly the children 0, 1, 2, 3; group {j} of image {b} has "
                         f"{q[b, j].tolist()} (the Triton/CUDA kernels need complete groups; impl='torch' takes any map)")
    for name, t in (("group", group), ("src_index", src_index)):
        v = torch.gather(t, 1, quads.flatten(1)).view_as(quads)
        if bool((v != v[..., :1]).any()):
            raise ValueError(f"the 4 children of an upsampled group must share one {name}")
    kept = order[:, n_up_rows:].long()
    if kept.numel() and bool((torch.gather(child, 1, kept) >= 0).any()):
        raise ValueError("order must list the kept rows (child < 0) after the upsampled groups")


def _check_order(order: torch.Tensor, num_up: int, src_index, group, child) -> None:
    """Validate a caller-provided group-major ``order`` (CPU tensors or ``check_values=True``)."""
    bsz, dst_len = child.shape
    if not isinstance(order, torch.Tensor) or order.shape != (bsz, dst_len) or order.dtype != torch.int32:
        raise ValueError(f"order must be an int32 tensor of shape (B, Ld) = {(bsz, dst_len)}; got "
                         f"{getattr(order, 'dtype', type(order).__name__)} {tuple(getattr(order, 'shape', ()))}")
    if order.device != child.device:
        raise ValueError(f"order must be on {child.device}, got {order.device}")
    if dst_len == 0:
        return
    srt = torch.sort(order.long(), dim=1).values
    if bool((srt != torch.arange(dst_len, device=order.device)).any()):
        raise ValueError("order must be a permutation of the output rows 0..Ld-1 for every image")
    counts = (child >= 0).sum(1)
    if bool((counts != 4 * num_up).any()):
        raise ValueError(f"num_up={num_up} groups means {4 * num_up} rows with child >= 0 per image; got {counts.tolist()}")
    _check_quads(order, 4 * num_up, src_index, group, child)


def _kernel_prologue(x, pos, src_index, group, child, seeds, *, a, b, c, pos_scale, child_step, exact_noise, out,
                     pos_out, order, num_up, check_values):
    """Shared start of the Triton and CUDA paths: validate, allocate outputs, resolve the work order.

    Returns ``(out, pos_out, order, num_up, done)``; ``done`` means the outputs are already final (no
    output tokens, or C = 0: positions only, which the kernels do not handle, come from the reference).
    """
    bsz, _, dst_len, channels = _validate(x, pos, src_index, group, child, seeds, a, b, c, pos_scale,
                                          child_step, out, pos_out, check_values)
    out, pos_out = _alloc_outputs(x, bsz, dst_len, channels, out, pos_out)
    if bsz * dst_len == 0:
        return out, pos_out, order, num_up, True
    if channels == 0:
        stage_transition_reference(x, pos, src_index, group, child, seeds, a=a, b=b, c=c, pos_scale=pos_scale,
                                   child_step=child_step, exact_noise=exact_noise, out=out, pos_out=pos_out,
                                   check_values=False)
        return out, pos_out, order, num_up, True
    order, num_up = _resolve_order(order, num_up, src_index, group, child, check_values)
    return out, pos_out, order, num_up, False


def _resolve_order(order, num_up, src_index, group, child, check_values) -> Tuple[torch.Tensor, int]:
    if (order is None) != (num_up is None):
        raise ValueError("pass both order and num_up (see group_major_order), or neither")
    if order is None:
        return group_major_order(src_index, group, child)
    num_up = int(num_up)
    if num_up < 0 or 4 * num_up > child.shape[1]:
        raise ValueError(f"num_up must be in [0, Ld/4] = [0, {child.shape[1] // 4}]; got {num_up}")
    if check_values is None:
        check_values = child.device.type == "cpu"
    if check_values:
        _check_order(order, num_up, src_index, group, child)
    elif order.shape != child.shape or order.dtype != torch.int32 or order.device != child.device:
        raise ValueError(f"order must be int32 (B, Ld) = {tuple(child.shape)} on {child.device}")
    return order.contiguous(), num_up


# ---------------------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------------------
def impl_unusable(impl: str, device) -> Optional[str]:
    """Why the transition implementation ``impl`` cannot run on ``device`` (None when it can; "auto" and "torch"
    always can): checked before a call's model work instead of at its first transition."""
    device = torch.device(device)
    if impl == "cuda":
        if device.type != "cuda":
            return f"impl='cuda' runs on CUDA devices; this pipeline is on {device}"
        try:
            from . import _csrc

            ok = bool(_csrc.load_csrc())
        except Exception:  # noqa: BLE001 - extension missing or broken
            ok = False
        if not ok:
            return ("impl='cuda': the CUDA op torch.ops.ralu.stage_transition is not available (build "
                    "ralu_kernels._C with a CUDA build of torch; `ralu info` says why)")
    if impl == "triton" and not _triton_usable(device):
        return (f"impl='triton' needs triton and a CUDA device, or TRITON_INTERPRET=1 on a CPU; this pipeline is on "
                f"{device}" + ("" if HAS_TRITON else " and triton is not importable"))
    return None


def _csrc_usable(x: torch.Tensor, out: Optional[torch.Tensor]) -> bool:
    if x.device.type != "cuda" or (out is not None and out.dtype != x.dtype):
        return False
    try:
        from . import _csrc

        return bool(_csrc.load_csrc())
    except Exception:  # noqa: BLE001 - extension missing or broken: fall back
        return False


def stage_transition(
    x: torch.Tensor,
    pos: torch.Tensor,
    src_index: torch.Tensor,
    group: torch.Tensor,
    child: torch.Tensor,
    seeds: torch.Tensor,
    *,
    a: float,
    b: float,
    c: float,
    pos_scale: float = 1.0,
    child_step: float = 0.5,
    exact_noise: bool = False,
    out: Optional[torch.Tensor] = None,
    pos_out: Optional[torch.Tensor] = None,
    order: Optional[torch.Tensor] = None,
    num_up: Optional[int] = None,
    impl: str = "auto",
    check_values: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused RALU stage transition; returns ``(x_out (B, Ld, C), pos_out (B, Ld, 2) float32)``.

    ``impl``: ``"auto"`` (CUDA op if built and x on CUDA, else Triton on CUDA, else torch),
    ``"cuda"``, ``"triton"``, ``"torch"``. See the module docstring for the math.
    ``order``/``num_up``: group-major work order for the Triton/CUDA kernels (:func:`group_major_order`;
    computed here when not given; the torch reference ignores them).
    ``check_values``: check index/group ranges (default: on CPU only; on CUDA it would sync).
    """
    kw = dict(a=a, b=b, c=c, pos_scale=pos_scale, child_step=child_step, exact_noise=exact_noise,
              out=out, pos_out=pos_out, check_values=check_values)
    if impl == "torch":
        return stage_transition_reference(x, pos, src_index, group, child, seeds, **kw)
    kw.update(order=order, num_up=num_up)
    if impl == "triton":
        return stage_transition_triton(x, pos, src_index, group, child, seeds, **kw)
    if impl == "cuda":
        if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
            raise RuntimeError("impl='cuda' needs CUDA tensors")
        if not _csrc_usable(x, out):
            raise RuntimeError("impl='cuda': the CUDA op torch.ops.ralu.stage_transition is not available "
                               "(build ralu_kernels._C with a CUDA build of torch), or out's dtype differs from x's")
        return _run_csrc(x, pos, src_index, group, child, seeds, **kw)
    if impl != "auto":
        raise ValueError(f"impl must be 'auto', 'cuda', 'triton' or 'torch'; got {impl!r}")
    if isinstance(x, torch.Tensor) and x.device.type == "cuda":
        if _csrc_usable(x, out):
            return _run_csrc(x, pos, src_index, group, child, seeds, **kw)
        if HAS_TRITON:
            return stage_transition_triton(x, pos, src_index, group, child, seeds, **kw)
    return stage_transition_reference(x, pos, src_index, group, child, seeds, **kw)


def _run_csrc(x, pos, src_index, group, child, seeds, *, a, b, c, pos_scale, child_step, exact_noise, out,
              pos_out, order, num_up, check_values):
    from . import _csrc

    out, pos_out, order, num_up, done = _kernel_prologue(
        x, pos, src_index, group, child, seeds, a=a, b=b, c=c, pos_scale=pos_scale, child_step=child_step,
        exact_noise=exact_noise, out=out, pos_out=pos_out, order=order, num_up=num_up, check_values=check_values)
    if done:
        return out, pos_out
    return _csrc.stage_transition_cuda(x, pos, src_index, group, child, seeds, a=a, b=b, c=c,
                                       pos_scale=pos_scale, child_step=child_step,
                                       exact_noise=exact_noise, out=out, pos_out=pos_out, order=order,
                                       num_up=num_up)


# ---------------------------------------------------------------------------------------------
# the reference implementation's approach (benchmark comparison only)
# ---------------------------------------------------------------------------------------------
def dense_mvn_noise(group: torch.Tensor, child: torch.Tensor, c: float, channels: int, *,
                    exact_noise: bool = False, generator: Optional[torch.Generator] = None,
                    method: str = "mvn") -> torch.Tensor:
    """Noise for one image drawn as a dense multivariate normal over all ``Ld`` tokens: ``(Ld, C)``.

    The covariance is ``Ld x Ld``: ``I - c J`` on each group of upsampled
    children (same ``group``, ``child >= 0``), ``v`` (1 or 1 - c) on the diagonal of the others.
    ``method="mvn"`` uses ``torch.distributions.MultivariateNormal`` (what the reference code
    does), ``"cholesky"`` a Cholesky factor and a matmul. O(Ld^2) memory, O(Ld^3) time: for the
    benchmark comparison only.
    """
    if group.dim() != 1 or child.shape != group.shape:
        raise ValueError("dense_mvn_noise takes one image: group and child of shape (Ld,)")
    c = _check_c(c)
    dev = group.device
    ld = group.shape[0]
    up = child >= 0
    same = (group[:, None] == group[None, :]) & up[:, None] & up[None, :]
    v = 1.0 - c if exact_noise else 1.0
    # -c on every pair of children of one parent (diagonal included), then + 1 on the children's diagonal
    cov = -c * same.to(torch.float64)
    cov = cov + torch.diag(torch.where(up, torch.ones(ld, dtype=torch.float64, device=dev),
                                       torch.full((ld,), v, dtype=torch.float64, device=dev)))
    cov = cov + 1e-6 * torch.eye(ld, dtype=torch.float64, device=dev)  # c = 1/4 makes I - cJ singular
    cov = cov.float()
    if method == "mvn":
        if generator is not None:
            raise ValueError("method='mvn' samples with the global RNG (as the reference code); use 'cholesky'")
        dist = torch.distributions.MultivariateNormal(torch.zeros(ld, device=dev), covariance_matrix=cov)
        return dist.sample((channels,)).T.contiguous()
    if method == "cholesky":
        lo = torch.linalg.cholesky(cov)
        z = torch.randn(ld, channels, device=dev, generator=generator)
        return lo @ z
    raise ValueError(f"method must be 'mvn' or 'cholesky'; got {method!r}")


# ---------------------------------------------------------------------------------------------
# example maps (tests and benchmarks; the runtime builds its own in ralu_runtime.layout)
# ---------------------------------------------------------------------------------------------
def example_transition_maps(kind: str, height: int, width: int, ratio: float, batch: int = 1, *,
                            generator: Optional[torch.Generator] = None, shuffle: bool = False,
                            device="cpu") -> dict:
    """Index maps of a realistic RALU transition on a ``height x width`` coarse token grid.

    ``kind="1to2"``: source = the coarse grid in raster order (``Ls = M = H*W``); ``int(M*ratio)``
    random parents per image are upsampled (4 children, ``q = 0..3``, ``group`` = parent raster
    index), the others are kept (``q = -1``, ``group`` = their raster index). Output order: the
    children parent by parent, then the kept tokens (``shuffle=True`` permutes it).
    ``kind="2to3"``: source = that mixed set (``Ls = 3k + M``), output = the fine grid in raster
    order (``Ld = 4M``, ``pos_scale = 2``): children of parents that were still coarse get
    ``q = 2*dy + dx`` and ``group`` = parent raster index; tokens that were already fine are
    copied with ``q = -1`` and ``group = M + fine raster index`` (disjoint from the parents' ids,
    so no two noise draws share a Philox counter).
    Returns ``dict(pos, src_index, group, child, order, num_up, pos_scale, num_groups, selected)``
    (``order``/``num_up`` from :func:`group_major_order`).
    """
    m = height * width
    k = int(m * ratio)
    rows = torch.arange(m) // width
    cols = torch.arange(m) % width
    coarse_pos = torch.stack((rows, cols), -1).to(torch.float32)
    out = {k_: [] for k_ in ("pos", "src_index", "group", "child", "selected")}
    for _ in range(batch):
        sel = torch.randperm(m, generator=generator)[:k].sort().values
        kept_mask = torch.ones(m, dtype=torch.bool)
        kept_mask[sel] = False
        kept = torch.nonzero(kept_mask).flatten()
        src1 = torch.cat((sel.repeat_interleave(4), kept))
        q1 = torch.cat((torch.arange(4).repeat(k), torch.full((m - k,), -1)))
        g1 = src1.clone()
        if kind == "1to2":
            perm = torch.randperm(src1.numel(), generator=generator) if shuffle else torch.arange(src1.numel())
            out["pos"].append(coarse_pos)
            out["src_index"].append(src1[perm])
            out["group"].append(g1[perm])
            out["child"].append(q1[perm])
        elif kind == "2to3":
            # stage-2 tokens (children then kept coarse) with their coarse-unit positions
            d = torch.stack((q1.clamp_min(0) >> 1, q1.clamp_min(0) & 1), -1).to(torch.float32)
            pos2 = coarse_pos[src1] + 0.5 * d * (q1 >= 0)[:, None]
            fh, fw = 2 * height, 2 * width
            fy = torch.arange(4 * m) // fw
            fx = torch.arange(4 * m) % fw
            parent = (fy // 2) * width + fx // 2
            q_f = 2 * (fy % 2) + fx % 2
            # index of every stage-2 token: children of selected parent i at 4*rank(i) + q, kept at 4k + rank
            slot = torch.full((m,), -1, dtype=torch.long)
            slot[sel] = torch.arange(k)
            kslot = torch.full((m,), -1, dtype=torch.long)
            kslot[kept] = torch.arange(m - k)
            was_fine = slot[parent] >= 0
            src = torch.where(was_fine, 4 * slot[parent] + q_f, 4 * k + kslot[parent])
            child = torch.where(was_fine, torch.full_like(q_f, -1), q_f)
            group = torch.where(was_fine, m + torch.arange(4 * m), parent)
            out["pos"].append(pos2)
            out["src_index"].append(src)
            out["group"].append(group)
            out["child"].append(child)
        else:
            raise ValueError(f"kind must be '1to2' or '2to3'; got {kind!r}")
        out["selected"].append(sel)
    src_index = torch.stack(out["src_index"]).to(dtype=torch.int32)
    group = torch.stack(out["group"]).to(dtype=torch.int32)
    child = torch.stack(out["child"]).to(dtype=torch.int8)
    order, num_up = group_major_order(src_index, group, child)
    return dict(
        pos=torch.stack(out["pos"]).to(device),
        src_index=src_index.to(device),
        group=group.to(device),
        child=child.to(device),
        order=order.to(device),
        num_up=num_up,
        pos_scale=1.0 if kind == "1to2" else 2.0,
        num_groups=m if kind == "1to2" else 5 * m,
        selected=out["selected"],
    )
