"""Shared helpers for benchmark scripts: environment record, timing, JSON and PNG output.

Every benchmark prints a table, writes ``<name>.json`` (device, versions, shapes, times,
ratios) and ``<name>.png`` into ``--out`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def environment() -> dict:
    """Device name and library versions, for the JSON header."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
    }
    for mod in ("triton", "diffusers", "transformers", "onnxruntime"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            env[mod] = None
    return env


def device_slug() -> str:
    """Short file-name-safe device tag, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in torch.cuda.get_device_name(0).lower()).strip("-")


def time_fn(fn: Callable[[], object], *, warmup: int = 3, reps: int = 10, device: str | None = None) -> dict:
    """Time ``fn`` after ``warmup`` calls; returns mean/stdev/min in milliseconds over ``reps`` calls.

    On CUDA uses events and synchronises around every call.
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps={reps}, warmup={warmup}: time at least one call (reps >= 1, warmup >= 0)")
    cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "mean_ms": statistics.fmean(times),
        "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
        "min_ms": min(times),
        "reps": reps,
    }


def add_flux_shape_args(ap, cuda: bool) -> None:
    """The FLUX.1 model-shape arguments of the A/B benchmarks: ``--size`` (default "full" where ``cuda``: FLUX.1-dev
    width), ``--double`` / ``--single`` (blocks; see :func:`flux_shape`), ``--resolution`` (pixels per side) and
    ``--text-len`` (prompt tokens)."""
    ap.add_argument("--size", choices=("small", "full"), default="full" if cuda else "small")
    ap.add_argument("--double", type=int, default=None,
                    help="double-stream blocks (default: 4 full, the shape's small)")
    ap.add_argument("--single", type=int, default=None,
                    help="single-stream blocks (default: 8 full, the shape's small)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels per side (default 1024 GPU, 256 CPU)")
    ap.add_argument("--text-len", type=int, default=512)


def flux_shape(args, cuda: bool, *, multiple: int = 16,
               why: str = "FLUX: 8x VAE, 2x2 patches") -> tuple[dict, int]:
    """``(transformer config overrides for build_flux_pipeline, resolution in pixels)`` from
    :func:`add_flux_shape_args`' arguments: at full size 4 double + 8 single blocks unless given (full width at
    reduced depth), the resolution 1024 on CUDA (``cuda``) and 256 on a CPU unless given. SystemExit for a resolution
    that is not a positive multiple of ``multiple`` (``why``: the reason, in the message)."""
    double, single = args.double, args.single
    if args.size == "full":
        double = 4 if double is None else double
        single = 8 if single is None else single
    resolution = args.resolution or (1024 if cuda else 256)
    if resolution <= 0 or resolution % multiple:
        raise SystemExit(f"--resolution {resolution}: must be a positive multiple of {multiple} ({why})")
    depth = {k: v for k, v in (("num_layers", double), ("num_single_layers", single)) if v is not None}
    return depth, resolution


def raster_call_inputs(pipe, resolution: int, text_len: int, device, dtype) -> tuple:
    """``(adapter, tokens, grid, timestep, cond)`` of one model call of a FLUX-like pipeline on a full-resolution
    raster grid (``resolution`` pixels per side, ``text_len`` random text tokens, guidance 3.5, timestep 500); seeded:
    pipelines built with the same seed get the same inputs."""
    from ralu_runtime.adapters import TokenGrid, get_adapter
    from ralu_runtime.layout import grid_positions
    from ralu_runtime.tiny.flux import random_embeds

    adapter = get_adapter(pipe)
    g = torch.Generator().manual_seed(0)
    cond = adapter.encode_prompt(None, **random_embeds(pipe, 1, text_len, device=device, dtype=dtype),
                                 guidance_scale=3.5)
    side = resolution // (adapter.vae_scale_factor * adapter.patch_size)
    grid = TokenGrid(grid_positions(side, side).to(device)[None], (side, side), None, raster=True)
    x = torch.randn(1, side * side, adapter.token_channels, generator=g).to(device, dtype)
    return adapter, x, grid, torch.tensor(500.0, device=device), cond


def raster_model_call(pipe, resolution: int, text_len: int, device, dtype, *, runner: bool) -> Callable:
    """A zero-argument callable running one model call on :func:`raster_call_inputs`: the installed compile runner's
    (``runner=True``) or ralu's eager ``adapter.velocity``; returns the velocity."""
    adapter, x, grid, t, cond = raster_call_inputs(pipe, resolution, text_len, device, dtype)
    fn = adapter.runner if runner else adapter.velocity

    def run():
        with torch.no_grad():
            return fn(x, grid, t, cond)
    return run


def _whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``least`` (argparse prints the reason and exits 2 otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is not allowed: give {least} or more")
        return value
    return parse


positive_int = _whole_number(1)       # counts: reps, seeds, samples, rounds, batch, requests
non_negative_int = _whole_number(0)   # warm-up calls


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print rows as a fixed-width text table with the given columns ("(no rows)" under the header when empty)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max([len(c), *(len(fmt(r.get(c, ""))) for r in rows)]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    if not rows:
        print("(no rows)")
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def json_safe(value):
    """``value`` with every NaN / infinite float replaced by None (JSON has no NaN: ``json.dumps`` would write the
    non-standard token ``NaN``, which strict parsers refuse); containers are copied, other values kept."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(out_dir: str | Path, name: str, payload: dict) -> Path:
    """Write ``payload`` plus the environment record to ``out_dir/name.json`` (standard JSON: a NaN or infinite
    float, a figure that does not apply, is written as null)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    body = json_safe({"benchmark": name, "environment": environment(), **payload})
    path.write_text(json.dumps(body, indent=2, default=str, allow_nan=False))
    print(f"wrote {path}")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written (pip install matplotlib)")
        return None
    return plt


def save_figure(fig, out_dir: str | Path, name: str, dpi: int = 120) -> Path:
    """Lay out, save to ``out_dir/name.png``, close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(out_dir) / f"{name}.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def bar_plot(out_dir: str | Path, name: str, labels: Sequence[str], values: Sequence[float], ylabel: str, title: str,
             log: bool = False) -> Path | None:
    """Save a simple bar chart to ``out_dir/name.png``; returns None when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) + 2), 4))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    return save_figure(fig, out_dir, name)
