"""``attn_backend="measure"``: the attention backend chosen per device and shape by a short measurement at warm-up
(tiny random FLUX pipelines and tiny attention shapes, CPU: torch's CPU flash and math kernels run, cuDNN and the
memory-efficient kernel raise and are skipped with the reason)."""
from __future__ import annotations

import pytest
import torch

from ralu_runtime import RaluSchedule, generate
from ralu_runtime.adapters import get_adapter
from ralu_runtime.compile import attention_report, compile_adapter, measure_attention_backends, sdpa_context
from ralu_runtime.compile import sdpa as sdpa_mod
from ralu_runtime.compile.sdpa import AttnShape, SdpaRecorder, choose_backend, clear_measurements, measure_shape
from ralu_runtime.tiny import build_tiny_flux_pipeline
from tiny_inputs import flux_embeds

SCHED = RaluSchedule(steps=(2, 2, 2), ends=(0.3, 0.5, 1.0), shifts=(3.0, 3.0, 3.0), z=4.0, ratio=0.3)
TINY = AttnShape(1, 2, 2, 40, 40, 16, "torch.float32")


def _ralu(pipe, emb, **kw):
    return generate(pipe, **emb, height=64, width=96, speedup=SCHED, seed=3, output_type="latent", progress=False,
                    **kw).images


def test_measure_shape_times_what_runs_and_skips_what_raises():
    clear_measurements()
    entry = measure_shape(TINY, "cpu", reps=2)
    assert {"flash", "math"} <= set(entry["ms"])  # torch's CPU kernels
    assert "cudnn" in entry["skipped"] and entry["skipped"]["cudnn"]  # raises on a CPU: skipped, with the reason
    assert entry["best"] in entry["ms"] and all(v > 0 for v in entry["ms"].values())
    # remembered per (device, shape bucket): a shape in the same power-of-two bucket is not measured again
    same_bucket = AttnShape(1, 2, 2, 60, 60, 16, "torch.float32")
    assert measure_shape(same_bucket, "cpu") is entry
    rows = attention_report("cpu")
    assert len(rows) == 1 and rows[0]["best"] == entry["best"] and rows[0]["describe"].startswith("(1, 2, 40x40, 16)")


def test_a_backend_that_raises_is_skipped(monkeypatch):
    clear_measurements()
    real = sdpa_mod._runner

    def runner(name, shape, device):
        if name == "flash":
            raise RuntimeError("flash cannot run this shape")
        return real(name, shape, device)

    monkeypatch.setattr(sdpa_mod, "_runner", runner)
    entry = measure_shape(TINY, "cpu", reps=1)
    assert entry["skipped"]["flash"] == "flash cannot run this shape"
    assert entry["best"] == "math"
    clear_measurements()


def test_choice_is_the_least_total_time_over_the_calls(monkeypatch):
    a = AttnShape(1, 2, 2, 40, 40, 16, "torch.float32")
    b = AttnShape(1, 2, 2, 40, 8, 16, "torch.float32")
    table = {a: {"x": 1.0, "y": 2.0}, b: {"x": 5.0, "y": 1.0, "z": 0.1}}
    monkeypatch.setattr(sdpa_mod, "measure_shape",
                        lambda s, d: {"shape": s, "ms": table[s], "skipped": {}, "best": min(table[s])})
    assert choose_backend({a: 1, b: 1}, "cpu")[0] == "y"   # x: 6, y: 3 ("z" did not run shape a)
    assert choose_backend({a: 10, b: 1}, "cpu")[0] == "x"  # x: 15, y: 21
    assert choose_backend({}, "cpu")[0] == "auto"


def test_recorder_sees_keyword_and_positional_calls():
    q = torch.randn(1, 2, 10, 16)
    k = torch.randn(1, 2, 7, 16)
    mask = torch.ones(1, 1, 10, 7, dtype=torch.bool)
    with SdpaRecorder() as rec:
        torch.nn.functional.scaled_dot_product_attention(q, k, k)
        torch.nn.functional.scaled_dot_product_attention(query=q, key=k, value=k, attn_mask=mask)
        torch.nn.functional.scaled_dot_product_attention(q, k, k)
    shapes = sorted(rec.calls.items(), key=lambda kv: kv[1])
    assert [n for _, n in shapes] == [1, 2]
    assert shapes[0][0].mask == (1, 1, 10, 7) and shapes[1][0] == AttnShape(1, 2, 2, 10, 7, 16, "torch.float32")


@torch.no_grad()
def test_generate_measures_once_per_signature_and_reports():
    clear_measurements()
    pipe = build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    ref = _ralu(pipe, emb)
    out = _ralu(pipe, emb, backend="eager", compile_options={"attn_backend": "measure"})
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # the same attention, another kernel
    runner = get_adapter(pipe).runner
    choices = runner.attention_choices()
    assert len(choices) == 3  # one per stage signature (coarse, mixed, full)
    for c in choices:
        assert c["backend"] in ("flash", "math") and c["total_ms"] and c["shapes"]
    assert {tuple(c["tokens_shape"]) for c in choices} == {(1, 6, 64), (1, 9, 64), (1, 24, 64)}
    n = len(attention_report())
    assert n >= 2
    _ralu(pipe, emb)  # same signatures: nothing measured again
    assert len(attention_report()) == n and len(runner.attention_choices()) == 3
    assert runner.report()["attention"] == runner.attention_choices()


@torch.no_grad()
def test_compiled_blocks_are_kept_per_chosen_backend():
    """The SDPA kernel is fixed when a graph is traced (dynamo does not guard on it): compiled block functions are
    kept per (block kind, chosen backend); the first call of a signature runs uncompiled while it is measured."""
    pipe = build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    ref = _ralu(pipe, emb)
    runner = compile_adapter(pipe, "inductor", dynamo_backend="eager", attn_backend="measure")
    out = _ralu(pipe, emb)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    chosen = {c["backend"] for c in runner.attention_choices()}
    assert runner.impl.compiled_blocks == sorted(f"{k}@{b}" for k in ("flux_double", "flux_single") for b in chosen)


def test_measure_attention_backends_for_ralu_info():
    rows = measure_attention_backends("cpu")
    assert rows and all(r["device"] == "cpu" and r["best"] in r["ms"] for r in rows)
    assert all("cudnn" in r["skipped"] for r in rows)


def test_sdpa_context_names():
    with sdpa_context("measure", "cpu"):  # before a choice: the "auto" policy (torch's default on a CPU)
        pass
    with sdpa_context("math", "cpu"):
        out = torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 2, 5, 16),) * 3)
    assert out.shape == (1, 2, 5, 16)
    with pytest.raises(ValueError, match="attn_backend='fastest' is not allowed"):
        with sdpa_context("fastest", "cpu"):
            pass


@pytest.mark.gpu
def test_gpu_measure_flux_shape_picks_a_fused_kernel():
    clear_measurements()
    entry = measure_shape(AttnShape(1, 24, 24, 1536, 1536, 128, "torch.bfloat16"), "cuda")
    assert entry["best"] in ("cudnn", "flash", "efficient", "flash_attn", "flash_attn_3")
    assert "math" in entry["ms"] and entry["ms"][entry["best"]] < entry["ms"]["math"]


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_measured_backend_under_inductor_and_cuda_graphs():
    pipe = build_tiny_flux_pipeline(seed=0, device="cuda", dtype=torch.bfloat16)
    emb = {k: v.to("cuda", torch.bfloat16) for k, v in flux_embeds(1).items()}
    ref = _ralu(pipe, emb)
    runner = compile_adapter(pipe, "inductor", attn_backend="measure")
    out = _ralu(pipe, emb)
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 0.03
    chosen = {c["backend"] for c in runner.attention_choices()}
    assert chosen and all("@" in k for k in runner.impl.compiled_blocks)
    builds = len(runner.builds)
    _ralu(pipe, emb)
    assert len(runner.builds) == builds  # second call: replays


@torch.no_grad()
def test_attn_backend_without_a_kernel_on_the_device_is_refused_before_any_work(monkeypatch):
    """cudnn / efficient have no CPU kernel: refused by prepare and compile_adapter naming the value and what runs,
    not by torch's "No viable backend" at the first model call; flash and math run on the CPU."""
    pipe = build_tiny_flux_pipeline(seed=0)
    emb = flux_embeds(1)
    adapter = get_adapter(pipe)
    monkeypatch.setattr(type(adapter), "encode_prompt", lambda *a, **k: pytest.fail("encoded before refusing"))
    for name in ("cudnn", "efficient"):
        with pytest.raises(ValueError, match=rf"attn_backend='{name}'.*cpu.*'math'"):
            generate(pipe, **emb, height=64, width=64, speedup=None, num_inference_steps=1, output_type="latent",
                     progress=False, backend="eager", compile_options={"attn_backend": name})
        with pytest.raises(ValueError, match=rf"attn_backend='{name}'"):
            compile_adapter(pipe, "eager", attn_backend=name)
    assert adapter.runner is None
    monkeypatch.undo()
    for name in ("flash", "math"):
        generate(pipe, **emb, height=64, width=64, speedup=None, num_inference_steps=1, output_type="latent",
                 progress=False, backend="eager", compile_options={"attn_backend": name})
