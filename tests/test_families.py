"""What works for FLUX.1 works for every family: solvers, temporal caches, edge maps, odd aspect ratios, several
images per prompt, presets solved for the model's own shift, warm-up, fail-fast input checks; and the contract of
every built-in tiny model, images and video (the user's pipeline left as found, a batch equal to its single runs).
One tiny random pipeline per family (``ralu_runtime.tiny``); each family's own parity / position / compile tests
are in ``tests/test_<family>.py``."""
from __future__ import annotations

import importlib

import pytest
import torch

from ralu_runtime import generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.schedule import get_preset

# tiny model name -> (ralu_runtime.tiny module, classifier-free guidance by default)
FAMILIES = {"tiny-sd35": ("sd35", True), "tiny-flux2": ("flux2", False), "tiny-flux2-klein": ("flux2", False),
            "tiny-qwen-image": ("qwen_image", True), "tiny-z-image": ("z_image", True), "tiny-chroma": ("chroma", True)}
SIZE = dict(height=64, width=96)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, pipeline, generate keyword arguments with prompt embeddings) of one family."""
    from ralu_runtime.tiny import build_tiny

    module, cfg = FAMILIES[request.param]
    pipe = build_tiny(request.param, seed=0)
    emb = importlib.import_module(f"ralu_runtime.tiny.{module}").random_embeds(pipe, 1, 8, seed=1, cfg=cfg)
    return request.param, pipe, emb


def run(pipe, emb, **kw):
    args = dict(SIZE, speedup="default", seed=3, output_type="latent", progress=False)
    args.update(kw)
    return generate(pipe, **emb, **args)


@torch.no_grad()
def test_taylorseer_w1_equals_uncached_and_caches_skip_blocks(family):
    """The feature caches go through each adapter's block stack: TaylorSeer W=1 computes every step (bitwise the
    uncached run), W=2 skips some, first-block cache with a huge threshold caches all but each stage's first step."""
    _name, pipe, emb = family
    ref = run(pipe, emb)
    same = run(pipe, emb, cache="taylorseer:1")
    assert torch.equal(same.images, ref.images) and same.cache_stats["cached"] == 0
    skip = run(pipe, emb, cache="taylorseer:2", speedup=None, num_inference_steps=4)  # klein's stages are 1-2 steps
    assert skip.cache_stats["cached"] > 0 and torch.isfinite(skip.images).all()
    assert not torch.equal(skip.images, run(pipe, emb, speedup=None, num_inference_steps=4).images)
    fb = run(pipe, emb, cache="fbcache:1e9")
    assert all(s["pattern"] == "F" + "C" * (len(s["pattern"]) - 1) for s in fb.cache_stats["stages"])


@pytest.mark.parametrize("solver", ["ab2", "dpmpp2m"])
@torch.no_grad()
def test_multistep_solvers(family, solver):
    _name, pipe, emb = family
    ref = run(pipe, emb)
    out = run(pipe, emb, solver=solver)
    assert out.images.shape == ref.images.shape and torch.isfinite(out.images).all()
    assert not torch.equal(out.images, ref.images)
    assert torch.equal(run(pipe, emb, solver=solver).images, out.images)  # same seed, same latents


@torch.no_grad()
def test_edge_maps_odd_aspect_and_images_per_prompt(family):
    """A 1:2.5 image, two images per prompt (per-image generators), the reference implementation's grey edge map:
    the masks differ per image and each image equals its own single run."""
    _name, pipe, emb = family
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    kw = dict(height=64, width=160, return_masks=True, edge_map="clip")
    both = run(pipe, emb, num_images_per_prompt=2, generator=gens, seed=None, **kw)
    assert both.images.shape[0] == 2 and both.masks.shape == (2, 2, 5)
    for i, s in enumerate((5, 6)):
        one = run(pipe, emb, generator=torch.Generator().manual_seed(s), seed=None, **kw)
        torch.testing.assert_close(both.images[i:i + 1], one.images, atol=1e-5, rtol=1e-5)
        assert torch.equal(both.masks[i:i + 1], one.masks)


def test_presets_use_the_models_own_shift(family):
    """The preset generate runs is solved for the adapter's h_ori at the requested size (typed 3.0 for SD3)."""
    _name, pipe, emb = family
    adapter = get_adapter(pipe)
    out = run(pipe, emb, height=128, width=128)
    h = adapter.preset_base_shift(128, 128)
    assert out.schedule == get_preset(adapter.family, adapter.default_preset, h)
    if h is not None:
        assert out.schedule.base_shift == pytest.approx(h, abs=1e-4)
    else:
        assert adapter.family == "sd3" and out.schedule.base_shift == 3.0


def test_warmup_with_dummy_embeddings(family):
    """warmup's dummy-embedding run reports its stages and leaves the pipeline as found."""
    from ralu_runtime.warmup import warmup
    from helpers import assert_same, snapshot

    _name, pipe, _emb = family
    before = snapshot(pipe, extra={"transformer": pipe.transformer})
    report = warmup(pipe, **SIZE, runs=1, text_len=8)
    assert report["first_s"] > 0 and "stage1" in report["stages"]
    assert_same(before, snapshot(pipe, extra={"transformer": pipe.transformer}))


@pytest.mark.parametrize("bad,text", [
    (dict(height=80), "multiple of 32"),
    (dict(speedup="9x"), "9x"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan"),
    (dict(pooled_prompt_embeds=torch.zeros(1, 8)), "takes no pooled"),
])
def test_bad_input_fails_before_any_model_call(family, bad, text):
    name, pipe, emb = family
    if "pooled_prompt_embeds" in bad and name == "tiny-sd35":
        pytest.skip("SD3 takes a pooled embedding")
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    blocks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in pipe.transformer.modules()
              if isinstance(m, torch.nn.Linear)]
    try:
        with pytest.raises(ValueError, match=text):
            run(pipe, emb, **bad)
    finally:
        handle.remove()
        for h in blocks:
            h.remove()
    assert not calls


# ------------------------------------------------------------------------------ the contract of every family
# Every built-in tiny model, images and video: what each family must do through the public API alone. The family
# files (tests/test_<family>.py) keep what is specific to a family (parity with its pipeline, positions, experts).
EVERY = {"tiny-flux": ("flux", False), "tiny-sd3": ("sd3", True), **FAMILIES, "tiny-wan": ("wan", True),
         "tiny-wan22": ("wan", True), "tiny-hunyuan-video15": ("hunyuan_video15", True)}
VIDEO = {"tiny-wan", "tiny-wan22", "tiny-hunyuan-video15"}
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=list(EVERY))
def any_family(request):
    """(name, pipeline, random_embeds(batch, seed), size keyword arguments) of one tiny model."""
    from ralu_runtime.tiny import build_tiny

    module, cfg = EVERY[request.param]
    pipe = build_tiny(request.param, seed=0)
    embeds = importlib.import_module(f"ralu_runtime.tiny.{module}").random_embeds
    size = dict(SIZE, num_frames=9) if request.param in VIDEO else dict(SIZE)
    return request.param, pipe, lambda batch, seed: embeds(pipe, batch, 8, seed=seed, cfg=cfg), size


@torch.no_grad()
def test_contract_pipeline_left_as_found(any_family):
    """RALU (eager backend, fused q/k/v where the family fuses) and the baseline leave every module, parameter,
    hook, processor, the scheduler's config and the global RNG as they were."""
    from helpers import assert_same, snapshot

    _name, pipe, embeds, size = any_family
    emb = embeds(1, 1)
    before = snapshot(pipe)
    kw = dict(size, seed=3, output_type="latent", progress=False)
    fused = {"fused_qkv": True} if get_adapter(pipe).fuses_projections else {}
    generate(pipe, **emb, speedup="default", backend="eager", compile_options=fused, **kw)
    generate(pipe, **emb, speedup=None, num_inference_steps=2, **kw)
    assert_same(before, snapshot(pipe))


@torch.no_grad()
def test_contract_batch_of_two_equals_two_single_runs(any_family):
    """A batch of two with one generator per image equals the two single runs (the default preset)."""
    _name, pipe, embeds, size = any_family
    emb = embeds(2, 2)
    kw = dict(size, speedup="default", output_type="latent", progress=False)
    both = generate(pipe, **emb, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **kw).images
    for i, s in enumerate((5, 6)):
        single = {k: (v[i:i + 1] if v is not None else None) for k, v in emb.items()}
        one = generate(pipe, **single, generator=torch.Generator().manual_seed(s), **kw).images
        torch.testing.assert_close(both[i:i + 1], one, **TOL)


@torch.no_grad()
def test_contract_image_0_of_a_batch_with_one_seed_is_the_single_call(any_family):
    """One seed for a batch of two: image 0 equals the one-image call with that seed (latents within the batch's
    rounding, the same regions), as a diffusers pipeline's image 0 is; RALU's own draws do not depend on the batch
    size. The generator advances by the noise draws only: as far as the baseline's call moves it."""
    _name, pipe, embeds, size = any_family
    emb = embeds(1, 1)
    kw = dict(size, speedup="default", output_type="latent", progress=False, return_masks=True)
    g2, g1 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    two = generate(pipe, **emb, num_images_per_prompt=2, generator=g2, **kw)
    one = generate(pipe, **emb, generator=g1, **kw)
    torch.testing.assert_close(two.images[:1], one.images, **TOL)
    assert torch.equal(two.masks[:1], one.masks)
    g0 = torch.Generator().manual_seed(11)
    generate(pipe, **emb, generator=g0, **{**kw, "speedup": None, "num_inference_steps": 2, "return_masks": False})
    assert torch.equal(g1.get_state(), g0.get_state())


@torch.no_grad()
def test_contract_same_seed_same_result_whatever_ran_before(any_family):
    """Same seed, same image: on a pipeline that first ran other calls (another size and frame count, the baseline,
    no guidance, a feature cache, exact noise with latent regions, a batch of two with per-image generators) a call
    equals the same call on a freshly built pipeline, latents and regions bitwise; ``seed=s`` is
    ``generator=torch.Generator().manual_seed(s)``."""
    from ralu_runtime.tiny import build_tiny

    name, pipe, embeds, size = any_family
    emb = embeds(1, 1)
    kw = dict(size, speedup="default", output_type="latent", progress=False, return_masks=True)
    for extra in (dict(height=96, width=64, **({"num_frames": 5} if name in VIDEO else {})),
                  dict(speedup=None, num_inference_steps=2, return_masks=False), dict(guidance_scale=1.0),
                  dict(cache="fbcache:0.1"), dict(noise="exact", region_source="latent")):
        generate(pipe, **emb, **{**kw, **extra}, seed=1)
    generate(pipe, **embeds(2, 2), generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw)
    got = generate(pipe, **emb, seed=3, **kw)
    fresh = generate(build_tiny(name, seed=0), **emb, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got.images, fresh.images) and torch.equal(got.masks, fresh.masks)


@pytest.mark.slow
@torch.no_grad()
def test_contract_onnx_backend_equals_eager_or_is_refused_up_front(any_family):
    """``backend="onnx"`` (exported model calls run by onnxruntime on the CPU) equals the eager backend for every
    family that exports, RALU's default preset included; a family whose model call torch cannot export (Wan:
    ``DiTAdapter.onnx_refusal``) is refused by ``prepare``, before any work, naming the family."""
    pytest.importorskip("onnxruntime")
    from ralu_runtime import prepare

    name, pipe, embeds, size = any_family
    emb = embeds(1, 1)
    kw = dict(size, speedup="default", seed=3, output_type="latent", progress=False)
    adapter = get_adapter(pipe)
    if adapter.onnx_refusal is not None:
        runner = adapter.runner  # whatever an earlier test of this module's pipeline installed
        with pytest.raises(ValueError, match=f"backend='onnx' is not available for {adapter.family}"):
            prepare(pipe, **emb, **kw, backend="onnx")
        assert get_adapter(pipe).runner is runner  # nothing installed
        return
    ref = generate(pipe, **emb, **kw).images
    out = generate(pipe, **emb, **kw, backend="onnx").images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    from ralu_runtime.compile import uncompile_adapter

    uncompile_adapter(pipe)


@pytest.mark.parametrize("guidance", [0.0, 0.5, 1.0, 1.5, 4.0])
def test_contract_cfg_rule_is_the_pipelines(any_family, guidance):
    """adapter.runs_cfg (which encode_prompt, prepare's ignored-negative warning and the serving engine's token
    count all use) decides as the model's diffusers pipeline: its ``do_classifier_free_guidance`` property, the
    guider (HunyuanVideo 1.5), true CFG with a negative prompt (Qwen-Image), none (FLUX.1, FLUX.2 dev)."""
    name, pipe, _embeds, _size = any_family
    adapter = get_adapter(pipe)
    for negative in (False, True):
        if name == "tiny-hunyuan-video15":
            old = pipe.guider.guidance_scale
            pipe.guider.guidance_scale = guidance
            try:
                want = pipe.guider._is_cfg_enabled()
                got = adapter.runs_cfg(guidance, negative)
            finally:
                pipe.guider.guidance_scale = old
        elif name == "tiny-qwen-image":  # QwenImagePipeline: do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
            want, got = guidance > 1 and negative, adapter.runs_cfg(guidance, negative)
        elif hasattr(type(pipe), "do_classifier_free_guidance"):
            had = pipe.__dict__.get("_guidance_scale", None)
            pipe._guidance_scale = guidance
            try:
                want = bool(pipe.do_classifier_free_guidance)
            finally:
                if had is None:
                    del pipe._guidance_scale
                else:
                    pipe._guidance_scale = had
            got = adapter.runs_cfg(guidance, negative)
        else:
            want, got = False, adapter.runs_cfg(guidance, negative)
        assert got == want, (name, guidance, negative)


def test_a_negative_prompt_without_guidance_is_said_to_be_ignored(caplog):
    """A negative prompt changes nothing where the family runs no CFG at that scale (SD3 at guidance 1; Qwen-Image
    runs true CFG above 1 only): prepare says so instead of dropping it silently; where it counts, no warning."""
    from ralu_runtime import prepare
    from ralu_runtime.tiny import build_tiny
    from ralu_runtime.tiny.qwen_image import random_embeds as qwen_embeds
    from ralu_runtime.tiny.sd3 import random_embeds as sd3_embeds

    sd3, qwen = build_tiny("tiny-sd3", seed=0), build_tiny("tiny-qwen-image", seed=0)
    with caplog.at_level("WARNING", logger="ralu"):
        prepare(sd3, guidance_scale=1.0, **SIZE, **sd3_embeds(sd3, 1, 8, seed=1, cfg=True))
        prepare(sd3, guidance_scale=4.0, **SIZE, **sd3_embeds(sd3, 1, 8, seed=1, cfg=True))
        prepare(sd3, guidance_scale=1.0, **SIZE, **sd3_embeds(sd3, 1, 8, seed=1, cfg=False))
        prepare(qwen, guidance_scale=1.0, **SIZE, **qwen_embeds(qwen, 1, 8, seed=1, cfg=True))
        prepare(qwen, guidance_scale=4.0, **SIZE, **qwen_embeds(qwen, 1, 8, seed=1, cfg=True))
    lines = [r.getMessage() for r in caplog.records if r.name == "ralu"
             and "upsamples no region" not in r.getMessage()]  # (the tiny size's own warning)
    assert lines == [f"the negative prompt is ignored: at guidance_scale=1 {fam} runs no classifier-free guidance "
                     "(as its diffusers pipeline); raise guidance_scale to use it" for fam in ("sd3", "qwen-image")]


@torch.no_grad()
def test_contract_a_forward_ralu_would_bypass_is_refused(any_family):
    """A forward the user put on what ralu runs itself is refused before any model call, naming the module: one set
    on the transformer's instance, an accelerate hook of sequential offload, a block's class forward patched (SD3's one-request
    calls run each block as a module: its patched forward runs instead, as in diffusers). Removed again, the call
    runs and equals one before."""
    import types

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    name, pipe, embeds, size = any_family
    emb = embeds(1, 1)
    kw = dict(size, speedup="default", seed=2, output_type="latent", progress=False)
    want = generate(pipe, **emb, **kw).images
    tr = pipe.transformer
    calls = []

    def boom(self, *args, **kwargs):
        calls.append(type(self).__name__)
        raise AssertionError("the patched forward ran")

    tr.forward = types.MethodType(boom, tr)
    try:
        with pytest.raises(ValueError, match=r"^transformer runs a forward set on the instance; ralu runs"):
            generate(pipe, **emb, **kw)
    finally:
        del tr.forward
    add_hook_to_module(tr, AlignDevicesHook(execution_device="cpu"))  # what sequential offload puts on a model
    try:
        with pytest.raises(ValueError, match=r"^transformer runs an accelerate hook \(enable_sequential_cpu_off"):
            generate(pipe, **emb, **kw)
    finally:
        remove_hook_from_module(tr)  # leaves the transformer's own forward bound on the instance: not an override
    block_lists = [(k, c) for k, c in tr.named_children() if isinstance(c, torch.nn.ModuleList) and len(c)]
    kind, blocks = block_lists[0]
    cls = type(blocks[0])
    own = cls.forward
    passed = []

    def wrapped(self, *args, **kwargs):  # a pass-through patch, as a stacked acceleration might install
        passed.append(1)
        return own(self, *args, **kwargs)

    cls.forward = wrapped
    try:
        if get_adapter(pipe).runs_block_modules:
            assert torch.equal(generate(pipe, **emb, **kw).images, want) and passed
        else:
            with pytest.raises(ValueError, match=rf"^transformer\.{kind}\.0 runs {cls.__name__}\.forward from "):
                generate(pipe, **emb, **kw)
    finally:
        cls.forward = own
    assert not calls
    assert torch.equal(generate(pipe, **emb, **kw).images, want)


def _diffusers_caches():
    import diffusers.hooks as H

    step = dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                current_timestep_callback=lambda: 500)
    return {"PyramidAttentionBroadcast": lambda: H.PyramidAttentionBroadcastConfig(**step),
            "FasterCache": lambda: H.FasterCacheConfig(**step, attention_weight_callback=lambda _: 0.5,
                                                       is_guidance_distilled=True),
            "TaylorSeerCache": H.TaylorSeerCacheConfig, "TextKVCache": H.TextKVCacheConfig,
            "FirstBlockCache": lambda: H.FirstBlockCacheConfig(threshold=0.2)}


@pytest.mark.parametrize("config", ["PyramidAttentionBroadcast", "FasterCache", "TaylorSeerCache", "TextKVCache",
                                    "FirstBlockCache"])
@torch.no_grad()
def test_contract_diffusers_enable_cache_is_refused_up_front(any_family, config):
    """``transformer.enable_cache(...)`` puts stateful diffusers hooks on the transformer, its blocks or their
    attention modules, which ralu does not run through (was: PyramidAttentionBroadcast, FasterCache, TaylorSeerCache
    and TextKVCache silently ignored on FLUX.1 / FLUX.2 / Qwen-Image / Chroma / HunyuanVideo 1.5): refused before any
    model call, naming the hook; the pipeline left as found."""
    from helpers import assert_same, snapshot
    from ralu_runtime.tiny import build_tiny

    name, _pipe, embeds, size = any_family
    pipe = build_tiny(name, seed=0)
    if not hasattr(pipe.transformer, "enable_cache"):
        pytest.skip(f"{type(pipe.transformer).__name__} has no enable_cache")
    try:
        pipe.transformer.enable_cache(_diffusers_caches()[config]())
    except ValueError as e:  # diffusers' own refusal (a block class its cache does not know)
        pytest.skip(str(e))
    if not any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
               for m in pipe.transformer.modules()):
        pytest.skip("diffusers attached no hook to this model (a no-op in diffusers too)")
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=r"carries diffusers hooks .*disable_cache\(\)"):
        generate(pipe, **embeds(1, 1), **size, speedup="default", seed=2, output_type="latent", progress=False)
    assert_same(before, snapshot(pipe))


@torch.no_grad()
def test_contract_torch_compiled_transformer_is_refused_naming_torch_compile(any_family):
    """``pipe.transformer = torch.compile(pipe.transformer)`` (an OptimizedModule, whose compiled forward ralu would
    never run) is refused before any model call, naming torch.compile and ralu's own backend (was: "a forward set on
    the instance")."""
    name, pipe, embeds, size = any_family
    own = pipe.transformer
    pipe.transformer = torch.compile(own)
    try:
        with pytest.raises(ValueError, match=r"^transformer is a torch.compile'd module .*backend='inductor'"):
            generate(pipe, **embeds(1, 1), **size, speedup="default", seed=2, output_type="latent", progress=False)
    finally:
        pipe.transformer = own


@torch.no_grad()
def test_contract_numerically_neutral_diffusers_setups_run_and_match(any_family):
    """diffusers' ``set_attention_backend`` (native, _native_math) and leaf-level group offloading onto the CPU run
    under ralu with the result of the plain model (float rounding), the pipeline left as found; Wan's leaf-level
    offloading puts a hook on each block (its own parameters), which ralu reads directly: refused, naming the block."""
    from helpers import assert_same, diffusers_active_backend_restored, snapshot
    from ralu_runtime.tiny import build_tiny

    name, pipe, embeds, size = any_family
    emb = embeds(1, 1)
    kw = dict(size, speedup="default", seed=2, output_type="latent", progress=False)
    want = generate(pipe, **emb, **kw).images
    setups = {"native": lambda t: t.set_attention_backend("native"),
              "_native_math": lambda t: t.set_attention_backend("_native_math"),
              "leaf offload": lambda t: t.enable_group_offload(torch.device("cpu"), offload_type="leaf_level")}
    for what, setup in setups.items():
        other = build_tiny(name, seed=0)
        with diffusers_active_backend_restored():  # set_attention_backend() sets it for the whole process too
            setup(other.transformer)
        before = snapshot(other)
        if what == "leaf offload" and name in ("tiny-wan", "tiny-wan22"):
            with pytest.raises(ValueError, match=r"^transformer\.blocks\.0 carries diffusers' group offloading hooks "
                                                 r"\(group_offloading.*leaf-level on a block that holds parameters"):
                generate(other, **emb, **kw)
        else:
            torch.testing.assert_close(generate(other, **emb, **kw).images, want, rtol=1e-5, atol=1e-5, msg=what)
        assert_same(before, snapshot(other))


@torch.no_grad()
def test_contract_blocks_compiled_in_place_are_said_to_go_unused(any_family, caplog):
    """compile_repeated_blocks() (module.compile() on each block, no trace until called): ralu's call gives the
    plain result and warns once per adapter that the compiled blocks are never used, where ralu runs the blocks'
    layers itself (SD3 runs its blocks as modules: no warning, and it has no repeated blocks to compile)."""
    from ralu_runtime.tiny import build_tiny

    name, _pipe, embeds, size = any_family
    other = build_tiny(name, seed=0)
    tr = other.transformer
    if not getattr(tr, "_repeated_blocks", None):
        pytest.skip(f"{type(tr).__name__} declares no repeated blocks")
    kw = dict(size, speedup="default", seed=2, output_type="latent", progress=False)
    want = generate(other, **embeds(1, 1), **kw).images
    tr.compile_repeated_blocks()
    with caplog.at_level("WARNING", logger="ralu"):
        got = generate(other, **embeds(1, 1), **kw).images
        generate(other, **embeds(1, 1), **kw)
    said = [r.getMessage() for r in caplog.records if "compiled in place" in r.getMessage()]
    runs_blocks = get_adapter(other).runs_block_modules
    assert len(said) == (0 if runs_blocks else 1), said
    assert not said or "generate(backend='inductor')" in said[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
