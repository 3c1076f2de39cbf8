"""Serving throughput and latency against request rate: sequential ``generate``, same-shape batching, the packed
engine (``ralu_runtime.serving``).

Open-loop load: for each rate, ``--requests`` requests arrive with exponential gaps (seeded), each one of a fixed
mix of sizes and presets (``MIX``) with its own seed. Three servers, rows interleaved per rate:

* ``sequential``: one worker takes requests first come, first served and runs ``generate`` on each.
* ``same-shape``: one worker takes the oldest request and every queued request of the same size and preset (up to
  ``--max-batch``) and runs them as one batched ``generate`` call (what serving frameworks for diffusion do).
* ``engine``: :class:`ralu_runtime.serving.Engine` (continuous batching across RALU stages, packed model calls).

Rates are multiples of the lone-request rate ``1 / t_lone`` (``t_lone``: the median latency of the mix's requests alone). Reported
per (server, rate): throughput (images/s over first arrival -> last completion), p50/p95 latency (arrival ->
completion), and, for the engine, model calls and tokens per call. ``--budgets`` also sweeps the engine's token
budget at saturation (the measurement behind ``DEFAULT_TOKEN_BUDGET``). JSON + PNG in ``--out``.

CPU: ``python benchmarks/serving.py`` (small FLUX-shaped model); GPU: ``--model flux --size full`` (FLUX.1-dev
shape, random weights, bfloat16).
"""
from __future__ import annotations

import argparse
import queue
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import positive_int, print_table, pyplot, save_figure, write_json  # noqa: E402

MIX = ({"height": 256, "width": 256, "speedup": "7x"}, {"height": 256, "width": 256, "speedup": "4x"},
       {"height": 192, "width": 256, "speedup": "7x"}, {"height": 128, "width": 256, "speedup": "7x"})
MIX_FULL = ({"height": 1024, "width": 1024, "speedup": "7x"}, {"height": 1024, "width": 1024, "speedup": "4x"},
            {"height": 768, "width": 1024, "speedup": "7x"}, {"height": 512, "width": 1024, "speedup": "7x"})


def percentile(values, q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    i = min(len(v) - 1, max(0, round(q * (len(v) - 1))))
    return v[i]


def build(model: str, size: str, device: str, dtype):
    from benchmarks.latency import build_pipeline, prompt_embeds

    if size == "tiny":
        from ralu_runtime.tiny import build_tiny

        pipe = build_tiny(f"tiny-{model}", device=device, dtype=dtype)
    else:
        pipe = build_pipeline(model, size, device=device, dtype=dtype)
    emb = prompt_embeds(pipe, model, 1, 512 if size == "full" else 32, device, dtype)
    return pipe, emb


class Workload:
    """The requests of one run: arrival offsets (s), kwargs (one of the mix) and seeds."""

    def __init__(self, mix, n: int, rate: float, seed: int):
        rng = random.Random(seed)
        t, self.items = 0.0, []
        for i in range(n):
            self.items.append((t, dict(mix[i % len(mix)]), 1000 + i))
            t += rng.expovariate(rate)


def _drive(workload: Workload, submit) -> tuple[list[float], float]:
    """Submit each request at its arrival time (``submit(kw, seed) -> wait()``); latencies and the makespan."""
    start = time.perf_counter()
    waiters, arrivals = [], []
    for offset, kw, seed in workload.items:
        delay = start + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        arrivals.append(time.perf_counter())
        waiters.append(submit(kw, seed))
    ends = [w() for w in waiters]
    return [e - a for e, a in zip(ends, arrivals)], max(ends) - start


def run_sequential(pipe, emb, workload: Workload, device):
    from ralu_runtime import generate

    q: queue.Queue = queue.Queue()

    def worker():
        while True:
            item = q.get()
            if item is None:
                return
            kw, seed, done = item
            generate(pipe, **emb, **kw, seed=seed, output_type="pil", progress=False)
            done["t"] = time.perf_counter()
            done["ev"].set()

    th = threading.Thread(target=worker, daemon=True)
    th.start()

    def submit(kw, seed):
        done = {"ev": threading.Event()}
        q.put((kw, seed, done))
        return lambda: (done["ev"].wait(), done["t"])[1]

    lat, span = _drive(workload, submit)
    q.put(None)
    th.join()
    return lat, span, {}


def run_same_shape(pipe, emb, workload: Workload, device, max_batch: int):
    from ralu_runtime import generate

    lock = threading.Condition()
    pending: list = []
    stop = {"v": False}

    def worker():
        while True:
            with lock:
                while not pending and not stop["v"]:
                    lock.wait(0.05)
                if not pending and stop["v"]:
                    return
                head = pending[0]
                key = tuple(sorted(head[0].items()))
                group = [p for p in pending if tuple(sorted(p[0].items())) == key][:max_batch]
                for p in group:
                    pending.remove(p)
            b = len(group)
            batch_emb = {k: v.repeat(b, *([1] * (v.dim() - 1))) for k, v in emb.items()}
            gens = [torch.Generator().manual_seed(p[1]) for p in group]
            generate(pipe, **batch_emb, **head[0], generator=gens, output_type="pil", progress=False)
            t = time.perf_counter()
            for p in group:
                p[2]["t"] = t
                p[2]["ev"].set()

    th = threading.Thread(target=worker, daemon=True)
    th.start()

    def submit(kw, seed):
        done = {"ev": threading.Event()}
        with lock:
            pending.append((kw, seed, done))
            lock.notify_all()
        return lambda: (done["ev"].wait(), done["t"])[1]

    lat, span = _drive(workload, submit)
    with lock:
        stop["v"] = True
        lock.notify_all()
    th.join()
    return lat, span, {}


def run_engine(pipe, emb, workload: Workload, device, budget: int | None, max_active: int, packed: bool = True):
    from ralu_runtime.serving import Engine, EngineConfig

    eng = Engine(pipe, EngineConfig(token_budget=budget, max_active=max_active, max_queue=10_000, packed=packed))
    done_at: dict = {}

    def submit(kw, seed):
        h = eng.submit(**emb, **kw, seed=seed, output_type="pil")

        def wait():
            h.result()
            return done_at.setdefault(h.id, time.perf_counter())

        threading.Thread(target=wait, daemon=True).start()
        return wait

    lat, span = _drive(workload, submit)
    m = eng.metrics()
    eng.shutdown()
    calls = m["model_calls"]
    extra = {"model_calls": calls, "packed_calls": m["packed_calls"],
             "mean_tokens_per_call": m["batch_tokens"]["sum"] / max(calls, 1),
             "mean_requests_per_call": m["batch_requests"]["sum"] / max(calls, 1)}
    return lat, span, extra


def lone_latency(pipe, emb, mix, reps: int) -> float:
    from ralu_runtime import generate

    for _ in range(2):  # warm-up: preset solves, first allocations
        for kw in mix:
            generate(pipe, **emb, **kw, seed=0, output_type="pil", progress=False)
    times = []
    for r in range(reps):
        for kw in mix:
            t0 = time.perf_counter()
            generate(pipe, **emb, **kw, seed=r, output_type="pil", progress=False)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="flux", choices=("flux", "sd3"))
    ap.add_argument("--size", default="small", choices=("tiny", "small", "full"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--requests", type=positive_int, default=16, help="requests per (server, rate)")
    ap.add_argument("--loads", type=float, nargs="+", default=(0.5, 1.0, 2.0, 4.0),
                    help="arrival rates as multiples of the lone-request rate")
    ap.add_argument("--servers", nargs="+", default=("sequential", "same-shape", "engine"),
                    choices=("sequential", "same-shape", "engine", "engine-unpacked"))
    ap.add_argument("--budgets", type=int, nargs="*", default=(), help="engine token budgets to sweep at the top load")
    ap.add_argument("--max-active", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 requests, loads 1 and 4")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.requests, args.loads = "tiny", 4, (1.0, 4.0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device == "cpu":
        torch.manual_seed(0)
    mix = MIX_FULL if args.size == "full" else MIX
    if args.size == "tiny":
        mix = tuple({**m, "height": m["height"] // 2, "width": m["width"] // 2} for m in mix)
    pipe, emb = build(args.model, args.size, device, dtype)
    t_lone = lone_latency(pipe, emb, mix, 1 if args.quick else 3)
    print(f"lone request (median over the mix): {t_lone:.3f} s")
    rows = []

    def record(server, load, lat, span, extra, budget=None):
        n = len(lat)
        row = {"server": server, "load": load, "rate_req_s": load / t_lone, "budget": budget, "requests": n,
               "throughput_img_s": n / span, "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95),
               "p95_over_lone": percentile(lat, 0.95) / t_lone, **extra}
        rows.append(row)
        print(f"  {server:16s} load {load:4.1f} budget {budget!s:6s} {row['throughput_img_s']:.3f} img/s  "
              f"p50 {row['p50_s']:.2f} s  p95 {row['p95_s']:.2f} s", flush=True)

    for li, load in enumerate(args.loads):
        wl = Workload(mix, args.requests, load / t_lone, seed=li)
        for server in args.servers:
            if server == "sequential":
                out = run_sequential(pipe, emb, wl, device)
            elif server == "same-shape":
                out = run_same_shape(pipe, emb, wl, device, args.max_batch)
            else:
                out = run_engine(pipe, emb, wl, device, None, args.max_active, packed=server == "engine")
            record(server, load, *out)
    for budget in args.budgets:
        wl = Workload(mix, args.requests, max(args.loads) / t_lone, seed=99)
        record("engine", max(args.loads), *run_engine(pipe, emb, wl, device, budget, args.max_active), budget=budget)

    print_table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()
                  if k in ("server", "load", "budget", "throughput_img_s", "p50_s", "p95_s", "p95_over_lone",
                           "mean_requests_per_call")} for r in rows],
                ["server", "load", "budget", "throughput_img_s", "p50_s", "p95_s", "p95_over_lone",
                 "mean_requests_per_call"])
    top = max(args.loads)
    by = {(r["server"], r["load"]): r for r in rows if r["budget"] is None}
    ratios = {}
    if ("sequential", top) in by:
        for s in args.servers:
            if (s, top) in by:
                ratios[f"{s}_throughput_vs_sequential_at_load_{top:g}"] = (by[(s, top)]["throughput_img_s"]
                                                                          / by[("sequential", top)]["throughput_img_s"])
    result = {"model": args.model, "size": args.size, "device": device, "dtype": str(dtype), "mix": list(mix),
              "lone_latency_s": t_lone, "rows": rows, "ratios": ratios,
              "notes": "open-loop Poisson arrivals; latency = arrival -> completion incl. VAE decode to PIL"}
    name = args.name or f"serving_{args.model}_{args.size}_{device.split(':')[0]}"
    path = write_json(args.out, name, result)
    png = plot(Path(args.out), name, rows, t_lone)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return result


def plot(out_dir: Path, name: str, rows: list[dict], t_lone: float):
    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for server in dict.fromkeys(r["server"] for r in rows):
        rs = [r for r in rows if r["server"] == server and r["budget"] is None]
        a.plot([r["rate_req_s"] for r in rs], [r["throughput_img_s"] for r in rs], "o-", label=server)
        b.plot([r["rate_req_s"] for r in rs], [r["p95_s"] for r in rs], "o-", label=server)
    a.set_xlabel("arrival rate (requests/s)")
    a.set_ylabel("throughput (images/s)")
    b.set_xlabel("arrival rate (requests/s)")
    b.set_ylabel("p95 latency (s)")
    b.axhline(t_lone, color="grey", ls=":", label="lone request")
    b.set_yscale("log")
    a.legend()
    b.legend()
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


if __name__ == "__main__":
    main()
