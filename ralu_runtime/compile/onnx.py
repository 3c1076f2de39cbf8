"""``backend="onnx"``: each stage's model call exported with ``torch.onnx.export`` and run by onnxruntime.

One exported graph per input signature (token positions, fine-token mask, timestep and prompt embeddings are
graph inputs; the weights are constants baked into the graph, so the runner re-exports when a weight changes:
see :meth:`ralu_runtime.compile.StageRunner.begin_call`). CPU execution provider on a CPU; CUDA (or TensorRT,
when onnxruntime has it) on a GPU.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from .flatten import Spec, unflatten


class VelocityModule(torch.nn.Module):
    """Module form of one stage's model call, for export: flat tensors in, velocity out."""

    def __init__(self, fn: Callable, transformer: torch.nn.Module, spec: Spec):
        super().__init__()
        self.fn = fn
        self.transformer = transformer
        self.spec = spec

    def forward(self, *tensors):
        return self.fn(*unflatten(list(tensors), self.spec))


ORT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.int32: "int32",
             torch.bool: "bool_", torch.float64: "float64"}


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """ONNX for ``aten::rms_norm`` (the TorchScript exporter has none below opset 23): x / sqrt(mean(x^2) + eps) * w."""
    from torch.onnx import symbolic_helper as sh

    shape = sh._get_const(normalized_shape, "is", "normalized_shape")
    axes = g.op("Constant", value_t=torch.tensor(list(range(-len(shape), 0)), dtype=torch.long))
    eps_v = None if sh._is_none(eps) else sh._maybe_get_const(eps, "f")
    if eps_v is None or not isinstance(eps_v, (float, int)):
        eps_v = torch.finfo(torch.float32).eps
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes, keepdims_i=1)
    eps_c = g.op("CastLike", g.op("Constant", value_t=torch.tensor(float(eps_v), dtype=torch.float32)), x)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, eps_c)))
    if not sh._is_none(weight):
        y = g.op("Mul", y, weight)
    return y


_SYMBOLICS_DONE: set[int] = set()


def _register_symbolics(opset: int) -> None:
    if opset in _SYMBOLICS_DONE:
        return
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)
    _SYMBOLICS_DONE.add(opset)


def export_onnx(fn, transformer, tensors, names, spec, path: Path, opset: int = 18) -> Path:
    """Export ``fn`` (a model call) for the given flat inputs to ``path``; returns the path."""
    _register_symbolics(opset)
    module = VelocityModule(fn, transformer, spec).eval()
    with torch.no_grad(), contextlib.redirect_stdout(None):
        torch.onnx.export(module, tuple(tensors), str(path), dynamo=False, input_names=names,
                          output_names=["velocity"], opset_version=opset, do_constant_folding=True)
    return path


class OrtStage:
    """An onnxruntime session of one exported stage call. ``backend``: the ralu backend name in error messages
    ("onnx", or "tensorrt" when this runs onnxruntime's TensorRT execution provider)."""

    def __init__(self, path: Path, device: torch.device, providers: list | None, backend: str = "onnx"):
        import numpy as np
        import onnxruntime as ort

        self.np = np
        self.backend = backend
        avail = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda":
                providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in avail]
                if not providers:
                    raise ImportError(f"backend={backend!r} on a CUDA device needs onnxruntime with the CUDA execution "
                                      "provider: pip install onnxruntime-gpu")
                providers = providers + ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.device = device
        self.gpu = device.type == "cuda" and self.session.get_providers()[0] != "CPUExecutionProvider"

    def __call__(self, tensors, names, out_like: torch.Tensor) -> torch.Tensor:
        by_name = dict(zip(names, tensors))
        if not self.gpu:
            feeds = {n: by_name[n].detach().cpu().numpy() for n in self.inputs}
            out = self.session.run(["velocity"], feeds)[0]
            return torch.from_numpy(out).to(out_like.device)
        binding = self.session.io_binding()
        keep = []
        for n in self.inputs:
            t = by_name[n].contiguous()
            keep.append(t)
            if t.dtype not in ORT_TYPES:
                hint = (" (or install torch-tensorrt, or tensorrt >= 9, which backend='tensorrt' then uses "
                        "instead of onnxruntime)") if self.backend == "tensorrt" else ""
                raise TypeError(f"backend={self.backend!r} runs onnxruntime here, whose CUDA binding (numpy element "
                                f"types) has no {t.dtype}; load the pipeline in float16 or float32, or use "
                                f"backend='inductor' for bfloat16{hint}")
            binding.bind_input(n, "cuda", t.device.index or 0, getattr(self.np, ORT_TYPES[t.dtype]), tuple(t.shape),
                               t.data_ptr())
        out = torch.empty_like(out_like)
        binding.bind_output("velocity", "cuda", out.device.index or 0, getattr(self.np, ORT_TYPES[out.dtype]),
                            tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return out
