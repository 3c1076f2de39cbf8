"""Z-Image in every execution mode (ralu_runtime.execution): the tiny random ZImagePipeline (1 + 1 refiner and 2 main
blocks, distinct random pad tokens), CPU, float32.

Text masks: a call whose captions (prompts, negatives under CFG) pad to different multiples of 32 runs the model's
masks (the context refiner's over the captions, the main layers' over the unified sequence); image pads (an image's
token count padded to a multiple of 32 with ``x_pad_token``) are real participants.

* Sharded with a one-rank plan == Dense, bitwise, with masks, CFG and feature caches.
* packed == per call: a mix of requests at different stages (coarse raster, stage-2 mixed set, fine raster), token
  counts (12 to 48 image tokens, 0 to 20 image pads), batch sizes (1, 2), timesteps, captions of 5 to 70 tokens (one
  to three blocks of 32, masked per call where they differ), CFG with its own guidance scale and calls without;
  max |packed - per call| / max |per call| <= REL_TOL = 1e-5 (measured on the 2-core CPU: <= 1.4e-6). The masked
  rows are left out of the packed sequence (a hard key mask): exact up to float rounding. cfg_truncation decides
  per call. Hooks and feature caches fall back. Bucket padding of the static layout changes nothing.
* inductor (``slow``: cold compiles take minutes on the 2-core CPU): ``runner.packed`` == eager packed within
  REL_TOL (measured: <= 1.4e-6), a third mix compiles nothing new (one graph kind, ``z_image_block_packed``).
* context parallelism through ``generate(parallel=...)``: 2 gloo ranks (one spawn) and 4 (``slow``, one spawn)
  equal one process within ATOL = 1e-5 on latents of scale ~1 (measured: 0 for 2 and 4 ranks: bitwise) and are
  bitwise equal across ranks; masked captions under CFG, RALU at 96 x 128 (stage 2: 21 image tokens, odd),
  ulysses, ring, both, TaylorSeer and first-block caches (which see the real image tokens, not the pads).
"""
from __future__ import annotations

import pytest
import torch

from ralu_runtime.adapters import TokenGrid, VelocityCall, get_adapter
from ralu_runtime.adapters.base import call_scope
from ralu_runtime.tiny.z_image import build_tiny_z_image_pipeline
from mode_helpers import (REL_TOL, OneRank, PaddedLayout, assert_cases_match, assert_falls_back_per_call, assert_packs,
                          pad_by, parallel_config, per_call, rel_diff, sharded_case, stage_grid)

WORKER = f"{__name__}:_gloo_worker"


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_z_image_pipeline(seed=0)


def _caps(lens, g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(n, 32, generator=g) for n in lens]


def _cond(adapter, lens, neg_lens, guidance: float, g: torch.Generator):
    """Captions of ``lens`` tokens (one per image), negatives of ``neg_lens`` when ``guidance > 0`` (CFG)."""
    kw = {"prompt_embeds": _caps(lens, g)}
    if guidance > 0:
        kw["negative_prompt_embeds"] = _caps(neg_lens, g)
    return adapter.encode_prompt(None, **kw, guidance_scale=guidance)


def _calls(adapter, specs, seed: int) -> list[VelocityCall]:
    """specs: (grid hw, mixed parents, timestep, guidance, caption lengths (one per image), negative lengths)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for hw, mixed, t, guidance, lens, neg_lens in specs:
        b = len(lens)
        grid = stage_grid(hw, b, mixed)
        x = torch.randn(b, grid.positions.shape[1], adapter.token_channels, generator=g)
        out.append(VelocityCall(x, grid, torch.tensor(t), _cond(adapter, lens, neg_lens, guidance, g)))
    return out


# stage 1 (coarse raster), stage 2 (mixed), stage 3 (fine raster), another size; captions padded to 32 / 64 / 96
# (masked where a call's differ), CFG (guidance > 0) and not
MIX_1 = [((3, 4), 0, 950.0, 4.0, (40,), (20,)), ((3, 4), 3, 600.0, 3.0, (20, 70), (33, 10)),
         ((6, 8), 0, 200.0, 0.0, (24,), None), ((4, 6), 5, 40.0, 0.0, (5, 45), None)]
MIX_2 = [((4, 4), 2, 700.0, 5.0, (12,), (12,)), ((8, 8), 0, 100.0, 0.0, (30, 31), None)]
MIX_3 = [((2, 3), 0, 990.0, 2.0, (3, 50, 8), (7, 7, 7)), ((4, 6), 5, 500.0, 0.0, (64,), None),
         ((6, 6), 0, 300.0, 6.0, (17, 17), (40, 2)), ((3, 3), 1, 800.0, 0.0, (33,), None)]


# ------------------------------------------------------------------------------------------------ one rank
@pytest.mark.parametrize("cache", [None, "taylorseer:2", "fbcache:100"])
@torch.no_grad()
def test_one_rank_sharded_velocity_equals_dense_bitwise(pipe, cache):
    """Three steps of one request (batch 2, captions of 40 and 70 tokens, negatives of 20 and 8: masked; 13 image
    tokens + 19 pads at fractional positions) in the Sharded mode with a one-rank plan equal the Dense calls
    bitwise."""
    from ralu_runtime.cache import make_cache

    adapter = get_adapter(pipe)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 13, 64, generator=g)
    grid = TokenGrid(torch.rand(2, 13, 2, generator=g) * 4, (4, 4), torch.rand(2, 13, generator=g) > 0.5)
    cond = _cond(adapter, (40, 70), (20, 8), 4.0, g)
    assert cond.data["cap_tc"] == (64, 96, 32, 32)
    outs, rows = [], []
    head = adapter.transformer.all_final_layer["2-1"]
    handle = head.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[1]))
    try:
        for sharding in (None, OneRank()):
            with call_scope(make_cache(cache) if cache else None, sharding=sharding) as state:
                outs.append([adapter.velocity(tokens, grid, torch.tensor(t), cond) for t in (900.0, 700.0, 500.0)])
                if cache:
                    assert state.cache.stats()["cached"] > 0
    finally:
        handle.remove()
    for dense, sharded in zip(*outs):
        assert torch.equal(dense, sharded)
    assert rows == [32] * 6  # the head sees the image stream (cached steps too): 13 tokens + 19 pads


# ------------------------------------------------------------------------------------------------ packed
@torch.no_grad()
def test_packed_equals_per_call_velocity(pipe):
    adapter = get_adapter(pipe)
    assert adapter.packs and adapter.shards
    calls = _calls(adapter, MIX_1, seed=0)
    assert calls[1].cond.data["cap_tc"] == (32, 96, 64, 32)  # masked in its unpacked call
    ref = per_call(adapter, calls)
    out = assert_packs(adapter, calls, ref)
    assert all(o.dtype == torch.float32 for o in out)
    # a call's result does not depend on its neighbours
    other = _calls(adapter, MIX_1, seed=1)
    again = adapter.packed_velocity([other[0], calls[1], other[2], calls[3]])
    assert rel_diff([again[1], again[3]], [ref[1], ref[3]]) <= REL_TOL


@torch.no_grad()
def test_packed_cfg_truncation_and_normalization_per_call(pipe):
    """The adapter's cfg_truncation decides per call (a call past it runs without its negatives) and
    cfg_normalization applies per image, as in the unpacked calls."""
    adapter = get_adapter(pipe)
    calls = _calls(adapter, [((4, 4), 2, 700.0, 5.0, (12,), (12,)), ((3, 4), 0, 200.0, 4.0, (40,), (20,)),
                             ((8, 8), 0, 100.0, 0.0, (30, 31), None)], seed=3)
    try:
        adapter.cfg_truncation, adapter.cfg_normalization = 0.5, 1.0
        assert [adapter._guided(c.cond, (1000 - c.timestep) / 1000) for c in calls] == [True, False, False]
        ref = per_call(adapter, calls)
        out = adapter.packed_velocity(calls)
    finally:
        adapter.cfg_truncation, adapter.cfg_normalization = 1.0, False
    assert rel_diff(out, ref) <= REL_TOL
    plain = adapter.packed_velocity(calls)
    assert (plain[0] - out[0]).abs().max() > 1e-4 and (plain[1] - out[1]).abs().max() > 1e-4


@torch.no_grad()
def test_packed_falls_back_for_hooks_and_caches(pipe):
    adapter = get_adapter(pipe)
    calls = _calls(adapter, MIX_2, seed=2)
    assert_falls_back_per_call(adapter, calls, [adapter.transformer.all_final_layer["2-1"]])


@torch.no_grad()
def test_bucket_padding_changes_nothing(pipe):
    """The static layout (compiled / CUDA-graph calls) with padded sizes equals the eager host layout, and whatever
    the padding rows hold (tokens, pad flags, rotary tables, captions, times) changes no real output."""
    adapter = get_adapter(pipe)
    calls = _calls(adapter, MIX_3, seed=4)
    ref = adapter.packed_velocity(calls)
    kinds = ["image"] * 4 + ["text"] * 4 + ["segments"]
    out = adapter.packed_velocity(calls, execution=PaddedLayout(adapter, pad_by(5, 2)))
    assert rel_diff(out, ref) <= REL_TOL
    noisy = adapter.packed_velocity(calls, execution=PaddedLayout(adapter, pad_by(5, 2), kinds))
    assert rel_diff(noisy, out) <= 1e-6


# ------------------------------------------------------------------------------------------------ inductor
@pytest.mark.slow
@torch.no_grad()
def test_inductor_packed_equals_eager_packed_and_a_new_mix_compiles_nothing():
    from ralu_runtime.compile import compile_stats, ensure_backend, uncompile_adapter

    pipe = build_tiny_z_image_pipeline(seed=0)
    adapter = get_adapter(pipe)
    runner = ensure_backend(adapter, "inductor")
    try:
        assert runner.packs and runner.impl.compiles_blocks
        counts = []
        for i, mix in enumerate((MIX_1, MIX_2, MIX_3)):
            calls = _calls(adapter, mix, seed=10 + i)
            ref = adapter.packed_velocity(calls)  # eager packed
            assert_packs(adapter, calls, ref, packed=runner.packed, label=f"mix {i + 1}")
            counts.append(compile_stats()["unique_graphs"])
        assert counts[2] == counts[1], f"the third mix recompiled: unique graphs after each mix {counts}"
        assert runner.impl.compiled_blocks == ["z_image_block_packed"]
    finally:
        uncompile_adapter(pipe)


# ------------------------------------------------------------------------------------------------ gloo ranks
def _gloo_worker():
    """Every generate case of this rank count, sharded and in one process; returns latents, masks, cache stats."""
    import torch.distributed as dist

    from ralu_runtime import RaluSchedule

    world = dist.get_world_size()
    pipe = build_tiny_z_image_pipeline(seed=0)
    sched = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
    g = torch.Generator().manual_seed(1)
    pe = torch.zeros(2, 40, 32)
    mask = torch.zeros(2, 40, dtype=torch.long)
    for i, n in enumerate((20, 40)):  # captions padded to 32 and 64: masked
        pe[i, :n], mask[i, :n] = torch.randn(n, 32, generator=g), 1
    masked = dict(prompt_embeds=pe, prompt_embeds_mask=mask, negative_prompt_embeds=torch.randn(2, 8, 32, generator=g))
    single = dict(prompt_embeds=torch.randn(1, 70, 32, generator=g), guidance_scale=0.0)
    ralu = dict(height=96, width=128, speedup=sched)  # stage 2: 21 image tokens (11 pads), odd
    cases = {2: [("masked_cfg_ulysses", masked, ralu, parallel_config(ulysses_degree=2)),
                 ("turbo_ring", single, dict(height=64, width=96, speedup="4step"), parallel_config(ring_degree=2)),
                 ("masked_taylorseer", masked, dict(height=64, width=64, speedup="4x", cache="taylorseer:2"),
                  parallel_config(ulysses_degree=2)),
                 ("fbcache_baseline", single, dict(height=64, width=96, speedup=None, num_inference_steps=4,
                                                   cache="fbcache:100"), parallel_config(ring_degree=2))],
             4: [("masked_cfg_ulysses2_ring2", masked, ralu, parallel_config(ulysses_degree=2, ring_degree=2)),
                 ("masked_fbcache_ulysses4", masked, dict(height=64, width=96, speedup="4x", cache="fbcache:100"),
                  parallel_config(ulysses_degree=4, ulysses_anything=True))]}[world]
    base = dict(output_type="latent", progress=False, return_masks=True, transition_impl="torch", seed=5)
    return {name: sharded_case(pipe, parallel, **emb, **kw, **base) for name, emb, kw, parallel in cases}


@pytest.fixture(scope="module")
def two_ranks():
    from ralu_runtime.parallel.launch import run_gloo

    return run_gloo(WORKER, 2, timeout=400)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(two_ranks):
    assert_cases_match(two_ranks)
    res = two_ranks[0]
    assert dict(res["masked_cfg_ulysses"]["tokens"])["stage2"] == 21
    assert res["masked_taylorseer"]["par_stats"]["cached"] > 0
    assert res["fbcache_baseline"]["par_stats"]["cached"] > 0
    assert res["masked_cfg_ulysses"]["par"].shape[0] == 2


@pytest.mark.slow
def test_four_gloo_ranks_equal_one_process():
    from ralu_runtime.parallel.launch import run_gloo

    assert_cases_match(run_gloo(WORKER, 4, timeout=500))
