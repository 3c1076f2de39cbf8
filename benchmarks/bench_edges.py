"""Edge selection benchmark: OpenCV (host) vs the on-device torch Canny, block sums, top-k.

Times, for batches of 512x512 images (the half-resolution VAE decode of a 1024^2 FLUX image; 16x16
blocks = the 32x32 coarse token grid):

* ``gray``: [-1, 1] RGB -> uint8 grayscale;
* ``edge_scores[opencv]``: gray -> one host copy -> cv2.Canny per image -> block sums -> back to the device;
* ``edge_scores[gpu]``: torch Canny + block sum on the images' device (on a CPU machine: torch CPU ops);
* ``canny[torch]`` alone, ``block_sum`` (reference; Triton too on CUDA), ``select_top_blocks``.

It also reports, on scikit-image photographs, the agreement of the torch Canny with OpenCV: pixel
mismatches and the top-k block overlap ``|A & B| / k`` at r = 0.1 and 0.3 (same tie-breaking seed).

Writes ``bench_edges_<device>.json`` / ``.png`` into ``--out``.

    python benchmarks/bench_edges.py [--out benchmarks/results] [--reps 10] [--batch 1 4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (bar_plot, device_slug, non_negative_int, positive_int, print_table,  # noqa: E402
                                time_fn, write_json)
from ralu_kernels import edge_scores as K  # noqa: E402
from ralu_runtime import edges as E  # noqa: E402

IMAGES = ("astronaut", "coffee", "chelsea", "camera", "rocket")


def skimage_rgb(name: str, block: int = 16) -> np.ndarray:
    import skimage.data

    im = getattr(skimage.data, name)()
    if im.ndim == 2:
        im = np.stack([im] * 3, axis=-1)
    h, w = (im.shape[0] // block) * block, (im.shape[1] // block) * block
    return np.ascontiguousarray(im[:h, :w, :3])


def to_signed(rgb: np.ndarray, device) -> torch.Tensor:
    return (torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0).unsqueeze(0).to(device)


def agreement(device, block: int = 16, ratios=(0.1, 0.3)) -> list[dict]:
    import cv2

    rows = []
    for name in IMAGES:
        rgb = skimage_rgb(name, block)
        x = to_signed(rgb, device)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        ref = cv2.Canny(gray, 100, 200) > 0
        ours, iters = K.canny(torch.from_numpy(gray)[None].to(device), 100, 200, return_iters=True)
        ours = ours[0].cpu().numpy()
        s_cv = E.edge_scores(x, block, detector="opencv")
        s_gpu = E.edge_scores(x, block, detector="gpu")
        row = {"image": name, "shape": f"{rgb.shape[0]}x{rgb.shape[1]}", "edge_px_cv": int(ref.sum()),
               "pixel_mismatch": int((ours != ref).sum()), "hysteresis_iters": iters}
        for r in ratios:
            k = int(s_cv[0].numel() * r)
            a = E.select_top_blocks(s_cv, k, [torch.Generator().manual_seed(0)])[0].tolist()
            b = E.select_top_blocks(s_gpu, k, [torch.Generator().manual_seed(0)])[0].tolist()
            row[f"overlap_r{r}"] = len(set(a) & set(b)) / k
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--reps", type=positive_int, default=10)
    ap.add_argument("--warmup", type=non_negative_int, default=2)
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[1, 4])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.3)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    use_triton = device == "cuda" and K.HAS_TRITON
    base = to_signed(skimage_rgb("astronaut", args.block), device)
    base = torch.nn.functional.interpolate(base, size=(args.size, args.size), mode="bilinear", align_corners=False)
    rows = []
    for bsz in args.batch:
        # a batch of different images: flips / rolls of the same photograph
        imgs = torch.cat([torch.roll(base.flip(-1) if i % 2 else base, shifts=37 * i, dims=-2) for i in range(bsz)])
        gray = E.images_to_uint8_gray(imgs)
        edges = K.canny(gray)
        scores = E.edge_scores(imgs, args.block)
        k = int(scores[0].numel() * args.ratio)
        gens = [torch.Generator(device=device).manual_seed(i) for i in range(bsz)]
        cases = {
            "gray": lambda: E.images_to_uint8_gray(imgs),
            "edge_scores[opencv]": lambda: E.edge_scores(imgs, args.block, detector="opencv"),
            "edge_scores[gpu]": lambda: E.edge_scores(imgs, args.block, detector="gpu"),
            "canny[torch]": lambda: K.canny(gray),
            "block_sum[reference]": lambda: K.block_sum_reference(edges, args.block),
            "select_top_blocks": lambda: E.select_top_blocks(scores, k, gens),
        }
        if use_triton:
            cases["block_sum[triton]"] = lambda: K.block_sum_triton(edges, args.block)
        for name, fn in cases.items():
            t = time_fn(fn, warmup=args.warmup, reps=args.reps, device=device)
            rows.append({"case": name, "batch": bsz, "shape": f"{bsz}x3x{args.size}x{args.size}", **t})
    print(f"device: {device}")
    print_table(rows, ["case", "batch", "shape", "mean_ms", "stdev_ms", "min_ms"])

    agree = agreement(device, args.block)
    print("\nagreement of the torch Canny with OpenCV (block 16, same tie-breaking seed):")
    print_table(agree, ["image", "shape", "edge_px_cv", "pixel_mismatch", "hysteresis_iters", "overlap_r0.1", "overlap_r0.3"])

    name = f"bench_edges_{device_slug()}"
    write_json(args.out, name, {"device_kind": device, "block": args.block, "size": args.size, "ratio": args.ratio,
                                "timings": rows, "agreement": agree})
    bar_plot(args.out, name, [f"{r['case']} B={r['batch']}" for r in rows], [r["mean_ms"] for r in rows],
             "ms", f"edge selection, {args.size}^2 images, block {args.block} ({device})", log=True)


if __name__ == "__main__":
    main()
