"""diffusers' layerwise casting under ``backend="inductor"``: the blocks' cast Linear layers as traceable modules.

``enable_layerwise_casting(storage_dtype, compute_dtype)`` keeps each cast layer's weights in the storage dtype
(float8_e4m3fn, bfloat16, ...) and puts a hook on the layer that converts its parameters to the compute dtype before
its forward and back after. The hook builds new Parameters while the model runs, which torch.compile cannot trace.
Under a compiled backend ralu therefore runs each block through a *cast shadow* (the mechanism of fp8's block
shadows, :mod:`.shadows`): a shallow copy of the user's block (same classes; every other submodule,
parameter, buffer, processor and hook shared) whose cast Linear layers are :class:`CastLinear` modules. A
:class:`CastLinear` reads the user's layer's stored parameters and converts them inside the traced graph,
``F.linear(x, W.to(compute), b.to(compute))``: the values the hook computes with, so the result equals the eager
call's. Layers outside the blocks (embedders, the final norm and projection) run eagerly with their hooks, as ralu
runs them under every backend. Nothing of the user's model changes and no weight copy is kept: the converted
weights are temporaries of each call, as with the hook.

Not covered (refused before any work by :meth:`~ralu_runtime.adapters.DiTAdapter.check_layerwise_casting`): a cast
layer inside a block that is not a ``torch.nn.Linear`` (diffusers' default skip patterns leave norms uncast), CUDA
graphs (a capture would replay the addresses of the hooks' temporaries outside the blocks), exported backends.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from ..adapters.base import layerwise_casting
from .shadows import BlockShadows, shadow_tree, tree_structure


class CastLinear(torch.nn.Module):
    """A cast ``torch.nn.Linear`` of the user's block, traceable: ``source``'s stored weight and bias converted to
    ``compute_dtype`` at each call. ``source`` is referenced, not registered (its hook must not run)."""

    def __init__(self, source: torch.nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        self.__dict__["source"] = source
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src = self.source
        bias = None if src.bias is None else src.bias.to(self.compute_dtype)
        return F.linear(x, src.weight.to(self.compute_dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.source.in_features}, out_features={self.source.out_features}, "
                f"compute_dtype={self.compute_dtype}")


def cast_state(m: torch.nn.Module):
    """What of a module decides its cast shadow: ``(storage dtype, compute dtype)`` of its casting hook, or None."""
    hook = layerwise_casting(m)
    return None if hook is None else (hook.storage_dtype, hook.compute_dtype)


def _replace(m: torch.nn.Module):
    hook = layerwise_casting(m)
    if hook is None:
        return None
    if type(m) is not torch.nn.Linear:
        raise ValueError(f"{type(m).__name__} carries diffusers' layerwise casting inside a block; a compiled "
                         "backend runs cast Linear layers only: leave it uncast (enable_layerwise_casting's "
                         "skip_modules_pattern) or use backend='eager'")
    return CastLinear(m, hook.compute_dtype)


class _Entry:
    def __init__(self, block):
        self.block_ref = weakref.ref(block)
        self.structure = tree_structure(block, cast_state)
        self.shadow = shadow_tree(block, _replace)


class CastShadows(BlockShadows):
    """ralu's cast shadows of the user's blocks, keyed by block object. ``active``: whether the model carries
    layerwise casting (set by the runner from :meth:`~ralu_runtime.adapters.DiTAdapter.check_forwards`' walk at
    every call, and when it is built); inactive, :meth:`shadow` gives each block itself."""

    def __init__(self, active: bool = False):
        super().__init__()
        self.active = active

    def _entry(self, block) -> _Entry:
        return _Entry(block)

    def shadow(self, block):
        """The cast shadow of ``block`` (the block itself where nothing in it is cast, or while inactive)."""
        return super().shadow(block) if self.active else block

    def refresh(self) -> None:
        """Rebuild the shadows of blocks whose module tree or casting changed (once per ``generate`` call while
        active); forget blocks that are gone."""
        self._rebuild_changed(cast_state)


__all__ = ["CastLinear", "CastShadows", "cast_state"]
