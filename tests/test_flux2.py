"""FLUX.2 (Flux2Pipeline, Flux2KleinPipeline) on tiny random pipelines, CPU: parity with diffusers, per-image
positions, RALU through generate, compile, pipeline left as found, refusals, LoRA.

Every comparison is against diffusers' own pipeline or transformer. Flux2Pipeline(output_type="latent") returns the
packed normalised tokens (compared with ``adapter.pack``); Flux2KleinPipeline returns de-normalised unpacked VAE
latents (compared with ``adapter.denormalize``).
"""
import math

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import Conditioning, TokenGrid, get_adapter
from ralu_runtime.layout import grid_positions
from ralu_runtime.tiny.flux2 import build_tiny_flux2_pipeline, random_embeds

TOL = dict(rtol=1e-5, atol=1e-5)
VARIANTS = {"dev": {}, "klein": {"klein": True, "distilled": True}, "klein-base": {"klein": True}}
SMALL = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)


@pytest.fixture(scope="module")
def pipes():
    return {name: build_tiny_flux2_pipeline(seed=0, **kw) for name, kw in VARIANTS.items()}


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _pipe_latents(adapter, out):
    """Our latents ``(B, C, h, w)`` in the form the diffusers pipeline returns for output_type="latent"."""
    return adapter.denormalize(out) if adapter.klein else adapter.pack(out)


def _emb(pipe, b, cfg=False, seed=0):
    return random_embeds(pipe, b, 12, seed=seed, cfg=cfg)


# ------------------------------------------------------------------------------------------ parity with diffusers
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_baseline_equals_diffusers_with_embeddings(pipes, variant):
    pipe = pipes[variant]
    adapter = get_adapter(pipe)
    emb = _emb(pipe, 2)
    kw = dict(height=64, width=96, num_inference_steps=3, guidance_scale=2.5, output_type="latent")
    ref = pipe(**emb, generator=_gens(11, 12), **kw).images
    ours = generate(pipe, **emb, generator=_gens(11, 12), speedup=None, progress=False, **kw).images
    assert ours.shape == (2, 32, 8, 12)
    torch.testing.assert_close(_pipe_latents(adapter, ours), ref, **TOL)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_baseline_equals_diffusers_with_text_prompts(pipes, variant):
    """The pipelines' own text encoders (tiny Mistral-3 / Qwen3, chat template, byte tokenizer); klein base runs
    CFG with its "" negative prompt."""
    pipe = pipes[variant]
    adapter = get_adapter(pipe)
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=3.0, output_type="latent",
              max_sequence_length=96)
    ref = pipe(prompt=["a cat", "two dogs"], generator=_gens(1, 2), **kw).images
    ours = generate(pipe, ["a cat", "two dogs"], generator=_gens(1, 2), speedup=None, progress=False, **kw).images
    torch.testing.assert_close(_pipe_latents(adapter, ours), ref, **TOL)


@torch.no_grad()
def test_klein_base_cfg_with_negative_embeddings_equals_diffusers(pipes):
    pipe = pipes["klein-base"]
    adapter = get_adapter(pipe)
    emb = _emb(pipe, 1, cfg=True)
    kw = dict(height=64, width=64, num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    ref = pipe(**emb, generator=torch.Generator().manual_seed(5), **kw).images
    ours = generate(pipe, **emb, seed=5, speedup=None, progress=False, **kw).images
    torch.testing.assert_close(adapter.denormalize(ours), ref, **TOL)
    # guidance_scale <= 1: no CFG, like the pipeline
    kw["guidance_scale"] = 1.0
    ref = pipe(prompt_embeds=emb["prompt_embeds"], generator=torch.Generator().manual_seed(5), **kw).images
    ours = generate(pipe, prompt_embeds=emb["prompt_embeds"], seed=5, speedup=None, progress=False, **kw).images
    torch.testing.assert_close(adapter.denormalize(ours), ref, **TOL)


@torch.no_grad()
def test_decoded_images_equal_diffusers(pipes):
    """Batch-norm de-normalisation + VAE decode + postprocessing as the pipeline does them."""
    pipe = pipes["dev"]
    emb = _emb(pipe, 1)
    kw = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    ref = pipe(**emb, generator=torch.Generator().manual_seed(3), **kw).images
    ours = generate(pipe, **emb, seed=3, speedup=None, progress=False, **kw).images
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert abs(ours - ref).max() < 1e-5


def test_pack_and_noise_equal_the_pipeline(pipes):
    from diffusers import Flux2Pipeline

    pipe = pipes["dev"]
    adapter = get_adapter(pipe)
    noise = adapter.prepare_noise(2, 64, 96, _gens(7, 8), torch.float32)
    lat, ids = pipe.prepare_latents(2, 32, 64, 96, torch.float32, "cpu", _gens(7, 8))
    assert noise.shape == (2, 32, 8, 12)
    assert torch.equal(adapter.pack(noise), lat)
    assert torch.equal(adapter.unpack(lat, 8, 12), noise)
    assert torch.equal(ids[0, :, 1:3].float(), grid_positions(4, 6))  # raster (row, col) order, like ralu's grid
    assert torch.equal(adapter.pack(noise), Flux2Pipeline._pack_latents(Flux2Pipeline._patchify_latents(noise)))


def test_defaults_and_preset_shift(pipes):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    dev, klein, base = (get_adapter(pipes[v]) for v in ("dev", "klein", "klein-base"))
    assert (dev.family, dev.default_steps, dev.default_guidance, dev.default_preset) == ("flux2", 50, 4.0, "7x")
    assert (base.family, base.default_steps, base.supports_negative_prompt) == ("flux2", 50, True)
    assert (klein.family, klein.default_steps, klein.default_preset) == ("flux2-klein", 4, "4step")
    assert not dev.supports_negative_prompt and not klein.supports_negative_prompt
    assert dev.preset_base_shift(1024, 1024) == pytest.approx(math.exp(compute_empirical_mu(4096, 50)))
    assert klein.preset_base_shift(768, 1024) == pytest.approx(math.exp(compute_empirical_mu(48 * 64, 4)))
    assert dev.embed_dims() == (96, None) and dev.coarse_block_px == 32


def test_guidance_given_to_a_distilled_klein_is_said_to_be_ignored(pipes, caplog):
    """As Flux2KleinPipeline warns: step-distilled klein runs no guidance, so a guidance_scale above 1 changes
    nothing; prepare says so (it was silent). klein base uses it: no warning."""
    from ralu_runtime import prepare

    kw = dict(height=64, width=64, **random_embeds(pipes["klein"], 1, 12, seed=0))
    with caplog.at_level("WARNING", logger="ralu"):
        prepare(pipes["klein"], guidance_scale=5.0, **kw)
        prepare(pipes["klein"], **kw)
        prepare(pipes["klein-base"], guidance_scale=5.0, height=64, width=64,
                **random_embeds(pipes["klein-base"], 1, 12, seed=0))
    lines = [r.getMessage() for r in caplog.records if r.name == "ralu"
             and "upsamples no region" not in r.getMessage()]  # (the tiny size's own warning)
    assert lines == ["guidance_scale=5.0 is ignored: a step-distilled FLUX.2-klein runs no guidance"]


# ------------------------------------------------------------------------------------------ positions
def _cond(adapter, b, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return adapter.encode_prompt(None, prompt_embeds=torch.randn(b, t, 96, generator=g), guidance_scale=3.5)


@pytest.mark.parametrize("variant", ["dev", "klein"])
@torch.no_grad()
def test_velocity_matches_transformer_forward(pipes, variant):
    """Integer positions through the explicit-position path (raster=False) equal the model's own forward."""
    adapter = get_adapter(pipes[variant])
    cond = _cond(adapter, 2)
    tokens = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(1))
    pos = grid_positions(3, 4)
    img_ids = torch.cat([torch.zeros(12, 1), pos, torch.zeros(12, 1)], dim=1).long()
    txt_ids = torch.stack([torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.arange(6.0)], dim=1).long()
    guidance = cond.data["guidance"]
    ref = adapter.transformer(hidden_states=tokens, encoder_hidden_states=cond.data["embeds"],
                              timestep=torch.tensor([0.37, 0.37]), img_ids=img_ids[None].expand(2, -1, -1),
                              txt_ids=txt_ids[None].expand(2, -1, -1), guidance=guidance, return_dict=False)[0]
    assert (guidance is None) == (variant == "klein")
    ours = adapter.velocity(tokens, TokenGrid(pos.expand(2, -1, -1), (3, 4)), torch.tensor(370.0), cond)
    torch.testing.assert_close(ours, ref, **TOL)


def test_rotary_at_half_positions_is_the_formula_per_image(pipes):
    """Rotary tables at p + 0.5 equal cos / sin of (p + 0.5) * theta^(-2i/d) per axis (float64), per image; at
    integer positions they equal the model's pos_embed of its own ids."""
    adapter = get_adapter(pipes["dev"])
    pe = adapter.transformer.pos_embed
    pos = torch.tensor([[[1.0, 2.0], [1.5, 2.0], [0.5, 3.5]], [[2.5, 0.5], [0.0, 0.0], [3.0, 1.0]]])
    cos, sin = adapter.rotary(TokenGrid(pos, (4, 4)), text_len=3)
    assert cos.shape == (2, 6, sum(pe.axes_dim))
    for b in range(2):
        for j in range(6):
            ids = [0.0, 0.0, 0.0, float(j)] if j < 3 else [0.0, *pos[b, j - 3].tolist(), 0.0]
            angles = torch.cat([ids[a] * pe.theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
                                for a, d in enumerate(pe.axes_dim)]).repeat_interleave(2)
            torch.testing.assert_close(cos[b, j], angles.cos().float(), rtol=0, atol=1e-6)
            torch.testing.assert_close(sin[b, j], angles.sin().float(), rtol=0, atol=1e-6)
    model_cos, model_sin = pe(torch.tensor([[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 1, 0]]))
    torch.testing.assert_close(cos[:, 0], model_cos[0].expand(2, -1), rtol=0, atol=0)
    torch.testing.assert_close(cos[0, 3], model_cos[1], rtol=0, atol=0)
    torch.testing.assert_close(sin[1, 5], model_sin[2], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["dev", "klein-base"])
@torch.no_grad()
def test_per_image_positions_equal_separate_calls(pipes, variant):
    adapter = get_adapter(pipes[variant])
    g = torch.Generator().manual_seed(2)
    emb = {"prompt_embeds": torch.randn(2, 6, 96, generator=g),
           "negative_prompt_embeds": torch.randn(2, 6, 96, generator=g)}
    if not adapter.supports_negative_prompt:
        emb.pop("negative_prompt_embeds")
    cond = adapter.encode_prompt(None, **emb, guidance_scale=3.5)
    tokens = torch.randn(2, 10, 128, generator=g)
    pos = torch.rand(2, 10, 2, generator=g) * 4
    both = adapter.velocity(tokens, TokenGrid(pos, (4, 4)), torch.tensor(500.0), cond)
    for i in range(2):
        ci = Conditioning(1, {k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in cond.data.items()})
        one = adapter.velocity(tokens[i : i + 1], TokenGrid(pos[i : i + 1], (4, 4)), torch.tensor(500.0), ci)
        torch.testing.assert_close(both[i : i + 1], one, **TOL)
    # a different position set changes the result (positions do reach the model)
    other = adapter.velocity(tokens, TokenGrid(pos + 0.5, (4, 4)), torch.tensor(500.0), cond)
    assert (other - both).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ RALU through generate
@pytest.mark.parametrize("variant", ["dev", "klein"])
@torch.no_grad()
def test_ralu_presets_run_deterministic_both_noise_variants(pipes, variant):
    pipe = pipes[variant]
    emb = _emb(pipe, 1)
    kw = dict(height=96, width=128, speedup="default", output_type="latent", return_masks=True, progress=False)
    for noise in ("reference", "exact"):
        a = generate(pipe, **emb, seed=4, noise=noise, **kw)
        assert a.images.shape == (1, 32, 12, 16)
        assert torch.isfinite(a.images).all()
        assert a.masks.shape == (1, 3, 4)
        b = generate(pipe, **emb, seed=4, noise=noise, **kw)
        assert torch.equal(a.images, b.images)
    assert a.schedule.name == ("flux2/7x" if variant == "dev" else "flux2-klein/4step")


# ------------------------------------------------------------------------------------------ compile
@pytest.mark.slow
@torch.no_grad()
def test_inductor_matches_eager_without_new_graphs():
    """The two block kinds compile once (dynamic shapes); a second resolution and RALU's stages reuse them."""
    from ralu_runtime.compile import compile_stats, uncompile_adapter

    pipe = build_tiny_flux2_pipeline(seed=0)
    emb = _emb(pipe, 1)
    base = dict(speedup=None, num_inference_steps=2, seed=1, output_type="latent", progress=False)
    ralu = dict(speedup=SMALL, seed=2, output_type="latent", progress=False, transition_impl="torch")
    refs = [generate(pipe, **emb, height=64, width=64, **base).images,
            generate(pipe, **emb, height=96, width=64, **base).images,
            generate(pipe, **emb, height=64, width=96, **ralu).images]
    try:
        out = generate(pipe, **emb, height=64, width=64, backend="inductor", **base).images
        torch.testing.assert_close(out, refs[0], atol=1e-4, rtol=1e-4)
        graphs = compile_stats()["unique_graphs"]
        out = generate(pipe, **emb, height=96, width=64, backend="inductor", **base).images
        torch.testing.assert_close(out, refs[1], atol=1e-4, rtol=1e-4)
        out = generate(pipe, **emb, height=64, width=96, backend="inductor", **ralu).images
        torch.testing.assert_close(out, refs[2], atol=1e-4, rtol=1e-4)
        assert compile_stats()["unique_graphs"] == graphs, "a new token count or RALU stage recompiled"
        assert get_adapter(pipe).runner.impl.compiled_blocks == ["flux2_double", "flux2_single"]
    finally:
        uncompile_adapter(pipe)


def test_custom_attention_processor_is_refused_before_any_work():
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor

    class MyProcessor(Flux2AttnProcessor):
        pass

    pipe = build_tiny_flux2_pipeline(seed=0, num_single_layers=1)
    calls = []
    pipe.transformer.x_embedder.register_forward_hook(lambda *a: calls.append(1))
    pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    pipe.transformer.transformer_blocks[0].attn.set_processor(MyProcessor())
    with pytest.raises(ValueError, match="MyProcessor"):
        generate(pipe, "a cat", height=64, width=64, progress=False)
    assert not calls


def test_bad_inputs_are_refused(pipes):
    dev, klein = pipes["dev"], pipes["klein"]
    emb = _emb(dev, 1)
    with pytest.raises(ValueError, match="negative prompts are not supported"):
        generate(dev, **emb, negative_prompt_embeds=emb["prompt_embeds"], height=64, width=64)
    with pytest.raises(ValueError, match="negative prompts are not supported"):
        generate(klein, "a cat", negative_prompt="dogs", height=64, width=64)
    with pytest.raises(ValueError, match="pooled"):
        generate(dev, **emb, pooled_prompt_embeds=torch.zeros(1, 96), height=64, width=64)
    with pytest.raises(ValueError, match="text-token mask"):
        generate(dev, **emb, prompt_embeds_mask=torch.ones(1, 12), height=64, width=64)
    with pytest.raises(ValueError, match="last dimension 32"):
        generate(dev, prompt_embeds=torch.zeros(1, 4, 32), height=64, width=64)
    with pytest.raises(ValueError, match="multiple of 32"):
        generate(dev, **emb, height=48, width=64)


@torch.no_grad()
def test_lora_loaded_after_generate_takes_effect():
    pytest.importorskip("peft")
    from tiny_inputs import lora_state_dict

    pipe, fresh = build_tiny_flux2_pipeline(seed=0), build_tiny_flux2_pipeline(seed=0)
    emb = _emb(pipe, 1)
    kw = dict(height=64, width=96, speedup=SMALL, seed=3, output_type="latent", progress=False)
    first = generate(pipe, **emb, **kw).images
    for p in (pipe, fresh):
        p.load_lora_weights(lora_state_dict(p.transformer, 4, 7), adapter_name="style")
    lora = generate(pipe, **emb, **kw).images
    assert (lora - first).abs().max() > 1e-3
    torch.testing.assert_close(lora, generate(fresh, **emb, **kw).images, **TOL)
    # and the plain pipeline with the LoRA equals ralu's baseline with it
    base = dict(height=64, width=64, num_inference_steps=2, output_type="latent")
    ref = pipe(**emb, generator=torch.Generator().manual_seed(1), **base).images
    ours = generate(pipe, **emb, seed=1, speedup=None, progress=False, **base).images
    torch.testing.assert_close(get_adapter(pipe).pack(ours), ref, **TOL)
