"""FLUX.1 Kontext with ralu (ralu_runtime.kontext): parity with diffusers' FluxKontextPipeline for speedup=None, the
reference tokens' ids in every RALU stage, determinism, the pipeline left as found, refusals, ``ralu edit``."""
import numpy as np
import pytest
import torch

from helpers import assert_same, snapshot
from ralu_runtime import generate
from ralu_runtime.adapters import VelocityCall, get_adapter
from ralu_runtime.kontext import kontext_size, reference_ids
from tiny_inputs import flux_embeds

H, W = 64, 96          # output pixels (max_area = H * W keeps them)
RH, RW = 48, 80        # reference pixels (auto_resize=False keeps them: multiples of 16)


def _ref(n=1, seed=5, h=RH, w=RW):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _gen(s):
    return torch.Generator().manual_seed(s)


@pytest.fixture(scope="module")
def kontext(flux_pipe):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**flux_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, auto_resize=False, **kw):
    kw.setdefault("max_area", H * W)
    lat = pipe(height=H, width=W, output_type="latent", _auto_resize=auto_resize, **kw).images
    return pipe._unpack_latents(lat, H, W, pipe.vae_scale_factor)


def _ours(pipe, auto_resize=False, **kw):
    kw.setdefault("speedup", None)
    kw.setdefault("max_area", H * W)
    return generate(pipe, height=H, width=W, output_type="latent", progress=False, auto_resize=auto_resize,
                    **kw).images


# ------------------------------------------------------------------------------------------ parity (speedup=None)
@torch.no_grad()
def test_kontext_equals_diffusers_with_embeddings(kontext):
    kw = dict(**flux_embeds(), image=_ref(), num_inference_steps=4, guidance_scale=2.5)
    ref = _theirs(kontext, generator=_gen(1), **kw)
    ours = _ours(kontext, generator=_gen(1), **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the reference matters: without it (the pipeline's text-to-image) the result differs
    plain = _ours(kontext, generator=_gen(1), **{**kw, "image": None})
    assert (plain - ours).abs().max() > 1e-3


@torch.no_grad()
def test_one_reference_without_a_batch_axis_equals_the_batched_one(kontext):
    """A numpy (H, W, 3) reference was refused as "smaller than 16x16" and a (3, H, W) tensor with "tuple index out
    of range" (the processor reads batched arrays only), though the error hint offers both: each equals its batched
    form, and the user's array is left as given."""
    ref = _ref()
    arr = ref[0].permute(1, 2, 0).numpy().copy()
    kw = dict(**flux_embeds(), num_inference_steps=2, seed=1)
    want = _ours(kontext, image=ref, **kw)
    for image in (ref[0], arr):
        before = image.copy() if isinstance(image, np.ndarray) else image.clone()
        torch.testing.assert_close(_ours(kontext, image=image, **kw), want, rtol=0, atol=0)
        assert image.shape == before.shape and (image == before).all()


@torch.no_grad()
def test_kontext_equals_diffusers_with_text_and_defaults(kontext):
    """A text prompt, the pipeline's default guidance (3.5), a PIL reference of another size; the default steps
    are the pipeline's 28 and the reference is auto-resized by default."""
    from PIL import Image

    from ralu_runtime import prepare

    arr = (np.random.default_rng(1).random((40, 72, 3)) * 255).astype(np.uint8)
    kw = dict(prompt="make it red", image=Image.fromarray(arr), max_sequence_length=16)
    ref = _theirs(kontext, generator=_gen(2), num_inference_steps=3, **kw)
    ours = _ours(kontext, generator=_gen(2), num_inference_steps=3, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    plan = prepare(kontext, speedup=None, height=H, width=W, max_area=H * W, **kw)
    assert (plan.steps, plan.guidance) == (28, 3.5) and plan.reference.pixels.shape == (1, 3, 720, 1456)  # auto_resize: 1456 x 720


@torch.no_grad()
def test_kontext_output_size_and_auto_resize_follow_the_pipeline(kontext):
    """height / width give the aspect ratio at max_area (default 1024**2); auto_resize (default) takes the preferred
    Kontext resolution for the reference (here 1248 x 832 for a 3:2 image: 4056 reference tokens)."""
    assert kontext_size(kontext, 512, 512, None) == (1024, 1024)
    assert kontext_size(kontext, H, W, H * W) == (H, W)
    assert kontext_size(kontext, 64, 128, 128 * 128) == (80, 176)   # round(sqrt(16384 / 2)) = 90 -> 80, 181 -> 176
    kw = dict(**flux_embeds(), image=_ref(h=64, w=96), num_inference_steps=1)
    ref = _theirs(kontext, auto_resize=True, generator=_gen(3), **kw)
    torch.testing.assert_close(_ours(kontext, auto_resize=None, generator=_gen(3), **kw), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kontext_batch_equals_single_runs_and_diffusers(kontext):
    e = flux_embeds(2)
    kw = dict(**e, image=_ref(2), num_inference_steps=3)
    batch = _ours(kontext, generator=[_gen(3), _gen(4)], **kw)
    torch.testing.assert_close(batch, _theirs(kontext, generator=[_gen(3), _gen(4)], **kw), rtol=1e-5, atol=1e-5)
    for i, s in enumerate((3, 4)):
        single = _ours(kontext, generator=_gen(s), prompt_embeds=e["prompt_embeds"][i:i + 1],
                       pooled_prompt_embeds=e["pooled_prompt_embeds"][i:i + 1], image=_ref(2)[i:i + 1],
                       num_inference_steps=3)
        torch.testing.assert_close(batch[i:i + 1], single, rtol=1e-5, atol=1e-5)
    # one reference for two prompts is tiled over the batch, as the pipeline does
    kw1 = dict(**e, image=_ref(1), num_inference_steps=2)
    torch.testing.assert_close(_ours(kontext, generator=_gen(5), **kw1), _theirs(kontext, generator=_gen(5), **kw1),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ RALU
def _record_ids(pipe):
    """Pre-hooks on the transformer (the pipeline's ``img_ids``) and on its rotary embedder (every call's joined ids,
    ralu's and the pipeline's); returns (lists, remove)."""
    seen = {"img_ids": [], "rope_ids": []}
    h1 = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen["img_ids"].append(kw["img_ids"].detach().clone()), with_kwargs=True)
    h2 = pipe.transformer.pos_embed.register_forward_pre_hook(lambda m, a: seen["rope_ids"].append(a[0].clone()))
    return seen, lambda: (h1.remove(), h2.remove())


@pytest.mark.parametrize("speedup", ["4x", "7x"])
@torch.no_grad()
def test_kontext_ralu_keeps_the_reference_ids_in_every_stage(kontext, speedup):
    """Every model call of a RALU run gets, after the text and the generated tokens, exactly the pipeline's
    reference ids (first coordinate 1); the generated tokens have first coordinate 0 and the stage's count of
    tokens (stage 1: a quarter)."""
    e = flux_embeds()
    seen, remove = _record_ids(kontext)
    try:
        _theirs(kontext, generator=_gen(1), **e, image=_ref(), num_inference_steps=1)
        pipe_ids = seen["img_ids"][0]
        n_gen = (H // 16) * (W // 16)
        n_ref = (RH // 16) * (RW // 16)
        assert pipe_ids.shape == (n_gen + n_ref, 3)
        theirs_ref = pipe_ids[n_gen:]
        torch.testing.assert_close(theirs_ref, reference_ids(RH // 16, RW // 16, 1)[0].to(theirs_ref.dtype))
        seen["rope_ids"].clear()
        out = generate(kontext, **e, image=_ref(), speedup=speedup, seed=7, height=H, width=W, max_area=H * W,
                       auto_resize=False, output_type="latent", progress=False, return_masks=True)
    finally:
        remove()
    calls = sum(r.steps for r in out.records)
    assert len(seen["rope_ids"]) == calls > 0
    text = e["prompt_embeds"].shape[1]
    counts = set()
    for ids in seen["rope_ids"]:
        ids = ids.view(1, -1, 3)[0]
        gen, ref = ids[text:-n_ref], ids[-n_ref:]
        assert torch.equal(ref, theirs_ref.to(ref.dtype))
        assert torch.equal(ids[:text], torch.zeros(text, 3))
        assert bool((gen[:, 0] == 0).all())
        counts.add(len(gen))
    k = int((n_gen // 4) * out.schedule.ratio)
    assert counts == {n_gen // 4, n_gen // 4 + 3 * k, n_gen}  # coarse, mixed, fine: only the generated tokens change


@torch.no_grad()
def test_kontext_ralu_is_deterministic_and_leaves_the_pipeline_as_found(kontext):
    kw = dict(**flux_embeds(), image=_ref(), speedup="7x")
    before = snapshot(kontext)
    a = _ours(kontext, seed=3, **kw)
    b = _ours(kontext, seed=3, **kw)
    c = _ours(kontext, seed=4, **kw)
    assert_same(before, snapshot(kontext))
    assert torch.equal(a, b) and not torch.equal(a, c) and bool(torch.isfinite(a).all())
    assert tuple(a.shape) == (1, 16, H // 8, W // 8)
    # the reference reaches the output under RALU too
    other = _ours(kontext, seed=3, **{**kw, "image": _ref(seed=9)})
    assert (other - a).abs().max() > 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_kontext_ralu_traced_equals_eager_and_a_second_call_adds_no_graph(kontext):
    """The compile path (``backend="inductor"`` at the dynamo level: the graphs traced, run by dynamo's eager
    backend) carries the reference tokens as inputs: equal to eager, and a second reference adds no graph."""
    from ralu_runtime.compile import compile_stats

    kw = dict(**flux_embeds(), image=_ref(), speedup="4x", seed=3)
    traced = dict(backend="inductor", compile_options={"dynamo_backend": "eager"})
    eager = _ours(kontext, **kw)
    torch.testing.assert_close(_ours(kontext, **kw, **traced), eager, rtol=1e-5, atol=1e-5)
    graphs = compile_stats()["unique_graphs"]
    other = _ours(kontext, **{**kw, "image": _ref(seed=9)}, **traced)
    assert compile_stats()["unique_graphs"] == graphs
    torch.testing.assert_close(other, _ours(kontext, **{**kw, "image": _ref(seed=9)}), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kontext_packed_velocity_runs_each_reference_call_alone(kontext):
    """The packed call (serving engine) falls back to one velocity per call for Kontext calls: equal results."""
    from ralu_runtime.adapters import TokenGrid
    from ralu_runtime.kontext import KontextSpec, add_reference
    from ralu_runtime.layout import grid_positions

    ad = get_adapter(kontext)
    e = flux_embeds()
    cond = ad.encode_prompt(None, prompt_embeds=e["prompt_embeds"], pooled_prompt_embeds=e["pooled_prompt_embeds"],
                            guidance_scale=3.5)
    cond = add_reference(ad, cond, KontextSpec(_ref()[0:1] * 2 - 1), None, torch.float32)
    x = torch.randn(1, 24, 64, generator=_gen(0))
    grid = TokenGrid(grid_positions(4, 6).expand(1, -1, -1).contiguous(), (4, 6), None, raster=True)
    t = torch.tensor(700.0)
    one = ad.velocity(x, grid, t, cond)
    assert one.shape == x.shape
    packed = ad.packed_velocity([VelocityCall(x, grid, t, cond), VelocityCall(x * 0.5, grid, t, cond)])
    assert torch.equal(packed[0], one)
    assert torch.equal(packed[1], ad.velocity(x * 0.5, grid, t, cond))


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("extra,err,needle", [
    (dict(strength=0.5), ValueError, "strength=0.5 does not apply to FLUX.1 Kontext"),
    (dict(mask_image=torch.ones(1, 1, H, W)), ValueError, "mask_image= does not apply"),
    (dict(image=torch.zeros(1, 16, 8, 12)), ValueError, "latents are not taken"),
    (dict(image=_ref(3)), ValueError, "3 images for a batch of 1"),
    (dict(image="nope.png"), TypeError, "image processor cannot read"),
    (dict(auto_resize="yes"), TypeError, "auto_resize='yes'"),
    (dict(max_area=0), ValueError, "max_area=0"),
    (dict(max_area=48 * 72), ValueError, "RALU needs multiples of 32"),
    (dict(image=_ref(h=8, w=8)), ValueError, "one token"),
    (dict(image=_ref(h=8, w=8), auto_resize=True), ValueError, "one token"),     # was a ZeroDivisionError
    (dict(image=_ref(h=1, w=300), auto_resize=True), ValueError, "one token"),
    (dict(image=_ref(h=0, w=8), auto_resize=True), ValueError, r"image is empty \(size \(1, 3, 0, 8\)\)"),
    (dict(image=[_ref()[0], torch.zeros(3, 8, 0)]), ValueError, r"image\[1\] is empty"),
])
def test_kontext_refuses_what_it_cannot_take(kontext, extra, err, needle):
    kw = dict(**flux_embeds(), image=_ref(), height=H, width=W, max_area=H * W, auto_resize=False, speedup="4x")
    with pytest.raises(err, match=needle):
        generate(kontext, **{**kw, **extra})


def test_kontext_arguments_are_refused_for_other_pipelines(flux_pipe):
    with pytest.raises(ValueError, match="FluxKontextPipeline's arguments"):
        generate(flux_pipe, **flux_embeds(), height=H, width=W, max_area=H * W)


# ------------------------------------------------------------------------------------------ ralu edit (CLI)
def _png(path, size=(RW, RH)):
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


@torch.no_grad()
def test_ralu_edit_runs_tiny_flux_kontext(tmp_path, capsys):
    from PIL import Image

    from ralu_runtime import cli

    out = tmp_path / "out.png"
    assert cli.main(["edit", "--model", "tiny-flux-kontext", "--image", _png(tmp_path / "in.png"), "--prompt",
                     "make it blue", "--height", "64", "--width", "96", "--speedup", "4x", "--keep-reference-size",
                     "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "stage1" in text and "stage3" in text and f"wrote {out}" in text
    assert Image.open(out).size == (96, 64)


@pytest.mark.parametrize("extra,needle", [
    (["--strength", "0.5"], "--strength does not apply to FLUX.1 Kontext"),
    (["--mask", "{tmp}/in.png"], "--mask does not apply to FLUX.1 Kontext"),
    (["--image", "{tmp}/thin.png"], "is 4000x8 pixels: a FLUX.1 Kontext reference needs at least 16"),  # was late
])
def test_ralu_edit_kontext_refuses_strength_and_mask_before_loading(tmp_path, monkeypatch, capsys, extra, needle):
    from ralu_runtime import cli

    def no_load(plan):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli, "_load", no_load)
    image = _png(tmp_path / "in.png")
    _png(tmp_path / "thin.png", size=(4000, 8))
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert cli.main(["edit", "--model", "tiny-flux-kontext", "--image", image, "--no-progress", "--out",
                     str(tmp_path / "o.png"), *args]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "o.png").exists()


def test_tiny_flux_kontext_is_a_kontext_pipeline():
    from ralu_runtime.families import TINY_MODELS
    from ralu_runtime.tiny import build_tiny

    assert TINY_MODELS["tiny-flux-kontext"].family == "flux"
    pipe = build_tiny("tiny-flux-kontext")
    assert type(pipe).__name__ == "FluxKontextPipeline" and get_adapter(pipe).family == "flux"


# ------------------------------------------------------------------------------------------ POST /v1/images/edits
def test_images_edits_serves_a_kontext_pipeline(kontext):
    """The served request's size is the output size (the engine sets max_area = height x width); the result equals
    generate alone; strength and mask are refused with a 400."""
    import functools
    import io

    import httpx
    from PIL import Image

    from helpers import SERVE_DEFAULTS, running_server
    from ralu_runtime.serving.http import EDITS_PATH

    src = Image.fromarray((np.random.default_rng(0).random((RH, RW, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    files = [("image", ("in.png", buf.getvalue(), "image/png"))]
    base = {"prompt": "make it blue", "seed": "3", "steps": "2", "speedup": "none", "size": "96x64"}
    with functools.partial(running_server, grace_s=5.0, stop_s=35.0)(kontext) as (server, _engine):
        r = httpx.post(server.url + EDITS_PATH, data=base, files=files, timeout=300)
        assert r.status_code == 200, r.text
        import base64

        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
        for extra, needle in (({"strength": "0.5"}, "strength"), ):
            bad = httpx.post(server.url + EDITS_PATH, data={**base, **extra}, files=files, timeout=60)
            assert bad.status_code == 400 and needle in bad.text
        bad = httpx.post(server.url + EDITS_PATH, data=base, timeout=60,
                         files=files + [("mask", ("m.png", buf.getvalue(), "image/png"))])
        assert bad.status_code == 400 and "mask_image" in bad.text
    want = generate(kontext, "make it blue", image=src.convert("RGB"), seed=3, num_inference_steps=2, speedup=None,
                    height=64, width=96, max_area=64 * 96, output_type="pil", progress=False,
                    max_sequence_length=SERVE_DEFAULTS["max_sequence_length"]).images[0]
    assert got.shape == (64, 96, 3)
    assert np.abs(got.astype(np.int16) - np.asarray(want).astype(np.int16)).max() <= 1
