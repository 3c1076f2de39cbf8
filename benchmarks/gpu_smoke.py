"""GPU smoke step: every GPU path of ralu proven once, in one short device call (issue 24, part 1).

Correctness only, no timing. Each family (``benchmarks/smoke_families.py``: FLUX.1-dev and schnell, SD3-medium,
SD3.5 Large / Medium, FLUX.2-dev and klein, Qwen-Image, Z-Image and Turbo, Chroma, Wan 2.1 / 2.2, HunyuanVideo 1.5)
runs at REDUCED DEPTH (2 blocks of each kind) and FULL WIDTH (the published hidden size, heads and text dim), with
random weights, the real text length, bf16, at 1024^2 (images) or 480x832 x 17 frames (video). One job per family,
each its own process; jobs run as parallel subprocesses sharing the GPU (``--workers``, default 8 on the 16-core GPU
machine), the kernel checks first, then the longest first; each check under its own time limit; a failing check
does not stop the others.

Checks of a family job (rows ``<family>/<check>`` of the table):

``build``               the pipeline on the device (published configs, depth cut; see smoke_families), embeddings
``parity_diffusers``    ``generate(speedup=None)`` (the family's own sampler, 4 steps, ralu's block functions) against
                        the diffusers pipeline itself (same embeddings, same per-image CPU generator): latents
``ralu_eager``          RALU with the family's default preset, eager: finite decoded output; the eager references of
                        the compiled checks are made here (nothing is compiled yet)
``compiled_baseline``   the compiled runner (``generate(backend="inductor")`` with CUDA graphs) against eager, 4 steps
``compiled_ralu``       the same for RALU with the preset's schedule and every coarse token upsampled at e_1
                        (``ratio=1``): every stage, both transitions and the stage-2 position path, with a region choice
                        that cannot differ (see "Regions" below)
``compiled_preset``     the preset itself compiled: finite; its regions against eager's; latents compared when the
                        regions agree
``no_recompile``        a second preset call (another seed): no new dynamo graph (``compile_stats()``, torch._dynamo's
                        ``unique_graphs``, as latency.py counts ``recompiles_after_warmup``) and no new CUDA-graph
                        capture
``text_masks_graphs``   (Qwen-Image, Z-Image(-Turbo), Chroma, HunyuanVideo 1.5) two prompts with different valid text
                        lengths in one compiled call, then two other lengths in a call of the same shapes (a CUDA graph
                        captured with one mask replayed with another): each equal to eager

Other jobs: ``serving`` (the engine, FLUX.1-dev shape: four mixed requests (sizes, presets, a baseline) packed under
CUDA graphs per bucket, each equal to ``generate`` alone; a second mix adds no dynamo graph; an eager engine with
``precision="fp8"`` as its default, ``ralu serve --precision fp8``: two sizes packed, each equal to fp8 ``generate``
alone) and ``kernels`` (the
transition kernel, Triton and the CUDA op ``ralu_kernels._C`` against the torch reference and each other at FLUX and
video lengths (Wan 480p x 81 frames: 32 760 tokens); varlen attention at 32 760 + 12 480 + 7 800 tokens against
per-segment SDPA; ``copy_same_bytes`` as bench_transition.py runs it) and ``editing`` (``benchmarks/smoke_editing.py``,
FLUX.1-dev shape: img2img, inpainting, Kontext, Fill and control against their diffusers pipelines, RALU eager, and
compiled with CUDA graphs equal to eager: the conditioning channels and the reference tokens as graph inputs) and
``precision`` (FLUX.1-dev shape: ``precision="fp8"`` with ralu's ``torch._scaled_mm`` kernel and with torchao's
where importable, against bf16 within the fp8 tolerance; fp8 compiled with inductor and CUDA graphs against eager
fp8, no recompile, the user's parameters as found; ``attn_backend="measure"``: backends timed per attention shape,
one chosen per stage signature, latents equal to bf16's; diffusers' layerwise casting with float8 storage, eager,
equal to the model with rounded weights; see :func:`precision_job`).

Tolerance (relative L2 error ``||a - b|| / ||b||`` of the latents): **bf16: 5e-2**; fp32 (the CPU dry run): 1e-4.
Why 5e-2: bf16 rounds to 8 significant bits (unit roundoff 2^-8 = 3.9e-3); two bf16 evaluations of the same model
that round in different places (diffusers' modules against ralu's block functions; cuDNN/flash SDPA against varlen
attention; inductor's fused, fp32-internal kernels against eager ops; fused q/k/v against separate projections)
differ by a few roundings per block, compounded over the blocks and steps. Measured on the CPU (tiny models, 3
steps, bf16 against the same run in fp32): FLUX.1 2.3e-2, SD3.5 Medium 2.0e-2, Qwen-Image 1.1e-2, Z-Image 1.2e-2,
Chroma 2.9e-2, Wan 1.2e-2, HunyuanVideo 1.5 1.5e-2, FLUX.2 4.8e-3; two independent bf16 runs can differ by up to
about sqrt(2) x 2.9e-2 = 4.1e-2. A real bug (a wrong position, mask, modulation or CFG branch) moves the velocity by
O(1) relative and the latents by well over 0.1. The kernel checks have their own: transition bf16 1e-3 (the torch
reference and the kernels agree to ~1e-5 in float32 before the bf16 rounding), Triton = CUDA op bitwise; varlen
attention bf16 2e-2.

Regions: RALU's region choice (Canny edges of a decoded preview, top-k blocks) is discrete. In bf16 a 1 % change of
the preview moves edge pixels, edge counts near the top-k cut-off change by one, and other blocks are chosen: then
the latents differ by O(1) in those blocks, legitimately. Comparisons between different numerical paths therefore
use a schedule whose choice cannot differ (``ratio=1``: all blocks), and the preset runs report how many regions
agree (and compare latents when all do).

Compile levels (``--level``, per family by default): ``inductor`` = what users run (``backend="inductor"``: dynamo,
inductor codegen, Triton kernels, ralu's CUDA graph per stage call; FLUX.1-dev also compiles the VAE decode).
``dynamo`` = ``backend="inductor"`` with ``compile_options={"dynamo_backend": "eager"}``: dynamo traces ralu's block
functions exactly as for inductor (fullgraph, symbolic token dims: graph breaks, guards and recompiles show) and
every stage call is captured as a CUDA graph, but no kernels are generated. ``eager`` = the eager runner (fused
weights, CUDA graphs, nothing traced). What is graphed and what the masks do under replay is the same at every
level; inductor adds its codegen. Every family has its own block functions, and a cold inductor compile costs
about a minute each, so the inductor level is spent where codegen meets something no other job covers: FLUX.1-dev
(the path users run, VAE decode included), FLUX.2-dev (its own blocks, 6144 wide), Qwen-Image and Z-Image (masked
attention; Z-Image's refiners and padded captions), Wan 2.1 (video RoPE, 3-D latents), HunyuanVideo 1.5 (masks and
video) and the serving engine (packed blocks with varlen attention). The dynamo level proves CUDA graphs and
no-recompile for the rest: the variants sharing those block functions (FLUX.1-schnell, FLUX.2-klein,
Z-Image-Turbo, Wan 2.2's second expert: guidance embedding, width, CFG or expert switch differ, outside codegen),
and SD3/SD3.5 and Chroma, whose cold inductor compiles are the dearest (measured on the CPU: 2.1x and 1.8x
FLUX.1's) while their operations (joint attention with q/k RMS norm, masked SDPA, modulation) are compiled in the
inductor jobs above. A run with time to spare can pass ``--level inductor`` (every job) or ``--level eager``.

Expected seconds (``SmokeFamily.expected_s`` per check, on the H200 with 8 workers; ``--list`` prints them):
estimated, not measured (no GPU here). Cold inductor compiles: the H200's cold first compiled RALU 7x call of the
FLUX.1-dev shape took 93 s (57 blocks' two block kinds, the VAE decode at two sizes, 3 stage captures;
benchmarks/results/gpu_suite_nvidia-h200_2026-12-04.log); the block functions' part, ~45 s, times 1.3 for 8 jobs
sharing 16 cores gives 60 s for FLUX.1-dev, and the others scale by their CPU cold-compile time relative to FLUX.1's
(``--measure-compile`` on the dry-size models, 2-core CPU: FLUX.1 102 s, FLUX.2 121, Qwen-Image 105, Z-Image 76,
Wan 99, HunyuanVideo 1.5 131, Chroma 183, SD3.5 Medium 216; dynamo tracing alone 15-40 s there, ~20 s expected on
the GPU machine). Process start and build ~20 s, eager checks a few seconds each. The sum is ~1770 s of job time;
8 workers, the kernel checks and FLUX.1-dev first and the rest in the order :func:`gpu_order` packs, finish in
~240 s if the estimates hold (``--list`` prints both sums); every check has a hard limit of 2.5x its expected
seconds + 30 s.

Output (``--out``, and ``--mirror``): ``smoke_<device>.json`` (rewritten after every finished check: a run cut off
still returns what finished; each row: path, job, result, seconds, error, tol, expected_s, note, info), the log
``smoke_<device>.log`` (each job's own log under ``<out>/logs/smoke/``) and the table printed at the end: path,
result, seconds, max error, tolerance, expected seconds, note. Results: ok, failed (tolerance or an expectation),
error (an exception), timeout (past its limit or the budget: the job is killed), crashed (the process died),
skipped (cannot run here), not run. The commit measured is ``git rev-parse HEAD`` where ``.git`` exists, else
``$RALU_COMMIT``.

The dry run (``--dry-run``, CPU, float32, tolerance 1e-4) builds every family through the same function with the
width cut too (the families' CPU latency-model widths, a small VAE of the same class) and runs every check; it
traces FLUX.1-dev and the serving engine with dynamo and puts the other families on the eager runner (dynamo
traces cost ~10 s per family on 2 cores; each family's tests trace its blocks), the Triton kernel under the
interpreter; the jobs run in ``--workers`` processes (2) rather than one each. 48 s on an idle 2-core CPU (115 s
under other developers' load). ``--dry-run-compile`` runs each job at its own level instead (real inductor code
generation on the CPU where the GPU run uses inductor): on 2026-12-06 all 127 checks ok or skipped (the CUDA op,
torchao) in 109 s with a warm inductor cache; it found the fp8 compiled-vs-eager tolerance too tight for fp32.

    python -m benchmarks.gpu_smoke                      # on the GPU machine (after the CUDA extension is built)
    python -m benchmarks.gpu_smoke --dry-run            # CPU: tiny models, fp32, dynamo level, Triton interpreter
    python -m benchmarks.gpu_smoke --only flux-dev,kernels --budget 120
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOL = {"bfloat16": 5e-2, "float32": 1e-4}
FP8_TOL = {"bfloat16": 0.1, "float32": 0.05}  # fp8 linears against the model's dtype (see precision_job)
# fp8 compiled against fp8 eager: inductor fuses the quantization, so an activation on an e4m3 rounding boundary can
# round to its neighbour; measured 2.2e-4 on the CPU (fp32, the emulated kernel, real inductor: --dry-run-compile).
# Also fp8 packed serving against fp8 generate alone: packed attention's last-bit differences move activations across
# rounding boundaries the same way (2.3e-4 in the CPU dry run, fp32, the CPU _scaled_mm kernel)
FP8_COMPILED_TOL = {"bfloat16": 5e-2, "float32": 1e-3}
KERNEL_TOL = {"transition": {"bfloat16": 2e-3, "float32": 1e-4}, "attention": {"bfloat16": 2e-2, "float32": 1e-5}}
PARITY_STEPS = 4
DRY_PARITY_STEPS = 3
RESULTS = ("ok", "failed", "error", "timeout", "crashed", "skipped", "not run", "running")
SCHEMA = 1


# ================================================================================================== jobs and checks
@dataclass
class Job:
    """One subprocess: ``checks`` ``[(name, expected GPU seconds)]`` in the order they run."""

    name: str
    label: str
    checks: list[tuple[str, float]]
    level: str = "dynamo"
    dry_s: float = 10.0   # measured CPU seconds of the dry run (2 cores, 2 workers): for the dry run's limits

    @property
    def expected_s(self) -> float:
        return float(sum(s for _, s in self.checks))


FAMILY_CHECKS = ("build", "parity_diffusers", "ralu_eager", "compiled_baseline", "compiled_ralu", "compiled_preset",
                 "no_recompile", "text_masks_graphs")
SERVING_CHECKS = [("build", 20.0), ("references", 6.0), ("engine_packed_graphs", 75.0), ("second_mix", 8.0),
                  ("engine_fp8", 12.0)]
KERNEL_CHECKS = [("startup", 12.0), ("transition_triton", 6.0), ("transition_cuda_op", 3.0), ("varlen_attention", 4.0),
                 ("copy_same_bytes", 2.0)]
PRECISION_CHECKS = [("build", 20.0), ("references", 8.0), ("fp8_eager", 10.0), ("fp8_torchao", 10.0),
                    ("fp8_compiled", 80.0), ("fp8_no_recompile", 5.0), ("attn_measure", 30.0),
                    ("model_cpu_offload", 10.0), ("layerwise_fp8_storage", 30.0)]


# the harness's own test jobs (tests/test_gpu_smoke.py): run only when named in --only
SELFTEST_JOBS = [Job("selftest-results", "harness: ok, failed, error, skipped", [("ok", 1.0), ("failed", 1.0),
                                                                                 ("error", 1.0), ("skipped", 1.0)]),
                 Job("selftest-hang", "harness: a check past its limit",
                     [("first", 1.0), ("hang", 1.0), ("after", 1.0)]),
                 Job("selftest-crash", "harness: the process dies in a check", [("crash", 1.0), ("after", 1.0)])]


def jobs() -> list[Job]:
    from benchmarks.smoke_families import FAMILIES

    out = []
    for fam in FAMILIES.values():
        checks = [(c, float(fam.expected_s[c])) for c in FAMILY_CHECKS if c in fam.expected_s]
        out.append(Job(fam.key, fam.label, checks, fam.level, dry_s=DRY_SECONDS.get(fam.key, 20.0)))
    out.append(Job("serving", "serving engine, FLUX.1-dev shape", list(SERVING_CHECKS), "inductor",
                   dry_s=DRY_SECONDS["serving"]))
    out.append(Job("kernels", "transition kernels, varlen attention, copy", list(KERNEL_CHECKS), "-",
                   dry_s=DRY_SECONDS["kernels"]))
    out.append(Job("precision", "fp8 linears and the measured attention backend, FLUX.1-dev shape",
                   list(PRECISION_CHECKS), "inductor", dry_s=DRY_SECONDS["precision"]))
    from benchmarks.smoke_editing import EDIT_CHECKS, EDIT_LEVEL

    out.append(Job("editing", "editing: img2img, inpainting, Kontext, Fill, control (FLUX.1-dev shape)",
                   list(EDIT_CHECKS), EDIT_LEVEL, dry_s=DRY_SECONDS["editing"]))
    return out


# measured on the 2-core CPU (dry run, 2 workers): seconds per job, for the dry run's time limits
DRY_SECONDS = {"flux-dev": 20.0, "flux-schnell": 18.0, "sd3-medium": 22.0, "sd35-large": 20.0, "sd35-medium": 25.0,
               "flux2-dev": 20.0, "flux2-klein": 16.0, "qwen-image": 25.0, "z-image": 25.0, "z-image-turbo": 20.0,
               "chroma": 22.0, "wan21": 25.0, "wan22": 30.0, "hunyuan-video15": 35.0, "serving": 30.0,
               "kernels": 25.0, "editing": 30.0, "precision": 30.0}


# ================================================================================================ worker side
class Skip(Exception):
    """A check that cannot run here (e.g. the CUDA op is not built): recorded as skipped with the reason."""


class Check:
    def __init__(self, path: str, tol: float | None):
        self.path, self.tol = path, tol
        self.error: float | None = None
        self.note = ""
        self.info: dict = {}
        self.failures: list[str] = []

    def compare(self, out, ref, what: str = "") -> float:
        """Relative L2 error ``||out - ref|| / ||ref||`` (float64), kept as the check's max error; shapes must agree
        and ``out`` be finite."""
        import torch

        if tuple(out.shape) != tuple(ref.shape):
            raise AssertionError(f"{what or 'output'}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
        o, r = out.detach().double(), ref.detach().double()
        if not bool(torch.isfinite(o).all()):
            raise AssertionError(f"{what or 'output'}: non-finite values")
        err = float((o - r).norm() / r.norm().clamp_min(1e-30))
        self.error = err if self.error is None else max(self.error, err)
        if what:
            self.info.setdefault("errors", {})[what] = err
        return err

    def expect(self, cond: bool, message: str) -> None:
        if not cond:
            self.failures.append(message)


class Recorder:
    """Writes one JSON line per event to the job's file: ``start`` before a check, ``end`` with its result."""

    def __init__(self, path: Path, job: str):
        self.job = job
        self.file = open(path, "a", buffering=1)
        self.status: dict[str, str] = {}

    def emit(self, **rec) -> None:
        self.file.write(json.dumps(rec, default=str) + "\n")
        self.file.flush()

    @contextlib.contextmanager
    def check(self, name: str, tol: float | None = None):
        """Run the ``with`` body as the check ``name``: ``failed`` when an expectation failed or the max error
        exceeds ``tol``, ``error`` on an exception (traceback to the job's log), ``skipped`` on :class:`Skip`."""
        path = f"{self.job}/{name}"
        c = Check(path, tol)
        self.emit(event="start", path=path, t=time.time())
        t0 = time.perf_counter()
        result = "ok"
        try:
            yield c
            if c.failures:
                result, c.note = "failed", "; ".join(c.failures) + (f"; {c.note}" if c.note else "")
            elif c.tol is not None and c.error is not None and not c.error <= c.tol:
                result = "failed"
                c.note = f"error {c.error:.3g} > tolerance {c.tol:g}" + (f"; {c.note}" if c.note else "")
        except Skip as exc:
            result, c.note = "skipped", str(exc)
        except Exception as exc:  # noqa: BLE001 - every failure is a row, the job goes on
            result = "error"
            c.note = f"{type(exc).__name__}: {exc}"[:400]
            print(f"[{path}] {type(exc).__name__}", file=sys.stderr)
            traceback.print_exc()
        seconds = time.perf_counter() - t0
        self.status[name] = result
        self.emit(event="end", path=path, result=result, seconds=round(seconds, 3), error=c.error, tol=c.tol,
                  note=c.note, info=c.info)
        print(f"[{path}] {result} in {seconds:.1f} s" + (f", error {c.error:.3g}" if c.error is not None else "") +
              (f" ({c.note})" if c.note else ""), flush=True)


@dataclass
class Ctx:
    dry: bool
    level: str           # "auto" (each family's own), "inductor" or "dynamo"
    dry_compile: bool = False  # dry run with each family's own level (real inductor on the CPU)
    device: object = None
    dtype: object = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def tol(self) -> float:
        return TOL[str(self.dtype).replace("torch.", "")]

    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def run_check(rec: Recorder, name: str, body: Callable[[Check], None], tol: float | None = None,
              needs: tuple[str, ...] = ("build",)) -> bool:
    """Run ``body(check)`` as the check ``name`` unless a check it needs is not ok; True when it ended ok."""
    missing = [n for n in needs if n != name and rec.status.get(n) != "ok"]
    if missing:
        path = f"{rec.job}/{name}"
        note = f"needs {', '.join(missing)} (not ok)"
        rec.status[name] = "not run"
        rec.emit(event="end", path=path, result="not run", seconds=0.0, error=None, tol=tol, note=note, info={})
        print(f"[{path}] not run ({note})", flush=True)
        return False
    with rec.check(name, tol) as c:
        body(c)
    return rec.status[name] == "ok"


def _stamp_cost(runner) -> dict:
    """What the runner's per-call content stamp of its weight copies' sources costs (recorded, not judged): the
    sources' MiB and the mean ms of :func:`ralu_runtime.compile.runner.content_stamp` over 5 calls (its host sync
    included: wall-clock timing, whatever the device)."""
    from benchmarks._common import time_fn
    from ralu_runtime.compile.runner import content_stamp

    tensors = runner.impl.copied_tensors()
    timed = time_fn(lambda: content_stamp(tensors), warmup=1, reps=5, device="cpu")
    return {"stamp_sources_mib": round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1),
            "stamp_ms": round(timed["mean_ms"], 3)}


def _finite(t) -> bool:
    import numpy as np
    import torch

    if isinstance(t, torch.Tensor):
        return bool(torch.isfinite(t).all())
    return bool(np.isfinite(np.asarray(t)).all())


def _regions_agree(a, b) -> tuple[int, int]:
    """(blocks chosen by both, blocks chosen by either) of two ``return_masks`` results."""
    if a is None or b is None:
        return 0, 0
    both = int((a & b).sum())
    either = int((a | b).sum())
    return both, either


LEVELS = ("inductor", "dynamo", "eager")
DRY_TRACED = ("flux-dev", "serving", "precision")  # the dry run's jobs at the dynamo level (the others: eager, see _level)


def compile_backend(level: str, fam_compile_vae: bool, cuda: bool) -> tuple[str, dict]:
    """``(backend, compile_options)`` of ``generate`` at a compile level (see the module docstring); ``eager``: the
    eager runner (ralu's fused weights, CUDA graphs on a GPU, nothing traced)."""
    if level == "eager":
        return "eager", {"cuda_graphs": cuda}
    opts = {"cuda_graphs": cuda, "compile_vae": bool(fam_compile_vae and level == "inductor" and cuda)}
    if level == "dynamo":
        opts["dynamo_backend"] = "eager"
    return "inductor", opts


def effective_level(level: str, dry: bool, dry_compile: bool, job: str, own: str) -> str:
    """The job's compile level: ``--level`` when given; a dry run traces FLUX.1-dev and the serving engine with
    dynamo and runs the other families on the eager runner (the dynamo traces cost ~10 s per family on a 2-core CPU
    and each family's own tests trace its blocks); ``--dry-run-compile`` and the GPU run use the job's own level."""
    if own == "-" or level != "auto":
        return own if own == "-" else level
    if dry and not dry_compile:
        return "dynamo" if job in DRY_TRACED else "eager"
    return own


def _level(ctx: Ctx, job: str, own: str) -> str:
    return effective_level(ctx.level, ctx.dry, ctx.dry_compile, job, own)


def family_job(key: str, ctx: Ctx, rec: Recorder) -> None:
    import torch

    from benchmarks import smoke_families as SF
    from ralu_runtime import generate
    from ralu_runtime.compile import compile_stats, ensure_backend

    fam = SF.FAMILIES[key]
    dev, dt = ctx.device, ctx.dtype
    st: dict = {}
    size = SF.sizes(fam, ctx.dry)
    steps = DRY_PARITY_STEPS if ctx.dry else PARITY_STEPS
    edge = {"edge_detector": "gpu"}  # ralu's torch Canny (on the device; on the CPU in a dry run)
    lat = dict(size, guidance_scale=fam.guidance, output_type="latent", progress=False)
    level = _level(ctx, key, fam.level)
    backend, opts = compile_backend(level, fam.compile_vae, ctx.cuda)
    compiled = dict(backend=backend, compile_options=opts)

    def build(c: Check):
        t0 = time.perf_counter()
        st["pipe"] = SF.build(fam, "dry" if ctx.dry else "smoke", dev, dt)
        st["emb"] = SF.embeds(fam, st["pipe"], 1, ctx.dry, dev, dt, seed=0)
        if ctx.cuda:
            torch.cuda.synchronize()
        tr = st["pipe"].transformer
        c.info.update(build_s=round(time.perf_counter() - t0, 2), size=size, dtype=ctx.dtype_name(), level=level,
                      compile_options=opts, transformer_params=sum(p.numel() for p in tr.parameters()),
                      text_len=int(st["emb"]["prompt_embeds"].shape[1]))
        if ctx.dry:  # the GPU run's model, on the meta device: its configs and depth overrides are valid
            c.info["smoke_shape"] = SF.meta_shape(fam)
        if ctx.cuda:
            c.info["gpu_mem_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)

    def parity(c: Check):
        pipe, emb = st["pipe"], st["emb"]
        ref = SF.pipeline_latents(fam, pipe, emb, steps=steps, seeds=[7], **size)
        out = generate(pipe, **emb, speedup=None, num_inference_steps=steps, seed=7, **lat).images
        st["baseline"] = out
        c.compare(SF.as_pipeline_form(fam, pipe, out), ref, "latents")
        c.info["steps"] = steps

    def ralu_eager(c: Check):
        pipe, emb = st["pipe"], st["emb"]
        out = generate(pipe, **emb, speedup=fam.preset, seed=11, **dict(lat, output_type="pt"), **edge)
        c.expect(_finite(out.images), "decoded RALU output is not finite")
        c.info["timings_s"] = {k: round(v, 3) for k, v in out.timings.items()}
        preset = generate(pipe, **emb, speedup=fam.preset, seed=12, return_masks=True, **lat, **edge)
        c.expect(_finite(preset.images), "RALU latents are not finite")
        sched = preset.schedule
        pinned = dataclasses.replace(sched, ratio=1.0, name=f"{sched.name} (ratio 1)")
        st.update(preset=preset, pinned=pinned,
                  pinned_ref=generate(pipe, **emb, speedup=pinned, seed=13, **lat, **edge).images)
        c.info["schedule"] = {"name": sched.name, "steps": list(sched.steps), "ratio": sched.ratio}
        if fam.masked:  # eager references of the mask check, before anything is compiled
            two = SF.embeds(fam, pipe, 2, ctx.dry, dev, dt, seed=1)
            t = two["prompt_embeds"].shape[1]
            st["mask_embeds"] = [SF.with_valid_lengths(two, lens) for lens in ((t, max(1, t // 3)),
                                                                             (max(1, t // 2), t - 1))]
            st["mask_refs"] = [generate(pipe, **e, speedup=pinned, seed=14, **lat, **edge).images
                               for e in st["mask_embeds"]]
            c.info["mask_valid_lengths"] = [[int(v) for v in e["prompt_embeds_mask"].sum(1).tolist()]
                                            for e in st["mask_embeds"]]

    def compiled_baseline(c: Check):
        pipe, emb = st["pipe"], st["emb"]
        g0 = compile_stats()["unique_graphs"]
        t0 = time.perf_counter()
        out = generate(pipe, **emb, speedup=None, num_inference_steps=steps, seed=7, **lat, **compiled).images
        runner = ensure_backend(pipe, backend, **opts)  # the installed one (same options): nothing new
        st["runner"] = runner
        c.compare(out, st["baseline"], "latents")
        c.info.update(first_call_s=round(time.perf_counter() - t0, 2), graphs=compile_stats()["unique_graphs"] - g0,
                      builds=len(runner.builds), applied=runner.applied)
        c.expect(runner.applied["cuda_graphs"] == ctx.cuda, f"CUDA graphs {runner.applied['cuda_graphs']}")

    def compiled_ralu(c: Check):
        pipe, emb = st["pipe"], st["emb"]
        g0, b0 = compile_stats()["unique_graphs"], len(st["runner"].builds)
        t0 = time.perf_counter()
        out = generate(pipe, **emb, speedup=st["pinned"], seed=13, **lat, **edge, **compiled).images
        c.compare(out, st["pinned_ref"], "latents")
        c.info.update(first_call_s=round(time.perf_counter() - t0, 2), graphs=compile_stats()["unique_graphs"] - g0,
                      captures=len(st["runner"].builds) - b0)

    def compiled_preset(c: Check):
        pipe, emb, ref = st["pipe"], st["emb"], st["preset"]
        out = generate(pipe, **emb, speedup=fam.preset, seed=12, return_masks=True, **lat, **edge, **compiled)
        c.expect(_finite(out.images), "compiled RALU latents are not finite")
        both, either = _regions_agree(out.masks, ref.masks)
        c.info["regions_agree"] = f"{both}/{either}"
        if both == either:
            c.compare(out.images, ref.images, "latents")
        else:
            c.note = (f"regions differ from eager in {either - both} of {either} blocks (bf16 near-ties of the edge "
                      "counts): latents not compared (compiled_ralu compares them with a fixed region choice)")

    def no_recompile(c: Check):
        pipe, emb = st["pipe"], st["emb"]
        g0, b0 = compile_stats()["unique_graphs"], len(st["runner"].builds)
        out = generate(pipe, **emb, speedup=fam.preset, seed=15, **lat, **edge, **compiled)
        c.expect(_finite(out.images), "latents are not finite")
        graphs, captures = compile_stats()["unique_graphs"] - g0, len(st["runner"].builds) - b0
        c.info.update(new_graphs=graphs, new_captures=captures)
        c.expect(graphs == 0, f"{graphs} new dynamo graph(s) on a second call")
        c.expect(captures == 0, f"{captures} new CUDA-graph capture(s) on a second call")

    def text_masks(c: Check):
        pipe = st["pipe"]
        g0, b0 = compile_stats()["unique_graphs"], len(st["runner"].builds)
        for i, (e, ref) in enumerate(zip(st["mask_embeds"], st["mask_refs"])):
            out = generate(pipe, **e, speedup=st["pinned"], seed=14, **lat, **edge, **compiled).images
            c.compare(out, ref, f"call {i + 1}")
        c.info.update(new_graphs=compile_stats()["unique_graphs"] - g0, captures=len(st["runner"].builds) - b0)

    with torch.no_grad():
        run_check(rec, "build", build, needs=())
        run_check(rec, "parity_diffusers", parity, tol=ctx.tol)
        run_check(rec, "ralu_eager", ralu_eager)
        run_check(rec, "compiled_baseline", compiled_baseline, tol=ctx.tol, needs=("parity_diffusers",))
        run_check(rec, "compiled_ralu", compiled_ralu, tol=ctx.tol, needs=("ralu_eager", "compiled_baseline"))
        run_check(rec, "compiled_preset", compiled_preset, tol=ctx.tol, needs=("ralu_eager", "compiled_baseline"))
        run_check(rec, "no_recompile", no_recompile, needs=("compiled_preset",))
        if fam.masked:
            run_check(rec, "text_masks_graphs", text_masks, tol=ctx.tol, needs=("ralu_eager", "compiled_baseline"))


def editing_job(ctx: Ctx, rec: Recorder) -> None:
    """The ``editing`` job: checks and order in ``benchmarks/smoke_editing.py``'s docstring."""
    import torch

    from benchmarks import smoke_families as SF
    from benchmarks.smoke_editing import (EDIT_LEVEL, WORKFLOWS, build_edit_pipelines, edit_inputs, edit_kwargs,
                                          pipeline_latents)
    from ralu_runtime import generate
    from ralu_runtime.compile import compile_stats

    fam = SF.FAMILIES["flux-dev"]
    dev, dt = ctx.device, ctx.dtype
    size = SF.sizes(fam, ctx.dry)
    h, w = size["height"], size["width"]
    steps = PARITY_STEPS  # 4: strength 0.6 keeps 2 steps
    level = _level(ctx, "editing", EDIT_LEVEL)
    backend, opts = compile_backend(level, False, ctx.cuda)
    edge = {"edge_detector": "gpu"}
    lat = dict(height=h, width=w, guidance_scale=fam.guidance, output_type="latent", progress=False)
    st: dict = {}

    def build(c):
        st["base"] = SF.build(fam, "dry" if ctx.dry else "smoke", dev, dt)
        st["pipes"] = build_edit_pipelines(st["base"], dev, dt)
        st["emb"] = SF.embeds(fam, st["base"], 1, ctx.dry, dev, dt, seed=0)
        st["image"], st["mask"] = edit_inputs(h, w)
        c.info.update(size=[h, w], dtype=ctx.dtype_name(), level=level, compile_options=opts,
                      in_channels={k: int(p.transformer.config.in_channels) for k, p in st["pipes"].items()})

    def parity(workflow):
        def body(c):
            pipe = st["pipes"][workflow]
            kw = edit_kwargs(workflow, st["image"], st["mask"], h, w)
            ref = pipeline_latents(pipe, workflow, st["emb"], kw, steps=steps, guidance=fam.guidance, seed=7, h=h,
                                   w=w)
            out = generate(pipe, **st["emb"], **kw, speedup=None, num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(7), **lat).images
            c.compare(out, ref, "latents")
        return body

    def ralu_kwargs(workflow):
        return edit_kwargs(workflow, st["image"], st["mask"], h, w, strength=0.9)

    def ralu_eager(c):
        st["pinned"], st["refs"] = {}, {}
        for wf in WORKFLOWS:
            pipe = st["pipes"][wf]
            out = generate(pipe, **st["emb"], **ralu_kwargs(wf), speedup="7x", seed=11, **lat, **edge)
            c.expect(_finite(out.images), f"{wf}: RALU 7x latents are not finite")
            sched = dataclasses.replace(out.schedule, ratio=1.0, name=f"{out.schedule.name} (ratio 1)")
            st["pinned"][wf] = sched
            st["refs"][wf] = generate(pipe, **st["emb"], **ralu_kwargs(wf), speedup=sched, seed=13, **lat,
                                      **edge).images
        c.info["schedule"] = {"steps": list(st["pinned"]["kontext"].steps)}

    def compiled(c):
        compiled_kw = dict(backend=backend, compile_options=opts)
        for wf in WORKFLOWS:
            pipe = st["pipes"][wf]
            out = generate(pipe, **st["emb"], **ralu_kwargs(wf), speedup=st["pinned"][wf], seed=13, **lat, **edge,
                           **compiled_kw).images
            c.compare(out, st["refs"][wf], wf)
        g0 = compile_stats()["unique_graphs"]
        other = torch.flip(st["image"], dims=[-1])
        kw = {**ralu_kwargs("kontext"), "image": other}
        out = generate(st["pipes"]["kontext"], **st["emb"], **kw, speedup=st["pinned"]["kontext"], seed=13, **lat,
                       **edge, **compiled_kw).images
        c.expect(_finite(out), "second Kontext reference: latents not finite")
        graphs = compile_stats()["unique_graphs"] - g0
        c.info["second_reference_new_graphs"] = graphs
        c.expect(graphs == 0, f"{graphs} new dynamo graph(s) for a second Kontext reference")

    with torch.no_grad():
        run_check(rec, "build", build, needs=())
        for wf in WORKFLOWS:
            run_check(rec, f"{wf}_parity", parity(wf), tol=ctx.tol)
        run_check(rec, "ralu_eager", ralu_eager)
        run_check(rec, "compiled_ralu", compiled, tol=ctx.tol, needs=("ralu_eager",))


def serving_job(ctx: Ctx, rec: Recorder) -> None:
    import torch

    from benchmarks import smoke_families as SF
    from ralu_runtime import generate
    from ralu_runtime.compile import compile_stats, ensure_backend
    from ralu_runtime.serving import Engine, EngineConfig

    fam = SF.FAMILIES["flux-dev"]
    dev, dt = ctx.device, ctx.dtype
    st: dict = {}
    edge = {"edge_detector": "gpu"}  # ralu's torch Canny (on the device; on the CPU in a dry run)
    level = _level(ctx, "serving", "inductor")
    backend, opts = compile_backend(level, False, ctx.cuda)
    hw = [(128, 128), (96, 128), (64, 64)] if ctx.dry else [(1024, 1024), (768, 1024), (512, 512)]

    def build(c: Check):
        st["pipe"] = SF.build(fam, "dry" if ctx.dry else "smoke", dev, dt)
        st["emb"] = [SF.embeds(fam, st["pipe"], 1, ctx.dry, dev, dt, seed=s) for s in range(4)]
        c.info.update(level=level, compile_options=opts, sizes=hw)

    def references(c: Check):
        pipe, emb = st["pipe"], st["emb"]
        lat = dict(guidance_scale=fam.guidance, output_type="latent", progress=False, **edge)
        pinned = {}
        for name in ("7x", "4x"):
            sched = generate(pipe, **emb[0], height=hw[2][0], width=hw[2][1], speedup=name, seed=0, **lat).schedule
            pinned[name] = dataclasses.replace(sched, ratio=1.0, name=f"{sched.name} (ratio 1)")
        (h0, w0), (h1, w1), (h2, w2) = hw
        st["requests"] = [
            (dict(height=h0, width=w0, speedup=pinned["7x"], **emb[0]), 11),
            (dict(height=h1, width=w1, speedup=pinned["4x"], **emb[1]), 12),
            (dict(height=h2, width=w2, speedup=None, num_inference_steps=4, **emb[2]), 13),
            (dict(height=h0, width=w0, speedup="7x", return_masks=True, **emb[3]), 14),
        ]
        st["second"] = [
            (dict(height=h1, width=w1, speedup=pinned["7x"], **emb[2]), 21),
            (dict(height=h2, width=w2, speedup=pinned["4x"], **emb[0]), 22),
            (dict(height=h0, width=w0, speedup=None, num_inference_steps=3, **emb[1]), 23),
        ]
        st["lat"] = lat
        st["refs"] = [generate(pipe, seed=s, **lat, **kw) for kw, s in st["requests"] + st["second"]]
        c.expect(all(_finite(r.images) for r in st["refs"]), "a reference is not finite")

    def engine_round(c: Check, requests, refs, first: bool):
        pipe = st["pipe"]
        runner = st["runner"]
        b0 = len(runner.builds)
        with Engine(pipe, EngineConfig(gather_timeout_s=2.0), output_type="latent", backend=backend,
                    compile_options=opts, guidance_scale=fam.guidance, **edge) as eng:
            handles = [eng.submit(seed=s, **kw) for kw, s in requests]
            outs = [h.result(timeout=600) for h in handles]
            m = eng.metrics()
        c.expect(get_runner(pipe) is runner, "the engine replaced the installed runner")
        for i, ((kw, _s), out, ref) in enumerate(zip(requests, outs, refs)):
            if kw.get("return_masks"):
                both, either = _regions_agree(out.masks, ref.masks)
                c.info[f"request {i + 1} regions_agree"] = f"{both}/{either}"
                if both == either:
                    c.compare(out.images, ref.images, f"request {i + 1}")
                else:
                    c.expect(_finite(out.images), f"request {i + 1} not finite")
            else:
                c.compare(out.images, ref.images, f"request {i + 1}")
        packed_captures = sum(1 for b in runner.builds[b0:] if b.kind == "cuda_graph_packed")
        c.info.update(model_calls=m["model_calls"], packed_calls=m["packed_calls"], packed_captures=packed_captures,
                      builds=[b.kind for b in runner.builds[b0:]])
        c.expect(m["requests"]["ok"] == len(requests), f"{m['requests']['ok']} of {len(requests)} requests ok")
        c.expect(m["packed_calls"] > 0, "no packed model call")
        if ctx.cuda and first:  # a later mix may fall into buckets captured already
            c.expect(packed_captures > 0, "no CUDA graph captured for a packed call")
        return packed_captures

    def get_runner(pipe):
        from ralu_runtime.adapters import get_adapter

        return get_adapter(pipe).runner

    def engine(c: Check):
        st["runner"] = ensure_backend(st["pipe"], backend, **opts)
        g0 = compile_stats()["unique_graphs"]
        t0 = time.perf_counter()
        n = len(st["requests"])
        engine_round(c, st["requests"], st["refs"][:n], first=True)
        c.info.update(seconds_with_compile=round(time.perf_counter() - t0, 2),
                      graphs=compile_stats()["unique_graphs"] - g0)

    def second_mix(c: Check):
        g0 = compile_stats()["unique_graphs"]
        n = len(st["requests"])
        engine_round(c, st["second"], st["refs"][n:], first=False)
        graphs = compile_stats()["unique_graphs"] - g0
        c.info["new_graphs"] = graphs
        c.expect(graphs == 0, f"{graphs} new dynamo graph(s) for a new mix of requests")

    def engine_fp8(c: Check):
        """``ralu serve --precision fp8``: an eager engine whose default is fp8, two sizes packed into shared calls,
        each equal to fp8 ``generate`` alone within FP8_COMPILED_TOL (same kernel and per-token activation scales,
        but packed attention's last bits can move an activation across an e4m3 rounding boundary); their distance to the model's own precision is reported, not judged (the precision job judges fp8)."""
        pipe, lat = st["pipe"], st["lat"]
        requests = st["requests"][:2]
        with Engine(pipe, EngineConfig(gather_timeout_s=2.0), output_type="latent", backend="eager",
                    precision="fp8", guidance_scale=fam.guidance, **edge) as eng:
            outs = [h.result(timeout=600) for h in [eng.submit(seed=s, **kw) for kw, s in requests]]
            m = eng.metrics()
        runner = get_runner(pipe)
        c.expect(runner.applied.get("precision") == "fp8", f"precision {runner.applied.get('precision')}")
        c.expect(m["packed_calls"] > 0, "no packed model call")
        for i, ((kw, s), out, own) in enumerate(zip(requests, outs, st["refs"])):
            alone = generate(pipe, seed=s, backend="eager", precision="fp8", **lat, **kw)
            c.compare(out.images, alone.images, f"request {i + 1} vs fp8 generate")
            rel = (out.images.double() - own.images.double()).norm() / own.images.double().norm()
            c.info[f"request {i + 1} vs {ctx.dtype_name()}"] = round(float(rel), 5)
        c.info.update(packed_calls=m["packed_calls"], model_calls=m["model_calls"],
                      fp8_layers=runner.report()["fp8_layers"])

    with torch.no_grad():
        run_check(rec, "build", build, needs=())
        run_check(rec, "references", references)
        run_check(rec, "engine_packed_graphs", engine, tol=ctx.tol, needs=("references",))
        run_check(rec, "second_mix", second_mix, tol=ctx.tol, needs=("engine_packed_graphs",))
        run_check(rec, "engine_fp8", engine_fp8, tol=FP8_COMPILED_TOL[ctx.dtype_name()], needs=("references",))


def kernels_job(ctx: Ctx, rec: Recorder) -> None:
    import torch

    dev = ctx.device
    st: dict = {}
    dtypes = (torch.bfloat16, torch.float32)
    g = torch.Generator().manual_seed(0)
    # (name, kind, coarse grid (h, w), ratio): FLUX 1024^2 boundaries, and Wan 480p x 81 frames (21 latent frames of
    # 15 x 26 coarse tokens stacked: 8190 coarse, 32 760 fine tokens)
    shapes = ([("flux_1to2_r0.1", "1to2", (32, 32), 0.1), ("flux_2to3_r0.3", "2to3", (32, 32), 0.3),
               ("wan480p81_1to2_r0.1", "1to2", (315, 26), 0.1), ("wan480p81_2to3_r0.3", "2to3", (315, 26), 0.3)]
              if not ctx.dry else
              [("flux_1to2_r0.1", "1to2", (8, 8), 0.1), ("flux_2to3_r0.3", "2to3", (8, 8), 0.3),
               ("video_2to3_r0.3", "2to3", (12, 6), 0.3)])

    def startup(c: Check):
        from ralu_kernels import _csrc
        from ralu_kernels import transition as T

        st["T"] = T
        st["csrc"] = bool(ctx.cuda and _csrc.load_csrc())
        c.info.update(triton=T.HAS_TRITON, csrc=st["csrc"], interpret=os.environ.get("TRITON_INTERPRET") == "1")
        st["cases"] = []
        for name, kind, (h, w), ratio in shapes:
            maps = T.example_transition_maps(kind, h, w, ratio, 2, generator=g, device=dev)
            n_src = maps["pos"].shape[1]
            seeds = torch.randint(0, 2**62, (2,), generator=g, dtype=torch.int64).to(dev)
            x = torch.randn(2, n_src, 64, generator=g)
            st["cases"].append((name, maps, x, seeds))
        c.info["shapes"] = {n: int(m["src_index"].shape[1]) for n, m, _x, _s in st["cases"]}

    def call(maps, x, seeds, impl, dtype, **out):
        z = 6.261
        e = 0.3
        a, s_next = 1.0 / (z * (1 - e) + e), e / (z * (1 - e) + e)
        return st["T"].stage_transition(x.to(dev, dtype), maps["pos"], maps["src_index"], maps["group"], maps["child"],
                                        seeds, a=a, b=1.0 - s_next, c=1.0 / z**2, pos_scale=maps["pos_scale"],
                                        order=maps["order"], num_up=maps["num_up"], impl=impl,
                                        check_values=False if out else None, **out)

    def triton(c: Check):
        if not st["T"].HAS_TRITON:
            raise Skip("Triton not importable")
        if not ctx.cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("CPU without TRITON_INTERPRET=1")
        for name, maps, x, seeds in st["cases"]:
            for dtype in dtypes:
                ref, ref_pos = call(maps, x, seeds, "torch", dtype)
                out, pos = call(maps, x, seeds, "triton", dtype)
                tol = KERNEL_TOL["transition"][str(dtype).replace("torch.", "")]
                err = c.compare(out, ref, f"{name} {dtype}")
                c.expect(err <= tol, f"{name} {dtype}: {err:.3g} > {tol:g}")
                c.expect(torch.equal(pos, ref_pos), f"{name} {dtype}: positions differ")
        c.tol = KERNEL_TOL["transition"]["bfloat16"]

    def cuda_op(c: Check):
        if not st["csrc"]:
            raise Skip("ralu_kernels._C not built / no CUDA" if ctx.cuda else "CPU: the CUDA op needs a GPU")
        for name, maps, x, seeds in st["cases"]:
            for dtype in dtypes:
                tri, tri_pos = call(maps, x, seeds, "triton", dtype)
                op, op_pos = call(maps, x, seeds, "cuda", dtype)
                c.compare(op, tri, f"{name} {dtype} vs triton")
                c.expect(torch.equal(op, tri) and torch.equal(op_pos, tri_pos),
                         f"{name} {dtype}: CUDA op != Triton (bitwise)")
        c.tol = 0.0

    def attention(c: Check):
        from ralu_kernels.attention import available_backends, cu_seqlens_from_lens, padded_attention, varlen_attention

        lens = [32760, 12480, 7800] if not ctx.dry else [327, 124, 78]
        heads, dim = (40, 128) if not ctx.dry else (2, 64)
        for dtype in (torch.bfloat16,) if ctx.cuda else (torch.float32,):
            q, k, v = (torch.randn(sum(lens), heads, dim, generator=g).to(dev, dtype) for _ in range(3))
            cu = cu_seqlens_from_lens(lens, device="cpu")
            ref = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), backend="sdpa")
            out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), backend="auto")
            name = str(dtype).replace("torch.", "")
            c.info[f"backend {name}"] = available_backends(dev, dtype)[0]
            c.compare(out, ref, f"auto vs per-segment sdpa {name}")
            if ctx.dry:  # small enough for the dense block-diagonal reference too
                c.compare(ref, padded_attention(q, k, v, cu, cu, max(lens), max(lens)), "sdpa vs padded")
            c.tol = KERNEL_TOL["attention"][name]
        c.info["lens"] = lens

    def copy(c: Check):
        from benchmarks.bench_transition import bytes_moved, graph_time_us

        name, maps, x, seeds = st["cases"][-1]
        nbytes = bytes_moved(2, int(maps["src_index"].shape[1]), maps["num_up"], 64, 2)
        src = torch.randint(0, 255, (nbytes // 2,), dtype=torch.uint8, generator=g).to(dev)
        dst = torch.empty_like(src)
        dst.copy_(src)
        c.expect(torch.equal(dst, src), "copy differs")
        c.info.update(shape=name, bytes=nbytes)
        if ctx.cuda:  # as bench_transition.py: device time of one copy launched from a CUDA graph (recorded only)
            c.info["copy_graph_us"] = round(graph_time_us(lambda: dst.copy_(src)), 3)
            impl = "cuda" if st["csrc"] else "triton"
            xb = x.to(dev, torch.bfloat16)
            out = torch.empty(xb.shape[0], maps["src_index"].shape[1], xb.shape[2], device=dev, dtype=xb.dtype)
            pos_out = torch.empty(xb.shape[0], maps["src_index"].shape[1], 2, device=dev)
            try:  # the kernel the same way (bench_transition's call): information, not part of the check
                c.info[f"{impl}_graph_us"] = round(graph_time_us(lambda: call(maps, xb, seeds, impl, torch.bfloat16,
                                                                               out=out, pos_out=pos_out)), 3)
                c.info["pct_of_copy"] = round(100 * c.info["copy_graph_us"] / c.info[f"{impl}_graph_us"], 1)
            except Exception as exc:  # noqa: BLE001
                c.info["kernel_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]

    with torch.no_grad():
        run_check(rec, "startup", startup, needs=())
        run_check(rec, "transition_triton", triton, needs=("startup",))
        run_check(rec, "transition_cuda_op", cuda_op, needs=("startup",))
        run_check(rec, "varlen_attention", attention, needs=("startup",))
        run_check(rec, "copy_same_bytes", copy, needs=("startup",))


def _param_state(module) -> list:
    """Identity, storage, version and dtype of every parameter of ``module`` (what ralu must leave as found)."""
    return [(n, id(p), p.data_ptr(), p._version, p.dtype) for n, p in module.named_parameters()]


def precision_job(ctx: Ctx, rec: Recorder) -> None:
    """The ``precision`` job (FLUX.1-dev shape, as the flux-dev job builds it): ``precision="fp8"`` and
    ``attn_backend="measure"`` on the GPU. Every comparison runs RALU 7x with every coarse token upsampled at e_1
    (ratio 1: no region choice that could differ), the same seed.

    ``references``        the model's dtype (bf16), eager runner: the reference latents; the parameters' state
    ``fp8_eager``         fp8 linears with ralu's ``torch._scaled_mm`` kernel (a dry run: the fp32 emulation), eager:
                          within FP8_TOL of the reference; block Linears quantized (the runner's report)
    ``fp8_torchao``       the same with torchao's kernel where torchao is importable (else skipped): within FP8_TOL
                          of the reference and of the scaled_mm run
    ``fp8_compiled``      fp8 with the kernel ``auto`` picks, compiled at the job's level (inductor on the GPU) with
                          CUDA graphs: within FP8_COMPILED_TOL of the eager run of that kernel (bf16 5e-2, fp32 1e-3)
    ``fp8_no_recompile``  a second compiled fp8 call (another seed): no new dynamo graph, no new capture; the user's
                          parameters as found (identity, storage, version)
    ``attn_measure``      ``attn_backend="measure"`` (dynamo level, CUDA graphs): the backends timed on the call's
                          attention shapes, one chosen per stage signature (reported), latents within the dtype's
                          tolerance of the reference on the measuring call and on the next
    ``model_cpu_offload`` diffusers' ``enable_model_cpu_offload`` on the job's pipeline, RALU 7x (its region choice:
                          the preview decode), eager: equal (the dtype's tolerance) to the same call on the pipeline
                          on the device; the transformer on the device while the call ran, every model back on the
                          CPU after it; peak device memory of the two calls reported; backend="inductor" refused.
                          Then the hooks are removed and the pipeline moved back
    ``layerwise_fp8_storage`` diffusers' ``enable_layerwise_casting`` (float8_e4m3fn storage, the model's dtype to
                          compute), eager: equal (the dtype's tolerance) to a second build of the model (same seed)
                          whose cast layers hold the weights rounded to float8, fewer weight bytes; compiled blocks
                          (dynamo traced, its eager backend, no CUDA graphs) running ralu's cast shadows equal to the
                          eager call; CUDA graphs on the cast model refused (ValueError) before any model call. Runs
                          last: it casts the job's model

    FP8_TOL (relative L2 of the latents): bf16 0.1, fp32 0.05. Measured on the CPU (tests/test_fp8.py, tiny random
    FLUX, 3 stages): 0.27 % (fp32) and 0.48 % (bf16) on the final latents, 0.4-0.8 % per model call; e4m3 keeps 3
    mantissa bits (unit roundoff 2^-4), per-row and per-token scales keep the products' errors at about that per
    call. The bound leaves room for full width and bf16 (5e-2 alone) and still fails a wrong scale, a transposed or
    stale weight or a missing bias (O(1) errors).
    """
    import torch

    from benchmarks import smoke_families as SF
    from ralu_runtime import generate
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.compile import attention_report, compile_stats, uncompile_adapter
    from ralu_runtime.compile.fp8 import resolve_kernel

    fam = SF.FAMILIES["flux-dev"]
    dev, dt = ctx.device, ctx.dtype
    st: dict = {}
    size = SF.sizes(fam, ctx.dry)
    lat = dict(size, guidance_scale=fam.guidance, output_type="latent", progress=False, edge_detector="gpu")
    level = _level(ctx, "precision", "inductor")
    backend, opts = compile_backend(level, False, ctx.cuda)
    fp8_tol = FP8_TOL[ctx.dtype_name()]
    eager_kernel = "scaled_mm" if ctx.cuda else "emulated"       # the CPU's _scaled_mm is slower than the emulation
    compiled_kernel = resolve_kernel("auto", dev) if ctx.cuda else "emulated"

    def fp8(kernel, **extra):
        return dict(precision="fp8", compile_options={"fp8_kernel": kernel, **extra})

    def build(c: Check):
        st["pipe"] = SF.build(fam, "dry" if ctx.dry else "smoke", dev, dt)
        st["emb"] = SF.embeds(fam, st["pipe"], 1, ctx.dry, dev, dt, seed=0)
        c.info.update(size=size, dtype=ctx.dtype_name(), level=level, compile_options=opts,
                      kernels={"eager": eager_kernel, "compiled": compiled_kernel})

    def references(c: Check):
        pipe, emb = st["pipe"], st["emb"]
        sched = generate(pipe, **emb, speedup="7x", seed=0, **lat).schedule
        st["pinned"] = dataclasses.replace(sched, ratio=1.0, name=f"{sched.name} (ratio 1)")
        st["ref"] = generate(pipe, **emb, speedup=st["pinned"], seed=13, **lat).images
        c.expect(_finite(st["ref"]), "reference latents are not finite")
        st["params"] = _param_state(pipe.transformer)
        st["sched"] = sched
        c.info["schedule_steps"] = list(st["pinned"].steps)

    def run_fp8(kernel, backend_, seed=13, **extra):
        return generate(st["pipe"], **st["emb"], speedup=st["pinned"], seed=seed, **lat, backend=backend_,
                        **fp8(kernel, **extra)).images

    def fp8_eager(c: Check):
        out = run_fp8(eager_kernel, "eager", cuda_graphs=ctx.cuda)
        report = get_adapter(st["pipe"]).runner.report()
        c.compare(out, st["ref"], f"fp8 {eager_kernel} vs {ctx.dtype_name()}")
        c.expect(report["fp8_layers"] > 0, "no Linear was quantized")
        c.info.update(kernel=eager_kernel, fp8_layers=report["fp8_layers"], fp8_mib=report["fp8_mib"])
        st[("fp8", eager_kernel)] = out

    def fp8_torchao(c: Check):
        if not ctx.cuda:
            raise Skip("torchao's fp8 kernel runs on CUDA only")
        try:
            resolve_kernel("torchao", dev)
        except ImportError as exc:
            raise Skip(f"torchao not importable ({exc}); carry its wheel (docs/gpu.md)") from exc
        out = run_fp8("torchao", "eager", cuda_graphs=True)
        c.compare(out, st["ref"], f"fp8 torchao vs {ctx.dtype_name()}")
        if ("fp8", "scaled_mm") in st:
            c.compare(out, st[("fp8", "scaled_mm")], "torchao vs scaled_mm")
        c.info["fp8_layers"] = get_adapter(st["pipe"]).runner.report()["fp8_layers"]
        st[("fp8", "torchao")] = out

    def fp8_compiled(c: Check):
        ref = st.get(("fp8", compiled_kernel))
        if ref is None:
            raise Skip(f"no eager fp8 run of the {compiled_kernel} kernel to compare with")
        g0 = compile_stats()["unique_graphs"]
        t0 = time.perf_counter()
        out = run_fp8(compiled_kernel, backend, **opts)
        runner = get_adapter(st["pipe"]).runner
        st["runner"] = runner
        c.compare(out, ref, f"compiled vs eager fp8 ({compiled_kernel})")
        c.info.update(kernel=compiled_kernel, first_call_s=round(time.perf_counter() - t0, 2),
                      graphs=compile_stats()["unique_graphs"] - g0, builds=len(runner.builds),
                      applied={k: runner.applied.get(k) for k in ("precision", "cuda_graphs", "fused_qkv")})
        c.expect(runner.applied.get("precision") == "fp8", f"precision {runner.applied.get('precision')}")
        c.expect(runner.applied["cuda_graphs"] == ctx.cuda, f"CUDA graphs {runner.applied['cuda_graphs']}")

    def fp8_no_recompile(c: Check):
        runner = st["runner"]
        g0, b0 = compile_stats()["unique_graphs"], len(runner.builds)
        out = run_fp8(compiled_kernel, backend, seed=17, **opts)
        c.expect(_finite(out), "latents are not finite")
        graphs, captures = compile_stats()["unique_graphs"] - g0, len(runner.builds) - b0
        c.info.update(new_graphs=graphs, new_captures=captures)
        c.expect(graphs == 0, f"{graphs} new dynamo graph(s) on a second fp8 call")
        c.expect(captures == 0, f"{captures} new CUDA-graph capture(s) on a second fp8 call")
        c.expect(_param_state(st["pipe"].transformer) == st["params"], "the user's parameters changed")
        c.info.update(_stamp_cost(runner))

    def attn_measure(c: Check):
        uncompile_adapter(st["pipe"])
        m_backend, m_opts = compile_backend("eager" if level == "eager" else "dynamo", False, ctx.cuda)
        m_opts = {**m_opts, "attn_backend": "measure"}
        kw = dict(speedup=st["pinned"], seed=13, **lat, backend=m_backend, compile_options=m_opts)
        first = generate(st["pipe"], **st["emb"], **kw).images
        again = generate(st["pipe"], **st["emb"], **kw).images
        c.compare(first, st["ref"], "measuring call")
        c.compare(again, st["ref"], "next call")
        choices = get_adapter(st["pipe"]).runner.attention_choices()
        c.expect(bool(choices), "no attention choice recorded")
        c.expect(all(ch["backend"] != "auto" for ch in choices), "a signature fell back to 'auto' (nothing ran)")
        c.info.update(choices=[{"backend": ch["backend"], "tokens_shape": ch.get("tokens_shape"),
                                "total_ms": ch.get("total_ms")} for ch in choices],
                      measured=[{"shape": r["describe"], "ms": r["ms"], "best": r["best"],
                                 "skipped": sorted(r["skipped"])} for r in attention_report(dev)])
        uncompile_adapter(st["pipe"])

    def model_cpu_offload(c: Check):
        pipe = st["pipe"]
        kw = dict(speedup=st["sched"], seed=13, **lat, backend="eager")
        seen = []

        def peak(fn):
            if ctx.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            out = fn()
            return out, (round(torch.cuda.max_memory_allocated() / 2**30, 3) if ctx.cuda else None)

        resident, resident_gib = peak(lambda: generate(pipe, **st["emb"], **kw).images)
        pipe.enable_model_cpu_offload(device=dev)
        adapter = get_adapter(pipe)
        own = adapter.velocity

        def velocity(tokens, grid, timestep, cond, impl=None):  # where the weights are at each model call
            seen.append(next(pipe.transformer.parameters()).device.type)
            return own(tokens, grid, timestep, cond, impl)

        adapter.velocity = velocity
        try:
            out, offload_gib = peak(lambda: generate(pipe, **st["emb"], **kw).images)
            try:
                generate(pipe, **st["emb"], **{**kw, "backend": "inductor"})
                refused = False
            except ValueError:
                refused = True
            after = {n: next(m.parameters()).device.type for n, m in pipe.components.items()
                     if isinstance(m, torch.nn.Module) and next(m.parameters(), None) is not None}
        finally:
            del adapter.velocity
            pipe.remove_all_hooks()
            pipe.to(dev)
        c.compare(out, resident, "offloaded vs on the device")
        c.expect(bool(seen) and set(seen) == {dev.type}, f"the transformer's weights were on {sorted(set(seen))}")
        c.expect(set(after.values()) == {"cpu"}, f"after the call: {after}")
        c.expect(refused, "backend='inductor' on an offloaded pipeline was not refused")
        c.info.update(model_calls=len(seen), peak_gib={"resident": resident_gib, "offloaded": offload_gib})

    def layerwise_fp8_storage(c: Check):
        tr = st["pipe"].transformer
        plain_bytes = sum(p.numel() * p.element_size() for p in tr.parameters())
        other = SF.build(fam, "dry" if ctx.dry else "smoke", dev, dt)  # same seed: the weights of st["pipe"]
        tr.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dt)
        cast = {n for n, m in tr.named_modules() if "layerwise_casting" in
                (getattr(vars(m).get("_diffusers_hook"), "hooks", None) or {})}
        for name, mod in other.transformer.named_modules():  # the plain model with the cast layers' weights rounded
            if name in cast:
                for p in mod.parameters(recurse=False):
                    p.copy_(p.to(torch.float8_e4m3fn).to(p.dtype))
        cast_bytes = sum(p.numel() * p.element_size() for p in tr.parameters())
        kw = dict(speedup=st["pinned"], seed=13, **lat, backend="eager")
        out = generate(st["pipe"], **st["emb"], **kw).images
        rounded = generate(other, **st["emb"], **kw).images
        del other
        try:
            generate(st["pipe"], **st["emb"], **{**kw, "backend": "inductor",
                                                 "compile_options": {"cuda_graphs": True}})
            refused = False
        except ValueError:
            refused = True
        # compiled blocks run the cast shadows (dynamo's tracing, its eager backend: no inductor compile time here)
        traced = generate(st["pipe"], **st["emb"], **{**kw, "backend": "inductor", "compile_options": {
            "cuda_graphs": False, "compile_vae": False, "dynamo_backend": "eager"}}).images
        uncompile_adapter(st["pipe"])
        c.compare(out, rounded, "cast vs rounded weights")
        c.compare(traced, out, "compiled blocks (cast shadows) vs eager")
        c.expect(cast_bytes < plain_bytes, f"weight bytes {cast_bytes} vs {plain_bytes}")
        c.expect(refused, "cuda_graphs=True on a layerwise-cast model was not refused")
        c.info.update(cast_layers=len(cast), weight_gib={"plain": round(plain_bytes / 2**30, 3),
                                                         "cast": round(cast_bytes / 2**30, 3)},
                      rel_l2_vs_reference=float((out.double() - st["ref"].double()).norm()
                                                / st["ref"].double().norm()))

    with torch.no_grad():
        run_check(rec, "build", build, needs=())
        run_check(rec, "references", references)
        run_check(rec, "fp8_eager", fp8_eager, tol=fp8_tol, needs=("references",))
        run_check(rec, "fp8_torchao", fp8_torchao, tol=fp8_tol, needs=("references",))
        run_check(rec, "fp8_compiled", fp8_compiled, tol=FP8_COMPILED_TOL[ctx.dtype_name()], needs=("references",))
        run_check(rec, "fp8_no_recompile", fp8_no_recompile, needs=("fp8_compiled",))
        run_check(rec, "attn_measure", attn_measure, tol=ctx.tol, needs=("references",))
        run_check(rec, "model_cpu_offload", model_cpu_offload, tol=ctx.tol, needs=("references",))
        run_check(rec, "layerwise_fp8_storage", layerwise_fp8_storage, tol=ctx.tol, needs=("references",))


def selftest_job(job: str, rec: Recorder) -> None:
    """The harness's own checks (no torch): every result kind, a hang, a crash."""
    def fail(c):
        c.error = 2.0
    if job == "selftest-results":
        run_check(rec, "ok", lambda c: setattr(c, "error", 0.5), tol=1.0, needs=())
        run_check(rec, "failed", fail, tol=1.0, needs=())
        run_check(rec, "error", lambda c: 1 / 0, needs=())
        run_check(rec, "skipped", lambda c: (_ for _ in ()).throw(Skip("not here")), needs=())
    elif job == "selftest-hang":
        run_check(rec, "first", lambda c: None, needs=())
        run_check(rec, "hang", lambda c: time.sleep(3600), needs=())
        run_check(rec, "after", lambda c: None, needs=())
    elif job == "selftest-crash":
        run_check(rec, "crash", lambda c: os._exit(3), needs=())
        run_check(rec, "after", lambda c: None, needs=())


def _exit_with_parent() -> None:
    """A worker runs in a session of its own (so that a check past its limit can be killed with its compile
    subprocesses): when its parent (the orchestrator) is gone, e.g. killed by the suite at the step's limit, it ends
    its own process group instead of holding the GPU through the next step."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="smoke-parent-watch", daemon=True).start()


def worker_main(args) -> int:
    _exit_with_parent()
    if all(j.startswith("selftest-") for j in args.worker.split(",")):
        for job in args.worker.split(","):
            rec = Recorder(Path(args.jsonl), job)
            rec.emit(event="worker", job=job, pid=os.getpid(), t=time.time())
            selftest_job(job, rec)
        return 0
    import torch

    ctx = Ctx(dry=args.dry_run, level=args.level, dry_compile=args.dry_run_compile)
    ctx.device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    ctx.dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if ctx.device.type == "cpu"
                                                               else torch.bfloat16)
    for job in args.worker.split(","):
        torch._dynamo.reset()  # a dry run's group runs several jobs in one process: each traces its own graphs
        rec = Recorder(Path(args.jsonl), job)
        rec.emit(event="worker", job=job, pid=os.getpid(), device=str(ctx.device), dtype=ctx.dtype_name(),
                 t=time.time(), torch=torch.__version__)
        if job == "serving":
            serving_job(ctx, rec)
        elif job == "kernels":
            kernels_job(ctx, rec)
        elif job == "editing":
            editing_job(ctx, rec)
        elif job == "precision":
            precision_job(ctx, rec)
        else:
            family_job(job, ctx, rec)
        rec.emit(event="done", job=job, t=time.time())
    return 0


# =========================================================================================== the report (JSON + table)
def commit_info() -> dict:
    """The commit measured: ``git rev-parse HEAD`` where ``.git`` exists (and whether the tree has changes), else
    ``$RALU_COMMIT`` (the device copy may have no .git)."""
    if (ROOT / ".git").exists():
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                  timeout=20).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=20).stdout.strip()
            if head:
                return {"commit": head, "commit_source": "git", "dirty": bool(dirty)}
        except (OSError, subprocess.SubprocessError):
            pass
    env = os.environ.get("RALU_COMMIT")
    if env:
        return {"commit": env, "commit_source": "RALU_COMMIT", "dirty": None}
    return {"commit": "unknown", "commit_source": "none", "dirty": None}


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


TABLE_COLUMNS = ("path", "result", "seconds", "max error", "tolerance", "expected s", "note")


def table_rows(report: dict) -> list[list[str]]:
    out = []
    for r in report["rows"]:
        out.append([r["path"], r["result"], _fmt(r.get("seconds"), 3), _fmt(r.get("error"), 3), _fmt(r.get("tol"), 3),
                    _fmt(r.get("expected_s"), 3), (r.get("note") or "")[:110]])
    return out


def format_table(report: dict) -> str:
    rows = table_rows(report)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    counts = report.get("counts", {})
    lines.append(f"{len(rows)} checks: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n) +
                 f"; commit {report.get('commit', '?')[:12]} ({report.get('commit_source')}); "
                 f"{report.get('device')}, {report.get('dtype')}, {report.get('elapsed_s')} s")
    return "\n".join(lines)


def write_report(path: Path, report: dict) -> None:
    """Atomically (re)write the JSON report; ``counts`` recomputed from the rows."""
    counts = {k: 0 for k in RESULTS}
    for r in report["rows"]:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    report["counts"] = counts
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


def read_report(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ================================================================================================ orchestrator
class Log:
    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        for p in self.paths:
            with p.open("a") as f:
                f.write(line + "\n")


@dataclass
class Group:
    """Jobs run one after another in one process: one job per group on the GPU; a dry run puts the jobs into
    ``--workers`` groups so that torch and diffusers are imported twice rather than 16 times on a 2-core CPU."""

    jobs: list[Job]
    index: int = 0

    @property
    def name(self) -> str:
        return self.jobs[0].name if len(self.jobs) == 1 else f"group{self.index}"

    @property
    def paths(self) -> list[tuple[str, float]]:
        return [(f"{j.name}/{n}", exp) for j in self.jobs for n, exp in j.checks]

    def expected(self, dry: bool) -> float:
        return sum(j.dry_s if dry else j.expected_s for j in self.jobs)


def _makespan(seconds: list[float], workers: int) -> float:
    """Seconds until the last job ends when jobs of ``seconds`` start in this order, each on the first free worker."""
    free = [0.0] * max(1, workers)
    for t in seconds:
        i = free.index(min(free))
        free[i] += t
    return max(free)


# started first on the GPU, in this order: the kernel checks (short, and the only run of the CUDA op), then the path
# users run most (FLUX.1-dev), whatever the packing of the rest
FIRST_JOBS = ("kernels", "flux-dev")


def gpu_order(all_jobs: list[Job], workers: int) -> list[Job]:
    """The order the GPU run starts its jobs in (each on the first free worker): :data:`FIRST_JOBS`, then the
    longest job first, improved by swapping pairs of jobs while that
    shortens the expected end (longest-first alone leaves one worker with three jobs: 261 s where a better order
    ends in 238 s with the 2026-12-06 estimates). Deterministic; a job that takes longer than expected only delays
    the jobs after it on its worker."""
    order = sorted(all_jobs, key=lambda j: (j.name not in FIRST_JOBS, FIRST_JOBS.index(j.name) if j.name in
                                            FIRST_JOBS else 0, -j.expected_s, j.name))
    first = sum(j.name in FIRST_JOBS for j in order)
    best = _makespan([j.expected_s for j in order], workers)
    improved = True
    while improved:
        improved = False
        for a in range(first, len(order)):
            for b in range(a + 1, len(order)):
                order[a], order[b] = order[b], order[a]
                span = _makespan([j.expected_s for j in order], workers)
                if span < best - 1e-9:
                    best, improved = span, True
                else:
                    order[a], order[b] = order[b], order[a]
    return order


def estimated_makespan(all_jobs: list[Job], workers: int = 8) -> float:
    """Seconds the GPU run takes if every check takes its expected seconds (:func:`gpu_order` on ``workers``)."""
    return _makespan([j.expected_s for j in gpu_order(all_jobs, workers)], workers)


def make_groups(all_jobs: list[Job], dry: bool, workers: int) -> list[Group]:
    """GPU: one group per job, in :func:`gpu_order`. Dry run: ``workers`` groups balanced by the jobs' CPU seconds
    (the longest first), so that torch and diffusers are imported once per worker."""
    if not dry:
        return [Group([j]) for j in gpu_order(list(all_jobs), workers)]
    order = sorted(all_jobs, key=lambda j: (j.name != "kernels", -j.dry_s))
    groups = [Group([], i + 1) for i in range(max(1, min(workers, len(order))))]
    for j in order:
        min(groups, key=lambda g: g.expected(True)).jobs.append(j)
    return [g for g in groups if g.jobs]


@dataclass
class Running:
    group: Group
    proc: subprocess.Popen
    jsonl: Path
    log: Path
    started: float
    offset: int = 0
    current: str | None = None      # path of the check in progress
    current_since: float = 0.0
    done: bool = False
    ended: set = field(default_factory=set)


def check_limit(expected: float, dry: bool) -> float:
    """Hard limit of one check: generous against its expected seconds (CPU contention, a cold disk)."""
    return max(180.0, 4.0 * expected + 60.0) if dry else 2.5 * expected + 30.0


def orchestrate(args) -> int:
    dry = args.dry_run
    slug = "cpu" if dry else args.device_slug
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mirror = Path(args.mirror) if args.mirror else None
    if mirror:
        mirror.mkdir(parents=True, exist_ok=True)
    work = out / "smoke_work"
    work.mkdir(exist_ok=True)
    logs = out / "logs" / "smoke"
    logs.mkdir(parents=True, exist_ok=True)
    json_name, log_name = f"smoke_{slug}.json", f"smoke_{slug}.log"
    for d in [out] + ([mirror] if mirror else []):
        for n in (json_name, log_name):
            (d / n).unlink(missing_ok=True)
    log = Log([out / log_name] + ([mirror / log_name] if mirror else []))
    all_jobs = jobs()
    if args.only:
        wanted = set(args.only.split(","))
        all_jobs += [j for j in SELFTEST_JOBS if j.name in wanted]
        unknown = wanted - {j.name for j in all_jobs}
        if unknown:
            raise SystemExit(f"gpu_smoke: unknown job(s) {sorted(unknown)}; jobs are {[j.name for j in all_jobs]}")
        all_jobs = [j for j in all_jobs if j.name in wanted]
    t0 = time.monotonic()
    import platform

    dtype_name = args.dtype or ("float32" if dry else "bfloat16")

    versions = {}
    for mod in ("torch", "diffusers", "triton"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    try:
        import torch

        versions["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        versions["cuda"] = None
    report = {"schema": SCHEMA, "device": slug, "dry_run": dry, **commit_info(), **versions,
              "python": platform.python_version(), "dtype": dtype_name,
              "tolerance": {"latents": TOL[dtype_name], "kernels": KERNEL_TOL},
              "level": args.level, "budget_s": args.budget,
              "levels": {j.name: effective_level(args.level, dry, args.dry_run_compile, j.name, j.level)
                         for j in all_jobs},
              "workers": args.workers, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "elapsed_s": 0.0,
              "final": False, "rows": []}
    rows: dict[str, dict] = {}
    for j in all_jobs:
        for name, exp in j.checks:
            path = f"{j.name}/{name}"
            rows[path] = {"path": path, "job": j.name, "result": "not run", "seconds": None, "error": None,
                          "tol": None, "expected_s": exp, "note": "", "info": {}}
    json_paths = [out / json_name] + ([mirror / json_name] if mirror else [])

    def flush(final=False):
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
        report["final"] = final
        report["rows"] = list(rows.values())
        for p in json_paths:
            write_report(p, report)

    flush()
    queue = make_groups(all_jobs, dry, args.workers)
    log(f"gpu_smoke: {len(all_jobs)} jobs in {len(queue)} processes, {len(rows)} checks, "
        f"{'DRY RUN (CPU, tiny models, fp32)' if dry else 'GPU'}, budget {args.budget:.0f} s, {args.workers} workers, "
        f"commit {report['commit'][:12]} ({report['commit_source']}), torch {versions['torch']}")
    running: list[Running] = []
    cpus = os.cpu_count() or 2
    threads = max(1, cpus // max(1, args.workers))

    def start(group: Group) -> Running:
        jsonl = work / f"{group.name}.jsonl"
        jsonl.unlink(missing_ok=True)
        jsonl.touch()
        logf = logs / f"{group.name}.log"
        argv = [sys.executable, "-m", "benchmarks.gpu_smoke", "--worker", ",".join(j.name for j in group.jobs),
                "--jsonl", str(jsonl), "--level", args.level] + (["--dry-run"] if dry else []) + \
            (["--dtype", args.dtype] if args.dtype else []) + \
            (["--dry-run-compile"] if args.dry_run_compile else [])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
               "TORCHINDUCTOR_COMPILE_THREADS": str(max(2, threads)),
               "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{group.name}"),
               "TRITON_CACHE_DIR": str(work / f"triton-{group.name}")}
        if dry and any(j.name == "kernels" for j in group.jobs):
            env["TRITON_INTERPRET"] = "1"  # CPU: the Triton kernel under the interpreter (nothing else uses Triton)
        else:
            env.pop("TRITON_INTERPRET", None)
        with open(logf, "w") as lf:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=lf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        levels = ", ".join(report["levels"][j.name] for j in group.jobs)
        members = "" if len(group.jobs) == 1 else f" ({', '.join(j.name for j in group.jobs)})"
        log(f"-- start {group.name}{members} (expected {group.expected(dry):.0f} s{' on the CPU' if dry else ''}; "
            f"level {levels}) pid {proc.pid}")
        return Running(group, proc, jsonl, logf, time.monotonic())

    def tail(r: Running, n: int = 25) -> None:
        try:
            lines = r.log.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return
        for line in lines:
            log(f"   [{r.group.name}] {line}")

    def close_rows(r: Running, running_result: str, running_note: str, other_note: str) -> None:
        for path, _exp in r.group.paths:
            if path in r.ended:
                continue
            if path == r.current:
                rows[path].update(result=running_result, seconds=round(time.monotonic() - r.current_since, 1),
                                  note=running_note)
            else:
                rows[path].update(result="not run", note=other_note)

    def kill(r: Running, why: str) -> None:
        try:
            os.killpg(r.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        r.proc.wait()
        poll(r)
        close_rows(r, "timeout", why, f"its process was killed ({why})")
        log(f"-- killed {r.group.name}: {why}")
        tail(r)
        r.done = True

    def poll(r: Running) -> bool:
        """Read the records the job wrote since the last poll; True when a row changed."""
        changed = False
        try:
            with open(r.jsonl, "rb") as f:
                f.seek(r.offset)
                chunk = f.read()
        except OSError:
            return False
        complete = chunk[:chunk.rfind(b"\n") + 1]
        r.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            ev, path = rec.get("event"), rec.get("path")
            if path is not None and path not in rows:
                continue
            if ev == "start":
                r.current, r.current_since = path, time.monotonic()
                rows[path].update(result="running", note="")
                changed = True
            elif ev == "end":
                r.ended.add(path)
                if r.current == path:
                    r.current = None
                rows[path].update({k: rec.get(k) for k in ("result", "seconds", "error", "tol", "note", "info")})
                log(f"   {path}: {rec['result']} in {rec['seconds']:.1f} s" +
                    (f", error {rec['error']:.3g} (tol {rec['tol']:g})" if rec.get("error") is not None
                     and rec.get("tol") is not None else "") + (f": {rec['note']}" if rec.get("note") else ""))
                changed = True
        return changed

    budget_end = t0 + args.budget
    while queue or running:
        now = time.monotonic()
        while queue and len(running) < args.workers:
            group = queue.pop(0)
            left = budget_end - now
            first = group.paths[0][1]
            need = min(first + 15, 0.5 * group.expected(dry))
            if left < need:
                for path, _exp in group.paths:
                    rows[path]["note"] = f"budget: {left:.0f} s left at its turn"
                log(f"-- skip {group.name}: {left:.0f} s of the budget left (needs about {group.expected(dry):.0f})")
                continue
            running.append(start(group))
        changed = False
        for r in running:
            changed |= poll(r)
            rc = r.proc.poll()
            if rc is not None:
                changed |= poll(r)
                close_rows(r, "crashed", f"its process exited with {rc} during this check",
                           f"its process exited with {rc} before this check")
                ok = all(rows[p]["result"] in ("ok", "skipped") for p, _ in r.group.paths)
                log(f"-- end {r.group.name}: exit {rc} after {time.monotonic() - r.started:.0f} s")
                if rc != 0 or not ok:
                    tail(r)
                r.done = True
                changed = True
                continue
            if r.current:
                limit = check_limit(dict(r.group.paths).get(r.current, 30.0), dry)
                if args.max_check_s:
                    limit = min(limit, args.max_check_s)
                if now - r.current_since > limit:
                    kill(r, f"check limit {limit:.0f} s")
                    changed = True
                    continue
            if now > budget_end:
                kill(r, f"smoke budget {args.budget:.0f} s")
                changed = True
        running = [r for r in running if not r.done]
        if changed:
            flush()
        time.sleep(0.5)
    flush(final=True)
    log(format_table(report))
    bad = [r for r in rows.values() if r["result"] not in ("ok", "skipped")]
    log(f"gpu_smoke: {len(rows) - len(bad)}/{len(rows)} checks ok or skipped in {report['elapsed_s']} s; wrote "
        + ", ".join(str(p) for p in json_paths))
    return 0 if not bad else 1


# ================================================================================================ compile estimates
def measure_compile(args) -> int:
    """CPU seconds of dynamo tracing (``dynamo_backend="eager"``) and of a full inductor compile (CPU codegen) of
    each family's tiny model: the baseline's first compiled call, 2 steps. Used to scale the H200's FLUX figure
    to the other families (the estimates in smoke_families' expected_s)."""
    import torch

    from benchmarks import smoke_families as SF
    from ralu_runtime import generate
    from ralu_runtime.compile import uncompile_adapter

    rows = []
    keys = args.only.split(",") if args.only else [k for k, f in SF.FAMILIES.items()]
    for key in keys:
        fam = SF.FAMILIES[key]
        row = {"family": key}
        for level in ("dynamo", "inductor"):
            torch._dynamo.reset()
            pipe = SF.build(fam, "dry", "cpu", torch.float32)
            emb = SF.embeds(fam, pipe, 1, True, "cpu", torch.float32)
            kw = dict(SF.sizes(fam, True), guidance_scale=fam.guidance, output_type="latent", progress=False,
                      speedup=None, num_inference_steps=2, seed=0)
            generate(pipe, **emb, **kw)
            t0 = time.perf_counter()
            backend, opts = compile_backend(level, False, False)
            generate(pipe, **emb, **kw, backend=backend, compile_options=opts)
            row[level] = round(time.perf_counter() - t0, 1)
            uncompile_adapter(pipe)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return 0


# ================================================================================================ CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny models, fp32, the dynamo level")
    ap.add_argument("--dry-run-compile", action="store_true", help="dry run with each family's own compile level "
                    "(real inductor on the CPU: minutes)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else ./out/gpu_smoke)")
    ap.add_argument("--mirror", default=None, help="a second folder that gets the JSON and the log too")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole step (default 240 GPU, 900 dry)")
    ap.add_argument("--workers", type=int, default=None, help="parallel jobs (default 8 on a GPU, 2 dry)")
    ap.add_argument("--only", default=None, help="comma-separated jobs (families, serving, kernels)")
    ap.add_argument("--level", default="auto", choices=("auto",) + LEVELS,
                    help="compile level of every job (default: each family's own; dry run: dynamo)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="model dtype (default: bfloat16 on a GPU, float32 in a dry run)")
    ap.add_argument("--max-check-s", type=float, default=None, help="cap every check's time limit (seconds)")
    ap.add_argument("--list", action="store_true", help="print the jobs, their checks and expected seconds")
    ap.add_argument("--measure-compile", action="store_true", help="CPU compile times of the tiny models")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jsonl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run_compile:
        args.dry_run = True
    if args.worker:
        return worker_main(args)
    if args.measure_compile:
        return measure_compile(args)
    if args.list:
        for j in jobs():
            print(f"{j.name:16s} {j.expected_s:6.0f} s  level {j.level:8s} " +
                  ", ".join(f"{n} {s:.0f}" for n, s in j.checks))
        workers = args.workers or 8
        print(f"{sum(j.expected_s for j in jobs()):.0f} s of job time; {workers} workers: ~"
              f"{estimated_makespan(jobs(), workers):.0f} s if the estimates hold")
        return 0
    args.out = args.out or os.environ.get("OUT") or str(ROOT / "out" / "gpu_smoke")
    args.budget = args.budget or (900.0 if args.dry_run else 240.0)
    args.workers = args.workers or (2 if args.dry_run else 8)
    args.device_slug = "cpu"
    if not args.dry_run:
        from benchmarks.gpu_suite import device_slug

        args.device_slug = device_slug()
        if args.device_slug == "cpu":
            print("gpu_smoke: no NVIDIA GPU found (nvidia-smi); use --dry-run on a CPU", file=sys.stderr)
            return 2
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
