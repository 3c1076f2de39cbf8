"""Command line: ``ralu generate`` (an image with RALU, per-stage timings printed), ``ralu edit`` (img2img and
inpainting of an image file, the same report), ``ralu serve`` (an OpenAI-compatible images API over the serving
engine) and ``ralu info`` (what ralu finds in this environment).

With no ``--model`` it builds the tiny random FLUX pipeline (no download), so the demo runs anywhere.
Every argument is checked before a model is built or loaded: a bad one prints one line ``ralu: error: ...`` to
stderr and exits with status 2; an error while generating prints one line and exits with 1 (``--debug`` shows
the traceback instead). Nothing heavy (torch, numpy, diffusers) is imported until a command runs, so
``ralu --help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .families import CPU_FRAMES, EDIT_PIPELINES, FAMILIES, TINY_SIZE, TINY_TEXT_LEN, family_for_pipeline
from .families import TINY_MODELS as _TINY
from .limits import MAX_GUIDANCE_SCALE, MAX_SEED, MAX_SEQUENCE_LENGTH, MAX_STEPS, MAX_TIMEOUT_S
from .text import lone_surrogate
from .versions import installed_version

EXIT_FAILURE, EXIT_USAGE = 1, 2
# family facts come from the torch-free registry ralu_runtime.families; the views below are what the checks use
# built-in random models: name -> (preset family, max pixels per side)
TINY_MODELS = {name: (t.family, t.max_side_px) for name, t in _TINY.items()}
# diffusers pipeline class -> its (base) family
PIPELINE_FAMILIES = {cls: fam.name for fam in FAMILIES.values() for cls in fam.pipelines}
VIDEO_EXTENSIONS = (".webp", ".png", ".apng", ".gif")  # animated images Pillow writes
TOKEN_PX = 16  # pixels per latent token side in every family: VAE 8 x patch 2 (HunyuanVideo 1.5: VAE 16 x patch 1)
COARSE_BLOCK_PX = 32                  # VAE factor 8 x patch 2 x 2 (RALU's coarse stage), FLUX and SD3
# Names owned by modules that import torch, repeated here so that --help needs no torch (tests/test_cli.py
# checks they agree with ralu_runtime.solvers.SOLVERS and ralu_runtime.compile.BACKENDS).
SOLVER_NAMES = ("euler", "ab2", "dpmpp2m")
BACKEND_NAMES = ("eager", "inductor", "onnx", "tensorrt")
COMPILED_BACKENDS = ("inductor", "onnx", "tensorrt")
PRESET_HELP = "; ".join(f"{fam.label}: {', '.join(fam.presets)}" for fam in FAMILIES.values())
DEFAULT_PRESET_HELP = ", ".join(f"{fam.label} {fam.default_preset}" for fam in FAMILIES.values())
COMMON_EXTENSIONS = ".png, .jpg, .jpeg, .webp, .bmp, .tiff"


class UsageError(ValueError):
    """A bad command-line argument (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised as :class:`UsageError` (printed by :func:`main` as one line)."""

    def error(self, message):
        raise UsageError(message)


def _speedup(value: str):
    value = value.strip().lower()
    return None if value in ("none", "baseline", "off") else value


def _own_version() -> str:
    """ralu's installed version (distribution metadata: no torch import), or "unknown" when run from a tree that was
    never installed."""
    from .versions import installed_version

    return installed_version("ralu") or "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``ralu`` argument parser (imports nothing heavy)."""
    parser = _Parser(prog="ralu", description="RALU: region-adaptive latent upsampling for DiTs")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=f"ralu {_own_version()}",
                        help="print ralu's version and exit (`ralu info` lists torch, diffusers, kernels...)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,edit,serve,info}")
    g = image_args = argparse.ArgumentParser(add_help=False)  # the arguments of generate and edit
    g.add_argument("--model", metavar="PATH", default="tiny-flux",
                   help="local diffusers folder of a supported pipeline ("
                        f"{', '.join(f.label for f in FAMILIES.values() if f.pipelines)}; the family is read from its "
                        "model_index.json; nothing is downloaded), or a built-in random model: "
                        f"{', '.join(TINY_MODELS)} (default tiny-flux)")
    g.add_argument("--prompt", metavar="TEXT", default="a photograph of a red fox in the snow",
                   help="the text prompt (default: %(default)r)")
    g.add_argument("--negative-prompt", metavar="TEXT", default=None,
                   help="what to steer away from, for models with classifier-free guidance (SD3, FLUX.2 klein base, "
                        "Qwen-Image, Z-Image, Chroma, Wan, HunyuanVideo 1.5); used where the guidance scale runs it")
    g.add_argument("--height", metavar="PX", type=int, default=None,
                   help=f"pixels, a multiple of {COARSE_BLOCK_PX} (default {TINY_SIZE} for tiny models, "
                        "else the pipeline's: 1024 for images, 480 x 832 for video)")
    g.add_argument("--width", metavar="PX", type=int, default=None, help="pixels, as --height")
    g.add_argument("--frames", metavar="N", type=int, default=None,
                   help=f"video models: frames, 1 + a multiple of the VAE's time factor (default {CPU_FRAMES} for tiny "
                        "models, else the pipeline's); written as an animated WebP/PNG/GIF")
    g.add_argument("--regions", choices=("clip", "frame"), default=None,
                   help="video models: regions chosen per latent frame (frame, default) or the same in every frame "
                        "(clip)")
    g.add_argument("--speedup", metavar="PRESET", type=_speedup, default="default",
                   help=f"preset name ({PRESET_HELP}), 'default' (the family's default preset: "
                        f"{DEFAULT_PRESET_HELP}), or 'none' for the "
                        "ordinary full-resolution sampler")
    g.add_argument("--steps", metavar="N", type=int, default=None, help="baseline steps (with --speedup none only)")
    g.add_argument("--guidance", metavar="SCALE", type=float, default=None,
                   help="guidance scale (default: the model's)")
    g.add_argument("--seed", metavar="N", type=int, default=0, help="random seed: same seed, same image (default 0)")
    g.add_argument("--noise", choices=("reference", "exact"), default=None,
                   help="transition noise: the reference implementation's (default) or exact marginal variance")
    g.add_argument("--solver", choices=SOLVER_NAMES, default="euler",
                   help="ODE solver within the stages (default euler, as the paper)")
    g.add_argument("--edge-detector", choices=("opencv", "gpu"), default=None,
                   help="Canny for the region choice: OpenCV on the CPU (default) or ralu's on-device one")
    g.add_argument("--region-source", choices=("decode", "latent"), default=None,
                   help="regions from Canny on the VAE-decoded stage-1 preview (decode, default) or from the latents' "
                        "gradients (latent: no preview decode, cheaper for video VAEs)")
    g.add_argument("--device", metavar="DEVICE", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--out", metavar="PATH", default="ralu.png",
                   help=f"output image ({COMMON_EXTENSIONS}, ...; default ralu.png)")
    g.add_argument("--mask-out", metavar="PATH", default=None,
                   help="also write the image with the regions upsampled first tinted (RALU runs only)")
    g.add_argument("--max-sequence-length", metavar="N", type=int, default=None,
                   help=f"text tokens, 1..{MAX_SEQUENCE_LENGTH} (default {TINY_TEXT_LEN} for tiny "
                        "models, else the pipeline's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--cache", metavar="SPEC", default=None,
                   help="temporal feature cache: 'taylorseer:W[:order]' (e.g. taylorseer:3), 'fbcache:THRESHOLD' "
                        "(e.g. fbcache:0.1) or 'none' (default)")
    g.add_argument("--backend", choices=BACKEND_NAMES, default=None,
                   help="per-stage compilation backend (default: plain eager); a compiled one (inductor, onnx, "
                        "tensorrt) is built by a warm-up run first, timed as its own row. onnx needs the "
                        "[onnx] extra: pip install -e '.[onnx]'")
    g.add_argument("--cpu-offload", action="store_true",
                   help="keep the models on the CPU and move each to the GPU while it runs (diffusers' "
                        "enable_model_cpu_offload): less GPU memory, slower; eager only (no compiled --backend, no "
                        "--precision fp8); needs a GPU --device")
    p = precision_args = argparse.ArgumentParser(add_help=False)  # the weights' dtype: generate, edit and serve
    p.add_argument("--storage-dtype", choices=("float8_e4m3fn", "bfloat16", "float16"), default=None,
                   help="keep the transformer's Linear / Conv weights in this dtype and cast each layer to --dtype as "
                        "it runs (diffusers' enable_layerwise_casting): less memory (float8_e4m3fn: about half of "
                        "bf16), weights rounded; eager or --backend inductor on a CPU (no CUDA graphs)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32", "fp8"), default=None,
                   help="fp8: the transformer blocks' linear layers in fp8 (e4m3) on ralu's own quantized copies "
                        "(GPU of compute capability >= 8.9; eager or inductor backend, eager when --backend is not "
                        "given); default: the model's own dtype (--dtype)")
    sub.add_parser("generate", parents=[common, image_args, precision_args],
                   help="generate one image and print per-stage timings",
                   description="Generate one image with RALU and print per-stage steps, tokens and seconds. "
                               "Arguments are checked before the model is loaded.")
    e = sub.add_parser("edit", parents=[common, image_args, precision_args],
                       help="edit an image (img2img, inpainting) with RALU",
                       description="img2img (--image, --strength) and inpainting (--mask) on FLUX.1, SD3, Chroma, "
                                   "Z-Image and Qwen-Image, FLUX.1 "
                                   "Fill (--image, --mask) and FLUX.1 control (--control-image): "
                                   "the image is resized to --height x --width; per-stage timings are printed. "
                                   "FLUX.1 Kontext (tiny-flux-kontext or a FluxKontextPipeline folder): the image is "
                                   "the reference, the output --height x --width (no --strength, no --mask). "
                                   "Arguments and files are checked before the model is loaded.")
    e.add_argument("--image", metavar="PATH", default=None,
                   help="the image to edit (any format Pillow reads); required except with --control-image")
    e.add_argument("--control-image", metavar="PATH", default=None,
                   help="FLUX.1 control models (FluxControlPipeline, e.g. tiny-flux-control): the Canny / depth map "
                        "the image follows, resized to --height x --width (no --image)")
    e.add_argument("--mask", metavar="PATH", default=None,
                   help="inpainting mask: white = repaint, black = keep; resized like the image")
    e.add_argument("--keep-reference-size", action="store_true",
                   help="FLUX.1 Kontext: keep the reference image's own size (rounded down to multiples of 16 "
                        "pixels) instead of resizing it to the preferred Kontext resolution of its aspect ratio")
    e.add_argument("--strength", metavar="S", type=float, default=None,
                   help="0 < S <= 1: how much of the schedule is re-run from the noised image (default: the "
                        "editing pipeline's own: 0.6 for most, 0.9 for Chroma img2img, 1.0 for Z-Image inpainting "
                        "and FLUX.1 Fill)")
    s = sub.add_parser("serve", parents=[common, precision_args],
                       help="serve an OpenAI-compatible images API (HTTP) over the continuous-batching engine",
                       description="Serve POST /v1/images/generations (OpenAI images API; JSON, PNG as b64_json), "
                                   "POST /v1/images/edits (multipart uploads; FLUX.1, SD3, Chroma, Z-Image and "
                                   "Qwen-Image models, FLUX.1 Fill, control and Kontext), "
                                   "GET /health and GET /metrics (Prometheus) over ralu's serving engine until "
                                   "SIGINT/SIGTERM: then new requests get 503 while running and queued ones finish "
                                   "(--grace seconds). Needs the [serve] extra: pip install -e '.[serve]'.")
    s.add_argument("--model", metavar="PATH", default="tiny-flux",
                   help="a local diffusers folder of a supported image pipeline, or a built-in random model: "
                        f"{', '.join(m for m, t in _TINY.items() if not FAMILIES[t.family].is_video)} "
                        "(default tiny-flux)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", metavar="N", type=int, default=8000, help="TCP port (default 8000; 0: a free one)")
    s.add_argument("--max-active", metavar="N", type=int, default=8, help="requests running at once (default 8)")
    s.add_argument("--max-queue", metavar="N", type=int, default=64,
                   help="requests waiting beyond those; more get 503 (default 64)")
    s.add_argument("--token-budget", metavar="N", type=int, default=None,
                   help="image tokens per packed model call (default: the engine's)")
    s.add_argument("--speedup", metavar="PRESET", type=_speedup, default="default",
                   help="preset for requests that name none (default: the family's default; 'none': the "
                        "ordinary sampler)")
    s.add_argument("--device", metavar="DEVICE", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    s.add_argument("--request-timeout", metavar="SECONDS", type=float, default=600.0,
                   help="seconds a request may take (its default and its largest 'timeout'; default 600)")
    s.add_argument("--grace", metavar="SECONDS", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds to finish running and queued requests (default 30)")
    s.add_argument("--max-images", metavar="N", type=int, default=10, help="largest n per request (default 10)")
    s.add_argument("--max-upload-mb", metavar="MB", type=int, default=16,
                   help="largest POST /v1/images/edits form (image, mask and fields) in MiB; larger get 413 "
                        "(default 16)")
    s.add_argument("--max-upload-pixels", metavar="N", type=int, default=4096 * 4096,
                   help="largest uploaded image in pixels, read from its header before decoding; larger get 400 "
                        "(default 16777216: 4096x4096)")
    s.add_argument("--max-token-steps", metavar="N", type=int, default=None,
                   help="most work one request may ask for: latent tokens x model calls over its images (default: "
                        "the library's, ralu_runtime.limits)")
    s.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="server log level (default info)")
    s.add_argument("--log-prompts", action="store_true",
                   help="let the libraries' warnings quote prompts (default: a prompt's text is never logged)")
    a = s.add_argument_group("access (who may call; see docs/serving.md)")
    a.add_argument("--api-key", metavar="KEY", action="append", default=None,
                   help="accept requests with 'Authorization: Bearer KEY' only (all paths but /health); repeat or "
                        "separate with commas for several keys; at least 16 characters. Other users can read a "
                        "command line: prefer $RALU_API_KEY or --api-key-file")
    a.add_argument("--api-key-file", metavar="PATH", default=None,
                   help="read API keys from this file (one per line), in addition to --api-key and $RALU_API_KEY")
    a.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone who reaches the port can use it)")
    a.add_argument("--allowed-host", metavar="NAME", action="append", default=None,
                   help="a name clients may give in the Host header, besides the loopback names and --host (repeat; "
                        "'*': any); other Host values get 421 (guards against DNS rebinding)")
    a.add_argument("--cors-origin", metavar="ORIGIN", action="append", default=None,
                   help="a web origin (e.g. https://app.example.com) whose pages may call the API, with CORS "
                        "headers (repeat; '*': any); default none: browsers' cross-origin POSTs get 403")
    c = s.add_argument_group("connections (the HTTP server without --ray)")
    c.add_argument("--max-connections", metavar="N", type=int, default=256,
                   help="open connections; more get 503 at once (default 256)")
    c.add_argument("--header-timeout", metavar="SECONDS", type=float, default=10.0,
                   help="seconds a client has to send a request's head (default 10)")
    c.add_argument("--body-timeout", metavar="SECONDS", type=float, default=60.0,
                   help="seconds a client has to send a request's body after its head (default 60)")
    r = s.add_argument_group("Ray Serve (--ray; needs the [ray] extra: pip install -e '.[ray]')")
    r.add_argument("--ray", action="store_true",
                   help="serve with Ray Serve: engine replicas (one per GPU of the Ray cluster, CPU replicas where "
                        "it has none), each loading and warming up the model before it takes traffic, behind the same "
                        "HTTP API; a request whose replica dies is sent to another one")
    r.add_argument("--replicas", metavar="N|MIN:MAX", default=None,
                   help="with --ray: N replicas, or MIN:MAX to autoscale on queue depth (default: one per GPU)")
    r.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="with --ray: the Ray cluster to join (default: $RAY_ADDRESS, a cluster started with "
                        "`ray start` on this machine, or a new local one)")
    r.add_argument("--backend", choices=BACKEND_NAMES, default=None,
                   help="compile backend of the engine (of every replica with --ray), built by a warm-up request "
                        "before the server takes traffic")
    r.add_argument("--compile-artifacts", metavar="PATH", default=None,
                   help="with --ray: compile-cache bundle written by save_compile_artifacts, loaded (signature "
                        "checked) by every replica before its warm-up; the same path on every node")
    i = sub.add_parser("info", parents=[common], help="versions, device, kernels and backends ralu finds here",
                       description="Print the versions, the device, which kernels and attention/compile backends "
                                   "ralu uses here (and why), and its cache paths.")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


# ------------------------------------------------------------------------------------------- checks
@dataclass
class GeneratePlan:
    """The checked and resolved arguments of ``ralu generate``."""

    model: str
    family: str
    height: int
    width: int
    speedup: str | None
    device: str
    dtype: str
    max_sequence_length: int | None
    text_len: int | None      # prompt-embedding length of a generate call (for the warm-up's dummy prompt)
    out: str
    mask_out: str | None
    num_frames: int | None = None   # video models only
    regions: str | None = None      # video models only
    cpu_offload: bool = False       # diffusers' enable_model_cpu_offload on the loaded pipeline
    storage_dtype: str | None = None  # diffusers' enable_layerwise_casting of the transformer(s) to this dtype


def _model_family(model: str) -> tuple[str, tuple[int, int], int | None]:
    """``(preset family, default (height, width) in pixels, max pixels per side or None)`` of ``--model``, read from
    the registry (:mod:`ralu_runtime.families`), the folder's ``model_index.json`` and ``transformer/config.json``
    without loading anything."""
    if model in _TINY:
        tiny = _TINY[model]
        return tiny.family, (tiny.default_size, tiny.default_size), tiny.max_side_px
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise UsageError(f"model folder not found: {model!r} (--model takes a local diffusers folder, nothing is "
                         f"downloaded; or one of {', '.join(TINY_MODELS)} for the built-in random models)")
    index = folder / "model_index.json"
    if not index.is_file():
        raise UsageError(f"--model {model!r} is not a diffusers pipeline folder (no model_index.json)")
    cls = _read_json(index).get("_class_name")
    fam = family_for_pipeline(cls) if isinstance(cls, str) else None
    if fam is None and cls == "FluxKontextPipeline":  # FLUX.1 Kontext runs on the FLUX.1 adapter
        fam = FAMILIES["flux"]
    if fam is None:
        raise UsageError(f"--model {model!r} holds a {cls!r} pipeline; ralu supports {', '.join(PIPELINE_FAMILIES)}")
    cfg = _read_json(folder / "transformer" / "config.json", missing_ok=True)
    if fam.name == "flux" and not cfg.get("guidance_embeds", True):
        fam = FAMILIES["flux-schnell"]
    if cls == "Flux2KleinPipeline" and _read_json(index).get("is_distilled", False):
        fam = FAMILIES["flux2-klein"]
    cap = fam.max_side_px
    if fam.name == "z-image":  # its RoPE tables' length (axes_lens, diffusers' default 512) x patch 2 x VAE 8
        lens = cfg.get("axes_lens") or (1024, 512, 512)
        cap = int(min(lens[1], lens[2])) * 16
    elif fam.name == "wan":  # its RoPE table's length (rope_max_seq_len, 1024) x patch 2 x VAE 8
        cap = int(cfg.get("rope_max_seq_len", 1024)) * 16
    elif fam.name == "sd3":  # its position table's side (pos_embed_max_size) x patch x VAE factor
        vae = _read_json(folder / "vae" / "config.json", missing_ok=True)
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1) if "block_out_channels" in vae else 8
        table = cfg.get("pos_embed_max_size")
        cap = int(table) * int(cfg.get("patch_size", 2)) * vae_factor if table else None
    return fam.name, fam.default_hw, cap


def _takes_negative_prompt(model: str, family: str) -> bool:
    """Whether ``--model`` takes a negative prompt (its adapter's ``supports_negative_prompt``), read without
    loading it: a family with negative prompts (``Family.negative_prompt``), or a FLUX.2 klein base folder
    (``Flux2KleinPipeline``, not step-distilled)."""
    if FAMILIES[family].negative_prompt:
        return True
    if family != "flux2" or model in _TINY:  # tiny-flux2 is a FLUX.2-dev: a guidance embedding
        return False
    return _read_json(Path(model).expanduser() / "model_index.json").get("_class_name") == "Flux2KleinPipeline"


def _read_json(path: Path, missing_ok: bool = False) -> dict:
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{str(path)!r} is not a JSON object")
    return data


def _check_int(flag: str, value, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise UsageError(f"{flag} {value} is not allowed: need an integer in [{lo}, {hi}]")


ICON_FORMATS = ("ICO", "ICNS")  # Pillow writes these resampled to icon sizes: the file would not be the image


def _image_format(path: str) -> str:
    """Pillow's format name for ``path``'s extension (UsageError when Pillow cannot write it)."""
    import io

    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        what = f"unknown image extension {ext!r}" if ext else "no file extension"
        raise UsageError(f"{what}: use {COMMON_EXTENSIONS} (or another extension Pillow can write)")
    if fmt in ICON_FORMATS:
        raise UsageError(f"{ext!r} writes an icon ({fmt}): Pillow resamples the image to fixed icon sizes (at most "
                         f"256 px, or a 1024 px square), not the image ralu made; use {COMMON_EXTENSIONS}")
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception as exc:  # noqa: BLE001 - e.g. a plugin without its codec
        raise UsageError(f"Pillow cannot write {fmt} images here ({exc})") from None
    return fmt


def _check_output(flag: str, path: str, video: bool = False) -> str:
    """``path`` if an image (``video``: an animated image) can be written there: a known extension, in an existing
    writable folder, and the file really opens for writing (an existing file is opened for appending and left as it
    is; a new one is created and removed again), before any model is loaded."""
    try:
        _image_format(path)
    except UsageError as exc:
        raise UsageError(f"{flag} {path!r}: {exc}") from None
    if video and os.path.splitext(path)[1].lower() not in VIDEO_EXTENSIONS:
        raise UsageError(f"{flag} {path!r}: a video is written as an animated image: use "
                         f"{', '.join(VIDEO_EXTENSIONS)}")
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{flag} {path!r} is a folder; give an image file name")
    if target.exists() and not target.is_file():  # a FIFO, socket or device: opening it would block or stream
        raise UsageError(f"{flag} {path!r} exists and is not a regular file (a pipe, socket or device); give an "
                         "image file name")
    folder = target.absolute().parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: folder {str(folder)!r} is not writable")
    existed = target.exists()
    try:
        with open(target, "ab" if existed else "xb"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path!r} cannot be written: {exc.strerror or exc}") from None
    if not existed:
        try:
            target.unlink()
        except OSError:
            pass
    return str(target)


def _check_weights(args, device: str, dtype: str, *, probe_device: bool = True) -> None:
    """--storage-dtype and --precision (generate, edit and serve) against the device, --dtype and --backend;
    ``probe_device=False``: not whether this machine's device runs fp8 (``serve --ray``: the replicas' GPUs)."""
    if args.storage_dtype is not None:
        import torch

        if getattr(torch, args.storage_dtype).itemsize >= getattr(torch, dtype).itemsize:
            raise UsageError(f"--storage-dtype {args.storage_dtype} is not narrower than the model's --dtype {dtype}: "
                             "it would save nothing; give a narrower one (e.g. float8_e4m3fn) or leave it out")
        if args.backend in ("onnx", "tensorrt") or (args.backend == "inductor" and device.startswith("cuda")):
            raise UsageError(f"--storage-dtype with --backend {args.backend}"
                             + (" on a GPU (CUDA graphs, on by default there, cannot replay the casting)"
                                if args.backend == "inductor" else " (an exported model cannot run the casting)")
                             + ": leave --backend out (eager)")
        if args.precision == "fp8":
            raise UsageError("--storage-dtype with --precision fp8: use one of the two (fp8 quantizes the weights "
                             "itself)")
    named = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(args.precision)
    if named is not None and named != dtype:
        raise UsageError(f"--precision {args.precision} but the model runs in {dtype} (--dtype): ralu runs a model in "
                         f"its own dtype or in fp8; give --dtype {named} (or --precision auto / fp8)")
    if args.precision == "fp8":
        from .compile import fp8_support

        if args.backend not in (None, "eager", "inductor"):
            raise UsageError(f"--precision fp8 runs with --backend eager or inductor, not {args.backend!r}")
        ok, why = fp8_support(device) if probe_device else (True, "")
        if not ok:
            raise UsageError(f"--precision fp8: {why}")


def _check_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    import torch

    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UsageError(f"--device {name!r}: no CUDA device is visible to torch {torch.__version__} ({build}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name!r} is not supported: use cpu, cuda or cuda:N")
    elif dev.index not in (None, 0):  # torch takes cpu:N but runs every index on the one CPU device
        raise UsageError(f"--device {name!r}: there is one CPU device; use cpu")
    return name, dtype or ("bfloat16" if dev.type == "cuda" else "float32")


def _backend_unavailable(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` here (None when it can)."""
    from .compile import available_backends

    if backend in available_backends(device):
        return None
    if backend == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        return (f"needs {' and '.join(missing) if missing else 'onnx and onnxruntime (not importable)'}: "
                "pip install -e '.[onnx]'")
    if backend == "tensorrt":
        if not device.startswith("cuda"):
            return "runs on CUDA devices only"
        from .compile.tensorrt import tensorrt_flavour

        try:
            tensorrt_flavour()
        except ImportError as exc:
            return str(exc)
    return "not available on this device"


def check_generate(args) -> GeneratePlan:
    """Check every ``ralu generate`` argument, before any model is built or loaded; UsageError names the bad
    value and what is allowed."""
    family, (default_h, default_w), cap = _model_family(args.model)
    fam = FAMILIES[family]
    video = fam.is_video
    height = default_h if args.height is None else args.height
    width = default_w if args.width is None else args.width
    num_frames = None
    if video:
        num_frames = args.frames if args.frames is not None else (
            _TINY[args.model].default_frames if args.model in _TINY else fam.default_frames)
        _check_int("--frames", num_frames, 1, 4096)
        if (num_frames - 1) % fam.temporal_factor:
            raise UsageError(f"--frames {num_frames} is not allowed: {family} needs 1 + a multiple of "
                             f"{fam.temporal_factor} frames")
    else:
        for flag, value in (("--frames", args.frames), ("--regions", args.regions)):
            if value is not None:
                raise UsageError(f"{flag} applies to video models; {args.model} ({family}) makes images")
    for flag, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % COARSE_BLOCK_PX:
            raise UsageError(f"{flag} {value} is not allowed: need a positive multiple of {COARSE_BLOCK_PX} pixels "
                             "(VAE factor 8 x patch 2 x 2 for RALU's coarse stage)")
        if cap is not None and value > cap:
            raise UsageError(f"{flag} {value} is not allowed: {args.model} takes at most {cap} pixels per side")
    presets = fam.presets
    if args.speedup is not None and args.speedup != "default" and args.speedup not in presets:
        raise UsageError(f"--speedup {args.speedup!r} is not a preset of {family} ({args.model}): use "
                         f"{', '.join(presets)}, default or none")
    if args.steps is not None:
        if args.speedup is not None:
            raise UsageError(f"--steps {args.steps} applies to --speedup none only (a RALU preset fixes its own "
                             "steps)")
        _check_int("--steps", args.steps, 1, MAX_STEPS)
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        if text is not None and lone_surrogate(text) is not None:
            raise UsageError(f"{flag} is not valid UTF-8 text (the command line held bytes that are not UTF-8): give "
                             "the prompt in UTF-8")
    if args.negative_prompt is not None and not _takes_negative_prompt(args.model, family):
        raise UsageError(f"--negative-prompt: {args.model} ({family}) runs no classifier-free guidance (a guidance "
                         f"embedding or a step-distilled model); families that take one: "
                         f"{', '.join(f.name for f in FAMILIES.values() if f.negative_prompt)} and FLUX.2 klein base")
    if args.guidance is not None and not 0.0 <= args.guidance <= MAX_GUIDANCE_SCALE:
        raise UsageError(f"--guidance {args.guidance} is not allowed: need a number in "
                         f"[0, {MAX_GUIDANCE_SCALE:g}]")
    _check_int("--seed", args.seed, 0, MAX_SEED)
    _check_int("--max-sequence-length", args.max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
    out = _check_output("--out", args.out, video)
    mask_out = None
    if args.speedup is None:  # flags of RALU's transitions and region choice: nothing to apply them to
        for flag, value in (("--mask-out", args.mask_out), ("--noise", args.noise),
                            ("--edge-detector", args.edge_detector), ("--region-source", args.region_source),
                            ("--regions", args.regions)):
            if value is not None:
                raise UsageError(f"{flag} needs a RALU run: --speedup none upsamples no regions")
    if args.mask_out is not None:
        mask_out = _check_output("--mask-out", args.mask_out, video)
        if os.path.abspath(mask_out) == os.path.abspath(out):
            raise UsageError(f"--mask-out {args.mask_out!r} is the same file as --out")
    device, dtype = _check_device(args.device, args.dtype)
    _check_weights(args, device, dtype)
    if args.cpu_offload:
        if args.backend not in (None, "eager"):
            raise UsageError(f"--cpu-offload runs eagerly: --backend {args.backend} holds the weights where they were "
                             "when it was built; leave --backend out (or eager)")
        if args.precision == "fp8":
            raise UsageError("--cpu-offload with --precision fp8: ralu's fp8 weight copies would stay on the GPU; "
                             "use one of the two")
        if not device.startswith("cuda"):
            raise UsageError(f"--cpu-offload moves models between the CPU and a GPU; --device {device} has none to "
                             "move them to (leave --cpu-offload out)")
    if args.cache is not None:
        from .cache import make_cache

        try:
            make_cache(args.cache)
        except ValueError as exc:
            raise UsageError(f"--cache {args.cache!r}: {exc}") from None
    if args.backend is not None:
        why = _backend_unavailable(args.backend, device)
        if why:
            raise UsageError(f"--backend {args.backend!r} is not available here: {why}")
    msl = args.max_sequence_length or (_TINY[args.model].max_sequence_length if args.model in _TINY else None)
    text_len = None if msl is None else (77 + msl if family == "sd3" else msl)  # SD3: CLIP 77 + T5 tokens
    if family == "hunyuan-video-1.5":  # its pipeline takes no max_sequence_length (the tokenizers' lengths)
        if args.max_sequence_length is not None:
            raise UsageError(f"--max-sequence-length does not apply to {args.model} ({family}): its pipeline pads "
                             "prompts to its tokenizers' lengths")
        msl = None
    return GeneratePlan(args.model, family, height, width, args.speedup, device, dtype, msl, text_len, out,
                        mask_out, num_frames, args.regions if video else None, cpu_offload=args.cpu_offload,
                        storage_dtype=args.storage_dtype)


@dataclass
class ServePlan:
    """The checked and resolved arguments of ``ralu serve``."""

    model: str
    family: str
    device: str | None        # None with --ray: each replica picks its own (its GPU, or the CPU)
    dtype: str | None
    defaults: dict            # generate arguments of every request unless it sets them
    replicas: int | tuple[int, int] | None = None   # --ray: N, (min, max) or None (one per GPU)
    api_keys: tuple = field(default=(), repr=False)  # --api-key, --api-key-file, $RALU_API_KEY
    storage_dtype: str | None = None  # diffusers' enable_layerwise_casting of the transformer(s) to this dtype


RAY_ONLY_FLAGS = (("--replicas", "replicas"), ("--ray-address", "ray_address"),
                  ("--compile-artifacts", "compile_artifacts"))


def _parse_replicas(text: str) -> int | tuple[int, int]:
    """``--replicas``: "N" -> N; "MIN:MAX" -> (MIN, MAX)."""
    parts = text.strip().split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1 and 1 <= values[0] <= 4096:
        return values[0]
    if len(values) == 2 and 1 <= values[0] <= values[1] <= 4096:
        return values[0], values[1]
    raise UsageError(f"--replicas {text!r} is not allowed: use N (replicas, 1..4096) or MIN:MAX (autoscaling on "
                     "queue depth, 1 <= MIN <= MAX)")


def _check_ray_serve(args) -> tuple[str | None, str | None, int | tuple[int, int] | None]:
    """``ralu serve --ray``'s own checks: device, dtype (resolved on each replica), replicas, artifacts."""
    if args.device is not None and args.device not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device!r} with --ray: use cpu or cuda (each replica uses the GPU Ray "
                         "gives it)")
    replicas = None if args.replicas is None else _parse_replicas(args.replicas)
    if args.compile_artifacts is not None and not os.path.isfile(args.compile_artifacts):
        raise UsageError(f"--compile-artifacts {args.compile_artifacts!r}: no such file")
    if args.ray_address is not None and not args.ray_address.strip():
        raise UsageError("--ray-address is empty: give HOST:PORT of the cluster's head (or 'auto')")
    return args.device, args.dtype, replicas


def check_serve(args) -> ServePlan:
    """Check every ``ralu serve`` argument, before any model is built or loaded (UsageError names the bad one)."""
    family, (default_h, default_w), _ = _model_family(args.model)
    if FAMILIES[family].is_video:
        raise UsageError(f"--model {args.model!r} ({family}) makes videos; ralu serve serves the images API: use an "
                         "image model")
    if not args.host.strip():
        raise UsageError("--host is empty: give an address such as 127.0.0.1 or 0.0.0.0")
    _check_int("--port", args.port, 0, 65535)
    _check_int("--max-active", args.max_active, 1, 4096)
    _check_int("--max-queue", args.max_queue, 0, 1 << 20)
    _check_int("--max-images", args.max_images, 1, 4096)
    _check_int("--max-token-steps", args.max_token_steps, 1, 1 << 50)
    _check_int("--max-upload-mb", args.max_upload_mb, 1, 1 << 16)
    _check_int("--max-upload-pixels", args.max_upload_pixels, 1, 1 << 40)
    if args.token_budget is not None:
        _check_int("--token-budget", args.token_budget, 1, 1 << 30)
    timeouts = (("--request-timeout", args.request_timeout, None), ("--grace", args.grace, 0.0),
                ("--header-timeout", args.header_timeout, None), ("--body-timeout", args.body_timeout, None))
    for flag, value, lo in timeouts:
        if value is not None and not (math.isfinite(value) and (value > 0 if lo is None else value >= lo)):
            raise UsageError(f"{flag} {value} is not allowed: need seconds {'> 0' if lo is None else '>= 0'}")
    if args.request_timeout > MAX_TIMEOUT_S:
        raise UsageError(f"--request-timeout {args.request_timeout} is not allowed: need seconds <= {MAX_TIMEOUT_S:g} "
                         "(7 days, the largest 'timeout' a request may give)")
    _check_int("--max-connections", args.max_connections, 1, 1 << 20)
    api_keys = _serve_api_keys(args)
    from .serving.access import check_access_names

    for flag, names in (("--allowed-host", {"allowed_hosts": args.allowed_host or ()}),
                        ("--cors-origin", {"cors_origins": args.cors_origin or ()})):
        try:
            check_access_names(**names)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
    if not api_keys and not args.insecure and not _is_loopback(args.host):
        raise UsageError(f"--host {args.host} is reachable from other machines and no API key is set: anyone who "
                         "reaches the port could use the server. Set $RALU_API_KEY (or --api-key-file / --api-key), "
                         "or add --insecure to serve without one")
    presets = FAMILIES[family].presets
    if args.speedup is not None and args.speedup != "default" and args.speedup not in presets:
        raise UsageError(f"--speedup {args.speedup!r} is not a preset of {family} ({args.model}): use "
                         f"{', '.join(presets)}, default or none")
    replicas = None
    if getattr(args, "ray", False):
        device, dtype, replicas = _check_ray_serve(args)
        # each replica resolves its own device and dtype: check against the narrowest default (bfloat16 on a GPU)
        # and a GPU unless --device cpu; whether the replica's GPU runs fp8 is checked when its engine is built
        _check_weights(args, device or "cuda", dtype or "bfloat16", probe_device=False)
    else:
        for flag, name in RAY_ONLY_FLAGS:
            if getattr(args, name, None) is not None:
                raise UsageError(f"{flag} applies to --ray (Ray Serve replicas) only")
        device, dtype = _check_device(args.device, args.dtype)
        if args.backend is not None:
            why = _backend_unavailable(args.backend, device)
            if why:
                raise UsageError(f"--backend {args.backend!r} is not available here: {why}")
        _check_weights(args, device, dtype)
    defaults = {"speedup": args.speedup}
    if args.precision is not None:
        defaults["precision"] = args.precision
    if args.model in _TINY:   # the same defaults as ralu generate's for the built-in random models
        defaults.update(height=default_h, width=default_w, max_sequence_length=_TINY[args.model].max_sequence_length)
    return ServePlan(args.model, family, device, dtype, defaults, replicas, api_keys, args.storage_dtype)


def _serve_api_keys(args) -> tuple:
    """The API keys of ``ralu serve``: --api-key, --api-key-file and $RALU_API_KEY (comma-separated)."""
    from .serving.access import parse_api_keys

    sources = [os.environ.get("RALU_API_KEY", ""), *(args.api_key or ())]
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                sources += [ln for ln in f.read().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--api-key-file {args.api_key_file!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return parse_api_keys(*sources)
    except ValueError as exc:
        raise UsageError(f"API key: {exc}") from None


def _is_loopback(host: str) -> bool:
    from .serving.access import is_loopback

    return is_loopback(host)


def _listen_or_fail(host: str, port: int):
    """A socket listening on host:port, before any model loads; UsageError (one line) when that is not possible."""
    from .serving.http import bind_socket

    try:
        return bind_socket(host, port)
    except OSError as exc:   # the port is taken, the address is not this machine's, ...
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def cmd_serve(args) -> int:
    """``ralu serve``: check the arguments, build or load the model, serve it until SIGINT / SIGTERM."""
    plan = check_serve(args)
    if getattr(args, "ray", False):
        return _serve_ray(args, plan)
    from .serving import http   # ImportError naming the missing package (fastapi, uvicorn, prometheus_client)
    from .serving import Engine, EngineConfig
    from .serving.logs import quiet_library_logs, server_log

    server_log(args.log_level)
    quiet_library_logs(args.log_prompts)    # before the model's libraries load: they warn on import
    sock = _listen_or_fail(args.host, args.port)    # a taken port is reported now, not after the model loads
    try:
        limits = http.ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                                       max_connections=args.max_connections)
        t0 = time.perf_counter()
        pipe = _load(plan)
        load_s = time.perf_counter() - t0
        defaults = dict(plan.defaults, **({"backend": args.backend} if args.backend is not None else {}))
        engine = Engine(pipe, EngineConfig(token_budget=args.token_budget, max_active=args.max_active,
                                           max_queue=args.max_queue, max_token_steps=args.max_token_steps),
                        **defaults)
    except BaseException:
        sock.close()
        raise
    try:
        if args.backend is not None:   # install and build the backend before the server answers (fast first calls)
            t0 = time.perf_counter()
            for extra in engine.warmup_variants():   # Qwen-Image: with and without a negative prompt
                engine.generate("ralu warm-up", seed=0, output_type="pil", **_warmup_images(args.model), **extra)
            print(f"backend {args.backend}: warmed up in {time.perf_counter() - t0:.2f} s", flush=True)
        from .heap import settle_heap

        # this process is the server's: collect what loading and compiling left, and freeze the rest, so that no
        # full garbage collection of the model's and the compiler's objects pauses a request
        print(f"heap settled (gc.collect + gc.freeze) in {settle_heap(freeze=True):.2f} s", flush=True)
        model_name = args.model if args.model in TINY_MODELS else os.path.basename(os.path.normpath(args.model))

        def ready(url):
            precision = plan.defaults.get("precision")
            print(f"model: {plan.model} ({plan.family}, {plan.device}, {plan.dtype}{_stored(plan)}"
                  + (f", precision {precision}" if precision else "") + f"), loaded in {load_s:.2f} s; "
                  f"served as {model_name!r}")
            auth = (f"API key required ({len(plan.api_keys)} accepted)" if plan.api_keys else
                    "no API key (this machine only)" if _is_loopback(args.host) else
                    "no API key (--insecure: anyone who reaches the port can use it)")
            print(f"ralu serve: listening on {url} (POST {url}{http.GENERATIONS_PATH}, GET {url}/health, "
                  f"GET {url}/metrics); {auth}; Ctrl+C stops", flush=True)

        http.serve(engine, args.host, args.port, model_name=model_name, grace_s=args.grace,
                   log_level=args.log_level, on_ready=ready, default_deadline_s=args.request_timeout,
                   max_images=args.max_images, sock=sock, insecure=args.insecure, limits=limits,
                   max_upload_bytes=args.max_upload_mb << 20, max_upload_pixels=args.max_upload_pixels,
                   log_prompts=args.log_prompts, api_keys=plan.api_keys, allowed_hosts=args.allowed_host or (),
                   cors_origins=args.cors_origin or ())
    finally:
        sock.close()
        engine.shutdown(drain=False, timeout=10)
    print("ralu serve: stopped", flush=True)
    return 0


def _check_work(plan: GeneratePlan, steps: int | None) -> None:
    """The work bound ``generate`` checks (latent tokens x model calls, :mod:`ralu_runtime.limits`), before the model
    loads: every family has one latent token per 16 x 16 pixels (VAE 8 x patch 2, or VAE 16 x patch 1) per latent
    frame, and its presets' steps and ratio are in the registry."""
    from types import SimpleNamespace

    from .limits import LIMITS, token_steps

    fam = FAMILIES[plan.family]
    frames = 1 if plan.num_frames is None else 1 + (plan.num_frames - 1) // fam.temporal_factor
    tokens = frames * (plan.height // TOKEN_PX) * (plan.width // TOKEN_PX)
    if plan.speedup is None:
        runs = steps or fam.default_steps
        work, calls = token_steps(1, tokens, runs), f"{runs} steps"
    else:
        stage_steps, _, ratio, _ = fam.presets[fam.default_preset if plan.speedup == "default" else plan.speedup]
        work = token_steps(1, tokens, 0, SimpleNamespace(steps=tuple(stage_steps), ratio=ratio))
        calls = f"RALU steps {tuple(stage_steps)}"
    if work > LIMITS.max_token_steps:
        raise UsageError(f"this run's work is {work} latent tokens x model calls ({tokens} tokens, {calls}); the limit "
                         f"is max_token_steps={LIMITS.max_token_steps}: use fewer steps or pixels")


def _warmup_images(model: str) -> dict:
    """The images a warm-up request of a FLUX.1 Fill / control model needs (grey; a mask that repaints everything),
    resized by the pipeline to the call's size; nothing for other models."""
    kind = _channel_model(model)
    if kind is None:
        return {}
    from PIL import Image

    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    return {"control_image": grey} if kind == "control" else {"image": grey, "mask_image": Image.new("L", (64, 64), 255)}


def _serve_ray(args, plan: ServePlan) -> int:
    """``ralu serve --ray``: deploy the replicas and the HTTP ingress on Ray Serve; serve until SIGINT / SIGTERM,
    then delete the application (replicas finish their requests for up to --grace seconds)."""
    from .serving import ray as ray_serving   # ImportError naming the [ray] extra
    from .serving.logs import server_log

    server_log(args.log_level)
    model = plan.model if plan.model in TINY_MODELS else os.path.abspath(plan.model)   # replicas' cwd differs
    spec = ray_serving.ReplicaSpec(model=model, device=plan.device, dtype=plan.dtype, defaults=plan.defaults,
                                   max_active=args.max_active, max_queue=args.max_queue,
                                   token_budget=args.token_budget, max_token_steps=args.max_token_steps,
                                   backend=args.backend, storage_dtype=plan.storage_dtype,
                                   compile_artifacts=(os.path.abspath(args.compile_artifacts)
                                                      if args.compile_artifacts else None),
                                   log_prompts=args.log_prompts)
    model_name = args.model if args.model in TINY_MODELS else os.path.basename(os.path.normpath(args.model))
    options = ray_serving.IngressOptions(model_name=model_name, default_deadline_s=args.request_timeout,
                                         max_images=args.max_images, api_keys=plan.api_keys,
                                         allowed_hosts=tuple(args.allowed_host or ()),
                                         cors_origins=tuple(args.cors_origin or ()))
    t0 = time.perf_counter()

    def ready(url, status):
        states = status.deployments["RaluReplica"].replica_states if "RaluReplica" in status.deployments else {}
        running = states.get("RUNNING", 0)
        print(f"model: {plan.model} ({plan.family}) on {running} Ray Serve replica(s), loaded and warmed up in "
              f"{time.perf_counter() - t0:.1f} s; served as {model_name!r}")
        print(f"ralu serve: listening on {url} (POST {url}/v1/images/generations, GET {url}/health, "
              f"GET {url}/metrics) through Ray Serve; Ctrl+C stops", flush=True)

    try:
        ray_serving.run(spec, options, host=args.host, port=args.port, address=args.ray_address,
                        replicas=plan.replicas, grace_s=args.grace, on_ready=ready, insecure=args.insecure)
    except ValueError as exc:   # e.g. device='cuda' on a cluster without GPUs
        raise UsageError(str(exc)) from None
    print("ralu serve: stopped", flush=True)
    return 0


# ------------------------------------------------------------------------------------------- generate
def _stored(plan: GeneratePlan | ServePlan) -> str:
    """", weights stored in DTYPE" under --storage-dtype, else nothing (for the model line of the reports)."""
    return f", weights stored in {plan.storage_dtype}" if plan.storage_dtype else ""


def _load(plan: GeneratePlan | ServePlan):
    import torch

    dtype = getattr(torch, plan.dtype)
    offload = getattr(plan, "cpu_offload", False)  # --cpu-offload: loaded on the CPU, each model moved in to run
    device = "cpu" if offload else plan.device
    if plan.model in TINY_MODELS:
        from .tiny import build_tiny

        pipe = build_tiny(plan.model, device=device, dtype=dtype)
    else:
        from .api import load_pipeline

        pipe = load_pipeline(plan.model, torch_dtype=dtype, device=None if offload else device, reuse=not offload)
    storage = plan.storage_dtype  # --storage-dtype: diffusers' layerwise casting
    if storage is not None:
        from .adapters import get_adapter

        get_adapter(pipe).enable_layerwise_casting(getattr(torch, storage), dtype)
    if offload:
        pipe.enable_model_cpu_offload(device=plan.device)
    return pipe


VIDEO_FPS = 16  # frames per second of written clips (Wan's and HunyuanVideo's native rates are 16 and 24)


def _save_image(array, file, fmt: str) -> None:
    """An ``(H, W, 3)`` uint8 image, or ``(T, H, W, 3)`` frames as an animated image (looping, VIDEO_FPS)."""
    from PIL import Image

    if array.ndim == 4:
        frames = [Image.fromarray(f) for f in array]
        extra = {"lossless": True} if fmt == "WEBP" else {}
        frames[0].save(file, format=fmt, save_all=True, append_images=frames[1:], duration=int(1000 / VIDEO_FPS),
                       loop=0, **extra)
        return
    Image.fromarray(array).save(file, format=fmt)


def write_images(items) -> None:
    """Write ``[(uint8 HWC array, path), ...]`` all or none: each goes to a hidden temporary file in its target
    folder, and all are renamed into place only once every one is written."""
    import secrets

    tmps = []
    try:
        for array, path in items:
            folder, name = os.path.split(os.path.abspath(path))
            tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            with open(tmp, "xb") as f:
                tmps.append(tmp)
                _save_image(array, f, _image_format(path))
        done = []
        try:
            for tmp, (_, path) in zip(tmps, items):
                os.replace(tmp, path)
                done.append(path)
        except BaseException:
            for path in done:
                os.unlink(path)
            raise
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _speedup_line(plan: GeneratePlan, out) -> str:
    sched = out.schedule
    if sched is None:
        steps = sum(r.steps for r in out.records)
        return f"speedup: none (baseline, {steps} steps at full resolution)"
    name = (sched.name or "custom").split("/")[-1]
    origin = f"{plan.family} default" if plan.speedup == "default" else f"{plan.family} preset"
    line = f"speedup: {name} ({origin}): steps {sched.steps}, ends {sched.ends}, r={sched.ratio}"
    ran = [f"{r.name}: {r.steps} steps" for r in out.records if r.steps]
    if sum(r.steps for r in out.records) != sum(sched.steps):  # an edit (strength < 1) runs the schedule's tail
        line += f"; this edit ran {', '.join(ran) or 'no step'} (its strength skips the rest)"
    return line


EDIT_FAMILIES = ("flux", "flux-schnell", "sd3", "chroma", "z-image", "qwen-image")  # as ralu_runtime.editing


def _read_image(flag: str, path: str, mode: str):
    """Open and fully decode an image file (PIL image in ``mode``, EXIF orientation applied as diffusers'
    ``load_image`` and ``ralu serve``'s uploads apply it); UsageError for a missing or unreadable file."""
    from PIL import Image, ImageOps

    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"{flag} {path!r} is not an image Pillow can read ({_one_line(exc)})") from None


_CHANNEL_TINY = {"tiny-flux-fill": "fill", "tiny-flux-control": "control"}
_CHANNEL_USE = {"fill": "it repaints the masked part of an image: ralu edit --image IMG --mask MASK",
                "control": "it follows a control image (Canny / depth map): ralu edit --control-image IMG"}


def _channel_model(model: str) -> str | None:
    """"fill" / "control" when ``--model`` is a FLUX.1 Fill / control pipeline (tiny-flux-fill, tiny-flux-control,
    or a folder whose model_index.json names the class), else None: read without loading anything."""
    if model in _TINY:
        return _CHANNEL_TINY.get(model)
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    kind = EDIT_PIPELINES.get(_read_json(index).get("_class_name"), (None, None))[1]  # the registry's edit kinds
    return kind if kind in _CHANNEL_USE else None


def _is_kontext_model(model: str) -> bool:
    """``--model`` is a FLUX.1 Kontext pipeline (tiny-flux-kontext, or a folder whose model_index.json says so)."""
    if model in _TINY:
        return bool(_TINY[model].kwargs.get("kontext", False))
    index = Path(model).expanduser() / "model_index.json"
    return index.is_file() and _read_json(index).get("_class_name") == "FluxKontextPipeline"


def check_edit(args) -> tuple[GeneratePlan, dict]:
    """Check every ``ralu edit`` argument (those of generate, the files, --strength), before any model is built or
    loaded; returns the plan and the editing arguments of ``generate`` (PIL images, strength)."""
    plan = check_generate(args)
    for flag, path in (("--image", args.image), ("--mask", args.mask), ("--control-image", args.control_image)):
        for out_flag, out in (("--out", plan.out), ("--mask-out", plan.mask_out)):
            if path is not None and out is not None and os.path.exists(path) and os.path.exists(out) \
                    and os.path.samefile(path, out):
                raise UsageError(f"{out_flag} {out!r} is the {flag} file: the edit would overwrite its own input; "
                                 "give another output name")
    if plan.family not in EDIT_FAMILIES:
        raise UsageError(f"ralu edit runs FLUX.1, SD3, Chroma, Z-Image and Qwen-Image models; {args.model} is "
                         f"{plan.family}")
    if args.strength is not None and not (math.isfinite(args.strength) and 0 < args.strength <= 1):
        raise UsageError(f"--strength {args.strength} is not allowed: need 0 < S <= 1")
    if args.control_image is not None:  # FluxControlPipeline: text-to-image with a control image
        given = [f for f, v in (("--image", args.image), ("--mask", args.mask), ("--strength", args.strength))
                 if v is not None]
        if given:
            raise UsageError(f"--control-image runs FLUX.1 control models; {', '.join(given)} do not apply")
        if args.model in TINY_MODELS and _channel_model(args.model) != "control":
            raise UsageError(f"--control-image needs a FLUX.1 control model (tiny-flux-control); {args.model} is not")
        return plan, {"control_image": _read_image("--control-image", args.control_image, "RGB")}
    if args.image is None:
        raise UsageError("give --image (img2img, inpainting, FLUX.1 Fill) or --control-image (FLUX.1 control)")
    if _is_kontext_model(args.model):  # the reference is conditioning: no strength, no mask; --height x --width
        for flag, value in (("--strength", args.strength), ("--mask", args.mask)):  # is the output size
            if value is not None:
                raise UsageError(f"{flag} does not apply to FLUX.1 Kontext ({args.model}): it generates from noise "
                                 "with the image as a reference, not by noising it, and takes no mask")
        reference = _read_image("--image", args.image, "RGB")
        if min(reference.size) < TOKEN_PX:
            raise UsageError(f"--image {args.image!r} is {reference.size[0]}x{reference.size[1]} pixels: a FLUX.1 "
                             f"Kontext reference needs at least {TOKEN_PX} pixels (one token) on each side")
        return plan, {"image": reference, "max_area": plan.height * plan.width,
                      "auto_resize": not args.keep_reference_size}
    if args.keep_reference_size:
        raise UsageError("--keep-reference-size applies to FLUX.1 Kontext models only")
    kind = _channel_model(args.model)
    if kind == "control":
        raise UsageError(f"{args.model} is a FLUX.1 control model: give --control-image (no --image)")
    if kind == "fill" and args.mask is None:
        raise UsageError(f"{args.model} is a FLUX.1 Fill model: give --mask (white = repaint) with --image")
    edit = {"image": _read_image("--image", args.image, "RGB"), "strength": args.strength}
    if args.mask is not None:
        mask = _read_image("--mask", args.mask, "L")
        if not mask.getextrema()[1] >= 128:
            raise UsageError(f"--mask {args.mask!r} has no white pixel: nothing to repaint (white = repaint)")
        from PIL import Image

        # the pipelines' mask processor: resized to the output size (Lanczos), then binarised at 0.5
        if not mask.resize((plan.width, plan.height), Image.Resampling.LANCZOS).getextrema()[1] >= 128:
            raise UsageError(f"--mask {args.mask!r}: its white area vanishes when the mask is resized to "
                             f"{plan.width}x{plan.height} (--width x --height) as the pipeline does: nothing left to "
                             "repaint; widen the white area or edit at a larger size")
        edit["mask_image"] = mask
    return plan, edit


def cmd_edit(args) -> int:
    """``ralu edit``: as ``ralu generate`` with an image (and a mask) to edit."""
    return cmd_generate(args, check_edit(args))


def cmd_generate(args, edit_plan: tuple | None = None) -> int:
    """``ralu generate``: check the arguments, build or load the model, (warm up), generate, write, report.
    ``edit_plan``: ``ralu edit``'s checked plan and editing arguments."""
    plan, edit = edit_plan if edit_plan is not None else (check_generate(args), {})
    if edit_plan is None:  # ralu generate: no image
        _check_work(plan, args.steps)
        kind = _channel_model(args.model)
        if kind is not None:
            raise UsageError(f"--model {args.model} is a FLUX.1 {kind} model, which ralu generate cannot run without "
                             f"an image: {_CHANNEL_USE[kind]}")
        if _is_kontext_model(args.model):  # FLUX.1 Kontext without a reference: --height x --width is the output
            edit = {"max_area": plan.height * plan.width}  # size here too
    from .serving.logs import quiet_library_logs

    quiet_library_logs(log_prompts=True)  # before the libraries load: no torchvision notice (the prompt is the user's)
    import numpy as np

    from .api import generate

    t0 = time.perf_counter()
    pipe = _load(plan)
    load_s = time.perf_counter() - t0
    kwargs = dict(height=plan.height, width=plan.width, speedup=plan.speedup, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, noise=args.noise or "reference", solver=args.solver,
                  edge_detector=args.edge_detector or "opencv", cache=args.cache,
                  region_source=args.region_source or "decode")
    if plan.num_frames is not None:
        kwargs.update(num_frames=plan.num_frames, region_mode=plan.regions)
    compile_s = None
    if args.backend in COMPILED_BACKENDS:
        from .warmup import warmup

        t0 = time.perf_counter()
        warmup(pipe, backend=args.backend, text_len=plan.text_len, runs=1, **kwargs,
               negative_prompt=args.negative_prompt is not None,
               compile_options={"precision": args.precision} if args.precision else None)
        compile_s = time.perf_counter() - t0
    out = generate(pipe, args.prompt, **kwargs, **edit, seed=args.seed, output_type="np",
                   negative_prompt=args.negative_prompt,
                   return_masks=plan.mask_out is not None, max_sequence_length=plan.max_sequence_length,
                   progress=not args.no_progress, backend=args.backend, precision=args.precision)
    image = (np.clip(np.asarray(out.images[0]), 0, 1) * 255).round().astype(np.uint8)  # (H, W, 3) or (T, H, W, 3)
    items = [(image, plan.out)]
    if plan.mask_out is not None and out.masks is None:  # an edit whose strength starts it in the last stage
        print(f"--mask-out {plan.mask_out}: not written: this call chose no regions (an edit that starts at full "
              "resolution, in the last stage; a higher --strength starts it earlier)")
    elif plan.mask_out is not None:
        from .edges import overlay_mask

        mask = out.masks[0].cpu().numpy()
        if image.ndim == 4:  # video: frame t shows the regions of its latent frame (t + 3) // 4
            over = [overlay_mask(fr, mask[min((t + 3) // 4, mask.shape[0] - 1)]) for t, fr in enumerate(image)]
            items.append((np.stack(over), plan.mask_out))
        else:
            items.append((overlay_mask(image, mask), plan.mask_out))
    write_images(items)

    print(f"model: {plan.model} ({plan.family}, {plan.device}, {plan.dtype}{_stored(plan)}), loaded in {load_s:.2f} s")
    print(_speedup_line(plan, out))
    frames = (f", {plan.num_frames} frames" + (f", regions {plan.regions or 'frame'}" if out.schedule else "")
              if plan.num_frames else "")  # a baseline chooses no regions
    print(f"size: {plan.width}x{plan.height} (width x height){frames}, seed {args.seed}, solver {args.solver}, "
          f"backend {args.backend or 'eager'}" + (f", precision {args.precision}" if args.precision else "")
          + (f", cache {args.cache}" if args.cache else ""))
    print(f"{'stage':<20}{'steps':>6}{'tokens':>8}{'seconds':>10}")
    if compile_s is not None:
        print(f"{'compile (warm-up)':<20}{'':>6}{'':>8}{compile_s:>10.3f}")
    records = {r.name: r for r in out.records}
    for name, sec in out.timings.items():
        rec = records.get(name)
        print(f"{name:<20}{rec.steps if rec else '':>6}{rec.tokens if rec else '':>8}{sec:>10.3f}")
    print(f"{'total (generate)':<20}{'':>6}{'':>8}{sum(out.timings.values()):>10.3f}")
    if out.cache_stats is not None:
        print(f"cache {args.cache}: {out.cache_stats['full']} full / {out.cache_stats['cached']} cached block-stack "
              f"steps ({' | '.join(s['pattern'] for s in out.cache_stats['stages'])})")
    for _, path in items:
        print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------- info
def _csrc_status(torch) -> tuple[bool, str]:
    """Whether ``ralu_kernels._C`` (the CUDA op) is loaded here, and why (not)."""
    import importlib
    import importlib.util

    from ralu_kernels._csrc import csrc_disabled

    if csrc_disabled():
        return False, f"disabled by RALU_DISABLE_CSRC={os.environ['RALU_DISABLE_CSRC']}"
    if importlib.util.find_spec("ralu_kernels._C") is None:
        if torch.version.cuda is None:
            return False, (f"not built: torch {torch.__version__} is a CPU build (the extension is compiled at "
                           "install time with a CUDA build of torch and nvcc)")
        return False, ("not built: reinstall with `pip install -e .` where nvcc is found "
                       "(docs/kernels.md, 'Building the CUDA ops')")
    try:
        module = importlib.import_module("ralu_kernels._C")
    except Exception as exc:  # noqa: BLE001 - built for another torch, missing libraries, ...
        return False, f"built but not loadable: {' '.join(str(exc).split())}"
    from ralu_kernels._csrc import load_csrc

    if not load_csrc():
        return False, "loaded, but torch.ops.ralu.stage_transition is not registered"
    return True, f"loaded ({getattr(module, '__file__', '?')})"


def collect_info() -> dict:
    """What ``ralu info`` reports, as a JSON-ready dict."""
    import importlib.util
    import platform

    import torch

    from ralu_kernels.attention import available_backends as attention_backends
    from ralu_kernels.transition import HAS_TRITON

    from .compile import BACKENDS, available_backends
    from .compile.artifacts import default_cache_root

    cuda = torch.cuda.is_available()
    v = installed_version
    versions = {
        "python": platform.python_version(), "ralu": v("ralu"),
        "ralu_location": os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "torch": torch.__version__,
        "cuda_build": torch.version.cuda, "diffusers": v("diffusers"), "transformers": v("transformers"),
        "tokenizers": v("tokenizers"), "triton": v("triton", "pytorch-triton"),
        "onnx": v("onnx"), "onnxruntime": v("onnxruntime", "onnxruntime-gpu"),
        "opencv": v("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                    "opencv-contrib-python"),
        "numpy": v("numpy"), "pillow": v("pillow"),
    }
    if cuda:
        idx = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        device = {"type": "cuda", "name": torch.cuda.get_device_name(idx), "capability": f"{cap[0]}.{cap[1]}",
                  "count": torch.cuda.device_count()}
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA device visible to torch"
        device = {"type": "cpu", "name": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "why_not_cuda": why}
    dev = "cuda" if cuda else "cpu"

    csrc_ok, csrc_why = _csrc_status(torch)
    if not cuda:
        transition = ("torch", "no CUDA device: auto runs the CUDA op or Triton only for CUDA tensors, the torch "
                               "reference otherwise")
    elif csrc_ok:
        transition = ("cuda", "the CUDA op ralu_kernels._C is loaded and tensors are on CUDA")
    elif HAS_TRITON:
        transition = ("triton", f"the CUDA op is not loaded ({csrc_why}); Triton runs on CUDA")
    else:
        transition = ("torch", f"the CUDA op is not loaded ({csrc_why}) and Triton is not importable")

    attn_dtype = torch.bfloat16 if cuda else torch.float32
    attn = attention_backends(dev, attn_dtype)
    if not cuda:
        attn_why = "flash_attn and torch_varlen run on CUDA (float16/bfloat16) only"
    else:
        missing = []
        if "flash_attn" not in attn:
            missing.append("flash-attn is not installed")
        if "torch_varlen" not in attn:
            missing.append(f"torch {torch.__version__} has no torch.nn.attention.varlen")
        attn_why = "; ".join(missing) or "first in preference order"

    from .compile import fp8_support, measure_attention_backends

    fp8_ok, fp8_why = fp8_support(dev)
    fp8_kernel = torchao = None
    if fp8_ok:
        from .compile.fp8 import resolve_kernel, torchao_version

        fp8_kernel, torchao = resolve_kernel("auto", dev), torchao_version()
    measured = measure_attention_backends(dev)  # FLUX.1-dev's joint attention on CUDA, a tiny shape on a CPU
    usable = available_backends(dev)
    unavailable = {b: _backend_unavailable(b, dev) for b in BACKENDS if b not in usable}
    root = default_cache_root()
    key_env = os.environ.get("RALU_ARTIFACT_KEY_FILE")
    key = Path(key_env) if key_env else root / "artifact.key"
    inductor = root / "inductor"
    env = {k: os.environ.get(k) for k in ("RALU_CACHE_DIR", "RALU_ARTIFACT_KEY_FILE", "RALU_DISABLE_CSRC",
                                          "TORCHINDUCTOR_CACHE_DIR", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    return {
        "versions": versions,
        "device": device,
        "transition_auto": {"impl": transition[0], "why": transition[1], "triton_importable": HAS_TRITON},
        "varlen_attention_auto": {"backend": attn[0], "available": attn, "why": attn_why, "dtype": str(attn_dtype)},
        "cuda_extension": {"loaded": csrc_ok, "why": csrc_why,
                           "built": importlib.util.find_spec("ralu_kernels._C") is not None},
        "compile_backends": {"available": usable, "unavailable": unavailable},
        "fp8": {"supported": fp8_ok, "why": fp8_why, "auto_kernel": fp8_kernel, "torchao": torchao},
        "attention_measured": [{"shape": m["describe"], "ms": m["ms"], "best": m["best"], "skipped": m["skipped"]}
                               for m in measured],
        "paths": {"cache_dir": str(root), "cache_dir_exists": root.is_dir(),
                  "inductor_cache": str(inductor), "inductor_cache_exists": inductor.is_dir(),
                  "artifact_key": str(key), "artifact_key_exists": key.is_file(),
                  "artifact_key_status": _key_status(key, from_env=bool(key_env))},
        "env": {k: v for k, v in env.items() if v is not None},
    }


def _exists(flag: bool) -> str:
    return "exists" if flag else "absent"


def _key_status(key: Path, from_env: bool) -> str:
    """What save/load_compile_artifacts would make of the artifact key file ``key`` (nothing is created): "ok",
    "absent; created by the first save_compile_artifacts", or why it would be refused."""
    from .compile.artifacts import key_problem

    if not key.exists():
        return ("refused: $RALU_ARTIFACT_KEY_FILE names no file (it is not created: save and load refuse)"
                if from_env else "absent; created by the first save_compile_artifacts")
    if not key.is_file():
        return "refused: not a regular file"
    problem = key_problem(key)
    return "ok" if problem is None else f"refused: {problem}"


def format_info(info: dict) -> str:
    """``collect_info()`` as a plain two-column table."""
    v, d, p = info["versions"], info["device"], info["paths"]
    rows = [("python", f"{v['python']} ({sys.executable})"), ("ralu", f"{v['ralu']} ({v['ralu_location']})"),
            ("torch", v["torch"])]
    rows.append(("CUDA build", v["cuda_build"] or "none (CPU build of torch)"))
    rows += [(name, v[name] or "not installed") for name in ("diffusers", "transformers", "tokenizers", "triton",
                                                              "onnx", "onnxruntime", "opencv", "numpy", "pillow")]
    rows.append(("", ""))
    if d["type"] == "cuda":
        rows.append(("device", f"cuda: {d['name']} (compute capability {d['capability']}, {d['count']} visible)"))
    else:
        rows.append(("device", f"cpu: {d['name']}, {d['threads']} torch threads ({d['why_not_cuda']})"))
    t, a, c, b = (info["transition_auto"], info["varlen_attention_auto"], info["cuda_extension"],
                  info["compile_backends"])
    rows.append(("transition (auto)", f"{t['impl']}: {t['why']}"))
    rows.append(("varlen attention", f"{a['backend']} (available: {', '.join(a['available'])}; {a['why']})"))
    rows.append(("CUDA extension", f"{'loaded' if c['loaded'] else 'not loaded'}: {c['why']}"))
    rows.append(("compile backends", ", ".join(b["available"])))
    for name, why in b["unavailable"].items():
        rows.append(("  not available", f"{name}: {why}"))
    f = info["fp8"]
    rows.append(("precision fp8", f"{'yes' if f['supported'] else 'no'}: {f['why']}"))
    if f["supported"]:
        ao = f"torchao {f['torchao']}" if f["torchao"] else "torchao not installed"
        rows.append(("  fp8 kernel (auto)", f"{f['auto_kernel']} ({ao})"))
    for m in info["attention_measured"]:
        times = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(m["ms"].items(), key=lambda kv: kv[1]))
        rows.append(("attention (measured)", f"{m['shape']}: {m['best']} fastest ({times})"
                     + (f"; skipped {', '.join(m['skipped'])}" if m["skipped"] else "")))
    rows.append(("", ""))
    env = "" if "RALU_CACHE_DIR" in info["env"] else ", RALU_CACHE_DIR not set"
    state = ("not a folder: a file is in the way" if Path(p["cache_dir"]).exists() and not p["cache_dir_exists"]
             else _exists(p["cache_dir_exists"]))
    rows.append(("cache folder", f"{p['cache_dir']} ({state}{env})"))
    rows.append(("inductor cache", f"{p['inductor_cache']} ({_exists(p['inductor_cache_exists'])}; used after "
                                   "ralu_runtime.compile.enable_persistent_cache())"))
    rows.append(("artifact key", f"{p['artifact_key']} ({p['artifact_key_status']})"))
    for name, value in info["env"].items():
        rows.append((f"${name}", value))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{val}".rstrip() for k, val in rows)


def cmd_info(args) -> int:
    """``ralu info``: print :func:`collect_info` as a table, or as JSON with ``--json``."""
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


COMMANDS = {"generate": cmd_generate, "edit": cmd_edit, "serve": cmd_serve, "info": cmd_info}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None) -> int:
    """``ralu``: returns the exit status (0 done, 1 failed while running, 2 bad arguments). Errors are one line
    ``ralu: error: ...`` on stderr; ``--debug`` raises them with their traceback instead."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"ralu: error: {_one_line(exc)} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    debug = getattr(args, "debug", False)
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        if debug:
            raise
        print(f"ralu: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        print("ralu: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user; --debug for the traceback
        if debug:
            raise
        print(f"ralu: error: {_one_line(exc)} ({type(exc).__name__}; --debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
