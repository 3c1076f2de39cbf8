"""What editing costs with RALU: model calls per stage and transformer TFLOPs per workflow at 1024^2.

No model runs. Workflows: img2img at strength 0.3 / 0.6 / 0.9, inpainting at the pipelines' default strength 0.6
and at 1.0 (the blend is elementwise: inpainting makes the same model calls as img2img at the same strength). The
stages come from the schedule (:func:`ralu_runtime.editing.edit_stages` at the start sigma the editing pipeline's own
schedule gives for the strength); the baseline is the editing pipeline's default sampler (FluxImg2ImgPipeline /
FluxInpaintPipeline 28 steps, StableDiffusion3Img2ImgPipeline / StableDiffusion3InpaintPipeline 50) over its
remaining steps. Per-call FLOPs are analytic (:func:`call_tflops`: every matmul of the MMDiT at the call's image and
text tokens, CFG doubling the batch where the release runs it) for the published configs: FLUX.1-dev (512 text
tokens), SD3 Medium, SD3.5 Large and SD3.5 Medium (333 text tokens, CFG); they reproduce torch FlopCounterMode's counts
of the full-size models in ``benchmarks/results/flops.json`` (``benchmarks/flops.py``) within 0.1 %. VAE encode (both)
and RALU's half-resolution preview decode (only when stage 1 runs) are not counted.

``--cpu``: also time it on the CPU with the family's "small" benchmark model (random weights, float32, its CPU
size; ``benchmarks/families.py``'s models): whole ``generate`` calls with an image (encode, sampling, decode),
the baseline and each preset interleaved per round, medians of ``--reps`` rounds after one warm-up call each, and the
model stages alone (the sampler's stage clocks).

    python benchmarks/editing.py [--cpu [--cpu-family flux sd3] [--reps 3]] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import positive_int, write_json  # noqa: E402
from ralu_runtime.editing import edit_cost, edit_stages, start_index  # noqa: E402
from ralu_runtime.schedule import get_preset  # noqa: E402

STRENGTHS = (0.3, 0.6, 0.9)  # img2img
INPAINT_STRENGTHS = (0.6, 1.0)  # inpainting: the pipelines' default, and a full repaint
TOKENS = 4096  # 1024^2: 128^2 latents, 2x2 patches
# family -> (flops.json model, editing pipeline's default steps, scheduler (shift, dynamic mu at 4096 tokens), presets)
MODELS = {"flux": ("flux", 28, (3.0, 1.15), ("4x", "5x", "7x")),
          "sd3": ("sd3", 50, (3.0, None), ("2x", "3x"))}


@dataclass(frozen=True)
class Arch:
    """An MMDiT's shape for analytic FLOPs: ``hidden`` width, ``joint`` two-stream blocks (FLUX double / SD3 joint),
    ``single`` one-stream blocks (FLUX), ``dual`` joint blocks with a second image self-attention (SD3.5 Medium),
    ``pre_only_last``: the last joint block keeps no text output (SD3), ``patch_in`` / ``patch_out``: values per
    token in / out (channels x 2 x 2), ``text_in``: T5 width, ``text_len``: text tokens, ``cfg``: batch 2 per image,
    ``pooled``: pooled-text width (SD3) or 0, ``guidance``: FLUX's guidance embedding."""

    label: str
    family: str
    hidden: int
    joint: int
    single: int = 0
    dual: int = 0
    pre_only_last: bool = False
    patch_in: int = 64
    patch_out: int = 64
    text_in: int = 4096
    text_len: int = 512
    cfg: bool = False
    pooled: int = 768
    guidance: bool = False


# the published transformer configs (ralu_runtime.tiny's "full" builders)
ARCHS = {"flux": Arch("FLUX.1-dev", "flux", 3072, 19, single=38, guidance=True),
         "sd3": Arch("SD3 Medium", "sd3", 1536, 24, pre_only_last=True, text_len=333, cfg=True, pooled=2048),
         "sd35-large": Arch("SD3.5 Large", "sd3", 2432, 38, pre_only_last=True, text_len=333, cfg=True, pooled=2048),
         "sd35-medium": Arch("SD3.5 Medium", "sd3", 1536, 24, dual=13, pre_only_last=True, text_len=333, cfg=True,
                             pooled=2048)}


def call_tflops(arch: Arch, image_tokens: int) -> float:
    """TFLOPs (2 per multiply-add) of one transformer call for one image at ``image_tokens`` image tokens: the patch,
    text, time and pooled embeddings, every block's projections, MLPs (ratio 4), attention (Q K^T and A V over image +
    text tokens) and adaptive-norm modulations, the output norm and projection; x2 with CFG."""
    d, li, lt = arch.hidden, int(image_tokens), arch.text_len
    lj = li + lt
    mm = lambda rows, n_in, n_out: 2.0 * rows * n_in * n_out  # noqa: E731
    f = mm(li, arch.patch_in, d) + mm(lt, arch.text_in, d)                    # patch / context embedders
    f += mm(1, 256, d) + mm(1, d, d)                                          # timestep MLP
    f += mm(1, arch.pooled, d) + mm(1, d, d)                                  # pooled text MLP
    if arch.guidance:
        f += mm(1, 256, d) + mm(1, d, d)
    for i in range(arch.joint):
        text_out = not (arch.pre_only_last and i == arch.joint - 1)
        dual = i < arch.dual
        f += mm(1, d, 9 * d if dual else 6 * d) + mm(1, d, 6 * d if text_out else 2 * d)  # modulations
        f += mm(li, d, 3 * d) + mm(lt, d, 3 * d) + 4.0 * lj * lj * d          # q k v, attention
        f += mm(li, d, d) + mm(li, d, 4 * d) + mm(li, 4 * d, d)               # image out, MLP
        if text_out:
            f += mm(lt, d, d) + mm(lt, d, 4 * d) + mm(lt, 4 * d, d)
        if dual:                                                              # second image self-attention
            f += mm(li, d, 3 * d) + 4.0 * li * li * d + mm(li, d, d)
    for _ in range(arch.single):
        f += mm(1, d, 3 * d) + mm(lj, d, 7 * d) + 4.0 * lj * lj * d + mm(lj, 5 * d, d)
    f += mm(1, d, 2 * d) + mm(li, d, arch.patch_out)                          # output norm and projection
    return f * (2 if arch.cfg else 1) / 1e12


def start_sigma(steps: int, strength: float, shift: float, mu: float | None) -> float:
    """The editing pipeline's start sigma: its schedule (FLUX: linspace(1, 1/N, N) shifted by exp(mu); SD3: the
    scheduler's own, static shift) at the first step kept for ``strength``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if mu is None:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(steps)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return float(sched.sigmas[start_index(steps, strength)])


def per_call(flops: dict, model: str, tokens: int) -> float:
    """TFLOPs of one model call at ``tokens`` image tokens, from flops.json."""
    hit = [r for r in flops["results"] if r["model"] == model]
    if not hit:
        raise KeyError(f"{model}: not in flops.json")
    res = hit[0]["per_call_tflops"]
    for key, v in res.items():
        if int(key.split()[0]) == tokens:
            return float(v)
    raise KeyError(f"{model}: no per-call FLOPs at {tokens} tokens in flops.json")


def table(flops: dict | None = None) -> list[dict]:
    """One row per (model, workflow, strength, run): the baseline (the editing pipeline's default sampler) and each
    of the family's presets, with the model calls per stage and the analytic TFLOPs (:func:`call_tflops`; ``flops``,
    flops.json, adds the FlopCounterMode count where it has the model at every token count used)."""
    rows = []
    workflows = [("img2img", st) for st in STRENGTHS] + [("inpaint", st) for st in INPAINT_STRENGTHS]
    for key, arch in ARCHS.items():
        _, steps, (shift, mu), presets = MODELS[arch.family]
        tf = lambda tok: call_tflops(arch, tok)  # noqa: E731

        def counted(calls):
            try:
                return sum(n * per_call(flops, key, tok) for n, tok in calls if n) if flops else None
            except KeyError:
                return None
        for workflow, strength in workflows:
            sigma = start_sigma(steps, strength, shift, mu)
            base_steps = steps - start_index(steps, strength)
            base = base_steps * tf(TOKENS)
            common = {"model": key, "label": arch.label, "family": arch.family, "workflow": workflow,
                      "strength": strength, "sigma": sigma}
            rows.append({**common, "run": f"baseline {steps} steps", "entry_stage": None,
                         "calls": [0, 0, base_steps], "tflops": base, "ratio": 1.0,
                         "tflops_counted": counted([(base_steps, TOKENS)])})
            for name in presets:
                sched = get_preset(arch.family, name)
                cost = edit_cost(sched, sigma, TOKENS)
                total = sum(n * tf(tok) for n, tok in cost if n)
                rows.append({**common, "run": f"ralu {name}", "entry_stage": edit_stages(sched, sigma).entry + 1,
                             "calls": [n for n, _ in cost], "tokens": [tok for _, tok in cost], "tflops": total,
                             "ratio": base / total, "tflops_counted": counted(cost)})
    return rows


KONTEXT_STEPS = 28  # FluxKontextPipeline's default num_inference_steps
KONTEXT_REF_TOKENS = 4096  # a 1024^2 reference (the preferred Kontext resolution of a square image)


def kontext_table() -> list[dict]:
    """FLUX.1 Kontext at 1024^2 with a 1024^2 reference: transformer TFLOPs per image of the pipeline's 28-step
    baseline and each FLUX.1 preset, counted by FlopCounterMode on the full-size FLUX.1-dev shaped model (meta
    tensors, 512 text tokens) calling ``FluxAdapter.velocity`` with the 4096 reference tokens appended to every
    call (generated tokens: stage 1 1024, stage 2 1024 + 3k, stage 3 4096); the same runs without a reference
    (text-to-image) beside them. Reference encode and decodes not counted."""
    import torch

    from benchmarks.flops import velocity_flops
    from ralu_runtime.adapters import Conditioning, get_adapter
    from ralu_runtime.families import MODELS as PUBLISHED
    from ralu_runtime.kontext import reference_ids

    spec = PUBLISHED["flux"]
    pipe = spec.build("full", device="meta", dtype=torch.bfloat16)
    adapter = get_adapter(pipe)
    emb = spec.random_embeds(pipe, 1, spec.text_len, device="meta", dtype=torch.bfloat16)
    plain = adapter.encode_prompt(None, None, **emb, guidance_scale=adapter.default_guidance)
    side = int(KONTEXT_REF_TOKENS ** 0.5)
    ref = {"ref_tokens": torch.empty(1, KONTEXT_REF_TOKENS, adapter.token_channels, device="meta",
                                     dtype=torch.bfloat16),
           "ref_ids": reference_ids(side, side, 1).to("meta")}
    conds = {"kontext": Conditioning(1, {**plain.data, **ref}), "text-to-image": plain}
    m = TOKENS // 4
    fine, coarse = (64, 64), (32, 32)
    calls: dict = {}

    def per_call(kind, tokens, hw, mixed):
        key = (kind, tokens, mixed)
        if key not in calls:
            calls[key] = velocity_flops(adapter, conds[kind], tokens, 1, hw, mixed)[0] / 1e12
        return calls[key]

    rows = []
    for kind in conds:
        base = KONTEXT_STEPS * per_call(kind, TOKENS, fine, False)
        rows.append({"model": kind, "run": f"baseline {KONTEXT_STEPS} steps", "calls": [0, 0, KONTEXT_STEPS],
                     "tflops": base, "ratio": 1.0})
        for name in MODELS["flux"][3]:
            sched = get_preset("flux", name)
            k = int(m * sched.ratio)
            stages = [(m, coarse, False), (m + 3 * k, coarse, True), (TOKENS, fine, False)]
            tf = sum(n * per_call(kind, tok, hw, mx) for (tok, hw, mx), n in zip(stages, sched.steps))
            rows.append({"model": kind, "run": f"ralu {name}", "calls": list(sched.steps), "tflops": tf,
                         "ratio": base / tf})
    return rows


MODEL_STAGES = ("baseline", "stage1", "stage2", "stage3")


def cpu_table(family: str, reps: int) -> list[dict]:
    """CPU medians (s) of img2img with the family's small model: baseline vs its presets at each strength."""
    import statistics
    import time

    import torch

    from benchmarks.families import setup_family
    from ralu_runtime import generate
    from ralu_runtime.families import MODELS as PUBLISHED

    model = PUBLISHED[family]
    pipe, _adapter, emb, _presets, _steps, guidance = setup_family(model, "small", "cpu", torch.float32, 1, 32)
    h, w = model.cpu_size
    steps, presets = MODELS[family][1], MODELS[family][3]
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    common = dict(**emb, image=image, height=h, width=w, guidance_scale=guidance, output_type="pt", progress=False)
    out = []
    for strength in STRENGTHS:
        rows = [("baseline", dict(speedup=None, num_inference_steps=steps))] + [(n, dict(speedup=n)) for n in presets]
        times = {n: [] for n, _ in rows}
        model_times = {n: [] for n, _ in rows}
        calls = {}
        for name, kw in rows:  # warm-up
            generate(pipe, strength=strength, **common, **kw, seed=0)
        for rep in range(reps):
            for name, kw in rows:
                t0 = time.perf_counter()
                res = generate(pipe, strength=strength, **common, **kw, seed=rep)
                times[name].append(time.perf_counter() - t0)
                model_times[name].append(sum(v for k, v in res.timings.items() if k in MODEL_STAGES))
                calls[name] = [r.steps for r in res.records if r.name in MODEL_STAGES]
        base, base_model = statistics.median(times["baseline"]), statistics.median(model_times["baseline"])
        for name, _ in rows:
            med, med_model = statistics.median(times[name]), statistics.median(model_times[name])
            out.append({"family": family, "size": [h, w], "strength": strength, "run": name, "calls": calls[name],
                        "median_s": med, "times_s": times[name], "ratio": base / med,
                        "model_median_s": med_model, "model_ratio": base_model / med_model})
    return out


WORKFLOW_PRESETS = ("4x", "7x")


def cpu_workflows(reps: int, size: int | None = None) -> list[dict]:
    """CPU medians (s) of FLUX.1 inpainting (strength 1.0), Kontext, Fill and control with FLUX.1-dev's small
    benchmark model (Fill / control: the same shape with 384 / 128 input channels): each pipeline's default sampler
    (``speedup=None``: inpainting and Kontext 28 steps, Fill 50, control 28) vs RALU 4x / 7x, whole calls, rounds
    interleaved, one warm-up call each. ``size``: pixels per side (default the model's CPU size)."""
    import statistics
    import time

    import torch

    from benchmarks.families import setup_family
    from benchmarks.smoke_editing import build_edit_pipelines, edit_inputs, edit_kwargs
    from ralu_runtime import generate
    from ralu_runtime.families import MODELS as PUBLISHED

    model = PUBLISHED["flux"]
    base, _adapter, emb, _presets, _steps, guidance = setup_family(model, "small", "cpu", torch.float32, 1, 32)
    h, w = (size, size) if size else model.cpu_size
    pipes = build_edit_pipelines(base, "cpu", torch.float32)
    image, mask = edit_inputs(h, w)
    out = []
    for wf in ("inpaint", "kontext", "fill", "control"):
        kw = dict(**emb, **edit_kwargs(wf, image, mask, h, w, strength=1.0), height=h, width=w, output_type="pt",
                  progress=False)
        runs = [("baseline", None)] + [(p, p) for p in WORKFLOW_PRESETS]
        times = {n: [] for n, _ in runs}
        calls = {}
        for name, speedup in runs:
            generate(pipes[wf], **kw, speedup=speedup, seed=0)
        for rep in range(reps):
            for name, speedup in runs:
                t0 = time.perf_counter()
                res = generate(pipes[wf], **kw, speedup=speedup, seed=rep)
                times[name].append(time.perf_counter() - t0)
                calls[name] = [r.steps for r in res.records if r.name in MODEL_STAGES]
        base_s = statistics.median(times["baseline"])
        for name, _ in runs:
            med = statistics.median(times[name])
            out.append({"workflow": wf, "size": [h, w], "run": name, "calls": calls[name], "median_s": med,
                        "times_s": times[name], "ratio": base_s / med})
    return out


def plot(out_dir, rows: list[dict], kontext: list[dict], workflows: list[dict] | None):
    """``editing.png``: FLOP ratios vs each editing pipeline's default sampler (FLUX.1-dev and SD3.5 Large at 1024²,
    per workflow / strength and preset, Kontext with a 1024² reference), and the CPU ratios of ``--cpu``'s workflows."""
    from benchmarks._common import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2 if workflows else 1, figsize=(13 if workflows else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    bars = [(f"{r['label'].split(' ')[0]} {r['workflow']} {r['strength']} {r['run'].split(' ')[-1]}", r["ratio"])
            for r in rows if r["run"].startswith("ralu") and r["model"] in ("flux", "sd35-large")]
    names = {"kontext": "Kontext", "text-to-image": "FLUX.1 t2i"}
    bars += [(f"{names.get(r['model'], r['model'])} {r['run'].split(' ')[-1]}", r["ratio"]) for r in kontext
             if r["run"].startswith("ralu")]
    ax.bar(range(len(bars)), [v for _, v in bars])
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([n for n, _ in bars], rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("FLOP ratio vs the pipeline's default sampler")
    ax.set_title("editing at 1024^2: transformer FLOPs saved")
    if workflows:
        ax = axes[0][1]
        wb = [(f"{r['workflow']} {r['run']}", r["ratio"]) for r in workflows if r["run"] != "baseline"]
        ax.bar(range(len(wb)), [v for _, v in wb], color="tab:orange")
        ax.set_xticks(range(len(wb)))
        ax.set_xticklabels([n for n, _ in wb], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("CPU time ratio (whole call, small model)")
        ax.set_title("FLUX.1 editing workflows on the CPU")
    return save_figure(fig, out_dir, "editing")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--cpu", action="store_true", help="also time img2img on the CPU with the small models")
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--cpu-family", nargs="+", choices=tuple(MODELS), default=list(MODELS),
                    help="families timed with --cpu (default: all)")
    ap.add_argument("--cpu-size", type=int, default=None,
                    help="--cpu: pixels per side of the FLUX.1 workflows (inpaint, Kontext, Fill, control; default "
                         "the small model's CPU size)")
    args = ap.parse_args(argv)
    flops = json.loads((Path(__file__).parent / "results" / "flops.json").read_text())
    rows = table(flops)
    print("| model | workflow | strength | run | sigma* | entry | calls (s1, s2, s3) | TFLOPs | vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        entry = "-" if r["entry_stage"] is None else r["entry_stage"]
        print(f"| {r['label']} | {r['workflow']} | {r['strength']} | {r['run']} | {r['sigma']:.3f} | {entry} | "
              f"{', '.join(map(str, r['calls']))} | {r['tflops']:.0f} | {r['ratio']:.2f}x |")
    write_json(args.out, "editing_flops", {"tokens": TOKENS, "archs": {k: vars(a) for k, a in ARCHS.items()},
                                           "per_call_tflops": {k: {t: call_tflops(a, t) for t in (1024, TOKENS)}
                                                               for k, a in ARCHS.items()},
                                           "rows": rows, "notes": __doc__})
    kontext = kontext_table()
    print("| FLUX.1 Kontext 1024^2 | run | calls (s1, s2, s3) | TFLOPs | vs baseline |")
    print("|---|---|---|---|---|")
    for r in kontext:
        print(f"| {r['model']} | {r['run']} | {', '.join(map(str, r['calls']))} | {r['tflops']:.0f} | "
              f"{r['ratio']:.2f}x |")
    write_json(args.out, "editing_kontext_flops", {"tokens": TOKENS, "reference_tokens": KONTEXT_REF_TOKENS,
                                                   "rows": kontext, "notes": kontext_table.__doc__})
    if args.cpu:
        cpu = [r for fam in args.cpu_family for r in cpu_table(fam, args.reps)]
        print("| model | size | strength | run | calls | whole call s | vs baseline | model stages s | vs baseline |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in cpu:
            print(f"| {r['family']} | {r['size'][0]}x{r['size'][1]} | {r['strength']} | {r['run']} | "
                  f"{', '.join(map(str, r['calls']))} | {r['median_s']:.3f} | {r['ratio']:.2f}x | "
                  f"{r['model_median_s']:.3f} | {r['model_ratio']:.2f}x |")
        workflows = cpu_workflows(args.reps, args.cpu_size)
        print("| FLUX.1 workflow (CPU) | size | run | calls | whole call s | vs baseline |")
        print("|---|---|---|---|---|---|")
        for r in workflows:
            print(f"| {r['workflow']} | {r['size'][0]}x{r['size'][1]} | {r['run']} | "
                  f"{', '.join(map(str, r['calls']))} | {r['median_s']:.3f} | {r['ratio']:.2f}x |")
        write_json(args.out, "editing_cpu", {"rows": cpu, "workflows": workflows, "notes": __doc__,
                                             "workflows_notes": cpu_workflows.__doc__})
    plot(args.out, rows, kontext, workflows if args.cpu else None)


if __name__ == "__main__":
    main()
