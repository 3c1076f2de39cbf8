"""Temporal feature caches: skip the transformer's block stack on some steps (composes with RALU).

RALU saves work *spatially* (fewer tokens in the early stages); a feature cache saves work *temporally*
(fewer block-stack evaluations). Both compose: the cache runs inside each RALU stage and is reset at
every stage transition, where the token set (and its length) changes.

The adapters run their block stack through :meth:`DiTAdapter.run_blocks`, which calls
``cache(blocks_fn, hidden, timestep)`` when the running ``generate`` call has a cache (each call has its own:
see :func:`ralu_runtime.adapters.call_scope`; a cache object shared by several calls is used by one call at
a time). ``hidden`` is the embedded
image tokens ``(B, L, D)`` entering the first block, ``timestep`` is ``1000 * sigma`` and the return value
is the image hidden states leaving the last block. Embedding, time/text conditioning and the output head
always run (a cached step costs only those). The sampler calls ``adapter.begin_stage()`` at the start of
every stage, which calls :meth:`FeatureCache.reset`.

* :class:`TaylorSeerCache` (TaylorSeer, Liu et al. 2025): full computation every ``interval`` steps; in
  between, the block stack's output is extrapolated by a Taylor (Newton) polynomial in sigma through the
  last ``order + 1`` fully computed points (divided differences with the true, variable sigma spacing, so
  it is exact for polynomials in sigma of degree <= order on RALU's non-uniform per-stage schedules).
* :class:`FirstBlockCache` (first-block-residual cache, as in ParaAttention's FBCache / TeaCache family):
  always runs block 0; when its residual changed by less than ``threshold`` (relative mean absolute
  difference) since the last full step, the remaining blocks are skipped and their last residual reused.

Both count full and cached steps (totals and per stage) for FLOP accounting: :meth:`FeatureCache.stats`.
Select one with :func:`make_cache` from a spec string (``"taylorseer:3"``, ``"taylorseer:2:2"``,
``"fbcache:0.1"``), attach it with :func:`set_cache` (also a context manager), or pass ``cache=`` to
:func:`ralu_runtime.generate`.
"""
from __future__ import annotations

import math

import torch

__all__ = ["CacheShapeError", "FeatureCache", "FirstBlockCache", "TaylorSeerCache", "make_cache", "set_cache"]

TARGETS = ("residual", "output")
ON_SHAPE_CHANGE = ("raise", "reset")


class CacheShapeError(RuntimeError):
    """The token set changed while a cache still held features of the old one (no ``reset()`` in between)."""


class FeatureCache:
    """Base class: step counters, per-stage records and the shape guard. Subclasses implement ``__call__``.

    on_shape_change: "raise" (default) raises :class:`CacheShapeError` when ``hidden`` has another shape than
    the cached features without a :meth:`reset` in between (a sampler that forgot ``begin_stage``);
    "reset" silently starts over (a full step).
    """

    def __init__(self, *, on_shape_change: str = "raise"):
        if on_shape_change not in ON_SHAPE_CHANGE:
            raise ValueError(f"on_shape_change={on_shape_change!r} is not allowed; choose one of {ON_SHAPE_CHANGE}")
        self.on_shape_change = on_shape_change
        self.stages: list[dict] = []   # one record per stage: {"tokens", "full", "cached", "pattern"}
        self._shape = None
        self._open = False             # True once the current stage's record exists

    # ---- bookkeeping -----------------------------------------------------------------------------------
    @property
    def full_steps(self) -> int:
        """Steps that ran the whole block stack (all stages since the last :meth:`reset_stats`)."""
        return sum(s["full"] for s in self.stages)

    @property
    def cached_steps(self) -> int:
        """Steps that skipped (all or all but the first of) the block stack."""
        return sum(s["cached"] for s in self.stages)

    @property
    def step(self) -> int:
        """Step index inside the current stage (number of calls since the last :meth:`reset`)."""
        return len(self.stages[-1]["pattern"]) if self._open else 0

    def stats(self) -> dict:
        """``{"full", "cached", "stages": [{"tokens", "full", "cached", "pattern"}, ...]}``; pattern is a string
        of "F" (full) and "C" (cached) per step."""
        return {"full": self.full_steps, "cached": self.cached_steps, "stages": [dict(s) for s in self.stages]}

    def reset_stats(self) -> None:
        """Clear the counters and per-stage records (and the cached features)."""
        self.stages = []
        self.reset()
        self._open = False

    def reset(self) -> None:
        """Forget every cached feature; the next call starts a new stage record and is a full step."""
        self._shape = None
        self._open = False
        self._clear()

    def _clear(self) -> None:  # subclasses drop their tensors here
        pass

    def _begin_call(self, hidden: torch.Tensor) -> None:
        shape = tuple(hidden.shape)
        if self._shape is not None and shape != self._shape:
            if self.on_shape_change == "raise":
                raise CacheShapeError(
                    f"{type(self).__name__}: hidden states changed shape from {self._shape} to {shape} without a "
                    "reset(); the token set changed (a RALU stage transition?) - call cache.reset() / "
                    "adapter.begin_stage() at every stage start, or build the cache with on_shape_change='reset'")
            self.reset()
        if not self._open:
            self.stages.append({"tokens": shape[1] if len(shape) > 1 else 0, "full": 0, "cached": 0, "pattern": ""})
            self._open = True
        self._shape = shape

    def _record(self, full: bool) -> None:
        rec = self.stages[-1]
        rec["full" if full else "cached"] += 1
        rec["pattern"] += "F" if full else "C"

    def __call__(self, blocks_fn, hidden: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _sigma(timestep) -> torch.Tensor:
    """``1000 * sigma`` (0-dim or (B,) tensor, or a number) -> 0-dim float64 sigma (on the tensor's device)."""
    if not torch.is_tensor(timestep):
        return torch.tensor(float(timestep) / 1000.0, dtype=torch.float64)
    return timestep.detach().reshape(-1)[0].to(torch.float64) / 1000.0


class TaylorSeerCache(FeatureCache):
    """TaylorSeer-style cache: full block stack every ``interval`` steps, Taylor extrapolation in between.

    Args:
        interval: W >= 1. Inside a stage, steps ``0 .. warmup-1`` are full, then every W-th step after the
            last full one (W - 1 extrapolated steps between two full ones). W = 1 is exactly uncached.
        order: degree of the extrapolating polynomial (0 = reuse the last feature, 1 = linear, 2 = quadratic,
            ...). Early in a stage, fewer full points exist and the degree is lowered to what they support.
        warmup: full steps at the start of each stage (default ``order + 1``: the first extrapolation already
            has the points for the full order; measured much better on the oracle in RALU's short stages than
            ``warmup = 1``, whose first extrapolation in a stage is a plain reuse).
        target: "residual" caches the block stack's output minus its input (the cached step adds the
            extrapolated residual to the current step's embedded input); "output" caches the output itself.
        on_shape_change: see :class:`FeatureCache`.

    The polynomial is in the model's sigma (``timestep / 1000``), not the step index: Newton divided
    differences over the last ``order + 1`` full points, updated incrementally (``order + 1`` stored tensors,
    kept in float32, or the hidden dtype when that is float64).
    """

    def __init__(self, interval: int = 3, order: int = 1, *, warmup: int | None = None, target: str = "residual",
                 on_shape_change: str = "raise"):
        super().__init__(on_shape_change=on_shape_change)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval={interval!r} is not allowed: need an int W >= 1")
        if isinstance(order, bool) or not isinstance(order, int) or order < 0:
            raise ValueError(f"order={order!r} is not allowed: need an int >= 0")
        if warmup is None:
            warmup = order + 1
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup={warmup!r} is not allowed: need an int >= 1 (the first step must be full)")
        if target not in TARGETS:
            raise ValueError(f"target={target!r} is not allowed; choose one of {TARGETS}")
        self.interval, self.order, self.warmup, self.target = interval, order, warmup, target
        self._clear()

    def __repr__(self) -> str:
        return (f"TaylorSeerCache(interval={self.interval}, order={self.order}, warmup={self.warmup}, "
                f"target={self.target!r})")

    def _clear(self) -> None:
        self._coef: list[torch.Tensor] = []   # Newton coefficients f[x_n], f[x_n, x_n-1], ... (newest first)
        self._nodes: list[torch.Tensor] = []  # sigmas of the full points, newest first
        self._last_full = -1

    # ---- schedule of full steps (pure; used by FLOP accounting too) -------------------------------------
    def is_full_step(self, i: int, last_full: int) -> bool:
        """Whether step ``i`` of a stage is full, given the index of the last full step (-1 if none)."""
        return i < self.warmup or last_full < 0 or i - last_full >= self.interval

    def plan(self, n_steps: int) -> str:
        """Full ("F") / cached ("C") pattern of a stage of ``n_steps`` steps, e.g. ``plan(6) == "FCCFCC"`` (W=3)."""
        out, last = "", -1
        for i in range(n_steps):
            full = self.is_full_step(i, last)
            last = i if full else last
            out += "F" if full else "C"
        return out

    # ---- the cache -------------------------------------------------------------------------------------
    def _update(self, feat: torch.Tensor, sigma: torch.Tensor) -> None:
        new = [feat]
        for j in range(1, min(self.order, len(self._coef)) + 1):
            new.append((new[j - 1] - self._coef[j - 1]) / (sigma - self._nodes[j - 1]).to(feat.dtype))
        self._coef = new
        self._nodes = [sigma] + self._nodes[: self.order]

    def _extrapolate(self, sigma: torch.Tensor) -> torch.Tensor:
        k = len(self._coef) - 1
        acc = self._coef[k]
        for j in range(k - 1, -1, -1):
            acc = self._coef[j] + (sigma - self._nodes[j]).to(acc.dtype) * acc
        return acc

    def __call__(self, blocks_fn, hidden, timestep):
        self._begin_call(hidden)
        i = self.step
        sigma = _sigma(timestep)
        work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if self.is_full_step(i, self._last_full):
            out = blocks_fn()
            feat = out - hidden if self.target == "residual" else out
            self._update(feat.to(work), sigma.to(hidden.device))
            self._last_full = i
            self._record(True)
            return out
        feat = self._extrapolate(sigma.to(hidden.device))
        self._record(False)
        if self.target == "residual":
            return (hidden.to(work) + feat).to(hidden.dtype)
        return feat.to(hidden.dtype)


class FirstBlockCache(FeatureCache):
    """First-block-residual cache: run block 0 always; skip the other blocks while its residual barely moves.

    At a step, ``r1 = block0(hidden) - hidden``. If the stage has a full step before and
    ``mean|r1 - r1_ref| / mean|r1_ref| < threshold`` (``r1_ref``: block 0's residual at the last full step),
    the output is ``h1 + R`` with ``h1`` block 0's output and ``R`` the remaining blocks' residual stored at
    the last full step; otherwise the remaining blocks run and ``r1_ref``, ``R`` are refreshed.
    ``threshold = 0`` never skips (exactly uncached). ``max_cached`` bounds consecutive skipped steps.

    Needs a split block stack: the adapters pass a :class:`~ralu_runtime.adapters.base.SplitBlocks`
    (``first()`` -> ``(h1, state)``, ``rest(state)`` -> output). A cached step costs block 0 + embed/head.
    """

    def __init__(self, threshold: float = 0.1, *, max_cached: int | None = None, on_shape_change: str = "raise"):
        super().__init__(on_shape_change=on_shape_change)
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and math.isfinite(threshold)
                                                and threshold >= 0):
            raise ValueError(f"threshold={threshold!r} is not allowed: need a finite number >= 0")
        if max_cached is not None and (isinstance(max_cached, bool) or not isinstance(max_cached, int)
                                       or max_cached < 0):
            raise ValueError(f"max_cached={max_cached!r} is not allowed: need None or an int >= 0")
        self.threshold, self.max_cached = float(threshold), max_cached
        self.last_diff: float | None = None
        self._clear()

    def __repr__(self) -> str:
        return f"FirstBlockCache(threshold={self.threshold}, max_cached={self.max_cached})"

    def _clear(self) -> None:
        self._r1 = None
        self._rest = None
        self._run = 0  # consecutive cached steps

    def __call__(self, blocks_fn, hidden, timestep):
        if not (hasattr(blocks_fn, "first") and hasattr(blocks_fn, "rest")):
            raise TypeError("FirstBlockCache needs a split block stack (SplitBlocks with first()/rest()); this "
                            "adapter passes a plain callable - use TaylorSeerCache or split its blocks")
        self._begin_call(hidden)
        h1, state = blocks_fn.first()
        r1 = h1 - hidden
        skip = False
        if self._r1 is not None and (self.max_cached is None or self._run < self.max_cached):
            # one host sync per step: the decision is data dependent by design
            diff = float((r1 - self._r1).abs().mean() / self._r1.abs().mean().clamp_min(1e-12))
            self.last_diff = diff
            skip = diff < self.threshold
        if skip:
            self._run += 1
            self._record(False)
            return (h1 + self._rest).to(hidden.dtype)
        out = blocks_fn.rest(state)
        self._r1, self._rest, self._run = r1, out - h1, 0
        self._record(True)
        return out


def make_cache(spec) -> FeatureCache | None:
    """A cache from ``None``, a :class:`FeatureCache` (returned as is) or a spec string:

    ``"taylorseer:W"``, ``"taylorseer:W:order"``, ``"taylorseer:W:order:warmup"`` (order 1 and warmup order + 1
    by default), ``"fbcache:threshold"``; ``"none"`` /
    ``"off"`` give None.
    """
    if spec is None or isinstance(spec, FeatureCache):
        return spec
    if isinstance(spec, type):  # a class is callable and has a (unbound) reset: it would fail at the first call
        raise ValueError(f"cache={spec.__name__} is a class, not a cache object: pass an instance, e.g. "
                         f"{spec.__name__}(...), or a spec string such as 'taylorseer:3'")
    if not isinstance(spec, str):
        if callable(spec) and hasattr(spec, "reset"):
            return spec  # a user cache with the same protocol
        raise ValueError(f"cache={spec!r} is not allowed: use None, 'taylorseer:W[:order[:warmup]]', 'fbcache:threshold' "
                         "or a cache object")
    parts = spec.strip().lower().split(":")
    kind, args = parts[0], parts[1:]
    try:
        if kind in ("none", "off", "") and not args:
            return None
        if kind in ("taylorseer", "taylor", "ts") and 1 <= len(args) <= 3:
            return TaylorSeerCache(interval=int(args[0]), order=int(args[1]) if len(args) > 1 else 1,
                                   warmup=int(args[2]) if len(args) > 2 else None)
        if kind in ("fbcache", "firstblock", "fb") and len(args) == 1:
            return FirstBlockCache(threshold=float(args[0]))
    except ValueError as exc:
        raise ValueError(f"cache={spec!r}: {exc}") from None
    raise ValueError(f"cache={spec!r} is not allowed: use 'taylorseer:W', 'taylorseer:W:order' or "
                     "'fbcache:threshold' (e.g. 'taylorseer:3', 'taylorseer:2:2', 'fbcache:0.1'), or 'none'")


class set_cache:  # noqa: N801 - used like a function and as a context manager
    """Make ``cache`` (object, spec string or None) the default cache of a pipeline's ``generate`` calls that
    pass ``cache=None`` (``adapter.feature_cache``; ralu's adapter, not the pipeline, holds it).

    ``set_cache(pipe, "taylorseer:3")`` sets it until changed; ``with set_cache(pipe, c): ...`` restores
    the previous default on exit. The cache's counters are cleared (``reset_stats``). ``.cache`` is the object.
    Calls from several threads that use this one object take turns (it holds per-stage state).
    """

    def __init__(self, adapter_or_pipe, cache):
        from .adapters import get_adapter

        self.adapter = get_adapter(adapter_or_pipe)
        self.cache = make_cache(cache)
        self.previous = self.adapter.feature_cache
        if self.cache is not None and hasattr(self.cache, "reset_stats"):
            self.cache.reset_stats()
        self.adapter.feature_cache = self.cache

    def __enter__(self):
        return self.cache

    def __exit__(self, *exc):
        self.adapter.feature_cache = self.previous
        return False
