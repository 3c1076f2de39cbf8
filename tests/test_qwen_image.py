"""Qwen-Image (QwenImagePipeline) on a tiny random pipeline: the baseline equals diffusers (embeddings with masks,
true CFG, text prompts through the offline Qwen2 tokenizer, decoded images), the adapter's explicit-position
rotary tables equal the model's own on integer grids and the formula at half positions, per-image positions,
RALU presets through generate, inductor, the pipeline left as found, refusals and a LoRA loaded later."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ralu_runtime import generate
from ralu_runtime.adapters import TokenGrid, get_adapter
from ralu_runtime.adapters.qwen_image import QwenImageAdapter
from ralu_runtime.layout import grid_positions
from ralu_runtime.tiny.qwen_image import build_tiny_qwen_image_pipeline, random_embeds
from helpers import assert_same, snapshot


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_qwen_image_pipeline(seed=0)


@pytest.fixture(scope="module")
def adapter():
    return QwenImageAdapter(build_tiny_qwen_image_pipeline(seed=1))  # built directly: holds its pipeline


def _embeds(b=1, t=8, seed=0, cfg=False, pad=True):
    """Embeddings (b, t, 32) with a padded mask on the first image (and, with cfg, a shorter negative)."""
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(b, t, 32, generator=g), "prompt_embeds_mask": torch.ones(b, t, dtype=torch.long)}
    if pad:
        out["prompt_embeds_mask"][0, t - 3:] = 0
    if cfg:
        out["negative_prompt_embeds"] = torch.randn(b, t - 2, 32, generator=g)
        out["negative_prompt_embeds_mask"] = torch.ones(b, t - 2, dtype=torch.long)
    return out


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("case", ["mask", "cfg", "all-ones-mask-cfg"])
@torch.no_grad()
def test_baseline_equals_diffusers_with_embeddings(pipe, case):
    emb = {"mask": lambda: _embeds(2), "cfg": lambda: _embeds(2, cfg=True),
           "all-ones-mask-cfg": lambda: _embeds(1, cfg=True, pad=False)}[case]()
    b = emb["prompt_embeds"].shape[0]
    ref = pipe(**emb, height=64, width=96, num_inference_steps=3, true_cfg_scale=4.0, generator=_gens(*range(3, 3 + b)),
               output_type="latent").images
    ours = generate(pipe, **emb, height=64, width=96, speedup=None, num_inference_steps=3, guidance_scale=4.0,
                    generator=_gens(*range(3, 3 + b)), output_type="latent", progress=False).images
    assert ours.shape == (b, 16, 8, 12)
    torch.testing.assert_close(get_adapter(pipe).pack(ours), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_baseline_equals_diffusers_with_text_prompts_and_images(pipe):
    """Text through the tiny Qwen2 tokenizer and Qwen2.5-VL (different prompt lengths: masks), a negative prompt,
    two images per prompt, and the decoded images (per-channel latent denormalisation, one-frame VAE decode)."""
    kw = dict(height=64, width=64, num_inference_steps=2, num_images_per_prompt=2)
    prompts = ["a red cat", "a much longer prompt about a dog"]
    negative = ["blurry", "blurry"]  # diffusers' pipeline does not broadcast one negative prompt over several prompts
    ref = pipe(prompts, negative_prompt=negative, true_cfg_scale=3.0, generator=_gens(1, 2, 3, 4), output_type="pt",
               **kw).images
    ours = generate(pipe, prompts, negative_prompt="blurry", guidance_scale=3.0, generator=_gens(1, 2, 3, 4),
                    speedup=None, output_type="pt", progress=False, **kw).images
    assert ours.shape == (4, 3, 64, 64)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_tiny_tokenizer_drops_exactly_the_template(pipe):
    tok = pipe.tokenizer
    prefix, suffix = pipe.prompt_template_encode.split("{}")
    assert len(tok(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    ids = tok(pipe.prompt_template_encode.format("a cat")).input_ids
    assert tok.decode(ids[34:]) == "a cat" + suffix


def test_preset_shift_is_the_pipelines_mu(pipe):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    cfg = pipe.scheduler.config
    ad = get_adapter(pipe)
    for h, w in ((1024, 1024), (1344, 1344), (96, 128)):
        seq = (h // 16) * (w // 16)
        mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        assert ad.preset_base_shift(h, w) == pytest.approx(math.exp(mu), rel=1e-12)
    assert (cfg.max_shift, cfg.max_image_seq_len, cfg.shift_terminal) == (0.9, 8192, 0.02)


# --------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("hw", [(4, 6), (5, 3), (7, 7), (1, 2)])
def test_rotary_on_integer_grids_equals_the_models_tables(adapter, hw):
    """QwenEmbedRope's centred rows/cols (negative indices for the upper half) and text after max(H//2, W//2)."""
    tr = adapter.transformer
    vid, txt = tr.pos_embed([(1, *hw)], max_txt_seq_len=5, device=torch.device("cpu"))
    ref = torch.cat([txt, vid])
    cos, sin = adapter.rotary(TokenGrid(grid_positions(*hw)[None], hw), 5)
    torch.testing.assert_close(cos[0], ref.real, rtol=0, atol=2e-7)
    torch.testing.assert_close(sin[0], ref.imag, rtol=0, atol=2e-7)


def _rope_formula(frame, row, col, axes, theta=10000):
    """cos/sin of QwenEmbedRope at one real (frame, row, col) position, in float64."""
    out = []
    for p, d in zip((frame, row, col), axes):
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        out.append(p * inv)
    ang = torch.cat(out)
    return torch.cos(ang), torch.sin(ang)


def test_rotary_at_half_positions_is_the_formula_per_image(adapter):
    axes = adapter.transformer.pos_embed.axes_dim
    hw = (4, 6)
    pos = torch.tensor([[[0.0, 0.0], [1.5, 2.5], [3.5, 5.5]], [[2.0, 0.5], [0.5, 0.0], [3.0, 3.0]]])
    cos, sin = adapter.rotary(TokenGrid(pos, hw), 2)
    for b in range(2):
        for i in range(3):
            r, c = pos[b, i].tolist()
            rc, rs = _rope_formula(0.0, r - 2, c - 3, axes)  # centred: H - H // 2 = 2, W - W // 2 = 3
            torch.testing.assert_close(cos[b, 2 + i].double(), rc, rtol=0, atol=1e-6)
            torch.testing.assert_close(sin[b, 2 + i].double(), rs, rtol=0, atol=1e-6)
        tc, ts = _rope_formula(3.0, 3.0, 3.0, axes)  # text token 0 at max(2, 3) on every axis
        torch.testing.assert_close(cos[b, 0].double(), tc, rtol=0, atol=1e-6)
    # a half position is the formula there, not the mean of its integer neighbours
    mid = adapter.rotary(TokenGrid(torch.tensor([[[1.0, 1.0], [1.5, 1.0], [2.0, 1.0]]]), hw), 0)[0][0]
    assert (mid[1] - (mid[0] + mid[2]) / 2).abs().max() > 1e-3


@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_velocity_equals_transformer_forward(adapter, masked):
    emb = _embeds(2, pad=masked)
    cond = adapter.encode_prompt(None, guidance_scale=4.0, **emb)
    assert (cond.data["mask"] is not None) == masked  # the pipeline drops an all-ones mask
    tokens = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(5))
    ref = adapter.transformer(hidden_states=tokens, encoder_hidden_states=emb["prompt_embeds"],
                              encoder_hidden_states_mask=emb["prompt_embeds_mask"], timestep=torch.tensor([0.3, 0.3]),
                              img_shapes=[[(1, 3, 4)]] * 2, return_dict=False)[0]
    pos = grid_positions(3, 4).expand(2, -1, -1)
    ours = adapter.velocity(tokens, TokenGrid(pos, (3, 4), raster=False), torch.tensor(300.0), cond)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [False, True])
@torch.no_grad()
def test_per_image_positions_equal_separate_calls(adapter, cfg):
    emb = _embeds(2, cfg=cfg)
    cond = adapter.encode_prompt(None, guidance_scale=4.0, **emb)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 10, 64, generator=g)
    pos = torch.rand(2, 10, 2, generator=g) * 4
    both = adapter.velocity(tokens, TokenGrid(pos, (4, 4)), torch.tensor(500.0), cond)
    for i in range(2):
        one_emb = {k: v[i : i + 1] for k, v in emb.items()}
        ci = adapter.encode_prompt(None, guidance_scale=4.0, **one_emb)
        one = adapter.velocity(tokens[i : i + 1], TokenGrid(pos[i : i + 1], (4, 4)), torch.tensor(500.0), ci)
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- RALU
@pytest.mark.parametrize("noise", ["reference", "exact"])
@torch.no_grad()
def test_ralu_preset_through_generate(pipe, noise):
    emb = _embeds(2)
    kw = dict(height=96, width=128, speedup="default", noise=noise, output_type="latent", return_masks=True,
              progress=False)
    a = generate(pipe, **emb, generator=_gens(1, 2), **kw)
    assert a.schedule.name == "qwen-image/7x"
    assert a.images.shape == (2, 16, 12, 16) and bool(torch.isfinite(a.images).all())
    assert a.masks.shape == (2, 3, 4)
    b = generate(pipe, **emb, generator=_gens(1, 2), **kw)
    assert torch.equal(a.images, b.images)
    if noise == "exact":
        return
    for i, s in enumerate((1, 2)):
        one = generate(pipe, **{k: v[i : i + 1] for k, v in emb.items()}, generator=_gens(s), **kw)
        torch.testing.assert_close(a.images[i : i + 1], one.images, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_ralu_4x_with_cfg_and_a_text_prompt(pipe):
    out = generate(pipe, "a cat", negative_prompt="blurry", height=64, width=96, speedup="4x", seed=0,
                   output_type="np", progress=False)
    assert out.images.shape == (1, 64, 96, 3) and np.isfinite(out.images).all()


@pytest.mark.slow
@torch.no_grad()
def test_inductor_matches_eager_without_new_graphs():
    """One cold CPU compile of the block function (a minute or two on 2 shared cores); a second resolution and a
    RALU run (mixed stage-2 token sets) add no graphs."""
    from ralu_runtime.compile import compile_stats, uncompile_adapter

    p = build_tiny_qwen_image_pipeline(seed=3)
    emb = _embeds(1)
    kw = dict(speedup=None, num_inference_steps=2, seed=1, output_type="latent", progress=False)
    ref = generate(p, **emb, height=64, width=64, **kw).images
    out = generate(p, **emb, height=64, width=64, backend="inductor", **kw).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    graphs = compile_stats()["unique_graphs"]
    out = generate(p, **emb, height=96, width=128, backend="inductor", **kw).images
    ralu = generate(p, **emb, height=96, width=128, backend="inductor", speedup="7x", seed=2, output_type="latent",
                    progress=False).images
    assert compile_stats()["unique_graphs"] == graphs, "a new resolution or RALU's token sets recompiled"
    uncompile_adapter(p)
    torch.testing.assert_close(out, generate(p, **emb, height=96, width=128, backend="eager", **kw).images,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ralu, generate(p, **emb, height=96, width=128, backend="eager", speedup="7x", seed=2,
                                              output_type="latent", progress=False).images, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_warmup_builds_the_graphs_of_calls_with_and_without_a_negative_prompt():
    """Qwen-Image runs true CFG only with a negative prompt: a warm-up always ran CFG (negative dummy embeddings),
    so the first call without one, the common case, compiled a new graph. warmup(negative_prompt=...) warms the
    path that call takes."""
    from ralu_runtime.compile import compile_stats
    from ralu_runtime.warmup import warmup

    p = build_tiny_qwen_image_pipeline(seed=3)
    kw = dict(height=64, width=64, seed=1, output_type="latent", progress=False)
    for negative in (False, True):
        warmup(p, 64, 64, backend="inductor", text_len=8, runs=1, negative_prompt=negative,
               compile_options={"dynamo_backend": "eager"})   # dynamo's graphs without inductor's codegen
        graphs = compile_stats()["unique_graphs"]
        generate(p, **random_embeds(p, 1, 8, seed=1, cfg=negative), **kw)
        assert compile_stats()["unique_graphs"] == graphs, f"negative_prompt={negative}: the call compiled anew"


# ------------------------------------------------------------------------------------- safety and refusals
def _plain(p, emb):
    return p(**emb, height=64, width=96, num_inference_steps=2, generator=_gens(4), output_type="latent").images


@torch.no_grad()
def test_pipeline_left_as_found_and_a_later_lora_takes_effect():
    pytest.importorskip("peft")
    from tiny_inputs import lora_state_dict

    p = build_tiny_qwen_image_pipeline(seed=0)
    emb = _embeds(1, cfg=True)
    before_plain = _plain(p, emb)
    p.encode_prompt("a cat", device="cpu")  # transformers adds its output-recording hooks on a first text-encoder call
    before = snapshot(p)
    kw = dict(height=64, width=96, speedup="7x", seed=3, output_type="latent", progress=False)
    first = generate(p, **emb, **kw).images
    generate(p, "a cat", height=64, width=64, speedup=None, num_inference_steps=2, seed=0, progress=False)
    assert_same(before, snapshot(p))
    assert torch.equal(_plain(p, emb), before_plain), "plain pipe() changed after generate"

    p.load_lora_weights(lora_state_dict(p.transformer, 4, 7), adapter_name="style")
    lora_plain = _plain(p, emb)
    assert (lora_plain - before_plain).abs().max() > 1e-3  # the LoRA changes the pipeline's result
    lora = generate(p, **emb, **kw).images
    assert (lora - first).abs().max() > 1e-3  # ... and ralu's
    base = generate(p, **emb, height=64, width=96, speedup=None, num_inference_steps=2, generator=_gens(4),
                    output_type="latent", progress=False).images
    torch.testing.assert_close(get_adapter(p).pack(base), lora_plain, rtol=1e-5, atol=1e-5)


def test_refusals_come_before_any_work(monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    p = build_tiny_qwen_image_pipeline(seed=0)
    calls = []
    monkeypatch.setattr(QwenImageAdapter, "encode_prompt", lambda *a, **k: calls.append(1))
    p.transformer.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="QwenDoubleStreamAttnProcessor2_0"):
        generate(p, **_embeds(1), height=64, width=64, progress=False)
    p = build_tiny_qwen_image_pipeline(seed=0)
    p.transformer.register_to_config(zero_cond_t=True)
    with pytest.raises(ValueError, match="zero_cond_t"):
        generate(p, **_embeds(1), height=64, width=64, progress=False)
    assert not calls
    with pytest.raises(ValueError, match="pooled"):
        generate(build_tiny_qwen_image_pipeline(seed=0), **_embeds(1), pooled_prompt_embeds=torch.zeros(1, 32),
                 height=64, width=64, progress=False)


def test_one_step_is_refused_with_a_reason(pipe):
    """Qwen-Image's shift_terminal stretch divides by zero for one step (diffusers' own pipeline returns NaN):
    ``prepare`` refuses it, for text-to-image and for img2img (whose schedule is the pipeline's, truncated)."""
    from ralu_runtime import prepare

    with pytest.raises(ValueError, match="num_inference_steps=1 is not allowed.*shift_terminal=0.02"):
        prepare(pipe, **_embeds(1), height=64, width=64, speedup=None, num_inference_steps=1, seed=0)
    with pytest.raises(ValueError, match="num_inference_steps=1 is not allowed.*shift_terminal"):
        prepare(pipe, **_embeds(1), height=64, width=64, image=torch.rand(1, 3, 64, 64), strength=1.0, speedup=None,
                num_inference_steps=1)
    prepare(pipe, **_embeds(1), height=64, width=64, speedup=None, num_inference_steps=2, seed=0)


def test_random_embeds_shapes():
    from ralu_runtime.tiny.qwen_image import build_qwen_image_pipeline

    full = build_qwen_image_pipeline("full", device="meta", dtype=torch.bfloat16)
    cfg = full.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.joint_attention_dim) == (60, 24, 128,
                                                                                                           3584)
    assert 20e9 < sum(q.numel() for q in full.transformer.parameters()) < 21e9
    emb = random_embeds(full, 2, 16, device="meta", dtype=torch.bfloat16, cfg=True)
    assert emb["prompt_embeds"].shape == emb["negative_prompt_embeds"].shape == (2, 16, 3584)
    cond = get_adapter(full).encode_prompt(None, None, **emb, guidance_scale=4.0)
    assert cond.batch == 2 and cond.data["cfg"] and cond.data["embeds"].shape == (4, 16, 3584)
