"""``precision="fp8"``: the blocks' Linear layers run in fp8 (e4m3) on ralu's own quantized weight copies.

What is quantized: every ``torch.nn.Linear`` inside the transformer's blocks (attention projections, feed-forward,
the AdaLN modulation linears) whose ``in_features`` and ``out_features`` are multiples of 16 (what fp8 matrix
multiplication needs); layers outside the blocks (embedders, the final norm and projection) keep the model's dtype.

* Weights: per output row (channel) ``w_scale[n] = amax(|W[n, :]|) / 448``, ``W_q = round_e4m3(W / w_scale)``.
* Activations: per token, computed at every call (dynamic): ``x_scale[m] = amax(|x[m, :]|) / 448``.
* Output: ``y = (x_q @ W_q^T) * x_scale * w_scale + bias`` accumulated in fp32 (the bias is the layer's own tensor,
  in the model's dtype, added after the product).

How it hooks in without changing the user's model or the adapters: every adapter runs its blocks through
``impl.block(name, fn)`` with the block module as ``fn``'s first argument. :class:`Fp8Shadows` hands out, for a
user's block, a *shadow*: a shallow structural copy (same classes; every non-Linear submodule, parameter, buffer,
processor and hook shared with the user's block) whose Linear layers are :class:`Fp8Linear` modules holding ralu's
quantized copies. The user's modules are never modified; the shadows live in the runner and go with it.

LoRA (peft): a peft LoRA layer on a Linear is quantized as its *effective* weight ``W + sum_a scale_a * B_a @ A_a``
over its active adapters (one fp8 product, no LoRA side path; the LoRA delta is rounded together with the weight:
its effect is kept, at fp8's relative precision). Layers whose LoRA cannot be expressed as a weight delta (DoRA,
LoRA bias, other LoRA variants, a merged adapter being disabled) keep the user's layer as it is, in high precision.
:meth:`Fp8Shadows.refresh` (once per ``generate`` call) re-quantizes what changed: a replaced or in-place modified
weight, a LoRA loaded / hot-swapped / re-weighted / switched, a layer replaced (the block's shadow is rebuilt).

Kernels (:data:`FP8_KERNELS`): ``torchao`` (torchao's ``Float8DynamicActivationFloat8WeightConfig(PerRow())`` on a
ralu-owned ``nn.Linear`` holding the effective weight), ``scaled_mm`` (``torch._scaled_mm`` with row-wise scales; CUDA
compute capability >= 8.9, and torch's CPU implementation), ``emulated`` (the same quantize / dequantize in fp32 with
an fp32 matrix product: the reference), ``auto`` (torchao on CUDA when importable, else ``scaled_mm`` where it runs,
else ``emulated``).
"""
from __future__ import annotations

import weakref

import torch

from .options import FP8_KERNELS
from .shadows import BlockShadows, shadow_tree, tree_structure

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
MIN_CAPABILITY = (8, 9)  # Ada (sm_89), Hopper (sm_90) and newer have fp8 tensor cores
_ALIGN = 16               # fp8 GEMMs need K and N multiples of 16
_TINY = 1e-12             # amax floor: an all-zero row gets scale 1e-12 / 448 instead of 0


# ------------------------------------------------------------------------------------------------ device support
def fp8_support(device: torch.device | str) -> tuple[bool, str]:
    """Whether fp8 linears run on ``device``, and why (not). CUDA needs compute capability >= 8.9; the CPU runs
    torch's CPU ``_scaled_mm`` or the fp32 emulation (for tests; no speed-up)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        how = "torch's CPU _scaled_mm" if cpu_scaled_mm_available() else "the fp32 emulation"
        return True, f"cpu: {how} (for testing; slower than the model's own dtype)"
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        name = torch.cuda.get_device_name(idx)
        if tuple(cap) >= MIN_CAPABILITY:
            return True, f"{name} (cuda:{idx}) has compute capability {cap[0]}.{cap[1]}"
        return False, (f"precision='fp8' needs a GPU with fp8 tensor cores (compute capability >= "
                       f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: Ada, Hopper or newer); {name} (cuda:{idx}) has "
                       f"compute capability {cap[0]}.{cap[1]}. Use precision='auto' (the model's own dtype)")
    return False, (f"precision='fp8' runs on CUDA devices with compute capability >= 8.9 (and on the CPU for "
                   f"testing); the model is on {dev}")


def check_fp8_device(device: torch.device | str) -> None:
    """Raise RuntimeError naming the device and its capability when fp8 linears cannot run on ``device``."""
    ok, why = fp8_support(device)
    if not ok:
        raise RuntimeError(why)


_CPU_SCALED_MM: bool | None = None


def cpu_scaled_mm_available() -> bool:
    """Whether this torch has a CPU ``torch._scaled_mm`` for e4m3 with row-wise scales (probed once)."""
    global _CPU_SCALED_MM
    if _CPU_SCALED_MM is None:
        try:
            a = torch.ones(2, 16).to(E4M3)
            b = torch.ones(16, 16).to(E4M3)
            out = torch._scaled_mm(a, b.t(), scale_a=torch.ones(2, 1), scale_b=torch.ones(1, 16),
                                   out_dtype=torch.float32)
            _CPU_SCALED_MM = bool(torch.allclose(out, torch.full((2, 16), 16.0)))
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            _CPU_SCALED_MM = False
    return _CPU_SCALED_MM


def torchao_config():
    """torchao's float8 dynamic-activation / float8-weight config with per-row scales, or ImportError naming the
    package. (torchao >= 0.10: ``Float8DynamicActivationFloat8WeightConfig``; older: the function form.)"""
    try:
        from torchao.quantization import PerRow
    except ImportError as exc:
        raise ImportError("fp8_kernel='torchao' needs torchao (pip install torchao); without it use "
                          "fp8_kernel='scaled_mm' (torch._scaled_mm) or 'auto'") from exc
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig
    except ImportError:
        from torchao.quantization import float8_dynamic_activation_float8_weight as old

        return old(granularity=PerRow())
    # set_inductor_config=False: torchao would otherwise change torch._inductor's process-wide config
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def torchao_version() -> str | None:
    """The installed torchao's version (from its metadata, without importing it), or None."""
    if not _torchao_importable():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return "unknown version"


def _torchao_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def resolve_kernel(kernel: str, device: torch.device | str) -> str:
    """The fp8 kernel that runs for ``kernel`` (one of :data:`FP8_KERNELS`) on ``device``."""
    if kernel not in FP8_KERNELS:
        raise ValueError(f"fp8_kernel={kernel!r} is not allowed; choose one of {FP8_KERNELS}")
    dev = torch.device(device)
    if kernel == "auto":
        if dev.type == "cuda":
            return "torchao" if _torchao_importable() else "scaled_mm"
        return "scaled_mm" if cpu_scaled_mm_available() else "emulated"
    if kernel == "torchao":
        if dev.type != "cuda":
            raise ValueError(f"fp8_kernel='torchao' runs on CUDA only (torchao refuses other devices); the model is "
                             f"on {dev}: use fp8_kernel='scaled_mm' or 'emulated'")
        torchao_config()  # ImportError naming the package
    if kernel == "scaled_mm" and dev.type == "cpu" and not cpu_scaled_mm_available():
        raise ValueError(f"fp8_kernel='scaled_mm': torch {torch.__version__} has no CPU fp8 _scaled_mm; use "
                         "fp8_kernel='emulated' (or 'auto')")
    return kernel


# ------------------------------------------------------------------------------------------------ the arithmetic
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., K)`` (any float dtype) -> ``(q (..., K) float8_e4m3fn, scale (..., 1) float32)`` with
    ``x ~= q * scale``: one scale per row, ``amax(|row|) / 448`` (rows of zeros: a tiny positive scale)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / E4M3_MAX
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_rows` in float32: ``q (..., K) e4m3``, ``scale (..., 1)`` -> ``(..., K)``."""
    return q.float() * scale


def fp8_matmul(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, kernel: str) -> torch.Tensor:
    """``x (..., K)`` times the quantized weight ``w_q (N, K) e4m3`` with row scales ``w_scale (1, N) float32``:
    the activation is quantized per token (:func:`quantize_rows`), the product accumulated in fp32 and scaled by
    both scales. Returns ``(..., N)`` in ``x.dtype``. ``kernel``: ``"scaled_mm"`` (``torch._scaled_mm``; CUDA
    writes bfloat16, cast to ``x.dtype``) or ``"emulated"`` (fp32 dequantized product)."""
    lead = x.shape[:-1]
    # K is a model dimension: checking it here also makes it static in a compiled block (the fake _scaled_mm does not
    # tie x's K to the weight's, and a symbolic K would reach the AdaLN inputs and their kernels)
    torch._check(x.shape[-1] == w_q.shape[1])
    x2 = x.reshape(-1, x.shape[-1])
    x_q, x_scale = quantize_rows(x2)
    if kernel == "emulated":
        y = (x_q.float() @ w_q.float().t()) * x_scale * w_scale
    else:
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype  # CUDA row-wise scaling writes bfloat16
        y = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    return y.to(x.dtype).reshape(*lead, w_q.shape[0])


# ------------------------------------------------------------------------------------------------ layers
def _tensor_state(t: torch.Tensor | None):
    return None if t is None else (id(t), t._version, t.data_ptr(), tuple(t.shape), t.dtype, t.device)


def _is_peft_lora(m) -> bool:
    return (type(m).__module__.startswith("peft.") and hasattr(m, "lora_A") and hasattr(m, "lora_B")
            and hasattr(m, "get_base_layer"))


def _plain_linear(m) -> bool:
    return type(m) is torch.nn.Linear and not m._forward_hooks and not m._forward_pre_hooks


def _lora_ineligible(m) -> str | None:
    """Why peft LoRA layer ``m`` cannot be quantized as an effective weight (None: it can)."""
    base = m.get_base_layer()
    if not _plain_linear(base):
        return f"its base layer is a {type(base).__name__}, not a plain Linear"
    if m._forward_hooks or m._forward_pre_hooks:
        return "it has forward hooks"
    if bool(getattr(m, "merged", False)) and bool(getattr(m, "disable_adapters", False)):
        return "a merged adapter is disabled (peft unmerges it at the next call)"
    for a in _active(m):
        if getattr(m, "use_dora", {}).get(a, False):
            return f"adapter {a!r} is DoRA"
        if getattr(m, "lora_bias", {}).get(a, False):
            return f"adapter {a!r} has a LoRA bias"
        if getattr(m, "lora_variant", {}).get(a) is not None:
            return f"adapter {a!r} is a LoRA variant"
    return None


def _active(m) -> list[str]:
    if bool(getattr(m, "disable_adapters", False)) or bool(getattr(m, "merged", False)):
        return []
    return [a for a in m.active_adapters if a in m.lora_A]


def _eligible(m) -> bool:
    """Whether ``m`` (a Linear or a peft LoRA layer on one) is replaced by an :class:`Fp8Linear` in a shadow."""
    if _plain_linear(m):
        base = m
    elif _is_peft_lora(m) and _lora_ineligible(m) is None:
        base = m.get_base_layer()
    else:
        return False
    return (base.in_features % _ALIGN == 0 and base.out_features % _ALIGN == 0
            and base.weight.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _source_state(m) -> tuple:
    """Everything the effective weight of ``m`` depends on (equal states: the quantized copy is current)."""
    if not _is_peft_lora(m):
        return (_tensor_state(m.weight), _tensor_state(m.bias))
    base = m.get_base_layer()
    adapters = tuple((a, float(m.scaling[a]), _tensor_state(m.lora_A[a].weight), _tensor_state(m.lora_B[a].weight))
                     for a in _active(m))
    return (_tensor_state(base.weight), _tensor_state(base.bias), adapters)


def effective_weight(m) -> torch.Tensor:
    """The weight ``(N, K)`` in float32 that ``m`` applies: a Linear's own, or a peft LoRA layer's base weight plus
    ``scale_a * B_a @ A_a`` for each active adapter (peft's ``get_delta_weight``)."""
    if not _is_peft_lora(m):
        return m.weight.detach().float()
    w = m.get_base_layer().weight.detach().float()
    for a in _active(m):
        w = w + m.get_delta_weight(a).detach().float()
    return w


class Fp8Linear(torch.nn.Module):
    """ralu's fp8 copy of one Linear layer (or of a peft LoRA layer's effective weight): ``y = x W^T + b`` with
    ``W`` in e4m3 per output row and the activation quantized per token at each call. ``x (..., in)`` in the model's
    dtype -> ``(..., out)`` in the same dtype. ``bias``: the source layer's own bias tensor (shared, not copied)."""

    def __init__(self, source: torch.nn.Module, kernel: str):
        super().__init__()
        base = source.get_base_layer() if _is_peft_lora(source) else source
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kernel = kernel
        self.source_ref = weakref.ref(source)
        self.state = None
        self.register_buffer("weight_fp8", None)
        self.register_buffer("weight_scale", None)
        self.ao = None
        self.bias = base.bias  # the user's tensor: live, never written
        self.sync()

    def sync(self) -> bool:
        """Re-quantize from the source layer when its effective weight changed. Returns True when a tensor a
        captured CUDA graph may read was replaced (not overwritten in place)."""
        source = self.source_ref()
        if source is None:
            return False
        state = _source_state(source)
        if state == self.state:
            return False
        base = source.get_base_layer() if _is_peft_lora(source) else source
        replaced = self.bias is not base.bias
        self.bias = base.bias
        with torch.no_grad():
            w = effective_weight(source)
            if self.kernel == "torchao":
                replaced = True  # a new torchao tensor each time
                self.ao = self._torchao_linear(w.to(base.weight.dtype))
            else:
                q, scale = quantize_rows(w)
                scale = scale.reshape(1, -1).contiguous()
                if self.weight_fp8 is not None and self.weight_fp8.shape == q.shape and \
                        self.weight_fp8.device == q.device:
                    self.weight_fp8.copy_(q)  # same storage: captured CUDA graphs stay valid
                    self.weight_scale.copy_(scale)
                else:
                    replaced = replaced or self.weight_fp8 is not None
                    self.weight_fp8, self.weight_scale = q, scale
        self.state = state
        return replaced

    @staticmethod
    def _torchao_linear(w: torch.Tensor) -> torch.nn.Module:
        from torchao.quantization import quantize_

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        lin.requires_grad_(False)
        quantize_(lin, torchao_config())
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "torchao":
            y = self.ao(x)
        else:
            y = fp8_matmul(x, self.weight_fp8, self.weight_scale, self.kernel)
        if self.bias is not None:
            y = y + self.bias
        return y

    def nbytes(self) -> int:
        if self.kernel == "torchao":
            return sum(t.numel() * t.element_size() for t in (self.ao.weight.qdata, self.ao.weight.scale)) \
                if hasattr(self.ao.weight, "qdata") else 0
        return self.weight_fp8.numel() + self.weight_scale.numel() * 4

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


# ------------------------------------------------------------------------------------------------ block shadows
def _fp8_state(m: torch.nn.Module):
    """What of a module decides its fp8 shadow: whether a Linear / LoRA layer is quantized."""
    return _eligible(m) if isinstance(m, torch.nn.Linear) or _is_peft_lora(m) else None


class _Entry:
    def __init__(self, block, kernel):
        self.block_ref = weakref.ref(block)
        self.structure = tree_structure(block, _fp8_state)
        self.layers: list[Fp8Linear] = []

        def replace(m):
            if (isinstance(m, torch.nn.Linear) or _is_peft_lora(m)) and _eligible(m):
                f = Fp8Linear(m, kernel)
                self.layers.append(f)
                return f
            return m if _is_peft_lora(m) else None  # a LoRA layer fp8 cannot take: the user's (high precision)

        self.shadow = shadow_tree(block, replace)


class Fp8Shadows(BlockShadows):
    """ralu's fp8 shadows of the user's blocks (see the module docstring), keyed by block object, built and quantized
    on first use; ``kernel``: a resolved kernel name (:func:`resolve_kernel`)."""

    def __init__(self, kernel: str):
        if kernel not in ("torchao", "scaled_mm", "emulated"):
            raise ValueError(f"kernel={kernel!r}: give a resolved kernel (torchao, scaled_mm or emulated)")
        super().__init__()
        self.kernel = kernel

    def _entry(self, block) -> _Entry:
        return _Entry(block, self.kernel)

    def refresh(self) -> bool:
        """Bring every shadow up to date with the live model (once per ``generate`` call): a block whose module
        tree changed (a LoRA layer injected, a layer replaced, a hook added) gets a new shadow; a layer whose
        effective weight changed is re-quantized in place. Returns True when a tensor that a captured CUDA graph
        may read was replaced (the caller drops its graphs)."""
        replaced = False
        for entry in self._rebuild_changed(_fp8_state):
            if entry is None:
                replaced = True
                continue
            for layer in entry.layers:
                replaced |= layer.sync()
        return replaced

    def layers(self) -> list[Fp8Linear]:
        return [f for e in self._entries.values() for f in e.layers]

    def source_tensors(self) -> list[torch.Tensor]:
        """The user's tensors the quantized copies are made from (base weights, biases, active LoRA A / B)."""
        out = []
        for f in self.layers():
            m = f.source_ref()
            if m is None:
                continue
            base = m.get_base_layer() if _is_peft_lora(m) else m
            out += [t for t in (base.weight, base.bias) if t is not None]
            if _is_peft_lora(m):
                out += [w for a in _active(m) for w in (m.lora_A[a].weight, m.lora_B[a].weight)]
        return out

    def invalidate(self) -> None:
        """Make the next :meth:`refresh` re-quantize every layer (into the same storage): their sources changed
        in a way their version counters do not show (a write through ``.data``, as peft's fuse_lora and hot-swap do)."""
        for f in self.layers():
            f.state = None

    def nbytes(self) -> int:
        """Bytes of ralu's quantized copies (weights and scales)."""
        return sum(f.nbytes() for f in self.layers())


__all__ = ["E4M3", "E4M3_MAX", "FP8_KERNELS", "Fp8Linear", "Fp8Shadows", "check_fp8_device", "cpu_scaled_mm_available",
           "dequantize_rows", "effective_weight", "fp8_matmul", "fp8_support", "quantize_rows", "resolve_kernel",
           "torchao_config"]
