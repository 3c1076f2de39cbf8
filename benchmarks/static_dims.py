"""Compiled FLUX.1 model call with the model's dimensions static (ralu now) vs symbolic (ralu before the fix), A/B
in one process.

Block functions compile with ``dynamic=True``. Before the fix, ralu's fused q/k/v weights entered the compiled block
as plain tensors with symbolic sizes, so the head count of every kernel around attention was symbolic too
(``(rows // 3) // head_dim``); :func:`ralu_runtime.execution.call.static_dims` now marks them static. The
``symbolic`` variant undoes exactly that (every module's ``static_dims`` replaced by a no-op for the variant's
compile); everything else is the same code.

Each variant has its own pipeline (same seed, same weights) and compiled functions: the inductor backend (recording
every graph's symbolic feature dimensions, :mod:`ralu_runtime.compile.graph_check`), fused q/k/v, ralu's CUDA graphs
on CUDA. Timed: the runner's model call on a full-resolution raster (RALU's stage 3 and the baseline's call) after
warm-up; the variants' timed calls alternate over ``--rounds`` rounds so that machine drift hits both.

Writes ``static_dims_<device>.json`` / ``.png``: per variant the mean model-call time, its graphs' symbolic feature
dimensions, and the ratio symbolic / static.

    python benchmarks/static_dims.py --size small --resolution 256           # CPU (small FLUX-shaped model)
    python benchmarks/static_dims.py --size full --double 4 --single 8       # GPU: full width, reduced depth
    python benchmarks/static_dims.py --size small --resolution 128 --inner eager --reps 1 --rounds 1   # dry run
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (add_flux_shape_args, bar_plot, device_slug, flux_shape,  # noqa: E402
                                positive_int, print_table, raster_model_call, time_fn, write_json)
from ralu_runtime.compile import compile_adapter, uncompile_adapter  # noqa: E402
from ralu_runtime.compile.graph_check import RecordingBackend  # noqa: E402
from ralu_runtime.execution import call as call_module  # noqa: E402
from ralu_runtime.tiny.flux import build_flux_pipeline  # noqa: E402

VARIANTS = ("static", "symbolic")


@contextlib.contextmanager
def symbolic_model_dims():
    """``static_dims`` a no-op in every ralu module that imported it (ralu before the fix)."""
    mods = [m for name, m in list(sys.modules.items())
            if name.startswith("ralu_runtime") and getattr(m, "static_dims", None) is call_module.static_dims]
    with contextlib.ExitStack() as stack:
        for m in mods:
            stack.enter_context(mock.patch.object(m, "static_dims", lambda t, *dims: t))
        yield


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flux_shape_args(ap, torch.cuda.is_available())
    ap.add_argument("--reps", type=positive_int, default=None,
                    help="timed calls per variant and round (default 20 GPU, 5 CPU)")
    ap.add_argument("--rounds", type=positive_int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="output name (default static_dims_<device>)")
    ap.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                    help="what runs the recorded graphs: inductor (the timing), or eager (a dry run: graphs only)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    depth, resolution = flux_shape(args, cuda)
    reps = args.reps or (20 if cuda else 5)

    runs: dict[str, dict] = {}
    build_s = []
    # one pipeline each (same seed, same weights) and its own compiled functions; one dynamo reset for both (the
    # compiled code hangs on the block functions' code objects: a reset between the variants would drop the first
    # one's graphs, and the static marks' guards keep the two variants' graphs apart)
    torch._dynamo.reset()
    for v in VARIANTS:
        t0 = time.perf_counter()
        pipe = build_flux_pipeline(args.size, device=args.device, dtype=dtype, **depth)  # same seed: same weights
        build_s.append(time.perf_counter() - t0)
        rec = RecordingBackend(args.inner)
        with symbolic_model_dims() if v == "symbolic" else contextlib.nullcontext():
            compile_adapter(pipe, "inductor", dynamo_backend=rec, fused_qkv=True, compile_vae=False)
            run = raster_model_call(pipe, resolution, args.text_len, args.device, dtype, runner=True)
            t0 = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
        runs[v] = {"pipe": pipe, "run": run, "rec": rec, "first_call_s": first_s, "ms": []}
    for _ in range(args.rounds):  # alternately: drift of the machine hits both
        for v in VARIANTS:
            runs[v]["ms"].append(time_fn(runs[v]["run"], warmup=2, reps=reps, device=args.device)["mean_ms"])
    for v in VARIANTS:
        uncompile_adapter(runs[v]["pipe"])

    rows = []
    for v in VARIANTS:
        ms = runs[v]["ms"]
        rows.append({"variant": v, "mean_ms": statistics.fmean(ms), "round_ms": [round(m, 3) for m in ms],
                     "first_call_s": round(runs[v]["first_call_s"], 2), "graphs": runs[v]["rec"].graphs,
                     "symbolic_feature_dims": len(runs[v]["rec"].bad), "examples": runs[v]["rec"].bad[:4]})
    ratio = rows[1]["mean_ms"] / rows[0]["mean_ms"]
    print_table(rows, ["variant", "mean_ms", "round_ms", "first_call_s", "graphs", "symbolic_feature_dims"])
    print(f"symbolic / static model-call time: {ratio:.3f}")
    cfg = runs["static"]["pipe"].transformer.config
    name = args.name or f"static_dims_{device_slug()}"
    tokens = (resolution // 16) ** 2
    write_json(args.out, name, {
        "model": "flux", "size": args.size, "double_blocks": cfg.num_layers, "single_blocks": cfg.num_single_layers,
        "hidden": cfg.num_attention_heads * cfg.attention_head_dim, "dtype": str(dtype), "resolution": resolution,
        "image_tokens": tokens, "text_len": args.text_len, "reps": reps, "rounds": args.rounds, "inner": args.inner,
        "model_build_s": [round(b, 2) for b in build_s], "rows": rows, "ratio_symbolic_over_static": ratio,
        "notes": "one model call (the runner: compiled blocks, fused q/k/v, CUDA graphs on CUDA) on a full-resolution "
                 "raster; 'symbolic' = static_dims disabled during its compile (ralu before the fix)"})
    bar_plot(args.out, name, [r["variant"] for r in rows], [r["mean_ms"] for r in rows], "ms per model call",
             f"FLUX {args.size} ({cfg.num_layers}+{cfg.num_single_layers} blocks), {tokens} tokens, {args.device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
