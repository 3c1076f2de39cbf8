"""Sample quality of RALU on video, on the Gaussian video oracle (exact velocity, known data law).

Oracle: :class:`~ralu_runtime.adapters.oracle_video.GaussianVideoOracle`, 4 latent frames of 8x8 fine tokens
(256 fine tokens per channel, 16 i.i.d. channels; coarse grid 4x4 per frame), temporal AR(1) correlation
``rho = 0.9``; "nonstationary-moving" (the image oracle's texture envelope, ~40x contrast in detail energy, and the
content translating by (0.5, -1) latent pixels per frame) and "stationary" (no motion). Every method draws
``--samples`` clips per seed for ``--seeds`` seeds; the metric is the Fréchet distance (FD) between the samples'
Gaussian fit and the data law over the 256 space-time fine tokens of a channel (mean +- std over seeds; "data
(floor)" is the FD of as many true data clips). Linear samplers (the baselines, RALU with fixed regions, the
composed time-halving sampler with fixed regions) also get the exact FD of their closed-form law (``fd_exact``).

Cost model (video DiTs: tens of thousands of video tokens, text negligible): a step costs its token count,
measured in full-resolution steps ("cost", with the number ``k`` of coarse tokens actually upsampled at ``e_1``);
"speedup" = 50 / cost. FLUX's "4x" / "7x" presets then cost 11.1 / 6.48 full steps (4.50x / 7.72x). Methods, for
each preset (sampled: Canny-selected regions, mean +- std over seeds; "oracle regions": the closed-form law of
the linear sampler with the regions of largest within-block detail variance of the data law, no Canny noise):

* ``baseline-50``, ``baseline-N (=FLOPs)``: Euler at full resolution, N = round(preset cost);
* ``ralu``: :func:`ralu_runtime.generate` with ``region_mode`` "clip" (the same spatial blocks upsampled in every
  frame, edge scores summed over frames) and "frame" (top-k over all frames). Clip mode rounds ``k`` per frame
  (``int(16 r) * 4`` vs ``int(64 r)``: 16 vs 19 tokens at 4x, 4 vs 6 at 7x), so the oracle-region rows also
  compare both modes at the clip's ``k``;
* ``r=0`` / ``r=1``: uniform low resolution, then everything upsampled at once (at ``e_2`` for r = 0, at ``e_1``
  for r = 1), through ``generate`` (linear: exact FD too). "(preset steps)" keeps the preset's steps; "(=FLOPs)"
  keeps N_1, N_3 and the ends and sets N_2 to the integer whose cost is closest to the preset's (r = 0: a stage-2
  step costs 1/4, r = 1: 1), with (shifts, Z) re-solved by NT-Matching for the new steps, or kept ("preset h/Z");
* ``time/2``: stage 1 also halves time (each stage-1 token averages 2 frames x 2x2 pixels; its noise is the
  full-resolution noise's frames 0, 2, ... at pixel (0, 0) of each block), composed here from the sampler's
  public pieces (``run_stage``, ``select_regions``, ``TokenLayout``) with the transition written in torch: at
  ``e_1`` every stage-1 token is copied to its 2 frames, the selected ones also to their 4 spatial children, and
  each group of copies of one stage-1 token (8 or 2 tokens) gets RALU's correlated noise ``I - c J`` (needs
  ``c <= 1/8``, i.e. Z >= 2 sqrt 2); stages 2 and 3 are RALU's. "(same steps)" is cheaper than the preset
  (stage 1 costs 1/8 per step); "(2N1 =FLOPs)" doubles N_1 (exactly the preset's cost) with (shifts, Z) re-solved
  (Z >= 2 sqrt 2) or kept; two controls separate the effect of the schedule from that of halving time: "time
  kept, N1 with 2N1's h/Z" (the preset's steps and cost with the re-solved shifts and Z) and "time kept, 2N1" (the
  re-solved schedule without halving time; it costs N_1 / 4 more). ``ralu composed (check)`` is
  the composed sampler with time kept, against ``generate``.

    python benchmarks/quality_oracle_video.py [--out benchmarks/results] [--samples 200] [--seeds 3] [--quick]
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
from ralu_runtime.adapters.oracle_video import GaussianVideoOracle  # noqa: E402
from ralu_runtime.layout import TokenLayout, grid_positions  # noqa: E402
from ralu_runtime.sampler import run_stage, select_regions  # noqa: E402
from ralu_runtime.schedule import RaluSchedule, get_preset, solve_nt_matching  # noqa: E402

FRAMES, SIZE, CHANNELS, RHO = 4, 8, 16, 0.9
ORACLES = {  # name -> GaussianVideoOracle keyword arguments
    "nonstationary-moving": dict(variant="nonstationary", motion=(0.5, -1.0)),
    "stationary": dict(variant="stationary"),
}
Z_MIN_TIME = 2.0 * math.sqrt(2.0)  # c = 1/Z^2 <= 1/8: I - c J is a covariance for groups of 8 copies


# ----------------------------------------------------------------------------- cost model and schedules
def stage_token_fractions(ratio: float, time_factor: int = 1, k: int | None = None,
                          m: int | None = None) -> tuple[float, float, float]:
    """Tokens per step of each stage as a fraction of the full-resolution token count (stage 2 with ``k`` of ``m``
    coarse tokens upsampled when given, else ``r = ratio``)."""
    r = ratio if k is None else k / m
    return (0.25 / time_factor, 0.25 * (1.0 - r) + r, 1.0)


def cost(schedule: RaluSchedule, time_factor: int = 1, k: int | None = None, m: int | None = None) -> float:
    """Cost in full-resolution steps (per-step cost linear in the token count, text tokens neglected)."""
    frac = stage_token_fractions(schedule.ratio, time_factor, k, m)
    return float(sum(n * f for n, f in zip(schedule.steps, frac)))


def solve(steps, ends, ratio: float, z_min: float = 2.0) -> RaluSchedule:
    """NT-Matching for new step counts (base shift 3, FLUX's); with ``z_min`` > 2 the same objective is minimised
    with Z >= z_min (L-BFGS-B, h in [0.5, 10]) through the public :meth:`RaluSchedule.timestep_density_jsd`."""
    sch = solve_nt_matching(tuple(steps), tuple(ends), 3.0, ratio=ratio)
    if sch.z >= z_min:
        return sch
    from scipy.optimize import minimize

    def jsd(x):
        return RaluSchedule(tuple(steps), tuple(ends), tuple(x[:3]), float(x[3]), ratio).timestep_density_jsd()

    res = minimize(jsd, np.array([3.0, 3.0, 3.0, z_min + 0.5]), bounds=[(0.5, 10.0)] * 3 + [(z_min, 100.0)])
    x = [float(v) for v in res.x]
    out = RaluSchedule(tuple(steps), tuple(ends), tuple(x[:3]), x[3], ratio)
    return dataclasses.replace(out, jsd=out.timestep_density_jsd())


def flop_matched_uniform(preset: RaluSchedule, ratio: float, resolve: bool = True) -> RaluSchedule:
    """Keep N_1, N_3 and the ends; N_2 >= 1 with the cost closest to the preset's; (shifts, Z) re-solved by
    NT-Matching (``resolve``) or the preset's."""
    target = cost(preset)
    n1, _, n3 = preset.steps
    frac = stage_token_fractions(ratio)
    n2 = max(1, round((target - n1 * frac[0] - n3) / frac[1]))
    if resolve:
        return solve((n1, n2, n3), preset.ends, ratio)
    return dataclasses.replace(preset, steps=(n1, n2, n3), ratio=ratio, jsd=None, name=None)


def region_k(oracle, ratio: float, region_mode: str, time_factor: int = 1) -> int:
    """Coarse tokens of the stage-1 grid upsampled at e_1 (the sampler's rule: clip mode rounds per frame)."""
    per = (oracle.h // 2) * (oracle.w // 2)
    f1 = oracle.F // time_factor
    return int(per * ratio) * f1 if region_mode == "clip" else int(f1 * per * ratio)


# ----------------------------------------------------------------------------- composed sampler
def renoise(x: torch.Tensor, src: torch.Tensor, group: torch.Tensor, a: float, b: float, c: float, kept_var: float,
            generator: torch.Generator) -> torch.Tensor:
    """``x' = a x[src] + b n``: tokens of one ``group`` (copies of one source token, ``s`` of them) get noise
    covariance ``I - c J`` (``n = u + beta sum_group u``, ``beta = (sqrt(1 - s c) - 1) / s``); a token alone in its
    group (copied, not upsampled) gets ``kept_var I`` (1: RALU's reference noise)."""
    bsz, _, ch = x.shape
    xs = torch.gather(x, 1, src.long()[..., None].expand(-1, -1, ch)).to(torch.float32)
    grp = group.long()
    ng = int(grp.max()) + 1
    size = torch.zeros(bsz, ng).scatter_add_(1, grp, torch.ones(grp.shape))
    s = torch.gather(size, 1, grp)                                                    # group size of each token
    if float((s * c).max()) > 1.0 + 1e-9:
        raise ValueError(f"c = {c:.4f} is too large for groups of {int(s.max())} copies (need c <= 1/size)")
    u = torch.randn(xs.shape, generator=generator, dtype=torch.float32)
    gsum = torch.zeros(bsz, ng, ch).scatter_add_(1, grp[..., None].expand(-1, -1, ch), u)
    beta = (torch.sqrt((1.0 - s * c).clamp_min(0.0)) - 1.0) / s
    n = torch.where((s > 1)[..., None], u + beta[..., None] * torch.gather(gsum, 1, grp[..., None].expand(-1, -1, ch)),
                    math.sqrt(kept_var) * u)
    return (a * xs + b * n).to(x.dtype)


def stage_maps(oracle: GaussianVideoOracle, sel1: torch.Tensor, time_factor: int):
    """Layout of a clip batch whose stage 1 averages ``time_factor`` frames: ``sel1 (B, k1)`` selected stage-1
    tokens -> ``(layout, src1 (B, L2), pos2 (B, L2, 2))``: the full-time coarse layout (each selected stage-1 token's
    ``time_factor`` frames selected), the stage-1 token each stage-2 token copies (its noise group), and the stage-2
    positions (children at parent + {0, 0.5}^2)."""
    tf = time_factor
    per = (oracle.h // 2) * (oracle.w // 2)
    sel = ((sel1 // per)[..., None] * tf + torch.arange(tf)) * per + (sel1 % per)[..., None]
    layout = TokenLayout(oracle.coarse_hw, sel.reshape(sel1.shape[0], -1))
    parent = layout.stage2_parent()
    src1 = (parent // per // tf) * per + parent % per
    q = layout.transition_12().child.long()
    off = torch.stack([q // 2, q % 2], -1).float() * 0.5 * (q[..., None] >= 0)
    return layout, src1, grid_positions(*oracle.coarse_hw)[parent] + off


def _stage(oracle, x, grid, sig: np.ndarray):
    sigmas = torch.tensor(sig, dtype=torch.float32)
    return run_stage(oracle, x, grid, sigmas[:-1] * 1000.0, sigmas, Conditioning(x.shape[0], {}), progress=False)


def sample_composed(oracle: GaussianVideoOracle, schedule: RaluSchedule, n: int, seed: int, *, time_factor: int = 2,
                    region_mode: str = "frame") -> torch.Tensor:
    """RALU on video whose stage 1 also averages ``time_factor`` frames (1: plain RALU, composed); clips
    ``(n, C, F, h, w)``. All randomness from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    hh, ww = oracle.image_size
    noise = oracle.prepare_noise(n, hh, ww, g, oracle.dtype)
    f, tf = oracle.F, time_factor
    f1 = f // tf
    coarse1 = (f1 * (oracle.h // 2), oracle.w // 2)
    coarse, fine = oracle.coarse_hw, oracle.fine_hw

    # stage 1: (F / tf) frames of (h/2, w/2)
    x = oracle.pack(noise[:, :, ::tf, ::2, ::2].contiguous())
    sig = schedule.stage_sigmas(0)
    x, v = _stage(oracle, x, TokenGrid(grid_positions(*coarse1).expand(n, -1, -1), coarse1, None, raster=True,
                                       frames=f1), sig)
    m1 = coarse1[0] * coarse1[1]
    k1 = region_k(oracle, schedule.ratio, region_mode, tf)
    if 0 < k1 < m1:
        sel1 = select_regions(oracle, x, v, float(np.float32(sig[-1])), (oracle.h, oracle.w), k1, [g] * n,
                              edge_map="unit", edge_detector="opencv", frames=f1, region_mode=region_mode)
    else:
        sel1 = torch.arange(m1).expand(n, m1)[:, :k1]
    layout, src1, pos = stage_maps(oracle, sel1, tf)
    # transition 1 -> 2: the copies of one stage-1 token form one noise group
    bd = schedule.boundary(0)
    x = renoise(x, src1, src1, bd.a, bd.b, bd.c, 1.0, g)
    x, v = _stage(oracle, x, TokenGrid(pos, coarse, layout.stage2_fine_mask(), frames=f), schedule.stage_sigmas(1))
    # transition 2 -> 3 (RALU's), fine raster order
    t23 = layout.transition_23()
    bd = schedule.boundary(1)
    x = renoise(x, t23.src_index, t23.group, bd.a, bd.b, bd.c, 1.0, g)
    x, _ = _stage(oracle, x, TokenGrid(grid_positions(*fine).expand(n, -1, -1), fine, None, raster=True, frames=f),
                  schedule.stage_sigmas(2))
    return oracle.unpack(x, oracle.h, oracle.w)


def _noise_factor(src: torch.Tensor, group: torch.Tensor, c: float, kept_var: float) -> torch.Tensor:
    """``R (L, L)`` with ``R R^T`` the covariance of :func:`renoise`'s noise for one clip's maps."""
    grp = group.long()
    same = (grp[:, None] == grp[None, :]).double()
    s = same.sum(1)
    beta = (torch.sqrt((1.0 - s * c).clamp_min(0.0)) - 1.0) / s
    lone = torch.diag((s == 1).double() * math.sqrt(kept_var))
    return torch.where((s > 1)[:, None], torch.eye(len(grp), dtype=torch.float64) + beta[:, None] * same, lone)


def composed_moments(oracle: GaussianVideoOracle, schedule: RaluSchedule, sel1: torch.Tensor, time_factor: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(mean (d,), cov (d, d))`` of :func:`sample_composed` with the fixed stage-1 selection ``sel1 (k1,)``
    (Euler; the sampler is then linear: final tokens ``T xi + mu``, propagated here with dense velocity solves)."""
    tf = time_factor
    f1 = oracle.F // tf
    coarse1 = (f1 * (oracle.h // 2), oracle.w // 2)
    layout, src1, pos2 = stage_maps(oracle, sel1.view(1, -1).long(), tf)
    t23 = layout.transition_23()
    mats = (oracle.measurement_matrix(grid_positions(*coarse1), coarse1, None, f1),
            oracle.measurement_matrix(pos2[0], oracle.coarse_hw, layout.stage2_fine_mask()[0], oracle.F),
            torch.eye(oracle.d, dtype=torch.float64))
    maps = ((src1[0], src1[0]), (t23.src_index[0].long(), t23.group[0].long()))
    t = torch.eye(mats[0].shape[0], dtype=torch.float64)
    mu = torch.zeros(mats[0].shape[0], dtype=torch.float64)
    for k in range(3):
        if k:
            bd = schedule.boundary(k - 1)
            src, grp = maps[k - 1]
            t = torch.cat([bd.a * t[src], bd.b * _noise_factor(src, grp, bd.c, 1.0)], dim=1)
            mu = bd.a * mu[src]
        sig = torch.tensor(schedule.stage_sigmas(k), dtype=torch.float32).double().tolist()
        for i in range(len(sig) - 1):
            g_mat, g_vec = om.velocity_affine(mats[k], oracle.mean, oracle.cov, sig[i])
            dt = sig[i + 1] - sig[i]
            t, mu = t + dt * (g_mat @ t), mu + dt * (g_mat @ mu + g_vec)
    return mu, t @ t.T


def oracle_regions(oracle: GaussianVideoOracle, ratio: float, region_mode: str, time_factor: int = 1,
                   k: int | None = None) -> torch.Tensor:
    """Stage-1 tokens (raster of the stage-1 grid: ``F / time_factor`` frames) with the most within-block detail
    variance of the data law (summed over the frames a token covers): the top ``k`` (default the sampler's
    ``int(M1 r)``) over all frames ("frame"), or the top ``int(per r)`` blocks of the variance summed over frames in
    every frame ("clip")."""
    a = oracle.block_average_matrix()
    s = oracle.cov
    det = (a > 0).double() @ torch.diagonal(s) - 4.0 * torch.diagonal(a @ s @ a.T)      # (M,) tall coarse
    per = (oracle.h // 2) * (oracle.w // 2)
    f1 = oracle.F // time_factor
    det = det.view(f1, time_factor, per).sum(1)
    if region_mode == "frame":
        k = region_k(oracle, ratio, "frame", time_factor) if k is None else k
        return torch.sort(torch.topk(det.flatten(), k).indices).values
    blocks = torch.topk(det.sum(0), int(per * ratio)).indices
    return torch.sort((torch.arange(f1)[:, None] * per + blocks).flatten()).values


# ----------------------------------------------------------------------------- benchmark
def _summ(evals: list[dict]) -> dict:
    out = {}
    for key in ("fd", "fd_mean", "fd_detail", "var_ratio_mean", "var_ratio_detail"):
        vals = [e[key] for e in evals]
        out[key] = float(np.mean(vals))
        out[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
    out["per_seed"] = [e["fd"] for e in evals]
    return out


class Runner:
    def __init__(self, oracle: GaussianVideoOracle, n: int, seeds: list[int]):
        self.o, self.n, self.seeds = oracle, n, seeds

    def evaluate(self, clips: torch.Tensor) -> dict:
        return om.evaluate_samples(self.o, self.o.tall(clips))

    def floor(self) -> dict:
        return _summ([self.evaluate(self.o.sample_data(self.n, torch.Generator().manual_seed(10_000 + s)))
                      for s in self.seeds])

    def baseline(self, steps: int) -> dict:
        from ralu_runtime import generate

        hh, ww = self.o.image_size
        evals = [self.evaluate(generate(self.o, [""] * self.n, height=hh, width=ww, num_frames=self.o.F,
                                        speedup=None, num_inference_steps=steps, seed=s, output_type="latent",
                                        progress=False).images) for s in self.seeds]
        _, sig = self.o.baseline_schedule(steps)
        exact = om.evaluate_moments(self.o, *om.baseline_moments(self.o, sig.double().numpy()))
        return {**_summ(evals), "fd_exact": exact["fd"]}

    def ralu(self, schedule: RaluSchedule, region_mode: str, region_source: str = "decode") -> dict:
        from ralu_runtime import generate

        hh, ww = self.o.image_size
        evals = [self.evaluate(generate(self.o, [""] * self.n, height=hh, width=ww, num_frames=self.o.F,
                                        speedup=schedule, region_mode=region_mode, region_source=region_source,
                                        seed=s, output_type="latent", progress=False).images) for s in self.seeds]
        row = _summ(evals)
        m = self.o.coarse_hw[0] * self.o.coarse_hw[1]
        if schedule.ratio in (0.0, 1.0):  # no region choice: a linear sampler with a closed form
            sel = torch.arange(m)[: int(m * schedule.ratio)]
            row["fd_exact"] = om.evaluate_moments(self.o, *om.ralu_moments(self.o, schedule, sel))["fd"]
        return row

    def composed(self, schedule: RaluSchedule, region_mode: str, time_factor: int) -> dict:
        return _summ([self.evaluate(sample_composed(self.o, schedule, self.n, s, time_factor=time_factor,
                                                    region_mode=region_mode)) for s in self.seeds])

    def exact(self, schedule: RaluSchedule, sel1: torch.Tensor, time_factor: int = 1) -> dict:
        if time_factor == 1:
            mu, cov = om.ralu_moments(self.o, schedule, sel1)
        else:
            mu, cov = composed_moments(self.o, schedule, sel1, time_factor)
        ev = om.evaluate_moments(self.o, mu, cov)
        return {**ev, "fd_exact": ev["fd"], "fd_std": 0.0}


def run(args) -> dict:
    torch.set_num_threads(1)  # small batched linear algebra: one thread is fastest on a shared CPU
    names = ("7x",) if args.quick else ("4x", "7x")
    presets = {name: get_preset("flux", name) for name in names}
    seeds = list(range(args.seeds))
    oracles = ("nonstationary-moving",) if args.quick else tuple(ORACLES)
    rows = []
    schedules = {}

    def add(oracle, preset, method, region, row, sch=None, time_factor=1, calls=None, k=None):
        m = FRAMES * (SIZE // 2) ** 2
        c = cost(sch, time_factor, k, m) if sch is not None else float(calls)
        rec = {"oracle": oracle, "preset": preset, "method": method, "region": region,
               "calls": sch.total_steps if sch is not None else calls, "k": k, "cost": c, "speedup": 50.0 / c, **row}
        rows.append(rec)
        print(f"  {oracle:20s} {preset:4s} {method:30s} {region:6s} cost {c:5.2f}  FD {rec['fd']:.3f} +- "
              f"{rec['fd_std']:.3f}" + (f"  exact {rec['fd_exact']:.3f}" if "fd_exact" in rec else ""), flush=True)

    for oname in oracles:
        o = GaussianVideoOracle(SIZE, FRAMES, CHANNELS, rho=RHO, **ORACLES[oname])
        m = o.coarse_hw[0] * o.coarse_hw[1]
        rn = Runner(o, args.samples, seeds)
        rows.append({"oracle": oname, "preset": "-", "method": "data (floor)", "region": "-", "calls": 0, "cost": 0.0,
                     "fd_exact": 0.0, **rn.floor()})
        add(oname, "-", "baseline-50", "-", rn.baseline(50), calls=50)
        for pname, sch in presets.items():
            n_eq = max(1, round(cost(sch)))
            add(oname, pname, f"baseline-{n_eq} (=FLOPs)", "-", rn.baseline(n_eq), calls=n_eq)
            # regions per frame vs per clip: sampled (edges, generate) and exact (oracle regions, also at equal k)
            k_clip, k_frame = region_k(o, sch.ratio, "clip"), region_k(o, sch.ratio, "frame")
            for mode, k in (("clip", k_clip), ("frame", k_frame)):
                add(oname, pname, "ralu", mode, rn.ralu(sch, mode), sch, k=k)
            if not args.quick:
                add(oname, pname, "ralu composed (check)", "frame", rn.composed(sch, "frame", 1), sch, k=k_frame)
            for mode, k, label in (("clip", k_clip, ""), ("frame", k_clip, " k=clip's"), ("frame", k_frame, "")):
                add(oname, pname, "ralu, oracle regions" + label, mode,
                    rn.exact(sch, oracle_regions(o, sch.ratio, mode, k=k)), sch, k=k)
            # uniform resolution: r = 0 / r = 1
            for r in (0.0, 1.0):
                eq = flop_matched_uniform(sch, r)
                keep = flop_matched_uniform(sch, r, resolve=False)
                schedules[f"{pname} r={r:g} (=FLOPs)"] = dataclasses.asdict(eq)
                sel = torch.arange(m)[: int(m * r)]
                add(oname, pname, f"r={r:g} (preset steps)", "-", rn.exact(sch.with_ratio(r), sel), sch.with_ratio(r),
                    k=int(m * r))
                add(oname, pname, f"r={r:g} (=FLOPs)", "-", rn.ralu(eq, "frame"), eq, k=int(m * r))
                add(oname, pname, f"r={r:g} (=FLOPs, preset h/Z)", "-", rn.exact(keep, sel), keep, k=int(m * r))
            # halving time in stage 1
            st2 = (2 * sch.steps[0],) + sch.steps[1:]
            eq_t = solve(st2, sch.ends, sch.ratio, Z_MIN_TIME)
            keep_t = dataclasses.replace(sch, steps=st2, jsd=None, name=None)
            schedules[f"{pname} 2N1 (=FLOPs with time/2)"] = dataclasses.asdict(eq_t)
            for mode in ("clip", "frame"):
                k2 = 2 * region_k(o, sch.ratio, mode, 2)
                add(oname, pname, "time/2 (same steps)", mode, rn.composed(sch, mode, 2), sch, 2, k=k2)
                add(oname, pname, "time/2 (2N1 =FLOPs)", mode, rn.composed(eq_t, mode, 2), eq_t, 2, k=k2)
            k2 = 2 * region_k(o, sch.ratio, "frame", 2)
            for label, sc, tf in (("time kept, oracle regions", sch, 1), ("time/2, oracle regions", sch, 2),
                                  ("time/2 (2N1 =FLOPs), oracle regions", eq_t, 2),
                                  ("time/2 (2N1 =FLOPs, preset h/Z), oracle regions", keep_t, 2),
                                  ("time kept, N1 with 2N1's h/Z (=FLOPs control), oracle regions",
                                   dataclasses.replace(eq_t, steps=sch.steps, jsd=None), 1),
                                  ("time kept, 2N1 (control), oracle regions", eq_t, 1)):
                k1 = region_k(o, sch.ratio, "frame", tf)
                add(oname, pname, label, "frame", rn.exact(sc, oracle_regions(o, sch.ratio, "frame", tf, k=k1), tf),
                    sc, tf, k=k1 * tf)
    return {"rows": rows, "schedules": schedules}


def plot(out_dir: Path, name: str, result: dict) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    rows = result["rows"]
    variants = list(dict.fromkeys(r["oracle"] for r in rows))
    most = max(sum(r["oracle"] == v for r in rows) for v in variants)
    fig, axes = plt.subplots(1, len(variants), figsize=(9 * len(variants), max(6.0, 0.2 * most + 1.5)),
                             squeeze=False)
    for i, variant in enumerate(variants):
        ax = axes[0][i]
        sel = [r for r in rows if r["oracle"] == variant]
        labels = [f"{r['preset']} {r['method']} [{r['region']}] {r['speedup']:.1f}x" if r["cost"] else
                  r["method"] for r in sel]
        vals = [r["fd"] for r in sel]
        errs = [0.0 if not np.isfinite(r.get("fd_std", 0.0)) else r["fd_std"] for r in sel]
        colors = ["C2" if r["method"] == "ralu" else "C3" if "time" in r["method"] else
                  "C1" if r["method"].startswith("r=") else "C4" if "oracle" in r["method"] else "C0" for r in sel]
        ax.barh(range(len(sel)), vals, xerr=errs, color=colors)
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("Fréchet distance to the data law (log; floor = 'data' row)")
        ax.set_title(f"Gaussian video oracle ({variant}, {FRAMES} frames of {SIZE}x{SIZE})")
    return save_figure(fig, out_dir, name, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--samples", type=positive_int, default=None,
                    help="clips per seed (x16 channels); default 200, quick 24")
    ap.add_argument("--seeds", type=positive_int, default=None, help="independent seeds per method; default 3, quick 2")
    ap.add_argument("--quick", action="store_true", help="moving non-stationary oracle, 7x, main rows only")
    args = ap.parse_args(argv)
    args.samples = args.samples or (24 if args.quick else 200)
    args.seeds = args.seeds or (2 if args.quick else 3)
    t0 = time.perf_counter()
    result = run(args)
    cols = ["oracle", "preset", "method", "region", "calls", "cost", "speedup", "fd", "fd_std", "fd_exact",
            "fd_mean", "fd_detail", "var_ratio_mean", "var_ratio_detail"]
    print()
    print_table(result["rows"], cols)
    name = "quality_oracle_video_quick" if args.quick else "quality_oracle_video"
    presets = {n: dataclasses.asdict(get_preset("flux", n)) for n in ("4x", "7x")}
    payload = {"samples_per_seed": args.samples, "seeds": args.seeds, "channels": CHANNELS, "frames": FRAMES,
               "fine_grid_per_frame": [SIZE, SIZE], "rho": RHO, "oracles": ORACLES, "presets": presets,
               "cost_model": "tokens per step / full-resolution tokens, text neglected; baseline 50 steps",
               "seconds": time.perf_counter() - t0, **result}
    out = Path(args.out)
    write_json(out, name, payload)
    plot(out, name, result)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return payload


if __name__ == "__main__":
    main()
