"""SD3.5 Large and Medium (MMDiT-X) through ralu's SD3 adapter, on tiny random pipelines with the published block
kinds: q/k RMSNorm, dual-attention blocks (Medium), the published position-table ratios. Everything is compared
with diffusers' own StableDiffusion3Pipeline / SD3Transformer2DModel."""
import numpy as np
import pytest
import torch

from ralu_runtime import generate
from ralu_runtime.adapters import TokenGrid, get_adapter
from ralu_runtime.adapters.sd3 import SD3Adapter, SkipLayerGuidance
from ralu_runtime.compile import compile_stats, uncompile_adapter
from ralu_runtime.layout import grid_positions
from ralu_runtime.tiny.sd35 import build_sd35_pipeline, build_tiny_sd35_pipeline, random_embeds
from helpers import assert_same, snapshot

VARIANTS = ("large", "medium")
TEXT = 8  # text tokens of the random embeddings
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pipes():
    return {v: build_tiny_sd35_pipeline(seed=i, variant=v) for i, v in enumerate(VARIANTS)}


def _emb(pipe, b=1, seed=0, cfg=True):
    return random_embeds(pipe, b, TEXT, seed=seed, cfg=cfg)


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _mixed_grid(coarse_hw, parents, b=1):
    """A stage-2 token set on ``coarse_hw``: the other coarse tokens, then 4 children at +{0, .5}^2 for each of
    ``parents`` (coarse raster indices), children first reversed so the order is not raster."""
    coarse = grid_positions(*coarse_hw)
    keep = [i for i in range(coarse.shape[0]) if i not in parents]
    kids = [coarse[i] + torch.tensor(d) for i in parents for d in ((0, 0), (0, .5), (.5, 0), (.5, .5))]
    pos = torch.cat([torch.stack(kids).flip(0), coarse[keep]])
    mask = torch.zeros(pos.shape[0], dtype=torch.bool)
    mask[:len(kids)] = True
    return TokenGrid(pos.expand(b, -1, -1).contiguous(), coarse_hw, mask.expand(b, -1).contiguous())


# ---------------------------------------------------------------------------------------------- the models
def test_published_configs_and_tiny_block_kinds(pipes):
    """Full configs give the published sizes (diffusers' single-file loader tells SD3.5 Medium from SD3 by its
    384^2 = 147456-cell table, SD3.5 Large by its 192^2 one); the tiny models have the same block kinds; the CLI's
    tiny-sd35 is this adapter at its size limit."""
    sizes = {"large": (38, 2432, 192 ** 2, 0), "medium": (24, 1536, 384 ** 2, 13)}
    for v, (layers, hidden, cells, dual) in sizes.items():
        tr = build_sd35_pipeline("full", variant=v, device="meta", dtype=torch.bfloat16).transformer
        assert len(tr.transformer_blocks) == layers and tr.inner_dim == hidden
        assert tr.pos_embed.pos_embed.shape == (1, cells, hidden) and tr.config.qk_norm == "rms_norm"
        assert sum(getattr(b, "attn2", None) is not None for b in tr.transformer_blocks) == dual
        if v == "large":  # the model card's 8.1 B parameters
            assert sum(p.numel() for p in tr.parameters()) == pytest.approx(8.1e9, rel=0.01)
    for v, pipe in pipes.items():
        blocks = pipe.transformer.transformer_blocks
        dual = [False, False] if v == "large" else [True, True, False, False]
        assert [b.use_dual_attention for b in blocks] == dual
        assert all(type(b.attn.norm_q).__name__ == "RMSNorm" for b in blocks)
        adapter = get_adapter(pipe)
        assert isinstance(adapter, SD3Adapter) and adapter.family == "sd3"
        assert adapter.max_size() == {"large": 1536, "medium": 3072}[v]
    from ralu_runtime import cli

    if "tiny-sd35" in getattr(cli, "TINY_MODELS", {}):
        assert cli.TINY_MODELS["tiny-sd35"] == ("sd3", get_adapter(pipes["large"]).max_size())


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_baseline_equals_diffusers(pipes, variant):
    pipe = pipes[variant]
    emb = _emb(pipe, 2)
    kw = dict(height=64, width=96, num_inference_steps=3, guidance_scale=5.0, output_type="latent")
    ref = pipe(**emb, generator=_gens(3, 4), **kw).images
    ours = generate(pipe, **emb, speedup=None, generator=_gens(3, 4), progress=False, **kw).images
    torch.testing.assert_close(ours, ref, **TOL)
    # a text prompt through the tiny tokenizers and text encoders, negative prompt included
    kw.update(height=64, width=64, num_inference_steps=2)
    ref = pipe("a red fox", negative_prompt="blurry", generator=torch.Generator().manual_seed(5), **kw).images
    ours = generate(pipe, "a red fox", negative_prompt="blurry", speedup=None, seed=5, progress=False, **kw).images
    torch.testing.assert_close(ours, ref, **TOL)


# ---------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_explicit_positions_equal_the_models_forward(pipes, variant):
    """raster=False (per-token patch embedding, sin-cos formula at each token's position), tokens in a shuffled
    order: the model's own forward on the integer grid, token for token; with CFG as the pipeline combines it."""
    pipe = pipes[variant]
    adapter, tr = get_adapter(pipe), pipe.transformer
    hw = (3, 4)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, 12, adapter.token_channels, generator=g)
    perm = torch.randperm(12, generator=g)
    grid = TokenGrid(grid_positions(*hw)[perm][None], hw, None, raster=False)
    t = torch.tensor(613.0)
    latent = adapter.unpack(tokens, 6, 8)
    emb = _emb(pipe)
    for guidance in (1.0, 4.0):
        cond = adapter.encode_prompt(None, None, **emb, guidance_scale=guidance)
        n = cond.data["embeds"].shape[0]
        ref = tr(hidden_states=latent.expand(n, -1, -1, -1), encoder_hidden_states=cond.data["embeds"],
                 pooled_projections=cond.data["pooled"], timestep=t.expand(n), return_dict=False)[0]
        if n == 2:
            ref = ref[:1] + guidance * (ref[1:] - ref[:1])
        ours = adapter.velocity(tokens[:, perm], grid, t, cond)
        torch.testing.assert_close(ours, adapter.pack(ref)[:, perm], **TOL)
    # skip-layer guidance at a timestep in its window: + scale (v_text - v_skip), v_skip = forward(skip_layers=...)
    layers = (0,) if variant == "large" else (1, 2)
    adapter.skip_layer_guidance = SkipLayerGuidance(layers=layers, scale=2.0, stop=0.5)
    try:
        cond = adapter.encode_prompt(None, None, **emb, guidance_scale=4.0)
    finally:
        adapter.skip_layer_guidance = None
    t = torch.tensor(900.0)  # p = 1 - 0.9 / (3 - 2 * 0.9) = 0.25
    out = tr(hidden_states=latent.expand(2, -1, -1, -1), encoder_hidden_states=cond.data["embeds"],
             pooled_projections=cond.data["pooled"], timestep=t.expand(2), return_dict=False)[0]
    skip = tr(hidden_states=latent, encoder_hidden_states=cond.data["embeds"][1:], pooled_projections=cond.data[
        "pooled"][1:], timestep=t.expand(1), skip_layers=list(layers), return_dict=False)[0]
    ref = out[:1] + 4.0 * (out[1:] - out[:1]) + (out[1:] - skip) * 2.0
    torch.testing.assert_close(adapter.velocity(tokens[:, perm], grid, t, cond), adapter.pack(ref)[:, perm], **TOL)
    assert (skip - out[1:]).abs().max() > 1e-3


def _sincos_reference(rc: torch.Tensor, grid_hw, pe) -> torch.Tensor:
    """SD3's 2-D sin-cos embedding written out in float64 at real (row, col) positions ``(L, 2)`` of the centre crop
    of ``grid_hw``: first half from the column, second from the row; each half sin(p w) then cos(p w), w_i =
    10000^(-i / (D/4)); positions divided by pos_embed_max_size / base_size (3 for Large, 6 for Medium here)."""
    dim, m = pe.pos_embed.shape[-1], pe.pos_embed_max_size
    scale = m / pe.base_size
    top, left = (m - grid_hw[0]) // 2, (m - grid_hw[1]) // 2
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def half(p):
        a = p[:, None].double() * omega
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([half((rc[:, 1] + left) / scale), half((rc[:, 0] + top) / scale)], dim=1).float()


@pytest.mark.parametrize("variant", VARIANTS)
def test_fractional_positions_per_image_follow_the_formula(pipes, variant):
    pe = pipes[variant].transformer.pos_embed
    adapter = get_adapter(pipes[variant])
    assert pe.pos_embed_max_size / pe.base_size == {"large": 3, "medium": 6}[variant]  # the published ratios
    hw = (3, 5)
    pos = torch.stack([_mixed_grid(hw, [0, 7]).positions[0], _mixed_grid(hw, [3, 14]).positions[0]])
    emb = adapter.sincos_at(pos, hw)
    for i in range(2):
        torch.testing.assert_close(emb[i], _sincos_reference(pos[i], hw, pe), rtol=0, atol=1e-6)
    table = pe.cropped_pos_embed(hw[0] * pe.patch_size, hw[1] * pe.patch_size)[0]  # the model's own rows
    ints = grid_positions(*hw)
    torch.testing.assert_close(adapter.sincos_at(ints[None], hw)[0], table, rtol=0, atol=2e-6)
    half = adapter.sincos_at(torch.tensor([[[1.0, 1.0], [1.5, 1.0], [2.0, 1.0]]]), hw)[0]
    assert (half[1] - (half[0] + half[2]) / 2).abs().max() > 1e-3  # the formula, not a blend of table rows


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_per_image_positions_in_a_batch_equal_single_calls(pipes, variant):
    pipe = pipes[variant]
    adapter = get_adapter(pipe)
    emb = _emb(pipe, 2)
    g1, g2 = _mixed_grid((3, 4), [1, 6]), _mixed_grid((3, 4), [4, 11])
    grid = TokenGrid(torch.cat([g1.positions, g2.positions]), (3, 4), torch.cat([g1.fine_mask, g2.fine_mask]))
    tokens = torch.randn(2, g1.positions.shape[1], adapter.token_channels, generator=torch.Generator().manual_seed(2))
    t = torch.tensor(420.0)  # p = 0.81: inside the skip-layer window below, so its pass runs per image too
    adapter.skip_layer_guidance = SkipLayerGuidance(layers=(0,), stop=0.9)
    try:
        both = adapter.velocity(tokens, grid, t, adapter.encode_prompt(None, None, **emb, guidance_scale=4.0))
        conds = [adapter.encode_prompt(None, None, **{k: v[i:i + 1] for k, v in emb.items()}, guidance_scale=4.0)
                 for i in range(2)]
        singles = [adapter.velocity(tokens[i:i + 1], gi, t, conds[i]) for i, gi in enumerate((g1, g2))]
    finally:
        adapter.skip_layer_guidance = None
    torch.testing.assert_close(both, torch.cat(singles), **TOL)
    assert (both[0] - both[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- RALU
@pytest.mark.parametrize("variant,noise", [(v, n) for v in VARIANTS for n in ("reference", "exact")])
@torch.no_grad()
def test_ralu_generate_batch_and_determinism(pipes, variant, noise):
    """A batch of 2 with generators [g5, g6]: image 1 equals a single run with g6 (its own generator, whatever
    image 0 is); a single run repeated is bitwise the same."""
    pipe = pipes[variant]
    emb = _emb(pipe, 2)
    kw = dict(height=96, width=128, speedup="3x", noise=noise, output_type="latent", progress=False)
    both = generate(pipe, **emb, generator=_gens(5, 6), return_masks=True, **kw)
    assert both.images.shape == (2, 16, 12, 16) and torch.isfinite(both.images).all()
    assert both.masks.shape == (2, 3, 4) and both.schedule.steps == (4, 4, 6)
    second = {k: v[1:] for k, v in emb.items()}
    single = generate(pipe, **second, generator=_gens(6)[0], **kw).images
    torch.testing.assert_close(both.images[1:], single, **TOL)
    assert torch.equal(generate(pipe, **second, generator=_gens(6)[0], **kw).images, single)
    assert (both.images[0] - both.images[1]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- skip-layer guidance
def test_skip_layer_window_selects_diffusers_steps():
    """The timestep window selects the steps diffusers' step-index rule selects, on the scheduler's own
    timesteps, for the default (0.01, 0.2) at every step count below 100."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    slg = SkipLayerGuidance(layers=(7, 8, 9))
    for n in range(1, 100):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        sched.set_timesteps(n)
        ours = [i for i, t in enumerate(sched.timesteps) if slg.active(t, 3.0)]
        assert ours == [i for i in range(n) if n * slg.start < i < n * slg.stop], n
    with pytest.raises(ValueError, match="start"):
        SkipLayerGuidance(layers=(1,), start=0.3, stop=0.2)
    with pytest.raises(ValueError, match="layers"):
        SkipLayerGuidance(layers=())
    with pytest.raises(ValueError, match="layers"):
        SkipLayerGuidance(layers=(-1,))
    assert SkipLayerGuidance(layers=[9, 7, 8, 7]).layers == (7, 8, 9)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_skip_layer_guidance_equals_diffusers(pipes, variant):
    """5 steps, window (0.01, 0.5): diffusers' rule (5 * 0.01 < i < 5 * 0.5) and ralu's timestep window both cover
    steps 1 and 2; the result differs from plain CFG. Without CFG nothing changes (diffusers guides under CFG only)."""
    pipe = pipes[variant]
    adapter = get_adapter(pipe)
    emb = _emb(pipe, 2)
    layers = (0,) if variant == "large" else (1, 2)  # Medium: a dual-attention block and a plain one
    kw = dict(height=64, width=64, num_inference_steps=5, guidance_scale=4.5, output_type="latent")
    ref = pipe(**emb, generator=_gens(8, 9), skip_guidance_layers=list(layers), skip_layer_guidance_scale=2.5,
               skip_layer_guidance_stop=0.5, **kw).images
    plain = generate(pipe, **emb, speedup=None, generator=_gens(8, 9), progress=False, **kw).images
    no_cfg = dict(kw, guidance_scale=1.0)
    plain_no_cfg = generate(pipe, **emb, speedup=None, generator=_gens(8, 9), progress=False, **no_cfg).images
    adapter.skip_layer_guidance = {"layers": layers, "scale": 2.5, "stop": 0.5}
    try:
        ours = generate(pipe, **emb, speedup=None, generator=_gens(8, 9), progress=False, **kw).images
        ours_no_cfg = generate(pipe, **emb, speedup=None, generator=_gens(8, 9), progress=False, **no_cfg).images
    finally:
        adapter.skip_layer_guidance = None
    torch.testing.assert_close(ours, ref, **TOL)
    assert (ours - plain).abs().max() > 1e-3
    assert torch.equal(ours_no_cfg, plain_no_cfg)


@torch.no_grad()
def test_skip_layer_guidance_in_ralu(pipes):
    """RALU with skip-layer guidance (SD3.5 Medium's recommended layers' kind: dual-attention blocks): stage 1's
    early timesteps lie in the default window, so the result changes; deterministic per seed."""
    pipe = pipes["medium"]
    adapter = get_adapter(pipe)
    emb = _emb(pipe)
    kw = dict(height=64, width=96, speedup="3x", seed=1, output_type="latent", progress=False)
    plain = generate(pipe, **emb, **kw).images
    adapter.skip_layer_guidance = SkipLayerGuidance(layers=(0, 1))
    try:
        runs = [generate(pipe, **emb, **kw).images for _ in range(2)]
    finally:
        adapter.skip_layer_guidance = None
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])
    assert (runs[0] - plain).abs().max() > 1e-3


def test_skip_layer_guidance_is_checked_before_any_work(pipes):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = pipes["large"]
    adapter = get_adapter(pipe)
    calls = []
    handle = pipe.transformer.pos_embed.register_forward_pre_hook(lambda *a: calls.append(1))
    kw = dict(height=64, width=64, speedup=None, num_inference_steps=2, seed=0, progress=False)
    try:
        adapter.skip_layer_guidance = SkipLayerGuidance(layers=(1, 2))
        with pytest.raises(ValueError, match=r"layers \[2\] do not exist"):
            generate(pipe, **_emb(pipe), **kw)
        adapter.skip_layer_guidance = SkipLayerGuidance(layers=(1,))
        sched = pipe.scheduler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        try:
            with pytest.raises(ValueError, match="fixed shift"):
                generate(pipe, **_emb(pipe), **kw)
        finally:
            pipe.scheduler = sched
        with pytest.raises(TypeError, match="SkipLayerGuidance"):
            adapter.skip_layer_guidance = (7, 8, 9)
        pytest.importorskip("onnxruntime")
        with pytest.raises(NotImplementedError, match="traced or captured"):
            generate(pipe, **_emb(pipe), backend="onnx", **kw)
    finally:
        adapter.skip_layer_guidance = None
        handle.remove()
        uncompile_adapter(pipe)
    assert not calls


# ---------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
@torch.no_grad()
def test_inductor_matches_eager_without_recompiles():
    """SD3.5 Medium's three block kinds (dual attention, plain, last) compiled by inductor: one graph per kind (no
    graph of its own for block 0), then another resolution and a RALU run (coarse, mixed, fine token sets) add
    none; latents equal the eager ones."""
    pipe = build_tiny_sd35_pipeline(seed=3, variant="medium")
    emb = _emb(pipe)
    kw = dict(guidance_scale=5.0, output_type="latent", progress=False, seed=1)
    runs = [dict(height=64, width=64, speedup=None, num_inference_steps=2),
            dict(height=96, width=128, speedup=None, num_inference_steps=2), dict(height=96, width=128, speedup="3x")]
    refs = [generate(pipe, **emb, **r, **kw).images for r in runs]
    try:
        g0 = compile_stats()["unique_graphs"]
        out = generate(pipe, **emb, backend="inductor", **runs[0], **kw).images
        torch.testing.assert_close(out, refs[0], rtol=1e-4, atol=1e-4)
        g1 = compile_stats()["unique_graphs"]
        assert 0 < g1 - g0 <= 3
        for r, ref in zip(runs[1:], refs[1:]):
            torch.testing.assert_close(generate(pipe, **emb, backend="inductor", **r, **kw).images, ref, rtol=1e-4,
                                       atol=1e-4)
        assert compile_stats()["unique_graphs"] == g1, "a new token count or RALU stage recompiled"
    finally:
        uncompile_adapter(pipe)


@pytest.mark.slow
@torch.no_grad()
def test_skip_layer_guidance_compiled_adds_no_graphs_after_warmup(pipes):
    """The skip pass runs the same block functions (batch 1 here: specialised once); later calls at another size
    and RALU's stages add no graph. dynamo's eager backend: graph structure without inductor's CPU compile time."""
    pipe = pipes["large"]
    adapter = get_adapter(pipe)
    emb = _emb(pipe)
    opts = dict(backend="inductor", compile_options={"dynamo_backend": "eager"})
    kw = dict(guidance_scale=4.0, output_type="latent", progress=False, seed=2)
    adapter.skip_layer_guidance = SkipLayerGuidance(layers=(0,), stop=0.6)
    try:
        first = dict(height=64, width=64, speedup=None, num_inference_steps=4)
        ref = generate(pipe, **emb, **first, **kw).images
        torch.testing.assert_close(generate(pipe, **emb, **first, **opts, **kw).images, ref, rtol=1e-4, atol=1e-4)
        g = compile_stats()["unique_graphs"]
        later = dict(height=96, width=128, speedup="3x")
        out = generate(pipe, **emb, **later, **opts, **kw).images
        assert compile_stats()["unique_graphs"] == g
        uncompile_adapter(pipe)
        torch.testing.assert_close(out, generate(pipe, **emb, **later, **kw).images, rtol=1e-4, atol=1e-4)
    finally:
        adapter.skip_layer_guidance = None
        uncompile_adapter(pipe)


# ---------------------------------------------------------------------------------------------- safety
@torch.no_grad()
def test_pipeline_left_as_found(pipes):
    pipe = pipes["medium"]
    emb = _emb(pipe)
    adapter = get_adapter(pipe)

    def plain():
        return pipe(**emb, height=64, width=96, num_inference_steps=2, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(4), output_type="latent").images

    before_plain, before = plain(), snapshot(pipe)
    adapter.skip_layer_guidance = SkipLayerGuidance(layers=(1,), stop=0.6)
    try:
        generate(pipe, **emb, height=96, width=128, speedup="3x", seed=3, output_type="latent", progress=False)
    finally:
        adapter.skip_layer_guidance = None
    assert_same(before, snapshot(pipe))
    assert torch.equal(plain(), before_plain)


@torch.no_grad()
def test_unsupported_states_are_refused_and_custom_processors_run():
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.models.attention_processor import JointAttnProcessor2_0, SD3IPAdapterJointAttnProcessor2_0

    pipe = build_tiny_sd35_pipeline(seed=5, variant="large")  # hooks leave a registry behind: not the shared one
    tr = pipe.transformer
    kw = dict(height=64, width=64, speedup=None, num_inference_steps=2, seed=0, output_type="latent", progress=False)
    block = tr.transformer_blocks[0]
    registry = HookRegistry.check_if_exists_or_initialize(block)
    registry.register_hook(ModelHook(), "my_cache_state")
    try:
        with pytest.raises(ValueError, match="transformer_blocks.0 carries diffusers hooks"):
            generate(pipe, **_emb(pipe), **kw)
    finally:
        registry.remove_hook("my_cache_state")
    original = block.attn.processor
    block.attn.set_processor(SD3IPAdapterJointAttnProcessor2_0(32, 16, 16, 32))
    try:
        with pytest.raises(ValueError, match="IP-Adapter"):
            generate(pipe, **_emb(pipe), **kw)
    finally:
        block.attn.set_processor(original)

    calls = []

    class Counting(JointAttnProcessor2_0):
        def __call__(self, attn, *args, **kwargs):
            calls.append(1)
            return super().__call__(attn, *args, **kwargs)

    block.attn.set_processor(Counting())
    try:
        ours = generate(pipe, **_emb(pipe), guidance_scale=3.0, **kw).images
        n = len(calls)
        ref = pipe(**_emb(pipe), height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images
    finally:
        block.attn.set_processor(original)
    assert n == 2 and len(calls) == 4  # one batched (CFG) call per step, in ralu and in diffusers
    torch.testing.assert_close(ours, ref, **TOL)


@torch.no_grad()
def test_lora_loaded_after_generate_takes_effect_in_every_stage():
    pytest.importorskip("peft")
    from tiny_inputs import lora_state_dict

    pipe = build_tiny_sd35_pipeline(seed=4, variant="medium")
    emb = _emb(pipe)
    seen = []
    pipe.transformer.pos_embed.proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    kw = dict(height=64, width=96, speedup="3x", seed=2, output_type="latent", progress=False)
    before = generate(pipe, **emb, **kw).images
    assert 2 in seen and any(n > 2 for n in seen)  # raster stages: the batch (CFG); stage 2: one call per token
    pipe.load_lora_weights(lora_state_dict(pipe.transformer, 4, 7), adapter_name="style")
    after = generate(pipe, **emb, **kw).images
    assert (after - before).abs().max() > 1e-3
    ref = pipe(**emb, height=64, width=96, num_inference_steps=2, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(1), output_type="latent").images
    ours = generate(pipe, **emb, height=64, width=96, speedup=None, num_inference_steps=2, seed=1,
                    output_type="latent", progress=False).images
    torch.testing.assert_close(ours, ref, **TOL)
    assert np.isfinite(after.numpy()).all()
