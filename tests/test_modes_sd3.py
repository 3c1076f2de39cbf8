"""SD3 / SD3.5 in every execution mode (``ralu_runtime.execution``): one request (Dense: the blocks as modules), many
requests packed into one call (Packed: ralu's ``sd3_joint_block``), one request sharded across ranks (Sharded: the
same ``sd3_joint_block``). Tiny random SD3, SD3.5 Large and SD3.5 Medium (MMDiT-X: image-only second attention in
blocks 0-1), CPU, fp32.

* one rank: the Sharded velocity with a fake one-rank plan equals the Dense one (the module call) bitwise -- CFG,
  skip-layer guidance inside its window, a feature cache; so ralu's block function is diffusers' block, op for op.
* packed == per call: max |packed - per call| / max |per call| <= 1e-5 (measured on this 2-core CPU: 7.7e-7 to
  1.8e-6) for a mix of stages (coarse raster, stage-2 mixed set, fine raster), token counts, text lengths, batch 2,
  CFG on and off, a skip-layer-guidance call outside its window (packed) and one inside it (per call); host layout
  (varlen) and static layout (device tensors, bucket padding, one padding segment) alike.
* inductor (slow): the packed call under the compile runner equals the eager packed call (<= 1e-5) and a second
  mix compiles nothing new.
* gloo ranks: 2 ranks (ulysses; ring) and 4 ranks (slow: ulysses 4; 2 x 2; ring 4) equal one process within 1e-5
  (measured: 0 on 2 ranks and on 4 ring ranks, the tiny models' sharded arithmetic being the one-process
  arithmetic there; 1.2e-6 and 1.7e-6 with ulysses 4 and 2 x 2; a count of the cross-rank attention calls shows
  that every case ran sharded) and are bitwise equal across ranks, for RALU runs
  with odd joint sequences, CFG, skip-layer guidance, a feature cache, and 4 ranks where a rank holds text rows only
  (no image row for SD3.5 Medium's image-only attention); each rank's pipelines are left as found. SD3 has no text
  mask. One ``run_gloo`` spawn per rank count.
"""
from __future__ import annotations

import pytest
import torch

from ralu_runtime.adapters import TokenGrid, VelocityCall
from ralu_runtime.execution.call import call_scope
from mode_helpers import (REL_TOL, CountCalls, OneRank, PaddedLayout, assert_case_on_ranks, assert_packs,
                          left_as_found, pad_by, parallel_config, per_call, rel_diff, sharded_case, stage_grid)

BF16_TOL = 6e-2  # bf16 packed vs per call, relative (measured on a CPU: up to 3.5e-2 with MIX's CFG scales)
WORKER = f"{__name__}:"
TEXT = 7  # text tokens of the gloo cases: odd joint sequences
VARIANTS = ("sd3", "large", "medium")


def _pipe(variant: str, seed: int = 0):
    from ralu_runtime.tiny import build_tiny
    from ralu_runtime.tiny.sd35 import build_tiny_sd35_pipeline

    return build_tiny("tiny-sd3", seed=seed) if variant == "sd3" else build_tiny_sd35_pipeline(variant=variant,
                                                                                              seed=seed)


@pytest.fixture(scope="module")
def adapters():
    from ralu_runtime.adapters.sd3 import SD3Adapter

    return {v: SD3Adapter(_pipe(v, seed=i)) for i, v in enumerate(VARIANTS)}


def _cond(adapter, b, text_len, guidance, g, device="cpu", dtype=torch.float32):
    joint, pooled = adapter.embed_dims()
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    kw = {"prompt_embeds": r(b, text_len, joint), "pooled_prompt_embeds": r(b, pooled)}
    if guidance > 1:
        kw.update(negative_prompt_embeds=r(b, text_len, joint), negative_pooled_prompt_embeds=r(b, pooled))
    return adapter.encode_prompt(None, None, **kw, guidance_scale=guidance)


# (grid hw, batch, mixed parents, timestep, guidance, text length): stages 1 / 2 / 3, CFG on and off
MIX = [((3, 4), 1, 0, 950.0, 4.0, 8), ((3, 4), 2, 3, 600.0, 1.0, 5), ((6, 8), 2, 0, 200.0, 7.0, 11),
       ((4, 6), 1, 5, 40.0, 2.5, 3)]
MIX_2 = [((2, 3), 3, 0, 990.0, 2.0, 3), ((4, 4), 1, 2, 500.0, 4.5, 9), ((6, 6), 2, 0, 300.0, 1.0, 7)]


def _calls(adapter, specs, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for hw, b, mixed, t, guidance, text_len in specs:
        grid = stage_grid(hw, b, mixed, device=device)
        x = torch.randn(b, grid.positions.shape[1], adapter.token_channels, generator=g).to(device, dtype)
        out.append(VelocityCall(x, grid, torch.tensor(t, device=device),
                                _cond(adapter, b, text_len, guidance, g, device, dtype)))
    return out


# ------------------------------------------------------------------------------------------------ one rank
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_one_rank_sharded_velocity_equals_dense_bitwise(adapters, variant):
    """ralu's block function (Sharded, one rank) against the blocks called as modules (Dense): CFG, and skip-layer
    guidance inside its window (its skip pass runs sharded too)."""
    from ralu_runtime.adapters.sd3 import SkipLayerGuidance

    adapter = adapters[variant]
    g = torch.Generator().manual_seed(1)
    grid = TokenGrid(stage_grid((3, 4), 2).positions + 0.5 * torch.rand(2, 12, 2, generator=g), (3, 4))
    tokens = torch.randn(2, 12, adapter.token_channels, generator=g)
    adapter.skip_layer_guidance = SkipLayerGuidance(layers=(1,), scale=2.0, stop=0.5)
    try:
        cond = _cond(adapter, 2, 7, 4.0, g)
    finally:
        adapter.skip_layer_guidance = None
    for t in (900.0, 300.0):  # p = 0.25: inside the window; p = 0.87: outside
        outs = []
        for sharding in (None, OneRank()):
            with call_scope(None, sharding=sharding):
                outs.append(adapter.velocity(tokens, grid, torch.tensor(t), cond))
        assert torch.equal(outs[0], outs[1]), f"{variant} t={t}: max diff {(outs[0] - outs[1]).abs().max():.3g}"


@torch.no_grad()
def test_one_rank_sharded_ignores_diffusers_active_attention_backend(adapters):
    """diffusers' SD3 processor calls torch's SDPA whatever backend diffusers has active (another model's
    ``set_attention_backend("_native_math")`` makes it the process-wide default): the sharded call does the same, so
    it still equals the module call bitwise (it followed the active backend: 2.9e-6 apart, failed CI at c46087a)."""
    from diffusers.models.attention_dispatch import attention_backend

    adapter = adapters["medium"]  # joint attention and MMDiT-X's image-only attention
    c = _calls(adapter, MIX[:1], seed=4)[0]
    with attention_backend("_native_math"):
        outs = []
        for sharding in (None, OneRank()):
            with call_scope(None, sharding=sharding):
                outs.append(adapter.velocity(c.tokens, c.grid, c.timestep, c.cond))
    assert torch.equal(outs[0], outs[1]), f"max diff {(outs[0] - outs[1]).abs().max():.3g}"


@torch.no_grad()
def test_one_rank_sharded_with_a_feature_cache_equals_dense_bitwise(adapters):
    from ralu_runtime.cache import make_cache

    adapter = adapters["medium"]
    c = _calls(adapter, MIX[1:2], seed=2)[0]  # stage 2, batch 2
    outs = []
    for sharding in (None, OneRank()):
        cache = make_cache("taylorseer:2")
        with call_scope(cache, sharding=sharding):
            outs.append([adapter.velocity(c.tokens, c.grid, torch.tensor(t), c.cond) for t in (900., 800., 700., 600.)])
        assert cache.stats()["cached"] > 0
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_sharded_calls_refuse_a_custom_processor(adapters):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    adapter = adapters["sd3"]
    call = _calls(adapter, MIX[:1], seed=3)[0]

    class Mine(JointAttnProcessor2_0):
        pass

    attn = adapter.transformer.transformer_blocks[1].attn
    attn.set_processor(Mine())
    try:
        with call_scope(None, sharding=OneRank()), pytest.raises(ValueError, match=r"transformer_blocks.1.attn: Mine"):
            adapter.velocity(call.tokens, call.grid, call.timestep, call.cond)
    finally:
        attn.set_processor(JointAttnProcessor2_0())


# ------------------------------------------------------------------------------------------------ packed
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_packed_equals_per_call_host_and_static_layouts(adapters, variant):
    adapter = adapters[variant]
    calls = _calls(adapter, MIX, seed=4)
    ref = per_call(adapter, calls)
    with CountCalls(adapter) as count:
        host = adapter.packed_velocity(calls)
        static = adapter.packed_velocity(calls, execution=PaddedLayout(adapter, pad_by(5, 1)))
    assert count.n == 0, "the packed path fell back to per-call velocity"
    assert [o.shape for o in host] == [r.shape for r in ref]
    assert rel_diff(host, ref) <= REL_TOL, f"{variant} host layout: {rel_diff(host, ref):.3g}"
    assert rel_diff(static, ref) <= REL_TOL, f"{variant} static layout: {rel_diff(static, ref):.3g}"


@torch.no_grad()
def test_packed_skip_layer_guidance_packs_outside_its_window_only(adapters):
    from ralu_runtime.adapters.sd3 import SkipLayerGuidance

    adapter = adapters["medium"]
    adapter.skip_layer_guidance = SkipLayerGuidance(layers=(0, 2), scale=2.5, stop=0.3)
    try:
        calls = _calls(adapter, MIX, seed=5)  # CFG calls at t = 950 (inside), 200 and 40 (outside)
    finally:
        adapter.skip_layer_guidance = None
    ref = per_call(adapter, calls)
    with CountCalls(adapter) as count:
        out = adapter.packed_velocity(calls)
    assert count.n == 1
    assert rel_diff(out, ref) <= REL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["sd3", "medium"])
@torch.no_grad()
def test_gpu_packed_equals_per_call(variant):
    """CUDA: fp32 (SDPA per segment) within 1e-5; bf16 with every varlen backend and the static layout (torch's varlen
    kernel where available) within :data:`BF16_TOL` of the per-call bf16 result (bf16 rounding, amplified up to 7x by
    the guidance scales of the mix)."""
    from ralu_kernels.attention import available_backends
    from ralu_runtime.adapters.sd3 import SD3Adapter
    from ralu_runtime.tiny import build_tiny
    from ralu_runtime.tiny.sd35 import build_tiny_sd35_pipeline

    def build(dtype):
        kw = dict(seed=0, device="cuda", dtype=dtype)
        return SD3Adapter(build_tiny("tiny-sd3", **kw) if variant == "sd3" else
                          build_tiny_sd35_pipeline(variant=variant, **kw))

    fp32 = build(torch.float32)
    calls = _calls(fp32, MIX, seed=20, device="cuda")
    assert rel_diff(fp32.packed_velocity(calls), per_call(fp32, calls)) <= REL_TOL
    bf16 = build(torch.bfloat16)
    calls = _calls(bf16, MIX, seed=20, device="cuda", dtype=torch.bfloat16)
    ref = per_call(bf16, calls)
    for backend in ["auto", *available_backends("cuda", torch.bfloat16)]:
        bf16.packed_attention_backend = backend
        diff = rel_diff(bf16.packed_velocity(calls), ref)
        print(f"{variant} bf16 {backend}: {diff:.3g}")
        assert diff <= BF16_TOL, f"{variant} bf16 backend={backend}: {diff:.3g}"
    bf16.packed_attention_backend = "auto"
    diff = rel_diff(bf16.packed_velocity(calls, execution=PaddedLayout(bf16, pad_by(5, 1))), ref)
    print(f"{variant} bf16 static: {diff:.3g}")
    assert diff <= BF16_TOL


# ------------------------------------------------------------------------------------------------ inductor
@pytest.mark.slow  # a cold inductor compile of SD3.5 Medium's three packed block kinds: a few minutes on 2 cores
@torch.no_grad()
def test_inductor_packed_equals_eager_packed_and_a_new_mix_compiles_nothing():
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.compile import compile_stats, ensure_backend, uncompile_adapter

    pipe = _pipe("medium", seed=7)
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
        assert [n for n in runner.impl.compiled_blocks if n.endswith("_packed")] == ["sd3_joint_packed"]
    finally:
        uncompile_adapter(pipe)


# ------------------------------------------------------------------------------------------------ gloo ranks
def _worker(world: int):
    """Every case for ``world`` ranks: generate sharded and in one process (on every rank), plain tensors back;
    ``left_as_found``: per pipeline, what the calls changed on it ("": nothing)."""
    from ralu_runtime.execution import sharding
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.adapters.sd3 import SkipLayerGuidance
    from ralu_runtime.tiny.sd35 import random_embeds
    from helpers import snapshot

    medium, sd3 = _pipe("medium", seed=0), _pipe("sd3", seed=1)
    get_adapter(medium).skip_layer_guidance = SkipLayerGuidance(layers=(1,), scale=2.0, stop=0.4)
    pipes = {"medium": medium, "sd3": sd3}
    found = {name: snapshot(p, extra={"transformer": p.transformer}) for name, p in pipes.items()}
    base = dict(output_type="latent", progress=False)
    out = {}

    calls = [0]  # cross-rank attention calls (the custom op's body): proof that the call ran sharded
    impl = sharding.sequence_attention_impl

    def counted(*a, **kw):
        calls[0] += 1
        return impl(*a, **kw)

    sharding.sequence_attention_impl = counted

    def both(name, pipe, kw, cfg):
        emb = random_embeds(pipe, kw.pop("batch", 1), TEXT, seed=3)
        before = calls[0]  # the reference runs unsharded: only the sharded run's calls count
        out[name] = dict(sharded_case(pipe, cfg, **emb, **base, **kw), sharded_calls=calls[0] - before)

    # SD3.5 Medium, 96 x 128, 3x: stage 1 12 image tokens, stage 2 18, stage 3 48; 7 text tokens (joint sequences of
    # 19, 25, 55 rows: odd), CFG batch 2, skip-layer guidance in stage 1's window
    ralu = dict(height=96, width=128, speedup="3x", seed=4, guidance_scale=4.0)
    if world == 2:
        both("medium_ulysses", medium, dict(ralu), parallel_config(ulysses_degree=2))
        both("medium_ring", medium, dict(ralu, batch=2), parallel_config(ring_degree=2))
        both("sd3_cache", sd3, dict(height=64, width=96, speedup="3x", seed=5, cache="taylorseer:2"),
             parallel_config(ulysses_degree=2))
    else:  # 19 joint rows at stage 1 over 4 ranks (5, 5, 5, 4): the last rank holds text rows only
        both("medium_ulysses4", medium, dict(ralu), parallel_config(ulysses_degree=4))
        both("medium_2x2", medium, dict(ralu, batch=2), parallel_config(ulysses_degree=2, ring_degree=2))
        both("sd3_baseline", sd3, dict(height=64, width=64, speedup=None, num_inference_steps=3, seed=6),
             parallel_config(ring_degree=4))
    out["left_as_found"] = {name: left_as_found(found[name], p, {"transformer": p.transformer})
                            for name, p in pipes.items()}
    return out


@pytest.fixture(scope="module")
def two_ranks():
    from ralu_runtime.parallel.launch import run_gloo

    return run_gloo(WORKER + "_worker", 2, kwargs=dict(world=2), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["medium_ulysses", "medium_ring", "sd3_cache"])
def test_two_ranks_equal_one_process(two_ranks, case):
    res = assert_case_on_ranks(two_ranks, case)
    if case == "medium_ulysses":
        assert (dict(res["tokens"])["stage2"] + TEXT) % 2 == 1  # an odd joint sequence over 2 ranks
    if case == "sd3_cache":
        assert res["par_stats"]["cached"] > 0


@pytest.mark.slow
def test_two_ranks_leave_the_pipelines_as_found(two_ranks):
    """Each rank's SD3 and SD3.5 Medium pipelines after sharded and one-process calls (CFG, skip-layer guidance, a
    feature cache): as found (tests/helpers.py's snapshot, with the transformer's private attributes)."""
    for r in two_ranks:
        assert r["left_as_found"] == {"medium": "", "sd3": ""}


@pytest.mark.slow  # one spawn of 4 processes: ~1-2 min on 2 cores
def test_four_ranks_equal_one_process():
    from ralu_runtime.parallel.launch import run_gloo

    ranks = run_gloo(WORKER + "_worker", 4, kwargs=dict(world=4), timeout=900)
    for case in ("medium_ulysses4", "medium_2x2", "sd3_baseline"):
        assert_case_on_ranks(ranks, case)
    for r in ranks:
        assert r["left_as_found"] == {"medium": "", "sd3": ""}
