"""End-to-end latency: 50-step baseline vs RALU, eager vs compiled, with a per-stage breakdown.

Random-weight models with the real shapes (no download): ``--size full`` is FLUX.1-dev (19 double + 38 single
blocks, hidden 3072, 24 heads, 512 text tokens) or SD3-medium (24 joint blocks, hidden 1536, 333 text
tokens, CFG) with a real-size FLUX/SD3 VAE, bf16, 1024^2; ``--size small`` is a FLUX-shaped model small
enough for a CPU (2 + 4 blocks, hidden 256, 64 text tokens, small VAE, float32, 512^2).
Prompt embeddings are made directly (cached prompts: no text encoder runs); the VAE decode is included.

Rows (``--rows``, comma separated): ``baseline-eager``, ``baseline-compiled``, ``ralu-<preset>-eager``,
``ralu-<preset>-compiled`` (FLUX presets 4x, 5x, 7x; SD3 2x, 3x). Compiled = ``backend=inductor``
(regional compile, symbolic token dim, one CUDA graph per stage call). Every optimization has its own
switch: ``--no-cuda-graphs``, ``--no-fused-qkv``, ``--attn-backend {auto,default,cudnn,flash,efficient,math}``,
``--transition {auto,torch,triton,cuda}``, ``--edge-detector {gpu,opencv}``, ``--max-autotune``,
``--static-shapes``. After warm-up, each row runs ``--reps`` times (mean and stdev); per-stage times
(stage1, edges, transition12, stage2, transition23, stage3 / baseline, vae_decode) come from the sampler's
clock, which synchronises only at stage boundaries. Compile seconds, CUDA-graph captures and dynamo graph
counts (recompiles) are reported per row; cold start (empty inductor cache) and warm start (dynamo reset, cache
bundle reloaded, same process) times of the compiled RALU path with ``--start-times``. Across processes:
``--save-artifacts FILE`` writes torch's cache bundle after the rows; a new process with ``--load-artifacts FILE``
(and a fresh, empty inductor cache) loads it before its rows, so its rows' ``first_call_s`` is a warm start.
``--cache SPEC`` (e.g. ``taylorseer:3``) runs the RALU rows with a temporal feature cache (stacking).

Long baselines (full-size video: minutes per call): ``--steps S --scale-baseline-to N`` runs the baseline rows with
``S`` steps and adds ``scaled_*`` fields for ``N`` steps: the sampler's ``baseline`` stage (``S`` model calls at one
token count) times ``N / S``, plus the measured rest (VAE decode, prompt handling), per timed run; the
``speedup_vs_baseline-*`` ratios then use the scaled baseline. ``--warmup-shape HxW[xF]`` runs the warm-up calls of
eager rows at a small size (``F`` frames for video): they load kernels, JIT-compile the Triton ones and create
library handles without spending a full-size call.

    python benchmarks/latency.py --model flux --size full          # on an H100 (~5 min)
    python benchmarks/latency.py --model flux --size small --rows baseline-eager,ralu-7x-eager   # CPU
    python benchmarks/latency.py --model wan-480p --size full --rows baseline-eager,ralu-7x-eager,ralu-4x-eager \
        --steps 4 --scale-baseline-to 50 --reps 1 --warmup 1 --warmup-shape 128x128x5    # GPU, ~4 min
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (device_slug, non_negative_int, positive_int, print_table, pyplot,  # noqa: E402
                                save_figure, write_json)

# ----------------------------------------------------------------------------------------------- models
# every benchmarked model (shapes, published sampler, CPU sizes) is a record of ralu_runtime.families.MODELS


def _model(key: str):
    from ralu_runtime.families import MODELS

    if key not in MODELS:
        raise ValueError(f"unknown model {key!r}; available: {', '.join(MODELS)}")
    return MODELS[key]


def build_pipeline(model: str, size: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """The random-weight pipeline of published model ``model`` (a key of ``ralu_runtime.families.MODELS``: flux =
    FLUX.1-dev, sd3 = SD3 Medium, flux2, qwen-image, wan-480p, ...) at ``size`` ("full": the published shapes;
    "small": a CPU shape), no text encoders (use :func:`prompt_embeds`). ``device="meta"`` builds it without memory
    (FLOP counting). The same ``seed`` gives the same weights in every process."""
    return _model(model).build(size, device=device, dtype=dtype, seed=seed)


def prompt_embeds(pipe, model: str, batch: int, text_len: int, device, dtype, seed: int = 0) -> dict:
    """Random prompt embeddings of ``text_len`` tokens for ``pipe`` (negative ones where the model runs CFG)."""
    return _model(model).random_embeds(pipe, batch, text_len, device=device, dtype=dtype, seed=seed)


def default_rows(model: str) -> list[str]:
    presets = _model(model).preset_names
    rows = ["baseline-eager"] + [f"ralu-{p}-eager" for p in presets]
    return rows + ["baseline-compiled"] + [f"ralu-{p}-compiled" for p in presets]


def _side(hw: tuple[int, int]):
    """(h, w) -> h for a square (how --resolution and the result files write it), else the tuple."""
    return hw[0] if hw[0] == hw[1] else tuple(hw)


def parse_row(name: str) -> tuple[str | None, str]:
    """'baseline-eager' -> (None, 'eager'); 'ralu-7x-compiled' -> ('7x', 'compiled')."""
    parts = name.split("-")
    if parts[0] == "baseline" and len(parts) == 2 and parts[1] in ("eager", "compiled"):
        return None, parts[1]
    if parts[0] == "ralu" and len(parts) == 3 and parts[2] in ("eager", "compiled"):
        return parts[1], parts[2]
    raise ValueError(f"row {name!r}: use baseline-eager|baseline-compiled|ralu-<preset>-eager|ralu-<preset>-compiled")


KONTEXT_STEPS = 28  # FluxKontextPipeline's default num_inference_steps

# ---------------------------------------------------------------------------------------------- running
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(pipe, emb, args, speedup, seed, shape=None):
    """One ``generate`` call (seconds, its stage timings); ``shape``: ``(h, w[, frames])`` instead of the timed size."""
    from ralu_runtime import generate

    device = pipe.transformer.device
    _sync(device)
    t0 = time.perf_counter()
    h, w = args.resolution if isinstance(args.resolution, tuple) else (args.resolution, args.resolution)
    frames = getattr(args, "frames", None)
    if shape is not None:
        h, w = shape[:2]
        frames = shape[2] if len(shape) > 2 and frames else frames
    video = {"num_frames": frames} if frames else {}
    out = generate(pipe, **emb, height=h, width=w, speedup=speedup, **video,
                   num_inference_steps=args.steps if speedup is None else None, seed=seed, output_type="pt",
                   guidance_scale=getattr(args, "guidance", None),
                   progress=False, edge_detector=args.edge_detector, transition_impl=args.transition,
                   cache=args.cache if speedup is not None else None, **_edit_kwargs(args, h, w))
    _sync(device)
    return time.perf_counter() - t0, dict(out.timings)


def _edit_kwargs(args, h: int, w: int) -> dict:
    """``--kontext``: the reference image (``args.reference``) and ``max_area = h * w`` (the output is ``h`` x ``w``,
    the reference kept at its own size: no auto-resize), else nothing."""
    if getattr(args, "reference", None) is None:
        return {}
    return {"image": args.reference, "max_area": h * w, "auto_resize": False}


def kontext_reference(resolution: int, seed: int = 0):
    """A random ``resolution``² RGB reference image (PIL; FLUX.1 Kontext's ``image=``), the same for a seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8), "RGB")


def _fused_qkv(args, pipe) -> bool | None:
    """``fused_qkv`` for the pipeline: on unless --no-fused-qkv, where the family has fused projections (None
    elsewhere: ralu refuses fused_qkv=True for a family without them)."""
    from ralu_runtime.adapters import get_adapter

    return (not args.no_fused_qkv) if get_adapter(pipe).fuses_projections else None


def compile_options(args, pipe) -> dict:
    return {"cuda_graphs": None if not args.no_cuda_graphs else False, "fused_qkv": _fused_qkv(args, pipe),
            "attn_backend": args.attn_backend, "mode": "max-autotune" if args.max_autotune else "default",
            "dynamic": not args.static_shapes, "compile_vae": not args.no_compile_vae}


def eager_options(args, pipe) -> dict:
    return {"cuda_graphs": False, "fused_qkv": _fused_qkv(args, pipe), "attn_backend": args.attn_backend}


def prepare_row(pipe, emb, args, row: str) -> dict:
    """Install the row's backend and run its warm-up calls (compile, CUDA-graph capture)."""
    from ralu_runtime.compile import compile_stats, ensure_backend

    preset, kind = parse_row(row)
    backend, opts = (("inductor", compile_options(args, pipe)) if kind == "compiled"
                     else ("eager", eager_options(args, pipe)))
    runner = ensure_backend(pipe, backend, **opts)
    state = {"row": row, "preset": preset, "kind": kind, "backend": backend, "opts": opts, "runner": runner,
             "n_builds": len(runner.builds), "graphs0": compile_stats()["unique_graphs"], "totals": [], "stages": {}}
    state["reps"] = args.reps if args.reps else (2 if (preset is None and kind == "eager" and args.size == "full") else 5)
    warm = args.warmup if args.warmup is not None else (2 if kind == "compiled" else 1)
    small = args.warmup_shape if kind == "eager" else None  # compiled rows warm up at the timed shape
    state["warmup"], state["warmup_shape"], state["first"] = warm, small, None
    for i in range(warm):
        sec, _ = run_once(pipe, emb, args, preset, seed=100 + i, shape=small)
        state["first"] = sec if state["first"] is None and small is None else state["first"]
    state["graphs_warm"] = compile_stats()["unique_graphs"]
    return state


class GcPauses:
    """Python garbage-collection pauses inside a ``with`` block (``gc.callbacks``): ``{generation: [ms, ...]}``.
    A full (generation-2) collection over the objects compiling created took ~0.3 s on a 2-core CPU (small FLUX);
    one that lands in a timed call shows here instead of being read as model or host time."""

    def __init__(self):
        self.by_gen: dict[int, list[float]] = {}
        self._t0 = 0.0

    def _cb(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.by_gen.setdefault(int(info["generation"]), []).append((time.perf_counter() - self._t0) * 1e3)

    def __enter__(self):
        import gc

        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self._cb)

    def total_ms(self) -> float:
        return sum(sum(v) for v in self.by_gen.values())


def timed_rep(pipe, emb, args, state: dict, i: int) -> None:
    from ralu_runtime.compile import ensure_backend

    ensure_backend(pipe, state["backend"], **state["opts"])  # no-op unless rows of two kinds interleave
    with GcPauses() as gcp:
        sec, timings = run_once(pipe, emb, args, state["preset"], seed=i)
    state.setdefault("gc_ms", []).append(round(gcp.total_ms(), 3))
    state.setdefault("gc_full", []).append(len(gcp.by_gen.get(2, [])))
    state["totals"].append(sec)
    for k, v in timings.items():
        state["stages"].setdefault(k, []).append(v)


def scaled_baseline(totals: list[float], baseline_stage: list[float], steps: int, to_steps: int,
                    stage_mean: dict) -> dict:
    """A baseline row measured with ``steps`` model-call steps, extrapolated to ``to_steps``: each run's ``baseline``
    stage (the model calls, one token count: linear in the steps) times ``to_steps / steps``, plus its measured rest
    (VAE decode, prompt handling)."""
    if len(baseline_stage) != len(totals):
        raise ValueError("scaling a baseline needs the sampler's 'baseline' stage time of every timed run")
    f = to_steps / steps
    times = [t + b * (f - 1.0) for t, b in zip(totals, baseline_stage)]
    stages = dict(stage_mean)
    stages["baseline"] = stage_mean["baseline"] * f
    return {"measured_steps": steps, "scaled_to_steps": to_steps, "scaled_times_s": times,
            "scaled_mean_s": statistics.fmean(times), "scaled_min_s": min(times),
            "scaled_stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0, "scaled_stages_s": stages}


def effective(r: dict, key: str = "mean_s") -> float:
    """``mean_s`` / ``min_s`` of a row, the scaled figure for a baseline measured with fewer steps."""
    return r.get(f"scaled_{key}", r[key])


def finish_row(pipe, emb, args, state: dict) -> dict:
    from ralu_runtime.compile import compile_stats

    row, preset, kind, runner = state["row"], state["preset"], state["kind"], state["runner"]
    graphs_end = compile_stats()["unique_graphs"]
    if args.profile and row in args.profile_rows:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            run_once(pipe, emb, args, preset, seed=0)
        path = Path(args.out) / f"trace_{args.tag}_{row}.json"
        prof.export_chrome_trace(str(path))
        print(f"wrote {path}")
    if args.cprofile and row in args.profile_rows:  # host-side view: where one call's wall time goes
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(run_once, pipe, emb, args, preset, 0)
        print(f"cProfile of one call [{row}] (cumulative, top 30):")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        print(f"cProfile of one call [{row}] (own time, top 20):")  # host work outside the stages shows here
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    totals = state["totals"]
    mean = statistics.fmean(totals)
    builds = runner.builds[state["n_builds"]:]
    stage_mean = {k: statistics.fmean(v) for k, v in state["stages"].items() if k != "text_encode"}
    # everything the sampler's clock does not cover: prompt conditioning, noise, unpacking, postprocess, Python
    stage_mean["other"] = max(0.0, statistics.fmean(totals) - sum(stage_mean.values()))
    first = state["first"]
    scaled = {}
    if preset is None and args.scale_baseline_to:
        scaled = scaled_baseline(totals, state["stages"].get("baseline", []), args.steps, args.scale_baseline_to,
                                 stage_mean)
    return {
        "row": row, "preset": preset or "baseline", "kind": kind, "backend": state["backend"], "options": state["opts"],
        "steps": args.steps if preset is None else None, "reps": len(totals), "warmup": state["warmup"],
        "warmup_shape": list(state["warmup_shape"]) if state["warmup_shape"] else None,
        "mean_s": mean, "stdev_s": statistics.stdev(totals) if len(totals) > 1 else 0.0, "min_s": min(totals),
        "times_s": totals, "first_call_s": first,
        "compile_s": max(0.0, (first or mean) - mean) if kind == "compiled" else 0.0,
        "stages_s": stage_mean,
        "graphs_compiled_in_warmup": state["graphs_warm"] - state["graphs0"],
        "recompiles_after_warmup": graphs_end - state["graphs_warm"],
        "cuda_graph_captures": len(builds), "capture_s": sum(b.seconds for b in builds),
        "fused_qkv": runner.applied.get("fused_qkv"),
        # Python GC pauses in each timed call (ms, all generations) and the full collections among them
        "gc_pause_ms": state.get("gc_ms", []), "gc_full_collections": state.get("gc_full", []),
        **scaled,
    }


def bench_rows(pipe, emb, args, rows: list[str]) -> list[dict]:
    """Rows one after another, or (``--interleave``) the timed reps of each kind's rows round-robin, so that a
    shared machine's load hits baseline and RALU alike."""
    results = []
    groups = [[r for r in rows if r.endswith("eager")], [r for r in rows if r.endswith("compiled")]]
    for group in groups:
        if not group:
            continue
        if args.interleave:
            states = [prepare_row(pipe, emb, args, r) for r in group]
            for i in range(max(s["reps"] for s in states)):
                for s in states:
                    if i < s["reps"]:
                        timed_rep(pipe, emb, args, s, i)
            finished = [finish_row(pipe, emb, args, s) for s in states]
        else:
            finished = []
            for r in group:
                s = prepare_row(pipe, emb, args, r)
                for i in range(s["reps"]):
                    timed_rep(pipe, emb, args, s, i)
                finished.append(finish_row(pipe, emb, args, s))
                # a partial record after every row, so a run cut off by a time limit still leaves its numbers
                write_json(args.out, f"{args.tag}_partial", {"rows": results + finished})
        for res in finished:
            st = "  ".join(f"{k}={v * 1e3:.0f}ms" for k, v in res["stages_s"].items())
            sc = (f" ({res['measured_steps']} steps; scaled to {res['scaled_to_steps']}: {res['scaled_mean_s']:.3f} s)"
                  if "scaled_mean_s" in res else "")
            gcs = (f"; gc {max(res['gc_pause_ms']):.1f} ms max per call, {sum(res['gc_full_collections'])} full"
                   if res.get("gc_pause_ms") else "")
            print(f"[{res['row']}] {res['mean_s']:.3f} s +- {res['stdev_s']:.3f} (n={res['reps']}){sc}; compile "
                  f"{res['compile_s']:.1f} s; graphs {res['graphs_compiled_in_warmup']} "
                  f"(+{res['recompiles_after_warmup']} after warm-up); {st}{gcs}", flush=True)
        results.extend(finished)
    return results


def start_times(pipe, emb, args, row: str, cache_file: Path) -> dict:
    """Warm start after a cold one: save torch's cache bundle, reset dynamo, reload it, time the first call."""
    from ralu_runtime.compile import (compile_adapter, load_compile_artifacts, save_compile_artifacts,
                                      uncompile_adapter)

    preset, _ = parse_row(row)
    nbytes = save_compile_artifacts(cache_file)
    uncompile_adapter(pipe)
    torch._dynamo.reset()
    loaded = load_compile_artifacts(cache_file)
    compile_adapter(pipe, "inductor", **compile_options(args, pipe))
    warm_first, _ = run_once(pipe, emb, args, preset, seed=7)
    steady, _ = run_once(pipe, emb, args, preset, seed=8)
    return {"row": row, "cache_bundle_bytes": nbytes, "bundle_loaded": loaded, "warm_start_first_call_s": warm_first,
            "steady_s": steady, "note": "warm start = same process after torch._dynamo.reset() with the cache bundle "
            "(torch.compiler.save/load_cache_artifacts) reloaded; a new process adds Python/model start-up"}


def stacked_plot(out_dir: Path, name: str, rows: list[dict], title: str):
    plt = pyplot()
    if plt is None:
        return None
    keys = []
    stages = [r.get("scaled_stages_s", r["stages_s"]) for r in rows]
    means = [effective(r) for r in rows]
    stdevs = [r.get("scaled_stdev_s", r["stdev_s"]) for r in rows]
    labels = [r["row"] + (f" ({r['measured_steps']}->{r['scaled_to_steps']} steps)" if "scaled_mean_s" in r else "")
              for r in rows]
    for st in stages:
        for k in st:
            if k not in keys:
                keys.append(k)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows) + 2), 4.5))
    bottom = [0.0] * len(rows)
    for k in keys:
        vals = [st.get(k, 0.0) for st in stages]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, (mean, sd) in enumerate(zip(means, stdevs)):
        ax.errorbar(i, mean, yerr=sd, fmt="k_", capsize=4)
        ax.text(i, mean, f" {mean:.2f}s", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("seconds per image (end to end)")
    ax.set_yscale("log" if max(means) / max(1e-9, min(means)) > 20 else "linear")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from ralu_runtime.families import CPU_FRAMES, MODELS

    ap.add_argument("--model", choices=tuple(MODELS), default="flux",
                    help="a published model of ralu_runtime.families.MODELS: flux / sd3 (FLUX.1-dev / SD3 Medium), "
                         "flux2, qwen-image, wan-480p, ... (its published full-size config, native resolution and "
                         "published sampler)")
    ap.add_argument("--size", choices=("full", "small"), default=None, help="default: full on CUDA, small on CPU")
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: baseline and two presets, both kinds)")
    ap.add_argument("--resolution", type=int, default=None,
                    help="pixels per side (default: the model's native size full, its CPU size small)")
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--steps", type=int, default=None,
                    help="baseline steps (default: the model's published setting, e.g. 50 FLUX.1-dev, 28 SD3)")
    ap.add_argument("--reps", type=positive_int, default=None,
                    help="timed runs per row (default 5; 2 for full eager baseline)")
    ap.add_argument("--warmup", type=non_negative_int, default=None,
                    help="untimed runs per row (default 2 compiled, 1 eager)")
    ap.add_argument("--warmup-shape", default=None, metavar="HxW[xF]",
                    help="eager rows: warm-up calls at this size (F: frames, video) instead of the timed size")
    ap.add_argument("--scale-baseline-to", type=int, default=None, metavar="N",
                    help="baseline rows run --steps steps; also report them scaled to N steps (their model-call stage "
                         "x N / steps + the measured rest); speedups then use the scaled baseline")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--no-fused-qkv", action="store_true")
    ap.add_argument("--attn-backend", default="auto", choices=("auto", "default", "cudnn", "flash", "efficient", "math"))
    ap.add_argument("--transition", default="auto", choices=("auto", "torch", "triton", "cuda"))
    ap.add_argument("--edge-detector", default=None, choices=("gpu", "opencv"), help="default gpu on CUDA, else opencv")
    ap.add_argument("--max-autotune", action="store_true", help="inductor max-autotune (longer compile)")
    ap.add_argument("--static-shapes", action="store_true", help="compile each stage shape statically (dynamic=False)")
    ap.add_argument("--interleave", action="store_true",
                    help="time the rows of each kind round-robin (fair ratios on a shared/noisy machine)")
    ap.add_argument("--start-times", action="store_true", help="measure cold and warm start of the compiled RALU row")
    ap.add_argument("--cache-dir", default=None, help="inductor cache folder (default: a fresh temporary one = cold)")
    ap.add_argument("--save-artifacts", default=None, metavar="FILE",
                    help="after the rows, write torch's compile-cache bundle (save_compile_artifacts) to FILE")
    ap.add_argument("--load-artifacts", default=None, metavar="FILE",
                    help="before the rows, load a bundle written by --save-artifacts (warm start in a new process)")
    ap.add_argument("--cache", default=None, help="temporal cache for the RALU rows, e.g. taylorseer:3 (stacking)")
    ap.add_argument("--kontext", action="store_true",
                    help="FLUX.1 Kontext: the model's pipeline as a FluxKontextPipeline with a random reference image "
                         "of --resolution² (its tokens appended at full resolution in every call); default 28 steps")
    ap.add_argument("--profile", action="store_true", help="write a torch profiler chrome trace for --profile-rows")
    ap.add_argument("--cprofile", action="store_true", help="print a cProfile (host side) of one call of --profile-rows")
    ap.add_argument("--no-compile-vae", action="store_true", help="compiled rows: keep the VAE decoder eager")
    ap.add_argument("--profile-rows", default=None, help="rows to profile (default: the compiled RALU rows)")
    ap.add_argument("--tag", default=None, help="file name tag (default: latency_<model>_<size>_<device>)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    from ralu_runtime.compile import compile_stats, enable_persistent_cache

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.size = args.size or ("full" if device.type == "cuda" else "small")
    model = MODELS[args.model]
    args.resolution = args.resolution or _side(model.native if args.size == "full" else model.cpu_size)
    args.frames = None
    if model.frames is not None:  # video: the release's frames at full size, CPU_FRAMES on a CPU
        args.frames = model.frames if args.size == "full" else CPU_FRAMES
    if args.kontext and model.family not in ("flux", "flux-schnell"):
        ap.error(f"--kontext runs a FLUX.1 model (FLUX.1 Kontext-dev has FLUX.1-dev's transformer); not {args.model}")
    args.steps = args.steps or (KONTEXT_STEPS if args.kontext else model.steps)
    args.guidance = model.guidance
    args.edge_detector = args.edge_detector or ("gpu" if device.type == "cuda" else "opencv")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = args.rows.split(",") if args.rows else default_rows(args.model)
    from ralu_runtime.families import FAMILIES

    for r in rows:  # the row names and their presets, before any model is built
        try:
            preset, _kind = parse_row(r)
        except ValueError as exc:
            ap.error(str(exc))
        if preset is not None and preset not in FAMILIES[model.family].presets:
            ap.error(f"row {r!r}: {args.model} has no preset {preset!r}; its presets: "
                     f"{', '.join(FAMILIES[model.family].presets)}")
    if args.warmup_shape is not None:
        try:
            dims = [int(v) for v in args.warmup_shape.lower().split("x")]
        except ValueError:
            dims = []
        if len(dims) not in (2, 3) or min(dims) < 1:
            ap.error(f"--warmup-shape {args.warmup_shape!r}: use HxW or HxWxF (frames)")
        args.warmup_shape = tuple(dims)
    rows = [r for r in rows if r.endswith("eager")] + [r for r in rows if r.endswith("compiled")]  # eager first
    args.profile_rows = args.profile_rows.split(",") if args.profile_rows else [r for r in rows if r.startswith("ralu")
                                                                                 and r.endswith("compiled")]
    args.tag = args.tag or f"latency_{args.model}{'_kontext' if args.kontext else ''}_{args.size}_{device_slug() if device.type == 'cuda' else 'cpu'}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="ralu-inductor-")
    cache_dir = enable_persistent_cache(args.cache_dir or tmp.name)
    artifacts = {}
    if args.load_artifacts:
        from ralu_runtime.compile import load_compile_artifacts

        t_load = time.perf_counter()
        if not load_compile_artifacts(args.load_artifacts):
            raise SystemExit(f"--load-artifacts {args.load_artifacts}: no such file")
        artifacts["loaded"] = {"path": str(args.load_artifacts), "bytes": Path(args.load_artifacts).stat().st_size,
                               "load_s": time.perf_counter() - t_load}
        print(f"loaded compile artifacts {args.load_artifacts} ({artifacts['loaded']['bytes'] / 1e6:.1f} MB) in "
              f"{artifacts['loaded']['load_s']:.2f} s")

    t0 = time.perf_counter()
    pipe = build_pipeline(args.model, args.size, device=device, dtype=dtype)
    args.reference = None
    if args.kontext:  # FLUX.1 Kontext-dev: FLUX.1-dev's transformer (guidance-distilled, same config) and VAE
        from diffusers import FluxKontextPipeline

        pipe = FluxKontextPipeline(**pipe.components)
        args.reference = kontext_reference(args.resolution)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    text_len = model.text_len if args.size == "full" else model.cpu_text_len
    if args.scale_baseline_to is not None and not 1 <= args.steps <= args.scale_baseline_to:
        raise SystemExit(f"--scale-baseline-to {args.scale_baseline_to}: needs 1 <= --steps ({args.steps}) <= it")
    emb = prompt_embeds(pipe, args.model, args.batch, text_len, device, dtype)
    print(f"{args.model} {args.size}: {n_params / 1e9:.2f} B transformer parameters, {dtype}, {args.resolution}^2, "
          f"batch {args.batch}, text {text_len} tokens, built in {build_s:.1f} s on {device}")

    t1 = time.perf_counter()
    results = bench_rows(pipe, emb, args, rows)
    bench_s = time.perf_counter() - t1

    by = {r["row"]: r for r in results}
    for r in results:
        for ref in ("baseline-eager", "baseline-compiled"):
            if ref in by:
                r[f"speedup_vs_{ref}"] = effective(by[ref]) / effective(r)
                r[f"speedup_min_vs_{ref}"] = effective(by[ref], "min_s") / effective(r, "min_s")  # loaded machine
    start = None
    compiled_ralu = [r for r in rows if r.startswith("ralu") and r.endswith("compiled")]
    if args.start_times and compiled_ralu:
        row = compiled_ralu[-1]
        start = start_times(pipe, emb, args, row, Path(cache_dir) / "ralu_cache_bundle.bin")
        start["cold_start_first_call_s"] = by[row]["first_call_s"]
        print(f"start times [{row}]: cold first call {start['cold_start_first_call_s']:.1f} s, warm first call "
              f"{start['warm_start_first_call_s']:.1f} s, steady {start['steady_s']:.2f} s")

    if args.save_artifacts:
        from ralu_runtime.compile import save_compile_artifacts

        t_save = time.perf_counter()
        nbytes = save_compile_artifacts(args.save_artifacts)
        artifacts["saved"] = {"path": str(args.save_artifacts), "bytes": nbytes, "save_s": time.perf_counter() - t_save}
        print(f"saved compile artifacts to {args.save_artifacts} ({nbytes / 1e6:.1f} MB)")

    cols = ["row", "mean_s", "stdev_s", *(["scaled_mean_s"] if args.scale_baseline_to else []),
            "speedup_vs_baseline-eager", "speedup_vs_baseline-compiled", "compile_s",
            "graphs_compiled_in_warmup", "recompiles_after_warmup", "cuda_graph_captures"]
    print_table(results, cols)
    stage_rows = [{"row": r["row"], **{k: round(v * 1e3, 1) for k, v in r["stages_s"].items()}} for r in results]
    order = ["baseline", "stage1", "edges", "transition12", "stage2", "transition23", "stage3", "vae_decode", "other"]
    stage_cols = ["row"] + sorted({k for r in results for k in r["stages_s"]},
                                  key=lambda k: order.index(k) if k in order else len(order))
    print("per-stage means (ms):")
    print_table(stage_rows, stage_cols)
    write_json(args.out, args.tag, {
        "model": args.model, "size": args.size, "resolution": args.resolution, "batch": args.batch, "dtype": str(dtype),
        "text_len": text_len, "transformer_params": n_params, "baseline_steps": args.steps,
        "baseline_scaled_to_steps": args.scale_baseline_to, "num_frames": args.frames,
        "flags": {k: getattr(args, k) for k in ("no_cuda_graphs", "no_fused_qkv", "attn_backend", "transition",
                                                "edge_detector", "max_autotune", "static_shapes", "no_compile_vae")},
        "model_build_s": build_s, "bench_wall_s": bench_s, "rows": results, "start_times": start, "dynamo": compile_stats(),
        "cache": args.cache, "artifacts": artifacts or None,
        "kontext": {"reference_px": [args.resolution, args.resolution], "auto_resize": False} if args.kontext else None,
        "notes": "end to end per image: cached prompt embeddings, all stages, edge selection, transitions, VAE decode; "
                 "compile_s = first call - steady mean" + (
                     f"; baseline rows ran {args.steps} steps, scaled_* fields and speedups extrapolate them to "
                     f"{args.scale_baseline_to} (model-call stage x {args.scale_baseline_to}/{args.steps} + measured "
                     "rest)" if args.scale_baseline_to else "")})
    stacked_plot(Path(args.out), args.tag, results,
                 f"{args.model} {args.size} {args.resolution}^2 {str(dtype).replace('torch.', '')} on "
                 f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
