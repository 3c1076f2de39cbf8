"""img2img with ralu (ralu_runtime.editing): parity with diffusers' FluxImg2ImgPipeline and
StableDiffusion3Img2ImgPipeline for speedup=None, RALU's stage mapping onto the shortened schedule, refusals."""
import numpy as np
import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.editing import edit_cost, edit_stages, mixed_start, start_index, truncated_sigmas
from ralu_runtime.layout import TokenLayout, grid_positions
from ralu_runtime.schedule import get_preset
from tiny_inputs import flux_embeds, sd3_embeds

H, W = 64, 96


def _img(n=1, seed=5):
    return torch.rand(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def _gen(s):
    return torch.Generator().manual_seed(s)


@pytest.fixture(scope="module")
def flux_i2i(flux_pipe):
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline(**flux_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3_i2i(sd3_pipe):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_inpaint(flux_pipe):
    from diffusers import FluxInpaintPipeline

    pipe = FluxInpaintPipeline(**flux_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mask(n=1, h=H, w=W, box=(8, 40, 16, 56)):
    m = torch.zeros(n, 1, h, w)
    m[..., box[0]:box[1], box[2]:box[3]] = 1
    return m


def _flux_ref(pipe, **kw):
    lat = pipe(height=H, width=W, output_type="latent", **kw).images
    return pipe._unpack_latents(lat, H, W, pipe.vae_scale_factor)


def _ours(pipe, **kw):
    kw.setdefault("speedup", None)
    return generate(pipe, height=H, width=W, output_type="latent", progress=False, **kw).images


# ------------------------------------------------------------------------------------------ parity (speedup=None)
@pytest.mark.parametrize("strength", [0.3, 1.0])
@torch.no_grad()
def test_flux_img2img_equals_diffusers_with_embeddings(flux_i2i, strength):
    kw = dict(**flux_embeds(), image=_img(), strength=strength, num_inference_steps=6, guidance_scale=3.5)
    ref = _flux_ref(flux_i2i, generator=_gen(1), **kw)
    torch.testing.assert_close(_ours(flux_i2i, generator=_gen(1), **kw), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_flux_img2img_equals_diffusers_with_text_and_default_guidance(flux_i2i):
    kw = dict(prompt="a red fox", image=_img(), strength=0.6, num_inference_steps=5, max_sequence_length=16)
    ref = _flux_ref(flux_i2i, generator=_gen(2), **kw)  # the pipeline's default guidance 7.0 on both sides
    torch.testing.assert_close(_ours(flux_i2i, generator=_gen(2), **kw), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sd3_img2img_equals_diffusers(sd3_i2i):
    kw = dict(**sd3_embeds(), image=_img(), strength=0.6, num_inference_steps=5, guidance_scale=5.0)
    ref = sd3_i2i(height=H, width=W, output_type="latent", generator=_gen(3), **kw).images
    torch.testing.assert_close(_ours(sd3_i2i, generator=_gen(3), **kw), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_to_image_pipeline_with_image_is_the_img2img_pipeline(flux_pipe, flux_i2i):
    kw = dict(**flux_embeds(), image=_img(), strength=0.5, num_inference_steps=4, guidance_scale=3.5)
    a = _ours(flux_pipe, generator=_gen(4), **kw)
    torch.testing.assert_close(a, _ours(flux_i2i, generator=_gen(4), **kw), rtol=0, atol=0)
    torch.testing.assert_close(a, _flux_ref(flux_i2i, generator=_gen(4), **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_batch_of_two_equals_diffusers_and_single_runs(flux_i2i, sd3_i2i):
    for pipe, emb, ref_fn in ((flux_i2i, flux_embeds, _flux_ref), (sd3_i2i, sd3_embeds, None)):
        kw = dict(image=_img(2), strength=0.7, num_inference_steps=4, guidance_scale=4.0)
        e2 = emb(2)
        both = _ours(pipe, generator=[_gen(7), _gen(8)], **e2, **kw)
        if ref_fn is not None:
            ref = ref_fn(pipe, generator=[_gen(7), _gen(8)], **e2, **kw)
        else:
            ref = pipe(height=H, width=W, output_type="latent", generator=[_gen(7), _gen(8)], **e2, **kw).images
        torch.testing.assert_close(both, ref, rtol=1e-5, atol=1e-5)
        for i, s in enumerate((7, 8)):
            one = {k: v[i:i + 1] for k, v in e2.items()}
            single = _ours(pipe, generator=_gen(s), **one, **{**kw, "image": kw["image"][i:i + 1]})
            torch.testing.assert_close(both[i:i + 1], single, rtol=1e-5, atol=1e-5)
        # RALU: batch of two equals single runs too (stage 1 entry: regions, transitions, per-image seeds)
        r = dict(kw, strength=1.0, num_inference_steps=None, speedup="4x" if pipe is flux_i2i else "3x")
        both = _ours(pipe, generator=[_gen(7), _gen(8)], **e2, **r)
        for i, s in enumerate((7, 8)):
            one = {k: v[i:i + 1] for k, v in e2.items()}
            single = _ours(pipe, generator=_gen(s), **one, **{**r, "image": r["image"][i:i + 1]})
            torch.testing.assert_close(both[i:i + 1], single, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_one_image_tiled_over_the_batch_with_one_generator(flux_i2i):
    kw = dict(**flux_embeds(2), image=_img(1), strength=0.5, num_inference_steps=3, guidance_scale=3.5)
    ref = _flux_ref(flux_i2i, generator=_gen(9), **kw)
    torch.testing.assert_close(_ours(flux_i2i, generator=_gen(9), **kw), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ RALU stage mapping
def test_truncated_sigmas_keep_the_stage_and_shorten_it():
    s = get_preset("flux", "4x")
    for k in range(3):
        np.testing.assert_array_equal(truncated_sigmas(s, k, s.starts[k]), s.stage_sigmas(k))
    t = 0.5 * (s.starts[2] + 1.0)
    sig = truncated_sigmas(s, 2, t)
    assert sig[0] == pytest.approx(1 - t) and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)
    assert 1 <= len(sig) - 1 <= s.steps[2]
    assert len(truncated_sigmas(s, 2, 1 - 1e-6)) == 2  # at least one step


@pytest.mark.parametrize("preset", ["4x", "7x"])
def test_edit_stages_enter_the_last_stage_started_before_t(preset):
    s = get_preset("flux", preset)
    s1, s2, s3 = s.starts
    assert edit_stages(s, 1.0).steps == s.steps and edit_stages(s, 1.0).entry == 0
    assert edit_stages(s, 1 - 0.5 * s2).entry == 0
    assert edit_stages(s, 1 - 0.5 * (s2 + s3)).entry == 1
    assert edit_stages(s, 1 - 0.5 * (s3 + 1)).entry == 2
    mid = edit_stages(s, 1 - 0.5 * (s2 + s3))
    assert mid.steps[0] == 0 and mid.steps[2] == s.steps[2] and 1 <= mid.steps[1] <= s.steps[1]
    with pytest.raises(ValueError, match="sigma_start"):
        edit_stages(s, 0.0)


def test_edit_cost_at_full_size_strengths():
    """FLUX.1-dev 1024^2 (4096 tokens, 28-step schedule, dynamic shift mu = 1.15): the table of docs/editing.md."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=1.15)
    entries = {}
    for strength in (0.3, 0.6, 0.9):
        sigma = float(sched.sigmas[start_index(28, strength)])
        for preset in ("4x", "7x"):
            entries[preset, strength] = edit_stages(get_preset("flux", preset), sigma).entry
            cost = edit_cost(get_preset("flux", preset), sigma, 4096)
            assert sum(n for n, _ in cost) <= 28 - start_index(28, strength)
    assert entries == {("4x", 0.3): 2, ("7x", 0.3): 2, ("4x", 0.6): 2, ("7x", 0.6): 2, ("4x", 0.9): 0,
                       ("7x", 0.9): 0}


@pytest.mark.slow
@pytest.mark.parametrize("family,preset,stages", [
    ("flux", "7x", {0.3: ["stage3"], 0.6: ["stage3"], 0.9: ["stage2", "stage3"]}),
    ("sd3", "3x", {0.3: ["stage3"], 0.6: ["stage3"], 0.9: ["stage1", "stage2", "stage3"]}),
])
@torch.no_grad()
def test_ralu_img2img_skips_stages_by_strength(family, preset, stages, flux_i2i, sd3_i2i):
    pipe, emb = (flux_i2i, flux_embeds()) if family == "flux" else (sd3_i2i, sd3_embeds())
    for strength, expected in stages.items():
        out = generate(pipe, **emb, image=_img(), strength=strength, height=H, width=W, speedup=preset, seed=3,
                       output_type="latent", return_masks=True, progress=False)
        assert [r.name for r in out.records if r.name.startswith("stage")] == expected
        assert out.images.shape == (1, 16, 8, 12) and torch.isfinite(out.images).all()
        assert (out.masks is None) == ("stage2" not in expected)
        if out.masks is not None:
            assert out.masks.shape == (1, 2, 3)


@pytest.mark.slow
@torch.no_grad()
def test_ralu_img2img_is_deterministic_per_seed(flux_i2i):
    kw = dict(**flux_embeds(), image=_img(), height=H, width=W, speedup="4x", output_type="latent", progress=False)
    for strength in (0.9, 1.0):
        a = generate(flux_i2i, strength=strength, seed=11, **kw).images
        torch.testing.assert_close(a, generate(flux_i2i, strength=strength, seed=11, **kw).images, rtol=0, atol=0)
        assert not torch.equal(a, generate(flux_i2i, strength=strength, seed=12, **kw).images)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-qwen-image"])
@torch.no_grad()
def test_edits_and_text_to_image_do_not_change_each_other(name):
    """Same seed, same image across call kinds: after inpainting and img2img calls (another size, the baseline) a
    text-to-image call equals it on a fresh pipeline, and an inpainting call after text-to-image calls too, images
    (VAE encodes and decodes; Qwen-Image's VAE keeps caches on the module) and regions bitwise."""
    from ralu_runtime.tiny import build_tiny

    kw = dict(prompt="a red fox", height=H, width=W, output_type="np", progress=False, return_masks=True, seed=3)
    inpaint = dict(image=_img(), mask_image=_mask(), strength=0.8)
    pipe, fresh = build_tiny(name), build_tiny(name)
    generate(pipe, **{**kw, "height": 96, "width": 64}, image=torch.rand(1, 3, 96, 64, generator=_gen(6)), strength=0.6)
    generate(pipe, **kw, **inpaint, speedup=None, num_inference_steps=2)
    got = generate(pipe, **kw)
    want = generate(fresh, **kw)
    assert np.array_equal(got.images, want.images) and torch.equal(got.masks, want.masks)
    got = generate(pipe, **kw, **inpaint)
    assert np.array_equal(got.images, generate(build_tiny(name), **kw, **inpaint).images)


def test_mixed_start_matches_the_transition_layout(flux_pipe):
    """Stage-2 entry tokens sit in the order and at the positions the 1 -> 2 transition gives them."""
    from ralu_kernels.transition import stage_transition

    adapter = get_adapter(flux_pipe)
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 16, 8, 12, generator=g)
    layout = TokenLayout((2, 3), torch.tensor([[1, 4], [0, 5]]))
    x, pos = mixed_start(adapter, layout, lat, noise, 0.0)
    coarse_pos = grid_positions(2, 3).expand(2, -1, -1).contiguous()
    tm = layout.transition_12()
    _, ref_pos = stage_transition(torch.zeros(2, 6, 64), coarse_pos, tm.src_index, tm.group, tm.child,
                                  torch.zeros(2, dtype=torch.int64), a=1.0, b=0.0, c=0.0, pos_scale=tm.pos_scale,
                                  order=tm.order, num_up=tm.num_up, impl="torch")
    torch.testing.assert_close(pos, ref_pos)
    fine = adapter.pack(lat)
    # image 0: parent 1 = coarse (0, 1): its child q = 3 is fine (1, 3) -> fine raster 1 * 6 + 3
    torch.testing.assert_close(x[0, 3], fine[0, 9])
    coarse = adapter.pack(torch.nn.functional.avg_pool2d(lat, 2))
    torch.testing.assert_close(x[0, 8:], coarse[0, [0, 2, 3, 5]])


# ------------------------------------------------------------------------------------------ refusals
def _refuses(pipe, match, **kw):
    kw = {"image": _img(), "height": H, "width": W, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        generate(pipe, **flux_embeds(), progress=False, **kw)


@pytest.mark.parametrize("strength,match", [(0.0, "0 < strength"), (1.5, "0 < strength"), (-0.1, "0 < strength"),
                                            (float("nan"), "number"), ("0.5", "number"), (True, "number"),
                                            (1e-17, r"strength=1e-17 leaves none of the 28 steps")])
def test_bad_strength_is_refused(flux_i2i, strength, match):
    _refuses(flux_i2i, match, strength=strength)
    # a strength that leaves no step: the baseline ran none (returned the source), RALU failed after the encode
    if isinstance(strength, float) and 0 < strength < 1:
        _refuses(flux_i2i, match.replace("28", "4"), strength=strength, speedup=None, num_inference_steps=4)


def test_unsupported_edit_requests_are_refused(flux_pipe, flux_i2i, flux_inpaint):
    _refuses(flux_i2i, "editing pipeline: give image", image=None)
    _refuses(flux_inpaint, "editing pipeline: give image", image=None)
    _refuses(flux_pipe, "strength= goes with image", image=None, strength=0.5)
    _refuses(flux_pipe, "mask_image= goes with image", image=None, mask_image=_mask())
    _refuses(flux_inpaint, "give mask_image")
    _refuses(flux_i2i, "no pixel to repaint", mask_image=torch.zeros(1, 1, H, W))
    _refuses(flux_i2i, "number of masks must divide", mask_image=torch.ones(3, 1, H, W), num_images_per_prompt=2)
    _refuses(flux_i2i, r"a 3-D tensor is read as \(n, H, W\) masks", mask_image=torch.ones(3, H, W))
    fill = type("Fill", (), {"config": type("C", (), {"in_channels": 384})()})()  # FLUX.1 Fill's input width
    from ralu_runtime.editing import check_edit

    class _FillAdapter:
        family, is_video = "flux", False
        pipe = type("P", (), {"transformer": fill, "vae": flux_pipe.vae, "image_processor": None})()

    with pytest.raises(ValueError, match="extra input channels"):
        check_edit(_FillAdapter(), image=_img(), strength=0.5, mask_image=_mask(), height=H, width=W, batch=1,
                   num_inference_steps=None)
    _refuses(flux_i2i, "must divide the batch", image=_img(3), num_images_per_prompt=2)
    _refuses(flux_i2i, "RGB pixels", image=torch.zeros(1, 16, 8, 12))
    _refuses(flux_i2i, "image processor cannot read", image="not an image")
    from PIL import Image

    _refuses(flux_i2i, r"image is empty \(size \(0, 0\)\)", image=Image.new("RGB", (0, 0)))
    _refuses(flux_i2i, r"image\[1\] is empty", image=[_img(), np.zeros((0, 64, 3), np.uint8)],
             num_images_per_prompt=2)
    _refuses(flux_i2i, "mask_image is empty", mask_image=Image.new("L", (64, 0)))
    _refuses(flux_i2i, "multiple of 32", height=H + 8)
    # an empty list was diffusers' IndexError; a NaN in a mask ran every stage, then failed as "non-finite latents"
    _refuses(flux_i2i, r"image=\[\] holds no image", image=[])
    _refuses(flux_i2i, r"mask_image=\[\] holds no image", mask_image=[])
    nan_mask = _mask()
    nan_mask[..., 0, 0] = float("nan")
    _refuses(flux_i2i, "mask_image contains NaN values", mask_image=nan_mask)
    _refuses(flux_inpaint, "mask_image contains NaN values", mask_image=nan_mask)
    # an RGBA PNG opened with PIL: the processor keeps four channels; the error says to convert it
    _refuses(flux_i2i, r"mode RGBA: convert it, e.g. image.convert\('RGB'\)", image=Image.new("RGBA", (W, H)))


def test_8bit_pixel_arrays_are_refused_before_any_model_call(flux_pipe, flux_i2i, flux_inpaint):
    """The image processors map float pixels in [0, 1] to [-1, 1]; an 8-bit array or tensor (np.asarray of a PIL
    image) came out in [-1, 509] and was encoded as garbage without an error (diffusers' pipelines too)."""
    from diffusers import FluxKontextPipeline

    calls = []
    hook = flux_pipe.vae.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        u8 = (np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)
        for pipe, kw in ((flux_i2i, {}), (flux_inpaint, {"mask_image": _mask()}), (flux_i2i, {"strength": 1.0})):
            _refuses(pipe, "image has pixel values of magnitude up to 50[0-9]", image=u8, **kw)
        _refuses(flux_i2i, "image has pixel values", image=torch.from_numpy(u8).permute(2, 0, 1))
        kontext = FluxKontextPipeline(**flux_pipe.components)
        with pytest.raises(ValueError, match="image has pixel values of magnitude up to 50[0-9]"):
            generate(kontext, **flux_embeds(), image=u8[None], max_area=H * W, height=H, width=W, progress=False)
    finally:
        hook.remove()
    assert not calls
    # float pixels in [0, 1] (and tensors already in [-1, 1], as diffusers takes them) still run
    for img in (u8 / 255.0, _img() * 2 - 1):
        generate(flux_i2i, **flux_embeds(), image=img, height=H, width=W, speedup=None, num_inference_steps=2,
                 output_type="latent", progress=False)


def test_tensors_the_processors_cannot_resize_are_a_type_error_naming_the_argument(flux_pipe, flux_inpaint):
    """torch's resize takes no bool or integer tensors and stacking differently sized images fails: these were torch's
    NotImplementedError / RuntimeError, naming no argument; now a TypeError naming it and its dtype."""
    from diffusers import FluxKontextPipeline

    with pytest.raises(TypeError, match=r"mask_image=Tensor of dtype torch.bool: the pipeline's mask processor"):
        generate(flux_inpaint, **flux_embeds(), image=_img(), mask_image=_mask() > 0.5, height=H, width=W,
                 progress=False)
    with pytest.raises(TypeError, match=r"image=Tensor of dtype torch.int64: the pipeline's image processor"):
        generate(flux_inpaint, **flux_embeds(), image=(_img() > 0.5).long(), mask_image=_mask(), height=H, width=W,
                 progress=False)
    with pytest.raises(TypeError, match=r"image=list: the pipeline's image processor cannot read it \(stack"):
        generate(flux_inpaint, **flux_embeds(), image=[_img()[0], torch.rand(3, 32, 32)], mask_image=_mask(),
                 num_images_per_prompt=2, height=H, width=W, progress=False)
    kontext = FluxKontextPipeline(**flux_pipe.components)
    with pytest.raises(TypeError, match=r"image=Tensor of dtype torch.bool: the pipeline's image processor"):
        generate(kontext, **flux_embeds(), image=_img() > 0.5, max_area=H * W, height=H, width=W, progress=False)


def test_image_on_a_family_without_editing_is_refused():
    from ralu_runtime.editing import check_edit

    class _Other:  # what check_edit reads of an adapter of another family
        family, is_video, pipe = "flux2", False, object()

    with pytest.raises(ValueError, match="flux2 takes no image"):
        check_edit(_Other(), image=_img(), strength=0.5, mask_image=None, height=H, width=W, batch=1,
                   num_inference_steps=None)


def test_custom_schedule_runs(flux_i2i):
    sched = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.5)
    out = generate(flux_i2i, **flux_embeds(), image=_img(), strength=1.0, height=H, width=W, speedup=sched, seed=0,
                   output_type="latent", progress=False)
    assert [r.steps for r in out.records if r.name.startswith("stage")] == [2, 2, 2]


# ------------------------------------------------------------------------------------------ inpainting (FLUX.1)
@pytest.mark.parametrize("strength", [0.5, 1.0])
@torch.no_grad()
def test_flux_inpaint_equals_diffusers(flux_inpaint, strength):
    kw = dict(**flux_embeds(), image=_img(), mask_image=_mask(), strength=strength, num_inference_steps=5,
              guidance_scale=3.5)
    ref = _flux_ref(flux_inpaint, generator=_gen(1), **kw)
    torch.testing.assert_close(_ours(flux_inpaint, generator=_gen(1), **kw), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_flux_inpaint_batch_of_two_equals_diffusers_and_single_runs(flux_inpaint, flux_pipe):
    kw = dict(image=_img(2), mask_image=torch.cat([_mask(), _mask(box=(0, 32, 0, 32))]), strength=0.8,
              num_inference_steps=4, guidance_scale=3.5)
    e2 = flux_embeds(2)
    both = _ours(flux_inpaint, generator=[_gen(7), _gen(8)], **e2, **kw)
    torch.testing.assert_close(both, _flux_ref(flux_inpaint, generator=[_gen(7), _gen(8)], **e2, **kw),
                               rtol=1e-5, atol=1e-5)
    # a text-to-image FLUX pipeline given mask_image= is FluxInpaintPipeline
    torch.testing.assert_close(both, _ours(flux_pipe, generator=[_gen(7), _gen(8)], **e2, **kw), rtol=0, atol=0)
    r = dict(kw, strength=1.0, num_inference_steps=None, speedup="4x")
    both = _ours(flux_inpaint, generator=[_gen(7), _gen(8)], **e2, **r)
    for i, s in enumerate((7, 8)):
        one = {k: v[i:i + 1] for k, v in e2.items()}
        single = _ours(flux_inpaint, generator=_gen(s), **one,
                       **{**r, "image": r["image"][i:i + 1], "mask_image": r["mask_image"][i:i + 1]})
        torch.testing.assert_close(both[i:i + 1], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("speedup", [None, "4x"])
@torch.no_grad()
def test_inpaint_keeps_the_source_outside_the_mask(flux_inpaint, speedup):
    """After the last step the kept part is the clean source latent exactly (the pipeline's blend), RALU too."""
    from ralu_runtime.editing import check_edit, encode_images, mask_latents

    adapter = get_adapter(flux_inpaint)
    spec = check_edit(adapter, image=_img(), strength=1.0, mask_image=_mask(), height=H, width=W, batch=1,
                      num_inference_steps=None)
    src = encode_images(adapter, spec, _gen(3), 1, torch.float32)  # the first draw of the call's generator
    keep = mask_latents(spec, 1, (8, 12), torch.float32).expand_as(src) == 0
    steps = dict(num_inference_steps=4) if speedup is None else {}
    out = _ours(flux_inpaint, **flux_embeds(), image=_img(), mask_image=_mask(), strength=1.0, speedup=speedup,
                generator=_gen(3), **steps)
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(out[keep], src[keep], rtol=0, atol=0)
    assert not torch.allclose(out[~keep], src[~keep])


def test_mask_boost_dilates_the_masked_tokens_by_one_block(flux_pipe):
    from ralu_runtime.editing import mask_boost

    mask = torch.zeros(1, 1, 32, 32)  # latents of a 256^2 image: an 8 x 8 coarse grid (4 x 4 latent pixels each)
    mask[..., 13, 18] = 1              # one latent pixel in coarse token (3, 4)
    grid = (mask_boost(get_adapter(flux_pipe), mask) > 0).view(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:5, 3:6] = True
    assert torch.equal(grid, expected)


@pytest.mark.slow
@pytest.mark.parametrize("strength,first", [(1.0, "stage1"), (0.85, "stage2")])
@torch.no_grad()
def test_inpaint_upsamples_the_masked_regions_first(flux_inpaint, strength, first):
    """256^2 (8 x 8 coarse tokens, the 4x preset upsamples 19 first): a 32-px square in the corner is masked; its
    token and the 3 around it (dilated by a block) are among the regions upsampled first, whether they are chosen
    after stage 1 (strength 1) or from the source (strength 0.85: stage 2 is the entry)."""
    img = torch.rand(1, 3, 256, 256, generator=_gen(0))
    out = generate(flux_inpaint, **flux_embeds(), image=img, mask_image=_mask(1, 256, 256, (0, 32, 0, 32)),
                   strength=strength, height=256, width=256, speedup="4x", seed=0, output_type="latent",
                   return_masks=True, progress=False)
    assert [r.name for r in out.records if r.name.startswith("stage")][0] == first
    assert out.masks.shape == (1, 8, 8) and int(out.masks.sum()) == 19
    assert bool(out.masks[0, :2, :2].all())


# ------------------------------------------------------------------------------------------ ralu edit (CLI)
def _png(path, size=(96, 64), mode="RGB", value=None):
    from PIL import Image

    if value is None:
        arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(path)
    else:
        Image.new(mode, size, value).save(path)
    return str(path)


@torch.no_grad()
def test_ralu_edit_inpaints_an_image_file(tmp_path, capsys):
    from PIL import Image

    from ralu_runtime import cli

    image, mask = _png(tmp_path / "in.png"), tmp_path / "mask.png"
    m = Image.new("L", (96, 64), 0)
    m.paste(255, (16, 8, 56, 40))
    m.save(mask)
    out, regions = tmp_path / "out.png", tmp_path / "regions.png"
    assert cli.main(["edit", "--image", image, "--mask", str(mask), "--strength", "1.0", "--height", "64",
                     "--width", "96", "--speedup", "4x", "--out", str(out), "--mask-out", str(regions),
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "stage1" in text and "stage3" in text and f"wrote {out}" in text
    assert Image.open(out).size == (96, 64) and Image.open(regions).size == (96, 64)


def test_ralu_edit_reads_an_image_file_upright_as_the_server_does(tmp_path):
    """A photo whose EXIF says "rotate 90" is read upright by ``ralu edit`` (as diffusers' ``load_image`` and
    ``ralu serve``'s uploads read it); it was read as stored, so the CLI and the server edited different images."""
    from PIL import Image

    from ralu_runtime import cli
    from ralu_runtime.serving.edits import decode_image

    arr = (np.random.default_rng(1).random((64, 96, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6                      # orientation: the stored pixels are rotated; show them turned 90 degrees
    path = tmp_path / "rotated.png"
    Image.fromarray(arr).save(path, exif=exif)
    read = cli._read_image("--image", str(path), "RGB")
    assert read.size == (64, 96)
    assert np.array_equal(np.asarray(read), np.rot90(arr, k=-1))
    uploaded = decode_image(path.read_bytes(), "image")
    assert np.array_equal(np.asarray(uploaded.convert("RGB")), np.asarray(read))


@torch.no_grad()
def test_ralu_edit_that_starts_in_the_last_stage_writes_its_image_and_says_why_no_regions(tmp_path, capsys):
    """strength 0.5 with 4x starts in stage 3 (full resolution, no regions): --mask-out read out.masks[0] of None
    after the whole edit and lost the image; now the image is written, the mask file is not, and the speedup line
    says which steps ran."""
    from PIL import Image

    from ralu_runtime import cli

    out, regions = tmp_path / "out.png", tmp_path / "regions.png"
    assert cli.main(["edit", "--image", _png(tmp_path / "in.png"), "--strength", "0.5", "--height", "64", "--width",
                     "96", "--speedup", "4x", "--out", str(out), "--mask-out", str(regions), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and Image.open(out).size == (96, 64) and not regions.exists()
    assert f"--mask-out {regions}: not written: this call chose no regions" in text
    assert "this edit ran stage3" in text and "stage1" not in text.split("this edit ran")[1].split("\n")[0]


@pytest.mark.parametrize("extra,needle", [
    (["--image", "{tmp}/missing.png"], "no such file"),
    (["--image", "{tmp}/text.png"], "not an image Pillow can read"),
    (["--image", "{tmp}/in.png", "--strength", "0"], "--strength 0.0"),
    (["--image", "{tmp}/in.png", "--mask", "{tmp}/black.png"], "nothing to repaint"),
    # one white pixel in a 256² mask is gone at 64²: the pipeline refused it only after the model was loaded
    (["--image", "{tmp}/in.png", "--mask", "{tmp}/dot.png", "--strength", "1", "--height", "64", "--width", "64"],
     "its white area vanishes when the mask is resized to 64x64"),
    (["--image", "{tmp}/in.png", "--model", "tiny-wan"], "ralu edit runs FLUX.1, SD3"),
])
def test_ralu_edit_refuses_bad_files_before_loading(tmp_path, monkeypatch, capsys, extra, needle):
    from PIL import Image

    from ralu_runtime import cli

    def no_load(plan):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli, "_load", no_load)
    _png(tmp_path / "in.png")
    _png(tmp_path / "black.png", mode="L", value=0)
    dot = Image.new("L", (256, 256), 0)
    dot.putpixel((100, 100), 255)
    dot.save(tmp_path / "dot.png")
    (tmp_path / "text.png").write_text("not a png")
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert cli.main(["edit", "--no-progress", "--out", str(tmp_path / "o.png"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("strength", [0.6, 1.0])
@torch.no_grad()
def test_sd3_inpaint_equals_diffusers(sd3_pipe, strength):
    from diffusers import StableDiffusion3InpaintPipeline

    pipe = StableDiffusion3InpaintPipeline(**sd3_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(**sd3_embeds(), image=_img(), mask_image=_mask(), strength=strength, num_inference_steps=4,
              guidance_scale=5.0)
    ref = pipe(height=H, width=W, output_type="latent", generator=_gen(3), **kw).images
    torch.testing.assert_close(_ours(pipe, generator=_gen(3), **kw), ref, rtol=1e-5, atol=1e-5)
    out = generate(pipe, **sd3_embeds(), image=_img(), mask_image=_mask(), strength=strength, height=H, width=W,
                   speedup="3x", seed=1, output_type="latent", progress=False)
    assert torch.isfinite(out.images).all()


@torch.no_grad()
def test_flux_schnell_img2img_equals_diffusers_and_runs_its_preset():
    from diffusers import FluxImg2ImgPipeline

    from ralu_runtime.tiny import build_tiny_flux_pipeline

    pipe = FluxImg2ImgPipeline(**build_tiny_flux_pipeline(seed=1, guidance_embeds=False).components)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(**flux_embeds(), image=_img(), strength=0.75, num_inference_steps=4, guidance_scale=0.0)
    torch.testing.assert_close(_ours(pipe, generator=_gen(2), **kw), _flux_ref(pipe, generator=_gen(2), **kw),
                               rtol=1e-5, atol=1e-5)
    out = generate(pipe, **flux_embeds(), image=_img(), strength=1.0, height=H, width=W, seed=0,
                   output_type="latent", progress=False)  # the family's default preset: 4step
    assert out.schedule.name == "flux-schnell/4step" and torch.isfinite(out.images).all()


def test_edit_with_a_followed_scheduler_is_refused(sd3_pipe):
    """A baseline that follows another flow scheduler (issue 22) cannot start mid-schedule: refused before any work."""
    from diffusers import FlowMatchHeunDiscreteScheduler, StableDiffusion3Img2ImgPipeline

    comps = dict(sd3_pipe.components, scheduler=FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    pipe = StableDiffusion3Img2ImgPipeline(**comps)
    with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler"):
        generate(pipe, **sd3_embeds(), image=_img(), strength=0.5, height=H, width=W, speedup=None,
                 num_inference_steps=4, progress=False)


def test_ralu_edits_mask_check_agrees_with_the_pipelines_mask_processor(flux_inpaint):
    """ralu edit's early check (Lanczos resize to the output size, binarised at 0.5) refuses exactly the small
    masks the pipeline's mask processor leaves empty: white squares of 1..6 px at grey 128..255 in a 256² mask,
    edited at 64²."""
    from PIL import Image

    from ralu_runtime.editing import _check_mask

    seen = set()
    for side in (1, 2, 3, 4, 6):
        for grey in (128, 200, 255):
            m = Image.new("L", (256, 256), 0)
            m.paste(grey, (100, 100, 100 + side, 100 + side))
            cli_keeps = m.resize((64, 64), Image.Resampling.LANCZOS).getextrema()[1] >= 128
            try:
                _check_mask(flux_inpaint, m, 64, 64, 1)
                pipeline_keeps = True
            except ValueError as e:
                assert "no pixel to repaint at 64x64" in str(e)
                pipeline_keeps = False
            assert cli_keeps == pipeline_keeps, (side, grey)
            seen.add(cli_keeps)
    assert seen == {True, False}  # the grid holds masks that vanish and masks that stay
