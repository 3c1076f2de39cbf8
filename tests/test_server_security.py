"""``ralu serve`` on a network (issue 22): who may call (API keys, Host, Origin, CORS, body media types), bounded
connections (request-head and body deadlines, a connection cap), inputs that must be 400s (non-finite and
out-of-range numbers, lone surrogates, deep JSON), OpenAI's output_format and the fields it ignores, GET
/v1/models/{id}, the CLI's checks before the model loads, no prompt text and no torchvision notice in the log, and
503 (never 404) from a stop signal until exit.

Servers listen on 127.0.0.1 at a free port over the tiny random FLUX; every HTTP call and every wait is bounded."""
import base64
import functools
import io
import json
import logging
import signal
import socket
import sys
import threading
import time

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ralu_runtime import cli
from ralu_runtime.serving import Engine, EngineConfig
from ralu_runtime.serving.access import AccessPolicy, is_loopback, parse_api_keys
from ralu_runtime.serving.http import GENERATIONS_PATH, ConnectionLimits, Server, create_app
from ralu_runtime.serving.logs import REDACTED, quiet_library_logs
from ralu_runtime.serving.protocol import DEFAULT_REQUEST_TIMEOUT_S, parse_request
from ralu_runtime.tiny import build_tiny
from openai_checks import assert_error
from serve_process import OUTLASTS_GRACE, serve_command
from helpers import SERVE_DEFAULTS, running_server

T = 60                                     # seconds: every HTTP call's timeout
DEFAULTS = SERVE_DEFAULTS
KEY_A, KEY_B = "k" * 16 + "-first-key", "second-key-0123456789"
CHEAP = {"prompt": "a fox", "speedup": "none", "steps": 1, "seed": 1}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny("tiny-flux")


running = functools.partial(running_server, grace_s=10.0, stop_s=60.0)  # (server, engine) over a tiny engine


@pytest.fixture(scope="module")
def keyed(pipe):
    with running(pipe, api_keys=[KEY_A, KEY_B], allowed_hosts=["ralu.example"],
                 cors_origins=["https://app.example"]) as s:
        yield s


@pytest.fixture(scope="module")
def open_server(pipe):
    with running(pipe) as s:
        yield s


def auth(key):
    return {"authorization": f"Bearer {key}"}


def samples(server, headers=None) -> dict:
    r = httpx.get(server.url + "/metrics", headers=headers or {}, timeout=T)
    assert r.status_code == 200, r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def http_count(snap, path, code) -> float:
    return snap.get(("ralu_http_responses_total", (("code", str(code)), ("path", path))), 0)


# ------------------------------------------------------------------------------------------- 1. access
def test_api_keys_are_required_everywhere_but_health(keyed):
    server, engine = keyed
    url = server.url
    before = samples(server, auth(KEY_A))
    calls = engine.metrics()["model_calls"]
    err = assert_error(httpx.post(url + GENERATIONS_PATH, json=CHEAP, timeout=T), 401, code="invalid_api_key")
    assert "Authorization: Bearer" in err["message"]
    r = httpx.post(url + GENERATIONS_PATH, json=CHEAP, headers=auth("wrong-key-0123456789"), timeout=T)
    assert_error(r, 401, code="invalid_api_key")
    assert r.headers["www-authenticate"].startswith("Bearer")
    for path in ("/metrics", "/v1/models", "/v1/models/tiny-flux", "/nowhere"):
        assert_error(httpx.get(url + path, timeout=T), 401, code="invalid_api_key")
    assert_error(httpx.get(url + "/v1/models", headers={"authorization": f"Basic {KEY_A}"}, timeout=T), 401)
    assert engine.metrics()["model_calls"] == calls            # no work for a refused request
    assert httpx.get(url + "/health", timeout=T).status_code == 200
    for key in (KEY_A, KEY_B):                                  # several keys
        assert httpx.get(url + "/v1/models", headers=auth(key), timeout=T).status_code == 200
    r = httpx.post(url + GENERATIONS_PATH, json=CHEAP, headers=auth(KEY_B), timeout=T)
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    after = samples(server, auth(KEY_A))
    assert http_count(after, GENERATIONS_PATH, 401) == http_count(before, GENERATIONS_PATH, 401) + 2


def test_host_header_must_name_this_server(keyed, open_server):
    server, _ = keyed
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::1]evil.example", "[::1]:x"):
        r = httpx.get(server.url + "/v1/models", headers={**auth(KEY_A), "host": host}, timeout=T)
        assert_error(r, 421, code="host_not_allowed")
        assert "--allowed-host" in r.json()["error"]["message"]
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", "[::1]:80", "ralu.example", "RALU.example."):
        r = httpx.get(server.url + "/v1/models", headers={**auth(KEY_A), "host": host}, timeout=T)
        assert r.status_code == 200, (host, r.text)
    # /health too: a rebinding page must not read anything
    assert_error(httpx.get(open_server[0].url + "/health", headers={"host": "evil.example"}, timeout=T), 421)


def test_bodies_must_be_json(open_server):
    server, engine = open_server
    calls = engine.metrics()["model_calls"]
    body = json.dumps(CHEAP)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        r = httpx.post(server.url + GENERATIONS_PATH, content=body, headers=headers, timeout=T)
        assert_error(r, 415, code="unsupported_media_type")
    assert engine.metrics()["model_calls"] == calls
    r = httpx.post(server.url + GENERATIONS_PATH, content=body,
                   headers={"content-type": "application/json; charset=utf-8"}, timeout=T)
    assert r.status_code == 200, r.text


def test_web_pages_get_no_cors_and_cannot_post(open_server, keyed):
    server, engine = open_server
    calls = engine.metrics()["model_calls"]
    page = {"origin": "https://evil.example"}
    r = httpx.post(server.url + GENERATIONS_PATH, json=CHEAP, headers=page, timeout=T)
    assert_error(r, 403, code="origin_not_allowed")
    r = httpx.get(server.url + "/v1/models", headers=page, timeout=T)
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
    pre = httpx.options(server.url + GENERATIONS_PATH, headers={**page, "access-control-request-method": "POST",
                                                                  "access-control-request-headers": "content-type"},
                        timeout=T)
    assert pre.status_code >= 400 and "access-control-allow-origin" not in pre.headers
    assert engine.metrics()["model_calls"] == calls
    # configured: the allowed origin gets CORS headers and a preflight answer, others still nothing
    k, _ = keyed
    app = {"origin": "https://app.example"}
    with httpx.Client(timeout=T) as browser:   # one keep-alive connection, as a browser's preflight and request
        pre = browser.options(k.url + GENERATIONS_PATH, headers={**app, "access-control-request-method": "POST"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"]
        assert pre.content == b"" and "content-length" not in pre.headers   # a 204 has no body (it had "null")
        r = browser.get(k.url + "/v1/models", headers={**app, **auth(KEY_A)})   # the same connection still works
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.get(k.url + "/v1/models", headers={**page, **auth(KEY_A)}, timeout=T)
    assert "access-control-allow-origin" not in r.headers


def test_non_loopback_address_needs_a_key(pipe):
    engine = Engine(pipe, EngineConfig(), **DEFAULTS)
    try:
        with pytest.raises(ValueError, match="API key"):
            Server(create_app(engine, model_name="tiny-flux"), "0.0.0.0", 0)
    finally:
        engine.shutdown(drain=False, timeout=10)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.5")


def test_api_key_parsing_and_constant_time_check():
    assert parse_api_keys(f"{KEY_A},{KEY_B}", [KEY_A], "") == (KEY_A, KEY_B)
    for bad in ("short", "has space in the middle of it", "tab\tinside-0123456789"):
        with pytest.raises(ValueError):
            parse_api_keys(bad)
    policy = AccessPolicy(api_keys=(KEY_A,))
    assert policy.key_ok(f"Bearer {KEY_A}") and policy.key_ok(f"bearer  {KEY_A} ")
    assert not policy.key_ok(f"Bearer {KEY_A}x") and not policy.key_ok(KEY_A) and not policy.key_ok(None)
    assert KEY_A not in repr(policy)


def test_cli_refuses_a_public_address_without_a_key_before_loading(monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(cli, "_load", lambda plan: loaded.append(plan))
    monkeypatch.delenv("RALU_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--insecure" in err[0] and "RALU_API_KEY" in err[0]
    assert cli.main(["serve", "--api-key", "short", "--device", "cpu"]) == 2
    assert "at least 16" in capsys.readouterr().err
    # names no request could ever match (they were taken, and matched nothing)
    assert cli.main(["serve", "--device", "cpu", "--cors-origin", "app.example.com"]) == 2
    assert "--cors-origin: CORS origin 'app.example.com' is not an origin" in capsys.readouterr().err
    assert cli.main(["serve", "--device", "cpu", "--allowed-host", "http://api.example.com"]) == 2
    assert "--allowed-host: allowed host 'http://api.example.com' is not a host name" in capsys.readouterr().err
    assert not loaded


def test_access_policy_refuses_names_that_never_match():
    for kw in ({"cors_origins": ("app.example.com",)}, {"cors_origins": ("https://app.example.com/path",)},
               {"allowed_hosts": ("https://api.example.com",)}, {"allowed_hosts": ("api.example.com/v1",)}):
        with pytest.raises(ValueError, match="is not a"):
            AccessPolicy(**kw)
    ok = AccessPolicy(allowed_hosts=("api.example.com", "api.example.com:8000", "[::1]:80", "*"),
                      cors_origins=("https://app.example.com/", "http://localhost:3000", "*"))
    assert ok.origin_ok("https://app.example.com") and ok.host_ok("api.example.com:8000")


def test_cli_reads_keys_from_env_file_and_flags(monkeypatch, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# ralu keys\n{KEY_B}\n")
    monkeypatch.setenv("RALU_API_KEY", KEY_A)
    args = cli.build_parser().parse_args(["serve", "--device", "cpu", "--api-key-file", str(keyfile),
                                          "--api-key", "third-key-0123456789,fourth-key-0123456789"])
    plan = cli.check_serve(args)
    assert plan.api_keys == (KEY_A, "third-key-0123456789", "fourth-key-0123456789", KEY_B)
    assert KEY_A not in repr(plan)
    args = cli.build_parser().parse_args(["serve", "--device", "cpu", "--host", "0.0.0.0"])
    assert cli.check_serve(args).api_keys == (KEY_A,)         # the environment's key admits a public address


# ------------------------------------------------------------------------------------------- 5. bounded connections
def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``seconds``; None when it is still open."""
    sock.settimeout(0.2)
    data, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return None


def test_partial_request_heads_are_closed_in_time(pipe):
    limits = ConnectionLimits(header_timeout_s=1.0, body_timeout_s=1.5, keep_alive_s=1.0)
    with running(pipe, limits=limits) as (server, _):
        socks = []
        try:
            t0 = time.monotonic()
            for i in range(20):
                s = socket.create_connection(("127.0.0.1", server.port), timeout=T)
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * i)
                socks.append(s)
            trickle = socket.create_connection(("127.0.0.1", server.port), timeout=T)
            socks.append(trickle)
            head = b"POST " + GENERATIONS_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            for b in head:                                  # a byte every 0.1 s: the deadline counts from the start
                trickle.sendall(bytes([b]))
                if time.monotonic() - t0 > 0.5:
                    break
                time.sleep(0.05)
            for s in socks:
                got = _closed_within(s, 5.0)
                assert got is not None, "a connection with a partial head is still open"
                assert got == b"" or got.startswith(b"HTTP/1.1 408")
            assert time.monotonic() - t0 < 8
            # a whole head but a body that never ends: closed after the body deadline
            s = socket.create_connection(("127.0.0.1", server.port), timeout=T)
            socks.append(s)
            s.sendall(b"POST " + GENERATIONS_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
            t1 = time.monotonic()
            assert _closed_within(s, 6.0) is not None
            assert 1.0 <= time.monotonic() - t1 < 6.0
            # the server still answers
            assert httpx.get(server.url + "/health", timeout=T).status_code == 200
        finally:
            for s in socks:
                s.close()


def test_request_heads_over_the_bound_get_400_however_they_arrive(open_server):
    """max_header_bytes (16 KiB) bounds the head whether it arrives in one read or in pieces: h11's own bound holds
    only while a head is incomplete in its buffer, so a 17 KB or 60 KB head sent at once was answered 200."""
    server, _ = open_server

    def send(extra: int, piece: int | None = None) -> bytes:
        head = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * extra + b"\r\n\r\n")
        with socket.create_connection(("127.0.0.1", server.port), timeout=T) as s:
            for i in range(0, len(head), piece or len(head)):
                s.sendall(head[i:i + (piece or len(head))])
            got = _closed_within(s, 5.0) if extra > 16 * 1024 else s.recv(65536)
        assert got is not None
        return got

    assert send(15 * 1024).startswith(b"HTTP/1.1 200")
    for extra, piece in ((17 * 1024, None), (60 * 1024, None), (20 * 1024, 4096), (20 * 1024, 7)):
        got = send(extra, piece)
        assert got.startswith(b"HTTP/1.1 400"), (extra, piece, got[:80])
        assert b"over 16384 bytes" in got
    # a client that keeps sending after the refusal: the connection is closed LINGER_S after the response anyway
    from ralu_runtime.serving.http import LINGER_S

    with socket.create_connection(("127.0.0.1", server.port), timeout=T) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (17 * 1024))
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < LINGER_S + 5:
            try:
                s.sendall(b"a" * 1024)
            except OSError:
                closed = True
                break
            time.sleep(0.05)
        assert closed and time.monotonic() - t0 >= LINGER_S - 0.5
    assert httpx.get(server.url + "/health", timeout=T).status_code == 200


def test_connections_over_the_cap_get_503(pipe):
    with running(pipe, limits=ConnectionLimits(max_connections=4, header_timeout_s=5.0)) as (server, _):
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=T) for _ in range(4)]
        try:
            time.sleep(0.3)
            extra = socket.create_connection(("127.0.0.1", server.port), timeout=T)
            socks.append(extra)
            got = _closed_within(extra, 5.0)
            assert got is not None and got.startswith(b"HTTP/1.1 503")
            assert json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "unavailable"
        finally:
            for s in socks:
                s.close()
        time.sleep(0.3)
        assert httpx.get(server.url + "/health", timeout=T).status_code == 200


def test_hang_up_mid_upload_is_one_log_line_without_traceback(open_server):
    server, engine = open_server
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("ralu", "uvicorn", "uvicorn.error")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=T) as s:
            s.sendall(b"POST " + GENERATIONS_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"prompt\": \"a fox")
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while not any("hung up" in r.getMessage() for r in records) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    lines = [r for r in records if "hung up" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in records]
    assert not any(r.exc_info for r in records), [r.getMessage() for r in records]
    assert engine.metrics()["active"] == 0


# ------------------------------------------------------------------------------------------- 10. inputs
def test_overflowing_and_non_unicode_inputs_are_400s_and_counted(open_server):
    server, engine = open_server
    before = samples(server)
    calls = engine.metrics()["model_calls"]
    cases = [
        (json.dumps({**CHEAP, "guidance_scale": 1e308}).encode(), "guidance_scale", "invalid_value"),
        (json.dumps({**CHEAP, "guidance_scale": -1}).encode(), "guidance_scale", "invalid_value"),
        (b'{"prompt": "a fox", "guidance_scale": 1e999}', "guidance_scale", "invalid_value"),
        (b'{"prompt": "a fox", "guidance_scale": NaN}', None, "invalid_json"),
        (b'{"prompt": "a fox", "timeout": Infinity}', None, "invalid_json"),
        (b'{"prompt": "a fox \\ud800"}', "prompt", "invalid_value"),
        (b'{"prompt": "a fox", "negative_prompt": "\\udfff"}', "negative_prompt", "invalid_value"),
        (b'{"prompt": "a fox", "\\ud800": 1}', None, "invalid_value"),
        (b"[" * 100_000 + b"]" * 100_000, None, "invalid_json"),
        (b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}", "prompt", "invalid_type"),
        (json.dumps({**CHEAP, "seed": 2**70}).encode(), "seed", "invalid_value"),
        (json.dumps({**CHEAP, "seed": 2**63}).encode(), "seed", "invalid_value"),  # generate's range, up front
        (json.dumps({**CHEAP, "steps": 10**6}).encode(), "steps", "invalid_value"),
        (json.dumps({**CHEAP, "timeout": 1e300}).encode(), "timeout", "invalid_value"),
        (json.dumps({**CHEAP, "output_compression": 101}).encode(), "output_compression", "invalid_value"),
        (b'{"prompt": "a fox", "n": 1' + b"0" * 5000 + b"}", None, "invalid_json"),
    ]
    for body, param, code in cases:
        r = httpx.post(server.url + GENERATIONS_PATH, content=body, headers={"content-type": "application/json"},
                       timeout=T)
        err = assert_error(r, 400, param, code)
        assert len(err["message"]) < 1000
    assert engine.metrics()["model_calls"] == calls
    after = samples(server)
    assert http_count(after, GENERATIONS_PATH, 400) == http_count(before, GENERATIONS_PATH, 400) + len(cases)
    assert http_count(after, GENERATIONS_PATH, 500) == http_count(before, GENERATIONS_PATH, 500)


def test_request_timeout_has_a_default():
    assert DEFAULT_REQUEST_TIMEOUT_S == 600
    assert create_app.__kwdefaults__["default_deadline_s"] == DEFAULT_REQUEST_TIMEOUT_S
    assert cli.build_parser().parse_args(["serve"]).request_timeout == DEFAULT_REQUEST_TIMEOUT_S
    _, deadline, _, _ = parse_request({"prompt": "x", "timeout": 5000}, model_name="m", max_images=10,
                                      default_deadline_s=DEFAULT_REQUEST_TIMEOUT_S)
    assert deadline == DEFAULT_REQUEST_TIMEOUT_S


# ------------------------------------------------------------------------------------------- 11. OpenAI fields
def _image(resp, index=0):
    data = base64.b64decode(resp.json()["data"][index]["b64_json"])
    return Image.open(io.BytesIO(data)), len(data)


def test_output_format_and_compression_are_honoured(open_server):
    server, _ = open_server
    body = {**CHEAP, "size": "128x128", "quality": "hd", "style": "vivid", "background": "auto",
            "moderation": "low"}
    sizes = {}
    for fmt, compression, pil in (("png", None, "PNG"), ("jpeg", 95, "JPEG"), ("jpeg", 5, "JPEG"),
                                  ("webp", 90, "WEBP"), ("webp", 5, "WEBP")):
        extra = {"output_format": fmt} | ({"output_compression": compression} if compression is not None else {})
        r = httpx.post(server.url + GENERATIONS_PATH, json={**body, **extra}, timeout=T)
        assert r.status_code == 200, r.text
        img, nbytes = _image(r)
        assert img.format == pil and img.size == (128, 128)
        assert r.json()["output_format"] == fmt
        sizes[(fmt, compression)] = nbytes
    assert sizes[("jpeg", 5)] < sizes[("jpeg", 95)] and sizes[("webp", 5)] < sizes[("webp", 90)]
    r = httpx.post(server.url + GENERATIONS_PATH, json={**CHEAP, "output_format": "gif"}, timeout=T)
    assert_error(r, 400, "output_format", "invalid_value")
    r = httpx.post(server.url + GENERATIONS_PATH, json={**CHEAP, "quality": 3}, timeout=T)
    assert_error(r, 400, "quality", "invalid_type")


def test_get_one_model(open_server):
    server, _ = open_server
    r = httpx.get(server.url + "/v1/models/tiny-flux", timeout=T)
    assert r.status_code == 200
    assert r.json()["id"] == "tiny-flux" and r.json()["object"] == "model" and r.json()["owned_by"] == "ralu"
    for other in ("dall-e-3", "tiny-flux/x"):
        assert_error(httpx.get(server.url + f"/v1/models/{other}", timeout=T), 404, "model", "model_not_found")


# ------------------------------------------------------------------------------------------- 12. the command
def test_every_option_of_every_command_has_a_help_line():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [(name, a.option_strings) for name, command in sub.choices.items() for a in command._actions
               if a.option_strings and not (a.help and a.help.strip())]
    assert not missing, f"options without a help line: {missing}"


def test_port_in_use_is_reported_before_the_model_loads(monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(cli, "_load", lambda plan: loaded.append(plan))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--device", "cpu", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "in use" in err[0]
    assert not loaded


def test_prompts_are_redacted_and_torchvision_notices_dropped():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    lib = logging.getLogger("diffusers")
    handler = Keep()
    lib.addHandler(handler)
    try:
        quiet_library_logs()
        logging.getLogger("diffusers.pipelines.flux.pipeline_flux").warning(
            "The following part of your input was truncated because CLIP can only handle sequences up to 77 "
            "tokens: ['SECRET-PROMPT-TEXT']")
        logging.getLogger("diffusers.x").warning("`CLIPImageProcessor` requires torchvision (not installed); ...")
        logging.getLogger("diffusers.y").warning("an ordinary warning")
    finally:
        lib.removeHandler(handler)
    assert records == [REDACTED, "an ordinary warning"]


@pytest.mark.slow
def test_serve_command_logs_no_prompt_and_answers_503_until_exit():
    """``ralu serve`` as a subprocess: no torchvision notice, a long prompt's cut-off text not in the log, a
    hang-up mid-upload is one line; after SIGTERM /health and new requests get 503 with Retry-After until the
    process ends (never 404 or 200)."""
    secret = "zebra" + "-unicorn" * 40                     # longer than the tiny model's 77 text tokens
    args = ["--model", "tiny-flux", "--port", "0", "--device", "cpu", "--grace", "3", "--log-level", "info"]
    with serve_command(args, start_timeout=180) as (url, proc, seen):
        r = httpx.post(url + GENERATIONS_PATH, json={**CHEAP, "prompt": f"a fox {secret}", "size": "64x64"},
                       timeout=T)
        assert r.status_code == 200, r.text
        host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=T) as s:
            s.sendall(b"POST " + GENERATIONS_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"prompt\": \"a")
            time.sleep(0.5)
        # a request that outlasts the grace period, then SIGTERM
        slow = {**CHEAP, **OUTLASTS_GRACE}
        results = {}
        t = threading.Thread(target=lambda: results.setdefault(
            "slow", httpx.post(url + GENERATIONS_PATH, json=slow, timeout=T)))
        t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)                                     # the signal reaches the server's event loop
        statuses = []
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            for method, path, body in (("GET", "/health", None), ("POST", GENERATIONS_PATH, CHEAP)):
                try:
                    resp = httpx.request(method, url + path, json=body, timeout=5)
                except httpx.TransportError:
                    continue
                statuses.append((path, resp.status_code))
                if resp.status_code == 503:
                    assert "retry-after" in resp.headers
                    assert resp.json()["error"]["code"] == "unavailable"
            time.sleep(0.05)
        assert proc.wait(timeout=60) == 0
        t.join(T)
    out = "".join(seen)
    assert len(statuses) > 4 and all(code == 503 for _, code in statuses), (statuses, out, results)
    assert_error(results["slow"], 503, code="unavailable")  # the running request outlasted the grace period
    assert "retry-after" in results["slow"].headers
    assert "zebra" not in out and "unicorn" not in out
    assert "truncated" in out                                 # the redacted notice: the warning did fire
    assert "torchvision" not in out
    assert out.count("hung up") == 1 and "Traceback" not in out, out


def test_server_log_writes_to_the_stderr_of_the_moment(monkeypatch):
    """``ralu serve``'s log handler follows ``sys.stderr``: a server started in-process where stderr was replaced
    (a test's capture), whose stream was closed since, logged "--- Logging error ---" on every later line."""
    from ralu_runtime.serving.logs import server_log

    log = logging.getLogger("ralu")
    saved = (log.handlers[:], log.level)
    log.handlers.clear()
    errors = []
    monkeypatch.setattr(logging.Handler, "handleError", lambda self, record: errors.append(record))
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        server_log("info").info("one")
        assert server_log("warning") is log and len(log.handlers) == 1 and log.level == logging.WARNING
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        log.warning("two")
        assert second.getvalue() == "WARNING   two\n" and not errors
    finally:
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
