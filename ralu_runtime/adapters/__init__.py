"""Model adapters: one file per DiT family, registered here by pipeline class name."""
from __future__ import annotations

from .base import Conditioning, DiTAdapter, TokenGrid

# pipeline class name -> "module:AdapterClass" (imported lazily so diffusers loads only when needed)
ADAPTERS: dict[str, str] = {
    "FluxPipeline": "ralu_runtime.adapters.flux:FluxAdapter",
    "StableDiffusion3Pipeline": "ralu_runtime.adapters.sd3:SD3Adapter",
}


def get_adapter(pipe) -> DiTAdapter:
    """Return the adapter for a loaded diffusers pipeline (cached on the pipeline), or the adapter itself.

    Raises ValueError naming the class and the supported ones for anything else.
    """
    if isinstance(pipe, DiTAdapter):
        return pipe
    cached = getattr(pipe, "_ralu_adapter", None)
    if cached is not None:
        return cached
    name = type(pipe).__name__
    if name not in ADAPTERS:
        raise ValueError(f"unsupported model class {name!r}: ralu supports {sorted(ADAPTERS)} "
                         "(or pass a ralu_runtime.adapters.DiTAdapter)")
    import importlib

    module, cls = ADAPTERS[name].split(":")
    adapter = getattr(importlib.import_module(module), cls)(pipe)
    try:
        pipe._ralu_adapter = adapter
    except AttributeError:  # pragma: no cover - exotic pipelines
        pass
    return adapter


__all__ = ["ADAPTERS", "Conditioning", "DiTAdapter", "TokenGrid", "get_adapter"]
