"""Per-stage solvers: registry, exactness on straight flows, convergence order, and use in the sampler."""
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.solvers import SOLVERS, make_solver

MULTISTEP = ("ab2", "dpmpp2m")


def test_registry_and_errors():
    assert {"euler", "ab2", "dpmpp2m"} <= set(SOLVERS)
    with pytest.raises(ValueError, match="not supported"):
        make_solver("rk4", torch.linspace(1, 0, 5))
    s = make_solver("ab2", torch.linspace(1, 0, 5))
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="in order"):
        s.step(1, x, x)


@pytest.mark.parametrize("name", MULTISTEP)
def test_first_step_is_euler_and_dtype_kept(name):
    sig = torch.tensor([0.9, 0.6, 0.3, 0.1], dtype=torch.float32)
    x = torch.randn(2, 5, 3).to(torch.bfloat16)
    v = torch.randn(2, 5, 3).to(torch.bfloat16)
    a = make_solver(name, sig).step(0, x, v)
    b = make_solver("euler", sig).step(0, x, v)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.01, 0.99), min_size=1, max_size=8, unique=True), st.booleans(), st.booleans())
@example(inner=[0.010000000000000002, 0.01], from_one=False, to_zero=True)  # a step of 2e-18 (found by CI)
def test_straight_flows_are_integrated_exactly(inner, from_one, to_zero):
    """Point-mass data: v = eps - x0 is constant along x = (1 - s) x0 + s eps; every solver is exact."""
    sig = sorted(inner, reverse=True)
    sig = ([1.0] if from_one else []) + sig + ([0.0] if to_zero else [])
    if len(sig) < 2:
        sig = sig + [sig[-1] / 2]
    sigmas = torch.tensor(sig, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    for name in SOLVERS:
        s = make_solver(name, sigmas)
        x = (1 - sig[0]) * x0 + sig[0] * eps
        for i in range(len(sig) - 1):
            x = s.step(i, x, eps - x0)
        # euler (as diffusers) updates in float32; the multistep solvers keep float64
        tol = 1e-6 if name == "euler" else 1e-9
        torch.testing.assert_close(x, (1 - sig[-1]) * x0 + sig[-1] * eps, atol=tol, rtol=tol)


def _gaussian_flow_error(name: str, n: int) -> float:
    """1-D data N(m, s^2): exact velocity; exact solution x(sigma) = (1 - sigma) m + r(sigma) eps."""
    m, s2 = 0.7, 2.5
    r = lambda q: math.sqrt((1 - q) ** 2 * s2 + q**2)  # noqa: E731
    def vel(x, q):
        k = (1 - q) * s2 / ((1 - q) ** 2 * s2 + q**2)
        return (x - (m + k * (x - (1 - q) * m))) / q
    hi, lo = 0.95, 0.05
    sig = torch.tensor(np.linspace(hi, lo, n + 1), dtype=torch.float64)
    eps = torch.tensor([1.3, -0.4], dtype=torch.float64)
    x = (1 - hi) * m + r(hi) * eps
    st_ = make_solver(name, sig)
    for i in range(n):
        x = st_.step(i, x, vel(x, float(sig[i])))
    return float((x - ((1 - lo) * m + r(lo) * eps)).abs().max())


@pytest.mark.parametrize("name,order", [("euler", 1), ("ab2", 2), ("dpmpp2m", 2)])
def test_convergence_order(name, order):
    e1, e2 = _gaussian_flow_error(name, 40), _gaussian_flow_error(name, 80)
    assert math.log2(e1 / e2) == pytest.approx(order, abs=0.25)


SMALL = RaluSchedule(steps=(2, 2, 3), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@torch.no_grad()
def test_multistep_in_generate_for_flux_and_sd3(family):
    from ralu_runtime.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    pipe = (build_tiny_flux_pipeline if family == "flux" else build_tiny_sd3_pipeline)(seed=0)
    g = torch.Generator().manual_seed(0)
    emb = {"prompt_embeds": torch.randn(1, 8, 32, generator=g),
           "pooled_prompt_embeds": torch.randn(1, 32 if family == "flux" else 64, generator=g)}
    if family == "sd3":
        emb.update(negative_prompt_embeds=torch.randn(1, 8, 32, generator=g),
                   negative_pooled_prompt_embeds=torch.randn(1, 64, generator=g))
    outs = {}
    for solver in ("euler", "ab2", "dpmpp2m"):
        outs[solver] = generate(pipe, **emb, height=64, width=64, speedup=SMALL, seed=1, solver=solver,
                                output_type="latent", progress=False).images
        assert torch.isfinite(outs[solver]).all(), solver
    assert not torch.equal(outs["euler"], outs["ab2"])
    assert not torch.equal(outs["ab2"], outs["dpmpp2m"])
