"""Chroma in every execution mode (``ralu_runtime.execution``): FLUX's block functions on Chroma's blocks as one
request (Dense), many requests packed into one call (Packed) and one request sharded across ranks (Sharded), with
Chroma's text masks: float 0/1 (the pipeline's; *added* to the logits as ``m_i m_j``), bool (hard) and none. Tiny
random Chroma (1 double + 2 single blocks, 2 heads x 16), CPU, fp32.

* one rank: the Sharded velocity with a fake one-rank plan equals the Dense one bitwise (float and bool masks, CFG as
  one batch and as two text groups of different lengths, no mask, a feature cache).
* packed == per call: max |packed - per call| / max |per call| <= 1e-5 (measured on this 2-core CPU: 0 to 1.1e-6)
  for a mix of stages, token counts, text lengths, all three mask kinds, batch 2, CFG on and off and a negative
  prompt of another length; host layout (one SDPA call per segment with the pair mask, varlen without) and static
  layout (kind "dense", padded). The float mask is not a hard mask: dropping it changes the result.
* inductor (slow): the packed call under the compile runner equals the eager packed call (<= 1e-5) and a second mix
  compiles nothing new.
* gloo ranks: 2 ranks (ulysses, ring) and 4 ranks (slow: ulysses 4, 2 x 2, ring 4) equal one process within 1e-5
  (measured: 0 on 2 ranks and on 4 ring ranks, the tiny model's sharded arithmetic being the one-process
  arithmetic there; 1.2e-6 with ulysses 4 and 2 x 2; a count of the cross-rank attention calls shows that every
  case ran sharded) and are bitwise equal across ranks: RALU runs with
  float masks (CFG in one batch), a negative prompt of another length (two groups, each sharded on its own), a bool
  mask, odd joint sequences, a rank holding text rows only (4 ranks), a feature cache. One ``run_gloo`` spawn per
  rank count.
"""
from __future__ import annotations

import pytest
import torch

from ralu_runtime.adapters import VelocityCall
from ralu_runtime.execution.call import call_scope
from mode_helpers import (REL_TOL, CountCalls, OneRank, PaddedLayout, assert_case_on_ranks, assert_packs, pad_by,
                          parallel_config, per_call, rel_diff, sharded_case, stage_grid)

BF16_TOL = 6e-2  # bf16 packed vs per call, relative (SD3 measured on a CPU: up to 3.5e-2 with MIX's CFG scales)
WORKER = f"{__name__}:"
TEXT_DIM = 32


def _pipe(seed: int = 0):
    from ralu_runtime.tiny.chroma import build_tiny_chroma_pipeline

    return build_tiny_chroma_pipeline(seed=seed)


@pytest.fixture(scope="module")
def adapter():
    from ralu_runtime.adapters.chroma import ChromaAdapter

    return ChromaAdapter(_pipe())


def _embeds(b: int, t: int, seed: int, mask: str = "float", neg_t: int | None = None) -> dict:
    """generate / encode_prompt keywords: prompt and negative embeddings with T5-like masks (``t - 2 - i % 3`` resp.
    ``2 + i % 2`` valid tokens) as ``mask`` "float" (the pipeline's), "bool" or "none"; ``neg_t``: the negative's
    length (default ``t``)."""
    g = torch.Generator().manual_seed(seed)
    nt = t if neg_t is None else neg_t
    out = {"prompt_embeds": torch.randn(b, t, TEXT_DIM, generator=g),
           "negative_prompt_embeds": torch.randn(b, nt, TEXT_DIM, generator=g)}
    if mask != "none":
        dtype = torch.bool if mask == "bool" else torch.float32
        out["prompt_embeds_mask"] = torch.stack([torch.arange(t) < t - 2 - i % 3 for i in range(b)]).to(dtype)
        out["negative_prompt_embeds_mask"] = torch.stack([torch.arange(nt) < 2 + i % 2 for i in range(b)]).to(dtype)
    return out


# (grid hw, batch, mixed parents, timestep, guidance, text length, mask kind, negative length)
MIX = [((3, 4), 1, 0, 950.0, 5.0, 8, "float", None), ((3, 4), 2, 3, 600.0, 4.0, 6, "bool", None),
       ((4, 4), 2, 0, 300.0, 3.0, 7, "float", 5), ((2, 3), 1, 0, 100.0, 1.0, 5, "none", None),
       ((4, 6), 1, 5, 40.0, 1.0, 9, "float", None)]
MIX_2 = [((2, 3), 3, 0, 990.0, 2.0, 4, "float", None), ((4, 4), 1, 2, 500.0, 1.0, 9, "bool", None),
         ((3, 3), 2, 0, 200.0, 4.5, 6, "float", 3)]


def _calls(adapter, specs, seed: int, device="cpu", dtype=torch.float32) -> list[VelocityCall]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (hw, b, mixed, t, guidance, text_len, mask, neg_t) in enumerate(specs):
        grid = stage_grid(hw, b, mixed, device=device)
        x = torch.randn(b, grid.positions.shape[1], adapter.token_channels, generator=g).to(device, dtype)
        emb = {n: v.to(dtype) if v.is_floating_point() else v
               for n, v in _embeds(b, text_len, seed * 100 + k, mask, neg_t).items()}
        cond = adapter.encode_prompt(None, None, **emb, guidance_scale=guidance)
        out.append(VelocityCall(x, grid, torch.tensor(t, device=device), cond))
    return out


# ------------------------------------------------------------------------------------------------ one rank
@torch.no_grad()
def test_one_rank_sharded_velocity_equals_dense_bitwise(adapter):
    calls = _calls(adapter, MIX, seed=1)
    assert calls[2].cond.data["neg_embeds"] is not None  # two text groups
    for i, c in enumerate(calls):
        outs = []
        for sharding in (None, OneRank()):
            with call_scope(None, sharding=sharding):
                outs.append(adapter.velocity(c.tokens, c.grid, c.timestep, c.cond))
        assert torch.equal(outs[0], outs[1]), f"call {i}: max diff {(outs[0] - outs[1]).abs().max():.3g}"


@pytest.mark.parametrize("spec", [MIX[0], MIX[2]], ids=["one-batch", "two-groups"])
@torch.no_grad()
def test_one_rank_sharded_with_a_feature_cache_equals_dense_bitwise(adapter, spec):
    from ralu_runtime.cache import make_cache

    c = _calls(adapter, [spec], seed=2)[0]
    outs = []
    for sharding in (None, OneRank()):
        cache = make_cache("taylorseer:2")
        with call_scope(cache, sharding=sharding):
            outs.append([adapter.velocity(c.tokens, c.grid, torch.tensor(t), c.cond) for t in (900., 800., 700., 600.)])
        assert cache.stats()["cached"] > 0
    assert all(torch.equal(a, b) for a, b in zip(*outs))


# ------------------------------------------------------------------------------------------------ packed
@torch.no_grad()
def test_packed_equals_per_call_host_and_static_layouts(adapter):
    calls = _calls(adapter, MIX, seed=3)
    ref = per_call(adapter, calls)
    with CountCalls(adapter) as count:
        host = adapter.packed_velocity(calls)
        static = adapter.packed_velocity(calls, execution=PaddedLayout(adapter, pad_by(5, 1)))
        unmasked = adapter.packed_velocity([c for c in calls if c.cond.data["mask"] is None or
                                            c.cond.data["mask"].dtype == torch.bool])  # varlen attention
    assert count.n == 0, "the packed path fell back to per-call velocity"
    assert [o.shape for o in host] == [r.shape for r in ref]
    assert rel_diff(host, ref) <= REL_TOL, f"host layout: {rel_diff(host, ref):.3g}"
    assert rel_diff(static, ref) <= REL_TOL, f"static layout: {rel_diff(static, ref):.3g}"
    assert rel_diff(unmasked, [ref[1], ref[3]]) <= REL_TOL
    # one call alone, and in another order
    (one,) = adapter.packed_velocity([calls[2]])
    assert rel_diff([one], [ref[2]]) <= REL_TOL
    perm = adapter.packed_velocity(calls[::-1])[::-1]
    assert rel_diff(perm, ref) <= REL_TOL


@torch.no_grad()
def test_packed_float_mask_is_a_bias_and_bool_mask_drops_padding(adapter):
    """The float mask changes the result against no mask although its padding tokens are kept (a +1 bias between
    valid tokens, not a hard mask), and a bool mask equals dropping the padding tokens from the text."""
    from ralu_runtime.adapters import Conditioning

    c = _calls(adapter, [MIX[0]], seed=4)[0]
    data = c.cond.data
    nomask = VelocityCall(c.tokens, c.grid, c.timestep, Conditioning(1, dict(data, mask=None)))
    out = adapter.packed_velocity([c, nomask])
    assert (out[0] - out[1]).abs().max() > 1e-4
    hard = data["mask"].bool()
    as_bool = VelocityCall(c.tokens, c.grid, c.timestep, Conditioning(1, dict(data, mask=hard)))
    valid = [data["embeds"][i][hard[i]] for i in range(2)]  # [negative ; positive], 2 and 6 valid tokens
    split = Conditioning(1, dict(data, embeds=valid[1][None], mask=None, neg_embeds=valid[0][None], neg_mask=None))
    dropped = VelocityCall(c.tokens, c.grid, c.timestep, split)
    a, b = adapter.packed_velocity([as_bool, dropped])
    assert rel_diff([a], [b]) <= REL_TOL
    assert rel_diff([a], per_call(adapter, [as_bool])) <= REL_TOL


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_packed_equals_per_call():
    """CUDA: fp32 within 1e-5; bf16 (float masks: one SDPA call per segment; unmasked and bool-masked calls: every
    varlen backend; the static layout: kind "dense" with float masks, torch's varlen kernel without) within
    :data:`BF16_TOL` of the per-call bf16 result (bf16 rounding, amplified by the guidance scales of the mix)."""
    from ralu_kernels.attention import available_backends
    from ralu_runtime.adapters.chroma import ChromaAdapter
    from ralu_runtime.tiny.chroma import build_tiny_chroma_pipeline

    fp32 = ChromaAdapter(build_tiny_chroma_pipeline(seed=0, device="cuda"))
    calls = _calls(fp32, MIX, seed=20, device="cuda")
    assert rel_diff(fp32.packed_velocity(calls), per_call(fp32, calls)) <= REL_TOL
    bf16 = ChromaAdapter(build_tiny_chroma_pipeline(seed=0, device="cuda", dtype=torch.bfloat16))
    calls = _calls(bf16, MIX, seed=20, device="cuda", dtype=torch.bfloat16)
    hard = [c for c in calls if c.cond.data["mask"] is None or c.cond.data["mask"].dtype == torch.bool]
    ref, ref_hard = per_call(bf16, calls), per_call(bf16, hard)
    for backend in ["auto", *available_backends("cuda", torch.bfloat16)]:
        bf16.packed_attention_backend = backend
        for name, cs, r in (("all", calls, ref), ("unmasked", hard, ref_hard)):
            for static in (False, True):
                out = bf16.packed_velocity(cs, execution=PaddedLayout(bf16, pad_by(5, 1)) if static else None)
                diff = rel_diff(out, r)
                print(f"chroma bf16 {backend} {name} static={static}: {diff:.3g}")
                assert diff <= BF16_TOL, f"bf16 backend={backend} {name} static={static}: {diff:.3g}"


# ------------------------------------------------------------------------------------------------ inductor
@pytest.mark.slow  # a cold inductor compile of the packed double and single blocks: a few minutes on 2 cores
@torch.no_grad()
def test_inductor_packed_equals_eager_packed_and_a_new_mix_compiles_nothing():
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.compile import compile_stats, ensure_backend, uncompile_adapter

    pipe = _pipe(seed=5)
    adapter = get_adapter(pipe)
    ensure_backend(adapter, "inductor")
    try:
        runner = adapter.runner
        graphs = []
        for i, mix in enumerate((MIX, MIX_2)):
            calls = _calls(adapter, mix, seed=10 + i)
            ref = adapter.packed_velocity(calls)  # eager packed
            assert_packs(adapter, calls, ref, packed=runner.packed, label=f"mix {i + 1}")
            graphs.append(compile_stats()["unique_graphs"])
        assert graphs[1] == graphs[0], f"the second mix recompiled: {graphs}"
        assert [n for n in runner.impl.compiled_blocks if n.endswith("_packed")] == \
            ["chroma_double_packed", "chroma_single_packed"]
    finally:
        uncompile_adapter(pipe)


# ------------------------------------------------------------------------------------------------ gloo ranks
def _worker(world: int):
    """Every case for ``world`` ranks: generate sharded and in one process (on every rank), plain tensors back."""
    from ralu_runtime.execution import sharding

    pipe = _pipe(seed=0)
    base = dict(output_type="latent", progress=False)
    out = {}

    calls = [0]  # cross-rank attention calls (the custom op's body): proof that the call ran sharded
    impl = sharding.sequence_attention_impl

    def counted(*a, **kw):
        calls[0] += 1
        return impl(*a, **kw)

    sharding.sequence_attention_impl = counted

    def both(name, emb, kw, cfg):
        before = calls[0]  # the reference runs unsharded: only the sharded run's calls count
        out[name] = dict(sharded_case(pipe, cfg, **emb, **base, **kw), sharded_calls=calls[0] - before)

    # 96 x 128, 3x: 12 / 21 / 48 image tokens; 6 text tokens: joint sequences of 18, 27 (odd), 54 rows
    ralu = dict(height=96, width=128, speedup="3x", seed=4)
    if world == 2:
        both("float_ulysses", _embeds(1, 6, 1), ralu, parallel_config(ulysses_degree=2))
        both("two_groups_ring", _embeds(2, 6, 2, neg_t=4), ralu, parallel_config(ring_degree=2))
        both("bool_cache", _embeds(1, 6, 3, mask="bool"), dict(ralu, cache="taylorseer:2"),
             parallel_config(ulysses_degree=2))
    else:  # 18 joint rows at stage 1 over 4 ranks (5, 5, 4, 4): rank 0 holds text rows only
        both("float_ulysses4", _embeds(1, 6, 1), ralu, parallel_config(ulysses_degree=4))
        both("two_groups_2x2", _embeds(2, 6, 2, neg_t=4), ralu, parallel_config(ulysses_degree=2, ring_degree=2))
        both("bool_ring4", _embeds(1, 6, 3, mask="bool"),
             dict(height=64, width=64, speedup=None, num_inference_steps=3, seed=5), parallel_config(ring_degree=4))
    return out


@pytest.fixture(scope="module")
def two_ranks():
    from ralu_runtime.parallel.launch import run_gloo

    return run_gloo(WORKER + "_worker", 2, kwargs=dict(world=2), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["float_ulysses", "two_groups_ring", "bool_cache"])
def test_two_ranks_equal_one_process(two_ranks, case):
    res = assert_case_on_ranks(two_ranks, case)
    if case == "float_ulysses":
        assert (dict(res["tokens"])["stage2"] + 6) % 2 == 1  # an odd joint sequence over 2 ranks
    if case == "bool_cache":
        assert res["par_stats"]["cached"] > 0


@pytest.mark.slow  # one spawn of 4 processes: ~1-2 min on 2 cores
def test_four_ranks_equal_one_process():
    from ralu_runtime.parallel.launch import run_gloo

    ranks = run_gloo(WORKER + "_worker", 4, kwargs=dict(world=4), timeout=900)
    for case in ("float_ulysses4", "two_groups_2x2", "bool_ring4"):
        assert_case_on_ranks(ranks, case)
