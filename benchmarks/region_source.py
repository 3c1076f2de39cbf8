"""Regions from the decoded preview or from the latents (``region_source``): what each costs, and whether the
choice changes.

Three measurements, one JSON (``benchmarks/results/region_source.json``) and one PNG:

* ``flops``: the half-resolution preview decode that ``region_source="decode"`` adds, at full size on meta tensors
  (torch's FlopCounterMode; the published VAE configs of ``ralu_runtime.tiny``), next to the transformer FLOPs of
  each preset and the final full-resolution decode (which every run has). The latent scorer (a 3x3 Sobel pair per
  channel) costs about 40 FLOPs per latent value: counted analytically.
* ``cpu``: small random video models on the CPU, RALU 7x / 4x with either source against the baseline, rows
  interleaved, median of ``--reps``: the region-choice time (``timings["edges"]``: preview decode + Canny, or
  Sobel on the latents), the whole call, and the overlap (Jaccard) of the two sources' regions for the same seed
  (stage 1 is identical for both, so the same Tweedie estimate is scored). Random weights: the overlap says how
  two scorers agree on this model's (structureless) previews, not on real videos.
* ``oracle``: the video Gaussian oracle of ``benchmarks/quality_oracle_video.py``, whose "VAE" is a known linear
  mix + 8x upsampling: the overlap of the two sources' regions and the sampled Fréchet distance of each
  (3 seeds x ``--samples`` clips), per region mode and preset.

``python benchmarks/region_source.py [--quick]``.
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
from ralu_runtime.families import MODELS  # noqa: E402

VIDEO_FAMILIES = ("wan-480p", "wan-720p", "hunyuan-video15")
IMAGE_FAMILIES = ("flux",)
KNOWN_FAMILIES = tuple(MODELS)   # benchmarks.families.FAMILIES: every published model


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of |a & b| / |a | b| for bool masks ``(B, ...)``."""
    a, b = a.flatten(1), b.flatten(1)
    inter, union = (a & b).sum(1).double(), (a | b).sum(1).double()
    return float((inter / union.clamp_min(1)).mean())


# ------------------------------------------------------------------------------------------------ FLOPs
def preview_flops(key: str) -> dict:
    """Preview decode vs transformer vs final decode, TFLOPs at the family's native size (meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.families import FAMILIES, family_flops, setup_family

    fam = FAMILIES[key]
    pipe, adapter, *_ = setup_family(fam, "full", "meta", torch.bfloat16, 1, 8)
    rh, rw = fam.native
    f = adapter.vae_scale_factor
    shape = [1, adapter.latent_channels]
    if fam.frames is not None:
        shape.append(1 + (fam.frames - 1) // adapter.temporal_factor)
    full = torch.zeros(*shape, rh // f, rw // f, device="meta", dtype=torch.bfloat16)
    half = torch.zeros(*shape, rh // f // 2, rw // f // 2, device="meta", dtype=torch.bfloat16)
    counts = {}
    for name, fn in (("preview_decode", lambda: adapter.edge_images(half, adapter.decode)),
                     ("final_decode", lambda: adapter.decode(full))):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        counts[name] = fc.get_total_flops() / 1e12
    counts["latent_score"] = 40 * half.numel() / 1e12
    tr = family_flops(key)
    runs = []
    for r in tr["runs"]:
        if r["run"] == "baseline":
            continue
        total_decode = r["tflops"] + counts["final_decode"] + counts["preview_decode"]
        total_latent = r["tflops"] + counts["final_decode"] + counts["latent_score"]
        runs.append({"preset": r["run"], "transformer_tflops": r["tflops"],
                     "preview_share_of_call": counts["preview_decode"] / total_decode,
                     "call_ratio_gain": total_decode / total_latent})
    return {"family": key, "label": fam.label, "resolution": [rh, rw], "num_frames": fam.frames,
            "preview_latent_shape": list(half.shape), **{k + "_tflops": v for k, v in counts.items()},
            "baseline_transformer_tflops": tr["runs"][0]["tflops"], "presets": runs}


# ------------------------------------------------------------------------------------------------ CPU
def cpu_rows(key: str, reps: int, size: tuple[int, int], frames: int) -> dict:
    from benchmarks.families import FAMILIES, setup_family
    from ralu_runtime import generate

    fam = FAMILIES[key]
    torch.manual_seed(0)
    pipe, adapter, emb, presets, steps, guidance = setup_family(fam, "small", "cpu", torch.float32, 1, 32)
    common = dict(height=size[0], width=size[1], guidance_scale=guidance, output_type="pt", progress=False,
                  num_frames=frames, return_masks=True)
    rows = [("baseline", dict(speedup=None, num_inference_steps=steps))]
    for p in presets:
        rows += [(f"{p} decode", dict(speedup=p, region_source="decode")),
                 (f"{p} latent", dict(speedup=p, region_source="latent"))]
    for _, kw in rows:  # warm-up
        generate(pipe, **emb, **common, **kw, seed=0)
    times = {n: [] for n, _ in rows}
    edges = {n: [] for n, _ in rows}
    overlap = {p: [] for p in presets}
    for rep in range(reps):
        masks = {}
        for name, kw in rows:
            t0 = time.perf_counter()
            out = generate(pipe, **emb, **common, **kw, seed=rep)
            times[name].append(time.perf_counter() - t0)
            edges[name].append(out.timings.get("edges", 0.0))
            masks[name] = out.masks
        for p in presets:
            overlap[p].append(jaccard(masks[f"{p} decode"], masks[f"{p} latent"]))
    base = statistics.median(times["baseline"])
    out = []
    for name, _ in rows:
        med = statistics.median(times[name])
        out.append({"run": name, "median_s": med, "ratio": base / med, "edges_median_s": statistics.median(edges[name]),
                    "times_s": times[name]})
    return {"family": key, "label": fam.label, "size": list(size), "num_frames": frames, "runs": out,
            "jaccard": {p: statistics.mean(v) for p, v in overlap.items()}}


# ------------------------------------------------------------------------------------------------ oracle
def oracle_rows(samples: int, seeds: int, quick: bool) -> list[dict]:
    from benchmarks.quality_oracle_video import CHANNELS, FRAMES, ORACLES, RHO, SIZE, Runner
    from ralu_runtime import generate
    from ralu_runtime.adapters.oracle_video import GaussianVideoOracle
    from ralu_runtime.schedule import get_preset

    torch.set_num_threads(1)
    rows = []
    for oname in (("nonstationary-moving",) if quick else tuple(ORACLES)):
        o = GaussianVideoOracle(SIZE, FRAMES, CHANNELS, rho=RHO, **ORACLES[oname])
        rn = Runner(o, samples, list(range(seeds)))
        hh, ww = o.image_size
        for pname in (("7x",) if quick else ("4x", "7x")):
            sch = get_preset("flux", pname)
            for mode in ("frame", "clip"):
                masks = {src: generate(o, [""] * samples, height=hh, width=ww, num_frames=o.F, speedup=sch,
                                       region_mode=mode, region_source=src, seed=0, output_type="latent",
                                       return_masks=True, progress=False).masks for src in ("decode", "latent")}
                row = {"oracle": oname, "preset": pname, "region_mode": mode,
                       "jaccard": jaccard(masks["decode"], masks["latent"])}
                for src in ("decode", "latent"):
                    r = rn.ralu(sch, mode, src)
                    row[f"fd_{src}"], row[f"fd_{src}_std"] = r["fd"], r["fd_std"]
                rows.append(row)
                print(f"  {oname:20s} {pname} {mode:5s} jaccard {row['jaccard']:.3f}  FD decode "
                      f"{row['fd_decode']:.3f} +- {row['fd_decode_std']:.3f}  latent {row['fd_latent']:.3f} +- "
                      f"{row['fd_latent_std']:.3f}", flush=True)
    return rows


def plot(out_dir: Path, name: str, flops: list[dict], cpu: list[dict]) -> Path | None:
    plt = pyplot()
    if plt is None or not (flops or cpu):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if flops:
        labels = [f"{f['family']} {p['preset']}" for f in flops for p in f["presets"]]
        share = [100 * p["preview_share_of_call"] for f in flops for p in f["presets"]]
        axes[0].barh(labels, share, color="tab:orange")
        axes[0].set_xlabel("preview decode, % of a RALU call's FLOPs (full size)")
    if cpu:
        labels, dec, lat = [], [], []
        for c in cpu:
            by = {r["run"]: r for r in c["runs"]}
            for p in c["jaccard"]:
                labels.append(f"{c['family']} {p}")
                dec.append(by[f"{p} decode"]["ratio"])
                lat.append(by[f"{p} latent"]["ratio"])
        y = range(len(labels))
        axes[1].barh([i - 0.2 for i in y], dec, height=0.4, label="decode")
        axes[1].barh([i + 0.2 for i in y], lat, height=0.4, label="latent")
        axes[1].set_yticks(list(y), labels)
        axes[1].set_xlabel("CPU whole-call speedup vs baseline (small models)")
        axes[1].legend()
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="region_source")
    ap.add_argument("--what", nargs="+", choices=("flops", "cpu", "oracle"), default=["flops", "cpu", "oracle"])
    ap.add_argument("--families", nargs="+", default=None, choices=KNOWN_FAMILIES,
                    help=f"FLOPs: default {VIDEO_FAMILIES + IMAGE_FAMILIES}")
    ap.add_argument("--cpu-families", nargs="+", default=["wan-480p", "hunyuan-video15"], choices=KNOWN_FAMILIES)
    ap.add_argument("--cpu-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--samples", type=positive_int, default=200)
    ap.add_argument("--seeds", type=positive_int, default=3)
    ap.add_argument("--quick", action="store_true", help="toy sizes: one family per part, 1 rep, few samples")
    args = ap.parse_args(argv)
    if args.quick:
        args.families = args.families or ["flux"]
        args.cpu_families, args.cpu_size, args.frames, args.reps = ["wan-480p"], (64, 96), 5, 1
        args.samples, args.seeds = 16, 2
    flops, cpu, oracle = [], [], []
    if "flops" in args.what:
        for key in args.families or VIDEO_FAMILIES + IMAGE_FAMILIES:
            flops.append(preview_flops(key))
        print_table([{"family": f["family"], "preset": p["preset"], "preview TFLOPs": f"{f['preview_decode_tflops']:.1f}",
                      "final decode TFLOPs": f"{f['final_decode_tflops']:.1f}",
                      "transformer TFLOPs": f"{p['transformer_tflops']:.0f}",
                      "preview share": f"{100 * p['preview_share_of_call']:.2f} %",
                      "call gain (latent)": f"{p['call_ratio_gain']:.4f}x"} for f in flops for p in f["presets"]],
                    ["family", "preset", "preview TFLOPs", "final decode TFLOPs", "transformer TFLOPs",
                     "preview share", "call gain (latent)"])
    if "cpu" in args.what:
        for key in args.cpu_families:
            cpu.append(cpu_rows(key, args.reps, tuple(args.cpu_size), args.frames))
        print_table([{"family": c["family"], "run": r["run"], "median s": f"{r['median_s']:.2f}",
                      "ratio": f"{r['ratio']:.2f}", "edges s": f"{r['edges_median_s']:.3f}",
                      "jaccard": f"{c['jaccard'].get(r['run'].split()[0], float('nan')):.3f}"}
                     for c in cpu for r in c["runs"]], ["family", "run", "median s", "ratio", "edges s", "jaccard"])
    if "oracle" in args.what:
        oracle = oracle_rows(args.samples, args.seeds, args.quick)
    result = {"flops": flops, "cpu": cpu, "oracle": oracle,
              "notes": "flops: FlopCounterMode on meta tensors, published VAE/transformer configs; cpu: small random "
                       "models, float32, rows interleaved; oracle: the video Gaussian oracle (exact VAE known)"}
    path = write_json(args.out, args.name, result)
    png = plot(Path(args.out), args.name, flops, cpu)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return result


if __name__ == "__main__":
    main()
