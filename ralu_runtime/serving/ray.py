"""Ray Serve deployment of the serving engine (``ralu serve --ray``): engine replicas, one per GPU, behind the same
OpenAI-compatible HTTP API as ``ralu serve``.

An application (:func:`build_app`) has three deployments:

* ``RaluReplica`` (:class:`RaluReplica`): one :class:`~ralu_runtime.serving.Engine` over its own copy of the model;
  ``ray_actor_options={"num_gpus": 1}`` where the cluster has GPUs (one replica per GPU by default), CPU replicas
  otherwise. Before a replica takes traffic (Ray Serve routes to it only once its constructor returns) it loads
  the model, loads signed compile artifacts (:func:`~ralu_runtime.compile.load_compile_artifacts`) and the
  persistent inductor cache where given, and warms up: a few requests of each warm-up shape at once through its
  engine (builds the compiled graphs and CUDA graphs of a compiled ``backend``). A fixed number of
  replicas, or autoscaling on queue depth: Ray Serve's autoscaler counts each replica's ongoing requests (its
  engine's running and queued requests plus the ones waiting for it in the routers) against
  ``target_ongoing_requests`` (default: the engine's ``max_active``, so replicas are added once requests queue).
* ``RaluIngress``: the API of :mod:`ralu_runtime.serving.http` (same request parsing, checks, errors, PNG
  responses, ``/health``, ``/metrics``, ``/v1/models``; the functions of :mod:`ralu_runtime.serving.protocol`, not
  a copy) behind Ray Serve's HTTP proxy. It forwards each generation to a replica; PNGs are encoded on the replica.
* ``RaluBoard``: a small actor the replicas report their engine metrics to every second; ``/metrics`` and
  ``/health`` read the sum over live replicas (counters of replicas that died or stopped are kept, so totals
  never go down while the board lives).

Faults:

* A replica that dies mid-request (its process killed, out of memory, node lost): the ingress sends the request
  again to another replica, with the same seed (so the same image) and what is left of its deadline, up to
  ``max_retries`` times; after that the client gets 503 ``replica_failed`` saying the replica died (never a hang,
  never silence). Ray Serve's controller starts a replacement replica, which loads and warms up before it takes
  traffic. A replica whose engine stops (``check_health``) is replaced the same way.
* Deadlines: the engine cancels a request past its deadline at its next model call (504). Should a replica not
  answer by the deadline plus ``deadline_slack_s``, the ingress cancels the call, which cancels the engine request
  on the replica. A client that hangs up has its request cancelled the same way (Ray Serve cancels the handler).
* A full cluster: each replica accepts ``max_active + max_queue`` requests; beyond that requests wait in Ray
  Serve's routers up to ``max_queued_requests`` per ingress, then get 503 with Retry-After.

Replicas import ``ralu_runtime``: install ralu (and the model files, at the same path) on every node of the
cluster.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by tests/test_serving_ray.py
    raise ImportError(f"ralu serve --ray needs {_exc.name or 'ray[serve]'}, which is not installed: "
                      "pip install -e '.[ray]' (ray[serve])") from _exc

from fastapi import Request  # module-level: the route annotations are strings (from __future__ import annotations)

from . import protocol
from .access import AccessPolicy, is_loopback, parse_api_keys
from .engine import DeadlineExceeded, EngineBusy, EngineClosed, EngineConfig, RequestCancelled

__all__ = ["ReplicaSpec", "IngressOptions", "RaluReplica", "RaluIngress", "RaluBoard", "build_app",
           "deployment_options", "merge_metrics", "start_engine", "run", "APP_NAME"]

logger = logging.getLogger("ray.serve")     # Ray Serve's replica logger: its format, its log files

APP_NAME = "ralu"
REPORT_INTERVAL_S = 1.0                 # replicas report their metrics to the board this often
STALE_AFTER_S = 5.0                     # a replica silent this long counts as gone


# --------------------------------------------------------------------------------------------- configuration
@dataclass
class ReplicaSpec:
    """What every replica loads and how it serves.

    ``model``: a built-in random model (``"tiny-flux"``...), a local diffusers folder (the same path on every node),
    or a callable ``model(device=..., dtype=...)`` returning a pipeline (picklable: a module-level function).
    ``device``: None (a GPU when the replica has one, else the CPU), "cpu" or "cuda". ``dtype``: None (bfloat16 on
    CUDA, float32 on the CPU) or a torch dtype name. ``defaults``: ``generate`` arguments of every request unless
    it sets them. ``max_active``, ``max_queue``, ``token_budget``, ``gather_timeout_s``: the engine's
    (:class:`EngineConfig`), and ``max_token_steps``, the work one request may ask for (:mod:`ralu_runtime.limits`;
    None: the library's default). ``backend``, ``compile_options``: a compile backend for every request (built by the
    warm-up). ``compile_artifacts``: a bundle written by ``save_compile_artifacts`` to load first (verified
    against ``artifact_key``, default the node's ``RALU_ARTIFACT_KEY_FILE`` or ``~/.cache/ralu/artifact.key``;
    a missing file is logged and skipped); ``persistent_cache``: True or a folder for inductor's on-disk cache.
    ``warmup``: ``generate`` arguments per warm-up shape (None: the defaults, :meth:`Engine.warmup_variants`;
    ``[]``: no warm-up), each run ``warmup_requests`` times at once through the engine. ``cpus``: CPUs per replica on CPU-only clusters.
    ``log_prompts``: let the libraries' warnings quote prompts (default: redacted). ``storage_dtype``: a torch dtype
    name narrower than the replica's dtype (None: bfloat16, the narrowest default): the transformer's weights kept in
    it, each layer cast while it runs (diffusers' ``enable_layerwise_casting``; not with a callable ``model``)."""

    model: Any = "tiny-flux"
    device: str | None = None
    dtype: str | None = None
    defaults: dict = field(default_factory=dict)
    max_active: int = 8
    max_queue: int = 64
    token_budget: int | None = None
    gather_timeout_s: float = 0.005
    max_token_steps: int | None = None
    backend: str | None = None
    compile_options: dict | None = None
    compile_artifacts: str | None = None
    artifact_key: str | None = None
    persistent_cache: bool | str | None = None
    warmup: list | None = None
    warmup_requests: int = 2
    warmup_timeout_s: float = 3600.0
    cpus: float = 1.0
    log_prompts: bool = False
    storage_dtype: str | None = None

    def __post_init__(self):
        self.engine_config()        # the engine's own checks, now
        if self.storage_dtype is not None:
            _check_storage_dtype(self.storage_dtype, self.dtype, self.model)
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: use None, 'cpu' or 'cuda' (each replica sees its own GPU)")
        if not (isinstance(self.model, str) or callable(self.model)):
            raise TypeError(f"model={self.model!r}: use a model name, a local folder or a callable")
        if self.warmup is not None and not all(isinstance(w, dict) for w in self.warmup):
            raise TypeError("warmup: a list of dicts of generate arguments (or None)")
        if isinstance(self.warmup_requests, bool) or not isinstance(self.warmup_requests, int) \
                or self.warmup_requests < 1:
            raise ValueError(f"warmup_requests={self.warmup_requests!r}: use an int >= 1")
        if not self.cpus > 0:
            raise ValueError(f"cpus={self.cpus!r}: use a number > 0")

    def engine_config(self) -> EngineConfig:
        return EngineConfig(token_budget=self.token_budget, max_active=self.max_active, max_queue=self.max_queue,
                            gather_timeout_s=self.gather_timeout_s, max_token_steps=self.max_token_steps)


STORAGE_DTYPES = ("float8_e4m3fn", "bfloat16", "float16")


def _check_storage_dtype(storage: str, dtype: str | None, model) -> None:
    """``ReplicaSpec.storage_dtype``: a known name, narrower than ``dtype`` (None: bfloat16, the narrowest dtype a
    replica picks by itself), and a model ralu loads (a callable builds its own pipeline)."""
    import torch

    if storage not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype={storage!r}: use one of {', '.join(STORAGE_DTYPES)} (or None)")
    compute = dtype or "bfloat16"
    if getattr(torch, storage).itemsize >= getattr(torch, compute).itemsize:
        raise ValueError(f"storage_dtype={storage!r} is not narrower than the replicas' dtype {compute!r}"
                         + ("" if dtype else " (bfloat16 on a GPU when dtype is None)")
                         + ": give a narrower one (float8_e4m3fn) or None")
    if callable(model):
        raise ValueError("storage_dtype with a callable model: enable the casting in the callable "
                         "(transformer.enable_layerwise_casting)")


@dataclass
class IngressOptions:
    """The HTTP side: ``model_name`` (what clients give as ``model``), ``max_body_bytes``, ``default_deadline_s``,
    ``max_images`` as in :func:`ralu_runtime.serving.http.create_app`; ``max_retries``: how often a request whose
    replica died is sent to another one; ``deadline_slack_s``: how long past a request's deadline the ingress
    waits for its replica's answer before cancelling the call. ``api_keys``, ``allowed_hosts``, ``cors_origins``:
    the :class:`~ralu_runtime.serving.access.AccessPolicy` of the ingress (as ``ralu serve``'s); ``bound_host``: the
    address Ray Serve's proxy listens on (its names are allowed in ``Host``; :func:`run` sets it)."""

    model_name: str = "tiny-flux"
    max_body_bytes: int = protocol.MAX_BODY_BYTES
    default_deadline_s: float | None = protocol.DEFAULT_REQUEST_TIMEOUT_S
    max_images: int = protocol.MAX_IMAGES
    max_retries: int = 2
    deadline_slack_s: float = 5.0
    board_timeout_s: float = 10.0
    api_keys: tuple = field(default=(), repr=False)
    allowed_hosts: tuple = ()
    cors_origins: tuple = ()
    bound_host: str | None = None

    def __post_init__(self):
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={self.max_body_bytes!r}: use a positive int")
        if self.default_deadline_s is not None and not self.default_deadline_s > 0:
            raise ValueError(f"default_deadline_s={self.default_deadline_s!r}: use seconds > 0, or None")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries!r}: use an int >= 0")
        if not self.deadline_slack_s >= 0:
            raise ValueError(f"deadline_slack_s={self.deadline_slack_s!r}: use seconds >= 0")
        self.api_keys = parse_api_keys(self.api_keys)
        self.allowed_hosts, self.cors_origins = tuple(self.allowed_hosts), tuple(self.cors_origins)

    def policy(self) -> AccessPolicy:
        """The ingress's access policy."""
        policy = AccessPolicy(api_keys=self.api_keys, allowed_hosts=set(self.allowed_hosts),
                              cors_origins=self.cors_origins)
        if self.bound_host is not None:
            policy.allow_bound_host(self.bound_host)
        return policy


def deployment_options(spec: ReplicaSpec, replicas=None, *, cluster_gpus: float = 0.0,
                       target_ongoing_requests: float | None = None, grace_s: float = 30.0) -> dict:
    """``RaluReplica``'s Ray Serve options: one GPU per replica when ``cluster_gpus`` > 0 and the spec does not ask
    for the CPU (``cpus`` CPUs per replica otherwise); ``replicas``: None (one per GPU; 1 without GPUs), N, or
    ``(min, max)`` for autoscaling on queue depth (``target_ongoing_requests`` per replica, default the engine's
    ``max_active``)."""
    use_gpu = spec.device != "cpu" and cluster_gpus >= 1
    if spec.device == "cuda" and not use_gpu:
        raise ValueError("device='cuda' but the Ray cluster has no GPU (ray.cluster_resources() lists none)")
    actor = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": spec.cpus}
    opts = {"ray_actor_options": actor,
            "max_ongoing_requests": spec.max_active + spec.max_queue,   # the engine's own capacity
            "health_check_period_s": 10.0, "health_check_timeout_s": 60.0,
            "graceful_shutdown_wait_loop_s": 1.0, "graceful_shutdown_timeout_s": grace_s,
            "max_constructor_retry_count": 3}
    if replicas is None:
        replicas = max(1, int(cluster_gpus)) if use_gpu else 1
    if isinstance(replicas, tuple):
        lo, hi = replicas
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"replicas={replicas!r}: autoscaling needs (min, max) with 1 <= min <= max")
        opts["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
            "target_ongoing_requests": float(target_ongoing_requests or spec.max_active),
            "upscale_delay_s": 10.0, "downscale_delay_s": 300.0}
    else:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas={replicas!r}: use None, an int >= 1 or (min, max)")
        opts["num_replicas"] = replicas
    return opts


# --------------------------------------------------------------------------------------------- metrics
_HISTOGRAMS = ("step_latency_seconds", "request_latency_seconds", "batch_tokens", "batch_requests")


def merge_metrics(live: list[dict], gone: list[dict] = ()) -> dict:
    """One :meth:`Engine.metrics`-shaped snapshot for several replicas: gauges (queue depth, active) summed over
    the ``live`` ones, counters and histograms over all (``gone``: last snapshots of replicas no longer there)."""
    out = {"queue_depth": sum(m["queue_depth"] for m in live), "active": sum(m["active"] for m in live),
           "requests": {}, "model_calls": 0, "packed_calls": 0,
           "token_budget": max((m["token_budget"] for m in [*live, *gone]), default=0)}
    for name in _HISTOGRAMS:
        out[name] = None
    for m in [*live, *gone]:
        for outcome, n in m["requests"].items():
            out["requests"][outcome] = out["requests"].get(outcome, 0) + n
        out["model_calls"] += m["model_calls"]
        out["packed_calls"] += m["packed_calls"]
        for name in _HISTOGRAMS:
            h, acc = m[name], out[name]
            if acc is None:
                out[name] = {"buckets": list(h["buckets"]), "counts": list(h["counts"]), "sum": h["sum"],
                             "count": h["count"]}
            elif list(acc["buckets"]) == list(h["buckets"]):
                acc["counts"] = [a + b for a, b in zip(acc["counts"], h["counts"])]
                acc["sum"] += h["sum"]
                acc["count"] += h["count"]
    for name in _HISTOGRAMS:
        if out[name] is None:
            out[name] = {"buckets": [], "counts": [], "sum": 0.0, "count": 0}
    return out


class _Snapshot:
    """A fixed :meth:`Engine.metrics` result, for :class:`~ralu_runtime.serving.protocol.EngineCollector`."""

    def __init__(self, metrics: dict):
        self._metrics = metrics

    def metrics(self) -> dict:
        return self._metrics


class RaluBoard:
    """Where replicas report their engine metrics (:meth:`report`, every second) and the ingress reads them
    (:meth:`snapshot`, or :meth:`collect` without the liveness check). A replica not heard of for ``stale_after_s``
    counts as gone: its last counters stay in the totals, its gauges leave them. A replica whose actor has died
    counts as gone at the next :meth:`snapshot` (Ray knows within a second; the staleness window is 5 s)."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S):
        self.stale_after_s = stale_after_s
        self._live: dict[str, tuple[float, dict]] = {}
        self._gone: dict[str, dict] = {}
        self._actors: dict[str, Any] = {}

    def report(self, replica: str, metrics: dict, final: bool = False, actor=None) -> None:
        self._gone.pop(replica, None)
        if final:
            self._live.pop(replica, None)
            self._actors.pop(replica, None)
            self._gone[replica] = metrics
        else:
            self._live[replica] = (time.monotonic(), metrics)
            if actor is not None:
                self._actors[replica] = actor

    async def snapshot(self, ping_timeout_s: float = 0.5) -> dict:
        """:meth:`collect` after asking every live replica's actor whether it is still there: a dead one is gone
        now (a busy one that does not answer in time stays)."""
        async def dead(rid, actor) -> str | None:
            try:
                await asyncio.wait_for(_awaited(actor.__ray_ready__.remote()), ping_timeout_s)
            except RayActorError:
                return rid
            except Exception:  # noqa: BLE001 - a timeout (busy) or a transient error: the staleness window decides
                return None
            return None

        pings = [dead(rid, self._actors[rid]) for rid in list(self._live) if rid in self._actors]
        for rid in await asyncio.gather(*pings):
            if rid is not None and rid in self._live:
                self._gone[rid] = self._live.pop(rid)[1]
                self._actors.pop(rid, None)
        return self.collect()

    def collect(self) -> dict:
        now = time.monotonic()
        for rid, (seen, m) in list(self._live.items()):
            if now - seen > self.stale_after_s:
                del self._live[rid]
                self._gone[rid] = m
        live = [m for _, m in self._live.values()]
        return {"total": merge_metrics(live, list(self._gone.values())), "replicas": live,
                "gone": sorted(self._gone)}


# --------------------------------------------------------------------------------------------- replicas
def load_model(spec: ReplicaSpec):
    """The pipeline of ``spec`` on this replica's device: ``(pipe, device, dtype name)``."""
    import torch

    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but this replica sees no CUDA device (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    dtype_name = spec.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if callable(spec.model):
        return spec.model(device=device, dtype=dtype), device, dtype_name
    from ..tiny import TINY_BUILDERS, build_tiny

    if spec.model in TINY_BUILDERS:
        pipe = build_tiny(spec.model, device=device, dtype=dtype)
    else:
        from ..api import load_pipeline

        pipe = load_pipeline(spec.model, torch_dtype=dtype, device=device)
    if spec.storage_dtype is not None:
        from ..adapters import get_adapter

        get_adapter(pipe).enable_layerwise_casting(getattr(torch, spec.storage_dtype), dtype)
    return pipe, device, dtype_name


_WIRE_KINDS = {"invalid": ValueError, "busy": EngineBusy, "closed": EngineClosed, "deadline": DeadlineExceeded,
               "cancelled": RequestCancelled}


def _to_wire(exc: BaseException) -> dict:
    """An engine exception as plain data for the ingress (exceptions of user code need not unpickle there)."""
    if isinstance(exc, (ValueError, TypeError)):
        kind = "invalid"
    else:
        kind = next((k for k, cls in _WIRE_KINDS.items() if k != "invalid" and isinstance(exc, cls)), "error")
    return {"kind": kind, "type": type(exc).__name__, "message": protocol.one_line(exc)}


class RemoteError(RuntimeError):
    """An error a replica reported (``type_name``: its class there)."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


def _from_wire(err: dict) -> BaseException:
    cls = _WIRE_KINDS.get(err["kind"])
    return cls(err["message"]) if cls is not None else RemoteError(err["type"], err["message"])


def start_engine(spec: ReplicaSpec, name: str = "local"):
    """Everything a replica does before it takes traffic, in order: the persistent inductor cache (where asked),
    the model, the compile artifacts (verified; :class:`~ralu_runtime.compile.artifacts.ArtifactError` when
    refused), the engine, and the warm-up requests through it. Returns ``(engine, info)``: info has the device, the
    seconds of each step and the graphs the warm-up compiled."""
    from ..compile import compile_stats
    from ..compile.artifacts import enable_persistent_cache, load_compile_artifacts
    from .engine import Engine

    from .logs import quiet_library_logs

    quiet_library_logs(spec.log_prompts)       # no prompt text (nor torchvision notices) in the replica's log
    t0 = time.perf_counter()
    if spec.persistent_cache:
        enable_persistent_cache(None if spec.persistent_cache is True else spec.persistent_cache)
    pipe, device, dtype = load_model(spec)
    load_s = time.perf_counter() - t0
    artifacts = None
    if spec.compile_artifacts:
        t1 = time.perf_counter()
        if load_compile_artifacts(spec.compile_artifacts, key=spec.artifact_key):
            artifacts = {"path": str(spec.compile_artifacts), "load_s": time.perf_counter() - t1}
        else:
            logger.warning("replica %s: compile artifacts %s not found; compiling from scratch", name,
                           spec.compile_artifacts)
    defaults = dict(spec.defaults)
    if spec.backend is not None:
        defaults["backend"] = spec.backend
        if spec.compile_options:
            defaults["compile_options"] = dict(spec.compile_options)
    engine = Engine(pipe, spec.engine_config(), **defaults)
    try:
        graphs0 = compile_stats()["unique_graphs"]
        t2 = time.perf_counter()
        shapes = engine.warmup_variants() if spec.warmup is None else [dict(w) for w in spec.warmup]
        for shape in shapes:
            handles = [engine.submit("ralu warm-up", seed=i, output_type="pil", **shape)
                       for i in range(spec.warmup_requests)]
            for h in handles:
                h.result(spec.warmup_timeout_s)
        from ..heap import settle_heap

        warm = {"shapes": shapes, "requests": spec.warmup_requests * len(shapes),
                "seconds": time.perf_counter() - t2, "graphs_compiled": compile_stats()["unique_graphs"] - graphs0,
                "gc_s": settle_heap(freeze=True)}  # the replica's own process: no full collection mid-request
    except BaseException:
        engine.shutdown(drain=False, timeout=10)
        raise
    info = {"replica": name, "pid": os.getpid(), "node": socket.gethostname(), "device": device, "dtype": dtype,
            "load_s": load_s, "artifacts": artifacts, "warmup": warm, "ready_s": time.perf_counter() - t0}
    logger.info("replica %s ready on %s (%s) in %.1f s (model %.1f s, warm-up %.1f s)", name, device, info["node"],
                info["ready_s"], load_s, warm["seconds"])
    return engine, info


class RaluReplica:
    """One engine over one copy of the model (one GPU). Ray Serve constructs it (model load, artifacts, warm-up)
    before routing any request to it."""

    async def __init__(self, spec: ReplicaSpec, board=None):
        self.spec, self.board = spec, board
        self.id = serve.get_replica_context().replica_id.unique_id
        try:
            self._actor = ray.get_runtime_context().current_actor    # the board asks it whether it lives
        except Exception:  # noqa: BLE001 - not in an actor (a test): no liveness check
            self._actor = None
        self.engine = None
        self.engine, self.info = await asyncio.to_thread(start_engine, spec, self.id)
        self._stop = asyncio.Event()
        self._reporter = None
        if board is not None:
            await self._report()
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    # ------------------------------------------------------------------------------ requests
    async def generate(self, prompt, kwargs: dict, deadline_s: float | None,
                       encoding: protocol.Encoding | None = None) -> dict:
        """Run one request on this replica's engine: ``{"images": [base64 in ``encoding``, default PNG],
        "timings", "schedule", "replica"}``, or ``{"error": {"kind", "type", "message", "stage"}}``. Cancelling the
        call cancels the engine request."""
        try:
            handle = await asyncio.to_thread(self.engine.submit, prompt, deadline_s=deadline_s, output_type="pil",
                                             **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to the client
            return {"error": {**_to_wire(exc), "stage": "submit"}, "replica": self.id}
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()
        handle.add_done_callback(lambda _h: loop.call_soon_threadsafe(finished.set))
        try:
            await finished.wait()
        except asyncio.CancelledError:
            handle.cancel()
            logger.info("replica %s: request %s cancelled by its caller", self.id, handle.id)
            raise
        try:
            out = handle.result(0)
        except Exception as exc:  # noqa: BLE001 - reported to the client
            err = _to_wire(exc)
            if err["kind"] == "error":
                logger.error("replica %s: request %s failed", self.id, handle.id, exc_info=exc)
            return {"error": {**err, "stage": "result"}, "replica": self.id}
        data = await asyncio.to_thread(protocol.encode_images, out.images, encoding or protocol.Encoding())
        schedule = out.schedule.name if out.schedule is not None else None
        return {"images": data, "timings": out.timings, "schedule": schedule, "replica": self.id}

    def metrics(self) -> dict:
        """This replica's engine metrics (:meth:`Engine.metrics`) and its ``info`` (load, warm-up, device)."""
        return {**self.engine.metrics(), "info": self.info}

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if self.engine is None or self.engine.closed:
            raise RuntimeError(f"replica {self.id}: the engine has stopped")
        if not self.engine.closing and not self.engine.healthy:   # (a draining engine is not replaced)
            raise RuntimeError(f"replica {self.id}: the engine's scheduler thread died")

    # ------------------------------------------------------------------------------ reporting, shutdown
    async def _report(self, final: bool = False) -> None:
        try:
            await asyncio.wait_for(self.board.report.remote(self.id, self.metrics(), final, self._actor), 10.0)
        except Exception as exc:  # noqa: BLE001 - the board restarts; the next report fills it again
            logger.debug("replica %s: metrics report failed: %s", self.id, exc)

    async def _report_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), REPORT_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            await self._report()

    async def __del__(self):
        # Ray Serve calls this when it stops the replica, after its ongoing requests finished (or its
        # graceful_shutdown_timeout_s passed): stop the engine (finish what it holds, briefly), report once more.
        if getattr(self, "engine", None) is None:
            return
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        await asyncio.to_thread(self.engine.shutdown, True, 10.0)
        if not self.engine.closed:
            await asyncio.to_thread(self.engine.shutdown, False, 10.0)
        if self.board is not None:
            await self._report(final=True)


# --------------------------------------------------------------------------------------------- ingress
def _retry_after(total: dict | None) -> str:
    return protocol.retry_after_s(total) if total else "1"


class RaluIngress:
    """The HTTP API (:mod:`ralu_runtime.serving.http`'s) over the replicas, behind Ray Serve's proxy."""

    def __init__(self, replicas, board, options: IngressOptions):
        self.replicas, self.board, self.options = replicas, board, options
        self.started = time.time()
        self._lock = threading.Lock()
        self._http_counts: dict = {}
        self._counts = {"retries": 0, "replica_failures": 0, "ingress_timeouts": 0}
        # generations by outcome as clients saw them (a replica's own counts die with it)
        self._outcomes = dict.fromkeys(("ok", "invalid", "rejected", "cancelled", "deadline", "error"), 0)
        self._last_total: dict | None = None
        self.closing = False            # from a stop signal on: /health and new requests get 503
        self._inflight = 0              # generations this ingress is answering
        self._abort = asyncio.Event()   # set when the grace period is over: unfinished requests get 503

    # -------------------------------------------------------------- shutdown (called by run() through a handle)
    async def begin_shutdown(self) -> int:
        """Refuse new requests (503) and report ``/health`` as shutting down; returns the requests in flight."""
        self.closing = True
        return self._inflight

    async def inflight(self) -> int:
        """Generations this ingress is still answering."""
        return self._inflight

    async def abort_unfinished(self) -> int:
        """Answer every unfinished request with 503 and Retry-After now (their replica calls are cancelled)."""
        self.closing = True
        self._abort.set()
        return self._inflight

    async def answer(self, prompt, kwargs: dict, deadline, encoding) -> dict:
        """:meth:`_run`, unless :meth:`abort_unfinished` comes first (then 503 with Retry-After)."""
        with self._lock:
            self._inflight += 1
        run = asyncio.ensure_future(self._run(prompt, kwargs, deadline, encoding))
        aborted = asyncio.ensure_future(self._abort.wait())
        try:
            await asyncio.wait({run, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                return run.result()
            run.cancel()
            raise protocol.unavailable("the server shut down before this request finished: retry later",
                                       _retry_after(self._last_total))
        finally:
            aborted.cancel()
            if not run.done():
                run.cancel()       # the client hung up (this handler was cancelled) or the server stopped
            with self._lock:
                self._inflight -= 1

    async def _board(self) -> dict:
        snap = await asyncio.wait_for(self.board.snapshot.remote(), self.options.board_timeout_s)
        self._last_total = snap["total"]
        return snap

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    async def _run(self, prompt, kwargs: dict, deadline: float | None, encoding=None) -> dict:
        """Send the request to a replica; again to another one when its replica dies (same seed, the rest of its
        deadline), up to ``max_retries`` times."""
        opts = self.options
        end = None if deadline is None else time.monotonic() + deadline
        attempt = 0
        while True:
            attempt += 1
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise protocol.result_error(DeadlineExceeded("the request passed its deadline"), deadline,
                                         lambda: _retry_after(self._last_total))
            call = self.replicas.generate.remote(prompt, kwargs, left, encoding)
            try:
                if left is None:
                    reply = await call
                else:
                    reply = await asyncio.wait_for(_awaited(call), left + opts.deadline_slack_s)
            except asyncio.TimeoutError:
                call.cancel()   # cancels the engine request on its replica
                self._count("ingress_timeouts")
                raise protocol.result_error(DeadlineExceeded("the replica did not answer by the request's deadline"),
                                         deadline, lambda: _retry_after(self._last_total)) from None
            except asyncio.CancelledError:
                call.cancel()   # the client hung up (Ray Serve cancels this handler): cancel it on the replica
                raise
            except BackPressureError:
                raise protocol.unavailable("every replica is busy and the queue is full: retry later",
                                        _retry_after(self._last_total)) from None
            except DeploymentUnavailableError as exc:
                raise protocol.unavailable(f"no replica is available: {protocol.one_line(exc)}",
                                        _retry_after(self._last_total)) from None
            except RayActorError as exc:
                self._count("replica_failures")
                why = f"the replica running this request died ({type(exc).__name__})"
                if attempt > opts.max_retries:
                    logger.error("%s; %d attempt(s), giving up", why, attempt)
                    raise protocol.ApiError(503, f"{why}; tried {attempt} time(s): retry later", code="replica_failed",
                                         headers={"Retry-After": _retry_after(self._last_total)}) from None
                logger.warning("%s; sending it to another replica (attempt %d of %d)", why, attempt + 1,
                               opts.max_retries + 1)
                self._count("retries")
                continue
            err = reply.get("error")
            if err is None:
                return reply
            exc = _from_wire(err)
            retry_after = lambda: _retry_after(self._last_total)  # noqa: E731
            if err["kind"] in ("closed", "cancelled") and attempt <= opts.max_retries:
                # the replica is stopping (scaled down, redeployed): another one takes the request
                self._count("retries")
                continue
            if err["stage"] == "submit":
                api = protocol.submit_error(exc, retry_after)
                if api is not None:
                    raise api
            raise protocol.result_error(exc, deadline, retry_after)

    def __serve_build_asgi_app__(self):
        return build_ingress_app(self)


async def _awaited(response):
    return await response


def build_ingress_app(ingress: RaluIngress):
    """The FastAPI app of :class:`RaluIngress` (routes, errors and counters as in
    :func:`ralu_runtime.serving.http.create_app`)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    opts = ingress.options
    app = FastAPI(title="ralu", docs_url=None, redoc_url=None, openapi_url=None)
    protocol.install_error_handlers(app)
    app.state.policy = opts.policy()
    app.add_middleware(protocol.Guard, policy=app.state.policy)   # inside the counter: refusals are counted
    app.add_middleware(protocol.CountResponses, counts=ingress._http_counts, lock=ingress._lock,
                       paths=(protocol.GENERATIONS_PATH, "/health", "/metrics", "/v1/models"))

    def retry_after() -> str:
        return _retry_after(ingress._last_total)

    @app.post(protocol.GENERATIONS_PATH)
    async def generations(request: Request):
        outcome = "error"
        try:
            out = await _generation(request)
            outcome = "ok"
            return out
        except protocol.ApiError as exc:
            outcome = {503: "rejected", 504: "deadline"}.get(exc.status, "invalid" if exc.status < 500 else "error")
            raise
        except (asyncio.CancelledError, protocol.ClientGone):
            outcome = "cancelled"
            raise
        finally:
            with ingress._lock:
                ingress._outcomes[outcome] += 1

    async def _generation(request: Request):
        body = await protocol.read_body(request, opts.max_body_bytes)
        kwargs, deadline, seed, encoding = protocol.parse_request(
            body, model_name=opts.model_name, max_images=opts.max_images, default_deadline_s=opts.default_deadline_s)
        if ingress.closing:
            raise protocol.unavailable("the server is shutting down: no new requests", retry_after())
        prompt = kwargs.pop("prompt")
        reply = await ingress.answer(prompt, kwargs, deadline, encoding)
        out = protocol.generation_body(reply["images"], reply["timings"], reply["schedule"], seed, encoding.format)
        out["ralu"]["replica"] = reply["replica"]
        return out

    @app.post(protocol.EDITS_PATH)
    async def edits(request: Request):
        raise protocol.ApiError(404, f"{protocol.EDITS_PATH} is not served by the Ray Serve ingress yet: run ralu "
                                     "serve without --ray for image edits (docs/serving.md)", code="not_found")

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers probing without a body
    async def health():
        if ingress.closing:
            return protocol.shutting_down_health({"model": opts.model_name}, retry_after())
        try:
            snap = await ingress._board()
        except Exception as exc:  # noqa: BLE001 - the board is restarting
            return JSONResponse({"status": "unavailable", "model": opts.model_name,
                                 "detail": f"replica metrics unavailable ({type(exc).__name__})"}, status_code=503)
        total, n = snap["total"], len(snap["replicas"])
        return JSONResponse({"status": "ok" if n else "unavailable", "model": opts.model_name,
                             "queue_depth": total["queue_depth"], "active": total["active"], "replicas": n},
                            status_code=200 if n else 503)

    class _Extra:
        def __init__(self, snap):
            self.snap = snap

        def collect(self):
            yield GaugeMetricFamily("ralu_replicas", "Replicas reporting metrics", value=len(self.snap["replicas"]))
            replica_requests = CounterMetricFamily("ralu_replica_requests", "Requests the replicas' engines finished "
                                                   "or refused, by outcome (warm-ups included; the counts since a "
                                                   "dead replica's last report are lost)", labels=["outcome"])
            for outcome, count in self.snap["total"]["requests"].items():
                replica_requests.add_metric([outcome], count)
            yield replica_requests
            with ingress._lock:
                counts = dict(ingress._counts)
            yield CounterMetricFamily("ralu_replica_failures", "Requests whose replica died while running them",
                                      value=counts["replica_failures"])
            yield CounterMetricFamily("ralu_retries", "Requests sent again to another replica",
                                      value=counts["retries"])
            yield CounterMetricFamily("ralu_ingress_timeouts", "Requests cancelled by the ingress past their "
                                      "deadline", value=counts["ingress_timeouts"])

    @app.get("/metrics")
    async def metrics():
        try:
            snap = await ingress._board()
        except Exception as exc:  # noqa: BLE001 - the board is restarting
            raise protocol.unavailable(f"replica metrics unavailable ({type(exc).__name__})", "1") from None
        registry = CollectorRegistry(auto_describe=False)
        with ingress._lock:     # ralu_requests_total: generations by outcome as the ingress answered them
            total = {**snap["total"], "requests": dict(ingress._outcomes)}
        registry.register(protocol.EngineCollector(_Snapshot(total), ingress._http_counts, ingress._lock))
        registry.register(_Extra(snap))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return protocol.models_body(opts.model_name, ingress.started)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return protocol.model_or_404(model_id, opts.model_name, ingress.started)

    return app


# --------------------------------------------------------------------------------------------- the application
RaluReplicaDeployment = serve.deployment(name="RaluReplica")(RaluReplica)
RaluBoardDeployment = serve.deployment(name="RaluBoard", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                       max_ongoing_requests=1000,
                                       logging_config={"enable_access_log": False})(RaluBoard)
RaluIngressDeployment = serve.deployment(name="RaluIngress", ray_actor_options={"num_cpus": 0},
                                         max_ongoing_requests=10000)(serve.ingress()(RaluIngress))


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster."""
    return float(ray.cluster_resources().get("GPU", 0.0))


def build_app(spec: ReplicaSpec, options: IngressOptions | None = None, *, replicas=None,
              target_ongoing_requests: float | None = None, grace_s: float = 30.0, gpus: float | None = None,
              max_queued_requests: int | None = None):
    """The Ray Serve application (bind it with ``serve.run(app, name=..., route_prefix="/")``). ``replicas``: None
    (one per GPU of the cluster; 1 without GPUs), N, or ``(min, max)`` to autoscale on queue depth; ``gpus``: the
    cluster's GPUs (default: asked from the connected Ray cluster); ``max_queued_requests``: requests that may wait
    for a replica per ingress replica before 503 (default: ``max_queue`` per replica, at least 64)."""
    options = options or IngressOptions()
    if gpus is None:
        gpus = cluster_gpus()
    opts = deployment_options(spec, replicas, cluster_gpus=gpus, target_ongoing_requests=target_ongoing_requests,
                              grace_s=grace_s)
    n = opts.get("num_replicas") or opts["autoscaling_config"]["max_replicas"]
    opts["max_queued_requests"] = max_queued_requests or max(64, spec.max_queue * n)
    board = RaluBoardDeployment.bind()
    replica = RaluReplicaDeployment.options(**opts).bind(spec, board)
    # the ingress drains as long as the replicas do (Ray's default would cut its answers off after 20 s)
    ingress = RaluIngressDeployment.options(graceful_shutdown_timeout_s=grace_s + 10.0,
                                            graceful_shutdown_wait_loop_s=0.5)
    return ingress.bind(replica, board, options)


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serve_running() -> bool:
    """True when the connected cluster already runs Ray Serve (its proxy then owns the port)."""
    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    except ValueError:
        return False
    return True


def _check_port(host: str, port: int) -> None:
    """ValueError (one line) when ``host:port`` cannot be listened on."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def drain_ingress(grace_s: float, poll_s: float = 0.2) -> int:
    """The stop of a running application, before it is deleted: the ingress answers 503 to ``/health`` and new
    requests at once, lets the requests it is answering finish for up to ``grace_s`` seconds, then answers the rest
    with 503 and Retry-After. Returns how many were cut off."""
    ingress = serve.get_app_handle(APP_NAME)
    left = ingress.begin_shutdown.remote().result(timeout_s=30)
    end = time.monotonic() + grace_s
    while left and time.monotonic() < end:
        time.sleep(poll_s)
        left = ingress.inflight.remote().result(timeout_s=30)
    if not left:
        return 0
    cut = ingress.abort_unfinished.remote().result(timeout_s=30)
    logger.warning("grace period over: %d unfinished request(s) answered with 503", cut)
    end = time.monotonic() + 10.0
    while ingress.inflight.remote().result(timeout_s=30) and time.monotonic() < end:
        time.sleep(poll_s)     # their 503s are written
    return cut


def run(spec: ReplicaSpec, options: IngressOptions | None = None, *, host: str = "127.0.0.1", port: int = 8000,
        address: str | None = None, replicas=None, grace_s: float = 30.0, on_ready: Callable | None = None,
        stop: threading.Event | None = None, insecure: bool = False) -> None:
    """Serve ``spec`` on Ray Serve until SIGINT / SIGTERM (or ``stop`` is set): connect to the Ray cluster at
    ``address`` (None: ``RAY_ADDRESS``, a cluster started with ``ray start`` on this machine, or a new local one),
    start Ray Serve's proxy on ``host:port`` (port 0: a free one), deploy, call ``on_ready(url, status)``, wait;
    then stop: the ingress answers 503 to ``/health`` and new requests and drains for up to ``grace_s`` (the rest
    get 503, :func:`drain_ingress`), then the application is deleted. A non-loopback ``host`` without
    ``options.api_keys`` is refused (ValueError) unless ``insecure``."""
    import dataclasses
    import signal

    options = options or IngressOptions()
    if not insecure and not options.api_keys and not is_loopback(host):
        raise ValueError(f"listening on {host} (not a loopback address) without an API key would let anyone who can "
                         "reach it use this server: give API keys (--api-key / RALU_API_KEY), or --insecure")
    options = dataclasses.replace(options, bound_host=host)
    owned = False     # True: this call started a local Ray instance (and stops it at the end)
    if not ray.is_initialized():
        if address is None and not os.environ.get("RAY_ADDRESS"):
            try:
                ray.init(address="auto", logging_level=logging.WARNING)     # a cluster started with `ray start`
            except ConnectionError:
                ray.init(logging_level=logging.WARNING)
                owned = True
        else:
            ray.init(address=address, logging_level=logging.WARNING)
        connected = True
    else:
        connected = False
    if port == 0:
        port = free_port(host)
    elif not _serve_running():
        _check_port(host, port)     # before Ray Serve starts its proxy and the replicas load the model
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    deployed = False
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_app(spec, options, replicas=replicas, grace_s=grace_s), name=APP_NAME, route_prefix="/",
                      blocking=False)
        except RuntimeError as exc:     # Ray Serve's message names the deployment; add the replicas' own error
            why = deploy_failure()
            raise RuntimeError(f"{protocol.one_line(exc)}{f' ({why})' if why else ''}") from None
        deployed = True
        host_url = f"[{host}]" if ":" in host else host
        if on_ready is not None:
            on_ready(f"http://{host_url}:{port}", serve.status().applications[APP_NAME])
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if deployed:
                try:
                    drain_ingress(grace_s)
                except Exception as exc:  # noqa: BLE001 - the ingress is gone: delete what is left
                    logger.warning("could not drain the ingress: %s", protocol.one_line(exc))
            if not owned:
                serve.delete(APP_NAME)      # the cluster's proxy stays, and answers 404 from now on
            elif not deployed:
                serve.shutdown()
            # owned and deployed: ray.shutdown() below ends the proxy with everything else (no window of 404s)
        finally:
            if connected:
                ray.shutdown()


def deploy_failure() -> str | None:
    """The last exception line in the application's deployment status messages (why a replica did not start)."""
    import re

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return None
    lines = []
    for d in app.deployments.values():
        text = re.sub(r"\x1b\[[0-9;]*m", "", d.message or "")
        lines += [ln.strip() for ln in text.splitlines() if re.match(r"\s*[\w.]*(Error|Exception)\b.*:", ln)]
    return lines[-1] if lines else None


def replica_status() -> dict:
    """Replica states of the running application by deployment, e.g. ``{"RaluReplica": {"RUNNING": 2}}``."""
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return {}
    return {name: dict(d.replica_states) for name, d in app.deployments.items()}

