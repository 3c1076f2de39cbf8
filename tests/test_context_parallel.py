"""Context parallelism (``generate(parallel=ContextParallelConfig(...))``) on the CPU: gloo process groups of 2 (and
4) local processes, the tiny FLUX model, results compared with a single-process run of the same call.

Tolerance (float32): max |parallel - single process| <= 1e-5 on latents of scale ~1 (measured: 4.8e-7 to 7.2e-7; the
attention sums the same keys in the same order, the rest is the same per-token arithmetic on fewer rows). Across
ranks the results are bitwise equal (the velocity is all-gathered; decodes are rank 0's), and each rank's pipeline is
left as found (also one set up by diffusers' ``enable_parallelism``). The eager cases run in one spawn of 2 processes
(~1 min on 2 cores, most of it importing diffusers in each process); the inductor case is ``slow`` (~3 min: two cold
CPU compiles at once).
"""
import os
from unittest import mock

import pytest
import torch

from tiny_inputs import flux_embeds
from mode_helpers import ATOL, OneRank, left_as_found, parallel_config, sharded_case

WORKER = f"{__name__}:"


# ------------------------------------------------------------------------------------------- in one process
def test_split_sizes_and_ranges():
    from ralu_runtime.parallel import shard_range, split_sizes

    assert split_sizes(27, 2) == [14, 13]
    assert split_sizes(24, 5) == [5, 5, 5, 5, 4]
    assert [len(c) for c in torch.arange(27).tensor_split(4)] == split_sizes(27, 4)
    assert shard_range(27, 4, 3) == (21, 27)


@pytest.mark.parametrize("cache", [None, "taylorseer:2"])
def test_one_rank_sharded_velocity_equals_the_unsharded_bitwise(flux_pipe, cache):
    """The FLUX blocks in the Sharded mode with a one-rank plan are the Dense call exactly (one block function for
    every mode: the sharded path is the same code with another join / attention), with and without a cache."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.adapters.base import TokenGrid
    from ralu_runtime.cache import make_cache
    from ralu_runtime.execution.call import call_scope
    from ralu_runtime.layout import grid_positions

    adapter = get_adapter(flux_pipe)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 12, adapter.token_channels, generator=g)
    grid = TokenGrid(grid_positions(3, 4).expand(2, -1, -1) + 0.5 * torch.rand(2, 12, 2, generator=g), (3, 4))
    emb = flux_embeds(2)
    cond = adapter.encode_prompt(None, prompt_embeds=emb["prompt_embeds"],
                                 pooled_prompt_embeds=emb["pooled_prompt_embeds"], guidance_scale=3.5)
    t = torch.tensor(500.0)
    outs = []
    with torch.no_grad():
        for sharding in (None, OneRank()):
            with call_scope(make_cache(cache) if cache else None, sharding=sharding):
                outs.append(adapter.velocity(tokens, grid, t, cond))
    assert torch.equal(outs[0], outs[1])


def test_bad_configs_are_refused_before_any_work(flux_pipe, sd3_pipe):
    from ralu_runtime import generate, prepare, run
    from tiny_inputs import sd3_embeds

    kw = dict(height=64, width=64, output_type="latent", progress=False)
    with pytest.raises(TypeError, match="ContextParallelConfig"):
        generate(flux_pipe, **flux_embeds(), parallel=2, **kw)
    from ralu_runtime.adapters.sd3 import SD3Adapter

    class Unsharded(SD3Adapter):  # a family whose model call cannot be sharded
        shards = False

    with pytest.raises(ValueError, match="not implemented for sd3 \\(Unsharded\\)"):
        generate(Unsharded(sd3_pipe), **sd3_embeds(), parallel=parallel_config(ulysses_degree=2), **kw)
    with pytest.raises(ValueError, match="backend='onnx'"):
        generate(flux_pipe, **flux_embeds(), parallel=parallel_config(ulysses_degree=2), backend="onnx", **kw)
    import dataclasses

    plan = dataclasses.replace(prepare(flux_pipe, **flux_embeds(), **kw), parallel=object())  # as if one resolved
    with pytest.raises(ValueError, match="serving engine"):
        run(plan, model_call=lambda adapter, velocity: velocity)
    with pytest.raises(ValueError, match="ulysses_degree=1.5 is not allowed: give an int >= 1"):  # was: run as 1
        prepare(flux_pipe, **flux_embeds(), parallel=parallel_config(ulysses_degree=1.5, ring_degree=2), **kw)
    with pytest.raises(ValueError, match="ulysses_degree=2.5 is not allowed"):  # was: run as 2
        prepare(flux_pipe, **flux_embeds(), parallel=parallel_config(ulysses_degree=2.5), **kw)
    with pytest.raises(ValueError, match="not initialised"):
        prepare(flux_pipe, **flux_embeds(), parallel=parallel_config(ring_degree=2), **kw)
    with pytest.raises(ValueError, match="not initialised"):  # no model was run: the check comes first
        generate(flux_pipe, **flux_embeds(), parallel=parallel_config(ring_degree=2), **kw)


def test_a_model_that_cannot_run_sharded_is_refused_before_any_work(sd3_pipe):
    """SD3 with another attention processor than JointAttnProcessor2_0 cannot run sharded: refused by prepare, before
    the process-group check (was: a ValueError at the first model call, after the groups and the text encoding)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from ralu_runtime import prepare
    from tiny_inputs import sd3_embeds

    class Custom(JointAttnProcessor2_0):
        pass

    procs = sd3_pipe.transformer.attn_processors
    sd3_pipe.transformer.set_attn_processor(Custom())
    try:
        with pytest.raises(ValueError, match="another processor: transformer_blocks.0.attn: Custom"):
            prepare(sd3_pipe, **sd3_embeds(), height=64, width=64, output_type="latent", progress=False,
                    parallel=parallel_config(ulysses_degree=2))
    finally:
        sd3_pipe.transformer.set_attn_processor(procs)


# ------------------------------------------------------------------------------------- 2 gloo processes
def _flux_worker():
    """Every case of the eager 2-rank test; returns plain tensors / strings for the parent to compare."""
    import torch.distributed as dist

    from ralu_runtime import generate
    from ralu_runtime.parallel import RanksDivergedError
    from ralu_runtime.tiny import build_tiny
    from helpers import snapshot

    rank = dist.get_rank()
    pipe = build_tiny("tiny-flux")
    emb = flux_embeds()
    found = snapshot(pipe, extra={"transformer": pipe.transformer})  # its private attributes (_parallel_config) too
    base = dict(output_type="latent", progress=False, return_masks=True)
    out = {}

    def both(name, ref_kw, par_kw, cfg):
        out[name] = sharded_case(pipe, cfg, par_kw, **emb, **base, **ref_kw)

    # 128 x 128, 7x: stage 1 16 tokens, stage 2 19 (odd), stage 3 64; joint with 8 text tokens: 24, 27, 72 rows
    ralu7 = dict(height=128, width=128, speedup="7x", seed=3)
    both("ulysses", ralu7, {}, parallel_config(ulysses_degree=2))
    both("ring", ralu7, {}, parallel_config(ring_degree=2, ring_anything=True))
    both("fused_qkv", ralu7, dict(backend="eager", compile_options={"fused_qkv": True}),
         parallel_config(ulysses_degree=2))
    both("taylorseer", dict(height=128, width=128, speedup="4x", seed=4, cache="taylorseer:2"), {},
         parallel_config(ulysses_degree=2, ulysses_anything=True))
    both("fbcache", dict(height=128, width=128, speedup="4x", seed=5, cache="fbcache:0.5"), {},
         parallel_config(ring_degree=2))
    both("baseline", dict(height=64, width=96, speedup=None, num_inference_steps=3, seed=6), {},
         parallel_config(ulysses_degree=2))
    both("batch2", dict(height=64, width=128, speedup="7x", seed=7, num_images_per_prompt=2), {},
         parallel_config(ulysses_degree=2))
    # images: every rank returns rank 0's decode
    ref = generate(pipe, **emb, height=128, width=128, speedup="7x", seed=3, output_type="pt", progress=False)
    par = generate(pipe, **emb, height=128, width=128, speedup="7x", seed=3, output_type="pt", progress=False,
                   parallel=parallel_config(ulysses_degree=2))
    out["images"] = dict(ref=ref.images, par=par.images)
    # different prompt embeddings on the ranks: detected at the first model call, on every rank (different
    # seeds are refused before that: test_ranks_with_different_arguments_are_refused_before_any_collective)
    try:
        generate(pipe, **flux_embeds(seed=rank), height=64, width=64, seed=0, output_type="latent", progress=False,
                 parallel=parallel_config(ulysses_degree=2))
        out["diverged"] = "no error"
    except RanksDivergedError as exc:
        out["diverged"] = str(exc)
    try:
        generate(pipe, **emb, height=64, width=64, seed=0, progress=False, parallel=parallel_config(ulysses_degree=4))
        out["world_mismatch"] = "no error"
    except ValueError as exc:
        out["world_mismatch"] = str(exc)
    out["left_as_found"] = left_as_found(found, pipe, {"transformer": pipe.transformer})  # the refused calls too
    # no seed: rank 0 draws it for all (from its global RNG: after the snapshot's check)
    torch.manual_seed(100 + rank)
    out["no_seed"] = generate(pipe, **emb, height=64, width=64, output_type="latent", progress=False,
                              parallel=parallel_config(ulysses_degree=2)).images
    # a transformer set up by diffusers' own enable_parallelism is run under its config (its groups, not its hooks);
    # on a CPU diffusers' set-up divides by torch.accelerator.device_count() == 0, hence the patch (docs/parallelism.md)
    from diffusers import ContextParallelConfig

    pipe2 = build_tiny("tiny-flux")
    with mock.patch("torch.accelerator.device_count", lambda: 1):
        pipe2.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    model_config = pipe2.transformer._parallel_config
    set_up = {"transformer": pipe2.transformer, "parallel_config": model_config,
              "context_parallel_config": model_config.context_parallel_config}
    found = snapshot(pipe2, extra=set_up)  # with diffusers' split / gather hooks
    out["adopted"] = generate(pipe2, **emb, **base, **ralu7).images
    try:
        generate(pipe2, **emb, **base, **ralu7, parallel=parallel_config(ring_degree=2))
        out["adopted_mismatch"] = "no error"
    except ValueError as exc:
        out["adopted_mismatch"] = str(exc)
    out["adopted_left_as_found"] = left_as_found(found, pipe2, set_up)
    return out


@pytest.fixture(scope="module")
def two_ranks():
    from ralu_runtime.parallel.launch import run_gloo

    return run_gloo(WORKER + "_flux_worker", 2, timeout=300)


CASES = ("ulysses", "ring", "fused_qkv", "taylorseer", "fbcache", "baseline", "batch2")


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_match_one_process(two_ranks, case):
    r0, r1 = two_ranks[0][case], two_ranks[1][case]
    assert torch.equal(r0["par"], r1["par"])                       # bitwise the same on both ranks
    assert (r0["par"] - r0["ref"]).abs().max().item() <= ATOL       # and the single-process result
    if r0["ref_masks"] is not None:
        assert torch.equal(r0["par_masks"], r0["ref_masks"]) and torch.equal(r1["par_masks"], r0["ref_masks"])
    assert r0["par_stats"] == r1["par_stats"] == r0["ref_stats"]    # same cached / full steps everywhere


def test_two_ranks_stage2_token_count_is_odd(two_ranks):
    assert dict(two_ranks[0]["ulysses"]["tokens"])["stage2"] == 19  # 8 text + 19 image rows: 14 / 13
    assert two_ranks[0]["taylorseer"]["par_stats"]["cached"] > 0
    assert two_ranks[0]["fbcache"]["par_stats"]["cached"] > 0


def test_two_ranks_images_seed_and_divergence(two_ranks):
    a, b = two_ranks
    assert torch.equal(a["images"]["par"], b["images"]["par"])
    assert (a["images"]["par"] - a["images"]["ref"]).abs().max().item() <= ATOL
    assert torch.equal(a["no_seed"], b["no_seed"])
    for r in (a, b):
        assert "ranks [1] hold other inputs" in r["diverged"]
        assert "ulysses_degree x ring_degree = 4 x 1 = 4" in r["world_mismatch"]
        assert "set up by enable_parallelism" in r["adopted_mismatch"]
    assert torch.equal(a["adopted"], b["adopted"])
    assert (a["adopted"] - a["ulysses"]["ref"]).abs().max().item() <= ATOL


def test_two_ranks_leave_the_pipelines_as_found(two_ranks):
    """On each rank, the pipeline after the sharded calls (ulysses, ring, fused q/k/v, feature caches, decoded images,
    refused calls), and the one whose transformer was set up by diffusers' enable_parallelism after ralu ran under its
    config: as found (tests/helpers.py's snapshot, with the transformer's private attributes, its parallel configs and
    diffusers' split / gather hooks)."""
    for r in two_ranks:
        assert (r["left_as_found"], r["adopted_left_as_found"]) == ("", "")


def _disagree_worker():
    """Ranks that call generate with different arguments: each case's error message (or "no error")."""
    import torch.distributed as dist

    from ralu_runtime import generate
    from ralu_runtime.parallel import RanksDivergedError
    from ralu_runtime.tiny import build_tiny
    from tiny_inputs import sd3_embeds

    rank = dist.get_rank()
    flux, sd3 = build_tiny("tiny-flux"), build_tiny("tiny-sd3")
    kw = dict(height=64, width=64, output_type="latent", progress=False)
    u2 = parallel_config(ulysses_degree=2)
    cases = {  # each would have run different collectives (a hang) or mixed the ranks' results
        "seed": lambda: generate(flux, **flux_embeds(), **kw, seed=None if rank == 0 else 0, parallel=u2),
        "degrees": lambda: generate(flux, **flux_embeds(), **kw, seed=0,
                                    parallel=u2 if rank == 0 else parallel_config(ring_degree=2)),
        "cache": lambda: generate(flux, **flux_embeds(), **kw, seed=0, speedup="4x", parallel=u2,
                                  cache="taylorseer:2" if rank == 0 else None),
        "guidance": lambda: generate(sd3, **sd3_embeds(), **kw, seed=0, speedup=None, num_inference_steps=2,
                                     guidance_scale=2.0 + rank, parallel=u2),
        "weights": lambda: generate(flux, **flux_embeds(), **kw, seed=0, parallel=u2),  # rank 1's weights changed
    }
    out = {}
    for name, call in cases.items():
        if name == "weights" and rank == 1:   # one weight matrix 1 % larger (was: both ranks returned a mixed image)
            with torch.no_grad():
                flux.transformer.single_transformer_blocks[0].proj_out.weight.mul_(1.01)
        try:
            call()
            out[name] = "no error"
        except RanksDivergedError as exc:
            out[name] = str(exc)
    return out


def test_ranks_with_different_arguments_are_refused_before_any_collective():
    """A seed on one rank only, other degrees, another cache or guidance scale: RanksDivergedError on every rank,
    naming the argument, before the first collective that depends on it (was: a hang, or for SD3's guidance scale
    silently mixed latents)."""
    from ralu_runtime.parallel.launch import run_gloo

    res = run_gloo(WORKER + "_disagree_worker", 2, timeout=150)
    for r in res:
        assert "ranks [1] call generate with other arguments than rank 0: seed (this rank: seed=" in r["seed"]
        assert "rank 0: ulysses_degree, ring_degree (this rank: ulysses_degree=" in r["degrees"]
        assert "rank 0: cache (" in r["cache"]
        assert "rank 0: guidance_scale (this rank: guidance_scale=" in r["guidance"]
        assert "rank 0: weights (this rank: weights=" in r["weights"] and "weights differ between the ranks" in \
            r["weights"]


def _wan_rows_worker():
    """prepare(parallel=...) of a tiny Wan whose RALU stage 1 has 1 image token (Wan shards the image tokens only)
    and of one with 4: the error message, or "no error"."""
    from ralu_runtime import prepare
    from ralu_runtime.tiny.wan import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(seed=0)
    out = {}
    for name, hw in (("small", 32), ("ok", 64)):
        try:
            prepare(pipe, "a cat", height=hw, width=hw, num_frames=1, seed=0, output_type="latent", progress=False,
                    parallel=parallel_config(ulysses_degree=2))
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    return out


def test_wan_with_fewer_image_tokens_than_ranks_is_refused_by_prepare():
    """Wan at 32x32, one frame: RALU's stage 1 has 1 image token for 2 ranks; refused by prepare (was: a ValueError
    at the first model call, after the groups and the text encoding)."""
    from ralu_runtime.parallel.launch import run_gloo

    for r in run_gloo(WORKER + "_wan_rows_worker", 2, timeout=150):
        assert "make 1 image tokens in RALU's first stage" in r["small"] and "fewer than the 2 ranks" in r["small"]
        assert r["ok"] == "no error"


# ------------------------------------------------------------------------------- 4 gloo processes: 2 x 2
def _attention_worker():
    """``sequence_attention`` for ulysses x ring = 4 x 1, 1 x 4, 2 x 2 (groups of ralu's own and from a device
    mesh), uneven rows (27 over 4) and a head count (3) that divides by neither degree, against full attention."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ralu_runtime.parallel import SequenceParallel, sequence_attention, shard_range
    from ralu_runtime.execution.sharding import attend_all

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 27, 3, 8, generator=g) for _ in range(3))
    full = attend_all(q, k, v, "")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))

    out = {}
    for name, u, r, cfg_mesh in (("u4", 4, 1, None), ("r4", 1, 4, None), ("u2r2", 2, 2, None),
                                 ("mesh", 2, 2, mesh)):
        cfg = parallel_config(ulysses_degree=u, ring_degree=r, mesh=cfg_mesh)
        plan = SequenceParallel(cfg, ulysses=u, ring=r, device="cpu").setup()
        a, z = shard_range(27, 4, plan.index)
        local = sequence_attention(q[:, a:z], k[:, a:z], v[:, a:z], 27, plan.attention_spec())
        out[name] = (local - full[:, a:z]).abs().max().item()
        out[name + "_gathered"] = (plan.gather_rows(local, [7, 7, 7, 6]) - full).abs().max().item()
    out["rank"] = dist.get_rank()
    return out


def test_attention_on_four_ranks_ulysses_ring_and_both():
    from ralu_runtime.parallel.launch import run_gloo

    res = run_gloo(WORKER + "_attention_worker", 4, timeout=240)
    for r in res:
        for key, value in r.items():
            if key != "rank":
                assert value <= 1e-6, (r["rank"], key, value)


# ------------------------------------------------------------------------------------------------ inductor
def _inductor_worker():
    from ralu_runtime import generate
    from ralu_runtime.compile import compile_stats
    from ralu_runtime.tiny import build_tiny

    pipe = build_tiny("tiny-flux")
    kw = dict(**flux_embeds(), height=128, width=128, speedup="7x", seed=3, output_type="latent", progress=False)
    ref = generate(pipe, **kw)  # eager references first: a later call without backend= keeps the installed one
    ts_ref = generate(pipe, **kw, cache="taylorseer:2")
    par = generate(pipe, **kw, backend="inductor", parallel=parallel_config(ulysses_degree=2))
    graphs = compile_stats()["unique_graphs"]
    ts = generate(pipe, **kw, backend="inductor", parallel=parallel_config(ulysses_degree=2), cache="taylorseer:2")
    return dict(diff=(par.images - ref.images).abs().max().item(), par=par.images,
                ts_diff=(ts.images - ts_ref.images).abs().max().item(),
                new_graphs=compile_stats()["unique_graphs"] - graphs)


@pytest.mark.slow
def test_inductor_two_ranks_match_eager():
    """backend='inductor' with 2 ranks: the attention custom op keeps each block one graph (fullgraph); a second call
    (with a cache) compiles nothing new."""
    from ralu_runtime.parallel.launch import run_gloo

    res = run_gloo(WORKER + "_inductor_worker", 2, timeout=540)
    assert torch.equal(res[0]["par"], res[1]["par"])
    for r in res:
        assert r["diff"] <= ATOL and r["ts_diff"] <= ATOL
        assert r["new_graphs"] == 0


def test_cpu_enable_parallelism_zero_division_is_diffusers_device_lookup():
    """The ZeroDivisionError of diffusers' enable_parallelism on a CPU: ``rank % torch.accelerator.device_count()``
    with no accelerator (diffusers 0.42.1, models/modeling_utils.py, ModelMixin._resolve_parallel_config)."""
    import inspect

    from diffusers.models.modeling_utils import ModelMixin

    assert "rank % torch.accelerator.device_count()" in inspect.getsource(ModelMixin._resolve_parallel_config)
    if not torch.cuda.is_available() and os.environ.get("RALU_TEST_GPU") != "1":
        assert torch.accelerator.device_count() == 0


def test_benchmark_factoring_and_summary():
    """benchmarks/context_parallel.py: how N ranks are factored, and the speedup / latent-difference summary."""
    from benchmarks.context_parallel import factor, parse_row, summarise

    assert factor(8, "ulysses", 24) == (8, 1) and factor(8, "ring", 24) == (1, 8)
    assert factor(16, "usp", 24) == (8, 2) and factor(6, "usp", 4) == (2, 3) and factor(5, "usp", 24) == (1, 5)
    assert parse_row("ralu-7x-compiled") == ("7x", "compiled") and parse_row("baseline-eager") == (None, "eager")
    with pytest.raises(ValueError):
        parse_row("ralu-7x")
    row = dict(row="ralu-7x-eager", min_s=2.0, model_s=1.5, latents=torch.zeros(1, 4))
    rows = summarise([{"world_size": 1, "rows": [dict(row, world_size=1)]},
                      {"world_size": 2, "rows": [dict(row, world_size=2, min_s=1.25, model_s=0.75,
                                                      latents=torch.full((1, 4), 1e-3))]}])
    assert rows[1]["speedup"] == 1.6 and rows[1]["efficiency"] == 0.8 and rows[1]["model_speedup"] == 2.0
    assert rows[1]["max_abs_diff_vs_w1"] == pytest.approx(1e-3) and "latents" not in rows[1]


# ------------------------------------------------------------------------------------------------ the launcher
def _teardown_crash_worker(when: str):
    """Rank 1 dies by SIGABRT: in its work ("work"), or in the process group's teardown ("teardown", as gloo once
    did in CI: "terminate called without an active exception")."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == 1 and when == "work":
        os.abort()
    if rank == 1 and when == "teardown":
        dist.destroy_process_group = os.abort  # _entry calls it after the final barrier
    return rank * 10


def test_a_crash_in_the_teardown_keeps_the_results_and_one_in_the_work_raises():
    import torch.multiprocessing as mp

    from ralu_runtime.parallel.launch import run_gloo

    with pytest.warns(RuntimeWarning, match="died after the work was done"):
        assert run_gloo(WORKER + "_teardown_crash_worker", 2, kwargs={"when": "teardown"}, timeout=120) == [0, 10]
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_gloo(WORKER + "_teardown_crash_worker", 2, kwargs={"when": "work"}, timeout=120)


def test_workers_take_the_callers_environment_at_the_call_and_spawn_still_works(monkeypatch):
    """The fork server starts once per process with the environment of that moment; each worker must still see the
    environment of its own call. ``start_method="spawn"`` (fresh interpreters) gives the same results, and another
    start method is refused before any process starts."""
    from ralu_runtime.parallel.launch import run_gloo

    run_gloo("os:getenv", 2, kwargs={"key": "HOME"}, timeout=120)                 # the fork server is up now
    monkeypatch.setenv("RALU_LAUNCH_MARK", "first")
    assert run_gloo("os:getenv", 2, kwargs={"key": "RALU_LAUNCH_MARK"}, timeout=120) == ["first", "first"]
    monkeypatch.setenv("RALU_LAUNCH_MARK", "second")
    assert run_gloo("os:getenv", 2, kwargs={"key": "RALU_LAUNCH_MARK"}, timeout=120) == ["second", "second"]
    monkeypatch.delenv("RALU_LAUNCH_MARK")
    assert run_gloo("os:getenv", 2, kwargs={"key": "RALU_LAUNCH_MARK"}, timeout=120) == [None, None]
    assert run_gloo("os:getenv", 2, kwargs={"key": "RANK"}, timeout=120, start_method="spawn") == ["0", "1"]
    with pytest.raises(ValueError, match="start_method='fork' is not supported"):
        run_gloo("os:getenv", 2, kwargs={"key": "RANK"}, start_method="fork")


@pytest.mark.slow
def test_the_torchrun_example_on_the_cpu_gives_the_one_process_image(tmp_path):
    """docs/parallelism.md's command with no weights and no GPU (torchrun, 2 gloo ranks, the tiny FLUX, on 127.0.0.1):
    rank 0's PNG is the image one process makes with the same arguments, 8-bit rounding aside (at most one level, in
    a handful of pixels)."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    import ralu_runtime
    from ralu_runtime.parallel.launch import free_port
    from ralu_runtime.tiny import build_tiny

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "tiny.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(free_port()),
                           str(root / "examples" / "context_parallel_torchrun.py"), "--tiny", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 ranks (ulysses 2 x ring 1)" in proc.stdout
    ref = ralu_runtime.generate(build_tiny("tiny-flux"), "a red fox in fresh snow, golden hour", height=256,
                                width=256, seed=0, speedup="default", progress=False).images[0]
    got = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    diff = np.abs(got - np.asarray(ref, dtype=np.int16))
    assert got.shape == (256, 256, 3) and got.std() > 10  # an image, not a blank
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


def test_weights_digest_follows_every_change_and_is_cached_otherwise(monkeypatch):
    """The digest the ranks compare: equal for equal weights (two builds of one seed), different after an in-place
    change of one element or a scaled Parameter, equal for a replaced Parameter of the same values; not recomputed
    while model_state is unchanged."""
    import ralu_runtime.parallel.plan as P
    from ralu_runtime.tiny import build_tiny_flux_pipeline

    a, b = build_tiny_flux_pipeline(seed=0).transformer, build_tiny_flux_pipeline(seed=0).transformer
    first = P.weights_digest([a])
    assert first == P.weights_digest([b]) and first != P.weights_digest([build_tiny_flux_pipeline(seed=1).transformer])
    import ralu_runtime.compile.runner as R

    calls = []
    monkeypatch.setattr(R, "bits_sum", lambda t, f=R.bits_sum: calls.append(1) or f(t))
    assert P.weights_digest([a]) == first and not calls          # cached
    w = a.transformer_blocks[0].attn.to_q.weight
    with torch.no_grad():
        w[0, 0] += 1e-3
    changed = P.weights_digest([a])
    assert changed != first and calls
    a.transformer_blocks[0].attn.to_q.weight = torch.nn.Parameter(w.detach().clone())
    assert P.weights_digest([a]) == changed                        # a new Parameter with the same values
    with torch.no_grad():
        a.transformer_blocks[0].attn.to_q.weight.mul_(2)
    assert P.weights_digest([a]) not in (first, changed)
