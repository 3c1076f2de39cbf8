"""The GPU verification suite (benchmarks/gpu_suite.py): its CPU dry run, and the claim table it prints."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_suite as S
from helpers import dry_run_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``(out, work)`` of one CPU dry run of the whole suite with ``--smoke`` (every step, the smoke step's every
    job after the build), shared by the tests below: two dry runs (the suite's, then ``--only build,smoke``) cost
    ~40 s more on a 2-core CPU."""
    base = tmp_path_factory.mktemp("gpu_suite")
    out, work = base / "out", base / "work"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--smoke", "--out", str(out),
                           "--work", str(work)], cwd=ROOT, env=dry_run_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    return out, work


@pytest.mark.slow
def test_dry_run_runs_every_step(dry_run):
    out, work = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["final"]
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert set(status) == {s.name for s in S.STEPS}
    # without a compiled row there is no compile bundle, so the warm start cannot run
    assert {n for n, st in status.items() if st != "ok"} == {"warm_start"}, status
    assert "ctest" in status
    steps = [c for c in summary["claims"] if not c["claim"].startswith("smoke")]
    assert len(steps) >= 15 and all(c["met"] == "dry run" for c in steps)
    measured = {c["claim"]: c["measured"] for c in summary["claims"]}
    assert measured["transition output independent of tiling (bitwise)"].startswith("0 mismatches")
    assert "not run" not in measured["varlen attention vs padded masked SDPA (mixed FLUX stage lengths)"]
    with tarfile.open(out / "results.tar.gz") as tf:
        names = set(tf.getnames())
    for name in ("gpu_suite/summary.json", "gpu_suite/logs/build.log", "gpu_suite/logs/latency_flux.log",
                 "gpu_suite/latency_flux_dry_cpu.json", "gpu_suite/tune_transition_dry_cpu.json",
                 "gpu_suite/gpu_tests.xml", "gpu_suite/logs/latency_video.log", "gpu_suite/latency_wan-480p_dry_cpu.json",
                 "gpu_suite/latency_hunyuan-video15_dry_cpu.json", "gpu_suite/serving_dry_cpu.json",
                 "gpu_suite/latency_flux_kontext_dry_cpu.json", "gpu_suite/static_dims_dry_cpu.json",
                 "gpu_suite/transition_ablation_dry_cpu.json", "gpu_suite/layerwise_casting_dry_cpu.json",
                 "gpu_suite/offload_dry_cpu.json"):
        assert name in names, name
    # the video steps: a baseline run with 2 steps and scaled to 50, a RALU row, warm-up calls at a small size
    video = json.loads((work / "latency_wan-480p_dry_cpu.json").read_text())
    assert video["baseline_steps"] == 2 and video["baseline_scaled_to_steps"] == 50 and video["num_frames"] == 9
    base, ralu = video["rows"]
    assert base["row"] == "baseline-eager" and base["warmup_shape"] == [64, 64, 5]
    assert base["scaled_mean_s"] > base["mean_s"] and base["speedup_vs_baseline-eager"] == 1.0
    assert ralu["row"] == "ralu-7x-eager" and ralu["speedup_vs_baseline-eager"] == pytest.approx(
        base["scaled_mean_s"] / ralu["mean_s"])
    assert not measured["Wan 2.1 14B 480x832, 81 frames: ralu-7x-eager vs 50-step eager"].startswith("not run")
    assert not measured["serving: packed engine throughput vs sequential generate at load 4.0"].startswith("not run")
    # the static-vs-symbolic A/B: the static variant's graphs hold no symbolic model dimension, the symbolic one's do
    dims = json.loads((work / "static_dims_dry_cpu.json").read_text())
    static, symbolic = (next(r for r in dims["rows"] if r["variant"] == v) for v in ("static", "symbolic"))
    assert static["symbolic_feature_dims"] == 0 < symbolic["symbolic_feature_dims"]
    assert not measured["compiled FLUX.1 model call (4+8 blocks, 1024^2): symbolic model dims / static (the fix)"
                        ].startswith("not run")
    # the layerwise-casting A/B: the cast model stores fewer weight bytes and computes near the plain one
    lw = json.loads((work / "layerwise_casting_dry_cpu.json").read_text())
    assert lw["storage_dtype"] == "torch.bfloat16" and 0.5 < lw["ratio_weight_bytes_cast_over_plain"] < 1
    assert 0 < next(r for r in lw["rows"] if r["variant"] == "cast")["rel_diff"] < 0.05
    assert not measured["FLUX.1 eager model call (4+8 blocks, 1024^2), layerwise casting (fp8 storage) / plain bf16"
                        ].startswith("not run")
    # and both compiled (dynamo traced, its eager backend, in the dry run): the cast model's blocks ran cast shadows
    assert lw["dynamo_backend"] == "eager"
    assert {r["variant"] for r in lw["rows"]} == {"plain", "cast", "plain_inductor", "cast_inductor"}
    assert next(r for r in lw["rows"] if r["variant"] == "cast_inductor")["rel_diff"] == pytest.approx(
        next(r for r in lw["rows"] if r["variant"] == "cast")["rel_diff"], rel=1e-3)
    assert not measured["FLUX.1 compiled model call (inductor, no CUDA graphs), layerwise casting (fp8 storage) / "
                        "plain bf16"].startswith("not run")
    # model CPU offload: the offloaded generate equals the resident one and leaves the transformer on the CPU
    off = json.loads((work / "offload_dry_cpu.json").read_text())
    rows = {r["variant"]: r for r in off["rows"]}
    assert rows["offloaded"]["max_abs_diff"] == 0 and rows["offloaded"]["transformer_after_call"] == "cpu"
    assert not measured["FLUX.1 RALU 7x generate (4+8 blocks, 1024^2), enable_model_cpu_offload / resident"
                        ].startswith("not run")
    kontext = json.loads((work / "latency_flux_kontext_dry_cpu.json").read_text())
    assert kontext["kontext"]["reference_px"] == [128, 128] and kontext["baseline_steps"] == 2
    log = (out / "suite.log").read_text()
    assert "summary (one line per claim)" in log


# ------------------------------------------------------------------------------------------------ the smoke step
@pytest.mark.slow
def test_smoke_dry_run_through_the_suite(dry_run):
    """``--dry-run --smoke``: the smoke step's every job on the CPU through the same builders and checks as on the
    GPU (dry-size models, fp32); its JSON and log in the output folder and in results.tar.gz, one claim line for the
    step and one per job."""
    from benchmarks import gpu_smoke as G

    out, _work = dry_run
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status["build"] == status["smoke"] == "ok", status
    report = json.loads((out / "smoke_cpu.json").read_text())
    assert report["final"] and report["dry_run"] and report["dtype"] == "float32"
    assert report["commit"] != "unknown" and report["commit_source"] in ("git", "RALU_COMMIT")
    rows = {r["path"]: r for r in report["rows"]}
    expected = {f"{j.name}/{c}" for j in G.jobs() for c, _ in j.checks}
    assert set(rows) == expected
    bad = {p: (r["result"], r["note"]) for p, r in rows.items() if r["result"] != "ok"}
    assert bad == {"kernels/transition_cuda_op": ("skipped", "CPU: the CUDA op needs a GPU"),
                   "precision/fp8_torchao": ("skipped", "torchao's fp8 kernel runs on CUDA only")}, bad
    for path in ("flux-dev/parity_diffusers", "chroma/text_masks_graphs", "serving/engine_packed_graphs",
                 "kernels/transition_triton", "kernels/varlen_attention"):
        assert rows[path]["error"] is not None and rows[path]["error"] <= rows[path]["tol"], rows[path]
    # the GPU run's models, built on the meta device: published widths, 2 blocks of each kind
    shape = rows["flux-dev/build"]["info"]["smoke_shape"]
    assert (shape["num_attention_heads"], shape["attention_head_dim"], shape["joint_attention_dim"]) == (24, 128, 4096)
    assert (shape["num_layers"], shape["num_single_layers"]) == (2, 2)
    assert rows["wan22/build"]["info"]["smoke_shape"]["experts"] == 2
    assert rows["serving/engine_packed_graphs"]["info"]["packed_calls"] > 0
    assert rows["flux-dev/compiled_baseline"]["info"]["graphs"] > 0  # the dry run traces FLUX.1-dev with dynamo
    assert (out / "smoke_cpu.log").read_text().count("path") >= 1
    with tarfile.open(out / "results.tar.gz") as tf:
        names = set(tf.getnames())
    assert "gpu_suite/smoke_cpu.json" in names and "gpu_suite/logs/smoke.log" in names
    assert any(n.startswith("gpu_suite/logs/smoke/") for n in names)
    claims = {c["claim"]: c for c in summary["claims"]}
    top = next(c for name, c in claims.items() if name.startswith("smoke: every GPU path"))
    assert top["measured"].startswith(f"{len(expected) - 2} ok, 2 skipped"), top
    # fp8 really ran (the emulation on the CPU), compiled (traced) fp8 and the measured attention backend too
    assert 0 < rows["precision/fp8_eager"]["error"] <= rows["precision/fp8_eager"]["tol"]
    assert rows["precision/fp8_eager"]["info"]["fp8_layers"] > 0
    assert rows["precision/fp8_compiled"]["info"]["graphs"] > 0
    assert rows["precision/attn_measure"]["info"]["choices"]
    assert claims["smoke hunyuan-video15"]["measured"].startswith("8/8 ok")


def test_unknown_step_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        S.main(["--dry-run", "--only", "latency_fluxx", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])


def _write(work: Path, name: str, payload: dict) -> None:
    (work / name).write_text(json.dumps(payload))


def _junit(work: Path, cases: dict[str, str]) -> None:
    body = []
    for name, state in cases.items():
        inner = {"passed": "", "failed": "<failure message='x'/>", "skipped": "<skipped message='y'/>"}[state]
        body.append(f'<testcase classname="t" name="{name}">{inner}</testcase>')
    (work / "gpu_tests.xml").write_text(f"<testsuites><testsuite>{''.join(body)}</testsuite></testsuites>")


def _claims(work, **results):
    res = {k: S.Result(k, v, seconds=1.0) for k, v in results.items()}
    return {c["claim"]: c for c in S.claims(work, res, dry=False)}


def test_claims_met_and_not_met(tmp_path):
    work = tmp_path
    _junit(work, {"test_gpu_op_matches_reference_and_triton[a]": "passed",
                  "test_gpu_triton_matches_reference_and_csrc[b]": "passed", "test_other": "skipped"})
    _write(work, "transition_nvidia-h200.json", {"rows": [
        {"shape": "bw_2to3_L65536", "impl": "triton", "pct_hbm": 75.0, "graph_us": 3.9, "pct_of_copy": 90.0},
        {"shape": "1to2_r0.1", "impl": "triton", "graph_us": 1.9, "pct_of_copy": 61.8},
        {"shape": "bw_2to3_L65536", "impl": "cuda", "pct_hbm": 40.0, "graph_us": 7.1},
        {"shape": "2to3_r0.3", "impl": "triton", "graph_us": 2.5}]})
    _write(work, "transition_ablation_nvidia-h200.json", {"rows": [
        {"shape": "bw_2to3_L65536", "variant": "kernel", "us": 8.1}, {"shape": "bw_2to3_L65536", "variant": "copy",
                                                                      "us": 5.0},
        {"shape": "2to3_r0.3", "variant": "kernel", "us": 2.2}]})
    _write(work, "latency_flux_full_nvidia-h200.json", {"rows": [
        {"row": "baseline-eager", "kind": "eager", "mean_s": 9.0, "recompiles_after_warmup": 0},
        {"row": "baseline-compiled", "kind": "compiled", "mean_s": 6.5, "recompiles_after_warmup": 0,
         "speedup_vs_baseline-eager": 9.0 / 6.5},
        {"row": "ralu-7x-compiled", "kind": "compiled", "mean_s": 0.9, "first_call_s": 20.0,
         "recompiles_after_warmup": 1, "speedup_vs_baseline-eager": 10.0, "speedup_vs_baseline-compiled": 7.2},
        {"row": "ralu-4x-compiled", "kind": "compiled", "mean_s": 1.7, "recompiles_after_warmup": 0,
         "speedup_vs_baseline-compiled": 3.8}]})
    _write(work, "latency_flux_warm_start_nvidia-h200.json", {"rows": [{"row": "ralu-7x-compiled",
                                                                         "first_call_s": 6.0}]})
    c = _claims(work, build="ok", ctest="failed", gpu_tests="ok")
    assert c["CUDA extension ralu_kernels._C builds (sm_90) and loads"]["met"] == "yes"
    assert c["csrc ctest: device Philox/transition vs host reference, extreme-uniform probe"]["met"] == "NO"
    assert c["gpu-marked tests (kernels, csrc, attention, compile)"]["measured"] == "2 passed, 0 failed, 1 skipped"
    assert c["Triton = CUDA op bitwise (group-major transition)"]["met"] == "yes"
    assert c["transition 65536 tokens x 64 ch bf16, triton: % of HBM peak"]["met"] == "yes"
    assert c["transition 65536 tokens x 64 ch bf16, cuda: % of HBM peak"]["met"] == "NO"
    assert c["transition 65536 x 64 ablations: device time per call"]["measured"] == "kernel 8.10 us, copy 5.00 us"
    copy = c["transition (triton) vs a device copy of the same bytes, every shape"]
    assert copy["met"] == "NO" and copy["measured"] == "bw_2to3_L65536 90.0 %, 1to2_r0.1 61.8 %", copy
    assert c["FLUX.1-dev shape 1024^2: ralu-7x-compiled vs 50-step eager"]["met"] == "yes"
    assert c["FLUX.1-dev shape 1024^2: ralu-7x-compiled vs 50-step compiled"]["met"] == "yes"
    assert c["FLUX.1-dev shape 1024^2: ralu-4x-compiled vs 50-step compiled"]["met"] == "NO"
    assert c["FLUX.1-dev shape 1024^2: ralu-5x-compiled vs 50-step compiled"]["measured"] == "not run"
    assert c["FLUX.1-dev shape 1024^2: ralu-5x-compiled vs 50-step compiled"]["met"] == "n/a"
    assert c["compiled rows: no recompiles after warm-up"]["met"] == "NO"
    warm = c["RALU 7x compiled, first call: cold (fresh caches) -> warm (new process, saved bundle)"]
    assert warm["met"] == "yes" and warm["measured"] == "20 s -> 6 s"
    assert c["SD3-medium shape 1024^2: ralu-3x-compiled vs 28-step compiled"]["met"] == "n/a"


def test_video_latency_steps_and_claims(tmp_path):
    ctx = S.Ctx(dry=False, dry_compile=False, work=tmp_path, out=tmp_path, slug="nvidia-h200", budget_s=530)
    (argv, env), = S.latency_video_cmds(ctx)
    assert argv[argv.index("--model") + 1] == "wan-480p" and argv[argv.index("--size") + 1] == "full"
    assert argv[argv.index("--rows") + 1] == "baseline-eager,ralu-7x-eager,ralu-4x-eager"
    assert argv[argv.index("--steps") + 1] == "4" and argv[argv.index("--scale-baseline-to") + 1] == "50"
    assert argv[argv.index("--tag") + 1] == "latency_wan-480p_full_nvidia-h200" and "TRITON_CACHE_DIR" in env
    assert [c[0][c[0].index("--model") + 1] for c in S.latency_video_720p_cmds(ctx)] == ["wan-720p", "hunyuan-video15"]
    step = {s.name: s for s in S.STEPS}["latency_video"]
    assert step.optional and step.limit_s <= 530 - 30  # fits one call together with the build (~30 s)

    _write(tmp_path, "latency_wan-480p_full_nvidia-h200.json", {"size": "full", "rows": [
        {"row": "baseline-eager", "mean_s": 40.0, "measured_steps": 4, "scaled_mean_s": 380.0,
         "stages_s": {"baseline": 30.0, "vae_decode": 10.0}, "speedup_vs_baseline-eager": 1.0},
        {"row": "ralu-7x-eager", "mean_s": 50.0, "speedup_vs_baseline-eager": 7.6},
        {"row": "ralu-4x-eager", "mean_s": 80.0, "speedup_vs_baseline-eager": 4.75}]})
    c = _claims(tmp_path, latency_video="ok")
    base = c["Wan 2.1 14B 480x832, 81 frames: 50-step eager CFG baseline, seconds per video"]
    assert base["measured"].startswith("380.0 s (4 steps measured: 40 s)")
    if S._video_flops():  # 4 calls x 3357 TFLOP in 30 s
        assert base["measured"].endswith("model calls at 448 TFLOP/s")
    r7 = c["Wan 2.1 14B 480x832, 81 frames: ralu-7x-eager vs 50-step eager"]
    assert r7["measured"] == "7.6x (50 s)" and r7["met"] == "n/a" and r7["goal"].startswith("record")
    assert c["Wan 2.1 14B 480x832, 81 frames: ralu-4x-eager vs 50-step eager"]["measured"] == "4.75x (80 s)"
    assert c["HunyuanVideo 1.5 704x1280, 121 frames: ralu-7x-eager vs 50-step eager"]["measured"] == "not run"


def test_bitwise_claim_not_met_when_its_tests_were_skipped(tmp_path):
    _junit(tmp_path, {"test_gpu_op_matches_reference_and_triton[a]": "skipped",
                      "test_gpu_triton_matches_reference_and_csrc[b]": "passed"})
    c = _claims(tmp_path, gpu_tests="ok")
    assert c["Triton = CUDA op bitwise (group-major transition)"]["met"] == "NO"
    assert c["gpu-marked tests (kernels, csrc, attention, compile)"]["met"] == "yes"


def test_crashed_test_run_is_not_met(tmp_path):
    res = {"gpu_tests": S.Result("gpu_tests", "failed", rc=-11, note="exit -11: python -m pytest")}
    c = {x["claim"]: x for x in S.claims(tmp_path, res, dry=False)}
    for claim in ("gpu-marked tests (kernels, csrc, attention, compile)",
                  "Triton = CUDA op bitwise (group-major transition)"):
        assert c[claim]["met"] == "NO" and "exit -11" in c[claim]["measured"]


def test_step_timeout_kills_the_process_group(tmp_path):
    ctx = S.Ctx(dry=True, dry_compile=False, work=tmp_path, out=tmp_path, slug="cpu", budget_s=60)
    (tmp_path / "logs").mkdir()
    step = S.Step("sleepy", "sleeps", 1, lambda c: [])
    cmds = [([sys.executable, "-c", "import time; print('start', flush=True); time.sleep(30)"], {})]
    res = S.run_commands(ctx, step, cmds, limit=2, console=None)
    assert res.status == "timeout" and res.seconds < 15
    assert "start" in (tmp_path / "logs" / "sleepy.log").read_text()
    res = S.run_commands(ctx, step, [([sys.executable, "-c", "raise SystemExit(3)"], {})], limit=20, console=None)
    assert res.status == "failed" and res.rc == 3


def test_missing_or_other_pinned_packages_are_named_before_any_step(monkeypatch, capsys):
    from importlib import metadata

    from test_docs import _setup_requirements

    # the suite's pins are setup.py's own (one source would need setup.py parsed on the GPU machine: kept in step here)
    install, _ = _setup_requirements()
    assert all(f"{dist}=={version}" in install for dist, version in S.PINNED.items()), (S.PINNED, install)
    assert S.missing_packages() == []  # this environment installs ralu's pins
    have = metadata.version("diffusers")
    assert S.missing_packages({"diffusers": "0.0.1"}) == [f"diffusers {have} is installed, ralu pins 0.0.1"]
    assert S.missing_packages({"no-such-dist-ralu": "1.0"}) == ["no-such-dist-ralu is not installed (ralu pins 1.0)"]
    # a GPU run without the carried wheels stops at once, naming the fix
    monkeypatch.setattr(S, "device_slug", lambda: "nvidia-h100-80gb-hbm3")
    monkeypatch.setattr(S, "PINNED", {"no-such-dist-ralu": "1.0"})
    assert S.main(["--only", "build"]) == 2
    err = capsys.readouterr().err
    assert "no-such-dist-ralu is not installed" in err and ".whl/" in err and "docs/gpu.md" in err


def test_independent_step_runs_every_command_and_names_each_failure(tmp_path):
    """A failing command ends an ordinary step; in an ``independent`` one (each family's latency in its own process)
    the rest still run, and the note names each failure by its ``--tag``."""
    ctx = S.Ctx(dry=True, dry_compile=False, work=tmp_path, out=tmp_path, slug="cpu", budget_s=60)
    (tmp_path / "logs").mkdir()

    def exit_with(code, tag):
        return [sys.executable, "-c", f"print('{tag}'); raise SystemExit({code})", "--tag", tag], {}

    cmds = [exit_with(1, "fam_a"), exit_with(0, "fam_b"), exit_with(2, "fam_c"), exit_with(0, "fam_d")]
    res = S.run_commands(ctx, S.Step("families", "each family", 60, lambda c: [], independent=True), cmds, limit=60,
                         console=None)
    assert res.status == "failed" and res.rc == 1, res
    assert res.note == "2 of 4 commands failed: exit 1: fam_a; exit 2: fam_c", res.note
    assert (tmp_path / "logs" / "families.log").read_text().count("\nfam_") == 4  # every command ran
    res = S.run_commands(ctx, S.Step("ordered", "stops at a failure", 60, lambda c: []), cmds, limit=60, console=None)
    assert res.status == "failed" and res.rc == 1 and "fam_b" not in (tmp_path / "logs" / "ordered.log").read_text()
    ok = S.run_commands(ctx, S.Step("fine", "all ok", 60, lambda c: [], independent=True),
                        [exit_with(0, "x"), exit_with(0, "y")], limit=60, console=None)
    assert ok.status == "ok" and ok.rc == 0 and ok.note == ""
    assert {s.name for s in S.STEPS if s.independent} == {"latency_families", "latency_video_720p"}


# ------------------------------------------------------------------------------------------------ partial results
def test_claims_fall_back_to_the_partial_json_of_a_step_cut_off(tmp_path):
    """2026-12-04: latency_flux hit its limit while saving the compile bundle after every row was timed; its final JSON
    was never written, only ``<tag>_partial.json`` (rows, no speedups). The claims use those rows, marked partial, and
    results.tar.gz carries the file."""
    _write(tmp_path, "latency_flux_full_nvidia-h200_partial.json", {"rows": [
        {"row": "baseline-eager", "kind": "eager", "mean_s": 9.0, "recompiles_after_warmup": 0},
        {"row": "ralu-7x-compiled", "kind": "compiled", "mean_s": 1.0, "first_call_s": 95.0,
         "recompiles_after_warmup": 0},
        {"row": "baseline-compiled", "kind": "compiled", "mean_s": 7.1, "recompiles_after_warmup": 0}]})
    c = _claims(tmp_path, latency_flux="timeout")
    r7 = c["FLUX.1-dev shape 1024^2: ralu-7x-compiled vs 50-step eager"]
    assert r7["measured"].startswith("9x (1 s)") and "partial" in r7["measured"] and r7["met"] == "NO"
    assert r7["source"].endswith("_partial.json")
    r7c = c["FLUX.1-dev shape 1024^2: ralu-7x-compiled vs 50-step compiled"]
    assert r7c["measured"].startswith("7.1x") and r7c["met"] == "yes"
    assert c["compiled rows: no recompiles after warm-up"]["met"] == "yes"
    assert c["FLUX.1-dev shape 1024^2: ralu-4x-compiled vs 50-step compiled"]["measured"] == "not run"
    # a final JSON wins over the partial one
    _write(tmp_path, "latency_flux_full_nvidia-h200.json", {"rows": [
        {"row": "ralu-7x-compiled", "kind": "compiled", "mean_s": 0.9, "recompiles_after_warmup": 0,
         "speedup_vs_baseline-eager": 10.5}]})
    c = _claims(tmp_path, latency_flux="ok")
    assert c["FLUX.1-dev shape 1024^2: ralu-7x-compiled vs 50-step eager"]["measured"] == "10.5x (0.9 s)"
    # video rows (scaled baselines) from a partial file too
    _write(tmp_path, "latency_wan-480p_full_nvidia-h200_partial.json", {"rows": [
        {"row": "baseline-eager", "mean_s": 40.0, "measured_steps": 4, "scaled_mean_s": 380.0},
        {"row": "ralu-7x-eager", "mean_s": 50.0}]})
    c = _claims(tmp_path, latency_video="timeout")
    assert c["Wan 2.1 14B 480x832, 81 frames: ralu-7x-eager vs 50-step eager"]["measured"] == "7.6x (50 s)"
    assert "partial" in c["Wan 2.1 14B 480x832, 81 frames: 50-step eager CFG baseline, seconds per video"]["measured"]
    # the partial files travel in results.tar.gz, also in the final publish
    (tmp_path / "logs").mkdir()
    ctx = S.Ctx(dry=False, dry_compile=False, work=tmp_path, out=tmp_path / "out", slug="nvidia-h200", budget_s=60)
    ctx.out.mkdir()
    S.publish(ctx, {"latency_flux": S.Result("latency_flux", "timeout")}, final=True)
    with tarfile.open(ctx.out / "results.tar.gz") as tf:
        names = set(tf.getnames())
    assert "gpu_suite/latency_flux_full_nvidia-h200_partial.json" in names
