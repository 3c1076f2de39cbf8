"""The serving engine (ralu_runtime.serving.engine) on tiny random FLUX / SD3 pipelines, CPU: every request's output
equals generate alone whatever else was in the batch (mixed presets, resolutions, stages, seeds, cancellations),
admission limits, deadlines, cancellation, shutdown, bad input refused at submission."""
import re
import threading
import time

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.serving import (DeadlineExceeded, Engine, EngineBusy, EngineClosed, EngineConfig,
                                  RequestCancelled)
from ralu_runtime.tiny import build_tiny
from helpers import assert_same, snapshot
from tiny_inputs import flux_embeds, sd3_embeds

A = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
B = RaluSchedule(steps=(3, 1, 2), ends=(0.4, 0.6, 1.0), shifts=(3.0, 2.0, 3.0), z=3.0, ratio=0.5)
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def flux():
    return build_tiny("tiny-flux")


@pytest.fixture(scope="module")
def sd3():
    return build_tiny("tiny-sd3")


def _requests(embeds):
    """Mixed presets, resolutions, baseline and a batch of two: (kwargs, seed) pairs."""
    e1, e2 = embeds(1, seed=1), embeds(2, seed=2)
    return [
        (dict(height=128, width=128, speedup=A, **e1), 11),
        (dict(height=64, width=96, speedup=B, **e2), 12),
        (dict(height=96, width=64, speedup=None, num_inference_steps=3, **e1), 13),
        (dict(height=128, width=64, speedup=A, return_masks=True, **embeds(1, seed=3)), 14),
    ]


def _alone(pipe, kw, seed):
    return generate(pipe, seed=seed, output_type="latent", progress=False, **kw)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("packed", [True, False])
def test_each_request_equals_generate_alone(family, packed, request):
    pipe = request.getfixturevalue(family)
    reqs = _requests(flux_embeds if family == "flux" else sd3_embeds)
    with Engine(pipe, EngineConfig(packed=packed, gather_timeout_s=0.05), output_type="latent") as eng:
        handles = [eng.submit(seed=seed, **kw) for kw, seed in reqs]
        outs = [h.result(timeout=300) for h in handles]
        m = eng.metrics()
    assert m["requests"]["ok"] == len(reqs)
    multi = m["batch_requests"]["count"] - m["batch_requests"]["counts"][0]  # model calls serving >= 2 requests
    assert multi > 0, "the scheduler never batched two requests"
    if packed and getattr(get_adapter(pipe), "packs", False):
        assert m["packed_calls"] > 0
    for (kw, seed), out in zip(reqs, outs):
        ref = _alone(pipe, kw, seed)
        torch.testing.assert_close(out.images, ref.images, **TOL)
        if kw.get("return_masks"):
            assert torch.equal(out.masks, ref.masks)


def test_cancel_and_deadline_leave_the_others_exact(flux):
    reqs = _requests(flux_embeds)
    with Engine(flux, EngineConfig(gather_timeout_s=0.05), output_type="latent") as eng:
        keep = eng.submit(seed=reqs[0][1], **reqs[0][0])
        doomed = eng.submit(seed=5, **reqs[1][0])
        late = eng.submit(seed=6, deadline_s=1e-3, **reqs[2][0])
        time.sleep(0.02)
        doomed.cancel()
        with pytest.raises(RequestCancelled):
            doomed.result(timeout=300)
        with pytest.raises(DeadlineExceeded):
            late.result(timeout=300)
        out = keep.result(timeout=300)
        m = eng.metrics()
    assert doomed.status == "cancelled" and late.status == "failed" and keep.status == "done"
    assert m["requests"]["cancelled"] == 1 and m["requests"]["deadline"] == 1 and m["requests"]["ok"] == 1
    torch.testing.assert_close(out.images, _alone(flux, *reqs[0]).images, **TOL)


def test_full_queue_is_busy_not_dropped(flux):
    gate = threading.Event()
    kw = dict(height=64, width=64, speedup=A, **flux_embeds(1))
    eng = Engine(flux, EngineConfig(max_active=1, max_queue=1, packed=False), output_type="latent")
    adapter = get_adapter(flux)
    original = adapter.velocity

    def slow(*a, **k):
        gate.wait(60)
        return original(*a, **k)

    adapter.velocity = slow   # ralu's adapter object; restored below
    try:
        first = eng.submit(seed=1, **kw)
        deadline = time.monotonic() + 30
        while first.status != "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        second = eng.submit(seed=2, **kw)          # waits in the queue
        with pytest.raises(EngineBusy, match="queue is full"):
            eng.submit(seed=3, **kw)
        assert eng.metrics()["requests"]["rejected"] == 1
    finally:
        gate.set()
        del adapter.velocity
    assert first.result(timeout=300).images.shape == second.result(timeout=300).images.shape
    eng.shutdown()
    with pytest.raises(EngineClosed):
        eng.submit(seed=4, **kw)


def test_a_burst_of_submits_admits_max_active_plus_max_queue(flux):
    """Requests submitted faster than the scheduler moves them from the queue to the active set: the bound counts
    both (the queue alone was checked against max_queue only once max_active requests were running, so a burst of
    20 into max_active=1, max_queue=0 admitted 19)."""
    gate = threading.Event()
    kw = dict(height=64, width=64, speedup=A, **flux_embeds(1))
    adapter = get_adapter(flux)
    original = adapter.velocity

    def held(*a, **k):
        gate.wait(60)
        return original(*a, **k)

    adapter.velocity = held   # nothing finishes during the burst
    try:
        for active, queue in ((1, 0), (2, 3)):
            eng = Engine(flux, EngineConfig(max_active=active, max_queue=queue, packed=False), output_type="latent")
            admitted, busy = [], 0
            for i in range(20):
                try:
                    admitted.append(eng.submit(seed=i, **kw))
                except EngineBusy as exc:
                    assert "queue is full" in str(exc) and f"max_active={active}, max_queue={queue}" in str(exc)
                    busy += 1
            assert (len(admitted), busy) == (active + queue, 20 - active - queue)
            assert eng.metrics()["requests"]["rejected"] == busy
            eng.shutdown(drain=False, timeout=0)
            gate.set()
            eng.shutdown(timeout=120)
            assert eng.closed
            gate.clear()
    finally:
        gate.set()
        del adapter.velocity


def test_shutdown_without_drain_rejects_the_queue(flux):
    kw = dict(height=64, width=64, speedup=A, **flux_embeds(1))
    eng = Engine(flux, EngineConfig(max_active=1), output_type="latent")
    handles = [eng.submit(seed=s, **kw) for s in range(4)]
    eng.shutdown(drain=False, timeout=300)
    assert eng.closed
    errors = []
    for h in handles:
        try:
            h.result(timeout=1)
            errors.append(None)
        except (EngineClosed, RequestCancelled) as e:
            errors.append(type(e))
    assert EngineClosed in errors          # the queued ones never started


@pytest.mark.parametrize("kw,match", [
    (dict(height=100), "height"), (dict(speedup="9x"), "9x"), (dict(backend="eager"), "belong to the engine"),
    (dict(parallel="ulysses"), "belong to the engine"),
    (dict(deadline_s=-1), "deadline_s"), (dict(region_source="pixels"), "region_source"),
    (dict(speedup=None, region_source="latent"), "region_source='latent' applies to RALU runs"),  # was ignored
    (dict(pipe="other"), "pipe: a request runs on the engine's pipeline")])  # prepare's "multiple values" TypeError
def test_bad_requests_refused_at_submission(flux, kw, match):
    with Engine(flux, output_type="latent") as eng:
        with pytest.raises((ValueError, TypeError), match=match):
            eng.submit(seed=0, **{**flux_embeds(1), **kw})
        m = eng.metrics()
    assert m["model_calls"] == 0 and m["queue_depth"] == 0


@pytest.mark.parametrize("defaults, error, match", [
    (dict(bogus=1), TypeError, r"^Engine default arguments: got an unexpected keyword argument 'bogus'"),
    (dict(backend="nonsense"), ValueError, r"^backend='nonsense' is not allowed"),
    (dict(backend="eager", compile_options={"bogus": 1}), TypeError, r"^compile options \['bogus'\] are not known"),
    (dict(precision="fp9"), ValueError, r"^precision='fp9' is not allowed"),
    (dict(output_type="jpg"), ValueError, r"^output_type='jpg' is not allowed"),
    (dict(solver="rk4"), ValueError, r"^solver='rk4' is not allowed"),
    (dict(cache="nope"), ValueError, r"^cache='nope' is not allowed"),
    (dict(return_masks="yes"), TypeError, r"^return_masks='yes': use True or False"),
    # those that need the model (checked with prepare and one-token zero embeddings)
    (dict(height=100), ValueError, r"^Engine default arguments: height=100 is not allowed: RALU needs a positive"),
    (dict(speedup="9x"), ValueError, r"^Engine default arguments: unknown preset '9x' for family 'flux'"),
    (dict(seed=-1), ValueError, r"^Engine default arguments: seed=-1 is not allowed"),
    (dict(guidance_scale=1e9), ValueError, r"^Engine default arguments: guidance_scale=1000000000.0 is not allowed"),
    (dict(num_frames=5), ValueError, r"^Engine default arguments: num_frames=5 is not allowed: flux makes images"),
    (dict(height=4096, width=4096, speedup=None, num_inference_steps=1000), ValueError,
     r"^Engine default arguments: .*ralu_runtime.limits"),
    # generate arguments the engine owns: where each belongs instead (all said "set on the pipeline")
    (dict(limits={"max_images": 2}), ValueError, r"^limits: the engine's bounds are EngineConfig\(max_images="),
    (dict(progress=False), ValueError, r"^progress: an engine shows no progress bars"),
    (dict(device="cpu"), ValueError, r"^device: set on the pipeline before building the engine \(pipe.to"),
    (dict(config={"max_active": 2}), TypeError, r"^config=dict: give an EngineConfig"),  # was an AttributeError
])
def test_bad_defaults_refused_when_the_engine_is_built(flux, defaults, error, match):
    """Default arguments that every request would fail on are refused by the constructor (they were accepted, and
    each request then failed at submission): no scheduler thread is started."""
    threads = set(threading.enumerate())
    with pytest.raises(error, match=match):
        Engine(flux, **defaults)
    assert not [t for t in set(threading.enumerate()) - threads if t.name == "ralu-engine"]


def test_model_defaults_of_an_editing_pipeline_are_checked_with_each_request():
    """An editing pipeline needs an image from every request, so its defaults cannot be checked alone when the engine
    is built: a good default is accepted there (and used), a bad one fails each request that uses it."""
    from ralu_runtime.tiny.flux_fill import build_tiny_flux_fill_pipeline

    pipe = build_tiny_flux_fill_pipeline()
    with Engine(pipe, output_type="latent", height=100, width=64) as eng:
        with pytest.raises(ValueError, match="height=100 is not allowed"):
            eng.submit(seed=0, image=torch.zeros(1, 3, 100, 64), mask_image=torch.ones(1, 1, 100, 64),
                       **flux_embeds(1))


def test_a_default_generator_is_refused_and_a_default_seed_gives_way_to_the_requests():
    """Same seed, same image through the engine: a generator among the engine's defaults was shared by every request
    (two identical requests gave two images, each depending on how many requests had drawn from it before, and a
    request with its own seed failed: 'pass either generator or seed'); it is refused. A default seed applies to
    requests that give neither, and gives way to a request's own seed or generator."""
    pipe = build_tiny("tiny-flux")
    with pytest.raises(ValueError, match="generator"):
        Engine(pipe, generator=torch.Generator().manual_seed(0))
    kw = dict(height=64, width=64, speedup=A, **flux_embeds(1))
    with Engine(pipe, output_type="latent", seed=5) as eng:
        outs = [eng.generate(timeout=300, **kw), eng.generate(timeout=300, seed=6, **kw),
                eng.generate(timeout=300, generator=torch.Generator().manual_seed(7), **kw),
                eng.generate(timeout=300, **kw)]
    for out, seed in zip(outs, (5, 6, 7, 5)):
        assert torch.equal(out.images, _alone(pipe, kw, seed).images), seed


def test_token_budget_bounds_every_multi_request_call(flux):
    kw = dict(height=128, width=128, speedup=None, num_inference_steps=2, **flux_embeds(1))   # 64 tokens a call
    with Engine(flux, EngineConfig(token_budget=100, gather_timeout_s=0.05), output_type="latent") as eng:
        hs = [eng.submit(seed=s, **kw) for s in range(3)]
        for h in hs:
            h.result(timeout=300)
        m = eng.metrics()
    # 64-token calls under a 100-token budget: never two in one model call
    assert m["batch_requests"]["counts"][0] == m["batch_requests"]["count"] == m["model_calls"] == 6


def test_an_fp8_default_runs_every_packed_request_in_fp8():
    """``Engine(..., precision="fp8")`` (``ralu serve --precision fp8``): requests of two sizes packed into shared
    model calls each equal ``generate(..., precision="fp8")`` alone (the CPU's fp8 kernel) and differ from the
    model's own precision by fp8's error (0.1-1 % here), so the packed calls really ran the quantized copies."""
    pipe = build_tiny("tiny-flux")  # its own: the fp8 runner stays installed on the pipeline after the engine
    reqs = [(dict(height=128, width=128, speedup=A, **flux_embeds(1, seed=1)), 11),
            (dict(height=64, width=96, speedup=A, **flux_embeds(1, seed=2)), 12)]
    with Engine(pipe, EngineConfig(gather_timeout_s=0.05), output_type="latent", precision="fp8") as eng:
        outs = [h.result(timeout=300) for h in [eng.submit(seed=seed, **kw) for kw, seed in reqs]]
        assert eng.metrics()["packed_calls"] > 0
    for (kw, seed), out in zip(reqs, outs):
        torch.testing.assert_close(out.images, _alone(pipe, dict(kw, precision="fp8"), seed).images, **TOL)
        own = _alone(pipe, dict(kw, precision="auto"), seed).images
        rel = float((out.images - own).norm() / own.norm())
        assert 1e-4 < rel < 2e-2, rel


def test_request_tokens_count_cfg_rows_only_where_the_family_runs_cfg():
    """A request's budgeted tokens double only where its call runs CFG (adapter.runs_cfg): Qwen-Image runs true CFG
    with a negative prompt only, Z-Image at any guidance above 0; each request's count is its largest model call's."""
    from ralu_runtime.tiny.qwen_image import random_embeds as qwen_embeds
    from ralu_runtime.tiny.z_image import random_embeds as z_embeds

    size = dict(height=64, width=96, speedup=None, num_inference_steps=2)   # 4 x 6 image tokens
    for name, embeds, cases in (("tiny-qwen-image", qwen_embeds, ((4.0, False, 24), (4.0, True, 48), (1.0, True, 24))),
                                ("tiny-z-image", z_embeds, ((0.5, True, 48), (0.0, True, 24)))):
        pipe = build_tiny(name)
        with Engine(pipe, EngineConfig(gather_timeout_s=0.01), output_type="latent") as eng:
            for guidance, cfg, want in cases:  # one at a time: each model call is this request's alone
                before = eng.metrics()["batch_tokens"]["sum"]
                h = eng.submit(seed=0, guidance_scale=guidance, **size, **embeds(pipe, 1, 8, seed=1, cfg=cfg))
                h.result(timeout=300)
                ran = eng.metrics()["batch_tokens"]["sum"] - before   # the tokens its 2 model calls processed
                assert (h.tokens, ran) == (want, 2 * want), (name, guidance, cfg)


def test_engine_leaves_the_pipeline_as_found():
    """An engine on the eager backend with fused q/k/v serving its warm-up requests (warmup_variants) and then mixed
    requests in packed calls (presets, sizes, a baseline, a feature cache, batched final decodes), one cancelled at
    shutdown: the pipeline as found (tests/helpers.py's snapshot, with the transformer's private attributes)."""
    pipe = build_tiny("tiny-flux")  # its own: the backend installed here stays on it (later calls keep it)
    before = snapshot(pipe, extra={"transformer": pipe.transformer})
    eng = Engine(pipe, EngineConfig(gather_timeout_s=0.2), output_type="latent", backend="eager",
                 compile_options={"fused_qkv": True})
    try:
        for extra in eng.warmup_variants():
            eng.generate(seed=0, height=64, width=64, timeout=300, **flux_embeds(1), **extra)
        kws = [dict(height=64, width=64, speedup=A, **flux_embeds(1, seed=1)),
               dict(height=64, width=96, speedup=B, **flux_embeds(2, seed=2)),
               dict(height=96, width=64, speedup=None, num_inference_steps=2, **flux_embeds(1, seed=3)),
               dict(height=64, width=64, speedup=A, cache="taylorseer:2", output_type="pt", **flux_embeds(1)),
               dict(height=64, width=96, speedup=B, output_type="pt", **flux_embeds(1, seed=4))]
        for h in [eng.submit(seed=s, **kw) for s, kw in enumerate(kws)]:
            h.result(timeout=300)
        assert eng.metrics()["packed_calls"] > 0
        eng.submit(seed=9, height=128, width=128, speedup=A, **flux_embeds(1))
    finally:
        eng.shutdown(drain=False, timeout=60)
    assert_same(before, snapshot(pipe, extra={"transformer": pipe.transformer}))


def test_done_callbacks_and_closing_flag(flux):
    seen = []
    with Engine(flux, output_type="latent") as eng:
        h = eng.submit(seed=0, height=64, width=64, speedup=A, **flux_embeds(1))
        h.add_done_callback(lambda x: seen.append(("early", x.status)))
        h.result(timeout=300)
        h.add_done_callback(lambda x: seen.append(("late", x.status)))
        h.add_done_callback(lambda x: 1 / 0)          # a failing callback is logged, not raised
        assert not eng.closing
    assert eng.closing and eng.closed
    assert seen == [("early", "done"), ("late", "done")]


def test_final_decodes_are_batched_and_equal_single_decodes(flux):
    kw = dict(height=64, width=96, speedup=A, output_type="pt", **flux_embeds(1))
    with Engine(flux, EngineConfig(gather_timeout_s=0.2)) as eng:
        hs = [eng.submit(seed=s, **kw) for s in (1, 2, 3)]
        outs = [h.result(timeout=300).images for h in hs]
        m = eng.metrics()
    assert m["decode_batches"]["count"] < 3            # at least two final decodes ran as one batch
    for s, out in zip((1, 2, 3), outs):
        ref = generate(flux, seed=s, progress=False, **kw).images
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_transformer_swap_reaches_the_next_requests_packed_or_not():
    """``pipe.transformer = other`` while an engine serves the pipeline: requests submitted after it run the new
    transformer, in packed calls too (the engine packed every call on the adapter it was built with, so the new
    requests silently ran the old model), and their final decodes are batched apart from the old requests'."""
    pipe, other = build_tiny("tiny-flux"), build_tiny("tiny-flux", seed=3)
    reqs = [(dict(height=64, width=64, speedup=A, **flux_embeds(1, seed=1)), 7),
            (dict(height=64, width=64, speedup=A, **flux_embeds(1, seed=2)), 8)]
    with Engine(pipe, EngineConfig(gather_timeout_s=0.5)) as eng:
        before = [h.result(timeout=300).images for h in [eng.submit(seed=s, output_type="latent", **kw)
                                                          for kw, s in reqs]]
        old = eng.adapter
        pipe.transformer = other.transformer
        assert eng.adapter is not old and eng.adapter.transformer is other.transformer
        packed_before = eng.metrics()["packed_calls"]
        after = [h.result(timeout=300).images for h in [eng.submit(seed=s, output_type="latent", **kw)
                                                         for kw, s in reqs]]
        assert eng.metrics()["packed_calls"] > packed_before          # the new requests were packed together
    fresh = build_tiny("tiny-flux")
    fresh.transformer = other.transformer
    for (kw, seed), got, was in zip(reqs, after, before):
        torch.testing.assert_close(got, _alone(fresh, kw, seed).images, **TOL)
        assert (got - was).abs().max() > 1e-2


def test_warmup_variants_cover_the_calls_a_request_can_take():
    """Qwen-Image runs true CFG only with a negative prompt: the server's warm-up makes one request of each kind
    (the first request with a negative prompt compiled anew otherwise); SD3 runs CFG either way, FLUX.1 never."""
    for name, want in (("tiny-qwen-image", [{}, {"negative_prompt": "ralu warm-up"}]), ("tiny-sd3", [{}]),
                       ("tiny-flux", [{}])):
        with Engine(build_tiny(name), output_type="latent") as eng:
            assert eng.warmup_variants() == want, name
    with Engine(build_tiny("tiny-qwen-image"), output_type="latent", guidance_scale=1.0) as eng:
        assert eng.warmup_variants() == [{}]   # no CFG at all at guidance 1


_EXIT_SCRIPT = """
import atexit, sys, time
seen = {}
atexit.register(lambda: print("statuses", seen["h"].status, seen["q"].status, flush=True))  # runs after ralu's
from ralu_runtime.serving import Engine, EngineConfig
from ralu_runtime.tiny import build_tiny
from ralu_runtime.tiny.flux import random_embeds
pipe = build_tiny("tiny-flux")
eng = Engine(pipe, EngineConfig(max_active=1), output_type="latent")
seen["h"] = eng.submit(seed=0, height=256, width=256, speedup=None, num_inference_steps=50,
                       **random_embeds(pipe, 1, 8))
seen["q"] = eng.submit(seed=1, height=64, width=64, **random_embeds(pipe, 1, 8))
while eng.metrics()["model_calls"] < 2:
    time.sleep(0.01)
print("exiting", flush=True)  # no shutdown: the request is inside its model calls
"""


def test_an_engine_left_running_at_exit_is_shut_down_not_aborted():
    """A script that ends while an engine runs a request (no shutdown, no context manager): the interpreter exit
    cancels the running request and rejects the queued one, and the process exits 0 (its daemon threads inside torch
    ops aborted it: 'terminate called without an active exception', rc 134, 2 of 3 runs before)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exiting" in proc.stdout and "statuses cancelled failed" in proc.stdout, proc.stdout
    assert "2 unfinished request(s) rejected or cancelled" in proc.stderr


def test_shutdown_returns_once_the_engines_threads_have_ended(flux):
    """After ``with Engine(...)`` no engine thread runs: a request thread still running after its result was handed
    over (here: its done callback) is joined by shutdown (one left running at interpreter exit aborted the process,
    rc 134, in 5 of 12 runs of a script that used an engine in a with block and then exited)."""
    with Engine(flux, EngineConfig(gather_timeout_s=0.01)) as eng:
        h = eng.submit(seed=1, height=64, width=64, speedup=A, **flux_embeds(1, seed=1))
        h.add_done_callback(lambda _h: time.sleep(0.5))
        h.result(timeout=120)
    alive = [t.name for t in threading.enumerate() if t.name.startswith(("ralu-request", "ralu-engine"))]
    assert alive == [] and eng.closed and not eng._workers


def _two_then_one(eng, **kw):
    """Two requests in lockstep (their final decodes batched), then one more: the outcomes, as names or "ok"."""
    def outcome(h):
        try:
            h.result(timeout=60)
            return "ok"
        except BaseException as e:  # noqa: BLE001
            return type(e).__name__
    with eng._lock:  # both queued before the scheduler admits either: every step, the final decode included, has both
        first = [eng.submit(seed=s, height=64, width=64, speedup=A, **flux_embeds(1, seed=s), **kw) for s in (1, 2)]
    first = [outcome(h) for h in first]
    return first, outcome(eng.submit(seed=3, height=64, width=64, speedup=A, **flux_embeds(1, seed=3), **kw))


def test_an_interrupted_batched_decode_fails_its_requests_and_the_engine_serves_on():
    """A KeyboardInterrupt from the VAE in a batched final decode fails the requests of that batch (was: it ended the
    engine's scheduler thread, and every request then waited forever); the next request is served."""
    pipe = build_tiny("tiny-flux")
    vae, seen = pipe.vae, []
    decode = vae.decode

    def interrupted_once(latents, *a, **kw):
        if latents.shape[0] >= 2 and not seen:  # the batched final decode (previews decode one request each)
            seen.append(latents.shape[0])
            raise KeyboardInterrupt("decode interrupted")
        return decode(latents, *a, **kw)

    vae.decode = interrupted_once
    try:
        with Engine(pipe, EngineConfig(gather_timeout_s=10.0), output_type="pt") as eng:  # decodes batched when loaded
            assert _two_then_one(eng) == (["KeyboardInterrupt", "KeyboardInterrupt"], "ok")
            assert eng.metrics()["requests"]["error"] == 2
    finally:
        del vae.decode
    assert seen == [2]


def test_a_failure_at_the_end_of_a_step_fails_its_calls_and_the_engine_serves_on(flux):
    """An error raised by the scheduler's own step code (here its metrics; on a GPU, an asynchronous CUDA error at the
    step's synchronize) fails the request of that step (was: the scheduler thread died and every request hung); the
    next request is served."""
    with Engine(flux, EngineConfig(gather_timeout_s=0.5), output_type="latent") as eng:
        observe, raised = eng._step_latency.observe, []

        def fail_once(v):
            if not raised:
                raised.append(v)
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
            observe(v)

        eng._step_latency.observe = fail_once
        h = eng.submit(seed=1, height=64, width=64, speedup=A, **flux_embeds(1))
        with pytest.raises(RuntimeError, match="illegal memory access"):
            h.result(timeout=60)
        eng.generate(seed=2, height=64, width=64, speedup=A, timeout=60, **flux_embeds(1))
        assert eng.metrics()["requests"]["error"] == 1
    assert raised


def test_a_failed_packed_call_runs_each_request_on_its_own():
    """A packed model call that raises (out of memory for the pack, simulated) is run again per request, each request
    then equal to generate alone (was: every request of the pack failed with the pack's error)."""
    pipe = build_tiny("tiny-flux")
    adapter, failed = get_adapter(pipe), []

    def out_of_memory(calls):
        failed.append(len(calls))
        raise RuntimeError("CUDA out of memory (simulated)")

    adapter.packed_velocity = out_of_memory
    try:
        with Engine(pipe, EngineConfig(gather_timeout_s=0.5), output_type="latent") as eng:
            kws = [dict(seed=s, height=64, width=64 + 32 * s, speedup=A, **flux_embeds(1, seed=s)) for s in (1, 2)]
            outs = [h.result(timeout=60).images for h in [eng.submit(**kw) for kw in kws]]
            assert eng.metrics()["packed_calls"] == 0
    finally:
        del adapter.packed_velocity
    assert failed and min(failed) >= 2
    for kw, out in zip(kws, outs):
        torch.testing.assert_close(out, _alone(pipe, {k: v for k, v in kw.items() if k != "seed"}, kw["seed"]).images,
                                   **TOL)


def test_a_request_failing_in_the_model_fails_alone_and_leaves_the_pipeline_as_found():
    """A layer of the user's model raising in one request's model call: that request fails with the user's error, the
    next request equals generate alone on a fresh pipeline bitwise, and the pipeline is as found (full snapshot)."""
    pipe, fresh = build_tiny("tiny-flux"), build_tiny("tiny-flux")
    before = snapshot(pipe, extra={"transformer": pipe.transformer})
    norm = pipe.transformer.transformer_blocks[0].norm1

    def broken(*args, **kwargs):
        raise ValueError("the user's layer failed")

    kw = dict(height=64, width=96, speedup=A, **flux_embeds(1, seed=4))
    try:
        with Engine(pipe, EngineConfig(packed=False, gather_timeout_s=0.05), output_type="latent", backend="eager",
                    compile_options={"fused_qkv": True}) as eng:
            norm.forward = broken
            try:
                with pytest.raises(ValueError, match="the user's layer failed"):
                    eng.generate(seed=3, timeout=60, **kw)
            finally:
                del norm.forward
            out = eng.generate(seed=3, timeout=60, **kw).images
    finally:
        assert_same(before, snapshot(pipe, extra={"transformer": pipe.transformer}))
    ref = generate(fresh, seed=3, output_type="latent", progress=False, backend="eager",
                   compile_options={"fused_qkv": True}, **kw).images
    assert torch.equal(out, ref)


def test_a_forward_set_on_a_module_the_packed_call_decomposes_runs_unpacked():
    """A pass-through forward set on a block's AdaLN module (which the one-request call runs as a module and the packed
    call decomposes into its layers): the packed call falls back to one call per request, the user's forward runs in
    each model call as in generate alone, and each result equals generate alone (was: packed, the forward silently
    skipped)."""
    import types

    pipe = build_tiny("tiny-flux")
    norm = pipe.transformer.transformer_blocks[0].norm1
    ran = []

    def mine(self, *args, **kwargs):
        ran.append(1)
        return type(self).forward(self, *args, **kwargs)

    norm.forward = types.MethodType(mine, norm)
    try:
        with Engine(pipe, EngineConfig(gather_timeout_s=0.5), output_type="latent") as eng:
            kws = [dict(seed=s, height=64, width=64 + 32 * s, speedup=A, **flux_embeds(1, seed=s)) for s in (1, 2)]
            outs = [h.result(timeout=60).images for h in [eng.submit(**kw) for kw in kws]]
            m = eng.metrics()
        assert m["batch_requests"]["count"] > m["batch_requests"]["counts"][0]  # steps that had both requests
        served = len(ran)
        assert served > 0
        for kw, out in zip(kws, outs):
            alone = _alone(pipe, {k: v for k, v in kw.items() if k != "seed"}, kw["seed"]).images
            torch.testing.assert_close(out, alone, **TOL)
        assert len(ran) == 2 * served  # the same model calls again, one forward per call
    finally:
        del norm.forward


@pytest.mark.parametrize("field,value,text", [
    ("max_active", 0, "max_active=0: use an int >= 1"), ("max_active", True, "max_active=True"),
    ("max_queue", -1, "max_queue=-1"), ("max_queue", 2.0, "max_queue=2.0"),
    ("token_budget", 0, "token_budget=0"), ("token_budget", True, "token_budget=True"),
    ("gather_timeout_s", -0.1, "gather_timeout_s=-0.1"), ("gather_timeout_s", float("nan"), "gather_timeout_s=nan"),
    ("gather_timeout_s", True, "gather_timeout_s=True"), ("gather_timeout_s", 11, "gather_timeout_s=11"),
    ("packed", "no", "packed='no': use True or False"), ("packed", 0, "packed=0"),
])
def test_engine_config_refuses_bad_fields_naming_them(field, value, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        EngineConfig(**{field: value})
