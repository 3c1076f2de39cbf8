"""Z-Image adapter on a tiny random ZImagePipeline (CPU): parity with diffusers' pipeline and transformer forward,
rotary tables at real positions, per-image positions, RALU through generate, compile, safety, LoRA.

The tiny pipeline (ralu_runtime.tiny.z_image) has 1 + 1 refiner and 2 main blocks at hidden 32, distinct random pad
tokens (so padding mistakes show), a tiny Qwen3 text encoder with a byte tokenizer and chat template, and the real
Z-Image scheduler config (shift 3, no dynamic shifting). Images of 96x128 px have 6x8 = 48 fine tokens (16 image
pads) and 3x4 = 12 coarse tokens (20 pads); captions of 20 / 40 / 70 tokens pad to 32 / 64 / 96, so a batch
with several lengths runs the model's attention masks.
"""
import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import TokenGrid, get_adapter
from ralu_runtime.adapters.z_image import ZImageAdapter
from ralu_runtime.layout import grid_positions
from ralu_runtime.tiny.z_image import build_tiny_z_image_pipeline, random_embeds
from helpers import assert_same, snapshot

TOL = dict(atol=1e-5, rtol=1e-5)
SCHED = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
LAT = dict(output_type="latent", progress=False)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_z_image_pipeline(seed=0)


def _caps(seed=0, lens=(40, 70), dim=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in lens]


def _dense(caps):
    """Captions of different lengths as ``(B, T, D)`` zero-padded embeddings and their 0/1 mask."""
    t = max(c.shape[0] for c in caps)
    emb = torch.zeros(len(caps), t, caps[0].shape[1])
    mask = torch.zeros(len(caps), t, dtype=torch.long)
    for i, c in enumerate(caps):
        emb[i, : c.shape[0]], mask[i, : c.shape[0]] = c, 1
    return emb, mask


def _plain(pipe, seed=1, **kw):
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images


# ------------------------------------------------------------------------------------------- pipeline parity
@torch.no_grad()
def test_baseline_equals_pipeline_with_cfg_masks_and_text(pipe):
    # CFG, positive and negative captions of different padded lengths (masked attention), 96x128 (image pads)
    pos, neg = _caps(0, (40, 20)), _caps(1, (70, 33))
    ref = _plain(pipe, prompt_embeds=pos, negative_prompt_embeds=neg, height=96, width=128, num_inference_steps=3)
    (pe, pm), (ne, nm) = _dense(pos), _dense(neg)
    out = generate(pipe, prompt_embeds=pe, prompt_embeds_mask=pm, negative_prompt_embeds=ne,
                   negative_prompt_embeds_mask=nm, height=96, width=128, speedup=None, num_inference_steps=3, seed=1,
                   **LAT).images
    torch.testing.assert_close(out, ref, **TOL)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 1e-5

    # no CFG (Z-Image-Turbo style), (B, T, D) embeddings all valid, two images per prompt
    caps = _caps(2, (24, 24))
    ref = _plain(pipe, prompt_embeds=caps, guidance_scale=0.0, num_images_per_prompt=2, height=64, width=96,
                 num_inference_steps=3)
    out = generate(pipe, prompt_embeds=torch.stack(caps), guidance_scale=0.0, num_images_per_prompt=2, height=64,
                   width=96, speedup=None, num_inference_steps=3, seed=1, **LAT).images
    torch.testing.assert_close(out, ref, **TOL)

    # text prompts through the tiny Qwen3 + chat template, default (empty) negative prompts
    prompts = ["a cat", "a red dog on a green hill"]
    ref = _plain(pipe, prompt=list(prompts), height=64, width=64, num_inference_steps=2)
    out = generate(pipe, prompts, height=64, width=64, speedup=None, num_inference_steps=2, seed=1, **LAT).images
    torch.testing.assert_close(out, ref, **TOL)
    # the default 50 steps / guidance 5 / 1024 px are the pipeline's
    adapter = get_adapter(pipe)
    assert (adapter.default_steps, adapter.default_guidance, adapter.default_size) == (50, 5.0, 1024)
    assert adapter.preset_base_shift(1024, 1024) == 3.0 and adapter.embed_dims() == (32, None)


@torch.no_grad()
def test_cfg_truncation_and_normalization_equal_pipeline(pipe):
    adapter = get_adapter(pipe)
    pos, neg = _caps(3, (40,)), _caps(4, (20,))
    kw = dict(height=64, width=64, num_inference_steps=3)
    ref = _plain(pipe, prompt_embeds=pos, negative_prompt_embeds=neg, cfg_truncation=0.1, cfg_normalization=1.0,
                 **kw)
    try:
        adapter.cfg_truncation, adapter.cfg_normalization = 0.1, 1.0
        out = generate(pipe, prompt_embeds=torch.stack(pos), negative_prompt_embeds=torch.stack(neg), speedup=None,
                       seed=1, **kw, **LAT).images
    finally:
        adapter.cfg_truncation, adapter.cfg_normalization = 1.0, False
    torch.testing.assert_close(out, ref, **TOL)
    plain_cfg = _plain(pipe, prompt_embeds=pos, negative_prompt_embeds=neg, **kw)
    assert (plain_cfg - ref).abs().max() > 1e-3  # the options change the result


def test_embeddings_without_negatives_need_guidance_zero(pipe):
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        generate(pipe, prompt_embeds=torch.randn(1, 8, 32), height=64, width=64, speedup=None, **LAT)
    with pytest.raises(ValueError, match="pooled"):
        generate(pipe, prompt_embeds=torch.randn(1, 8, 32), pooled_prompt_embeds=torch.randn(1, 32), height=64,
                 width=64, speedup=None, **LAT)


# ------------------------------------------------------------------------------------------------ positions
def _model_velocity(pipe, lat, t_norm, caps):
    """diffusers' own forward on latents (B, C, h, w) -> ralu's velocity convention (tokens, v = -model output)."""
    out = pipe.transformer([x[:, None] for x in lat], t_norm.expand(lat.shape[0]), caps, return_dict=False)[0]
    return -get_adapter(pipe).pack(torch.stack(out).squeeze(2))


@torch.no_grad()
def test_velocity_at_integer_positions_equals_transformer_forward(pipe):
    adapter = ZImageAdapter(pipe)
    caps = _caps(5, (40, 70))  # padded 64 / 96: masked main layers
    cond = adapter.encode_prompt(None, prompt_embeds=caps, guidance_scale=0.0)
    lat = torch.randn(2, 16, 12, 16, generator=torch.Generator().manual_seed(0))  # 6x8 tokens + 16 pads
    t = torch.tensor(640.0)
    ref = _model_velocity(pipe, lat, (1000 - t) / 1000, caps)
    tokens = adapter.pack(lat)
    pos = grid_positions(6, 8).expand(2, -1, -1)
    # arbitrary (per-image) token order with explicit positions: the non-raster path
    perm = torch.stack([torch.randperm(48, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    gather = lambda x: torch.gather(x, 1, perm[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    v = adapter.velocity(gather(tokens), TokenGrid(gather(pos), (6, 8), raster=False), t, cond)
    torch.testing.assert_close(v, gather(ref), **TOL)
    # the raster grid (stage 1 / 3 / baseline) too
    v = adapter.velocity(tokens, TokenGrid(pos, (6, 8), raster=True), t, cond)
    torch.testing.assert_close(v, ref, **TOL)


@torch.no_grad()
def test_rotary_tables_on_integer_ids_and_half_positions(pipe):
    from diffusers.models.transformers.transformer_z_image import RopeEmbedder

    adapter = ZImageAdapter(pipe)
    cfg = pipe.transformer.config
    ids = torch.stack([torch.randint(0, n, (300,), generator=torch.Generator().manual_seed(n)) for n in
                       (1536, 512, 512)], dim=-1)
    table = RopeEmbedder(theta=cfg.rope_theta, axes_dims=cfg.axes_dims, axes_lens=cfg.axes_lens)(ids)  # own object
    cos, sin = adapter.rope_at(ids)
    assert torch.equal(cos, table.real) and torch.equal(sin, table.imag)  # bitwise the model's table

    # per-image tables at p + 0.5 against the analytic formula (float64), first id = padded caption length + 1
    pos = grid_positions(3, 4).expand(2, -1, -1) + torch.tensor([[[0.5, 0.0]], [[0.0, 0.5]]])
    img_t = torch.tensor([33.0, 65.0], dtype=torch.float64)
    cos, sin = adapter.image_rope(pos, img_t, pad=4)
    full = torch.cat([img_t[:, None, None].expand(2, 12, 1), pos.double()], -1)
    angles = []
    for i, d in enumerate(cfg.axes_dims):
        freqs = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(full[..., i : i + 1] * freqs)
    angle = torch.cat(angles, -1)
    torch.testing.assert_close(cos[:, :12].double(), angle.cos(), atol=2e-6, rtol=0)
    torch.testing.assert_close(sin[:, :12].double(), angle.sin(), atol=2e-6, rtol=0)
    assert torch.equal(cos[:, 12:], torch.ones(2, 4, 8)) and not sin[:, 12:].any()  # image pads at (0, 0, 0)


@torch.no_grad()
def test_per_image_positions_equal_separate_calls(pipe):
    adapter = ZImageAdapter(pipe)
    pos_caps, neg_caps = _caps(6, (40, 70)), _caps(7, (20, 33))
    both = adapter.encode_prompt(None, prompt_embeds=pos_caps, negative_prompt_embeds=neg_caps, guidance_scale=4.0)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 13, 64, generator=g)
    pos = torch.rand(2, 13, 2, generator=g) * 4
    fine = torch.rand(2, 13, generator=g) > 0.5
    t = torch.tensor(420.0)
    v = adapter.velocity(tokens, TokenGrid(pos, (4, 4), fine), t, both)
    for i in range(2):
        one = adapter.encode_prompt(None, prompt_embeds=pos_caps[i : i + 1], negative_prompt_embeds=neg_caps[i : i + 1],
                                    guidance_scale=4.0)
        vi = adapter.velocity(tokens[i : i + 1], TokenGrid(pos[i : i + 1], (4, 4), fine[i : i + 1]), t, one)
        torch.testing.assert_close(v[i : i + 1], vi, **TOL)
    assert (v[0] - v[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- RALU via generate
@torch.no_grad()
def test_ralu_presets_noise_variants_seeds_and_batches(pipe):
    emb = random_embeds(pipe, 1, 20, seed=1, cfg=True)
    kw = dict(height=96, width=128, transition_impl="torch", **LAT)
    outs = {}
    for noise in ("reference", "exact"):
        out = generate(pipe, **emb, speedup=SCHED, noise=noise, seed=5, **kw).images
        assert out.shape == (1, 16, 12, 16) and torch.isfinite(out).all()
        outs[noise] = out
    assert torch.equal(generate(pipe, **emb, speedup=SCHED, seed=5, **kw).images, outs["reference"])
    assert (outs["reference"] - outs["exact"]).abs().max() > 1e-4
    # a family preset (Z-Image-Turbo's few-step one, no CFG), solved for the scheduler's own shift
    res = generate(pipe, **random_embeds(pipe, 1, 20, seed=1), speedup="4step", seed=5, **kw)
    assert res.schedule.name == "z-image/4step" and res.schedule.base_shift == 3.0
    assert torch.isfinite(res.images).all()
    # a batch of two with per-image generators equals two single runs (captions of different padded lengths)
    pe, mask = _dense(_caps(8, (20, 40)))
    ne = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(9))
    gens = lambda: [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]  # noqa: E731
    batch = generate(pipe, prompt_embeds=pe, prompt_embeds_mask=mask, negative_prompt_embeds=ne, speedup=SCHED,
                     generator=gens(), **kw).images
    for i in range(2):
        n = int(mask[i].sum())
        single = generate(pipe, prompt_embeds=pe[i : i + 1, :n], negative_prompt_embeds=ne[i : i + 1], speedup=SCHED,
                          generator=gens()[i], **kw).images
        torch.testing.assert_close(batch[i : i + 1], single, **TOL)


# ------------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
@torch.no_grad()
def test_inductor_matches_eager_and_adds_no_graphs():
    from ralu_runtime.compile import compile_stats, uncompile_adapter

    pipe = build_tiny_z_image_pipeline(seed=0)
    emb = random_embeds(pipe, 1, 20, seed=2)
    base = dict(speedup=None, num_inference_steps=2, seed=1, **LAT)
    ralu = dict(speedup=SCHED, seed=3, transition_impl="torch", **LAT)
    refs = [generate(pipe, **emb, height=64, width=64, **base).images,
            generate(pipe, **emb, height=96, width=128, **base).images,
            generate(pipe, **emb, height=96, width=128, **ralu).images]
    out = generate(pipe, **emb, height=64, width=64, backend="inductor", **base).images
    torch.testing.assert_close(out, refs[0], atol=1e-4, rtol=1e-4)
    graphs = compile_stats()["unique_graphs"]
    out = generate(pipe, **emb, height=96, width=128, backend="inductor", **base).images
    torch.testing.assert_close(out, refs[1], atol=1e-4, rtol=1e-4)
    out = generate(pipe, **emb, height=96, width=128, backend="inductor", **ralu).images
    torch.testing.assert_close(out, refs[2], atol=1e-4, rtol=1e-4)
    assert compile_stats()["unique_graphs"] == graphs, "a new resolution or RALU stage recompiled"
    uncompile_adapter(pipe)


# ------------------------------------------------------------------------------------------------- safety
@torch.no_grad()
def test_pipeline_left_as_found_refusal_and_later_lora():
    pytest.importorskip("peft")
    pipe = build_tiny_z_image_pipeline(seed=0)
    kw = dict(prompt_embeds=_caps(9, (20,)), negative_prompt_embeds=_caps(10, (12,)), height=64, width=64,
              num_inference_steps=2)
    before_plain = _plain(pipe, **kw)
    _plain(pipe, prompt="a dog", height=64, width=64, num_inference_steps=1)  # transformers adds its output-capture
    before = snapshot(pipe, extra={"rope": pipe.transformer.rope_embedder})  # hooks to the text encoder on its first call: let the pipeline itself do that first
    emb = dict(prompt_embeds=torch.stack(kw["prompt_embeds"]), negative_prompt_embeds=torch.stack(
        kw["negative_prompt_embeds"]))
    generate(pipe, "a cat", height=64, width=64, speedup=SCHED, seed=2, transition_impl="torch", **LAT)  # text path
    first = generate(pipe, **emb, height=64, width=96, speedup=SCHED, seed=2, transition_impl="torch", **LAT).images
    assert_same(before, snapshot(pipe, extra={"rope": pipe.transformer.rope_embedder}))
    assert torch.equal(_plain(pipe, **kw), before_plain), "plain pipe() changed after generate"

    # a custom attention processor is refused before any work
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    class Custom(ZSingleStreamAttnProcessor):
        pass

    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    block = pipe.transformer.layers[1].attention
    own = block.processor
    block.processor = Custom()
    try:
        with pytest.raises(ValueError, match="ZSingleStreamAttnProcessor"):
            generate(pipe, **emb, height=64, width=96, speedup=SCHED, seed=2, **LAT)
        with pytest.raises(ValueError, match="ZSingleStreamAttnProcessor"):
            get_adapter(pipe).check_supported()
    finally:
        block.processor = own
        hook.remove()
    assert not calls

    # a LoRA loaded after generate takes effect, with no error
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name, mod in pipe.transformer.named_modules():
        if name.endswith(("attention.to_q", "attention.to_k", "attention.to_v")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, mod.in_features, generator=g) * 0.3
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 4, generator=g) * 0.3
    pipe.load_lora_weights(sd, adapter_name="style")
    second = generate(pipe, **emb, height=64, width=96, speedup=SCHED, seed=2, transition_impl="torch", **LAT).images
    assert torch.isfinite(second).all() and (second - first).abs().max() > 1e-3
    lora_plain = _plain(pipe, **kw)
    out = generate(pipe, **emb, height=64, width=64, speedup=None, num_inference_steps=2, seed=1, **LAT).images
    torch.testing.assert_close(out, lora_plain, **TOL)  # ralu with the LoRA = the pipeline with the LoRA
