"""Command line: ``ralu generate`` (an image with RALU, per-stage timings printed).

With no ``--model`` it builds the tiny random FLUX pipeline (no download), so the demo runs anywhere.
"""
from __future__ import annotations

import argparse
import sys
import time


def _speedup(value: str):
    return None if value.lower() in ("none", "baseline", "off") else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ralu", description="RALU: region-adaptive latent upsampling for DiTs")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one image and print per-stage timings")
    g.add_argument("--model", default="tiny-flux",
                   help="local diffusers FLUX/SD3 folder, or 'tiny-flux' / 'tiny-sd3' (built-in random models)")
    g.add_argument("--prompt", default="a photograph of a red fox in the snow")
    g.add_argument("--height", type=int, default=None, help="pixels (default 256 for tiny models, else 1024)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--speedup", type=_speedup, default="default",
                   help="preset name (FLUX: 4x, 5x, 7x; SD3: 2x, 3x), 'default' (fastest), or 'none' for baseline")
    g.add_argument("--steps", type=int, default=None, help="baseline steps (speedup none only)")
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--noise", choices=("reference", "exact"), default="reference")
    g.add_argument("--solver", default="euler")
    g.add_argument("--edge-detector", choices=("opencv", "gpu"), default="opencv")
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--out", default="ralu.png", help="output PNG")
    g.add_argument("--mask-out", default=None, help="optional PNG of the image with the regions upsampled first tinted")
    g.add_argument("--max-sequence-length", type=int, default=None)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--cache", default=None,
                   help="temporal feature cache: 'taylorseer:W[:order]' (e.g. taylorseer:3), 'fbcache:THRESHOLD' "
                        "(e.g. fbcache:0.1) or 'none' (default)")
    g.add_argument("--backend", choices=("eager", "inductor", "onnx", "tensorrt"), default=None,
                   help="per-stage compilation backend (default: plain eager)")
    return parser


def _load(args, torch):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if args.model in ("tiny-flux", "tiny-sd3"):
        from .tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

        build = build_tiny_flux_pipeline if args.model == "tiny-flux" else build_tiny_sd3_pipeline
        return build(device=device, dtype=dtype), 256, 77
    from .api import load_pipeline

    return load_pipeline(args.model, torch_dtype=dtype, device=device), 1024, None


def cmd_generate(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .api import generate
    from .edges import overlay_mask

    t0 = time.perf_counter()
    pipe, default_size, max_seq = _load(args, torch)
    load_s = time.perf_counter() - t0
    out = generate(pipe, args.prompt, height=args.height or default_size, width=args.width or default_size,
                   speedup=args.speedup, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   seed=args.seed, output_type="np", return_masks=args.mask_out is not None, noise=args.noise,
                   solver=args.solver, edge_detector=args.edge_detector,
                   max_sequence_length=args.max_sequence_length or max_seq, progress=not args.no_progress,
                   backend=args.backend, cache=args.cache)
    image = (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(image).save(args.out)
    print(f"model load: {load_s:.2f} s  ({args.model})")
    sched = out.schedule
    print(f"speedup: {args.speedup or 'none (baseline)'}" + (f"  steps {sched.steps}, ends {sched.ends}, "
                                                               f"r={sched.ratio}" if sched else ""))
    print(f"{'stage':<14}{'steps':>6}{'tokens':>8}{'seconds':>10}")
    recorded = {r.name for r in out.records}
    for rec in out.records:
        print(f"{rec.name:<14}{rec.steps:>6}{rec.tokens:>8}{rec.seconds:>10.3f}")
    for name, sec in out.timings.items():
        if name not in recorded:
            print(f"{name:<14}{'':>6}{'':>8}{sec:>10.3f}")
    print(f"{'total':<14}{'':>6}{'':>8}{sum(out.timings.values()):>10.3f}")
    if out.cache_stats is not None:
        print(f"cache {args.cache}: {out.cache_stats['full']} full / {out.cache_stats['cached']} cached block-stack "
              f"steps ({' | '.join(s['pattern'] for s in out.cache_stats['stages'])})")
    print(f"wrote {args.out}")
    if args.mask_out is not None:
        if out.masks is None:
            print("no mask: a baseline run upsamples nothing", file=sys.stderr)
        else:
            Image.fromarray(overlay_mask(image, out.masks[0].cpu().numpy())).save(args.mask_out)
            print(f"wrote {args.mask_out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        return cmd_generate(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
