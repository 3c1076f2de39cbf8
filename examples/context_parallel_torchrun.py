"""One RALU image on several GPUs: context parallelism with torchrun.

    torchrun --nproc-per-node 4 examples/context_parallel_torchrun.py --model /models/FLUX.1-dev \
        --prompt "a red fox in fresh snow" --ulysses 4 --backend inductor --out fox.png

    # no weights, no GPU (tiny random FLUX, gloo on the CPU):
    torchrun --nproc-per-node 2 examples/context_parallel_torchrun.py --tiny --out tiny.png

Every rank runs this same script: it joins the process group (NCCL with one GPU per rank, gloo on a CPU), loads the
pipeline onto its own GPU, and calls ``ralu_runtime.generate`` with the same arguments and
``parallel=ContextParallelConfig(ulysses_degree=U, ring_degree=R)`` (U x R = the number of ranks). Each model call's
token sequence is split across the ranks; every rank ends with the same image and rank 0 saves it.

``--diffusers-enable`` instead calls diffusers' ``transformer.enable_parallelism(config=...)`` and runs ``generate``
without ``parallel=``: ralu adopts that config (its process groups; ralu does its own sharding either way). On a CPU
diffusers' set-up raises ZeroDivisionError (it computes ``rank % torch.accelerator.device_count()``, 0 without an
accelerator); the script then patches ``device_count`` to 1 for that one call, which is the documented workaround.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from unittest import mock

import torch
import torch.distributed as dist


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local diffusers FLUX.1 folder (dev or schnell)")
    src.add_argument("--tiny", action="store_true", help="the built-in tiny random FLUX (no weights needed)")
    ap.add_argument("--prompt", default="a red fox in fresh snow, golden hour")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--speedup", default="default", help="RALU preset (7x, 4x, ...) or 'none' for the baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: all ranks)")
    ap.add_argument("--ring", type=int, default=1, help="ring degree (K/V all-gather); ulysses x ring = ranks")
    ap.add_argument("--backend", default=None, choices=("eager", "inductor"))
    ap.add_argument("--cache", default=None, help="temporal cache, e.g. taylorseer:3 or fbcache:0.1")
    ap.add_argument("--diffusers-enable", action="store_true",
                    help="set up with transformer.enable_parallelism and let generate adopt it")
    ap.add_argument("--out", default="context_parallel.png")
    args = ap.parse_args()

    from diffusers import ContextParallelConfig

    import ralu_runtime
    from ralu_runtime.tiny import build_tiny

    cuda = torch.cuda.is_available() and not args.tiny
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ulysses = args.ulysses or world // args.ring
    config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=args.ring)

    if args.tiny:
        pipe = build_tiny("tiny-flux")
        height, width = args.height or 256, args.width or 256
    else:
        pipe = ralu_runtime.load_pipeline(args.model, torch_dtype=torch.bfloat16,
                                          device=f"cuda:{local_rank}" if cuda else "cpu")
        height, width = args.height, args.width

    parallel = config
    if args.diffusers_enable:
        patch = mock.patch("torch.accelerator.device_count", lambda: 1) if not cuda else contextlib.nullcontext()
        with patch:
            pipe.transformer.enable_parallelism(config=config)
        parallel = None  # generate adopts the transformer's config

    kwargs = dict(height=height, width=width, seed=args.seed, backend=args.backend, cache=args.cache,
                  speedup=None if args.speedup == "none" else args.speedup, progress=rank == 0, parallel=parallel)
    ralu_runtime.generate(pipe, args.prompt, **kwargs)  # warm-up (compiles with --backend inductor)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    out = ralu_runtime.generate(pipe, args.prompt, **kwargs)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if rank == 0:
        out.images[0].save(args.out)
        stages = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in out.timings.items())
        print(f"{world} ranks (ulysses {ulysses} x ring {args.ring}): {seconds:.3f} s per image -> {args.out}\n"
              f"  {stages}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
