"""Strict behaviour on every input (issue 22, library part): stateful VAEs never decode from two threads at once,
non-finite decodes raise, embeddings' dtype / device are cast or refused, one prompt rule for all families,
schedulers ralu cannot follow are refused or followed, the work of a call is bounded, ``ralu generate --out`` is
checked by opening the file. Tiny random models, CPU."""
import importlib

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.serving import Engine, EngineConfig
from ralu_runtime.tiny import build_tiny

A = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
B = RaluSchedule(steps=(1, 2, 1), ends=(0.4, 0.6, 1.0), shifts=(3.0, 2.0, 3.0), z=3.0, ratio=0.5)
TOL = dict(rtol=1e-4, atol=1e-4)

# the families whose VAE keeps state on its modules between calls (causal 3-D VAEs): tiny model, embeddings module,
# mixed sizes (pixels) and frames
STATEFUL = {
    "qwen-image": ("tiny-qwen-image", "qwen_image", [(128, 128), (128, 160), (96, 128)], {}),
    "wan": ("tiny-wan", "wan", [(64, 64), (64, 96), (96, 64)], {"num_frames": 5}),
    "hunyuan-video-1.5": ("tiny-hunyuan-video15", "hunyuan_video15", [(64, 64), (64, 96), (96, 64)],
                          {"num_frames": 5}),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(STATEFUL))
def test_engine_mixed_sizes_on_stateful_vaes_equal_generate_alone(family):
    """Issue 22 item 0: the engine's batched final decode and another request's preview decode used one causal VAE
    at the same time (Qwen-Image: 'Sizes of tensors must match' inside its feature cache)."""
    name, module, sizes, extra = STATEFUL[family]
    pipe = build_tiny(name)
    embeds = importlib.import_module(f"ralu_runtime.tiny.{module}").random_embeds
    reqs = []
    for i, ((h, w), speedup) in enumerate(zip(sizes + sizes[:1], (A, B, A, None))):
        kw = dict(height=h, width=w, speedup=speedup, **extra, **embeds(pipe, 1, 8, seed=i, cfg=True))
        if speedup is None:
            kw["num_inference_steps"] = 3
        reqs.append((kw, 20 + i))
    with Engine(pipe, EngineConfig(gather_timeout_s=0.01), output_type="pt") as eng:
        handles = [eng.submit(seed=seed, **kw) for kw, seed in reqs]
        outs = [h.result(timeout=600) for h in handles]
    for (kw, seed), out in zip(reqs, outs):
        ref = generate(pipe, seed=seed, output_type="pt", progress=False, **kw)
        torch.testing.assert_close(out.images, ref.images, **TOL)


# ------------------------------------------------------------------------------------------------ item 7
@pytest.fixture(scope="module")
def flux():
    return build_tiny("tiny-flux")


@pytest.fixture(scope="module")
def sd3():
    return build_tiny("tiny-sd3")


def _small(**kw):
    return dict(height=64, width=64, seed=1, progress=False, **kw)


@pytest.mark.parametrize("speedup,region_source,match", [
    (None, "decode", "decode of the final latents"),
    (A, "decode", "decode of the region-choice preview"),
    (A, "latent", "decode of the final latents"),
])
def test_non_finite_decode_raises_naming_the_decode(flux, speedup, region_source, match):
    """Issue 22 item 7: a NaN in the VAE decoder returned NaN images with no error."""
    from tiny_inputs import flux_embeds

    handle = flux.vae.decoder.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        kw = dict(num_inference_steps=2) if speedup is None else {}
        with pytest.raises(FloatingPointError, match=match):
            generate(flux, speedup=speedup, region_source=region_source, output_type="pt", **kw,
                     **_small(**flux_embeds(1)))
    finally:
        handle.remove()
    out = generate(flux, speedup=A, output_type="pt", **_small(**flux_embeds(1)))
    assert torch.isfinite(out.images).all()
