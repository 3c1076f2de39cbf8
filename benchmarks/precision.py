"""fp8 against bf16, side by side, at the FLUX.1-dev shape: latency of the 50-step baseline and of RALU, and fidelity.

Random weights (no download): the FLUX.1-dev-shaped transformer (19 double + 38 single blocks, hidden 3072, 512 text
tokens) with a real-size VAE, bf16, 1024^2 (``benchmarks/latency.py``'s ``--size full``). Rows, in this order (one
compiled runner per precision, so each precision compiles its block graphs once):

=========================  ==========================================================================================
``baseline-eager-bf16``    50 steps, eager (``backend="eager"``), bf16
``baseline-compiled-bf16`` 50 steps, ``backend="inductor"`` (regional compile, CUDA graphs per stage call), bf16
``ralu-7x-compiled-bf16``  RALU 7x, compiled, bf16 (and ``ralu-4x-compiled-bf16``)
``baseline-compiled-fp8``  50 steps, compiled, ``precision="fp8"`` (fp8 e4m3 linears in the blocks)
``ralu-7x-compiled-fp8``   RALU 7x, compiled, fp8 (and ``ralu-4x-compiled-fp8``)
=========================  ==========================================================================================

Fidelity of fp8 against bf16 (random weights: the figures say how much fp8 moves the computation, not how images
look): per-stage relative error of the velocity ``|v_fp8 - v_bf16| / |v_bf16|`` on the model calls of one bf16 RALU
run (both precisions evaluated eagerly on the same inputs), and the PSNR of the final fp8 image against the bf16 one
(same seed, RALU 7x / 4x / baseline, images in [0, 1]).

Claims printed at the end (H200 goals of issue 24): RALU 7x compiled fp8 <= 0.60 s; RALU 7x compiled bf16 >= 10x the
eager 50-step baseline; compiled fp8 50-step baseline <= 90 ms per step (model-call stage / steps).

``--quick`` runs the same steps on the CPU at toy size (2 + 4 blocks, hidden 256, 128^2, 4 baseline steps, fp8 through
torch's CPU ``_scaled_mm`` or the fp32 emulation, compiled rows traced by dynamo without code generation): it checks
the script, it measures nothing worth quoting.

    python benchmarks/precision.py                      # GPU (H200: about 5-6 minutes, compiles included)
    python benchmarks/precision.py --quick              # CPU, toy sizes (a few minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (device_slug, non_negative_int, positive_int, print_table, pyplot,  # noqa: E402
                                save_figure, write_json)

ROWS = ("baseline-eager-bf16", "baseline-compiled-bf16", "ralu-7x-compiled-bf16", "ralu-4x-compiled-bf16",
        "baseline-compiled-fp8", "ralu-7x-compiled-fp8", "ralu-4x-compiled-fp8")
GOALS = {"ralu7x_fp8_s": 0.60, "ralu7x_bf16_vs_eager": 10.0, "baseline_fp8_ms_per_step": 90.0}


def parse_row(name: str) -> tuple[str | None, str, str]:
    """'ralu-7x-compiled-fp8' -> ('7x', 'compiled', 'fp8'); 'baseline-eager-bf16' -> (None, 'eager', 'bf16')."""
    parts = name.split("-")
    if parts[0] == "baseline" and len(parts) == 3:
        preset, kind, prec = None, parts[1], parts[2]
    elif parts[0] == "ralu" and len(parts) == 4:
        preset, kind, prec = parts[1], parts[2], parts[3]
    else:
        raise ValueError(f"row {name!r}: use baseline-<eager|compiled>-<bf16|fp8> or ralu-<preset>-<kind>-<prec>")
    if kind not in ("eager", "compiled") or prec not in ("bf16", "fp8"):
        raise ValueError(f"row {name!r}: kind eager|compiled, precision bf16|fp8")
    return preset, kind, prec


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def backend_of(kind: str, prec: str, args) -> tuple[str, dict]:
    """``(backend, compile options)`` of a row kind and precision."""
    opts = {"precision": "fp8" if prec == "fp8" else "auto", "attn_backend": args.attn_backend}
    if prec == "fp8":
        opts["fp8_kernel"] = args.fp8_kernel
    if kind == "eager":
        return "eager", {**opts, "cuda_graphs": False}
    if args.quick:
        opts["dynamo_backend"] = "eager"  # CPU: trace with dynamo, no code generation
    return "inductor", opts


def run_once(pipe, emb, args, preset, seed: int, size: int | None = None):
    """One ``generate``: ``(seconds, timings, images (B, 3, H, W) in [0, 1])``."""
    from ralu_runtime import generate

    device = pipe.transformer.device
    _sync(device)
    t0 = time.perf_counter()
    res = size or args.resolution
    out = generate(pipe, **emb, height=res, width=res, speedup=preset,
                   num_inference_steps=args.steps if preset is None else None, seed=seed, output_type="pt",
                   progress=False, edge_detector=args.edge_detector)
    _sync(device)
    return time.perf_counter() - t0, dict(out.timings), out.images


def bench_row(pipe, emb, args, row: str) -> tuple[dict, torch.Tensor]:
    """Install the row's backend, warm it up, time it; returns the row's record and its last image (seed 0)."""
    from ralu_runtime.compile import compile_stats, ensure_backend

    preset, kind, prec = parse_row(row)
    backend, opts = backend_of(kind, prec, args)
    runner = ensure_backend(pipe, backend, **opts)
    n_builds, graphs0 = len(runner.builds), compile_stats()["unique_graphs"]
    warm = [run_once(pipe, emb, args, preset, seed=100 + i, size=(args.warmup_size if kind == "eager" else None))[0]
            for i in range(args.warmup)]
    graphs_warm = compile_stats()["unique_graphs"]
    reps = args.reps if args.reps else (1 if kind == "eager" and preset is None else 3)
    totals, stages, image = [], {}, None
    for i in range(reps):
        sec, timings, images = run_once(pipe, emb, args, preset, seed=i)
        totals.append(sec)
        for k, v in timings.items():
            stages.setdefault(k, []).append(v)
        if i == 0:
            image = images.float().cpu()
    stage_mean = {k: statistics.fmean(v) for k, v in stages.items() if k != "text_encode"}
    steps = args.steps if preset is None else None
    rec = {"row": row, "preset": preset or "baseline", "kind": kind, "precision": prec, "backend": backend,
           "options": opts, "steps": steps, "reps": reps, "mean_s": statistics.fmean(totals), "min_s": min(totals),
           "stdev_s": statistics.stdev(totals) if len(totals) > 1 else 0.0, "times_s": totals,
           "first_call_s": warm[0] if warm and kind == "compiled" else None, "stages_s": stage_mean,
           "graphs_compiled_in_warmup": graphs_warm - graphs0,
           "recompiles_after_warmup": compile_stats()["unique_graphs"] - graphs_warm,
           "cuda_graph_captures": len(runner.builds) - n_builds, "runner": runner.report()}
    if steps:
        rec["model_ms_per_step"] = stage_mean.get("baseline", float("nan")) * 1e3 / steps
        rec["end_to_end_ms_per_step"] = rec["mean_s"] * 1e3 / steps
    print(f"[{row}] {rec['mean_s']:.3f} s +- {rec['stdev_s']:.3f} (n={reps})"
          + (f"; {rec['model_ms_per_step']:.1f} ms per model step" if steps else "")
          + (f"; first call {rec['first_call_s']:.1f} s" if rec["first_call_s"] else "")
          + f"; graphs {rec['graphs_compiled_in_warmup']} (+{rec['recompiles_after_warmup']} after warm-up)",
          flush=True)
    return rec, image


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images ``a`` against ``b`` (same shape, values in [0, 1]); inf when equal."""
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def velocity_fidelity(pipe, emb, args, preset: str) -> dict:
    """Per stage of one RALU run (bf16, eager): relative error of the fp8 velocity against bf16 on the same inputs."""
    from ralu_runtime import prepare, run
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.compile import uncompile_adapter
    from ralu_runtime.compile.fp8 import Fp8Shadows, resolve_kernel
    from ralu_runtime.compile.impl import BackendImpl

    uncompile_adapter(pipe)
    adapter = get_adapter(pipe)
    calls = []

    def hook(_adapter, velocity):
        def run(tokens, grid, timestep, cond):
            calls.append((tokens.clone(), grid, timestep, cond))
            return velocity(tokens, grid, timestep, cond)
        return run

    out = run(prepare(pipe, **emb, height=args.resolution, width=args.resolution, speedup=preset, seed=0,
                      output_type="latent", progress=False, edge_detector=args.edge_detector), model_call=hook)
    kernel = resolve_kernel(args.fp8_kernel, adapter.device)
    fp8 = BackendImpl(None, fp8=Fp8Shadows(kernel))
    steps = list(out.schedule.steps)
    per_stage, i = [], 0
    for k, n in enumerate(steps):
        errs = []
        for tokens, grid, t, cond in calls[i:i + n]:
            v_ref = adapter.velocity(tokens, grid, t, cond).float()
            v_fp8 = adapter.velocity(tokens, grid, t, cond, impl=fp8).float()
            errs.append(float((v_fp8 - v_ref).norm() / v_ref.norm()))
        per_stage.append({"stage": k + 1, "calls": n, "tokens": int(calls[i][0].shape[1]),
                          "rel_err_mean": statistics.fmean(errs), "rel_err_max": max(errs)})
        i += n
    fp8.release()
    return {"preset": preset, "kernel": kernel, "stages": per_stage,
            "note": "random weights; relative L2 error of the fp8 velocity against bf16 on the inputs of one bf16 "
                    "RALU run, both eager"}


def claims(by: dict) -> list[dict]:
    """The issue's goals against the measured rows (missing rows: not measured)."""
    out = []

    def add(what, value, goal, ok, unit):
        out.append({"claim": what, "measured": value, "goal": goal, "unit": unit,
                    "met": None if value is None or (isinstance(value, float) and math.isnan(value)) else ok})

    r7f = by.get("ralu-7x-compiled-fp8")
    v = r7f["mean_s"] if r7f else None
    add("RALU 7x compiled fp8, end to end", v, f"<= {GOALS['ralu7x_fp8_s']}", v is not None and
        v <= GOALS["ralu7x_fp8_s"], "s")
    r7b, be = by.get("ralu-7x-compiled-bf16"), by.get("baseline-eager-bf16")
    v = be["mean_s"] / r7b["mean_s"] if (r7b and be) else None
    add("RALU 7x compiled bf16 vs eager 50-step baseline", v, f">= {GOALS['ralu7x_bf16_vs_eager']}",
        v is not None and v >= GOALS["ralu7x_bf16_vs_eager"], "x")
    bf = by.get("baseline-compiled-fp8")
    v = bf.get("model_ms_per_step") if bf else None
    add("compiled fp8 50-step baseline, per model step", v, f"<= {GOALS['baseline_fp8_ms_per_step']}",
        v is not None and v <= GOALS["baseline_fp8_ms_per_step"], "ms")
    return out


def plot(out_dir: Path, name: str, rows: list[dict], fidelity: dict | None, title: str):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    colors = ["#4477aa" if r["precision"] == "bf16" else "#ee6677" for r in rows]
    ax.bar(range(len(rows)), [r["mean_s"] for r in rows], yerr=[r["stdev_s"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(i, r["mean_s"], f" {r['mean_s']:.2f}s", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["row"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("seconds per image (end to end)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax = axes[1]
    if fidelity:
        for key, label in (("rel_err_mean", "mean"), ("rel_err_max", "max")):
            ax.plot([s["stage"] for s in fidelity["stages"]], [s[key] * 100 for s in fidelity["stages"]], "o-",
                    label=label)
        ax.set_xticks([s["stage"] for s in fidelity["stages"]])
        ax.set_xlabel(f"RALU {fidelity['preset']} stage")
        ax.set_ylabel("fp8 vs bf16 velocity, relative error (%)")
        ax.set_title(f"fidelity (random weights, kernel {fidelity['kernel']})", fontsize=9)
        ax.legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU toy sizes (checks the script; measures nothing)")
    ap.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 1024; --quick 128)")
    ap.add_argument("--steps", type=int, default=None, help="baseline steps (default 50; --quick 4)")
    ap.add_argument("--reps", type=positive_int, default=None,
                    help="timed runs per row (default 3; 1 for the eager baseline and with --quick)")
    ap.add_argument("--warmup", type=non_negative_int, default=1,
                    help="untimed runs per row (compiled rows compile in the first)")
    ap.add_argument("--fp8-kernel", default="auto", choices=("auto", "torchao", "scaled_mm", "emulated"))
    ap.add_argument("--attn-backend", default="auto",
                    choices=("auto", "default", "cudnn", "flash", "efficient", "math", "measure"))
    ap.add_argument("--no-fidelity", action="store_true", help="skip the per-stage velocity error run")
    ap.add_argument("--device", default=None)
    ap.add_argument("--tag", default=None, help="file name tag (default: precision_flux_<device>)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    from benchmarks.latency import build_pipeline, prompt_embeds
    from ralu_runtime.compile import compile_stats, enable_persistent_cache, fp8_support, measure_attention_backends

    device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    ok, why = fp8_support(device)
    if not ok:
        raise SystemExit(f"fp8 rows cannot run here: {why}")
    size = "small" if args.quick or device.type == "cpu" else "full"
    args.resolution = args.resolution or (128 if size == "small" else 1024)
    args.reps = args.reps or (1 if args.quick else None)
    args.steps = args.steps or (4 if args.quick else 50)
    args.warmup_size = 256 if size == "full" else None  # eager warm-up at a small size: loads kernels, cheap
    args.edge_detector = "gpu" if device.type == "cuda" else "opencv"
    dtype = torch.bfloat16
    rows = args.rows.split(",") if args.rows else list(ROWS)
    for r in rows:
        try:
            parse_row(r)
        except ValueError as exc:
            ap.error(str(exc))
    slug = device_slug() if device.type == "cuda" else "cpu"
    args.tag = args.tag or f"precision_flux_{'quick_' if args.quick else ''}{slug}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="ralu-inductor-")
    enable_persistent_cache(tmp.name)  # a fresh cache: the first compiled call of each precision is cold

    t0 = time.perf_counter()
    pipe = build_pipeline("flux", size, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    text_len = 512 if size == "full" else 64
    emb = prompt_embeds(pipe, "flux", 1, text_len, device, dtype)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"FLUX.1-dev shape ({size}): {n_params / 1e9:.2f} B parameters, random weights, bf16, {args.resolution}^2, "
          f"text {text_len} tokens, baseline {args.steps} steps, built in {build_s:.1f} s on {device} ({why})",
          flush=True)

    t1 = time.perf_counter()
    results, images = [], {}
    for row in rows:
        rec, image = bench_row(pipe, emb, args, row)
        results.append(rec)
        images[row] = image
        write_json(args.out, f"{args.tag}_partial", {"rows": results})  # a run cut off still leaves its numbers
    by = {r["row"]: r for r in results}
    if "baseline-eager-bf16" in by:
        for r in results:
            r["speedup_vs_baseline-eager-bf16"] = by["baseline-eager-bf16"]["mean_s"] / r["mean_s"]
    image_psnr = {}
    for row in rows:
        preset, kind, prec = parse_row(row)
        twin = row[: -len("fp8")] + "bf16" if prec == "fp8" else None
        if twin in images and images[twin] is not None and images[row] is not None:
            image_psnr[f"{row} vs {twin}"] = psnr(images[row], images[twin])
    fidelity = None if args.no_fidelity else velocity_fidelity(pipe, emb, args, "7x")
    attention = measure_attention_backends(device)
    bench_s = time.perf_counter() - t1

    print_table(results, ["row", "mean_s", "stdev_s", "speedup_vs_baseline-eager-bf16", "model_ms_per_step",
                          "first_call_s", "graphs_compiled_in_warmup", "recompiles_after_warmup"])
    print("final image PSNR, fp8 against bf16 (same seed; random weights):")
    for k, v in image_psnr.items():
        print(f"  {k}: {v:.2f} dB")
    if fidelity:
        print(f"velocity error fp8 vs bf16 per RALU {fidelity['preset']} stage (kernel {fidelity['kernel']}; random "
              "weights):")
        print_table([{k: (f"{v * 100:.2f} %" if k.startswith("rel_err") else v) for k, v in s.items()}
                     for s in fidelity["stages"]], ["stage", "calls", "tokens", "rel_err_mean", "rel_err_max"])
    print("attention backends measured here (ms):")
    for a in attention:
        print(f"  {a['describe']}: {a['ms']} -> {a['best']}" + (f" (skipped: {', '.join(a['skipped'])})"
                                                                 if a["skipped"] else ""))
    cl = claims(by)
    quick = " [quick CPU run: toy sizes, not the H200 claim]" if args.quick or device.type == "cpu" else ""
    for c in cl:
        val = "not measured" if c["measured"] is None else f"{c['measured']:.3f} {c['unit']}"
        verdict = "not measured" if c["met"] is None else ("met" if c["met"] else "NOT met")
        print(f"claim: {c['claim']}: {val} (goal {c['goal']} {c['unit']}): {verdict}{quick}")
    write_json(args.out, args.tag, {
        "model": "flux-1-dev-shape" if size == "full" else "flux-small", "size": size, "resolution": args.resolution,
        "dtype": str(dtype), "text_len": text_len, "transformer_params": n_params, "baseline_steps": args.steps,
        "quick": bool(args.quick), "random_weights": True, "fp8_kernel": args.fp8_kernel,
        "attn_backend": args.attn_backend, "model_build_s": build_s, "bench_wall_s": bench_s, "rows": results,
        "image_psnr_db": image_psnr, "velocity_fidelity": fidelity, "attention": attention, "claims": cl,
        "dynamo": compile_stats(),
        "notes": "end to end per image (cached prompt embeddings, all stages, edges, transitions, VAE decode); "
                 "model_ms_per_step = the sampler's baseline stage / steps; random weights: fidelity figures measure "
                 "how far fp8 moves the computation, not image quality"})
    plot(Path(args.out), args.tag, results, fidelity,
         f"FLUX.1-dev shape {args.resolution}^2, bf16 vs fp8 on "
         f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU (quick)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
