"""The HTTP API over the serving engine (``ralu serve``): OpenAI-compatible image generation, health and metrics.

Endpoints (:func:`create_app`):

* ``POST /v1/images/generations``: the OpenAI images API's request and response shapes. JSON fields: ``prompt``
  (string, required), ``n`` (images, 1..``max_images``), ``size`` ("WIDTHxHEIGHT" or "auto"; default the model's
  default), ``response_format`` ("b64_json" only), ``model`` (must be the served model's name if given), ``user``
  (ignored); ralu's own: ``speedup`` (a preset name, "default", or "none" for the ordinary sampler), ``seed``,
  ``steps`` (baseline steps), ``guidance_scale``, ``negative_prompt``, ``solver``, ``cache``, ``region_source``,
  ``timeout`` (seconds until the request fails with 504), ``output_format`` (png, jpeg, webp) and
  ``output_compression`` (0..100: the JPEG / WebP quality); ``quality``, ``style``, ``background`` and
  ``moderation`` are accepted and ignored. Unknown fields are refused. Response: ``{"created", "data":
  [{"b64_json"}], "output_format", "ralu": {"timings", "schedule", "seed"}}`` (the seed the server drew when the
  request gave none, so any image can be made again).
* ``POST /v1/images/edits``: OpenAI's image edits (multipart/form-data: ``image``, optional ``mask``, the fields
  above and ``strength``) on FLUX.1 / SD3 models, through the same engine; uploads are read and checked by
  :mod:`ralu_runtime.serving.edits` (``max_upload_bytes``: 413 beyond; ``max_upload_pixels``) before any engine
  work.
* ``GET /health`` (open without an API key): 200 ``{"status": "ok", "model", "queue_depth", "active"}``; from a
  stop signal until the process ends 503 with status "shutting_down", an OpenAI-shaped ``error`` and Retry-After.
* ``GET /metrics``: Prometheus text exposition of :meth:`Engine.metrics` (own registry) and HTTP responses by code.
* ``GET /v1/models``: the served model, as the OpenAI models API lists it; ``GET /v1/models/{id}``: it, or 404.

Who may call (:class:`~ralu_runtime.serving.protocol.AccessPolicy`, checked before any route): with API keys every
path but ``/health`` needs ``Authorization: Bearer KEY`` (401); the ``Host`` header must name this server (421:
DNS rebinding); a request with an ``Origin`` not in ``cors_origins`` may only GET (403: web pages); bodies must
be ``application/json`` (415; multipart forms on the edits path only). :class:`Server` refuses a non-loopback
address without a key unless ``insecure``.

Errors use the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON, unknown
fields, wrong types and out-of-range values (the engine checks a request's arguments with ``generate``'s own checks
before any work), 404 for another ``model``, 413 for a body over ``max_body_bytes``, 503 with ``Retry-After`` when
the queue is full or the server is shutting down, 504 when a request's deadline passes, 500 otherwise (logged
with its traceback on the server; the client gets one line).

A request handler never blocks the event loop: submission and PNG encoding run in worker threads, the handler awaits
the request's done callback (:meth:`RequestHandle.add_done_callback`) or its client's disconnect, whichever comes
first, and a client that disconnects while waiting has its engine request cancelled.

:class:`Server` runs an app on uvicorn with a graceful stop: new requests get 503 while the engine finishes what
it holds (``grace_s``), then the listener closes; a second SIGINT/SIGTERM stops at once. Its connections are bounded
(:class:`ConnectionLimits`): time to send the request head and the body, idle keep-alive time, header size and
the number of open connections.

Request parsing, the error mapping, the response bodies and the Prometheus collector are in
:mod:`ralu_runtime.serving.protocol`, shared with the Ray Serve ingress (:mod:`ralu_runtime.serving.ray`).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

try:
    import h11
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from starlette.concurrency import run_in_threadpool
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by tests/test_serving_http.py
    raise ImportError(f"the ralu HTTP server needs {_exc.name or 'fastapi, uvicorn and prometheus_client'}, which is "
                      "not installed: pip install -e '.[serve]' (fastapi, uvicorn, prometheus_client)") from _exc

from .edits import (EDITS_PATH, MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, channel_model, check_family, parse_edit,
                    parse_form, read_raw)
from .engine import DeadlineExceeded
from .logs import quiet_library_logs
from .protocol import (DEFAULT_REQUEST_TIMEOUT_S, GENERATIONS_PATH, MAX_BODY_BYTES, MAX_IMAGES, AccessPolicy,
                       ApiError, CountResponses, EngineCollector, Guard, encode_images, generation_body, install_error_handlers,
                       is_loopback, model_or_404, models_body, parse_request, read_body, result_error, retry_after_s,
                       shutting_down_health, submit_error, unavailable)

__all__ = ["create_app", "serve", "Server", "ConnectionLimits", "bind_socket", "EDITS_PATH", "GENERATIONS_PATH"]

logger = logging.getLogger("ralu.serve")


def _retry_after(engine) -> str:
    return retry_after_s(engine.metrics())


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the ASGI server's ``http.disconnect``; the body was read before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# Past a request's deadline the engine answers 504 itself at its next check (before a model call, a decode); when
# it is inside one long step (a VAE encode of a large image...), the HTTP answer waits this much more, then
# answers 504 without it (the engine drops the request at its next check).
DEADLINE_GRACE_S = 1.0


async def _finished_or_client_gone(handle, request: Request, deadline_s: float | None = None) -> str:
    """Wait until the engine request ``handle`` finishes ("done"), its client disconnects first ("gone"), or
    ``deadline_s`` seconds (from now) plus :data:`DEADLINE_GRACE_S` pass ("late"), without polling: the engine's
    done callback wakes this coroutine from the engine's thread."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake(_handle):
        try:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
        except RuntimeError:  # the event loop has closed (server stopped): nobody waits any more
            pass

    handle.add_done_callback(wake)
    gone = asyncio.ensure_future(_client_gone(request))
    timeout = None if deadline_s is None else deadline_s + DEADLINE_GRACE_S
    try:
        await asyncio.wait({done, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if done.done():
        return "done"
    return "gone" if gone.done() and not gone.cancelled() else "late"


def create_app(engine, *, model_name: str, max_body_bytes: int = MAX_BODY_BYTES,
               default_deadline_s: float | None = DEFAULT_REQUEST_TIMEOUT_S, max_images: int = MAX_IMAGES,
               shutdown_grace_s: float | None = 30.0, api_keys=(), allowed_hosts=(), cors_origins=(),
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_upload_pixels: int = MAX_UPLOAD_PIXELS) -> FastAPI:
    """The FastAPI app serving ``engine`` (a :class:`~ralu_runtime.serving.Engine` on an image model) as
    ``model_name``. ``max_body_bytes``: larger JSON request bodies get 413; ``max_upload_bytes``: larger
    ``/v1/images/edits`` forms get 413; ``max_upload_pixels``: larger uploaded images get 400.
    ``default_deadline_s``: seconds a request
    may take when it sets no ``timeout`` (and the most it may set; default 600); None: no limit. ``max_images``:
    the largest ``n``. ``shutdown_grace_s``: when the app's lifespan ends with requests still in the engine (an
    ASGI server other than :class:`Server`), how long it lets them finish before rejecting the rest.
    ``api_keys``, ``allowed_hosts``, ``cors_origins``: the :class:`~ralu_runtime.serving.protocol.AccessPolicy`
    (``app.state.policy``; :class:`Server` adds the names of the address it binds)."""
    if getattr(engine.adapter, "is_video", False):
        raise ValueError(f"{engine.adapter.family} makes videos; the images API serves image models")
    for name, value in (("max_body_bytes", max_body_bytes), ("max_upload_bytes", max_upload_bytes),
                        ("max_upload_pixels", max_upload_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: use a positive int")
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
    policy = AccessPolicy(api_keys=api_keys, allowed_hosts=set(allowed_hosts), cors_origins=tuple(cors_origins))
    app.state.policy = policy
    app.add_middleware(Guard, policy=policy)     # inside the counter: refused requests are counted too
    app.add_middleware(CountResponses, counts=counts, lock=lock,
                       paths=(GENERATIONS_PATH, EDITS_PATH, "/health", "/metrics", "/v1/models"))

    def closing() -> bool:
        return app.state.closing or engine.closed

    install_error_handlers(app)

    def retry_after() -> str:
        return _retry_after(engine)

    async def answer(request: Request, kwargs: dict, deadline, seed, encoding):
        """Submit ``kwargs`` to the engine, wait for the result (or the client's hang-up), encode the images."""
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
        waited = await _finished_or_client_gone(handle, request, deadline)
        if waited == "gone":
            handle.cancel()
            logger.info("client left: request %s cancelled", handle.id)
            return Response(status_code=499)   # nginx's "client closed request": nobody reads it
        try:
            if waited == "late":  # the engine is inside one long step: answer now, it drops the request later
                raise DeadlineExceeded(f"request {handle.id} passed its deadline")
            out = handle.result(0)
        except Exception as exc:  # noqa: BLE001 - one line for the client, the traceback in the log
            err = result_error(exc, deadline, retry_after)
            if err.status == 500:
                logger.error("request %s failed", handle.id, exc_info=exc)
            raise err from None
        data = await run_in_threadpool(encode_images, out.images, encoding)
        schedule = out.schedule.name if out.schedule is not None else None
        return generation_body(data, out.timings, schedule, seed, encoding.format)

    upload = {"control": "a control image (Canny or depth map) with every request: POST it to "
                         f"{EDITS_PATH} as image",
              "fill": f"an image and a mask with every request: POST them to {EDITS_PATH} as image and mask"}

    @app.post(GENERATIONS_PATH)
    async def generations(request: Request):
        adapter = engine.adapter
        kind = channel_model(adapter)
        if kind is not None:  # refused before the body is read: no JSON request can carry what it needs
            raise ApiError(400, f"the served model ({type(adapter.pipe).__name__}) needs {upload[kind]}",
                           param="image", code="missing_required_parameter")
        body = await read_body(request, max_body_bytes)
        parsed = parse_request(body, model_name=model_name, max_images=max_images,
                               default_deadline_s=default_deadline_s)
        return await answer(request, *parsed)

    @app.post(EDITS_PATH)
    async def edits(request: Request):
        check_family(engine.adapter)
        raw = await read_raw(request, max_upload_bytes)
        fields, files = await parse_form(request.headers, raw)
        parsed = await run_in_threadpool(parse_edit, fields, files, model_name=model_name, max_images=max_images,
                                         default_deadline_s=default_deadline_s, max_pixels=max_upload_pixels,
                                         control=channel_model(engine.adapter) == "control")
        return await answer(request, *parsed)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers probing without a body
    async def health():
        m = engine.metrics()
        body = {"status": "ok", "model": model_name, "queue_depth": m["queue_depth"], "active": m["active"]}
        if not closing():
            return JSONResponse(body)
        return shutting_down_health(body, retry_after())

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return models_body(model_name, app.state.started)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return model_or_404(model_id, model_name, app.state.started)

    return app


# ------------------------------------------------------------------------------------------------ server
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); OSError when the port is taken or the address
    is not this machine's (so a command can say so before it loads a model)."""
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


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on each connection of :class:`Server`. ``header_timeout_s``: from a connection's first byte of a
    request (or its opening) to the end of the request head (slow or stalled heads are closed, with 408 when
    nothing else was sent); ``body_timeout_s``: from the end of the head to the end of the body; ``keep_alive_s``:
    idle time between requests; ``max_header_bytes``: the request head (400 beyond); ``max_connections``: open
    connections (503 to the ones beyond, at once)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 256

    def __post_init__(self):
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: use seconds > 0")
        for name in ("max_header_bytes", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: use an int >= 1")


def _raw_error(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    """A whole HTTP/1.1 error response in the OpenAI shape, written before (or instead of) any ASGI cycle."""
    import json

    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "server_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n").encode("ascii") + body


LINGER_S = 2.0  # seconds a connection refused mid-request is read (and discarded) after its error response


class _BoundedH11(H11Protocol):
    """uvicorn's h11 protocol with read deadlines and a connection cap (uvicorn has neither: a client sending a
    partial request head holds its connection forever). Settings: ``config.ralu_limits``."""

    _last_refusal_log = -1e9

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._limits: ConnectionLimits = self.config.ralu_limits
        self._timer = None
        self._phase = None
        if len(self.connections) > self._limits.max_connections:
            now = time.monotonic()
            if now - _BoundedH11._last_refusal_log > 10.0:     # one line per 10 s under a flood
                _BoundedH11._last_refusal_log = now
                logger.warning("connections refused: %d are open (--max-connections)", len(self.connections) - 1)
            self._close(_raw_error(503, "Service Unavailable", "too many open connections: retry later",
                                   "unavailable", "retry-after: 1\r\n"))
            return
        self._arm("head")

    def _arm(self, phase: str) -> None:
        self._disarm()
        self._phase = phase
        delay = self._limits.header_timeout_s if phase == "head" else self._limits.body_timeout_s
        self._timer = self.loop.call_later(delay, self._expired, phase)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _close(self, data: bytes = b"", linger: bool = False) -> None:
        """Write ``data`` (an error response) and close. ``linger``: for a client that may still be sending (a head
        refused mid-way), half-close and read what it sends, discarded, for up to LINGER_S before closing: closing
        with unread bytes makes the kernel reset the connection, and the client loses the response."""
        self._disarm()
        if not self.transport.is_closing():
            if data:
                self.transport.write(data)
            if linger and self.transport.can_write_eof():
                self.transport.write_eof()
                self._lingering = True
                self._timer = self.loop.call_later(LINGER_S, self.transport.close)
                return
            self.transport.close()

    def _expired(self, phase: str) -> None:
        self._timer = None
        if phase == "head":
            logger.info("closed a connection that sent no whole request head within %s s",
                        self._limits.header_timeout_s)
            self._close(_raw_error(408, "Request Timeout", "the request head did not arrive in time",
                                   "request_timeout"))
        else:   # the app is reading the body: closing makes it see the client gone (one log line there)
            logger.info("closed a connection whose request body did not arrive within %s s",
                        self._limits.body_timeout_s)
            self._close()

    def _sync(self) -> None:
        """Follow the request's progress: the head deadline until the head is in, then the body deadline."""
        if getattr(self, "_lingering", False):  # its close is timed already
            return
        if self.transport.is_closing():
            return self._disarm()
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        elif state is h11.IDLE:
            if self._phase is None and self.conn.trailing_data[0]:
                self._arm("head")       # part of a next (pipelined) request is waiting
        else:
            self._disarm()

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_lingering", False):   # an error was sent: drain what the client still sends
            return
        if self.conn.their_state is h11.IDLE:
            if self._phase is None:
                self._arm("head")
            if self._head_too_large(data):
                logger.info("refused a request head over %d bytes", self._limits.max_header_bytes)
                return self._close(_raw_error(400, "Bad Request", f"the request head is over "
                                              f"{self._limits.max_header_bytes} bytes", "request_head_too_large"),
                                   linger=True)
        super().data_received(data)
        self._sync()

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the request head now arriving (``data`` and what came of it before) exceeds max_header_bytes.
        h11's own bound (``h11_max_incomplete_event_size``) holds only while a head is incomplete in its buffer: a
        larger head that arrives whole in one read was taken."""
        seen, tail = getattr(self, "_head_seen", 0), getattr(self, "_head_tail", b"")
        buf = tail + data
        end = buf.find(b"\r\n\r\n")
        size = seen - len(tail) + (end + 4 if end >= 0 else len(buf))
        if end >= 0:                        # the head ends in this read: the next one starts afresh
            self._head_seen, self._head_tail = 0, b""
        else:
            self._head_seen, self._head_tail = seen + len(data), buf[-3:]
        return size > self._limits.max_header_bytes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._close(_raw_error(400, "Bad Request", f"{msg} (malformed, or a request head over "
                                                   f"{self._limits.max_header_bytes} bytes)", "invalid_request"),
                    linger=True)


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
            self.owner.request_stop()

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
        await asyncio.sleep(0.1)   # handlers woken by their requests' done callbacks start writing their responses
        self.should_exit = True


class Server:
    """``app`` (from :func:`create_app`) on uvicorn, bound now to ``host:port`` (port 0: a free one; see
    :attr:`url`), or on ``sock`` (from :func:`bind_socket`). :meth:`run` serves in this thread (SIGINT/SIGTERM stop
    it gracefully when it is the main thread); :meth:`start` serves in a background thread and :meth:`stop` stops
    it gracefully: new requests get 503 while the engine finishes running and queued requests for up to ``grace_s``
    seconds (the rest are rejected), then the listener closes.

    A non-loopback address without API keys (``create_app(api_keys=...)``) is refused (ValueError) unless
    ``insecure``. ``limits``: :class:`ConnectionLimits`. ``log_prompts``: leave the libraries' warnings that quote
    prompts as they are (default: redacted, see :mod:`ralu_runtime.serving.logs`)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, *, grace_s: float = 30.0,
                 log_level: str = "warning", sock: socket.socket | None = None, insecure: bool = False,
                 limits: ConnectionLimits | None = None, log_prompts: bool = False):
        self.app, self.engine = app, app.state.engine
        self.grace_s = grace_s
        policy = app.state.policy
        if not insecure and not policy.api_keys and not is_loopback(host):
            raise ValueError(f"listening on {host} (not a loopback address) without an API key would let anyone who "
                             "can reach it use this server: give API keys (--api-key / RALU_API_KEY), or insecure="
                             "True (--insecure) to do it anyway")
        self._sock = sock if sock is not None else bind_socket(host, port)
        policy.allow_bound_host(host)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.limits = limits or ConnectionLimits()
        quiet_library_logs(log_prompts)
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=10,
                                access_log=log_level in ("debug", "trace"), http=_BoundedH11,
                                timeout_keep_alive=self.limits.keep_alive_s,
                                h11_max_incomplete_event_size=self.limits.max_header_bytes)
        config.ralu_limits = self.limits
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
        """Begin the graceful stop (returns at once): from now on new requests and ``/health`` get 503."""
        self.app.state.closing = True
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
          grace_s: float = 30.0, log_level: str = "warning", on_ready=None, sock: socket.socket | None = None,
          insecure: bool = False, limits: ConnectionLimits | None = None, log_prompts: bool = False,
          **app_kwargs) -> None:
    """Serve ``engine`` over HTTP until SIGINT / SIGTERM (graceful: see :class:`Server`). ``model_name``: the
    name clients give as ``model`` (default: the model family); ``on_ready(url)`` is called once the port is
    bound; ``sock``, ``insecure``, ``limits``, ``log_prompts``: as :class:`Server`'s; ``app_kwargs`` go to
    :func:`create_app`."""
    app = create_app(engine, model_name=model_name or engine.adapter.family, shutdown_grace_s=grace_s,
                     **app_kwargs)
    server = Server(app, host, port, grace_s=grace_s, log_level=log_level, sock=sock, insecure=insecure,
                    limits=limits, log_prompts=log_prompts)
    if on_ready is not None:
        on_ready(server.url)
    server.run()
