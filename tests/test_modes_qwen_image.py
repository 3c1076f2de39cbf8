"""Qwen-Image in every execution mode (tiny random pipeline, fp32, CPU): the one block function
(``qwen_image_block``) run as one request (Dense), sharded across ranks (Sharded) and packed (Packed).

* One-rank Sharded == Dense, bitwise (text mask, true CFG, batch 2, fractional positions, a feature cache).
* Packed == per call: a mix of requests at different stages (coarse raster, stage-2 mixed with fine children at
  +0.5, fine raster), batch sizes, timesteps, text lengths, masks (padding at the end, a hole in the middle: the
  text keeps its rotary positions when masked tokens are left out) and CFG scales. Bound: max |packed - per call| /
  max |per call| <= 1e-5; measured on a 2-core CPU at most 1.6e-6 (three mixes x three seeds, eager host layout and
  the static layout alike). The static layout (device tensors only, as compiled calls use it) padded with random
  padding contents; fallbacks per call for hooks and a feature cache.
* The serving engine: two requests (different sizes, CFG on and off, masked text) run through packed calls and
  each equals ``generate`` alone (1e-4).
* Inductor (``slow``): ``adapter.runner.packed`` equals eager packed within 1e-5 (measured: at most 1.3e-6) and a
  third mix compiles nothing (one graph, ``qwen_image_block_packed``).
* gloo ranks: ``generate(parallel=ContextParallelConfig(...))`` on 2 ranks (ulysses, ring) and 4 ranks (``slow``:
  ulysses 4, ulysses 2 x ring 2) equals one process within 1e-5 (measured: 0, bitwise) and is bitwise equal across
  ranks, with a padded text mask, true CFG, batch 2 and an odd joined token count (stage 2 at 96 x 128: 8 text + 15
  image tokens); one velocity call of 8 text and 2 image tokens (a rank holding text rows only) likewise.
"""
from __future__ import annotations

import pytest
import torch

from ralu_runtime.adapters import VelocityCall
from ralu_runtime.adapters.qwen_image import QwenImageAdapter
from ralu_runtime.execution.call import call_scope
from ralu_runtime.tiny.qwen_image import TEXT_DIM, build_tiny_qwen_image_pipeline
from mode_helpers import (OneRank, assert_engine_packs, assert_falls_back_per_call, assert_order_free, assert_packs,
                          assert_padded_layout_equals_host, assert_ranks_match, per_call, stage_grid)

WORKER = f"{__name__}:"


@pytest.fixture(scope="module")
def adapter():
    return QwenImageAdapter(build_tiny_qwen_image_pipeline(seed=1))


# ---- inputs ----------------------------------------------------------------------------------------------------
def _cond(adapter, b, text_len, mask, guidance, g):
    """``mask``: None (no mask), "pad" (the last 3 tokens of image 0 masked), "hole" (token 1 of every image
    masked); with ``guidance`` > 1 a shorter negative prompt with its own mask (true CFG)."""
    kw = {"prompt_embeds": torch.randn(b, text_len, TEXT_DIM, generator=g)}
    if mask is not None:
        m = torch.ones(b, text_len, dtype=torch.long)
        if mask == "pad":
            m[0, -3:] = 0
        else:
            m[:, 1] = 0
        kw["prompt_embeds_mask"] = m
    if guidance > 1:
        kw["negative_prompt_embeds"] = torch.randn(b, text_len - 2, TEXT_DIM, generator=g)
        kw["negative_prompt_embeds_mask"] = torch.ones(b, text_len - 2, dtype=torch.long)
    return adapter.encode_prompt(None, None, guidance_scale=guidance, **kw)


def _calls(adapter, specs, seed):
    """specs: (grid hw, batch, mixed parents, timestep, guidance, text length, mask) per call."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for hw, b, mixed, t, guidance, text_len, mask in specs:
        grid = stage_grid(hw, b, mixed)
        x = torch.randn(b, grid.positions.shape[1], adapter.token_channels, generator=g)
        out.append(VelocityCall(x, grid, torch.tensor(t), _cond(adapter, b, text_len, mask, guidance, g)))
    return out


MIX_1 = [((3, 4), 1, 0, 950.0, 4.0, 8, None), ((3, 4), 2, 3, 600.0, 1.0, 5, "pad"),
         ((6, 8), 2, 0, 200.0, 7.0, 11, "pad"), ((4, 6), 1, 0, 40.0, 2.5, 6, "hole")]
MIX_2 = [((4, 4), 1, 2, 700.0, 3.0, 8, "pad"), ((8, 8), 1, 0, 100.0, 1.0, 8, None)]
MIX_3 = [((2, 3), 3, 0, 990.0, 1.0, 3, None), ((4, 6), 1, 5, 500.0, 4.5, 9, "hole"),
         ((6, 6), 2, 0, 300.0, 6.0, 7, "pad"), ((3, 3), 1, 1, 800.0, 1.2, 12, None)]


# ---- one request: Dense and one-rank Sharded ---------------------------------------------------------------------
@pytest.mark.parametrize("cache", [None, "taylorseer:2"])
@torch.no_grad()
def test_one_rank_sharded_equals_dense_bitwise(adapter, cache):
    from ralu_runtime.cache import make_cache

    for call in _calls(adapter, [((3, 4), 2, 3, 600.0, 4.0, 8, "pad"), ((3, 4), 2, 0, 500.0, 1.0, 7, "hole")], 0):
        outs = []
        for sharding in (None, OneRank()):
            with call_scope(make_cache(cache) if cache else None, sharding=sharding):
                outs.append([adapter.velocity(call.tokens, call.grid, torch.tensor(t), call.cond)
                             for t in (900.0, 800.0, 700.0)])
        assert all(torch.equal(a, b) for a, b in zip(*outs))


# ---- packed ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_packed_equals_per_call(adapter):
    calls = _calls(adapter, MIX_1, 1)
    assert calls[1].cond.data["mask"] is not None and calls[0].cond.data["cfg"] and not calls[1].cond.data["cfg"]
    ref = per_call(adapter, calls)
    out = assert_packs(adapter, calls, ref)
    assert_order_free(adapter, calls, out, ref, alone=3)


@torch.no_grad()
def test_static_layout_with_padding_equals_the_host_layout(adapter):
    assert_padded_layout_equals_host(adapter, _calls(adapter, MIX_3, 2), ("image",) * 3 + ("text",) * 3 + ("segments",))


@torch.no_grad()
def test_hooks_and_feature_cache_fall_back_to_per_call(adapter):
    tr = adapter.transformer
    assert_falls_back_per_call(adapter, _calls(adapter, MIX_2, 3), [tr.transformer_blocks[1], tr.norm_out])


def test_flags():
    assert QwenImageAdapter.packs and QwenImageAdapter.shards


@pytest.mark.slow
@torch.no_grad()
def test_inductor_packed_equals_eager_packed_and_a_new_mix_does_not_recompile():
    from ralu_runtime.compile import compile_stats, ensure_backend, uncompile_adapter

    pipe = build_tiny_qwen_image_pipeline(seed=2)
    runner = ensure_backend(pipe, "inductor")
    adapter = runner.adapter
    assert runner.packs and runner.impl.compiles_blocks
    graphs = []
    try:
        for i, mix in enumerate((MIX_1, MIX_2, MIX_3)):
            calls = _calls(adapter, mix, 10 + i)
            ref = adapter.packed_velocity(calls)               # eager packed (no impl)
            assert_packs(adapter, calls, ref, packed=runner.packed, label=f"mix {i + 1}")
            graphs.append(compile_stats()["unique_graphs"])
        assert graphs[2] == graphs[1], f"the third mix recompiled: unique graphs after each mix {graphs}"
        assert [n for n in runner.impl.compiled_blocks if n.endswith("_packed")] == ["qwen_image_block_packed"]
    finally:
        uncompile_adapter(pipe)


@torch.no_grad()
def test_serving_engine_packs_and_each_request_equals_generate_alone():
    """The serving engine's batched step runs the two requests' model calls as packed calls (different sizes, CFG
    on and off, masked text); each result equals ``generate`` alone (atol = rtol = 1e-4 on latents, as
    tests/test_serving_engine.py)."""
    pipe = build_tiny_qwen_image_pipeline(seed=4)
    reqs = [(dict(height=96, width=128, speedup="7x", guidance_scale=4.0, **_embeds()), 11),
            (dict(height=64, width=64, speedup="7x", guidance_scale=1.0,
                  prompt_embeds=_embeds()["prompt_embeds"][:1, :5]), 12)]
    assert_engine_packs(pipe, reqs)


# ---- gloo ranks -------------------------------------------------------------------------------------------------
def _embeds():
    """Batch 2, 8 text tokens with the last 3 of image 0 masked, a 6-token negative prompt (true CFG: padded to 8
    with masked tokens)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, -3:] = 0
    return dict(prompt_embeds=torch.randn(2, 8, TEXT_DIM, generator=g), prompt_embeds_mask=mask,
                negative_prompt_embeds=torch.randn(2, 6, TEXT_DIM, generator=g))


def _worker(configs):
    """generate with each ``(name, ContextParallelConfig kwargs)`` and without: latents and token counts."""
    from diffusers import ContextParallelConfig

    from ralu_runtime import generate

    pipe = build_tiny_qwen_image_pipeline(seed=0)
    kw = dict(**_embeds(), height=96, width=128, speedup="7x", seed=3, guidance_scale=4.0, output_type="latent",
              progress=False)
    out = {"ref": generate(pipe, **kw).images}
    for name, cfg in configs:
        par = generate(pipe, **kw, parallel=ContextParallelConfig(**cfg))
        out[name] = par.images
        out["tokens"] = {r.name: r.tokens for r in par.records}
    # one velocity call of 2 image and 8 text tokens: some ranks hold text rows only
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.parallel import resolve_parallel

    adapter = get_adapter(pipe)
    (call,) = _calls(adapter, [((1, 2), 2, 0, 500.0, 4.0, 8, "pad")], 5)
    plan = resolve_parallel(ContextParallelConfig(**configs[0][1]), adapter).setup()
    with torch.no_grad():
        out["short_ref"] = adapter.velocity(call.tokens, call.grid, call.timestep, call.cond)
        with call_scope(sharding=plan):
            out["short"] = adapter.velocity(call.tokens, call.grid, call.timestep, call.cond)
    return out


def _check_ranks(results, names):
    for name, ref in [(n, "ref") for n in names] + [("short", "short_ref")]:
        assert_ranks_match([{"par": r[name], "ref": r[ref]} for r in results], name)
    assert results[0]["tokens"]["stage2"] == 15  # 8 text + 15 image tokens: an odd joined sequence


TWO = [("ulysses2", dict(ulysses_degree=2)), ("ring2", dict(ring_degree=2))]
FOUR = [("ulysses4", dict(ulysses_degree=4)), ("u2r2", dict(ulysses_degree=2, ring_degree=2))]


@pytest.mark.slow
def test_two_ranks_equal_one_process():
    from ralu_runtime.parallel.launch import run_gloo

    _check_ranks(run_gloo(WORKER + "_worker", 2, kwargs={"configs": TWO}, timeout=300), [n for n, _ in TWO])


@pytest.mark.slow
def test_four_ranks_equal_one_process():
    from ralu_runtime.parallel.launch import run_gloo

    _check_ranks(run_gloo(WORKER + "_worker", 4, kwargs={"configs": FOUR}, timeout=420), [n for n, _ in FOUR])
