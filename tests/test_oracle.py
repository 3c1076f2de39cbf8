"""The Gaussian oracle: exact velocity for any token set, metrics, closed form vs sampler, and what it measures.

Comparisons of samplers use the closed-form moments of the linear samplers (fixed region choice): exact,
deterministic and fast. A small 8x8-token oracle keeps every test at a fraction of a second.
"""
import dataclasses

import pytest
import torch

import ralu_runtime.sampler as sampler_mod
from ralu_runtime import generate, get_preset
from ralu_runtime import oracle_metrics as om
from ralu_runtime.adapters.base import TokenGrid
from ralu_runtime.adapters.oracle import GaussianOracle
from ralu_runtime.layout import TokenLayout, grid_positions


@pytest.fixture(scope="module")
def oracle():
    return GaussianOracle(size=8, channels=16, variant="nonstationary", mean_amplitude=0.5)


@pytest.fixture(scope="module")
def stationary():
    return GaussianOracle(size=8, channels=16)


def _stage2_grid(layout: TokenLayout) -> TokenGrid:
    parent = layout.stage2_parent()
    pos = grid_positions(*layout.coarse_hw)[parent]
    q = layout.transition_12().child.long()
    off = torch.stack([q // 2, q % 2], -1).float() * 0.5 * (q[..., None] >= 0)
    return TokenGrid(pos + off, layout.coarse_hw, layout.stage2_fine_mask())


def _fixed_sel(m, k, seed=0):
    return torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:k]


# ---------------------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("sigma", [1.0, 0.83, 0.4, 0.06])
def test_velocity_matches_dense_formula_for_fine_coarse_and_mixed_tokens(oracle, sigma):
    sel = torch.stack([_fixed_sel(16, 5, 1), _fixed_sel(16, 5, 2)])
    layout = TokenLayout(oracle.coarse_hw, sel)
    grids = {
        "coarse": (TokenGrid(grid_positions(4, 4).expand(2, -1, -1), (4, 4), None, raster=True), 0),
        "mixed": (_stage2_grid(layout), 1),
        "fine": (TokenGrid(grid_positions(8, 8).expand(2, -1, -1), (8, 8), None, raster=True), 2),
    }
    for name, (grid, stage) in grids.items():
        x = torch.randn(2, grid.positions.shape[1], 16, dtype=torch.float64)
        v = oracle.velocity(x.to(torch.float32), grid, torch.tensor(1000.0 * sigma), None).double()
        for b in range(2):
            one = TokenLayout(oracle.coarse_hw, sel[b:b + 1])
            a = om.stage_measurements(oracle, one)[stage]
            g_mat, g_vec = om.velocity_affine(a, oracle.mean, oracle.cov, sigma)
            ref = g_mat @ x[b].float().double() + g_vec[:, None]
            torch.testing.assert_close(v[b], ref, atol=2e-4, rtol=2e-4, msg=name)


def test_velocity_is_the_regression_of_noise_minus_data():
    """Monte Carlo: the least-squares fit of (eps - y1) on y_sigma equals the oracle's affine velocity."""
    o = GaussianOracle(size=4, channels=1, variant="nonstationary", mean_amplitude=0.5)
    layout = TokenLayout(o.coarse_hw, torch.tensor([[1, 2]]))
    a = om.stage_measurements(o, layout)[1]                                 # 8 fine + 2 coarse tokens
    sigma, n = 0.55, 200_000
    g = torch.Generator().manual_seed(0)
    x1 = o.sample_data(n, g).view(n, -1)
    y1 = x1 @ a.T
    eps = torch.randn(y1.shape, generator=g, dtype=torch.float64)
    y = (1 - sigma) * y1 + sigma * eps
    design = torch.cat([y, torch.ones(n, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, eps - y1).solution                    # (L + 1, L)
    grid = _stage2_grid(layout)
    v0 = o.velocity(torch.zeros(1, a.shape[0], 1, dtype=torch.float64), grid, torch.tensor(1000 * sigma))
    basis = torch.eye(a.shape[0], dtype=torch.float64)[:, :, None]
    g_mat = (o.velocity(basis, TokenGrid(grid.positions.expand(a.shape[0], -1, -1), grid.grid_hw,
                                         grid.fine_mask.expand(a.shape[0], -1)), torch.tensor(1000 * sigma))
             - v0)[..., 0].T
    torch.testing.assert_close(coef[:-1].T, g_mat, atol=0.02, rtol=0)
    torch.testing.assert_close(coef[-1], v0[0, :, 0], atol=0.02, rtol=0)


def test_token_level_inference_rejects_bad_grids(oracle):
    with pytest.raises(ValueError, match="neither"):
        oracle.velocity(torch.zeros(1, 4, 16), TokenGrid(grid_positions(2, 2)[None], (2, 2)), torch.tensor(500.0))
    bad = grid_positions(4, 4)[None] + 0.25
    with pytest.raises(ValueError):
        oracle.velocity(torch.zeros(1, 16, 16), TokenGrid(bad, (4, 4), torch.ones(1, 16, dtype=torch.bool)),
                        torch.tensor(500.0))
    with pytest.raises(ValueError, match="pixels"):
        generate(oracle, "", height=128, width=128, speedup=None, seed=0, progress=False)


def test_data_and_metrics(oracle):
    assert oracle.cov.shape == (64, 64) and torch.allclose(oracle.cov, oracle.cov.T)
    assert float(torch.linalg.eigvalsh(oracle.cov).min()) > 0
    q_mean, q_det = om.subspace_bases(oracle)
    assert q_mean.shape == (16, 64) and q_det.shape == (48, 64)
    torch.testing.assert_close(torch.cat([q_mean, q_det]) @ torch.cat([q_mean, q_det]).T,
                               torch.eye(64, dtype=torch.float64))
    ev = om.evaluate_moments(oracle, oracle.mean, oracle.cov)
    assert ev["fd"] < 1e-8 and ev["var_ratio_mean"] == pytest.approx(1) and ev["var_ratio_detail"] == pytest.approx(1)
    # FD of two diagonal Gaussians: |dm|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = torch.tensor([1.0, 4.0], dtype=torch.float64), torch.tensor([9.0, 1.0], dtype=torch.float64)
    fd = om.frechet_distance(torch.ones(2), torch.diag(a), torch.zeros(2), torch.diag(b))
    assert fd == pytest.approx(2 + (1 - 3) ** 2 + (2 - 1) ** 2)
    for gamma in (-1 / 36, 0.0, 0.1):
        f = torch.eye(4) + om.noise_factor_beta(gamma) * torch.ones(4, 4)
        torch.testing.assert_close(f @ f.T, torch.eye(4) + gamma * torch.ones(4, 4))
    # the envelope puts most detail variance where it is large
    env_blocks = torch.tensor(oracle.envelope).view(4, 2, 4, 2).pow(2).mean((1, 3)).flatten()
    assert env_blocks.max() / env_blocks.min() > 10


# ---------------------------------------------------------------------------- sampler vs closed form
def test_deterministic_per_seed(stationary):
    kw = dict(height=64, width=64, speedup="7x", output_type="latent", progress=False)
    a = generate(stationary, [""] * 4, seed=5, **kw).images
    b = generate(stationary, [""] * 4, seed=5, **kw).images
    c = generate(stationary, [""] * 4, seed=6, **kw).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = generate(stationary, [""] * 4, seed=5, solver="ab2", **kw).images
    assert torch.equal(d, generate(stationary, [""] * 4, seed=5, solver="ab2", **kw).images)


@pytest.mark.parametrize("noise", ["reference", "exact"])
def test_sampler_agrees_with_closed_form_when_linear(oracle, monkeypatch, noise):
    """Fixed region choice: the sampler is linear, its sample moments must match the propagated covariance."""
    sch = get_preset("flux", "7x").with_ratio(0.3)
    sel = _fixed_sel(16, int(16 * 0.3), 3)
    monkeypatch.setattr(sampler_mod, "select_regions",
                        lambda adapter, x, *a, **k: sel.view(1, -1).expand(x.shape[0], -1).clone())
    n = 400
    out = generate(oracle, [""] * n, height=64, width=64, speedup=sch, seed=0, noise=noise, output_type="latent",
                   progress=False).images
    mu_s, cov_s, _ = om.gaussian_fit(out)
    mu_c, cov_c = om.ralu_moments(oracle, sch, sel, kept_noise=noise)
    # sampling floor: FD between the closed-form law and the fit of as many samples drawn from it
    g = torch.Generator().manual_seed(1)
    draws = mu_c + torch.randn(n * 16, 64, generator=g, dtype=torch.float64) @ om._sqrtm_psd(cov_c)
    floor = om.frechet_distance(draws.mean(0), torch.cov(draws.T), mu_c, cov_c)
    assert om.frechet_distance(mu_s, cov_s, mu_c, cov_c) < 2.0 * floor
    fd_s = om.evaluate_moments(oracle, mu_s, cov_s)
    fd_c = om.evaluate_moments(oracle, mu_c, cov_c)
    assert abs(fd_s["fd"] - fd_c["fd"]) < 2.0 * floor + 0.05 * fd_c["fd"]
    for key in ("var_ratio_mean", "var_ratio_detail"):
        assert fd_s[key] == pytest.approx(fd_c[key], rel=0.03)


def test_baseline_agrees_with_closed_form(oracle):
    n, steps = 400, 6
    out = generate(oracle, [""] * n, height=64, width=64, speedup=None, num_inference_steps=steps, seed=0,
                   solver="ab2", output_type="latent", progress=False).images
    _, sig = oracle.baseline_schedule(steps)
    mu_c, cov_c = om.baseline_moments(oracle, sig.double().numpy(), "ab2")
    mu_s, cov_s, _ = om.gaussian_fit(out)
    for key in ("var_ratio_mean", "var_ratio_detail"):
        assert om.evaluate_moments(oracle, mu_s, cov_s)[key] == pytest.approx(
            om.evaluate_moments(oracle, mu_c, cov_c)[key], rel=0.03)


# ---------------------------------------------------------------------------- what the oracle measures
def _fd(o, mu_cov):
    return om.evaluate_moments(o, *mu_cov)["fd"]


@pytest.mark.parametrize("preset", ["4x", "7x"])
def test_ralu_far_closer_than_naive_late_upsampling(oracle, preset):
    sch = get_preset("flux", preset)
    sel = _fixed_sel(16, int(16 * sch.ratio))
    for solver in ("euler", "ab2"):
        ralu = _fd(oracle, om.ralu_moments(oracle, sch, sel, solver=solver))
        naive = _fd(oracle, om.ralu_moments(oracle, sch, sel, naive=True, solver=solver))
        assert naive > 5 * ralu, (solver, ralu, naive)


def test_ralu_far_closer_than_naive_sampled_with_edge_selection(stationary):
    from benchmarks.quality_oracle import sample_variant

    sch = get_preset("flux", "7x")
    ralu = generate(stationary, [""] * 150, height=64, width=64, speedup=sch, seed=0, output_type="latent",
                    progress=False).images
    naive = sample_variant(stationary, sch, 150, 0, naive=True)
    assert om.evaluate_samples(stationary, naive)["fd"] > 4 * om.evaluate_samples(stationary, ralu)["fd"]


@pytest.mark.parametrize("preset", ["4x", "7x"])
@pytest.mark.parametrize("solver", ["euler", "ab2"])
def test_timestep_matching_helps(oracle, stationary, preset, solver):
    sch = get_preset("flux", preset)
    no_nt = dataclasses.replace(sch, shifts=(sch.base_shift,) * 3, jsd=None)
    sel = _fixed_sel(16, int(16 * sch.ratio))
    for o in (oracle, stationary):
        assert _fd(o, om.ralu_moments(o, sch, sel, solver=solver)) < \
            0.95 * _fd(o, om.ralu_moments(o, no_nt, sel, solver=solver))


@pytest.mark.parametrize("name", ["ab2", "dpmpp2m"])
def test_multistep_beats_euler_at_equal_calls(oracle, name):
    for steps in (7, 10, 18):
        _, sig = oracle.baseline_schedule(steps)
        sig = sig.double().numpy()
        assert _fd(oracle, om.baseline_moments(oracle, sig, name)) < 0.5 * _fd(oracle, om.baseline_moments(oracle, sig))
    for preset in ("4x", "7x"):
        sch = get_preset("flux", preset)
        sel = _fixed_sel(16, int(16 * sch.ratio))
        assert _fd(oracle, om.ralu_moments(oracle, sch, sel, solver=name)) < \
            0.5 * _fd(oracle, om.ralu_moments(oracle, sch, sel))
