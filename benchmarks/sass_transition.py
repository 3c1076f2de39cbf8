"""Static SASS analysis of the Triton transition kernel, compiled for a GPU without one.

Compiles ``ralu_kernels.transition._stage_transition_kernel`` for ``sm_90`` (bf16, C = 64, the
compiled-GPU variant: MUFU math, native bf16 rounding) with Triton's offline compiler, disassembles
it with the ``cuobjdump`` Triton ships, and reports per tile size and per part (upsampled groups /
kept tokens): SASS instructions per output element (the code is straight-line, so static = dynamic
per thread), MUFU count, registers, local memory (spills). Then a model for the bandwidth case
(``2->3`` at 65536 output tokens, r = 0.3): issue-bound time at the full issue rate (4 warp
instructions per cycle per SM) and the time to move the bytes at full HBM bandwidth.

This is an estimate for sessions without a GPU, not a measurement: the H100 timing is
``bench_transition.py``. Triton versions differ in code generation (the GPU machine had 3.6).

    python benchmarks/sass_transition.py [--arch 90] [--sms 132] [--clock-ghz 1.755] [--hbm-tbps 3.35]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import bar_plot, print_table, write_json  # noqa: E402
from ralu_kernels import transition as T  # noqa: E402

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,6})\*/\s+(.*?);")


def _compile(arch: int, block_g: int, block_k: int, num_warps: int, variant: str = "kernel",
             maxnreg: int | None = None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": "*bf16", "pos_ptr": "*fp32", "src_ptr": "*i32", "group_ptr": "*i32", "order_ptr": "*i32",
           "seeds_ptr": "*i64", "out_ptr": "*bf16", "pos_out_ptr": "*fp32", "src_len": "i32", "dst_len": "i32",
           "C": "i32", "num_up": "i32", "up_programs": "i32", "a": "fp32", "b": "fp32", "alpha": "fp32",
           "noise_std": "fp32", "pos_scale": "fp32", "child_step": "fp32", "BLOCK_G": "constexpr",
           "BLOCK_K": "constexpr", "BLOCK_C": "constexpr", "BLOCK_C4": "constexpr", "OUT_BF16": "constexpr",
           "FAST": "constexpr", "NOISE": "constexpr", "DIRECT": "constexpr", "TL_PHILOX": "constexpr",
           "WORK_MAPS": "constexpr"}
    names = list(sig)
    # what the JIT specialises at run time for 16-byte aligned pointers and C = 64
    aligned = ["x_ptr", "pos_ptr", "src_ptr", "group_ptr", "order_ptr", "seeds_ptr", "out_ptr", "pos_out_ptr", "C"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    noise, direct, tl_philox, work_maps = T.ABLATIONS[variant]  # "kernel": what the runtime launches
    const = dict(BLOCK_G=block_g, BLOCK_K=block_k, BLOCK_C=64, BLOCK_C4=16, OUT_BF16=True, FAST=True, NOISE=noise,
                 DIRECT=direct, TL_PHILOX=tl_philox, WORK_MAPS=work_maps)
    src = ASTSource(fn=T._stage_transition_kernel, signature=sig, attrs=attrs, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),  # the launcher's options for the built-in tiles
                          options=dict(num_warps=num_warps, num_stages=1, enable_fp_fusion=False,
                                       maxnreg=maxnreg))


def _cuobjdump() -> Path:
    import triton

    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not exe.exists():
        raise SystemExit(f"cuobjdump not found at {exe} (Triton's NVIDIA backend ships it)")
    return exe


def _analyse(cubin: bytes, tmp: Path) -> dict:
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    exe = _cuobjdump()
    sass = subprocess.run([str(exe), "-sass", str(path)], check=True, capture_output=True, text=True).stdout
    res = subprocess.run([str(exe), "-res-usage", str(path)], check=True, capture_output=True, text=True).stdout
    ops = []
    for line in sass.splitlines():
        m = _INSTR.match(line)
        if m:
            ops.append(re.sub(r"^@!?U?P[0-9T] ", "", m.group(2)).split()[0])
    exits = [i for i, o in enumerate(ops) if o == "EXIT"]
    if len(exits) < 2:
        raise RuntimeError("unexpected SASS layout: the up part should end with two EXITs")
    parts = {"up": ops[: exits[1] + 1], "kept": ops[exits[1] + 1:]}
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    out = {"registers": regs, "local_bytes": local}
    for name, part in parts.items():
        counts = collections.Counter(o.split(".")[0] for o in part)
        out[name] = dict(instructions=len(part), mufu=counts["MUFU"], bar=counts["BAR"],
                         stores=sorted({o for o in part if o.startswith("STG")}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sms", type=int, default=132, help="SM count of the modelled GPU (H100 SXM: 132)")
    ap.add_argument("--clock-ghz", type=float, default=1.755, help="SM clock under load (H100 SXM ~1.755)")
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="peak HBM bandwidth (H100 SXM: 3.35)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not T.HAS_TRITON:
        raise SystemExit("needs triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sass_transition.py compiles the kernels to SASS (ptxas, no GPU needed): unset "
                         "TRITON_INTERPRET, which makes triton interpret them instead")
    import tempfile

    import triton

    threads = 32 * T._NUM_WARPS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (bg, bk) in (("small", T._SMALL_TILES), ("large", T._LARGE_TILES)):
            kern = _compile(args.arch, bg, bk, T._NUM_WARPS,
                            maxnreg=T._MAX_REGISTERS if label == "large" else None)  # as the launcher does
            info = _analyse(kern.asm["cubin"], Path(tmp))
            per_thread = {"up": bg * 64 * 4 / threads, "kept": bk * 64 / threads}  # output elements
            for part in ("up", "kept"):
                p = info[part]
                rows.append(dict(tiles=label, BLOCK_G=bg, BLOCK_K=bk, part=part, instructions=p["instructions"],
                                 elems_per_thread=per_thread[part],
                                 instr_per_elem=p["instructions"] / per_thread[part],
                                 mufu_per_elem=p["mufu"] / per_thread[part], bar=p["bar"],
                                 registers=info["registers"], local_bytes=info["local_bytes"],
                                 stores=" ".join(p["stores"])))
    print(f"Triton {triton.__version__}, sm_{args.arch}, bf16, C=64, {T._NUM_WARPS} warps (static SASS, no GPU)")
    print_table(rows, ["tiles", "part", "instructions", "elems_per_thread", "instr_per_elem", "mufu_per_elem", "bar",
                       "registers", "local_bytes", "stores"])

    # model of the bandwidth case (the maps of bench_transition.py's bw_2to3_L65536)
    maps = T.example_transition_maps("2to3", 128, 128, 0.3, 1)
    dst_len, num_up = maps["src_index"].shape[1], maps["num_up"]
    kept = dst_len - 4 * num_up
    from benchmarks.bench_transition import bytes_moved

    nbytes = bytes_moved(1, dst_len, num_up, 64, 2)
    large = {r["part"]: r["instr_per_elem"] for r in rows if r["tiles"] == "large"}
    instr = 4 * num_up * 64 * large["up"] + kept * 64 * large["kept"]
    issue_rate = args.sms * 4 * args.clock_ghz * 1e9  # warp instructions per second
    t_issue = instr / 32 / issue_rate
    t_mem = nbytes / (args.hbm_tbps * 1e12)
    model = dict(case="2to3 r=0.3, 128x128 -> 256x256 (Ld = 65536), C = 64 bf16, large tiles",
                 num_up=num_up, kept=kept, bytes=nbytes, thread_instructions=instr,
                 issue_bound_us=t_issue * 1e6, hbm_bound_us=t_mem * 1e6,
                 pct_hbm_if_perfect_overlap=100 * t_mem / max(t_mem, t_issue),
                 assumptions=f"{args.sms} SMs x 4 warp-instructions/cycle x {args.clock_ghz} GHz, "
                             f"{args.hbm_tbps} TB/s; real kernels reach less of both")
    print("model:", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in model.items()})

    # the timing ablations of transition_ablation (benchmarks/transition_ablation.py), large tiles: what each part of
    # the work costs in instructions (the GPU times them; a static count is a hint, not a time)
    ablations = []
    with tempfile.TemporaryDirectory() as tmp:
        bg, bk = T._LARGE_TILES
        for variant in T.ABLATIONS:
            info = _analyse(_compile(args.arch, bg, bk, T._NUM_WARPS, variant, T._MAX_REGISTERS).asm["cubin"],
                            Path(tmp))
            per_thread = {"up": bg * 64 * 4 / threads, "kept": bk * 64 / threads}
            instr = sum(info[p]["instructions"] / per_thread[p] * n * 64
                        for p, n in (("up", 4 * num_up), ("kept", kept)))
            ablations.append(dict(variant=variant, up_instr_per_elem=info["up"]["instructions"] / per_thread["up"],
                                  kept_instr_per_elem=info["kept"]["instructions"] / per_thread["kept"],
                                  mufu_per_elem=info["up"]["mufu"] / per_thread["up"], registers=info["registers"],
                                  issue_bound_us=instr / 32 / issue_rate * 1e6))
    print("timing ablations (large tiles; issue-bound time of the bandwidth case):")
    print_table(ablations, ["variant", "up_instr_per_elem", "kept_instr_per_elem", "mufu_per_elem", "registers",
                            "issue_bound_us"])
    name = f"transition_sass_sm{args.arch}"
    write_json(args.out, name, {"rows": rows, "model": model, "ablations": ablations, "triton": triton.__version__,
                                "notes": "static SASS of the compiled-GPU kernel variant, analysed without a GPU; "
                                         "instr_per_elem = SASS instructions per thread / output elements per thread"})
    bar_plot(args.out, name, [f"{r['tiles']}:{r['part']}" for r in rows], [r["instr_per_elem"] for r in rows],
             "SASS instructions per output element", f"transition kernel, sm_{args.arch}, bf16 C=64 (static)")


if __name__ == "__main__":
    main()
