"""Shared pieces of the execution-mode tests (``tests/test_modes_*.py``, ``test_packed_*.py``,
``test_context_parallel.py``): each family's file keeps what is its own (pipeline, prompt conditioning, call
mixes, rank cases) and takes the mode plumbing from here.

* :func:`stage_grid`: a raster token grid, or a stage-2 set with some coarse tokens replaced by their 4 children.
* :func:`per_call`, :func:`rel_diff`: the per-request reference of a packed call and the error measure of the
  packed tests (max abs diff / max abs reference, per output, the worst one).
* :class:`CountCalls`: counts calls of an adapter method (to prove a packed call did not fall back per call).
* :func:`assert_packs`, :func:`assert_falls_back_per_call`: a packed call without per-call fallback equal to its
  reference; hooks and feature caches that make it fall back.
* :class:`OneRank`: a one-rank sharding plan without a process group (Sharded must equal Dense bitwise).
* :class:`PaddedLayout`: eager packed calls on the static layout (what compiled / CUDA-graph calls get), padded as
  a bucket pads them, with random contents in the padding rows if asked.
* :func:`parallel_config`, :func:`sharded_case`, :func:`assert_ranks_match`, :func:`assert_cases_match`: the gloo
  tests' ContextParallelConfig, one case run on a rank, and the check of a case (bitwise across ranks, within ATOL of
  one process).
* :func:`left_as_found`: a rank's check that the user's pipeline is as it was (the snapshot of tests/helpers.py), as
  a string a gloo worker returns.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ralu_runtime.adapters import TokenGrid
from ralu_runtime.execution.packing import PackedExecution
from ralu_runtime.layout import grid_positions

REL_TOL = 1e-5   # packed vs per call, fp32: max abs diff / output scale
ATOL = 1e-5      # sharded vs one process, fp32 latents of scale ~1
CHILDREN = ((0, 0), (0, .5), (.5, 0), (.5, .5))  # a coarse token's 4 children, in units of the coarse grid


def stage_grid(hw, b: int, mixed: int = 0, *, frames: int | None = None, device="cpu") -> TokenGrid:
    """The raster grid of ``hw`` tokens (``frames`` > 1: a tall grid of ``frames`` frames of ``hw`` each), or
    (``mixed`` > 0) a stage-2 set: the first ``mixed`` coarse tokens replaced by their 4 children at
    +{0, 0.5}^2 (fine mask set), the same for each of the ``b`` images."""
    rows = hw[0] * (frames or 1)
    coarse = grid_positions(rows, hw[1])
    video = {} if frames is None else {"frames": frames}
    if not mixed:
        return TokenGrid(coarse.expand(b, -1, -1).contiguous().to(device), (rows, hw[1]), None, raster=True,
                         **video)
    kids = [coarse[i] + torch.tensor(d) for i in range(mixed) for d in CHILDREN]
    pos = torch.cat([torch.stack(kids), coarse[mixed:]])
    fine = torch.zeros(pos.shape[0], dtype=torch.bool)
    fine[:4 * mixed] = True
    return TokenGrid(pos.expand(b, -1, -1).contiguous().to(device), (rows, hw[1]),
                     fine.expand(b, -1).contiguous().to(device), **video)


def per_call(adapter, calls) -> list[torch.Tensor]:
    """The velocity of each :class:`~ralu_runtime.adapters.VelocityCall` alone (the packed call's reference)."""
    return [adapter.velocity(c.tokens, c.grid, c.timestep, c.cond) for c in calls]


def rel_diff(out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """max over pairs of ``max |o - r| / max |r|`` (in float32)."""
    return max((o.float() - r.float()).abs().max().item() / r.float().abs().max().item() for o, r in zip(out, ref))


class CountCalls:
    """Counts calls of ``adapter.<name>`` (default: the unpacked ``velocity``) inside the ``with`` block, through an
    instance attribute wrapping the method (removed on exit: the class is untouched). ``args``: each call's
    positional arguments; ``n``: how many."""

    def __init__(self, adapter, name: str = "velocity"):
        self.adapter, self.name, self.args = adapter, name, []

    @property
    def n(self) -> int:
        return len(self.args)

    def __enter__(self):
        orig = getattr(self.adapter, self.name)

        def counted(*a, **kw):
            self.args.append(a)
            return orig(*a, **kw)
        setattr(self.adapter, self.name, counted)
        return self

    def __exit__(self, *exc):
        delattr(self.adapter, self.name)


class OneRank:
    """What :class:`ralu_runtime.execution.sharding.Sharded` reads from a plan, for one rank without a group."""

    world, index = 1, 0

    @staticmethod
    def attention_spec():
        from ralu_runtime.execution.sharding import spec

        return spec()

    @staticmethod
    def gather_rows(x, sizes):
        assert list(sizes) == [x.shape[1]]
        return x

    @staticmethod
    def call_module(module, x):
        return module(x)


def assert_packs(adapter, calls, ref: Sequence[torch.Tensor] | None = None, *, packed: Callable | None = None,
                 tol: float = REL_TOL, label: str = "packed") -> list[torch.Tensor]:
    """``packed(calls)`` (default ``adapter.packed_velocity``) runs as packed calls (no per-call ``adapter.velocity``)
    and equals ``ref`` (default :func:`per_call`): same shapes, :func:`rel_diff` within ``tol``. Returns its outputs."""
    ref = per_call(adapter, calls) if ref is None else ref
    with CountCalls(adapter) as count:
        out = (packed or adapter.packed_velocity)(calls)
    assert count.n == 0, f"{label}: fell back to per-call velocity ({count.n} calls)"
    assert [o.shape for o in out] == [r.shape for r in ref], label
    diff = rel_diff(out, ref)
    assert diff <= tol, f"{label}: max abs diff / output scale {diff:.3g} > {tol}"
    return out


def assert_engine_packs(pipe, reqs) -> None:
    """The serving engine runs ``reqs`` (``[(generate keyword arguments, seed)]``, submitted together) with packed
    model calls, and each result equals ``generate`` alone (latents, atol = rtol = 1e-4 as
    tests/test_serving_engine.py)."""
    from ralu_runtime import generate
    from ralu_runtime.serving import Engine, EngineConfig

    refs = [generate(pipe, **kw, seed=seed, output_type="latent", progress=False).images for kw, seed in reqs]
    with Engine(pipe, EngineConfig(gather_timeout_s=0.5), output_type="latent") as eng:
        outs = [h.result(timeout=300).images for h in [eng.submit(seed=seed, **kw) for kw, seed in reqs]]
        assert eng.metrics()["packed_calls"] > 0
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def assert_order_free(adapter, calls, out: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], alone: int) -> None:
    """A packed call's outputs ``out`` (of four ``calls``) do not depend on the order of the calls or on their
    neighbours: permuted calls give the same outputs permuted, and call ``alone`` packed by itself gives ``ref``."""
    perm = [2, 0, 3, 1]
    again = adapter.packed_velocity([calls[i] for i in perm])
    for j, i in enumerate(perm):
        torch.testing.assert_close(again[j], out[i], atol=REL_TOL, rtol=0)
    (one,) = adapter.packed_velocity([calls[alone]])
    assert rel_diff([one], [ref[alone]]) <= REL_TOL


def assert_padded_layout_equals_host(adapter, calls, streams: Sequence[str]) -> None:
    """The packed call with a static layout (:class:`PaddedLayout`: lengths padded past multiples of 16 tokens and 8
    segments, random contents in the padding rows of the flat inputs ``streams``) equals the host layout's and the
    per-call outputs."""
    ref = adapter.packed_velocity(calls)
    execution = PaddedLayout(adapter, pad_to_multiples, tuple(streams))
    out = adapter.packed_velocity(calls, execution=execution)
    assert set(execution.real) == {"image", "text", "segments"}
    assert rel_diff(out, ref) <= REL_TOL
    assert rel_diff(out, per_call(adapter, calls)) <= REL_TOL


def _pass_through_cache(blocks_fn, hidden, timestep):
    """A feature cache that always runs the blocks."""
    return blocks_fn()


def assert_falls_back_per_call(adapter, calls, hooked: Sequence[torch.nn.Module]) -> None:
    """A forward pre-hook on each module of ``hooked`` (one at a time, every module one that each call runs) and a
    feature cache make ``adapter.packed_velocity`` run one per-call velocity per call: the hook runs in each, and
    the results equal the per-call ones bitwise."""
    from ralu_runtime.execution.call import call_scope

    ref = per_call(adapter, calls)
    for module in hooked:
        seen = []
        handle = module.register_forward_pre_hook(lambda m, a: seen.append(1))
        try:
            with CountCalls(adapter) as count:
                out = adapter.packed_velocity(calls)
        finally:
            handle.remove()
        assert count.n == len(calls) and len(seen) == len(calls), (type(module).__name__, count.n, len(seen))
        assert all(torch.equal(o, r) for o, r in zip(out, ref))
    with call_scope(_pass_through_cache), CountCalls(adapter) as count:
        out = adapter.packed_velocity(calls)
    assert count.n == len(calls) and all(torch.equal(o, r) for o, r in zip(out, ref))


def pad_by(tokens: int, segments: int) -> Callable[[str, int], int]:
    """A padding rule: ``tokens`` more rows per stream ("image", "text"), ``segments`` more segments."""
    return lambda kind, n: n + (segments if kind == "segments" else tokens)


def pad_to_multiples(kind: str, n: int) -> int:
    """A padding rule: segments up to a multiple of 8, tokens past the next multiple of 16 (16 more at least)."""
    return -(-n // 8) * 8 if kind == "segments" else -(-n // 16) * 16 + 16


class PaddedLayout(PackedExecution):
    """Eager packed calls on the static layout (device tensors only, as compiled / captured packed calls use it),
    every packed size padded by ``pad(kind, n) -> size`` (kind "image", "text" or "segments"; for "segments"
    ``n`` counts the padding segment the layout adds itself).

    ``noise``: per leading flat input of the forward, the kind whose real row count it follows; those inputs get
    random rows past their real count (float: normal x 3; bool: coin flips), drawn from a generator seeded
    ``seed``. A correct packed call ignores them. ``sizes`` records ``(kind, n, padded)``, ``keys`` each run's key.
    """

    def __init__(self, adapter, pad: Callable[[str, int], int], noise: Sequence[str] = (), seed: int = 0,
                 impl=None):
        super().__init__(adapter, impl)
        self.static_layout, self.pad_rule, self.noise = True, pad, tuple(noise)
        self.g = torch.Generator().manual_seed(seed)
        self.real, self.sizes, self.keys = {}, [], []

    def pad(self, kind, n):
        self.real[kind] = n - 1 if kind == "segments" else n
        size = self.pad_rule(kind, n)
        self.sizes.append((kind, n, size))
        return size

    def run(self, key, forward, tensors):
        self.keys.append(key)
        tensors = list(tensors)
        for i, kind in enumerate(self.noise):
            t, n = tensors[i].clone(), self.real[kind]
            assert t.shape[0] > n, f"input {i} ({kind}) has no padding rows to fill"
            shape = t[n:].shape
            t[n:] = (torch.rand(shape, generator=self.g) > 0.5 if t.dtype == torch.bool
                     else torch.randn(shape, generator=self.g) * 3)
            tensors[i] = t
        return forward(*tensors)


def parallel_config(**kw):
    """diffusers' ``ContextParallelConfig(**kw)`` (imported when a rank case is built)."""
    from diffusers import ContextParallelConfig

    return ContextParallelConfig(**kw)


def left_as_found(before: dict, pipe, extra: dict | None = None) -> str:
    """"" when ``snapshot(pipe, extra=extra)`` equals ``before`` (tests/helpers.py), else what changed: what a gloo
    worker returns for the parent to assert on (an AssertionError on one rank would leave the others waiting at their
    next collective)."""
    from helpers import assert_same, snapshot

    try:
        assert_same(before, snapshot(pipe, extra=extra))
    except AssertionError as exc:
        return str(exc) or "changed"
    return ""


def sharded_case(pipe, parallel, par_kwargs: dict | None = None, **kwargs) -> dict:
    """One case of a gloo worker (on each rank): ``generate(pipe, **kwargs)`` in this process (the reference) and
    ``generate(pipe, **kwargs, **par_kwargs, parallel=parallel)``; their latents (``ref``, ``par``), masks (None
    without ``return_masks``), feature-cache stats and the sharded run's ``(stage, tokens)`` records, as
    :func:`assert_ranks_match` reads them."""
    from ralu_runtime import generate

    ref = generate(pipe, **kwargs)
    par = generate(pipe, **kwargs, **(par_kwargs or {}), parallel=parallel)
    return dict(ref=ref.images, par=par.images, ref_masks=ref.masks, par_masks=par.masks, ref_stats=ref.cache_stats,
                par_stats=par.cache_stats, tokens=[(r.name, r.tokens) for r in par.records])


def assert_cases_match(results: Sequence[dict]) -> None:
    """:func:`assert_ranks_match` for every case of a gloo run (``results[r][case]``, rank 0's cases)."""
    for case in results[0]:
        assert_ranks_match([r[case] for r in results], case)


def assert_ranks_match(ranks: Sequence[dict], label: str, atol: float = ATOL) -> float:
    """One case of a gloo test, ``ranks[r]`` as rank ``r`` returned it: ``par`` (the sharded run) equal on every
    rank bitwise and within ``atol`` (max abs) of rank 0's ``ref`` (the same call in one process); where given,
    ``par_masks`` equal to ``ref_masks`` and ``par_stats`` (a feature cache's counts) to ``ref_stats``. Returns
    the difference (printed: shown with ``pytest -s``)."""
    r0 = ranks[0]
    for r, res in enumerate(ranks):
        assert torch.equal(res["par"], r0["par"]), f"{label}: rank {r} differs from rank 0"
        if r0.get("ref_masks") is not None:
            assert torch.equal(res["par_masks"], r0["ref_masks"]), f"{label}: rank {r}'s masks differ"
        if "ref_stats" in r0:
            assert res["par_stats"] == r0["ref_stats"], f"{label}: rank {r}: {res['par_stats']} != {r0['ref_stats']}"
    diff = (r0["par"] - r0["ref"]).abs().max().item()
    print(f"{label}: max |sharded - one process| = {diff:.3g}")
    assert diff <= atol, f"{label}: max |sharded - one process| = {diff:.3g} > {atol}"
    return diff


def assert_case_on_ranks(ranks: Sequence[dict], case: str) -> dict:
    """Case ``case`` of a gloo test whose ranks returned ``{case: result}``: :func:`assert_ranks_match`, the
    one-process reference the same on every rank, and every rank ran sharded calls. Returns rank 0's result."""
    per_rank = [r[case] for r in ranks]
    assert_ranks_match(per_rank, case)
    for res in per_rank:
        assert torch.equal(res["ref"], per_rank[0]["ref"])  # the one-process run: the same on every rank
        assert res["sharded_calls"] > 0
    return per_rank[0]
