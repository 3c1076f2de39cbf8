"""Fused RALU stage transition: Triton kernel / CUDA op / torch reference / dense-MVN noise.

Shapes (FLUX.1 1024^2: 32x32 low-res token grid, M_low = 1024, C = 64 channels, bf16):

* ``1to2_r0.1``: the 7x preset's boundary 1 -> 2 (102 parents upsampled, Ld = 1330);
* ``1to2_r0.3``: the 4x preset's boundary 1 -> 2 (307 parents, Ld = 1945);
* ``2to3_r0.3``: boundary 2 -> 3 back to the raster-ordered 64x64 grid (Ld = 4096, pos_scale 2);
* ``bw_2to3_L65536``: a 128x128 -> 256x256 transition (Ld = 65536), the bandwidth case (GPU only).

Rows per shape: ``triton`` (GPU only: the interpreter on a CPU is no timing), ``cuda`` (the csrc
op, when built), ``torch`` (the reference, also its CPU timing), ``dense_mvn`` (the reference
implementation's approach: a dense multivariate normal over all tokens of one image, noise only,
where the Ld x Ld covariance fits; on a CPU at 256 and 1024 tokens), ``copy_same_bytes`` (GPU only: a
device copy moving as many bytes, the ceiling reachable at this size; ``pct_of_copy`` = copy time / kernel
time). GB/s counts the bytes the group-major kernel moves at least: every source row read once (a parent is read once for its 4
children), every output row written, the maps it reads (order; src_index and group once per group
or kept token) and positions read and written. (Until 2026-11-23 the x read was counted per output
row, 281 B per output token at C = 64 bf16 instead of ~210: GB/s figures of older JSON files are
not comparable.)

    python benchmarks/bench_transition.py            # device default: cuda if present
    python benchmarks/bench_transition.py --quick    # fewer repetitions, no bandwidth case
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import bar_plot, device_slug, positive_int, print_table, time_fn, write_json  # noqa: E402
from ralu_kernels import transition as T  # noqa: E402

Z_7X, Z_4X = 6.261, 6.317


def _shapes(device: torch.device, quick: bool):
    # (name, kind, coarse grid side, ratio, Z, end time e_k of the finishing stage)
    shapes = [
        ("1to2_r0.1", "1to2", 32, 0.1, Z_7X, 0.2),
        ("1to2_r0.3", "1to2", 32, 0.3, Z_4X, 0.3),
        ("2to3_r0.3", "2to3", 32, 0.3, Z_4X, 0.45),
    ]
    if device.type == "cuda" and not quick:
        shapes.append(("bw_2to3_L65536", "2to3", 128, 0.3, Z_4X, 0.45))
    return shapes


def bytes_moved(batch, dst_len, num_up, channels, elt) -> int:
    work = num_up + (dst_len - 4 * num_up)  # groups + kept tokens: one source row, src_index, group each
    per_image = (work * (channels * elt + 2 * 4 + 4 * 2)   # x row, pos row, src_index + group
                 + dst_len * (channels * elt + 4 * 2 + 4))  # out row, pos_out row, order entry
    return batch * (per_image + 8)  # + seed


# Peak HBM bandwidth (TB/s, vendor figures) by device name, for the "% of HBM" column.
# First match wins: the PCIe H100 (2.0 TB/s) must not fall under the SXM entry.
_HBM_TBPS = {"H100 PCIe": 2.0, "H100 80GB HBM3": 3.35, "H200": 4.8, "A100-SXM4-80GB": 2.04}


def hbm_peak_tbps() -> float:
    name = torch.cuda.get_device_name()
    for key, tbps in _HBM_TBPS.items():
        if key in name:
            return tbps
    return float("nan")


def graph_time_us(fn, calls: int = 50, replays: int = 20) -> float:
    """Device time of one call, launched from a CUDA graph of ``calls`` calls (no Python/launch overhead)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions; no bandwidth case")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: steadier, and much faster on a contended CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    dev_name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    elt = torch.tensor([], dtype=dtype).element_size()
    channels = 64
    reps = (20 if args.quick else 100) if cuda else (2 if args.quick else 5)
    warmup = 5 if cuda else 1
    has_triton = T.HAS_TRITON and cuda
    has_cuda_op = cuda and T._csrc_usable(torch.empty(1, device=device), None)

    rows, cases = [], []
    gen = torch.Generator().manual_seed(0)
    for name, kind, side, ratio, z, e in _shapes(device, args.quick):
        c = 1.0 / z**2
        a = 1.0 / (z * (1 - e) + e)
        s_next = e / (z * (1 - e) + e)
        b = 1.0 - s_next
        maps = T.example_transition_maps(kind, side, side, ratio, args.batch, generator=gen, device=device)
        src_len = maps["pos"].shape[1]
        dst_len = maps["src_index"].shape[1]
        x = torch.randn(args.batch, src_len, channels, generator=gen).to(device=device, dtype=dtype)
        seeds = torch.randint(0, 2**62, (args.batch,), generator=gen, dtype=torch.int64).to(device)
        out = torch.empty(args.batch, dst_len, channels, device=device, dtype=dtype)
        pos_out = torch.empty(args.batch, dst_len, 2, device=device)
        nbytes = bytes_moved(args.batch, dst_len, maps["num_up"], channels, elt)
        cases.append(dict(name=name, kind=kind, coarse_grid=side, ratio=ratio, c=c, a=a, b=b, batch=args.batch,
                          src_len=src_len, dst_len=dst_len, channels=channels, dtype=args.dtype, bytes=nbytes))

        def call(impl):
            return lambda: T.stage_transition(x, maps["pos"], maps["src_index"], maps["group"], maps["child"],
                                              seeds, a=a, b=b, c=c, pos_scale=maps["pos_scale"], out=out,
                                              pos_out=pos_out, order=maps["order"], num_up=maps["num_up"],
                                              impl=impl, check_values=False)

        impls = (["triton"] if has_triton else []) + (["cuda"] if has_cuda_op else []) + ["torch"]
        case_rows = []
        for impl in impls:
            t = time_fn(call(impl), warmup=warmup, reps=reps, device=device.type)
            row = dict(shape=name, impl=impl, Ld=dst_len, **t, GBps=nbytes / (t["min_ms"] * 1e-3) / 1e9)
            if cuda and impl in ("triton", "cuda"):
                row["graph_us"] = graph_time_us(call(impl))
                row["graph_GBps"] = nbytes / (row["graph_us"] * 1e-6) / 1e9
                row["pct_hbm"] = 100 * row["graph_GBps"] / (1e3 * hbm_peak_tbps())
            case_rows.append(row)
        # dense multivariate normal over one image's tokens (the reference code's approach)
        mvn_limit = 4096 if cuda else 1024
        if dst_len <= mvn_limit:
            grp, chd = maps["group"][0], maps["child"][0]
            t = time_fn(lambda: T.dense_mvn_noise(grp, chd, c, channels), warmup=1, reps=max(2, reps // 10),
                        device=device.type)
            case_rows.append(dict(shape=name, impl="dense_mvn", Ld=dst_len, **t, GBps=float("nan")))
        if cuda:  # the reachable ceiling at this size: a device copy moving the same bytes (half read, half written)
            src_bytes = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            dst_bytes = torch.empty_like(src_bytes)
            copy = lambda: dst_bytes.copy_(src_bytes)  # noqa: E731
            t = time_fn(copy, warmup=warmup, reps=reps, device=device.type)
            row = dict(shape=name, impl="copy_same_bytes", Ld=dst_len, **t, GBps=nbytes / (t["min_ms"] * 1e-3) / 1e9,
                       graph_us=graph_time_us(copy))
            row["graph_GBps"] = nbytes / (row["graph_us"] * 1e-6) / 1e9
            row["pct_hbm"] = 100 * row["graph_GBps"] / (1e3 * hbm_peak_tbps())
            for r in case_rows:
                if "graph_us" in r:
                    r["pct_of_copy"] = 100 * row["graph_us"] / r["graph_us"]
            case_rows.append(row)
        t_ref = next(r["min_ms"] for r in case_rows if r["impl"] == "torch")
        for r in case_rows:
            r["speedup_vs_torch"] = t_ref / r["min_ms"]
        rows += case_rows

    # dense-MVN at the small CPU sizes of the brief (256 and 1024 tokens; noise only), with the reference
    if not cuda:
        for side in (8, 16):
            maps = T.example_transition_maps("2to3", side, side, 0.3, 1, generator=gen)
            ld = maps["src_index"].shape[1]
            x = torch.randn(1, maps["pos"].shape[1], channels, generator=gen).to(dtype)
            seeds = torch.tensor([1], dtype=torch.int64)
            c = 1.0 / Z_4X**2
            tr = time_fn(lambda: T.stage_transition(x, maps["pos"], maps["src_index"], maps["group"],
                                                    maps["child"], seeds, a=0.5, b=0.7, c=c, pos_scale=2.0,
                                                    impl="torch"), warmup=1, reps=reps, device="cpu")
            tm = time_fn(lambda: T.dense_mvn_noise(maps["group"][0], maps["child"][0], c, channels), warmup=1,
                         reps=reps, device="cpu")
            name = f"small_2to3_L{ld}"
            nbytes = bytes_moved(1, ld, maps["num_up"], channels, elt)
            cases.append(dict(name=name, kind="2to3", coarse_grid=side, ratio=0.3, c=c, batch=1, dst_len=ld,
                              channels=channels, dtype=args.dtype, bytes=nbytes))
            rows.append(dict(shape=name, impl="torch", Ld=ld, **tr, GBps=nbytes / (tr["min_ms"] * 1e-3) / 1e9,
                             speedup_vs_torch=1.0))
            rows.append(dict(shape=name, impl="dense_mvn", Ld=ld, **tm, GBps=float("nan"),
                             speedup_vs_torch=tr["min_ms"] / tm["min_ms"]))

    print(f"device: {device} ({'compiled Triton' if has_triton else 'no Triton timing'}"
          f"{', CUDA op' if has_cuda_op else ''}); dtype {args.dtype}, C={channels}, batch {args.batch}")
    cols = ["shape", "impl", "Ld", "mean_ms", "min_ms", "GBps", "speedup_vs_torch"]
    if cuda:
        cols += ["graph_us", "graph_GBps", "pct_hbm", "pct_of_copy"]
    print_table(rows, cols)
    name = "transition_quick" if args.quick else "transition"
    name = f"{name}_{device_slug() if cuda else 'cpu'}"
    write_json(args.out, name, {"cases": cases, "rows": rows, "reps": reps,
                                "notes": "GBps = bytes a fused kernel moves / min time; dense_mvn times the noise "
                                         "of one image only; speedup_vs_torch = torch min time / row min time"})
    bar_plot(args.out, name, [f"{r['shape']}:{r['impl']}" for r in rows], [r["min_ms"] for r in rows], "ms (min)",
             f"RALU stage transition ({device.type}, {args.dtype}, C={channels})", log=True)


if __name__ == "__main__":
    main()
