"""Pure-torch Philox4x32-10 and Box-Muller normals that reproduce Triton's ``tl.randn4x``.

Triton's ``tl.randn4x(seed, offset)`` (``triton/language/random.py``, Triton 3.x) does:

* **key**: ``seed`` (any integer, converted to uint64): ``k0 = seed & 0xffffffff``,
  ``k1 = (seed >> 32) & 0xffffffff``.
* **counter**: ``c0 = uint32(offset)`` (low 32 bits), ``c1 = uint32(offset >> 32)`` when the
  offset tensor is 64-bit and ``0`` for a 32-bit offset, ``c2 = c3 = 0``.
* **10 rounds**: ``c0' = umulhi(B, c2) ^ c1 ^ k0``, ``c2' = umulhi(A, c0) ^ c3 ^ k1``,
  ``c1' = B * c2``, ``c3' = A * c0`` (mod 2^32), then ``k0 += 0x9E3779B9``, ``k1 += 0xBB67AE85``,
  with ``A = 0xD2511F53``, ``B = 0xCD9E8D57``.
* **uniform**: bit-cast to int32, ``x = ~x if x < 0 else x``, ``float32(x) * 4.6566127342e-10f``.
* **normal** (Box-Muller, pairs (c0, c1) and (c2, c3)): ``u = max(1e-7f, u_first)``,
  ``th = 6.283185307179586f * u_second``, ``r = sqrt(-2 * log(u))``,
  ``(r * cos(th), r * sin(th))``; all float32.

Here the uint32 words live in int64 tensors in ``[0, 2^32)``; products are formed from 16-bit
halves so that no intermediate leaves the int64 range. The integer words (:func:`randint4x`) and
the uniforms (:func:`rand4x`) are bitwise identical to Triton's on every backend.

The normals: the float32 ``log``/``cos``/``sin``/``sqrt`` are not correctly rounded anywhere, so
which library evaluates them decides the last bit:

* CPU tensors (default ``math="auto"``): numpy's float32 ufuncs, which is exactly what Triton's
  interpreter (``TRITON_INTERPRET=1``) evaluates, so the normals are **bitwise** equal to the
  interpreted ``tl.randn4x`` (numpy's SIMD dispatch is per process, the same for both).
* CUDA tensors: torch's float32 ops (CUDA ``logf``/``cosf``/``sinf``, like libdevice's
  ``__nv_logf``/``__nv_cosf``/``__nv_sinf`` that ``tl.randn4x`` calls) and an IEEE ``sqrt`` where
  compiled Triton uses ``sqrt.approx.ftz.f32``: equal to ``tl.randn4x`` to a few float32 ulp
  (|diff| ~1e-6), not guaranteed bitwise. (The compiled transition kernels use the MUFU
  approximations instead, see :mod:`ralu_kernels.transition`: ~2^-21 absolute.)
* ``math="float64"``: transcendentals in float64 rounded once to float32 (device independent).
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch

__all__ = [
    "PHILOX_KEY_A",
    "PHILOX_KEY_B",
    "PHILOX_ROUND_A",
    "PHILOX_ROUND_B",
    "philox4x32",
    "randint4x",
    "uint_to_uniform_float",
    "rand4x",
    "pair_uniform_to_normal",
    "randn4x",
]

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
# float32 constants of triton/language/random.py (Python floats rounded to float32, as Triton does)
_UNIFORM_SCALE = float(np.float32(4.6566127342e-10))
_TWO_PI = float(np.float32(6.283185307179586))
_U_MIN = float(np.float32(1.0e-7))


def _mul_lo_hi(const: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(const * x) mod 2^32 and (const * x) >> 32 for a uint32 constant and uint32 values in int64."""
    c_hi, c_lo = const >> 16, const & _M16
    x_hi, x_lo = x >> 16, x & _M16
    lo = x_lo * c_lo  # < 2^32
    mid = x_lo * c_hi + x_hi * c_lo + (lo >> 16)  # < 2^33 + 2^16
    hi = x_hi * c_hi + (mid >> 16)  # = floor(const * x / 2^32) < 2^32
    low = ((mid & _M16) << 16) | (lo & _M16)
    return low, hi


def philox4x32(c0, c1, c2, c3, k0, k1, n_rounds: int = N_ROUNDS):
    """``n_rounds`` Philox4x32 rounds on uint32 words held in int64 tensors (or ints for the key)."""
    for _ in range(n_rounds):
        lo_b, hi_b = _mul_lo_hi(PHILOX_ROUND_B, c2)
        lo_a, hi_a = _mul_lo_hi(PHILOX_ROUND_A, c0)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = (k0 + PHILOX_KEY_A) & _M32
        k1 = (k1 + PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _key(seed: Union[int, torch.Tensor], device: torch.device):
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype == torch.bool or seed.is_complex():
            raise TypeError(f"seed must be an integer tensor, got {seed.dtype}")
        s = seed.to(device=device, dtype=torch.int64)
        # int64 -> uint64 is a bit-cast: arithmetic shift then mask gives the right words.
        return s & _M32, (s >> 32) & _M32
    s = int(seed) % (1 << 64)
    return s & _M32, (s >> 32) & _M32


def randint4x(seed: Union[int, torch.Tensor], offsets: torch.Tensor, *, offset_bits: int = 64,
              n_rounds: int = N_ROUNDS) -> Tuple[torch.Tensor, ...]:
    """Triton's ``tl.randint4x(seed, offsets)``: four int64 tensors with the uint32 words in [0, 2^32).

    ``offset_bits=64`` emulates an int64 offset tensor in Triton (``c1`` = high word), ``32`` an
    int32 one (``c1 = 0``, the offset taken mod 2^32). Both agree for offsets in [0, 2^31).
    ``seed`` is an int or an integer tensor broadcastable against ``offsets``.
    """
    if not isinstance(offsets, torch.Tensor):
        offsets = torch.as_tensor(offsets, dtype=torch.int64)
    if offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")
    if offset_bits not in (32, 64):
        raise ValueError(f"offset_bits must be 32 or 64, got {offset_bits}")
    off = offsets.to(torch.int64)
    c0 = off & _M32
    c1 = (off >> 32) & _M32 if offset_bits == 64 else torch.zeros_like(c0)
    zero = torch.zeros_like(c0)
    k0, k1 = _key(seed, off.device)
    if isinstance(k0, torch.Tensor):
        shape = torch.broadcast_shapes(k0.shape, c0.shape)
        c0, c1, zero = (t.expand(shape) for t in (c0, c1, zero))
    return philox4x32(c0, c1, zero, zero, k0, k1, n_rounds)


def uint_to_uniform_float(bits: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words (given in [0, 2^32)): float32 in [0, 1)."""
    v = torch.where(bits >= (1 << 31), _M32 - bits, bits)  # int32 bit-cast, then ~x for x < 0
    return v.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=bits.device)


def rand4x(seed, offsets: torch.Tensor, **kw) -> Tuple[torch.Tensor, ...]:
    """Triton's ``tl.rand4x``: four float32 uniforms in [0, 1)."""
    return tuple(uint_to_uniform_float(w) for w in randint4x(seed, offsets, **kw))


def _resolve_math(math: str, device: torch.device) -> str:
    if math == "auto":
        return "numpy" if device.type == "cpu" else "torch"
    if math not in ("numpy", "torch", "float64"):
        raise ValueError(f"math must be 'auto', 'numpy', 'torch' or 'float64', got {math!r}")
    if math == "numpy" and device.type != "cpu":
        raise ValueError("math='numpy' needs CPU tensors")
    return math


def pair_uniform_to_normal(u1: torch.Tensor, u2: torch.Tensor, *, math: str = "auto",
                           need_second: bool = True):
    """Triton's Box-Muller ``pair_uniform_to_normal`` on float32 uniforms: (r cos th, r sin th)."""
    m = _resolve_math(math, u1.device)
    dev = u1.device
    u1 = torch.clamp_min(u1, _U_MIN)  # tl.maximum(1e-7f, u1); u1 is never NaN
    th = u2 * torch.tensor(_TWO_PI, dtype=torch.float32, device=dev)
    minus_two = torch.tensor(-2.0, dtype=torch.float32, device=dev)
    if m == "numpy":
        lg = torch.from_numpy(np.log(u1.numpy()))
        r = torch.from_numpy(np.sqrt((minus_two * lg).numpy()))
        n1 = r * torch.from_numpy(np.cos(th.numpy()))
        n2 = r * torch.from_numpy(np.sin(th.numpy())) if need_second else None
    elif m == "torch":
        r = torch.sqrt(minus_two * torch.log(u1))
        n1 = r * torch.cos(th)
        n2 = r * torch.sin(th) if need_second else None
    else:  # float64 transcendentals, one rounding each
        lg = torch.log(u1.double()).float()
        r = torch.sqrt((minus_two * lg).double()).float()
        th64 = th.double()
        n1 = r * torch.cos(th64).float()
        n2 = r * torch.sin(th64).float() if need_second else None
    return n1, n2


def randn4x(seed: Union[int, torch.Tensor], offsets: torch.Tensor, *, math: str = "auto",
            offset_bits: int = 64, n_rounds: int = N_ROUNDS) -> Tuple[torch.Tensor, ...]:
    """Triton's ``tl.randn4x(seed, offsets)``: four float32 N(0, 1) tensors shaped like ``offsets``.

    ``seed``: Python int (any, taken mod 2^64) or integer tensor broadcastable to ``offsets`` (one
    seed per element, e.g. per image). ``offsets``: integer tensor (int64 semantics, see
    :func:`randint4x`). See the module docstring for which backends are bitwise.
    """
    w0, w1, w2, w3 = randint4x(seed, offsets, offset_bits=offset_bits, n_rounds=n_rounds)
    n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1), math=math)
    n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(w2), uint_to_uniform_float(w3), math=math)
    return n0, n1, n2, n3


def randn_first(seed: Union[int, torch.Tensor], offsets: torch.Tensor, *, math: str = "auto",
                offset_bits: int = 64) -> torch.Tensor:
    """The first output of :func:`randn4x` only (= Triton's ``tl.randn``), at half the cost."""
    w0, w1, _, _ = randint4x(seed, offsets, offset_bits=offset_bits)
    n0, _ = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1), math=math,
                                   need_second=False)
    return n0
