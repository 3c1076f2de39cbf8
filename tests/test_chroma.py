"""Chroma (ChromaPipeline): parity with diffusers, per-image RoPE positions, text-token masks, RALU, compile, safety.

Tiny random pipeline (1 double + 2 single blocks, hidden 32, tiny T5 and byte tokenizer), CPU. Every comparison
is against diffusers' own pipeline or transformer, or against the analytic rotary formula.
"""
import math

import pytest
import torch

from ralu_runtime import generate
from ralu_runtime.adapters import TokenGrid, get_adapter
from ralu_runtime.layout import grid_positions
from helpers import assert_same, snapshot

TOL = dict(atol=1e-5, rtol=1e-5)


def _fresh():
    from ralu_runtime.tiny.chroma import build_tiny_chroma_pipeline

    return build_tiny_chroma_pipeline(seed=0)


@pytest.fixture(scope="module")
def pipe():
    return _fresh()


@pytest.fixture(scope="module")
def adapter(pipe):
    from ralu_runtime.adapters.chroma import ChromaAdapter

    return ChromaAdapter(pipe)  # built directly: holds its pipeline


def _t5_mask(b, t, valid, dtype=torch.float32):
    """Chroma's text mask: ``valid[i]`` tokens (a prompt plus its one unmasked padding token), the rest 0."""
    return torch.stack([(torch.arange(t) < v) for v in valid]).to(dtype)


def _embeds(b=1, t=8, seed=0, neg_t=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    nt = t if neg_t is None else neg_t
    return {"prompt_embeds": torch.randn(b, t, 32, generator=g),
            "prompt_embeds_mask": _t5_mask(b, t, [t - 2 - i % 3 for i in range(b)], dtype),
            "negative_prompt_embeds": torch.randn(b, nt, 32, generator=g),
            "negative_prompt_embeds_mask": _t5_mask(b, nt, [2 + i % 2 for i in range(b)], dtype)}


def _pipeline_kwargs(emb):
    """generate's keyword names -> ChromaPipeline's."""
    names = {"prompt_embeds_mask": "prompt_attention_mask", "negative_prompt_embeds_mask": "negative_prompt_attention_mask"}
    return {names.get(k, k): v for k, v in emb.items()}


VARIANTS = {
    "float-mask-cfg": (dict(), 5.0),
    "bool-mask-cfg": (dict(dtype=torch.bool), 5.0),
    "negative-of-other-length": (dict(neg_t=5), 4.0),  # two model passes per step (text lengths differ)
    "no-cfg": (dict(), 1.0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_baseline_equals_diffusers_with_embeddings(pipe, variant):
    kw, guidance = VARIANTS[variant]
    emb = _embeds(1, seed=3, **kw)
    common = dict(height=64, width=96, num_inference_steps=3, guidance_scale=guidance, output_type="latent")
    ref = pipe(**_pipeline_kwargs(emb), generator=torch.Generator().manual_seed(7), **common).images
    ref = pipe._unpack_latents(ref, 64, 96, pipe.vae_scale_factor)
    ours = generate(pipe, **emb, speedup=None, seed=7, progress=False, **common).images
    torch.testing.assert_close(ours, ref, **TOL)


@torch.no_grad()
def test_baseline_equals_diffusers_with_text_prompts(pipe):
    common = dict(height=64, width=64, num_inference_steps=3, output_type="latent")
    for kw in (dict(prompt="a red fox"), dict(prompt=["a red fox", "two cats"], negative_prompt=["blurry", "dark"])):
        ref = pipe(**kw, generator=torch.Generator().manual_seed(2), **common).images  # default guidance 5.0
        ref = pipe._unpack_latents(ref, 64, 64, pipe.vae_scale_factor)
        ours = generate(pipe, **kw, speedup=None, seed=2, progress=False, **common).images
        torch.testing.assert_close(ours, ref, **TOL)
    # prompt embeddings without a negative: the pipeline encodes "" (512 tokens) for it, and so does ralu
    emb = _embeds(1, seed=4)
    emb = {k: emb[k] for k in ("prompt_embeds", "prompt_embeds_mask")}
    ref = pipe(**_pipeline_kwargs(emb), generator=torch.Generator().manual_seed(2), **common).images
    ref = pipe._unpack_latents(ref, 64, 64, pipe.vae_scale_factor)
    ours = generate(pipe, **emb, speedup=None, seed=2, progress=False, **common).images
    torch.testing.assert_close(ours, ref, **TOL)


def test_defaults_and_schedule_follow_the_pipeline(pipe, adapter):
    import inspect

    from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

    sig = inspect.signature(type(pipe).__call__).parameters
    assert adapter.default_steps == sig["num_inference_steps"].default == 35
    assert adapter.default_guidance == sig["guidance_scale"].default == 5.0
    assert adapter.default_size == pipe.default_sample_size * pipe.vae_scale_factor == 1024
    assert adapter.embed_dims() == (32, None)
    c = pipe.scheduler.config
    mu = calculate_shift(4096, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert adapter.preset_base_shift(1024, 1024) == pytest.approx(math.exp(mu))
    assert adapter.preset_base_shift(1024, 1024) == pytest.approx(3.1582, abs=1e-4)  # FLUX.1-dev-like scheduler
    with pytest.raises(ValueError, match="takes no pooled"):
        generate(pipe, **_embeds(1), pooled_prompt_embeds=torch.zeros(1, 32), progress=False)
    dummy = adapter.dummy_embeds(1, 8)  # warm-up embeddings carry masks, like real prompts
    cond = adapter.encode_prompt(None, None, **dummy, guidance_scale=5.0)
    assert cond.data["mask"].shape == (2, 8) and cond.data["mask"].dtype == torch.float32


def _cond(adapter, b=1, t=8, guidance=5.0, seed=0):
    emb = _embeds(b, t, seed)
    return adapter.encode_prompt(None, None, **emb, guidance_scale=guidance)


@torch.no_grad()
def test_velocity_at_explicit_integer_positions_equals_transformer_forward(adapter):
    tr = adapter.transformer
    cond = _cond(adapter, guidance=1.0)
    pos = grid_positions(3, 4)
    tokens = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.cat([cond.data["mask"], torch.ones(1, 12, dtype=torch.bool)], dim=1)  # as the pipeline builds it
    ref = tr(hidden_states=tokens, encoder_hidden_states=cond.data["embeds"], timestep=torch.tensor([0.37]),
             img_ids=torch.cat([torch.zeros(12, 1), pos], dim=1), txt_ids=torch.zeros(8, 3), attention_mask=mask,
             return_dict=False)[0]
    ours = adapter.velocity(tokens, TokenGrid(pos[None], (3, 4), raster=False), torch.tensor(370.0), cond)
    torch.testing.assert_close(ours, ref, **TOL)
    unmasked = tr(hidden_states=tokens, encoder_hidden_states=cond.data["embeds"], timestep=torch.tensor([0.37]),
                  img_ids=torch.cat([torch.zeros(12, 1), pos], dim=1), txt_ids=torch.zeros(8, 3),
                  return_dict=False)[0]
    assert (unmasked - ref).abs().max() > 1e-4  # the mask matters, so the comparison above checks it


def _rope_reference(ids: torch.Tensor, axes=(4, 6, 6), theta=10000.0):
    """FLUX/Chroma rotary (cos, sin) written out in float64: per axis of dim d, angles p / theta^(2j/d), each
    repeated twice (interleaved pairs)."""
    cos, sin = [], []
    for a, d in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = ids[:, a, None].double() * freqs[None]
        cos.append(ang.cos().repeat_interleave(2, dim=1))
        sin.append(ang.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, 1).float(), torch.cat(sin, 1).float()


def test_rotary_tables_at_half_positions_equal_the_formula_per_image(adapter):
    coarse = grid_positions(2, 3)
    pos = torch.stack([coarse + 0.5, coarse.flip(0) + torch.tensor([0.0, 0.5])])  # two images, different positions
    cos, sin = adapter.rotary(pos, 4)
    assert cos.shape == (2, 4 + 6, 16)
    for i in range(2):
        ids = torch.cat([torch.zeros(4, 3), torch.cat([torch.zeros(6, 1), pos[i]], 1)])
        rc, rs = _rope_reference(ids)
        torch.testing.assert_close(cos[i], rc, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[i], rs, rtol=0, atol=1e-6)


@torch.no_grad()
def test_per_image_positions_equal_separate_calls(adapter):
    cond = _cond(adapter, b=2, seed=5)
    assert cond.data["embeds"].shape[0] == 4  # [negative; positive] in one batch
    tokens = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(2))
    pos = torch.rand(2, 10, 2, generator=torch.Generator().manual_seed(3)) * 4
    both = adapter.velocity(tokens, TokenGrid(pos, (4, 4)), torch.tensor(600.0), cond)
    for i in range(2):
        emb = {k: v[i:i + 1] for k, v in _embeds(2, seed=5).items()}
        ci = adapter.encode_prompt(None, None, **emb, guidance_scale=5.0)
        one = adapter.velocity(tokens[i:i + 1], TokenGrid(pos[i:i + 1], (4, 4)), torch.tensor(600.0), ci)
        torch.testing.assert_close(both[i:i + 1], one, **TOL)


RALU = dict(height=96, width=128, output_type="latent", progress=False)


@pytest.mark.parametrize("noise", ["reference", "exact"])
@torch.no_grad()
def test_ralu_preset_non_square_finite_deterministic(pipe, noise):
    emb = _embeds(1, seed=6)
    a = generate(pipe, **emb, speedup="default", seed=11, noise=noise, return_masks=True, **RALU)
    assert a.schedule.name == "chroma/5x" and a.masks.shape == (1, 3, 4)
    assert a.images.shape == (1, 16, 12, 16) and bool(torch.isfinite(a.images).all())
    b = generate(pipe, **emb, speedup="default", seed=11, noise=noise, **RALU)
    assert torch.equal(a.images, b.images)


@torch.no_grad()
def test_feature_caches_run_with_one_and_two_model_passes(pipe):
    for kw, cache in ((dict(), "taylorseer:2"), (dict(neg_t=5), "fbcache:0.05")):
        out = generate(pipe, **_embeds(1, seed=9, **kw), speedup="3x", seed=1, cache=cache, **RALU)
        assert bool(torch.isfinite(out.images).all()) and out.cache_stats is not None


@pytest.mark.slow  # one cold inductor compile of the two block kinds: about a minute of CPU
@torch.no_grad()
def test_inductor_matches_eager_and_adds_no_graphs():
    from ralu_runtime.compile import compile_stats, uncompile_adapter

    pipe = _fresh()
    emb = _embeds(1, seed=10)
    base = dict(speedup=None, num_inference_steps=2, seed=1, output_type="latent", progress=False)
    refs = {hw: generate(pipe, **emb, height=hw[0], width=hw[1], **base).images for hw in ((64, 64), (96, 128))}
    ralu = dict(height=96, width=128, speedup="3x", seed=4, output_type="latent", progress=False)
    ralu_ref = generate(pipe, **emb, **ralu).images
    out = generate(pipe, **emb, height=64, width=64, backend="inductor", **base).images
    torch.testing.assert_close(out, refs[(64, 64)], atol=1e-4, rtol=1e-4)
    graphs = compile_stats()["unique_graphs"]
    out = generate(pipe, **emb, height=96, width=128, backend="inductor", **base).images
    torch.testing.assert_close(out, refs[(96, 128)], atol=1e-4, rtol=1e-4)
    out = generate(pipe, **emb, backend="inductor", **ralu).images
    torch.testing.assert_close(out, ralu_ref, atol=1e-4, rtol=1e-4)
    assert compile_stats()["unique_graphs"] == graphs, "a new resolution or a RALU stage recompiled"
    assert get_adapter(pipe).runner.impl.compiled_blocks == ["chroma_double", "chroma_single"]
    uncompile_adapter(pipe)


def _plain(pipe, emb):
    return pipe(**_pipeline_kwargs(emb), height=64, width=96, num_inference_steps=2,
                generator=torch.Generator().manual_seed(4), output_type="latent").images


@torch.no_grad()
def test_pipeline_left_as_found_and_later_lora_takes_effect():
    pytest.importorskip("peft")
    from tiny_inputs import lora_state_dict

    pipe = _fresh()
    emb = _embeds(1, seed=12)
    pipe.encode_prompt("warm", device="cpu")  # any lazily installed text-encoder hooks, before the snapshot
    before_plain = _plain(pipe, emb)
    before = snapshot(pipe)
    first = generate(pipe, **emb, speedup="3x", seed=3, **RALU).images
    generate(pipe, "a prompt", speedup=None, num_inference_steps=2, seed=3, **RALU)
    assert_same(before, snapshot(pipe))
    assert torch.equal(_plain(pipe, emb), before_plain), "plain pipe() changed after generate"

    pipe.load_lora_weights(lora_state_dict(pipe.transformer, 4, 7), adapter_name="style")
    lora_plain = _plain(pipe, emb)
    assert (lora_plain - before_plain).abs().max() > 1e-3  # the LoRA changes the pipeline's result
    lora_ralu = generate(pipe, **emb, speedup="3x", seed=3, **RALU).images
    assert (lora_ralu - first).abs().max() > 1e-3  # ... and ralu's
    base = generate(pipe, **emb, speedup=None, num_inference_steps=2, seed=4, height=64, width=96,
                    output_type="latent", progress=False).images
    torch.testing.assert_close(base, pipe._unpack_latents(lora_plain, 64, 96, 8), **TOL)


@torch.no_grad()
def test_custom_attention_processor_is_refused_before_any_work():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    pipe = _fresh()

    class Custom(FluxAttnProcessor):
        pass

    pipe.transformer.single_transformer_blocks[1].attn.set_processor(Custom())
    calls = []
    handle = pipe.transformer.x_embedder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="single_transformer_blocks.1.attn has attention processor Custom"):
            generate(pipe, **_embeds(1), speedup=None, num_inference_steps=1, seed=0, **RALU)
        assert not calls
    finally:
        handle.remove()
