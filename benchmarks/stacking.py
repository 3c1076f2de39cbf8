"""RALU stacked with temporal caching (TaylorSeer) and with FLUX.1-schnell: FLOPs, CPU latency, oracle quality.

Rows (the paper's table, plus a few for context):

* ``dev-50``: FLUX.1-dev, 50 full-resolution steps (the reference: 2991.0 TFLOPs in the paper);
* ``ralu-4x`` / ``ralu-5x`` / ``ralu-7x``: RALU presets;
* ``ralu-5x+ts-w3`` / ``ralu-5x+ts-w2``: RALU 5x with a TaylorSeer cache, interval W = 3 / 2, order 1, default
  warmup (order + 1 full steps at each stage start); ``...-wu1`` rows: warmup 1 (more skipped steps);
* ``dev-50+ts-w3``: TaylorSeer alone on the baseline (context);
* ``schnell-4``: FLUX.1-schnell, 4 full-resolution steps (no guidance embedding; same FLOPs per step);
* ``schnell+ralu``: schnell with RALU's "4step" preset (1, 1, 2 steps).

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device FLUX.1-dev-shaped transformer (19 double +
38 single blocks, hidden 3072, 24 heads x 128, 512 text tokens; schnell: the same without guidance embedding),
one forward through :class:`~ralu_runtime.adapters.flux.FluxAdapter` per image-token count (1024² image: 4096
fine tokens, 1024 coarse, stage 2 ``1024 + 3 int(1024 r)``). A full step costs the whole forward; a cached
step (TaylorSeer) costs only the embeddings, conditioning and output head (counted the same way, with a cache
that returns its input; the extrapolation itself is elementwise, which FlopCounterMode does not count).
The full/cached pattern of every stage comes from :meth:`TaylorSeerCache.plan`, the cache's own rule.

Latency: CPU, one run, a small FLUX-shaped random model (``--hidden``, ``--blocks``, 512² -> 1024 fine tokens,
64 text tokens), :func:`ralu_runtime.generate` with ``output_type="latent"`` (includes edge selection and
transitions); rows run round robin, one warm-up round then ``--reps`` rounds, the minimum is reported (the
CPU may be shared with other work).

Quality: the Gaussian oracle (:class:`~ralu_runtime.adapters.oracle.GaussianOracle`, 16x16 fine tokens,
non-stationary), whose exact velocity is routed through ``run_blocks`` so the cache extrapolates it (the
oracle has no block stack: the cached "feature" is the velocity, target "output", or velocity - state,
"residual"); Fréchet distance to the data law (:mod:`ralu_runtime.oracle_metrics`). The schnell rows use
4 Euler steps of the same exact (not distilled) flow with schnell's unshifted sigmas, so they measure the
schedule, not schnell's distillation.

    python benchmarks/stacking.py [--out benchmarks/results] [--samples 128] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import bar_plot, positive_int, print_table, write_json  # noqa: E402
from ralu_runtime import generate, get_preset  # noqa: E402
from ralu_runtime.adapters import call_scope  # noqa: E402
from ralu_runtime.adapters.base import Conditioning, TokenGrid  # noqa: E402
from ralu_runtime.cache import TaylorSeerCache  # noqa: E402

PAPER = {  # paper's figures (TFLOPs, speed-up vs the 50-step FLUX.1-dev baseline)
    "dev-50": (2991.0, 1.0),
    "ralu-5x": (540.5, 2991.0 / 540.5),
    "ralu-7x": (426.0, 7.02),
    "ralu-5x+ts-w3": (None, 7.28),
    "ralu-5x+ts-w2": (None, 9.03),
    "schnell+ralu": (None, 15.91),
}


def rows_spec():
    """(name, model "dev"/"schnell", schedule or None, baseline steps, cache or None)."""
    dev, sch = "flux", "flux-schnell"
    return [
        ("dev-50", "dev", None, 50, None),
        ("dev-50+ts-w3", "dev", None, 50, TaylorSeerCache(3, 1)),
        ("ralu-4x", "dev", get_preset(dev, "4x"), None, None),
        ("ralu-5x", "dev", get_preset(dev, "5x"), None, None),
        ("ralu-7x", "dev", get_preset(dev, "7x"), None, None),
        ("ralu-5x+ts-w3", "dev", get_preset(dev, "5x"), None, TaylorSeerCache(3, 1)),
        ("ralu-5x+ts-w2", "dev", get_preset(dev, "5x"), None, TaylorSeerCache(2, 1)),
        ("ralu-5x+ts-w3-wu1", "dev", get_preset(dev, "5x"), None, TaylorSeerCache(3, 1, warmup=1)),
        ("ralu-5x+ts-w2-wu1", "dev", get_preset(dev, "5x"), None, TaylorSeerCache(2, 1, warmup=1)),
        ("schnell-4", "schnell", None, 4, None),
        ("schnell+ralu", "schnell", get_preset(sch, "4step"), None, None),
    ]


def stage_plan(schedule, steps, cache, fine_tokens: int):
    """[(tokens, pattern)] per stage: tokens per forward and the "F"/"C" string of its steps."""
    if schedule is None:
        stages = [(fine_tokens, steps)]
    else:
        m = fine_tokens // 4
        k = int(m * schedule.ratio)
        stages = list(zip((m, m + 3 * k, 4 * m), schedule.steps))
    return [(tok, cache.plan(n) if cache is not None else "F" * n) for tok, n in stages]


# ----------------------------------------------------------------------------- FLOPs
def flux_meta_adapter(guidance: bool):
    from diffusers import FluxTransformer2DModel

    from ralu_runtime.adapters.flux import FluxAdapter

    with torch.device("meta"):
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                    pooled_projection_dim=768, guidance_embeds=guidance, axes_dims_rope=(16, 56, 56))
    tr = tr.to(torch.bfloat16).eval()
    return FluxAdapter(types.SimpleNamespace(transformer=tr, vae_scale_factor=8))


@torch.no_grad()
def forward_flops(adapter, tokens: int, text: int = 512) -> dict:
    """FLOPs of one forward at ``tokens`` image tokens: full, cached (embed + head only), first block + head."""
    from torch.utils.flop_counter import FlopCounterMode

    dev, dt = torch.device("meta"), torch.bfloat16
    guidance = torch.ones(1, device=dev) if adapter.transformer.config.guidance_embeds else None
    cond = Conditioning(1, {"embeds": torch.empty(1, text, 4096, device=dev, dtype=dt),
                            "pooled": torch.empty(1, 768, device=dev, dtype=dt), "guidance": guidance})
    side = int(tokens ** 0.5)
    pos = torch.empty(1, tokens, 2, device=dev)
    grid = TokenGrid(pos, (side, side), None, raster=False)
    x = torch.empty(1, tokens, 64, device=dev, dtype=dt)
    t = torch.tensor(500.0, device=dev)
    out = {}
    for name, cache in (("full", None), ("cached", lambda blocks, hidden, ts: hidden),
                        ("first_block", lambda blocks, hidden, ts: blocks.first()[0])):
        with call_scope(cache), FlopCounterMode(display=False) as counter:
            adapter.velocity(x, grid, t, cond)
        out[name] = counter.get_total_flops()
    return out


def flop_table(fine_tokens: int = 4096) -> list[dict]:
    adapters = {"dev": flux_meta_adapter(True), "schnell": flux_meta_adapter(False)}
    memo: dict = {}
    rows = []
    for name, model, schedule, steps, cache in rows_spec():
        plan = stage_plan(schedule, steps, cache, fine_tokens)
        total = 0
        for tok, pattern in plan:
            if (model, tok) not in memo:
                memo[(model, tok)] = forward_flops(adapters[model], tok)
            f = memo[(model, tok)]
            total += pattern.count("F") * f["full"] + pattern.count("C") * f["cached"]
        rows.append({"row": name, "tflops": total / 1e12, "plan": " | ".join(f"{tok}:{p}" for tok, p in plan),
                     "full_steps": sum(p.count("F") for _, p in plan),
                     "cached_steps": sum(p.count("C") for _, p in plan)})
    base = rows[0]["tflops"]
    for r in rows:
        r["speedup"] = base / r["tflops"]
        paper = PAPER.get(r["row"])
        r["paper_tflops"] = paper[0] if paper and paper[0] is not None else ""
        r["paper_speedup"] = round(paper[1], 2) if paper else ""
    per_forward = {f"{m}@{tok}": {k: v / 1e12 for k, v in f.items()} for (m, tok), f in sorted(memo.items())}
    return rows, per_forward


# ----------------------------------------------------------------------------- CPU latency
def small_pipes(hidden: int, double: int, single: int):
    from diffusers import FluxTransformer2DModel

    from ralu_runtime.tiny import TEXT_DIM, build_tiny_flux_pipeline

    heads = hidden // 64
    pipes = {}
    for model, guidance in (("dev", True), ("schnell", False)):
        pipe = build_tiny_flux_pipeline(seed=0, guidance_embeds=guidance)
        torch.manual_seed(0)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                                    attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=TEXT_DIM,
                                    pooled_projection_dim=TEXT_DIM, guidance_embeds=guidance,
                                    axes_dims_rope=(8, 28, 28)).eval()
        pipe.register_modules(transformer=tr)
        pipes[model] = pipe
    return pipes


def latency_table(args) -> list[dict]:
    pipes = small_pipes(args.hidden, args.double, args.single)
    g = torch.Generator().manual_seed(0)
    emb = {"prompt_embeds": torch.randn(1, 64, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}
    calls = []
    for name, model, schedule, steps, cache in rows_spec():
        kw = dict(**emb, height=args.size, width=args.size, speedup=schedule, num_inference_steps=steps,
                  seed=0, output_type="latent", progress=False, cache=cache, edge_detector="opencv")
        if model == "schnell":
            kw["guidance_scale"] = 0.0
        calls.append((name, lambda p=pipes[model], kw=kw: generate(p, **kw)))
    # round robin (one warm-up round, then --reps rounds), minimum over rounds: robust to other load on the CPU
    times: dict[str, list[float]] = {name: [] for name, _ in calls}
    for rnd in range(args.reps + 1):
        for name, fn in calls:
            t0 = time.perf_counter()
            fn()
            if rnd:
                times[name].append((time.perf_counter() - t0) * 1e3)
        print(f"  latency round {rnd}: " + ", ".join(f"{n} {t[-1]:.0f}" for n, t in times.items() if t), flush=True)
    rows = [{"row": n, "ms": min(t), "median_ms": statistics.median(t), "reps": len(t)} for n, t in times.items()]
    for r in rows:
        r["speedup"] = rows[0]["ms"] / r["ms"]
    return rows


# ----------------------------------------------------------------------------- oracle quality
def quality_table(args) -> tuple[list[dict], dict]:
    from ralu_runtime import oracle_metrics as om
    from ralu_runtime.adapters.oracle import GaussianOracle

    class CachedOracle(GaussianOracle):
        """The oracle with its velocity routed through run_blocks (so a feature cache can extrapolate it)."""

        def velocity(self, tokens, grid, timestep, cond=None, impl=None):
            return self.run_blocks(lambda: GaussianOracle.velocity(self, tokens, grid, timestep, cond), tokens,
                                   timestep)

    oracles = {"dev": CachedOracle(16, 4, variant="nonstationary")}
    oracles["schnell"] = CachedOracle(16, 4, variant="nonstationary")
    oracles["schnell"].base_shift = 1.0  # schnell's unshifted sigmas for the 4-step baseline
    specs = rows_spec() + [("ralu-5x+ts-w3-output", "dev", get_preset("flux", "5x"), None,
                            TaylorSeerCache(3, 1, target="output")),
                           ("ralu-5x+ts-w3-o2", "dev", get_preset("flux", "5x"), None, TaylorSeerCache(3, 2))]
    floor = om.data_floor(oracles["dev"], args.samples)
    rows = []
    ref_latents = None
    for name, model, schedule, steps, cache in specs:
        t0 = time.perf_counter()
        out = generate(oracles[model], [""] * args.samples, height=128, width=128, speedup=schedule,
                       num_inference_steps=steps, seed=1, output_type="latent", progress=False, cache=cache)
        m = om.evaluate_samples(oracles[model], out.images)
        row = {"row": name, "fd": m["fd"], "fd_mean": m["fd_mean"], "fd_detail": m["fd_detail"],
               "var_ratio_detail": m["var_ratio_detail"], "seconds": time.perf_counter() - t0}
        if name == "ralu-5x":
            ref_latents = out.images
        if ref_latents is not None and schedule is not None and schedule.name == "flux/5x" and name != "ralu-5x":
            row["rel_dev_vs_ralu5x"] = float((out.images - ref_latents).norm() / ref_latents.norm())
        rows.append(row)
        print(f"  quality {name}: FD {m['fd']:.3f} ({row['seconds']:.0f} s)", flush=True)
    return rows, floor


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--samples", type=positive_int, default=128, help="oracle images per row (x 4 channels)")
    p.add_argument("--reps", type=positive_int, default=3, help="timed rounds of the latency rows (min is reported)")
    p.add_argument("--size", type=int, default=512, help="latency image size (512: 1024 fine tokens)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--skip", nargs="*", default=[], choices=("latency", "quality"))
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.reps, args.size = 16, 1, 256
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print("FLOPs (FLUX.1-dev-shaped, 1024^2, meta device):")
    flops, per_forward = flop_table()
    print_table(flops, ["row", "tflops", "speedup", "paper_tflops", "paper_speedup", "full_steps", "cached_steps",
                        "plan"])
    payload = {"flops": flops, "tflops_per_forward": per_forward,
               "flops_note": "TFLOPs counted by FlopCounterMode (matmul/attention), bf16 meta FLUX.1-dev shape, "
                             "512 text tokens; cached step = embed + conditioning + head"}
    if "latency" not in args.skip:
        print(f"\nCPU latency (FLUX-shaped random model: hidden {args.hidden}, {args.double}+{args.single} blocks, "
              f"{args.size}^2, {torch.get_num_threads()} threads):")
        lat = latency_table(args)
        print_table(lat, ["row", "ms", "median_ms", "speedup"])
        payload["latency"] = {"rows": lat, "model": {"hidden": args.hidden, "double": args.double,
                                                     "single": args.single, "size": args.size,
                                                     "threads": torch.get_num_threads()}}
    if "quality" not in args.skip:
        print(f"\nOracle quality (GaussianOracle 16x16 non-stationary, {args.samples} images x 4 channels):")
        qual, floor = quality_table(args)
        print_table(qual, ["row", "fd", "fd_mean", "fd_detail", "var_ratio_detail", "rel_dev_vs_ralu5x", "seconds"])
        print(f"data floor (FD of {args.samples} true samples): {floor['fd_mean']:.3f} +- {floor['fd_std']:.3f}")
        payload["quality"] = {"rows": qual, "data_floor": floor, "samples": args.samples}
    name = "stacking_quick" if args.quick else "stacking"
    write_json(args.out, name, payload)
    bar_plot(args.out, name, [r["row"] for r in flops], [r["speedup"] for r in flops],
             "speed-up vs 50-step FLUX.1-dev (FLOPs)", "RALU + TaylorSeer / schnell: FLOP speed-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
