"""ralu_runtime: Region-Adaptive Latent Upsampling (RALU) for diffusion transformers.

``generate(pipe, prompt, speedup="7x")`` runs RALU on a diffusers FLUX or SD3 pipeline; ``speedup=None``
runs the ordinary full-resolution sampler for comparison.

The names below are imported on first use (PEP 562), so ``import ralu_runtime.cli`` (``ralu --help``) does
not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .api import RaluOutput, generate, load_pipeline
    from .schedule import RaluSchedule, get_preset, solve_nt_matching

_EXPORTS = {"RaluOutput": ".api", "generate": ".api", "load_pipeline": ".api",
            "RaluSchedule": ".schedule", "get_preset": ".schedule", "solve_nt_matching": ".schedule"}

__all__ = ["RaluOutput", "RaluSchedule", "generate", "get_preset", "load_pipeline", "solve_nt_matching"]


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
