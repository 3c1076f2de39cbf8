"""The smoke step's editing job (``benchmarks/gpu_smoke.py``, job ``editing``): every editing path of issue 23 at the
FLUX.1-dev smoke shape (published width, 2 + 2 blocks; the CPU dry run: the dry width, float32).

Checks, in order (each a row of the smoke table; tolerance: the smoke step's, relative L2 of the latents):

* ``build``: the FLUX.1-dev smoke pipeline, and FLUX.1 Fill (384 input channels) / control (128) transformers of
  the same shape, random weights;
* ``img2img_parity`` / ``inpaint_parity`` / ``kontext_parity`` / ``fill_parity`` / ``control_parity``:
  ``generate(speedup=None)`` against diffusers' ``FluxImg2ImgPipeline`` (strength 0.6), ``FluxInpaintPipeline``
  (0.9), ``FluxKontextPipeline`` (a reference of the output size, no auto-resize), ``FluxFillPipeline`` and
  ``FluxControlPipeline``, same generator, same prompt embeddings;
* ``ralu_eager``: each workflow with RALU 7x, finite; the eager references of the next check (the preset's schedule
  with ratio 1: every coarse block upsampled at once, so no near-tie of the edge counts decides the tokens);
* ``compiled_ralu``: the same calls with the smoke step's compile level (inductor + CUDA graphs on the GPU: the
  conditioning channels and the reference tokens are graph inputs) equal to eager, and a second Kontext reference
  adds no dynamo graph.
"""
from __future__ import annotations

import dataclasses

EDIT_CHECKS = [("build", 25.0), ("img2img_parity", 5.0), ("inpaint_parity", 5.0), ("kontext_parity", 8.0),
               ("fill_parity", 6.0), ("control_parity", 6.0), ("ralu_eager", 12.0), ("compiled_ralu", 90.0)]
WORKFLOWS = ("img2img", "inpaint", "kontext", "fill", "control")
STRENGTH = {"img2img": 0.6, "inpaint": 0.9}  # parity; the RALU runs use 0.9 (an early entry stage) for both


def _inputs(h: int, w: int):
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


def editing_job(ctx, rec) -> None:
    import torch

    from benchmarks import gpu_smoke as G
    from benchmarks import smoke_families as SF
    from ralu_runtime import generate
    from ralu_runtime.compile import compile_stats

    fam = SF.FAMILIES["flux-dev"]
    dev, dt = ctx.device, ctx.dtype
    size = SF.sizes(fam, ctx.dry)
    h, w = size["height"], size["width"]
    steps = G.PARITY_STEPS  # 4: strength 0.6 keeps 2 steps
    level = G._level(ctx, "editing", fam.level)
    backend, opts = G.compile_backend(level, False, ctx.cuda)
    edge = {"edge_detector": "gpu"}
    lat = dict(height=h, width=w, guidance_scale=fam.guidance, output_type="latent", progress=False)
    st: dict = {}

    def build(c):
        st["base"] = SF.build(fam, "dry" if ctx.dry else "smoke", dev, dt)
        st["pipes"] = build_edit_pipelines(st["base"], dev, dt)
        st["emb"] = SF.embeds(fam, st["base"], 1, ctx.dry, dev, dt, seed=0)
        st["image"], st["mask"] = _inputs(h, w)
        c.info.update(size=[h, w], dtype=ctx.dtype_name(), level=level, compile_options=opts,
                      in_channels={k: int(p.transformer.config.in_channels) for k, p in st["pipes"].items()})

    def parity(workflow):
        def body(c):
            pipe = st["pipes"][workflow]
            kw = edit_kwargs(workflow, st["image"], st["mask"], h, w)
            ref = pipeline_latents(pipe, workflow, st["emb"], kw, steps=steps, guidance=fam.guidance, seed=7, h=h,
                                   w=w)
            out = generate(pipe, **st["emb"], **kw, speedup=None, num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(7), **lat).images
            c.compare(out, ref, "latents")
        return body

    def ralu_kwargs(workflow):
        return edit_kwargs(workflow, st["image"], st["mask"], h, w, strength=0.9)

    def ralu_eager(c):
        st["pinned"], st["refs"] = {}, {}
        for wf in WORKFLOWS:
            pipe = st["pipes"][wf]
            out = generate(pipe, **st["emb"], **ralu_kwargs(wf), speedup="7x", seed=11, **lat, **edge)
            c.expect(G._finite(out.images), f"{wf}: RALU 7x latents are not finite")
            sched = dataclasses.replace(out.schedule, ratio=1.0, name=f"{out.schedule.name} (ratio 1)")
            st["pinned"][wf] = sched
            st["refs"][wf] = generate(pipe, **st["emb"], **ralu_kwargs(wf), speedup=sched, seed=13, **lat,
                                      **edge).images
        c.info["schedule"] = {"steps": list(st["pinned"]["kontext"].steps)}

    def compiled(c):
        compiled_kw = dict(backend=backend, compile_options=opts)
        for wf in WORKFLOWS:
            pipe = st["pipes"][wf]
            out = generate(pipe, **st["emb"], **ralu_kwargs(wf), speedup=st["pinned"][wf], seed=13, **lat, **edge,
                           **compiled_kw).images
            c.compare(out, st["refs"][wf], wf)
        g0 = compile_stats()["unique_graphs"]
        other = torch.flip(st["image"], dims=[-1])
        kw = {**ralu_kwargs("kontext"), "image": other}
        out = generate(st["pipes"]["kontext"], **st["emb"], **kw, speedup=st["pinned"]["kontext"], seed=13, **lat,
                       **edge, **compiled_kw).images
        c.expect(G._finite(out), "second Kontext reference: latents not finite")
        graphs = compile_stats()["unique_graphs"] - g0
        c.info["second_reference_new_graphs"] = graphs
        c.expect(graphs == 0, f"{graphs} new dynamo graph(s) for a second Kontext reference")

    with torch.no_grad():
        G.run_check(rec, "build", build, needs=())
        for wf in WORKFLOWS:
            G.run_check(rec, f"{wf}_parity", parity(wf), tol=ctx.tol)
        G.run_check(rec, "ralu_eager", ralu_eager)
        G.run_check(rec, "compiled_ralu", compiled, tol=ctx.tol, needs=("ralu_eager",))
