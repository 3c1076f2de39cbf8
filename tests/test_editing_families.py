"""img2img and inpainting with ralu on Chroma, Z-Image and Qwen-Image (ralu_runtime.editing.EDIT_FAMILY_TABLE):
``speedup=None`` equals ChromaImg2Img / ChromaInpaint / ZImageImg2Img / ZImageInpaint / QwenImageImg2Img /
QwenImageInpaint (latents within 1e-5, tiny random models, CPU), batches equal single runs, RALU runs every preset
of the family, deterministic per seed, the kept part of an inpainting stays the source, the pipeline is left as found,
bad input is refused before any model call."""
import pytest
import torch

from ralu_runtime import generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.families import FAMILIES
from helpers import assert_same, snapshot

H, W = 64, 96
TOL = dict(rtol=1e-5, atol=1e-5)
FAMS = ("chroma", "z-image", "qwen-image")
_PREFIX = {"chroma": "Chroma", "z-image": "ZImage", "qwen-image": "QwenImage"}
_INPAINT = {"chroma": "ChromaInpaintPipeline", "z-image": "ZImageInpaintPipeline",
            "qwen-image": "QwenImageInpaintPipeline"}


def _gen(s):
    return torch.Generator().manual_seed(s)


def _img(n=1, seed=5):
    return torch.rand(n, 3, H, W, generator=_gen(seed))


def _mask(n=1, box=(8, 40, 16, 56)):
    m = torch.zeros(n, 1, H, W)
    m[..., box[0]:box[1], box[2]:box[3]] = 1
    return m


def _build(family):
    if family == "chroma":
        from ralu_runtime.tiny.chroma import build_tiny_chroma_pipeline
        return build_tiny_chroma_pipeline(seed=0)
    if family == "z-image":
        from ralu_runtime.tiny.z_image import build_tiny_z_image_pipeline
        return build_tiny_z_image_pipeline(seed=0)
    from ralu_runtime.tiny.qwen_image import build_tiny_qwen_image_pipeline
    return build_tiny_qwen_image_pipeline(seed=0, num_layers=1)


@pytest.fixture(scope="module")
def pipes():
    """family -> {"t2i", "img2img", "inpaint", "ref_img2img", "ref_inpaint"} pipelines over one tiny model per family
    (built on first use). The reference ChromaInpaintPipeline runs on a second model built from the same seed whose
    config has ``guidance_embeds=False``: diffusers 0.42.1's ChromaInpaintPipeline reads that key, which
    ChromaTransformer2DModel's config does not have (AttributeError on every call); ralu runs on the unpatched one."""
    import diffusers

    cache = {}

    def get(family):
        if family not in cache:
            t2i = _build(family)
            ref_t2i = t2i
            if family == "chroma":
                ref_t2i = _build(family)
                ref_t2i.transformer.register_to_config(guidance_embeds=False)
            out = {"t2i": t2i}
            for kind in ("Img2Img", "Inpaint"):
                cls = getattr(diffusers, f"{_PREFIX[family]}{kind}Pipeline")
                for key, base in ((kind.lower(), t2i), (f"ref_{kind.lower()}", ref_t2i)):
                    out[key] = cls(**base.components)
                    out[key].set_progress_bar_config(disable=True)
            cache[family] = out
        return cache[family]
    return get


def _embeds(family, b=1, seed=0, mask_dtype=torch.float32):
    """generate's prompt embeddings with negatives (every family runs classifier-free guidance by default):
    ``(b, T, 32)`` and, for Chroma / Qwen-Image, ``(b, T)`` masks (Chroma's with masked padding tokens)."""
    g = _gen(seed)
    nt = 8 if family == "chroma" else 6  # ChromaInpaintPipeline needs negatives of the prompts' shape
    emb = {"prompt_embeds": torch.randn(b, 8, 32, generator=g),
           "negative_prompt_embeds": torch.randn(b, nt, 32, generator=g)}
    if family == "chroma":
        emb["prompt_embeds_mask"] = (torch.arange(8) < 6).expand(b, 8).to(mask_dtype)
        emb["negative_prompt_embeds_mask"] = (torch.arange(8) < 3).expand(b, 8).to(mask_dtype)
    elif family == "qwen-image":
        emb["prompt_embeds_mask"] = torch.ones(b, 8, dtype=torch.long)
        emb["negative_prompt_embeds_mask"] = torch.ones(b, 6, dtype=torch.long)
    return emb


def _pipeline_embeds(family, emb):
    """The same embeddings as the diffusers pipeline takes them (Chroma's mask names, Z-Image's lists)."""
    if family == "chroma":
        names = {"prompt_embeds_mask": "prompt_attention_mask",
                 "negative_prompt_embeds_mask": "negative_prompt_attention_mask"}
        return {names.get(k, k): v for k, v in emb.items()}
    if family == "z-image":
        return {k: list(v.unbind(0)) for k, v in emb.items()}
    return emb


def _ref(family, pipe, emb, **kw):
    """The diffusers pipeline's latents ``(B, 16, h, w)`` (its packed or frame-axis output unpacked)."""
    lat = pipe(height=H, width=W, output_type="latent", **_pipeline_embeds(family, emb), **kw).images
    if family == "chroma":
        return pipe._unpack_latents(lat, H, W, pipe.vae_scale_factor)
    if family == "qwen-image":
        return pipe._unpack_latents(lat, H, W, pipe.vae_scale_factor)[:, :, 0]
    return lat


def _ours(pipe, **kw):
    kw.setdefault("speedup", None)
    return generate(pipe, height=H, width=W, output_type="latent", progress=False, **kw).images


# ------------------------------------------------------------------------------------------ parity (speedup=None)
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_baseline_equals_diffusers(pipes, family, kind):
    """The editing pipeline's defaults (guidance: Chroma 5.0 / 7.0, Z-Image 5.0, Qwen-Image's true_cfg_scale 4.0),
    and the text-to-image pipeline given image= / mask_image= is the editing pipeline."""
    p = pipes(family)
    emb = _embeds(family)
    kw = dict(image=_img(), strength=0.6, num_inference_steps=4)
    if kind == "inpaint":
        kw["mask_image"] = _mask()
    ref = _ref(family, p[f"ref_{kind}"], emb, generator=_gen(1), **kw)
    ours = _ours(p[kind], generator=_gen(1), **emb, **kw)
    assert ours.shape == (1, 16, 8, 12)
    torch.testing.assert_close(ours, ref, **TOL)
    torch.testing.assert_close(_ours(p["t2i"], generator=_gen(1), **emb, **kw), ours, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@torch.no_grad()
def test_z_image_edits_at_the_image_size_without_height_and_width(pipes, kind):
    """ZImageImg2ImgPipeline / ZImageInpaintPipeline preprocess the image at its own size and default height / width
    to it (not to a default size as FLUX.1's): without height / width ralu edits at the image's size too. An image
    whose size RALU cannot take is refused naming it, before any model call."""
    p = pipes("z-image")
    emb = _embeds("z-image")
    kw = dict(image=_img(), strength=0.6, num_inference_steps=3)
    if kind == "inpaint":
        kw["mask_image"] = _mask()
    ref = p[f"ref_{kind}"](output_type="latent", generator=_gen(1), **_pipeline_embeds("z-image", emb), **kw).images
    ours = generate(p[kind], output_type="latent", progress=False, speedup=None, generator=_gen(1), **emb,
                    **kw).images
    assert ours.shape == ref.shape == (1, 16, 8, 12)
    torch.testing.assert_close(ours, ref, **TOL)
    bad = {**kw, "image": torch.rand(1, 3, 88, 96), "num_inference_steps": None}  # read as 80 x 96: not RALU's 32
    with pytest.raises(ValueError, match=r"the image is 80x96 pixels \(height x width, rounded down to multiples "
                                         r"of 16\)"):
        generate(p[kind], progress=False, **emb, **bad)


@torch.no_grad()
def test_z_image_bf16_equals_diffusers():
    """bf16: ZImageImg2ImgPipeline / ZImageInpaintPipeline draw the noise in the prompt embeddings' dtype and noise
    the source in it (ZImagePipeline draws float32 noise); the latents then run in float32. Bitwise on the CPU, on
    torch 2.11 too, whose CPU randn draws other values in bfloat16 than in float32."""
    import diffusers

    from ralu_runtime.tiny.z_image import build_tiny_z_image_pipeline

    t2i = build_tiny_z_image_pipeline(seed=0, dtype=torch.bfloat16)
    emb = {k: v.to(torch.bfloat16) for k, v in _embeds("z-image").items()}
    for cls, extra in ((diffusers.ZImageImg2ImgPipeline, {}),
                       (diffusers.ZImageInpaintPipeline, {"mask_image": _mask()})):
        pipe = cls(**t2i.components)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(image=_img(), strength=0.6, num_inference_steps=3, **extra)
        ref = _ref("z-image", pipe, emb, generator=_gen(1), **kw)
        torch.testing.assert_close(_ours(pipe, generator=_gen(1), **emb, **kw), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_text_prompts_equal_diffusers(pipes, family):
    """Text prompts through the tiny text encoders, the editing pipeline's default text length (ChromaInpaintPipeline
    pads to 256 tokens, the others to 512) and default guidance."""
    p = pipes(family)
    kw = dict(prompt="a red fox", negative_prompt="blurry", image=_img(), mask_image=_mask(), strength=0.6,
              num_inference_steps=3)
    ref = _ref(family, p["ref_inpaint"], {}, generator=_gen(1), **kw)
    torch.testing.assert_close(_ours(p["inpaint"], generator=_gen(1), **kw), ref, **TOL)


@torch.no_grad()
def test_chroma_bool_text_masks_act_as_the_editing_pipelines_float_masks(pipes):
    """ChromaImg2ImgPipeline casts the joint attention mask to the latents' dtype (a soft 0/1 mask), unlike
    ChromaPipeline, which keeps a bool mask hard: ralu follows each pipeline."""
    p = pipes("chroma")
    emb = _embeds("chroma", mask_dtype=torch.bool)
    kw = dict(image=_img(), strength=0.8, num_inference_steps=3)
    ref = _ref("chroma", p["ref_img2img"], emb, generator=_gen(2), **kw)
    torch.testing.assert_close(_ours(p["img2img"], generator=_gen(2), **emb, **kw), ref, **TOL)
    soft = _embeds("chroma")  # the same masks as float: the same latents
    torch.testing.assert_close(_ours(p["img2img"], generator=_gen(2), **soft, **kw), ref, **TOL)
    # text-to-image keeps the bool mask hard, as ChromaPipeline does: other latents than the float mask's
    t2i = _ours(p["t2i"], generator=_gen(2), num_inference_steps=3, **emb)
    t2i_ref = p["t2i"](height=H, width=W, output_type="latent", num_inference_steps=3, generator=_gen(2),
                       **_pipeline_embeds("chroma", emb)).images
    torch.testing.assert_close(t2i, p["t2i"]._unpack_latents(t2i_ref, H, W, 8), **TOL)
    assert not torch.allclose(t2i, _ours(p["t2i"], generator=_gen(2), num_inference_steps=3, **soft), atol=1e-3)


@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_batch_of_two_equals_diffusers_and_single_runs(pipes, family):
    """Two prompts, two images, two masks, one generator each: equal to the pipeline, and each image to its single
    run, for the baseline and for RALU (stage-1 entry: regions, transitions, per-image seeds)."""
    p = pipes(family)
    e2 = _embeds(family, 2, seed=3)
    kw = dict(image=_img(2), mask_image=torch.cat([_mask(), _mask(box=(0, 32, 0, 32))]), strength=0.8,
              num_inference_steps=3)
    both = _ours(p["inpaint"], generator=[_gen(7), _gen(8)], **e2, **kw)
    torch.testing.assert_close(both, _ref(family, p["ref_inpaint"], e2, generator=[_gen(7), _gen(8)], **kw), **TOL)
    r = dict(kw, strength=1.0, num_inference_steps=None, speedup="default")
    ralu = _ours(p["inpaint"], generator=[_gen(7), _gen(8)], **e2, **r)
    for i, s in enumerate((7, 8)):
        one = {k: v[i:i + 1] for k, v in e2.items()}
        for args, out in ((kw, both), (r, ralu)):
            single = _ours(p["inpaint"], generator=_gen(s), **one,
                           **{**args, "image": args["image"][i:i + 1], "mask_image": args["mask_image"][i:i + 1]})
            torch.testing.assert_close(out[i:i + 1], single, **TOL)


# ------------------------------------------------------------------------------------------ RALU
@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_ralu_presets_run_deterministically_and_keep_the_source(pipes, family):
    """Every preset of the family, img2img and inpainting from strength 1 (all three stages): finite, same seed same
    latents, another seed other latents, the kept part of an inpainting exactly the clean source latent, the
    pipeline left as found."""
    from ralu_runtime.editing import check_edit, encode_images, mask_latents

    p = pipes(family)
    emb = _embeds(family)
    before = snapshot(p["inpaint"])
    adapter = get_adapter(p["inpaint"])
    spec = check_edit(adapter, image=_img(), strength=1.0, mask_image=_mask(), height=H, width=W, batch=1,
                      num_inference_steps=None)
    src = encode_images(adapter, spec, _gen(3), 1, torch.float32)  # the first draw of the call's generator
    keep = mask_latents(spec, 1, (8, 12), torch.float32).expand_as(src) == 0
    for preset in FAMILIES[family].presets:
        for kind in ("img2img", "inpaint"):
            kw = dict(image=_img(), strength=1.0, speedup=preset, **emb)
            if kind == "inpaint":
                kw["mask_image"] = _mask()
            out = generate(p[kind], height=H, width=W, output_type="latent", progress=False, generator=_gen(3), **kw)
            assert [r.name for r in out.records if r.name.startswith("stage")] == ["stage1", "stage2", "stage3"]
            a = out.images
            assert a.shape == (1, 16, 8, 12) and torch.isfinite(a).all()
            if kind == "inpaint":
                torch.testing.assert_close(a[keep], src[keep], rtol=0, atol=0)
                assert not torch.allclose(a[~keep], src[~keep])
            if preset == FAMILIES[family].default_preset:
                torch.testing.assert_close(_ours(p[kind], generator=_gen(3), **kw), a, rtol=0, atol=0)
                assert not torch.equal(_ours(p[kind], generator=_gen(4), **kw), a)
    assert_same(before, snapshot(p["inpaint"]))


@pytest.mark.parametrize("family", FAMS)
@torch.no_grad()
def test_ralu_enters_the_stage_the_strength_reaches(pipes, family):
    """The default preset at the editing pipelines' default steps: a low strength runs the last stage only, a
    higher one enters stage 2 (regions chosen from the source image, for inpainting the masked ones first)."""
    p = pipes(family)
    for strength, stages, kind in ((0.2, ["stage3"], "img2img"), ({"z-image": 0.85}.get(family, 0.8),
                                                                     ["stage2", "stage3"], "inpaint")):
        out = generate(p[kind], **_embeds(family), image=_img(), mask_image=_mask() if kind == "inpaint" else None,
                       strength=strength, height=H, width=W, seed=1, output_type="latent", progress=False,
                       return_masks=True)
        assert [r.name for r in out.records if r.name.startswith("stage")] == stages
        assert torch.isfinite(out.images).all()
        assert (out.masks is None) == (stages == ["stage3"])  # stage 2 ran: the coarse-token mask (2 x 3 grid)
        if out.masks is not None:
            assert out.masks.shape == (1, 2, 3)


# ------------------------------------------------------------------------------------------ refusals
class _Calls:
    """Counts forward calls of every torch module among a pipeline's components."""

    def __init__(self, pipe):
        self.n = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in pipe.components.values()
                        if isinstance(m, torch.nn.Module)]

    def _hook(self, *_):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FAMS)
def test_bad_edit_input_is_refused_before_any_model_call(pipes, family):
    p = pipes(family)
    emb = _embeds(family)
    cases = [(p["img2img"], dict(image=_img(), strength=0.0), "0 < strength <= 1"),
             (p["img2img"], dict(image=None), "editing pipeline: give image"),
             (p["inpaint"], dict(image=_img()), f"{_INPAINT[family]} is an inpainting pipeline: give mask_image"),
             (p["t2i"], dict(image=_img(), mask_image=torch.zeros(1, 1, H, W)), "no pixel to repaint"),
             (p["t2i"], dict(image=_img(3)), "must divide the batch"),
             (p["img2img"], dict(image="not an image"), "image processor cannot read"),
             (p["img2img"], dict(image=_img(), control_image=_img()), "takes no control image")]
    for pipe, kw, match in cases:
        calls = _Calls(pipe)
        try:
            with pytest.raises((ValueError, TypeError), match=match):
                generate(pipe, height=H, width=W, progress=False, **emb, **kw)
        finally:
            calls.close()
        assert calls.n == 0, match


@torch.no_grad()
def test_ralu_edit_on_tiny_chroma(tmp_path, capsys):
    """``ralu edit --model tiny-chroma``: an image file and a mask in, an edited image out."""
    import numpy as np
    from PIL import Image

    from ralu_runtime import cli

    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype("uint8")).save(src)
    m = Image.new("L", (96, 64), 0)
    m.paste(255, (16, 8, 56, 40))
    m.save(mask)
    assert cli.main(["edit", "--model", "tiny-chroma", "--image", str(src), "--mask", str(mask), "--strength", "1.0",
                     "--height", "64", "--width", "96", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "stage1" in text and "stage3" in text and f"wrote {out}" in text
    assert Image.open(out).size == (96, 64)


@pytest.mark.parametrize("name", ["tiny-chroma", "tiny-z-image", "tiny-qwen-image"])
def test_served_edits_equal_generate(name):
    """``POST /v1/images/edits`` on the three families: img2img (baseline) and inpainting (RALU, the family's
    default preset) equal ``generate`` alone (PNG pixels within 1)."""
    import functools
    import io

    import httpx
    import numpy as np
    from PIL import Image

    from ralu_runtime.serving.http import EDITS_PATH
    from ralu_runtime.tiny import build_tiny
    from helpers import SERVE_DEFAULTS, running_server
    from openai_checks import pngs

    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 32))

    def png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return ("x.png", buf.getvalue(), "image/png")

    def alone(**kw):
        out = generate(pipe, "a red fox", image=src, seed=3, output_type="pil", progress=False,
                       **{**SERVE_DEFAULTS, **kw})
        return [np.asarray(im.convert("RGB")).astype(np.int16) for im in out.images]

    pipe = build_tiny(name)
    running = functools.partial(running_server, grace_s=5.0, stop_s=35.0)
    cases = [({"strength": "0.5", "steps": "3", "speedup": "none"}, [("image", png(src))],
              dict(strength=0.5, num_inference_steps=3, speedup=None)),
             ({"strength": "1.0"}, [("image", png(src)), ("mask", png(mask))],
              dict(strength=1.0, mask_image=mask))]
    with running(pipe) as (server, _):
        got = [pngs(httpx.post(server.url + EDITS_PATH, data={"prompt": "a red fox", "seed": "3", **fields},
                               files=files, timeout=120)) for fields, files, _ in cases]
    for g, (_, _, kw) in zip(got, cases):
        want = alone(**kw)
        assert len(g) == len(want) and all(np.abs(a - b).max() <= 1 for a, b in zip(g, want))
