"""Strict behaviour on every input (issue 22, library part): stateful VAEs never decode from two threads at once,
non-finite decodes raise, embeddings' dtype / device are cast or refused, one prompt rule for all families,
schedulers ralu cannot follow are refused or followed, the work of a call is bounded, ``ralu generate --out`` is
checked by opening the file. Tiny random models, CPU."""
import importlib

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.serving import Engine, EngineConfig
from ralu_runtime.tiny import build_tiny

A = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
B = RaluSchedule(steps=(1, 2, 1), ends=(0.4, 0.6, 1.0), shifts=(3.0, 2.0, 3.0), z=3.0, ratio=0.5)
# pixels in [0, 1]: the engine's batched decode and a lone one differ by float summation order (a loaded CI run saw
# 1.7e-4 on one pixel of 61440 in Wan's causal VAE); a broken decode (the wrong request's latents, mixed sizes in
# one cache) differs by far more than a quarter of a PNG level
TOL = dict(rtol=1e-3, atol=1e-3)

# the families whose VAE keeps state on its modules between calls (causal 3-D VAEs): tiny model, embeddings module,
# mixed sizes (pixels) and frames
STATEFUL = {
    "qwen-image": ("tiny-qwen-image", "qwen_image", [(128, 128), (128, 160), (96, 128)], {}),
    "wan": ("tiny-wan", "wan", [(64, 64), (64, 96), (96, 64)], {"num_frames": 5}),
    "hunyuan-video-1.5": ("tiny-hunyuan-video15", "hunyuan_video15", [(64, 64), (64, 96), (96, 64)],
                          {"num_frames": 5}),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(STATEFUL))
def test_engine_mixed_sizes_on_stateful_vaes_equal_generate_alone(family):
    """Issue 22 item 0: the engine's batched final decode and another request's preview decode used one causal VAE
    at the same time (Qwen-Image: 'Sizes of tensors must match' inside its feature cache)."""
    name, module, sizes, extra = STATEFUL[family]
    pipe = build_tiny(name)
    embeds = importlib.import_module(f"ralu_runtime.tiny.{module}").random_embeds
    reqs = []
    for i, ((h, w), speedup) in enumerate(zip(sizes + sizes[:1], (A, B, A, None))):
        kw = dict(height=h, width=w, speedup=speedup, **extra, **embeds(pipe, 1, 8, seed=i, cfg=True))
        if speedup is None:
            kw["num_inference_steps"] = 3
        reqs.append((kw, 20 + i))
    with Engine(pipe, EngineConfig(gather_timeout_s=0.01), output_type="pt") as eng:
        handles = [eng.submit(seed=seed, **kw) for kw, seed in reqs]
        outs = [h.result(timeout=600) for h in handles]
    for (kw, seed), out in zip(reqs, outs):
        ref = generate(pipe, seed=seed, output_type="pt", progress=False, **kw)
        torch.testing.assert_close(out.images, ref.images, **TOL)


# ------------------------------------------------------------------------------------------------ item 7
def _small(**kw):
    return dict(height=64, width=64, seed=1, progress=False, **kw)


@pytest.mark.parametrize("speedup,region_source,match", [
    (None, "decode", "decode of the final latents"),
    (A, "decode", "decode of the region-choice preview"),
    (A, "latent", "decode of the final latents"),
])
def test_non_finite_decode_raises_naming_the_decode(flux_pipe, speedup, region_source, match):
    """Issue 22 item 7: a NaN in the VAE decoder returned NaN images with no error."""
    from tiny_inputs import flux_embeds

    handle = flux_pipe.vae.decoder.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        kw = dict(num_inference_steps=2) if speedup is None else {}
        with pytest.raises(FloatingPointError, match=match):
            generate(flux_pipe, speedup=speedup, region_source=region_source, output_type="pt", **kw,
                     **_small(**flux_embeds(1)))
    finally:
        handle.remove()
    out = generate(flux_pipe, speedup=A, output_type="pt", **_small(**flux_embeds(1)))
    assert torch.isfinite(out.images).all()


# ------------------------------------------------------------------------------------------------ item 8
def test_lossless_dtype_cast_equals_the_model_dtype(sd3_pipe):
    """Issue 22 item 8: fp16 / bf16 embeddings on an fp32 pipeline failed inside the transformer."""
    from tiny_inputs import sd3_embeds

    emb = {k: v.to(torch.float16).to(torch.float32) for k, v in sd3_embeds(1).items()}  # exactly fp16 values
    ref = generate(sd3_pipe, speedup=A, output_type="latent", **_small(**emb))
    for dtype in (torch.float16, torch.bfloat16):
        low = {k: v.to(dtype) for k, v in emb.items()}
        if dtype == torch.bfloat16:
            ref = generate(sd3_pipe, speedup=A, output_type="latent",
                           **_small(**{k: v.float() for k, v in low.items()}))
        out = generate(sd3_pipe, speedup=A, output_type="latent", **_small(**low))
        assert torch.equal(out.images, ref.images)


@pytest.mark.parametrize("name", ["prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds"])
def test_lossy_dtype_is_refused_naming_the_argument(sd3_pipe, name):
    from tiny_inputs import sd3_embeds

    emb = sd3_embeds(1)
    emb[name] = emb[name].double()
    with pytest.raises(TypeError, match=f"{name} has dtype torch.float64 but the model runs in torch.float32"):
        generate(sd3_pipe, speedup=A, **_small(**emb))


def test_meta_embeddings_and_meta_pipeline_are_refused(sd3_pipe):
    from tiny_inputs import sd3_embeds

    from ralu_runtime.tiny import build_tiny_sd3_pipeline

    emb = sd3_embeds(1)
    emb["negative_prompt_embeds"] = torch.empty_like(emb["negative_prompt_embeds"], device="meta")
    with pytest.raises(ValueError, match="negative_prompt_embeds is on the meta device"):
        generate(sd3_pipe, speedup=A, **_small(**emb))
    meta = build_tiny_sd3_pipeline(device="meta")
    with pytest.raises(ValueError, match="transformer is on the meta device"):
        generate(meta, speedup=A, **_small(**sd3_embeds(1)))


# ------------------------------------------------------------------------------------------------ item 9
CFG_TINY = ["tiny-sd3", "tiny-chroma", "tiny-qwen-image", "tiny-z-image", "tiny-wan", "tiny-hunyuan-video15"]


def _cfg_pipe(name):
    pipe = build_tiny(name)
    extra = {"num_frames": 5} if name in ("tiny-wan", "tiny-hunyuan-video15") else {}
    return pipe, extra


@pytest.mark.parametrize("name", CFG_TINY)
def test_prompt_count_mismatch_refused_before_the_text_encoders(name):
    """Issue 22 item 9: 2 prompts with 3 negatives passed the checks (and the engine) and failed after encoding."""
    from ralu_runtime import prepare

    pipe, extra = _cfg_pipe(name)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in pipe.components.values()
             if isinstance(m, torch.nn.Module)]
    try:
        for neg in (["x", "y", "z"], ["x"], ("x", "y", "z")):
            with pytest.raises(ValueError, match=f"got {len(neg)} negative prompts for 2 prompts"):
                prepare(pipe, ["a", "b"], negative_prompt=neg, **_small(**extra))
        with pytest.raises(TypeError, match="negative_prompt=.* is not allowed"):
            prepare(pipe, ["a", "b"], negative_prompt=["x", 3], **_small(**extra))
        with pytest.raises(TypeError, match="prompt=.* is not allowed"):
            prepare(pipe, ("a", None), **_small(**extra))
        with Engine(pipe) as eng, pytest.raises(ValueError, match="got 3 negative prompts for 2 prompts"):
            eng.submit(["a", "b"], negative_prompt=["x", "y", "z"], height=64, width=64, **extra)
    finally:
        for h in hooks:
            h.remove()
    assert not calls, "a model ran before the prompt check"


@pytest.mark.slow
@pytest.mark.parametrize("name", CFG_TINY)
def test_tuple_prompts_and_one_negative_string_are_one_rule(name):
    """A tuple is a list; one negative prompt string is used for every prompt, in every family."""
    pipe, extra = _cfg_pipe(name)
    kw = dict(speedup=None, num_inference_steps=2, output_type="latent", **_small(**extra))
    ref = generate(pipe, ["a cat", "a dog"], negative_prompt=["blurry", "blurry"], **kw)
    out = generate(pipe, ("a cat", "a dog"), negative_prompt="blurry", **kw)
    assert torch.equal(out.images, ref.images)


# ------------------------------------------------------------------------------------------------ item 6
def _with_scheduler(pipe, sched):
    """The same pipeline's modules with another scheduler (a new pipeline object: the fixture stays as it is)."""
    return type(pipe)(**{**pipe.components, "scheduler": sched})


def _sd3_schedulers(sd3_pipe):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

    flow = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return {"heun": FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            "dpm": DPMSolverMultistepScheduler(**flow), "unipc": UniPCMultistepScheduler(**flow)}


@pytest.mark.parametrize("kind", ["heun", "dpm", "unipc"])
@torch.no_grad()
def test_baseline_follows_a_deterministic_scheduler_as_the_pipeline(sd3_pipe, kind):
    """Issue 22 item 6: speedup=None ran Euler on Heun's / DPM-Solver's / UniPC's sigmas (0.228 max diff on SD3)."""
    from tiny_inputs import sd3_embeds

    pipe = _with_scheduler(sd3_pipe, _sd3_schedulers(sd3_pipe)[kind])
    emb = sd3_embeds(1)
    ref = pipe(**emb, height=64, width=96, num_inference_steps=4, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = generate(pipe, **emb, height=64, width=96, speedup=None, num_inference_steps=4, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(3), output_type="latent", progress=False).images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_ralu_with_another_scheduler_says_which_solver_runs(sd3_pipe, caplog):
    from tiny_inputs import sd3_embeds

    pipe = _with_scheduler(sd3_pipe, _sd3_schedulers(sd3_pipe)["heun"])
    with caplog.at_level("WARNING", logger="ralu"):
        generate(pipe, speedup=A, solver="ab2", output_type="latent", **_small(**sd3_embeds(1)))
    assert "'ab2' solver" in caplog.text and "FlowMatchHeunDiscreteScheduler.step" in caplog.text
    with pytest.raises(ValueError, match="solver='ab2' is not allowed with speedup=None and the pipeline's "
                                         "FlowMatchHeunDiscreteScheduler"):
        generate(pipe, speedup=None, solver="ab2", **_small(**sd3_embeds(1)))


def test_a_scheduler_the_flux_pipeline_cannot_drive_is_refused_up_front(flux_pipe):
    """FluxPipeline passes custom sigmas, which FlowMatchHeun's set_timesteps does not take: diffusers' pipeline
    fails; ralu's baseline failed the same way after the text encoding, now prepare refuses it. A RALU preset runs
    (ralu's solver on its own schedule)."""
    from diffusers import FlowMatchHeunDiscreteScheduler
    from tiny_inputs import flux_embeds

    from ralu_runtime import prepare

    pipe = _with_scheduler(flux_pipe, FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    with pytest.raises(ValueError, match="does not support custom sigmas"):
        pipe(**flux_embeds(1), height=64, width=64, num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler cannot run the flux baseline schedule .*"
                                         "custom sigmas"):
        prepare(pipe, speedup=None, num_inference_steps=4, **_small(**flux_embeds(1)))
    prepare(pipe, speedup=A, **_small(**flux_embeds(1)))


def test_ralu_on_a_float64_model_is_refused_up_front():
    """The stage transitions take float32 / bfloat16 / float16 latents: a float64 pipeline with a RALU preset failed
    at the first transition (after two model calls); the baseline runs it."""
    from tiny_inputs import flux_embeds

    from ralu_runtime import prepare

    pipe = build_tiny("tiny-flux").to(torch.float64)
    emb = {k: v.double() for k, v in flux_embeds(1).items()}
    with pytest.raises(ValueError, match=r"speedup='4x': RALU's stage transitions run float32, bfloat16 or float16 "
                                         r"models; this one is torch.float64 \(speedup=None runs it"):
        prepare(pipe, speedup="4x", **_small(**emb))
    out = generate(pipe, speedup=None, num_inference_steps=2, output_type="latent", **_small(**emb)).images
    assert out.dtype == torch.float64


@pytest.mark.parametrize("speedup", [None, A])
def test_stochastic_and_non_flow_schedulers_are_refused(flux_pipe, speedup):
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    from tiny_inputs import flux_embeds

    from ralu_runtime import prepare

    cases = [(FlowMatchEulerDiscreteScheduler.from_config(flux_pipe.scheduler.config, stochastic_sampling=True),
              "FlowMatchEulerDiscreteScheduler is stochastic \\(stochastic_sampling=True\\)"),
             (EulerAncestralDiscreteScheduler(), "EulerAncestralDiscreteScheduler is stochastic"),
             (EulerDiscreteScheduler(), "EulerDiscreteScheduler is not a flow-matching scheduler")]
    for sched, match in cases:
        with pytest.raises(ValueError, match=match):
            prepare(_with_scheduler(flux_pipe, sched), speedup=speedup, **_small(**flux_embeds(1)))


@torch.no_grad()
def test_wan_baseline_follows_the_published_unipc():
    from ralu_runtime.tiny.wan import build_tiny_wan_pipeline, random_embeds

    pipe = build_tiny_wan_pipeline(seed=0, scheduler="unipc")
    emb = random_embeds(pipe, 1, 8, seed=1, cfg=True)
    kw = dict(height=64, width=64, num_frames=5, num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    ref = pipe(**emb, generator=torch.Generator().manual_seed(3), **kw).frames
    ours = generate(pipe, **emb, speedup=None, generator=torch.Generator().manual_seed(3), progress=False, **kw).images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ item 4
def _no_model_calls(pipe):
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in pipe.components.values()
             if isinstance(m, torch.nn.Module)]
    return calls, hooks


def test_work_is_bounded_before_any_work(flux_pipe):
    """Issue 22 item 4: 1000 images per prompt at 1024^2, 2 x 4096 images and n=10 at 4096^2 were all accepted."""
    from tiny_inputs import flux_embeds

    from ralu_runtime import prepare
    from ralu_runtime.limits import DEFAULT_MAX_IMAGES, Limits

    calls, hooks = _no_model_calls(flux_pipe)
    try:
        with pytest.raises(ValueError, match=f"makes 1000 images .* max_images={DEFAULT_MAX_IMAGES}"):
            prepare(flux_pipe, height=1024, width=1024, num_images_per_prompt=1000, **flux_embeds(1))
        with pytest.raises(ValueError, match="makes 8192 images"):
            prepare(flux_pipe, ["a", "b"], height=1024, width=1024, num_images_per_prompt=4096)
        with pytest.raises(ValueError, match="max_token_steps=16777216"):
            prepare(flux_pipe, height=4096, width=4096, speedup=None, num_images_per_prompt=10, **flux_embeds(1))
        with pytest.raises(ValueError, match="RALU steps \\(2, 3, 5\\)"):
            prepare(flux_pipe, height=4096, width=4096, speedup="7x", num_images_per_prompt=64, **flux_embeds(1))
        # raised for one call (a Limits or a dict), nothing runs in prepare
        plan = prepare(flux_pipe, height=1024, width=1024, num_images_per_prompt=1000, **flux_embeds(1),
                       limits=Limits(max_images=1000, max_token_steps=2**40))
        assert plan.batch == 1000
        with pytest.raises(ValueError, match="max_token_steps"):
            prepare(flux_pipe, height=1024, width=1024, num_images_per_prompt=1000, limits={"max_images": 1000},
                    **flux_embeds(1))
        with pytest.raises(ValueError, match="unknown field"):
            prepare(flux_pipe, limits={"images": 3}, **flux_embeds(1))
        with pytest.raises(ValueError, match="max_images=0 is not allowed"):
            Limits(max_images=0)
    finally:
        for h in hooks:
            h.remove()
    assert not calls


def test_process_wide_limits_and_the_engine_config(flux_pipe):
    from tiny_inputs import flux_embeds

    from ralu_runtime import limits, prepare

    old = limits.LIMITS
    try:
        limits.set_limits(max_images=2)
        with pytest.raises(ValueError, match="makes 3 images .* max_images=2"):
            prepare(flux_pipe, num_images_per_prompt=3, height=64, width=64, **flux_embeds(1))
        with Engine(flux_pipe, EngineConfig(max_images=4)) as eng:  # the engine's own bound wins
            assert eng.config.limits().max_images == 4
        limits.set_limits(max_images=old.max_images)
        with Engine(flux_pipe, EngineConfig(max_images=2, max_token_steps=10**6)) as eng:
            with pytest.raises(ValueError, match="makes 3 images"):
                eng.submit(num_images_per_prompt=3, height=64, width=64, **flux_embeds(1))
            with pytest.raises(ValueError, match="limits: belong to the engine"):
                eng.submit(limits={"max_images": 9}, height=64, width=64, **flux_embeds(1))
        with pytest.raises(ValueError, match="max_token_steps=-1 is not allowed"):
            EngineConfig(max_token_steps=-1)
    finally:
        limits.LIMITS = old


@pytest.mark.parametrize("n_requests", [1, 2])
def test_cancelled_request_stops_within_one_block(flux_pipe, n_requests):
    """Issue 22 item 4: a cancelled request finished its running model call (every block) before stopping."""
    from tiny_inputs import flux_embeds

    from ralu_runtime.serving import RequestCancelled

    handles, after = [], []

    def cancel(mod, args):
        if len(handles) == n_requests and not any(h._cancel for h in handles):
            for h in handles:
                h.cancel()

    def record(mod, args):
        if handles and all(h._cancel for h in handles):
            after.append(mod)

    hooks = [flux_pipe.transformer.transformer_blocks[0].register_forward_pre_hook(cancel)]
    hooks += [b.register_forward_pre_hook(record) for b in flux_pipe.transformer.single_transformer_blocks]
    try:
        with Engine(flux_pipe, EngineConfig(gather_timeout_s=0.2)) as eng:
            for i in range(n_requests):
                handles.append(eng.submit(height=64, width=64, speedup=A, seed=i, **flux_embeds(1)))
            for h in handles:
                with pytest.raises(RequestCancelled):
                    h.result(timeout=300)
    finally:
        for h in hooks:
            h.remove()
    assert not after, f"{len(after)} blocks ran after the cancellation"


# ------------------------------------------------------------------------------------------------ item 12
def test_out_path_is_checked_by_opening_it(tmp_path):
    """Issue 22 item 12: as root, --out /proc/x.png passed the check (os.access) and failed after the work."""
    from ralu_runtime.cli import UsageError, _check_output

    with pytest.raises(UsageError, match="--out '/proc/x.png' cannot be written"):
        _check_output("--out", "/proc/x.png")
    new = tmp_path / "new.png"
    assert _check_output("--out", str(new)) == str(new) and not new.exists()  # created and removed again
    old = tmp_path / "old.png"
    old.write_bytes(b"older image")
    assert _check_output("--out", str(old)) == str(old) and old.read_bytes() == b"older image"
