"""diffusers' model CPU offload (``pipe.enable_model_cpu_offload()``) under ralu, every tiny family.

On a CPU the hooks' moves are no-ops (execution device ``cpu``), so what is checked is what ralu does with them, by
recording every call of each component's accelerate ``CpuOffload.pre_forward`` (the move in; its moving the model
before it out is accelerate's own code, run on a GPU by the GPU suite's smoke step):

* the result equals the same call without offload bitwise (RALU and the baseline);
* before every model call the model it runs was onloaded (Wan 2.2: the expert of that step, in the order the
  pipeline's experts run); the region-choice preview decode moves the VAE in without its hook offloading the
  transformer (its ``prev_module_hook`` is detached for that decode only), the final decode with it;
* the call ends as a pipeline call does: ``maybe_free_model_hooks`` (every model offloaded, hooks put back);
* what cannot run offloaded is refused before any model call, naming the module: compiled / CUDA-graph / exported
  backends, ralu's weight copies (fused q/k/v, fp8), context parallelism, the serving engine; accelerate hooks other
  than a model's own offload hook (sequential offload, a hook on a block) still are.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from ralu_runtime import generate
from ralu_runtime.adapters import get_adapter

EVERY = {"tiny-flux": ("flux", False), "tiny-sd3": ("sd3", True), "tiny-sd35": ("sd35", True),
         "tiny-flux2": ("flux2", False), "tiny-flux2-klein": ("flux2", False), "tiny-qwen-image": ("qwen_image", True),
         "tiny-z-image": ("z_image", True), "tiny-chroma": ("chroma", True), "tiny-wan": ("wan", True),
         "tiny-wan22": ("wan", True), "tiny-hunyuan-video15": ("hunyuan_video15", True)}
VIDEO = {"tiny-wan", "tiny-wan22", "tiny-hunyuan-video15"}


def _case(name: str):
    from ralu_runtime.tiny import build_tiny

    module, cfg = EVERY[name]
    pipe = build_tiny(name, seed=0)
    embeds = importlib.import_module(f"ralu_runtime.tiny.{module}").random_embeds(pipe, 1, 8, seed=1, cfg=cfg)
    size = dict(height=64, width=96, **({"num_frames": 9} if name in VIDEO else {}))
    return pipe, embeds, size


def _record(pipe) -> list[tuple[str, bool]]:
    """Record ``(component, its hook had a model to offload before it)`` at every onload of an offloaded
    component: a wrapper on each hook instance around accelerate's ``pre_forward``."""
    from ralu_runtime.offload import offload_hook

    events = []
    for name, mod in pipe.components.items():
        hook = offload_hook(mod)
        if hook is None:
            continue

        def spy(module, *args, _name=name, _hook=hook, _own=hook.pre_forward, **kwargs):
            events.append((_name, _hook.prev_module_hook is not None))
            return _own(module, *args, **kwargs)

        hook.pre_forward = spy
    return events


@pytest.mark.parametrize("name", list(EVERY))
@torch.no_grad()
def test_offloaded_pipeline_gives_the_same_image_and_onloads_each_model_call(name):
    import dataclasses

    from ralu_runtime.api import resolve_schedule

    pipe, emb, size = _case(name)
    # the preset with half the coarse tokens upsampled first: a region choice (its preview decode) at this size
    preset = resolve_schedule("default", get_adapter(pipe), size["height"], size["width"])
    kw = dict(size, speedup=dataclasses.replace(preset, ratio=0.5), seed=3, output_type="pt", progress=False)
    want = generate(pipe, **emb, **kw)
    pipe.enable_model_cpu_offload(device="cpu")
    events = _record(pipe)
    adapter = get_adapter(pipe)
    own = adapter.velocity

    def velocity(tokens, grid, timestep, cond, impl=None):  # which model each call runs
        expert = adapter.expert_index(timestep, cond) if hasattr(adapter, "expert_index") else 0
        events.append(("call", ("transformer", "transformer_2")[expert]))
        return own(tokens, grid, timestep, cond, impl)

    adapter.velocity = velocity
    try:
        got = generate(pipe, **emb, **kw)
    finally:
        del adapter.velocity
    assert torch.equal(got.images, want.images)
    calls = [i for i, e in enumerate(events) if e[0] == "call"]
    assert len(calls) == sum(rec.steps for rec in got.records)
    # right before every model call, the model it runs was onloaded (Wan 2.2: its expert of that step)
    assert all(events[i - 1][0] == events[i][1] for i in calls)
    assert {events[i][1] for i in calls} == ({"transformer", "transformer_2"} if name == "tiny-wan22"
                                             else {"transformer"})
    vae = [i for i, e in enumerate(events) if e[0] == "vae"]
    # the preview decode (stage 1's region choice) keeps the transformer (hook detached), the final decode does not
    assert [events[i][1] for i in vae] == [False, True]
    assert calls[0] < vae[0] < calls[-1] < vae[1] == len(events) - 1
    # ended as a pipeline call ends: every model offloaded and its hook put back (maybe_free_model_hooks)
    from ralu_runtime.offload import offload_hook

    assert all(offload_hook(pipe.components[n]) is not None for n in ("transformer", "vae"))
    base = generate(pipe, **emb, **dict(kw, speedup=None))
    pipe.remove_all_hooks()
    assert torch.equal(base.images, generate(pipe, **emb, **dict(kw, speedup=None)).images)


@torch.no_grad()
def test_prompts_encode_through_the_offloaded_text_encoders():
    pipe, emb, size = _case("tiny-flux")
    kw = dict(size, prompt="a red cube", seed=3, output_type="latent", progress=False)
    want = generate(pipe, **kw).images
    pipe.enable_model_cpu_offload(device="cpu")
    events = _record(pipe)
    assert torch.equal(generate(pipe, **kw).images, want)
    first = [n for n, _ in events][:3]
    assert first == ["text_encoder", "text_encoder_2", "transformer"]


def test_preview_decode_hook_is_restored_after_an_error():
    from ralu_runtime.offload import keeping_models, offload_hook

    pipe, _, _ = _case("tiny-flux")
    pipe.enable_model_cpu_offload(device="cpu")
    hook = offload_hook(pipe.vae)
    prev = hook.prev_module_hook
    assert prev is not None
    with pytest.raises(RuntimeError, match="boom"), keeping_models(pipe.vae):
        assert hook.prev_module_hook is None
        raise RuntimeError("boom")
    assert hook.prev_module_hook is prev
    with keeping_models(None):  # no VAE / no hook: nothing to do
        pass


def test_adapter_runs_on_the_hooks_execution_device():
    from ralu_runtime.offload import execution_device

    pipe, _, _ = _case("tiny-flux")
    pipe.enable_model_cpu_offload(device="cpu")
    assert get_adapter(pipe).device == execution_device(pipe.transformer) == torch.device("cpu", 0)
    pipe.transformer._hf_hook.execution_device = torch.device("meta")  # where the hook would run it
    assert get_adapter(pipe).device == torch.device("meta")


REFUSED = [
    (dict(backend="inductor"), r"backend='inductor' holds the weights"),
    (dict(backend="eager", compile_options={"compile_vae": True}), r"compile_vae=True compiles the VAE"),
    (dict(backend="eager", compile_options={"fused_qkv": True}), r"fused_qkv=True keeps ralu's fused q/k/v"),
    (dict(precision="fp8"), r"precision='fp8' keeps ralu's fp8 weight copies"),
]


@pytest.mark.parametrize("options,why", REFUSED, ids=["inductor", "compile_vae", "fused_qkv", "fp8"])
def test_what_cannot_run_offloaded_is_refused_before_any_model_call(options, why):
    pipe, emb, size = _case("tiny-flux")
    pipe.enable_model_cpu_offload(device="cpu")
    events = _record(pipe)
    with pytest.raises(ValueError, match=rf"^transformer is offloaded by enable_model_cpu_offload, which ralu runs "
                                         rf"with eager calls only: {why}"):
        generate(pipe, **emb, **size, seed=0, progress=False, **options)
    assert events == []


def test_an_installed_backend_that_cannot_run_offloaded_is_refused():
    from ralu_runtime.compile import ensure_backend, uncompile_adapter

    pipe, emb, size = _case("tiny-flux")
    ensure_backend(get_adapter(pipe), "eager", fused_qkv=True)
    pipe.enable_model_cpu_offload(device="cpu")
    events = _record(pipe)
    with pytest.raises(ValueError, match=r"^transformer is offloaded .*fused_qkv=True keeps"):
        generate(pipe, **emb, **size, seed=0, progress=False)
    assert events == []
    uncompile_adapter(pipe)
    want = generate(pipe, **emb, **size, seed=0, progress=False, output_type="latent").images
    assert events
    got = generate(pipe, **emb, **size, seed=0, progress=False, output_type="latent", backend="eager")
    assert torch.equal(got.images, want)  # ralu's eager backend (a runner, no copies) runs offloaded


def test_context_parallelism_and_the_serving_engine_refuse_an_offloaded_pipeline(monkeypatch):
    import ralu_runtime.parallel
    from ralu_runtime.serving import Engine

    pipe, emb, size = _case("tiny-flux")
    with Engine(pipe) as engine:  # built before the offload: its requests are refused from then on
        pipe.enable_model_cpu_offload(device="cpu")
        with pytest.raises(ValueError, match=r"^transformer is offloaded .*the serving engine keeps its model"):
            engine.submit(None, **emb, **size, seed=0)
    with pytest.raises(ValueError, match=r"^transformer is offloaded .*the serving engine keeps its model"):
        Engine(pipe)
    # as if a ContextParallelConfig resolved into a plan (no process group on this machine)
    monkeypatch.setattr(ralu_runtime.parallel, "resolve_parallel", lambda *a, **k: object())
    with pytest.raises(ValueError, match=r"^transformer is offloaded .*context parallelism runs one model per rank"):
        generate(pipe, **emb, **size, seed=0, progress=False)


def test_an_offload_hook_on_a_block_is_still_refused():
    from accelerate import cpu_offload_with_hook

    pipe, emb, size = _case("tiny-flux")
    blk = pipe.transformer.transformer_blocks[0]
    _model, hook = cpu_offload_with_hook(blk, execution_device="cpu")
    try:
        with pytest.raises(ValueError, match=r"^transformer\.transformer_blocks\.0 runs an accelerate model offload "
                                             r"hook \(enable_model_cpu_offload\) on a part of the model"):
            generate(pipe, **emb, **size, seed=0, progress=False)
    finally:
        hook.remove()


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan22"])
@torch.no_grad()
def test_offload_and_layerwise_casting_together(name):
    """Both of diffusers' memory savers at once (the usual way to fit a large model on a small GPU): the offloaded
    cast pipeline gives the cast pipeline's result bitwise, and the weights stay in their storage dtype."""
    pipe, emb, size = _case(name)
    for model in get_adapter(pipe).model_modules():
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    kw = dict(size, seed=4, output_type="latent", progress=False)
    want = generate(pipe, **emb, **kw).images
    pipe.enable_model_cpu_offload(device="cpu")
    events = _record(pipe)
    assert torch.equal(generate(pipe, **emb, **kw).images, want)
    assert any(n.startswith("transformer") for n, _ in events)
    assert pipe.transformer.proj_out.weight.dtype == torch.float32  # an uncast layer (diffusers' skip pattern)
    assert any(p.dtype == torch.bfloat16 for p in pipe.transformer.parameters())


@torch.no_grad()
def test_concurrent_calls_on_an_offloaded_pipeline_run_one_at_a_time():
    """Two threads calling generate on one offloaded pipeline: the calls do not overlap (the hooks move models, so
    ralu serializes them per pipeline) and each equals its call alone."""
    import threading

    pipe, emb, size = _case("tiny-flux")
    kw = dict(size, output_type="latent", progress=False)
    want = {s: generate(pipe, **emb, **kw, seed=s).images for s in (1, 2)}
    pipe.enable_model_cpu_offload(device="cpu")
    adapter = get_adapter(pipe)
    own, inside, overlap = adapter.velocity, [0], []

    def velocity(*args, **kwargs):
        inside[0] += 1
        overlap.append(inside[0])
        try:
            return own(*args, **kwargs)
        finally:
            inside[0] -= 1

    adapter.velocity = velocity
    got, errors = {}, []

    def one(seed):
        try:
            got[seed] = generate(pipe, **emb, **kw, seed=seed).images
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=one, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        del adapter.velocity
    assert not errors and set(got) == {1, 2}
    assert max(overlap) == 1
    for s in (1, 2):
        assert torch.equal(got[s], want[s])
