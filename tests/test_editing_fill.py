"""FLUX.1 Fill (FluxFillPipeline) and FLUX.1 control (FluxControlPipeline) with ralu (ralu_runtime.channel_cond):
parity with diffusers for speedup=None, the conditioning of every stage's token set, RALU runs, refusals, the CLI."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import assert_same, snapshot
from ralu_runtime import generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.adapters.base import TokenGrid
from ralu_runtime.channel_cond import ChannelCond, mask_channels
from ralu_runtime.editing import _mix, _mixed_index
from ralu_runtime.layout import TokenLayout, grid_positions
from tiny_inputs import flux_embeds

H, W = 64, 96


@pytest.fixture(scope="module")
def fill():
    from ralu_runtime.tiny.flux_fill import build_tiny_flux_fill_pipeline

    return build_tiny_flux_fill_pipeline(seed=0)


@pytest.fixture(scope="module")
def control():
    from ralu_runtime.tiny.flux_fill import build_tiny_flux_control_pipeline

    return build_tiny_flux_control_pipeline(seed=0)


def _gen(s):
    return torch.Generator().manual_seed(s)


def _img(n=1, seed=5, h=H, w=W):
    return torch.rand(n, 3, h, w, generator=_gen(seed))


def _pil(seed=0, h=H, w=W):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def _mask(n=1, h=H, w=W, box=(8, 40, 16, 56)):
    m = torch.zeros(n, 1, h, w)
    m[..., box[0]:box[1], box[2]:box[3]] = 1
    return m


def _ref(pipe, h=H, w=W, **kw):
    lat = pipe(height=h, width=w, output_type="latent", **kw).images
    return pipe._unpack_latents(lat, h, w, pipe.vae_scale_factor)


def _ours(pipe, h=H, w=W, **kw):
    return generate(pipe, height=h, width=w, speedup=None, output_type="latent", progress=False, **kw).images


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("strength", [1.0, 0.6])
@torch.no_grad()
def test_fill_baseline_equals_diffusers(fill, strength):
    kw = dict(**flux_embeds(), image=_img(), mask_image=_mask(), strength=strength, num_inference_steps=4)
    torch.testing.assert_close(_ours(fill, generator=_gen(1), **kw), _ref(fill, generator=_gen(1), **kw),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fill_batch_equals_diffusers_and_single_runs(fill):
    imgs, masks = _img(2), torch.cat([_mask(), _mask(box=(0, 32, 48, 96))])
    kw = dict(**flux_embeds(2), image=imgs, mask_image=masks, num_inference_steps=3)
    ours = _ours(fill, generator=[_gen(1), _gen(2)], **kw)
    torch.testing.assert_close(ours, _ref(fill, generator=[_gen(1), _gen(2)], **kw), rtol=1e-5, atol=1e-5)
    for i in range(2):
        emb = {k: v[i:i + 1] for k, v in flux_embeds(2).items()}
        one = _ours(fill, image=imgs[i:i + 1], mask_image=masks[i:i + 1], num_inference_steps=3,
                    generator=_gen(1 + i), **emb)
        torch.testing.assert_close(ours[i:i + 1], one, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_control_baseline_equals_diffusers_with_a_text_prompt_and_batched(control):
    kw = dict(prompt="a cat", control_image=_pil(), num_inference_steps=3, max_sequence_length=32)
    torch.testing.assert_close(_ours(control, generator=_gen(4), **kw), _ref(control, generator=_gen(4), **kw),
                               rtol=1e-5, atol=1e-5)
    pils = [_pil(0), _pil(1)]
    kw = dict(**flux_embeds(2), control_image=pils, num_inference_steps=3)
    ours = _ours(control, generator=[_gen(1), _gen(2)], **kw)
    torch.testing.assert_close(ours, _ref(control, generator=[_gen(1), _gen(2)], **kw), rtol=1e-5, atol=1e-5)
    for i in range(2):
        emb = {k: v[i:i + 1] for k, v in flux_embeds(2).items()}
        one = _ours(control, control_image=pils[i], num_inference_steps=3, generator=_gen(1 + i), **emb)
        torch.testing.assert_close(ours[i:i + 1], one, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_control_tensor_is_taken_as_it_is_like_the_pipeline(control):
    """FluxControlPipeline takes a tensor control image as it is (pixels in [-1, 1] of the output size: no resize, no
    [0, 1] -> [-1, 1]); ralu too (found by the GPU smoke step's dry run, which gave a [0, 1] tensor); another shape is
    refused, naming it."""
    pixels = _img(seed=8) * 2 - 1
    kw = dict(**flux_embeds(), control_image=pixels, num_inference_steps=3)
    torch.testing.assert_close(_ours(control, generator=_gen(4), **kw), _ref(control, generator=_gen(4), **kw),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"control_image tensor of shape \(1, 3, 32, 32\)"):
        _ours(control, **{**kw, "control_image": _img(h=32, w=32)})


@torch.no_grad()
def test_control_defaults_are_the_pipelines(control):
    from ralu_runtime import prepare

    plan = prepare(control, control_image=_pil(), height=H, width=W, speedup=None, **flux_embeds())
    assert (plan.steps, plan.guidance) == (28, 3.5)
    assert plan.channels.kind == "control" and plan.edit is None


@torch.no_grad()
def test_fill_defaults_are_the_pipelines(fill):
    from ralu_runtime import prepare

    plan = prepare(fill, image=_img(), mask_image=_mask(), height=H, width=W, speedup=None, **flux_embeds())
    assert (plan.steps, plan.guidance, plan.edit.strength) == (50, 30.0, 1.0)


# ------------------------------------------------------------------------------------------------ token sets
def test_channel_tokens_follow_every_stage_layout():
    torch.manual_seed(0)
    b, c, coarse_hw = 2, 5, (3, 4)
    fine_hw = (6, 8)
    fine = torch.randn(b, 48, c)
    coarse = torch.randn(b, 12, c)
    cc = ChannelCond(fine, coarse, fine_hw, coarse_hw)
    pos_c = grid_positions(*coarse_hw).expand(b, -1, -1)
    pos_f = grid_positions(*fine_hw).expand(b, -1, -1)
    assert cc.tokens(TokenGrid(pos_c, coarse_hw, None, raster=True)) is coarse
    assert cc.tokens(TokenGrid(pos_f, fine_hw, None, raster=True)) is fine
    layout = TokenLayout(coarse_hw, torch.tensor([[0, 5, 11], [2, 3, 7]]))
    pos2 = _mixed_index(layout)[1]
    got = cc.tokens(TokenGrid(pos2, coarse_hw, layout.stage2_fine_mask()))
    torch.testing.assert_close(got, _mix(layout, fine, coarse), rtol=0, atol=0)
    # a permuted fine grid (non-raster) gathers by position
    perm = torch.randperm(48)
    got = cc.tokens(TokenGrid(pos_f[:, perm], fine_hw, None, raster=False))
    assert torch.equal(got, fine[:, perm])


def test_fill_mask_channels_match_the_pipeline_and_pool_to_half_resolution(fill):
    from diffusers import FluxFillPipeline

    m = _mask(2, box=(3, 41, 17, 50))
    f = fill.vae_scale_factor
    ours = get_adapter(fill).pack(mask_channels(m, f))
    theirs, _ = FluxFillPipeline.prepare_mask_latents(fill, m, torch.zeros(2, 16, H // f, W // f), 1, 16, 2, H, W,
                                                       torch.float32, "cpu", None)
    assert torch.equal(ours, theirs)
    coarse = mask_channels(F.max_pool2d(m, 2), f)            # (B, 64, h/2, w/2)
    assert coarse.shape == (2, f * f, H // (2 * f), W // (2 * f))
    # coarse latent pixel (y, x), channel dy * 8 + dx: the 2x2 pixel block (16 y + 2 dy, 16 x + 2 dx)
    y, x, dy, dx = 1, 2, 3, 5
    block = m[:, 0, 16 * y + 2 * dy: 16 * y + 2 * dy + 2, 16 * x + 2 * dx: 16 * x + 2 * dx + 2]
    assert torch.equal(coarse[:, dy * f + dx, y, x], block.amax((-1, -2)))
    assert set(coarse.unique().tolist()) <= {0.0, 1.0}


def _record_inputs(pipe):
    seen = []
    handle = pipe.transformer.x_embedder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    return seen, handle


@pytest.mark.parametrize("which", ["fill", "control"])
@torch.no_grad()
def test_every_ralu_call_gets_the_conditioning_of_its_token_set(fill, control, which):
    from ralu_runtime.channel_cond import check_channels

    pipe = fill if which == "fill" else control
    h, w = 128, 128
    kw = dict(image=_img(h=h, w=w), mask_image=_mask(h=h, w=w, box=(0, 40, 0, 40))) if which == "fill" else \
        dict(control_image=_img(h=h, w=w))
    seen, handle = _record_inputs(pipe)
    try:
        out = generate(pipe, height=h, width=w, speedup="4x", seed=3, output_type="latent", progress=False,
                       return_masks=True, **flux_embeds(), **kw)
    finally:
        handle.remove()
    adapter = get_adapter(pipe)
    _, spec = check_channels(adapter, image=kw.get("image"), mask_image=kw.get("mask_image"),
                             control_image=kw.get("control_image"), strength=None, height=h, width=w, batch=1,
                             num_images_per_prompt=1, num_inference_steps=None)
    # stage 3's (fine) conditioning is the pipeline's (the baseline parity tests); stages 1 and 2 must get its
    # pooled (coarse) and mixed forms
    steps = out.schedule.steps
    assert len(seen) == sum(steps)
    s1, s2, s3 = seen[:steps[0]], seen[steps[0]:steps[0] + steps[1]], seen[steps[0] + steps[1]:]
    fine = s3[0][..., 64:]
    assert all(torch.equal(t[..., 64:], fine) for t in s3) and fine.shape == (1, 64, adapter.transformer.config.
                                                                             in_channels - 64)
    lat = adapter.unpack(fine[..., :64].contiguous(), h // 8, w // 8)
    coarse = adapter.pack(F.avg_pool2d(lat, 2))
    if which == "fill":
        m = spec.mask
        coarse = torch.cat([coarse, adapter.pack(mask_channels(F.max_pool2d(m, 2), 8))], -1)
        torch.testing.assert_close(fine[..., 64:], adapter.pack(mask_channels(m, 8)), rtol=0, atol=0)
    for t in s1:
        torch.testing.assert_close(t[..., 64:], coarse, rtol=1e-6, atol=1e-6)
    layout = TokenLayout((4, 4), torch.nonzero(out.masks[0].flatten())[:, 0][None])
    for t in s2:
        torch.testing.assert_close(t[..., 64:], _mix(layout, fine, coarse), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ RALU runs
@pytest.mark.slow
@pytest.mark.parametrize("speedup", ["4x", "7x"])
@torch.no_grad()
def test_ralu_runs_are_deterministic_and_leave_the_pipeline_as_found(fill, control, speedup):
    for pipe, kw in ((fill, dict(image=_img(), mask_image=_mask())), (control, dict(control_image=_pil()))):
        before = snapshot(pipe)
        a = generate(pipe, height=H, width=W, speedup=speedup, seed=7, output_type="latent", progress=False,
                     **flux_embeds(), **kw).images
        b = generate(pipe, height=H, width=W, speedup=speedup, seed=7, output_type="latent", progress=False,
                     **flux_embeds(), **kw).images
        assert_same(before, snapshot(pipe))
        assert torch.equal(a, b) and torch.isfinite(a).all() and a.shape == (1, 16, H // 8, W // 8)


@torch.no_grad()
def test_the_conditioning_changes_the_ralu_result(control):
    kw = dict(height=H, width=W, speedup="7x", seed=7, output_type="latent", progress=False, **flux_embeds())
    a = generate(control, control_image=_pil(0), **kw).images
    b = generate(control, control_image=_pil(1), **kw).images
    assert not torch.allclose(a, b, atol=1e-4)


@torch.no_grad()
def test_fill_upsamples_the_masked_regions_first(fill):
    h = w = 128  # 4 x 4 coarse tokens, 4x preset: 4 upsampled first
    corner = _mask(h=h, w=w, box=(96, 128, 96, 128))  # the bottom-right coarse token
    kw = dict(height=h, width=w, speedup="4x", seed=2, output_type="latent", progress=False, return_masks=True,
              image=_img(h=h, w=w), **flux_embeds())
    out = generate(fill, mask_image=corner, **kw)
    sel = out.masks[0]
    assert sel[3, 3] and int(sel.sum()) == 4
    assert bool(sel[2:, 2:].all())  # the masked token and its dilated neighbours (3 of them inside the grid)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kw,needle", [
    (dict(image="I"), r"needs mask_image= \(it takes image= and mask_image="),
    (dict(image="I", mask_image="M", strength=0.0), "strength=0.0"),
    (dict(image="I", mask_image="M", strength=1e-17), "strength=1e-17 leaves none of the 50 steps"),
    (dict(image="I", mask_image="M", control_image="I"), "control_image= goes with a FluxControlPipeline"),
    (dict(image="I", mask_image="Z"), "no pixel to repaint"),
    (dict(image="I", mask_image="M", num_images_per_prompt=3, image_n=2), "must divide the batch"),
    (dict(image=np.full((H, W, 3), 255, np.uint8), mask_image="M"), "image has pixel values of magnitude up to 509"),
])
def test_fill_refusals(fill, kw, needle):
    kw = dict(kw)
    n = kw.pop("image_n", 1)
    vals = {"I": _img(n), "M": _mask(), "Z": torch.zeros(1, 1, H, W)}
    kw = {k: vals.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises((ValueError, TypeError), match=needle):
        generate(fill, height=H, width=W, progress=False, **flux_embeds(), **kw)


@pytest.mark.parametrize("kw,needle", [
    (dict(), "needs control_image="),
    (dict(control_image="C", image="C"), "image= is not taken"),
    (dict(control_image="C", strength=0.5), "strength= is not taken"),
    (dict(control_image=[_pil(0), _pil(1), _pil(2)]), "3 control images for 1 prompt"),
    (dict(control_image="text"), "control_image=str"),
    (dict(control_image=np.full((H, W, 3), 200, np.uint8)), "control_image has pixel values of magnitude up to 399"),
    (dict(control_image=torch.full((1, 3, H, W), 200.0)), "control_image has pixel values of magnitude up to 200"),
])
def test_control_refusals(control, kw, needle):
    kw = {k: (_pil() if isinstance(v, str) and v == "C" else v) for k, v in kw.items()}
    with pytest.raises((ValueError, TypeError), match=needle):
        generate(control, height=H, width=W, progress=False, **flux_embeds(), **kw)


def test_control_image_with_another_pipeline_and_extra_channels_without_fill_are_refused(flux_pipe, fill):
    from diffusers import FluxPipeline

    with pytest.raises(ValueError, match="control_image= goes with a FluxControlPipeline"):
        generate(flux_pipe, control_image=_pil(), height=H, width=W, **flux_embeds())
    plain = FluxPipeline(**fill.components)
    with pytest.raises(ValueError, match="takes 320 conditioning input channels"):
        generate(plain, height=H, width=W, **flux_embeds())


def test_context_parallel_is_refused(control):
    from diffusers import ContextParallelConfig

    with pytest.raises(ValueError, match="parallel"):
        generate(control, control_image=_pil(), height=H, width=W, parallel=ContextParallelConfig(ulysses_degree=2),
                 **flux_embeds())


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_ralu_edit_cli_runs_fill_and_control(tmp_path, capsys):
    from ralu_runtime import cli

    _pil().save(tmp_path / "in.png")
    m = Image.new("L", (W, H), 0)
    m.paste(255, (16, 8, 56, 40))
    m.save(tmp_path / "mask.png")
    out = tmp_path / "fill.png"
    assert cli.main(["edit", "--model", "tiny-flux-fill", "--image", str(tmp_path / "in.png"), "--mask",
                     str(tmp_path / "mask.png"), "--prompt", "a cat", "--height", str(H), "--width", str(W),
                     "--speedup", "4x", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "stage1" in text and f"wrote {out}" in text and Image.open(out).size == (W, H)
    out = tmp_path / "control.png"
    assert cli.main(["edit", "--model", "tiny-flux-control", "--control-image", str(tmp_path / "in.png"),
                     "--prompt", "a cat", "--height", str(H), "--width", str(W), "--speedup", "7x", "--out", str(out),
                     "--no-progress"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and Image.open(out).size == (W, H)


@pytest.mark.parametrize("extra,needle", [
    (["--model", "tiny-flux-control", "--image", "{tmp}/in.png"], "give --control-image"),
    (["--model", "tiny-flux-fill", "--image", "{tmp}/in.png"], "give --mask"),
    (["--model", "tiny-flux-control", "--control-image", "{tmp}/in.png", "--strength", "0.5"], "--strength do not"),
    (["--model", "tiny-flux", "--control-image", "{tmp}/in.png"], "needs a FLUX.1 control model"),
    (["--model", "tiny-flux-fill"], "give --image"),
])
def test_ralu_edit_cli_refuses_before_loading(tmp_path, monkeypatch, capsys, extra, needle):
    from ralu_runtime import cli

    def no_load(plan):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli, "_load", no_load)
    _pil().save(tmp_path / "in.png")
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert cli.main(["edit", "--no-progress", "--out", str(tmp_path / "o.png"), *args]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "o.png").exists()


@torch.no_grad()
def test_packed_velocity_concatenates_each_calls_conditioning(fill):
    """The serving engine's packed model call: every call's own conditioning, equal to its unpacked call."""
    from ralu_runtime.adapters.base import VelocityCall
    from ralu_runtime.channel_cond import attach

    adapter = get_adapter(fill)
    torch.manual_seed(0)
    cond = adapter.encode_prompt(None, prompt_embeds=flux_embeds()["prompt_embeds"],
                                 pooled_prompt_embeds=flux_embeds()["pooled_prompt_embeds"], guidance_scale=30.0)
    fine_hw, coarse_hw = (4, 6), (2, 3)
    calls = []
    for seed, (hw, raster_hw) in enumerate([(fine_hw, fine_hw), (coarse_hw, coarse_hw)]):
        g = _gen(seed)
        cc = ChannelCond(torch.randn(1, 24, 320, generator=g), torch.randn(1, 6, 320, generator=g), fine_hw, coarse_hw)
        n = hw[0] * hw[1]
        grid = TokenGrid(grid_positions(*hw)[None], hw, None, raster=True)
        calls.append(VelocityCall(torch.randn(1, n, 64, generator=g), grid, torch.tensor(700.0), attach(cond, cc)))
    packed = adapter.packed_velocity(calls)
    for c, p in zip(calls, packed):
        torch.testing.assert_close(p, adapter.velocity(c.tokens, c.grid, c.timestep, c.cond), rtol=1e-4, atol=1e-5)
    plain = adapter.velocity(calls[0].tokens, calls[0].grid, calls[0].timestep,
                             attach(cond, ChannelCond(torch.zeros(1, 24, 320), torch.zeros(1, 6, 320), fine_hw,
                                                      coarse_hw)))
    assert not torch.allclose(plain, packed[0], atol=1e-4)


@pytest.mark.slow
def test_served_fill_edit_equals_generate(fill):
    """POST /v1/images/edits on a served FLUX.1 Fill model (a RALU preset, the engine's packed model calls) equals
    generate alone."""
    import functools

    from helpers import running_server
    from openai_checks import pngs
    from test_serving_edits import alone, assert_close, edit, grey_mask, png, source

    running = functools.partial(running_server, grace_s=5.0, stop_s=35.0)
    with running(fill) as (server, _):
        r = edit(server, {"strength": None, "steps": None, "speedup": "4x"},
                 [("image", ("in.png", png(source()), "image/png")), ("mask", ("m.png", png(grey_mask()), "image/png"))])
        got = pngs(r)
    assert_close(got, alone(fill, source(), speedup="4x", mask_image=grey_mask()))


@torch.no_grad()
def test_compiled_runners_flatten_the_conditioning_as_a_tensor_input(fill):
    """The compile backends key their graphs / exports by the flattened call: the conditioning must be a tensor input
    (a new image reuses the graph), and the flattened call must give the same velocity."""
    from ralu_runtime.channel_cond import attach
    from ralu_runtime.compile.flatten import flatten, unflatten

    adapter = get_adapter(fill)
    cond = adapter.encode_prompt(None, guidance_scale=30.0, **flux_embeds())
    fine_hw, coarse_hw = (4, 6), (2, 3)
    layout = TokenLayout(coarse_hw, torch.tensor([[1, 4]]))
    grid = TokenGrid(_mixed_index(layout)[1], coarse_hw, layout.stage2_fine_mask())
    tokens, t = torch.randn(1, 12, 64, generator=_gen(0)), torch.tensor(500.0)
    specs = []
    for seed in (1, 2):
        g = _gen(seed)
        cc = ChannelCond(torch.randn(1, 24, 320, generator=g), torch.randn(1, 6, 320, generator=g), fine_hw, coarse_hw)
        c = attach(cond, cc)
        tensors, names, spec = flatten(tokens, grid, t, c)
        assert "cond_channels" in names and torch.equal(tensors[names.index("cond_channels")], cc.tokens(grid))
        specs.append(spec)
        torch.testing.assert_close(adapter.velocity(*unflatten(tensors, spec)), adapter.velocity(tokens, grid, t, c),
                                   rtol=0, atol=0)
    assert specs[0] == specs[1] and hash(specs[0]) == hash(specs[1])


@pytest.mark.slow
@torch.no_grad()
def test_onnx_backend_takes_the_conditioning_as_an_input(monkeypatch):
    """backend="onnx" (an exported graph per call signature): a second control image reuses the exports and still
    gives its own result (the conditioning is a graph input, not a baked constant)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from ralu_runtime.tiny.flux_fill import build_tiny_flux_control_pipeline

    runs = []
    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: runs.append(1) or real_run(self, *a, **k))
    pipe = build_tiny_flux_control_pipeline(seed=0)
    kw = dict(height=H, width=W, speedup="7x", seed=3, output_type="latent", progress=False, **flux_embeds())
    refs = [generate(pipe, control_image=_pil(s), **kw).images for s in (0, 1)]
    assert not torch.allclose(refs[0], refs[1], atol=1e-3)
    for s in (0, 1):
        out = generate(pipe, control_image=_pil(s), backend="onnx", **kw).images
        torch.testing.assert_close(out, refs[s], rtol=1e-4, atol=1e-4)
        if s == 0:
            builds = len(get_adapter(pipe).runner.builds)
    assert len(get_adapter(pipe).runner.builds) == builds and len(runs) == 2 * 10  # 7x: 2 + 3 + 5 calls per run


@torch.no_grad()
def test_control_images_repeat_per_prompt_as_the_pipeline(control):
    """Two prompts, two images per prompt, one control image per prompt, one generator: the pipeline's
    prompt-major repeat ([c0, c0, c1, c1]) and its single encode + noise draw."""
    kw = dict(prompt=["a cat", "a dog"], max_sequence_length=32, control_image=[_pil(0), _pil(1)],
              num_images_per_prompt=2, num_inference_steps=2)  # (diffusers 0.42.1 does not repeat given pooled embeds)
    ours = _ours(control, generator=_gen(6), **kw)
    torch.testing.assert_close(ours, _ref(control, generator=_gen(6), **kw), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[1], ours[2], atol=1e-3)


# ------------------------------------------------------------------------------------------ POST /v1/images/edits
def test_images_edits_serves_a_control_pipeline(control):
    """A served FluxControlPipeline: the edits endpoint's upload is the control image (the result equals generate
    with control_image= alone); a mask is 400; a generation request, which has no image, is 400 naming the edits
    endpoint (it was every request's "give control_image=", with no way to send one)."""
    import base64
    import functools
    import io

    import httpx

    from helpers import SERVE_DEFAULTS, running_server
    from openai_checks import assert_error
    from ralu_runtime.serving.http import EDITS_PATH, GENERATIONS_PATH

    buf = io.BytesIO()
    _pil(2).save(buf, format="PNG")
    files = [("image", ("canny.png", buf.getvalue(), "image/png"))]
    base = {"prompt": "a cat", "seed": "3", "steps": "2", "speedup": "none", "size": f"{W}x{H}"}
    with functools.partial(running_server, grace_s=5.0, stop_s=35.0)(control) as (server, engine):
        r = httpx.post(server.url + EDITS_PATH, data=base, files=files, timeout=300)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
        calls = engine.metrics()["model_calls"]
        err = assert_error(httpx.post(server.url + EDITS_PATH, data=base, timeout=60,
                                      files=files + [("mask", ("m.png", buf.getvalue(), "image/png"))]),
                           400, param="mask", code="invalid_mask")
        assert "FluxControlPipeline" in err["message"]
        err = assert_error(httpx.post(server.url + GENERATIONS_PATH, json={"prompt": "a cat"}, timeout=60),
                           400, param="image", code="missing_required_parameter")
        assert EDITS_PATH in err["message"]
        assert engine.metrics()["model_calls"] == calls
    want = generate(control, "a cat", control_image=_pil(2), seed=3, num_inference_steps=2, speedup=None, height=H,
                    width=W, output_type="pil", progress=False,
                    max_sequence_length=SERVE_DEFAULTS["max_sequence_length"]).images[0]
    assert got.shape == (H, W, 3)
    assert np.abs(got.astype(np.int16) - np.asarray(want).astype(np.int16)).max() <= 1


@pytest.mark.parametrize("name", ["tiny-flux-fill", "tiny-flux-control"])
@torch.no_grad()
def test_serve_warm_up_inputs_run_fill_and_control_models(name, fill, control):
    """``ralu serve --backend ...`` warms up with one request before it answers: for Fill / control models that
    request needs images (it had none: the server never started)."""
    from ralu_runtime import cli

    pipe = fill if name.endswith("fill") else control
    out = generate(pipe, "ralu warm-up", height=H, width=W, speedup=None, num_inference_steps=1, seed=0,
                   output_type="latent", progress=False, **cli._warmup_images(name))
    assert torch.isfinite(out.images).all()
    assert cli._warmup_images("tiny-flux") == {}


def test_images_generations_on_a_fill_model_names_the_edits_endpoint(fill):
    import functools

    import httpx

    from helpers import running_server
    from openai_checks import assert_error
    from ralu_runtime.serving.http import EDITS_PATH, GENERATIONS_PATH

    with functools.partial(running_server, grace_s=5.0, stop_s=35.0)(fill) as (server, engine):
        err = assert_error(httpx.post(server.url + GENERATIONS_PATH, json={"prompt": "a cat"}, timeout=60),
                           400, param="image", code="missing_required_parameter")
        assert "an image and a mask" in err["message"] and EDITS_PATH in err["message"]
        assert engine.metrics()["model_calls"] == 0
