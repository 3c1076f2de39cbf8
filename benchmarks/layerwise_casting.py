"""diffusers' layerwise casting under ralu: a FLUX.1 model call with weights stored in the compute dtype (``plain``)
against the same model under ``transformer.enable_layerwise_casting(storage_dtype, compute_dtype)`` (``cast``), A/B in
one process.

The casting keeps the weights of the Linear / Conv layers (diffusers' default exceptions aside: norms, position and
patch embedders, output projections) in the storage dtype and casts each layer to the compute dtype around its
forward: weight memory against the time of those casts. GPU: bfloat16 compute, float8_e4m3fn storage (half the
weight bytes); CPU: float32 compute, bfloat16 storage. Random weights (no download), full FLUX.1 width at reduced depth
(default 4 double + 8 single blocks on a GPU, as ``static_dims.py``).

Timed: ralu's eager model call (``adapter.velocity``, the path every RALU stage takes) on a full-resolution raster
after warm-up (``--compiled``: also both under ``backend="inductor"`` without CUDA graphs, where the cast model's
blocks run ralu's cast shadows); the two variants alternate over ``--rounds`` rounds so that machine drift hits both. Also recorded:
the transformer's weight bytes per variant, the peak CUDA memory of one call, and the relative difference of the
cast model's output from the plain one's (the storage rounding: what the memory costs in fidelity, on random
weights).

Writes ``layerwise_casting_<device>.json`` / ``.png``.

    python benchmarks/layerwise_casting.py                                   # GPU: full width, 4 + 8 blocks
    python benchmarks/layerwise_casting.py --size small --resolution 256     # CPU
    python benchmarks/layerwise_casting.py --size small --resolution 128 --reps 1 --rounds 1   # dry run
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
                                positive_int, print_table, raster_model_call, time_fn, write_json)
from ralu_runtime.tiny.flux import build_flux_pipeline  # noqa: E402

VARIANTS = ("plain", "cast")
COMPILED_VARIANTS = ("plain_inductor", "cast_inductor")  # --compiled: ralu's inductor backend, no CUDA graphs
STORAGE = {"float8_e4m3fn": torch.float8_e4m3fn, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None) -> int:
    cuda_here = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flux_shape_args(ap, cuda_here)
    ap.add_argument("--storage", choices=tuple(STORAGE), default=None,
                    help="storage dtype of the cast layers (default float8_e4m3fn on a GPU, bfloat16 on a CPU)")
    ap.add_argument("--reps", type=positive_int, default=None,
                    help="timed calls per variant and round (default 10 GPU, 3 CPU)")
    ap.add_argument("--rounds", type=positive_int, default=2)
    ap.add_argument("--compiled", action="store_true",
                    help="also both variants under backend='inductor' without CUDA graphs (the cast model's blocks "
                         "run ralu's cast shadows): each compiles first (about a minute per variant on a GPU)")
    ap.add_argument("--dynamo-backend", default=None,
                    help="with --compiled: torch.compile's backend instead of inductor (eager: dynamo's tracing "
                         "alone, for a quick dry run)")
    ap.add_argument("--device", default="cuda" if cuda_here else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="output name (default layerwise_casting_<device>)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    storage = STORAGE[args.storage or ("float8_e4m3fn" if cuda else "bfloat16")]
    if storage.itemsize >= dtype.itemsize:
        raise SystemExit(f"--storage {storage}: must be narrower than the compute dtype {dtype}")
    depth, resolution = flux_shape(args, cuda)
    reps = args.reps or (10 if cuda else 3)

    runs: dict[str, dict] = {}
    variants = VARIANTS + (COMPILED_VARIANTS if args.compiled else ())
    for v in variants:  # one pipeline each, same seed: same weights before the casting rounds them
        t0 = time.perf_counter()
        pipe = build_flux_pipeline(args.size, device=args.device, dtype=dtype, **depth)
        if v.startswith("cast"):
            pipe.transformer.enable_layerwise_casting(storage_dtype=storage, compute_dtype=dtype)
        compiled = v.endswith("_inductor")
        if compiled:
            from ralu_runtime.adapters import get_adapter
            from ralu_runtime.compile import ensure_backend

            ensure_backend(get_adapter(pipe), "inductor", cuda_graphs=False, compile_vae=False,
                           dynamo_backend=args.dynamo_backend)
        build_s = time.perf_counter() - t0
        run = raster_model_call(pipe, resolution, args.text_len, args.device, dtype, runner=compiled)
        if compiled:
            t0 = time.perf_counter()
            run()  # the compile, outside the peak-memory measurement
            build_s += time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out = run()
        peak = (torch.cuda.max_memory_allocated() - base) if cuda else None
        runs[v] = {"pipe": pipe, "run": run, "out": out.float(), "build_s": build_s, "ms": [],
                   "weight_bytes": weight_bytes(pipe.transformer), "call_peak_bytes": peak}
    for _ in range(args.rounds):  # alternately: drift of the machine hits both
        for v in variants:
            runs[v]["ms"].append(time_fn(runs[v]["run"], warmup=1, reps=reps, device=args.device)["mean_ms"])

    ref = runs["plain"]["out"]
    rows = []
    for v in variants:
        r = runs[v]
        rows.append({"variant": v, "mean_ms": statistics.fmean(r["ms"]), "round_ms": [round(m, 3) for m in r["ms"]],
                     "weight_GiB": r["weight_bytes"] / 2**30,
                     "call_peak_GiB": None if r["call_peak_bytes"] is None else r["call_peak_bytes"] / 2**30,
                     "rel_diff": ((r["out"] - ref).abs().max() / ref.abs().max()).item(),
                     "build_s": round(r["build_s"], 2)})
    time_ratio = rows[1]["mean_ms"] / rows[0]["mean_ms"]
    memory_ratio = runs["cast"]["weight_bytes"] / runs["plain"]["weight_bytes"]
    print_table(rows, ["variant", "mean_ms", "round_ms", "weight_GiB", "call_peak_GiB", "rel_diff", "build_s"])
    print(f"cast / plain: model-call time {time_ratio:.3f}, transformer weight bytes {memory_ratio:.3f}")
    compiled_ratios = {}
    if args.compiled:
        ms = {r["variant"]: r["mean_ms"] for r in rows}
        compiled_ratios = {"ratio_time_cast_inductor_over_plain_inductor": ms["cast_inductor"] / ms["plain_inductor"],
                           "ratio_time_cast_inductor_over_cast": ms["cast_inductor"] / ms["cast"]}
        print("compiled: " + ", ".join(f"{k.removeprefix('ratio_time_')} {v:.3f}" for k, v in compiled_ratios.items()))
    cfg = runs["plain"]["pipe"].transformer.config
    name = args.name or f"layerwise_casting_{device_slug()}"
    tokens = (resolution // 16) ** 2
    write_json(args.out, name, {
        "model": "flux", "size": args.size, "double_blocks": cfg.num_layers, "single_blocks": cfg.num_single_layers,
        "hidden": cfg.num_attention_heads * cfg.attention_head_dim, "compute_dtype": str(dtype),
        "storage_dtype": str(storage), "resolution": resolution, "image_tokens": tokens, "text_len": args.text_len,
        "reps": reps, "rounds": args.rounds, "dynamo_backend": args.dynamo_backend if args.compiled else None,
        "rows": rows, "ratio_time_cast_over_plain": time_ratio,
        "ratio_weight_bytes_cast_over_plain": memory_ratio, **compiled_ratios,
        "notes": "ralu's eager model call (adapter.velocity) on a full-resolution raster; 'cast' = diffusers' "
                 "enable_layerwise_casting with its default exceptions; '*_inductor' = the installed "
                 "backend='inductor' runner without CUDA graphs (build_s includes its compile); rel_diff = "
                 "max |v - v_plain| / max |v_plain| (random weights)"})
    bar_plot(args.out, name, [r["variant"] for r in rows], [r["mean_ms"] for r in rows], "ms per model call",
             f"FLUX {args.size} ({cfg.num_layers}+{cfg.num_single_layers} blocks), {tokens} tokens, {args.device}, "
             f"storage {str(storage).replace('torch.', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
