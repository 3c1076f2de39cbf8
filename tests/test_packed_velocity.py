"""Packed model calls (``DiTAdapter.packed_velocity``): FLUX.1 dev / schnell, SD3, SD3.5 Large / Medium.

Many requests' next model calls -- each at its own RALU stage (coarse raster grid, stage-2 mixed set with a fine
mask, fine raster grid), batch size, timestep, guidance and text length -- run as one transformer call over a packed
token sequence; every call's result must equal ``adapter.velocity`` of that call alone (fp32: max abs diff within
1e-5 of the output's scale). Also: one call, order independence, the user's model left as it was, the unpacked
fallbacks (hooks, feature cache, compiled impl, skip-layer guidance) and input checks.
"""
from __future__ import annotations

import pytest
import torch

from ralu_runtime.adapters import DiTAdapter, ModelImpl, TokenGrid, VelocityCall, call_scope
from ralu_runtime.layout import TokenLayout, grid_positions
from helpers import assert_same, snapshot
from mode_helpers import REL_TOL, CountCalls, rel_diff


FAMILIES = ("flux", "flux-schnell", "sd3", "sd35-large", "sd35-medium")


def _build(family: str, device="cpu", dtype=torch.float32):
    """A tiny random pipeline of ``family`` and its adapter (built directly: it holds its pipeline)."""
    from ralu_runtime.adapters.flux import FluxAdapter
    from ralu_runtime.adapters.sd3 import SD3Adapter
    from ralu_runtime.tiny import build_tiny
    from ralu_runtime.tiny.sd35 import build_tiny_sd35_pipeline

    kw = dict(seed=FAMILIES.index(family), device=device, dtype=dtype)
    if family == "flux":
        pipe = build_tiny("tiny-flux", **kw)
    elif family == "flux-schnell":
        pipe = build_tiny("tiny-flux", guidance_embeds=False, **kw)
    elif family == "sd3":
        pipe = build_tiny("tiny-sd3", **kw)
    else:
        pipe = build_tiny_sd35_pipeline(variant=family.split("-")[1], **kw)
    return (FluxAdapter if family.startswith("flux") else SD3Adapter)(pipe)


@pytest.fixture(scope="module")
def adapters():
    return {}


def _adapter(adapters, family):
    if family not in adapters:
        adapters[family] = _build(family)
    return adapters[family]


# ---- inputs -------------------------------------------------------------------------------------------------------
def _cond(adapter, b: int, text_len: int, guidance: float, g: torch.Generator, device="cpu", dtype=torch.float32):
    joint, pooled = adapter.embed_dims()
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    kw = {"prompt_embeds": r(b, text_len, joint), "pooled_prompt_embeds": r(b, pooled)}
    if adapter.supports_negative_prompt and guidance > 1:
        kw.update(negative_prompt_embeds=r(b, text_len, joint), negative_pooled_prompt_embeds=r(b, pooled))
    if adapter.supports_negative_prompt:
        return adapter.encode_prompt(None, None, **kw, guidance_scale=guidance)
    return adapter.encode_prompt(None, **kw, guidance_scale=guidance)


def _raster(hw, b: int, device="cpu") -> TokenGrid:
    return TokenGrid(grid_positions(*hw, device=device).expand(b, -1, -1).contiguous(), hw, None, raster=True)


def _stage2(coarse_hw, k: int, b: int, channels: int, g: torch.Generator, device="cpu"):
    """Stage-2 tokens and grid as the sampler makes them: k coarse tokens per image (different ones per image)
    replaced by their 4 children at +{0, 0.5}^2 (children first), through the transition 1 -> 2 (torch
    reference of the kernel); positions in coarse-grid units, fine mask."""
    from ralu_kernels.transition import stage_transition_reference

    m = coarse_hw[0] * coarse_hw[1]
    layout = TokenLayout(coarse_hw, torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(b)]))
    tmap = layout.transition_12()
    x1 = torch.randn(b, m, channels, generator=g)
    seeds = torch.randint(0, 2**62, (b,), generator=g)
    x2, pos = stage_transition_reference(x1, layout.stage1_positions(), tmap.src_index, tmap.group, tmap.child, seeds,
                                         a=0.9, b=0.3, c=0.02, pos_scale=tmap.pos_scale)
    assert bool((pos[:, :4 * k] % 1 == 0.5).any()) and bool((pos[:, 4 * k:] % 1 == 0).all())  # children at halves
    return x2.to(device), TokenGrid(pos.to(device), coarse_hw, layout.stage2_fine_mask().to(device))


def _calls(adapter, seed=0, device="cpu", dtype=torch.float32) -> list[VelocityCall]:
    """Four calls: coarse raster (B=1), stage-2 mixed (B=2), fine raster (B=2), another raster size (B=1); each with
    its own timestep, guidance and text length."""
    g = torch.Generator().manual_seed(seed)
    c = adapter.token_channels

    def raster(hw, b):
        return torch.randn(b, hw[0] * hw[1], c, generator=g).to(device), _raster(hw, b, device)

    specs = [  # (tokens, grid), timestep, guidance, text length
        (raster((3, 4), 1), 950.0, 4.0, 8),
        (_stage2((3, 4), 3, 2, c, g, device), 600.0, 1.0, 5),
        (raster((6, 8), 2), 200.0, 7.0, 11),
        (raster((4, 6), 1), 40.0, 2.5, 3),
    ]
    return [VelocityCall(tokens.to(dtype), grid, torch.tensor(t, device=device),
                         _cond(adapter, tokens.shape[0], text_len, guidance, g, device, dtype))
            for (tokens, grid), t, guidance, text_len in specs]


def _unpacked(adapter, calls, impl=None):
    return [adapter.velocity(c.tokens, c.grid, c.timestep, c.cond, impl) for c in calls]


# ---- equality -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_packed_equals_per_call_velocity(adapters, family):
    adapter = _adapter(adapters, family)
    assert adapter.packs
    calls = _calls(adapter)
    ref = _unpacked(adapter, calls)
    with CountCalls(adapter) as count:
        out = adapter.packed_velocity(calls)
    assert count.n == 0, "the packed path fell back to per-call velocity"
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert all(o.dtype == r.dtype for o, r in zip(out, ref))
    assert rel_diff(out, ref) <= REL_TOL, f"{family}: max abs diff / output scale = {rel_diff(out, ref):.3g}"
    # the calls are independent: a different neighbour does not change a call's result
    other = _calls(adapter, seed=1)
    again = adapter.packed_velocity([calls[0], other[1], other[2], calls[3]])
    torch.testing.assert_close(again[0], out[0], atol=REL_TOL, rtol=0)
    torch.testing.assert_close(again[3], out[3], atol=REL_TOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_single_call_and_order_independence(adapters, family):
    adapter = _adapter(adapters, family)
    calls = _calls(adapter, seed=2)
    ref = _unpacked(adapter, calls)
    for i in (0, 1):  # one call alone: raster and mixed grid
        (one,) = adapter.packed_velocity([calls[i]])
        assert rel_diff([one], [ref[i]]) <= REL_TOL
    perm = [2, 0, 3, 1]
    out = adapter.packed_velocity(calls)
    permuted = adapter.packed_velocity([calls[i] for i in perm])
    for j, i in enumerate(perm):
        torch.testing.assert_close(permuted[j], out[i], atol=REL_TOL, rtol=0)


@pytest.mark.parametrize("family", ["flux", "sd35-medium"])
def test_packed_call_backpropagates_like_the_unpacked_one(adapters, family):
    adapter = _adapter(adapters, family)
    calls = _calls(adapter, seed=3)[:2]
    grads = []
    for run in ("packed", "unpacked"):
        toks = [c.tokens.clone().requires_grad_(True) for c in calls]
        cs = [VelocityCall(t, c.grid, c.timestep, c.cond) for t, c in zip(toks, calls)]
        out = adapter.packed_velocity(cs) if run == "packed" else _unpacked(adapter, cs)
        sum((o ** 2).sum() for o in out).backward()
        grads.append([t.grad for t in toks])
    assert rel_diff(grads[0], grads[1]) <= 1e-4


# ---- the user's model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd35-medium"])
@torch.no_grad()
def test_packed_call_leaves_the_model_unchanged(adapters, family):
    adapter = _adapter(adapters, family)
    before = snapshot(adapter.pipe)
    adapter.packed_velocity(_calls(adapter, seed=4))
    assert_same(before, snapshot(adapter.pipe))


# ---- fallbacks ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
@torch.no_grad()
def test_forward_hook_on_a_block_falls_back_to_per_call_velocity(adapters, family):
    adapter = _adapter(adapters, family)
    calls = _calls(adapter, seed=5)[:3]
    ref = _unpacked(adapter, calls)
    seen = []
    handle = adapter.transformer.transformer_blocks[0].register_forward_hook(lambda m, a, o: seen.append(1))
    try:
        with CountCalls(adapter) as count:
            out = adapter.packed_velocity(calls)
    finally:
        handle.remove()
    assert count.n == 3 and len(seen) == 3  # one unpacked call each, and the hook ran in every one
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=0, rtol=0)
    with CountCalls(adapter) as count:  # hook removed: packed again
        adapter.packed_velocity(calls)
    assert count.n == 0


@torch.no_grad()
def test_hook_on_a_decomposed_norm_falls_back(adapters):
    adapter = _adapter(adapters, "flux")
    calls = _calls(adapter, seed=6)[:2]
    seen = []
    handle = adapter.transformer.single_transformer_blocks[0].norm.register_forward_pre_hook(
        lambda m, a: seen.append(1))
    try:
        with CountCalls(adapter) as count:
            adapter.packed_velocity(calls)
    finally:
        handle.remove()
    assert count.n == 2 and len(seen) == 2


@pytest.mark.parametrize("family", ["flux", "sd3"])
@torch.no_grad()
def test_feature_cache_and_compiled_impl_fall_back(adapters, family):
    adapter = _adapter(adapters, family)
    calls = _calls(adapter, seed=7)[:2]
    ref = _unpacked(adapter, calls)
    used = []

    def cache(blocks_fn, hidden, timestep):  # a pass-through feature cache
        used.append(1)
        return blocks_fn()

    with call_scope(cache), CountCalls(adapter) as count:
        out = adapter.packed_velocity(calls)
    assert count.n == 2 and len(used) >= 2
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=0, rtol=0)

    class Impl(ModelImpl):
        pass

    with CountCalls(adapter) as count:
        out = adapter.packed_velocity(calls, Impl())
    assert count.n == 2
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=0, rtol=0)


@torch.no_grad()
def test_sd3_custom_processor_falls_back(adapters):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    adapter = _adapter(adapters, "sd3")
    calls = _calls(adapter, seed=8)[:2]
    attn = adapter.transformer.transformer_blocks[0].attn

    class MyJointProcessor(JointAttnProcessor2_0):
        pass

    attn.set_processor(MyJointProcessor())
    try:
        with CountCalls(adapter) as count:
            adapter.packed_velocity(calls)
        assert count.n == 2
    finally:
        attn.set_processor(JointAttnProcessor2_0())
    with CountCalls(adapter) as count:
        adapter.packed_velocity(calls)
    assert count.n == 0


@torch.no_grad()
def test_sd35_skip_layer_guidance_call_in_its_window_runs_unpacked(adapters):
    from ralu_runtime.adapters.sd3 import SkipLayerGuidance

    adapter = _build("sd35-medium")  # its own adapter: the setting belongs to the adapter object
    adapter.skip_layer_guidance = SkipLayerGuidance(layers=(1, 2), scale=2.8, start=0.01, stop=0.2)
    calls = _calls(adapter, seed=9)
    slg = calls[0].cond.data["slg"]
    assert slg is not None and slg.active(calls[0].timestep, calls[0].cond.data["slg_shift"])  # t = 950: inside
    assert calls[1].cond.data["slg"] is None                                                      # no CFG: none
    assert not slg.active(calls[2].timestep, calls[2].cond.data["slg_shift"])                     # t = 200: outside
    ref = _unpacked(adapter, calls)
    with CountCalls(adapter) as count:
        out = adapter.packed_velocity(calls)
    assert count.n == 1  # only the call inside its window
    assert rel_diff(out, ref) <= REL_TOL


# ---- interface and input checks -------------------------------------------------------------------------------------
def test_interface_flags_and_default_loop(adapters):
    from ralu_runtime.adapters import flux, sd3

    assert DiTAdapter.packs is False and flux.FluxAdapter.packs and sd3.SD3Adapter.packs
    adapter = _adapter(adapters, "flux")
    calls = _calls(adapter, seed=10)[:2]
    with torch.no_grad(), CountCalls(adapter) as count:
        out = DiTAdapter.packed_velocity(adapter, calls)  # the base class: one velocity per call
    assert count.n == 2 and len(out) == 2


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bad_input_is_refused_before_any_work(adapters, family):
    adapter = _adapter(adapters, family)
    calls = _calls(adapter, seed=11)[:2]
    c0, c1 = calls

    def swap(c, **kw):
        return VelocityCall(**{**vars(c), **kw})

    with pytest.raises(ValueError, match="at least one VelocityCall"):
        adapter.packed_velocity([])
    with pytest.raises(TypeError, match="single VelocityCall"):
        adapter.packed_velocity(c0)
    with pytest.raises(TypeError, match="not a VelocityCall"):
        adapter.packed_velocity([c0, (c1.tokens, c1.grid, c1.timestep, c1.cond)])
    with pytest.raises(ValueError, match="one dtype"):
        adapter.packed_velocity([c0, swap(c1, tokens=c1.tokens.double())])
    with pytest.raises(ValueError, match="one device"):
        adapter.packed_velocity([c0, swap(c1, tokens=torch.empty(c1.tokens.shape, device="meta"))])
    with pytest.raises(ValueError, match="timestep is on meta"):
        adapter.packed_velocity([c0, swap(c1, timestep=torch.tensor(5.0, device="meta"))])
    with pytest.raises(ValueError, match="0-dim"):
        adapter.packed_velocity([swap(c0, timestep=torch.tensor([1.0, 2.0]))])
    with pytest.raises(ValueError, match="cond.batch"):
        adapter.packed_velocity([swap(c0, cond=c1.cond)])  # batch 2 for tokens of batch 1
    with pytest.raises(ValueError, match="positions"):
        adapter.packed_velocity([swap(c0, grid=c1.grid)])
    with pytest.raises(ValueError, match=r"\(B, L, C_tok\)"):
        adapter.packed_velocity([swap(c0, tokens=c0.tokens[0])])


def test_flux_guidance_must_match_the_model(adapters):
    dev, schnell = _adapter(adapters, "flux"), _adapter(adapters, "flux-schnell")
    call = _calls(schnell, seed=12)[0]  # a schnell conditioning: no guidance
    with pytest.raises(ValueError, match="guidance_embeds=True"):
        dev.packed_velocity([call])


# ---- GPU ------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flux", "sd35-medium"])
@torch.no_grad()
def test_gpu_packed_equals_per_call_velocity(family):
    from ralu_kernels.attention import available_backends

    fp32 = _build(family, device="cuda")
    calls = _calls(fp32, device="cuda")
    ref = _unpacked(fp32, calls)
    assert rel_diff(fp32.packed_velocity(calls), ref) <= REL_TOL  # fp32: the sdpa path
    bf16 = _build(family, device="cuda", dtype=torch.bfloat16)
    calls = _calls(bf16, device="cuda", dtype=torch.bfloat16)
    ref = _unpacked(bf16, calls)
    for backend in ["auto", *available_backends("cuda", torch.bfloat16)]:
        bf16.packed_attention_backend = backend
        diff = rel_diff(bf16.packed_velocity(calls), ref)
        assert diff <= 3e-2, f"{family} bf16 backend={backend}: max abs diff / scale {diff:.3g}"
