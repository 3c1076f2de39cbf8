"""Video shapes for the fused stage transition and the varlen attention (tens of thousands of tokens per sample).

The sampler runs a video as a tall token grid: latent frames stacked vertically, frame ``f`` holding coarse rows
``[f R, (f + 1) R)`` (``ralu_runtime.sampler.sample_ralu``, ``TokenGrid.frames``). The transition kernel and the
varlen attention only see token lists, so these tests build the tall-grid layouts of real video sizes the way the
sampler does (regions from ``select_regions`` on a decoded clip whose textured patch moves from frame to frame,
``TokenLayout``, the preset's boundary coefficients, seeds from ``draw_seeds``) and check:

* Triton (``TRITON_INTERPRET=1``) = torch reference bitwise, positions and values, for transitions 1->2 and 2->3,
  with exactly one kernel launch per transition (every Triton launch in the process is counted);
* the video invariants: a stage-2 child stays in its parent's frame, stage 3 is the full tall grid in raster order
  and (noise off) exactly each frame's own nearest upsampling, the noise is a function of the seed, of the sample
  and of the frame's own regions only, and uncorrelated between frames;
* varlen attention over a Wan stage-3 sequence and a stage-2 sequence packed together (32 760 + 15 561 tokens,
  float32, the flash SDPA kernel forced: no L^2 score matrix) against per-sequence SDPA and an exact float64
  softmax on sampled query rows.

Shapes: Wan 2.1 480p, 81 frames (latent 21 x 60 x 104, patch 2: fine 630 x 52 = 32 760 tokens, coarse 8 190) and
HunyuanVideo 1.5 720p (704 x 1280), 33 frames, 2 samples (latent 9 x 44 x 80, patch 1: fine 396 x 80 = 31 680
tokens per sample). Few token channels (4): the interpreter's cost grows with them, the kernels' index math does
not depend on them (other channel counts: tests/test_transition_kernel.py).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_kernel_matches_reference
from ralu_kernels import transition as T
from ralu_kernels.attention import cu_seqlens_from_lens, varlen_attention
from ralu_runtime.layout import TokenLayout, grid_positions
from ralu_runtime.sampler import apply_transition, draw_seeds, select_regions
from ralu_runtime.schedule import get_preset

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not (T.HAS_TRITON and INTERPRETED),
                                       reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")


@dataclass(frozen=True)
class VideoShape:
    """A text-to-video call: pixels, frames, the VAE's factors and the transformer's patch."""

    name: str
    family: str          # ralu preset family
    base_shift: float    # the model's own flow shift at this size (h_ori of the presets)
    pixels_hw: tuple[int, int]
    num_frames: int
    vae_spatial: int
    patch: int
    batch: int
    dtype: torch.dtype
    temporal: int = 4
    channels: int = 4    # token channels in these tests (the model's: 64 for Wan, 32 for HunyuanVideo 1.5)

    @property
    def frames(self) -> int:
        return 1 + (self.num_frames - 1) // self.temporal

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.pixels_hw[0] // self.vae_spatial, self.pixels_hw[1] // self.vae_spatial

    @property
    def frame_coarse_hw(self) -> tuple[int, int]:
        """Coarse token grid of one latent frame: ``(R, Wc)``."""
        return self.latent_hw[0] // (2 * self.patch), self.latent_hw[1] // (2 * self.patch)

    @property
    def coarse_hw(self) -> tuple[int, int]:
        """The tall coarse grid of stages 1-2 (as ``sample_ralu`` computes it)."""
        r, wc = self.frame_coarse_hw
        return self.frames * r, wc

    @property
    def fine_hw(self) -> tuple[int, int]:
        return 2 * self.coarse_hw[0], 2 * self.coarse_hw[1]

    @property
    def m(self) -> int:
        return self.coarse_hw[0] * self.coarse_hw[1]

    def k(self, ratio: float, mode: str) -> int:
        """Tokens upsampled first, as ``sample_ralu`` counts them (clip mode: a whole number per frame)."""
        return int(self.m // self.frames * ratio) * self.frames if mode == "clip" else int(self.m * ratio)

    def __str__(self) -> str:  # pytest ids
        return self.name


WAN = VideoShape("wan21-480p-81f", "wan", 3.0, (480, 832), 81, vae_spatial=8, patch=2, batch=1, dtype=torch.float32)
HUNYUAN = VideoShape("hunyuan15-720p-33f-x2", "hunyuan-video-1.5", 9.0, (704, 1280), 33, vae_spatial=16, patch=1,
                     batch=2, dtype=torch.bfloat16)
# (shape, region mode, preset): each preset's own ratio (7x: r = 0.1, 4x: r = 0.3)
CASES = [(WAN, "frame", "7x"), (WAN, "clip", "4x"), (HUNYUAN, "frame", "4x"), (HUNYUAN, "clip", "7x")]
CASE_IDS = [f"{s}-{m}-{p}" for s, m, p in CASES]
# the Triton interpreter at full size: ~8 s per Wan case, ~20 s for a 2-sample bf16 HunyuanVideo case on 2 cores; the
# fourth case runs the torch reference only (its maps: the invariant tests below)
TRITON_CASES = CASES[:3]


def test_tall_grid_sizes_of_the_video_shapes():
    assert WAN.frames == 21 and WAN.latent_hw == (60, 104)
    assert WAN.fine_hw == (21 * 30, 52) and WAN.fine_hw[0] * WAN.fine_hw[1] == 32760 and WAN.m == 8190
    assert HUNYUAN.frames == 9 and HUNYUAN.latent_hw == (44, 80)
    assert HUNYUAN.fine_hw == (9 * 44, 80) and 4 * HUNYUAN.m == 31680
    for shape, mode, preset in CASES:
        sched = get_preset(shape.family, preset, shape.base_shift)
        k = shape.k(sched.ratio, mode)
        lay = TokenLayout(shape.coarse_hw, torch.arange(k).expand(shape.batch, k))
        assert lay.stage_lengths == (shape.m, shape.m + 3 * k, 4 * shape.m)
        assert lay.fine_hw == shape.fine_hw
        if mode == "clip":
            assert k % shape.frames == 0


# ------------------------------------------------------------------------------------------------ building a case
class _DecodedClip:
    """The part of an adapter ``select_regions`` uses, returning a fixed decoded clip as the edge images."""

    def __init__(self, shape: VideoShape, images: torch.Tensor):
        self.patch_size = shape.patch
        self.vae_scale_factor = shape.vae_spatial
        self.images = images

    def unpack(self, tokens, h, w):
        return tokens

    def decode(self, latents):
        return self.images

    def edge_images(self, latents, decode):
        return decode(latents)


def _moving_patch_clip(shape: VideoShape, seed: int) -> torch.Tensor:
    """``(B, 3, F * hh, ww)`` in [-1, 1], frames stacked like the video adapters' ``edge_images``: flat grey, a
    textured patch that moves right (and down) from frame to frame, and a small textured patch that stays put."""
    g = torch.Generator().manual_seed(seed)
    hh, ww = shape.pixels_hw[0] // 2, shape.pixels_hw[1] // 2  # the half-resolution preview decode
    f = shape.frames
    img = torch.zeros(shape.batch, 3, f * hh, ww)
    ph, pw = hh // 3, ww // 4
    for b in range(shape.batch):
        for i in range(f):
            y0 = hh // 8 + (hh // 2 - hh // 8) * i // max(1, f - 1)
            x0 = (ww - pw) * i // max(1, f - 1)
            img[b, :, i * hh + y0:i * hh + y0 + ph, x0:x0 + pw] = torch.rand(ph, pw, generator=g) * 2 - 1
            img[b, :, i * hh + hh - 40:i * hh + hh - 8, 8 + 16 * b:56 + 16 * b] = \
                torch.rand(32, 48, generator=g) * 2 - 1
    return img


@functools.lru_cache(maxsize=None)
def _case(shape: VideoShape, mode: str, preset: str) -> dict:
    """Everything the sampler has at the two boundaries of one video call (torch reference outputs included)."""
    sched = get_preset(shape.family, preset, shape.base_shift)
    k = shape.k(sched.ratio, mode)
    gens = [torch.Generator().manual_seed(1000 + b) for b in range(shape.batch)]
    b, m, c = shape.batch, shape.m, shape.channels
    zeros = torch.zeros(b, m, c, dtype=shape.dtype)
    sel = select_regions(_DecodedClip(shape, _moving_patch_clip(shape, 7)), zeros, zeros, 0.5, shape.latent_hw, k,
                         gens, edge_map="unit", edge_detector="opencv", frames=shape.frames, region_mode=mode)
    layout = TokenLayout(shape.coarse_hw, sel)
    g = torch.Generator().manual_seed(11)
    x1 = torch.randn(b, m, c, generator=g).to(shape.dtype)
    pos1 = grid_positions(*shape.coarse_hw).expand(b, -1, -1).contiguous()
    t12, t23 = layout.transition_12(), layout.transition_23()
    bd12, bd23 = sched.boundary(0), sched.boundary(1)
    seeds12, seeds23 = draw_seeds(gens, "cpu"), draw_seeds(gens, "cpu")
    x2, pos2 = apply_transition(x1, pos1, t12, bd12, seeds12, noise="reference", impl="torch")
    x3, pos3 = apply_transition(x2, pos2, t23, bd23, seeds23, noise="reference", impl="torch")
    return dict(shape=shape, sched=sched, k=k, sel=sel, layout=layout, x1=x1, pos1=pos1, t12=t12, t23=t23,
                bd12=bd12, bd23=bd23, seeds12=seeds12, seeds23=seeds23, x2=x2, pos2=pos2, x3=x3, pos3=pos3)


def _count_triton_launches(monkeypatch) -> list:
    """Record every Triton kernel launch (``fn[grid](...)``) in this process: ``[(kernel name, grid), ...]``."""
    cls = type(T._stage_transition_kernel)  # InterpretedFunction under TRITON_INTERPRET=1, else JITFunction
    run = cls.run
    launches = []

    def counting_run(self, *args, grid, warmup=False, **kw):
        if not warmup:
            fn = getattr(self, "fn", None)
            launches.append((getattr(fn, "__name__", repr(self)), grid))
        return run(self, *args, grid=grid, warmup=warmup, **kw)

    monkeypatch.setattr(cls, "run", counting_run)
    return launches


# ------------------------------------------------------------------------------------------------ Triton = torch
@needs_interpreter
@pytest.mark.parametrize("shape, mode, preset", [pytest.param(*c, marks=pytest.mark.slow) if i else c  # full size
                                                  for i, c in enumerate(TRITON_CASES)], ids=CASE_IDS[:len(TRITON_CASES)])
def test_triton_equals_reference_with_one_launch_per_transition(shape, mode, preset, monkeypatch):
    case = _case(shape, mode, preset)
    launches = _count_triton_launches(monkeypatch)
    x2, pos2 = apply_transition(case["x1"], case["pos1"], case["t12"], case["bd12"], case["seeds12"],
                                noise="reference", impl="triton")
    assert [name for name, _ in launches] == ["_stage_transition_kernel"], launches
    assert launches[0][1][1] == shape.batch  # one launch for the whole batch
    assert torch.equal(pos2, case["pos2"])
    assert x2.dtype == shape.dtype
    assert_kernel_matches_reference(x2, case["x2"])
    launches.clear()
    x3, pos3 = apply_transition(case["x2"], case["pos2"], case["t23"], case["bd23"], case["seeds23"],
                                noise="reference", impl="triton")
    assert [name for name, _ in launches] == ["_stage_transition_kernel"], launches
    assert launches[0][1][1] == shape.batch
    assert torch.equal(pos3, case["pos3"])
    assert_kernel_matches_reference(x3, case["x3"])


# ------------------------------------------------------------------------------------------------ video invariants
@pytest.mark.parametrize("shape, mode, preset", CASES, ids=CASE_IDS)
def test_stage2_children_stay_in_their_parents_frame(shape, mode, preset):
    case = _case(shape, mode, preset)
    r, wc = shape.frame_coarse_hw
    lay, pos2 = case["layout"], case["pos2"]
    parent = lay.stage2_parent()                                   # (B, L2) coarse raster index
    parent_frame = (parent // wc) // r
    fine = lay.stage2_fine_mask()
    rows, cols = pos2[..., 0], pos2[..., 1]
    frame = torch.div(rows, r, rounding_mode="floor").long()     # TokenGrid's row -> frame map
    assert torch.equal(frame, parent_frame)
    assert bool((rows >= parent_frame * r).all()) and bool((rows < (parent_frame + 1) * r).all())
    assert bool((rows[fine] <= (parent_frame[fine] + 1) * r - 0.5).all())  # the last half row of the frame at most
    assert bool((cols >= 0).all()) and bool((cols <= wc - 0.5).all())
    # children at parent + {0, 0.5}^2 (half-integer rows), copied tokens at integer positions
    assert torch.equal(rows, (parent // wc).float() + 0.5 * (case["t12"].child.long().clamp_min(0) // 2) * fine)
    assert bool((rows[~fine] == rows[~fine].round()).all()) and bool((rows[fine] * 2 == (rows[fine] * 2).round()).all())
    # regions per frame: clip mode upsamples the same spatial blocks in every frame, frame mode lets them move
    sel = case["sel"]
    per_frame = [[set((sel[b][(sel[b] // wc) // r == f] - f * r * wc).tolist()) for f in range(shape.frames)]
                 for b in range(shape.batch)]
    for b in range(shape.batch):
        sizes = [len(s) for s in per_frame[b]]
        assert sum(sizes) == case["k"]
        if mode == "clip":
            assert sizes == [case["k"] // shape.frames] * shape.frames
            assert all(s == per_frame[b][0] for s in per_frame[b])
        else:
            assert per_frame[b][0] != per_frame[b][-1]  # the textured patch moved: so did the regions


@pytest.mark.parametrize("shape, mode, preset", CASES, ids=CASE_IDS)
def test_stage3_is_the_tall_grid_in_raster_order_and_each_frames_own_upsampling(shape, mode, preset):
    case = _case(shape, mode, preset)
    b, f, c = shape.batch, shape.frames, shape.channels
    r, wc = shape.frame_coarse_hw
    fine = grid_positions(*shape.fine_hw)
    for i in range(b):
        assert torch.equal(case["pos3"][i], fine)
    assert case["x3"].shape == (b, 4 * shape.m, c)
    # without noise (a = 1, b = 0) the two transitions compose to the nearest 2x upsampling of every frame (one
    # float32 channel holding each coarse token's id, exact: the maps depend on neither the channels nor the dtype)
    x1 = torch.arange(b * shape.m, dtype=torch.float32).view(b, shape.m, 1)
    kw = dict(a=1.0, b=0.0, c=case["sched"].c, impl="torch")
    t12, t23 = case["t12"], case["t23"]
    x2, pos2 = T.stage_transition(x1, case["pos1"], t12.src_index, t12.group, t12.child, case["seeds12"],
                                  pos_scale=t12.pos_scale, **kw)
    x3, _ = T.stage_transition(x2, pos2, t23.src_index, t23.group, t23.child, case["seeds23"],
                               pos_scale=t23.pos_scale, **kw)
    frames = x1.view(b, f, r, wc)
    expected = frames.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (B, F, 2R, 2Wc)
    assert torch.equal(x3.view(b, f, 2 * r, 2 * wc), expected)


def _pure_noise_23(case: dict, layout: TokenLayout, seeds: torch.Tensor) -> torch.Tensor:
    """The 2->3 noise alone (a = 0, b = 1) in fine raster order, float32 ``(B, 4M, C)``."""
    shape = case["shape"]
    t23 = layout.transition_23()
    x2 = torch.zeros(shape.batch, layout.stage_lengths[1], shape.channels)
    pos2 = torch.zeros(shape.batch, layout.stage_lengths[1], 2)
    out, _ = T.stage_transition(x2, pos2, t23.src_index, t23.group, t23.child, seeds, a=0.0, b=1.0,
                                c=case["sched"].c, pos_scale=2.0, impl="torch")
    return out


def test_noise_is_deterministic_per_seed_sample_and_frame():
    case = _case(HUNYUAN, "frame", "4x")
    shape, t12, bd = HUNYUAN, case["t12"], case["bd12"]
    run = lambda seeds: apply_transition(case["x1"], case["pos1"], t12, bd, seeds, noise="reference",  # noqa: E731
                                         impl="torch")
    x2, pos2 = run(case["seeds12"].clone())
    assert torch.equal(x2, case["x2"]) and torch.equal(pos2, case["pos2"])  # same seeds: same bits
    seeds = case["seeds12"].clone()
    seeds[1] += 1
    y2, ypos2 = run(seeds)
    assert torch.equal(y2[0], x2[0]) and torch.equal(ypos2, pos2)  # sample 0 keeps its noise
    assert (y2[1] != x2[1]).float().mean() > 0.9                     # sample 1 gets new noise everywhere

    # a frame's noise depends on its own regions only: move one region of frame 0, the other frames keep their bits
    r, wc = shape.frame_coarse_hw
    sel = case["sel"].clone()
    frame0 = set(sel[0][sel[0] < r * wc].tolist())
    assert frame0, "frame 0 has no region to move"
    free = next(j for j in range(r * wc) if j not in frame0)
    sel[0, int((sel[0] < r * wc).nonzero()[0])] = free
    moved = TokenLayout(shape.coarse_hw, sel)
    n_old = _pure_noise_23(case, case["layout"], case["seeds23"])
    n_new = _pure_noise_23(case, moved, case["seeds23"])
    per_frame = 4 * r * wc
    assert not torch.equal(n_new[0, :per_frame], n_old[0, :per_frame])
    assert torch.equal(n_new[0, per_frame:], n_old[0, per_frame:]) and torch.equal(n_new[1], n_old[1])

    # frames get independent noise: correlation of the same fine position in consecutive frames ~ 0
    z = n_old.double().view(shape.batch, shape.frames, per_frame * shape.channels)
    a_, b_ = z[:, :-1].flatten(), z[:, 1:].flatten()
    corr = float((a_ * b_).mean() / (a_.std() * b_.std()))
    assert abs(corr) < 5 / math.sqrt(a_.numel()), corr


# ------------------------------------------------------------------------------------------------ varlen attention
def test_varlen_attention_at_video_lengths():
    """A Wan 480p stage-3 request (32 760 tokens) and a stage-2 one at 4x (8 190 + 3 * 2 457 = 15 561) packed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sched = get_preset("wan", "4x", WAN.base_shift)
    lens = (4 * WAN.m, WAN.m + 3 * WAN.k(sched.ratio, "frame"))
    assert lens == (32760, 15561)
    heads, dim = 1, 16
    g = torch.Generator().manual_seed(5)
    total = sum(lens)
    q, k, v = (torch.randn(total, heads, dim, generator=g) for _ in range(3))
    cu = cu_seqlens_from_lens(lens)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the tiled kernel only: no (L, L) score matrix anywhere
        out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), backend="sdpa")
        assert out.shape == q.shape and out.dtype == torch.float32
        start = 0
        for n in lens:
            sl = slice(start, start + n)
            ref = F.scaled_dot_product_attention(*(t[sl].transpose(0, 1).contiguous()[None] for t in (q, k, v)))
            torch.testing.assert_close(out[sl], ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
            start += n
    # exact float64 softmax attention on sampled query rows (sequence boundaries included), independent of SDPA
    start = 0
    for n in lens:
        rows = torch.cat((torch.tensor([0, n - 1]), torch.randint(1, n - 1, (30,), generator=g))) + start
        ks, vs = k[start:start + n].double(), v[start:start + n].double()
        s = torch.einsum("qhd,khd->hqk", q[rows].double(), ks) / math.sqrt(dim)
        exact = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vs)
        torch.testing.assert_close(out[rows].double(), exact, atol=2e-5, rtol=1e-4)
        start += n
