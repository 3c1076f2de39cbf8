"""Fused RALU stage transition: gather -> nearest upsample -> correlated noise -> scale -> scatter.

One call turns the tokens of a finishing stage into the tokens of the next stage, for a whole
batch, and writes their position ids. For every image ``b``, output token ``i``, channel ``ch``
(float32 math, result cast to the output dtype)::

    p, g, q = src_index[b, i], group[b, i], child[b, i]
    (u0, u1, u2, u3) = tl.randn4x(seeds[b], g * C + ch)        # Triton's Philox normals (int32 offset)
    q >= 0:  n = fma(alpha, ((u0 + u1) + u2) + u3, u_q)         # alpha = (sqrt(1 - 4c) - 1) / 4
    q <  0:  n = sqrt(v) * u0                                   # v = 1, or 1 - c with exact_noise
    x_out[b, i, ch] = fma(a, x[b, p, ch], b * n)
    pos_out[b, i]   = pos_scale * (pos[b, p] + child_step * (q // 2, q % 2))   (q >= 0)
                      pos_scale * pos[b, p]                                      (q <  0)

The 4 children of one parent (same ``g``, ``q`` = 0..3) get noise with covariance ``I - c J``
per channel; the noise depends only on (seed, group, child, channel), not on the output order.
The evaluation order above (and float32 scalars ``a``, ``b``, ``alpha``, ``sqrt(v)`` computed in
float64 on the host) is the one of the CUDA op in ``csrc/stage_transition.cu``, so the Triton
kernel, the CUDA op and the torch reference compute the same float32 expression.

Implementations (all with the signature of :func:`stage_transition`):

* :func:`stage_transition_triton`: one Triton launch, grid ``(cdiv(Ld, BLOCK_T), B)``, each program
  ``BLOCK_T`` tokens x all ``C`` channels (``BLOCK_T * BLOCK_C = 512`` elements, 4 warps: 4
  contiguous channels per thread; the kernel is bound by the Philox/Box-Muller arithmetic, not by
  memory, and 4 elements per thread measured fastest), positions written by the same launch,
  no autotuning, compiled with ``enable_fp_fusion=False``.
* :func:`stage_transition_reference`: pure torch (CPU or CUDA), memory O(tokens * C) processed in
  chunks, noise from :mod:`ralu_kernels.philox`. On CPU it is bitwise equal to the Triton kernel
  under ``TRITON_INTERPRET=1``; on CUDA the normals differ from compiled Triton by a few ulp
  (``sqrt.approx`` vs IEEE sqrt), see :mod:`ralu_kernels.philox`.
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

from ._triton import HAS_TRITON, tl, triton  # optional: the torch references work without it

__all__ = [
    "stage_transition",
    "stage_transition_reference",
    "stage_transition_triton",
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
    check_values: Optional[bool] = None,
    chunk_elements: int = 1 << 20,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch stage transition (same semantics and float32 evaluation order as the kernels).

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
            off = g[:, None] * channels + ch[None, :]  # < 2^31: int32 and int64 offsets agree
            w0, w1, w2, w3 = philox.randint4x(seed, off)
            u0, u1 = philox.pair_uniform_to_normal(philox.uint_to_uniform_float(w0),
                                                   philox.uint_to_uniform_float(w1))
            u2, u3 = philox.pair_uniform_to_normal(philox.uint_to_uniform_float(w2),
                                                   philox.uint_to_uniform_float(w3))
            s = ((u0 + u1) + u2) + u3
            uq = torch.where(q == 0, u0, torch.where(q == 1, u1, torch.where(q == 2, u2, u3)))
            n = torch.where(q >= 0, _fma_f32(alpha.expand_as(s), s, uq), nstd * u0)
            y = _fma_f32(fa.expand_as(xv), xv, fb * n)
            out[bi, t0:t1].copy_(y)
    return out, pos_out


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
# Measured on an H100 (Triton 3.6, C = 64 bf16, graph-launched): 4 elements per thread was fastest
# (512 x 4 warps: 4.6 us at Ld = 4096, 46 us at Ld = 65536; 1024 x 4 warps: 6.4 / 55 us).
_ELEMS_PER_PROGRAM = 512
_NUM_WARPS = 4

if HAS_TRITON:

    @triton.jit
    def _stage_transition_kernel(
        x_ptr, pos_ptr, src_ptr, group_ptr, child_ptr, seeds_ptr, out_ptr, pos_out_ptr,
        src_len, dst_len, C,
        a, b, alpha, noise_std, pos_scale, child_step,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, OUT_BF16: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        img = tl.program_id(1).to(tl.int64)
        tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = tok < dst_len
        row = img * dst_len + tok  # int64 output token index
        p = tl.load(src_ptr + row, mask=tmask, other=0)
        g = tl.load(group_ptr + row, mask=tmask, other=0)
        q = tl.load(child_ptr + row, mask=tmask, other=-1).to(tl.int32)
        seed = tl.load(seeds_ptr + img)
        src_row = img * src_len + p.to(tl.int64)

        # positions (the same launch)
        py = tl.load(pos_ptr + src_row * 2, mask=tmask, other=0.0)
        px = tl.load(pos_ptr + src_row * 2 + 1, mask=tmask, other=0.0)
        up_t = q >= 0
        py = tl.where(up_t, py + child_step * ((q >> 1) & 1).to(tl.float32), py)
        px = tl.where(up_t, px + child_step * (q & 1).to(tl.float32), px)
        tl.store(pos_out_ptr + row * 2, pos_scale * py, mask=tmask)
        tl.store(pos_out_ptr + row * 2 + 1, pos_scale * px, mask=tmask)

        # channels
        ch = tl.arange(0, BLOCK_C)
        m = tmask[:, None] & (ch < C)[None, :]
        xv = tl.load(x_ptr + src_row[:, None] * C + ch[None, :], mask=m, other=0.0).to(tl.float32)
        off = g[:, None] * C + ch[None, :]  # int32 Philox counter (G*C < 2^31 checked on the host)
        q2 = q[:, None]
        if tl.max(q, axis=0) >= 0:
            u0, u1, u2, u3 = tl.randn4x(seed, off)
            s = ((u0 + u1) + u2) + u3
            uq = tl.where(q2 == 0, u0, tl.where(q2 == 1, u1, tl.where(q2 == 2, u2, u3)))
            n = tl.where(q2 >= 0, tl.fma(s, alpha, uq), noise_std * u0)
        else:  # no upsampled token in this block: only the first normal is needed (= tl.randn)
            n = noise_std * tl.randn(seed, off)
        y = tl.fma(xv, a, b * n)
        if OUT_BF16:
            # float32 -> bfloat16 rounded to nearest even with integer ops: the same bits as the GPU's
            # cvt.rn.bf16.f32, and also under TRITON_INTERPRET=1, whose float32 -> bf16 cast truncates.
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            yo = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            yo = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row[:, None] * C + ch[None, :], yo, mask=m)


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
    check_values: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused transition as one Triton launch (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    if isinstance(x, torch.Tensor) and not _triton_usable(x.device):
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (x is on {x.device}); CPU tensors run only under the "
            "Triton interpreter: set TRITON_INTERPRET=1 before importing triton")
    bsz, src_len, dst_len, channels = _validate(x, pos, src_index, group, child, seeds, a, b, c, pos_scale,
                                                child_step, out, pos_out, check_values)
    out, pos_out = _alloc_outputs(x, bsz, dst_len, channels, out, pos_out)
    if bsz * dst_len == 0:
        return out, pos_out
    if channels == 0:  # nothing for the kernel's channel loop; positions only
        return stage_transition_reference(x, pos, src_index, group, child, seeds, a=a, b=b, c=c,
                                          pos_scale=pos_scale, child_step=child_step,
                                          exact_noise=exact_noise, out=out, pos_out=pos_out,
                                          check_values=False)
    block_c = triton.next_power_of_2(channels)
    block_t = max(1, _ELEMS_PER_PROGRAM // block_c)
    grid = (triton.cdiv(dst_len, block_t), bsz)
    if grid[0] > 2**31 - 1 or bsz > 65535:
        raise ValueError(f"too many tokens for one launch: B={bsz}, Ld={dst_len}")
    _stage_transition_kernel[grid](
        x.contiguous(), pos.contiguous(), src_index.contiguous(), group.contiguous(), child.contiguous(),
        seeds.contiguous(), out, pos_out,
        src_len, dst_len, channels,
        float(a), float(b), correlated_noise_alpha(c), _noise_std(c, exact_noise), float(pos_scale),
        float(child_step),
        BLOCK_T=block_t, BLOCK_C=block_c, OUT_BF16=out.dtype == torch.bfloat16, num_warps=_NUM_WARPS, num_stages=1, enable_fp_fusion=False,
    )
    return out, pos_out


# ---------------------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------------------
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
    impl: str = "auto",
    check_values: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused RALU stage transition; returns ``(x_out (B, Ld, C), pos_out (B, Ld, 2) float32)``.

    ``impl``: ``"auto"`` (CUDA op if built and x on CUDA, else Triton on CUDA, else torch),
    ``"cuda"``, ``"triton"``, ``"torch"``. See the module docstring for the math.
    ``check_values``: check index/group ranges (default: on CPU only; on CUDA it would sync).
    """
    kw = dict(a=a, b=b, c=c, pos_scale=pos_scale, child_step=child_step, exact_noise=exact_noise,
              out=out, pos_out=pos_out, check_values=check_values)
    if impl == "torch":
        return stage_transition_reference(x, pos, src_index, group, child, seeds, **kw)
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
              pos_out, check_values):
    from . import _csrc

    bsz, _, dst_len, channels = _validate(x, pos, src_index, group, child, seeds, a, b, c, pos_scale,
                                          child_step, out, pos_out, check_values)
    out, pos_out = _alloc_outputs(x, bsz, dst_len, channels, out, pos_out)
    if bsz * dst_len == 0:
        return out, pos_out
    return _csrc.stage_transition_cuda(x, pos, src_index, group, child, seeds, a=a, b=b, c=c,
                                       pos_scale=pos_scale, child_step=child_step,
                                       exact_noise=exact_noise, out=out, pos_out=pos_out)


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
    Returns ``dict(pos, src_index, group, child, pos_scale, num_groups, selected)``.
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
    return dict(
        pos=torch.stack(out["pos"]).to(device),
        src_index=torch.stack(out["src_index"]).to(device=device, dtype=torch.int32),
        group=torch.stack(out["group"]).to(device=device, dtype=torch.int32),
        child=torch.stack(out["child"]).to(device=device, dtype=torch.int8),
        pos_scale=1.0 if kind == "1to2" else 2.0,
        num_groups=m if kind == "1to2" else 5 * m,
        selected=out["selected"],
    )
