"""Block *shadows*: ralu's own structural copies of the user's blocks, in which some layers are replaced.

A shadow is a shallow copy of a block (same classes; every submodule, parameter, buffer, processor and hook that is
not replaced shared with the user's block) whose replaced layers are ralu's modules: fp8 layers holding quantized
copies (:mod:`.fp8`), or traceable stand-ins for diffusers' layerwise-cast layers (:mod:`.cast_layers`). The user's
modules are never modified; compiled block functions receive the shadow in place of the block. :class:`BlockShadows`
keeps one per block object and rebuilds it when the block's module tree changes (:func:`tree_structure`).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch


def tree_structure(block: torch.nn.Module, state: Callable[[torch.nn.Module], Any]) -> tuple:
    """Identity of a block's module tree as a shadow depends on it: module objects, types, hook counts, ``state``
    of each module (what the shadow's replacement rule reads), and what a shallow copy takes by value from a
    module's instance dictionary that a user may set and remove: a ``forward`` set on the instance, the train/eval
    flag."""
    out = []
    stack = [block]
    while stack:
        m = stack.pop()
        out.append((id(m), type(m), len(m._forward_hooks) + len(m._forward_pre_hooks), state(m),
                    id(m.__dict__.get("forward")), m.training))
        stack.extend(c for c in m._modules.values() if c is not None)
    return tuple(out)


def shadow_tree(m: torch.nn.Module, replace: Callable[[torch.nn.Module], torch.nn.Module | None]) -> torch.nn.Module:
    """The shadow of ``m``: ``replace(m)`` where it gives a module (a replacement, or ``m`` itself to keep it and
    what is below it as they are), else ``m`` itself when nothing below it is replaced, else a shallow copy of ``m``
    (same class and attributes, shared parameters, buffers and hooks) with its own child dictionary."""
    r = replace(m)
    if r is not None:
        return r
    children = {k: (None if c is None else shadow_tree(c, replace)) for k, c in m._modules.items()}
    if all(children[k] is c for k, c in m._modules.items()):
        return m
    copy = m.__class__.__new__(m.__class__)
    copy.__dict__.update(m.__dict__)
    copy.__dict__["_modules"] = children
    return copy


class BlockShadows:
    """Shadows of the user's blocks, keyed by block object (weakly: a block that is gone is forgotten at the next
    :meth:`_rebuild_changed`). A subclass says how an entry is built (:meth:`_entry`: an object with ``block_ref``,
    ``structure`` and ``shadow``)."""

    def __init__(self):
        self._entries: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _entry(self, block):
        raise NotImplementedError

    def shadow(self, block):
        """The shadow of ``block`` (built on first use); anything that is not a module: itself."""
        if not isinstance(block, torch.nn.Module):
            return block
        entry = self._entries.get(id(block))
        if entry is None or entry.block_ref() is not block:
            with self._lock:
                entry = self._entries.get(id(block))
                if entry is None or entry.block_ref() is not block:
                    entry = self._entry(block)
                    self._entries[id(block)] = entry
        return entry.shadow

    def _rebuild_changed(self, state: Callable[[torch.nn.Module], Any]) -> list:
        """Forget the blocks that are gone and rebuild the entries whose :func:`tree_structure` (with ``state``)
        changed; for every live block in turn, None where it was rebuilt, else its unchanged entry."""
        out = []
        with self._lock:
            for key, entry in list(self._entries.items()):
                block = entry.block_ref()
                if block is None:
                    del self._entries[key]
                elif tree_structure(block, state) != entry.structure:
                    self._entries[key] = self._entry(block)
                    out.append(None)
                else:
                    out.append(entry)
        return out

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["BlockShadows", "shadow_tree", "tree_structure"]
