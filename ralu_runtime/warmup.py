"""Build every compiled graph a ``generate`` call needs, ahead of traffic: :func:`warmup`.

Lives apart from :mod:`ralu_runtime.compile` (which knows nothing of ``generate``): this module calls both.
"""
from __future__ import annotations

import time

import torch

from .adapters import get_adapter
from .api import generate
from .compile import StageRunner, compile_stats, ensure_backend


def warmup(pipe, height: int = 1024, width: int = 1024, speedup="default", batch: int = 1, *,
           backend: str | None = None, text_len: int | None = None, runs: int = 2, negative_prompt: bool = False,
           **generate_kwargs) -> dict:
    """Build every compiled graph a ``generate(pipe, height, width, speedup, batch)`` call needs, ahead of
    traffic, with zero prompt embeddings of ``text_len`` tokens (default: the adapter's ``default_text_len``, the
    length its pipeline pads prompts to: 512 for FLUX, 77 + 256 for SD3). ``backend``: install that backend first (options in ``generate_kwargs``'s
    ``compile_options``). Returns ``{"first_s", "warm_s", "compile_s", "stages": {name: {first_s, warm_s,
    compile_s}}, "builds": [...], "graphs_compiled": n}``: wall seconds of the first (compiling) run and of a
    second one, per stage, and the graphs torch._dynamo compiled. ``negative_prompt``: whether the calls to warm up
    for give a negative prompt; the warm-up runs classifier-free guidance where such a call would
    (``adapter.runs_cfg``: SD3 at guidance above 1 with or without one, Qwen-Image only with one). The compiling run, like any ``generate`` call that
    compiled, ends with a full garbage collection (:mod:`ralu_runtime.heap`)."""
    adapter = get_adapter(pipe)
    opts = generate_kwargs.pop("compile_options", None) or {}
    if backend is not None:
        ensure_backend(adapter, backend, **opts)
    runner = adapter.runner
    n_builds = len(runner.builds) if isinstance(runner, StageRunner) else 0
    guidance = generate_kwargs.get("guidance_scale")
    guidance = adapter.guidance_default() if guidance is None else float(guidance)
    emb = adapter.dummy_embeds(batch, text_len, negative=adapter.runs_cfg(guidance, bool(negative_prompt)))
    before = compile_stats()["unique_graphs"]
    runs_out = []
    for i in range(max(1, runs)):
        t0 = time.perf_counter()
        out = generate(adapter, **emb, height=height, width=width, speedup=speedup, seed=i, output_type="pt",
                       progress=False, **generate_kwargs)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        runs_out.append((time.perf_counter() - t0, dict(out.timings)))
    first, warm = runs_out[0], runs_out[-1]
    stages = {name: {"first_s": sec, "warm_s": warm[1].get(name, float("nan")),
                     "compile_s": max(0.0, sec - warm[1].get(name, 0.0))} for name, sec in first[1].items()}
    builds = runner.builds[n_builds:] if isinstance(runner, StageRunner) else []
    return {"first_s": first[0], "warm_s": warm[0], "compile_s": max(0.0, first[0] - warm[0]), "stages": stages,
            "builds": [b.__dict__ for b in builds], "graphs_compiled": compile_stats()["unique_graphs"] - before}
