"""Editing and conditioning requests ralu does not run, refused up front with the reason (issue 23).

One place for every refusal of this kind:

* :data:`REFUSED_PIPELINES`: diffusers 0.42.1 pipeline classes of the families ralu supports that ralu does not run
  (class name -> what is not supported). :func:`ralu_runtime.adapters.get_adapter` raises
  :class:`UnsupportedPipelineError` for them (and their subclasses), before any model call.
* :data:`FAMILY_EDIT_REFUSALS`: families whose text-to-image pipeline takes no ``image=`` / ``mask_image=``
  (adapter family -> the reason); :func:`check_edit_request` raises for them, and for ``control_image=`` on any
  pipeline that takes none.

What works instead is always named: the editing pipelines of :data:`ralu_runtime.families.EDIT_PIPELINES` (read at
the time of the error, so a workflow added there is listed without touching this file).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from .families import EDIT_PIPELINES

__all__ = ["FAMILY_EDIT_REFUSALS", "REFUSED_PIPELINES", "UnsupportedPipelineError", "check_edit_request",
           "check_refused_pipeline", "refused_reason", "supported_editing"]


class UnsupportedPipelineError(ValueError, NotImplementedError):
    """A pipeline class or editing request ralu does not run (a ValueError and a NotImplementedError)."""


_NOT_YET = "is not supported by ralu yet"
_CONTROLNET = f"ControlNet conditioning (a second network's residuals added to the transformer's blocks) {_NOT_YET}"

# pipeline class name (diffusers 0.42.1) -> what is not supported. Not here: the editing pipelines ralu runs
# (families.EDIT_PIPELINES) and the text-to-image pipelines of families.FAMILIES.
REFUSED_PIPELINES: Mapping[str, str] = MappingProxyType({
    # FLUX.1
    "FluxKontextInpaintPipeline": f"inpainting with a FLUX.1 Kontext reference image {_NOT_YET}",
    "FluxControlImg2ImgPipeline": f"FLUX.1 Control (Canny / Depth control latents as extra input channels) with "
                                  f"img2img {_NOT_YET}",
    "FluxControlInpaintPipeline": f"FLUX.1 Control (Canny / Depth control latents as extra input channels) with "
                                  f"inpainting {_NOT_YET}",
    "FluxControlNetPipeline": f"FLUX.1 {_CONTROLNET}",
    "FluxControlNetImg2ImgPipeline": f"FLUX.1 {_CONTROLNET} (with img2img)",
    "FluxControlNetInpaintPipeline": f"FLUX.1 {_CONTROLNET} (with inpainting)",
    "FluxPriorReduxPipeline": "it makes prompt embeddings from an image and runs no denoising: run it yourself and "
                              "give its prompt_embeds / pooled_prompt_embeds to ralu_runtime.generate with a "
                              "FluxPipeline",
    # FLUX.2
    "Flux2KleinInpaintPipeline": f"inpainting with FLUX.2-klein {_NOT_YET}",
    "Flux2KleinKVPipeline": f"FLUX.2-klein reference images with cached reference keys / values {_NOT_YET} "
                            "(Flux2KleinPipeline without image= runs)",
    # Qwen-Image
    "QwenImageEditPipeline": f"reference-image editing with Qwen-Image-Edit {_NOT_YET}",
    "QwenImageEditPlusPipeline": f"multi-reference editing with Qwen-Image-Edit-Plus {_NOT_YET}",
    "QwenImageEditInpaintPipeline": f"inpainting with Qwen-Image-Edit {_NOT_YET}",
    "QwenImageControlNetPipeline": f"Qwen-Image {_CONTROLNET}",
    "QwenImageControlNetInpaintPipeline": f"Qwen-Image {_CONTROLNET} (with inpainting)",
    "QwenImageLayeredPipeline": f"layer decomposition with Qwen-Image-Layered {_NOT_YET}",
    # SD3 / SD3.5
    "StableDiffusion3ControlNetPipeline": f"SD3 {_CONTROLNET}",
    "StableDiffusion3ControlNetInpaintingPipeline": f"SD3 {_CONTROLNET} (with inpainting)",
    "StableDiffusion3PAGPipeline": f"perturbed-attention guidance (PAG) {_NOT_YET} (StableDiffusion3Pipeline runs)",
    "StableDiffusion3PAGImg2ImgPipeline": f"img2img with perturbed-attention guidance (PAG) {_NOT_YET}",
    # Z-Image
    "ZImageControlNetPipeline": f"Z-Image {_CONTROLNET}",
    "ZImageControlNetInpaintPipeline": f"Z-Image {_CONTROLNET} (with inpainting)",
    "ZImageOmniPipeline": f"Z-Image-Omni (reference-image conditioning) {_NOT_YET}",
    # Wan
    "WanImageToVideoPipeline": f"image-to-video with Wan {_NOT_YET}",
    "WanVideoToVideoPipeline": f"video-to-video with Wan {_NOT_YET}",
    "WanVACEPipeline": f"Wan VACE (reference images, masks and control videos) {_NOT_YET}",
    "WanAnimatePipeline": f"Wan-Animate (pose / face / background videos) {_NOT_YET}",
    # HunyuanVideo 1.5
    "HunyuanVideo15ImageToVideoPipeline": f"image-to-video with HunyuanVideo 1.5 {_NOT_YET}",
})

# adapter family -> why its text-to-image pipeline takes no image= / mask_image= (the families not listed run
# editing: families.EDIT_PIPELINES)
FAMILY_EDIT_REFUSALS: Mapping[str, str] = MappingProxyType({
    "flux2": f"reference-image editing with FLUX.2 (image= on Flux2Pipeline / Flux2KleinPipeline: the reference "
             f"images' tokens joined to the sequence) {_NOT_YET}",
    "flux2-klein": f"reference-image editing with FLUX.2-klein (image=) {_NOT_YET}",
    "wan": f"image- or video-conditioned generation with Wan {_NOT_YET}",
    "hunyuan-video-1.5": f"image-conditioned generation with HunyuanVideo 1.5 {_NOT_YET}",
})


def supported_editing() -> str:
    """What editing ralu runs, for error messages: the classes of :data:`ralu_runtime.families.EDIT_PIPELINES`."""
    return ("supported editing: " + ", ".join(sorted(EDIT_PIPELINES)) + " (or the text-to-image pipeline of the "
            "same family given image= / mask_image=); docs/editing.md")


def refused_reason(pipe) -> tuple[str, str] | None:
    """``(class name, reason)`` of the first class of ``type(pipe).__mro__`` in :data:`REFUSED_PIPELINES` (a
    subclass of a refused pipeline is refused), or None."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in REFUSED_PIPELINES:
            return cls.__name__, REFUSED_PIPELINES[cls.__name__]
    return None


def check_refused_pipeline(pipe) -> None:
    """Raise :class:`UnsupportedPipelineError` naming ``pipe``'s class, what is not supported and what works
    instead when ``pipe`` is (or derives from) a class of :data:`REFUSED_PIPELINES`; else return None."""
    hit = refused_reason(pipe)
    if hit is not None:
        name, reason = hit
        own = type(pipe).__name__
        shown = own if own == name else f"{own} (a {name})"
        raise UnsupportedPipelineError(f"{shown}: {reason}; {supported_editing()}")


def check_edit_request(adapter, *, image=None, mask_image=None, control_image=None) -> None:
    """Refuse, before any model work, ``image=`` / ``mask_image=`` on a family without editing
    (:data:`FAMILY_EDIT_REFUSALS`, video families included) and ``control_image=`` on a pipeline that takes none
    (any pipeline whose :data:`ralu_runtime.families.EDIT_PIPELINES` kind is not a control kind). Raises
    :class:`UnsupportedPipelineError` naming the pipeline class, the argument, the reason and what works instead."""
    pipe = getattr(adapter, "pipe", None)
    cls = type(pipe).__name__ if pipe is not None else type(adapter).__name__
    family = getattr(adapter, "family", None)
    given = [n for n, v in (("image", image), ("mask_image", mask_image)) if v is not None]
    if given and family in FAMILY_EDIT_REFUSALS:
        raise UnsupportedPipelineError(f"{cls}: {' / '.join(n + '=' for n in given)} given, but "
                                       f"{FAMILY_EDIT_REFUSALS[family]}; {supported_editing()}")
    if control_image is not None:
        kind = next((EDIT_PIPELINES[c.__name__][1] for c in type(pipe).__mro__ if c.__name__ in EDIT_PIPELINES),
                    None)
        if kind is None or "control" not in kind:
            raise UnsupportedPipelineError(
                f"{cls}: control_image= given, but this pipeline takes no control image: control_image= goes with "
                f"a FluxControlPipeline (FLUX.1 Canny / Depth; ControlNets and FLUX.1 Control img2img / inpainting "
                f"are not supported by ralu yet); "
                f"{supported_editing()}")
