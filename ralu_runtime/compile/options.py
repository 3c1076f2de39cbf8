"""Backend names and the options of a compiled model call (:class:`CompileOptions`), and build records."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BACKENDS = ("eager", "inductor", "onnx", "tensorrt")
ATTN_BACKENDS = ("auto", "default", "cudnn", "flash", "efficient", "math", "measure")
MODES = ("default", "max-autotune", "reduce-overhead")
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp8")
FP8_KERNELS = ("auto", "torchao", "scaled_mm", "emulated")


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
        if not isinstance(self.opset, int) or not 14 <= self.opset <= 23:
            raise ValueError(f"opset={self.opset!r}: use an ONNX opset between 14 and 23")

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


@dataclass
class BuildRecord:
    """One compile/export/capture: which signature, what kind, seconds."""

    kind: str
    tokens: int
    batch: int
    seconds: float
