"""The editing benchmarks: analytic FLOPs per workflow (benchmarks/editing.py) and the masked Gaussian-oracle
comparison of mask-first against edge-only region choice (benchmarks/inpaint_oracle.py)."""
import json
from pathlib import Path

import pytest
import torch

from benchmarks import editing as be
from ralu_runtime.editing import start_index

FLOPS = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "flops.json").read_text())


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_analytic_flops_equal_the_flop_counter(model):
    """FlopCounterMode's counts of the full-size models (flops.json) at every token count it has."""
    res = next(r for r in FLOPS["results"] if r["model"] == model)["per_call_tflops"]
    assert len(res) >= 4
    for key, counted in res.items():
        assert be.call_tflops(be.ARCHS[model], int(key.split()[0])) == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_analytic_flops_equal_the_flop_counter_for_sd35(variant):
    """SD3.5 (Medium: 13 blocks with a second image attention) against FlopCounterMode on a meta model, CFG."""
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from ralu_runtime.tiny.sd35 import CONFIGS

    with torch.device("meta"):
        tr = SD3Transformer2DModel(**CONFIGS[(variant, "full")]).to(torch.bfloat16)
    meta = dict(device="meta", dtype=torch.bfloat16)
    mode = FlopCounterMode(display=False)
    with mode, torch.no_grad():
        tr(hidden_states=torch.zeros(2, 16, 64, 64, **meta), encoder_hidden_states=torch.zeros(2, 333, 4096, **meta),
           pooled_projections=torch.zeros(2, 2048, **meta), timestep=torch.zeros(2, device="meta"))
    assert be.call_tflops(be.ARCHS[f"sd35-{variant}"], 1024) == pytest.approx(mode.get_total_flops() / 1e12,
                                                                              rel=1e-9)


def test_flops_table_per_workflow():
    rows = be.table(FLOPS)
    key = lambda r: (r["model"], r["workflow"], r["strength"], r["run"])  # noqa: E731
    by = {key(r): r for r in rows}
    assert {r["model"] for r in rows} == {"flux", "sd3", "sd35-large", "sd35-medium"}
    assert {(r["workflow"], r["strength"]) for r in rows} == {("img2img", 0.3), ("img2img", 0.6), ("img2img", 0.9),
                                                               ("inpaint", 0.6), ("inpaint", 1.0)}
    for r in rows:
        steps = 28 if r["family"] == "flux" else 50
        base = by[(r["model"], r["workflow"], r["strength"], f"baseline {steps} steps")]
        assert base["calls"] == [0, 0, steps - start_index(steps, r["strength"])]
        assert r["ratio"] == pytest.approx(base["tflops"] / r["tflops"])
        if r["run"].startswith("ralu"):
            assert r["ratio"] > 1.5
            if r["workflow"] == "inpaint" and r["strength"] == 0.6:  # the same calls as img2img
                assert r["calls"] == by[(r["model"], "img2img", 0.6, r["run"])]["calls"]
        if r["model"] in ("flux", "sd3") and r["tflops_counted"] is not None:
            assert r["tflops"] == pytest.approx(r["tflops_counted"], rel=1e-9)
    flux7 = by[("flux", "img2img", 0.9, "ralu 7x")]
    assert flux7["entry_stage"] == 1 and flux7["calls"] == [2, 3, 5]
    k = int(1024 * 0.1)
    expect = (2 * be.call_tflops(be.ARCHS["flux"], 1024) + 3 * be.call_tflops(be.ARCHS["flux"], 1024 + 3 * k)
              + 5 * be.call_tflops(be.ARCHS["flux"], 4096))
    assert flux7["tflops"] == pytest.approx(expect)
    assert by[("flux", "img2img", 0.6, "baseline 28 steps")]["tflops"] == pytest.approx(17 * 74.384653418496)
    assert by[("sd35-large", "inpaint", 1.0, "ralu 3x")]["calls"] == [4, 4, 6]


def test_region_choice_is_validated():
    from ralu_runtime.adapters.oracle import GaussianOracle
    from ralu_runtime.editing import sample_ralu_edit
    from ralu_runtime.schedule import get_preset

    oracle = GaussianOracle(8, 2)
    x = torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"region_choice='mask' is not allowed; choose one of \('mask-first', "
                                         r"'edge-only'\)"):
        sample_ralu_edit(oracle, None, x, x, None, get_preset("flux", "7x"), 1.0, [torch.Generator()],
                         mask=torch.ones(1, 1, 8, 8), region_choice="mask")


def test_inpaint_oracle_benchmark_runs_at_toy_size(tmp_path):
    from benchmarks import inpaint_oracle

    payload = inpaint_oracle.main(["--quick", "--out", str(tmp_path)])
    assert not (tmp_path / "inpaint_oracle.json").exists()   # a quick run never writes the full run's name
    saved = json.loads((tmp_path / "inpaint_oracle_quick.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__ and saved["shape"]["latent"] == [8, 8]
    rows = payload["rows"]
    assert len(rows) == 4 * 2 * 2 * 2  # masks x strengths x presets x choices (1 seed)
    first = {(r["mask"], r["strength"], r["preset"]): r for r in rows if r["choice"] == "mask-first"}
    for r in rows:
        twin = first[(r["mask"], r["strength"], r["preset"])]
        assert r["model_calls"] == twin["model_calls"]  # equal FLOPs: same calls at the same token counts
        assert r["rmse_out"] < 1e-6  # the last blend puts the source back outside the mask
        assert r["fd_in"] > 0 and 0 <= r["coverage"] <= 1
    assert all(r["coverage"] == 1 for r in first.values())  # the dilated mask fits the budget or fills it
    assert any(r["coverage"] < 1 for r in rows if r["choice"] == "edge-only")
    assert {s["choice"] for s in payload["summary"]} == {"mask-first", "edge-only"}


def test_editing_plot_writes_a_png_with_the_flop_and_cpu_panels(tmp_path):
    """benchmarks/editing.py's PNG: the FLOP ratios of every workflow row and, with --cpu, the workflows' CPU
    ratios (rows shaped as cpu_workflows returns them)."""
    pytest.importorskip("matplotlib")
    flops = json.loads((Path(be.__file__).parent / "results" / "flops.json").read_text())
    rows = be.table(flops)
    kontext = [{"model": "kontext", "run": "ralu 7x", "ratio": 3.5}, {"model": "kontext", "run": "baseline 28 steps",
                                                                    "ratio": 1.0}]
    workflows = [{"workflow": "fill", "run": "baseline", "ratio": 1.0}, {"workflow": "fill", "run": "7x", "ratio": 4.8}]
    path = be.plot(tmp_path, rows, kontext, workflows)
    assert path is not None and path.exists() and path.stat().st_size > 10_000
    assert be.plot(tmp_path, rows, kontext, None).exists()
