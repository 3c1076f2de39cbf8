"""RALU schedules: per-stage timesteps, NT-Matching solver and presets. Pure math (numpy/scipy).

Convention (the paper's): t = 0 is pure noise, t = 1 is data; diffusers' sigma = 1 - t.
Stage k (0-based here, 1-based in the paper) runs from t = s_k to t = e_k with N_k Euler steps.
At the end of stages 1 and 2 the latent is upsampled and re-noised to t = s_{k+1} < e_k
(correlated noise, c = 1 / Z^2); the per-stage shifts h_k and Z come from NT-Matching, which
makes the sampler's timestep density match the model's own shifted density (h_ori).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from .families import FAMILIES, PresetSpec

__all__ = ["Boundary", "PRESETS", "RaluSchedule", "estimate_cost_ratio", "get_preset", "jensen_shannon_distance",
           "sampler_density", "shifted_cdf", "shifted_pdf", "solve_nt_matching", "target_density",
           "truncated_pdf"]

# NT-Matching objective and search space (as in the reference implementation).
GRID_POINTS = 1000  # densities are compared on np.linspace(0, 1, GRID_POINTS)
CLIP = 1e-10        # each density is clipped below at CLIP, then normalised to sum 1
SHIFT_BOUNDS = (0.5, 10.0)
Z_BOUNDS = (2.0, 100.0)
X0 = (3.0, 3.0, 3.0, 2.0)  # start (h1, h2, h3, Z)


# ----------------------------------------------------------------------------- densities
def shifted_pdf(t, h: float) -> np.ndarray:
    """Density of the shifted flow-matching timestep on [0, 1]: f_h(t) = h / (1 + (h-1) t)^2. t: array-like."""
    t = np.asarray(t, dtype=np.float64)
    return h / (1.0 + (h - 1.0) * t) ** 2


def shifted_cdf(t, h: float) -> np.ndarray:
    """CDF of ``shifted_pdf``: F_h(t) = h t / (1 + (h-1) t); F_h(0) = 0, F_h(1) = 1."""
    t = np.asarray(t, dtype=np.float64)
    return h * t / (1.0 + (h - 1.0) * t)


def truncated_pdf(t, h: float, s: float, e: float) -> np.ndarray:
    """f_h truncated to [s, e] and renormalised: f_h / (F_h(e) - F_h(s)) inside [s, e], 0 outside."""
    t = np.asarray(t, dtype=np.float64)
    mass = shifted_cdf(e, h) - shifted_cdf(s, h)
    return np.where((t >= s) & (t <= e), shifted_pdf(t, h) / mass, 0.0)


def _starts(ends, z: float) -> tuple[float, float, float]:
    """s_1 = 0, s_{k+1} = e_k / (Z (1 - e_k) + e_k): the t a stage restarts from after re-noising."""
    return (0.0,) + tuple(float(e / (z * (1.0 - e) + e)) for e in ends[:2])


def target_density(t, ends, starts, base_shift: float) -> np.ndarray:
    """What the model saw in training, plus the re-noised overlaps [s_2, e_1], [s_3, e_2] counted again.

    P_target = [f_h0 + (e_1 - s_2) f_{h0,s_2,e_1} + (e_2 - s_3) f_{h0,s_3,e_2}] / (1 + (e_1 - s_2) + (e_2 - s_3)).
    """
    w1, w2 = ends[0] - starts[1], ends[1] - starts[2]
    p = (shifted_pdf(t, base_shift) + w1 * truncated_pdf(t, base_shift, starts[1], ends[0])
         + w2 * truncated_pdf(t, base_shift, starts[2], ends[1]))
    return p / (1.0 + w1 + w2)


def sampler_density(t, steps, ends, starts, shifts) -> np.ndarray:
    """The sampler's timestep density: sum_k N_k f_{h_k,s_k,e_k}(t) / sum_k N_k."""
    p = sum(n * truncated_pdf(t, h, s, e) for n, h, s, e in zip(steps, shifts, starts, ends))
    return p / float(sum(steps))


def jensen_shannon_distance(p, q) -> float:
    """Jensen-Shannon distance (natural log) between two non-negative 1-D weight vectors.

    Same semantics as ``scipy.spatial.distance.jensenshannon``: p and q are normalised to sum 1,
    m = (p + q) / 2, result = sqrt((KL(p||m) + KL(q||m)) / 2), in [0, sqrt(ln 2)].
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    if (p < 0).any() or (q < 0).any():
        raise ValueError("p and q must be non-negative")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(x):  # sum x log(x / m) with 0 log 0 = 0 (m > 0 wherever x > 0)
        pos = x > 0
        return float(np.sum(x[pos] * np.log(x[pos] / m[pos])))

    return math.sqrt(max(0.5 * (kl(p) + kl(q)), 0.0))


def _nt_distance(steps, ends, base_shift: float, shifts, z: float) -> float:
    """NT-Matching objective: JS distance between target and sampler densities on the fixed grid."""
    t = np.linspace(0.0, 1.0, GRID_POINTS)
    starts = _starts(ends, z)
    target = np.clip(target_density(t, ends, starts, base_shift), CLIP, None)
    sampler = np.clip(sampler_density(t, steps, ends, starts, shifts), CLIP, None)
    return jensen_shannon_distance(target / target.sum(), sampler / sampler.sum())


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Boundary:
    """Re-noising at the end of a stage: x_{s_next} = a Up(x_{e_k}) + b n', n' ~ N(0, I - c J) per group of 4."""
    s_next: float  # t where the next stage starts
    a: float       # signal coefficient 1 / (Z (1 - e_k) + e_k)
    b: float       # noise coefficient 1 - s_next
    c: float       # 1 / Z^2


def _check_len3(name: str, value) -> tuple:
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is not allowed: give exactly 3 values, one per stage") from None
    if len(value) != 3:
        raise ValueError(f"{name}={value!r} has {len(value)} stages; RALU has exactly 3 stages")
    return value


def _reals(name: str, whole, values) -> tuple[float, ...]:
    """``values`` as floats; ValueError naming ``name`` (and ``whole``, the value given) for a non-number (a string,
    a bool, None, ...) instead of float()'s own message or a silent conversion of "4" / True."""
    out = []
    for v in values:
        if isinstance(v, (str, bytes, bool, np.bool_)):
            raise ValueError(f"{name}={whole!r} is not allowed: give numbers, not {type(v).__name__}")
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"{name}={whole!r} is not allowed: {v!r} is not a number") from None
    return tuple(out)


MAX_STAGE_STEPS = 1000        # per stage
SHIFT_RANGE = (1e-3, 1e3)     # time shifts h_k (and the model's h_ori); NT-Matching's own bounds are [0.5, 10]
MAX_Z = 1e4                   # Z = 1/sqrt(c); NT-Matching's own bounds are [2, 100]
MIN_GAP = 1e-5                # smallest e_1, 1 - e_2 and e_2 - e_1


@dataclass(frozen=True)
class RaluSchedule:
    """Three-stage RALU schedule. Stage k (0-based) runs t in [starts[k], ends[k]] with steps[k] steps.

    steps: N_k (ints in [1, 1000]); ends: e_k with 0 < e_1 < e_2 < e_3 = 1 (gaps >= 1e-5); shifts: per-stage
    time shifts h_k in [1e-3, 1e3]; z: 2 <= Z <= 1e4 (noise correlation c = 1/Z^2 <= 1/4); ratio: fraction r
    in [0, 1] of coarse tokens upsampled at the end of stage 1; base_shift: the model's own shift h_ori; jsd: NT-Matching distance if solved.
    """
    steps: tuple[int, int, int]
    ends: tuple[float, float, float]
    shifts: tuple[float, float, float]
    z: float
    ratio: float
    base_shift: float = 3.0
    name: str | None = None
    jsd: float | None = None

    def __post_init__(self):
        steps = _check_len3("steps", self.steps)
        for n in steps:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_STAGE_STEPS:
                raise ValueError(f"steps={steps!r} is not allowed: every N_k must be an int in [1, {MAX_STAGE_STEPS}]")
        ends = _check_len3("ends", self.ends)
        ends = _reals("ends", ends, ends)
        if ends[2] != 1.0:
            raise ValueError(f"ends={ends!r} is not allowed: the last end e_3 must be exactly 1.0 (data)")
        if not 0.0 < ends[0] < ends[1] < ends[2]:
            raise ValueError(f"ends={ends!r} is not allowed: need 0 < e_1 < e_2 < e_3 = 1.0 (strictly increasing)")
        if ends[0] < MIN_GAP or ends[1] > 1.0 - MIN_GAP or ends[1] - ends[0] < MIN_GAP:
            raise ValueError(f"ends={ends!r} is not allowed: e_1 >= {MIN_GAP}, e_2 <= 1 - {MIN_GAP} and e_2 - e_1 >= "
                             f"{MIN_GAP} (closer stage ends leave no time for a stage)")
        shifts = _check_len3("shifts", self.shifts)
        shifts = _reals("shifts", shifts, shifts)
        if not all(math.isfinite(h) and SHIFT_RANGE[0] <= h <= SHIFT_RANGE[1] for h in shifts):
            raise ValueError(f"shifts={shifts!r} is not allowed: every shift h_k must be in [{SHIFT_RANGE[0]}, "
                             f"{SHIFT_RANGE[1]}]")
        (z,), (ratio,), (base,) = (_reals(n, v, (v,)) for n, v in (("z", self.z), ("ratio", self.ratio),
                                                                    ("base_shift", self.base_shift)))
        if not (math.isfinite(z) and 2.0 <= z <= MAX_Z):
            raise ValueError(f"z={self.z!r} is not allowed: need 2 <= Z <= {MAX_Z:g} (c = 1/Z^2 <= 1/4 for the "
                             "correlated noise)")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio={self.ratio!r} is not allowed: the upsampling ratio r must be in [0, 1]")
        if not (math.isfinite(base) and SHIFT_RANGE[0] <= base <= SHIFT_RANGE[1]):
            raise ValueError(f"base_shift={self.base_shift!r} is not allowed: must be in [{SHIFT_RANGE[0]}, "
                             f"{SHIFT_RANGE[1]}]")
        for field, value in (("steps", tuple(int(n) for n in steps)), ("ends", ends), ("shifts", shifts),
                             ("z", z), ("ratio", ratio), ("base_shift", base)):
            object.__setattr__(self, field, value)

    @property
    def c(self) -> float:
        """Noise correlation c = 1 / Z^2 (<= 1/4)."""
        return 1.0 / self.z ** 2

    @property
    def starts(self) -> tuple[float, float, float]:
        """(s_1, s_2, s_3) with s_1 = 0 and s_{k+1} = e_k / (Z (1 - e_k) + e_k) < e_k."""
        return _starts(self.ends, self.z)

    @property
    def total_steps(self) -> int:
        """Transformer evaluations: sum of N_k."""
        return sum(self.steps)

    def boundary(self, k: int) -> Boundary:
        """Re-noising coefficients after stage k (0-based, k in {0, 1})."""
        if k not in (0, 1):
            raise ValueError(f"boundary k={k!r} is not allowed: only 0 (stage 1 -> 2) and 1 (stage 2 -> 3)")
        e = self.ends[k]
        s_next = self.starts[k + 1]
        return Boundary(s_next=s_next, a=1.0 / (self.z * (1.0 - e) + e), b=1.0 - s_next, c=self.c)

    def stage_sigmas(self, k: int) -> np.ndarray:
        """Stage k's (0-based) sigmas, float64 of shape (N_k + 1,): from 1 - s_k down to 1 - e_k, spaced
        uniformly in the unshifted sigma of shift h_k. The first N_k are the timesteps (x1000 for models)."""
        if k not in (0, 1, 2):
            raise ValueError(f"stage k={k!r} is not allowed: stages are 0, 1, 2")
        h = self.shifts[k]
        hi, lo = 1.0 - self.starts[k], 1.0 - self.ends[k]
        unshift = lambda s: s / (h - (h - 1.0) * s)  # noqa: E731
        sig = np.linspace(unshift(hi), unshift(lo), self.steps[k] + 1)
        sig = h * sig / (1.0 + (h - 1.0) * sig)
        sig[0], sig[-1] = hi, lo
        return sig

    def timestep_density_jsd(self) -> float:
        """NT-Matching JS distance of this schedule's (shifts, Z) against the base-shift target."""
        return _nt_distance(self.steps, self.ends, self.base_shift, self.shifts, self.z)

    def with_ratio(self, r: float) -> RaluSchedule:
        """Copy with another upsampling ratio (shifts and Z do not depend on r); a named preset's copy is named
        with its ratio (``"flux/7x (r=0.5)"``), so reports do not show the preset's name for another schedule."""
        out = dataclasses.replace(self, ratio=r)
        if self.name is not None and out.ratio != self.ratio:
            out = dataclasses.replace(out, name=f"{self.name.split(' (r=')[0]} (r={out.ratio:g})")
        return out


def shift_bounds(base_shift: float) -> tuple[float, float]:
    """NT-Matching's search range for h_k: the reference's [0.5, 10] for models shifted up to FLUX.1's h_ori = 3,
    the upper end scaled by h_ori / 3 beyond (FLUX.2's dynamic shift reaches h_ori ~ 7.6 at 1024^2 and ~ 9.9 for
    its 4-step klein models; with the fixed 10 the optimum sits on the bound)."""
    return SHIFT_BOUNDS[0], SHIFT_BOUNDS[1] * max(1.0, base_shift / 3.0)


def solve_nt_matching(steps, ends, base_shift: float = 3.0, *, ratio: float = 0.3,
                      name: str | None = None) -> RaluSchedule:
    """NT-Matching: choose (h_1, h_2, h_3, Z) minimising the JS distance of the sampler's timestep density to
    the target (L-BFGS-B, h in :func:`shift_bounds` ([0.5, 10] up to h_ori = 3), Z in [2, 100], start (3, 3, 3, 2)). Returns the schedule with ``jsd``.
    ``ratio`` does not enter the objective; it is only stored in the result."""
    probe = RaluSchedule(steps, ends, X0[:3], X0[3], ratio, base_shift)  # validates the inputs
    steps, ends, base = probe.steps, probe.ends, probe.base_shift
    res = minimize(lambda x: _nt_distance(steps, ends, base, x[:3], x[3]), np.array(X0),
                   bounds=[shift_bounds(base)] * 3 + [Z_BOUNDS])
    h1, h2, h3, z = (float(v) for v in res.x)
    # The objective is piecewise smooth (grid points enter/leave [s_k, e_k] as Z moves), so L-BFGS-B may stop
    # with an 'ABNORMAL' line search, and res.fun is then not always the value at res.x: re-evaluate.
    jsd = _nt_distance(steps, ends, base, (h1, h2, h3), z)
    return RaluSchedule(steps, ends, (h1, h2, h3), z, ratio, base, name=name, jsd=jsd)


# ----------------------------------------------------------------------------- cost model
def estimate_cost_ratio(schedule: RaluSchedule, baseline_steps: int, tokens_full: int,
                        text_tokens: int = 0) -> float:
    """Estimated speed-up: baseline cost / RALU cost, with a per-step cost linear in the token count.

    An estimate only (attention is quadratic; the linear model ignores that). Tokens per step: stage 1 M/4,
    stage 2 M/4 (1 - r) + M r, stage 3 M, each plus ``text_tokens``; the baseline runs ``baseline_steps`` at M.
    The FLUX.1-dev FLOP counts 21.5 / 74.4 TFLOPs per step at 1024 / 4096 image tokens are reproduced
    exactly by this model with text_tokens ~ 225 (an effective constant, not the real 512).
    """
    if baseline_steps < 1 or tokens_full <= 0 or text_tokens < 0:
        raise ValueError(f"need baseline_steps >= 1, tokens_full > 0, text_tokens >= 0 (got {baseline_steps}, "
                         f"{tokens_full}, {text_tokens})")
    m, r = float(tokens_full), schedule.ratio
    per_step = (m / 4, m / 4 * (1.0 - r) + m * r, m)
    ralu = sum(n * (tok + text_tokens) for n, tok in zip(schedule.steps, per_step))
    return baseline_steps * (m + text_tokens) / ralu


# ----------------------------------------------------------------------------- presets
# family -> name -> PresetSpec(steps N_k, ends e_k, ratio r, base shift h_ori): the presets of every family are
# data in ralu_runtime.families (FAMILIES[family].presets). Shifts and Z are solved, never typed. A base shift of None
# means "the model's own": the adapter derives h_ori from its pipeline's scheduler (dynamic shifting and its mu at the
# requested resolution, the pipeline's default step count; DiTAdapter.preset_base_shift) and shifts and Z are solved
# for that h_ori.
PRESET_SPECS: dict[str, Mapping[str, PresetSpec]] = {name: fam.presets for name, fam in FAMILIES.items()}


SHIFT_DECIMALS = 4  # model-derived base shifts are rounded to this many decimals (one solve per distinct value)


def preset_base_shift(family: str, name: str) -> float | None:
    """The typed h_ori of a preset, or None where the model's own shift is used."""
    return PRESET_SPECS[family][name][3]


@functools.lru_cache(maxsize=None)
def _solved_preset(family: str, name: str, base_shift: float | None = None) -> RaluSchedule:
    steps, ends, ratio, base = PRESET_SPECS[family][name]
    if base is None:
        if base_shift is None:
            raise ValueError(f"preset {family}/{name} is solved for the model's own timestep shift: pass base_shift "
                             "(generate does this from the pipeline's scheduler)")
        base = base_shift
    return solve_nt_matching(steps, ends, base, ratio=ratio, name=f"{family}/{name}")


_DEFAULT_SHIFT = 3.0  # what PRESETS[family][name] uses for presets solved for the model's own shift


class _LazyFamily(Mapping):
    """Read-only name -> RaluSchedule mapping of one family; a preset is solved on first access (cached).
    Presets solved for the model's own shift are shown at h_ori = 3 here; use :func:`get_preset` with the model's
    ``base_shift`` (what ``generate`` does)."""

    def __init__(self, family: str):
        self.family = family

    def __getitem__(self, name: str) -> RaluSchedule:
        if name not in PRESET_SPECS[self.family]:
            raise KeyError(name)
        return _solved_preset(self.family, name, _DEFAULT_SHIFT if preset_base_shift(self.family, name) is None
                              else None)

    def __iter__(self) -> Iterator[str]:
        return iter(PRESET_SPECS[self.family])

    def __len__(self) -> int:
        return len(PRESET_SPECS[self.family])

    def __repr__(self) -> str:
        return f"<presets {self.family}: {', '.join(self)} (solved lazily)>"


PRESETS: dict[str, Mapping[str, RaluSchedule]] = {family: _LazyFamily(family) for family in PRESET_SPECS}


def get_preset(family: str, name: str, base_shift: float | None = None) -> RaluSchedule:
    """Preset ``name`` of model ``family`` (see ``PRESET_SPECS``), NT-Matching solved on first use.

    ``base_shift``: the model's own h_ori, used by presets whose spec leaves it to the model (rounded to
    ``SHIFT_DECIMALS``); ignored by presets with a typed h_ori (FLUX.1, SD3)."""
    if family not in PRESET_SPECS:
        raise ValueError(f"unknown model family {family!r}; available families: {', '.join(PRESET_SPECS)}")
    if name not in PRESET_SPECS[family]:
        raise ValueError(f"unknown preset {name!r} for family {family!r}; available: "
                         f"{', '.join(PRESET_SPECS[family])}")
    if preset_base_shift(family, name) is not None:
        return _solved_preset(family, name)
    if base_shift is not None:
        (base_shift,) = _reals("base_shift", base_shift, (base_shift,))
    if base_shift is not None and not (math.isfinite(base_shift) and SHIFT_RANGE[0] <= base_shift <= SHIFT_RANGE[1]):
        raise ValueError(f"base_shift={base_shift!r} is not allowed: must be in [{SHIFT_RANGE[0]}, {SHIFT_RANGE[1]}]")
    return _solved_preset(family, name, None if base_shift is None else round(float(base_shift), SHIFT_DECIMALS))
