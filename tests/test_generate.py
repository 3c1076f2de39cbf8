"""End to end on tiny random FLUX and SD3 pipelines: baseline equals diffusers, RALU runs and is deterministic."""
import numpy as np
import pytest
import torch

import ralu_runtime
from ralu_runtime import RaluSchedule, generate
from tiny_inputs import flux_embeds, sd3_embeds

SMALL = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)


@torch.no_grad()
def test_baseline_equals_diffusers_flux(flux_pipe):
    emb = flux_embeds(2)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    ref = flux_pipe(**emb, height=64, width=96, num_inference_steps=4, guidance_scale=3.5, generator=gens(),
                    output_type="latent").images
    ours = generate(flux_pipe, **emb, height=64, width=96, speedup=None, num_inference_steps=4, guidance_scale=3.5,
                    generator=gens(), output_type="latent", progress=False).images
    adapter = ralu_runtime.adapters.get_adapter(flux_pipe)
    torch.testing.assert_close(adapter.pack(ours), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_baseline_equals_diffusers_sd3(sd3_pipe):
    emb = sd3_embeds(1)
    ref = sd3_pipe(**emb, height=64, width=96, num_inference_steps=3, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = generate(sd3_pipe, **emb, height=64, width=96, speedup=None, num_inference_steps=3, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(3), output_type="latent", progress=False).images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@torch.no_grad()
def test_ralu_runs_batched_odd_aspect_finite_and_deterministic(family, flux_pipe, sd3_pipe):
    pipe, emb = (flux_pipe, flux_embeds(2)) if family == "flux" else (sd3_pipe, sd3_embeds(2))
    kw = dict(height=96, width=160, speedup=SMALL, output_type="np", return_masks=True, progress=False)
    a = generate(pipe, **emb, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw)
    b = generate(pipe, **emb, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw)
    assert a.images.shape == (2, 96, 160, 3)
    assert np.isfinite(a.images).all()
    np.testing.assert_array_equal(a.images, b.images)
    assert a.masks.shape == (2, 3, 5) and int(a.masks[0].sum()) == int(15 * 0.3)
    c = generate(pipe, **emb, generator=[torch.Generator().manual_seed(s) for s in (1, 3)], **kw)
    assert not np.array_equal(a.images[1], c.images[1])
    np.testing.assert_array_equal(a.images[0], c.images[0])


@pytest.mark.parametrize("family", ["flux", "sd3"])
@torch.no_grad()
def test_batch_of_two_equals_two_single_runs(family, flux_pipe, sd3_pipe):
    pipe, emb_fn = (flux_pipe, flux_embeds) if family == "flux" else (sd3_pipe, sd3_embeds)
    emb = emb_fn(2)
    kw = dict(height=64, width=96, speedup=SMALL, output_type="latent", progress=False)
    both = generate(pipe, **emb, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **kw).images
    for i, s in enumerate((5, 6)):
        single = {k: v[i : i + 1] for k, v in emb.items()}
        one = generate(pipe, **single, generator=torch.Generator().manual_seed(s), **kw).images
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_ralu_presets_at_768x1280(flux_pipe):
    out = generate(flux_pipe, **flux_embeds(1), height=768, width=1280, speedup="7x", seed=0,
                   output_type="latent", return_masks=True, progress=False)
    assert out.images.shape == (1, 16, 96, 160)
    assert torch.isfinite(out.images).all()
    assert out.masks.shape == (1, 24, 40) and int(out.masks.sum()) == int(24 * 40 * out.schedule.ratio)
    assert set(out.timings) >= {"text_encode", "stage1", "edges", "transition12", "stage2", "transition23", "stage3"}


@torch.no_grad()
def test_prompt_strings_and_num_images_per_prompt(flux_pipe):
    out = generate(flux_pipe, ["a cat", "a dog"], num_images_per_prompt=2, height=64, width=64, speedup=SMALL,
                   seed=1, output_type="pt", max_sequence_length=16, progress=False)
    assert out.images.shape == (4, 3, 64, 64)
    assert float(out.images.min()) >= 0 and float(out.images.max()) <= 1


def test_bad_inputs(flux_pipe):
    emb = flux_embeds(1)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        generate(flux_pipe, "x", **emb, height=64, width=64)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        generate(flux_pipe, height=64, width=64)
    with pytest.raises(ValueError, match="height=72"):
        generate(flux_pipe, **emb, height=72, width=64)
    with pytest.raises(ValueError, match="output_type"):
        generate(flux_pipe, **emb, height=64, width=64, output_type="jpeg")
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        generate(flux_pipe, **emb, height=64, width=64, speedup=None, num_inference_steps=0)
    with pytest.raises(ValueError, match="speedup=3"):
        generate(flux_pipe, **emb, height=64, width=64, speedup=3)
    with pytest.raises(ValueError, match="noise='gaussian'"):
        generate(flux_pipe, **emb, height=64, width=64, noise="gaussian")
    with pytest.raises(ValueError, match="unsupported model class"):
        generate(object(), **emb, height=64, width=64)


def test_cli_writes_png(tmp_path):
    from PIL import Image

    from ralu_runtime.cli import main

    out, mask = tmp_path / "img.png", tmp_path / "mask.png"
    assert main(["generate", "--height", "64", "--width", "96", "--out", str(out), "--mask-out", str(mask),
                 "--no-progress"]) == 0
    assert Image.open(out).size == (96, 64)
    assert Image.open(mask).size == (96, 64)


@torch.no_grad()
def test_flux_prompt_embeds_with_num_images_per_prompt(flux_pipe):
    """Cached FLUX embeddings of 2 prompts x 2 images per prompt: 4 images, prompt-major, each equal to a
    single run of its prompt with its own generator."""
    emb = flux_embeds(2)
    kw = dict(height=64, width=64, speedup=SMALL, output_type="latent", progress=False)
    seeds = (5, 6, 7, 8)
    out = generate(flux_pipe, **emb, num_images_per_prompt=2,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    assert out.shape[0] == 4
    for i, s in enumerate(seeds):
        one = {k: v[i // 2:i // 2 + 1] for k, v in emb.items()}
        single = generate(flux_pipe, **one, generator=torch.Generator().manual_seed(s), **kw).images
        torch.testing.assert_close(out[i:i + 1], single, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ prepare / run
def test_generate_is_run_of_prepare(flux_pipe):
    """The public split: prepare resolves the call without model work; run(plan) equals generate; the hooks see
    every model call and the final decode."""
    from ralu_runtime import CallPlan, prepare, run

    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1))
               for m in (flux_pipe.transformer.x_embedder, flux_pipe.vae.decoder)]
    kw = dict(height=64, width=96, speedup="7x", output_type="pt", progress=False, seed=3)
    try:
        plan = prepare(flux_pipe, **flux_embeds(2), num_images_per_prompt=1, **kw)
    finally:
        for h in handles:
            h.remove()
    assert isinstance(plan, CallPlan) and not calls
    assert (plan.height, plan.width, plan.batch, plan.steps, plan.num_frames) == (64, 96, 2, 28, None)
    assert plan.schedule.name == "flux/7x" and plan.guidance == 3.5 and plan.cache is None
    assert plan.backend is None and plan.parallel is None
    ref = generate(flux_pipe, **flux_embeds(2), **kw)
    seen = {"model": 0, "decode": 0}

    def model_call(adapter, velocity):
        def call(tokens, grid, timestep, cond):
            seen["model"] += 1
            return velocity(tokens, grid, timestep, cond)
        return call

    def final_decode(decode):
        def call(latents):
            seen["decode"] += 1
            return decode(latents)
        return call

    out = run(plan, model_call=model_call, final_decode=final_decode)
    assert torch.equal(out.images, ref.images)
    assert seen == {"model": sum(plan.schedule.steps), "decode": 1}
    with pytest.raises(TypeError, match="CallPlan"):
        run({"height": 64})
    with pytest.raises(TypeError, match="model_call"):
        run(plan, model_call=3)


def test_prepare_resolves_cache_and_backend(flux_pipe):
    from ralu_runtime import prepare
    from ralu_runtime.cache import TaylorSeerCache, set_cache

    kw = dict(height=64, width=64, progress=False)
    plan = prepare(flux_pipe, **flux_embeds(), cache="taylorseer:3", backend="eager",
                   compile_options={"attn_backend": "math"}, **kw)
    assert isinstance(plan.cache, TaylorSeerCache) and plan.cache.interval == 3
    assert plan.backend == "eager" and plan.compile.attn_backend == "math"
    from ralu_runtime.adapters import get_adapter

    assert get_adapter(flux_pipe).runner is None  # nothing installed by prepare
    with set_cache(flux_pipe, "taylorseer:2") as default:
        assert prepare(flux_pipe, **flux_embeds(), **kw).cache is default
        assert prepare(flux_pipe, **flux_embeds(), cache="none", **kw).cache is None


def test_generate_and_prepare_take_the_same_arguments():
    import inspect

    from ralu_runtime import prepare

    g, p = inspect.signature(generate).parameters, inspect.signature(prepare).parameters
    assert list(g) == list(p)
    assert all(g[n].default == p[n].default and g[n].kind == p[n].kind for n in g)


def test_noise_variant_with_the_baseline_is_refused():
    """noise='exact' shapes RALU's transition noise only: with speedup=None it was silently ignored (the CLI refuses
    --noise there); now a ValueError naming it, before any model call."""
    from ralu_runtime import prepare
    from ralu_runtime.tiny import build_tiny

    pipe = build_tiny("tiny-flux")
    kw = dict(height=64, width=64, seed=0, output_type="latent", progress=False)
    with pytest.raises(ValueError, match="noise='exact' applies to RALU runs"):
        prepare(pipe, **flux_embeds(), speedup=None, num_inference_steps=2, noise="exact", **kw)
    prepare(pipe, **flux_embeds(), speedup=None, num_inference_steps=2, noise="reference", **kw)
    prepare(pipe, **flux_embeds(), speedup="7x", noise="exact", **kw)
