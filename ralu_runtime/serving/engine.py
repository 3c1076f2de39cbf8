"""The serving engine: continuous batching of ``generate`` requests at different RALU stages.

A request is checked and resolved with :func:`ralu_runtime.prepare` when it is submitted, and its
:class:`~ralu_runtime.CallPlan` is executed by :func:`ralu_runtime.run` in a worker thread of the engine (text
encoding, noise, stage transitions, region choice, solver steps and the VAE decode are that request's own code),
with ``run``'s two public hooks: ``model_call`` hands each model call to the engine's scheduler thread (the worker
waits for the answer), ``final_decode`` hands it the final VAE decode. At
every step boundary the scheduler gathers the waiting calls of all active requests - each at its own stage, token
count, timestep, guidance, preset and resolution - and runs them as **one packed transformer call**
(:meth:`~ralu_runtime.adapters.DiTAdapter.packed_velocity`: varlen attention over the concatenated sequences,
per-request modulation and text lengths), then hands every request its slice. New requests join at the next step
boundary; finished ones leave. A request's output therefore equals what ``generate`` gives alone with the same
arguments and seed, up to the floating-point difference of a packed against an unpacked model call (tested:
``tests/test_serving_engine.py``).

Scheduling, per step boundary:

* a call is launched when every active request is waiting on the model, or ``gather_timeout_s`` after the oldest
  waiting call arrived (a request busy with its VAE decode or region choice does not hold up the others);
* calls are taken oldest request first until ``token_budget`` tokens (image tokens x images x 2 with CFG) would be
  exceeded; the oldest call always runs, so a request larger than the budget runs alone and none starves;
* with a compile backend installed, the eager and inductor runners run the packed call themselves (compiled packed
  blocks with a symbolic token dimension; on CUDA, graphs captured per token-count bucket with the padding as its
  own attention segment: :mod:`ralu_runtime.compile.packed`);
* calls that cannot be packed (the family has no packed call, an active feature cache, an onnx/tensorrt runner,
  skip-layer guidance windows...) run one by one in the same step, in their request's own context;
* final VAE decodes of requests that finish together run as one batched decode per latent shape.

Admission: at most ``max_active`` requests run at once; up to ``max_queue`` more wait in a FIFO queue; beyond that
:meth:`Engine.submit` raises :class:`EngineBusy` at once (nothing is dropped silently). Arguments are checked
at submission with :func:`ralu_runtime.prepare` (the same checks as ``generate``). Per-request
deadlines (:class:`DeadlineExceeded`) and cancellation (:class:`RequestCancelled`) take effect while queued and
before the request's next transformer block (a packed call stops once every request in it is stopped). The work
of a request is bounded at submission (``EngineConfig.max_images`` / ``max_token_steps``,
:mod:`ralu_runtime.limits`). :meth:`Engine.shutdown` finishes (``drain=True``) or rejects queued work. An engine
still running at interpreter exit is shut down then (queued requests rejected, running ones cancelled at their next
model call, up to ``EXIT_TIMEOUT_S``): its threads are daemons, and one left inside a torch op while the interpreter
finalizes aborted the process ("terminate called without an active exception").
"""
from __future__ import annotations

import atexit
import contextvars
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..adapters.base import current_cache
from ..execution.call import interrupt_scope
from ..offload import check_offload

__all__ = ["Engine", "EngineConfig", "RequestHandle", "EngineBusy", "EngineClosed", "DeadlineExceeded",
           "RequestCancelled", "DEFAULT_TOKEN_BUDGET"]

DEFAULT_TOKEN_BUDGET = 16384
"""Tokens per packed model call by default (docs/serving.md, "Token budget": how it was chosen, what is owed)."""

EXIT_TIMEOUT_S = 60.0
"""Seconds an engine still running at interpreter exit is given to stop (the step it is in cannot be interrupted)."""

# generate() arguments a request may not set: they belong to the engine (its pipeline, backend, thread pool)
ENGINE_OWNED = ("backend", "compile_options", "torch_dtype", "device", "progress", "parallel", "precision", "limits")
# where an engine default of those that the engine does not take either belongs instead
_OWNED_WHY = {"torch_dtype": "set on the pipeline before building the engine (pipe.to(dtype))",
              "device": "set on the pipeline before building the engine (pipe.to(device))",
              "parallel": "an engine runs one process's pipeline (context parallelism: generate(parallel=...))",
              "progress": "an engine shows no progress bars (requests run in its threads)",
              "limits": "the engine's bounds are EngineConfig(max_images=..., max_token_steps=...)"}


def _check_defaults(defaults: dict) -> None:
    """TypeError / ValueError, when the engine is built, for default ``generate`` arguments that every request would
    fail on: a name ``generate`` does not take, and what ``ralu_runtime.api.check_call_options`` checks without a
    model (output_type, noise, solver, ..., backend, compile_options, precision, cache). Those that need the model
    (sizes, seed, guidance, speedup) follow in :func:`_check_model_defaults`."""
    import inspect

    from ..api import check_call_options, prepare

    try:
        inspect.signature(prepare).bind_partial(None, **defaults)
    except TypeError as exc:
        raise TypeError(f"Engine default arguments: {exc} (they are generate's arguments)") from None
    names = inspect.signature(check_call_options).parameters
    check_call_options(**{k: v for k, v in defaults.items() if k in names})


# default arguments a request takes as they are and whose checks need the model (sizes against its block size,
# presets of its family, steps, guidance and seed ranges, frames, the work bound): checked when the engine is built
MODEL_DEFAULTS = ("height", "width", "speedup", "num_inference_steps", "guidance_scale", "seed", "num_frames",
                  "region_mode", "max_sequence_length", "num_images_per_prompt", "noise", "region_source", "solver",
                  "edge_map", "edge_detector", "transition_impl")


def _check_model_defaults(pipe, adapter, defaults: dict, limits) -> None:
    """TypeError / ValueError, when the engine is built, for default arguments of :data:`MODEL_DEFAULTS` that every
    request using them would fail on (height not a multiple of the model's block, a preset the family lacks, a seed
    out of range, a work bound exceeded, ...): ``prepare`` with them and one-token zero prompt embeddings. Not
    raised when the pipeline needs more than a prompt from every request (an editing pipeline's image): those
    defaults are then checked with each request."""
    from ..api import prepare
    from ..kontext import is_kontext

    given = {k: v for k, v in defaults.items() if k in MODEL_DEFAULTS}
    if not given:
        return
    if given.get("height") and given.get("width") and is_kontext(pipe):  # as submit sets it
        given["max_area"] = given["height"] * given["width"]
    try:
        embeds = adapter.dummy_embeds(1, 1)
    except NotImplementedError:  # a family that does not state its embedding sizes: checked per request
        return
    try:
        prepare(pipe, **embeds, **given, progress=False, limits=limits)
    except (TypeError, ValueError) as exc:
        try:
            prepare(pipe, **embeds, progress=False, limits=limits)
        except (TypeError, ValueError):
            return  # every request must bring more than a prompt (an image): its defaults are checked with it
        raise type(exc)(f"Engine default arguments: {exc}") from None


class EngineBusy(RuntimeError):
    """The queue is full: retry later (HTTP 503)."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or shut down (HTTP 503)."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before it finished (HTTP 504)."""


class RequestCancelled(RuntimeError):
    """The request was cancelled by its client."""


@dataclass
class EngineConfig:
    """Engine limits. ``token_budget``: tokens per packed model call (None: :data:`DEFAULT_TOKEN_BUDGET`);
    ``max_active``: requests running at once (one worker thread each); ``max_queue``: requests waiting beyond
    those; ``gather_timeout_s``: how long a waiting call may wait for requests busy outside the model;
    ``packed``: False runs every model call unpacked (same scheduler; for comparisons). ``max_images`` /
    ``max_token_steps``: the work a request may ask for (:mod:`ralu_runtime.limits`; None: the process-wide
    defaults of :func:`ralu_runtime.limits.set_limits` when the request is submitted), checked at submission."""

    token_budget: int | None = None
    max_active: int = 8
    max_queue: int = 64
    gather_timeout_s: float = 0.005
    packed: bool = True
    max_images: int | None = None
    max_token_steps: int | None = None

    def __post_init__(self):
        for name in ("max_active", "max_queue"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "max_active" else 0):
                raise ValueError(f"{name}={v!r}: use an int >= {1 if name == 'max_active' else 0}")
        if self.token_budget is None:
            self.token_budget = DEFAULT_TOKEN_BUDGET
        if isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int) or self.token_budget < 1:
            raise ValueError(f"token_budget={self.token_budget!r}: use a positive int (tokens per model call)")
        if (isinstance(self.gather_timeout_s, bool) or not isinstance(self.gather_timeout_s, (int, float))
                or not 0 <= self.gather_timeout_s <= 10):
            raise ValueError(f"gather_timeout_s={self.gather_timeout_s!r}: use seconds in [0, 10]")
        if not isinstance(self.packed, bool):  # "no" would pack
            raise ValueError(f"packed={self.packed!r}: use True or False")
        self.limits()  # bad max_images / max_token_steps fail here

    def limits(self):
        """The :class:`~ralu_runtime.limits.Limits` of a request submitted now (unset fields: the process-wide
        defaults)."""
        from ..limits import resolve_limits

        return resolve_limits({k: v for k, v in (("max_images", self.max_images),
                                                  ("max_token_steps", self.max_token_steps)) if v is not None})


_OUTCOMES = ("ok", "error", "cancelled", "deadline", "rejected")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (256, 1024, 4096, 8192, 16384, 32768, 65536, 131072)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics): ``buckets`` upper bounds, counts, sum, count."""

    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def snapshot(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum, "count": self.count}


class RequestHandle:
    """A submitted request: :meth:`result` waits for its :class:`~ralu_runtime.api.RaluOutput` (or raises its
    error), :meth:`cancel` stops it, ``status`` is "queued", "running", "done", "failed" or "cancelled"."""

    def __init__(self, rid: int, kwargs: dict, tokens: int, deadline: float | None, plan):
        self.id = rid
        self.kwargs = kwargs            # the generate arguments of the request (engine defaults applied)
        self.plan = plan                # their CallPlan (ralu_runtime.prepare), run by the engine
        self.tokens = tokens            # tokens of its largest model call (for the budget and metrics)
        self.deadline = deadline        # time.monotonic() seconds, or None
        self.submitted = time.monotonic()
        self.status = "queued"
        self._done = threading.Event()
        self._result = None
        self._error: BaseException | None = None
        self._cancel = False
        self._engine: Engine | None = None
        self._callbacks: list[Callable] = []
        self._cb_lock = threading.Lock()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None):
        """The request's RaluOutput; raises its error (DeadlineExceeded, RequestCancelled, ValueError, ...), or
        TimeoutError when ``timeout`` seconds pass first (the request keeps running: cancel it if unwanted)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> bool:
        """Ask the request to stop; True unless it has already finished."""
        if self.done():
            return False
        self._cancel = True
        if self._engine is not None:
            self._engine._cancelled(self)
        return True

    def add_done_callback(self, fn: Callable[["RequestHandle"], None]) -> None:
        """Call ``fn(handle)`` once the request has finished (at once if it has); from the thread that finishes it
        (e.g. ``loop.call_soon_threadsafe`` to resume a coroutine). Exceptions in ``fn`` are not propagated."""
        with self._cb_lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        _safe_call(fn, self)

    def _check(self) -> None:
        if self._cancel:
            raise RequestCancelled(f"request {self.id} was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"request {self.id} passed its deadline")

    def _finish(self, result=None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self.status = "done" if error is None else ("cancelled" if isinstance(error, RequestCancelled) else "failed")
        with self._cb_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _safe_call(fn, self)


def _safe_call(fn, handle) -> None:
    try:
        fn(handle)
    except Exception:  # noqa: BLE001 - a client's callback must not break the engine's worker
        import logging

        logging.getLogger("ralu.serving").exception("done callback of request %s failed", handle.id)


@dataclass
class _Call:
    """One waiting model call of one request."""

    req: RequestHandle
    args: tuple                     # (tokens, grid, timestep, cond)
    fn: Callable                    # the request's own (unpacked) model call
    adapter: Any                    # the adapter the request was prepared with (its packed call's model)
    ctx: contextvars.Context        # the request thread's context (its feature cache, expert choice, ...)
    packable: bool
    tokens: int
    arrived: float = field(default_factory=time.monotonic)
    kind: str = "model"             # "model": a transformer call; "decode": the request's final VAE decode
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def _all_stopped(reqs: list) -> None:
    """Raise the first request's cancellation / deadline error when every request in ``reqs`` is stopped."""
    errors = []
    for r in reqs:
        try:
            r._check()
        except (RequestCancelled, DeadlineExceeded) as e:
            errors.append(e)
        else:
            return
    raise errors[0]


def call_tokens(tokens: torch.Tensor, cond) -> int:
    """Tokens a model call processes: images x image tokens, doubled for classifier-free guidance."""
    data = getattr(cond, "data", None) or {}
    return int(tokens.shape[0] * tokens.shape[1] * (2 if data.get("cfg") else 1))


class Engine:
    """Continuous batching of :func:`ralu_runtime.generate` requests on one pipeline (see the module docstring).

    ``Engine(pipe, config, **defaults)``: ``defaults`` are ``generate`` keyword arguments applied to every
    request unless it sets them (a default ``seed`` gives way to a request's own seed or generator; a default
    ``generator`` is refused: every request would draw from it). Use as a context manager, or call :meth:`shutdown`.
    """

    def __init__(self, pipe, config: EngineConfig | None = None, **defaults):
        from ..adapters import get_adapter

        if config is not None and not isinstance(config, EngineConfig):
            raise TypeError(f"config={type(config).__name__}: give an EngineConfig (e.g. EngineConfig(max_active=2)) "
                            "or None; generate's arguments go as keywords")
        self.config = config or EngineConfig()
        bad = sorted(set(defaults) & set(ENGINE_OWNED) - {"backend", "compile_options", "precision"})
        if bad:
            raise ValueError(f"{', '.join(bad)}: {_OWNED_WHY[bad[0]]}")
        if defaults.get("generator") is not None:  # one generator drawn from by every request: same seed, other image
            raise ValueError("generator: a default generator would be shared by every request (each request's image "
                             "would depend on the requests before it); give a default seed=, or a generator per "
                             "request")
        _check_defaults(defaults)
        self.pipe = pipe
        adapter = get_adapter(pipe)
        adapter.check_supported()
        adapter.check_forwards()
        check_offload(adapter, engine=True)
        _check_model_defaults(pipe, adapter, defaults, self.config.limits())
        self.defaults = dict(defaults)
        self._lock = threading.Condition()
        self._queue: deque[RequestHandle] = deque()
        self._active: set[RequestHandle] = set()
        self._waiting: list[_Call] = []
        self._ids = itertools.count(1)
        self._closing = False
        self._closed = threading.Event()
        self._outcomes = dict.fromkeys(_OUTCOMES, 0)
        self._calls = 0
        self._packed_calls = 0
        self._step_latency = Histogram(LATENCY_BUCKETS)
        self._request_latency = Histogram(LATENCY_BUCKETS)
        self._batch_tokens = Histogram(TOKEN_BUCKETS)
        self._batch_requests = Histogram(tuple(range(1, 33)))
        self._decode_batches = Histogram(tuple(range(1, 33)))
        self._workers: set[threading.Thread] = set()  # request threads not yet finished (joined at exit)
        self._scheduler = threading.Thread(target=self._run, name="ralu-engine", daemon=True)
        self._scheduler.start()
        _LIVE.add(self)

    # ------------------------------------------------------------------------------------------ public
    @property
    def adapter(self):
        """The pipeline's adapter now (a component replaced on the pipeline gives a new one: later requests run it;
        a request already submitted keeps the one it was prepared with, hence its transformer; the VAE is read from
        the pipeline at each decode)."""
        from ..adapters import get_adapter

        return get_adapter(self.pipe)

    def warmup_variants(self) -> list[dict]:
        """Extra ``generate`` arguments of the warm-up requests that build every graph a request at the engine's
        defaults can take: ``[{}]``, plus a request with a negative prompt where one changes the model call (a
        family that runs CFG only with a negative prompt, Qwen-Image: ``adapter.runs_cfg``)."""
        adapter = self.adapter
        guidance = self.defaults.get("guidance_scale")
        guidance = adapter.guidance_default() if guidance is None else float(guidance)
        variants = [{}]
        if adapter.supports_negative_prompt and adapter.runs_cfg(guidance, True) != adapter.runs_cfg(guidance, False):
            variants.append({"negative_prompt": "ralu warm-up"})
        return variants

    def submit(self, prompt=None, *, deadline_s: float | None = None, **kwargs) -> RequestHandle:
        """Queue one ``generate(pipe, prompt, **kwargs)`` request; returns its :class:`RequestHandle`.

        The arguments are checked now (ValueError / TypeError as ``generate`` raises them). ``deadline_s``:
        seconds from now after which the request fails with :class:`DeadlineExceeded`. Raises
        :class:`EngineBusy` when the queue is full and :class:`EngineClosed` after :meth:`shutdown`.
        """
        from ..api import prepare
        from ..kontext import is_kontext

        owned = sorted(set(kwargs) & set(ENGINE_OWNED))
        if owned:
            raise ValueError(f"{', '.join(owned)}: belong to the engine, not to a request")
        if "pipe" in kwargs:
            raise TypeError("pipe: a request runs on the engine's pipeline (Engine(pipe, ...)); give generate's other "
                            "arguments")
        if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))
                                       or not deadline_s > 0):
            raise ValueError(f"deadline_s={deadline_s!r}: use seconds > 0, or None")
        defaults = self.defaults
        if kwargs.get("seed") is not None or kwargs.get("generator") is not None:
            defaults = {k: v for k, v in defaults.items() if k != "seed"}  # the request's own seed or generator
        call = {**defaults, **kwargs, "prompt": prompt, "progress": False}
        if "speedup" in call and call["speedup"] is None and "region_source" in kwargs:
            raise ValueError(f"region_source={kwargs['region_source']!r} applies to RALU runs; this request runs "
                             "speedup=None (the ordinary sampler chooses no regions)")
        if "max_area" not in call and call.get("height") and call.get("width") and is_kontext(self.pipe):
            call["max_area"] = call["height"] * call["width"]  # FLUX.1 Kontext: the request's size is the output's
        plan = prepare(self.pipe, **call, limits=self.config.limits())
        check_offload(plan.adapter, engine=True)  # enable_model_cpu_offload called since the engine was built
        tokens = self._max_tokens(plan)
        req = RequestHandle(next(self._ids), call, tokens,
                            None if deadline_s is None else time.monotonic() + deadline_s, plan)
        req._engine = self
        with self._lock:
            if self._closing:
                self._outcomes["rejected"] += 1
                raise EngineClosed("the engine is shutting down: no new requests")
            # queued and running together: a burst of submits outpaces the scheduler moving requests to the active
            # set, so the queue alone (or the active set alone) can be below its bound while the engine is full
            if len(self._queue) + len(self._active) >= self.config.max_queue + self.config.max_active:
                self._outcomes["rejected"] += 1
                raise EngineBusy(f"the queue is full ({len(self._active)} running, {len(self._queue)} waiting; "
                                 f"max_active={self.config.max_active}, max_queue={self.config.max_queue}): "
                                 "retry later")
            self._queue.append(req)
            self._lock.notify_all()
        return req

    def generate(self, prompt=None, *, timeout: float | None = None, **kwargs):
        """``submit(...).result(timeout)``."""
        return self.submit(prompt, **kwargs).result(timeout)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests. ``drain=True``: finish running and queued ones; False: reject queued requests
        (EngineClosed) and cancel running ones at their next model call. Waits up to ``timeout`` seconds for the
        work, then for the engine's threads to end (the request threads finish after their results are handed
        over: a process that exits right after ``shutdown`` must not find one still running)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._closing = True
            if not drain:
                while self._queue:
                    req = self._queue.popleft()
                    self._outcomes["rejected"] += 1
                    req._finish(error=EngineClosed("the engine shut down before this request started"))
                for req in self._active:
                    req._cancel = True
            self._lock.notify_all()
        if not self._closed.wait(timeout):
            return
        with self._lock:
            threads = [self._scheduler, *self._workers]
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` has finished all work (the scheduler has stopped)."""
        return self._closed.is_set()

    @property
    def healthy(self) -> bool:
        """True while the engine takes and runs requests: not shutting down, its scheduler thread alive."""
        return not self._closing and self._scheduler.is_alive()

    @property
    def closing(self) -> bool:
        """True from the moment :meth:`shutdown` is called: no new requests are taken."""
        return self._closing

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown(drain=exc[0] is None)
        return False

    def metrics(self) -> dict:
        """A snapshot: queue depth, active requests, requests by outcome, model calls (packed ones), and
        histograms of step latency (s), request latency (s), tokens and requests per model call, requests per
        batched final VAE decode."""
        with self._lock:
            return {"queue_depth": len(self._queue), "active": len(self._active),
                    "requests": dict(self._outcomes), "model_calls": self._calls,
                    "packed_calls": self._packed_calls, "token_budget": self.config.token_budget,
                    "step_latency_seconds": self._step_latency.snapshot(),
                    "request_latency_seconds": self._request_latency.snapshot(),
                    "batch_tokens": self._batch_tokens.snapshot(),
                    "batch_requests": self._batch_requests.snapshot(),
                    "decode_batches": self._decode_batches.snapshot()}

    # ------------------------------------------------------------------------------------------ workers
    def _max_tokens(self, plan) -> int:
        a = plan.adapter
        p, f = a.patch_size, a.vae_scale_factor
        frames = a.latent_frames(plan.num_frames)
        negative = plan.negative_prompt is not None or plan.negative_prompt_embeds is not None
        cfg = 2 if a.runs_cfg(plan.guidance, negative) else 1
        return plan.batch * frames * (plan.height // (p * f)) * (plan.width // (p * f)) * cfg

    def _cancelled(self, req: RequestHandle) -> None:
        with self._lock:
            if req in self._queue:
                self._queue.remove(req)
                self._outcomes["cancelled"] += 1
                req._finish(error=RequestCancelled(f"request {req.id} was cancelled before it started"))
            self._lock.notify_all()

    def _hook(self, req: RequestHandle):
        """``run``'s ``model_call`` hook for ``req``: every model call waits for the scheduler's (packed) step."""
        engine = self

        def hook(adapter, velocity):
            plain = velocity == adapter.velocity   # bound methods compare by function and instance
            # or the installed backend's runner, when it runs packed calls (inductor / eager; not onnx / tensorrt)
            runner = velocity is adapter.runner and bool(getattr(velocity, "packs", False))

            def model_call(tokens, grid, timestep, cond):
                req._check()
                packable = (engine.config.packed and (plain or runner) and getattr(adapter, "packs", False)
                            and current_cache() is None)
                return engine._wait_for(_Call(req, (tokens, grid, timestep, cond), velocity, adapter,
                                              contextvars.copy_context(), packable, call_tokens(tokens, cond)))

            return model_call

        return hook

    def _decode_hook(self, req: RequestHandle):
        """``run``'s ``final_decode`` hook for ``req``: the final VAE decode joins the scheduler's batched decodes."""
        engine = self

        def hook(decode):
            def final_decode(latents):
                req._check()
                return engine._wait_for(_Call(req, (latents,), decode, req.plan.adapter, contextvars.copy_context(),
                                              False, 0, kind="decode"))

            return final_decode

        return hook

    def _wait_for(self, call: _Call):
        """Hand ``call`` to the scheduler and block the request's thread until it has run; its result or error."""
        with self._lock:
            self._waiting.append(call)
            self._lock.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _work(self, req: RequestHandle) -> None:
        from ..api import run

        outcome, result, error = "ok", None, None
        try:
            req._check()
            with interrupt_scope(req._check):  # a cancelled / expired request stops before its next block
                result = run(req.plan, model_call=self._hook(req), final_decode=self._decode_hook(req))
        except RequestCancelled as e:
            outcome, error = "cancelled", e
        except DeadlineExceeded as e:
            outcome, error = "deadline", e
        except BaseException as e:  # noqa: BLE001 - reported to the request's client, never swallowed
            outcome, error = "error", e
        with self._lock:
            self._active.discard(req)
            self._outcomes[outcome] += 1
            self._request_latency.observe(time.monotonic() - req.submitted)
            self._lock.notify_all()
        req._finish(result, error)
        del result, error  # the request's tensors are freed here, not while the interpreter exits
        with self._lock:  # listed until now: shutdown joins the thread (one still running at interpreter exit, a
            self._workers.discard(threading.current_thread())  # daemon inside a torch op, aborted the process)

    # ------------------------------------------------------------------------------------------ scheduler
    def _admit(self) -> None:
        now = time.monotonic()
        while self._queue and len(self._active) < self.config.max_active:
            req = self._queue.popleft()
            if req.deadline is not None and now > req.deadline:
                self._outcomes["deadline"] += 1
                req._finish(error=DeadlineExceeded(f"request {req.id} passed its deadline while queued"))
                continue
            req.status = "running"
            self._active.add(req)
            worker = threading.Thread(target=self._work, args=(req,), name=f"ralu-request-{req.id}", daemon=True)
            self._workers.add(worker)
            worker.start()

    def _ready(self) -> bool:
        if not self._waiting:
            return False
        if len(self._waiting) >= len(self._active):
            return True
        return time.monotonic() - min(c.arrived for c in self._waiting) >= self.config.gather_timeout_s

    def _take(self) -> list[_Call]:
        """Oldest request first, within the token budget (the first always)."""
        order = sorted(self._waiting, key=lambda c: (c.req.submitted, c.req.id))
        taken, total = [], 0
        for c in order:
            if taken and total + c.tokens > self.config.token_budget:
                continue
            taken.append(c)
            total += c.tokens
        ids = {id(c) for c in taken}
        self._waiting = [c for c in self._waiting if id(c) not in ids]
        return taken

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if not self._closing or self._queue:
                        self._admit()
                    for c in [c for c in self._waiting if c.req._cancel or (c.req.deadline is not None
                                                                            and time.monotonic() > c.req.deadline)]:
                        self._waiting.remove(c)
                        try:
                            c.req._check()
                        except BaseException as e:  # noqa: BLE001
                            c.error = e
                        c.done.set()
                    if self._ready():
                        break
                    if self._closing and not self._queue and not self._active:
                        self._closed.set()
                        return
                    self._lock.wait(self.config.gather_timeout_s if self._waiting else 0.05)
                calls = self._take()
            try:
                self._execute(calls)
            except BaseException as e:  # noqa: BLE001 - the scheduler thread must outlive any step's failure
                for c in calls:  # (an asynchronous CUDA error surfacing at the step's synchronize, ...): every
                    if not c.done.is_set():  # call of the step not yet answered gets the error; its request fails
                        c.error = e
                        c.done.set()

    def _decode(self, calls: list[_Call]) -> None:
        """Final VAE decodes, batched per latent shape (one decode call per group; results split per request)."""
        groups: dict[tuple, list[_Call]] = {}
        for c in calls:
            x = c.args[0]
            groups.setdefault((tuple(x.shape[1:]), x.dtype, str(x.device)), []).append(c)
        with torch.no_grad():
            for group in groups.values():
                if len(group) > 1:
                    try:
                        out = group[0].ctx.run(group[0].fn, torch.cat([c.args[0] for c in group]))
                        for c, part in zip(group, out.split([c.args[0].shape[0] for c in group])):
                            c.result = part
                        continue
                    except Exception:  # noqa: BLE001 - e.g. out of memory for the batch: decode one by one
                        pass
                    except BaseException as e:  # noqa: BLE001 - interrupted (KeyboardInterrupt, ...): every
                        for c in group:  # request of the batch fails with it, as its own decode would
                            c.error = e
                        continue
                for c in group:
                    try:
                        c.result = c.ctx.run(c.fn, *c.args)
                    except BaseException as e:  # noqa: BLE001
                        c.error = e
        with self._lock:
            self._decode_batches.observe(len(calls))
        for c in calls:
            c.done.set()

    def _execute(self, calls: list[_Call]) -> None:
        decodes = [c for c in calls if c.kind == "decode"]
        if decodes:
            self._decode(decodes)
            calls = [c for c in calls if c.kind != "decode"]
            if not calls:
                return
        t0 = time.perf_counter()
        packed = [c for c in calls if c.packable]
        # one packed call: all plain on one adapter (equal bound velocities share it), or all the same runner
        packed = [c for c in packed if c.fn == packed[0].fn]
        if len(packed) < 2:
            packed = []
        ids = {id(c) for c in packed}
        try:
            if packed:
                from ..adapters.base import VelocityCall

                runner = getattr(packed[0].fn, "packed", None)  # the installed backend's packed entry, if any
                vcalls = [VelocityCall(*c.args) for c in packed]
                reqs = [c.req for c in packed]
                # the packed call stops within one block once every request in it is cancelled or expired
                with torch.no_grad(), interrupt_scope(lambda: _all_stopped(reqs)):  # as generate: no grad
                    outs = runner(vcalls) if runner is not None else packed[0].adapter.packed_velocity(vcalls)
                for c, v in zip(packed, outs):
                    c.result = v
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, Exception) and not isinstance(e, (RequestCancelled, DeadlineExceeded)):
                # e.g. out of memory for the packed call, or one request's input: each call runs on its own below,
                # so only a request whose own call raises fails (as its generate alone would)
                packed, ids = [], set()
            for c in packed:  # interrupted: every request of the packed call gets the error
                c.error = e
                if isinstance(e, (RequestCancelled, DeadlineExceeded)):
                    try:
                        c.req._check()  # its own cancellation / deadline error
                    except BaseException as own:  # noqa: BLE001
                        c.error = own
        for c in calls:
            if id(c) not in ids:
                try:
                    with torch.no_grad():  # grad mode is per thread: as in the request's own generate
                        c.result = c.ctx.run(c.fn, *c.args)
                except BaseException as e:  # noqa: BLE001
                    c.error = e
        if calls and calls[0].args[0].device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        with self._lock:
            self._calls += 1
            self._packed_calls += bool(packed)
            self._step_latency.observe(dt)
            self._batch_tokens.observe(sum(c.tokens for c in calls))
            self._batch_requests.observe(len(calls))
        for c in calls:
            c.done.set()


_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines whose scheduler may still run (a running one is held by
# its own thread; a finished one is dropped)


def _stop_engines_at_exit() -> None:
    """At interpreter exit: shut every engine still running down without draining (queued requests rejected, running
    ones cancelled at their next model call) and wait for its threads, EXIT_TIMEOUT_S in all."""
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    for eng in [e for e in list(_LIVE) if not e.closed]:
        with eng._lock:
            left = len(eng._queue) + len(eng._active)
        if left:
            logging.getLogger("ralu.serving").warning(
                "interpreter exit: shutting an engine down, %d unfinished request(s) rejected or cancelled", left)
        eng.shutdown(drain=False, timeout=max(0.0, deadline - time.monotonic()))
        for thread in [eng._scheduler, *list(eng._workers)]:
            thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(_stop_engines_at_exit)
