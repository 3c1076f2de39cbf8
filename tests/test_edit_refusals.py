"""Editing ralu does not run is refused up front with the reason (ralu_runtime.refusals, issue 23): every class of
REFUSED_PIPELINES, image= / mask_image= on the families without editing, control_image= on pipelines that take
none; no model (transformer, VAE, text encoder) is ever called."""
import inspect

import pytest
import torch

from ralu_runtime import generate
from ralu_runtime.adapters import ADAPTERS, get_adapter
from ralu_runtime.editing import EDIT_FAMILIES
from ralu_runtime.families import EDIT_PIPELINES, FAMILIES
from ralu_runtime.refusals import (FAMILY_EDIT_REFUSALS, REFUSED_PIPELINES, UnsupportedPipelineError,
                                   check_refused_pipeline, supported_editing)

H, W = 64, 64

# the tiny text-to-image pipeline whose components build each refused class (longest class-name prefix wins)
_SOURCES = {"Flux": "flux", "Flux2": "flux2-klein", "StableDiffusion3": "sd3", "QwenImage": "qwen-image",
            "ZImage": "z-image", "Chroma": "chroma", "Wan": "wan", "HunyuanVideo15": "hunyuan-video-1.5"}


def _build(family):
    from ralu_runtime.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
    from ralu_runtime.tiny.chroma import build_tiny_chroma_pipeline
    from ralu_runtime.tiny.flux2 import build_tiny_flux2_pipeline
    from ralu_runtime.tiny.hunyuan_video15 import build_tiny_hunyuan_video15_pipeline
    from ralu_runtime.tiny.qwen_image import build_tiny_qwen_image_pipeline
    from ralu_runtime.tiny.wan import build_tiny_wan_pipeline
    from ralu_runtime.tiny.z_image import build_tiny_z_image_pipeline

    return {"flux": build_tiny_flux_pipeline, "sd3": build_tiny_sd3_pipeline, "chroma": build_tiny_chroma_pipeline,
            "flux2": build_tiny_flux2_pipeline, "flux2-klein": lambda: build_tiny_flux2_pipeline(klein=True, distilled=True),
            "qwen-image": lambda: build_tiny_qwen_image_pipeline(num_layers=1), "z-image": build_tiny_z_image_pipeline,
            "wan": build_tiny_wan_pipeline, "hunyuan-video-1.5": build_tiny_hunyuan_video15_pipeline}[family]()


@pytest.fixture(scope="module")
def tiny():
    """family -> tiny text-to-image pipeline (built once per module, on first use)."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _build(family)
        return cache[family]
    return get


class _Calls:
    """Counts forward calls of every torch module among a pipeline's components."""

    def __init__(self, pipe):
        self.n = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in pipe.components.values()
                        if isinstance(m, torch.nn.Module)]
        assert self.handles, "no model to watch"

    def _hook(self, *_):
        self.n += 1

    def close(self):
        for h in self.handles:
            h.remove()


def _refused_instance(name, tiny):
    """An instance of diffusers' class ``name`` built from tiny components (the required components ralu's tiny
    models lack, e.g. a ControlNet or an image encoder, as None)."""
    import diffusers

    cls = getattr(diffusers, name)
    prefix = max((p for p in _SOURCES if name.startswith(p)), key=len)
    comps = tiny(_SOURCES[prefix]).components
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: comps.get(k) for k, p in params.items() if k != "self" and (k in comps or p.default is p.empty)}
    try:
        return cls(**kwargs)
    except (AttributeError, TypeError):  # its __init__ reads the missing component (ZImageControlNet*)
        pipe = cls.__new__(cls)  # the class (name, MRO) without components: refused on the class alone
        pipe.__dict__.update(comps)
        return pipe


def _image():
    return torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))


def test_the_table_names_real_classes_not_run_by_ralu():
    import diffusers

    assert sorted(n for n in REFUSED_PIPELINES if not hasattr(diffusers, n)) == []
    assert not set(REFUSED_PIPELINES) & set(EDIT_PIPELINES)
    assert not set(REFUSED_PIPELINES) & set(ADAPTERS)
    assert set(FAMILY_EDIT_REFUSALS) <= set(FAMILIES)
    assert not set(FAMILY_EDIT_REFUSALS) & set(EDIT_FAMILIES)  # the families that edit
    assert {"chroma", "z-image", "qwen-image"} <= set(EDIT_FAMILIES)
    for reason in (*REFUSED_PIPELINES.values(), *FAMILY_EDIT_REFUSALS.values()):
        assert reason and "  " not in reason


@pytest.mark.parametrize("name", sorted(REFUSED_PIPELINES))
def test_every_refused_pipeline_fails_before_any_model_call(name, tiny):
    pipe = _refused_instance(name, tiny)
    assert type(pipe).__name__ == name
    calls = _Calls(tiny(_SOURCES[max((p for p in _SOURCES if name.startswith(p)), key=len)]))
    try:
        with pytest.raises(UnsupportedPipelineError) as err:
            generate(pipe, "a cat", image=_image(), height=H, width=W, progress=False)
    finally:
        calls.close()
    msg = str(err.value)
    assert msg.startswith(f"{name}: {REFUSED_PIPELINES[name]}")
    supported = msg.partition("supported editing: ")[2]
    assert "FluxImg2ImgPipeline" in supported and "StableDiffusion3InpaintPipeline" in supported, msg
    assert isinstance(err.value, ValueError) and isinstance(err.value, NotImplementedError)
    assert calls.n == 0


def test_a_subclass_of_a_refused_pipeline_is_refused_naming_both():
    from diffusers import QwenImageEditPipeline

    class MyEdit(QwenImageEditPipeline):
        pass

    pipe = MyEdit.__new__(MyEdit)  # no components needed: refused on the class alone
    with pytest.raises(UnsupportedPipelineError, match=r"^MyEdit \(a QwenImageEditPipeline\): reference-image"):
        generate(pipe, "a cat", progress=False)
    with pytest.raises(UnsupportedPipelineError, match="QwenImageEditPipeline"):
        check_refused_pipeline(pipe)
    check_refused_pipeline(object())  # anything else: no refusal from the table


def test_an_unknown_class_keeps_the_generic_error():
    with pytest.raises(ValueError, match="unsupported model class 'object'"):
        generate(object(), "a cat", progress=False)


@pytest.mark.parametrize("family", sorted(FAMILY_EDIT_REFUSALS))
@pytest.mark.parametrize("arg", ["image", "mask_image", "control_image"])
def test_editing_arguments_on_a_family_without_editing_are_refused(family, arg, tiny):
    pipe = tiny(family)
    assert get_adapter(pipe).family == family
    value = _image() if arg != "mask_image" else torch.ones(1, 1, H, W)
    calls = _Calls(pipe)
    try:
        with pytest.raises(UnsupportedPipelineError) as err:
            generate(pipe, "a cat", height=H, width=W, progress=False, **{arg: value})
    finally:
        calls.close()
    msg = str(err.value)
    assert msg.startswith(f"{type(pipe).__name__}: {arg}= given")
    assert (FAMILY_EDIT_REFUSALS[family] if arg != "control_image" else "takes no control image") in msg
    assert supported_editing() in msg
    assert calls.n == 0


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_control_image_on_a_pipeline_without_control_is_refused(family, tiny):
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3InpaintPipeline

    t2i = tiny(family)
    edit = (FluxImg2ImgPipeline if family == "flux" else StableDiffusion3InpaintPipeline)(**t2i.components)
    for pipe in (t2i, edit):
        calls = _Calls(pipe)
        try:
            with pytest.raises(UnsupportedPipelineError, match=f"^{type(pipe).__name__}: control_image= given"):
                generate(pipe, "a cat", image=_image(), control_image=_image(), height=H, width=W, progress=False)
        finally:
            calls.close()
        assert calls.n == 0


@torch.no_grad()
def test_supported_editing_still_runs(tiny):
    """The refusals do not catch what ralu runs: FLUX.1 img2img from the text-to-image pipeline with image=."""
    out = generate(tiny("flux"), "a cat", image=_image(), strength=0.5, height=H, width=W, speedup=None,
                   num_inference_steps=2, output_type="latent", progress=False, max_sequence_length=16)
    assert out.images.shape[0] == 1
