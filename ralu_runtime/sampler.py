"""The samplers: ordinary full-resolution flow matching, and RALU's three stages.

State is kept as tokens ``(B, L, C_tok)`` in the model dtype; every Euler step is computed like
diffusers' ``FlowMatchEulerDiscreteScheduler.step`` (float32 update, cast back), so the baseline
reproduces the diffusers pipelines. All randomness comes from the caller's generators.

Schedulers (:func:`scheduler_integration`, checked by ``prepare`` before any work): with the pipeline's
``FlowMatchEulerDiscreteScheduler`` (deterministic) ralu's solvers run on its sigmas, which for ``solver="euler"`` is
the scheduler's own step. With another deterministic flow-matching scheduler (FlowMatchHeun, UniPC or DPM-Solver
multistep with flow prediction, ...) the baseline (``speedup=None``) follows that scheduler's own ``step`` on a copy
of it, as the pipeline does; RALU presets integrate their stages with ralu's solver instead (a warning on the
``ralu`` logger says so). Stochastic schedulers (``stochastic_sampling=True``, ancestral / SDE / consistency
samplers) and schedulers that are not flow matching are refused with a ValueError naming the class.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .adapters.base import Conditioning, DiTAdapter, TokenGrid, scheduler_copies
from .layout import TokenLayout, grid_positions
from .schedule import RaluSchedule
from .solvers import SOLVERS, make_solver  # noqa: F401 (SOLVERS re-exported to api)

NOISE_VARIANTS = ("reference", "exact")
REGION_MODES = ("frame", "clip")  # video: regions chosen per latent frame, or the same spatial blocks in every frame
REGION_SOURCES = ("decode", "latent")  # regions from Canny on the VAE-decoded preview, or Sobel on the latents


def latent_frames(noise: torch.Tensor) -> int:
    """Latent frames of ``(B, C, F, h, w)`` video latents; 1 for ``(B, C, h, w)`` images."""
    return int(noise.shape[2]) if noise.ndim == 5 else 1


@dataclass
class StageRecord:
    """Wall time (s) and shape facts of one piece of a run, for the per-stage timing table."""

    name: str
    seconds: float
    steps: int = 0
    tokens: int = 0


@dataclass
class SamplerResult:
    """Final fine tokens ``(B, L, C_tok)`` raster order, optional layout, and timing records."""

    tokens: torch.Tensor
    layout: TokenLayout | None = None
    records: list[StageRecord] = field(default_factory=list)


class Clock:
    """Times named pieces; synchronises CUDA at piece boundaries only (never inside a stage)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.records: list[StageRecord] = []

    def __call__(self, name: str, steps: int = 0, tokens: int = 0):
        clock = self

        class _Piece:
            def __enter__(self):
                if clock.cuda:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if clock.cuda:
                    torch.cuda.synchronize()
                clock.records.append(StageRecord(name, time.perf_counter() - self.t0, steps, tokens))

        return _Piece()


def run_stage(adapter: DiTAdapter, x: torch.Tensor, grid: TokenGrid, timesteps: torch.Tensor, sigmas: torch.Tensor,
              cond: Conditioning, *, solver: str = "euler", desc: str = "", progress: bool = True,
              velocity: Callable | None = None, after_step: Callable | None = None):
    """Integrate one stage: ``len(timesteps)`` model calls from ``sigmas[0]`` to ``sigmas[-1]``.

    timesteps: ``(N,)`` float32 ``1000 * sigma`` given to the model; sigmas: ``(N+1,)`` float32.
    velocity: the model call (default ``adapter.velocity``; ``generate`` passes the installed backend's runner).
    after_step: ``(i, x) -> x`` applied after step ``i`` (inpainting's blend with the re-noised source).
    Returns ``(x, v_last)``: the state at ``sigmas[-1]`` and the last velocity.
    """
    velocity = velocity or adapter.velocity
    stepper = make_solver(solver, sigmas)
    adapter.begin_stage()
    v = None
    for i in tqdm(range(len(timesteps)), desc=desc, disable=not progress, leave=False):
        v = velocity(x, grid, timesteps[i], cond)
        x = stepper.step(i, x, v)
        if after_step is not None:
            x = after_step(i, x)
    return x, v


_STOCHASTIC_NAMES = ("Ancestral", "SDE", "LCM", "TCD")
_WARNED: set = set()


def _stochastic(sched) -> str | None:
    """Why ``sched`` draws noise in its steps (None: deterministic)."""
    cfg = getattr(sched, "config", {}) or {}
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    name = type(sched).__name__
    if get("stochastic_sampling", False):
        return "stochastic_sampling=True"
    if any(n in name for n in _STOCHASTIC_NAMES):
        return "an ancestral / SDE / consistency sampler draws noise at every step"
    if "sde" in str(get("algorithm_type", "") or ""):
        return f"algorithm_type={get('algorithm_type')!r}"
    if float(get("s_churn", 0.0) or 0.0) > 0:
        return f"s_churn={get('s_churn')}"
    return None


def scheduler_integration(adapter: DiTAdapter, ralu: bool, solver: str = "euler") -> str:
    """How a call integrates with the pipeline's scheduler, decided before any work: "own" (ralu's ``solver`` on
    the schedule: the pipeline's FlowMatchEulerDiscreteScheduler, any RALU preset, adapters without a scheduler) or
    "follow" (a baseline with another deterministic flow scheduler: its own ``step``, see the module docstring).

    ValueError naming the scheduler class for a stochastic scheduler, one that is not flow matching, or a baseline
    that would follow the scheduler with ``solver`` other than "euler"; a RALU preset with a scheduler other than
    FlowMatchEuler logs a warning (once per class and solver) saying which solver runs instead."""
    try:
        sched = getattr(adapter.pipe, "scheduler", None) if adapter.pipe is not None else None
    except RuntimeError:
        sched = None
    if sched is None or not hasattr(sched, "step"):
        return "own"
    from diffusers import FlowMatchEulerDiscreteScheduler

    name = type(sched).__name__
    why = _stochastic(sched)
    if why is not None:
        raise ValueError(f"the pipeline's scheduler {name} is stochastic ({why}): ralu integrates deterministically "
                         "and cannot keep that behaviour; give the pipeline a deterministic flow scheduler, e.g. "
                         "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                         "stochastic_sampling=False)")
    if isinstance(sched, FlowMatchEulerDiscreteScheduler):
        return "own"
    cfg = sched.config
    flow = (name.startswith("FlowMatch") or cfg.get("prediction_type", None) == "flow_prediction"
            or bool(cfg.get("use_flow_sigmas", False)))
    if not flow:
        raise ValueError(f"the pipeline's scheduler {name} is not a flow-matching scheduler (prediction_type="
                         f"{cfg.get('prediction_type', None)!r}); these models predict flow velocities: use "
                         "FlowMatchEulerDiscreteScheduler or a scheduler with prediction_type='flow_prediction'")
    if ralu:
        if (name, solver) not in _WARNED:
            _WARNED.add((name, solver))
            logging.getLogger("ralu").warning(
                "RALU integrates its stages with ralu's %r solver on its own schedule, not with the pipeline's "
                "%s.step (the baseline, speedup=None, follows %s.step)", solver, name, name)
        return "own"
    if solver != "euler":
        raise ValueError(f"solver={solver!r} is not allowed with speedup=None and the pipeline's {name}: the baseline "
                         f"follows {name}.step as the pipeline does; leave solver='euler' (the default), or give "
                         "the pipeline a FlowMatchEulerDiscreteScheduler to run ralu's solvers")
    return "follow"


def run_scheduler(adapter: DiTAdapter, x: torch.Tensor, grid: TokenGrid, timesteps: torch.Tensor, sched,
                  cond: Conditioning, *, desc: str = "", progress: bool = True,
                  velocity: Callable | None = None) -> torch.Tensor:
    """Integrate with the configured scheduler copy ``sched``'s own ``step`` (one model call per entry of
    ``timesteps`` ``(N,)`` float32, the scheduler's timesteps as the model takes them), as the pipeline's loop does:
    the state ``x`` ``(B, L, C_tok)`` is cast back to the velocity's dtype after every step."""
    velocity = velocity or adapter.velocity
    if len(sched.timesteps) != len(timesteps):
        raise ValueError(f"{type(sched).__name__} has {len(sched.timesteps)} timesteps but the baseline schedule "
                         f"{len(timesteps)}")
    adapter.begin_stage()
    for i in tqdm(range(len(timesteps)), desc=desc, disable=not progress, leave=False):
        v = velocity(x, grid, timesteps[i], cond)
        x = sched.step(v, sched.timesteps[i], x, return_dict=False)[0].to(v.dtype)
    return x


def check_finite(x: torch.Tensor, stage: str) -> None:
    """Raise FloatingPointError naming ``stage`` when the latents hold NaN or Inf (one reduction, one sync)."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"non-finite latents (NaN or Inf) after {stage}: the model produced NaN/Inf "
                                 "(check the prompt embeddings, guidance scale and the model's dtype)")


def check_finite_decode(images: torch.Tensor, what: str) -> torch.Tensor:
    """``images`` (any shape, the VAE's output) unchanged; FloatingPointError naming the decode ``what`` when they hold
    NaN or Inf (a VAE that overflows, e.g. in fp16, or a broken decoder), instead of returning NaN pixels."""
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise FloatingPointError(f"non-finite output (NaN or Inf) of the VAE decode of {what}: {bad} of "
                                 f"{images.numel()} values (check the VAE's dtype: fp16 VAEs can overflow)")
    return images


def stage_timesteps(schedule: RaluSchedule, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RALU stage ``k`` (0-based): ``(timesteps (N_k,), sigmas (N_k + 1,))`` float32 from the schedule."""
    sig = schedule.stage_sigmas(k)
    sigmas = torch.tensor(sig, dtype=torch.float32, device=device)
    timesteps = torch.tensor(sig[:-1] * 1000.0, dtype=torch.float32, device=device)
    return timesteps, sigmas


def sample_baseline(adapter: DiTAdapter, cond: Conditioning, noise: torch.Tensor, num_steps: int, *,
                    solver: str = "euler", progress: bool = True, velocity: Callable | None = None,
                    follow_scheduler: bool = False, start: int = 0) -> SamplerResult:
    """Ordinary full-resolution sampling with the pipeline's own timesteps. noise: ``(B, C, h, w)`` (images) or
    ``(B, C, F, h, w)`` (video: the token grid is the frames stacked vertically, see :class:`TokenGrid`).
    ``follow_scheduler``: step with the pipeline's scheduler (a configured copy) instead of ``solver``
    (:func:`scheduler_integration` decides). ``start``: steps of the schedule skipped (img2img: ``noise`` is then
    the noised source at that step; with the Euler flow scheduler only)."""
    clock = Clock(noise.device)
    h, w = noise.shape[-2:]
    frames = latent_frames(noise)
    p = adapter.patch_size
    fine_hw = (frames * (h // p), w // p)
    x = adapter.pack(noise)
    b = x.shape[0]
    grid = TokenGrid(grid_positions(*fine_hw, device=x.device).expand(b, -1, -1), fine_hw, None, raster=True,
                     frames=frames)
    with scheduler_copies() as copies:
        timesteps, sigmas = adapter.baseline_schedule(num_steps, x.shape[1])
    if start and follow_scheduler and copies:
        raise ValueError(f"img2img / inpainting (start step {start}) runs with the Euler flow scheduler only; the "
                         f"pipeline has {type(copies[-1]).__name__}")
    timesteps, sigmas = timesteps[start:], sigmas[start:]
    with clock("baseline", steps=len(timesteps), tokens=x.shape[1]):
        if follow_scheduler and copies:
            x = run_scheduler(adapter, x, grid, timesteps, copies[-1], cond, desc="baseline", progress=progress,
                              velocity=velocity)
        else:
            x, _ = run_stage(adapter, x, grid, timesteps, sigmas, cond, solver=solver, desc="baseline",
                             progress=progress, velocity=velocity)
    check_finite(x, "the baseline sampler")
    return SamplerResult(x, None, clock.records)


def stage2_layout(adapter: DiTAdapter, x: torch.Tensor, v: torch.Tensor, sigma_end: float, latent_hw, coarse_hw,
                  k: int, m: int, generators, **select) -> TokenLayout:
    """The token layout of stages 2 and 3 after stage 1 (``x``, ``v``: its last state and velocity, ``(B, m, C)``):
    the ``k`` of ``m`` coarse tokens upsampled first, chosen by :func:`select_regions` (``select``: its keyword
    arguments); with ``k`` 0 or ``m`` there is no choice to make (the first ``k``)."""
    if 0 < k < m:
        sel = select_regions(adapter, x, v, sigma_end, latent_hw, k, generators, **select)
    else:
        sel = torch.arange(m, device=x.device).expand(x.shape[0], m)[:, :k]
    return TokenLayout(coarse_hw, sel.to(x.device))


def draw_seeds(generators: list[torch.Generator], device) -> torch.Tensor:
    """One int64 Philox seed per image from each image's generator: ``(B,)`` on ``device``."""
    seeds = [torch.randint(0, 2**62, (1,), generator=g, device=g.device).to(device) for g in generators]
    return torch.cat(seeds)


def early_regions(blocks: int, frames: int, ratio: float, region_mode: str) -> int:
    """How many of the ``blocks`` coarse 2x2 blocks (all ``frames`` latent frames together) stage 2 upsamples: the
    top ``ratio`` of them ("frame"), or of each frame's spatial blocks, the same in every frame ("clip")."""
    if region_mode == "clip":
        return int(blocks // frames * ratio) * frames
    return int(blocks * ratio)


def select_regions(adapter: DiTAdapter, x: torch.Tensor, v: torch.Tensor, sigma_end: float, latent_hw, k: int,
                   generators, *, edge_map: str, edge_detector: str, decode: Callable | None = None,
                   frames: int = 1, region_mode: str = "frame", region_source: str = "decode",
                   boost: torch.Tensor | None = None) -> torch.Tensor:
    """Edge-based choice of the ``k`` coarse tokens to upsample first: ``(B, k)`` int64 sorted.

    Tweedie estimate ``x0 = x - sigma_end v`` at the end of stage 1, VAE decode at half resolution,
    Canny edges, edge pixels per coarse-token block, top-k with a tiny jitter from each image's generator.
    ``region_source="latent"``: no decode; Sobel magnitude of the Tweedie latents per coarse token
    (:func:`ralu_runtime.edges.latent_edge_scores`), the same jittered top-k.
    Video (``frames`` > 1, tall grid): ``region_mode="frame"`` takes the top-k blocks over all frames (each frame
    its own regions); ``"clip"`` sums each spatial block's scores over the frames and takes the same ``k / frames``
    blocks in every frame (temporally coherent).
    ``boost``: ``(B, M)`` float32 added to the scores before the top-k (inpainting's mask-first choice).
    """
    from .edges import edge_scores, latent_edge_scores, select_top_blocks

    x0 = (x.to(torch.float32) - sigma_end * v.to(torch.float32)).to(x.dtype)
    latents = adapter.unpack(x0, latent_hw[0] // 2, latent_hw[1] // 2)
    if region_source == "latent":
        scores = latent_edge_scores(latents, adapter.patch_size)
    else:
        images = check_finite_decode(adapter.edge_images(latents, decode or adapter.decode),
                                     "the region-choice preview (end of RALU stage 1)")
        block = adapter.patch_size * adapter.vae_scale_factor
        scores = edge_scores(images, block, mapping=edge_map, detector=edge_detector)
    if boost is not None:
        scores = scores.reshape(boost.shape).to(torch.float32) + boost.to(scores.device)
    if frames == 1 or region_mode == "frame":
        return select_top_blocks(scores, k, generators)
    b = scores.shape[0]
    per_frame = scores[0].numel() // frames
    spatial = select_top_blocks(scores.reshape(b, frames, per_frame).sum(dim=1), k // frames, generators)
    offsets = torch.arange(frames, device=spatial.device)[:, None] * per_frame
    return (spatial[:, None, :] + offsets).reshape(b, -1)


def apply_transition(x: torch.Tensor, pos: torch.Tensor, tmap, boundary, seeds: torch.Tensor, *, noise: str,
                     impl: str):
    """Run one stage transition (upsample + correlated noise + scale + reorder) with ralu_kernels."""
    from ralu_kernels.transition import stage_transition

    return stage_transition(x, pos, tmap.src_index, tmap.group, tmap.child, seeds, a=boundary.a, b=boundary.b,
                            c=boundary.c, pos_scale=tmap.pos_scale, exact_noise=(noise == "exact"),
                            order=tmap.order, num_up=tmap.num_up, impl=impl)


def sample_ralu(adapter: DiTAdapter, cond: Conditioning, noise: torch.Tensor, schedule: RaluSchedule,
                generators: list[torch.Generator], *, noise_variant: str = "reference", edge_map: str = "unit",
                edge_detector: str = "opencv", transition_impl: str = "auto", solver: str = "euler",
                progress: bool = True, velocity: Callable | None = None, decode: Callable | None = None,
                region_mode: str = "frame", region_source: str = "decode") -> SamplerResult:
    """RALU: low-resolution stage, edge-selected partial upsampling, full-resolution stage.

    noise: full-resolution latent noise ``(B, C, h, w)`` (stage 1 starts from its 2x nearest downsample,
    so a RALU run and a baseline run with the same seed start from the same noise), or video ``(B, C, F, h, w)``:
    spatial 2x only (time kept at full resolution in every stage), the frames stacked as a tall image, regions
    chosen per frame or per clip (``region_mode``, :func:`select_regions`). ``region_source``: "decode" (Canny on
    the VAE-decoded half-resolution preview, as the reference) or "latent" (Sobel on the latents, no decode).
    generators: one per image (the same object repeated is allowed: draws are then sequential).
    velocity / decode: the model call and the VAE decode (defaults: the adapter's plain ones).
    Returns final tokens in fine raster order ``(B, 4M, C_tok)``.
    """
    if noise_variant not in NOISE_VARIANTS:
        raise ValueError(f"noise={noise_variant!r} is not allowed; choose one of {NOISE_VARIANTS}")
    if region_mode not in REGION_MODES:
        raise ValueError(f"region_mode={region_mode!r} is not allowed; choose one of {REGION_MODES}")
    if region_source not in REGION_SOURCES:
        raise ValueError(f"region_source={region_source!r} is not allowed; choose one of {REGION_SOURCES}")
    clock = Clock(noise.device)
    b = noise.shape[0]
    latent_hw = noise.shape[-2:]
    frames = latent_frames(noise)
    p = adapter.patch_size
    coarse_hw = (frames * (latent_hw[0] // (2 * p)), latent_hw[1] // (2 * p))  # frames stacked: a tall grid
    fine_hw = (2 * coarse_hw[0], 2 * coarse_hw[1])
    m = coarse_hw[0] * coarse_hw[1]
    k = early_regions(m, frames, schedule.ratio, region_mode)

    # stage 1: coarse grid
    x = adapter.pack(noise[..., ::2, ::2].contiguous())
    pos = grid_positions(*coarse_hw, device=x.device).expand(b, -1, -1).contiguous()
    ts, sig = stage_timesteps(schedule, 0, x.device)
    with clock("stage1", steps=len(ts), tokens=m):
        x, v = run_stage(adapter, x, TokenGrid(pos, coarse_hw, None, raster=True, frames=frames), ts, sig, cond,
                         solver=solver, desc="RALU stage 1/3", progress=progress, velocity=velocity)
    check_finite(x, "RALU stage 1")

    # region choice
    with clock("edges", tokens=k):
        layout = stage2_layout(adapter, x, v, float(sig[-1]), latent_hw, coarse_hw, k, m, generators,
                               edge_map=edge_map, edge_detector=edge_detector, decode=decode, frames=frames,
                               region_mode=region_mode, region_source=region_source)

    # transition 1 -> 2
    with clock("transition12", tokens=layout.stage_lengths[1]):
        x, pos = apply_transition(x, pos, layout.transition_12(), schedule.boundary(0),
                                  draw_seeds(generators, x.device), noise=noise_variant, impl=transition_impl)
    ts, sig = stage_timesteps(schedule, 1, x.device)
    with clock("stage2", steps=len(ts), tokens=x.shape[1]):
        grid = TokenGrid(pos, coarse_hw, layout.stage2_fine_mask(), frames=frames)
        x, v = run_stage(adapter, x, grid, ts, sig, cond,
                         solver=solver, desc="RALU stage 2/3", progress=progress, velocity=velocity)
    check_finite(x, "RALU stage 2")

    # transition 2 -> 3
    with clock("transition23", tokens=4 * m):
        x, pos = apply_transition(x, pos, layout.transition_23(), schedule.boundary(1),
                                  draw_seeds(generators, x.device), noise=noise_variant, impl=transition_impl)
    ts, sig = stage_timesteps(schedule, 2, x.device)
    with clock("stage3", steps=len(ts), tokens=x.shape[1]):
        x, _ = run_stage(adapter, x, TokenGrid(pos, fine_hw, None, raster=True, frames=frames), ts, sig, cond,
                         solver=solver, desc="RALU stage 3/3", progress=progress, velocity=velocity)
    check_finite(x, "RALU stage 3")
    return SamplerResult(x, layout, clock.records)
