"""Tile and warp sweep of the Triton stage-transition kernel (the lever if it falls short of 70 % of HBM).

For each shape (FLUX 1024^2 boundaries and the 65536-token bandwidth case, bf16, C = 64) and each
configuration ``(BLOCK_G, BLOCK_K, num_warps)`` (``BLOCK_G`` upsampled groups or ``BLOCK_K`` kept
tokens per program), time one launch from a CUDA graph of 50 launches (device time, no Python or launch
overhead) and report GB/s and % of the HBM peak, counting bytes as ``bench_transition.py`` does.
Every configuration's output must equal the default configuration's bitwise (the noise depends only on
the Philox counters, never on the tiling): a mismatch is reported and fails the run.

    python benchmarks/tune_transition.py              # on a GPU
    TRITON_INTERPRET=1 python benchmarks/tune_transition.py --dry-run   # CPU: toy shape, 2 configs, no timing claim
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import device_slug, print_table, pyplot, save_figure, time_fn, write_json  # noqa: E402
from benchmarks.bench_transition import Z_4X, Z_7X, bytes_moved, graph_time_us, hbm_peak_tbps  # noqa: E402
from ralu_kernels import transition as T  # noqa: E402

# (name, kind, coarse grid side, ratio, Z, end time e_k of the finishing stage)
SHAPES = [("1to2_r0.1", "1to2", 32, 0.1, Z_7X, 0.2), ("2to3_r0.3", "2to3", 32, 0.3, Z_4X, 0.45),
          ("bw_2to3_L65536", "2to3", 128, 0.3, Z_4X, 0.45)]
DRY_SHAPES = [("dry_2to3", "2to3", 8, 0.3, Z_4X, 0.45)]
# (BLOCK_G, BLOCK_K, num_warps); BLOCK_K = 4 BLOCK_G keeps the up and kept programs the same size in rows
CONFIGS = [(g, 4 * g, w) for g in (4, 8, 16, 32) for w in (1, 2, 4, 8)] + [(16, 32, 4), (16, 128, 4), (8, 64, 4)]
DRY_CONFIGS = [(4, 16, 4), (16, 64, 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--dry-run", action="store_true", help="toy shape and 2 configurations (CPU, interpreter)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    if not T.HAS_TRITON or not T._triton_usable(device):
        print("tune_transition: needs Triton on a CUDA device (or TRITON_INTERPRET=1 on the CPU)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    elt = torch.tensor([], dtype=dtype).element_size()
    channels = 64
    shapes, configs = (SHAPES, CONFIGS) if cuda else (DRY_SHAPES, DRY_CONFIGS)
    peak = hbm_peak_tbps() if cuda else float("nan")
    gen = torch.Generator().manual_seed(0)
    rows, mismatches = [], []
    for name, kind, side, ratio, z, e in shapes:
        c = 1.0 / z**2
        a = 1.0 / (z * (1 - e) + e)
        b = 1.0 - e / (z * (1 - e) + e)
        maps = T.example_transition_maps(kind, side, side, ratio, 1, generator=gen, device=device)
        x = torch.randn(1, maps["pos"].shape[1], channels, generator=gen).to(device=device, dtype=dtype)
        seeds = torch.randint(0, 2**62, (1,), generator=gen, dtype=torch.int64).to(device)
        dst_len = maps["src_index"].shape[1]
        nbytes = bytes_moved(1, dst_len, maps["num_up"], channels, elt)

        def call(tiles, out, pos_out):
            return lambda: T.stage_transition_triton(
                x, maps["pos"], maps["src_index"], maps["group"], maps["child"], seeds, a=a, b=b, c=c,
                pos_scale=maps["pos_scale"], out=out, pos_out=pos_out, order=maps["order"], num_up=maps["num_up"],
                check_values=False, tiles=tiles)

        ref, ref_pos = T.stage_transition_triton(
            x, maps["pos"], maps["src_index"], maps["group"], maps["child"], seeds, a=a, b=b, c=c,
            pos_scale=maps["pos_scale"], order=maps["order"], num_up=maps["num_up"], check_values=False)
        for tiles in configs:
            out = torch.empty_like(ref)
            pos_out = torch.empty_like(ref_pos)
            fn = call(tiles, out, pos_out)
            fn()
            same = bool(torch.equal(out, ref) and torch.equal(pos_out, ref_pos))
            if not same:
                mismatches.append((name, tiles))
            programs = -(-maps["num_up"] // tiles[0]) + -(-(dst_len - 4 * maps["num_up"]) // tiles[1])
            row = dict(shape=name, Ld=dst_len, block_g=tiles[0], block_k=tiles[1], num_warps=tiles[2],
                       programs=programs, bitwise_equal_default=same)
            if cuda:
                us = graph_time_us(fn)
                row.update(graph_us=us, GBps=nbytes / (us * 1e-6) / 1e9)
                row["pct_hbm"] = 100 * row["GBps"] / (1e3 * peak)
            else:
                row.update(time_fn(fn, warmup=0, reps=1, device="cpu"))
            rows.append(row)
    cols = ["shape", "Ld", "block_g", "block_k", "num_warps", "programs", "bitwise_equal_default"]
    cols += ["graph_us", "GBps", "pct_hbm"] if cuda else ["min_ms"]
    print_table(rows, cols)
    best = {}
    for r in rows:
        key = "graph_us" if cuda else "min_ms"
        if r["shape"] not in best or r[key] < best[r["shape"]][key]:
            best[r["shape"]] = r
    for s, r in best.items():
        print(f"best for {s}: tiles ({r['block_g']}, {r['block_k']}), {r['num_warps']} warps"
              + (f": {r['graph_us']:.2f} us, {r['pct_hbm']:.1f} % of HBM" if cuda else ""))
    tag = f"tune_transition_{device_slug()}" if cuda else "tune_transition_dry_cpu"
    write_json(args.out, tag, {"dtype": args.dtype, "channels": channels, "hbm_peak_tbps": peak, "rows": rows,
                               "best": best, "mismatches": [list(m) for m in mismatches],
                               "timed": cuda, "notes": "graph_us: device time per launch from a CUDA graph of 50 "
                               "launches; bytes counted as in bench_transition.py"})
    plt = pyplot()
    if plt is not None and cuda:
        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4))
        for ax, (name, *_rest) in zip(axes, shapes):
            sub = [r for r in rows if r["shape"] == name]
            ax.bar(range(len(sub)), [r["pct_hbm"] for r in sub])
            ax.set_xticks(range(len(sub)))
            ax.set_xticklabels([f"{r['block_g']}/{r['block_k']}/w{r['num_warps']}" for r in sub], rotation=90,
                               fontsize=7)
            ax.set_title(name, fontsize=9)
            ax.set_ylabel("% of HBM peak")
        save_figure(fig, args.out, tag)
    if mismatches:
        print(f"tune_transition: outputs differ from the default tiling for {mismatches}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
