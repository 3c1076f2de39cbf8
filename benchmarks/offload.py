"""diffusers' model CPU offload under ralu: RALU ``generate`` on a FLUX.1 pipeline kept on the device (``resident``)
against the same pipeline under ``pipe.enable_model_cpu_offload()`` (``offloaded``), A/B in one process.

The offloaded call moves the transformer to the device before its first model call (and the VAE for the decodes)
and every model back to the CPU at the end (``maybe_free_model_hooks``), as the diffusers pipeline does; ralu keeps
the transformer on the device through RALU's region-choice preview decode (``ralu_runtime/offload.py``). Timed: one
whole ``generate`` call (latents decoded, eager) per variant; the two alternate over ``--rounds`` rounds. Also
recorded: peak device memory of a call, the bytes of the transformer, and whether the two results agree (they
should be equal: the same kernels run on the same device). On a CPU the hooks' moves are no-ops (the ratio shows
ralu's bookkeeping only). Random weights (no download), full FLUX.1 width at reduced depth on a GPU.

Writes ``offload_<device>.json`` / ``.png``.

    python benchmarks/offload.py                                            # GPU: full width, 4 + 8 blocks, 1024^2
    python benchmarks/offload.py --size small --resolution 256              # CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (add_flux_shape_args, bar_plot, device_slug, flux_shape,  # noqa: E402
                                positive_int, print_table, write_json)
from ralu_runtime import generate  # noqa: E402
from ralu_runtime.families import FAMILIES  # noqa: E402
from ralu_runtime.tiny.flux import build_flux_pipeline, random_embeds  # noqa: E402

VARIANTS = ("resident", "offloaded")


def main(argv=None) -> int:
    cuda_here = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flux_shape_args(ap, cuda_here)
    ap.add_argument("--speedup", default="7x", choices=FAMILIES["flux"].presets, help="RALU preset (default 7x)")
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--device", default="cuda" if cuda_here else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="output name (default offload_<device>)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    depth, resolution = flux_shape(args, cuda, multiple=32, why="RALU's coarse blocks")

    pipe = build_flux_pipeline(args.size, device=args.device, dtype=dtype, **depth)
    embeds = random_embeds(pipe, 1, args.text_len, device=args.device, dtype=dtype)
    kw = dict(height=resolution, width=resolution, speedup=args.speedup, seed=0, output_type="pt", progress=False)

    def place(variant: str) -> None:
        if variant == "offloaded":
            pipe.enable_model_cpu_offload(device=args.device)
        else:
            pipe.remove_all_hooks()
            pipe.to(args.device)

    def call(variant: str):
        place(variant)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = generate(pipe, **embeds, **kw)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else None
        where = next(pipe.transformer.parameters()).device.type
        return out.images.float().cpu(), seconds, peak, where

    runs = {v: {"s": [], "peak": [], "after": None, "images": None} for v in VARIANTS}
    for v in VARIANTS:  # warm-up: the first call of each (allocator, kernels, the first move)
        runs[v]["images"] = call(v)[0]
    for _ in range(args.rounds):  # alternately: drift of the machine hits both
        for v in VARIANTS:
            _, seconds, peak, where = call(v)
            runs[v]["s"].append(seconds)
            runs[v]["peak"].append(peak)
            runs[v]["after"] = where
    place("resident")

    ref = runs["resident"]["images"]
    rows = []
    for v in VARIANTS:
        r = runs[v]
        peak = max(r["peak"]) if cuda else None
        rows.append({"variant": v, "mean_s": statistics.fmean(r["s"]), "round_s": [round(s, 4) for s in r["s"]],
                     "peak_GiB": None if peak is None else peak / 2**30, "transformer_after_call": r["after"],
                     "max_abs_diff": (r["images"] - ref).abs().max().item()})
    time_ratio = rows[1]["mean_s"] / rows[0]["mean_s"]
    memory_ratio = (rows[1]["peak_GiB"] / rows[0]["peak_GiB"]) if cuda else None
    print_table(rows, ["variant", "mean_s", "round_s", "peak_GiB", "transformer_after_call", "max_abs_diff"])
    print(f"offloaded / resident: generate time {time_ratio:.3f}"
          + (f", peak device memory {memory_ratio:.3f}" if memory_ratio is not None else " (CPU: no moves)"))
    cfg = pipe.transformer.config
    name = args.name or f"offload_{device_slug()}"
    weight_bytes = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    write_json(args.out, name, {
        "model": "flux", "size": args.size, "double_blocks": cfg.num_layers, "single_blocks": cfg.num_single_layers,
        "hidden": cfg.num_attention_heads * cfg.attention_head_dim, "dtype": str(dtype), "resolution": resolution,
        "speedup": args.speedup, "text_len": args.text_len, "rounds": args.rounds, "rows": rows,
        "transformer_GiB": weight_bytes / 2**30, "ratio_time_offloaded_over_resident": time_ratio,
        "ratio_peak_memory_offloaded_over_resident": memory_ratio,
        "notes": "one ralu generate call (RALU, eager, decoded) per variant and round; 'offloaded' = diffusers' "
                 "enable_model_cpu_offload on the same pipeline; peak = torch.cuda.max_memory_allocated of the call "
                 "(weights included); random weights"})
    bar_plot(args.out, name, [r["variant"] for r in rows], [r["mean_s"] for r in rows], "s per generate call",
             f"FLUX {args.size} ({cfg.num_layers}+{cfg.num_single_layers} blocks), {resolution}^2, RALU "
             f"{args.speedup}, {args.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
