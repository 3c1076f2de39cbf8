"""Per-stage ODE solvers for the flow ``dx/dsigma = v``; each is created fresh for every stage.

A solver is built with the stage's sigmas ``(N+1,)`` float32 and advanced with
``x = solver.step(i, x, v)`` after the model's velocity ``v`` at ``sigmas[i]``; one model call per step.
Steps must be taken in order ``i = 0, 1, ..., N-1`` (the multistep solvers keep the previous velocity).
The sampler makes a new solver per stage, so multistep history restarts at every RALU stage boundary:
the first step of every stage is an Euler step.

Solvers (all cost exactly one model call per step, all are linear in the state and the velocities):

* ``"euler"``: first-order Euler, as diffusers' ``FlowMatchEulerDiscreteScheduler``. For the flow
  parameterisation this is also DDIM / first-order DPM-Solver.
* ``"ab2"``: second-order Adams-Bashforth with variable steps in sigma on the velocity,
  ``x' = x + h_i ((1 + rho/2) v_i - rho/2 v_{i-1})``, ``h_i = sigma_{i+1} - sigma_i``, ``rho = h_i / h_{i-1}``.
* ``"dpmpp2m"``: DPM-Solver++(2M) (Lu et al. 2022) on the data prediction ``x0 = x - sigma v`` with
  ``alpha = 1 - sigma`` and ``lambda = log(alpha / sigma)``: ``x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D``,
  ``D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}``, ``r = h_{i-1} / h_i`` in lambda. First order where lambda is
  infinite (a step from sigma = 1 or to sigma = 0), like diffusers' ``lower_order_final``.
"""
from __future__ import annotations

import math

import torch


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class EulerSolver:
    """First-order Euler, with the dtype handling of diffusers' ``FlowMatchEulerDiscreteScheduler.step``."""

    name = "euler"

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) + (self.sigmas[i + 1] - self.sigmas[i]) * v).to(v.dtype)


MAX_STEP_RATIO = 1e3  # a previous step this many times shorter than the current one gives no usable slope: the
# second-order term would multiply rounding errors by the ratio (two sigmas 2e-18 apart gave errors of 6e-3), so
# such a step falls back to first order (real schedules have ratios of a few at most)


class _Multistep:
    """Shared bookkeeping: sigmas as Python floats, the previous step's quantity, order check."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas
        self.s = [float(v) for v in sigmas.detach().to("cpu", torch.float64)]
        self._prev = None      # previous velocity (ab2) or data prediction (dpmpp2m), work dtype
        self._next_i = 0

    def _check(self, i: int) -> None:
        if i != self._next_i:
            raise ValueError(f"{self.name}: steps must be taken in order; expected i={self._next_i}, got {i}")
        self._next_i = i + 1


class AB2Solver(_Multistep):
    """Variable-step second-order Adams-Bashforth in sigma; Euler for the first step of a stage."""

    name = "ab2"

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check(i)
        wd = _work_dtype(x)
        vw = v.to(wd)
        h = self.s[i + 1] - self.s[i]
        h_prev = self.s[i] - self.s[i - 1] if self._prev is not None else 0.0
        if self._prev is None or abs(h) > MAX_STEP_RATIO * abs(h_prev):
            upd = vw
        else:
            rho = h / h_prev
            upd = (1.0 + 0.5 * rho) * vw - (0.5 * rho) * self._prev
        self._prev = vw
        return (x.to(wd) + h * upd).to(v.dtype)


class DPMpp2MSolver(_Multistep):
    """DPM-Solver++(2M) on the flow ODE (data prediction, variable steps in lambda = log((1-sigma)/sigma))."""

    name = "dpmpp2m"

    @staticmethod
    def _lam(s: float) -> float:
        if s <= 0.0:
            return math.inf
        if s >= 1.0:
            return -math.inf
        return math.log((1.0 - s) / s)

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check(i)
        wd = _work_dtype(x)
        xw = x.to(wd)
        s0, s1 = self.s[i], self.s[i + 1]
        x0 = xw - s0 * v.to(wd)
        d = x0
        if self._prev is not None:
            h = self._lam(s1) - self._lam(s0)
            h_prev = self._lam(s0) - self._lam(self.s[i - 1])
            if math.isfinite(h) and math.isfinite(h_prev) and h != 0.0 and abs(h) <= MAX_STEP_RATIO * abs(h_prev):
                inv2r = 0.5 * h / h_prev
                d = (1.0 + inv2r) * x0 - inv2r * self._prev
        self._prev = x0
        ratio = s1 / s0
        return (ratio * xw + ((1.0 - s1) - (1.0 - s0) * ratio) * d).to(v.dtype)


SOLVERS: dict[str, type] = {"euler": EulerSolver, "ab2": AB2Solver, "dpmpp2m": DPMpp2MSolver}


def make_solver(name: str, sigmas: torch.Tensor):
    """Solver ``name`` for one stage with ``sigmas (N+1,)``; ValueError listing the choices otherwise."""
    if name not in SOLVERS:
        raise ValueError(f"solver={name!r} is not supported; choose one of {tuple(SOLVERS)}")
    return SOLVERS[name](sigmas)
