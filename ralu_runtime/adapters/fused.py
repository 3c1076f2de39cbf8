"""Fused projections owned by ralu: one weight concatenating several ``nn.Linear`` layers (e.g. q, k, v).

One matrix product instead of three is faster on a GPU. diffusers' ``fuse_qkv_projections`` does this by
adding a ``to_qkv`` layer to the user's model (left there, with stale copies once a LoRA is loaded, and drawing
from the global RNG to initialise it). ralu never does that: :class:`FusedProjections` keeps the concatenated
weights in its own tensors, built from the *live* layers, and checks them against the layers at every
:meth:`FusedProjections.refresh` (once per ``generate`` call):

* a layer that is no longer a plain ``torch.nn.Linear`` (a LoRA wrapper, a quantised layer) or has forward
  hooks is not fused: the model's own layers run, so LoRAs and hooks take effect;
* a weight changed in place (``w *= 2``, ``load_state_dict``, ``fuse_lora``) is copied into the same fused
  storage (CUDA graphs that read it stay valid); a replaced tensor (other shape, device or object) gives a new
  fused tensor. Writes through ``.data`` (peft's fuse_lora and hot-swap) leave the version counters as they were:
  the runner finds them by a per-call stamp of the source tensors (:func:`ralu_runtime.compile.runner.
  content_stamp`) and calls :meth:`FusedProjections.invalidate`.

Memory: the fused copies add the size of the fused layers (FLUX.1-dev: about 2 B parameters, ~4 GB in bf16)
while a backend with ``fused_qkv`` is installed; :func:`ralu_runtime.compile.uncompile_adapter` frees them.
"""
from __future__ import annotations

import threading
import weakref

import torch

from ..execution.call import static_dims
from ..execution.packing import has_hooks


def _plain_linear(m) -> bool:
    """A ``torch.nn.Linear`` whose own forward runs: no hooks, no registry, no forward of its own (a fused copy would
    bypass them)."""
    return type(m) is torch.nn.Linear and not has_hooks(m)


def _state(layers) -> tuple:
    """Identity and version of every source tensor (changes when a weight is replaced or modified in place)."""
    out = []
    for m in layers:
        for t in (m.weight, m.bias):
            out.append(None if t is None else (id(m), id(t), t._version, t.data_ptr(), tuple(t.shape), t.dtype,
                                               t.device))
    return tuple(out)


class _Entry:
    def __init__(self, module, names):
        self.module_ref = weakref.ref(module)
        self.names = names
        self.weight = self.bias = None
        self.state = None

    def layers(self):
        module = self.module_ref()
        if module is None:
            return None
        layers = [getattr(module, n, None) for n in self.names]
        return layers if all(_plain_linear(m) for m in layers) else None

    def update(self) -> None:
        layers = self.layers()
        if layers is None or any((m.bias is None) != (layers[0].bias is None) for m in layers):
            self.weight = self.bias = self.state = None
            return
        state = _state(layers)
        if state == self.state:
            return
        with torch.no_grad():
            w = torch.cat([m.weight for m in layers], 0)
            b = None if layers[0].bias is None else torch.cat([m.bias for m in layers], 0)
            if (self.weight is not None and self.weight.shape == w.shape and self.weight.dtype == w.dtype
                    and self.weight.device == w.device and (self.bias is None) == (b is None)):
                self.weight.copy_(w)  # same storage: captured CUDA graphs stay valid
                if b is not None:
                    self.bias.copy_(b)
            else:
                self.weight, self.bias = w, b
                for t in (w, b):  # never symbolic sizes in a compiled block
                    if t is not None:
                        static_dims(t)
        self.state = state


class FusedProjections:
    """ralu-owned fused weights, keyed by (module, layer names); see the module docstring."""

    def __init__(self):
        self._entries: dict[tuple[int, tuple[str, ...]], _Entry] = {}
        self._lock = threading.Lock()

    def get(self, module: torch.nn.Module, names: tuple[str, ...]):
        """``(weight (sum out, in), bias or None)`` for ``module``'s layers ``names``, or None (not fusable)."""
        key = (id(module), names)
        entry = self._entries.get(key)
        if entry is None or entry.module_ref() is not module:
            with self._lock:
                entry = _Entry(module, names)
                entry.update()
                self._entries[key] = entry
        if entry.weight is None:
            return None
        return entry.weight, entry.bias

    def refresh(self) -> None:
        """Re-check every entry against the live layers (call before each use of the model)."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.module_ref() is None:
                    del self._entries[key]
                else:
                    entry.update()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def source_tensors(self) -> list[torch.Tensor]:
        """The user's weights and biases the fused copies are made from."""
        out = []
        for entry in list(self._entries.values()):
            layers = entry.layers() if entry.weight is not None else None
            for m in layers or ():
                out += [t for t in (m.weight, m.bias) if t is not None]
        return out

    def invalidate(self) -> None:
        """Make the next :meth:`refresh` copy every fused weight again (into the same storage): the sources changed
        in a way their version counters do not show (a write through ``.data``, as peft's fuse_lora does)."""
        with self._lock:
            for entry in self._entries.values():
                entry.state = None

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self._entries.values() for t in (e.weight, e.bias)
                   if t is not None)
