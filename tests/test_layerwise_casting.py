"""diffusers' layerwise casting (``model.enable_layerwise_casting(storage_dtype, compute_dtype)``: weights stored in
``storage_dtype``, each layer's cast to ``compute_dtype`` by a hook around its forward) under ralu, every tiny family.

Reference: the same model without hooks whose cast layers hold their weights rounded to the storage dtype (kept in the
compute dtype), which is what the hooks compute with. ralu runs the layers as modules, so their hooks run:

* RALU (default preset) and the baseline equal the reference bitwise, the VAE cast too; the pipeline is left as
  found (weights still stored in bfloat16, hooks in place);
* the serving engine packs two requests of a cast model and each equals its ``generate`` call (float rounding);
* one-rank sharded calls equal the module calls bitwise (SD3.5 Medium);
* ``backend="inductor"`` runs the blocks' cast Linear layers as traceable ``CastLinear`` modules (cast shadows) and
  equals the eager call (bitwise with dynamo's eager backend; real inductor code: float rounding), also when the
  casting is enabled after the backend was installed;
* a backend that exports or captures the model (``onnx``, CUDA graphs; ``compile_vae``), ``precision="fp8"`` on
  float8 storage (those layers would not run in fp8) or with a compiled backend, and a cast layer inside a block that
  is not a Linear under a compiled backend, are refused before any model call, naming the module, whether asked for
  in the call or installed before the casting was enabled (generate and the engine).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from ralu_runtime import generate

EVERY = {"tiny-flux": ("flux", False), "tiny-sd3": ("sd3", True), "tiny-sd35": ("sd35", True),
         "tiny-flux2": ("flux2", False), "tiny-flux2-klein": ("flux2", False), "tiny-qwen-image": ("qwen_image", True),
         "tiny-z-image": ("z_image", True), "tiny-chroma": ("chroma", True), "tiny-wan": ("wan", True),
         "tiny-wan22": ("wan", True), "tiny-hunyuan-video15": ("hunyuan_video15", True)}
VIDEO = {"tiny-wan", "tiny-wan22", "tiny-hunyuan-video15"}
STORAGE, COMPUTE = torch.bfloat16, torch.float32


def _cast_layers(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules()
            if "layerwise_casting" in (getattr(vars(m).get("_diffusers_hook"), "hooks", None) or {})}


def _rounded_like(model: torch.nn.Module, cast: torch.nn.Module) -> None:
    """Round ``model``'s weights to the storage dtype in the layers that ``cast`` casts (in place, no hooks)."""
    layers = _cast_layers(cast)
    assert layers, "enable_layerwise_casting cast no layer"
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name in layers:
                for p in mod.parameters(recurse=False):
                    p.copy_(p.to(STORAGE).to(p.dtype))


def _case(name: str, seed: int = 0):
    from ralu_runtime.tiny import build_tiny

    module, cfg = EVERY[name]
    pipe = build_tiny(name, seed=seed)
    embeds = importlib.import_module(f"ralu_runtime.tiny.{module}").random_embeds(pipe, 1, 8, seed=1, cfg=cfg)
    size = dict(height=64, width=96, **({"num_frames": 9} if name in VIDEO else {}))
    return pipe, embeds, size


@pytest.mark.parametrize("name", list(EVERY))
@torch.no_grad()
def test_cast_model_equals_its_rounded_weights_bitwise(name):
    """RALU and the baseline on a model (and VAE) under layerwise casting equal them on the rounded reference, and
    leave the pipeline as found."""
    from helpers import assert_same, snapshot

    pipe, embeds, size = _case(name)
    ref, _, _ = _case(name)
    pipe.transformer.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
    pipe.vae.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
    _rounded_like(ref.transformer, pipe.transformer)
    _rounded_like(ref.vae, pipe.vae)
    assert any(p.dtype == STORAGE for p in pipe.transformer.parameters())
    before = snapshot(pipe)
    for kw in (dict(speedup="default", output_type="pt"), dict(speedup=None, num_inference_steps=2,
                                                               output_type="latent")):
        args = dict(size, seed=3, progress=False, **kw)
        got, want = generate(pipe, **embeds, **args).images, generate(ref, **embeds, **args).images
        assert torch.isfinite(got).all()
        assert torch.equal(got, want), f"{name} {kw}: max diff {(got - want).abs().max():.3g}"
    assert_same(before, snapshot(pipe))


@torch.no_grad()
def test_casting_everything_but_the_models_own_exceptions_runs():
    """``skip_modules_pattern=()`` casts the norms, embedders and output layers too (what the model class itself keeps
    uncast stays so): still the rounded reference, bitwise."""
    pipe, embeds, size = _case("tiny-flux")
    ref, _, _ = _case("tiny-flux")
    plain = _case("tiny-flux")[0].transformer
    plain.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
    default = len(_cast_layers(plain))
    pipe.transformer.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE, skip_modules_pattern=())
    assert len(_cast_layers(pipe.transformer)) > default
    _rounded_like(ref.transformer, pipe.transformer)
    args = dict(size, seed=5, speedup="default", output_type="latent", progress=False)
    assert torch.equal(generate(pipe, **embeds, **args).images, generate(ref, **embeds, **args).images)


@pytest.mark.parametrize("name", [n for n in EVERY if n not in ("tiny-flux2-klein", "tiny-sd3", "tiny-wan22")])
@torch.no_grad()
def test_serving_engine_packs_a_cast_model(name):
    """Two requests of different sizes on a cast model run as packed calls and each equals its generate call."""
    from mode_helpers import assert_engine_packs

    pipe, embeds, size = _case(name, seed=4)
    pipe.transformer.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
    small = dict(size, height=64, width=64)
    reqs = [(dict(size, **embeds), 11), (dict(small, **embeds), 12)]
    assert_engine_packs(pipe, reqs)


@torch.no_grad()
def test_one_rank_sharded_call_of_a_cast_model_equals_the_module_call():
    import test_modes_sd3 as sd3
    from mode_helpers import OneRank

    from ralu_runtime.adapters.sd3 import SD3Adapter
    from ralu_runtime.execution.call import call_scope

    pipe = sd3._pipe("medium")
    pipe.transformer.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
    adapter = SD3Adapter(pipe)
    for call in sd3._calls(adapter, sd3.MIX[:2], seed=6):
        outs = []
        for sharding in (None, OneRank()):
            with call_scope(None, sharding=sharding):
                outs.append(adapter.velocity(call.tokens, call.grid, call.timestep, call.cond))
        assert torch.equal(outs[0], outs[1])


COMPILED = ["tiny-flux", "tiny-sd3", "tiny-flux2", "tiny-qwen-image", "tiny-wan22", "tiny-hunyuan-video15"]


@pytest.mark.parametrize("name", COMPILED)
@torch.no_grad()
def test_compiled_blocks_run_cast_shadows_and_equal_the_eager_call(name):
    """backend='inductor' (dynamo traced with its eager backend here: the tracing is what the casting hooks broke)
    on a cast model: the blocks run their cast shadows (CastLinear in place of each cast Linear) and the result equals
    the eager call's bitwise; a second call traces nothing new; the model is left as found (weights stored in the
    storage dtype, hooks in place)."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.compile import compile_stats
    from ralu_runtime.compile.cast_layers import CastLinear

    pipe, embeds, size = _case(name)
    models = get_adapter(pipe).model_modules()
    for m in models:
        m.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
    layers = [_cast_layers(m) for m in models]
    kw = dict(size, seed=2, output_type="latent", progress=False)
    want = generate(pipe, **embeds, **kw).images
    opts = dict(backend="inductor", compile_options={"dynamo_backend": "eager"})
    got = generate(pipe, **embeds, **kw, **opts).images
    assert torch.equal(got, want)
    runner = get_adapter(pipe).runner
    shadows = runner.impl.cast
    assert shadows.active and len(shadows) > 0
    block = next(b for kind, c in models[0].named_children() if isinstance(c, torch.nn.ModuleList) for b in c)
    assert any(isinstance(m, CastLinear) for m in shadows.shadow(block).modules())
    g0 = compile_stats()["unique_graphs"]
    assert torch.equal(generate(pipe, **embeds, **kw, **opts).images, want)
    assert compile_stats()["unique_graphs"] == g0
    assert [_cast_layers(m) for m in models] == layers
    assert all(p.dtype == STORAGE for m in models for n, mod in m.named_modules() if n in _cast_layers(m)
               for p in mod.parameters(recurse=False))


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
@torch.no_grad()
def test_serving_engine_packs_a_cast_model_with_compiled_blocks(name):
    """The serving engine on a cast model with backend='inductor' (dynamo traced, its eager backend): packed calls run
    the compiled packed block functions on the cast shadows, and each request equals its eager generate call."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.serving import Engine, EngineConfig

    pipe, embeds, size = _case(name, seed=4)
    pipe.transformer.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
    reqs = [(dict(size, **embeds), 11), (dict(size, height=64, width=64, **embeds), 12)]
    refs = [generate(pipe, **kw, seed=seed, output_type="latent", progress=False).images for kw, seed in reqs]
    with Engine(pipe, EngineConfig(gather_timeout_s=0.5), output_type="latent", backend="inductor",
                compile_options={"dynamo_backend": "eager"}) as eng:
        outs = [h.result(timeout=300).images for h in [eng.submit(seed=seed, **kw) for kw, seed in reqs]]
        assert eng.metrics()["packed_calls"] > 0
    runner = get_adapter(pipe).runner
    assert runner.impl.cast.active and any(n.endswith("_packed") for n in runner.impl.compiled_blocks)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_inductor_compiles_a_cast_model_and_follows_casting_enabled_later():
    """Real inductor code on the CPU (one family): installed while the model is plain, then the casting is enabled:
    the next call runs the cast shadows (float rounding of inductor's fusions: within 1e-5 of the eager cast call);
    float8 storage runs too."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.compile import compile_adapter

    pipe, embeds, size = _case("tiny-flux")
    kw = dict(size, seed=2, output_type="latent", progress=False)
    compile_adapter(pipe, backend="inductor")
    plain = generate(pipe, **embeds, **kw).images
    assert not get_adapter(pipe).runner.impl.cast.active
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=COMPUTE)
    got = generate(pipe, **embeds, **kw).images
    assert get_adapter(pipe).runner.impl.cast.active
    from ralu_runtime.compile import uncompile_adapter

    uncompile_adapter(pipe)
    want = generate(pipe, **embeds, **kw).images
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not torch.equal(want, plain)  # float8 storage changed the result: the cast layers did run


@torch.no_grad()
def test_what_a_cast_model_cannot_run_is_refused_up_front():
    """Exported or captured backends (onnx, CUDA graphs), compile_vae=True on a cast VAE, precision='fp8' on float8
    storage or with a compiled backend, and a cast layer inside a block that is not a Linear under a compiled backend:
    ValueError naming the module before any model call; an onnx runner installed before the casting was enabled is
    refused by generate and the engine."""
    from ralu_runtime.compile import compile_adapter, uncompile_adapter
    from ralu_runtime.serving import Engine

    pipe, embeds, size = _case("tiny-flux")
    args = dict(size, seed=1, output_type="latent", progress=False)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    blocks = [b.register_forward_pre_hook(lambda *a: calls.append(1)) for b in pipe.transformer.transformer_blocks]
    try:
        compile_adapter(pipe, backend="onnx")  # installed while the model is plain: allowed
        pipe.transformer.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
        installed = r"^transformer\.\S+ carries diffusers' layerwise casting \(enable_layerwise_casting\), which " \
                    r"backend='onnx' cannot run"
        with pytest.raises(ValueError, match=installed):
            generate(pipe, **embeds, **args)
        with pytest.raises(ValueError, match=installed):
            Engine(pipe)
        uncompile_adapter(pipe)
        with pytest.raises(ValueError, match=installed):
            generate(pipe, **embeds, **args, backend="onnx")
        with pytest.raises(ValueError, match=r"^transformer\.\S+ carries diffusers' layerwise casting .*, which "
                                             r"cuda_graphs=True cannot run"):
            generate(pipe, **embeds, **args, backend="eager", compile_options={"cuda_graphs": True})
        with pytest.raises(ValueError, match=r"^transformer\.\S+ carries diffusers' layerwise casting: "
                                             r"precision='fp8' with a compiled backend"):
            generate(pipe, **embeds, **args, backend="inductor", precision="fp8")
        pipe.vae.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
        with pytest.raises(ValueError, match=r"^vae\.\S+ carries diffusers' layerwise casting .* compile_vae=True "
                                             r"cannot compile"):
            generate(pipe, **embeds, **args, backend="eager", compile_options={"compile_vae": True})
        fp8, _, _ = _case("tiny-flux")
        fp8.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=COMPUTE)
        stored = r"^precision='fp8' with transformer\.\S+ stored in torch\.float8_e4m3fn by diffusers' layerwise"
        with pytest.raises(ValueError, match=stored):
            generate(fp8, **embeds, **args, precision="fp8")
        generate(fp8, **embeds, **args)  # the casting alone runs
        with pytest.raises(ValueError, match=stored):  # fp8 installed on the model before its casting
            plain, _, _ = _case("tiny-flux")
            generate(plain, **embeds, **args, precision="fp8")
            plain.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=COMPUTE)
            Engine(plain)
        conv, _, _ = _case("tiny-flux")  # a cast layer of another kind inside a block (none of diffusers' has one)
        conv.transformer.transformer_blocks[0].extra = torch.nn.Conv1d(4, 4, 1)
        conv.transformer.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=COMPUTE)
        with pytest.raises(ValueError, match=r"^transformer\.transformer_blocks\.0\.extra \(Conv1d\) carries "
                                             r"diffusers' layerwise casting inside a block; a compiled backend"):
            generate(conv, **embeds, **args, backend="inductor")
    finally:
        handle.remove()
        for h in blocks:
            h.remove()
    assert not calls
    generate(pipe, **embeds, **args)  # eager: runs


@torch.no_grad()
def test_refusals_name_the_expert_that_is_cast():
    """Wan 2.2's second expert cast alone: the refusal names transformer_2's module."""
    pipe, embeds, size = _case("tiny-wan22")
    pipe.transformer_2.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=COMPUTE)
    with pytest.raises(ValueError, match=r"^transformer_2\.\S+ carries diffusers' layerwise casting"):
        generate(pipe, **embeds, **size, seed=1, output_type="latent", progress=False, backend="eager",
                 compile_options={"cuda_graphs": True})
    with pytest.raises(ValueError, match=r"^precision='fp8' with transformer_2\.\S+ stored in torch\.float8_e4m3fn"):
        generate(pipe, **embeds, **size, seed=1, output_type="latent", progress=False, precision="fp8")
