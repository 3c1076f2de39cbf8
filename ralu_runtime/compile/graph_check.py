"""Checks on the graphs dynamo captures of ralu's block functions: are the model's dimensions static?

Block functions compile with ``dynamic=True`` (one graph for every token count). Only token and batch counts should
be symbolic there; a symbolic *model* dimension (a head count, a feature size) makes inductor emit kernels with
run-time index divisions and no specialisation. :func:`ralu_runtime.execution.call.static_dims` keeps the tensors
ralu passes into blocks from bringing one; :func:`symbolic_feature_dims` finds any that got through, and
:class:`RecordingBackend` applies it to every graph a runner compiles (tests and ``benchmarks/static_dims.py``).
"""
from __future__ import annotations

from typing import Callable

import torch


def _tensors(node) -> list[torch.Tensor]:
    v = node.meta.get("example_value")
    return [t for t in (v if isinstance(v, (tuple, list)) else [v]) if isinstance(t, torch.Tensor)]


def _symbolic(size) -> bool:
    """A SymInt that guards did not specialise to a number."""
    return isinstance(size, torch.SymInt) and not size.node.expr.is_number


def symbolic_feature_dims(gm: torch.fx.GraphModule) -> list[str]:
    """``"node (shape)"`` for each node of dynamo graph ``gm`` whose floating-point tensor value has a symbolic last
    (feature) dimension that is not one of the graph's sequence lengths (the dim-1 sizes of its tensor inputs of 3 or
    more dims: the key length of a mask over the joined sequence, for example). Empty: every feature size is
    static."""
    seq = {str(t.shape[1]) for n in gm.graph.nodes if n.op == "placeholder" for t in _tensors(n) if t.dim() >= 3}
    bad = []
    for n in gm.graph.nodes:
        for t in _tensors(n):
            if t.dim() and t.is_floating_point() and _symbolic(t.shape[-1]) and str(t.shape[-1]) not in seq:
                bad.append(f"{n.name} {tuple(str(s) for s in t.shape)}")
    return bad


class RecordingBackend:
    """A dynamo backend (``CompileOptions.dynamo_backend``) that hands each graph to ``inner`` (``"eager"``: run it
    as traced; ``"aot_eager"``: through AOTAutograd's passes, no codegen; ``"inductor"``: compile it as
    ``backend="inductor"`` would, default mode), counts the graphs compiled in :attr:`graphs` and the calls in
    :attr:`attempts` (more attempts than graphs: dynamo restarted a trace), and records their
    :func:`symbolic_feature_dims` in :attr:`bad`."""

    def __init__(self, inner: str = "eager"):
        if inner not in ("eager", "aot_eager", "inductor"):
            raise ValueError(f"inner={inner!r}: use 'eager', 'aot_eager' or 'inductor'")
        self.inner = inner
        self.graphs = 0
        self.attempts = 0
        self.bad: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> Callable:
        self.attempts += 1
        bad = symbolic_feature_dims(gm)
        if self.inner == "eager":
            fn = gm.forward
        else:
            # aot_eager / inductor may raise dynamo's restart (a Python float to specialise or make a tensor): dynamo
            # then traces the frame again and calls us again, so a graph counts only once its compile returned
            if self.inner == "aot_eager":
                from torch._dynamo.backends.debugging import aot_eager as inner
            else:
                from torch._inductor.compile_fx import compile_fx as inner
            fn = inner(gm, example_inputs)
        self.graphs += 1
        self.bad += bad
        return fn


__all__ = ["RecordingBackend", "symbolic_feature_dims"]
