"""Packed model calls under the compile backends (ralu_runtime.compile.packed), tiny FLUX / SD3, CPU.

* inductor: ``StageRunner.packed`` runs the adapters' packed block functions compiled (``flux_double_packed``,
  ``flux_single_packed``, ``sd3_joint_packed``) with a symbolic packed token dimension; results equal the eager packed
  call (fp32, max abs diff / output scale; measured on a 2-core CPU: FLUX 2.3e-7, SD3 1.7e-6; bound 1e-5 as in
  tests/test_packed_velocity.py).
* recompiles: after two warm-up mixes a third mix (other request count, token totals, stages, text lengths, batch
  sizes) adds no graph (``compile_stats()["unique_graphs"]``, torch._dynamo's counter); the compiled graphs: FLUX 2
  (double, single), SD3 2 (joint, the last block's ``context_pre_only`` variant).
* padding to buckets (what CUDA graphs capture per bucket, here run on the CPU): the padded call equals the unpadded
  one, and whatever the padding holds changes no real output.
* the serving engine with ``generate(..., backend="inductor")`` installed: every request equals generate alone (eager;
  atol = rtol = 1e-4 on latents, as tests/test_serving_engine.py), the engine ran packed calls through the runner,
  the user's model is left as found.
* the eager backend packs with ralu's fused q/k/v weights; a runner whose impl does not pack (onnx / tensorrt) runs
  one runner call per request.
* GPU only (skipped here): CUDA graphs per bucket, one capture per bucket, bf16 varlen attention.
"""
from __future__ import annotations

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import VelocityCall, get_adapter
from ralu_runtime.execution.packing import PackedSegments
from ralu_runtime.compile import compile_stats, ensure_backend
from ralu_runtime.compile.packed import PackedBuckets
from ralu_runtime.tiny import build_tiny
from tiny_inputs import flux_embeds
from helpers import assert_same, snapshot
from mode_helpers import REL_TOL, CountCalls, PaddedLayout, rel_diff, stage_grid

TOL = dict(rtol=1e-4, atol=1e-4)
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs per bucket need a CUDA device")


# ---- inputs -----------------------------------------------------------------------------------------------------
def _cond(adapter, b, text_len, guidance, g, device="cpu", dtype=torch.float32):
    joint, pooled = adapter.embed_dims()
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    kw = {"prompt_embeds": r(b, text_len, joint), "pooled_prompt_embeds": r(b, pooled)}
    if adapter.supports_negative_prompt:
        if guidance > 1:
            kw.update(negative_prompt_embeds=r(b, text_len, joint), negative_pooled_prompt_embeds=r(b, pooled))
        return adapter.encode_prompt(None, None, **kw, guidance_scale=guidance)
    return adapter.encode_prompt(None, **kw, guidance_scale=guidance)


def _calls(adapter, specs, seed, device="cpu", dtype=torch.float32):
    """specs: (grid hw, batch, mixed parents, timestep, guidance, text length) per call."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for hw, b, mixed, t, guidance, text_len in specs:
        grid = stage_grid(hw, b, mixed, device=device)
        x = torch.randn(b, grid.positions.shape[1], adapter.token_channels, generator=g).to(device, dtype)
        out.append(VelocityCall(x, grid, torch.tensor(t, device=device),
                                _cond(adapter, b, text_len, guidance, g, device, dtype)))
    return out


# three mixes: stage 1 (coarse raster), stage 2 (mixed), stage 3 (fine raster) and baselines; the third differs in
# request count, token totals, stages, batch sizes and text lengths
MIX_1 = [((3, 4), 1, 0, 950.0, 4.0, 8), ((3, 4), 2, 3, 600.0, 1.5, 5), ((6, 8), 1, 0, 200.0, 7.0, 11)]
MIX_2 = [((4, 4), 1, 2, 700.0, 3.0, 8), ((8, 8), 1, 0, 100.0, 5.0, 8)]
MIX_3 = [((2, 3), 3, 0, 990.0, 2.0, 3), ((4, 6), 1, 5, 500.0, 4.5, 9), ((6, 6), 2, 0, 300.0, 6.0, 7),
         ((3, 3), 1, 1, 800.0, 1.2, 12), ((4, 8), 1, 0, 20.0, 3.5, 6)]


# ---- engine requests (same number of model calls each, so every step can pack them all) ---------------------------
A = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
B = RaluSchedule(steps=(3, 1, 2), ends=(0.4, 0.6, 1.0), shifts=(3.0, 2.0, 3.0), z=3.0, ratio=0.5)
REQUESTS = [(dict(height=128, width=128, speedup=A, **flux_embeds(1, seed=1)), 11),
            (dict(height=64, width=96, speedup=B, **flux_embeds(2, seed=2)), 12),
            (dict(height=96, width=64, speedup=None, num_inference_steps=6, **flux_embeds(1, seed=3)), 13)]


def _alone(pipe, kw, seed, **extra):
    return generate(pipe, seed=seed, output_type="latent", progress=False, **kw, **extra).images


@pytest.fixture(scope="module")
def flux():
    """Tiny FLUX: eager references of the engine requests (generate alone, no backend), then the inductor backend
    installed as ``generate(..., backend="inductor")`` installs it (``ensure_backend``; without a model call, so no
    unpacked graph is compiled: this file compiles packed blocks only)."""
    pipe = build_tiny("tiny-flux")
    refs = [_alone(pipe, kw, seed) for kw, seed in REQUESTS]
    ensure_backend(pipe, "inductor")
    yield pipe, refs
    from ralu_runtime.compile import uncompile_adapter

    uncompile_adapter(pipe)


@pytest.fixture(scope="module")
def sd3():
    pipe = build_tiny("tiny-sd3")
    from ralu_runtime.compile import compile_adapter, uncompile_adapter

    compile_adapter(pipe, "inductor")
    yield pipe
    uncompile_adapter(pipe)


# ---- compiled packed calls ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
@torch.no_grad()
def test_inductor_packed_equals_eager_packed_and_a_new_mix_does_not_recompile(family, request):
    pipe = request.getfixturevalue(family)
    pipe = pipe[0] if isinstance(pipe, tuple) else pipe
    adapter = get_adapter(pipe)
    runner = adapter.runner
    assert runner.packs and runner.impl.compiles_blocks
    counts = []
    for i, mix in enumerate((MIX_1, MIX_2, MIX_3)):
        calls = _calls(adapter, mix, seed=i)
        ref = adapter.packed_velocity(calls)               # eager packed (no impl)
        with CountCalls(adapter) as count:
            out = runner.packed(calls)
        assert count.n == 0, "the compiled packed call fell back to per-call velocity"
        assert [o.shape for o in out] == [r.shape for r in ref]
        diff = rel_diff(out, ref)
        assert diff <= REL_TOL, f"{family} mix {i + 1}: max abs diff / output scale {diff:.3g}"
        counts.append(compile_stats()["unique_graphs"])
    assert counts[2] == counts[1], f"the third mix recompiled: unique graphs after each mix {counts}"
    packed_blocks = [n for n in runner.impl.compiled_blocks if n.endswith("_packed")]
    assert packed_blocks == (["flux_double_packed", "flux_single_packed"] if family == "flux" else ["sd3_joint_packed"])


@torch.no_grad()
def test_compiled_packed_call_with_padding_equals_the_unpadded_one(flux):
    """Bucket padding as CUDA graphs use it, on the CPU and through the compiled blocks: the padding is one segment of
    its own (plus empty segments up to the segment bucket), sliced off after; random padding contents change nothing."""
    pipe = flux[0]
    adapter = get_adapter(pipe)
    impl = adapter.runner.impl
    for i, mix in enumerate((MIX_1, MIX_2)):  # warm-up: the packed blocks compiled (dynamic), as any mix would
        adapter.packed_velocity(_calls(adapter, mix, seed=i), impl)
    graphs = compile_stats()["unique_graphs"]

    calls = _calls(adapter, MIX_3, seed=7)
    plain = adapter.packed_velocity(calls, impl)                      # compiled, no padding
    buckets = PackedBuckets(min_tokens=32, growth=1.25, align=16)
    padded = PaddedLayout(adapter, buckets.size, impl=impl)
    out = adapter.packed_velocity(calls, execution=padded)
    kinds = {k: (n, b) for k, n, b in padded.sizes}
    assert all(b > n for n, b in kinds.values()), f"the test should pad every dimension: {padded.sizes}"
    assert rel_diff(out, plain) <= REL_TOL
    # random values in the padding rows of the token, position and text inputs (a seeded generator, not the global
    # RNG: the module's snapshot checks it)
    noisy = adapter.packed_velocity(calls, execution=PaddedLayout(adapter, buckets.size, ("image", "image", "text"),
                                                                  impl=impl))
    for o, r in zip(noisy, out):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=0)
    assert compile_stats()["unique_graphs"] == graphs, "padded sizes recompiled"


def test_buckets_and_padding_layout():
    b = PackedBuckets()
    seq = sorted({b.tokens(n) for n in range(1, 20000, 7)})
    assert seq[:8] == [256, 320, 448, 576, 768, 960, 1216, 1536]
    assert all(x % 64 == 0 for x in seq) and all(y <= 1.25 * x + 64 for x, y in zip(seq, seq[1:]))
    assert [b.segments(n) for n in (1, 2, 3, 5, 9)] == [2, 2, 4, 8, 16]
    # two real segments (text 2 + image 3, text 1 + image 2), padding 1 text + 2 image tokens, 4 segments in all
    lay = PackedSegments.build([[2, 1], [3, 2]], [1, 2], 4, "cpu", "dense")
    assert lay.cu_seqlens.tolist() == [0, 5, 8, 11, 11]
    assert lay.segment_ids(0).tolist() == [0, 0, 1, 2] and lay.segment_ids(1).tolist() == [0, 0, 0, 1, 1, 2, 2]
    txt, img = torch.arange(4.0)[:, None], 10 + torch.arange(7.0)[:, None]
    joined = lay.gather(txt, img)
    assert joined[:, 0].tolist() == [0, 1, 10, 11, 12, 2, 13, 14, 3, 15, 16]
    assert [t.tolist() for t in lay.split(joined)] == [txt.tolist(), img.tolist()]
    # attention never crosses a segment: a query's output is a mix of its own segment's values only
    q = k = torch.randn(11, 1, 4, generator=torch.Generator().manual_seed(0))
    v = torch.arange(11.0)[:, None, None].expand(11, 1, 4)
    seg = lay.seg_ids
    o = lay.attend(q, k, v)[:, 0, 0]
    for s in range(3):
        rows = (seg == s).nonzero()[:, 0]
        assert bool(((o[rows] >= rows.min() - 1e-5) & (o[rows] <= rows.max() + 1e-5)).all())
    with pytest.raises(ValueError, match="padding segment"):
        PackedSegments.build([[2, 1], [3, 2]], [0, 0], 2, "cpu", "dense")


# ---- the serving engine -------------------------------------------------------------------------------------------
def test_engine_packs_calls_through_the_installed_runner(flux):
    from ralu_runtime.serving import Engine, EngineConfig

    pipe, refs = flux
    before = snapshot(pipe)  # here: the other tests of this file may draw from the global RNG (inductor compiles)
    adapter = get_adapter(pipe)
    runner = adapter.runner
    assert runner is not None and runner.options.backend == "inductor"
    packed_calls = []
    orig = runner.packed

    def counted(calls):
        packed_calls.append(len(calls))
        return orig(calls)

    runner.packed = counted  # an instance attribute on ralu's runner; removed below
    try:
        # every request is generate(..., backend="inductor"): it keeps the installed runner (same options)
        with Engine(pipe, EngineConfig(gather_timeout_s=2.0), output_type="latent", backend="inductor") as eng:
            handles = [eng.submit(seed=seed, **kw) for kw, seed in REQUESTS]
            outs = [h.result(timeout=600) for h in handles]
            m = eng.metrics()
    finally:
        del runner.packed
    assert adapter.runner is runner, "the engine replaced the installed runner"
    assert m["requests"]["ok"] == len(REQUESTS)
    assert m["packed_calls"] > 0 and packed_calls and max(packed_calls) == len(REQUESTS)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.images, ref, **TOL)
    assert_same(before, snapshot(pipe))


def test_eager_backend_packs_with_fused_projections_and_exported_backends_do_not():
    from ralu_runtime.compile import compile_adapter, uncompile_adapter
    from ralu_runtime.compile.impl import BackendImpl

    assert not BackendImpl(None).packed_calls  # what the runner builds for onnx / tensorrt
    pipe = build_tiny("tiny-flux")
    runner = compile_adapter(pipe, "eager", fused_qkv=True)
    try:
        assert runner.packs and runner.applied["fused_qkv"] and not runner.impl.compiles_blocks
        adapter = get_adapter(pipe)
        calls = _calls(adapter, MIX_2, seed=3)
        with torch.no_grad(), CountCalls(adapter) as count:
            out = runner.packed(calls)                     # the packed call with ralu's fused q/k/v weights
            ref = adapter.packed_velocity(calls)
        assert count.n == 0 and rel_diff(out, ref) <= REL_TOL
        assert runner.impl.fused_store.nbytes() > 0        # the packed blocks asked for them
        runner.impl.packed_calls = False                   # as for onnx / tensorrt: one runner call per request
        assert not runner.packs
        with torch.no_grad(), CountCalls(adapter) as count:
            out = runner.packed(calls)
        assert count.n == len(calls) and rel_diff(out, ref) <= REL_TOL
    finally:
        uncompile_adapter(pipe)


# ---- GPU ------------------------------------------------------------------------------------------------------------
@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_gpu_cuda_graphs_per_bucket(dtype):
    """Inductor + CUDA graphs on tiny FLUX: packed == eager packed, one capture per bucket (a new mix in a bucket
    already captured captures nothing and compiles nothing)."""
    from ralu_runtime.compile import compile_adapter, uncompile_adapter

    pipe = build_tiny("tiny-flux", device="cuda", dtype=dtype)
    adapter = get_adapter(pipe)
    runner = compile_adapter(pipe, "inductor")
    try:
        assert runner.cuda_graphs
        tol = REL_TOL if dtype == torch.float32 else 3e-2
        captures = []
        for i, mix in enumerate((MIX_1, MIX_2, MIX_3, MIX_1[:2])):
            calls = _calls(adapter, mix, seed=i, device="cuda", dtype=dtype)
            ref = adapter.packed_velocity(calls)
            out = runner.packed(calls)
            assert rel_diff(out, ref) <= tol, f"mix {i + 1}: {rel_diff(out, ref):.3g}"
            again = runner.packed(calls)  # replay
            assert rel_diff(again, out) == 0.0
            captures.append(sum(b.kind == "cuda_graph_packed" for b in runner.builds))
        graphs = compile_stats()["unique_graphs"]
        # MIX_1[:2] and another mix of the same buckets: no new capture, no compile
        calls = _calls(adapter, [((3, 4), 2, 3, 500.0, 2.0, 5), ((3, 4), 1, 0, 900.0, 3.0, 8)], seed=9,
                       device="cuda", dtype=dtype)
        out = runner.packed(calls)
        assert rel_diff(out, adapter.packed_velocity(calls)) <= tol
        assert sum(b.kind == "cuda_graph_packed" for b in runner.builds) == captures[-1]
        assert compile_stats()["unique_graphs"] == graphs
    finally:
        uncompile_adapter(pipe)
