"""Regions scored in latent space (``region_source="latent"``): the Sobel block score, and ``generate`` with it on a
tiny FLUX and a tiny Wan pipeline (no preview decode, deterministic, a batch equals single runs, checked input)."""
import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.edges import LATENT_SCORE_MAX, latent_edge_scores
from ralu_runtime.tiny import build_tiny
from ralu_runtime.tiny.wan import build_tiny_wan_pipeline, random_embeds
from tiny_inputs import flux_embeds

SMALL = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)


def _slow_sobel(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel Sobel magnitude summed over channels, loops over pixels with replicated borders: (C, h, w) -> (h, w)."""
    c, h, w = x.shape
    out = torch.zeros(h, w, dtype=torch.float64)
    kx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    for i in range(h):
        for j in range(w):
            for ch in range(c):
                gx = gy = 0.0
                for di in range(3):
                    for dj in range(3):
                        v = float(x[ch, min(max(i + di - 1, 0), h - 1), min(max(j + dj - 1, 0), w - 1)])
                        gx += kx[di][dj] * v
                        gy += kx[dj][di] * v
                out[i, j] += (gx * gx + gy * gy) ** 0.5
    return out


@pytest.mark.parametrize("shape,patch", [((2, 3, 8, 12), 2), ((1, 4, 6, 6), 3), ((1, 2, 4, 4), 1)])
def test_latent_scores_equal_a_pixel_loop(shape, patch):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = latent_edge_scores(x, patch)
    b, c, h, w = shape
    assert got.shape == (b, h // patch, w // patch) and got.dtype == torch.float32
    for i in range(b):
        blocks = _slow_sobel(x[i]).view(h // patch, patch, w // patch, patch).sum(dim=(1, 3))
        want = blocks * (LATENT_SCORE_MAX / blocks.max())
        torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-3)


def test_latent_scores_find_the_edge_and_ignore_frame_seams():
    # two frames, each flat but of very different levels: a seam between them in the tall layout is no edge
    x = torch.zeros(1, 2, 2, 8, 8)
    x[:, :, 1] = 5.0
    x[:, :, 0, :, 5:] = 1.0                                   # frame 0: a vertical step edge between cols 4 and 5
    s = latent_edge_scores(x, 2)
    assert s.shape == (1, 8, 4)
    frame0, frame1 = s[0, :4], s[0, 4:]
    assert torch.all(frame1 == 0)                             # flat frame: no score, whatever its neighbour frame
    assert torch.all(frame0[:, 2] == LATENT_SCORE_MAX)        # the blocks holding the edge (cols 4-5) score highest
    assert torch.all(frame0[:, 0] == 0) and torch.all(frame0[:, 3] == 0)


def test_latent_scores_refuse_bad_shapes():
    with pytest.raises(ValueError, match="multiples of patch=2"):
        latent_edge_scores(torch.zeros(1, 2, 5, 4), 2)
    with pytest.raises(ValueError, match="latents must be"):
        latent_edge_scores(torch.zeros(2, 5, 4), 2)
    with pytest.raises(ValueError, match="patch must be"):
        latent_edge_scores(torch.zeros(1, 2, 4, 4), 0)


def test_all_zero_latents_give_zero_scores_not_nan():
    s = latent_edge_scores(torch.zeros(1, 2, 4, 4), 2)
    assert torch.all(s == 0)


@pytest.fixture(scope="module")
def flux():
    return build_tiny("tiny-flux")


def _count_decodes(monkeypatch, adapter):
    calls = []
    original = adapter.decode

    def counting(latents, impl=None):
        calls.append(tuple(latents.shape))
        return original(latents, impl=impl)

    monkeypatch.setattr(adapter, "decode", counting)   # ralu's adapter object, not the user's pipeline
    return calls


def test_latent_source_skips_the_preview_decode(flux, monkeypatch):
    calls = _count_decodes(monkeypatch, get_adapter(flux))
    kw = dict(height=128, width=128, speedup=SMALL, output_type="latent", progress=False, **flux_embeds(1))
    generate(flux, seed=3, **kw)
    assert len(calls) == 1                                        # the half-resolution preview
    generate(flux, seed=3, region_source="latent", **kw)
    assert len(calls) == 1                                        # none more


def test_latent_source_deterministic_batch_equals_single(flux):
    kw = dict(height=128, width=128, speedup=SMALL, output_type="latent", progress=False, region_source="latent",
              return_masks=True)
    e2 = flux_embeds(2)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    both = generate(flux, generator=gens, **e2, **kw)
    again = generate(flux, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **e2, **kw)
    assert torch.equal(both.images, again.images) and torch.equal(both.masks, again.masks)
    for i, s in enumerate((5, 6)):
        one = generate(flux, generator=torch.Generator().manual_seed(s), prompt_embeds=e2["prompt_embeds"][i:i + 1],
                       pooled_prompt_embeds=e2["pooled_prompt_embeds"][i:i + 1], **kw)
        torch.testing.assert_close(one.images, both.images[i:i + 1], rtol=1e-5, atol=1e-5)
        assert torch.equal(one.masks, both.masks[i:i + 1])


def test_latent_source_video_both_region_modes(monkeypatch):
    pipe = build_tiny_wan_pipeline(seed=0)
    calls = _count_decodes(monkeypatch, get_adapter(pipe))
    kw = dict(height=64, width=96, num_frames=9, speedup=SMALL, output_type="latent", progress=False,
              region_source="latent", return_masks=True, **random_embeds(pipe, 1, 12, seed=0, cfg=True))
    frame = generate(pipe, seed=1, region_mode="frame", **kw)
    clip = generate(pipe, seed=1, region_mode="clip", **kw)
    assert calls == []
    assert frame.masks.shape == clip.masks.shape == (1, 3, 2, 3)
    assert torch.equal(clip.masks[:, 0], clip.masks[:, 1]) and torch.equal(clip.masks[:, 0], clip.masks[:, 2])
    assert torch.isfinite(frame.images).all() and torch.isfinite(clip.images).all()


def test_bad_region_source_refused_before_work(flux, monkeypatch):
    adapter = get_adapter(flux)
    monkeypatch.setattr(adapter, "velocity", lambda *a, **k: pytest.fail("model called"))
    with pytest.raises(ValueError, match=r"region_source='pixels'.*'decode', 'latent'"):
        generate(flux, height=128, width=128, speedup=SMALL, region_source="pixels", **flux_embeds(1))
