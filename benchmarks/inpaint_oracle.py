"""Inpainting on the Gaussian oracle: mask-first against edge-only region choice at equal FLOPs (issue 23).

The RALU inpainting path (:func:`ralu_runtime.editing.sample_ralu_edit`, the pipelines' blend in every stage) runs
on :class:`~ralu_runtime.adapters.oracle.GaussianOracle` (exact velocity, non-stationary variant: a textured
region and a quiet one; 16x16 fine latent tokens, 8x8 coarse, 4 i.i.d. channels, patch 1) with a user mask, twice
per case with the same noise and generators:

* ``mask-first`` (the default): masked coarse tokens dilated by one block are upsampled first, edges order the rest;
* ``edge-only``: the mask is ignored for the region choice (``region_choice="edge-only"``).

Both use the same schedule (a FLUX preset, NT-Matching solved by :func:`ralu_runtime.get_preset`) and the same
number ``k = int(M r)`` of upsampled tokens, so the same model calls at the same token counts: equal FLOPs. Region
choice only acts when stage 1 or 2 runs, i.e. at high strength; the start sigma is the pipeline's (the oracle's
28-step shift-3 schedule at the strength).

Reference ("exact oracle sample"): the same inpainting process (blend after every step with the same noise) at full
resolution with ``--ref-steps`` Euler steps from the same start: the converged trajectory the samplers approximate.
Metrics per case, averaged over ``--samples`` noises x channels: RMSE to the reference inside the mask (``rmse_in``),
on the mask's seam (masked pixels with an unmasked 8-neighbour, ``rmse_seam``) and outside (``rmse_out``: 0 by
construction, the last blend puts the source back), the Fréchet distance inside the mask to the exact conditional
law of the masked pixels given the source's kept ones (``fd_in``; the reference's own in ``ref_fd_in``: the blend
is not an exact posterior sampler), and the share of the dilated mask's coarse tokens upsampled first
(``coverage``). Cases: ``--seeds`` sources x 4 masks x strengths (1.0: stage 1 runs; 0.85: stage 2 is the 7x
preset's entry) x presets (4x, 7x).

    python benchmarks/inpaint_oracle.py [--out benchmarks/results] [--samples 32] [--seeds 3] [--quick]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import positive_int, print_table, pyplot, save_figure, write_json  # noqa: E402
from ralu_runtime import oracle_metrics as om  # noqa: E402
from ralu_runtime.adapters.base import Conditioning, TokenGrid  # noqa: E402
from ralu_runtime.adapters.oracle import GaussianOracle  # noqa: E402
from ralu_runtime.editing import (INPAINT_REGION_CHOICES, EditSpec, _blend, edit_stages, mask_boost,  # noqa: E402
                                  noised, sample_ralu_edit, start_index)
from ralu_runtime.layout import grid_positions  # noqa: E402
from ralu_runtime.sampler import run_stage  # noqa: E402
from ralu_runtime.schedule import get_preset  # noqa: E402
from ralu_runtime.threads import one_thread  # noqa: E402

STRENGTHS = (1.0, 0.85)
PRESETS = ("4x", "7x")
PIPELINE_STEPS = 28  # the inpainting pipeline's default steps: its schedule gives sigma* for a strength


def masks(h: int, w: int) -> dict[str, torch.Tensor]:
    """Named latent masks ``(1, 1, h, w)`` float32 (1 = repaint), in fractions of the grid: a square on the textured
    region (the non-stationary envelope's peak), one on the quiet region, a horizontal strip, an off-block square."""
    def box(r0, r1, c0, c1):
        m = torch.zeros(1, 1, h, w)
        rows, cols = int(r0 * h), int(c0 * w)
        m[..., rows:max(rows + 1, math.ceil(r1 * h)), cols:max(cols + 1, math.ceil(c1 * w))] = 1
        return m
    return {"busy-square": box(0.1875, 0.5625, 0.5, 0.875), "quiet-square": box(0.625, 1.0, 0.0, 0.375),
            "strip": box(0.4375, 0.5625, 0.0, 1.0), "off-block": box(0.3125, 0.625, 0.1875, 0.5)}


def pipeline_sigma(oracle: GaussianOracle, strength: float, steps: int = PIPELINE_STEPS) -> float:
    """sigma* of the pipeline's ``steps``-step schedule (the oracle's, shift 3) at ``strength``."""
    return float(oracle.baseline_schedule(steps)[1][start_index(steps, strength)])


def reference(oracle: GaussianOracle, src: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, sigma: float,
              steps: int) -> torch.Tensor:
    """The converged inpainting sample: ``steps`` Euler steps at full resolution from ``sigma* n + (1 - sigma*) z``,
    sigmas uniform in the unshifted sigma (shift 3) from sigma* to 0, the pipeline's blend after every step.
    ``src`` ``(B, C, h, w)``, ``noise`` same, ``mask`` ``(B, 1, h, w)``; returns ``(B, C, h, w)`` float32."""
    h = oracle.base_shift
    u0 = sigma / (h - (h - 1.0) * sigma)
    u = np.linspace(u0, 0.0, steps + 1)
    sig = torch.tensor(h * u / (1.0 + (h - 1.0) * u), dtype=torch.float32)
    sig[0] = sigma
    b, c = noise.shape[:2]
    n, z = oracle.pack(noise), oracle.pack(src)
    m = oracle.pack(mask.expand(-1, c, -1, -1).contiguous())
    x = noised(z, n, sig[0])
    grid = TokenGrid(grid_positions(*oracle.fine_hw).expand(b, -1, -1), oracle.fine_hw, None, raster=True)
    x, _ = run_stage(oracle, x, grid, sig[:-1] * 1000.0, sig, Conditioning(b, {}), progress=False,
                     after_step=_blend(m, lambda s: noised(z, n, s), sig))
    return oracle.unpack(x, *oracle.fine_hw)


def conditional_law(oracle: GaussianOracle, src: torch.Tensor, mask: torch.Tensor):
    """Exact law of the masked fine pixels given the kept ones, per channel: means ``(C, q)`` and the shared
    covariance ``(q, q)`` float64 (``src`` ``(1, C, h, w)``, ``mask`` ``(1, 1, h, w)``, ``q`` masked pixels)."""
    keep = mask.flatten().bool().logical_not()
    s, m = oracle.cov, oracle.mean
    sk = s[keep][:, keep] + 1e-9 * torch.eye(int(keep.sum()), dtype=torch.float64)
    smk = s[~keep][:, keep]
    gain = torch.linalg.solve(sk, smk.T).T                                   # (q, d_keep)
    xk = src.to(torch.float64).flatten(2)[0][:, keep]                        # (C, d_keep)
    mu = m[~keep] + (xk - m[keep]) @ gain.T                                  # (C, q)
    cov = s[~keep][:, ~keep] - gain @ smk.T
    return mu, 0.5 * (cov + cov.T)


def seam(mask: torch.Tensor) -> torch.Tensor:
    """Masked pixels with an unmasked 8-neighbour: ``(1, 1, h, w)`` bool."""
    keep = 1.0 - mask
    near = F.max_pool2d(F.pad(keep, (1, 1, 1, 1), value=0.0), 3, stride=1) > 0
    return near & mask.bool()


def _fd(resid: torch.Tensor, cov: torch.Tensor) -> float:
    """Fréchet distance per dimension between the Gaussian fit of residual samples ``(n, q)`` and ``N(0, cov)``."""
    q = resid.shape[1]
    mu = resid.mean(0)
    xc = resid - mu
    return om.frechet_distance(mu, xc.T @ xc / (resid.shape[0] - 1), torch.zeros(q, dtype=torch.float64), cov) / q


def metrics(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, law) -> dict:
    """``out`` / ``ref`` ``(B, C, h, w)``, ``mask`` ``(1, 1, h, w)``, ``law`` :func:`conditional_law`. RMSE to the
    same-noise reference in the mask / on its seam / outside it, and the Fréchet distance per pixel in the mask and on
    its seam to the exact conditional law (residuals from each channel's conditional mean, pooled over samples and
    channels)."""
    inside = mask.bool().expand_as(out)
    sq = (out.double() - ref.double()) ** 2
    rm = lambda sel: float(sq[sel].mean().sqrt()) if bool(sel.any()) else 0.0  # noqa: E731
    mu, cov = law
    flat = mask.flatten().bool()
    resid = (out.double().flatten(2)[:, :, flat] - mu).reshape(-1, mu.shape[1])   # (B C, q)
    on_seam = seam(mask).flatten()[flat]                                           # (q,) seam pixels among masked
    return {"rmse_in": rm(inside), "rmse_seam": rm(seam(mask).expand_as(out)), "rmse_out": rm(~inside),
            "fd_in": _fd(resid, cov), "fd_seam": _fd(resid[:, on_seam], cov[on_seam][:, on_seam])}


def coverage(layout, boost: torch.Tensor) -> float:
    """Share of the dilated mask's coarse tokens among the tokens upsampled first (mean over images); 1 when no
    region was chosen (stage 3 entry)."""
    if layout is None:
        return float("nan")
    want = boost[0] > 0
    got = torch.zeros(layout.selected.shape[0], want.numel(), dtype=torch.bool)
    got.scatter_(1, layout.selected.cpu(), True)
    return float((got & want).sum(1).double().mean() / min(int(want.sum()), layout.selected.shape[1]))


def run(samples: int, seeds: int, size: int, channels: int, ref_steps: int, strengths=STRENGTHS,
        presets=PRESETS) -> dict:
    """Every case; returns the JSON payload (``rows``: one per case and region choice)."""
    oracle = GaussianOracle(size, channels, variant="nonstationary")
    rows, refs = [], []
    cond = Conditioning(samples, {})
    for seed in range(seeds):
        src1 = oracle.sample_data(1, torch.Generator().manual_seed(1000 + seed)).to(torch.float32)
        src = src1.expand(samples, -1, -1, -1).contiguous()
        pixels = oracle.decode(src1).clamp(-1, 1)
        for mname, mask1 in masks(oracle.H, oracle.W).items():
            mask = mask1.expand(samples, -1, -1, -1).contiguous()
            law = conditional_law(oracle, src1, mask1)
            boost = mask_boost(oracle, mask1)
            for strength in strengths:
                sigma = pipeline_sigma(oracle, strength)
                noise = torch.randn(samples, channels, oracle.H, oracle.W,
                                    generator=torch.Generator().manual_seed(seed * 7919 + 17))
                ref = reference(oracle, src, noise, mask, sigma, ref_steps)
                ref_m = metrics(ref, ref, mask1, law)
                refs.append({"seed": seed, "mask": mname, "strength": strength, "fd_in": ref_m["fd_in"],
                             "fd_seam": ref_m["fd_seam"]})
                spec = EditSpec("inpaint", pixels, strength, PIPELINE_STEPS, 0.0, mask1)
                for preset in presets:
                    sched = get_preset("flux", preset)
                    entry = edit_stages(sched, sigma).entry + 1
                    for choice in INPAINT_REGION_CHOICES:
                        gens = [torch.Generator().manual_seed(10_000 * seed + i) for i in range(samples)]
                        res = sample_ralu_edit(oracle, cond, noise, src, spec, sched, sigma, gens, mask=mask,
                                               progress=False, region_choice=choice)
                        out = oracle.unpack(res.tokens, *oracle.fine_hw)
                        rows.append({"seed": seed, "mask": mname, "masked_tokens": int(mask1.sum()),
                                     "strength": strength, "sigma_start": sigma, "preset": preset,
                                     "entry_stage": entry, "k": int(oracle.coarse_hw[0] * oracle.coarse_hw[1]
                                                                    * sched.ratio),
                                     "choice": choice, "coverage": coverage(res.layout, boost),
                                     "model_calls": [[r.name, r.steps, r.tokens] for r in res.records
                                                     if r.name.startswith("stage")],
                                     "ref_fd_in": refs[-1]["fd_in"], "ref_fd_seam": refs[-1]["fd_seam"],
                                     **metrics(out, ref, mask1, law)})
    return {"shape": {"latent": [oracle.H, oracle.W], "coarse": list(oracle.coarse_hw), "channels": channels,
                      "samples": samples, "seeds": seeds, "ref_steps": ref_steps, "variant": "nonstationary",
                      "pipeline_steps": PIPELINE_STEPS},
            "rows": rows, "references": refs}


def summary(rows: list[dict]) -> list[dict]:
    """Per (strength, preset, choice): mean over masks and seeds; ``vs_mask_first``: the edge-only / mask-first
    ratio of ``rmse_in`` averaged over the paired cases."""
    out = []
    keys = sorted({(r["strength"], r["preset"]) for r in rows}, key=lambda k: (-k[0], k[1]))
    for strength, preset in keys:
        sel = [r for r in rows if r["strength"] == strength and r["preset"] == preset]
        first = {(r["seed"], r["mask"]): r for r in sel if r["choice"] == "mask-first"}
        for choice in INPAINT_REGION_CHOICES:
            rs = [r for r in sel if r["choice"] == choice]
            ratio = statistics.mean(r["rmse_in"] / first[(r["seed"], r["mask"])]["rmse_in"] for r in rs)
            per_seed = [statistics.mean(r["fd_in"] for r in rs if r["seed"] == s) for s in sorted({r["seed"]
                                                                                                    for r in rs})]
            out.append({"strength": strength, "preset": preset, "entry": rs[0]["entry_stage"], "k": rs[0]["k"],
                        "choice": choice,
                        "rmse_in": statistics.mean(r["rmse_in"] for r in rs),
                        "fd_in_sd_seeds": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                        "rmse_seam": statistics.mean(r["rmse_seam"] for r in rs),
                        "rmse_out": max(r["rmse_out"] for r in rs),
                        "fd_in": statistics.mean(r["fd_in"] for r in rs),
                        "fd_seam": statistics.mean(r["fd_seam"] for r in rs),
                        "ref_fd_in": statistics.mean(r["ref_fd_in"] for r in rs),
                        "ref_fd_seam": statistics.mean(r["ref_fd_seam"] for r in rs),
                        "fd_in_vs_mask_first": statistics.mean(r["fd_in"] / first[(r["seed"], r["mask"])]["fd_in"]
                                                               for r in rs),
                        "coverage": statistics.mean(r["coverage"] for r in rs),
                        "rmse_in_vs_mask_first": ratio,
                        "fd_in_worse_cases": sum(r["fd_in"] > first[(r["seed"], r["mask"])]["fd_in"]
                                                 for r in rs) if choice != "mask-first" else 0,
                        "cases": len(rs)})
    return out


def plot(rows: list[dict], out_dir, name: str = "inpaint_oracle") -> Path | None:
    """fd_in per mask, mask-first vs edge-only, one panel per (strength, preset)."""
    plt = pyplot()
    if plt is None:
        return None
    keys = sorted({(r["strength"], r["preset"]) for r in rows}, key=lambda k: (-k[0], k[1]))
    names = list(dict.fromkeys(r["mask"] for r in rows))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, (strength, preset) in zip(axes[0], keys):
        for j, choice in enumerate(INPAINT_REGION_CHOICES):
            vals = [statistics.mean(r["fd_in"] for r in rows if r["strength"] == strength and r["preset"] == preset
                                    and r["choice"] == choice and r["mask"] == n) for n in names]
            ax.bar(np.arange(len(names)) + 0.4 * j - 0.2, vals, 0.4, label=choice)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"strength {strength}, RALU {preset}", fontsize=9)
        ax.set_ylabel("FD per pixel to the exact conditional law, in the mask", fontsize=8)
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, out_dir, name)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--samples", type=positive_int, default=32, help="noises per case (x channels samples)")
    ap.add_argument("--seeds", type=positive_int, default=3, help="source images")
    ap.add_argument("--size", type=int, default=16, help="oracle latent side (fine tokens; even, >= 8)")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--ref-steps", type=int, default=100, help="Euler steps of the reference")
    ap.add_argument("--quick", action="store_true",
                    help="toy size for tests: 8x8 latents, 6 samples, 1 seed, 40 reference steps (over --size, "
                         "--samples, --seeds, --ref-steps); written as inpaint_oracle_quick.json / .png")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.samples, args.seeds, args.ref_steps = 8, 6, 1, 40
    for name in ("samples", "seeds", "channels", "ref_steps"):
        if getattr(args, name) < 1 or (name == "samples" and args.samples < 2):
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: need >= "
                             f"{2 if name == 'samples' else 1}")
    if args.size < 8 or args.size % 2:
        raise SystemExit(f"--size={args.size} is not allowed: need an even number >= 8")
    t0 = time.perf_counter()
    with one_thread():  # small tensors: one thread is far faster on a busy CPU
        payload = run(args.samples, args.seeds, args.size, args.channels, args.ref_steps)
    payload["seconds"] = time.perf_counter() - t0
    payload["summary"] = summary(payload["rows"])
    payload["equal_flops"] = ("both choices run the same schedule with the same k upsampled tokens: the same model "
                              "calls at the same token counts")
    print_table(payload["summary"], ["strength", "preset", "entry", "k", "choice", "coverage", "fd_in", "fd_in_sd_seeds",
                                     "fd_seam", "ref_fd_in", "ref_fd_seam", "fd_in_vs_mask_first", "fd_in_worse_cases",
                                     "rmse_in", "rmse_seam", "rmse_out", "rmse_in_vs_mask_first", "cases"])
    print(f"{payload['seconds']:.1f} s")
    name = "inpaint_oracle_quick" if args.quick else "inpaint_oracle"   # never over the committed full run
    write_json(args.out, name, {**payload, "notes": __doc__})
    plot(payload["rows"], args.out, name)
    return payload


if __name__ == "__main__":
    main()
