"""RALU on every published model of ``ralu_runtime.families.MODELS``: transformer FLOPs per preset at the native
resolution, and CPU latency ratios.

FLOPs: torch's FlopCounterMode on a meta-device transformer with the model's published full-size config (no
memory, no weights), per model call at each stage's token count, times the stage's steps; the release's published
sampler (``MODELS[key].steps`` at full resolution, its guidance and scheduler shift) is the baseline. CFG models
count both branches (the ratio does not change). VAE decodes are not included.

CPU latency: the family's "small" benchmark model (random weights, a few blocks) in float32 on the CPU; the
default sampler and each preset run interleaved (round-robin, ``--reps`` rounds), whole ``generate`` calls incl.
the VAE decodes; the ratio is baseline median / preset median within this one run, for the whole call and for
its transformer stages alone (the sampler's stage clocks: RALU's edge preview, transitions and the VAE excluded).

    python benchmarks/families.py [--family flux2 qwen-image ...] [--what flops cpu] [--out benchmarks/results]

The committed tables: ``--what flops --family flux sd3 <DEFAULT_FAMILIES> --name families_flops`` and
``--what flops --family <VIDEO_FAMILIES> --name families_video_flops``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import positive_int, print_table, pyplot, save_figure, write_json  # noqa: E402
from benchmarks.flops import velocity_flops  # noqa: E402
from ralu_runtime.families import CPU_FRAMES, MODELS  # noqa: E402

# the benchmarked models: ralu_runtime.families.MODELS (published settings, builders, native and CPU sizes)
FAMILIES = MODELS
DEFAULT_FAMILIES = ("flux2", "flux2-klein", "qwen-image", "z-image", "z-image-turbo", "chroma", "sd35-large",
                    "sd35-medium")
VIDEO_FAMILIES = ("wan-480p", "wan-720p", "wan22-a14b", "hunyuan-video15")


def setup_family(model, size: str, device, dtype, batch: int, text_len: int):
    """Build ``model`` (a :class:`ralu_runtime.families.Model`) at ``size`` with random prompt embeddings; returns
    ``(pipe, adapter, embeddings, presets, baseline steps, guidance)`` (the release's sampler; guidance None: the
    adapter's default)."""
    from ralu_runtime.adapters import get_adapter

    pipe = model.build(size, device=device, dtype=dtype)
    adapter = get_adapter(pipe)
    emb = model.random_embeds(pipe, batch, text_len, device=device, dtype=dtype)
    guidance = adapter.default_guidance if model.guidance is None else model.guidance
    return pipe, adapter, emb, model.preset_names, model.steps, guidance


# ----------------------------------------------------------------------------------------------- FLOPs
def family_flops(key: str, batch: int = 1) -> dict:
    from ralu_runtime.schedule import get_preset

    fam = FAMILIES[key]
    pipe, adapter, emb, presets, steps, guidance = setup_family(fam, "full", "meta", torch.bfloat16, batch,
                                                                fam.text_len)
    cond = adapter.encode_prompt(None, None, **emb, guidance_scale=guidance)
    p, f = adapter.patch_size, adapter.vae_scale_factor
    rh, rw = fam.native
    frames = 1 if fam.frames is None else 1 + (fam.frames - 1) // adapter.temporal_factor  # latent frames
    fine = (frames * (rh // (p * f)), rw // (p * f))  # video: frames stacked (the sampler's tall grid)
    coarse = (fine[0] // 2, fine[1] // 2)
    m = coarse[0] * coarse[1]
    cache: dict = {}

    def per_call(tokens, grid_hw, mixed):
        key_ = (tokens, grid_hw, mixed)
        if key_ not in cache:
            cache[key_] = velocity_flops(adapter, cond, tokens, batch, grid_hw, mixed, frames)[0]
        return cache[key_]

    base = steps * per_call(4 * m, fine, False)
    runs = [{"run": "baseline", "steps": steps, "tflops": base / 1e12, "ratio": 1.0}]
    for name in presets:
        sched = get_preset(adapter.family, name, adapter.preset_base_shift(rh, rw))
        k = int(m * sched.ratio)
        tokens = ((m, coarse, False), (m + 3 * k, coarse, True), (4 * m, fine, False))
        total = sum(n * per_call(*t) for n, t in zip(sched.steps, tokens))
        runs.append({"run": name, "steps": sched.total_steps, "stage_steps": list(sched.steps),
                     "stage_tokens": [t[0] for t in tokens], "base_shift": sched.base_shift, "tflops": total / 1e12,
                     "ratio": base / total})
    return {"family": key, "label": fam.label, "adapter_family": adapter.family, "resolution": [rh, rw],
            "sampler": {"steps": steps, "guidance": guidance, "guidance_2": fam.guidance_2,
                        "flow_shift": fam.flow_shift, "source": "ralu_runtime.families.MODELS"},
            "num_frames": fam.frames, "latent_frames": frames, "fine_tokens": 4 * m,
            "text_len": fam.text_len, "cfg": bool(cond.data.get("cfg", False)) if isinstance(cond.data, dict) else None,
            "transformer_params": sum(q.numel() for q in pipe.transformer.parameters()),
            "per_call_tflops": {f"{t} tokens{' (mixed)' if mx else ''}": v / 1e12 for (t, _hw, mx), v in cache.items()},
            "runs": runs, "notes": fam.notes}


# ----------------------------------------------------------------------------------------------- CPU latency
MODEL_STAGES = ("baseline", "stage1", "stage2", "stage3")  # the sampler's transformer stages (timings keys)
def family_cpu(key: str, reps: int = 3, size: int | None = None, text_len: int = 32) -> dict:
    from ralu_runtime import generate

    fam = FAMILIES[key]
    torch.manual_seed(0)
    pipe, adapter, emb, presets, steps, guidance = setup_family(fam, "small", "cpu", torch.float32, 1, text_len)
    sh, sw = (size, size) if size else fam.cpu_size
    rows = [("baseline", dict(speedup=None, num_inference_steps=steps))] + [(n, dict(speedup=n)) for n in presets]
    common = dict(height=sh, width=sw, guidance_scale=guidance, output_type="pt", progress=False)
    if fam.frames is not None:
        common["num_frames"] = CPU_FRAMES
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    model_times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for name, kw in rows:  # warm-up: one call per row (first-call allocations, preset solves)
        generate(pipe, **emb, **common, **kw, seed=0)
    for rep in range(reps):
        for name, kw in rows:
            t0 = time.perf_counter()
            out = generate(pipe, **emb, **common, **kw, seed=rep)
            times[name].append(time.perf_counter() - t0)
            model_times[name].append(sum(v for k, v in out.timings.items() if k in MODEL_STAGES))
    base = statistics.median(times["baseline"])
    base_model = statistics.median(model_times["baseline"])
    out = []
    for name, kw in rows:
        med, med_model = statistics.median(times[name]), statistics.median(model_times[name])
        out.append({"run": name, "median_s": med, "times_s": times[name], "ratio": base / med,
                    "transformer_median_s": med_model, "transformer_ratio": base_model / med_model})
    return {"family": key, "label": fam.label, "adapter_family": adapter.family, "size": [sh, sw], "steps": steps,
            "num_frames": common.get("num_frames"),
            "transformer_params": sum(q.numel() for q in pipe.transformer.parameters()), "runs": out}


def plot(out_dir: Path, name: str, flops: list[dict], cpu: list[dict]):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(flops or cpu)), 4))
    labels, fr, cr = [], [], []
    for res in flops or cpu:
        for r in res["runs"][1:]:
            labels.append(f"{res['label']}\n{r['run']}")
            fr.append(r["ratio"] if flops else 0.0)
            c = next((c for c in cpu if c["family"] == res["family"]), None)
            cr.append(next((x["ratio"] for x in c["runs"] if x["run"] == r["run"]), 0.0) if c else 0.0)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], fr, width=0.4, label="FLOP ratio (full size, native res.)")
    ax.bar([i + 0.2 for i in x], cr, width=0.4, label="CPU latency ratio (small model)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("baseline / RALU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=list(DEFAULT_FAMILIES), choices=tuple(FAMILIES))
    ap.add_argument("--what", nargs="+", default=["flops", "cpu"], choices=("flops", "cpu"))
    ap.add_argument("--reps", type=positive_int, default=3, help="interleaved rounds of the CPU latency rows")
    ap.add_argument("--cpu-size", type=int, default=None, help="pixels per side of the CPU runs (default 256)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="families")
    args = ap.parse_args(argv)
    flops = [family_flops(k) for k in args.family] if "flops" in args.what else []
    for res in flops:
        print(f"\n{res['label']} ({res['adapter_family']}) {res['resolution'][0]}x{res['resolution'][1]}, "
              f"{res['transformer_params'] / 1e9:.2f} B parameters, text {res['text_len']} tokens")
        print_table([{"run": r["run"], "steps": r["steps"], "TFLOPs": r["tflops"], "ratio": r["ratio"],
                      "h_ori": r.get("base_shift", "")} for r in res["runs"]], ["run", "steps", "TFLOPs", "ratio", "h_ori"])
    cpu = []
    for k in (args.family if "cpu" in args.what else []):
        res = family_cpu(k, args.reps, args.cpu_size)
        cpu.append(res)
        print(f"\n{res['label']} small model ({res['transformer_params'] / 1e6:.1f} M parameters), CPU, "
              f"{res['size'][0]}x{res['size'][1]}, baseline {res['steps']} steps")
        print_table([{"run": r["run"], "median s": r["median_s"], "ratio": r["ratio"],
                      "transformer s": r["transformer_median_s"], "transformer ratio": r["transformer_ratio"]}
                     for r in res["runs"]], ["run", "median s", "ratio", "transformer s", "transformer ratio"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(args.out, args.name, {"flops": flops, "cpu": cpu,
                                     "notes": "FLOPs: FlopCounterMode on meta tensors, transformer only, published "
                                              "full-size configs; CPU: small random models, float32, interleaved "
                                              "rounds, whole generate incl. VAE decode"})
    plot(Path(args.out), args.name, flops, cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
