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
    # another ratio is another schedule: reports (CLI, server responses) must not call it the preset
    assert (s.name, s2.name, s2.with_ratio(0.3).name, s.with_ratio(0.1).name) == (
        "flux/7x", "flux/7x (r=0.5)", "flux/7x (r=0.3)", "flux/7x")
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
    assert {"flux", "sd3", "flux-schnell"} <= set(PRESETS) and "7x" in PRESETS["flux"]


# ---- presets solved for the model's own timestep shift (FLUX.2, Qwen-Image, Z-Image, Chroma)
MODEL_SHIFT_FAMILIES = ("flux2", "flux2-klein", "qwen-image", "z-image", "chroma")


@pytest.mark.parametrize("family", MODEL_SHIFT_FAMILIES)
def test_model_shift_presets_need_the_models_shift(family):
    from ralu_runtime.schedule import PRESET_SPECS, preset_base_shift

    for name in PRESET_SPECS[family]:
        assert preset_base_shift(family, name) is None
        with pytest.raises(ValueError, match="model's own timestep shift"):
            get_preset(family, name)


@pytest.mark.parametrize("base", [2.3, 3.0, 7.56, 9.89])
def test_model_shift_presets_are_solved_for_that_shift(base):
    """The same spec solved for another h_ori: the target changes, so the solved shifts do; the match stays good
    and the solution is interior (Z below its bound of 100 where the reference FLUX.1 4x is interior too)."""
    sched = get_preset("flux2", "4x", base)
    assert sched.base_shift == pytest.approx(base, abs=1e-4)
    assert sched.steps == PRESETS["flux"]["4x"].steps and sched.ends == PRESETS["flux"]["4x"].ends
    assert sched.jsd < 0.03 and 2.0 < sched.z < 100.0
    assert sched.jsd == pytest.approx(sched.timestep_density_jsd(), abs=1e-12)
    if base == 3.0:  # at FLUX.1's h_ori the spec reproduces FLUX.1's preset
        ref = PRESETS["flux"]["4x"]
        assert sched.shifts == pytest.approx(ref.shifts) and sched.z == pytest.approx(ref.z)


def test_model_shift_is_rounded_for_the_cache_and_validated():
    a, b = get_preset("qwen-image", "7x", 2.30321), get_preset("qwen-image", "7x", 2.30324)
    assert a is b  # rounded to 4 decimals: one solve
    with pytest.raises(ValueError, match="base_shift"):
        get_preset("qwen-image", "7x", float("nan"))
    with pytest.raises(ValueError, match="base_shift"):
        get_preset("qwen-image", "7x", 0.0)
    # typed presets ignore a given shift (FLUX.1 and SD3 keep the reference's h_ori = 3)
    assert get_preset("flux", "7x", 9.0) is get_preset("flux", "7x")


def test_shift_bounds_scale_above_flux1():
    from ralu_runtime.schedule import shift_bounds

    assert shift_bounds(1.0) == shift_bounds(3.0) == (0.5, 10.0)
    assert shift_bounds(7.5) == (0.5, 25.0)
    sched = get_preset("flux2", "7x", 7.5636)  # FLUX.2-dev at 1024^2, 50 steps
    assert max(sched.shifts) < 25.0  # interior, not on the bound the reference's [0.5, 10] would impose


def test_scheduler_base_shift_matches_diffusers_sigmas():
    """h from a scheduler config reproduces the scheduler's own shifted sigmas: sigma' = h s / (1 + (h-1) s)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ralu_runtime.adapters import scheduler_base_shift

    s = np.linspace(1.0, 1 / 20, 20)
    for kw, seq, mu in [(dict(shift=3.0), 4096, None),
                        (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, max_image_seq_len=8192), 6889,
                         None),
                        (dict(use_dynamic_shifting=True), 4096, 2.02),
                        (dict(use_dynamic_shifting=True, time_shift_type="linear"), 1000, None)]:
        sched = FlowMatchEulerDiscreteScheduler(**kw)
        h = scheduler_base_shift(sched.config, seq, mu=mu)
        if sched.config.use_dynamic_shifting:
            if mu is None:
                c = sched.config
                mu = c.base_shift + (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len) * (
                    seq - c.base_image_seq_len)
            sched.set_timesteps(sigmas=s, mu=mu)
        else:
            sched.set_timesteps(sigmas=s)
        ours = h * s / (1 + (h - 1) * s)
        np.testing.assert_allclose(sched.sigmas[:-1].numpy(), ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value", [
    ("ends", ("a", 0.45, 1.0)), ("ends", (0.3, None, 1.0)), ("shifts", "abc"), ("shifts", (5.0, "2.5", 2.2)),
    ("z", None), ("z", "6.3"), ("ratio", True), ("ratio", "0.3"), ("base_shift", None), ("base_shift", "3"),
])
def test_non_numbers_are_refused_naming_the_field(field, value):
    """Strings, bools and None in the float fields: a ValueError naming the field, not float()'s own error and not
    a silent conversion ("6.3" -> 6.3, True -> 1.0)."""
    base = dict(steps=(5, 6, 7), ends=(0.3, 0.45, 1.0), shifts=(5.0, 2.5, 2.2), z=6.3, ratio=0.3)
    with pytest.raises(ValueError, match=f"^{field}="):
        RaluSchedule(**{**base, field: value})
    with pytest.raises(ValueError, match="^base_shift="):
        get_preset("qwen-image", "7x", "2.3")
    ok = RaluSchedule(**{**base, "ends": np.array([0.3, 0.45, 1.0]), "z": np.float32(6.0), "ratio": 1})
    assert ok.ends == (0.3, 0.45, 1.0) and ok.z == 6.0 and ok.ratio == 1.0
