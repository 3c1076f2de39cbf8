"""HunyuanVideo 1.5 (HunyuanVideo15Pipeline, text-to-video) on a tiny random pipeline: the baseline equals diffusers
(Qwen embeddings with masks and CFG, text prompts with glyph text through both offline encoders, decoded video), the
adapter's explicit-position 3-D rotary tables equal the model's forward on the integer grid and the formula at half
positions, per-image positions, RALU presets through generate, the pipeline left as found, refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ralu_runtime import generate
from ralu_runtime.adapters import TokenGrid, get_adapter
from ralu_runtime.adapters.hunyuan_video15 import HunyuanVideo15Adapter
from ralu_runtime.layout import grid_positions
from ralu_runtime.tiny.hunyuan_video15 import (TEXT_2_DIM, TEXT_DIM, build_tiny_hunyuan_video15_pipeline,
                                               random_embeds)
from helpers import assert_same, snapshot

H, W, NF = 64, 96, 9  # 3 latent frames of 4 x 6


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_hunyuan_video15_pipeline(seed=0)


@pytest.fixture(scope="module")
def adapter(pipe):
    return HunyuanVideo15Adapter(pipe)


def _embeds(b=1, t=8, seed=0, cfg=False):
    """Qwen embeddings (b, t, 32) with the last 3 tokens of image 0 masked (and, with cfg, a negative pair with a
    different mask)."""
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(b, t, TEXT_DIM, generator=g),
           "prompt_embeds_mask": torch.ones(b, t, dtype=torch.long)}
    out["prompt_embeds_mask"][0, t - 3:] = 0
    if cfg:
        out["negative_prompt_embeds"] = torch.randn(b, t, TEXT_DIM, generator=g)
        out["negative_prompt_embeds_mask"] = torch.ones(b, t, dtype=torch.long)
        out["negative_prompt_embeds_mask"][:, t - 5:] = 0
    return out


def _no_glyph(b, cfg):
    """The pipeline's byT5 encoding of prompts without quoted text: zeros, all masked."""
    z = {"prompt_embeds_2": torch.zeros(b, 256, TEXT_2_DIM), "prompt_embeds_mask_2": torch.zeros(b, 256)}
    if cfg:
        z.update(negative_prompt_embeds_2=z["prompt_embeds_2"], negative_prompt_embeds_mask_2=z["prompt_embeds_mask_2"])
    return z


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("cfg", [False, True])
@torch.no_grad()
def test_baseline_equals_diffusers_with_embeddings(pipe, cfg):
    emb = _embeds(2, cfg=cfg)
    gs = 6.0 if cfg else 1.0
    pipe.guider.guidance_scale = gs
    try:
        ref = pipe(**emb, **_no_glyph(2, cfg), height=H, width=W, num_frames=NF, num_inference_steps=3,
                   generator=_gens(3, 4), output_type="latent").frames
    finally:
        pipe.guider.guidance_scale = 6.0
    out = generate(pipe, **emb, height=H, width=W, num_frames=NF, speedup=None, num_inference_steps=3,
                   guidance_scale=gs, generator=_gens(3, 4), output_type="latent", progress=False).images
    assert out.shape == (2, 4, 3, 4, 6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_baseline_equals_diffusers_with_text_prompts(pipe):
    """Both encoders (a quoted glyph text for byT5 in one prompt), the default guidance 6 with the empty negative
    prompt."""
    prompts = ['a cat holding a sign that says "hello"', "a dog"]
    ref = pipe(prompt=prompts, height=H, width=W, num_frames=NF, num_inference_steps=2, generator=_gens(1, 2),
               output_type="latent").frames
    out = generate(pipe, prompts, height=H, width=W, num_frames=NF, speedup=None, num_inference_steps=2,
                   generator=_gens(1, 2), output_type="latent", progress=False).images
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_decoded_video_equals_diffusers(pipe):
    """The VAE decode and the pipeline's postprocessing (one video: diffusers 0.42.1's VAE fails for a batch of 2
    unless slicing is on)."""
    emb = _embeds(1)
    pipe.guider.guidance_scale = 1.0
    try:
        ref = pipe(**emb, **_no_glyph(1, False), height=H, width=W, num_frames=5, num_inference_steps=1,
                   generator=_gens(1), output_type="np").frames
    finally:
        pipe.guider.guidance_scale = 6.0
    out = generate(pipe, **emb, height=H, width=W, num_frames=5, speedup=None, num_inference_steps=1,
                   guidance_scale=1.0, generator=_gens(1), output_type="np", progress=False).images
    assert out.shape == ref.shape == (1, 5, H, W, 3)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_tiny_tokenizer_drops_exactly_the_template(pipe):
    tok = pipe.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": pipe.system_message},
                                    {"role": "user", "content": "zq"}], tokenize=False, add_generation_prompt=True)
    ids = tok(text).input_ids[pipe.prompt_template_encode_start_idx:]
    assert tok.decode(ids).startswith("zq<|im_end|>")


def test_preset_shift_is_the_schedulers_shift(adapter):
    assert adapter.preset_base_shift(704, 1280) == 9.0 == adapter.pipe.scheduler.config.shift
    ts, sig = adapter.baseline_schedule(50, 1000)
    ref = 9.0 * np.linspace(1, 0, 51)[:-1] / (1 + 8.0 * np.linspace(1, 0, 51)[:-1])
    np.testing.assert_allclose(sig[:-1].numpy(), ref, rtol=1e-6)
    p = adapter.pipe
    h, w = p.video_processor.calculate_default_height_width(9, 16, p.target_size)  # the pipeline's own default
    assert adapter.default_hw() == (h // 32 * 32, w // 32 * 32) and adapter.default_size == 64  # tiny target 64


def test_default_guidance_is_the_guiders_at_each_call():
    """The pipeline reads its guider's guidance_scale on every call: a guider changed or replaced after a ralu call
    sets the next call's default (it was read once, when the adapter was built)."""
    from ralu_runtime import prepare

    pipe = build_tiny_hunyuan_video15_pipeline(seed=0)
    kw = dict(height=H, width=W, num_frames=5, speedup=None, num_inference_steps=2, **_embeds(1, cfg=True))
    assert prepare(pipe, **kw).guidance == 6.0
    pipe.guider = pipe.guider.new(guidance_scale=2.0)
    assert prepare(pipe, **kw).guidance == 2.0
    pipe.guider.guidance_scale = 3.5
    assert prepare(pipe, **kw).guidance == 3.5 and get_adapter(pipe).guidance_default() == 3.5
    assert prepare(pipe, guidance_scale=5.0, **kw).guidance == 5.0


# --------------------------------------------------------------------------------------------- positions
def _tall(frames, h, w, b=1):
    return grid_positions(frames * h, w)[None].expand(b, -1, -1)


@pytest.mark.parametrize("cfg", [False, True])
@torch.no_grad()
def test_velocity_on_tall_positions_equals_transformer_forward(adapter, cfg):
    """Explicit positions (raster=False) of the frames-stacked grid, masked Qwen tokens, glyph tokens in one image:
    the adapter's own block loop equals the model's forward on the integer (F, h, w) grid."""
    tr = adapter.transformer
    f, h, w = 3, 4, 6
    g = torch.Generator().manual_seed(5)
    lat = torch.randn(2, 4, f, h, w, generator=g)
    emb = _embeds(2, cfg=cfg)
    e2 = torch.randn(2, 10, TEXT_2_DIM, generator=g)
    m2 = torch.zeros(2, 10)
    m2[1, :4] = 1
    cond = adapter.encode_prompt(None, guidance_scale=6.0 if cfg else 1.0, prompt_embeds_2=e2, prompt_embeds_mask_2=m2,
                                 negative_prompt_embeds_2=e2 if cfg else None,
                                 negative_prompt_embeds_mask_2=torch.ones(2, 10) if cfg else None, **emb)
    assert not cond.data["all_valid"] and cond.data["cfg"] == cfg
    t = torch.tensor(700.0)
    ours = adapter.velocity(adapter.pack(lat), TokenGrid(_tall(f, h, w, 2), (f * h, w), raster=False, frames=f), t,
                            cond)

    def fwd(e, m, e2_, m2_):
        inp = torch.cat([lat, torch.zeros_like(lat), torch.zeros(2, 1, f, h, w)], 1)
        return tr(hidden_states=inp, timestep=t.expand(2), encoder_hidden_states=e, encoder_attention_mask=m,
                  encoder_hidden_states_2=e2_, encoder_attention_mask_2=m2_, image_embeds=torch.zeros(2, 729, 16),
                  return_dict=False)[0]

    ref = fwd(emb["prompt_embeds"], emb["prompt_embeds_mask"], e2, m2)
    if cfg:
        neg = fwd(emb["negative_prompt_embeds"], emb["negative_prompt_embeds_mask"], e2, torch.ones(2, 10))
        ref = neg + 6.0 * (ref - neg)
    torch.testing.assert_close(adapter.unpack(ours, h, w), ref, rtol=1e-5, atol=1e-5)


def _formula(frame, row, col, axes=(4, 6, 6), theta=256.0):
    out = []
    for p, d in zip((frame, row, col), axes):
        out.append(p / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.cat(out).repeat_interleave(2)
    return torch.cos(ang), torch.sin(ang)


def test_rotary_on_the_integer_grid_and_at_half_positions(adapter):
    f, h, w = 3, 4, 6
    cos, sin = adapter.rotary(TokenGrid(_tall(f, h, w), (f * h, w), raster=True, frames=f))
    rc, rs = adapter.transformer.rope(torch.zeros(1, 9, f, h, w))
    torch.testing.assert_close(cos[0], rc, rtol=0, atol=0)
    torch.testing.assert_close(sin[0], rs, rtol=0, atol=0)
    # tall rows -> (frame, row in frame); children at +0.5 stay in their frame; per image
    pos = torch.tensor([[[0.0, 0.0], [3.5, 5.5], [4.0, 0.5], [11.5, 2.0]],
                        [[7.5, 1.0], [8.0, 2.5], [0.5, 0.5], [5.0, 5.0]]])
    cos, sin = adapter.rotary(TokenGrid(pos, (f * h, w), frames=f))
    for b in range(2):
        for i in range(4):
            r, c = pos[b, i].tolist()
            fr = int(r // h)
            ec, es = _formula(fr, r - fr * h, c)
            torch.testing.assert_close(cos[b, i].double(), ec, rtol=0, atol=1e-6)
            torch.testing.assert_close(sin[b, i].double(), es, rtol=0, atol=1e-6)


@torch.no_grad()
def test_per_image_positions_equal_separate_calls(adapter):
    emb = _embeds(2, cfg=True)
    cond = adapter.encode_prompt(None, guidance_scale=6.0, **emb)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 10, 4, generator=g)
    pos = torch.rand(2, 10, 2, generator=g) * torch.tensor([6.0, 3.0])
    grid = TokenGrid(pos, (6, 3), frames=3)
    both = adapter.velocity(tokens, grid, torch.tensor(500.0), cond)
    for i in range(2):
        ci = adapter.encode_prompt(None, guidance_scale=6.0, **{k: v[i:i + 1] for k, v in emb.items()})
        one = adapter.velocity(tokens[i:i + 1], TokenGrid(pos[i:i + 1], (6, 3), frames=3), torch.tensor(500.0), ci)
        torch.testing.assert_close(both[i:i + 1], one, rtol=1e-5, atol=1e-5)


def test_edge_images_are_one_decoded_frame_per_latent_frame(adapter):
    video = torch.arange(9.0).view(1, 1, 9, 1, 1).expand(2, 3, 9, 2, 5)
    lat = torch.zeros(2, 4, 3, 1, 1)
    img = adapter.edge_images(lat, lambda z: video)
    assert img.shape == (2, 3, 6, 5)
    assert img[0, 0, :, 0].tolist() == [0, 0, 4, 4, 8, 8]


# ------------------------------------------------------------------------------------------------- RALU
@pytest.mark.slow
@pytest.mark.parametrize("noise", ["reference", "exact"])
@torch.no_grad()
def test_ralu_preset_through_generate(pipe, noise):
    emb = _embeds(2, cfg=True)
    kw = dict(height=H, width=W, num_frames=NF, speedup="default", noise=noise, output_type="latent",
              return_masks=True, progress=False)
    a = generate(pipe, **emb, generator=_gens(1, 2), **kw)
    assert a.schedule.name == "hunyuan-video-1.5/7x"
    assert a.images.shape == (2, 4, 3, 4, 6) and bool(torch.isfinite(a.images).all())
    b = generate(pipe, **emb, generator=_gens(1, 2), **kw)
    assert torch.equal(a.images, b.images)
    if noise == "exact":
        return
    for i, s in enumerate((1, 2)):
        one = generate(pipe, **{k: v[i:i + 1] for k, v in emb.items()}, generator=_gens(s), **kw)
        torch.testing.assert_close(a.images[i:i + 1], one.images, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_ralu_4x_to_video(pipe):
    out = generate(pipe, **_embeds(1, cfg=True), height=H, width=W, num_frames=5, speedup="4x", seed=0,
                   output_type="np", progress=False)
    assert out.images.shape == (1, 5, H, W, 3) and np.isfinite(out.images).all()


# ------------------------------------------------------------------------------------- safety and refusals
@torch.no_grad()
def test_pipeline_left_as_found_and_refusals(monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    p = build_tiny_hunyuan_video15_pipeline(seed=0)
    emb = _embeds(1, cfg=True)

    def plain():
        return p(**emb, **_no_glyph(1, True), height=H, width=W, num_frames=5, num_inference_steps=2,
                 generator=_gens(4), output_type="latent").frames

    before_plain = plain()
    p.encode_prompt("a cat", device="cpu")  # transformers adds output-recording hooks on a first encoder call
    before = snapshot(p, extra={"guider": p.guider})
    generate(p, **emb, height=H, width=W, num_frames=5, speedup="7x", seed=3, output_type="latent", progress=False)
    generate(p, "a cat", height=H, width=W, num_frames=5, speedup=None, num_inference_steps=2, seed=0, progress=False)
    assert_same(before, snapshot(p, extra={"guider": p.guider}))
    assert torch.equal(plain(), before_plain), "plain pipe() changed after generate"

    calls = []
    monkeypatch.setattr(HunyuanVideo15Adapter, "encode_prompt", lambda *a, **k: calls.append(1))
    p.transformer.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match="HunyuanVideo15AttnProcessor2_0"):
        generate(p, **emb, height=H, width=W, num_frames=5, progress=False)
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

    p.transformer.transformer_blocks[1].attn.set_processor(HunyuanVideo15AttnProcessor2_0())
    p.guider._stop = 0.5
    with pytest.raises(ValueError, match="step window"):
        generate(p, **emb, height=H, width=W, num_frames=5, progress=False)
    p.guider._stop = 1.0
    with pytest.raises(ValueError, match="num_frames"):
        generate(p, **emb, height=H, width=W, num_frames=6, progress=False)
    with pytest.raises(ValueError, match="max_sequence_length=64 does not apply to HunyuanVideo15Pipeline"):
        generate(p, "a cat", height=H, width=W, num_frames=5, max_sequence_length=64, progress=False)  # was ignored
    assert not calls


def test_full_size_config_and_random_embeds():
    from ralu_runtime.tiny.hunyuan_video15 import build_hunyuan_video15_pipeline

    full = build_hunyuan_video15_pipeline("full", device="meta", dtype=torch.bfloat16)
    cfg = full.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.in_channels) == (54, 16, 128, 65)
    assert 8.0e9 < sum(q.numel() for q in full.transformer.parameters()) < 8.6e9
    emb = random_embeds(full, 2, 16, device="meta", dtype=torch.bfloat16, cfg=True)
    assert emb["prompt_embeds"].shape == emb["negative_prompt_embeds"].shape == (2, 16, 3584)
    ad = get_adapter(full)
    cond = ad.encode_prompt(None, None, **emb, guidance_scale=6.0)
    assert cond.batch == 2 and cond.data["cfg"] and cond.data["embeds"].shape == (4, 16, 3584)
    assert ad.default_hw() == (704, 1280) and ad.preset_base_shift(704, 1280) == 9.0
    noise = ad.prepare_noise(1, 704, 1280, None, torch.bfloat16, num_frames=121)
    assert noise.shape == (1, 32, 31, 44, 80)
    tokens = ad.pack(torch.empty(1, 32, 2, 4, 6, device="meta", dtype=torch.bfloat16))
    v = ad.velocity(tokens, TokenGrid(_tall(2, 4, 6).to("meta"), (8, 6), raster=True, frames=2),
                    torch.tensor(900.0, device="meta"), ad.encode_prompt(None, **random_embeds(
                        full, 1, 16, device="meta", dtype=torch.bfloat16), guidance_scale=1.0))
    assert v.shape == tokens.shape


@pytest.mark.slow
@torch.no_grad()
def test_inductor_matches_eager_without_new_graphs():
    """One cold CPU compile of the block function; a second resolution and a RALU run (mixed stage-2 token sets, CFG
    with differently masked halves) add no graphs."""
    from ralu_runtime.compile import compile_stats, uncompile_adapter

    p = build_tiny_hunyuan_video15_pipeline(seed=3, num_layers=1)
    emb = _embeds(1, cfg=True)
    kw = dict(num_frames=5, speedup=None, num_inference_steps=2, seed=1, output_type="latent", progress=False)
    ref = generate(p, **emb, height=64, width=64, **kw).images
    out = generate(p, **emb, height=64, width=64, backend="inductor", **kw).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    graphs = compile_stats()["unique_graphs"]
    out = generate(p, **emb, height=H, width=W, backend="inductor", **kw).images
    ralu = generate(p, **emb, height=H, width=W, num_frames=5, backend="inductor", speedup="7x", seed=2,
                    output_type="latent", progress=False).images
    assert compile_stats()["unique_graphs"] == graphs, "a new resolution or RALU's token sets recompiled"
    uncompile_adapter(p)
    torch.testing.assert_close(out, generate(p, **emb, height=H, width=W, backend="eager", **kw).images,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ralu, generate(p, **emb, height=H, width=W, num_frames=5, backend="eager",
                                              speedup="7x", seed=2, output_type="latent", progress=False).images,
                               rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_transformer_lora_loaded_later_takes_effect():
    """HunyuanVideo15Pipeline has no load_lora_weights in diffusers 0.42.1; the transformer's own PEFT loader
    (load_lora_adapter) is used after a first generate: ralu's result changes and still equals the pipeline's."""
    pytest.importorskip("peft")
    from tiny_inputs import lora_state_dict

    p = build_tiny_hunyuan_video15_pipeline(seed=0, num_layers=1)
    emb = _embeds(1)
    kw = dict(height=H, width=W, num_frames=5, num_inference_steps=2, guidance_scale=1.0, speedup=None,
              generator=_gens(4), output_type="latent", progress=False)
    first = generate(p, **emb, **kw).images
    p.transformer.load_lora_adapter(lora_state_dict(p.transformer, 4, 7), prefix="transformer", adapter_name="style")
    lora = generate(p, **emb, **{**kw, "generator": _gens(4)}).images
    assert (lora - first).abs().max() > 1e-3
    p.guider.guidance_scale = 1.0
    ref = p(**emb, **_no_glyph(1, False), height=H, width=W, num_frames=5, num_inference_steps=2, generator=_gens(4),
            output_type="latent").frames
    torch.testing.assert_close(lora, ref, rtol=1e-5, atol=1e-5)
