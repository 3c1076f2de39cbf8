"""HunyuanVideo 1.5 in every execution mode (tiny random pipeline, fp32, CPU): the one block function
(``hv15_block``) run as one request (Dense), sharded across ranks (Sharded) and packed (Packed), on videos as tall
token grids (frames stacked vertically, :class:`TokenGrid` ``frames``; each frame's rows and the rotary tables
exactly as in the one-request call).

* One-rank Sharded == Dense, bitwise (masked Qwen tokens, glyph tokens, CFG, batch 2, fractional positions, a
  feature cache).
* Packed == per call: a mix of videos of different frame counts and sizes, stages (coarse raster, stage-2 mixed
  with fine children at +0.5, fine raster), batch sizes, timesteps, text lengths and masks, glyph (byT5) text in one
  call, CFG on and off. Bound: max |packed - per call| / max |per call| <= 1e-5; measured on a 2-core CPU at most
  1.7e-6 (three mixes x three seeds, eager host layout and the static layout alike). The static layout (device
  tensors only, as compiled calls use it) padded with random padding contents; fallbacks per call for hooks and a
  feature cache.
* The serving engine: two videos (different sizes, CFG on and off, masked text) run through packed calls and
  each equals ``generate`` alone (1e-4).
* Inductor (``slow``): ``adapter.runner.packed`` equals eager packed within 1e-5 (measured: at most 1.1e-6) and a
  third mix compiles nothing (one graph, ``hunyuan_video15_block_packed``).
* gloo ranks: ``generate(parallel=ContextParallelConfig(...))`` of a 9-frame video on 2 ranks (ulysses, ring) and 4
  ranks (``slow``: ulysses 4, ulysses 2 x ring 2) equals one process within 1e-5 (measured: 1.4e-6 on 2 ranks,
  1.7e-6 on 4; float rounding: every rank runs the per-token layers on its own rows) and is bitwise equal across
  ranks, with masked text, CFG, batch 2 and an odd joined token count (stage 2: 21 image + 8 text tokens); one
  velocity call of 2 image and 8 text tokens (ranks holding text rows only) likewise.
"""
from __future__ import annotations

import pytest
import torch

from ralu_runtime.adapters import VelocityCall
from ralu_runtime.adapters.hunyuan_video15 import HunyuanVideo15Adapter
from ralu_runtime.execution.call import call_scope
from ralu_runtime.tiny.hunyuan_video15 import TEXT_2_DIM, TEXT_DIM, build_tiny_hunyuan_video15_pipeline
from mode_helpers import (OneRank, assert_engine_packs, assert_falls_back_per_call, assert_order_free, assert_packs,
                          assert_padded_layout_equals_host, assert_ranks_match, per_call, stage_grid)

WORKER = f"{__name__}:"


@pytest.fixture(scope="module")
def adapter():
    return HunyuanVideo15Adapter(build_tiny_hunyuan_video15_pipeline(seed=1))


# ---- inputs ----------------------------------------------------------------------------------------------------
def _cond(adapter, b, text_len, masked: int, guidance, glyph: bool, g):
    """Qwen embeddings with the last ``masked`` tokens of video 0 masked; ``glyph``: byT5 tokens, 4 valid in video
    0; with ``guidance`` != 1 a negative prompt with 2 more masked tokens (CFG)."""
    mask = torch.ones(b, text_len, dtype=torch.long)
    if masked:
        mask[0, -masked:] = 0
    kw = {"prompt_embeds": torch.randn(b, text_len, TEXT_DIM, generator=g), "prompt_embeds_mask": mask}
    if glyph:
        m2 = torch.zeros(b, 6)
        m2[0, :4] = 1
        kw.update(prompt_embeds_2=torch.randn(b, 6, TEXT_2_DIM, generator=g), prompt_embeds_mask_2=m2)
    if guidance != 1:
        neg = torch.ones(b, text_len, dtype=torch.long)
        neg[:, -masked - 2:] = 0
        kw.update(negative_prompt_embeds=torch.randn(b, text_len, TEXT_DIM, generator=g),
                  negative_prompt_embeds_mask=neg)
    return adapter.encode_prompt(None, None, guidance_scale=guidance, **kw)


def _calls(adapter, specs, seed):
    """specs: (frames, frame hw, batch, mixed parents, timestep, guidance, text length, masked, glyph) per call."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for frames, hw, b, mixed, t, guidance, text_len, masked, glyph in specs:
        grid = stage_grid(hw, b, mixed, frames=frames)
        x = torch.randn(b, grid.positions.shape[1], adapter.token_channels, generator=g)
        out.append(VelocityCall(x, grid, torch.tensor(t), _cond(adapter, b, text_len, masked, guidance, glyph, g)))
    return out


MIX_1 = [(3, (2, 3), 1, 0, 950.0, 6.0, 8, 3, False), (3, (2, 3), 2, 2, 600.0, 1.0, 5, 2, False),
         (2, (4, 6), 2, 0, 200.0, 4.0, 10, 0, True), (1, (4, 4), 1, 0, 40.0, 1.0, 6, 0, False)]
MIX_2 = [(2, (2, 2), 1, 1, 700.0, 5.0, 8, 2, False), (3, (4, 4), 1, 0, 100.0, 1.0, 8, 0, True)]
MIX_3 = [(1, (2, 3), 3, 0, 990.0, 1.0, 3, 0, False), (4, (2, 3), 1, 3, 500.0, 6.0, 9, 4, False),
         (2, (4, 4), 2, 0, 300.0, 3.0, 7, 1, True), (3, (3, 3), 1, 1, 800.0, 1.0, 12, 5, False)]


# ---- one request: Dense and one-rank Sharded ---------------------------------------------------------------------
@pytest.mark.parametrize("cache", [None, "taylorseer:2"])
@torch.no_grad()
def test_one_rank_sharded_equals_dense_bitwise(adapter, cache):
    from ralu_runtime.cache import make_cache

    specs = [(3, (2, 3), 2, 2, 600.0, 6.0, 8, 3, True), (2, (2, 3), 2, 0, 500.0, 1.0, 7, 2, False)]
    for call in _calls(adapter, specs, 0):
        assert not call.cond.data["all_valid"]
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
    assert calls[0].cond.data["cfg"] and not calls[1].cond.data["cfg"] and calls[2].cond.data["embeds_2"] is not None
    ref = per_call(adapter, calls)
    out = assert_packs(adapter, calls, ref)
    assert_order_free(adapter, calls, out, ref, alone=2)


@torch.no_grad()
def test_static_layout_with_padding_equals_the_host_layout(adapter):
    assert_padded_layout_equals_host(adapter, _calls(adapter, MIX_3, 2), ("image",) * 3 + ("text",) * 1 + ("segments",))


@torch.no_grad()
def test_hooks_and_feature_cache_fall_back_to_per_call(adapter):
    tr = adapter.transformer
    hooked = [tr.transformer_blocks[0], tr.transformer_blocks[1].norm1_context, tr.norm_out]
    assert_falls_back_per_call(adapter, _calls(adapter, MIX_2, 3), hooked)


def test_flags():
    assert HunyuanVideo15Adapter.packs and HunyuanVideo15Adapter.shards


@pytest.mark.slow
@torch.no_grad()
def test_inductor_packed_equals_eager_packed_and_a_new_mix_does_not_recompile():
    from ralu_runtime.compile import compile_stats, ensure_backend, uncompile_adapter

    pipe = build_tiny_hunyuan_video15_pipeline(seed=2, num_layers=1)
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
        assert [n for n in runner.impl.compiled_blocks if n.endswith("_packed")] == ["hunyuan_video15_block_packed"]
    finally:
        uncompile_adapter(pipe)


@torch.no_grad()
def test_serving_engine_packs_and_each_request_equals_generate_alone():
    """The serving engine's batched step runs the two videos' model calls as packed calls (different sizes, CFG
    on and off, masked text); each result equals ``generate`` alone (atol = rtol = 1e-4 on latents, as
    tests/test_serving_engine.py)."""
    pipe = build_tiny_hunyuan_video15_pipeline(seed=4)
    reqs = [(dict(height=64, width=96, num_frames=9, speedup="7x", guidance_scale=6.0, **_embeds()), 11),
            (dict(height=64, width=64, num_frames=5, speedup="7x", guidance_scale=1.0,
                  prompt_embeds=_embeds()["prompt_embeds"][:1, :5]), 12)]
    assert_engine_packs(pipe, reqs)


# ---- gloo ranks -------------------------------------------------------------------------------------------------
def _embeds():
    """Batch 2, 8 Qwen tokens with the last 3 of video 0 masked, a negative prompt with 5 valid tokens (CFG)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, -3:] = 0
    neg = torch.ones(2, 8, dtype=torch.long)
    neg[:, -3:] = 0
    return dict(prompt_embeds=torch.randn(2, 8, TEXT_DIM, generator=g), prompt_embeds_mask=mask,
                negative_prompt_embeds=torch.randn(2, 8, TEXT_DIM, generator=g), negative_prompt_embeds_mask=neg)


def _worker(configs):
    """generate with each ``(name, ContextParallelConfig kwargs)`` and without: latents and token counts."""
    from diffusers import ContextParallelConfig

    from ralu_runtime import generate

    pipe = build_tiny_hunyuan_video15_pipeline(seed=0)
    kw = dict(**_embeds(), height=64, width=96, num_frames=9, speedup="7x", seed=3, guidance_scale=6.0,
              output_type="latent", progress=False)
    out = {"ref": generate(pipe, **kw).images}
    for name, cfg in configs:
        par = generate(pipe, **kw, parallel=ContextParallelConfig(**cfg))
        out[name] = par.images
        out["tokens"] = {r.name: r.tokens for r in par.records}
    # one velocity call of 2 image and 8 text tokens: some ranks hold text rows only
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.parallel import resolve_parallel

    adapter = get_adapter(pipe)
    (call,) = _calls(adapter, [(1, (1, 2), 2, 0, 500.0, 6.0, 8, 3, False)], 5)
    plan = resolve_parallel(ContextParallelConfig(**configs[0][1]), adapter).setup()
    with torch.no_grad():
        out["short_ref"] = adapter.velocity(call.tokens, call.grid, call.timestep, call.cond)
        with call_scope(sharding=plan):
            out["short"] = adapter.velocity(call.tokens, call.grid, call.timestep, call.cond)
    return out


def _check_ranks(results, names):
    for name, ref in [(n, "ref") for n in names] + [("short", "short_ref")]:
        assert_ranks_match([{"par": r[name], "ref": r[ref]} for r in results], name)
    assert results[0]["tokens"]["stage2"] == STAGE2_TOKENS  # + 8 text tokens: an odd joined sequence


STAGE2_TOKENS = 21
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
