"""Backend names and the options of a compiled model call (:class:`CompileOptions`), and build records."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

BACKENDS = ("eager", "inductor", "onnx", "tensorrt")
ATTN_BACKENDS = ("auto", "default", "cudnn", "flash", "efficient", "math", "measure")
MODES = ("default", "max-autotune", "reduce-overhead")
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8")
FP8_KERNELS = ("auto", "torchao", "scaled_mm", "emulated")
# ONNX opsets the onnx backend runs (torch 2.13's TorchScript exporter with onnxruntime, 2026-12-07): 14-17 export
# CastLike / ReduceMean forms onnxruntime refuses at that opset; above 20 the exporter writes 20
OPSETS = (18, 20)


def _check_providers(providers) -> None:
    """ValueError for onnxruntime providers this installation does not have (onnxruntime falls back to the CPU
    without an error, so a typo or a missing onnxruntime-gpu ran on the CPU). Nothing to check without
    onnxruntime (the backend itself is refused then)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    avail = ort.get_available_providers()
    missing = [p for p in providers if p not in avail]
    if missing:
        known = set(ort.get_all_providers())
        what = "; ".join(f"{p!r} is " + ("not built into this onnxruntime" if p in known else "no onnxruntime provider")
                         for p in missing)
        raise ValueError(f"providers={list(providers)!r}: {what}; available here: {', '.join(avail)} (for CUDA: pip "
                         "install onnxruntime-gpu instead of onnxruntime)")


@dataclass
class CompileOptions:
    """Options of one installed backend (see :func:`ralu_runtime.compile.compile_adapter`)."""

    backend: str = "inductor"
    cuda_graphs: bool | None = None      # None: on for inductor/tensorrt on CUDA devices (off for eager)
    mode: str = "default"                # inductor: "default" | "max-autotune" (CUDA graphs are ours)
    dynamic: bool = True                 # symbolic token / batch dims: no recompile across resolutions
    fused_qkv: bool | None = None        # None: on CUDA only (ralu-owned fused weights, FLUX)
    compile_vae: bool | None = None      # torch.compile the VAE decode; None: with inductor on CUDA
    attn_backend: str = "auto"          # "measure": the fastest SDPA backend per device and shape, timed at warm-up
    precision: str = "auto"             # "auto" | "bf16" | "fp16" | "fp32": the model's own dtype; "fp8": fp8 linears
    fp8_kernel: str = "auto"            # with precision="fp8": "auto" | "torchao" | "scaled_mm" | "emulated"
    dynamo_backend: Any = None           # override torch.compile's backend (tests: "eager" / a counter)
    onnx_dir: str | None = None          # where exported graphs go (default: a temporary folder)
    providers: list | None = None        # onnxruntime providers (default: by device)
    opset: int = 18

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not allowed; choose one of {BACKENDS}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend={self.attn_backend!r} is not allowed; choose one of {ATTN_BACKENDS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not allowed; choose one of {PRECISIONS}")
        if self.fp8_kernel not in FP8_KERNELS:
            raise ValueError(f"fp8_kernel={self.fp8_kernel!r} is not allowed; choose one of {FP8_KERNELS}")
        if self.fp8_kernel != "auto" and self.precision != "fp8":  # would be ignored: say so
            raise ValueError(f"fp8_kernel={self.fp8_kernel!r} applies with precision='fp8' only, not with "
                             f"precision={self.precision!r}: add precision='fp8' or leave fp8_kernel='auto'")
        if self.precision == "fp8" and self.backend not in ("eager", "inductor"):
            raise ValueError(f"precision='fp8' runs with backend='eager' or 'inductor', not {self.backend!r} (an "
                             "exported graph cannot hold ralu's fp8 layers)")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not allowed; choose one of {MODES}")
        for name in ("cuda_graphs", "fused_qkv", "compile_vae"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise TypeError(f"{name}={v!r}: use True, False or None (automatic)")
        if not isinstance(self.dynamic, bool):
            raise TypeError(f"dynamic={self.dynamic!r}: use True or False")
        if not isinstance(self.opset, int) or isinstance(self.opset, bool) or not OPSETS[0] <= self.opset <= OPSETS[1]:
            raise ValueError(f"opset={self.opset!r}: use an ONNX opset between {OPSETS[0]} and {OPSETS[1]} (below, "
                             "the export holds ops onnxruntime refuses at that opset; above, torch's TorchScript "
                             "exporter writes opset 20 anyway)")
        if self.dynamo_backend is not None and not callable(self.dynamo_backend):
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.dynamo_backend not in known:
                raise ValueError(f"dynamo_backend={self.dynamo_backend!r}: use one of torch.compile's backends "
                                 f"({', '.join(known)}) or a callable backend")
        if self.providers is not None and (not isinstance(self.providers, (list, tuple)) or not self.providers
                                           or not all(isinstance(p, str) for p in self.providers)):
            raise TypeError(f"providers={self.providers!r}: give a non-empty list of onnxruntime provider names "
                            "(e.g. ['CUDAExecutionProvider', 'CPUExecutionProvider'])")
        if self.providers is not None and self.backend == "onnx":
            _check_providers(self.providers)
        if self.onnx_dir is not None and not isinstance(self.onnx_dir, (str, os.PathLike)):
            raise TypeError(f"onnx_dir={self.onnx_dir!r}: give a folder path (str or os.PathLike)")
        if self.onnx_dir is not None and os.path.exists(self.onnx_dir) and not os.path.isdir(self.onnx_dir):
            raise ValueError(f"onnx_dir={os.fspath(self.onnx_dir)!r} is a file: give a folder (created if missing)")
        unused = self.unused()
        if unused:
            raise ValueError(f"backend={self.backend!r} would ignore " + "; ".join(unused) + ": drop them or choose "
                             "the backend they configure")

    def unused(self) -> list[str]:
        """The options given (not at their defaults) that ``self.backend`` would not use, each with where it
        applies; empty when every option given is used. Device-independent (the TensorRT flavour's own are checked
        when it is known: :func:`check_flavour_options`)."""
        out = []
        if self.backend != "inductor":
            if self.mode != "default":
                out.append(f"mode={self.mode!r} (torch.compile's mode: backend='inductor')")
            if not self.dynamic:
                out.append("dynamic=False (symbolic shapes of torch.compile: backend='inductor')")
            if self.dynamo_backend is not None and self.compile_vae is not True:
                out.append(f"dynamo_backend={self.dynamo_backend!r} (torch.compile's backend: backend='inductor', "
                           "or compile_vae=True)")
        elif self.dynamo_backend is not None and self.mode != "default":
            out.append(f"mode={self.mode!r} (inductor's mode; dynamo_backend={self.dynamo_backend!r} replaces "
                       "inductor)")
        if self.backend in ("eager", "inductor"):
            for name, given in (("onnx_dir", self.onnx_dir is not None), ("providers", self.providers is not None),
                                ("opset", self.opset != 18)):
                if given:
                    out.append(f"{name}={getattr(self, name)!r} (exported graphs: backend='onnx' or 'tensorrt')")
        else:
            if self.attn_backend == "measure":
                out.append("attn_backend='measure' (times attention backends per shape: backend='eager' or "
                           "'inductor'; an exported graph holds its own attention)")
        if self.backend == "onnx" and self.cuda_graphs:
            out.append("cuda_graphs=True (onnxruntime sessions run without ralu's CUDA graphs: backend='eager', "
                       "'inductor' or 'tensorrt' via torch_tensorrt)")
        if self.precision == "fp8" and self.fused_qkv:
            out.append("fused_qkv=True (precision='fp8' runs ralu's fp8 q/k/v layers, not fused weights)")
        return out

    def key(self):
        return tuple(sorted((k, repr(v)) for k, v in self.__dict__.items()))


def make_options(backend: str, options: dict | None = None) -> CompileOptions:
    """``CompileOptions`` for ``backend`` from a dict of its other fields; TypeError naming unknown fields, and
    the values checked (:meth:`CompileOptions.__post_init__`)."""
    options = dict(options or {})
    fields = set(CompileOptions.__dataclass_fields__) - {"backend"}
    unknown = set(options) - fields
    if unknown:
        raise TypeError(f"compile options {sorted(unknown)} are not known; allowed: {sorted(fields)}")
    return CompileOptions(backend=backend, **options)


def check_flavour_options(options: CompileOptions, flavour: str) -> None:
    """ValueError naming the options given that ``backend='tensorrt'`` would ignore with the TensorRT ``flavour``
    found (:func:`.tensorrt.tensorrt_flavour`: "torch_tensorrt" compiles with torch.compile, no ONNX file;
    "tensorrt" builds an engine from an ONNX file, no onnxruntime; "ort-trt" runs onnxruntime's TensorRT
    provider). CUDA graphs are ralu's with torch_tensorrt only."""
    unused = []
    if flavour == "torch_tensorrt":
        for name, given in (("onnx_dir", options.onnx_dir is not None), ("opset", options.opset != 18),
                            ("providers", options.providers is not None)):
            if given:
                unused.append(f"{name}={getattr(options, name)!r} (torch_tensorrt exports no ONNX graph)")
    else:
        if options.cuda_graphs:
            unused.append(f"cuda_graphs=True (ralu's CUDA graphs run with torch_tensorrt; this is {flavour})")
        if flavour == "tensorrt" and options.providers is not None:
            unused.append(f"providers={options.providers!r} (onnxruntime's; this TensorRT engine runs without it)")
    if unused:
        raise ValueError(f"backend='tensorrt' ({flavour}) would ignore " + "; ".join(unused) + ": drop them")


@dataclass
class BuildRecord:
    """One compile/export/capture: which signature, what kind, seconds."""

    kind: str
    tokens: int
    batch: int
    seconds: float
