"""Python side of the CUDA C++ ops in ``csrc/`` (the extension module ``ralu_kernels._C``).

``load_csrc()`` imports the extension if it was built (``pip install -e .`` with a CUDA
build of torch) and registers the fake (meta) kernel of ``torch.ops.ralu.stage_transition``
so that torch.compile can trace it. It returns False, never raises, when the extension is
absent or cannot be loaded (CPU-only torch, built against another torch, ...), or when the
environment variable ``RALU_DISABLE_CSRC=1`` is set.

``stage_transition_cuda(...)`` runs the fused stage transition with the CUDA op (group-major,
"v2": ``order`` / ``num_up`` list the 4 rows of each upsampled group, then the kept rows). Its
semantics are those of the torch reference in ``ralu_kernels.transition``, and its outputs are
bitwise those of the Triton kernel there (both use the fast MUFU Box-Muller; the reference uses
accurate math, so it agrees to float32 rounding-level tolerances, not bitwise).
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from typing import Optional, Tuple

import torch

__all__ = ["load_csrc", "csrc_available", "stage_transition_cuda"]

_log = logging.getLogger(__name__)

_LOADED: Optional[bool] = None
_FAKE_REGISTERED = False


def _op_exists() -> bool:
    try:
        return hasattr(torch.ops.ralu, "stage_transition")
    except Exception:  # pragma: no cover - torch.ops lookup failures
        return False


def _register_fake() -> None:
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return

    def _stage_transition_fake(x, pos, src_index, group, child, order, seeds, num_up, a, b, c, pos_scale,
                               child_step, exact_noise, out, pos_out):
        # Mutates out / pos_out in place, returns nothing: no new tensors to describe.
        return None

    try:
        torch.library.register_fake("ralu::stage_transition", _stage_transition_fake)
    except Exception as exc:  # already registered (e.g. module reloaded) or older torch
        _log.debug("register_fake(ralu::stage_transition) skipped: %s", exc)
    _FAKE_REGISTERED = True


def csrc_disabled() -> bool:
    """Whether ``RALU_DISABLE_CSRC`` disables the CUDA op: any value but unset, empty, 0 / false / no / off (any
    case, spaces around ignored); a value other than 1 / true / yes / on disables it with a warning (it was
    ignored unless exactly "1")."""
    value = os.environ.get("RALU_DISABLE_CSRC", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value not in ("1", "true", "yes", "on"):
        warnings.warn(f"RALU_DISABLE_CSRC={os.environ['RALU_DISABLE_CSRC']!r} is read as 'disable the CUDA op' (use "
                      "1 / true / yes / on, or 0 / false / no / off)", stacklevel=2)
    return True


def load_csrc() -> bool:
    """Import ``ralu_kernels._C`` if present; True when ``torch.ops.ralu.stage_transition`` is usable."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    if csrc_disabled():
        _LOADED = False
        return False
    try:
        importlib.import_module("ralu_kernels._C")
    except Exception as exc:  # ImportError, OSError (undefined symbols), ...
        _log.debug("ralu_kernels._C not loaded: %s", exc)
        _LOADED = False
        return False
    try:
        ok = _op_exists()
        if ok:
            _register_fake()
    except Exception as exc:  # pragma: no cover - defensive
        _log.debug("ralu::stage_transition not usable: %s", exc)
        ok = False
    _LOADED = ok
    return ok


def csrc_available() -> bool:
    """True when the CUDA op is loaded and a CUDA device is visible."""
    return load_csrc() and torch.cuda.is_available()


def stage_transition_cuda(
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
    pos_scale: float,
    child_step: float,
    exact_noise: bool = False,
    out: Optional[torch.Tensor] = None,
    pos_out: Optional[torch.Tensor] = None,
    order: torch.Tensor,
    num_up: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused stage transition with the CUDA op; returns ``(out, pos_out)``.

    x (B, Ls, C) float32/float16/bfloat16, pos (B, Ls, 2) float32, src_index / group (B, Ld)
    int32, child (B, Ld) int8, seeds (B,) int64. ``order`` (B, Ld) int32 and ``num_up`` (U, an
    int with 0 <= 4U <= Ld): per image, ``order[b, 4j + q]`` (j < U) is the row of child q of the
    j-th upsampled group and ``order[b, 4U:]`` are the kept rows (child < 0), e.g. from
    ``ralu_kernels.transition.group_major_order``. The contract is not checked here (the kernel
    trusts it; ``ralu_kernels.transition`` validates it). ``out`` (B, Ld, C) with x's dtype and
    ``pos_out`` (B, Ld, 2) float32 are allocated when not given. With preallocated outputs
    and inputs of the right dtypes and layouts the call allocates nothing and does not
    synchronise (CUDA-graph safe).
    """
    if not load_csrc():
        raise RuntimeError(
            "ralu_kernels._C is not available: build it with `pip install -e .` and a CUDA build of torch "
            "(see README, 'Building the CUDA ops')"
        )
    if x.dim() != 3 or src_index.dim() != 2:
        raise ValueError(f"expected x (B, Ls, C) and src_index (B, Ld), got {tuple(x.shape)} and "
                         f"{tuple(src_index.shape)}")
    batch, _, channels = x.shape
    dst_len = src_index.shape[1]
    num_up = int(num_up)
    if not 0 <= 4 * num_up <= dst_len:
        raise ValueError(f"num_up must satisfy 0 <= 4 * num_up <= Ld = {dst_len}; got {num_up}")
    if tuple(order.shape) != (batch, dst_len):
        raise ValueError(f"order must be (B, Ld) = {(batch, dst_len)}; got {tuple(order.shape)}")
    if out is None:
        out = torch.empty((batch, dst_len, channels), dtype=x.dtype, device=x.device)
    if pos_out is None:
        pos_out = torch.empty((batch, dst_len, 2), dtype=torch.float32, device=x.device)

    def _prep(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if t.dtype != dtype:
            t = t.to(dtype)
        return t.contiguous()

    torch.ops.ralu.stage_transition(
        x.contiguous(),
        _prep(pos, torch.float32),
        _prep(src_index, torch.int32),
        _prep(group, torch.int32),
        _prep(child, torch.int8),
        _prep(order, torch.int32),
        _prep(seeds, torch.int64),
        num_up,
        float(a),
        float(b),
        float(c),
        float(pos_scale),
        float(child_step),
        bool(exact_noise),
        out,
        pos_out,
    )
    return out, pos_out
