"""``ralu serve``'s HTTP API (ralu_runtime.serving.http) on a real uvicorn server (127.0.0.1, a free port, a background
thread stopped by the fixtures) over a tiny random FLUX, with a real HTTP client (httpx; every call has a timeout):
concurrent requests with mixed sizes and presets give the PNGs generate gives alone, n=2, OpenAI-shaped 400/404/413
errors, a full queue (503), a deadline (504), a client that hangs up (its engine request is cancelled), /health,
/metrics, the graceful stop (the running request finishes, new ones get 503), and the ``ralu serve`` command."""
import contextlib
import functools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ralu_runtime import generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.serving import EngineConfig
from ralu_runtime.serving.http import GENERATIONS_PATH
from ralu_runtime.tiny import build_tiny
from openai_checks import assert_error, pngs
from serve_process import serve_command
from helpers import SERVE_DEFAULTS, running_server

T = 120                                   # seconds: every HTTP call's timeout
DEFAULTS = SERVE_DEFAULTS


@pytest.fixture(scope="module")
def pipe():
    return build_tiny("tiny-flux")


running = functools.partial(running_server, grace_s=30.0, stop_s=60.0)  # (server, engine) over a tiny engine


@pytest.fixture(scope="module")
def served(pipe):
    with running(pipe) as s:
        yield s


@pytest.fixture(scope="module")
def small(pipe):
    """One request at a time, one waiting, unpacked calls (so a patched adapter.velocity is every model call)."""
    with running(pipe, EngineConfig(max_active=1, max_queue=1, packed=False)) as s:
        yield s


@contextlib.contextmanager
def slow_model(pipe, delay=0.0):
    """Every model call waits for the yielded gate (set it to release them), then ``delay`` seconds."""
    gate = threading.Event()
    adapter = get_adapter(pipe)
    original = adapter.velocity

    def slow(*a, **k):
        gate.wait(60)
        time.sleep(delay)
        return original(*a, **k)

    adapter.velocity = slow   # ralu's adapter object (an instance attribute); removed below
    try:
        yield gate
    finally:
        gate.set()
        del adapter.velocity


def wait_for(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def post(server, body, client=None, **kw):
    c = client or httpx.Client(timeout=T)
    try:
        if isinstance(body, (bytes, str)) or hasattr(body, "__next__"):
            return c.post(server.url + GENERATIONS_PATH, content=body, headers={"content-type": "application/json"},
                          **kw)
        return c.post(server.url + GENERATIONS_PATH, json=body, **kw)
    finally:
        if client is None:
            c.close()






def samples(server) -> dict:
    """/metrics parsed: {(sample name, sorted label items): value}."""
    r = httpx.get(server.url + "/metrics", timeout=T)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


# --------------------------------------------------------------------------------------- results
REQUESTS = [
    {"prompt": "a red fox in the snow", "size": "64x64", "speedup": "7x", "seed": 11},
    {"prompt": "a castle on a hill", "size": "96x64", "speedup": "4x", "seed": 12},         # 96 wide, 64 high
    {"prompt": "a boat", "size": "64x128", "speedup": "none", "steps": 3, "seed": 13},
    {"prompt": "two cats", "n": 2, "seed": 14, "model": "tiny-flux", "response_format": "b64_json", "user": "u1"},
]


def _alone(pipe, body) -> list[np.ndarray]:
    kw = dict(DEFAULTS)
    if "size" in body:
        w, h = map(int, body["size"].split("x"))
        kw.update(height=h, width=w)
    speedup = body.get("speedup", "default")
    out = generate(pipe, body["prompt"], speedup=None if speedup == "none" else speedup, seed=body["seed"],
                   num_inference_steps=body.get("steps"), num_images_per_prompt=body.get("n", 1),
                   output_type="pil", progress=False, **kw)
    return [np.asarray(im.convert("RGB")).astype(np.int16) for im in out.images]


def test_concurrent_requests_equal_generate_alone(served, pipe):
    server, engine = served
    calls_before = engine.metrics()["model_calls"]
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        resps = list(pool.map(lambda b: post(server, b), REQUESTS))
    for body, resp in zip(REQUESTS, resps):
        got = pngs(resp)
        j = resp.json()
        assert abs(j["created"] - time.time()) < 600 and len(j["data"]) == body.get("n", 1)
        assert j["ralu"]["seed"] == body["seed"]
        assert j["ralu"]["schedule"] == (None if body.get("speedup") == "none"
                                         else f"flux/{body.get('speedup', '7x')}")
        assert "text_encode" in j["ralu"]["timings"] and "vae_decode" in j["ralu"]["timings"]
        ref = _alone(pipe, body)
        assert [g.shape for g in got] == [r.shape for r in ref]
        for g, r in zip(got, ref):
            assert int(np.abs(g - r).max()) <= 1, body        # PNG levels: packed vs unpacked model calls
    assert engine.metrics()["model_calls"] > calls_before


def test_the_seed_drawn_for_a_request_reproduces_it(served):
    server, _ = served
    body = {"prompt": "a lighthouse", "speedup": "none", "steps": 2}
    first = post(server, body)
    seed = first.json()["ralu"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    again = post(server, {**body, "seed": seed})
    assert np.array_equal(pngs(first)[0], pngs(again)[0])


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body,status,param,code", [
    (b'{"prompt": "a fox", ', 400, None, "invalid_json"),
    (b'["a fox"]', 400, None, "invalid_json"),
    (b'{"prompt": "a fox", "seed": ' + b"9" * 5000 + b"}", 400, None, "invalid_json"),   # over Python's digit limit
    (b'{"prompt": "a fox", "seed": 1, "seed": 2}', 400, "seed", "invalid_value"),   # a key twice: which one?
    (b'{"prompt": "a fox", "x": {"a": 1, "a": 2}}', 400, "a", "invalid_value"),
    ({"prompt": "a fox", "colour": "red", "mood": "calm"}, 400, "colour", "unknown_parameter"),
    ({"size": "64x64"}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": "a fox", "size": "100x100"}, 400, "size", "invalid_value"),
    ({"prompt": "a fox", "size": "large"}, 400, "size", "invalid_value"),
    ({"prompt": "a fox", "size": "64x8192"}, 400, "size", "invalid_value"),
    ({"prompt": "a fox", "size": "\u0666\u0664x\u0666\u0664"}, 400, "size", "invalid_value"),  # non-ASCII digits
    ({"prompt": "a fox", "size": "64x64\n"}, 400, "size", "invalid_value"),
    ({"prompt": "a fox", "response_format": "url"}, 400, "response_format", "invalid_value"),
    ({"prompt": "a fox", "n": "2"}, 400, "n", "invalid_type"),
    ({"prompt": "a fox", "n": 0}, 400, "n", "invalid_value"),
    ({"prompt": "a fox", "seed": 1.5}, 400, "seed", "invalid_type"),
    ({"prompt": "a fox", "seed": -1}, 400, "seed", "invalid_value"),
    ({"prompt": "a fox", "steps": 3}, 400, "steps", "invalid_value"),     # steps go with speedup "none"
    ({"prompt": "a fox", "speedup": "9x"}, 400, "speedup", "invalid_value"),
    ({"prompt": "a fox", "solver": "rk4"}, 400, "solver", "invalid_value"),
    ({"prompt": "a fox", "cache": "lru"}, 400, "cache", "invalid_value"),
    ({"prompt": "a fox", "region_source": "pixels"}, 400, "region_source", "invalid_value"),
    ({"prompt": "a fox", "negative_prompt": "blur"}, 400, "negative_prompt", "invalid_value"),  # FLUX: no CFG
    ({"prompt": "a fox", "timeout": -1}, 400, "timeout", "invalid_value"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "invalid_type"),
    ({"prompt": "a fox", "model": "dall-e-3"}, 404, "model", "model_not_found"),
])
def test_bad_requests_get_openai_errors_before_any_work(served, body, status, param, code):
    server, engine = served
    before = engine.metrics()
    err = assert_error(post(server, body), status, param, code)
    if code == "unknown_parameter":
        assert "colour" in err["message"] and "mood" in err["message"]
    if param == "response_format":
        assert "b64_json" in err["message"] and "url" in err["message"]
    after = engine.metrics()
    assert after["model_calls"] == before["model_calls"] and after["queue_depth"] == 0
    assert sum(after["requests"].values()) == sum(before["requests"].values())


def test_body_over_the_limit_is_413(pipe):
    with running(pipe, max_body_bytes=1000) as (server, engine):
        big = json.dumps({"prompt": "x" * 2000}).encode()
        assert_error(post(server, big), 413, code="request_too_large")
        chunked = post(server, (big[i:i + 100] for i in range(0, len(big), 100)))   # no Content-Length
        assert_error(chunked, 413, code="request_too_large")
        assert engine.metrics()["model_calls"] == 0
        r = httpx.get(server.url + "/nowhere", timeout=T)
        assert_error(r, 404, code="not_found")
        for path in (GENERATIONS_PATH + "/", "/health/", "/metrics/"):   # was 307 to the path without the slash
            method = "POST" if path.startswith(GENERATIONS_PATH) else "GET"
            r = httpx.request(method, server.url + path, json={"prompt": "x"}, timeout=T)
            assert_error(r, 404, code="not_found")
        for method in ("PUT", "PATCH"):   # was 415 (the body-type check ran before routing)
            r = httpx.request(method, server.url + GENERATIONS_PATH, json={"prompt": "x"}, timeout=T)
            assert_error(r, 405, code="method_not_allowed")


def test_work_over_the_engines_limit_is_a_400_before_any_work(pipe):
    """``ralu serve --max-token-steps``: a request whose latent tokens x model calls exceed the engine's limit is
    refused with an OpenAI 400 naming the limit; nothing runs."""
    with running(pipe, EngineConfig(gather_timeout_s=0.05, max_token_steps=2000)) as (server, engine):
        err = assert_error(post(server, {"prompt": "a fox", "size": "256x256", "n": 2}), 400)
        assert "max_token_steps" in err["message"], err
        # the advice is the server's flag, not generate's Python arguments a client cannot set
        assert "ralu serve --max-token-steps" in err["message"] and "limits=" not in err["message"], err
        assert engine.metrics()["model_calls"] == 0
        r = post(server, {"prompt": "a fox", "size": "64x64", "n": 1, "speedup": "none", "steps": 2})
        assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------- health, metrics
def test_health_and_models(served):
    server, _ = served
    r = httpx.get(server.url + "/health", timeout=T)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": "tiny-flux", "queue_depth": 0, "active": 0}
    with httpx.Client(timeout=T) as probe:                  # a load balancer's HEAD probe, then a GET on its connection
        head = probe.head(server.url + "/health")
        assert head.status_code == 200 and head.content == b""
        assert probe.get(server.url + "/health").status_code == 200
    models = httpx.get(server.url + "/v1/models", timeout=T).json()
    assert [m["id"] for m in models["data"]] == ["tiny-flux"]


def test_metrics_counters_move(served):
    server, _ = served
    before = samples(server)
    for name in ("ralu_queue_depth", "ralu_active_requests", "ralu_model_calls_total",
                 "ralu_packed_model_calls_total", "ralu_step_latency_seconds_count",
                 "ralu_request_latency_seconds_sum", "ralu_batch_tokens_count"):
        assert (name, ()) in before, name
    assert post(server, {"prompt": "a fox", "speedup": "none", "steps": 2, "seed": 1}).status_code == 200
    assert post(server, {"prompt": "a fox", "size": "7x7"}).status_code == 400
    after = samples(server)
    ok = ("ralu_requests_total", (("outcome", "ok"),))
    assert after[ok] == before[ok] + 1
    assert after[("ralu_model_calls_total", ())] >= before[("ralu_model_calls_total", ())] + 2
    for h in ("ralu_step_latency_seconds", "ralu_request_latency_seconds", "ralu_batch_tokens"):
        assert after[(f"{h}_count", ())] > before[(f"{h}_count", ())]
        assert after[(f"{h}_bucket", (("le", "+Inf"),))] == after[(f"{h}_count", ())]
    bad = ("ralu_http_responses_total", (("code", "400"), ("path", GENERATIONS_PATH)))
    assert after[bad] == before.get(bad, 0) + 1


# --------------------------------------------------------------------------------------- limits
def test_full_queue_is_503_with_retry_after(small, pipe):
    server, engine = small
    body = {"prompt": "a fox", "speedup": "none", "steps": 2, "seed": 3}
    with slow_model(pipe) as gate, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, server, body)
        wait_for(lambda: engine.metrics()["active"] == 1, what="the first request to run")
        second = pool.submit(post, server, body)
        wait_for(lambda: engine.metrics()["queue_depth"] == 1, what="the second request to queue")
        third = post(server, body)
        assert_error(third, 503, code="unavailable")
        assert "queue is full" in third.json()["error"]["message"]
        assert int(third.headers["retry-after"]) >= 1
        gate.set()
        a, b = first.result(T), second.result(T)
    assert np.array_equal(pngs(a)[0], pngs(b)[0])
    assert engine.metrics()["requests"]["rejected"] >= 1


def test_deadline_is_504(small, pipe):
    server, engine = small
    before = engine.metrics()["requests"]["deadline"]
    with slow_model(pipe, delay=0.2) as gate:
        gate.set()
        r = post(server, {"prompt": "a fox", "speedup": "7x", "seed": 4, "timeout": 0.5})
    assert_error(r, 504, "timeout", "deadline_exceeded")
    assert engine.metrics()["requests"]["deadline"] == before + 1


def test_deadline_is_504_while_the_engine_is_inside_one_long_step(small, pipe):
    """A step the engine cannot interrupt (here a model call held by the gate; in the wild a VAE encode of a large
    upload) runs past the deadline: the answer is 504 at the deadline plus the grace, not when the step ends; the
    engine drops the request at its next check."""
    from ralu_runtime.serving.http import DEADLINE_GRACE_S

    server, engine = small
    before = engine.metrics()["requests"]["deadline"]
    with slow_model(pipe) as gate:
        t0 = time.monotonic()
        r = post(server, {"prompt": "a fox", "speedup": "7x", "seed": 4, "timeout": 0.5})
        waited = time.monotonic() - t0
        assert not gate.is_set()                     # the model call was still held when the answer came
    assert_error(r, 504, "timeout", "deadline_exceeded")
    assert 0.5 + DEADLINE_GRACE_S - 0.05 <= waited < 0.5 + DEADLINE_GRACE_S + 20, waited
    wait_for(lambda: engine.metrics()["requests"]["deadline"] == before + 1, timeout=30,
             what="the engine to drop the late request")
    wait_for(lambda: engine.metrics()["active"] == 0, what="the engine to be idle")


def test_client_hanging_up_cancels_its_request(small, pipe):
    server, engine = small
    before = engine.metrics()["requests"]["cancelled"]
    payload = json.dumps({"prompt": "a fox", "speedup": "7x", "seed": 5}).encode()
    with slow_model(pipe, delay=0.1) as gate:
        gate.set()
        with socket.create_connection(("127.0.0.1", server.port), timeout=T) as sock:
            sock.sendall(b"POST " + GENERATIONS_PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: " + str(len(payload)).encode()
                         + b"\r\n\r\n" + payload)
            wait_for(lambda: engine.metrics()["active"] == 1, what="the request to run")
        # the socket is closed: the server notices and cancels the engine request at its next model call
        wait_for(lambda: engine.metrics()["requests"]["cancelled"] == before + 1, timeout=30,
                 what="the request to be cancelled")
    wait_for(lambda: engine.metrics()["active"] == 0, what="the engine to be idle")


# --------------------------------------------------------------------------------------- shutdown
def test_graceful_stop_finishes_the_running_request_and_refuses_new_ones(pipe):
    body = {"prompt": "a fox", "speedup": "none", "steps": 2, "seed": 6}
    with running(pipe, EngineConfig(max_active=1, packed=False)) as (server, engine):
        with slow_model(pipe) as gate, ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(post, server, body)
            wait_for(lambda: engine.metrics()["active"] == 1, what="the request to run")
            server.request_stop()
            wait_for(lambda: httpx.get(server.url + "/health", timeout=T).status_code == 503,
                     what="/health to say shutting down")
            assert httpx.get(server.url + "/health", timeout=T).json()["status"] == "shutting_down"
            refused = post(server, body)
            assert_error(refused, 503, code="unavailable")
            assert "retry-after" in refused.headers
            assert not inflight.done()
            gate.set()
            done = inflight.result(T)
        assert done.status_code == 200 and len(pngs(done)) == 1
        assert server.stop(timeout=60)
        assert engine.closed
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "/health", timeout=5)


# --------------------------------------------------------------------------------------- the command
def test_ralu_serve_command_serves_and_stops_on_sigterm():
    args = ["--model", "tiny-flux", "--port", "0", "--device", "cpu", "--max-active", "2", "--log-level", "warning"]
    with serve_command(args, start_timeout=180) as (url, proc, seen):
        assert url.startswith("http://127.0.0.1:")
        r = httpx.post(url + GENERATIONS_PATH, json={"prompt": "a fox", "size": "64x64", "speedup": "none",
                                                     "steps": 2, "seed": 0}, timeout=T)
        assert pngs(r)[0].shape == (64, 64, 3)
        assert httpx.get(url + "/health", timeout=T).json()["model"] == "tiny-flux"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert "ralu serve: stopped" in "".join(seen)


def test_core_imports_without_the_serve_extra_and_serve_names_it():
    code = ("import sys\n"
            "for m in ('fastapi', 'uvicorn', 'prometheus_client'): sys.modules[m] = None\n"
            "import ralu_runtime, ralu_runtime.serving, ralu_runtime.cli\n"
            "from ralu_runtime.serving import Engine\n"
            "sys.exit(ralu_runtime.cli.main(['serve', '--device', 'cpu', '--port', '0']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("ralu: error:")][-1]
    assert "fastapi" in line and "pip install" in line and "[serve]" in line
