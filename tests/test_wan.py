"""Wan 2.1 / 2.2 (WanPipeline) on tiny random video pipelines, CPU: parity with diffusers (one transformer and Wan
2.2's two experts), 3-D positions on the tall grid, RALU through generate, compile, pipeline left as found,
refusals, LoRA.

Every comparison is against diffusers' own pipeline, transformer or rotary module. Videos: 9 frames (3 latent
frames) at 64 x 96 pixels (8 x 12 latents, 4 x 6 tokens per frame).
"""
import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import Conditioning, TokenGrid, get_adapter
from ralu_runtime.layout import grid_positions
from ralu_runtime.tiny.wan import build_tiny_wan_pipeline, random_embeds
from helpers import assert_same, snapshot

TOL = dict(rtol=1e-5, atol=1e-5)
SMALL = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
H, W, NF, F = 64, 96, 9, 3          # pixels, frames; latent frames
KW = dict(height=H, width=W, num_frames=NF, output_type="latent")


@pytest.fixture(scope="module")
def pipes():
    return {"wan21": build_tiny_wan_pipeline(seed=0), "wan22": build_tiny_wan_pipeline(seed=0, two_experts=True)}


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _emb(pipe, b, cfg=True, seed=0, text_len=12):
    return random_embeds(pipe, b, text_len, seed=seed, cfg=cfg)


def _count_calls(pipe):
    """Forward-hook counters on each transformer's first block: ``{"transformer": n, "transformer_2": m}``."""
    calls = {}
    handles = []
    for name in ("transformer", "transformer_2"):
        tr = getattr(pipe, name)
        if tr is not None:
            calls[name] = 0

            def hook(*_a, name=name):
                calls[name] += 1

            handles.append(tr.blocks[0].register_forward_hook(hook))
    return calls, handles


# ------------------------------------------------------------------------------------------ parity with diffusers
@pytest.mark.parametrize("variant", ["wan21", "wan22"])
@torch.no_grad()
def test_baseline_equals_diffusers_with_embeddings(pipes, variant):
    """CFG with given negative embeddings (also of another length: two passes), batch of 2 with per-video
    generators, Wan 2.2's two experts with guidance_scale_2; and no CFG at guidance <= 1."""
    pipe = pipes[variant]
    adapter = get_adapter(pipe)
    emb = _emb(pipe, 2)
    extra = {}
    if variant == "wan22":
        adapter.guidance_scale_2 = 2.5
        extra = dict(guidance_scale_2=2.5)
    try:
        for neg_len in (12, 9):
            emb["negative_prompt_embeds"] = _emb(pipe, 2, seed=1, text_len=neg_len)["prompt_embeds"]
            ref = pipe(**emb, generator=_gens(11, 12), num_inference_steps=3, guidance_scale=4.0, **extra, **KW).frames
            calls, handles = _count_calls(pipe)
            ours = generate(pipe, **emb, generator=_gens(11, 12), speedup=None, num_inference_steps=3,
                            guidance_scale=4.0, progress=False, **KW).images
            for h in handles:
                h.remove()
            assert ours.shape == (2, 16, F, 8, 12)
            torch.testing.assert_close(ours, ref, **TOL)
            # shift 3, 3 steps: t = 1000, 750, 3; boundary 875 -> the high-noise expert once, the low-noise twice
            n = 1 if neg_len == 12 else 2  # one batched CFG pass per step, or two passes
            expect = {"transformer": 3 * n} if variant == "wan21" else {"transformer": n, "transformer_2": 2 * n}
            assert calls == expect
    finally:
        adapter.guidance_scale_2 = None
    ref = pipe(prompt_embeds=emb["prompt_embeds"], generator=_gens(1, 2), num_inference_steps=2, guidance_scale=1.0,
               **KW).frames
    ours = generate(pipe, prompt_embeds=emb["prompt_embeds"], generator=_gens(1, 2), speedup=None,
                    num_inference_steps=2, guidance_scale=1.0, progress=False, **KW).images
    torch.testing.assert_close(ours, ref, **TOL)


@torch.no_grad()
def test_text_prompts_and_decoded_video_equal_diffusers(pipes):
    """The pipeline's own UMT5 encoding (byte tokenizer, 512 padded tokens, "" or given negative prompt), the
    latents de-normalisation, the Wan VAE decode and the video postprocessing."""
    pipe = pipes["wan21"]
    kw = dict(KW, num_inference_steps=2, max_sequence_length=64)
    ref = pipe(prompt=["a cat", "two dogs"], negative_prompt="blurry", generator=_gens(1, 2), **kw).frames
    ours = generate(pipe, ["a cat", "two dogs"], negative_prompt="blurry", generator=_gens(1, 2), speedup=None,
                    progress=False, **kw).images
    torch.testing.assert_close(ours, ref, **TOL)
    kw.pop("max_sequence_length")  # the default: 512 padded tokens
    kw.update(output_type="np", num_frames=5)
    ref = pipe(prompt="a cat", generator=_gens(3), **kw).frames
    ours = generate(pipe, "a cat", generator=_gens(3), speedup=None, progress=False, **kw).images
    assert ours.shape == ref.shape == (1, 5, H, W, 3)
    # [0, 1] pixels: the batched CFG pass's ~1e-6 latent differences (6e-7 relative), amplified by the random VAE:
    # measured max 1.0e-4, mean 4e-7 (transformers 5.25). The bound is a quarter of one 8-bit level (1/255); a wrong
    # de-normalisation or postprocessing step differs by 1e-2 and more
    diff = abs(ours - ref)
    assert diff.max() < 1e-3 and diff.mean() < 1e-5


@torch.no_grad()
def test_expand_timesteps_variant_equals_diffusers():
    """Wan 2.2 TI2V's per-token timesteps (all equal in text-to-video) run as the scalar timestep."""
    pipe = build_tiny_wan_pipeline(seed=0, expand_timesteps=True, num_layers=1)
    emb = _emb(pipe, 1)
    ref = pipe(**emb, generator=_gens(5), num_inference_steps=2, **KW).frames
    ours = generate(pipe, **emb, generator=_gens(5), speedup=None, num_inference_steps=2, progress=False, **KW).images
    torch.testing.assert_close(ours, ref, **TOL)


def test_pack_noise_and_schedules_equal_the_pipeline(pipes):
    pipe = pipes["wan21"]
    adapter = get_adapter(pipe)
    noise = adapter.prepare_noise(2, H, W, _gens(7, 8), torch.float32, num_frames=NF)
    lat = pipe.prepare_latents(2, 16, H, W, NF, torch.float32, "cpu", _gens(7, 8))
    assert torch.equal(noise, lat) and noise.shape == (2, 16, F, 8, 12)
    tokens = adapter.pack(noise)
    assert tokens.shape == (2, F * 4 * 6, 64)
    assert torch.equal(adapter.unpack(tokens, 8, 12), noise)
    # token (frame 1, row 2, col 3) holds latent[:, :, 1, 4:6, 6:8] in (c, py, px) order
    assert torch.equal(tokens[:, 24 + 2 * 6 + 3], noise[:, :, 1, 4:6, 6:8].reshape(2, -1))
    # the model's Conv3d patch embedding reads the same layout: its weight flattened (C, 1, p, p) = a token
    conv = pipe.transformer.patch_embedding
    flat = torch.nn.functional.linear(tokens, conv.weight.flatten(1), conv.bias)
    torch.testing.assert_close(flat, conv(noise).flatten(2).transpose(1, 2), **TOL)
    # baseline schedule: the FlowMatchEuler scheduler's own; with the published UniPC, its timesteps and sigmas
    ts, sig = adapter.baseline_schedule(5, 72)
    pipe.scheduler.set_timesteps(5)
    assert torch.equal(ts, pipe.scheduler.timesteps) and torch.equal(sig, pipe.scheduler.sigmas)
    unipc = build_tiny_wan_pipeline(seed=0, scheduler="unipc", num_layers=1)
    ua = get_adapter(unipc)
    ts, sig = ua.baseline_schedule(5, 72)
    unipc.scheduler.set_timesteps(5)
    assert torch.equal(ts, unipc.scheduler.timesteps.float()) and torch.equal(sig, unipc.scheduler.sigmas)
    assert ua.preset_base_shift(480, 832) == 3.0 == adapter.preset_base_shift(480, 832)
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        adapter.prepare_noise(1, H, W, _gens(1), torch.float32, num_frames=8)
    # more latent frames than the RoPE table: refused by prepare (it was raised when the noise was drawn)
    from ralu_runtime import prepare

    cap = adapter.max_latent_frames()
    with pytest.raises(ValueError, match=f"gives {cap + 1} latent frames; the model's position tables cover {cap}"):
        prepare(adapter.pipe, "a fox", height=H, width=W, num_frames=1 + cap * 4)
    assert prepare(adapter.pipe, "a fox", height=H, width=W, num_frames=1 + (cap - 1) * 4).num_frames


def test_defaults(pipes):
    a21, a22 = get_adapter(pipes["wan21"]), get_adapter(pipes["wan22"])
    assert (a21.family, a21.default_steps, a21.default_guidance, a21.default_preset) == ("wan", 50, 5.0, "7x")
    assert (a21.is_video, a21.default_frames, a21.temporal_factor) == (True, 81, 4)
    assert a21.default_hw() == (480, 832)
    assert a21.supports_negative_prompt and not a21.takes_prompt_mask
    assert a21.embed_dims() == (32, None) and a21.coarse_block_px == 32 and a21.max_size() == 256 * 16
    assert a21.boundary_ratio is None and a22.boundary_ratio == 0.875
    assert [n for n, _ in a22.experts()] == ["transformer", "transformer_2"]


@torch.no_grad()
def test_edge_images_are_one_decoded_frame_per_latent_frame(pipes):
    adapter = get_adapter(pipes["wan21"])
    lat = torch.randn(1, 16, F, 4, 6, generator=torch.Generator().manual_seed(0))
    video = adapter.decode(lat)
    assert video.shape == (1, 3, 1 + 4 * (F - 1), 32, 48)
    tall = adapter.edge_images(lat, adapter.decode)
    assert tall.shape == (1, 3, F * 32, 48)
    for f in range(F):
        assert torch.equal(tall[:, :, 32 * f: 32 * (f + 1)], video[:, :, 4 * f])


# ------------------------------------------------------------------------------------------ positions
def _tall_grid(b, raster=False):
    return TokenGrid(grid_positions(F * 4, 6).expand(b, -1, -1).contiguous(), (F * 4, 6), None, raster=raster,
                     frames=F)


@pytest.mark.parametrize("expert", [0, 1])
@torch.no_grad()
def test_velocity_on_explicit_tall_grid_positions_equals_transformer(pipes, expert):
    """Integer positions of the tall grid through the explicit-position path (raster=False, per-token patch
    embedding, rotary tables from (frame, row, col)) equal the model's forward on the 5-D latent; at a timestep
    below the boundary Wan 2.2 runs transformer_2."""
    pipe = pipes["wan22"]
    adapter = get_adapter(pipe)
    g = torch.Generator().manual_seed(1)
    lat, text = torch.randn(2, 16, F, 8, 12, generator=g), torch.randn(2, 7, 32, generator=g)
    cond = adapter.encode_prompt(None, prompt_embeds=text, guidance_scale=1.0)
    t = 900.0 if expert == 0 else 500.0
    model = pipe.transformer if expert == 0 else pipe.transformer_2
    ref = model(hidden_states=lat, timestep=torch.tensor([t, t]), encoder_hidden_states=text, return_dict=False)[0]
    for raster in (False, True):
        ours = adapter.velocity(adapter.pack(lat), _tall_grid(2, raster), torch.tensor(t), cond)
        torch.testing.assert_close(adapter.unpack(ours, 8, 12), ref, **TOL)


def test_rotary_at_half_positions_is_the_formula_per_image(pipes):
    """Rotary tables at y + 0.5 / x + 0.5 equal cos / sin of position * 10000^(-2i/d) per axis (float64, pairs
    interleaved), per image, with the frame taken from the tall row; on the integer full grid they are the model's
    own WanRotaryPosEmbed table."""
    adapter = get_adapter(pipes["wan21"])
    rope = adapter.transformer.rope
    # tall grid of 3 frames x 2 rows (coarse units): rows 1.5 -> frame 0, y 1.5; 2.5 -> frame 1, y 0.5; 5.5 -> 2, 1.5
    pos = torch.tensor([[[1.5, 2.0], [2.5, 0.5], [5.5, 3.5]], [[0.0, 0.5], [4.0, 1.0], [3.5, 2.5]]])
    cos, sin = adapter.rotary(TokenGrid(pos, (6, 4), frames=3))
    assert cos.shape == (2, 3, 1, 16)
    expect = {(0, 0): (0, 1.5, 2.0), (0, 1): (1, 0.5, 0.5), (0, 2): (2, 1.5, 3.5),
              (1, 0): (0, 0.0, 0.5), (1, 1): (2, 0.0, 1.0), (1, 2): (1, 1.5, 2.5)}
    for (b, j), coords in expect.items():
        angles = torch.cat([c * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                            for c, d in zip(coords, (rope.t_dim, rope.h_dim, rope.w_dim))]).repeat_interleave(2)
        torch.testing.assert_close(cos[b, j, 0], angles.cos().float(), rtol=0, atol=1e-7)
        torch.testing.assert_close(sin[b, j, 0], angles.sin().float(), rtol=0, atol=1e-7)
    mcos, msin = rope(torch.zeros(1, 16, F, 8, 12))
    cos, sin = adapter.rotary(_tall_grid(2))
    assert torch.equal(cos, mcos.expand(2, -1, -1, -1)) and torch.equal(sin, msin.expand(2, -1, -1, -1))


@pytest.mark.parametrize("variant", ["wan21", "wan22"])
@torch.no_grad()
def test_per_image_positions_equal_separate_calls(pipes, variant):
    adapter = get_adapter(pipes[variant])
    g = torch.Generator().manual_seed(2)
    cond = adapter.encode_prompt(None, prompt_embeds=torch.randn(2, 6, 32, generator=g),
                                 negative_prompt_embeds=torch.randn(2, 6, 32, generator=g), guidance_scale=3.5)
    tokens = torch.randn(2, 10, 64, generator=g)
    pos = torch.floor(torch.rand(2, 10, 2, generator=g) * torch.tensor([6.0, 3.0]) * 2) / 2
    t = torch.tensor(500.0)
    both = adapter.velocity(tokens, TokenGrid(pos, (6, 3), frames=3), t, cond)
    for i in range(2):
        ci = Conditioning(1, {k: (v[i: i + 1] if torch.is_tensor(v) else v) for k, v in cond.data.items()})
        one = adapter.velocity(tokens[i: i + 1], TokenGrid(pos[i: i + 1], (6, 3), frames=3), t, ci)
        torch.testing.assert_close(both[i: i + 1], one, **TOL)
    # positions reach the model: other rows, or the same rows read as other frames
    assert (adapter.velocity(tokens, TokenGrid(pos + 0.5, (6, 3), frames=3), t, cond) - both).abs().max() > 1e-4
    assert (adapter.velocity(tokens, TokenGrid(pos, (6, 3), frames=1), t, cond) - both).abs().max() > 1e-4


@torch.no_grad()
def test_expert_choice_follows_the_timestep_and_can_be_fixed(pipes):
    adapter = get_adapter(pipes["wan22"])
    cond = adapter.encode_prompt(None, prompt_embeds=torch.zeros(1, 4, 32), guidance_scale=1.0)
    assert cond.data["boundary"] == 875.0
    assert [adapter.expert_index(torch.tensor(t), cond) for t in (1000.0, 875.0, 874.9, 0.0)] == [0, 0, 1, 1]
    fixed = adapter.specialize_call(torch.tensor(100.0), cond)
    assert fixed.data["expert"] == 1 and adapter.expert_index(torch.tensor(999.0), fixed) == 1
    one = get_adapter(pipes["wan21"])
    c1 = one.encode_prompt(None, prompt_embeds=torch.zeros(1, 4, 32), guidance_scale=1.0)
    assert one.specialize_call(torch.tensor(100.0), c1) is c1 and one.expert_index(torch.tensor(1.0), c1) == 0


# ------------------------------------------------------------------------------------------ RALU through generate
@pytest.mark.parametrize("variant,noises", [("wan21", ("reference", "exact")), ("wan22", ("exact",))])
@torch.no_grad()
def test_ralu_presets_run_deterministic_both_noise_variants(pipes, variant, noises):
    pipe = pipes[variant]
    emb = _emb(pipe, 1)
    kw = dict(KW, height=96, width=64, speedup="default", return_masks=True, progress=False)
    for noise in noises:
        a = generate(pipe, **emb, seed=4, noise=noise, **kw)
        assert a.images.shape == (1, 16, F, 12, 8)
        assert torch.isfinite(a.images).all()
        assert a.masks.shape == (1, F, 3, 2)
        b = generate(pipe, **emb, seed=4, noise=noise, **kw)
        assert torch.equal(a.images, b.images)
    assert a.schedule.name == "wan/7x"


@torch.no_grad()
def test_ralu_batch_of_two_equals_two_single_runs(pipes):
    """Wan 2.2 (both experts inside the RALU stages), CFG, per-video generators, regions per frame."""
    pipe = pipes["wan22"]
    emb = _emb(pipe, 2)
    kw = dict(KW, speedup=SMALL, progress=False, region_mode="frame")
    both = generate(pipe, **emb, generator=_gens(5, 6), **kw).images
    for i, s in enumerate((5, 6)):
        single = {k: v[i: i + 1] for k, v in emb.items()}
        one = generate(pipe, **single, generator=_gens(s)[0], **kw).images
        torch.testing.assert_close(both[i: i + 1], one, **TOL)


@torch.no_grad()
def test_feature_cache_is_reset_when_the_expert_changes(pipes):
    from ralu_runtime.cache import TaylorSeerCache

    pipe = pipes["wan22"]
    cache = TaylorSeerCache(interval=2, order=1)
    out = generate(pipe, **_emb(pipe, 1), seed=1, speedup=None, num_inference_steps=6, cache=cache, progress=False,
                   **KW)
    assert torch.isfinite(out.images).all()
    # 6 steps at shift 3: t = 1000, 923 (high noise), then 818, 667, 430, 3: the cache starts over at the switch
    # (first-order TaylorSeer: two full steps before it extrapolates)
    assert [s["pattern"] for s in out.cache_stats["stages"]] == ["FF", "FFCF"]


# ------------------------------------------------------------------------------------------ compile
@pytest.mark.slow
@torch.no_grad()
def test_inductor_matches_eager_without_new_graphs():
    """One compiled block graph (dynamic shapes) serves both experts, a second size and RALU's stages."""
    from ralu_runtime.compile import compile_stats, uncompile_adapter

    pipe = build_tiny_wan_pipeline(seed=0, two_experts=True, num_layers=1)
    emb = _emb(pipe, 1, cfg=False)
    base = dict(speedup=None, num_inference_steps=2, seed=1, output_type="latent", progress=False,
                guidance_scale=1.0, num_frames=5)
    ralu = dict(speedup=SMALL, seed=2, output_type="latent", progress=False, transition_impl="torch",
                guidance_scale=1.0, num_frames=5)
    refs = [generate(pipe, **emb, height=64, width=64, **base).images,
            generate(pipe, **emb, height=64, width=96, **ralu).images]
    try:
        out = generate(pipe, **emb, height=64, width=64, backend="inductor", **base).images
        torch.testing.assert_close(out, refs[0], atol=1e-4, rtol=1e-4)
        graphs = compile_stats()["unique_graphs"]
        out = generate(pipe, **emb, height=64, width=96, backend="inductor", **ralu).images
        torch.testing.assert_close(out, refs[1], atol=1e-4, rtol=1e-4)
        assert compile_stats()["unique_graphs"] == graphs, "a new token count, expert or RALU stage recompiled"
        assert get_adapter(pipe).runner.impl.compiled_blocks == ["wan_block"]
    finally:
        uncompile_adapter(pipe)


# ------------------------------------------------------------------------------------------ safety
@torch.no_grad()
def test_pipeline_left_as_found():
    pipe = build_tiny_wan_pipeline(seed=0, two_experts=True, num_layers=1)
    emb = _emb(pipe, 1)

    kw = dict(KW, num_frames=5)

    def plain():
        return pipe(**emb, num_inference_steps=3, generator=_gens(4)[0], **kw).frames

    before_plain, before = plain(), snapshot(pipe)
    get_adapter(pipe).guidance_scale_2 = 2.0
    generate(pipe, **emb, speedup=SMALL, seed=3, progress=False, **dict(kw, output_type="pt"))
    assert_same(before, snapshot(pipe))
    assert torch.equal(plain(), before_plain), "plain pipe() changed after generate"


def test_refusals_before_any_work():
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class MyProcessor(WanAttnProcessor):
        pass

    pipe = build_tiny_wan_pipeline(seed=0, two_experts=True, num_layers=1)
    calls = []
    for mod in (pipe.transformer.patch_embedding, pipe.transformer_2.patch_embedding, pipe.text_encoder):
        mod.register_forward_hook(lambda *a: calls.append(1))
    pipe.transformer_2.blocks[0].attn2.set_processor(MyProcessor())
    with pytest.raises(ValueError, match="transformer_2.blocks.0.attn2 has attention processor MyProcessor"):
        generate(pipe, "a cat", progress=False, **KW)
    pipe.transformer_2.set_attn_processor(WanAttnProcessor())
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer_2.blocks[0])
    registry.register_hook(ModelHook(), "my_state")
    with pytest.raises(ValueError, match="transformer_2.blocks.0 carries diffusers hooks \\(my_state"):
        generate(pipe, "a cat", progress=False, **KW)
    registry.remove_hook("my_state")
    for bad in (1e30, -1e6, float("nan")):   # 1e30 failed as non-finite latents after every stage; -1e6 ran
        get_adapter(pipe).guidance_scale_2 = bad
        with pytest.raises(ValueError, match=r"guidance_scale_2=.* is not allowed: need a number in \[0, 100\]"):
            generate(pipe, "a cat", progress=False, **KW)
    get_adapter(pipe).guidance_scale_2 = None
    pipe.register_to_config(boundary_ratio=None)
    get_adapter(pipe).guidance_scale_2 = 3.0
    with pytest.raises(ValueError, match="guidance_scale_2 is only supported"):
        generate(pipe, "a cat", progress=False, **KW)
    get_adapter(pipe).guidance_scale_2 = None
    pipe.register_to_config(boundary_ratio=0.875)
    pipe.transformer_2 = None
    with pytest.raises(ValueError, match="no transformer_2"):
        generate(pipe, "a cat", progress=False, **KW)
    assert not calls


def test_bad_inputs_are_refused(pipes):
    pipe = pipes["wan21"]
    emb = _emb(pipe, 1)
    with pytest.raises(ValueError, match="pooled"):
        generate(pipe, **emb, pooled_prompt_embeds=torch.zeros(1, 32), **KW)
    with pytest.raises(ValueError, match="text-token mask"):
        generate(pipe, **emb, prompt_embeds_mask=torch.ones(1, 12), **KW)
    with pytest.raises(ValueError, match="last dimension 16"):
        generate(pipe, prompt_embeds=torch.zeros(1, 4, 16), **KW)
    with pytest.raises(ValueError, match="multiple of 32"):
        generate(pipe, **emb, **dict(KW, height=48))
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        generate(pipe, **emb, **dict(KW, num_frames=8))


def _lora(transformer, rank=4, seed=7, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in transformer.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")):
            base = getattr(mod, "base_layer", mod)
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, base.in_features, generator=g) * scale
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(base.out_features, rank, generator=g) * scale
    return sd


@torch.no_grad()
def test_lora_loaded_after_generate_takes_effect():
    pytest.importorskip("peft")
    pipe = build_tiny_wan_pipeline(seed=0, num_layers=1)
    emb = _emb(pipe, 1)
    kw = dict(KW, speedup=SMALL, seed=3, progress=False)
    first = generate(pipe, **emb, **kw).images
    pipe.load_lora_weights(_lora(pipe.transformer), adapter_name="style")
    lora = generate(pipe, **emb, **kw).images
    assert (lora - first).abs().max() > 1e-3
    # and the plain pipeline with the LoRA equals ralu's baseline with it
    ref = pipe(**emb, generator=_gens(1)[0], num_inference_steps=2, **KW).frames
    ours = generate(pipe, **emb, seed=1, speedup=None, num_inference_steps=2, progress=False, **KW).images
    torch.testing.assert_close(ours, ref, **TOL)


@torch.no_grad()
def test_weight_copies_follow_both_experts():
    """ralu's fp8 copies of Wan 2.2's two experts follow in-place changes to either (the check before each call
    walks every module a model call runs, DiTAdapter.model_modules; it once walked ``pipe.transformer`` only)."""
    pipe, ref = (build_tiny_wan_pipeline(seed=0, two_experts=True) for _ in range(2))
    assert [id(m) for m in get_adapter(pipe).model_modules()] == [id(pipe.transformer), id(pipe.transformer_2)]
    emb = _emb(pipe, 1)
    kw = dict(KW, speedup=None, num_inference_steps=4, seed=3, progress=False, precision="fp8")
    first = generate(pipe, **emb, **kw).images
    assert torch.equal(generate(pipe, **emb, **kw).images, first)
    for name in ("transformer_2", "transformer"):
        for p in (pipe, ref):
            getattr(p, name).blocks[0].ffn.net[0].proj.weight.mul_(3.0)
        out = generate(pipe, **emb, **kw).images
        assert (out - first).abs().max() > 1e-3, name
        torch.testing.assert_close(out, generate(ref, **emb, **kw).images, **TOL)
        first = out
