"""The HTTP API over the serving engine (``ralu serve``): OpenAI-compatible image generation, health and metrics.

Endpoints (:func:`create_app`):

* ``POST /v1/images/generations``: the OpenAI images API's request and response shapes. JSON fields: ``prompt``
  (string, required), ``n`` (images, 1..``max_images``), ``size`` ("WIDTHxHEIGHT" or "auto"; default the model's
  default), ``response_format`` ("b64_json" only), ``model`` (must be the served model's name if given), ``user``
  (ignored); ralu's own: ``speedup`` (a preset name, "default", or "none" for the ordinary sampler), ``seed``,
  ``steps`` (baseline steps), ``guidance_scale``, ``negative_prompt``, ``solver``, ``cache``, ``region_source``,
  ``timeout`` (seconds until the request fails with 504). Unknown fields are refused. Response:
  ``{"created", "data": [{"b64_json": PNG}], "ralu": {"timings", "schedule", "seed"}}`` (the seed the server drew
  when the request gave none, so any image can be made again).
* ``GET /health``: 200 ``{"status": "ok", "model", "queue_depth", "active"}``; 503 with status "shutting_down".
* ``GET /metrics``: Prometheus text exposition of :meth:`Engine.metrics` (own registry) and HTTP responses by code.
* ``GET /v1/models``: the served model, as the OpenAI models API lists it.

Errors use the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON, unknown
fields, wrong types and out-of-range values (the engine checks a request's arguments with ``generate``'s own checks
before any work), 404 for another ``model``, 413 for a body over ``max_body_bytes``, 503 with ``Retry-After`` when
the queue is full or the server is shutting down, 504 when a request's deadline passes, 500 otherwise (logged
with its traceback on the server; the client gets one line).

A request handler never blocks the event loop: submission and PNG encoding run in worker threads, the result is
polled, and a client that disconnects while waiting has its engine request cancelled.

:class:`Server` runs an app on uvicorn with a graceful stop: new requests get 503 while the engine finishes what
it holds (``grace_s``), then the listener closes; a second SIGINT/SIGTERM stops at once.

Request parsing (:func:`parse_request`, :func:`read_body`), the error mapping (:func:`submit_error`,
:func:`result_error`, :func:`install_error_handlers`), the response bodies and the Prometheus collector are
module-level so that the Ray Serve ingress (:mod:`ralu_runtime.serving.ray`) serves the same API.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import re
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by tests/test_serving_http.py
    raise ImportError(f"the ralu HTTP server needs {_exc.name or 'fastapi, uvicorn and prometheus_client'}, which is "
                      "not installed: pip install -e '.[serve]' (fastapi, uvicorn, prometheus_client)") from _exc

from .engine import DeadlineExceeded, EngineBusy, EngineClosed, RequestCancelled

__all__ = ["create_app", "serve", "Server", "GENERATIONS_PATH", "REQUEST_FIELDS", "ApiError", "parse_request",
           "submit_error", "result_error", "generation_body", "models_body", "read_body", "install_error_handlers",
           "retry_after_s", "unavailable", "EngineCollector"]

logger = logging.getLogger("ralu.serve")

GENERATIONS_PATH = "/v1/images/generations"
MAX_BODY_BYTES = 1 << 20
MAX_IMAGES = 10                     # OpenAI's own limit for n
POLL_S = 0.01                       # how often a waiting handler looks at its request and its client
SEED_RANGE = 2**32                  # seeds the server draws (exact in every JSON client)

# request field -> (JSON type, generate() argument or None when the API layer handles it)
REQUEST_FIELDS = {
    "prompt": ("string", "prompt"), "n": ("integer", "num_images_per_prompt"), "size": ("string", None),
    "response_format": ("string", None), "model": ("string", None), "user": ("string", None),
    "speedup": ("string", "speedup"), "seed": ("integer", "seed"), "steps": ("integer", "num_inference_steps"),
    "guidance_scale": ("number", "guidance_scale"), "negative_prompt": ("string", "negative_prompt"),
    "solver": ("string", "solver"), "cache": ("string", "cache"), "region_source": ("string", "region_source"),
    "timeout": ("number", None),
}
# generate()'s (and the engine's) argument names in error messages -> the request field they come from
_PARAM_OF = {gen: name for name, (_, gen) in REQUEST_FIELDS.items() if gen} | {
    "height": "size", "width": "size", "deadline_s": "timeout"}
_PARAM_HINTS = (("preset", "speedup"), ("negative prompt", "negative_prompt"), ("tokenizer", "prompt"))
_SPEEDUP_NONE = ("none", "baseline", "off")


class ApiError(Exception):
    """An error response in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _param_of(message: str) -> str | None:
    """The request field an engine / generate error message is about (its earliest argument name)."""
    best = None
    for gen, field in _PARAM_OF.items():
        m = re.search(rf"\b{gen}\b", message)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), field)
    if best is not None:
        return best[1]
    low = message.lower()
    return next((field for word, field in _PARAM_HINTS if word in low), None)


def _check_type(name: str, value, kind: str) -> None:
    ok = {"string": isinstance(value, str),
          "integer": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
    if not ok:
        raise ApiError(400, f"{name}={json.dumps(value)} is not allowed: need {'an' if kind == 'integer' else 'a'} "
                            f"{kind}", param=name, code="invalid_type")


def _parse_size(size: str) -> tuple[int, int] | None:
    """"WIDTHxHEIGHT" -> (height, width); "auto" -> None (the model's default)."""
    if size == "auto":
        return None
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", size)
    if m is None:
        raise ApiError(400, f"size={size!r} is not allowed: use 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or "
                            "'auto'", param="size", code="invalid_value")
    return int(m.group(2)), int(m.group(1))


def parse_request(body: dict, *, model_name: str, max_images: int, default_deadline_s: float | None):
    """A request body -> ``(generate kwargs, deadline_s, seed)``; :class:`ApiError` for anything not allowed
    that the engine does not check itself (field names, JSON types, size syntax, response_format, model, n)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} (allowed: "
                            f"{', '.join(REQUEST_FIELDS)})", param=unknown[0], code="unknown_parameter")
    if body.get("prompt") is None:
        raise ApiError(400, "missing required field: prompt", param="prompt", code="missing_required_parameter")
    fields = {k: v for k, v in body.items() if v is not None}    # null means "not given", as OpenAI's clients send
    for name, value in fields.items():
        _check_type(name, value, REQUEST_FIELDS[name][0])
    fmt = fields.get("response_format", "b64_json")
    if fmt != "b64_json":
        why = (" ralu serve returns images inline and hosts no files to link to" if fmt == "url" else "")
        raise ApiError(400, f"response_format={fmt!r} is not supported:{why}; use 'b64_json'",
                       param="response_format", code="invalid_value")
    if "model" in fields and fields["model"] != model_name:
        raise ApiError(404, f"model {fields['model']!r} is not served here; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    n = fields.get("n", 1)
    if not 1 <= n <= max_images:
        raise ApiError(400, f"n={n} is not allowed: need an integer in [1, {max_images}]", param="n",
                       code="invalid_value")
    kwargs = {gen: fields[name] for name, (_, gen) in REQUEST_FIELDS.items() if gen and name in fields}
    kwargs["num_images_per_prompt"] = n
    if "speedup" in kwargs:
        value = kwargs["speedup"].strip().lower()
        kwargs["speedup"] = None if value in _SPEEDUP_NONE else value
    if "size" in fields:
        hw = _parse_size(fields["size"])
        if hw is not None:
            kwargs["height"], kwargs["width"] = hw
    if "seed" not in kwargs:
        kwargs["seed"] = secrets.randbelow(SEED_RANGE)
    deadline = default_deadline_s
    if "timeout" in fields:
        t = fields["timeout"]
        if not (math.isfinite(t) and t > 0):
            raise ApiError(400, f"timeout={t} is not allowed: need seconds > 0", param="timeout", code="invalid_value")
        deadline = t if deadline is None else min(t, deadline)
    return kwargs, deadline, kwargs["seed"]


def _png_b64(images) -> list[str]:
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


# ------------------------------------------------------------------ pieces shared with the Ray Serve ingress (ray.py)
def unavailable(why: str, retry_after: str) -> ApiError:
    """503 with ``Retry-After`` (a full queue, a server shutting down, no replica left)."""
    return ApiError(503, why, code="unavailable", headers={"Retry-After": retry_after})


def submit_error(exc: BaseException, retry_after) -> ApiError | None:
    """The error response for an exception :meth:`Engine.submit` raised: 400 for arguments ``generate`` refuses
    (ValueError / TypeError, with the request field it names), 503 for a full queue or a closing engine;
    None for anything else (a bug: the app's 500 handler). ``retry_after()``: the Retry-After seconds."""
    if isinstance(exc, (ValueError, TypeError)):
        msg = _one_line(exc)
        return ApiError(400, msg, param=_param_of(msg), code="invalid_value")
    if isinstance(exc, (EngineBusy, EngineClosed)):
        return unavailable(_one_line(exc), retry_after())
    return None


def result_error(exc: BaseException, deadline, retry_after) -> ApiError:
    """The error response for an exception a request's result raised: 504 past its deadline, 503 when the engine
    shut down first, 500 otherwise (one line; the caller logs the traceback)."""
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, f"{_one_line(exc)}: no result within the request's timeout ({deadline} s)",
                        param="timeout", code="deadline_exceeded")
    if isinstance(exc, (RequestCancelled, EngineClosed)):
        return unavailable("the server shut down before this request finished", retry_after())
    kind = getattr(exc, "type_name", None) or type(exc).__name__
    return ApiError(500, f"generation failed: {kind}: {_one_line(exc)}", code="internal_error")


def generation_body(b64_images: list[str], timings: dict, schedule: str | None, seed: int) -> dict:
    """The response body of a generation: OpenAI's ``created`` and ``data``, and ralu's timings, schedule, seed."""
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in b64_images],
            "ralu": {"timings": timings, "schedule": schedule, "seed": seed}}


def models_body(model_name: str, started: float) -> dict:
    """``GET /v1/models``: the served model, as the OpenAI models API lists it."""
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(started),
                                        "owned_by": "ralu"}]}


async def read_body(request: Request, max_body_bytes: int):
    """The request's JSON body; 413 over ``max_body_bytes`` (by Content-Length or while streaming), 400 when it is
    not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
        raise ApiError(413, f"request body of {int(length)} bytes is over the limit of {max_body_bytes}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise ApiError(413, f"request body is over the limit of {max_body_bytes} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {_one_line(exc)}", code="invalid_json") from None


def install_error_handlers(app) -> None:
    """OpenAI-shaped error responses on ``app``: ApiError, Starlette's 404 / 405, and 500 for anything else."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(exc.status_code, str(exc.detail), None, code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # pragma: no cover - a bug in this module
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error_response(500, f"internal server error ({type(exc).__name__}); see the server log",
                               code="internal_error")


class EngineCollector:
    """Prometheus collector reading :meth:`Engine.metrics` (and the app's HTTP response counts) at scrape time."""

    def __init__(self, engine, http_counts: dict, lock: threading.Lock):
        self.engine, self.http_counts, self.lock = engine, http_counts, lock

    @staticmethod
    def _histogram(name: str, doc: str, snap: dict) -> HistogramMetricFamily:
        buckets = [(repr(float(b)), c) for b, c in zip(snap["buckets"], snap["counts"])]
        buckets.append(("+Inf", snap["count"]))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=snap["sum"])

    def collect(self):
        m = self.engine.metrics()
        yield GaugeMetricFamily("ralu_queue_depth", "Requests waiting for a slot", value=m["queue_depth"])
        yield GaugeMetricFamily("ralu_active_requests", "Requests running", value=m["active"])
        yield GaugeMetricFamily("ralu_token_budget", "Tokens per packed model call", value=m["token_budget"])
        req = CounterMetricFamily("ralu_requests", "Finished or refused engine requests by outcome",
                                  labels=["outcome"])
        for outcome, count in m["requests"].items():
            req.add_metric([outcome], count)
        yield req
        yield CounterMetricFamily("ralu_model_calls", "Model calls the scheduler ran", value=m["model_calls"])
        yield CounterMetricFamily("ralu_packed_model_calls", "Model calls that packed several requests",
                                  value=m["packed_calls"])
        yield self._histogram("ralu_step_latency_seconds", "Seconds per scheduled model call",
                              m["step_latency_seconds"])
        yield self._histogram("ralu_request_latency_seconds", "Seconds from submission to result",
                              m["request_latency_seconds"])
        yield self._histogram("ralu_batch_tokens", "Tokens per scheduled model call", m["batch_tokens"])
        yield self._histogram("ralu_batch_requests", "Requests per scheduled model call", m["batch_requests"])
        http = CounterMetricFamily("ralu_http_responses", "HTTP responses by path and status code",
                                   labels=["path", "code"])
        with self.lock:
            for (path, code), count in sorted(self.http_counts.items()):
                http.add_metric([path, str(code)], count)
        yield http


class _CountResponses:
    """Pure ASGI middleware counting responses by (path, status) for /metrics (no BaseHTTPMiddleware: that one
    would hide client disconnects from the handlers)."""

    def __init__(self, app, counts: dict, lock: threading.Lock, paths):
        self.app, self.counts, self.lock, self.paths = app, counts, lock, set(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        path = path if path in self.paths else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                with self.lock:
                    key = (path, int(message["status"]))
                    self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


def retry_after_s(metrics: dict) -> str:
    """Seconds a refused client should wait, from an :meth:`Engine.metrics` snapshot: the mean request latency so
    far, 1..60."""
    snap = metrics["request_latency_seconds"]
    mean = snap["sum"] / snap["count"] if snap["count"] else 1.0
    return str(int(min(60, max(1, math.ceil(mean)))))


def _retry_after(engine) -> str:
    return retry_after_s(engine.metrics())


def create_app(engine, *, model_name: str, max_body_bytes: int = MAX_BODY_BYTES,
               default_deadline_s: float | None = None, max_images: int = MAX_IMAGES,
               shutdown_grace_s: float | None = 30.0) -> FastAPI:
    """The FastAPI app serving ``engine`` (a :class:`~ralu_runtime.serving.Engine` on an image model) as
    ``model_name``. ``max_body_bytes``: larger request bodies get 413. ``default_deadline_s``: seconds a request
    may take when it sets no ``timeout`` (and the most it may set); None: no limit. ``max_images``: the largest
    ``n``. ``shutdown_grace_s``: when the app's lifespan ends with requests still in the engine (an ASGI server
    other than :class:`Server`), how long it lets them finish before rejecting the rest."""
    if getattr(engine.adapter, "is_video", False):
        raise ValueError(f"{engine.adapter.family} makes videos; the images API serves image models")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes!r}: use a positive int")
    if default_deadline_s is not None and not default_deadline_s > 0:
        raise ValueError(f"default_deadline_s={default_deadline_s!r}: use seconds > 0, or None")

    @asynccontextmanager
    async def lifespan(app):
        yield
        if not engine.closed:
            app.state.closing = True
            await asyncio.to_thread(engine.shutdown, True, shutdown_grace_s)
            if not engine.closed:
                await asyncio.to_thread(engine.shutdown, False, 10.0)

    app = FastAPI(title="ralu", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = model_name
    app.state.closing = False
    app.state.started = time.time()
    counts, lock = {}, threading.Lock()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, counts, lock))
    app.state.registry = registry
    app.add_middleware(_CountResponses, counts=counts, lock=lock,
                       paths=(GENERATIONS_PATH, "/health", "/metrics", "/v1/models"))

    def closing() -> bool:
        return app.state.closing or engine.closed

    install_error_handlers(app)

    def retry_after() -> str:
        return _retry_after(engine)

    @app.post(GENERATIONS_PATH)
    async def generations(request: Request):
        body = await read_body(request, max_body_bytes)
        kwargs, deadline, seed = parse_request(body, model_name=model_name, max_images=max_images,
                                               default_deadline_s=default_deadline_s)
        if closing():
            raise unavailable("the server is shutting down: no new requests", retry_after())
        prompt = kwargs.pop("prompt")
        try:
            handle = await run_in_threadpool(engine.submit, prompt, deadline_s=deadline, output_type="pil",
                                             **kwargs)
        except Exception as exc:
            err = submit_error(exc, retry_after)
            if err is None:
                raise
            raise err from None
        checks = 0
        while not handle.done():
            await asyncio.sleep(POLL_S)
            checks += 1
            if checks % 5 == 0 and await request.is_disconnected():
                handle.cancel()
                logger.info("client left: request %s cancelled", handle.id)
                return Response(status_code=499)   # nginx's "client closed request": nobody reads it
        try:
            out = handle.result(0)
        except Exception as exc:  # noqa: BLE001 - one line for the client, the traceback in the log
            err = result_error(exc, deadline, retry_after)
            if err.status == 500:
                logger.error("request %s failed", handle.id, exc_info=exc)
            raise err from None
        data = await run_in_threadpool(_png_b64, out.images)
        schedule = out.schedule.name if out.schedule is not None else None
        return generation_body(data, out.timings, schedule, seed)

    @app.get("/health")
    async def health():
        m = engine.metrics()
        down = closing()
        return JSONResponse({"status": "shutting_down" if down else "ok", "model": model_name,
                             "queue_depth": m["queue_depth"], "active": m["active"]},
                            status_code=503 if down else 200)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return models_body(model_name, app.state.started)

    return app


# ------------------------------------------------------------------------------------------------ server
def _bind(host: str, port: int) -> socket.socket:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port={port!r}: use 0..65535 (0: a free port)")
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with ralu's stop: on the first signal (or :meth:`Server.request_stop`) new requests get
    503 while the engine drains; then uvicorn's own shutdown closes the listener. A second signal exits at once."""

    def __init__(self, config, owner: "Server"):
        super().__init__(config)
        self.owner = owner
        self._drain_task = None

    def handle_exit(self, sig, frame):
        if self.owner._stop.is_set():
            self.should_exit = self.force_exit = True
        else:
            self.owner._stop.set()

    async def on_tick(self, counter: int) -> bool:
        if self.owner._stop.is_set() and self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self):
        app, engine, grace = self.owner.app, self.owner.engine, self.owner.grace_s
        app.state.closing = True
        logger.info("stopping: no new requests; finishing %s running and %s queued (up to %s s)",
                    *(engine.metrics()[k] for k in ("active", "queue_depth")), grace)
        await asyncio.to_thread(engine.shutdown, True, grace)
        if not engine.closed:
            logger.warning("grace period over: rejecting the requests still in the engine")
            await asyncio.to_thread(engine.shutdown, False, 10.0)
        await asyncio.sleep(2 * POLL_S * 5)    # let waiting handlers see their results
        self.should_exit = True


class Server:
    """``app`` (from :func:`create_app`) on uvicorn, bound now to ``host:port`` (port 0: a free one; see
    :attr:`url`). :meth:`run` serves in this thread (SIGINT/SIGTERM stop it gracefully when it is the main
    thread); :meth:`start` serves in a background thread and :meth:`stop` stops it gracefully: new requests get
    503 while the engine finishes running and queued requests for up to ``grace_s`` seconds (the rest are
    rejected), then the listener closes."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, *, grace_s: float = 30.0,
                 log_level: str = "warning"):
        self.app, self.engine = app, app.state.engine
        self.grace_s = grace_s
        self._sock = _bind(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=10,
                                access_log=log_level in ("debug", "trace"))
        self._server = _Uvicorn(config, self)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until stopped (blocking)."""
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self._sock.close()

    def start(self, timeout: float = 60.0) -> "Server":
        """Serve in a daemon thread; returns once the server accepts requests."""
        self._thread = threading.Thread(target=self.run, name="ralu-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.request_stop()
                raise RuntimeError(f"the HTTP server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def request_stop(self) -> None:
        """Begin the graceful stop (returns at once)."""
        self._stop.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop gracefully and wait up to ``timeout`` seconds for the server thread; True when it has ended."""
        self.request_stop()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop(self.grace_s + 30)
        return False


def serve(engine, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          grace_s: float = 30.0, log_level: str = "warning", on_ready=None, **app_kwargs) -> None:
    """Serve ``engine`` over HTTP until SIGINT / SIGTERM (graceful: see :class:`Server`). ``model_name``: the
    name clients give as ``model`` (default: the model family); ``on_ready(url)`` is called once the port is
    bound; ``app_kwargs`` go to :func:`create_app`."""
    app = create_app(engine, model_name=model_name or engine.adapter.family, shutdown_grace_s=grace_s,
                     **app_kwargs)
    server = Server(app, host, port, grace_s=grace_s, log_level=log_level)
    if on_ready is not None:
        on_ready(server.url)
    server.run()
