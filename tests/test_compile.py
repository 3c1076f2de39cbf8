"""Per-stage compilation backends (ralu_runtime.compile) on tiny random pipelines, CPU.

Tolerances (float32 tiny models): inductor vs eager and onnxruntime vs eager agree to atol = rtol = 1e-4
on latents (measured: ~5e-7). Recompile guarantee (dynamic=True, duck sizing off): the FLUX blocks compile
to 3 graphs (double block; single block fed a contiguous input; single block fed a strided one) and any
further token count / resolution / RALU stage reuses them (0 recompiles); the first batch > 1 after
batch 1 adds one graph per kind (size-1 dimensions are specialised), after which no batch size recompiles.
"""
import importlib.util
import re
import threading

import pytest
import torch

from ralu_runtime import generate
from ralu_runtime.adapters import TokenGrid, get_adapter
from ralu_runtime.compile import (BACKENDS, CompileOptions, StageRunner, compile_adapter, compile_stats, ensure_backend,
                                  save_compile_artifacts, uncompile_adapter)
from ralu_runtime.compile.options import make_options
from ralu_runtime.warmup import warmup
from ralu_runtime.layout import grid_positions
from tiny_inputs import flux_embeds, lora_state_dict, sd3_embeds

TOL = dict(atol=1e-4, rtol=1e-4)
HAVE_TRANSITION = importlib.util.find_spec("ralu_kernels.transition") is not None


BASE = dict(speedup=None, num_inference_steps=2, seed=1, output_type="latent", progress=False)


def _fresh_flux():
    from ralu_runtime.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(seed=0)


def _mixed_grid(adapter, b, coarse_hw, n_fine_parents):
    """A stage-2-like token set: coarse tokens plus 4 children for the first parents, fractional positions."""
    coarse = grid_positions(*coarse_hw)
    kids = [coarse[i] + torch.tensor(d) for i in range(n_fine_parents) for d in ((0, 0), (0, .5), (.5, 0), (.5, .5))]
    pos = torch.cat([coarse[n_fine_parents:], torch.stack(kids)]) if kids else coarse
    mask = torch.zeros(pos.shape[0], dtype=torch.bool)
    mask[coarse.shape[0] - n_fine_parents:] = True
    return TokenGrid(pos.expand(b, -1, -1).contiguous(), coarse_hw, mask.expand(b, -1).contiguous())


def _cond(adapter, emb):
    return adapter.encode_prompt(None, None, **emb, guidance_scale=3.5)


@pytest.fixture(scope="module")
def inductor_flux():
    """A tiny FLUX pipeline with the inductor backend (one cold CPU compile, ~1 min on 2 cores), and eager refs."""
    pipe = _fresh_flux()
    emb = flux_embeds(1)
    refs = {hw: generate(pipe, **emb, height=hw[0], width=hw[1], **BASE).images for hw in ((64, 64), (96, 128))}
    runner = compile_adapter(pipe, "inductor")
    yield pipe, emb, refs, runner
    uncompile_adapter(pipe)


@pytest.mark.slow
@torch.no_grad()
def test_inductor_matches_eager_and_new_token_counts_do_not_recompile(inductor_flux):
    pipe, emb, refs, runner = inductor_flux
    adapter = get_adapter(pipe)
    assert isinstance(adapter.runner, StageRunner)
    out = generate(pipe, **emb, height=64, width=64, backend="inductor", **BASE).images
    torch.testing.assert_close(out, refs[(64, 64)], **TOL)
    graphs = compile_stats()["unique_graphs"]
    # another resolution: new token count, no recompile
    out = generate(pipe, **emb, height=96, width=128, backend="inductor", **BASE).images
    torch.testing.assert_close(out, refs[(96, 128)], **TOL)
    # stage-2-like mixed token sets of several sizes (coarse 4x4 grid; 16 + 3k tokens), against eager
    cond = _cond(adapter, emb)
    for k in (1, 3, 5):
        grid = _mixed_grid(adapter, 1, (4, 4), k)
        x = torch.randn(1, grid.positions.shape[1], adapter.token_channels, generator=torch.Generator().manual_seed(k))
        t = torch.tensor(700.0)
        torch.testing.assert_close(adapter.runner(x, grid, t, cond), adapter.velocity(x, grid, t, cond), **TOL)
    assert compile_stats()["unique_graphs"] == graphs, "a new token count recompiled"


@pytest.mark.skipif(not HAVE_TRANSITION, reason="ralu_kernels.transition not available yet")
@torch.no_grad()
def test_inductor_ralu_matches_eager(inductor_flux):
    from ralu_runtime import RaluSchedule

    pipe, emb, _refs, _runner = inductor_flux
    sched = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
    kw = dict(height=96, width=128, speedup=sched, seed=3, output_type="latent", return_masks=True, progress=False,
              transition_impl="torch")
    for h, w in ((64, 64), (96, 128)):  # warm-up: the first compile, then the dynamic one any new token count makes
        generate(pipe, **emb, height=h, width=w, backend="inductor", **BASE)
    graphs = compile_stats()["unique_graphs"]
    out = generate(pipe, **emb, backend="inductor", **kw)
    ref = generate(pipe, **emb, backend="eager", **kw)
    ensure_backend(pipe, "inductor")
    assert torch.equal(out.masks, ref.masks)
    torch.testing.assert_close(out.images, ref.images, **TOL)
    assert compile_stats()["unique_graphs"] == graphs, "RALU's stage token counts recompiled"


@pytest.mark.slow
@torch.no_grad()
def test_inductor_with_fused_qkv_matches_eager():
    """The CUDA default (ralu-owned fused q/k/v weights passed into the compiled block functions), compiled by
    inductor on the CPU: same latents as eager, for the baseline and for RALU's mixed stage-2 token sets."""
    from ralu_runtime import RaluSchedule

    pipe = _fresh_flux()
    emb = flux_embeds(1)
    sched = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
    kw = dict(height=64, width=96, seed=2, output_type="latent", progress=False, transition_impl="torch")
    runs = ((None, 3), (sched, None))  # (speedup, baseline steps)
    refs = [generate(pipe, **emb, speedup=s, num_inference_steps=n, **kw).images for s, n in runs]
    opts = {"fused_qkv": True}
    outs = [generate(pipe, **emb, speedup=s, num_inference_steps=n, backend="inductor", compile_options=opts,
                     **kw).images for s, n in runs]
    runner = get_adapter(pipe).runner
    assert runner.applied["fused_qkv"] and runner.impl.fused_store.nbytes() > 0
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, **TOL)
    uncompile_adapter(pipe)


@pytest.mark.slow
@torch.no_grad()
def test_batch_size_change_recompiles_at_most_once(inductor_flux):
    pipe, emb, _refs, _runner = inductor_flux
    generate(pipe, **emb, height=64, width=64, backend="inductor", **BASE)
    g0 = compile_stats()["unique_graphs"]
    two = flux_embeds(2)
    generate(pipe, **two, height=64, width=64, backend="inductor", **BASE)
    g1 = compile_stats()["unique_graphs"]
    assert g1 - g0 <= 3  # one more graph per block kind: size-1 batch was specialised
    generate(pipe, **flux_embeds(3), height=96, width=64, backend="inductor", **BASE)
    assert compile_stats()["unique_graphs"] == g1


def test_cache_artifacts_can_be_saved(inductor_flux, tmp_path):
    n = save_compile_artifacts(tmp_path / "ralu.cache")
    assert n > 0 and (tmp_path / "ralu.cache").stat().st_size == n


@pytest.mark.parametrize("family", ["flux", "sd3"])
@torch.no_grad()
def test_onnx_matches_eager(family, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from ralu_runtime.tiny import build_tiny_sd3_pipeline

    runs = []
    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: runs.append(1) or real_run(self, *a, **k))
    pipe = _fresh_flux() if family == "flux" else build_tiny_sd3_pipeline(seed=0)
    emb = flux_embeds(1) if family == "flux" else sd3_embeds(1)
    kw = dict(BASE, guidance_scale=5.0) if family == "sd3" else BASE
    ref = generate(pipe, **emb, height=64, width=64, **kw).images
    out = generate(pipe, **emb, height=64, width=64, backend="onnx", **kw).images
    torch.testing.assert_close(out, ref, **TOL)
    assert len(runs) == BASE["num_inference_steps"], "a step did not run in onnxruntime (silent eager fallback?)"
    runner = get_adapter(pipe).runner
    assert [b.kind for b in runner.builds] == ["onnx"]  # one export for the one signature, replayed per step
    # a stage-2 mixed token set (per-token positions, fine mask) through its own exported graph
    adapter = get_adapter(pipe)
    cond = adapter.encode_prompt(None, None, **emb, guidance_scale=5.0 if family == "sd3" else 3.5)
    grid = _mixed_grid(adapter, 1, (2, 2), 1)
    x = torch.randn(1, grid.positions.shape[1], adapter.token_channels, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500.0)
    torch.testing.assert_close(adapter.runner(x, grid, t, cond), adapter.velocity(x, grid, t, cond), **TOL)
    assert len(runs) == BASE["num_inference_steps"] + 1
    uncompile_adapter(pipe)


def test_unavailable_tensorrt_names_what_to_install():
    pipe = _fresh_flux()
    have = any(importlib.util.find_spec(m) is not None for m in ("torch_tensorrt", "tensorrt"))
    if have:
        with pytest.raises(RuntimeError, match="CUDA"):
            compile_adapter(pipe, "tensorrt")
        return
    with pytest.raises(ImportError, match=r"torch-tensorrt.*tensorrt"):
        generate(pipe, **flux_embeds(1), height=64, width=64, backend="tensorrt", **BASE)


def test_unknown_backend_and_cpu_cuda_graphs_are_rejected():
    pipe = _fresh_flux()
    with pytest.raises(ValueError, match=r"backend='xla'.*eager"):
        generate(pipe, **flux_embeds(1), height=64, width=64, backend="xla", **BASE)
    with pytest.raises(ValueError, match="CUDA"):
        compile_adapter(pipe, "inductor", cuda_graphs=True)
    assert set(BACKENDS) == {"eager", "inductor", "onnx", "tensorrt"}


def _lora_hotswap(dynamo_backend):
    pytest.importorskip("peft")
    pipe = _fresh_flux()
    emb = flux_embeds(1)
    kw = dict(BASE, height=64, width=64)
    base = generate(pipe, **emb, **kw).images
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(lora_state_dict(pipe.transformer, 4, 1), adapter_name="style")
    compile_adapter(pipe, "inductor", dynamo_backend=dynamo_backend)
    a = generate(pipe, **emb, **kw).images
    assert (a - base).abs().max() > 1e-3  # the LoRA is active
    graphs = compile_stats()["unique_graphs"]
    pipe.load_lora_weights(lora_state_dict(pipe.transformer, 8, 2), adapter_name="style", hotswap=True)
    b = generate(pipe, **emb, **kw).images
    assert compile_stats()["unique_graphs"] == graphs, "LoRA hot-swap recompiled"
    assert (b - a).abs().max() > 1e-3  # the new LoRA is active
    uncompile_adapter(pipe)
    torch.testing.assert_close(b, generate(pipe, **emb, **kw).images, **TOL)


@torch.no_grad()
def test_lora_hotswap_does_not_recompile():
    """Recompiles are decided by dynamo's guards, so dynamo with its eager backend counts them quickly."""
    _lora_hotswap("eager")


@pytest.mark.slow
@torch.no_grad()
def test_lora_hotswap_does_not_recompile_inductor():
    _lora_hotswap(None)


@torch.no_grad()
def test_warmup_reports_compile_time_per_stage(monkeypatch):
    import ralu_runtime.heap as H

    # an earlier test may have compiled these block functions, and its freed modules' ids can come back with this
    # pipeline's (the guards would then match and nothing compile): compile them again here
    torch._dynamo.reset()
    pipe = _fresh_flux()
    settled = []
    real = H.settle_heap
    monkeypatch.setattr(H, "settle_heap", lambda *a, **k: settled.append(1) or real(*a, **k))
    rep = warmup(pipe, 64, 64, speedup=None, backend="inductor", text_len=8, num_inference_steps=2,
                 compile_options={"dynamo_backend": "eager"})
    assert rep["graphs_compiled"] >= 2 and "baseline" in rep["stages"]
    assert rep["stages"]["baseline"]["compile_s"] >= 0 and rep["first_s"] >= rep["stages"]["baseline"]["first_s"]
    # the warmed pipeline serves a request with no further compile
    g = compile_stats()["unique_graphs"]
    generate(pipe, **flux_embeds(1), height=64, width=64, **BASE)
    assert compile_stats()["unique_graphs"] == g
    # the garbage compiling left was collected once (by the compiling run), outside the requests
    assert settled == [1]


def test_settle_heap_collects_and_freezes_only_when_asked(monkeypatch):
    import ralu_runtime.heap as H

    calls = []
    monkeypatch.setattr(H.gc, "collect", lambda *a: calls.append("collect") or 0)
    monkeypatch.setattr(H.gc, "freeze", lambda: calls.append("freeze"))
    assert H.settle_heap() >= 0 and calls == ["collect"]
    assert H.settle_heap(freeze=True) >= 0 and calls == ["collect", "collect", "freeze"]


@torch.no_grad()
def test_a_call_that_compiles_ends_with_a_garbage_collection(monkeypatch):
    """generate collects once at the end of a call that compiled (not in its timings), not in calls that did not."""
    import ralu_runtime.heap as H

    torch._dynamo.reset()  # an earlier test may have compiled these block functions: compile them again here
    pipe = _fresh_flux()
    calls = []
    real = H.settle_heap
    monkeypatch.setattr(H, "settle_heap", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(**flux_embeds(1), height=64, width=64, **BASE)
    generate(pipe, **kw)  # eager: nothing built
    assert calls == []
    generate(pipe, **kw, backend="inductor", compile_options={"dynamo_backend": "eager"})  # compiles
    assert calls == [1]
    generate(pipe, **kw, backend="inductor", compile_options={"dynamo_backend": "eager"})  # warm: nothing new
    assert calls == [1]
    uncompile_adapter(pipe)


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_instances_are_not_shared_between_threads():
    pipe = _fresh_flux().to("cuda")
    compile_adapter(pipe, "eager", cuda_graphs=True)
    emb = {k: v.cuda() for k, v in flux_embeds(1).items()}
    ref = generate(pipe, **emb, height=64, width=64, **BASE).images
    outs, errors = [], []

    def work():
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                outs.append(generate(pipe, **emb, height=64, width=64, **BASE).images)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for o in outs:
        torch.testing.assert_close(o, ref, **TOL)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@torch.no_grad()
def test_fused_qkv_fast_default_matches_unfused(family):
    from ralu_runtime.tiny import build_tiny_sd3_pipeline

    pipe = _fresh_flux() if family == "flux" else build_tiny_sd3_pipeline(seed=0)
    emb = flux_embeds(1) if family == "flux" else sd3_embeds(1)
    ref = generate(pipe, **emb, height=64, width=64, **BASE).images
    if family == "sd3":  # SD3 runs its own attention modules: nothing to fuse, and asking for it is refused
        with pytest.raises(ValueError, match="fused_qkv=True: sd3's model call has no fused"):
            compile_adapter(pipe, "eager", fused_qkv=True, attn_backend="math")
    runner = compile_adapter(pipe, "eager", fused_qkv=True if family == "flux" else None, attn_backend="math")
    assert runner.applied["fused_qkv"] == (family == "flux")
    torch.testing.assert_close(generate(pipe, **emb, height=64, width=64, **BASE).images, ref, **TOL)
    # the fusion is ralu's own: the user's attention layers are untouched
    assert not any(getattr(m, "fused_projections", False) or hasattr(m, "to_qkv") for m in pipe.transformer.modules())
    if family == "flux":
        assert runner.impl.fused_store.nbytes() > 0  # FLUX attention runs on the fused copies


@torch.no_grad()
def test_fused_qkv_leaves_a_projection_with_a_forward_of_its_own_unfused():
    """A forward the user set on a q projection after the fused copies were built: the next call runs that
    attention's projections as modules (the user's forward runs once per model call; no fused copy of them), the
    other attentions stay fused; removed again, the call equals the first."""
    import types

    pipe = _fresh_flux()
    kw = dict(BASE, height=64, width=64)
    runner = compile_adapter(pipe, "eager", fused_qkv=True, attn_backend="math")
    ref = generate(pipe, **flux_embeds(1), **kw).images
    fused = runner.impl.fused_store.nbytes()
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    ran = []

    def mine(self, x):
        ran.append(1)
        return torch.nn.Linear.forward(self, x)

    to_q.forward = types.MethodType(mine, to_q)
    try:
        torch.testing.assert_close(generate(pipe, **flux_embeds(1), **kw).images, ref, **TOL)
        assert ran and runner.impl.fused_store.nbytes() < fused
    finally:
        del to_q.forward
    assert torch.equal(generate(pipe, **flux_embeds(1), **kw).images, ref)


@torch.no_grad()
def test_compiled_vae_decoder_gives_the_same_images_and_is_undone():
    """compile_vae=True compiles the VAE decoder (default on CUDA with inductor); images equal the eager ones and
    uncompiling restores the eager decoder. dynamo's "eager" backend keeps this test to seconds on a CPU."""
    pipe = _fresh_flux()
    kw = dict(BASE, output_type="pt", height=64, width=64)
    ref = generate(pipe, **flux_embeds(1), **kw).images
    runner = compile_adapter(pipe, "eager", compile_vae=True, dynamo_backend="eager")
    assert runner.applied["compile_vae"]
    out = generate(pipe, **flux_embeds(1), **kw).images
    torch.testing.assert_close(out, ref, **TOL)
    assert runner.impl.vae_decode(pipe.vae) is not None  # ralu's compiled decode ...
    assert pipe.vae.decoder._compiled_call_impl is None and pipe.vae._compiled_call_impl is None  # ... not the user's
    uncompile_adapter(pipe)
    assert get_adapter(pipe).runner is None and runner.impl._vae is None  # released with the runner
    assert torch.equal(generate(pipe, **flux_embeds(1), **kw).images, ref)
    assert not StageRunner(get_adapter(pipe), CompileOptions(backend="eager")).applied["compile_vae"]  # off on CPU


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graphs_follow_lora_scale_disable_and_fuse():
    """A captured CUDA graph replays the LoRA layers with the Python state they had at capture (scale, enabled,
    merged): the runner recaptures when that state changes (model_state), so each change reaches RALU as it reaches
    a pipeline ralu never touched."""
    pytest.importorskip("peft")
    pipe, ref = _fresh_flux().to("cuda"), _fresh_flux().to("cuda")
    for p in (pipe, ref):
        p.load_lora_weights(lora_state_dict(p.transformer, 4, 7, scale=1.0), adapter_name="style")
    runner = compile_adapter(pipe, "eager", cuda_graphs=True)
    emb = {k: v.cuda() for k, v in flux_embeds(1).items()}
    run = lambda p: generate(p, **emb, height=64, width=64, **BASE).images  # noqa: E731
    full = run(pipe)
    assert runner.builds  # captured
    for change in (lambda p: p.set_adapters(["style"], [0.25]), lambda p: p.disable_lora(),
                   lambda p: p.enable_lora(), lambda p: p.fuse_lora(lora_scale=0.5)):
        for p in (pipe, ref):
            change(p)
        torch.testing.assert_close(run(pipe), run(ref), **TOL)
    assert (run(pipe) - full).abs().max() > 1e-3


def test_onnx_refuses_a_bfloat16_model_before_any_work(monkeypatch):
    """onnxruntime runs no bfloat16 model (CPU: no kernels; its inputs go through numpy): refused by prepare and
    compile_adapter, naming the dtype, before an export (which used to fail only after exporting)."""
    from ralu_runtime.compile import onnx as onnx_mod
    from ralu_runtime.tiny import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(seed=0, dtype=torch.bfloat16)
    emb = {k: v.bfloat16() for k, v in flux_embeds(1).items()}
    monkeypatch.setattr(onnx_mod, "export_onnx", lambda *a, **k: pytest.fail("exported before refusing"))
    with pytest.raises(ValueError, match=r"backend='onnx'.*bfloat16.*float16 or float32"):
        generate(pipe, **emb, height=64, width=64, backend="onnx", **BASE)
    with pytest.raises(ValueError, match=r"backend='onnx'.*bfloat16"):
        compile_adapter(pipe, "onnx")
    assert get_adapter(pipe).runner is None


@pytest.mark.parametrize("backend,options,unused", [
    ("eager", {"mode": "max-autotune"}, "mode='max-autotune'"),
    ("onnx", {"dynamic": False}, "dynamic=False"),
    ("eager", {"dynamo_backend": "eager"}, "dynamo_backend='eager'"),
    ("inductor", {"dynamo_backend": "eager", "mode": "max-autotune"}, "dynamo_backend='eager' replaces inductor"),
    ("inductor", {"opset": 19}, "opset=19"),
    ("eager", {"providers": ["CPUExecutionProvider"]}, "providers=['CPUExecutionProvider']"),
    ("onnx", {"cuda_graphs": True}, "cuda_graphs=True"),
    ("onnx", {"attn_backend": "measure"}, "attn_backend='measure'"),
    ("tensorrt", {"attn_backend": "measure"}, "attn_backend='measure'"),
    ("eager", {"precision": "fp8", "fused_qkv": True}, "fused_qkv=True"),
])
def test_options_a_backend_would_ignore_are_refused(backend, options, unused):
    """An option the chosen backend does not use was dropped without a word (onnx ran without the CUDA graphs asked
    for, eager without the mode): each is refused naming it and where it applies."""
    with pytest.raises(ValueError, match=f"backend='{backend}' would ignore .*{re.escape(unused)}"):
        make_options(backend, options)


@pytest.mark.parametrize("backend,options", [
    ("eager", {"compile_vae": True, "dynamo_backend": "eager"}),  # the VAE's torch.compile backend
    ("onnx", {"onnx_dir": "graphs", "opset": 19, "providers": ["CPUExecutionProvider"], "cuda_graphs": False}),
    ("tensorrt", {"onnx_dir": "graphs", "cuda_graphs": True}),   # flavour-dependent: checked when it is known
    ("inductor", {"mode": "max-autotune", "dynamic": False, "attn_backend": "measure"}),
    ("eager", {"precision": "fp8", "fused_qkv": False}),
])
def test_options_a_backend_uses_are_accepted(backend, options):
    assert make_options(backend, options).unused() == []


@pytest.mark.parametrize("options,error,match", [
    # opsets 14-17 exported graphs onnxruntime refused after the model's first calls; 21-23 were written as 20
    ({"opset": 17}, ValueError, r"opset=17: use an ONNX opset between 18 and 20"),
    ({"opset": 21}, ValueError, r"opset=21: use an ONNX opset between 18 and 20"),
    # torch's InvalidBackend / "'int' object is not callable" after text encoding
    ({"dynamo_backend": "bogus"}, ValueError, r"dynamo_backend='bogus': use one of torch.compile's backends"),
    ({"dynamo_backend": 123}, ValueError, r"dynamo_backend=123"),
    # a string was iterated per character by onnxruntime ("Unknown Provider Type: C"), then ran on the CPU
    ({"providers": "CPUExecutionProvider"}, TypeError, r"providers='CPUExecutionProvider': give a non-empty list"),
    ({"providers": []}, TypeError, r"providers=\[\]"),
    ({"onnx_dir": 5}, TypeError, r"onnx_dir=5: give a folder path"),
    ({"onnx_dir": __file__}, ValueError, r"onnx_dir='.*test_compile.py' is a file: give a folder"),
    # onnxruntime fell back to the CPU without a word
    ({"providers": ["BogusProvider"]}, ValueError, r"'BogusProvider' is no onnxruntime provider"),
])
def test_option_values_are_checked_before_any_work(options, error, match):
    """Each was an error from torch, onnxruntime or pathlib after the call's first work, or no error at all."""
    with pytest.raises(error, match=match):
        make_options("onnx" if "dynamo_backend" not in options else "inductor", options)


@pytest.mark.parametrize("flavour,options,unused", [
    ("torch_tensorrt", {"onnx_dir": "graphs"}, "onnx_dir='graphs'"),
    ("torch_tensorrt", {"opset": 19}, "opset=19"),
    ("tensorrt", {"cuda_graphs": True}, "cuda_graphs=True"),
    ("tensorrt", {"providers": ["TensorrtExecutionProvider"]}, "providers="),
    ("ort-trt", {"cuda_graphs": True}, "cuda_graphs=True"),
])
def test_tensorrt_flavour_refuses_what_it_would_ignore(monkeypatch, flavour, options, unused):
    """Which of onnx_dir / opset / providers / cuda_graphs apply depends on the TensorRT flavour installed; the
    runner checks them once it is known, before the device check (so this runs on a CPU)."""
    import ralu_runtime.compile.tensorrt as T
    from ralu_runtime.compile.options import check_flavour_options

    with pytest.raises(ValueError, match=f"backend='tensorrt' \\({flavour}\\) would ignore {re.escape(unused)}"):
        check_flavour_options(make_options("tensorrt", options), flavour)
    monkeypatch.setattr(T, "tensorrt_flavour", lambda: flavour)
    with pytest.raises(ValueError, match=re.escape(unused)):
        compile_adapter(_fresh_flux(), "tensorrt", **options)
    check_flavour_options(make_options("tensorrt", {"opset": 19} if flavour != "torch_tensorrt" else {}), flavour)
