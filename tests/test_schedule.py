"""ralu_runtime.schedule: closed forms, re-noising identities, stage sigmas, NT-Matching solver, presets."""
import numpy as np
import pytest
from scipy.integrate import quad
from scipy.spatial.distance import jensenshannon

from ralu_runtime.schedule import (PRESETS, RaluSchedule, estimate_cost_ratio, get_preset, jensen_shannon_distance,
                                   sampler_density, shifted_cdf, shifted_pdf, solve_nt_matching, target_density,
                                   truncated_pdf)

# Reference implementation's FLUX.1-dev presets (RALU design note): expectations, not library values.
REFERENCE = {
    "4x": dict(shifts=(5.019, 2.589, 2.226), z=6.317),
    "7x": dict(shifts=(8.141, 2.856, 2.193), z=6.261),
}
REFERENCE_7X_JSD = 0.0266

SCHED = RaluSchedule(steps=(5, 6, 7), ends=(0.3, 0.45, 1.0), shifts=(5.0, 2.5, 2.2), z=6.3, ratio=0.3)


@pytest.mark.parametrize("h", [0.5, 1.0, 3.0, 8.0])
def test_pdf_cdf_closed_forms(h):
    total, _ = quad(lambda t: float(shifted_pdf(t, h)), 0.0, 1.0)
    assert total == pytest.approx(1.0, abs=1e-10)
    for t in (0.0, 0.1, 0.37, 0.9, 1.0):
        integral, _ = quad(lambda u: float(shifted_pdf(u, h)), 0.0, t)
        assert float(shifted_cdf(t, h)) == pytest.approx(integral, abs=1e-10)
    s, e = 0.2, 0.65
    inside, _ = quad(lambda t: float(truncated_pdf(t, h, s, e)), s, e)
    assert inside == pytest.approx(1.0, abs=1e-10)
    assert np.all(truncated_pdf(np.array([0.0, 0.19, 0.66, 1.0]), h, s, e) == 0.0)


def test_densities_are_normalised():
    starts = SCHED.starts
    assert target_density(np.linspace(0, 1, 5), SCHED.ends, starts, 3.0).shape == (5,)
    tot_t, _ = quad(lambda t: float(target_density(t, SCHED.ends, starts, 3.0)), 0, 1, points=starts[1:], limit=200)
    tot_s, _ = quad(lambda t: float(sampler_density(t, SCHED.steps, SCHED.ends, starts, SCHED.shifts)), 0, 1,
                    points=starts[1:] + SCHED.ends[:2], limit=200)
    assert tot_t == pytest.approx(1.0, abs=1e-8) and tot_s == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("k", [0, 1])
def test_boundary_identities(k):
    b = SCHED.boundary(k)
    e = SCHED.ends[k]
    assert b.s_next == SCHED.starts[k + 1] and 0 < b.s_next < e
    assert b.a * e == pytest.approx(b.s_next, rel=1e-14)           # signal coefficient at t = s_next
    assert b.b == pytest.approx(1.0 - b.s_next, rel=1e-14)
    assert b.a ** 2 * (1 - e) ** 2 == pytest.approx(b.c * b.b ** 2, rel=1e-12)  # noise-variance identity
    assert b.c == pytest.approx(1 / SCHED.z ** 2)
    with pytest.raises(ValueError, match="boundary k=2"):
        SCHED.boundary(2)


def test_starts():
    assert SCHED.starts[0] == 0.0
    z, e = SCHED.z, SCHED.ends
    assert SCHED.starts[1:] == pytest.approx([e[0] / (z * (1 - e[0]) + e[0]), e[1] / (z * (1 - e[1]) + e[1])])


@pytest.mark.parametrize("sched", [SCHED, RaluSchedule((1, 1, 2), (0.35, 0.55, 1.0), (1.0, 0.7, 1.0), 2.0, 0.1),
                                   RaluSchedule((2, 3, 5), (0.2, 0.3, 1.0), (8.1, 0.6, 1.0), 50.0, 0.0)])
def test_stage_sigmas(sched):
    for k in range(3):
        sig = sched.stage_sigmas(k)
        assert sig.dtype == np.float64 and sig.shape == (sched.steps[k] + 1,)
        assert sig[0] == 1.0 - sched.starts[k] and sig[-1] == 1.0 - sched.ends[k]
        assert np.all(np.diff(sig) < 0)
    for k in (0, 1):  # the next stage restarts at the sigma implied by s_{k+1}
        assert sched.stage_sigmas(k + 1)[0] == 1.0 - sched.boundary(k).s_next
    assert sched.stage_sigmas(0)[0] == 1.0 and sched.stage_sigmas(2)[-1] == 0.0


def test_stage_sigmas_follow_shift():
    sig = SCHED.stage_sigmas(2)
    h = SCHED.shifts[2]
    unshifted = sig / (h - (h - 1) * sig)  # inverse of the shift map: uniformly spaced
    assert np.allclose(np.diff(unshifted), np.diff(unshifted)[0])
    assert SCHED.total_steps == 18 and SCHED.c == pytest.approx(1 / 6.3 ** 2)


def test_jensen_shannon_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, q = rng.random(50), rng.random(50)
        p[rng.random(50) < 0.2] = 0.0
        assert jensen_shannon_distance(p, q) == pytest.approx(float(jensenshannon(p, q)), rel=1e-10, abs=1e-12)
    assert jensen_shannon_distance(p, p) == pytest.approx(0.0, abs=1e-7)
    assert jensen_shannon_distance([1, 0], [0, 1]) == pytest.approx(np.sqrt(np.log(2)))


@pytest.mark.parametrize("name", ["4x", "7x"])
def test_solver_reproduces_reference_flux_presets(name):
    ref = REFERENCE[name]
    spec = {"4x": ((5, 6, 7), (0.3, 0.45, 1.0)), "7x": ((2, 3, 5), (0.2, 0.3, 1.0))}[name]
    sched = solve_nt_matching(*spec, 3.0, ratio=0.3)
    for got, want in zip(sched.shifts + (sched.z,), ref["shifts"] + (ref["z"],)):
        assert got == pytest.approx(want, rel=5e-3)
    assert sched.jsd == pytest.approx(sched.timestep_density_jsd(), rel=1e-12)
    preset = get_preset("flux", name)
    assert preset.shifts == pytest.approx(sched.shifts) and preset.z == pytest.approx(sched.z)
    assert preset.steps == spec[0] and preset.ends == spec[1]
    if name == "7x":
        assert sched.jsd == pytest.approx(REFERENCE_7X_JSD, abs=5e-4)
        assert preset.ratio == 0.1


def test_solver_improves_on_start():
    start = RaluSchedule((2, 3, 5), (0.2, 0.3, 1.0), (3.0, 3.0, 3.0), 2.0, 0.1)
    assert get_preset("flux", "7x").jsd < start.timestep_density_jsd()


@pytest.mark.parametrize("kwargs, match", [
    (dict(ends=(0.45, 0.3, 1.0)), "strictly increasing"),
    (dict(ends=(0.0, 0.3, 1.0)), "strictly increasing"),
    (dict(ends=(0.3, 0.45, 0.9)), "must be exactly 1.0"),
    (dict(ratio=1.5), "ratio=1.5 .*\\[0, 1\\]"),
    (dict(ratio=-0.1), "ratio=-0.1"),
    (dict(steps=(5, 0, 7)), r"int in \[1, 1000\]"),
    (dict(steps=(5, 2.5, 7)), r"int in \[1, 1000\]"),
    (dict(steps=(5, 6)), "exactly 3 stages"),
    (dict(ends=(0.3, 0.4, 0.6, 1.0)), "exactly 3 stages"),
    (dict(z=1.5), "2 <= Z <= 10000"),
    (dict(shifts=(5.0, -1.0, 2.0)), "shifts"),
])
def test_bad_inputs(kwargs, match):
    base = dict(steps=(5, 6, 7), ends=(0.3, 0.45, 1.0), shifts=(5.0, 2.5, 2.2), z=6.3, ratio=0.3)
    with pytest.raises(ValueError, match=match):
        RaluSchedule(**{**base, **kwargs})


def test_solver_validates_and_with_ratio():
    with pytest.raises(ValueError, match="strictly increasing"):
        solve_nt_matching((2, 3, 5), (0.3, 0.2, 1.0))
    s = get_preset("flux", "7x")
    s2 = s.with_ratio(0.5)
    assert s2.ratio == 0.5 and s2.shifts == s.shifts and s.ratio == 0.1
    with pytest.raises(ValueError, match="ratio"):
        s.with_ratio(2.0)


def test_unknown_presets():
    with pytest.raises(ValueError, match="unknown preset '9x'.*4x, 5x, 7x"):
        get_preset("flux", "9x")
    with pytest.raises(ValueError, match="unknown model family 'sdxl'.*flux.*sd3"):
        get_preset("sdxl", "7x")


def test_flux_5x_cost_matches_paper_ratio():
    # Paper: 2991.0 / 540.5 = 5.53x. The linear model with text_tokens=225 reproduces 21.5 / 74.4 TFLOPs per step.
    ratio = estimate_cost_ratio(get_preset("flux", "5x"), 50, 4096, text_tokens=225)
    assert ratio == pytest.approx(2991.0 / 540.5, rel=0.03)
    assert estimate_cost_ratio(get_preset("flux", "7x"), 50, 4096, text_tokens=225) > 7.0


@pytest.mark.parametrize("name", ["2x", "3x"])
def test_sd3_presets(name):
    sched = PRESETS["sd3"][name]
    assert sched.base_shift == 3.0 and sched.jsd is not None and sched.jsd < 0.05
    ratio = estimate_cost_ratio(sched, 28, 4096, text_tokens=333)
    assert ratio == pytest.approx(float(name[:-1]), rel=0.10)


def test_schnell_preset():
    sched = get_preset("flux-schnell", "4step")
    assert sched.total_steps == 4 and sched.base_shift == 1.0
    assert 2.0 < sched.z < 100.0 and sched.jsd < 0.02  # interior optimum, good match
    assert set(PRESETS) == {"flux", "sd3", "flux-schnell"} and "7x" in PRESETS["flux"]
