"""``precision="fp8"``: fp8 (e4m3) linears on ralu's own weight copies (tiny random FLUX pipelines, CPU).

The CPU runs the same quantization code as the GPU: torch 2.13's CPU ``torch._scaled_mm`` (row-wise scales) where it
exists, and the fp32 emulation of the same quantize / dequantize (the reference both are checked against).

Measured here (torch 2.13 CPU; the bounds asserted are stated next to each test):
* round trip: every element within max(2^-4 |x|, 2^-10 * row scale) (e4m3's half step); Gaussian rows 2.6 % relative
  (Frobenius; bound 3.5 %);
* one fp8 linear (256 -> 384, Gaussian inputs and weights) against fp32: 3.7 % relative (bound 5 %); the CPU
  ``_scaled_mm`` and the emulation agree within 2e-7 relative (bound 1e-6);
* per model call of a tiny FLUX (RALU 2/2/2 steps, 6 calls): velocity relative error 0.40-0.58 % per call against the
  model's own fp32, 0.58-0.83 % against its own bf16 (bound 2 %); final latents 0.27 % (fp32) / 0.48 % (bf16)
  (bound 2 %).
"""
from __future__ import annotations

import types

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.compile import CompileOptions, compile_adapter, compile_stats, ensure_backend, uncompile_adapter
from ralu_runtime.compile.fp8 import (E4M3, E4M3_MAX, Fp8Linear, Fp8Shadows, check_fp8_device,
                                      cpu_scaled_mm_available, dequantize_rows, fp8_matmul, fp8_support,
                                      quantize_rows, resolve_kernel)
from ralu_runtime.compile.runner import StageRunner
from ralu_runtime.tiny import build_tiny_flux_pipeline
from helpers import assert_same, snapshot
from tiny_inputs import flux_embeds, lora_state_dict

SCHED = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
FP8 = {"precision": "fp8"}
KERNELS = ["emulated"] + (["scaled_mm"] if cpu_scaled_mm_available() else [])


def _ralu(pipe, emb, seed=3, **kw):
    return generate(pipe, **emb, height=64, width=96, speedup=SCHED, seed=seed, output_type="latent", progress=False,
                    **kw).images


def _plain(pipe, emb, seed=4):
    return pipe(**emb, height=64, width=96, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ------------------------------------------------------------------------------------------------ arithmetic
def test_quantize_round_trip_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[1] *= 1e-4                        # a small row: its own scale, same relative precision
    x[2, :128] *= 1e-6                  # one row with a wide dynamic range: tiny entries go subnormal
    x[3] = 0                            # an all-zero row
    q, scale = quantize_rows(x)
    assert q.dtype == E4M3 and q.shape == x.shape and scale.shape == (64, 1) and scale.dtype == torch.float32
    back = dequantize_rows(q, scale)
    # e4m3: 3 mantissa bits -> half a step is 2^-4 of the value for normal numbers; below 2^-6 (subnormal) the step
    # is 2^-9 in units of the row scale
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)
    assert bool(((back - x).abs() <= bound).all())
    assert torch.equal(back[3], torch.zeros(256))
    # each row's largest magnitude maps to +-448 exactly and comes back exactly
    idx = x.abs().argmax(dim=1)
    rows = torch.arange(64)
    assert torch.allclose(q.float()[rows, idx].abs()[x.abs().amax(1) > 0], torch.tensor(E4M3_MAX))
    err = _rel(back[4:], x[4:])
    assert 0.01 < err < 0.035, err       # Gaussian rows: 2.6 %


@pytest.mark.parametrize("kernel", KERNELS)
@torch.no_grad()
def test_fp8_linear_against_fp32_reference(kernel):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(256, 384)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 256, generator=g) / 16)
        lin.bias.copy_(torch.randn(384, generator=g))
    x = torch.randn(4, 37, 256, generator=g)
    ref = lin(x)
    f = Fp8Linear(lin, kernel)
    y = f(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = _rel(y - lin.bias, ref - lin.bias)  # the product alone (the bias is exact)
    assert err < 0.05, err               # 3.7 %
    # the two CPU kernels compute the same numbers
    if kernel == "scaled_mm":
        emu = Fp8Linear(lin, "emulated")(x)
        assert _rel(y, emu) < 1e-6
    # a bfloat16 layer: bfloat16 out, same error class
    lin_b = torch.nn.Linear(256, 384, dtype=torch.bfloat16)
    lin_b.load_state_dict(lin.state_dict())
    yb = Fp8Linear(lin_b, kernel)(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and _rel(yb - lin_b.bias, ref - lin.bias) < 0.06


def test_fp8_matmul_shapes_and_kernels():
    w = torch.randn(48, 32)
    wq, ws = quantize_rows(w)
    ws = ws.reshape(1, -1)
    x = torch.randn(2, 3, 5, 32)
    for kernel in KERNELS:
        out = fp8_matmul(x, wq, ws, kernel)
        assert out.shape == (2, 3, 5, 48)
    assert resolve_kernel("auto", "cpu") in ("scaled_mm", "emulated")
    with pytest.raises(ValueError, match="fp8_kernel='nope' is not allowed"):
        resolve_kernel("nope", "cpu")


def test_only_aligned_hookless_linears_are_replaced():
    blk = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 30), torch.nn.Linear(30, 32),
                              torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 32)))
    blk[3][1].register_forward_hook(lambda m, a, o: None)
    shadows = Fp8Shadows("emulated")
    sh = shadows.shadow(blk)
    assert type(sh[0]) is Fp8Linear                 # 32 -> 48: replaced
    assert sh[1] is blk[1] and sh[2] is blk[2]     # 30 in or out: not a multiple of 16, kept
    assert sh[3] is blk[3]                          # a hooked Linear is kept (its hook runs), so its parent too
    assert sh is not blk and type(sh) is type(blk)
    assert [type(m) for m in blk] == [torch.nn.Linear] * 3 + [torch.nn.Sequential]  # the user's block as it was


# ------------------------------------------------------------------------------------------------ devices
def test_refused_on_a_gpu_without_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ok, why = fp8_support("cuda")
    assert not ok and "NVIDIA A100-SXM4-80GB" in why and "8.0" in why and ">= 8.9" in why
    with pytest.raises(RuntimeError, match=r"A100.*compute capability 8\.0"):
        check_fp8_device("cuda:0")
    # the runner refuses at installation, before anything of the model runs (the fake model has no velocity)
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, fuses_projections=True,
                                 pipe=None)
    with pytest.raises(RuntimeError, match=r"A100.*8\.0"):
        StageRunner(fake, CompileOptions(backend="eager", precision="fp8"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H200")
    assert fp8_support("cuda:0")[0]
    assert not fp8_support("meta")[0]


def test_option_values_checked():
    with pytest.raises(ValueError, match="precision='fp4' is not allowed"):
        CompileOptions(precision="fp4")
    with pytest.raises(ValueError, match="precision='fp8' runs with backend='eager' or 'inductor'"):
        CompileOptions(backend="onnx", precision="fp8")
    with pytest.raises(ValueError, match="fp8_kernel"):
        CompileOptions(fp8_kernel="cublas")
    # a kernel without precision='fp8' would be silently ignored (the model ran in its own dtype): refused
    with pytest.raises(ValueError, match=r"fp8_kernel='emulated' applies with precision='fp8' only.*'auto'"):
        CompileOptions(fp8_kernel="emulated")
    CompileOptions(precision="fp8", fp8_kernel="emulated")
    pipe = build_tiny_flux_pipeline(seed=0)
    with pytest.raises(ValueError, match="precision='bf16' but the model is torch.float32"):
        ensure_backend(pipe, "eager", precision="bf16")
    ensure_backend(pipe, "eager", precision="fp32")  # the model's own dtype: allowed
    assert get_adapter(pipe).runner.applied["precision"] == "float32"
    with pytest.raises(ValueError, match="torchao"):
        ensure_backend(pipe, "eager", precision="fp8", fp8_kernel="torchao")  # CUDA only (or not installed)


def test_prepare_refuses_a_precision_the_model_cannot_run_before_any_work():
    """``prepare`` (and so ``generate``) checks precision against the model's dtype and device up front: no backend
    is installed and the model is not called."""
    from ralu_runtime import prepare

    pipe = build_tiny_flux_pipeline(seed=0)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    emb = flux_embeds(1)
    with pytest.raises(ValueError, match="precision='fp16' but the model is torch.float32"):
        prepare(pipe, **emb, height=64, width=64, precision="fp16", progress=False)
    with pytest.raises(ValueError, match="fp8_kernel='torchao' runs on CUDA only"):
        prepare(pipe, **emb, height=64, width=64, precision="fp8", compile_options={"fp8_kernel": "torchao"})
    assert get_adapter(pipe).runner is None and calls == []
    prepare(pipe, **emb, height=64, width=64, precision="fp32")  # the model's own dtype


# ------------------------------------------------------------------------------------------------ whole model
def _record_calls(pipe, emb, **kw):
    """The model calls of one generate: ``[(tokens, grid, timestep, cond)]`` as the sampler made them."""
    from ralu_runtime import prepare, run

    calls = []

    def hook(adapter, velocity):
        def run(tokens, grid, timestep, cond):
            calls.append((tokens.clone(), grid, timestep, cond))
            return velocity(tokens, grid, timestep, cond)
        return run

    run(prepare(pipe, **emb, height=64, width=96, speedup=SCHED, seed=3, output_type="latent", progress=False, **kw),
        model_call=hook)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_generate_fp8_per_call_velocity_error(dtype):
    pipe = build_tiny_flux_pipeline(seed=0, dtype=dtype)
    emb = {k: v.to(dtype) for k, v in flux_embeds(1).items()}
    ref = _ralu(pipe, emb)
    out = _ralu(pipe, emb, backend="eager", compile_options=FP8)
    runner = get_adapter(pipe).runner
    assert runner.applied["precision"] == "fp8" and runner.report()["fp8_layers"] == 26  # 14 + 2 x 6 Linears
    assert _rel(out, ref) < 0.02, _rel(out, ref)         # final latents: 0.27 % (fp32), 0.48 % (bf16)
    adapter = get_adapter(pipe)
    calls = _record_calls(pipe, emb)
    assert len(calls) == 6
    errs = []
    for tokens, grid, t, cond in calls:
        v_ref = adapter.velocity(tokens, grid, t, cond)
        v_fp8 = adapter.velocity(tokens, grid, t, cond, impl=runner.impl)
        errs.append(_rel(v_fp8, v_ref))
    # fp32 model: 0.40-0.58 % per call; bf16 model: 0.58-0.83 % (bf16 rounding of the fp8 products on top)
    assert max(errs) < 0.02, errs
    assert min(errs) > 1e-4, errs                         # fp8 really ran
    uncompile_adapter(pipe)


@pytest.mark.parametrize("opts", [dict(backend="eager", compile_options=FP8),
                                  dict(backend="inductor", compile_options={**FP8, "dynamo_backend": "eager"})],
                         ids=["eager", "inductor-dynamo-eager"])
@torch.no_grad()
def test_user_model_left_as_found(opts):
    pipe = build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    before_plain = _plain(pipe, emb)
    before = snapshot(pipe)
    _ralu(pipe, emb, **opts)
    _ralu(pipe, emb)  # the installed runner again
    assert_same(before, snapshot(pipe))
    assert torch.equal(_plain(pipe, emb), before_plain), "plain pipe() changed after an fp8 generate"
    uncompile_adapter(pipe)
    assert_same(before, snapshot(pipe))


@torch.no_grad()
def test_lora_loaded_after_install_is_quantized_and_followed():
    pytest.importorskip("peft")
    pipe, fresh = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    first = _ralu(pipe, emb, backend="eager", compile_options=FP8)
    shadows = get_adapter(pipe).runner.impl.fp8
    n_layers = len(shadows.layers())
    for p in (pipe, fresh):
        p.load_lora_weights(lora_state_dict(p.transformer, 4, 7), adapter_name="style")
    lora = _ralu(pipe, emb)  # the same runner: shadows rebuilt for the LoRA layers
    assert (lora - first).abs().max() > 1e-3, "the LoRA did not reach the fp8 copies"
    assert len(shadows.layers()) == n_layers  # LoRA layers quantized too (their effective weight)
    assert any(type(f.source_ref()).__module__.startswith("peft.") for f in shadows.layers())
    # equal to a pipeline that had the LoRA before ralu ever saw it
    torch.testing.assert_close(lora, _ralu(fresh, emb, backend="eager", compile_options=FP8), atol=1e-6, rtol=1e-6)
    # and close to the same LoRA in the model's own fp32
    assert _rel(lora, _ralu(fresh, emb, backend="eager")) < 0.02
    # re-weighting the adapter (python-side state only) re-quantizes
    for p in (pipe, fresh):
        p.set_adapters(["style"], [0.4])
    reweighted = _ralu(pipe, emb)
    assert (reweighted - lora).abs().max() > 1e-3
    torch.testing.assert_close(reweighted, _ralu(fresh, emb, backend="eager", compile_options=FP8), atol=1e-6,
                               rtol=1e-6)
    # disabling the LoRA gives back the first result
    pipe.disable_lora()
    torch.testing.assert_close(_ralu(pipe, emb, backend="eager", compile_options=FP8), first, atol=1e-6, rtol=1e-6)



@torch.no_grad()
def test_a_forward_patched_for_a_failed_call_is_not_kept_after_it_is_removed():
    """A user's forward override on a module holding quantized layers (a block's norm1, patched to raise) lasts as
    long as the user keeps it: removed after the failed call, the next fp8 call runs the model's own forward, bitwise
    equal to a fresh pipeline's, and the pipeline is as found (was: the fp8 shadow had copied the override into its
    copy of norm1 and kept raising)."""
    pipe, fresh = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    before = snapshot(pipe, extra={"transformer": pipe.transformer})
    norm = pipe.transformer.transformer_blocks[0].norm1

    def broken(*args, **kwargs):
        raise RuntimeError("the user's layer failed")

    norm.forward = broken
    try:
        with pytest.raises(RuntimeError, match="the user's layer failed"):
            _ralu(pipe, emb, backend="eager", compile_options=FP8)
    finally:
        del norm.forward
    assert_same(before, snapshot(pipe, extra={"transformer": pipe.transformer}))
    assert torch.equal(_ralu(pipe, emb), _ralu(fresh, emb, backend="eager", compile_options=FP8))

@torch.no_grad()
def test_weight_changed_in_place_is_requantized_into_the_same_storage():
    pipe, ref_pipe = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    first = _ralu(pipe, emb, backend="eager", compile_options=FP8)
    shadows = get_adapter(pipe).runner.impl.fp8
    layer = next(f for f in shadows.layers() if f.source_ref() is pipe.transformer.transformer_blocks[0].attn.to_k)
    ptr = layer.weight_fp8.data_ptr()
    for p in (pipe, ref_pipe):
        p.transformer.transformer_blocks[0].attn.to_k.weight.mul_(0.5)
    second = _ralu(pipe, emb)
    assert (second - first).abs().max() > 1e-3
    assert layer.weight_fp8.data_ptr() == ptr  # overwritten in place: a captured CUDA graph stays valid
    torch.testing.assert_close(second, _ralu(ref_pipe, emb, backend="eager", compile_options=FP8), atol=1e-6,
                               rtol=1e-6)


@torch.no_grad()
def test_fullgraph_trace_of_fp8_blocks():
    """dynamo traces the block functions with the fp8 shadows as arguments in one graph each (fullgraph=True; the
    "eager" dynamo backend: no code generation), one graph per block kind for every block, and equals eager."""
    pipe = build_tiny_flux_pipeline(seed=0, num_layers=2, num_single_layers=2)
    emb = flux_embeds(1)
    eager = _ralu(pipe, emb, backend="eager", compile_options=FP8)
    before = compile_stats()["unique_graphs"]
    out = _ralu(pipe, emb, backend="inductor", compile_options={**FP8, "dynamo_backend": "eager"})
    graphs = compile_stats()["unique_graphs"] - before
    # at most one double-block and one single-block graph for all blocks and stages (dynamic=True); fewer when an
    # earlier test in this process compiled the same function for the same shapes (dynamo's cache is per function)
    assert graphs <= 2, graphs
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    before = compile_stats()["unique_graphs"]
    _ralu(pipe, emb)
    assert compile_stats()["unique_graphs"] == before  # no recompile on a second call


@pytest.mark.slow
@torch.no_grad()
def test_inductor_fp8_on_cpu():
    """Real inductor code generation of the fp8 blocks (torch's CPU _scaled_mm, or the emulation): a cold compile of
    two block kinds, about 1-2 minutes on a 2-core CPU."""
    pipe = build_tiny_flux_pipeline(seed=0, num_layers=1, num_single_layers=1)
    emb = flux_embeds(1)
    kw = dict(height=64, width=64, speedup=None, num_inference_steps=2, seed=1, output_type="latent", progress=False)
    eager = generate(pipe, **emb, **kw, backend="eager", compile_options=FP8).images
    runner = compile_adapter(pipe, "inductor", precision="fp8")
    out = generate(pipe, **emb, **kw).images
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    before = compile_stats()["unique_graphs"]
    generate(pipe, **emb, **kw)
    assert compile_stats()["unique_graphs"] == before
    assert runner.impl.compiled_blocks == ["flux_double", "flux_single"]


# ------------------------------------------------------------------------------------------------ GPU (gpu_suite)
def _need_fp8_gpu():
    ok, why = fp8_support("cuda")
    if not ok:
        pytest.skip(why)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_scaled_mm_matches_the_emulation():
    """torch._scaled_mm with row-wise scales (bfloat16 out) computes what the fp32 emulation computes, M = 1 included
    (the AdaLN modulation of one image); the refusal rule agrees with the device."""
    cap = torch.cuda.get_device_capability()
    assert fp8_support("cuda")[0] == (tuple(cap) >= (8, 9))
    _need_fp8_gpu()
    g = torch.Generator("cuda").manual_seed(0)
    lin = torch.nn.Linear(256, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3, 77, 256, device="cuda", generator=g).bfloat16()
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    for rows in (x, x[0, :1]):
        y = Fp8Linear(lin, "scaled_mm")(rows)
        e = Fp8Linear(lin, "emulated")(rows)
        assert y.dtype == torch.bfloat16 and y.shape == e.shape
        assert _rel(y, e) < 1e-2  # the bfloat16 output rounding
    assert _rel(Fp8Linear(lin, "scaled_mm")(x), ref) < 0.06


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_compiled_fp8_under_cuda_graphs_follows_weight_changes_and_lora():
    """inductor + CUDA graphs with fp8 shadows: close to eager fp8, replayed without recaptures, an in-place weight
    change reaches the captured graph (re-quantized into the same storage), a LoRA loaded later is followed."""
    _need_fp8_gpu()
    pipe = build_tiny_flux_pipeline(seed=0, device="cuda", dtype=torch.bfloat16)
    emb = {k: v.to("cuda", torch.bfloat16) for k, v in flux_embeds(1).items()}
    eager = _ralu(pipe, emb, backend="eager", compile_options=FP8)
    runner = compile_adapter(pipe, "inductor", precision="fp8")
    assert runner.cuda_graphs and runner.fp8_kernel in ("scaled_mm", "torchao")
    out = _ralu(pipe, emb)
    assert _rel(out, eager) < 0.03, _rel(out, eager)
    builds = len(runner.builds)
    torch.testing.assert_close(_ralu(pipe, emb), out)
    assert len(runner.builds) == builds  # replayed
    pipe.transformer.transformer_blocks[0].attn.to_k.weight.mul_(0.5)
    changed = _ralu(pipe, emb)
    assert (changed - out).abs().max() > 1e-3
    if runner.fp8_kernel == "scaled_mm":
        assert len(runner.builds) == builds  # same storage: the captured graphs still hold
    ref = build_tiny_flux_pipeline(seed=0, device="cuda", dtype=torch.bfloat16)
    ref.transformer.transformer_blocks[0].attn.to_k.weight.mul_(0.5)
    assert _rel(changed, _ralu(ref, emb, backend="eager", compile_options=FP8)) < 0.03
    pytest.importorskip("peft")
    pipe.load_lora_weights(lora_state_dict(pipe.transformer, 4, 7), adapter_name="style")
    lora = _ralu(pipe, emb)
    assert (lora - changed).abs().max() > 1e-3
    assert len(runner.builds) > builds  # the model's layers changed: graphs captured anew


def test_fp8_kernel_without_fp8_precision_is_refused_before_any_work():
    """``compile_options={"fp8_kernel": ...}`` without ``precision="fp8"`` used to run the model in its own dtype,
    the kernel ignored; ``generate`` now refuses it up front, naming the value."""
    pipe = build_tiny_flux_pipeline(seed=0)
    with pytest.raises(ValueError, match=r"fp8_kernel='emulated' applies with precision='fp8' only"):
        generate(pipe, **flux_embeds(1), height=64, width=64, speedup=None, num_inference_steps=1,
                 output_type="latent", progress=False, backend="eager", compile_options={"fp8_kernel": "emulated"})
    assert get_adapter(pipe).runner is None


def test_precision_without_backend_keeps_the_installed_backend():
    """``precision=`` without ``backend=`` re-dresses the runner the user installed (its backend and options, the
    precision asked for) instead of replacing a compiled runner by an eager one; with none installed it is eager.
    The installed fp8 kernel and fused q/k/v belong to the old precision and are reset."""
    from ralu_runtime import prepare

    pipe = build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    kw = dict(height=64, width=64, progress=False)
    assert prepare(pipe, **emb, **kw, precision="fp8").compile.backend == "eager"  # nothing installed
    installed = compile_adapter(pipe, "inductor", dynamo_backend="eager", fused_qkv=True, compile_vae=False)
    same = prepare(pipe, **emb, **kw, precision="auto").compile
    assert same.key() == installed.options.key()  # the installed runner is kept as it is
    fp8 = prepare(pipe, **emb, **kw, precision="fp8", compile_options={"fp8_kernel": "emulated"}).compile
    assert (fp8.backend, fp8.dynamo_backend, fp8.compile_vae, fp8.precision, fp8.fp8_kernel, fp8.fused_qkv) == (
        "inductor", "eager", False, "fp8", "emulated", None)
    out = generate(pipe, **emb, **kw, speedup=SCHED, seed=3, output_type="latent", precision="fp8",
                   compile_options={"fp8_kernel": "emulated"})
    runner = get_adapter(pipe).runner
    assert runner is not installed and runner.options.backend == "inductor" and runner.applied["compiled_blocks"]
    assert runner.applied["precision"] == "fp8" and torch.isfinite(out.images).all()
    back = prepare(pipe, **emb, **kw, precision="fp32").compile  # from fp8 back: its fp8_kernel is dropped
    assert (back.backend, back.precision, back.fp8_kernel) == ("inductor", "fp32", "auto")
    uncompile_adapter(pipe)
