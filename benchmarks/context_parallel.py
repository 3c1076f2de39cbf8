"""Context parallelism: latency of one image against the number of GPUs (``generate(parallel=...)``).

For each world size N (``--world-sizes``, default 1, 2, 4, ... up to the visible GPUs) the script starts N fresh
processes (NCCL, one GPU each; gloo on a CPU), builds the same random-weight model in each (FLUX.1-dev shape:
19 + 38 blocks, hidden 3072, 24 heads, 512 text tokens, real-size VAE, bf16, 1024^2 -- ``benchmarks/latency.py
--size full``), and times ``--rows`` (``ralu-<preset>-eager``, ``ralu-<preset>-compiled``, ``baseline-eager``,
``baseline-compiled``) with ``parallel=ContextParallelConfig(...)`` (N = 1: no parallelism). ``--split`` chooses
how N is factored: ``ulysses`` (U = N), ``ring`` (R = N, K/V all-gather) or ``usp`` (U = the largest divisor of N
that divides the 24 heads, at most 8, R = N / U). Every row: ``--warmup`` calls (compile, CUDA-graph capture), then
``--reps`` timed calls (wall time of the whole call on rank 0, all ranks in lockstep; per-stage times from the
sampler's clock), the speedup and parallel efficiency against N = 1, and the largest difference of the final latents
from N = 1's (same seed). Writes ``context_parallel_<device>.json`` and ``.png`` (latency and speedup vs N).

``--quick`` runs on a CPU: the small FLUX-shaped model (2 + 4 blocks, hidden 256) at 256^2, world sizes 1 and 2 with
gloo, eager rows, 2 reps (a smoke run of the whole path; CPU latencies say nothing about GPU scaling).

Under ``torchrun --nproc-per-node N benchmarks/context_parallel.py ...`` (environment ``WORLD_SIZE`` set) it measures
that one world size in the launched processes instead and rank 0 writes ``context_parallel_<device>_w<N>.json``.

    python benchmarks/context_parallel.py                               # every world size on this GPU machine
    python benchmarks/context_parallel.py --world-sizes 1,8 --rows ralu-7x-compiled --split usp
    python benchmarks/context_parallel.py --quick                        # CPU, ~2 min
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (device_slug, non_negative_int, positive_int, print_table, pyplot,  # noqa: E402
                                save_figure, write_json)

HEADS = 24  # FLUX.1-dev; the small model has 4 (both divide by 2 and 4; 8 only divides 24)


def factor(n: int, split: str, heads: int) -> tuple[int, int]:
    """``(ulysses, ring)`` for ``n`` ranks."""
    if split == "ulysses":
        return n, 1
    if split == "ring":
        return 1, n
    u = max(d for d in range(1, min(n, 8) + 1) if n % d == 0 and heads % d == 0)
    return u, n // u


def parse_row(name: str) -> tuple[str | None, str]:
    parts = name.split("-")
    if parts[0] == "baseline" and len(parts) == 2 and parts[1] in ("eager", "compiled"):
        return None, parts[1]
    if parts[0] == "ralu" and len(parts) == 3 and parts[2] in ("eager", "compiled"):
        return parts[1], parts[2]
    raise ValueError(f"row {name!r}: use ralu-<preset>-eager|compiled or baseline-eager|compiled")


# --------------------------------------------------------------------------------------------- one world size
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _weights_fingerprint(module) -> torch.Tensor:
    ps = list(module.parameters())
    picks = [ps[0], ps[len(ps) // 2], ps[-1]]
    return torch.stack([p.detach().float().sum() for p in picks])


def worker(cfg: dict):
    """One rank of one world size: build, time every row, return rank 0's results (other ranks: None)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from benchmarks.latency import build_pipeline, prompt_embeds
    from ralu_runtime import generate
    from ralu_runtime.compile import compile_stats, enable_persistent_cache, ensure_backend

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if cfg["cuda"] else torch.device("cpu")
    dtype = torch.bfloat16 if cfg["cuda"] else torch.float32
    if cfg.get("cache_dir"):
        enable_persistent_cache(cfg["cache_dir"])
    t0 = time.perf_counter()
    pipe = build_pipeline("flux", cfg["size"], device=device, dtype=dtype, seed=0)
    build_s = time.perf_counter() - t0
    heads = pipe.transformer.config.num_attention_heads
    same_weights = True
    if world > 1:
        fp = _weights_fingerprint(pipe.transformer)
        allfp = [torch.empty_like(fp) for _ in range(world)]
        dist.all_gather(allfp, fp)
        same_weights = all(torch.equal(x, allfp[0]) for x in allfp)
        if not same_weights:
            raise RuntimeError("the ranks built different random weights: the comparison would be meaningless")
    emb = prompt_embeds(pipe, "flux", 1, cfg["text_len"], device, dtype)
    u, r = factor(world, cfg["split"], heads)
    parallel = ContextParallelConfig(ulysses_degree=u, ring_degree=r) if world > 1 else None
    res = r_ = cfg["resolution"]

    def call(preset, seed, output_type="pt"):
        return generate(pipe, **emb, height=res, width=r_, speedup=preset, seed=seed, output_type=output_type,
                        num_inference_steps=cfg["steps"] if preset is None else None, progress=False,
                        edge_detector=cfg["edge_detector"], cache=cfg["cache"] if preset is not None else None,
                        parallel=parallel)

    rows = []
    for row in cfg["rows"]:
        preset, kind = parse_row(row)
        if kind == "compiled":
            opts = {"cuda_graphs": None if cfg["cuda_graphs"] else False, "fused_qkv": cfg["cuda"]}
            ensure_backend(pipe, "inductor", **opts)
        else:
            ensure_backend(pipe, "eager", cuda_graphs=False, fused_qkv=cfg["cuda"])
        g0 = compile_stats()["unique_graphs"]
        t_first = time.perf_counter()
        for i in range(cfg["warmup"] if kind == "eager" else max(cfg["warmup"], 2)):
            call(preset, 100 + i)
        _sync(device)
        first_s = time.perf_counter() - t_first
        totals, stages = [], {}
        for i in range(cfg["reps"]):
            if world > 1:
                dist.barrier()
            _sync(device)
            t = time.perf_counter()
            out = call(preset, i)
            _sync(device)
            totals.append(time.perf_counter() - t)
            for k, v in out.timings.items():
                stages.setdefault(k, []).append(v)
        latents = call(preset, 0, "latent").images.float().cpu()
        rows.append({"row": row, "world_size": world, "ulysses": u, "ring": r, "times_s": totals,
                     "mean_s": statistics.fmean(totals), "min_s": min(totals),
                     "stdev_s": statistics.stdev(totals) if len(totals) > 1 else 0.0, "warmup_s": first_s,
                     "stages_s": {k: statistics.fmean(v) for k, v in stages.items()},
                     "model_s": sum(statistics.fmean(v) for k, v in stages.items()
                                    if k.startswith("stage") or k == "baseline"),
                     "graphs": compile_stats()["unique_graphs"] - g0, "latents": latents})
    if rank != 0:
        return None
    return {"world_size": world, "build_s": build_s, "same_weights": same_weights, "rows": rows,
            "memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cfg["cuda"] else None}


# ------------------------------------------------------------------------------------------------- launcher
def summarise(results: list[dict]) -> list[dict]:
    """Rows with speedup / efficiency / latent difference against world size 1 (when measured)."""
    ref = {r["row"]: r for res in results if res["world_size"] == 1 for r in res["rows"]}
    out = []
    for res in results:
        for r in res["rows"]:
            r = dict(r)
            lat = r.pop("latents")
            base = ref.get(r["row"])
            if base is not None:
                r["speedup"] = base["min_s"] / r["min_s"]
                r["efficiency"] = r["speedup"] / r["world_size"]
                r["model_speedup"] = base["model_s"] / r["model_s"] if r["model_s"] else None
                r["max_abs_diff_vs_w1"] = (lat - base["latents"]).abs().max().item()
            out.append(r)
    return out


def plot(out_dir: Path, name: str, rows: list[dict], title: str):
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({r["row"] for r in rows})
    sizes = sorted({r["world_size"] for r in rows})
    for n in names:
        pts = sorted((r["world_size"], r["min_s"], r.get("speedup")) for r in rows if r["row"] == n)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=n)
        if all(p[2] is not None for p in pts):
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=n)
    ax2.plot(sizes, sizes, "k--", lw=0.8, label="ideal")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("ranks (one GPU each; processes on a CPU)")
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency per image, min over reps (s)")
    ax2.set_ylabel("speedup vs 1 rank")
    fig.suptitle(title)
    save_figure(fig, out_dir, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", default=None, help="comma separated (default: 1, 2, 4, ... visible GPUs)")
    ap.add_argument("--rows", default=None,
                    help="default GPU: ralu-7x-eager,ralu-7x-compiled,baseline-compiled; --quick: ralu-7x-eager,"
                         "baseline-eager")
    ap.add_argument("--split", choices=("ulysses", "ring", "usp"), default="ulysses")
    ap.add_argument("--size", choices=("full", "small"), default=None)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--steps", type=int, default=28, help="baseline steps (FLUX.1-dev's default 28)")
    ap.add_argument("--reps", type=positive_int, default=None)
    ap.add_argument("--warmup", type=non_negative_int, default=1)
    ap.add_argument("--cache", default=None, help="temporal cache of the RALU rows, e.g. taylorseer:3")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="compiled rows without CUDA graphs")
    ap.add_argument("--edge-detector", choices=("gpu", "opencv"), default=None)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per world size")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small model, 256^2, 1 and 2 gloo ranks")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.quick
    size = args.size or ("full" if cuda else "small")
    cfg = {"cuda": cuda, "size": size, "resolution": args.resolution or (1024 if size == "full" else 256),
           "text_len": 512 if size == "full" else 64, "steps": args.steps if cuda else min(args.steps, 8),
           "reps": args.reps or (5 if cuda else 2), "warmup": args.warmup, "split": args.split,
           "cache": args.cache, "cuda_graphs": not args.no_cuda_graphs,
           "edge_detector": args.edge_detector or ("gpu" if cuda else "opencv"),
           "rows": (args.rows.split(",") if args.rows else
                    ["ralu-7x-eager", "ralu-7x-compiled", "baseline-compiled"] if cuda else
                    ["ralu-7x-eager", "baseline-eager"])}
    for r in cfg["rows"]:
        try:
            parse_row(r)
        except ValueError as exc:
            ap.error(str(exc))
    slug = device_slug() if cuda else "quick_cpu"
    tag = args.tag or f"context_parallel_{slug}"
    out_dir = Path(args.out)

    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:  # under torchrun: this world size only
        import torch.distributed as dist

        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
        res = worker(cfg)
        if res is not None:
            rows = summarise([res])
            write_json(out_dir, f"{tag}_w{res['world_size']}", {"config": cfg, "results": rows})
        dist.destroy_process_group()
        return 0

    from ralu_runtime.parallel.launch import run_local

    if args.world_sizes:
        try:
            sizes = [positive_int(s) for s in args.world_sizes.split(",")]
        except argparse.ArgumentTypeError as exc:
            ap.error(f"--world-sizes {args.world_sizes!r}: {exc} (whole numbers >= 1, comma separated, e.g. 1,2,4)")
    elif cuda:
        n = torch.cuda.device_count()
        sizes = [s for s in (1, 2, 4, 8, 16) if s <= n]
    else:
        sizes = [1, 2]
    if cuda and max(sizes) > torch.cuda.device_count():
        ap.error(f"--world-sizes {sizes}: only {torch.cuda.device_count()} GPU(s) visible")
    import tempfile

    cache = tempfile.TemporaryDirectory(prefix="ralu-inductor-")  # shared by the world sizes' processes
    cfg["cache_dir"] = cache.name
    results, errors = [], {}
    for n in sizes:
        print(f"world size {n} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = run_local("benchmarks.context_parallel:worker", n, backend="nccl" if cuda else "gloo",
                            kwargs={"cfg": cfg}, timeout=args.timeout,
                            threads=1 if not cuda else 4)[0]  # CPU: one thread per rank
        except Exception as exc:  # noqa: BLE001 - one world size failing must not lose the others
            errors[n] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"world size {n} failed: {errors[n]}", flush=True)
            continue
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
    rows = summarise(results)
    print_table(rows, ["row", "world_size", "ulysses", "ring", "min_s", "mean_s", "model_s", "speedup", "efficiency",
                       "max_abs_diff_vs_w1"])
    model = "FLUX.1-dev shape, bf16" if size == "full" else "small FLUX-shaped model, fp32"
    payload = {"config": {k: v for k, v in cfg.items() if k != "cache_dir"}, "world_sizes": sizes,
               "results": rows, "errors": errors,
               "runs": [{k: v for k, v in r.items() if k != "rows"} for r in results],
               "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
               "note": ("quick CPU smoke run through gloo processes on one machine: the latencies say nothing about "
                        "GPU scaling" if not cuda else f"{model}, {cfg['resolution']}^2, split={args.split}")}
    write_json(out_dir, tag, payload)
    if rows:
        plot(out_dir, tag, rows, f"context parallelism: {model}, {cfg['resolution']}^2 ({slug})")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
