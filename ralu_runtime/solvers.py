"""Per-stage ODE solvers for the flow ``dx/dsigma = v``; each is created fresh for every stage.

A solver is built with the stage's sigmas ``(N+1,)`` float32 and advanced with
``x = solver.step(i, x, v)`` after the model's velocity ``v`` at ``sigmas[i]``; one model call per step.
"""
from __future__ import annotations

import torch


class EulerSolver:
    """First-order Euler, with the dtype handling of diffusers' ``FlowMatchEulerDiscreteScheduler.step``."""

    name = "euler"

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) + (self.sigmas[i + 1] - self.sigmas[i]) * v).to(v.dtype)


SOLVERS: dict[str, type] = {"euler": EulerSolver}


def make_solver(name: str, sigmas: torch.Tensor):
    """Solver ``name`` for one stage with ``sigmas (N+1,)``; ValueError listing the choices otherwise."""
    if name not in SOLVERS:
        raise ValueError(f"solver={name!r} is not supported; choose one of {tuple(SOLVERS)}")
    return SOLVERS[name](sigmas)
