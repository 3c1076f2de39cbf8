"""FLOPs of the latency benchmark's runs, counted by torch's FlopCounterMode on meta-device models.

Full-size FLUX.1-dev / SD3-medium shaped transformers (random weights are irrelevant: meta tensors carry
shapes only, so this runs on a CPU in seconds with no memory). Per model call at each stage's token count,
per stage (steps x per-call FLOPs), per run, for the baseline (the published sampler of
``ralu_runtime.families.MODELS``: 50 steps FLUX.1-dev, 28 SD3 Medium, full resolution) and the RALU presets at
1024^2 (FLUX text 512 tokens; SD3 333 tokens with CFG). VAE decodes (half resolution for
the edge map, full resolution at the end) are counted separately. Printed next to the paper's TFLOPs table
(FLUX.1-dev 1024^2: baseline 2991.0, RALU 5x 540.5, RALU 7x 426.0).

    python benchmarks/flops.py [--model flux sd3] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import positive_int, print_table, pyplot, save_figure, write_json  # noqa: E402
from ralu_runtime.families import MODELS  # noqa: E402

PAPER_TFLOPS = {"flux": {"baseline": 2991.0, "5x": 540.5, "7x": 426.0}}  # the paper's table, FLUX.1-dev 1024^2


ATTENTION_OPS = ("bmm", "attention")  # on meta tensors SDPA runs its math path: attention = the bmm FLOPs


def count(fn, split: bool = False):
    """Total FLOPs of ``fn()``; with ``split``: (total, attention FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False)
    with mode, torch.no_grad():
        fn()
    total = mode.get_total_flops()
    if not split:
        return total
    attn = sum(v for k, v in mode.get_flop_counts()["Global"].items() if any(a in str(k) for a in ATTENTION_OPS))
    return total, attn


def velocity_flops(adapter, cond, tokens: int, batch: int, grid_hw, mixed: bool, frames: int = 1) -> int:
    from ralu_runtime.adapters import TokenGrid

    dev = torch.device("meta")
    x = torch.empty(batch, tokens, adapter.token_channels, device=dev, dtype=adapter.dtype)
    pos = torch.empty(batch, tokens, 2, device=dev, dtype=torch.float32)
    mask = torch.empty(batch, tokens, device=dev, dtype=torch.bool) if mixed else None
    grid = TokenGrid(pos, grid_hw, mask, raster=not mixed, frames=frames)
    t = torch.empty((), device=dev, dtype=torch.float32)
    return count(lambda: adapter.velocity(x, grid, t, cond), split=True)


def model_flops(model: str, resolution: int, batch: int) -> dict:
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.schedule import get_preset

    spec = MODELS[model]  # the published model: shapes, text length, baseline steps, presets
    pipe = spec.build("full", device="meta", dtype=torch.bfloat16)
    adapter = get_adapter(pipe)
    emb = spec.random_embeds(pipe, batch, spec.text_len, device="meta", dtype=torch.bfloat16)
    cond = adapter.encode_prompt(None, None, **emb, guidance_scale=adapter.default_guidance)
    p, f = adapter.patch_size, adapter.vae_scale_factor
    fine = (resolution // (p * f), resolution // (p * f))
    coarse = (fine[0] // 2, fine[1] // 2)
    m = coarse[0] * coarse[1]
    cache: dict = {}

    def per_call(tokens, grid_hw, mixed):
        key = (tokens, grid_hw, mixed)
        if key not in cache:
            cache[key] = velocity_flops(adapter, cond, tokens, batch, grid_hw, mixed)
        return cache[key]

    vae = pipe.vae
    lat = lambda s: torch.empty(batch, 16, s // f, s // f, device="meta", dtype=torch.bfloat16)  # noqa: E731
    vae_full = count(lambda: vae.decode(lat(resolution)))
    vae_half = count(lambda: vae.decode(lat(resolution // 2)))

    runs = []
    steps = spec.steps
    base_call, base_attn = per_call(4 * m, fine, False)
    runs.append({"run": "baseline", "steps": steps, "stages": [{"stage": "baseline", "steps": steps, "tokens": 4 * m,
                                                               "tflops_per_call": base_call / 1e12,
                                                               "tflops": steps * base_call / 1e12,
                                                               "attention_tflops": steps * base_attn / 1e12}],
                 "transformer_tflops": steps * base_call / 1e12, "vae_tflops": vae_full / 1e12})
    for name in spec.preset_names:
        sched = get_preset(adapter.family, name)
        k = int(m * sched.ratio)
        stages = [("stage1", m, coarse, False), ("stage2", m + 3 * k, coarse, True), ("stage3", 4 * m, fine, False)]
        rows = []
        for (sname, tokens, hw, mixed), n in zip(stages, sched.steps):
            c, a = per_call(tokens, hw, mixed)
            rows.append({"stage": sname, "steps": n, "tokens": tokens, "tflops_per_call": c / 1e12, "tflops": n * c / 1e12,
                         "attention_tflops": n * a / 1e12})
        runs.append({"run": f"ralu-{name}", "steps": sum(sched.steps), "ratio": sched.ratio, "stages": rows,
                     "transformer_tflops": sum(r["tflops"] for r in rows), "vae_tflops": (vae_full + vae_half) / 1e12})
    base = runs[0]["transformer_tflops"]
    paper = PAPER_TFLOPS.get(model, {})
    for r in runs:
        r["attention_tflops"] = sum(s["attention_tflops"] for s in r["stages"])
        r["tflops_excl_attention"] = r["transformer_tflops"] - r["attention_tflops"]
    for r in runs:
        key = r["run"].replace("ralu-", "")
        r["ratio_excl_attention"] = runs[0]["tflops_excl_attention"] / r["tflops_excl_attention"]
        r["flop_ratio_baseline_over_this"] = base / r["transformer_tflops"]
        r["end_to_end_ratio_incl_vae"] = (base + runs[0]["vae_tflops"]) / (r["transformer_tflops"] + r["vae_tflops"])
        if key in paper:
            r["paper_tflops"] = paper[key]
            r["paper_ratio"] = paper["baseline"] / paper[key]
    return {"model": model, "resolution": resolution, "batch": batch, "text_len": spec.text_len,
            "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
            "per_call_tflops": {f"{t} tokens{' (mixed)' if mx else ''}": v[0] / 1e12 for (t, _hw, mx), v in cache.items()},
            "per_call_attention_tflops": {f"{t} tokens{' (mixed)' if mx else ''}": v[1] / 1e12
                                          for (t, _hw, mx), v in cache.items()},
            "vae_decode_tflops": {"full": vae_full / 1e12, "half": vae_half / 1e12}, "runs": runs}


def plot(out_dir: Path, name: str, results: list[dict]):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        labels = [r["run"] for r in res["runs"]]
        ours = [r["transformer_tflops"] for r in res["runs"]]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], ours, width=0.4, label="ours (FlopCounterMode)")
        paper = [r.get("paper_tflops", 0.0) for r in res["runs"]]
        if any(paper):
            ax.bar([i + 0.2 for i in x], paper, width=0.4, label="paper")
        for i, r in enumerate(res["runs"]):
            ax.text(i, max(ours[i], paper[i]), f"{r['flop_ratio_baseline_over_this']:.2f}x", ha="center", va="bottom",
                    fontsize=8)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("transformer TFLOPs per image")
        ax.set_title(f"{res['model']} {res['resolution']}^2", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, out_dir, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["flux", "sd3"], choices=("flux", "sd3"))
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    results = [model_flops(m, args.resolution, args.batch) for m in args.model]
    for res in results:
        print(f"\n{res['model']} {res['resolution']}^2, {res['transformer_params'] / 1e9:.2f} B parameters; "
              f"TFLOPs per model call: " + ", ".join(f"{k}: {v:.2f}" for k, v in res["per_call_tflops"].items()))
        table = []
        for r in res["runs"]:
            table.append({"run": r["run"], "steps": r["steps"],
                          "stages": " + ".join(f"{s['steps']}x{s['tokens']}" for s in r["stages"]),
                          "TFLOPs": r["transformer_tflops"], "ratio": r["flop_ratio_baseline_over_this"],
                          "paper TFLOPs": r.get("paper_tflops", ""), "paper ratio": r.get("paper_ratio", ""),
                          "excl. attn": r["tflops_excl_attention"], "ratio excl. attn": r["ratio_excl_attention"],
                          "+VAE TFLOPs": r["transformer_tflops"] + r["vae_tflops"],
                          "ratio incl. VAE": r["end_to_end_ratio_incl_vae"]})
        print_table(table, ["run", "steps", "stages", "TFLOPs", "ratio", "paper TFLOPs", "paper ratio", "excl. attn",
                            "ratio excl. attn", "+VAE TFLOPs", "ratio incl. VAE"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(args.out, "flops", {"results": results, "paper_tflops": PAPER_TFLOPS,
                                   "notes": "torch.utils.flop_counter.FlopCounterMode on meta tensors (matmul = 2mnk, "
                                            "attention included; 'excl. attention' drops the SDPA bmm FLOPs, which "
                                            "is how the paper's baseline 2991 TFLOPs appears to be counted); "
                                            "transformer only unless '+VAE'"})
    plot(Path(args.out), "flops", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
