"""Packed (varlen) attention vs padded SDPA on a mixed batch of RALU-stage token counts.

Default shapes are FLUX's: 24 heads x 128 head_dim, 512 text tokens plus the image tokens of
one request per RALU stage at 1024^2 ({1024, 1330, 1945, 4096}), so segments of
{1536, 1842, 2457, 4608} tokens. Compared:

* ``varlen[<backend>]``: :func:`ralu_kernels.attention.varlen_attention` on the packed tokens,
  for every backend available on the device (the first listed is what ``"auto"`` picks);
* ``padded_masked``: one SDPA call on the batch padded to the longest segment with a key-padding
  mask (the usual way to batch unequal requests);
* ``padded_nomask``: the same without the mask: not a correct result, a cost lower bound for
  padding;
* ``blockdiag_mask``: all tokens as one sequence with a block-diagonal mask.

Padded inputs are prepared outside the timed region (only attention is timed). A second case
runs the same total as equally long segments, where padding wastes nothing.

    python benchmarks/bench_attention.py                  # device default: cuda if present
    python benchmarks/bench_attention.py --quick          # small shapes, CPU-friendly
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import bar_plot, device_slug, positive_int, print_table, time_fn, write_json  # noqa: E402
from ralu_kernels.attention import (  # noqa: E402
    StreamSegments,
    available_backends,
    pack_sequences,
    varlen_attention,
)

FULL = dict(heads=24, head_dim=128, text=512, image=[1024, 1330, 1945, 4096])
QUICK = dict(heads=2, head_dim=32, text=32, image=[64, 96, 160, 256])


def _make_case(lens, heads, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [[torch.randn(n, heads, head_dim, generator=g).to(device=device, dtype=dtype) for n in lens] for _ in range(3)]
    (q, cu, mx), (k, _, _), (v, _, _) = (pack_sequences(s) for s in seqs)
    # padded (B, H, Lmax, D) copies and masks, built outside the timed region
    n = len(lens)
    pads = []
    for s in seqs:
        p = torch.zeros(n, mx, heads, head_dim, device=device, dtype=dtype)
        for i, t in enumerate(s):
            p[i, : t.shape[0]] = t
        pads.append(p.transpose(1, 2))
    lens_t = torch.tensor(lens, device=device)
    key_mask = (torch.arange(mx, device=device)[None, :] < lens_t[:, None])[:, None, None, :]
    return q, k, v, cu.to(device), mx, pads, key_mask


def _blockdiag(cu, device):
    lens = (cu[1:] - cu[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens.to(device))
    return seg[:, None] == seg[None, :]


def run_case(name, lens, text, heads, head_dim, dtype, device, reps, warmup):
    q, k, v, cu, mx, (qp, kp, vp), key_mask = _make_case(lens, heads, head_dim, dtype, device)
    total = int(cu[-1])
    useful_flops = sum(4.0 * n * n * heads * head_dim for n in lens)
    padded_flops = 4.0 * len(lens) * mx * mx * heads * head_dim
    fns = {}
    for b in available_backends(device, dtype):
        c = cu.cpu() if b == "sdpa" else cu  # sdpa loops on the host: host lengths, no device sync
        fns[f"varlen[{b}]"] = (lambda b=b, c=c: varlen_attention(q, k, v, c, c, mx, mx, backend=b))
    # what a packed FLUX call (FluxAdapter.packed_velocity) does around the kernel in a joint block: gather
    # [text_i; image_i] segments from the text and image streams, attention, split back into the streams
    seg = StreamSegments([[text] * len(lens), [n - text for n in lens]], device)
    streams = [(t[:len(lens) * text], t[len(lens) * text:]) for t in (q, k, v)]  # stand-ins (values don't matter)
    backend = available_backends(device, dtype)[0]
    fns["segments_gather+varlen+split"] = (
        lambda: seg.split(seg.attend(*(seg.gather(*s) for s in streams), backend=backend)))
    fns["padded_masked"] = lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_mask)
    fns["padded_nomask"] = lambda: F.scaled_dot_product_attention(qp, kp, vp)
    bd_bytes = total * total
    if bd_bytes <= 512 * 2**20:
        bd = _blockdiag(cu, device)
        q1, k1, v1 = (t.transpose(0, 1)[None] for t in (q, k, v))
        fns["blockdiag_mask"] = lambda: F.scaled_dot_product_attention(q1, k1, v1, attn_mask=bd)
    rows = []
    for method, fn in fns.items():
        t = time_fn(fn, warmup=warmup, reps=reps, device=device.type)  # "cuda" -> CUDA events + sync
        rows.append({
            "case": name, "method": method, "mean_ms": t["mean_ms"], "min_ms": t["min_ms"], "stdev_ms": t["stdev_ms"],
            "useful_tflops": useful_flops / (t["min_ms"] * 1e-3) / 1e12,
        })
    # correctness of the packed results against the per-segment SDPA reference (fp32)
    ref = varlen_attention(q.float(), k.float(), v.float(), cu, cu, mx, mx, backend="sdpa")
    for r in rows:
        m = r["method"]
        if m.startswith("varlen"):
            out = fns[m]().float()
        elif m == "padded_masked":
            o = fns[m]().transpose(1, 2)
            out = torch.cat([o[i, :n] for i, n in enumerate(lens)]).float()
        elif m == "blockdiag_mask":
            out = fns[m]()[0].transpose(0, 1).float()
        else:
            continue  # padded_nomask is not a correct result
        r["max_abs_err"] = (out - ref).abs().max().item()
    best_varlen = min((r for r in rows if r["method"].startswith("varlen")), key=lambda r: r["min_ms"])
    for r in rows:
        r["x_vs_best_varlen"] = r["min_ms"] / best_varlen["min_ms"]
    meta = {"case": name, "seq_lens": lens, "total_tokens": total, "max_len": mx, "heads": heads,
            "head_dim": head_dim, "dtype": str(dtype), "useful_attention_flops": useful_flops,
            "padded_attention_flops": padded_flops, "padding_flop_overhead": padded_flops / useful_flops,
            "best_varlen": best_varlen["method"]}
    return rows, meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="small shapes (2 heads x 32, lengths 64..256 + 32 text)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--reps", type=positive_int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU timings are steadier with 1)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cpu" and not args.quick:
        print("note: full FLUX shapes on a CPU take minutes; use --quick for the small CPU run", flush=True)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = QUICK if args.quick else FULL
    reps = args.reps or (20 if device.type == "cuda" or args.quick else 5)
    warmup = 5 if device.type == "cuda" else 2
    mixed = [shapes["text"] + n for n in shapes["image"]]
    uniform = [sum(mixed) // len(mixed)] * len(mixed)

    all_rows, metas = [], []
    for name, lens in (("mixed", mixed), ("uniform", uniform)):
        rows, meta = run_case(name, lens, shapes["text"], shapes["heads"], shapes["head_dim"], dtype, device, reps, warmup)
        all_rows += rows
        metas.append(meta)

    print(f"device={device} dtype={dtype} heads={shapes['heads']} head_dim={shapes['head_dim']}")
    for m in metas:
        print(f"  {m['case']}: segments {m['seq_lens']} (padding would do {m['padding_flop_overhead']:.2f}x the useful FLOPs)")
    print_table(all_rows, ["case", "method", "mean_ms", "min_ms", "stdev_ms", "useful_tflops", "x_vs_best_varlen", "max_abs_err"])

    name = "attention_quick" if args.quick else "attention"
    name = f"{name}_{device_slug() if device.type == 'cuda' else 'cpu'}"
    write_json(args.out, name, {"shapes": shapes, "cases": metas, "rows": all_rows, "reps": reps,
                                "threads": torch.get_num_threads(),
                                "note": "padded inputs/masks prepared outside the timed region; times are min over reps"})
    labels = [f"{r['case']}:{r['method']}" for r in all_rows]
    bar_plot(args.out, name, labels, [r["min_ms"] for r in all_rows], "ms (min)",
             f"packed vs padded attention, {device.type}, {str(dtype).replace('torch.', '')}")


if __name__ == "__main__":
    main()
