"""Per-stage compilation of the model call: ``backend="eager" | "inductor" | "onnx" | "tensorrt"``.

The sampler calls the model once per step. :func:`compile_adapter` installs a :class:`StageRunner` on the
pipeline's adapter (ralu's own object; the pipeline is not modified), which ``generate`` then calls instead
of the plain model call. Within one RALU stage every call has the same shapes, so each stage is built once
and replayed. One backend per module:

``eager`` (:mod:`.runner`)
    The plain PyTorch model, with ralu-owned fused q/k/v weights on CUDA (:mod:`ralu_runtime.adapters.fused`)
    and the SDPA backend choice (:mod:`.sdpa`).
``inductor`` (:mod:`.impl`)
    Regional compilation of ralu's block functions (one ``torch.compile`` per block kind, the block module an
    argument), so a cold compile traces one block of each kind instead of 57. The token and batch dimensions
    are symbolic (``dynamic=True``, duck sizing off): a new resolution, RALU ratio or stage token count reuses
    the same kernels. On CUDA each stage's whole model call is then captured as one CUDA graph per input
    signature and replayed (:mod:`.cuda_graphs`), and the VAE decode is compiled.
``onnx`` (:mod:`.onnx`)
    ``torch.onnx.export`` of the model call per input signature, run by onnxruntime; re-exported when a weight
    changes (the graph holds the weights as constants).
``tensorrt`` (:mod:`.tensorrt`)
    ``torch_tensorrt`` when importable; else TensorRT built from the ONNX graph, or onnxruntime's TensorRT
    execution provider; neither present: an ImportError naming what to install.

Validity: before every ``generate`` call the runner compares the model's layers and tensors with those it
built from (:func:`model_fingerprint`) and drops what is stale (CUDA graphs after a LoRA load or a replaced
tensor; exported graphs after any weight change); fused weights are refreshed from the live ones.

Concurrency: calls may come from several threads; CUDA-graph instances are never shared by concurrent calls,
installs are serialised, and process-wide torch switches (SDPA) are held for the time of the calls that need them
(:mod:`.scoped`).

Packed calls (the serving engine's batched step, many requests in one model call): :meth:`StageRunner.packed`
runs the adapter's packed call through the backend -- inductor: packed block functions compiled with a symbolic
packed token dimension (a new mix of requests does not recompile); CUDA graphs: one capture per bucket of padded
sizes (:class:`PackedBuckets`), the padding an attention segment of its own; onnx / tensorrt: one call per request.
See :mod:`.packed`.

Precision (``precision="fp8"``, eager and inductor): the blocks' Linear layers run in fp8 (e4m3, per-row weight
scales, per-token activation scales) on ralu's own quantized copies, refreshed when the model changes (a LoRA
loaded later included): :mod:`.fp8`. Attention backend measured per device and shape (``attn_backend="measure"``)
and its report (:func:`attention_report`, :func:`measure_attention_backends`, ``StageRunner.attention_choices``):
:mod:`.sdpa`.

Cross-process reuse (cold start) and why those files are code: :mod:`.artifacts`.

LoRA hot-swap: call ``pipe.enable_lora_hotswap(target_rank=R)`` before the first ``load_lora_weights`` and
compile afterwards; later ``load_lora_weights(..., hotswap=True, adapter_name=<same>)`` copies the new weights
into the model's LoRA tensors in place: no recompile (checked by ``tests/test_compile.py``). Warm-up ahead of
traffic: :func:`ralu_runtime.warmup.warmup`.
"""
from .artifacts import (ArtifactError, enable_persistent_cache, load_compile_artifacts, save_compile_artifacts,
                        verify_compile_artifacts)
from .fp8 import Fp8Linear, Fp8Shadows, check_fp8_device, fp8_support
from .options import ATTN_BACKENDS, BACKENDS, FP8_KERNELS, PRECISIONS, BuildRecord, CompileOptions
from .packed import PackedBuckets
from .runner import (StageRunner, available_backends, compile_adapter, compile_stats, ensure_backend,
                     model_fingerprint, model_state, uncompile_adapter)
from .sdpa import attention_report, measure_attention_backends, sdpa_context

__all__ = ["ATTN_BACKENDS", "ArtifactError", "BACKENDS", "BuildRecord", "CompileOptions", "FP8_KERNELS", "Fp8Linear",
           "Fp8Shadows", "PRECISIONS", "PackedBuckets", "StageRunner",
           "attention_report", "available_backends", "check_fp8_device", "compile_adapter", "compile_stats",
           "enable_persistent_cache", "ensure_backend", "fp8_support", "load_compile_artifacts",
           "measure_attention_backends", "model_fingerprint", "model_state", "save_compile_artifacts", "sdpa_context",
           "uncompile_adapter", "verify_compile_artifacts"]
