"""The sampler on video latents ``(B, C, F, h, w)``: frames stacked as a tall token grid (time kept at full
resolution), regions per frame or per clip, ``num_frames`` / ``region_mode`` checks.

A toy video adapter runs the tiny FLUX model on the tall image of its frames, so a "video" of F frames at H x W
must give bitwise the same latents as FLUX at (F H) x W with the same noise: every piece of the video path
(5-D packing, tall grids, per-frame region choice, unpacking) is checked against the image path."""
from __future__ import annotations

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters.flux import FluxAdapter
from tiny_inputs import flux_embeds

SCHED = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
F, H, W = 3, 64, 96


class TallFluxVideo(FluxAdapter):
    """FLUX on the tall image of a video's frames (a test double for a video DiT)."""

    family = "flux"
    is_video = True
    default_frames = 1 + 4 * (F - 1)
    temporal_factor = 4

    def prepare_noise(self, batch, height, width, generators, dtype, num_frames=None):
        frames = 1 + (num_frames - 1) // self.temporal_factor
        tall = super().prepare_noise(batch, frames * height, width, generators, dtype)
        h = tall.shape[-2] // frames
        return tall.view(batch, tall.shape[1], frames, h, tall.shape[-1])

    def pack(self, latents):
        if latents.ndim == 4:
            return super().pack(latents)
        b, c, f, h, w = latents.shape
        return super().pack(latents.reshape(b, c, f * h, w))

    def unpack(self, tokens, h, w):
        p = self.patch_size
        f = tokens.shape[1] // ((h // p) * (w // p))
        tall = super().unpack(tokens, f * h, w)
        return tall.view(tall.shape[0], tall.shape[1], f, h, w)

    def decode(self, latents, impl=None):
        b, c, f, h, w = latents.shape
        img = super().decode(latents.reshape(b, c, f * h, w), impl)
        return img.view(b, img.shape[1], f, img.shape[2] // f, img.shape[3])

    def edge_images(self, latents, decode):
        video = decode(latents)
        b, ch, f, hh, ww = video.shape
        return video.reshape(b, ch, f * hh, ww)


@pytest.fixture(scope="module")
def pair(flux_pipe):
    return flux_pipe, TallFluxVideo(flux_pipe)


KW = dict(output_type="latent", progress=False, return_masks=True, transition_impl="torch")


@torch.no_grad()
def test_video_equals_the_tall_image(pair):
    pipe, video = pair
    emb = flux_embeds(1)
    for speedup in (None, SCHED):
        extra = dict(num_inference_steps=3) if speedup is None else {}
        v = generate(video, **emb, height=H, width=W, num_frames=video.default_frames, speedup=speedup,
                     seed=7, **KW, **extra)  # default region_mode: "frame"
        img = generate(pipe, **emb, height=F * H, width=W, speedup=speedup, seed=7, **KW, **extra)
        assert v.images.shape == (1, 16, F, H // 8, W // 8)
        assert torch.equal(v.images.reshape(img.images.shape), img.images)
        if speedup is not None:
            assert v.masks.shape == (1, F, H // 32, W // 32)
            assert torch.equal(v.masks.reshape(img.masks.shape), img.masks)


@torch.no_grad()
def test_clip_regions_are_the_same_in_every_frame(pair):
    _pipe, video = pair
    emb = flux_embeds(2)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = generate(video, **emb, height=H, width=W, speedup=SCHED, generator=gens, region_mode="clip", **KW)
    masks = out.masks
    assert masks.shape == (2, F, 2, 3)
    for f in range(1, F):
        assert torch.equal(masks[:, f], masks[:, 0])
    per_frame = int(2 * 3 * SCHED.ratio)
    assert (masks.sum(dim=(2, 3)) == per_frame).all()
    # batch of two = two single runs (per-image generators), also in clip mode
    for i, s in enumerate((1, 2)):
        emb_i = {k: v[i:i + 1] for k, v in emb.items()}
        one = generate(video, **emb_i, height=H, width=W, speedup=SCHED, generator=torch.Generator().manual_seed(s),
                       region_mode="clip", **KW)
        assert torch.equal(one.masks[0], masks[i])
        torch.testing.assert_close(one.images[0], out.images[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,text", [
    (dict(num_frames=6), "1 \\+ a multiple of 4"),
    (dict(num_frames=0), "num_frames=0"),
    (dict(region_mode="pixel"), "region_mode='pixel'"),
    (dict(region_mode="clip", speedup=None), "region_mode='clip' applies to RALU runs"),   # was ignored
])
def test_video_arguments_checked(pair, kw, text):
    _pipe, video = pair
    with pytest.raises(ValueError, match=text):
        generate(video, **flux_embeds(1), height=H, width=W, **{"speedup": SCHED, **KW, **kw})


def test_image_families_refuse_video_arguments(pair):
    pipe, _video = pair
    for kw in (dict(num_frames=9), dict(region_mode="clip")):
        with pytest.raises(ValueError, match="makes images"):
            generate(pipe, **flux_embeds(1), height=H, width=W, speedup=SCHED, **KW, **kw)


@torch.no_grad()
def test_a_ratio_that_upsamples_no_region_at_this_size_is_warned_of(pair, caplog):
    """ratio 0.1 of a frame's 2 x 3 coarse blocks is under one block: in clip mode stage 2 upsamples nothing (as
    ratio=0), said in a warning at prepare; per frame (18 blocks in all) one block is upsampled, and nothing is said."""
    _pipe, video = pair
    low = SCHED.with_ratio(0.1)
    with caplog.at_level("WARNING", logger="ralu"):
        out = generate(video, **flux_embeds(1), height=H, width=W, speedup=low, seed=3, region_mode="clip", **KW)
    assert int(out.masks.sum()) == 0
    said = [r.getMessage() for r in caplog.records if "upsamples no region" in r.getMessage()]
    assert len(said) == 1 and "6 coarse blocks per latent frame" in said[0] and "region_mode='frame'" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ralu"):
        out = generate(video, **flux_embeds(1), height=H, width=W, speedup=low, seed=3, region_mode="frame", **KW)
    assert int(out.masks.sum()) == 1
    assert not [r for r in caplog.records if "upsamples no region" in r.getMessage()]
