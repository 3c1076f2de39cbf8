"""Safe behind traffic: the user's pipeline is left as found, calls are thread-safe (tiny random pipelines, CPU).

Per backend (eager, inductor, onnx): a snapshot of the pipeline (attention processors, module objects and types,
parameter objects, count and values, hooks, compiled modules, instance attributes) and of the global torch RNG
is equal before and after ``generate``; a plain ``pipe(...)`` gives bitwise the same latents before and after;
a LoRA loaded after a ``generate`` call takes effect in the plain pipeline (bitwise equal to a pipeline ralu
never touched) and in RALU. The inductor rows use dynamo's "eager" backend (what is checked here is what
ralu does to the user's objects, which does not depend on the code generator; tests/test_compile.py checks
inductor's numerics) and force fused q/k/v projections on (the CUDA default) so that path is covered on a CPU.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.cache import set_cache
from ralu_runtime.compile import compile_adapter, uncompile_adapter
from ralu_runtime.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from helpers import assert_same, snapshot
from tiny_inputs import flux_embeds, lora_state_dict, sd3_embeds

SCHED = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
TOL = dict(atol=1e-4, rtol=1e-4)
BACKENDS = {
    "eager": dict(backend="eager", compile_options={"fused_qkv": True}),
    "inductor": dict(backend="inductor", compile_options={"fused_qkv": True, "dynamo_backend": "eager"}),
    "onnx": dict(backend="onnx", compile_options={"fused_qkv": True}),
}


def _ralu(pipe, emb, seed=3, **kw):
    return generate(pipe, **emb, height=64, width=96, speedup=SCHED, seed=seed, output_type="latent", progress=False,
                    **kw).images


def _plain(pipe, emb, seed=4):
    return pipe(**emb, height=64, width=96, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


@pytest.mark.parametrize("backend", [b if b == "eager" else pytest.param(b, marks=pytest.mark.slow)  # compile/export
                                     for b in sorted(BACKENDS)])
@torch.no_grad()
def test_pipeline_left_as_found_and_later_lora_takes_effect(backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    pytest.importorskip("peft")
    pipe, fresh = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    before_plain = _plain(pipe, emb)
    before = snapshot(pipe)
    out = _ralu(pipe, emb, **BACKENDS[backend])
    torch.testing.assert_close(out, _ralu(fresh, emb), **TOL)
    assert_same(before, snapshot(pipe))
    assert torch.equal(_plain(pipe, emb), before_plain), "plain pipe() changed after generate"
    uncompile_adapter(pipe)
    assert_same(before, snapshot(pipe))

    # a LoRA loaded after generate takes effect in both the plain pipeline and RALU (with the backend again)
    out = _ralu(pipe, emb, **BACKENDS[backend])
    for p in (pipe, fresh):
        p.load_lora_weights(lora_state_dict(p.transformer, 4, 7), adapter_name="style")
    lora_plain = _plain(fresh, emb)
    assert (lora_plain - before_plain).abs().max() > 1e-3  # the LoRA changes the result
    assert torch.equal(_plain(pipe, emb), lora_plain)
    lora_ralu = _ralu(pipe, emb, **BACKENDS[backend])
    assert (lora_ralu - out).abs().max() > 1e-3
    torch.testing.assert_close(lora_ralu, _ralu(fresh, emb), **TOL)


@pytest.mark.slow
@torch.no_grad()
def test_weight_change_after_a_call_takes_effect_in_every_backend():
    """In-place weight changes reach the compiled paths: fused copies are refreshed, exported graphs rebuilt."""
    emb = flux_embeds(1)
    for backend, opts in BACKENDS.items():
        if backend == "onnx" and not _have("onnxruntime"):
            continue
        pipe, ref_pipe = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
        first = _ralu(pipe, emb, **opts)
        for p in (pipe, ref_pipe):
            p.transformer.proj_out.weight.mul_(2)
            p.transformer.transformer_blocks[0].attn.to_k.weight.mul_(0.5)
        second = _ralu(pipe, emb, **opts)
        assert (second - first).abs().max() > 1e-3, backend
        torch.testing.assert_close(second, _ralu(ref_pipe, emb), **TOL)


@pytest.mark.parametrize("backend", [b if b == "eager" else pytest.param(b, marks=pytest.mark.slow)  # compile/export
                                     for b in sorted(BACKENDS)])
@torch.no_grad()
def test_lora_scale_disable_and_fuse_reach_every_backend(backend):
    """``set_adapters`` weights, ``disable_lora`` / ``enable_lora`` and ``fuse_lora`` change no tensor object (fuse:
    in place) but what the LoRA layers compute: each backend follows them, as a pipeline ralu never touched does.
    (The onnx backend replayed its exported graph with the old scale until 2026-12-06; CUDA graphs read the same
    state: tests/test_compile.py's gpu test.)"""
    if backend == "onnx" and not _have("onnxruntime"):
        pytest.skip("onnxruntime not installed")
    pytest.importorskip("peft")
    emb = flux_embeds(1)
    pipe, ref = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    for p in (pipe, ref):
        p.load_lora_weights(lora_state_dict(p.transformer, 4, 7, scale=1.0), adapter_name="style")
    full = _ralu(pipe, emb, **BACKENDS[backend])
    changes = [lambda p: p.set_adapters(["style"], [0.25]), lambda p: p.disable_lora(), lambda p: p.enable_lora(),
               lambda p: p.fuse_lora(lora_scale=0.5)]
    # every change re-exports (onnx) or re-traces (inductor) each stage: the compiled rows take the first two (one
    # check, test_model_state_sees_adapter_state_train_mode_and_tensors, sees all four)
    for change in changes if backend == "eager" else changes[:2]:
        for p in (pipe, ref):
            change(p)
        out = _ralu(pipe, emb, **BACKENDS[backend])
        torch.testing.assert_close(out, _ralu(ref, emb), **TOL)
    assert (out - full).abs().max() > 1e-3  # the changes changed the result


def test_model_state_sees_adapter_state_train_mode_and_tensors():
    """:func:`model_state` (what the runner checks before each call) changes with every kind of change a built
    graph or a weight copy depends on, and only then."""
    pytest.importorskip("peft")
    from ralu_runtime.compile import model_fingerprint, model_state

    pipe = build_tiny_flux_pipeline(seed=0)
    tr = pipe.transformer
    pipe.load_lora_weights(lora_state_dict(tr, 4, 7), adapter_name="style")
    ident, vers = model_state(tr)
    assert model_state(tr) == (ident, vers)  # nothing changed
    assert model_fingerprint(tr, versions=False) == tuple(ident)
    changes = [lambda: pipe.set_adapters(["style"], [0.5]), lambda: pipe.disable_lora(), lambda: pipe.enable_lora(),
               lambda: tr.train(), lambda: tr.eval(),
               lambda: tr.transformer_blocks[0].norm1.register_forward_hook(lambda *a: None),
               lambda: setattr(tr.proj_out, "weight", torch.nn.Parameter(tr.proj_out.weight.detach().clone()))]
    for i, change in enumerate(changes):
        change()
        now = model_state(tr)
        assert now[0] != ident, f"change {i} not seen"
        ident, vers = now
    with torch.no_grad():
        tr.proj_out.weight.mul_(2)  # in place: the identity holds (a CUDA graph reads the storage), versions move
    now = model_state(tr)
    assert now[0] == ident and now[1] != vers


@torch.no_grad()
def test_an_unchanged_model_costs_one_walk_and_no_refresh(monkeypatch):
    """With weight copies to keep (fused q/k/v forced on, CPU), each call checks the model once; the copies are
    refreshed only when it changed, and then follow it."""
    pipe, ref = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    opts = BACKENDS["eager"]
    first = _ralu(pipe, emb, **opts)  # makes the copies
    runner = get_adapter(pipe).runner
    assert runner.impl.has_copies()
    assert torch.equal(_ralu(pipe, emb, **opts), first)  # the first check of the model with copies: one refresh
    refreshes = []
    real = runner.impl.refresh
    monkeypatch.setattr(runner.impl, "refresh", lambda: refreshes.append(1) or real())
    assert torch.equal(_ralu(pipe, emb, **opts), first)
    assert refreshes == []  # the model is as the last call left it
    for p in (pipe, ref):
        p.transformer.transformer_blocks[0].attn.to_q.weight.mul_(0.5)
    changed = _ralu(pipe, emb, **opts)
    assert refreshes == [1] and (changed - first).abs().max() > 1e-3
    torch.testing.assert_close(changed, _ralu(ref, emb), **TOL)


def _have(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


@torch.no_grad()
def test_swapped_transformer_is_used():
    pipe, other_pipe = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=5)
    emb = flux_embeds(1)
    first = _ralu(pipe, emb, backend="eager")
    pipe.transformer = other_pipe.transformer
    second = _ralu(pipe, emb)
    assert (second - first).abs().max() > 1e-3
    pipe2 = build_tiny_flux_pipeline(seed=0)
    pipe2.transformer = build_tiny_flux_pipeline(seed=5).transformer
    torch.testing.assert_close(second, _ralu(pipe2, emb), **TOL)
    assert get_adapter(pipe).transformer is other_pipe.transformer


@torch.no_grad()
def test_a_component_swap_keeps_the_users_settings_and_backend():
    """``pipe.vae = other`` makes get_adapter build a new adapter for the pipeline: the skip-layer guidance, the
    default cache and the installed backend (fp8 here) set on the old one stay with the pipeline (they were dropped:
    the next call ran without them, silently), and the result equals a pipeline built in the new state."""
    from ralu_runtime.adapters.sd3 import SkipLayerGuidance

    slg = SkipLayerGuidance(layers=(1,), start=0.0, stop=0.99)

    def configured(pipe):
        get_adapter(pipe).skip_layer_guidance = slg
        set_cache(pipe, "taylorseer:2")
        compile_adapter(pipe, "eager", precision="fp8")
        return pipe

    emb = sd3_embeds(1)
    kw = dict(height=64, width=64, speedup=SCHED, seed=3, output_type="latent", progress=False)
    pipe = configured(build_tiny_sd3_pipeline(seed=0))
    old = get_adapter(pipe)
    generate(pipe, **emb, **kw)
    pipe.vae = build_tiny_sd3_pipeline(seed=4).vae
    new = get_adapter(pipe)
    assert new is not old and new.skip_layer_guidance == slg and new.feature_cache is old.feature_cache
    assert new.runner is not None and new.runner is not old.runner and new.runner.options == old.runner.options
    assert new.runner.adapter is new and old.runner is not None         # a call running on the old one finishes
    after = generate(pipe, **emb, **kw).images
    fresh = build_tiny_sd3_pipeline(seed=0)
    fresh.vae = pipe.vae
    torch.testing.assert_close(after, generate(configured(fresh), **emb, **kw).images, **TOL)
    plain = build_tiny_sd3_pipeline(seed=0)   # without the settings the result differs: the test can see them lost
    plain.vae = pipe.vae
    assert (generate(plain, **emb, **kw).images - after).abs().max() > 1e-3


def test_wan22_guidance_scale_2_follows_a_component_swap():
    from ralu_runtime.tiny import build_tiny

    pipe = build_tiny("tiny-wan22")
    get_adapter(pipe).guidance_scale_2 = 1.5
    pipe.vae = build_tiny("tiny-wan22", seed=3).vae
    assert get_adapter(pipe).guidance_scale_2 == 1.5


@torch.no_grad()
def test_generate_leaves_sd3_as_found():
    pipe = build_tiny_sd3_pipeline(seed=0)
    emb = sd3_embeds(1)
    # transformers installs output-recording hooks on the CLIP layers the first time hidden states are asked for
    # (by diffusers' own encode_prompt, with or without ralu): do that once before the snapshot
    pipe.encode_prompt("warm", None, None, device="cpu")
    before = snapshot(pipe)
    generate(pipe, **emb, height=64, width=64, speedup=SCHED, seed=1, output_type="latent", progress=False,
             backend="inductor", compile_options={"dynamo_backend": "eager"})
    generate(pipe, "a prompt", height=64, width=64, speedup=SCHED, seed=1, output_type="latent", progress=False)
    assert_same(before, snapshot(pipe))


@pytest.mark.slow  # a dynamo trace per stage and one of the VAE decode
@torch.no_grad()
def test_backend_switches_leave_the_pipeline_as_found():
    """eager with fused q/k/v -> inductor (dynamo's eager backend) with a compiled VAE decode -> fp8 on that
    runner (precision= alone) -> eager fp8 -> uncompile_adapter: after each step's generate call the pipeline is as
    found (with the transformer's and the VAE's private attributes), and a plain pipe() after the last equals one
    before the first."""
    pipe = build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    before_plain = _plain(pipe, emb)
    extra = {"transformer": pipe.transformer, "vae": pipe.vae}
    before = snapshot(pipe, extra=extra)
    fp8 = {"fp8_kernel": "emulated"}
    steps = [dict(backend="eager", compile_options={"fused_qkv": True}),
             dict(backend="inductor", compile_options={"dynamo_backend": "eager", "compile_vae": True}),
             dict(precision="fp8", compile_options=fp8),
             dict(backend="eager", precision="fp8", compile_options=fp8)]
    for step in steps:
        generate(pipe, **emb, height=64, width=64, speedup=SCHED, seed=3, output_type="pt", progress=False, **step)
        assert_same(before, snapshot(pipe, extra=extra))
    assert get_adapter(pipe).runner.applied["precision"] == "fp8"
    uncompile_adapter(pipe)
    assert_same(before, snapshot(pipe, extra=extra))
    assert torch.equal(_plain(pipe, emb), before_plain), "plain pipe() changed after the backend switches"


@torch.no_grad()
def test_compiled_runner_follows_lora_hotswap_and_uncompile_restores_plain_calls():
    """What the inductor backend compiles are ralu's own functions: the user's blocks never get a compiled call."""
    pipe = build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    runner = compile_adapter(pipe, "inductor", dynamo_backend="eager")
    _ralu(pipe, emb)
    assert runner.impl.compiled_blocks == ["flux_double", "flux_single"]
    assert all(m._compiled_call_impl is None for m in pipe.transformer.modules())
    uncompile_adapter(pipe)
    assert runner.impl.compiled_blocks == []


# ------------------------------------------------------------------------------------------------ threads
def _run_calls(pipe, calls, workers):
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda kw: generate(pipe, **kw).images, calls))


@torch.no_grad()
def test_threads_with_mixed_options_equal_sequential_calls():
    pipe = build_tiny_flux_pipeline(seed=0)
    base = dict(height=64, width=96, output_type="latent", progress=False)
    calls = []
    for i in range(12):
        kw = dict(base, **flux_embeds(1, seed=i % 3), seed=i)
        if i % 4 == 0:
            kw["cache"] = "taylorseer:3"
        if i % 4 == 1:
            kw["cache"] = "fbcache:0.05"
        kw["speedup"] = SCHED if i % 3 else None
        if kw["speedup"] is None:
            kw["num_inference_steps"] = 6
        if i % 5 == 0:
            kw["prompt"] = "a fox"
            del kw["prompt_embeds"], kw["pooled_prompt_embeds"]
        calls.append(kw)
    sequential = [generate(pipe, **kw).images for kw in calls]
    for _round in range(2):
        concurrent = _run_calls(pipe, calls, workers=4)
        for i, (a, b) in enumerate(zip(sequential, concurrent)):
            assert torch.equal(a, b), f"call {i} differs when run concurrently"
    assert get_adapter(pipe).feature_cache is None  # no cache left attached by any call


@torch.no_grad()
def test_shared_default_cache_object_is_used_by_one_call_at_a_time():
    pipe = build_tiny_flux_pipeline(seed=0)
    kw = dict(flux_embeds(1), height=64, width=96, speedup=SCHED, output_type="latent", progress=False)
    ref = [generate(pipe, **kw, seed=s, cache="taylorseer:2").images for s in range(6)]
    with set_cache(pipe, "taylorseer:2"):
        out = _run_calls(pipe, [dict(kw, seed=s) for s in range(6)], workers=3)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)


@torch.no_grad()
def test_sd3_text_prompts_from_threads():
    pipe = build_tiny_sd3_pipeline(seed=0)
    prompts = ["a fox", "two cats on a long red sofa", "x", "an old lighthouse at dusk, oil painting"] * 3
    calls = [dict(prompt=p, height=64, width=64, speedup=SCHED, seed=i, output_type="latent", progress=False)
             for i, p in enumerate(prompts)]
    sequential = [generate(pipe, **kw).images for kw in calls]
    concurrent = _run_calls(pipe, calls, workers=4)
    for a, b in zip(sequential, concurrent):
        assert torch.equal(a, b)


@torch.no_grad()
def test_backend_switch_in_one_thread_does_not_change_another_threads_call():
    pipe = build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    ref = _ralu(pipe, emb)
    errors, outs = [], []
    stop = threading.Event()

    def switcher():
        while not stop.wait(0.05):
            for b in ("eager", "inductor"):
                compile_adapter(pipe, b, dynamo_backend="eager") if b == "inductor" else compile_adapter(pipe, b)
                stop.wait(0.05)
            uncompile_adapter(pipe)

    def caller():
        try:
            for _ in range(4):
                outs.append(_ralu(pipe, emb))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=switcher)
    t.start()
    try:
        callers = [threading.Thread(target=caller) for _ in range(2)]
        for c in callers:
            c.start()
        for c in callers:
            c.join()
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    for o in outs:
        torch.testing.assert_close(o, ref, **TOL)


def test_adapter_table_does_not_keep_pipelines_alive():
    import gc
    import weakref

    pipe = build_tiny_flux_pipeline(seed=0)
    _ralu(pipe, flux_embeds(1), backend="eager")
    ref = weakref.ref(pipe)
    del pipe
    gc.collect()
    assert ref() is None


def _compile_config():
    import torch._dynamo.config as dcfg
    import torch.fx.experimental._config as fxcfg

    return fxcfg.use_duck_shape, dcfg.recompile_limit, dcfg.specialize_float


def test_config_probe_matches_how_torch_keeps_config():
    """config_is_per_thread: True exactly where torch's config module holds values in context variables (torch
    2.13), False where a patch is global (torch 2.11); the probe leaves the config as it found it."""
    import torch.utils._config_module as cm

    from ralu_runtime.compile.scoped import config_is_per_thread

    before = _compile_config()
    config_is_per_thread.cache_clear()
    assert config_is_per_thread() == ("ContextVar" in vars(cm))
    assert _compile_config() == before


def _in_thread(entered, release, seen):
    from ralu_runtime.compile.scoped import dynamo_settings

    def call():
        with dynamo_settings():
            seen.append(_compile_config())
            entered.set()
            release.wait(10)

    t = threading.Thread(target=call)
    t.start()
    assert entered.wait(10)
    return t


def test_compile_settings_apply_to_the_calling_thread_only():
    """Where torch keeps config per thread, the dynamo/fx switches a compiled call needs are the calling thread's:
    another thread, e.g. the user's own torch.compile, never sees them, and they are back after the call."""
    from ralu_runtime.compile.scoped import config_is_per_thread

    if not config_is_per_thread():
        pytest.skip(f"torch {torch.__version__} keeps dynamo config process-wide (the shared path's test runs)")
    before = _compile_config()
    entered, release, seen = threading.Event(), threading.Event(), []
    t = _in_thread(entered, release, seen)
    assert _compile_config() == before  # this thread is not affected
    release.set()
    t.join()
    assert seen and seen[0][0] is False and seen[0][1] >= 64 and seen[0][2] is True
    assert _compile_config() == before


def test_global_compile_settings_held_until_the_last_overlapping_call_ends():
    """Where torch's config is process-wide (torch 2.11), overlapping compiled calls in two threads share one
    patch: the first call's end does not restore the values under the second call, the last call's end restores
    what the user had."""
    from ralu_runtime.compile.scoped import config_is_per_thread

    if config_is_per_thread():
        pytest.skip(f"torch {torch.__version__} keeps dynamo config per thread (the per-thread test runs)")
    before = _compile_config()
    first, second = (threading.Event(), threading.Event(), []), (threading.Event(), threading.Event(), [])
    t1 = _in_thread(*first)
    t2 = _in_thread(*second)
    first[1].set()  # the first call ends while the second still runs
    t1.join()
    assert _compile_config() == second[2][0] == first[2][0]
    assert first[2][0][:1] == (False,) and first[2][0][1] >= 64
    second[1].set()
    t2.join()
    assert _compile_config() == before


def test_sdpa_switches_held_while_any_call_runs_and_restored_after_the_last():
    """torch's SDPA backend switches are process-wide: the first call sets them, the last one restores them,
    whichever thread that is."""
    from ralu_runtime.compile.scoped import SharedSetting

    state = {"v": "user"}

    class Switch:
        def __enter__(self):
            self.prior, state["v"] = state["v"], "ralu"

        def __exit__(self, *exc):
            state["v"] = self.prior

    shared = SharedSetting()
    entered, release = threading.Event(), threading.Event()

    def first():
        with shared(Switch):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    entered.wait(10)
    with shared(Switch):
        release.set()
        t.join()
        assert state["v"] == "ralu"  # the first call left, this one still runs
    assert state["v"] == "user" and not shared.active


def test_runner_report_names_the_models_dtype_now():
    """``ralu info`` / ``runner.report()`` said "float32" after ``pipe.to(torch.float64)`` (the calls themselves
    followed the cast)."""
    pipe = build_tiny_flux_pipeline(seed=0)
    runner = compile_adapter(pipe, "eager")
    assert runner.report()["precision"] == "float32"
    pipe.to(torch.float64)
    assert runner.report()["precision"] == "float64"
    uncompile_adapter(pipe)


# ------------------------------------------------------------------------------------------------ failed calls
class _UsersError(Exception):
    pass


def _fail_at(obj, attr: str, n: int, error):
    """Set ``obj.<attr>`` (a method) on the instance to one that raises ``error`` at its ``n``-th call; returns the
    undo (deletes the instance attribute)."""
    orig, calls = getattr(obj, attr), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error("failed part-way")
        return orig(*args, **kwargs)

    setattr(obj, attr, failing)
    return lambda: delattr(obj, attr)


FAIL_CASES = {  # RALU 2/2/2 steps: model calls 1-2 are stage 1, 3 the first after a transition, 6 the last
    "stage1": ({}, "norm", 1, _UsersError),
    "after-transition": ({}, "norm", 3, _UsersError),
    "last-call": ({}, "norm", 6, _UsersError),
    "interrupt": ({}, "norm", 4, KeyboardInterrupt),
    "preview-decode": (dict(output_type="pt"), "decode", 1, _UsersError),
    "final-decode": (dict(output_type="pt"), "decode", 2, _UsersError),
    "fused-qkv": (BACKENDS["eager"], "norm", 3, _UsersError),
    "taylorseer": (dict(cache="taylorseer:2:1"), "norm", 4, _UsersError),
    "fbcache": (dict(cache="fbcache:0.1"), "norm", 5, _UsersError),
    "fp8": (dict(precision="fp8", compile_options={"fp8_kernel": "emulated"}), "norm", 3, _UsersError),
    "fp8-decode": (dict(precision="fp8", compile_options={"fp8_kernel": "emulated"}, output_type="pt"), "decode", 2,
                   _UsersError),
    "inpaint": (dict(image=torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(5)),
                     mask_image=torch.zeros(1, 1, 64, 96).index_fill_(2, torch.arange(8, 40), 1.0), strength=0.8),
                "norm", 3, _UsersError),
}


@pytest.mark.parametrize("case", sorted(FAIL_CASES))
@torch.no_grad()
def test_a_call_failing_part_way_leaves_the_pipeline_as_found(case):
    """A generate call that fails part-way (a layer of the user's model raising at a given model call, a
    KeyboardInterrupt, the VAE raising at the region-choice preview or the final decode; eager with fused q/k/v, a
    feature cache, fp8, inpainting) raises the user's own exception, leaves the pipeline (full snapshot with the
    transformer's private attributes, the global RNG) and torch's default dtype as found, and the next call is
    bitwise the same call on a fresh pipeline."""
    kw, where, n, error = FAIL_CASES[case]
    kw = dict(dict(height=64, width=96, speedup=SCHED, seed=3, output_type="latent", progress=False), **kw)
    pipe, fresh = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    emb, dtype = flux_embeds(1), torch.get_default_dtype()
    before = snapshot(pipe, extra={"transformer": pipe.transformer})
    target = pipe.transformer.transformer_blocks[0].norm1 if where == "norm" else pipe.vae
    undo = _fail_at(target, "forward" if where == "norm" else "decode", n, error)
    try:
        with pytest.raises(error, match="failed part-way"):
            generate(pipe, **emb, **kw)
    finally:
        undo()
    assert_same(before, snapshot(pipe, extra={"transformer": pipe.transformer}))
    assert torch.get_default_dtype() == dtype
    assert torch.equal(generate(pipe, **emb, **kw).images, generate(fresh, **emb, **kw).images)


@pytest.mark.parametrize("opts", [dict(precision="fp8", compile_options={"fp8_kernel": "emulated"}),
                                  dict(backend="eager", compile_options={"fused_qkv": True}),
                                  dict(backend="onnx")], ids=["fp8", "fused_qkv", "onnx"])
def test_writes_through_data_reach_the_weight_copies(opts):
    """peft's fuse_lora merges with ``weight.data += delta`` and its hot-swap copies with ``.data.copy_``: no version
    counter moves, so ralu's fused q/k/v and fp8 copies and an exported graph kept the old weights (fuse_lora then
    unload_lora_weights gave the image of before, bitwise). The runner's per-call content stamp of the copies'
    sources finds them: each result equals a fresh pipeline given the same changes."""
    pipe, fresh = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    kw = opts
    before = _ralu(pipe, emb, **kw)                        # copies made lazily in this first call
    for p in (pipe, fresh):
        p.load_lora_weights(lora_state_dict(p.transformer, 4, seed=1), adapter_name="x")
        p.fuse_lora(lora_scale=0.7)
        p.unload_lora_weights()
    after = _ralu(pipe, emb, **kw)
    assert not torch.equal(after, before)
    assert torch.equal(after, _ralu(fresh, emb, **kw))
    for p in (pipe, fresh):                                 # a second call made no new copy: the begin-of-call stamp
        p.transformer.single_transformer_blocks[0].proj_out.weight.data.mul_(1.5)
        p.transformer.transformer_blocks[0].attn.to_k.weight.data.mul_(0.5)
    assert torch.equal(_ralu(pipe, emb, **kw), _ralu(fresh, emb, **kw))
    uncompile_adapter(pipe)
    uncompile_adapter(fresh)


@pytest.mark.parametrize("name,attn", [("tiny-flux", "transformer_blocks.0.attn"), ("tiny-z-image", "layers.0.attention"),
                                       ("tiny-qwen-image", "transformer_blocks.0.attn"),
                                       ("tiny-chroma", "single_transformer_blocks.0.attn")])
def test_hooks_that_would_not_run_are_refused_or_warned(name, attn):
    """A forward hook on an attention module that ralu runs itself never ran (zeroing its output changed nothing,
    without a word): refused by name. Hooks on the transformer itself (ralu never calls its forward; often a call
    counter for diffusers' own calls) get one warning per set of hooks."""
    import warnings

    from ralu_runtime.tiny import build_tiny

    pipe = build_tiny(name)
    kw = dict(height=64, width=64, seed=0, output_type="latent", progress=False)
    handle = pipe.transformer.get_submodule(attn).register_forward_hook(lambda m, i, o: o)
    with pytest.raises(ValueError, match=rf"transformer.{attn} has forward hooks .* on an attention module that ralu "
                                         "runs itself"):
        generate(pipe, "a cat", **kw)
    handle.remove()
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(pipe, "a cat", **kw)
        generate(pipe, "a cat", **kw)
    said = [w for w in caught if "forward hook(s)" in str(w.message)]
    assert len(said) == 1 and "ralu never calls its forward" in str(said[0].message)
    handle.remove()


@pytest.mark.parametrize("name,attn", [("tiny-sd3", "transformer_blocks.0.attn"), ("tiny-wan", "blocks.0.attn1")])
def test_hooks_on_attention_modules_that_run_are_called(name, attn):
    from ralu_runtime.tiny import build_tiny

    pipe = build_tiny(name)
    calls = []
    handle = pipe.transformer.get_submodule(attn).register_forward_hook(lambda m, i, o: calls.append(1) or o)
    kw = dict(height=64, width=64, seed=0, output_type="latent", progress=False)
    if name == "tiny-wan":
        kw["num_frames"] = 5
    generate(pipe, "a cat", **kw)   # a hook returning the output it got (was NotImplementedError on Wan)
    handle.remove()
    assert calls
