"""Where the stage-transition kernel's time goes: timing ablations of the Triton kernel, against a device copy of the
same bytes (issue 24, part 3: the goal is at least 85 % of the copy's speed; 56.8 % was measured on the H200).

Variants (:func:`ralu_kernels.transition.transition_ablation`, same grid, tiles and bytes of x / positions / output):

* ``kernel``: the kernel as the runtime launches it (Philox with 64-bit products, 64-register cap on large tiles);
* ``tl_philox``: the same with Triton's own ``tl.randint4x`` (the same output bits): the kernel before 2026-12-06;
* ``work_maps``: ``src_index`` / ``group`` given in work order (permuted once, outside the timing): a work item's
  source row and Philox counter load together with its output row, one dependent load fewer (the same output);
* ``no_noise``: no Philox / Box-Muller: what the noise costs;
* ``direct``: output rows, source rows and noise counters from the work index, not loaded through ``order`` ->
  ``src_index`` / ``group`` (a chain of dependent loads before the noise can start): what the indirection costs;
* ``direct_no_noise``: the gather and scatter of the bytes alone;
* ``cuda_op``: the CUDA op (``ralu_kernels._C``), where built; ``copy``: a device copy of the same bytes.

Device time per call from CUDA graphs of 50 calls (as ``bench_transition.py``); ``pct_of_copy`` = copy time / time.
Reading: ``kernel - no_noise`` is the noise's cost, ``kernel - direct`` the dependent loads'; if ``direct`` is near the
copy while ``kernel`` is not, the remedy is to start the noise before the maps arrive (maps in work order, as
``work_maps`` measures, or a prefetch), not fewer instructions. Static SASS counts of the same variants: ``benchmarks/sass_transition.py``.

On a CPU (no timing: the Triton interpreter) ``--dry-run`` runs every variant once at a toy size and checks what
they compute (``kernel``, ``tl_philox`` and ``work_maps`` equal to ``stage_transition_triton``; ``no_noise`` to it with
b = 0).

    python benchmarks/transition_ablation.py                 # GPU: the FLUX 1024^2 shapes and the bandwidth case
    TRITON_INTERPRET=1 python benchmarks/transition_ablation.py --dry-run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import bar_plot, device_slug, print_table, write_json  # noqa: E402
from benchmarks.bench_transition import Z_4X, Z_7X, bytes_moved, graph_time_us  # noqa: E402
from ralu_kernels import transition as T  # noqa: E402

CHANNELS = 64
# (name, kind, coarse grid side, ratio, Z, end time of the finishing stage): bench_transition.py's shapes
SHAPES = [("1to2_r0.1", "1to2", 32, 0.1, Z_7X, 0.2), ("2to3_r0.3", "2to3", 32, 0.3, Z_4X, 0.45),
          ("bw_2to3_L65536", "2to3", 128, 0.3, Z_4X, 0.45)]
DRY_SHAPES = [("dry_1to2", "1to2", 4, 0.3, Z_7X, 0.2), ("dry_2to3", "2to3", 4, 0.3, Z_4X, 0.45)]


def _case(kind: str, side: int, ratio: float, z: float, e: float, device, dtype, gen) -> dict:
    maps = T.example_transition_maps(kind, side, side, ratio, 1, generator=gen, device=device)
    src_len, dst_len = maps["pos"].shape[1], maps["src_index"].shape[1]
    x = torch.randn(1, src_len, CHANNELS, generator=gen).to(device=device, dtype=dtype)
    seeds = torch.randint(0, 2**62, (1,), generator=gen, dtype=torch.int64).to(device)
    a = 1.0 / (z * (1 - e) + e)
    kw = dict(a=a, b=1.0 - e * a, c=1.0 / z**2, pos_scale=maps["pos_scale"], order=maps["order"],
              num_up=maps["num_up"])
    args = (x, maps["pos"], maps["src_index"], maps["group"], maps["child"], seeds)
    out = torch.empty(1, dst_len, CHANNELS, device=device, dtype=dtype)
    pos_out = torch.empty(1, dst_len, 2, device=device)
    work = T.work_order_maps(maps["src_index"], maps["group"], maps["order"])  # once, outside the timing
    return dict(maps=maps, args=args, kw=kw, out=out, pos_out=pos_out, dst_len=dst_len, work_maps=work,
                bytes=bytes_moved(1, dst_len, maps["num_up"], CHANNELS, out.element_size()))


def _variant_call(case: dict, variant: str):
    return lambda: T.transition_ablation(variant, *case["args"], **case["kw"], out=case["out"],
                                         pos_out=case["pos_out"], work_maps=case["work_maps"])


def dry_run(dtype) -> list[dict]:
    """Every variant once on the CPU (interpreter) at toy sizes, with the relations they must satisfy."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, kind, side, ratio, z, e in DRY_SHAPES:
        case = _case(kind, side, ratio, z, e, "cpu", dtype, gen)
        ref, _ = T.stage_transition_triton(*case["args"], **case["kw"])
        zero, _ = T.stage_transition_triton(*case["args"], **dict(case["kw"], b=0.0))
        for variant in T.ABLATIONS:
            _variant_call(case, variant)()
            expect = {"kernel": ref, "tl_philox": ref, "work_maps": ref, "no_noise": zero}.get(variant)
            ok = bool(torch.isfinite(case["out"].float()).all()) and (
                expect is None or torch.equal(case["out"], expect))
            rows.append(dict(shape=name, variant=variant, Ld=case["dst_len"], us=None, pct_of_copy=None,
                             vs_kernel=None, checked="equal" if expect is not None else "runs", ok=ok))
    return rows


def measure(device, dtype) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    has_op = T._csrc_usable(torch.empty(1, device=device), None)
    rows = []
    for name, kind, side, ratio, z, e in SHAPES:
        case = _case(kind, side, ratio, z, e, device, dtype, gen)
        times = {v: graph_time_us(_variant_call(case, v)) for v in T.ABLATIONS}
        if has_op:
            times["cuda_op"] = graph_time_us(lambda: T.stage_transition(
                *case["args"], **case["kw"], out=case["out"], pos_out=case["pos_out"], impl="cuda",
                check_values=False))
        src = torch.empty(case["bytes"] // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        times["copy"] = graph_time_us(lambda: dst.copy_(src))
        for variant, us in times.items():
            rows.append(dict(shape=name, variant=variant, Ld=case["dst_len"], us=us,
                             pct_of_copy=100 * times["copy"] / us, vs_kernel=us / times["kernel"],
                             GBps=case["bytes"] / (us * 1e-6) / 1e9))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--dry-run", action="store_true", help="CPU: run every variant once at toy sizes (no timing)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if not T.HAS_TRITON:
        raise SystemExit("transition_ablation needs triton")
    if args.dry_run:
        rows = dry_run(dtype)
        name, device = "transition_ablation_dry_cpu", "cpu (Triton interpreter: not timed)"
        print_table(rows, ["shape", "variant", "Ld", "checked", "ok"])
    else:
        if not torch.cuda.is_available():
            raise SystemExit("timing needs a CUDA device; on a CPU use --dry-run (TRITON_INTERPRET=1)")
        device = torch.device("cuda")
        rows = measure(device, dtype)
        name = f"transition_ablation_{device_slug()}"
        device = torch.cuda.get_device_name()
        print_table(rows, ["shape", "variant", "Ld", "us", "pct_of_copy", "vs_kernel", "GBps"])
    write_json(args.out, name, {"device": device, "dtype": args.dtype, "channels": CHANNELS, "rows": rows,
                                "notes": "device time per call from CUDA graphs of 50 calls; pct_of_copy = copy / "
                                         "time; only 'kernel', 'tl_philox', 'work_maps' and 'cuda_op' compute the "
                                         "transition"})
    timed = [r for r in rows if r.get("us") is not None]
    if timed:
        bar_plot(args.out, name, [f"{r['shape']}:{r['variant']}" for r in timed], [r["us"] for r in timed],
                 "device time per call (us)", f"transition ablations, {device}, {args.dtype}, C={CHANNELS}")
    bad = [r for r in rows if r.get("ok") is False]
    if bad:
        print(f"FAILED: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
