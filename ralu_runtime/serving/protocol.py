"""The OpenAI images API as ralu serves it, shared by both front-ends: the single-process HTTP server
(:mod:`ralu_runtime.serving.http`) and the Ray Serve ingress (:mod:`ralu_runtime.serving.ray`).

Request parsing (:func:`parse_request`, :func:`read_body`), the mapping of engine errors to OpenAI-shaped error
responses (:class:`ApiError`, :func:`submit_error`, :func:`result_error`, :func:`unavailable`,
:func:`install_error_handlers`), the response bodies (:func:`generation_body`, :func:`models_body`, :func:`png_b64`),
the metrics pieces (:class:`EngineCollector` for Prometheus, :class:`CountResponses` counting responses by path
and status, :func:`retry_after_s`), and who may call (:class:`AccessPolicy` and the :class:`Guard` middleware: API
keys, the ``Host`` header, ``Origin`` / CORS, body media types). See :mod:`ralu_runtime.serving.http` for the
endpoints and error codes.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass

try:
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response
    from starlette.requests import ClientDisconnect
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess by tests/test_serving_http.py
    raise ImportError(f"the ralu HTTP server needs {_exc.name or 'fastapi and prometheus_client'}, which is not "
                      "installed: pip install -e '.[serve]' (fastapi, uvicorn, prometheus_client)") from _exc

from ..limits import MAX_GUIDANCE_SCALE, MAX_SEED, MAX_STEPS, MAX_TIMEOUT_S
from ..text import lone_surrogate
from .access import AccessPolicy, is_loopback, parse_api_keys
from .engine import DeadlineExceeded, EngineBusy, EngineClosed, RequestCancelled

__all__ = ["GENERATIONS_PATH", "EDITS_PATH", "MAX_BODY_BYTES", "MAX_IMAGES", "REQUEST_FIELDS", "IGNORED_FIELDS",
           "RANGES", "DEFAULT_REQUEST_TIMEOUT_S", "AccessPolicy", "ApiError", "ClientGone", "CountResponses",
           "Encoding", "EngineCollector", "Guard", "encode_images", "error_response", "generation_body",
           "install_error_handlers", "is_loopback", "model_body", "models_body", "one_line", "parse_api_keys",
           "parse_request", "png_b64", "read_body", "read_bytes", "result_error", "retry_after_s",
           "shutting_down_health", "submit_error", "unavailable"]

logger = logging.getLogger("ralu.serve")

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"     # multipart uploads: ralu_runtime.serving.edits
MAX_BODY_BYTES = 1 << 20
MAX_IMAGES = 10                     # OpenAI's own limit for n
SEED_RANGE = 2**32                  # seeds the server draws (exact in every JSON client)
DEFAULT_REQUEST_TIMEOUT_S = 600.0   # a request's deadline when it sets none (and the most it may set)


# request field -> (JSON type, generate() argument or None when the API layer handles it)
REQUEST_FIELDS = {
    "prompt": ("string", "prompt"), "n": ("integer", "num_images_per_prompt"), "size": ("string", None),
    "response_format": ("string", None), "model": ("string", None), "user": ("string", None),
    "speedup": ("string", "speedup"), "seed": ("integer", "seed"), "steps": ("integer", "num_inference_steps"),
    "guidance_scale": ("number", "guidance_scale"), "negative_prompt": ("string", "negative_prompt"),
    "solver": ("string", "solver"), "cache": ("string", "cache"), "region_source": ("string", "region_source"),
    "timeout": ("number", None), "output_format": ("string", None), "output_compression": ("integer", None),
    "quality": ("string", None), "style": ("string", None), "background": ("string", None),
    "moderation": ("string", None),
}
# OpenAI fields accepted and ignored: they have no meaning for these models (documented in docs/serving.md)
IGNORED_FIELDS = ("quality", "style", "background", "moderation")
# numeric fields: (lowest, highest) allowed, both included (n: up to the server's max_images)
RANGES = {"n": (1, MAX_IMAGES), "seed": (0, MAX_SEED), "steps": (1, MAX_STEPS),
          "guidance_scale": (0.0, MAX_GUIDANCE_SCALE), "timeout": (0.001, MAX_TIMEOUT_S),
          "output_compression": (0, 100),
          "strength": (0.0, 1.0)}
OPEN_BELOW = {"strength"}  # fields whose RANGES low end is excluded (strength 0 would leave the image as it is)
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# generate()'s (and the engine's) argument names in error messages -> the request field they come from
_PARAM_OF = {gen: name for name, (_, gen) in REQUEST_FIELDS.items() if gen} | {
    "height": "size", "width": "size", "deadline_s": "timeout", "strength": "strength", "image": "image",
    "mask_image": "mask"}
_PARAM_HINTS = (("preset", "speedup"), ("negative prompt", "negative_prompt"), ("tokenizer", "prompt"))
_SPEEDUP_NONE = ("none", "baseline", "off")


class ApiError(Exception):
    """An error response in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    """A JSON response in the OpenAI error shape ``{"error": {message, type, param, code}}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")   # no lone surrogate reaches the encoder
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
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


def _shown(value) -> str:
    """A request value for an error message: scalars as JSON (cut at 60 characters), arrays and objects by kind."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_type(name: str, value, kind: str) -> None:
    ok = {"string": isinstance(value, str),
          "integer": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
    if not ok:
        raise ApiError(400, f"{name}={_shown(value)} is not allowed: need {'an' if kind == 'integer' else 'a'} "
                            f"{kind}", param=name, code="invalid_type")


def _check_range(name: str, value, lo, hi) -> None:
    above = name in OPEN_BELOW  # the lowest value itself is not allowed
    if not (isinstance(value, int) or math.isfinite(value)) or not (lo < value if above else lo <= value) \
            or not value <= hi:
        raise ApiError(400, f"{name}={_shown(value)} is not allowed: need a value in {'(' if above else '['}{lo}, "
                            f"{hi}]", param=name, code="invalid_value")


def _parse_size(size: str) -> tuple[int, int] | None:
    """"WIDTHxHEIGHT" -> (height, width); "auto" -> None (the model's default)."""
    if size == "auto":
        return None
    m = re.fullmatch(r" *([0-9]{1,6}) *[xX] *([0-9]{1,6}) *", size)  # ASCII digits and spaces only
    if m is None:
        raise ApiError(400, f"size={size!r} is not allowed: use 'WIDTHxHEIGHT' in pixels (e.g. '1024x1024') or "
                            "'auto'", param="size", code="invalid_value")
    return int(m.group(2)), int(m.group(1))


@dataclass(frozen=True)
class Encoding:
    """How a response's images are written: ``format`` (png, jpeg, webp) and ``quality`` (0..100, jpeg / webp)."""

    format: str = "png"
    quality: int = 100


def parse_request(body: dict, *, model_name: str, max_images: int, default_deadline_s: float | None,
                  fields: dict = REQUEST_FIELDS):
    """A request body -> ``(generate kwargs, deadline_s, seed, Encoding)``; :class:`ApiError` for anything not
    allowed that the engine does not check itself (field names, JSON types, text that is not Unicode, numbers out
    of :data:`RANGES`, size syntax, response_format, output_format, model, n). ``fields``: the allowed fields
    (:data:`REQUEST_FIELDS`; the edits endpoint adds its own)."""
    allowed = fields
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")
    bad_keys = [k for k in body if lone_surrogate(k) is not None]
    if bad_keys:
        raise ApiError(400, "a field name is not valid Unicode (a lone surrogate)", code="invalid_value")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        shown = ", ".join(_shown(k) for k in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise ApiError(400, f"unknown field{'s' if len(unknown) > 1 else ''}: {shown} (allowed: "
                            f"{', '.join(allowed)})", param=unknown[0][:60], code="unknown_parameter")
    if body.get("prompt") is None:
        raise ApiError(400, "missing required field: prompt", param="prompt", code="missing_required_parameter")
    fields = {k: v for k, v in body.items() if v is not None}    # null means "not given", as OpenAI's clients send
    for name, value in fields.items():
        _check_type(name, value, allowed[name][0])
        if isinstance(value, str) and lone_surrogate(value) is not None:
            raise ApiError(400, f"{name} is not valid Unicode text (it holds a lone surrogate)", param=name,
                           code="invalid_value")
        if name in RANGES:
            lo, hi = (1, max_images) if name == "n" else RANGES[name]
            _check_range(name, value, lo, hi)
    fmt = fields.get("response_format", "b64_json")
    if fmt != "b64_json":
        why = (": ralu serve returns images inline and hosts no files to link to" if fmt.lower() == "url" else "")
        raise ApiError(400, f"response_format={_shown(fmt)} is not supported{why}; use 'b64_json'",
                       param="response_format", code="invalid_value")
    out_fmt = fields.get("output_format", "png").lower()
    if out_fmt not in OUTPUT_FORMATS:
        raise ApiError(400, f"output_format={_shown(fields['output_format'])} is not allowed: use "
                            f"{', '.join(OUTPUT_FORMATS)}", param="output_format", code="invalid_value")
    encoding = Encoding(out_fmt, fields.get("output_compression", 100))
    if "model" in fields and fields["model"] != model_name:
        raise ApiError(404, f"model {_shown(fields['model'])} is not served here; this server serves "
                            f"{model_name!r}", param="model", code="model_not_found")
    kwargs = {gen: fields[name] for name, (_, gen) in allowed.items() if gen and name in fields}
    kwargs["num_images_per_prompt"] = fields.get("n", 1)
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
        deadline = t if deadline is None else min(t, deadline)
    return kwargs, deadline, kwargs["seed"], encoding


def encode_images(images, encoding: Encoding = Encoding()) -> list[str]:
    """PIL images -> base64 strings in ``encoding`` (the ``b64_json`` of a generation): PNG (lossless; quality
    ignored), JPEG or WebP at ``encoding.quality``."""
    out = []
    for img in images:
        buf = io.BytesIO()
        if encoding.format == "png":
            img.save(buf, format="PNG")
        else:
            if img.mode not in ("RGB", "L"):
                img = img.convert("RGB")
            img.save(buf, format=OUTPUT_FORMATS[encoding.format], quality=int(encoding.quality))
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def png_b64(images) -> list[str]:
    """PIL images -> base64 PNG strings."""
    return encode_images(images)


def unavailable(why: str, retry_after: str) -> ApiError:
    """503 with ``Retry-After`` (a full queue, a server shutting down, no replica left)."""
    return ApiError(503, why, code="unavailable", headers={"Retry-After": retry_after})


def shutting_down_health(body: dict, retry_after: str) -> JSONResponse:
    """``/health`` of a server that is stopping: 503 with Retry-After, ``status`` "shutting_down" and the OpenAI
    ``error`` object new requests get."""
    error = {"message": "the server is shutting down: no new requests", "type": "server_error", "param": None,
             "code": "unavailable"}
    return JSONResponse({**body, "status": "shutting_down", "error": error}, status_code=503,
                        headers={"Retry-After": retry_after})


def submit_error(exc: BaseException, retry_after) -> ApiError | None:
    """The error response for an exception :meth:`Engine.submit` raised: 400 for arguments ``generate`` refuses
    (ValueError / TypeError, with the request field it names), 503 for a full queue or a closing engine;
    None for anything else (a bug: the app's 500 handler). ``retry_after()``: the Retry-After seconds."""
    if isinstance(exc, (ValueError, TypeError)):
        msg = one_line(exc)
        if ", or raise it with limits=" in msg:  # generate's advice to a Python caller; a client cannot raise it
            msg = msg.split(", or raise it with limits=")[0] + " (a bound of this server: ralu serve --max-token-steps)"
        param = _param_of(msg)
        return ApiError(400, msg, param=param, code="invalid_mask" if param == "mask" else "invalid_value")
    if isinstance(exc, (EngineBusy, EngineClosed)):
        return unavailable(one_line(exc), retry_after())
    return None


def result_error(exc: BaseException, deadline, retry_after) -> ApiError:
    """The error response for an exception a request's result raised: 504 past its deadline, 503 when the engine
    shut down first, 500 otherwise (one line; the caller logs the traceback)."""
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, f"{one_line(exc)}: no result within the request's timeout ({deadline} s)",
                        param="timeout", code="deadline_exceeded")
    if isinstance(exc, (RequestCancelled, EngineClosed)):
        return unavailable("the server shut down before this request finished", retry_after())
    kind = getattr(exc, "type_name", None) or type(exc).__name__
    return ApiError(500, f"generation failed: {kind}: {one_line(exc)}", code="internal_error")


def generation_body(b64_images: list[str], timings: dict, schedule: str | None, seed: int,
                    output_format: str = "png") -> dict:
    """The response body of a generation: OpenAI's ``created``, ``data`` and ``output_format``, and ralu's timings,
    schedule, seed."""
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in b64_images],
            "output_format": output_format, "ralu": {"timings": timings, "schedule": schedule, "seed": seed}}


def model_body(model_name: str, started: float) -> dict:
    """The served model as the OpenAI models API describes one (``GET /v1/models/{id}``)."""
    return {"id": model_name, "object": "model", "created": int(started), "owned_by": "ralu"}


def models_body(model_name: str, started: float) -> dict:
    """``GET /v1/models``: the served model, as the OpenAI models API lists it."""
    return {"object": "list", "data": [model_body(model_name, started)]}


def model_or_404(model_id: str, model_name: str, started: float) -> dict:
    """``GET /v1/models/{id}``: the served model, or 404 in the OpenAI shape for any other id."""
    if model_id != model_name:
        raise ApiError(404, f"model {_shown(model_id)} is not served here; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    return model_body(model_name, started)


class ClientGone(Exception):
    """The client hung up before its request body arrived (logged as one line; nobody reads the answer)."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class _DuplicateKey(ValueError):
    """A JSON object names a key twice (the body is refused: a proxy that checked the first value and a server that
    used the last would disagree about the request)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


async def read_bytes(request: Request, max_bytes: int, *, limit: str = "limit", what: str = "request body") -> bytes:
    """The request's body bytes; 413 over ``max_bytes`` (by Content-Length or while streaming; ``limit`` names it
    in the message), :class:`ClientGone` when the client hangs up (``what`` names the body in that line)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise ApiError(413, f"request body of {int(length)} bytes is over the {limit} of {max_bytes}",
                       code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"request body is over the {limit} of {max_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"client hung up after {size} bytes of its {what}") from None
    return b"".join(chunks)


async def read_body(request: Request, max_body_bytes: int):
    """The request's JSON body; 413 over ``max_body_bytes`` (by Content-Length or while streaming), 400 when it is
    not JSON (also NaN / Infinity, nesting too deep to parse and an object that names a key twice, as the edits
    form refuses a field given twice); :class:`ClientGone` when the client hangs up."""
    raw = await read_bytes(request, max_body_bytes)
    try:
        return json.loads(raw, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        name = exc.key[:60]
        if lone_surrogate(name) is not None:
            raise ApiError(400, "a field name is not valid Unicode (a lone surrogate)", code="invalid_value") from None
        raise ApiError(400, f"the request body names {name!r} twice: give each field once", param=name,
                       code="invalid_value") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if "integer string conversion" in str(exc):  # Python's digit limit; its advice (sys.set_int_max_...) is ours
            raise ApiError(400, f"the request body holds an integer of over {sys.get_int_max_str_digits()} digits",
                           code="invalid_json") from None
        raise ApiError(400, f"the request body is not valid JSON: {one_line(exc)[:200]}",
                       code="invalid_json") from None


def install_error_handlers(app) -> None:
    """OpenAI-shaped error responses on ``app``: ApiError, Starlette's 404 / 405, and 500 for anything else. A path
    with a trailing slash is a 404 like any unknown path (Starlette's default, a 307 to the path without it, would
    send a client to a URL built from the request's own Host header)."""
    app.router.redirect_slashes = False

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request, exc: ClientGone):
        logger.info("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({}, status_code=499)     # nginx's "client closed request": nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), None, code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # pragma: no cover - a bug in this module
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(500, f"internal server error ({type(exc).__name__}); see the server log",
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


class CountResponses:
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

        started = False

        async def counting_send_once(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await counting_send(message)

        try:
            await self.app(scope, receive, counting_send_once)
        except BaseException:
            if not started:      # the outer error middleware answers 500: count it here
                with self.lock:
                    self.counts[(path, 500)] = self.counts.get((path, 500), 0) + 1
            raise


def retry_after_s(metrics: dict) -> str:
    """Seconds a refused client should wait, from an :meth:`Engine.metrics` snapshot: the mean request latency so
    far, 1..60."""
    snap = metrics["request_latency_seconds"]
    mean = snap["sum"] / snap["count"] if snap["count"] else 1.0
    return str(int(min(60, max(1, math.ceil(mean)))))




class Guard:
    """Pure ASGI middleware applying an :class:`AccessPolicy` before the app (421 foreign Host, 403 foreign
    Origin, 401 without a valid key, 415 for a body type not accepted; OpenAI-shaped), and CORS headers and
    preflight answers for the configured origins only."""

    def __init__(self, app, policy: AccessPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        method, path = scope.get("method", "GET"), scope.get("path", "")
        origin = headers.get("origin")
        cors = origin is not None and bool(self.policy.cors_origins) and self.policy.origin_ok(origin)
        extra = ({"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if cors else {})
        if cors and method == "OPTIONS" and "access-control-request-method" in headers \
                and self.policy.host_ok(headers.get("host")):
            response = Response(status_code=204, headers={  # no body: a 204 with one breaks the connection
                **extra, "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "authorization, content-type", "Access-Control-Max-Age": "600"})
            return await response(scope, receive, send)
        err = self.policy.check(method, path, headers)
        if err is not None:
            response = error_response(err.status, err.message, None, err.code, {**(err.headers or {}), **extra})
            return await response(scope, receive, send)
        if not extra:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k.lower().encode(), v.encode()) for k, v in extra.items())]}
            await send(message)

        await self.app(scope, receive, send_with_cors)
