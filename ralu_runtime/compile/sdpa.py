"""Choice of the attention backend for a model call: a fixed policy, or the fastest one measured per shape.

torch's SDPA backend switches (``torch.nn.attention.sdpa_kernel``) are process-wide, not per thread. So that
concurrent ``generate`` calls never leave them changed, :func:`sdpa_context` sets them when the first call
that asks for a policy enters and restores what it found when the last one leaves (a reference count); a
call arriving while another policy is active runs under that one (the result is the same attention up to
kernel rounding). Between ralu calls the switches are exactly as the user left them.

``attn_backend="measure"`` (:class:`ralu_runtime.compile.CompileOptions`): the first call of each input signature
runs with its block functions uncompiled while :class:`SdpaRecorder` records every
``scaled_dot_product_attention`` call's shape (batch, heads, query / key tokens, head dim, dtype, mask); then each
backend available here (:data:`MEASURED_BACKENDS`: torch's cuDNN, flash, memory-efficient and math kernels; the
``flash_attn`` (FA2) and ``flash_attn_interface`` (FA3) packages where installed, through diffusers' attention
dispatch) is timed on those shapes (:func:`measure_shape`; one that raises is skipped, with the reason), and the one
with the least total time over the call's attention calls runs that signature's later calls (compiled and captured
under it). Timings are remembered per (device, shape bucket: token counts rounded up to a power of two) for the
whole process; :func:`attention_report` returns them, :func:`measure_attention_backends` measures given (or FLUX.1's
default) shapes on demand (``ralu info``).
"""
from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch
from torch.overrides import TorchFunctionMode

from .options import ATTN_BACKENDS
from .scoped import SharedSetting

_SDPA = SharedSetting()
_DIFFUSERS = SharedSetting()

SDPA_SINGLE = ("cudnn", "flash", "efficient", "math")
MEASURED_BACKENDS = SDPA_SINGLE + ("flash_attn", "flash_attn_3")
_DIFFUSERS_NAMES = {"flash_attn": "flash", "flash_attn_3": "_flash_3"}  # diffusers' AttentionBackendName values


def _policy(name: str, device: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "auto":
        major = torch.cuda.get_device_capability(device)[0]
        order = ([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION] if major >= 9 else
                 [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION])
        return sdpa_kernel(order + [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True)
    return sdpa_kernel([_sdp_backend(name)])


def _sdp_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def _diffusers_backend(name: str):
    from diffusers.models.attention_dispatch import attention_backend

    return attention_backend(_DIFFUSERS_NAMES[name])


@contextlib.contextmanager
def sdpa_context(name: str, device: torch.device | str):
    """Run the block under attention policy ``name``. ``auto`` (and ``measure`` before a choice is made): cuDNN
    first on Hopper (sm90+; 2x faster than flash at FLUX's shape), flash first on other GPUs, torch's default on
    CPU. ``default``: torch's choice. ``cudnn`` / ``flash`` / ``efficient`` / ``math``: that SDPA backend only (an
    error where it cannot run). ``flash_attn`` / ``flash_attn_3`` (a measured choice): diffusers' attention
    dispatch runs the FA2 / FA3 package for calls that name no backend of their own."""
    if name not in ATTN_BACKENDS and name not in _DIFFUSERS_NAMES:
        raise ValueError(f"attn_backend={name!r} is not allowed; choose one of {ATTN_BACKENDS}")
    dev = torch.device(device)
    if name == "measure":
        name = "auto"
    if name == "default" or (name == "auto" and dev.type != "cuda"):
        yield
        return
    if name in _DIFFUSERS_NAMES:
        with _DIFFUSERS(lambda: _diffusers_backend(name)):
            yield
        return
    with _SDPA(lambda: _policy(name, dev)):
        yield


_RUNS_HERE: dict[tuple, bool] = {}


def check_attn_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """ValueError, before any work, when ``attn_backend=name`` (one of cudnn / flash / efficient / math) has no SDPA
    kernel on a non-CUDA ``device`` for ``dtype`` (e.g. cudnn or efficient on a CPU), naming the policies that do.
    Probed once per (device type, backend, dtype) on a tiny attention. On CUDA the shapes decide: not checked."""
    dev = torch.device(device)
    if name not in SDPA_SINGLE or dev.type == "cuda":
        return
    runs = {b: _runs_here(b, dev, dtype) for b in SDPA_SINGLE}
    if not runs[name]:
        ok = ["auto", "default"] + [b for b in SDPA_SINGLE if runs[b]] + ["measure"]
        raise ValueError(f"attn_backend={name!r} has no attention kernel on {dev.type} for {dtype} (torch's "
                         f"{name} SDPA backend runs on CUDA); choose one of {tuple(ok)}")


def _runs_here(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, name, dtype)
    if key not in _RUNS_HERE:
        from torch.nn.attention import sdpa_kernel

        q = torch.zeros(1, 1, 8, 16, device=device, dtype=dtype)
        try:
            with torch.no_grad(), sdpa_kernel([_sdp_backend(name)]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            _RUNS_HERE[key] = True
        except RuntimeError:
            _RUNS_HERE[key] = False
    return _RUNS_HERE[key]


# ------------------------------------------------------------------------------------------------ shapes
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class AttnShape:
    """One attention call: ``q (batch, heads, q_len, head_dim)``, ``k / v (batch, kv_heads, kv_len, head_dim)``,
    ``dtype`` (e.g. "torch.bfloat16"), ``mask`` the attention mask's shape (None: no mask) and dtype."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    mask: tuple | None = None
    mask_dtype: str | None = None
    causal: bool = False

    def bucket(self) -> tuple:
        """What a measurement is remembered under: token counts rounded up to a power of two."""
        return (self.batch, self.heads, self.kv_heads, _pow2(self.q_len), _pow2(self.kv_len), self.head_dim,
                self.dtype, self.mask is not None, self.causal)

    def describe(self) -> str:
        m = "" if self.mask is None else ", mask"
        return (f"({self.batch}, {self.heads}, {self.q_len}x{self.kv_len}, {self.head_dim}) "
                f"{self.dtype.replace('torch.', '')}{m}{', causal' if self.causal else ''}")


def shape_of(q, k, v, attn_mask=None, is_causal=False) -> AttnShape:
    """The :class:`AttnShape` of ``scaled_dot_product_attention(q, k, v, attn_mask, is_causal=...)`` arguments."""
    return AttnShape(int(q.shape[0]), int(q.shape[-3]), int(k.shape[-3]), int(q.shape[-2]), int(k.shape[-2]),
                     int(q.shape[-1]), str(q.dtype),
                     None if attn_mask is None else tuple(int(s) for s in attn_mask.shape),
                     None if attn_mask is None else str(attn_mask.dtype), bool(is_causal))


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


class SdpaRecorder(TorchFunctionMode):
    """Counts the ``torch.nn.functional.scaled_dot_product_attention`` calls made in its ``with`` block (this
    thread) by :class:`AttnShape`: ``calls[shape] = n``. Everything runs as it would without it."""

    def __init__(self):
        super().__init__()
        self.calls: dict[AttnShape, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_ARGS, args), **kwargs)
            shape = shape_of(bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                             bound.get("is_causal", False))
            self.calls[shape] = self.calls.get(shape, 0) + 1
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ measurement
_TIMINGS: dict[tuple, dict] = {}
_TIMINGS_LOCK = threading.Lock()


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def _inputs(shape: AttnShape, device: torch.device, layout_bshd: bool = False):
    g = torch.Generator(device=device).manual_seed(0)
    dt = _dtype(shape.dtype)
    dims = [(shape.batch, shape.heads, shape.q_len, shape.head_dim),
            (shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim),
            (shape.batch, shape.kv_heads, shape.kv_len, shape.head_dim)]
    q, k, v = (torch.randn(d, generator=g, device=device, dtype=torch.float32).to(dt) for d in dims)
    if layout_bshd:
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    mask = None
    if shape.mask is not None:
        mdt = _dtype(shape.mask_dtype)
        mask = (torch.ones(shape.mask, dtype=torch.bool, device=device) if mdt == torch.bool
                else torch.zeros(shape.mask, dtype=mdt, device=device))
    return q, k, v, mask


def _flash_package(name: str):
    """``flash_attn_func`` of the FA2 (``flash_attn``) or FA3 (``flash_attn_interface``) package, or ImportError."""
    if name == "flash_attn":
        from flash_attn import flash_attn_func
    else:
        from flash_attn_interface import flash_attn_func
    return flash_attn_func


def _runner(name: str, shape: AttnShape, device: torch.device):
    """A no-argument callable computing the attention of ``shape`` with backend ``name`` (raises where it cannot)."""
    F = torch.nn.functional
    if name in _DIFFUSERS_NAMES:
        if device.type != "cuda":
            raise RuntimeError(f"{name} runs on CUDA only")
        if shape.mask is not None or shape.causal or shape.heads != shape.kv_heads:
            raise RuntimeError(f"{name} is not measured for masked, causal or grouped-query attention")
        fn = _flash_package(name)  # ImportError when not installed
        q, k, v, _ = _inputs(shape, device, layout_bshd=True)

        def run():
            out = fn(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        return run
    q, k, v, mask = _inputs(shape, device)
    gqa = {"enable_gqa": True} if shape.heads != shape.kv_heads else {}
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel([_sdp_backend(name)]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=shape.causal, **gqa)

    return run


def _time(run, device: torch.device, reps: int) -> float:
    """Median milliseconds of ``run()`` over ``reps`` timed calls, after two untimed ones."""
    for _ in range(2):
        run()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def candidate_backends(device: torch.device | str) -> tuple[str, ...]:
    """The backends :func:`measure_shape` tries on ``device`` (the FA packages on CUDA only)."""
    return MEASURED_BACKENDS if torch.device(device).type == "cuda" else SDPA_SINGLE


def measure_shape(shape: AttnShape, device: torch.device | str, *, reps: int | None = None,
                  backends: tuple[str, ...] | None = None) -> dict:
    """Time every candidate backend on ``shape`` (remembered per (device, shape bucket) for the process).
    Returns ``{"device", "shape", "ms": {backend: median ms}, "skipped": {backend: why}, "best"}``; ``best`` is
    None when every backend raised."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (str(dev), shape.bucket())
    with _TIMINGS_LOCK:
        if key in _TIMINGS:
            return _TIMINGS[key]
    reps = reps or (10 if dev.type == "cuda" else 3)
    ms, skipped = {}, {}
    with torch.no_grad():
        for name in backends or candidate_backends(dev):
            try:
                ms[name] = _time(_runner(name, shape, dev), dev, reps)
            except ImportError as exc:
                skipped[name] = f"not installed ({exc.name or exc})"
            except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape raises; skip it
                skipped[name] = " ".join(str(exc).split())[:160] or type(exc).__name__
    entry = {"device": str(dev), "shape": shape, "ms": ms, "skipped": skipped,
             "best": min(ms, key=ms.get) if ms else None}
    with _TIMINGS_LOCK:
        return _TIMINGS.setdefault(key, entry)


def choose_backend(calls: dict[AttnShape, int], device: torch.device | str) -> tuple[str, dict]:
    """The backend with the least total time over one model call's attention calls (``calls``: shape -> count),
    each shape measured by :func:`measure_shape`, among the backends that ran every shape. Returns ``(name,
    {"total_ms": {backend: ms}, "shapes": [...]})``; ``name`` is "auto" when nothing was recorded or no backend
    ran every shape."""
    if not calls:
        return "auto", {"total_ms": {}, "shapes": []}
    entries = [(measure_shape(s, device), n) for s, n in calls.items()]
    common = set.intersection(*(set(e["ms"]) for e, _ in entries))
    totals = {b: sum(e["ms"][b] * n for e, n in entries) for b in common}
    name = min(totals, key=totals.get) if totals else "auto"
    return name, {"total_ms": totals, "shapes": [(e["shape"].describe(), n) for e, n in entries]}


def attention_report(device: torch.device | str | None = None) -> list[dict]:
    """Every measurement made in this process (optionally on ``device`` only), JSON-ready: device, shape (dict and
    text), milliseconds per backend, skipped backends with the reason, and the fastest."""
    with _TIMINGS_LOCK:
        entries = list(_TIMINGS.values())
    dev = None if device is None else str(torch.device(device))
    out = []
    for e in entries:
        if dev is not None and not e["device"].startswith(dev):
            continue
        out.append({"device": e["device"], "shape": asdict(e["shape"]), "describe": e["shape"].describe(),
                    "ms": {k: round(v, 4) for k, v in e["ms"].items()}, "skipped": dict(e["skipped"]),
                    "best": e["best"]})
    return out


def default_shapes(device: torch.device | str) -> list[AttnShape]:
    """The shapes ``ralu info`` measures: on CUDA FLUX.1-dev's joint attention at 1024^2 (24 heads of 128, 512
    text tokens + 1024 / 1843 / 4096 image tokens: RALU 7x's three stages) in bfloat16; on the CPU a tiny one."""
    if torch.device(device).type == "cuda":
        return [AttnShape(1, 24, 24, 512 + n, 512 + n, 128, "torch.bfloat16") for n in (1024, 1843, 4096)]
    return [AttnShape(1, 2, 2, 8 + n, 8 + n, 16, "torch.float32") for n in (24, 96)]


def measure_attention_backends(device: torch.device | str | None = None,
                               shapes: list[AttnShape] | None = None) -> list[dict]:
    """Measure ``shapes`` (default :func:`default_shapes`) on ``device`` (default: cuda when visible, else cpu)
    and return their :func:`attention_report` rows: what ``ralu info`` shows."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = shapes or default_shapes(dev)
    for s in shapes:
        measure_shape(s, dev)
    buckets = {s.bucket() for s in shapes}
    rows = attention_report(dev)
    return [r for r in rows if AttnShape(**{k: (tuple(v) if k == "mask" and v is not None else v)
                                            for k, v in r["shape"].items()}).bucket() in buckets]


def clear_measurements() -> None:
    """Forget every measurement (tests; a changed machine)."""
    with _TIMINGS_LOCK:
        _TIMINGS.clear()


__all__ = ["AttnShape", "MEASURED_BACKENDS", "SdpaRecorder", "attention_report", "candidate_backends",
           "check_attn_backend", "choose_backend", "clear_measurements", "default_shapes", "measure_attention_backends", "measure_shape",
           "sdpa_context", "shape_of"]
