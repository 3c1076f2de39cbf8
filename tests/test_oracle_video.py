"""The Gaussian video oracle: its law, its exact velocity on tall token grids, RALU on it through ``generate``
(both region modes), and the video quality benchmark's quick mode. Tiny sizes: the whole file runs in seconds."""
import math

import pytest
import torch

from ralu_runtime import generate, get_preset
from ralu_runtime import oracle_metrics as om
from ralu_runtime.adapters.base import TokenGrid
from ralu_runtime.adapters.oracle import GaussianOracle
from ralu_runtime.adapters.oracle_video import GaussianVideoOracle
from ralu_runtime.layout import TokenLayout, grid_positions


@pytest.fixture(scope="module")
def tiny():
    # 2 frames of 4x4, moving texture, non-zero mean: every term of the law is exercised
    return GaussianVideoOracle(size=4, frames=2, channels=3, variant="nonstationary", rho=0.7, motion=(1.0, -1.0),
                               mean_amplitude=0.5)


@pytest.fixture(scope="module")
def video():
    return GaussianVideoOracle(size=8, frames=4, channels=4, variant="nonstationary", motion=(0.5, -1.0))


def _brute_rows(o: GaussianVideoOracle, pos: torch.Tensor, level: str, fine_mask=None) -> torch.Tensor:
    """Dense measurement rows built pixel by pixel from (frame, row, col) of each token."""
    a = torch.zeros(pos.shape[0], o.d, dtype=torch.float64)

    def pix(t, i, j):
        return (t * o.h + i) * o.w + j

    for n, (r, c) in enumerate(pos.tolist()):
        if level == "fine":
            a[n, pix(int(r) // o.h, int(r) % o.h, int(c))] = 1.0
        elif level == "coarse" and fine_mask is not None and bool(fine_mask[n]):
            t = int(r) // (o.h // 2)
            a[n, pix(t, int(round(2 * (r - t * o.h // 2))), int(round(2 * c)))] = 1.0
        elif level == "coarse":
            t, i = int(r) // (o.h // 2), int(r) % (o.h // 2)
            for di in (0, 1):
                for dj in (0, 1):
                    a[n, pix(t, 2 * i + di, 2 * int(c) + dj)] = 0.25
        else:  # space-time coarse: frames 2 tau, 2 tau + 1
            tau, i = int(r) // (o.h // 2), int(r) % (o.h // 2)
            for t in (2 * tau, 2 * tau + 1):
                for di in (0, 1):
                    for dj in (0, 1):
                        a[n, pix(t, 2 * i + di, 2 * int(c) + dj)] = 0.125
    return a


def _brute_velocity(o, a: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[eps - y1 | y] for y = (1 - sigma) y1 + sigma eps, by conditioning the joint Gaussian of (eps - y1, y)."""
    s1, eye = 1.0 - sigma, torch.eye(a.shape[0], dtype=torch.float64)
    sa, mu = a @ o.cov @ a.T, a @ o.mean
    cov_y = s1 * s1 * sa + sigma * sigma * eye
    cov_ty = sigma * eye - s1 * sa                                       # Cov(eps - y1, y)
    return -mu[:, None] + cov_ty @ torch.linalg.solve(cov_y, y - s1 * mu[:, None])


@pytest.mark.parametrize("sigma", [1.0, 0.7, 0.2, 0.03])
def test_velocity_matches_brute_force_for_every_token_level(tiny, sigma):
    o = tiny
    hc, wc = o.h // 2, o.w // 2
    sel = torch.tensor([[1, 6], [0, 7]])                                 # per clip: a block in each frame
    layout = TokenLayout(o.coarse_hw, sel)
    parent = layout.stage2_parent()
    q = layout.transition_12().child.long()
    pos2 = grid_positions(*o.coarse_hw)[parent] + torch.stack([q // 2, q % 2], -1).float() * 0.5 * (q[..., None] >= 0)
    grids = {
        "fine": TokenGrid(grid_positions(*o.fine_hw).expand(2, -1, -1), o.fine_hw, None, raster=True, frames=2),
        "coarse": TokenGrid(grid_positions(*o.coarse_hw).expand(2, -1, -1), o.coarse_hw, None, raster=True, frames=2),
        "mixed": TokenGrid(pos2, o.coarse_hw, layout.stage2_fine_mask(), frames=2),
        "time": TokenGrid(grid_positions(hc, wc).expand(2, -1, -1), (hc, wc), None, raster=True, frames=1),
    }
    g = torch.Generator().manual_seed(0)
    for name, grid in grids.items():
        x = torch.randn(2, grid.positions.shape[1], o.C, generator=g, dtype=torch.float64)
        v = o.velocity(x, grid, torch.tensor(1000.0 * sigma), None)
        for b in range(2):
            level = "coarse" if name == "mixed" else name
            fm = None if grid.fine_mask is None else grid.fine_mask[b]
            a = _brute_rows(o, grid.positions[b], level, fm)
            torch.testing.assert_close(o.measurement_matrix(grid.positions[b], grid.grid_hw, fm, grid.frames), a)
            torch.testing.assert_close(v[b], _brute_velocity(o, a, x[b], sigma), atol=1e-9, rtol=1e-9, msg=name)


def test_bad_grids_are_refused(tiny):
    o = tiny
    with pytest.raises(ValueError, match="none of the oracle's"):
        o.velocity(torch.zeros(1, 8, 3), TokenGrid(grid_positions(4, 2)[None], (4, 2), None, raster=True, frames=1),
                   torch.tensor(500.0))
    with pytest.raises(ValueError, match="outside"):
        o.velocity(torch.zeros(1, 1, 3), TokenGrid(torch.tensor([[[4.0, 0.0]]]), o.coarse_hw, frames=2),
                   torch.tensor(500.0))
    with pytest.raises(ValueError, match="pixels"):
        generate(o, "", num_frames=3, speedup=None, num_inference_steps=2, seed=0, progress=False)


def test_law_space_time_structure():
    """Static stationary: S = T kron S_image. Moving: blocks are the image covariance at the moved offsets."""
    img = GaussianOracle(size=6)
    rho, f = 0.8, 3
    t_mat = torch.tensor([[rho ** abs(i - j) for j in range(f)] for i in range(f)], dtype=torch.float64)
    static = GaussianVideoOracle(size=6, frames=f, rho=rho)
    # both normalised to unit mean variance, and S_image's diagonal is the video's diagonal blocks
    torch.testing.assert_close(static.cov, torch.kron(t_mat, img.cov), atol=1e-12, rtol=0)
    moving = GaussianVideoOracle(size=6, frames=f, rho=rho, motion=(1.0, -2.0))
    n_checked = 0
    for t in range(f):
        for u in range(f):
            st, su = (t, -2 * t), (u, -2 * u)
            for p in range(36):
                for pp in range(36):
                    dy = (p // 6 - st[0]) - (pp // 6 - su[0])
                    dx = (p % 6 - st[1]) - (pp % 6 - su[1])
                    if abs(dy) >= 6 or abs(dx) >= 6:
                        continue
                    ref = img.cov[max(dy, 0) * 6 + max(dx, 0), max(-dy, 0) * 6 + max(-dx, 0)]
                    got = moving.cov[t * 36 + p, u * 36 + pp]
                    assert abs(float(got - rho ** abs(t - u) * ref)) < 1e-12
                    n_checked += 1
    assert n_checked > 5000
    # the busy region moves with the motion; the law is a valid covariance and the metrics see no distance to it
    o = GaussianVideoOracle(size=8, frames=4, variant="nonstationary", motion=(0.0, -1.0))
    peaks = [int(torch.tensor(o.envelopes[t]).argmax()) % 8 for t in range(4)]
    assert peaks[0] > peaks[-1] and peaks == sorted(peaks, reverse=True)
    assert float(torch.linalg.eigvalsh(o.cov).min()) > 0
    assert om.evaluate_moments(o, o.mean, o.cov)["fd"] < 1e-8


@pytest.mark.parametrize("variant", ["stationary", "nonstationary"])
def test_one_frame_is_the_image_oracle(variant):
    img = GaussianOracle(size=8, channels=4, variant=variant, mean_amplitude=0.3)
    vid = GaussianVideoOracle(size=8, frames=1, channels=4, variant=variant, mean_amplitude=0.3, rho=0.5,
                              motion=(2.0, 1.0))
    assert torch.equal(img.cov, vid.cov) and torch.equal(img.mean, vid.mean)
    sch = get_preset("flux", "7x").with_ratio(0.3)
    kw = dict(height=64, width=64, seed=3, output_type="latent", progress=False, return_masks=True)
    for speedup, extra in ((None, dict(num_inference_steps=4)), (sch, {})):
        a = generate(img, [""] * 3, speedup=speedup, **kw, **extra)
        regions = {} if speedup is None else dict(region_mode="frame")   # RALU runs only
        b = generate(vid, [""] * 3, speedup=speedup, num_frames=1, **regions, **kw, **extra)
        assert b.images.shape == (3, 4, 1, 8, 8)
        assert torch.equal(b.images[:, :, 0], a.images)
        if speedup is not None:
            assert torch.equal(b.masks[:, 0], a.masks)


def test_generate_both_region_modes(video):
    o = video
    per = (o.h // 2) * (o.w // 2)
    for preset in ("4x", "7x"):
        r = get_preset("flux", preset).ratio
        for mode in ("clip", "frame"):
            out = generate(o, [""] * 3, num_frames=o.F, speedup=preset, region_mode=mode, seed=1, output_type="latent",
                           progress=False, return_masks=True)
            assert out.images.shape == (3, o.C, o.F, o.h, o.w) and torch.isfinite(out.images).all()
            masks = out.masks
            assert masks.shape == (3, o.F, o.h // 2, o.w // 2)
            if mode == "clip":
                for f in range(1, o.F):
                    assert torch.equal(masks[:, f], masks[:, 0])
                assert (masks.sum(dim=(2, 3)) == int(per * r)).all()
            else:
                assert (masks.sum(dim=(1, 2, 3)) == int(o.F * per * r)).all()
    # default: the pipeline-style outputs of a video ("pt": (B, F, 3, H, W) in [0, 1])
    out = generate(o, "", speedup="7x", seed=0, output_type="pt", progress=False)
    assert out.images.shape == (1, o.F, 3, 64, 64) and 0 <= float(out.images.min()) <= float(out.images.max()) <= 1


def test_correlated_noise_of_copy_groups():
    """The benchmark's transition: copies of one token get noise b^2 (I - c J); lone tokens kept_var b^2."""
    from benchmarks.quality_oracle_video import renoise

    c, n = 0.1, 100_000
    group = torch.tensor([[0] * 8 + [1, 1] + [2]])
    x = torch.zeros(1, 3, n)
    out = renoise(x, torch.tensor([[0] * 8 + [1, 1] + [2]]), group, 0.5, 1.0, c, 1.0, torch.Generator().manual_seed(0))
    cov = torch.cov(out[0].double())
    ref = torch.block_diag(torch.eye(8) - c * torch.ones(8, 8), torch.eye(2) - c * torch.ones(2, 2),
                           torch.eye(1)).double()
    torch.testing.assert_close(cov, ref, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="too large"):
        renoise(x, torch.tensor([[0] * 8 + [1, 1] + [2]]), group, 0.5, 1.0, 0.2, 1.0, torch.Generator())


def test_benchmark_quick_mode_runs(tmp_path):
    from benchmarks.quality_oracle_video import main

    payload = main(["--quick", "--samples", "6", "--out", str(tmp_path)])
    assert (tmp_path / "quality_oracle_video_quick.json").exists()
    methods = {(r["method"], r["region"]) for r in payload["rows"]}
    for need in (("ralu", "clip"), ("ralu", "frame"), ("r=0 (=FLOPs)", "-"), ("r=1 (=FLOPs)", "-"),
                 ("time/2 (same steps)", "clip"), ("time/2 (2N1 =FLOPs)", "frame"),
                 ("time/2 (2N1 =FLOPs), oracle regions", "frame")):
        assert need in methods
    for r in payload["rows"]:
        assert math.isfinite(r["fd"])
        if "=FLOPs" in r["method"]:
            assert abs(r["cost"] - 6.475) < 0.5  # matched to the preset's cost


def test_time_halving_composition_agrees_with_its_closed_form(video, monkeypatch):
    """The benchmark's composed sampler: with time kept its closed form is RALU's (ralu_moments); with time halved
    in stage 1 (fixed regions) the samples match the propagated law."""
    import benchmarks.quality_oracle_video as q

    sch = get_preset("flux", "4x")
    sel = q.oracle_regions(video, sch.ratio, "frame")
    ref, got = om.ralu_moments(video, sch, sel), q.composed_moments(video, sch, sel, 1)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    sel1 = q.oracle_regions(video, sch.ratio, "frame", 2)
    assert sel1.numel() == q.region_k(video, sch.ratio, "frame", 2) and int(sel1.max()) < 2 * 16
    mu, cov = q.composed_moments(video, sch, sel1, 2)
    monkeypatch.setattr(q, "select_regions", lambda oracle, x, *a, **k: sel1.view(1, -1).expand(x.shape[0], -1))
    n = 300
    clips = q.sample_composed(video, sch, n, 0, time_factor=2)
    mu_s, cov_s, _ = om.gaussian_fit(video.tall(clips))
    g = torch.Generator().manual_seed(1)
    draws = mu + torch.randn(n * video.C, video.d, generator=g, dtype=torch.float64) @ om._sqrtm_psd(cov)
    floor = om.frechet_distance(draws.mean(0), torch.cov(draws.T), mu, cov)
    assert om.frechet_distance(mu_s, cov_s, mu, cov) < 1.5 * floor
