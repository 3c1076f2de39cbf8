"""ralu_runtime: Region-Adaptive Latent Upsampling (RALU) for diffusion transformers.

``generate(pipe, prompt, speedup="7x")`` runs RALU on a diffusers pipeline of a supported family
(:mod:`ralu_runtime.families`); ``speedup=None`` runs the ordinary full-resolution sampler for comparison.
``generate`` is ``run(prepare(...))``: :func:`prepare` checks and resolves a call into a :class:`CallPlan` (no model
work), :func:`run` executes it.

The names below are imported on first use (PEP 562), so ``import ralu_runtime.cli`` (``ralu --help``) does
not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .api import CallPlan, RaluOutput, generate, load_pipeline, prepare, run
    from .schedule import RaluSchedule, get_preset, solve_nt_matching

_EXPORTS = {"CallPlan": ".api", "RaluOutput": ".api", "generate": ".api", "load_pipeline": ".api", "prepare": ".api",
            "run": ".api",
            "RaluSchedule": ".schedule", "get_preset": ".schedule", "solve_nt_matching": ".schedule"}

__all__ = ["CallPlan", "RaluOutput", "RaluSchedule", "generate", "get_preset", "load_pipeline", "prepare", "run",
           "solve_nt_matching"]


def __getattr__(name: str):
    """Resolve an exported name (or a submodule, e.g. ``ralu_runtime.api``) on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
