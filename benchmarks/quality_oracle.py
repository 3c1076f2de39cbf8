"""Sample quality of RALU and its ablations on the Gaussian oracle (exact velocity, known data law).

Every method draws ``--samples`` images (x 4 i.i.d. latent channels) per seed, for ``--seeds`` seeds, on
:class:`~ralu_runtime.adapters.oracle.GaussianOracle` (16x16 fine tokens, 8x8 coarse), stationary and
non-stationary variants. The metric is the Fréchet distance (FD) between the samples' Gaussian fit and
the data law (mean +- std over seeds; the "data" row is the FD of as many true data samples, i.e. the
sampling floor), plus the variance ratios in the block-mean and within-block-detail subspaces.
Where the sampler is linear (baselines) the exact FD from the closed-form moments is shown too.

Methods (``4x`` / ``7x``: FLUX's presets, NT-Matching solved by :func:`ralu_runtime.get_preset`):

* ``baseline-50``: 50 Euler steps; ``baseline-N``: N steps, N = the FLOP-equivalent step count of a preset
  (FLUX.1-dev cost model at 1024^2: 4096 image tokens + 225 effective text tokens per step, see
  :func:`ralu_runtime.schedule.estimate_cost_ratio`), also with the multistep solvers;
* ``ralu``: :func:`ralu_runtime.generate` itself (``noise="reference"`` and ``"exact"``, Euler / AB2 / DPM++2M);
* ablations, composed here from the sampler's public pieces (``run_stage``, ``select_regions``,
  ``TokenLayout``) with the transition written in torch below (same a, b; noise covariance I + gamma J per
  group of 4 children): ``ralu-composed`` (gamma = -c: the method, a check of the composition),
  ``iid-renoise`` (gamma = 0), ``no-nt-matching`` (all shifts = 3, same Z), ``random-regions``,
  ``naive-upsample`` (copy-upsample, no re-noising, each stage continues from e_k: Bottleneck-like),
  sweeps of r, Z (shifts fixed) and gamma.

    python benchmarks/quality_oracle.py [--out benchmarks/results] [--samples 2000] [--seeds 3] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import positive_int, print_table, pyplot, save_figure, write_json  # noqa: E402
from ralu_runtime import oracle_metrics as om  # noqa: E402
from ralu_runtime.adapters.base import Conditioning, TokenGrid  # noqa: E402
from ralu_runtime.adapters.oracle import GaussianOracle  # noqa: E402
from ralu_runtime.layout import TokenLayout, grid_positions  # noqa: E402
from ralu_runtime.sampler import run_stage, select_regions  # noqa: E402
from ralu_runtime.schedule import RaluSchedule, estimate_cost_ratio, get_preset  # noqa: E402

FLUX_TOKENS, FLUX_TEXT = 4096, 225  # FLUX.1-dev 1024^2 cost model (reproduces 21.5 / 74.4 TFLOPs per step)


# ----------------------------------------------------------------------------- composed sampler
def torch_transition(x: torch.Tensor, pos: torch.Tensor, tmap, a: float, b: float, gamma: float, kept_var: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Upsample-and-renoise: ``x' = a x[src] + b n``; children of one group get noise covariance
    ``I + gamma J`` (gamma = -c is RALU's), copied tokens ``kept_var I`` (1: reference, 1 - c: exact).
    Positions: ``(pos[src] + 0.5 (dy, dx)) * pos_scale``. Noise from ``generator`` (CPU)."""
    bsz, _, ch = x.shape
    src = tmap.src_index.long()
    child = tmap.child.long()
    xs = torch.gather(x, 1, src[..., None].expand(-1, -1, ch)).to(torch.float32)
    ps = torch.gather(pos, 1, src[..., None].expand(-1, -1, 2))
    off = torch.stack([torch.div(child, 2, rounding_mode="floor"), child % 2], -1).to(pos.dtype) * 0.5
    new_pos = (ps + torch.where(child[..., None] >= 0, off, torch.zeros_like(off))) * tmap.pos_scale
    if b == 0.0:
        return (a * xs).to(x.dtype), new_pos
    u = torch.randn(xs.shape, generator=generator, dtype=torch.float32)
    is_child = (child >= 0)[..., None]
    group = tmap.group.long()[..., None].expand(-1, -1, ch)
    gsum = torch.zeros(bsz, tmap.num_groups, ch).scatter_add_(1, group, u * is_child)
    n_child = u + om.noise_factor_beta(gamma) * torch.gather(gsum, 1, group)
    noise = torch.where(is_child, n_child, math.sqrt(kept_var) * u)
    return (a * xs + b * noise).to(x.dtype), new_pos


def _stage(oracle, x, grid, sig: np.ndarray, solver: str):
    sigmas = torch.tensor(sig, dtype=torch.float32)
    return run_stage(oracle, x, grid, sigmas[:-1] * 1000.0, sigmas, Conditioning(x.shape[0], {}), solver=solver,
                     progress=False)


def sample_variant(oracle: GaussianOracle, schedule: RaluSchedule, n: int, seed: int, *, regions="edges",
                   gamma: float | None = None, kept_noise: str = "reference", naive: bool = False,
                   solver: str = "euler") -> torch.Tensor:
    """RALU-like three-stage sampling with the ablation knobs; returns latents ``(n, C, H, W)``.

    regions: "edges" (RALU's selection), "random" (k uniform coarse tokens per image), or a ``(k,)`` tensor of
    coarse indices used for every image. gamma: children's noise covariance I + gamma J (default -c).
    naive: copy-upsample with no re-noising, stage k+1 starting at e_k. All randomness from ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    hh, ww = oracle.image_size
    noise = oracle.prepare_noise(n, hh, ww, g, oracle.dtype)
    latent_hw = noise.shape[-2:]
    coarse_hw, fine_hw = oracle.coarse_hw, oracle.fine_hw
    m = coarse_hw[0] * coarse_hw[1]
    k = int(m * schedule.ratio)
    gamma = -schedule.c if gamma is None else gamma
    kept_var = {"reference": 1.0, "exact": 1.0 - schedule.c}[kept_noise]
    sig_of = (lambda j: om.naive_stage_sigmas(schedule, j)) if naive else schedule.stage_sigmas

    x = oracle.pack(noise[:, :, ::2, ::2].contiguous())
    pos = grid_positions(*coarse_hw).expand(n, -1, -1).contiguous()
    sig = sig_of(0)
    x, v = _stage(oracle, x, TokenGrid(pos, coarse_hw, None, raster=True), sig, solver)
    if isinstance(regions, torch.Tensor):
        sel = regions.view(1, -1).long().expand(n, -1)
    elif regions == "random":
        sel = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)]) if k else torch.zeros(n, 0)
    elif regions == "edges":
        sel = (select_regions(oracle, x, v, float(np.float32(sig[-1])), latent_hw, k, [g] * n, edge_map="unit",
                              edge_detector="opencv") if 0 < k < m else torch.arange(m).expand(n, m)[:, :k])
    else:
        raise ValueError(f"regions={regions!r}")
    layout = TokenLayout(coarse_hw, sel.long())
    for j, tmap in ((0, layout.transition_12()), (1, layout.transition_23())):
        bd = schedule.boundary(j)
        a, b = (1.0, 0.0) if naive else (bd.a, bd.b)
        x, pos = torch_transition(x, pos, tmap, a, b, gamma, kept_var, g)
        grid = (TokenGrid(pos, coarse_hw, layout.stage2_fine_mask()) if j == 0 else
                TokenGrid(pos, fine_hw, None, raster=True))
        x, v = _stage(oracle, x, grid, sig_of(j + 1), solver)
    return oracle.unpack(x, *fine_hw)


# ----------------------------------------------------------------------------- benchmark
def _summ(evals: list[dict]) -> dict:
    out = {}
    for key in ("fd", "fd_mean", "fd_detail", "var_ratio_mean", "var_ratio_detail"):
        vals = [e[key] for e in evals]
        out[key] = float(np.mean(vals))
        out[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    out["n_per_seed"] = evals[0].get("n")
    return out


def equal_flop_steps(schedule: RaluSchedule, baseline_steps: int = 50) -> int:
    """Full-resolution step count with the FLOPs of ``schedule`` (FLUX.1-dev 1024^2 cost model)."""
    return max(1, round(baseline_steps / estimate_cost_ratio(schedule, baseline_steps, FLUX_TOKENS, FLUX_TEXT)))


class Runner:
    def __init__(self, oracle: GaussianOracle, n: int, seeds: list[int]):
        self.o, self.n, self.seeds = oracle, n, seeds

    def baseline(self, steps: int, solver: str = "euler") -> dict:
        from ralu_runtime import generate

        hh, ww = self.o.image_size
        evals = []
        for s in self.seeds:
            out = generate(self.o, [""] * self.n, height=hh, width=ww, speedup=None, num_inference_steps=steps,
                           seed=s, solver=solver, output_type="latent", progress=False)
            evals.append(om.evaluate_samples(self.o, out.images))
        _, sig = self.o.baseline_schedule(steps)
        exact = om.evaluate_moments(self.o, *om.baseline_moments(self.o, sig.double().numpy(), solver))
        return {**_summ(evals), "fd_exact": exact["fd"], "calls": steps}

    def ralu(self, schedule: RaluSchedule, noise: str = "reference", solver: str = "euler") -> dict:
        from ralu_runtime import generate

        hh, ww = self.o.image_size
        evals = []
        for s in self.seeds:
            out = generate(self.o, [""] * self.n, height=hh, width=ww, speedup=schedule, seed=s, noise=noise,
                           solver=solver, output_type="latent", progress=False)
            evals.append(om.evaluate_samples(self.o, out.images))
        return {**_summ(evals), "calls": schedule.total_steps}

    def variant(self, schedule: RaluSchedule, **kw) -> dict:
        evals = [om.evaluate_samples(self.o, sample_variant(self.o, schedule, self.n, s, **kw)) for s in self.seeds]
        row = {**_summ(evals), "calls": schedule.total_steps}
        if isinstance(kw.get("regions"), torch.Tensor):
            mu, cov = om.ralu_moments(self.o, schedule, kw["regions"], gamma=kw.get("gamma"),
                                      kept_noise=kw.get("kept_noise", "reference"), naive=kw.get("naive", False),
                                      solver=kw.get("solver", "euler"))
            row["fd_exact"] = om.evaluate_moments(self.o, mu, cov)["fd"]
        return row


def envelope_regions(oracle: GaussianOracle, k: int) -> torch.Tensor:
    """The k coarse tokens with the most within-block detail variance in the data (an oracle region choice)."""
    _, q_det = om.subspace_bases(oracle)
    a = oracle.block_average_matrix()
    s = oracle.cov
    # detail variance of block i: trace of S restricted to its 4 fine tokens minus 4 x variance of the block mean
    fine = (a > 0).double()
    det = (fine @ (s * torch.eye(oracle.d, dtype=torch.float64)) @ torch.ones(oracle.d, dtype=torch.float64)) - \
        4.0 * torch.diagonal(a @ s @ a.T)
    return torch.sort(torch.topk(det, k).indices).values


def run(args) -> dict:
    torch.set_num_threads(1)  # small batched linear algebra: one thread is fastest on a shared 2-core CPU
    presets = {name: get_preset("flux", name) for name in (("7x",) if args.quick else ("4x", "7x"))}
    seeds = list(range(args.seeds))
    rows, sweeps = [], []
    variants = ("stationary",) if args.quick else ("stationary", "nonstationary")
    solvers_main = ("euler", "ab2") if args.quick else ("euler", "ab2", "dpmpp2m")

    def add(variant, preset, method, solver, row, **extra):
        rec = {"oracle": variant, "preset": preset, "method": method, "solver": solver, **extra, **row}
        rows.append(rec)
        print(f"  {variant:13s} {preset:4s} {method:22s} {solver:8s} FD {rec['fd']:.3f} +- {rec['fd_std']:.3f}"
              + (f"  exact {rec['fd_exact']:.3f}" if "fd_exact" in rec else ""), flush=True)

    for variant in variants:
        oracle = GaussianOracle(variant=variant)
        rn = Runner(oracle, args.samples, seeds)
        floor = om.data_floor(oracle, args.samples, seeds)
        rows.append({"oracle": variant, "preset": "-", "method": "data (floor)", "solver": "-", "calls": 0,
                     "fd": floor["fd_mean"], "fd_std": floor["fd_std"], "fd_exact": 0.0,
                     "var_ratio_mean": 1.0, "var_ratio_detail": 1.0})
        add(variant, "-", "baseline-50", "euler", rn.baseline(50, "euler"))
        for pname, sch in presets.items():
            n_eq = equal_flop_steps(sch)
            for solver in solvers_main:
                add(variant, pname, f"baseline-{n_eq} (=FLOPs)", solver, rn.baseline(n_eq, solver))
            for solver in ("euler", "ab2"):
                add(variant, pname, f"baseline-{sch.total_steps} (=calls)", solver, rn.baseline(sch.total_steps, solver))
            for solver in solvers_main:
                add(variant, pname, "ralu (reference noise)", solver, rn.ralu(sch, "reference", solver))
            add(variant, pname, "ralu (exact noise)", "euler", rn.ralu(sch, "exact", "euler"))
            k = int(oracle.coarse_hw[0] * oracle.coarse_hw[1] * sch.ratio)
            no_nt = dataclasses.replace(sch, shifts=(sch.base_shift,) * 3, jsd=None)
            for solver in ("euler", "ab2"):
                add(variant, pname, "ralu (composed)", solver, rn.variant(sch, solver=solver))
                add(variant, pname, "iid re-noise (gamma=0)", solver, rn.variant(sch, gamma=0.0, solver=solver))
                add(variant, pname, "no NT-matching", solver, rn.variant(no_nt, solver=solver),
                    jsd=no_nt.timestep_density_jsd())
                add(variant, pname, "random regions", solver, rn.variant(sch, regions="random", solver=solver))
                add(variant, pname, "naive late upsample", solver, rn.variant(sch, naive=True, solver=solver))
                if variant == "nonstationary":
                    add(variant, pname, "envelope regions", solver,
                        rn.variant(sch, regions=envelope_regions(oracle, k), solver=solver))
        if args.quick or variant != "stationary":
            continue
        # sweeps (stationary oracle, the edge-selected method): r, Z (shifts fixed), gamma
        for pname, sch in presets.items():
            for solver in ("euler", "ab2"):
                for r in (0.0, 0.1, 0.3, 0.5, 1.0):
                    s2 = sch.with_ratio(r)
                    sweeps.append({"preset": pname, "solver": solver, "param": "r", "value": r,
                                   **rn.variant(s2, solver=solver)})
                for z in (2.0, 3.0, 4.5, round(sch.z, 3), 10.0, 20.0):
                    s2 = dataclasses.replace(sch, z=z, jsd=None)
                    sweeps.append({"preset": pname, "solver": solver, "param": "Z", "value": z,
                                   "jsd": s2.timestep_density_jsd(), **rn.variant(s2, solver=solver)})
                c = sch.c
                for gname, gam in (("-c", -c), ("-c/2", -c / 2), ("0", 0.0), ("c", c), ("4c", 4 * c),
                                   ("0.25", 0.25)):
                    sweeps.append({"preset": pname, "solver": solver, "param": "gamma", "value": gam,
                                   "label": gname, **rn.variant(sch, gamma=gam, solver=solver)})
                print(f"  sweeps {pname} {solver} done", flush=True)
    return {"rows": rows, "sweeps": sweeps}


def plot(out_dir: Path, name: str, result: dict) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    rows, sweeps = result["rows"], result["sweeps"]
    variants = sorted({r["oracle"] for r in rows}, key=lambda v: v != "stationary")
    ncol = 1 + (1 if sweeps else 0)
    fig, axes = plt.subplots(len(variants), ncol, figsize=(9 * ncol, 5.5 * len(variants)), squeeze=False)
    for i, variant in enumerate(variants):
        ax = axes[i][0]
        sel = [r for r in rows if r["oracle"] == variant]
        labels = [f"{r['preset']} {r['method']} [{r['solver']}]" for r in sel]
        vals = [r["fd"] for r in sel]
        errs = [0.0 if not np.isfinite(r.get("fd_std", 0.0)) else r["fd_std"] for r in sel]
        ax.barh(range(len(sel)), vals, xerr=errs, color=["C2" if "ralu" in l else "C0" for l in labels])
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("Fréchet distance to the data law (log; floor = 'data' row)")
        ax.set_title(f"Gaussian oracle ({variant}): sample quality")
    if sweeps:
        ax = axes[0][1]
        for param, ls in (("r", "-"), ("Z", "--"), ("gamma", ":")):
            for pname in ("4x", "7x"):
                for solver in ("euler", "ab2"):
                    pts = [s for s in sweeps if s["param"] == param and s["preset"] == pname and s["solver"] == solver]
                    if not pts:
                        continue
                    xs = np.arange(len(pts))
                    ax.plot(xs, [p["fd"] for p in pts], ls, marker="o",
                            label=f"{param} sweep {pname} {solver}: " +
                            ", ".join(str(p.get("label", p["value"])) for p in pts))
        ax.set_yscale("log")
        ax.set_xlabel("sweep index (values in legend)")
        ax.set_ylabel("FD")
        ax.legend(fontsize=6)
        ax.set_title("sweeps (stationary oracle)")
        for j in range(1, len(variants)):
            axes[j][1].axis("off")
    return save_figure(fig, out_dir, name, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--samples", type=positive_int, default=None,
                    help="images per seed (x16 channels); default 500, quick 100")
    ap.add_argument("--seeds", type=positive_int, default=None, help="independent seeds per method; default 3, quick 2")
    ap.add_argument("--quick", action="store_true", help="stationary oracle only, fewer samples, no sweeps")
    args = ap.parse_args(argv)
    args.samples = args.samples or (100 if args.quick else 500)
    args.seeds = args.seeds or (2 if args.quick else 3)
    t0 = time.perf_counter()
    result = run(args)
    cols = ["oracle", "preset", "method", "solver", "calls", "fd", "fd_std", "fd_exact", "fd_mean", "fd_detail",
            "var_ratio_mean", "var_ratio_detail"]
    print()
    print_table(result["rows"], cols)
    if result["sweeps"]:
        print()
        print_table(result["sweeps"], ["preset", "solver", "param", "value", "jsd", "fd", "fd_std", "var_ratio_mean",
                                       "var_ratio_detail"])
    name = "quality_oracle_quick" if args.quick else "quality_oracle"
    presets = {n: dataclasses.asdict(get_preset("flux", n)) for n in ("4x", "7x")}
    payload = {"samples_per_seed": args.samples, "seeds": args.seeds, "channels": 16, "fine_grid": [16, 16],
               "presets": presets, "flop_model": {"image_tokens": FLUX_TOKENS, "text_tokens": FLUX_TEXT},
               "seconds": time.perf_counter() - t0, **result}
    out = Path(args.out)
    write_json(out, name, payload)
    plot(out, name, result)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return payload


if __name__ == "__main__":
    main()
