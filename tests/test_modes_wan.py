"""Wan 2.1 / 2.2 in every execution mode (ralu_runtime.execution), tiny random pipelines on the CPU, fp32.

* Dense: the block function equals diffusers' ``WanTransformerBlock`` module bitwise; a one-rank ``Sharded`` call
  equals the Dense call bitwise (both experts, CFG in one batch and in two passes, a stage-2 token set, a cache).
* Packed (``packed_velocity``): a mix of calls -- coarse raster, stage-2 mixed set (fine mask, half positions), fine
  raster; batch 1 and 2; text lengths 3 to 11; CFG with negative texts of other lengths; both Wan 2.2 experts with
  their own guidance scales -- equals the per-call velocity within ``REL_TOL`` = 1e-5 of the output scale (measured:
  at most 1.7e-6; the per-token patch embedding and batched matmuls round differently). Wan has no text mask (the
  pipeline zero-pads UMT5 states and the cross-attention attends to all of them), so every text token of a call is
  a key of its own videos only. The calls are grouped by expert: one packed transformer call per expert.
* The static layout (``PackedSegments``, what compiled / CUDA-graph calls use) with bucket padding equals the eager
  layout; whatever the padding holds changes nothing. Fallbacks: a feature cache, hooks on a block or an attention
  module.
* Expert state: two concurrent ``generate`` calls (threads) on one pipeline keep their own expert in their own
  ``CallState.adapter`` (cache resets at their own expert changes).
* ``slow``: packed calls under the inductor runner equal eager packed, and a new mix compiles nothing new.
* gloo ranks (one spawn per rank count): 2 ranks (ulysses 2, ring 2) and 4 ranks (``slow``: ulysses 2 x ring 2,
  ulysses 4 with 2 heads) equal one process within 1e-5 (measured, 2 and 4 ranks: at most 2.6e-6 on latents of
  scale ~1 after 6 RALU steps; the raster baseline with a cache: 0) and are bitwise equal across ranks; odd token
  counts (stage 2: 33 image rows), CFG passes of different text lengths, a cache, batch 2. Wan has no text mask, so
  no key mask is exercised here.
"""
from __future__ import annotations

import threading

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import TokenGrid, VelocityCall, call_scope
from ralu_runtime.execution import DENSE
from ralu_runtime.layout import grid_positions
from ralu_runtime.tiny.wan import build_tiny_wan_pipeline, random_embeds
from mode_helpers import (REL_TOL, CountCalls, OneRank, PaddedLayout, assert_ranks_match, parallel_config, per_call,
                          rel_diff)

WORKER = f"{__name__}:"
SMALL = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
KW = dict(height=64, width=96, num_frames=9, output_type="latent", progress=False)  # 3 latent frames of 4 x 6 tokens


@pytest.fixture(scope="module")
def wan22():
    """Wan 2.2 A14B layout (two experts, boundary 875) and its adapter (built directly: it holds its pipeline)."""
    from ralu_runtime.adapters.wan import WanAdapter

    pipe = build_tiny_wan_pipeline(seed=0, two_experts=True)
    return pipe, WanAdapter(pipe)


# ---- inputs ---------------------------------------------------------------------------------------------------------
def _cond(adapter, b, text_len, neg_len, guidance, g):
    pe = torch.randn(b, text_len, 32, generator=g)
    ne = torch.randn(b, neg_len, 32, generator=g) if guidance > 1 else None
    return adapter.encode_prompt(None, prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=guidance)


def _grid(frames, h, w, b, mixed: int) -> TokenGrid:
    """A tall raster grid of ``frames`` frames of ``h x w`` tokens, or (``mixed`` > 0) a stage-2-like set: the first
    ``mixed`` tokens replaced by their 4 children at +{0, 0.5}^2 (fine mask), different per image."""
    coarse = grid_positions(frames * h, w)
    if not mixed:
        return TokenGrid(coarse.expand(b, -1, -1).contiguous(), (frames * h, w), None, raster=True, frames=frames)
    pos, masks = [], []
    for i in range(b):
        order = torch.roll(torch.arange(len(coarse)), shifts=3 * i)
        up, keep = coarse[order[:mixed]], coarse[order[mixed:]]
        kids = (up[:, None] + torch.tensor([[0, 0], [0, .5], [.5, 0], [.5, .5]])).reshape(-1, 2)
        pos.append(torch.cat([kids, keep]))
        masks.append(torch.arange(len(pos[-1])) < 4 * mixed)
    return TokenGrid(torch.stack(pos), (frames * h, w), torch.stack(masks), frames=frames)


# (frames, rows, cols per frame, batch, mixed parents, timestep, guidance, text length, negative text length)
MIX_1 = [(3, 2, 3, 1, 0, 950.0, 4.0, 7, 7),      # stage 1, high-noise expert, CFG in one batch
         (3, 2, 3, 2, 4, 700.0, 3.0, 5, 9),      # stage 2 (mixed set), low-noise expert, CFG texts of other lengths
         (3, 4, 6, 2, 0, 500.0, 1.0, 11, 0),     # stage 3, no CFG
         (2, 3, 3, 1, 0, 900.0, 6.0, 3, 4),      # another size, high-noise expert
         (1, 2, 4, 1, 2, 100.0, 5.0, 6, 6)]      # one frame, mixed
MIX_2 = [(2, 2, 2, 2, 0, 990.0, 2.0, 8, 8), (3, 4, 4, 1, 5, 300.0, 4.5, 4, 10), (1, 4, 6, 1, 0, 880.0, 1.0, 12, 0)]


def _calls(adapter, mix, seed) -> list[VelocityCall]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for frames, h, w, b, mixed, t, guidance, tl, nl in mix:
        grid = _grid(frames, h, w, b, mixed)
        x = torch.randn(b, grid.positions.shape[1], adapter.token_channels, generator=g)
        out.append(VelocityCall(x, grid, torch.tensor(t), _cond(adapter, b, tl, nl, guidance, g)))
    return out


# ---- Dense and one-rank Sharded -------------------------------------------------------------------------------------
@torch.no_grad()
def test_block_function_equals_the_diffusers_block_bitwise(wan22):
    from ralu_runtime.adapters.wan import wan_block

    pipe, adapter = wan22
    tr = pipe.transformer_2
    g = torch.Generator().manual_seed(0)
    grid = _grid(3, 2, 3, 2, 4)
    cos, sin = adapter.rotary(grid)
    h = torch.randn(2, grid.positions.shape[1], 32, generator=g)
    temb, proj, enc, _ = tr.condition_embedder(torch.tensor([700.0, 300.0]), torch.randn(2, 5, 32, generator=g), None)
    proj = proj.unflatten(1, (6, -1))
    for blk in tr.blocks:
        ref = blk(h, enc, proj, (cos, sin))
        assert torch.equal(wan_block(blk, h, enc, proj, cos, sin, DENSE), ref)


@pytest.mark.parametrize("cache", [None, "taylorseer:2"])
@torch.no_grad()
def test_one_rank_sharded_velocity_equals_dense_bitwise(wan22, cache):
    from ralu_runtime.cache import make_cache

    _, adapter = wan22
    calls = _calls(adapter, MIX_1, seed=1)
    for c in calls:
        outs = []
        for sharding in (None, OneRank()):
            with call_scope(make_cache(cache) if cache else None, sharding=sharding):
                outs.append(adapter.velocity(c.tokens, c.grid, c.timestep, c.cond))
        assert torch.equal(outs[0], outs[1])


# ---- packed -----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_packed_equals_per_call_grouped_by_expert(wan22):
    _, adapter = wan22
    assert adapter.packs and adapter.shards
    adapter.guidance_scale_2 = 2.5  # the low-noise expert's own scale, read when a prompt is encoded
    try:
        calls = _calls(adapter, MIX_1, seed=0)
    finally:
        adapter.guidance_scale_2 = None
    assert {c.cond.data["guidance_scale_2"] for c in calls} == {2.5}
    ref = per_call(adapter, calls)
    with CountCalls(adapter, "velocity") as unpacked, CountCalls(adapter, "_packed_call") as packed:
        out = adapter.packed_velocity(calls)
    assert not unpacked.args, "the packed path fell back to per-call velocity"
    # one packed call per expert: calls 0 and 3 (t >= 875) on transformer, the others on transformer_2
    assert [(len(a[0]), a[1]) for a in packed.args] == [(2, 0), (3, 1)]
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert rel_diff(out, ref) <= REL_TOL, rel_diff(out, ref)
    # the calls are independent: other neighbours (and another grouping) change no result
    other = _calls(adapter, MIX_2, seed=5)
    again = adapter.packed_velocity([other[0], calls[1], other[1], calls[4], other[2]])
    torch.testing.assert_close(again[1], out[1], atol=REL_TOL, rtol=0)
    torch.testing.assert_close(again[3], out[4], atol=REL_TOL, rtol=0)
    # a call alone, and experts fixed beforehand (the compile runner's specialize_call) choose the same groups
    (one,) = adapter.packed_velocity([calls[1]])
    assert rel_diff([one], [ref[1]]) <= REL_TOL
    fixed = [VelocityCall(c.tokens, c.grid, c.timestep, adapter.specialize_call(c.timestep, c.cond)) for c in calls]
    assert [c.cond.data["expert"] for c in fixed] == [0, 1, 1, 0, 1]
    assert rel_diff(adapter.packed_velocity(fixed), ref) <= REL_TOL


@torch.no_grad()
def test_one_transformer_pipeline_packs_in_one_call():
    from ralu_runtime.adapters.wan import WanAdapter

    adapter = WanAdapter(build_tiny_wan_pipeline(seed=3, num_layers=1))
    calls = _calls(adapter, MIX_2, seed=2)
    ref = per_call(adapter, calls)
    with CountCalls(adapter, "_packed_call") as packed:
        out = adapter.packed_velocity(calls)
    assert [(len(a[0]), a[1]) for a in packed.args] == [(3, 0)]
    assert rel_diff(out, ref) <= REL_TOL


class _WanPadded(PaddedLayout):
    """Wan asks for one text row more than its text (a padding segment's image tokens need a key): that row is
    padding too, so random contents start there."""

    def pad(self, kind, n):
        size = super().pad(kind, n)
        if kind == "text":
            self.real["text"] = n - 1
        return size


@torch.no_grad()
def test_static_layout_with_bucket_padding_equals_the_eager_layout(wan22):
    """The PackedSegments layout (compiled / CUDA-graph calls) padded to buckets, run eagerly: equal to the eager
    HostSegments call, and random padding contents change nothing."""
    from ralu_runtime.compile.packed import PackedBuckets

    _, adapter = wan22
    buckets = PackedBuckets(min_tokens=32, growth=1.25, align=16)
    calls = _calls(adapter, MIX_1, seed=4)
    eager = adapter.packed_velocity(calls)
    plain = _WanPadded(adapter, buckets.size)
    out = adapter.packed_velocity(calls, execution=plain)
    assert [k[:2] for k in plain.keys] == [("wan", 0), ("wan", 1)]
    assert all(b > n for _, n, b in plain.sizes), f"the test should pad every dimension: {plain.sizes}"
    assert rel_diff(out, eager) <= REL_TOL
    noisy = adapter.packed_velocity(calls, execution=_WanPadded(adapter, buckets.size, ("image", "image", "text")))
    for o, r in zip(noisy, out):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=0)


@torch.no_grad()
def test_packed_falls_back_per_call_with_a_cache_or_hooks(wan22):
    from ralu_runtime.cache import make_cache

    pipe, adapter = wan22
    calls = _calls(adapter, MIX_2, seed=6)
    ref = per_call(adapter, calls)
    with call_scope(make_cache("taylorseer:2")), CountCalls(adapter, "velocity") as unpacked:
        out = adapter.packed_velocity(calls)
    assert len(unpacked.args) == len(calls) and rel_diff(out, ref) == 0
    seen = []
    for module in (pipe.transformer.blocks[1], pipe.transformer_2.blocks[0].attn2):
        handle = module.register_forward_hook(lambda *a: seen.append(1))
        try:
            with CountCalls(adapter, "velocity") as unpacked:
                out = adapter.packed_velocity(calls)
        finally:
            handle.remove()
        assert len(unpacked.args) == len(calls) and rel_diff(out, ref) == 0
    assert seen, "the hooks ran in the per-call fallback"


@torch.no_grad()
def test_serving_engine_packs_wan_requests(wan22):
    """The serving engine packs Wan 2.2 requests at different stages, sizes, frame counts and experts (CFG texts of
    other lengths included); every request equals generate alone (atol = rtol = 1e-4 on latents, as
    tests/test_serving_engine.py)."""
    from ralu_runtime.serving import Engine, EngineConfig

    pipe, _ = wan22
    B = RaluSchedule(steps=(3, 1, 2), ends=(0.4, 0.6, 1.0), shifts=(3.0, 2.0, 3.0), z=3.0, ratio=0.5)
    e1, e2 = random_embeds(pipe, 1, 12, seed=1, cfg=True), random_embeds(pipe, 2, 6, seed=2, cfg=True)
    e2["negative_prompt_embeds"] = random_embeds(pipe, 2, 9, seed=3)["prompt_embeds"]
    reqs = [(dict(height=64, width=96, num_frames=9, speedup=SMALL, **e1), 11),
            (dict(height=96, width=64, num_frames=5, speedup=B, **e2), 12),
            (dict(height=64, width=64, num_frames=5, speedup=None, num_inference_steps=6, **e1), 13)]
    with Engine(pipe, EngineConfig(gather_timeout_s=0.05), output_type="latent") as eng:
        outs = [h.result(timeout=600) for h in [eng.submit(seed=seed, **kw) for kw, seed in reqs]]
        m = eng.metrics()
    assert m["requests"]["ok"] == len(reqs) and m["packed_calls"] > 0
    for (kw, seed), out in zip(reqs, outs):
        ref = generate(pipe, seed=seed, output_type="latent", progress=False, **kw).images
        torch.testing.assert_close(out.images, ref, rtol=1e-4, atol=1e-4)


# ---- expert state per generate call ---------------------------------------------------------------------------------
@torch.no_grad()
def test_expert_state_lives_in_the_call_state(wan22):
    from ralu_runtime.cache import make_cache
    from ralu_runtime.execution.call import current_call

    _, adapter = wan22
    assert not hasattr(adapter, "_call_expert")
    c = _calls(adapter, MIX_2[:1], seed=7)[0]
    states = {}

    def run(name, t):
        with call_scope(make_cache("taylorseer:2")):
            adapter.velocity(c.tokens, c.grid, torch.tensor(t), c.cond)
            states[name] = dict(current_call().adapter)

    threads = [threading.Thread(target=run, args=(n, t)) for n, t in (("high", 950.0), ("low", 200.0))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert states == {"high": {"wan.last_expert": 0}, "low": {"wan.last_expert": 1}}


@torch.no_grad()
def test_concurrent_generate_calls_keep_their_own_expert_state(wan22):
    """Two threads run generate on one pipeline with TaylorSeer caches whose experts switch at different steps; each
    equals its run alone (same latents, same full / cached pattern: the cache restarts at its own switch only)."""
    pipe, _ = wan22
    emb = random_embeds(pipe, 1, 6, seed=2, cfg=True)
    runs = {"a": dict(num_inference_steps=6, seed=1), "b": dict(num_inference_steps=9, seed=2)}
    kw = dict(KW, num_frames=5, speedup=None, cache="taylorseer:2")
    alone = {k: generate(pipe, **emb, **kw, **r) for k, r in runs.items()}
    got, errors = {}, []
    barrier = threading.Barrier(2)

    def run(k):
        try:
            barrier.wait()
            got[k] = generate(pipe, **emb, **kw, **runs[k])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in runs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for k in runs:
        assert torch.equal(got[k].images, alone[k].images)
        assert got[k].cache_stats == alone[k].cache_stats
    # the two calls switch experts at different steps (shift 3: 6 steps -> 2 high-noise, 9 steps -> 3)
    assert [len(s["pattern"]) for s in alone["a"].cache_stats["stages"]] == [2, 4]
    assert [len(s["pattern"]) for s in alone["b"].cache_stats["stages"]] == [3, 6]


# ---- inductor -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@torch.no_grad()
def test_inductor_packed_equals_eager_packed_and_a_new_mix_does_not_recompile():
    from ralu_runtime.compile import compile_stats, ensure_backend, uncompile_adapter
    from ralu_runtime.adapters import get_adapter

    pipe = build_tiny_wan_pipeline(seed=1, two_experts=True, num_layers=1)
    ensure_backend(pipe, "inductor")
    adapter = get_adapter(pipe)
    runner = adapter.runner
    try:
        assert runner.packs and runner.impl.compiles_blocks
        counts = []
        for i, mix in enumerate((MIX_1, MIX_2, MIX_1[1:4])):
            calls = _calls(adapter, mix, seed=10 + i)
            ref = adapter.packed_velocity(calls)  # eager packed
            with CountCalls(adapter, "velocity") as unpacked:
                out = runner.packed(calls)
            assert not unpacked.args, "the compiled packed call fell back to per-call velocity"
            assert rel_diff(out, ref) <= REL_TOL, f"mix {i + 1}: {rel_diff(out, ref):.3g}"
            counts.append(compile_stats()["unique_graphs"])
        assert counts[2] == counts[1], f"the third mix recompiled: unique graphs after each mix {counts}"
        assert [n for n in runner.impl.compiled_blocks if n.endswith("_packed")] == ["wan_block_packed"]
    finally:
        uncompile_adapter(pipe)


# ---- gloo ranks ---------------------------------------------------------------------------------------------------
# sharded cases: (model, generate kwargs, negative text length; the prompt has 12 tokens)
RANK_CASES = {
    "ralu": ("wan21", dict(speedup=SMALL, seed=3), 12),
    "ralu22": ("wan22", dict(speedup=SMALL, seed=3), 12),
    "two_pass": ("wan22", dict(speedup=SMALL, seed=4), 9),           # CFG texts of 12 and 9 tokens: two passes
    "cache": ("wan22", dict(speedup=None, num_inference_steps=5, seed=5, cache="taylorseer:2"), 12),
    "batch2": ("wan22", dict(speedup=SMALL, seed=6, region_mode="frame"), 12),
}


def _ranks_worker(runs):
    """``runs``: (config name, ContextParallelConfig kwargs, case of :data:`RANK_CASES`); each case also once in this
    process without sharding (the reference). Counts the sharded attention calls (this worker process only)."""
    from ralu_runtime.execution.sharding import Sharded

    sharded_calls = []
    attend = Sharded.attend

    def counted(self, *a, **kw):
        sharded_calls.append(1)
        return attend(self, *a, **kw)

    Sharded.attend = counted  # the worker process ends after this function
    pipes, refs, out = {}, {}, {}
    for cname, ckw, case in runs:
        variant, extra, neg_len = RANK_CASES[case]
        if variant not in pipes:
            pipes[variant] = build_tiny_wan_pipeline(seed=0, two_experts=variant == "wan22")
        pipe = pipes[variant]
        b = 2 if case == "batch2" else 1
        emb = random_embeds(pipe, b, 12, seed=1)
        emb["negative_prompt_embeds"] = random_embeds(pipe, b, neg_len, seed=2)["prompt_embeds"]
        kw = dict(KW, **emb, **extra, return_masks=True)
        if case not in refs:
            refs[case] = generate(pipe, **kw)
        ref = refs[case]
        before = len(sharded_calls)
        par = generate(pipe, **kw, parallel=parallel_config(**ckw))
        out[f"{cname}/{case}"] = dict(ref=ref.images, par=par.images, ref_masks=ref.masks, par_masks=par.masks,
                                      ref_stats=ref.cache_stats, par_stats=par.cache_stats,
                                      tokens=[r.tokens for r in par.records], sharded=len(sharded_calls) - before)
    return out


def _check_ranks(results):
    for key in results[0]:
        assert_ranks_match([r[key] for r in results], key)
        assert all(r[key]["sharded"] > 0 for r in results), key


@pytest.fixture(scope="module")
def two_ranks():
    from ralu_runtime.parallel.launch import run_gloo

    u, r = dict(ulysses_degree=2), dict(ring_degree=2, ring_anything=True)
    runs = [("ulysses", u, "two_pass"), ("ulysses", u, "batch2"), ("ring", r, "ralu22"), ("ring", r, "cache")]
    return run_gloo(WORKER + "_ranks_worker", 2, kwargs=dict(runs=runs), timeout=600)


@pytest.mark.slow
def test_two_ranks_equal_one_process(two_ranks):
    _check_ranks(two_ranks)
    r = two_ranks[0]
    assert 33 in r["ring/ralu22"]["tokens"], r["ring/ralu22"]["tokens"]  # stage 2: 18 + 3 x 5 rows, odd
    assert r["ring/cache"]["par_stats"]["cached"] > 0


@pytest.mark.slow
def test_four_ranks_equal_one_process():
    from ralu_runtime.parallel.launch import run_gloo

    configs = {"u2r2": dict(ulysses_degree=2, ring_degree=2), "u4": dict(ulysses_degree=4, ulysses_anything=True)}
    runs = [(name, cfg, case) for name, cfg in configs.items() for case in RANK_CASES if case != "ralu22"]
    results = run_gloo(WORKER + "_ranks_worker", 4, kwargs=dict(runs=runs), timeout=900)
    _check_ranks(results)
    assert len(results[0]) == 8
