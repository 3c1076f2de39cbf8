"""The editing workflows of the smoke step's ``editing`` job (``benchmarks/gpu_smoke.py``: ``editing_job``) and of
``benchmarks/editing.py --cpu``: their pipelines over one FLUX.1 pipeline's components, inputs and diffusers' own
latents. The job covers every editing path of issue 23 at the FLUX.1-dev smoke shape (published width, 2 + 2 blocks;
the CPU dry run: the dry width, float32).

Checks, in order (each a row of the smoke table; tolerance: the smoke step's, relative L2 of the latents):

* ``build``: the FLUX.1-dev smoke pipeline, and FLUX.1 Fill (384 input channels) / control (128) transformers of
  the same shape, random weights;
* ``img2img_parity`` / ``inpaint_parity`` / ``kontext_parity`` / ``fill_parity`` / ``control_parity``:
  ``generate(speedup=None)`` against diffusers' ``FluxImg2ImgPipeline`` (strength 0.6), ``FluxInpaintPipeline``
  (0.9), ``FluxKontextPipeline`` (a reference of the output size, no auto-resize), ``FluxFillPipeline`` and
  ``FluxControlPipeline``, same generator, same prompt embeddings;
* ``ralu_eager``: each workflow with RALU 7x, finite; the eager references of the next check (the preset's schedule
  with ratio 1: every coarse block upsampled at once, so no near-tie of the edge counts decides the tokens);
* ``compiled_ralu``: the same calls at the job's compile level (:data:`EDIT_LEVEL`: dynamo + CUDA graphs on the
  GPU, the conditioning channels and the reference tokens graph inputs) equal to eager, and a second Kontext
  reference adds no dynamo graph.
"""
from __future__ import annotations


# The job's compile level: dynamo (CUDA graphs of every stage call, guards and recompiles, no codegen). The editing
# workflows run FLUX.1's own block functions, whose inductor codegen the flux-dev job compiles at this shape; what is
# new here (conditioning channels, reference tokens, a truncated schedule) lives in the graphs and their inputs.
# Dynamo tracing of the five workflows and their captures: ~30 s expected, against ~90 s for a cold inductor compile.
EDIT_LEVEL = "dynamo"
EDIT_CHECKS = [("build", 25.0), ("img2img_parity", 5.0), ("inpaint_parity", 5.0), ("kontext_parity", 8.0),
               ("fill_parity", 6.0), ("control_parity", 6.0), ("ralu_eager", 12.0), ("compiled_ralu", 30.0)]
WORKFLOWS = ("img2img", "inpaint", "kontext", "fill", "control")
STRENGTH = {"img2img": 0.6, "inpaint": 0.9}  # parity; the RALU runs use 0.9 (an early entry stage) for both


def edit_inputs(h: int, w: int):
    """A source image ``(1, 3, h, w)`` in [0, 1] (float32, CPU) and a mask (1 = repaint: a centred rectangle)."""
    import torch

    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, h, w, generator=g)
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 1.0
    return image, mask


def build_edit_pipelines(base, device, dtype) -> dict:
    """``{workflow: pipeline}`` over ``base``'s components (a FLUX.1 pipeline); Fill and control get a transformer of
    ``base``'s config with 384 / 128 input channels (64 out), random weights on ``device`` in ``dtype``."""
    import diffusers
    import torch

    from benchmarks.smoke_families import _rebuilt
    from ralu_runtime.tiny import building

    comps = dict(base.components)
    out = {"img2img": diffusers.FluxImg2ImgPipeline(**comps), "inpaint": diffusers.FluxInpaintPipeline(**comps),
           "kontext": diffusers.FluxKontextPipeline(**comps)}
    plain = {k: v for k, v in comps.items() if k in ("scheduler", "vae", "text_encoder", "tokenizer",
                                                      "text_encoder_2", "tokenizer_2")}
    torch.manual_seed(1)
    with building(device, dtype):
        for name, cls, extra in (("fill", "FluxFillPipeline", 320), ("control", "FluxControlPipeline", 64)):
            tr = _rebuilt(base.transformer, {"in_channels": 64 + extra, "out_channels": 64})
            out[name] = getattr(diffusers, cls)(transformer=tr, **plain)
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def edit_kwargs(workflow: str, image, mask, h: int, w: int, strength: float | None = None) -> dict:
    """The editing arguments of ``generate`` for a workflow (diffusers' names, except Kontext's ``auto_resize``)."""
    if workflow == "img2img":
        return {"image": image, "strength": strength or STRENGTH["img2img"]}
    if workflow == "inpaint":
        return {"image": image, "mask_image": mask, "strength": strength or STRENGTH["inpaint"]}
    if workflow == "kontext":
        return {"image": image, "max_area": h * w, "auto_resize": False}
    if workflow == "fill":
        return {"image": image, "mask_image": mask}
    if workflow == "control":
        return {"control_image": image}
    raise ValueError(f"workflow={workflow!r}: choose one of {WORKFLOWS}")


def pipeline_latents(pipe, workflow: str, emb: dict, kw: dict, *, steps: int, guidance: float, seed: int, h: int,
                     w: int):
    """The diffusers pipeline's own latents ``(1, C, h / 8, w / 8)`` (unpacked) for the same arguments."""
    import torch

    kw = dict(kw)
    if workflow == "kontext":
        kw["_auto_resize"] = kw.pop("auto_resize")
    lat = pipe(**emb, **kw, height=h, width=w, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="latent").images
    return pipe._unpack_latents(lat, h, w, pipe.vae_scale_factor)
