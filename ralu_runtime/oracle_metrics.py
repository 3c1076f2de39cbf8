"""Quality metrics on the Gaussian oracle, and the closed-form moments of linear samplers.

Metrics (per channel: the oracle's channels are i.i.d., samples of all channels are pooled):

* Fréchet distance between the samples' Gaussian fit ``N(mu, C)`` and the data ``N(m, S)``:
  ``|mu - m|^2 + tr C + tr S - 2 tr (S^1/2 C S^1/2)^1/2``; also restricted to the block-mean subspace
  (span of the 2x2 block averages, the part a coarse token sees) and to its orthogonal complement, the
  within-block detail subspace.
* variance ratios ``tr(P C) / tr(P S)`` in those two subspaces (1 is right; < 1 means too little variance,
  e.g. washed-out detail; > 1 too much, e.g. left-over noise).

Closed form. With a fixed region choice, every sampler here is linear: the model is affine in the state,
every solver step is linear in the state and the velocities, and the transitions copy tokens, scale them and
add Gaussian noise. So the final fine tokens are ``T xi + mu`` with ``xi ~ N(0, I)`` (the stage-1 noise and
the noise of each transition) and their covariance is ``T T^T``. :func:`ralu_moments` and
:func:`baseline_moments` propagate ``(T, mu)`` with matrices built here from the layout, and the velocity's
affine map ``v = G x + g`` computed by dense solves (not the oracle's cached eigendecompositions), so they
check the sampler and the oracle independently. Everything is float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .layout import TokenLayout
from .schedule import RaluSchedule
from .solvers import make_solver
from .threads import one_thread

__all__ = ["frechet_distance", "gaussian_fit", "subspace_bases", "evaluate_moments", "evaluate_samples",
           "data_floor", "velocity_affine", "stage_measurements", "baseline_moments", "ralu_moments",
           "naive_stage_sigmas", "noise_factor_beta"]


# ----------------------------------------------------------------------------- metrics
def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    lam, u = torch.linalg.eigh(0.5 * (s + s.T))
    return (u * lam.clamp_min(0).sqrt()) @ u.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor,
                     cov2_sqrt: torch.Tensor | None = None) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (float64)."""
    mu1, cov1, mu2, cov2 = (t.to(torch.float64) for t in (mu1, cov1, mu2, cov2))
    r = _sqrtm_psd(cov2) if cov2_sqrt is None else cov2_sqrt.to(torch.float64)
    inner = r @ cov1 @ r
    ev = torch.linalg.eigvalsh(0.5 * (inner + inner.T)).clamp_min(0)
    val = float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * ev.sqrt().sum())
    return max(val, 0.0)


def gaussian_fit(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Latents ``(n, C, H, W)`` -> pooled per-channel ``(mean (d,), unbiased covariance (d, d), samples n C)``."""
    x = latents.detach().to("cpu", torch.float64)
    x = x.reshape(-1, x.shape[-2] * x.shape[-1])
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1), x.shape[0]


def subspace_bases(oracle) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases (rows) of the block-mean subspace ``(M, d)`` and the within-block detail one ``(3M, d)``."""
    q_mean = 2.0 * oracle.block_average_matrix()                 # rows (1/2)(x_a + x_b + x_c + x_d): unit norm
    proj = torch.eye(oracle.d, dtype=torch.float64) - q_mean.T @ q_mean
    lam, u = torch.linalg.eigh(proj)
    q_detail = u[:, lam > 0.5].T
    return q_mean, q_detail


def evaluate_moments(oracle, mu: torch.Tensor, cov: torch.Tensor) -> dict:
    """FD (total, block-mean subspace, detail subspace) and variance ratios of ``N(mu, cov)`` against the data."""
    with one_thread():
        return _evaluate_moments(oracle, mu, cov)


def _evaluate_moments(oracle, mu, cov) -> dict:
    bases = getattr(oracle, "_metric_bases", None)
    if bases is None:
        q_mean, q_det = subspace_bases(oracle)
        bases = (q_mean, q_det, _sqrtm_psd(oracle.cov), _sqrtm_psd(q_mean @ oracle.cov @ q_mean.T),
                 _sqrtm_psd(q_det @ oracle.cov @ q_det.T))
        oracle._metric_bases = bases
    q_mean, q_det, s_sqrt, sm_sqrt, sd_sqrt = bases
    m, s = oracle.mean, oracle.cov
    out = {"fd": frechet_distance(mu, cov, m, s, s_sqrt)}
    for name, q, r in (("mean", q_mean, sm_sqrt), ("detail", q_det, sd_sqrt)):
        c_q, s_q = q @ cov @ q.T, q @ s @ q.T
        out[f"fd_{name}"] = frechet_distance(q @ mu, c_q, q @ m, s_q, r)
        out[f"var_ratio_{name}"] = float(torch.trace(c_q) / torch.trace(s_q))
    return out


def evaluate_samples(oracle, latents: torch.Tensor) -> dict:
    """:func:`evaluate_moments` of the Gaussian fit of sampled latents ``(n, C, H, W)``; adds ``n`` (pooled)."""
    mu, cov, n = gaussian_fit(latents)
    return {**evaluate_moments(oracle, mu, cov), "n": n}


def data_floor(oracle, n_images: int, seeds=(0, 1, 2)) -> dict:
    """FD of ``n_images`` true data samples (the metric's sampling floor): mean and std over ``seeds``."""
    vals = [evaluate_samples(oracle, oracle.sample_data(n_images, torch.Generator().manual_seed(10_000 + s)))["fd"]
            for s in seeds]
    return {"fd_mean": float(np.mean(vals)), "fd_std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "values": vals}


# ----------------------------------------------------------------------------- closed form
def velocity_affine(a: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, sigma: float):
    """Exact velocity of measurements ``y1 = A x1`` at noise level ``sigma`` as ``v = G y + g``.

    ``E[y1|y] = A m + K (y - (1 - sigma) A m)``, ``K = (1 - sigma) Sa ((1 - sigma)^2 Sa + sigma^2 I)^-1``,
    ``v = (y - E[y1|y]) / sigma``. Dense solve in float64.
    """
    sa = a @ cov @ a.T
    mu = a @ mean
    eye = torch.eye(sa.shape[0], dtype=torch.float64)
    mmat = (1.0 - sigma) ** 2 * sa + sigma**2 * eye
    k = torch.linalg.solve(mmat, (1.0 - sigma) * sa).T           # Sa M^-1 = (M^-1 Sa)^T (both symmetric)
    g_mat = (eye - k) / sigma
    g_vec = -(mu - (1.0 - sigma) * (k @ mu)) / sigma
    return g_mat, g_vec


def _fine_index(h_c: int, w_c: int, parent: torch.Tensor, q: torch.Tensor, w_f: int) -> torch.Tensor:
    pi, pj = parent // w_c, parent % w_c
    return (2 * pi + q // 2) * w_f + (2 * pj + q % 2)


def stage_measurements(oracle, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Measurement matrices of image 0 of ``layout``: stage 1 ``(M, d)``, stage 2 ``(L2, d)``, stage 3 ``(4M, d)``.

    Stage 2 order: children (q = 2 dy + dx) of the selected parents in ascending order, then the rest.
    """
    hc, wc = layout.coarse_hw
    wf = 2 * wc
    d = oracle.d
    m = hc * wc
    parents = torch.arange(m)
    a1 = torch.zeros(m, d, dtype=torch.float64)
    for q in range(4):
        a1[parents, _fine_index(hc, wc, parents, torch.full_like(parents, q), wf)] += 0.25
    sel, rest = layout.selected[0].cpu(), layout.rest[0].cpu()
    k = sel.numel()
    a2 = torch.zeros(4 * k + (m - k), d, dtype=torch.float64)
    for j, p in enumerate(sel.tolist()):
        for q in range(4):
            a2[4 * j + q, int(_fine_index(hc, wc, torch.tensor(p), torch.tensor(q), wf))] = 1.0
    a2[4 * k:] = a1[rest]
    a3 = torch.eye(4 * m, dtype=torch.float64)
    return a1, a2, a3


def noise_factor_beta(gamma: float) -> float:
    """``beta`` with ``(I + beta J)(I + beta J)^T = I + gamma J`` for 4x4 all-ones J (needs gamma >= -1/4)."""
    if gamma < -0.25 - 1e-12:
        raise ValueError(f"gamma={gamma} < -1/4: I + gamma J is not a covariance")
    return (-1.0 + math.sqrt(max(1.0 + 4.0 * gamma, 0.0))) / 4.0


def naive_stage_sigmas(schedule: RaluSchedule, k: int) -> np.ndarray:
    """Stage ``k`` sigmas of a sampler that upsamples without re-noising: stage k runs from ``e_{k-1}`` (not
    ``s_k``) to ``e_k`` with the schedule's shift and step count, spaced like :meth:`RaluSchedule.stage_sigmas`."""
    h = schedule.shifts[k]
    hi = 1.0 if k == 0 else 1.0 - schedule.ends[k - 1]
    lo = 1.0 - schedule.ends[k]
    unshift = lambda s: s / (h - (h - 1.0) * s)  # noqa: E731
    sig = np.linspace(unshift(hi), unshift(lo), schedule.steps[k] + 1)
    sig = h * sig / (1.0 + (h - 1.0) * sig)
    sig[0], sig[-1] = hi, lo
    return sig


def _run_linear_stage(t: torch.Tensor, mu: torch.Tensor, a: torch.Tensor, oracle, sigmas, solver: str):
    """Propagate ``x = T xi + mu`` through one stage. Euler is written out here; other solvers are driven
    through their own ``step`` on the stacked columns ``[T | mu]`` (valid because they are linear)."""
    sig = [float(s) for s in sigmas]
    if solver == "euler":
        for i in range(len(sig) - 1):
            g_mat, g_vec = velocity_affine(a, oracle.mean, oracle.cov, sig[i])
            dt = sig[i + 1] - sig[i]
            t, mu = t + dt * (g_mat @ t), mu + dt * (g_mat @ mu + g_vec)
        return t, mu
    st = make_solver(solver, torch.tensor(sig, dtype=torch.float64))
    x = torch.cat([t, mu[:, None]], dim=1)[None]                  # (1, L, D + 1)
    for i in range(len(sig) - 1):
        g_mat, g_vec = velocity_affine(a, oracle.mean, oracle.cov, sig[i])
        v = g_mat @ x[0]
        v[:, -1] += g_vec
        x = st.step(i, x, v[None])
    return x[0, :, :-1], x[0, :, -1]


def baseline_moments(oracle, sigmas, solver: str = "euler") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(mean (d,), cov (d, d))`` of full-resolution sampling from N(0, I) over ``sigmas``."""
    with one_thread():
        t = torch.eye(oracle.d, dtype=torch.float64)
        mu = torch.zeros(oracle.d, dtype=torch.float64)
        t, mu = _run_linear_stage(t, mu, torch.eye(oracle.d, dtype=torch.float64), oracle, sigmas, solver)
        return mu, t @ t.T


def _transition(t, mu, tmap, a: float, b: float, gamma: float, kept_var: float):
    """``x' = a x[src] + b n``; children of one group: cov I + gamma J; copied tokens: kept_var I. New columns."""
    src = tmap.src_index[0].long().cpu()
    child = tmap.child[0].long().cpu()
    group = tmap.group[0].long().cpu()
    t_new, mu_new = a * t[src], a * mu[src]
    if b == 0.0:
        return t_new, mu_new
    n = src.numel()
    r = torch.zeros(n, n, dtype=torch.float64)
    is_child = child >= 0
    r[~is_child, ~is_child] = math.sqrt(kept_var)
    beta = noise_factor_beta(gamma)
    ci = torch.nonzero(is_child).flatten()
    same = group[ci][:, None] == group[ci][None, :]
    r[ci[:, None], ci[None, :]] = torch.eye(ci.numel(), dtype=torch.float64) + beta * same.double()
    return torch.cat([t_new, b * r], dim=1), mu_new


def ralu_moments(oracle, schedule: RaluSchedule, selected: torch.Tensor, *, gamma: float | None = None,
                 kept_noise: str = "reference", naive: bool = False, solver: str = "euler"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(mean (d,), cov (d, d))`` of the final fine tokens of RALU with a fixed region choice.

    selected: ``(k,)`` coarse raster indices upsampled at the end of stage 1 (the same for every image).
    gamma: within-group covariance ``I + gamma J`` of the children's noise (default ``-c``: RALU's).
    kept_noise: "reference" (``N(0, I)`` for tokens not upsampled at a boundary) or "exact" (``N(0, (1-c) I)``).
    naive: upsample by copying without re-noising (``a = 1, b = 0``), stage k+1 starting at ``e_k``.
    """
    with one_thread():
        return _ralu_moments(oracle, schedule, selected, gamma, kept_noise, naive, solver)


def _ralu_moments(oracle, schedule, selected, gamma, kept_noise, naive, solver):
    c = schedule.c
    gamma = -c if gamma is None else gamma
    kept_var = {"reference": 1.0, "exact": 1.0 - c}[kept_noise]
    layout = TokenLayout(schedule_coarse_hw(oracle), selected.view(1, -1).long())
    mats = stage_measurements(oracle, layout)
    maps = (layout.transition_12(), layout.transition_23())
    m = layout.num_coarse
    t = torch.eye(m, dtype=torch.float64)
    mu = torch.zeros(m, dtype=torch.float64)
    for k in range(3):
        if k > 0:
            bd = schedule.boundary(k - 1)
            a, b = (1.0, 0.0) if naive else (bd.a, bd.b)
            t, mu = _transition(t, mu, maps[k - 1], a, b, gamma, kept_var)
        sig = naive_stage_sigmas(schedule, k) if naive else schedule.stage_sigmas(k)
        # float32 rounding as the sampler's sigmas
        sig = torch.tensor(sig, dtype=torch.float32).double().numpy()
        t, mu = _run_linear_stage(t, mu, mats[k], oracle, sig, solver)
    return mu, t @ t.T


def schedule_coarse_hw(oracle) -> tuple[int, int]:
    return oracle.coarse_hw
