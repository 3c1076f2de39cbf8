"""Ray Serve replicas of the serving engine (ralu_runtime.serving.ray, ``ralu serve --ray``) on a local Ray instance
(``ray.init(num_cpus=2)``, one per module, shut down by the fixture's finalizer, which also checks that no process it
started is left), two CPU replicas of the tiny FLUX, Ray Serve's proxy on 127.0.0.1 and a real HTTP client (httpx;
every call has a timeout; every wait is bounded):

* the replicas load and warm up before they take traffic; concurrent requests give the PNGs ``generate`` gives alone;
  OpenAI-shaped errors, /health, /metrics (summed over replicas), /v1/models;
* a deadline cancels the request on its replica (504), also when the replica does not answer in time (the ingress
  cancels the call), and so does a client hanging up;
* a replica killed (SIGKILL) mid-request: the request runs again on the other replica and gives the same image; the
  dead replica is replaced; killed twice (both replicas), the client gets a clear 503;
* ``ralu serve --ray --replicas 1`` joins the running cluster, serves, and stops on SIGTERM;
* without a cluster: replica options (one GPU per replica, autoscaling on queue depth), metrics merging, the
  replica's start-up (warm-up through its engine, unsigned compile artifacts refused), ``--ray`` argument checks,
  and the error naming the [ray] extra where ray is not installed.

Replicas run a module-level factory of this file (pickled by value): the tiny FLUX whose model calls, while the
file ``<control>/delay`` holds seconds > 0, write ``<control>/busy-<pid>`` and sleep that long, so a test can
find the process running a request and make a request last.
"""
import dataclasses
import functools
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from ralu_runtime import cli, generate
from openai_checks import assert_error, pngs
from serve_process import OUTLASTS_GRACE, serve_command

T = 120                                    # seconds: every HTTP call's timeout
DEFAULTS = dict(height=64, width=64, max_sequence_length=77)   # the replicas' defaults (small: CPU time)
GENERATIONS = "/v1/images/generations"


# ------------------------------------------------------------------------------------------- replica model
def gated_tiny_flux(device, dtype, control: str):
    """The tiny FLUX (seed 0, as build_tiny makes it everywhere) whose model calls obey ``control/delay``."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.tiny import build_tiny

    pipe = build_tiny("tiny-flux", device=device, dtype=dtype)
    adapter = get_adapter(pipe)
    original = adapter.velocity

    def gated(*args, **kwargs):
        try:
            with open(os.path.join(control, "delay")) as f:
                delay = float(f.read() or 0)
        except (OSError, ValueError):
            delay = 0.0
        if delay > 0:
            with open(os.path.join(control, f"busy-{os.getpid()}"), "w") as f:
                f.write(str(time.time()))
            time.sleep(delay)
        return original(*args, **kwargs)

    adapter.velocity = gated
    return pipe


# ------------------------------------------------------------------------------------------- helpers
def wait_for(cond, timeout=60.0, what="condition", every=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def _descendants(root: int) -> set[int]:
    """Live processes below ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]






def alone(pipe, body) -> list[np.ndarray]:
    """What ``generate`` gives for ``body`` in this process."""
    kw = dict(DEFAULTS)
    if "size" in body:
        w, h = map(int, body["size"].split("x"))
        kw.update(height=h, width=w)
    speedup = body.get("speedup", "default")
    out = generate(pipe, body["prompt"], speedup=None if speedup == "none" else speedup, seed=body["seed"],
                   num_inference_steps=body.get("steps"), num_images_per_prompt=body.get("n", 1),
                   output_type="pil", progress=False, **kw)
    return [np.asarray(im.convert("RGB")).astype(np.int16) for im in out.images]


def assert_same_images(got, ref, body):
    assert [g.shape for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref):
        assert int(np.abs(g - r).max()) <= 1, body     # PNG levels: packed vs unpacked model calls


# ------------------------------------------------------------------------------------------- fixtures
@dataclasses.dataclass
class Cluster:
    port: int
    gcs_address: str
    control: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def delay(self, seconds: float) -> None:
        with open(os.path.join(self.control, "delay"), "w") as f:
            f.write(str(seconds))

    def clear_busy(self) -> None:
        for f in glob.glob(os.path.join(self.control, "busy-*")):
            os.unlink(f)

    def busy(self) -> list[int]:
        return sorted(int(f.rsplit("-", 1)[1]) for f in glob.glob(os.path.join(self.control, "busy-*")))


@pytest.fixture(scope="module")
def pipe():
    from ralu_runtime.tiny import build_tiny

    return build_tiny("tiny-flux")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray.serve", reason="needs ray[serve]: pip install -e '.[ray]' (the [test] extra has it)")
    import ray
    import ray.cloudpickle
    from ray import serve

    control = str(tmp_path_factory.mktemp("ray-control"))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # replicas get gated_tiny_flux by value
    # children this process had before Ray (e.g. inductor's compile workers from earlier test modules, which live
    # as long as the pytest process) are not Ray's to stop
    before = _descendants(os.getpid())
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    spawned: set[int] = set()
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield Cluster(port, ray.get_runtime_context().gcs_address, control)
    finally:
        spawned = _descendants(os.getpid()) - before
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        wait_for(lambda: not any(_alive(p) for p in spawned), timeout=60, what="Ray's processes to end", every=0.2)


@pytest.fixture(scope="class")
def app(cluster):
    from ray import serve

    from ralu_runtime.serving import ray as ralu_ray

    cluster.delay(0)
    spec = ralu_ray.ReplicaSpec(model=functools.partial(gated_tiny_flux, control=cluster.control), defaults=DEFAULTS,
                                max_active=4, max_queue=4, cpus=1)
    options = ralu_ray.IngressOptions(model_name="tiny-flux", max_retries=1, deadline_slack_s=1.0)
    serve.run(ralu_ray.build_app(spec, options, replicas=2), name=ralu_ray.APP_NAME, route_prefix="/",
              blocking=False)      # returns once every replica has loaded and warmed up
    try:
        yield cluster
    finally:
        cluster.delay(0)
        serve.delete(ralu_ray.APP_NAME)


def board():
    """The metrics board's snapshot: {"total", "replicas": [metrics + info], "gone"}."""
    from ray import serve

    return serve.get_deployment_handle("RaluBoard", app_name="ralu").collect.remote().result(timeout_s=30)


def outcomes() -> dict:
    return board()["total"]["requests"]


def post(url, body, **kw):
    with httpx.Client(timeout=T) as c:
        if isinstance(body, (bytes, str)):
            return c.post(url + GENERATIONS, content=body, headers={"content-type": "application/json"}, **kw)
        return c.post(url + GENERATIONS, json=body, **kw)


def counters(url) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics", timeout=T)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


# ------------------------------------------------------------------------------------------- on the cluster
REQUESTS = [
    {"prompt": "a red fox in the snow", "size": "64x64", "speedup": "7x", "seed": 11},
    {"prompt": "a castle on a hill", "size": "96x64", "speedup": "4x", "seed": 12},
    {"prompt": "a boat", "size": "64x128", "speedup": "none", "steps": 3, "seed": 13},
    {"prompt": "two cats", "n": 2, "seed": 14, "model": "tiny-flux", "response_format": "b64_json"},
]


@pytest.mark.slow
@pytest.mark.slow
def test_serve_ray_on_its_own_ray_instance_answers_503_not_404_until_exit(monkeypatch):
    """``ralu serve --ray`` without a cluster starts its own Ray instance; after SIGTERM /health gets 503 (then the
    connection is refused) until the process ends, never 404, and the request outlasting --grace gets 503. It runs
    before this module's cluster starts (``ray.init(address="auto")`` would join a running cluster), and no other
    test file starts Ray (the xdist workers take whole files)."""
    import threading

    from ralu_runtime.serving.http import GENERATIONS_PATH

    pytest.importorskip("ray.serve")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["--ray", "--replicas", "1", "--port", "0", "--device", "cpu", "--grace", "3", "--log-level", "warning"]
    with serve_command(args, start_timeout=300) as (url, proc, seen):
        results = {}
        slow = {"prompt": "a fox", "speedup": "none", "seed": 0, **OUTLASTS_GRACE}
        t = threading.Thread(target=lambda: results.setdefault(
            "slow", httpx.post(url + GENERATIONS_PATH, json=slow, timeout=T)))
        t.start()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health", timeout=T).json().get("active") != 1:
            assert time.monotonic() < deadline, "the long request did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        statuses = []
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(url + "/health", timeout=5).status_code)
            except httpx.TransportError:
                statuses.append("refused")
            time.sleep(0.1)
        assert proc.wait(timeout=60) == 0
        t.join(T)
    # the signal reaches the server's handler within a moment (on a loaded 2-core machine a first /health may still
    # see 200); from the first answer that is not 200 on: 503 until the connection is refused, never 404 or 200
    drained = statuses[next((i for i, st in enumerate(statuses) if st != 200), len(statuses)):]
    assert len(statuses) - len(drained) <= 10, statuses  # at most ~1 s of 200s after SIGTERM
    assert drained.count(503) > 3 and set(drained) <= {503, "refused"}, statuses
    assert_error(results["slow"], 503, code="unavailable")
    assert "retry-after" in results["slow"].headers


class TestReplicas:
    def test_replicas_load_and_warm_up_before_traffic(self, app):
        snap = board()
        infos = [m["info"] for m in snap["replicas"]]
        assert len(infos) == 2 and len({i["pid"] for i in infos}) == 2
        for m in snap["replicas"]:
            assert m["info"]["device"] == "cpu" and m["info"]["warmup"]["requests"] == 2
            assert m["requests"]["ok"] == 2 and m["model_calls"] > 0     # the warm-up ran through the engine
        assert snap["total"]["requests"]["ok"] == 4

    def test_concurrent_requests_equal_generate_alone(self, app, pipe):
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            resps = list(pool.map(lambda b: post(app.url, b), REQUESTS))
        for body, resp in zip(REQUESTS, resps):
            j = resp.json()
            assert j["ralu"]["seed"] == body["seed"] and len(j["data"]) == body.get("n", 1)
            assert j["ralu"]["schedule"] == (None if body.get("speedup") == "none"
                                             else f"flux/{body.get('speedup', '7x')}")
            assert "text_encode" in j["ralu"]["timings"] and j["ralu"]["replica"]
            assert_same_images(pngs(resp), alone(pipe, body), body)

    @pytest.mark.parametrize("body,status,param,code", [
        (b'{"prompt": "a fox", ', 400, None, "invalid_json"),
        (b'{"prompt": "a fox", "prompt": "a cat"}', 400, "prompt", "invalid_value"),   # a key twice, at the ingress
        ({"prompt": "a fox", "colour": "red"}, 400, "colour", "unknown_parameter"),
        ({"size": "64x64"}, 400, "prompt", "missing_required_parameter"),
        ({"prompt": "a fox", "size": "100x100"}, 400, "size", "invalid_value"),      # checked by the replica
        ({"prompt": "a fox", "steps": 3}, 400, "steps", "invalid_value"),             # checked by the replica
        ({"prompt": "a fox", "n": 0}, 400, "n", "invalid_value"),
        ({"prompt": "a fox", "model": "dall-e-3"}, 404, "model", "model_not_found"),
    ])
    def test_bad_requests_get_openai_errors(self, app, body, status, param, code):
        assert_error(post(app.url, body), status, param, code)

    def test_body_limit_health_models_and_metrics(self, app):
        assert_error(post(app.url, json.dumps({"prompt": "x" * (2 << 20)})), 413, code="request_too_large")
        # the gauges come from the replicas' reports (every second): wait for the one after the last test's requests
        h = wait_for(lambda: (r := httpx.get(app.url + "/health", timeout=T)).json().get("active") == 0 and r,
                     timeout=10, what="/health to show the replicas idle")
        assert h.status_code == 200
        assert h.json() == {"status": "ok", "model": "tiny-flux", "queue_depth": 0, "active": 0, "replicas": 2}
        assert [m["id"] for m in httpx.get(app.url + "/v1/models", timeout=T).json()["data"]] == ["tiny-flux"]
        before = counters(app.url)
        assert before[("ralu_replicas", ())] == 2
        assert post(app.url, {"prompt": "a fox", "speedup": "none", "steps": 2, "seed": 1}).status_code == 200
        ok = ("ralu_requests_total", (("outcome", "ok"),))
        assert counters(app.url)[ok] == before[ok] + 1                 # counted at the ingress, at once
        replica_ok = ("ralu_replica_requests_total", (("outcome", "ok"),))
        after = wait_for(lambda: (c := counters(app.url))[replica_ok] > before[replica_ok] and c, timeout=30,
                         what="the replicas' next metrics report")
        assert after[("ralu_model_calls_total", ())] >= before[("ralu_model_calls_total", ())] + 2
        assert after[("ralu_request_latency_seconds_count", ())] > before[("ralu_request_latency_seconds_count", ())]
        ok = ("ralu_http_responses_total", (("code", "200"), ("path", GENERATIONS)))
        assert after[ok] == before.get(ok, 0) + 1

    def test_deadline_is_504_and_cancels_the_request_on_its_replica(self, app):
        before = outcomes()["deadline"]
        app.delay(0.3)
        t0 = time.monotonic()
        r = post(app.url, {"prompt": "a fox", "speedup": "7x", "seed": 4, "timeout": 0.5})
        app.delay(0)
        assert_error(r, 504, "timeout", "deadline_exceeded")
        assert time.monotonic() - t0 < 10
        wait_for(lambda: outcomes()["deadline"] == before + 1, timeout=30, what="the engine's deadline outcome")

    def test_a_replica_that_does_not_answer_in_time_has_the_request_cancelled(self, app):
        before = outcomes()["cancelled"]
        app.delay(3.0)      # one model call outlasts timeout + slack: the ingress gives up and cancels the call
        t0 = time.monotonic()
        r = post(app.url, {"prompt": "a fox", "seed": 5, "timeout": 0.5})
        assert time.monotonic() - t0 < 3.0
        app.delay(0)
        err = assert_error(r, 504, "timeout", "deadline_exceeded")
        assert "did not answer" in err["message"]
        wait_for(lambda: outcomes()["cancelled"] == before + 1, timeout=30, what="the engine request to be cancelled")
        assert counters(app.url)[("ralu_ingress_timeouts_total", ())] >= 1

    def test_client_hanging_up_cancels_the_request_on_its_replica(self, app):
        before = outcomes()["cancelled"]
        app.clear_busy()
        app.delay(0.3)
        payload = json.dumps({"prompt": "a fox", "speedup": "7x", "seed": 6}).encode()
        with socket.create_connection(("127.0.0.1", app.port), timeout=T) as sock:
            sock.sendall(b"POST " + GENERATIONS.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: " + str(len(payload)).encode()
                         + b"\r\n\r\n" + payload)
            wait_for(app.busy, timeout=30, what="the request to run")
        wait_for(lambda: outcomes()["cancelled"] == before + 1, timeout=30, what="the engine request to be cancelled")
        app.delay(0)
        wait_for(lambda: board()["total"]["active"] == 0, timeout=30, what="the replicas to be idle")

    def test_replica_killed_mid_request_is_retried_elsewhere_and_replaced(self, app, pipe):
        body = {"prompt": "a lighthouse", "speedup": "7x", "seed": 7}
        before = counters(app.url)
        replica_of = {m["info"]["pid"]: m["info"]["replica"] for m in board()["replicas"]}
        pids = set(replica_of)
        app.clear_busy()
        app.delay(0.2)
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(post, app.url, body)
            victim = wait_for(app.busy, timeout=30, what="a replica to run the request")[0]
            assert victim in pids
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda: httpx.get(app.url + "/health", timeout=T).json()["replicas"] == 1, timeout=10,
                     what="/health to count one replica", every=0.1)
            assert time.monotonic() - killed_at < 2.5                # liveness, not the 5 s staleness window
            resp = fut.result(T)
        app.delay(0)
        assert resp.json()["ralu"]["replica"] in set(replica_of.values()) - {replica_of[victim]}
        assert_same_images(pngs(resp), alone(pipe, body), body)        # the same seed on the other replica
        after = counters(app.url)
        assert after[("ralu_replica_failures_total", ())] == before[("ralu_replica_failures_total", ())] + 1
        assert after[("ralu_retries_total", ())] == before[("ralu_retries_total", ())] + 1
        ok = ("ralu_requests_total", (("outcome", "ok"),))
        assert after[ok] == before[ok] + 1                          # kept at the ingress: nothing lost with the replica
        # Ray Serve replaces the dead replica; the new one loads and warms up before it reports
        from ralu_runtime.serving.ray import replica_status

        def replaced():
            now = {m["info"]["pid"] for m in board()["replicas"]}
            return (len(now) == 2 and victim not in now and replica_status().get("RaluReplica") == {"RUNNING": 2}
                    and now)
        now = wait_for(replaced, timeout=150, what="the replacement replica", every=0.5)
        assert len(now - pids) == 1
        assert post(app.url, {"prompt": "a fox", "speedup": "none", "steps": 2, "seed": 8}).status_code == 200

    def test_both_replicas_dying_gives_a_clear_503(self, app):
        app.clear_busy()
        app.delay(0.2)
        killed = []
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(post, app.url, {"prompt": "a fox", "seed": 9})
            for _ in range(2):     # the replica running it, then the one it was sent to next
                pid = wait_for(lambda: [p for p in app.busy() if p not in killed], timeout=60,
                               what="a replica to run the request")[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            resp = fut.result(T)
        app.delay(0)
        err = assert_error(resp, 503, code="replica_failed")
        assert "died" in err["message"] and "tried 2 time(s)" in err["message"]
        assert int(resp.headers["retry-after"]) >= 1


# ------------------------------------------------------------------------------------------- the command
@pytest.mark.slow
def test_ralu_serve_ray_command_serves_then_drains_for_its_grace_on_sigterm(cluster):
    """``ralu serve --ray`` answers a request; then SIGTERM with a request running longer than ``--grace``:
    /health and new requests get 503 with Retry-After at once, the running request gets 503 with Retry-After when
    the grace ends (not a plain 500 at Ray's 20 s), the command exits 0 and the application is deleted. (One
    command for both: a Serve deployment costs about 30 s of CPU here.)"""
    args = ["--ray", "--ray-address", cluster.gcs_address, "--replicas", "1", "--port", str(cluster.port),
            "--device", "cpu", "--max-active", "2", "--log-level", "warning", "--grace", "3"]
    with serve_command(args, start_timeout=240) as (url, proc, seen):
        assert url == cluster.url and "1 Ray Serve replica(s)" in "".join(seen)
        r = httpx.post(url + GENERATIONS, json={"prompt": "a fox", "size": "64x64", "speedup": "none", "steps": 2,
                                                "seed": 0}, timeout=T)
        assert pngs(r)[0].shape == (64, 64, 3)
        assert httpx.get(url + "/health", timeout=T).json()["replicas"] == 1
        slow = {"prompt": "a fox", "speedup": "none", "seed": 0, **OUTLASTS_GRACE}
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(post, url, slow)
            wait_for(lambda: httpx.get(url + "/health", timeout=T).json().get("active") == 1, timeout=60,
                     what="the long request to run")
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            h = wait_for(lambda: (r := httpx.get(url + "/health", timeout=T)).status_code != 200 and r, timeout=10,
                         what="/health to leave 200", every=0.05)
            assert h.status_code == 503 and "retry-after" in h.headers and h.json()["status"] == "shutting_down"
            refused = post(url, {"prompt": "a fox", "seed": 1})
            assert_error(refused, 503, code="unavailable")
            assert "retry-after" in refused.headers
            cut = running.result(T)
            cut_after = time.monotonic() - signalled
        assert proc.wait(timeout=120) == 0
    assert "ralu serve: stopped" in "".join(seen)
    from ralu_runtime.serving.ray import replica_status

    assert replica_status() == {}       # the application was deleted
    assert_error(cut, 503, code="unavailable")
    assert "retry-after" in cut.headers
    assert 2.0 <= cut_after < 15.0, cut_after


# ------------------------------------------------------------------------------------------- without a cluster
def test_replica_options_one_gpu_each_and_autoscaling_on_queue_depth():
    pytest.importorskip("ray.serve")
    from ralu_runtime.serving.ray import ReplicaSpec, deployment_options

    spec = ReplicaSpec(max_active=8, max_queue=64)
    gpu = deployment_options(spec, cluster_gpus=4)
    assert gpu["num_replicas"] == 4 and gpu["ray_actor_options"]["num_gpus"] == 1
    assert gpu["max_ongoing_requests"] == 72 and "autoscaling_config" not in gpu
    cpu = deployment_options(spec, 3, cluster_gpus=0)
    assert cpu["num_replicas"] == 3 and "num_gpus" not in cpu["ray_actor_options"]
    assert cpu["ray_actor_options"]["num_cpus"] == 1
    assert deployment_options(ReplicaSpec(device="cpu", cpus=2), cluster_gpus=8)["ray_actor_options"] == {
        "num_cpus": 2}
    auto = deployment_options(spec, (1, 4), cluster_gpus=4)
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"]["min_replicas"] == 1 and auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 8      # a full batch, then a queue: scale up
    with pytest.raises(ValueError, match="no GPU"):
        deployment_options(ReplicaSpec(device="cuda"), cluster_gpus=0)
    with pytest.raises(ValueError, match="replicas"):
        deployment_options(spec, 0)
    with pytest.raises(ValueError, match="device"):
        ReplicaSpec(device="cuda:1")
    with pytest.raises(ValueError, match="max_active"):
        ReplicaSpec(max_active=0)


def _snapshot(ok, calls, queue_depth=0, active=0, latencies=()):
    from ralu_runtime.serving.engine import LATENCY_BUCKETS, Histogram

    h = Histogram(LATENCY_BUCKETS)
    for v in latencies:
        h.observe(v)
    empty = Histogram((1, 2)).snapshot()
    return {"queue_depth": queue_depth, "active": active, "requests": {"ok": ok, "deadline": 0},
            "model_calls": calls, "packed_calls": 0, "token_budget": 16384, "step_latency_seconds": empty,
            "request_latency_seconds": h.snapshot(), "batch_tokens": empty, "batch_requests": empty}


def test_metrics_merge_and_the_board_keeps_counters_of_gone_replicas():
    pytest.importorskip("ray.serve")
    from ralu_runtime.serving.ray import RaluBoard, merge_metrics

    a, b = _snapshot(2, 10, 1, 2, [0.5, 2.0]), _snapshot(3, 7, 0, 1, [1.0])
    m = merge_metrics([a, b])
    assert (m["queue_depth"], m["active"], m["requests"]["ok"], m["model_calls"]) == (1, 3, 5, 17)
    assert m["request_latency_seconds"]["count"] == 3 and m["request_latency_seconds"]["sum"] == 3.5
    gone = merge_metrics([a], [b])
    assert (gone["active"], gone["requests"]["ok"]) == (2, 5)       # gauges of live replicas, counters of all
    board = RaluBoard(stale_after_s=0.2)
    board.report("r1", a)
    board.report("r2", b)
    assert len(board.collect()["replicas"]) == 2
    time.sleep(0.3)
    board.report("r1", a)
    snap = board.collect()
    assert len(snap["replicas"]) == 1 and snap["gone"] == ["r2"] and snap["total"]["requests"]["ok"] == 5
    board.report("r1", a, final=True)
    snap = board.collect()
    assert snap["replicas"] == [] and snap["total"]["requests"]["ok"] == 5 and snap["total"]["active"] == 0


def test_replica_start_up_warms_up_through_its_engine_and_refuses_unsigned_artifacts(tmp_path):
    pytest.importorskip("ray.serve")
    from ralu_runtime.compile.artifacts import ArtifactError
    from ralu_runtime.serving.ray import ReplicaSpec, start_engine

    spec = ReplicaSpec(model="tiny-flux", defaults=DEFAULTS, warmup=[{"speedup": "7x"}, {"speedup": None,
                                                                                        "num_inference_steps": 2}])
    import gc

    engine, info = start_engine(spec, "r0")
    try:
        m = engine.metrics()
        assert m["requests"]["ok"] == 4 and m["model_calls"] > 0
        assert info["warmup"]["requests"] == 4 and info["device"] == "cpu" and info["artifacts"] is None
        # the replica's process settles its heap after warm-up: collected, and frozen (permanent generation)
        assert info["warmup"]["gc_s"] > 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test runs the replica's start-up in the test process: give the objects back
        engine.shutdown(drain=False, timeout=30)
    bundle = tmp_path / "bundle.bin"
    bundle.write_bytes(b"not a bundle")
    with pytest.raises(ArtifactError, match="manifest"):
        start_engine(dataclasses.replace(spec, compile_artifacts=str(bundle)), "r1")


@pytest.mark.parametrize("args,needle", [
    (["--replicas", "2"], "--replicas applies to --ray"),
    (["--compile-artifacts", "b.bundle"], "--compile-artifacts applies to --ray"),
    (["--ray", "--replicas", "0"], "--replicas '0'"),
    (["--ray", "--replicas", "4:2"], "MIN:MAX"),
    (["--ray", "--replicas", "two"], "--replicas 'two'"),
    (["--ray", "--device", "cuda:1"], "use cpu or cuda"),
    (["--ray", "--compile-artifacts", "/nonexistent/bundle.bin"], "no such file"),
    # a replica's dtype defaults to bfloat16 on a GPU: bfloat16 storage would save nothing there
    (["--ray", "--storage-dtype", "bfloat16"], "--storage-dtype bfloat16 is not narrower than the model's --dtype "
                                               "bfloat16"),
    (["--ray", "--storage-dtype", "float8_e4m3fn", "--backend", "inductor"], "on a GPU (CUDA graphs"),
    (["--ray", "--storage-dtype", "float8_e4m3fn", "--precision", "fp8"], "use one of the two"),
])
def test_serve_ray_bad_arguments_exit_2(capsys, args, needle):
    assert cli.main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ralu: error:") and needle in err


def test_serve_ray_plan():
    plan = cli.check_serve(cli.build_parser().parse_args(["serve", "--ray", "--replicas", "1:4"]))
    assert plan.replicas == (1, 4) and plan.device is None and plan.dtype is None
    assert cli.check_serve(cli.build_parser().parse_args(["serve", "--ray", "--replicas", "3"])).replicas == 3
    weights = cli.check_serve(cli.build_parser().parse_args(["serve", "--ray", "--device", "cpu", "--dtype", "float32",
                                                             "--storage-dtype", "bfloat16", "--precision", "fp32"]))
    assert weights.storage_dtype == "bfloat16" and weights.defaults["precision"] == "fp32"


def test_replica_storage_dtype_is_checked_and_cast_on_load():
    """``ReplicaSpec.storage_dtype`` (``ralu serve --ray --storage-dtype``): refused when it names no storage dtype,
    is not narrower than the replicas' dtype (None: bfloat16) or the model is a callable; else each replica's
    transformer carries diffusers' layerwise casting from storage to its dtype."""
    pytest.importorskip("ray.serve")
    import torch
    from ralu_runtime.adapters.base import layerwise_casting
    from ralu_runtime.serving.ray import ReplicaSpec, load_model

    for kw, needle in [(dict(storage_dtype="int8"), "use one of float8_e4m3fn"),
                       (dict(storage_dtype="bfloat16"), "not narrower than the replicas' dtype 'bfloat16'"),
                       (dict(storage_dtype="float16", dtype="float16"), "not narrower"),
                       (dict(storage_dtype="float8_e4m3fn", model=functools.partial(gated_tiny_flux, control="c")), "callable model")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            ReplicaSpec(**kw)
    pipe, device, dtype = load_model(ReplicaSpec(model="tiny-flux", device="cpu", dtype="float32",
                                                 storage_dtype="bfloat16"))
    casts = [layerwise_casting(m) for m in pipe.transformer.modules()]
    hooks = [h for h in casts if h is not None]
    assert (device, dtype) == ("cpu", "float32") and hooks
    assert {(h.storage_dtype, h.compute_dtype) for h in hooks} == {(torch.bfloat16, torch.float32)}
    plain, _, _ = load_model(ReplicaSpec(model="tiny-flux", device="cpu", dtype="float32"))
    assert all(layerwise_casting(m) is None for m in plain.transformer.modules())


def test_serve_ray_names_the_extra_where_ray_is_missing():
    code = ("import sys\n"
            "sys.modules['ray'] = None\n"
            "import ralu_runtime, ralu_runtime.serving, ralu_runtime.cli\n"
            "sys.exit(ralu_runtime.cli.main(['serve', '--ray', '--device', 'cpu', '--port', '0']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("ralu: error:")][-1]
    assert "ray" in line and "pip install" in line and "[ray]" in line



# ------------------------------------------------------------------------------------------- the ingress alone
class _Call:
    """A fake replica call: awaitable, cancellable; answers ``reply`` unless ``hang``."""

    def __init__(self, reply, hang, log):
        self.reply, self.hang, self.log = reply, hang, log

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        import asyncio

        while self.hang:
            await asyncio.sleep(0.01)
        return self.reply

    def cancel(self):
        self.log.append("cancelled")


class _FakeReplicas:
    def __init__(self):
        self.calls, self.hang = [], False

    @property
    def generate(self):
        outer = self

        class _Method:
            def remote(self, prompt, kwargs, left, encoding=None):
                from ralu_runtime.serving.protocol import encode_images
                from PIL import Image

                outer.calls.append({"prompt": prompt, "kwargs": kwargs, "left": left, "encoding": encoding})
                images = encode_images([Image.new("RGB", (8, 8), (200, 10, 10))], encoding)
                return _Call({"images": images, "timings": {}, "schedule": None, "replica": "r1"}, outer.hang,
                             outer.calls)
        return _Method()


class _FakeBoard:
    class snapshot:
        @staticmethod
        def remote():
            from ralu_runtime.serving.ray import merge_metrics

            async def snap():
                return {"total": merge_metrics([]), "replicas": [{}], "gone": []}
            return snap()


@pytest.fixture
def lone_ingress():
    """The ingress's app over fake replicas and board, in a TestClient (no Ray cluster)."""
    pytest.importorskip("ray.serve")
    from starlette.testclient import TestClient

    from ralu_runtime.serving.ray import IngressOptions, RaluIngress, build_ingress_app

    key = "ingress-key-0123456789"
    ingress = RaluIngress(_FakeReplicas(), _FakeBoard(), IngressOptions(model_name="tiny-flux", api_keys=(key,),
                                                                        bound_host="127.0.0.1"))
    with TestClient(build_ingress_app(ingress), base_url="http://127.0.0.1:8000") as client:
        client.headers["authorization"] = f"Bearer {key}"
        yield ingress, client


def test_ingress_applies_the_access_policy(lone_ingress):
    ingress, client = lone_ingress
    body = {"prompt": "a fox", "seed": 1}
    assert_error(client.post(GENERATIONS, json=body, headers={"authorization": "Bearer nope-0123456789abcdef"}), 401,
                 code="invalid_api_key")
    assert_error(client.get("/metrics", headers={"authorization": ""}), 401)
    assert client.get("/health", headers={"authorization": ""}).status_code == 200
    assert_error(client.post(GENERATIONS, content=json.dumps(body), headers={"content-type": "text/plain"}), 415)
    assert_error(client.get("/v1/models", headers={"host": "evil.example"}), 421, code="host_not_allowed")
    assert_error(client.post(GENERATIONS, json=body, headers={"origin": "https://evil.example"}), 403)
    assert_error(client.post(GENERATIONS, json={**body, "guidance_scale": 1e308}), 400, "guidance_scale")
    assert not ingress.replicas.calls
    r = client.post(GENERATIONS, json={**body, "output_format": "webp", "output_compression": 40, "style": "vivid"})
    assert r.status_code == 200 and r.json()["output_format"] == "webp"
    assert ingress.replicas.calls[-1]["encoding"].format == "webp"
    assert ingress.replicas.calls[-1]["encoding"].quality == 40
    assert ingress.replicas.calls[-1]["left"] <= 600                  # the default request timeout
    assert client.get("/v1/models/tiny-flux").json()["id"] == "tiny-flux"
    assert_error(client.get("/v1/models/other"), 404, "model", "model_not_found")
    from prometheus_client.parser import text_string_to_metric_families

    m = {(x.name, tuple(sorted(x.labels.items()))): x.value
         for fam in text_string_to_metric_families(client.get("/metrics").text) for x in fam.samples}
    assert m[("ralu_requests_total", (("outcome", "ok"),))] == 1                   # counted at the ingress
    assert m[("ralu_requests_total", (("outcome", "invalid"),))] == 1
    assert m[("ralu_http_responses_total", (("code", "401"), ("path", GENERATIONS)))] == 1


def test_ingress_answers_503_from_the_stop_on_and_cuts_off_what_outlasts_the_grace(lone_ingress):
    ingress, client = lone_ingress
    ingress.replicas.hang = True
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, GENERATIONS, json={"prompt": "a fox", "seed": 2})
        wait_for(lambda: client.portal.call(ingress.inflight) == 1, timeout=30, what="the request to be in flight")
        assert client.portal.call(ingress.begin_shutdown) == 1
        h = client.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "shutting_down" and "retry-after" in h.headers
        assert h.json()["error"]["code"] == "unavailable"
        refused = client.post(GENERATIONS, json={"prompt": "a fox", "seed": 3})
        assert_error(refused, 503, code="unavailable")
        assert "retry-after" in refused.headers
        assert not running.done()
        assert client.portal.call(ingress.abort_unfinished) == 1
        cut = running.result(timeout=30)
    assert_error(cut, 503, code="unavailable")
    assert "retry-after" in cut.headers and "shut down" in cut.json()["error"]["message"]
    assert "cancelled" in ingress.replicas.calls                     # its replica call was cancelled
    assert client.portal.call(ingress.inflight) == 0


def test_serve_ray_refuses_a_public_address_without_a_key(monkeypatch):
    pytest.importorskip("ray.serve")
    from ralu_runtime.serving import ray as ralu_ray

    monkeypatch.setattr(ralu_ray.ray, "init", lambda *a, **k: pytest.fail("connected before the check"))
    with pytest.raises(ValueError, match="API key"):
        ralu_ray.run(ralu_ray.ReplicaSpec(), ralu_ray.IngressOptions(), host="0.0.0.0", port=0)


def test_ingress_refuses_image_edits_with_a_clear_404(lone_ingress):
    """/v1/images/edits is served by ``ralu serve`` without --ray only; the ingress says so (after the access
    checks) and sends nothing to a replica."""
    ingress, client = lone_ingress
    files = [("image", ("in.png", b"\x89PNG", "image/png"))]
    err = assert_error(client.post("/v1/images/edits", data={"prompt": "x"}, files=files), 404, code="not_found")
    assert "--ray" in err["message"]
    assert_error(client.post("/v1/images/edits", data={"prompt": "x"}, files=files,
                             headers={"authorization": ""}), 401)
    assert not ingress.replicas.calls
