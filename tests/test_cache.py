"""Temporal feature caches (TaylorSeer, first-block residual) and FLUX.1-schnell, on tiny random models (CPU)."""
import math

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.cache import CacheShapeError, FirstBlockCache, TaylorSeerCache, make_cache, set_cache
from tiny_inputs import flux_embeds

SCHED = RaluSchedule(steps=(2, 3, 4), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
SIZE = dict(height=64, width=96)  # coarse grid 2x3 = 6 tokens, fine 4x6 = 24


@pytest.fixture(scope="module")
def schnell_pipe():
    from ralu_runtime.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(seed=1, guidance_embeds=False)


def run(pipe, speedup=SCHED, seed=3, **kw):
    kw.setdefault("num_inference_steps", 8 if speedup is None else None)
    return generate(pipe, **flux_embeds(), **SIZE, speedup=speedup, seed=seed, output_type="latent",
                    progress=False, **kw)


class BlockCounter:
    """Counts calls of the last transformer block (= full block-stack evaluations)."""

    def __init__(self, pipe):
        self.n = 0
        self.handle = pipe.transformer.single_transformer_blocks[-1].register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- TaylorSeer
@pytest.mark.parametrize("speedup", [None, SCHED], ids=["baseline", "ralu"])
def test_taylorseer_w1_equals_uncached(flux_pipe, speedup):
    ref = run(flux_pipe, speedup)
    for target in ("residual", "output"):
        out = run(flux_pipe, speedup, cache=TaylorSeerCache(1, order=2, target=target))
        assert torch.equal(out.images, ref.images)
        assert out.cache_stats["cached"] == 0
    assert ref.cache_stats is None
    assert get_adapter(flux_pipe).feature_cache is None  # restored after the call


@pytest.mark.parametrize("speedup", [None, SCHED], ids=["baseline", "ralu"])
@pytest.mark.parametrize("spec", ["taylorseer:2", "taylorseer:3", "taylorseer:3:2", "taylorseer:2:0"])
def test_taylorseer_skips_blocks_and_stays_close(flux_pipe, speedup, spec):
    with BlockCounter(flux_pipe) as full:
        ref = run(flux_pipe, speedup)
    with BlockCounter(flux_pipe) as cached:
        out = run(flux_pipe, speedup, cache=spec)
    assert cached.n < full.n
    assert cached.n == out.cache_stats["full"]
    assert out.cache_stats["full"] + out.cache_stats["cached"] == full.n
    assert torch.isfinite(out.images).all()
    assert not torch.equal(out.images, ref.images)
    assert rel(out.images, ref.images) < 0.25


def test_taylorseer_resets_at_every_ralu_stage(flux_pipe):
    cache = TaylorSeerCache(3, warmup=1)
    out = run(flux_pipe, SCHED, cache=cache)
    stages = out.cache_stats["stages"]
    assert [s["pattern"] for s in stages] == ["FC", "FCC", "FCCF"]  # counters restart at each stage
    tokens = [s["tokens"] for s in stages]
    assert tokens[0] == 6 and tokens[2] == 24 and tokens[0] < tokens[1] < tokens[2]
    assert out.cache_stats == cache.stats()
    assert cache.plan(4) == "FCCF" and TaylorSeerCache(2).plan(6) == "FFCFCF"  # default warmup = order + 1
    assert TaylorSeerCache(3, order=2).plan(8) == "FFFCCFCC"
    out = run(flux_pipe, SCHED, cache="taylorseer:3")
    assert [s["pattern"] for s in out.cache_stats["stages"]] == ["FF", "FFC", "FFCC"]


def test_stale_shapes_are_caught(flux_pipe, monkeypatch):
    adapter = get_adapter(flux_pipe)
    monkeypatch.setattr(adapter, "begin_stage", lambda: None)  # a sampler that forgets the stage reset
    with pytest.raises(CacheShapeError, match="changed shape"):
        run(flux_pipe, SCHED, cache=TaylorSeerCache(3, order=1))
    out = run(flux_pipe, SCHED, cache=TaylorSeerCache(3, on_shape_change="reset"))
    assert [s["tokens"] for s in out.cache_stats["stages"]][0] == 6 and len(out.cache_stats["stages"]) == 3
    monkeypatch.undo()
    assert get_adapter(flux_pipe).feature_cache is None


def test_taylor_extrapolation_exact_for_polynomials():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 3, dtype=torch.float64)
    coef = torch.randn(3, 2, 5, 3, dtype=torch.float64)
    sigmas = [1.0, 0.93, 0.8, 0.71, 0.5, 0.42, 0.2]  # non-uniform, like a shifted RALU stage
    for order in (0, 1, 2):
        poly = lambda s: sum(coef[j] * s**j for j in range(order + 1))  # noqa: E731
        cache = TaylorSeerCache(3, order=order, warmup=order + 1, target="output")
        for s in sigmas:
            out = cache(lambda: poly(s), hidden, torch.tensor(1000.0 * s))
            torch.testing.assert_close(out, poly(s), rtol=1e-9, atol=1e-9)
        assert cache.stats()["cached"] > 0
    # order 1 is not exact for a quadratic: extrapolation happens (no hidden full call)
    calls = []
    cache = TaylorSeerCache(4, order=1, warmup=2)
    for s in sigmas:
        cache(lambda: calls.append(s) or hidden * s**2, hidden, 1000.0 * s)
    assert calls == [1.0, 0.93, 0.42]


def test_direct_shape_guard():
    cache = TaylorSeerCache(2)
    cache(lambda: torch.ones(1, 4, 2), torch.zeros(1, 4, 2), torch.tensor(900.0))
    with pytest.raises(CacheShapeError):
        cache(lambda: torch.ones(1, 6, 2), torch.zeros(1, 6, 2), torch.tensor(800.0))
    cache.reset()
    out = cache(lambda: torch.ones(1, 6, 2), torch.zeros(1, 6, 2), torch.tensor(800.0))
    assert out.shape == (1, 6, 2) and [s["tokens"] for s in cache.stats()["stages"]] == [4, 6]


# ----------------------------------------------------------------------------- first-block cache
@pytest.mark.parametrize("speedup", [None, SCHED], ids=["baseline", "ralu"])
def test_fbcache(flux_pipe, speedup):
    ref = run(flux_pipe, speedup)
    exact = run(flux_pipe, speedup, cache="fbcache:0")
    assert torch.equal(exact.images, ref.images) and exact.cache_stats["cached"] == 0
    with BlockCounter(flux_pipe) as counter:
        skip = run(flux_pipe, speedup, cache=FirstBlockCache(1e9))
    # everything but the first step of each stage is cached
    assert all(s["pattern"] == "F" + "C" * (len(s["pattern"]) - 1) for s in skip.cache_stats["stages"])
    assert counter.n == skip.cache_stats["full"] == len(skip.cache_stats["stages"])
    assert torch.isfinite(skip.images).all() and not torch.equal(skip.images, ref.images)
    capped = run(flux_pipe, speedup, cache=FirstBlockCache(1e9, max_cached=1))
    assert all("CC" not in s["pattern"] for s in capped.cache_stats["stages"])


def test_fbcache_sd3_split_blocks(sd3_pipe):
    g = torch.Generator().manual_seed(0)
    emb = {"prompt_embeds": torch.randn(1, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(1, 64, generator=g),
           "negative_prompt_embeds": torch.randn(1, 8, 32, generator=g),
           "negative_pooled_prompt_embeds": torch.randn(1, 64, generator=g)}
    kw = dict(**emb, height=64, width=64, speedup=None, num_inference_steps=4, seed=0, output_type="latent",
              progress=False)
    ref = generate(sd3_pipe, **kw)
    assert torch.equal(generate(sd3_pipe, **kw, cache="fbcache:0").images, ref.images)
    assert torch.equal(generate(sd3_pipe, **kw, cache="taylorseer:1").images, ref.images)
    out = generate(sd3_pipe, **kw, cache="taylorseer:2")
    assert out.cache_stats["stages"][0]["pattern"] == "FFCF" and torch.isfinite(out.images).all()


def test_fbcache_needs_split_blocks():
    with pytest.raises(TypeError, match="split block stack"):
        FirstBlockCache(0.1)(lambda: torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.tensor(500.0))


# ----------------------------------------------------------------------------- API
def test_make_cache_specs():
    c = make_cache("taylorseer:2:2")
    assert isinstance(c, TaylorSeerCache) and (c.interval, c.order) == (2, 2)
    assert make_cache("TaylorSeer:3").order == 1 and make_cache("taylorseer:3").warmup == 2
    assert make_cache("taylorseer:3:2:1").warmup == 1
    assert make_cache("fbcache:0.05").threshold == 0.05
    assert make_cache(None) is None and make_cache("none") is None
    assert make_cache(c) is c
    for bad in ("taylorseer", "taylorseer:0", "taylorseer:2:1:0", "taylorseer:2:1:1:1", "taylorseer:x", "fbcache", "fbcache:-1", "teacache:1", 3):
        with pytest.raises(ValueError):
            make_cache(bad)


def test_generate_rejects_bad_cache_early(flux_pipe):
    with pytest.raises(ValueError, match="cache"):
        run(flux_pipe, SCHED, cache="taylorseer:zero")


def test_set_cache_context_and_persistent(flux_pipe):
    adapter = get_adapter(flux_pipe)
    ref = run(flux_pipe, SCHED, cache=TaylorSeerCache(3))
    with set_cache(flux_pipe, "taylorseer:3") as cache:
        assert adapter.feature_cache is cache
        out = run(flux_pipe, SCHED)  # cache=None keeps the attached cache
        assert out.cache_stats == cache.stats() and cache.cached_steps > 0
        assert torch.equal(out.images, ref.images)
        off = run(flux_pipe, SCHED, cache="none")  # disable for one call
        assert off.cache_stats is None and adapter.feature_cache is cache
    assert adapter.feature_cache is None
    set_cache(flux_pipe, "fbcache:0")
    try:
        assert isinstance(adapter.feature_cache, FirstBlockCache)
    finally:
        set_cache(flux_pipe, None)
    assert adapter.feature_cache is None


def test_cli_cache_flag():
    from ralu_runtime.cli import build_parser

    args = build_parser().parse_args(["generate", "--cache", "taylorseer:2"])
    assert args.cache == "taylorseer:2"
    assert build_parser().parse_args(["generate"]).cache is None


# ----------------------------------------------------------------------------- FLUX.1-schnell
def test_schnell_presets_end_to_end(schnell_pipe):
    adapter = get_adapter(schnell_pipe)
    assert adapter.family == "flux-schnell" and adapter.default_steps == 4 and adapter.base_shift == 1.0
    out = run(schnell_pipe, "default", guidance_scale=0.0)
    assert out.schedule.name == "flux-schnell/4step" and out.schedule.total_steps == 4
    assert [r.steps for r in out.records if r.name.startswith("stage")] == [1, 1, 2]
    assert torch.isfinite(out.images).all()
    base = generate(schnell_pipe, **flux_embeds(), **SIZE, speedup=None, seed=3, output_type="latent", progress=False)
    assert [r.steps for r in base.records] == [4] and torch.isfinite(base.images).all()
    # schnell's own scheduler: shift 1, so its sigmas are uniform 1, 0.75, 0.5, 0.25, 0
    _, sigmas = adapter.baseline_schedule(4, 24)
    torch.testing.assert_close(sigmas.cpu(), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # the cache works on schnell too (stage 3 of 2 steps: "FC")
    cached = run(schnell_pipe, "4step", cache="taylorseer:2:1:1")
    assert [s["pattern"] for s in cached.cache_stats["stages"]] == ["F", "F", "FC"]
    assert math.isfinite(float(cached.images.abs().max()))


def test_guidance_given_to_schnell_is_said_to_be_ignored(schnell_pipe, flux_pipe, caplog):
    """FLUX.1-schnell has no guidance embedding: a guidance_scale changes nothing (FluxPipeline drops it silently);
    prepare says so. FLUX.1-dev uses it: no warning."""
    from ralu_runtime import prepare

    with caplog.at_level("WARNING", logger="ralu"):
        prepare(schnell_pipe, guidance_scale=3.5, **SIZE, **flux_embeds())
        prepare(schnell_pipe, guidance_scale=0.0, **SIZE, **flux_embeds())
        prepare(flux_pipe, guidance_scale=3.5, **SIZE, **flux_embeds())
    assert [r.getMessage() for r in caplog.records if r.name == "ralu"   # (not the tiny size's own warning)
            and "upsamples no region" not in r.getMessage()] == [
        "guidance_scale=3.5 is ignored: FLUX.1-schnell's transformer has no guidance embedding (guidance_embeds=False)"]


@pytest.mark.parametrize("cls", [TaylorSeerCache, FirstBlockCache])
def test_cache_class_instead_of_object_is_refused_early(flux_pipe, cls):
    """A cache class (not an instance) is refused by make_cache / prepare / set_cache, naming cache=."""
    from ralu_runtime import prepare

    with pytest.raises(ValueError, match=f"cache={cls.__name__} is a class"):
        make_cache(cls)
    with pytest.raises(ValueError, match="cache=.* is a class"):
        prepare(flux_pipe, **flux_embeds(), **SIZE, speedup=SCHED, seed=3, output_type="latent", cache=cls)
    with pytest.raises(ValueError, match="is a class"):
        set_cache(flux_pipe, cls)
    assert get_adapter(flux_pipe).feature_cache is None


@pytest.mark.parametrize("bad", [dict(threshold=True), dict(threshold=False), dict(max_cached=True)])
def test_fbcache_refuses_booleans(bad):
    """FirstBlockCache(True) was threshold 1.0 (skip nearly every step) and max_cached=True one step: refused."""
    with pytest.raises(ValueError, match=f"{next(iter(bad))}={next(iter(bad.values()))!r} is not allowed"):
        FirstBlockCache(**bad)


def test_a_taylorseer_plan_that_caches_nothing_is_said(flux_pipe, caplog):
    """A warm-up as long as every stage (SCHED's stages have 2 / 3 / 4 steps) runs every step in full: the call
    costs an uncached one's. prepare warns; a plan that caches a step somewhere does not."""
    from ralu_runtime import prepare

    with caplog.at_level("WARNING", logger="ralu"):
        prepare(flux_pipe, **flux_embeds(), **SIZE, speedup=SCHED, cache=TaylorSeerCache(2, warmup=4))
        prepare(flux_pipe, **flux_embeds(), **SIZE, speedup=None, num_inference_steps=8,
                cache=TaylorSeerCache(2, warmup=8))
        prepare(flux_pipe, **flux_embeds(), **SIZE, speedup=SCHED, cache=TaylorSeerCache(2, warmup=3))  # 4: "FFFC"
        prepare(flux_pipe, **flux_embeds(), **SIZE, speedup=SCHED, cache=FirstBlockCache(0.1))  # no fixed plan
    said = [r.getMessage() for r in caplog.records if r.name == "ralu"
             and "upsamples no region" not in r.getMessage()]  # (the tiny size's own warning)
    assert len(said) == 2, said
    assert "caches no step" in said[0] and "stages of 2/3/4 steps" in said[0] and "warm-up 4" in said[0]
    assert "stages of 8 steps" in said[1]
    out = run(flux_pipe, SCHED, cache=TaylorSeerCache(2, warmup=4))
    assert out.cache_stats["cached"] == 0  # what the warning says
