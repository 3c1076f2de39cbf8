"""A model call's inputs as a flat list of tensors plus a hashable spec (the cache key of compiled artifacts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.base import Conditioning, TokenGrid


@dataclass(frozen=True)
class Spec:
    """Non-tensor structure of one ``velocity`` call; part of the cache key."""

    grid_hw: tuple[int, int]
    raster: bool
    has_mask: bool
    batch: int
    cond_keys: tuple[tuple[str, str, Any], ...]  # (key, "tensor" | "none" | "const", const value)
    frames: int = 1


def flatten(tokens, grid: TokenGrid, timestep, cond: Conditioning):
    """``(tensors, names, spec)`` of one call ``velocity(tokens, grid, timestep, cond)``."""
    tensors = [tokens, grid.positions, timestep if torch.is_tensor(timestep) else torch.tensor(timestep)]
    names = ["tokens", "positions", "timestep"]
    if grid.fine_mask is not None:
        tensors.append(grid.fine_mask)
        names.append("fine_mask")
    keys = []
    for k in sorted(cond.data):
        v = cond.data[k]
        if torch.is_tensor(v):
            keys.append((k, "tensor", None))
            tensors.append(v)
            names.append(f"cond_{k}")
        elif callable(getattr(v, "tokens", None)):  # per-token conditioning (FLUX.1 Fill / control: ChannelCond):
            keys.append((k, "tensor", None))         # this call's token set's tensor, an input like the tokens
            tensors.append(v.tokens(grid))
            names.append(f"cond_{k}")
        elif v is None:
            keys.append((k, "none", None))
        else:
            keys.append((k, "const", v))
    spec = Spec(tuple(int(s) for s in grid.grid_hw), bool(grid.raster), grid.fine_mask is not None, int(cond.batch),
                tuple(keys), int(grid.frames))
    return tensors, names, spec


def unflatten(tensors, spec: Spec):
    """Inverse of :func:`flatten`: ``(tokens, grid, timestep, cond)``."""
    tokens, positions, timestep = tensors[0], tensors[1], tensors[2]
    i = 3
    mask = None
    if spec.has_mask:
        mask, i = tensors[3], 4
    data = {}
    for k, kind, val in spec.cond_keys:
        if kind == "tensor":
            data[k] = tensors[i]
            i += 1
        else:
            data[k] = None if kind == "none" else val
    grid = TokenGrid(positions, spec.grid_hw, mask, spec.raster, spec.frames)
    return tokens, grid, timestep, Conditioning(spec.batch, data)


def signature(tensors, spec: Spec):
    """Hashable key: the spec plus every tensor's shape, dtype and device."""
    return (spec,) + tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)
