"""Bad input fails fast: before any model call, with an error naming the argument, the value and what is allowed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ralu_runtime import RaluSchedule, generate, load_pipeline
from ralu_runtime.adapters import get_adapter
from ralu_runtime.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from tiny_inputs import flux_embeds, sd3_embeds

SCHED = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)


class CallCounter:
    """Counts every forward of the transformer's input embedding and of the text encoders (= model work done)."""

    def __init__(self, pipe):
        self.n = 0
        mods = [pipe.transformer.x_embedder if hasattr(pipe.transformer, "x_embedder") else pipe.transformer.pos_embed]
        mods += [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]
        mods += [pipe.vae.decoder]
        self.handles = [m.register_forward_pre_hook(self._hook) for m in mods]

    def _hook(self, *args):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def flux():
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3_pipeline(seed=0)


E = flux_embeds(1)
OK = dict(height=64, width=64, speedup=SCHED, seed=0, output_type="latent", progress=False)

# (overrides of the call, exception type, text the message must contain)
BAD = [
    (dict(height=0), ValueError, "height=0"),
    (dict(width=0), ValueError, "width=0"),
    (dict(height=-32), ValueError, "height=-32"),
    (dict(height=48), ValueError, "multiple of 32"),
    (dict(height=64.0), TypeError, "height=64.0"),
    (dict(width=True), TypeError, "width=True"),
    (dict(height=65536, width=65536), ValueError, "at most 4096"),
    (dict(height=8192), ValueError, "at most 4096"),
    (dict(prompt_embeds=torch.randn(1, 8, 31)), ValueError, "last dimension 31"),
    (dict(prompt_embeds=torch.randn(8, 32)), ValueError, "shape (8, 32)"),
    (dict(prompt_embeds=np.zeros((1, 8, 32), np.float32)), TypeError, "torch.Tensor"),
    (dict(prompt_embeds=torch.zeros(1, 8, 32, dtype=torch.int64)), TypeError, "floating"),
    (dict(prompt_embeds=torch.zeros(0, 8, 32), pooled_prompt_embeds=torch.zeros(0, 32)), ValueError, ">= 1"),
    (dict(prompt_embeds=torch.randn(2, 8, 32)), ValueError, "pooled_prompt_embeds has batch 1"),
    (dict(pooled_prompt_embeds=torch.randn(1, 31)), ValueError, "last dimension 31"),
    (dict(prompt_embeds=torch.full((1, 8, 32), float("nan"))), ValueError, "NaN"),
    (dict(pooled_prompt_embeds=torch.full((1, 32), float("inf"))), ValueError, "NaN or Inf"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale=nan"),
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale=inf"),
    (dict(guidance_scale="3"), ValueError, "guidance_scale='3'"),
    # 1e39 was a late RuntimeError (float32 overflow after the text encoding)
    (dict(guidance_scale=1e39), ValueError, "guidance_scale=1e+39 is not allowed: need a number in [0, 100]"),
    (dict(guidance_scale=-5), ValueError, "guidance_scale=-5 is not allowed: need a number in [0, 100]"),
    (dict(edge_detector="sobel"), ValueError, "edge_detector='sobel'"),
    # a tensor given where a name goes was printed whole in the error line
    (dict(edge_map=torch.zeros(1, 64, 64)), ValueError, "edge_map=<Tensor of shape (1, 64, 64)> is not allowed"),
    (dict(transition_impl="cuda2"), ValueError, "transition_impl='cuda2'"),
    # was a RuntimeError at the first transition, after stage 1's model calls
    *([(dict(transition_impl="cuda"), ValueError, "transition_impl='cuda' cannot run here: impl='cuda' runs on CUDA")]
      if not torch.cuda.is_available() else []),
    (dict(generator=5, seed=None), TypeError, "generator=5"),
    (dict(generator=[torch.Generator(), None], seed=None), TypeError, "generator[1]=None"),
    (dict(generator=[torch.Generator()] * 3, seed=None), ValueError, "3 generators for a batch of 1"),
    (dict(seed=1.5), TypeError, "seed=1.5"),
    (dict(seed=-1), ValueError, "seed=-1"),
    (dict(max_sequence_length=0), ValueError, "max_sequence_length=0"),
    (dict(max_sequence_length=10_000), ValueError, "max_sequence_length=10000"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt=0"),
    (dict(num_images_per_prompt=True), TypeError, "num_images_per_prompt=True"),
    (dict(speedup=None, num_inference_steps=0), ValueError, "num_inference_steps=0"),
    (dict(speedup=None, num_inference_steps=2.0), TypeError, "num_inference_steps=2.0"),
    (dict(num_inference_steps=4), ValueError, "speedup=None only"),
    (dict(speedup="9x"), ValueError, "9x"),
    (dict(output_type="jpeg"), ValueError, "output_type='jpeg'"),
    (dict(cache="taylor:x"), ValueError, "cache='taylor:x'"),
    (dict(backend="xla"), ValueError, "backend='xla'"),
    (dict(backend="inductor", compile_options={"modee": "x"}), TypeError, "modee"),
    (dict(compile_options={"fused_qkv": True}), ValueError, "need backend"),
    (dict(backend="eager", compile_options={"mode": "max-autotune"}), ValueError,
     "backend='eager' would ignore mode='max-autotune'"),
    (dict(backend="onnx", compile_options={"cuda_graphs": True}), ValueError, "would ignore cuda_graphs=True"),
    (dict(backend="inductor", compile_options={"onnx_dir": "graphs"}), ValueError, "would ignore onnx_dir='graphs'"),
    (dict(device="cpu"), ValueError, "torch_dtype and device apply when pipe is a model folder"),
    (dict(torch_dtype=torch.float16), ValueError, "does not change the pipeline"),
    (dict(return_masks="yes"), TypeError, "return_masks='yes'"),
    (dict(negative_prompt_embeds=torch.randn(1, 8, 32)), ValueError, "negative prompts are not supported for flux"),
    (dict(prompt_embeds_mask=torch.ones(1, 8)), ValueError, "flux takes no text-token mask"),
    (dict(speedup=None, num_inference_steps=2, height=48), ValueError, "multiple of 32"),
]


@pytest.mark.parametrize("override,exc,text", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_fails_before_any_model_call(flux, override, exc, text):
    kw = {**OK, **E, **override}
    counter = CallCounter(flux)
    try:
        with pytest.raises(exc) as info:
            generate(flux, **kw)
    finally:
        counter.close()
    assert text in str(info.value), str(info.value)
    assert counter.n == 0, "a model ran before the error"


@pytest.mark.parametrize("prompt,exc,text", [(123, TypeError, "prompt=123"), ([], TypeError, "prompt=[]"),
                                              (["a", 3], TypeError, "list of strings"),
                                              # the tokenizers' TypeError named no argument, after the model loaded
                                              ("\ud800", ValueError, "prompt is not valid Unicode text"),
                                              (["a", "b\udcff"], ValueError, "prompt[1] is not valid Unicode")])
def test_bad_prompt_types(flux, prompt, exc, text):
    counter = CallCounter(flux)
    try:
        with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")):
            generate(flux, prompt, **OK)
    finally:
        counter.close()
    assert counter.n == 0


def test_prompt_and_embeds_both_or_neither(flux):
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        generate(flux, "a fox", **E, **OK)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        generate(flux, **OK)


def test_sd3_size_cap_from_its_position_table(sd3):
    cap = get_adapter(sd3).max_size()
    assert cap == 96 * 2 * 8  # tiny SD3: pos_embed_max_size 96 tokens x patch 2 x VAE 8
    counter = CallCounter(sd3)
    try:
        with pytest.raises(ValueError, match=f"at most {cap}"):
            generate(sd3, **sd3_embeds(1), **{**OK, "height": 1600, "width": 1600})
    finally:
        counter.close()
    assert counter.n == 0


def test_sd3_negative_embeddings_checked(sd3):
    emb = sd3_embeds(1)
    with pytest.raises(ValueError, match="negative_prompt_embeds has last dimension 30"):
        generate(sd3, **{**emb, "negative_prompt_embeds": torch.randn(1, 8, 30)}, **OK)
    with pytest.raises(ValueError, match="negative_prompt_embeds needs negative_pooled_prompt_embeds"):
        generate(sd3, **{**emb, "negative_pooled_prompt_embeds": None}, **OK)


@pytest.mark.parametrize("kwargs", [
    dict(steps=(10**9, 1, 1)), dict(shifts=(1e300, 3, 3)), dict(shifts=(1e-300, 3, 3)), dict(z=1e300),
    dict(ends=(1e-12, 0.5, 1.0)), dict(ends=(0.3, 1 - 1e-15, 1.0)), dict(z=float("inf")), dict(ratio=float("nan")),
])
def test_extreme_schedules_are_refused_with_a_value_error(kwargs):
    base = dict(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
    with pytest.raises(ValueError):
        RaluSchedule(**{**base, **kwargs})


@pytest.mark.parametrize("steps,ends,shifts,z", [
    ((1, 1, 1), (1e-3, 2e-3, 1.0), (1e-3, 1e3, 1e-3), 2.0), ((1000, 1000, 1000), (0.999, 0.9999, 1.0), (1e3,) * 3, 1e4),
    ((5, 1, 3), (0.5, 0.999, 1.0), (0.01, 100.0, 1.0), 2.0),
])
def test_schedules_at_the_limits_give_finite_monotone_sigmas(steps, ends, shifts, z):
    s = RaluSchedule(steps=steps, ends=ends, shifts=shifts, z=z, ratio=0.5)
    for k in range(3):
        sig = np.asarray(s.stage_sigmas(k), dtype=np.float64)
        assert np.isfinite(sig).all() and (np.diff(sig) < 0).all() and sig.min() >= 0 and sig.max() <= 1
    for k in (0, 1):
        b = s.boundary(k)
        assert all(math.isfinite(v) for v in (b.a, b.b, b.c))


def test_non_finite_latents_name_the_stage():
    pipe = build_tiny_flux_pipeline(seed=0)
    with torch.no_grad():
        pipe.transformer.proj_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="RALU stage 1"):
        generate(pipe, **E, **OK)
    with pytest.raises(FloatingPointError, match="baseline"):
        generate(pipe, **E, **{**OK, "speedup": None, "num_inference_steps": 2})


def test_subclass_of_a_supported_pipeline_is_accepted():
    from diffusers import FluxPipeline

    class MyFlux(FluxPipeline):
        pass

    base = build_tiny_flux_pipeline(seed=0)
    sub = MyFlux(**base.components)
    sub.set_progress_bar_config(disable=True)
    a = generate(base, **E, **OK).images
    assert torch.equal(generate(sub, **E, **OK).images, a)


def test_model_folder_errors_and_one_load_per_process(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        generate(str(tmp_path / "nope"), **E, **OK)
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(tmp_path)
    folder = tmp_path / "tiny"
    build_tiny_flux_pipeline(seed=0).save_pretrained(folder)
    from diffusers import DiffusionPipeline

    loads = []
    real = DiffusionPipeline.from_pretrained.__func__

    def counting(cls, *a, **k):
        loads.append(a)
        return real(cls, *a, **k)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(counting))
    a = generate(str(folder), **E, **OK).images
    b = generate(str(folder), **E, **OK).images
    assert len(loads) == 1 and torch.equal(a, b)
    assert load_pipeline(folder) is load_pipeline(str(folder))


class _MaskedFlux:
    """A FLUX adapter that declares text-token masks (validation only: every call below fails before encoding)."""

    @staticmethod
    def make(pipe):
        from ralu_runtime.adapters.flux import FluxAdapter

        class MaskedFluxAdapter(FluxAdapter):
            takes_prompt_mask = True

        return MaskedFluxAdapter(pipe)


@pytest.mark.parametrize("mask,exc,text", [
    (torch.ones(1, 7), ValueError, "expected (1, 8)"),
    (np.ones((1, 8)), TypeError, "torch.Tensor"),
    (torch.full((1, 8), 2), ValueError, "0/1"),
    (torch.zeros(1, 8), ValueError, "no valid token"),
])
def test_text_masks_are_checked(flux, mask, exc, text):
    adapter = _MaskedFlux.make(flux)
    counter = CallCounter(flux)
    try:
        with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
            generate(adapter, **E, **OK, prompt_embeds_mask=mask)
        with pytest.raises(ValueError, match="goes with negative_prompt_embeds"):
            generate(adapter, **E, **OK, negative_prompt_embeds_mask=torch.ones(1, 8))
    finally:
        counter.close()
    assert counter.n == 0


def test_transition_impl_is_checked_against_the_device(monkeypatch):
    """``transition_impl="triton"`` on a CPU needs TRITON_INTERPRET=1 (read when the kernel runs), "cuda" a CUDA
    device and the built op; "auto" and "torch" run anywhere."""
    from ralu_kernels.transition import HAS_TRITON, impl_unusable

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1 on a CPU" in impl_unusable("triton", "cpu")
    assert "runs on CUDA devices" in impl_unusable("cuda", "cpu")
    assert impl_unusable("auto", "cpu") is None and impl_unusable("torch", "cpu") is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert (impl_unusable("triton", "cpu") is None) == HAS_TRITON


def test_a_pipeline_without_vae_runs_only_calls_that_need_none():
    """``pipe.vae = None`` was a raw AttributeError after model work (stage 1, or every step before the final
    decode); now refused before any model call when the call needs a VAE, and run when it needs none."""
    pipe = build_tiny_flux_pipeline(seed=0)
    counter = CallCounter(pipe)
    pipe.vae = None
    kw = dict(OK, height=128, width=128, **flux_embeds(1))
    try:
        for extra, needle in ((dict(), "region_source='decode'"),
                              (dict(region_source="latent", output_type="pt"), "output_type='pt'"),
                              (dict(speedup=None, num_inference_steps=2, output_type="np"), "output_type='np'")):
            with pytest.raises(ValueError, match=rf"pipe.vae is None, and this call needs a VAE for {needle}"):
                generate(pipe, **{**kw, **extra})
        assert counter.n == 0
        out = generate(pipe, **{**kw, "region_source": "latent"})
        assert out.images.shape == (1, 16, 16, 16) and torch.isfinite(out.images).all()
    finally:
        counter.close()


def test_a_missing_or_foreign_transformer_and_a_missing_scheduler_are_refused_by_name():
    """``pipe.transformer = None`` or another family's transformer was an AttributeError inside the adapter;
    ``pipe.scheduler = None`` passed prepare and failed in run (the baseline sampler, an edit's start)."""
    flux = build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    kw = dict(OK, **emb)
    sd3 = build_tiny_sd3_pipeline(seed=0)
    for model, match in ((None, "pipe.transformer is None: FluxPipeline runs a FluxTransformer2DModel"),
                         (sd3.transformer, "pipe.transformer is a SD3Transformer2DModel; FluxPipeline runs a "
                                           "FluxTransformer2DModel")):
        pipe = build_tiny_flux_pipeline(seed=0)
        pipe.transformer = model
        with pytest.raises(ValueError, match=match):
            generate(pipe, **kw)
    flux.scheduler = None
    with pytest.raises(ValueError, match="pipe.scheduler is None: speedup=None runs the pipeline's own sampler"):
        generate(flux, **{**kw, "speedup": None, "num_inference_steps": 2})
    with pytest.raises(ValueError, match="pipe.scheduler is None: an edit's starting noise level"):
        generate(flux, **kw, image=torch.rand(1, 3, 64, 64), strength=0.6)
    assert torch.isfinite(generate(flux, **kw).images).all()   # a RALU preset needs no scheduler
