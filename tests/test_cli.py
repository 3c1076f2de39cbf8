"""The ``ralu`` command line: fast help, argument checks before any model work, one-line errors and exit codes,
all-or-nothing image writes, the compile row, ``ralu info``, and the same PNG from two processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ralu_runtime
from ralu_runtime import cli

HEAVY = ("torch", "numpy", "scipy", "diffusers", "transformers", "PIL")


def run_cli(*args, env=None, cwd=None, timeout=120):
    """``python -m ralu_runtime.cli ARGS`` in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ralu_runtime.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def error_line(stderr: str) -> str:
    """The one ``ralu: error:`` line of stderr (library warnings printed before it are ignored)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("ralu: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------------------------------- help
def test_help_imports_nothing_heavy():
    code = ("import sys, ralu_runtime.cli as c\n"
            "p = c.build_parser(); p.format_help()\n"
            "for cmd in ('generate', 'info'):\n"
            "    try: p.parse_args([cmd, '--help'])\n"
            "    except SystemExit: pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_help_exits_0():
    res = run_cli("--help")
    assert res.returncode == 0 and "generate" in res.stdout and "info" in res.stdout and "--debug" in res.stdout
    res = run_cli("generate", "--help")
    assert res.returncode == 0, res.stderr
    for flag in ("--model", "--speedup", "--backend", "--mask-out", "--debug", ".[onnx]"):
        assert flag in res.stdout
    assert cli.main(["info", "--help"]) == 0


def test_version_prints_the_installed_version_without_heavy_imports():
    from importlib import metadata

    code = ("import sys, ralu_runtime.cli as c\n"
            "try: c.build_parser().parse_args(['--version'])\n"
            "except SystemExit as e: print('exit', e.code)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines == [f"ralu {metadata.version('ralu')}", "exit 0", "[]"], lines


def test_package_names_resolve_lazily():
    from ralu_runtime import RaluOutput, RaluSchedule, generate, get_preset, load_pipeline, solve_nt_matching
    from ralu_runtime.api import generate as api_generate
    from ralu_runtime.schedule import get_preset as schedule_get_preset

    assert generate is api_generate and get_preset is schedule_get_preset
    assert all(callable(f) for f in (RaluOutput, RaluSchedule, load_pipeline, solve_nt_matching))
    assert set(ralu_runtime.__all__) <= set(dir(ralu_runtime))
    assert ralu_runtime.schedule.PRESET_SPECS and ralu_runtime.adapters.get_adapter
    with pytest.raises(AttributeError):
        ralu_runtime.no_such_name  # noqa: B018


def test_help_names_match_the_registries(flux_pipe, sd3_pipe):
    """The names --help lists without importing torch are those of the modules that own them."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.compile import BACKENDS
    from ralu_runtime.schedule import PRESET_SPECS
    from ralu_runtime.solvers import SOLVERS

    assert cli.SOLVER_NAMES == tuple(SOLVERS)
    assert cli.BACKEND_NAMES == tuple(BACKENDS)
    assert set(cli.COMPILED_BACKENDS) == set(BACKENDS) - {"eager"}
    assert all(name in cli.PRESET_HELP for presets in PRESET_SPECS.values() for name in presets)
    for name, pipe in (("tiny-flux", flux_pipe), ("tiny-sd3", sd3_pipe)):
        adapter = get_adapter(pipe)
        assert cli.TINY_MODELS[name] == (adapter.family, adapter.max_size())
        assert adapter.coarse_block_px == cli.COARSE_BLOCK_PX


def test_edit_and_serve_help_name_every_editing_family_and_default_strength():
    """ralu edit's and ralu serve's descriptions name each family that edits (ralu_runtime.editing), and the
    --strength help names each editing pipeline's own default strength (the CLI passes none: generate takes it)."""
    import inspect

    import diffusers
    from ralu_runtime.editing import EDIT_FAMILIES, EDIT_FAMILY_TABLE

    label = {"flux": "FLUX.1", "flux-schnell": "FLUX.1", "sd3": "SD3", "chroma": "Chroma", "z-image": "Z-Image",
             "qwen-image": "Qwen-Image"}
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for command in ("edit", "serve"):
        text = " ".join(sub[command].description.split())
        missing = [f for f in EDIT_FAMILIES if label[f] not in text]
        assert not missing, f"ralu {command} --help does not name {missing}: {text}"
    strength = " ".join(next(a for a in sub["edit"]._actions if a.dest == "strength").help.split())
    classes = {c for row in EDIT_FAMILY_TABLE.values() for c in (row.img2img, row.inpaint)} | {"FluxFillPipeline"}
    defaults = {inspect.signature(getattr(diffusers, c).__call__).parameters["strength"].default for c in classes}
    assert all(f"{d:g}" in strength.replace("1.0", "1") for d in defaults), (defaults, strength)


# ------------------------------------------------------------------------------------------- bad arguments
BAD = [
    (["--height", "70"], "--height 70"),
    (["--width", "0"], "--width 0"),
    (["--height", "abc"], "'abc'"),
    (["--model", "tiny-sd3", "--height", "2048"], "at most 1536"),
    (["--speedup", "9x"], "'9x'"),
    (["--model", "tiny-sd3", "--speedup", "7x"], "'7x'"),
    (["--steps", "5"], "--steps 5"),
    (["--speedup", "none", "--steps", "0"], "--steps 0"),
    (["--solver", "rk4"], "'rk4'"),
    (["--cache", "taylorseer:x"], "taylorseer:x"),
    (["--backend", "fast"], "'fast'"),
    (["--model", "black-forest-labs/FLUX.1-dev"], "model folder not found: 'black-forest-labs/FLUX.1-dev'"),
    (["--model", "{tmp}/empty"], "no model_index.json"),
    (["--model", "{tmp}/sdxl"], "'StableDiffusionXLPipeline'"),
    (["--out", "missing/x.png"], "missing"),
    (["--out", "x.xyz"], "'.xyz'"),
    (["--out", "noext"], "no file extension"),
    (["--out", "x.ico"], "'.ico' writes an icon (ICO)"),     # was written downscaled to 256 px
    (["--out", "x.icns"], "'.icns' writes an icon (ICNS)"),  # was written stretched to a 1024 px square
    (["--out", "dir.png"], "is a folder"),
    (["--out", "fifo.png"], "exists and is not a regular file"),      # opening a FIFO blocked for good
    (["--speedup", "none", "--mask-out", "m.png"], "--mask-out"),
    (["--mask-out", "ralu.png"], "same file"),
    (["--mask-out", "missing/m.png"], "missing"),
    (["--device", "tpu"], "'tpu'"),
    (["--negative-prompt", "blurry"], "--negative-prompt: tiny-flux (flux) runs no classifier-free guidance"),
    (["--model", "tiny-flux2-klein", "--negative-prompt", "x"], "tiny-flux2-klein (flux2-klein) runs no"),
    (["--device", "cpu:1"], "--device 'cpu:1': there is one CPU device; use cpu"),
    (["--speedup", "none", "--edge-detector", "gpu"], "--edge-detector needs a RALU run"),   # were ignored
    (["--speedup", "none", "--noise", "exact"], "--noise needs a RALU run"),
    (["--speedup", "none", "--region-source", "latent"], "--region-source needs a RALU run"),
    (["--model", "tiny-wan", "--speedup", "none", "--regions", "clip"], "--regions needs a RALU run"),
    (["--guidance", "inf"], "--guidance inf"),
    (["--guidance", "-1"], "--guidance -1.0 is not allowed: need a number in [0, 100]"),
    (["--precision", "fp16"], "--precision fp16 but the model runs in float32 (--dtype)"),   # was after the build
    (["--model", "tiny-flux-fill"], "tiny-flux-fill is a FLUX.1 fill model, which ralu generate cannot run"),
    (["--model", "tiny-flux-control"], "ralu edit --control-image IMG"),
    (["--height", "4096", "--width", "4096", "--speedup", "none", "--steps", "1000"],     # was after the build
     "this run's work is 65536000 latent tokens x model calls (65536 tokens, 1000 steps); the limit is "
     "max_token_steps=16777216"),
    (["--max-sequence-length", "0"], "--max-sequence-length 0"),
    (["--model", "tiny-hunyuan-video15", "--max-sequence-length", "64"], "--max-sequence-length does not apply"),
    (["--seed", "-1"], "--seed -1"),
    (["--cpu-offload", "--backend", "inductor"], "--cpu-offload runs eagerly: --backend inductor holds the weights"),
    (["--cpu-offload", "--precision", "fp8"], "--cpu-offload with --precision fp8: ralu's fp8 weight copies"),
    (["--storage-dtype", "bfloat16", "--dtype", "bfloat16"], "--storage-dtype bfloat16 is not narrower than the "
                                                             "model's --dtype bfloat16"),
    (["--storage-dtype", "bfloat16", "--backend", "onnx"], "--storage-dtype with --backend onnx (an exported model"),
    (["--storage-dtype", "float8_e4m3fn", "--precision", "fp8"], "--storage-dtype with --precision fp8: use one"),
    (["--prompt", "fox \udcff\udcfe"], "--prompt is not valid UTF-8"),   # bytes b"\xff\xfe" on the command line
    (["--model", "tiny-sd3", "--negative-prompt", "\udcc3"], "--negative-prompt is not valid UTF-8"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current folder with two model-like folders; building or loading a model there fails the test."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "dir.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    monkeypatch.chdir(tmp_path)

    def no_load(plan):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load", no_load)
    return tmp_path


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_is_one_line_exit_2(workdir, capsys, args, needle):
    args = [a.replace("{tmp}", str(workdir)) for a in args]
    before = sorted(p.name for p in workdir.iterdir())
    assert cli.main(["generate", "--no-progress", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    line = error_line(captured.err)
    assert captured.err.strip() == line
    assert needle.replace("{tmp}", str(workdir)) in line
    assert sorted(p.name for p in workdir.iterdir()) == before  # no image, no temporary file


def test_unavailable_backend_and_device_are_rejected(workdir, capsys):
    import torch

    from ralu_runtime.compile import available_backends

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for backend in cli.BACKEND_NAMES:
        if backend not in available_backends(device):
            assert cli.main(["generate", "--backend", backend]) == 2
            assert f"--backend {backend!r} is not available here" in error_line(capsys.readouterr().err)
    if not torch.cuda.is_available():
        assert cli.main(["generate", "--device", "cuda"]) == 2
        assert "--device 'cuda'" in error_line(capsys.readouterr().err)


def test_cpu_offload_needs_a_gpu_device_and_loads_offloaded(workdir, capsys, monkeypatch):
    """``--cpu-offload``: refused for a CPU device before anything loads; ``_load`` (here on a CPU, which only the
    check stops) builds the pipeline on the CPU with diffusers' model offload hooks to the plan's device."""
    import dataclasses

    from ralu_runtime.offload import offloaded_components

    assert cli.main(["generate", "--cpu-offload", "--device", "cpu"]) == 2
    assert "--cpu-offload moves models between the CPU and a GPU; --device cpu" in error_line(capsys.readouterr().err)
    monkeypatch.undo()  # the real _load
    plan = cli.check_generate(cli.build_parser().parse_args(["generate", "--device", "cpu"]))
    assert not plan.cpu_offload
    pipe = cli._load(dataclasses.replace(plan, cpu_offload=True))
    assert set(offloaded_components(pipe)) >= {"transformer", "vae", "text_encoder"}


@pytest.mark.parametrize("args,needle", [
    (["generate", "--height", "70"], "--height 70"),
    (["generate", "--model", "no/such-model"], "model folder not found: 'no/such-model'"),
    (["generate", "--cache", "fbcache"], "fbcache"),
    (["generate", "--solver", "rk4"], "'rk4'"),
    (["frobnicate"], "'frobnicate'"),
    ([], "required"),
])
def test_bad_argument_subprocess(tmp_path, args, needle):
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert needle in error_line(res.stderr)
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_exception(workdir):
    with pytest.raises(cli.UsageError, match="--height 70"):
        cli.main(["generate", "--height", "70", "--debug"])
    with pytest.raises(ValueError, match="'9x'"):
        cli.main(["--debug", "generate", "--speedup", "9x"])


# ------------------------------------------------------------------------------------------- runtime errors
def test_runtime_error_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    """A folder that passes the checks but cannot be loaded: exit 1 and one line; --debug raises."""
    model = tmp_path / "broken"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1", '
                                            '"transformer": ["diffusers", "FluxTransformer2DModel"]}')
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--model", str(model), "--height", "64", "--width", "64", "--no-progress"]
    assert cli.main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert "--debug" in line
    assert not (tmp_path / "ralu.png").exists()
    with pytest.raises(Exception):
        cli.main([*args, "--debug"])


def test_mask_write_failure_leaves_no_image(tmp_path, monkeypatch, capsys):
    """The mask cannot be written: the main image is not left behind (an older one stays as it was)."""
    out, mask = tmp_path / "img.png", tmp_path / "mask.png"
    out.write_bytes(b"older image")
    calls = []
    real_save = cli._save_image

    def save(array, file, fmt):
        calls.append(fmt)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(array, file, fmt)

    monkeypatch.setattr(cli, "_save_image", save)
    assert cli.main(["generate", "--height", "64", "--width", "64", "--out", str(out), "--mask-out", str(mask),
                     "--no-progress"]) == 1
    assert "No space left on device" in error_line(capsys.readouterr().err)
    assert len(calls) == 2
    assert out.read_bytes() == b"older image" and not mask.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]  # no temporary files either


# ------------------------------------------------------------------------------------------- generate
def test_storage_dtype_casts_the_transformer_and_writes_the_image(tmp_path):
    """``--storage-dtype bfloat16`` (float32 model on the CPU): the loaded transformer carries diffusers' layerwise
    casting to that storage, and the image is written."""
    import dataclasses

    import torch

    from ralu_runtime.adapters.base import layerwise_casting

    plan = cli.check_generate(cli.build_parser().parse_args(["generate", "--storage-dtype", "bfloat16"]))
    assert plan.storage_dtype == "bfloat16"
    pipe = cli._load(plan)
    hooks = [layerwise_casting(m) for m in pipe.transformer.modules() if layerwise_casting(m) is not None]
    assert hooks and {(h.storage_dtype, h.compute_dtype) for h in hooks} == {(torch.bfloat16, torch.float32)}
    assert cli._load(dataclasses.replace(plan, storage_dtype=None)) is not None
    out = tmp_path / "cast.png"
    assert cli.main(["generate", "--height", "64", "--width", "64", "--storage-dtype", "bfloat16", "--out", str(out),
                     "--no-progress"]) == 0
    assert out.stat().st_size > 0


def test_generate_prints_resolved_preset_and_writes_both(tmp_path, capsys):
    from PIL import Image

    out, mask = tmp_path / "img.jpg", tmp_path / "mask.webp"
    assert cli.main(["generate", "--height", "64", "--width", "96", "--out", str(out), "--mask-out", str(mask),
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "speedup: 7x (flux default): steps (2, 3, 5)" in text
    assert "compile (warm-up)" not in text  # eager: nothing to compile
    assert "stage1" in text and "total (generate)" in text
    assert Image.open(out).size == (96, 64) and Image.open(out).format == "JPEG"
    assert Image.open(mask).size == (96, 64) and Image.open(mask).format == "WEBP"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.jpg", "mask.webp"]


def test_negative_prompt_steers_where_cfg_runs_and_is_said_ignored_where_not(tmp_path, capsys, caplog):
    """--negative-prompt reaches generate: SD3 at its CFG guidance writes another image than without it; at
    --guidance 1 (no CFG, as StableDiffusion3Pipeline) the same image as without, and a warning says it was ignored."""
    from PIL import Image

    def run(name, *extra):
        out = tmp_path / f"{name}.png"
        assert cli.main(["generate", "--model", "tiny-sd3", "--height", "64", "--width", "64", "--speedup", "none",
                         "--steps", "2", "--no-progress", "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(out))

    plain, negative = run("plain"), run("neg", "--negative-prompt", "blurry, low quality")
    assert np.abs(plain.astype(int) - negative.astype(int)).max() > 0
    with caplog.at_level("WARNING", logger="ralu"):
        g1, g1_negative = run("g1", "--guidance", "1"), run("g1neg", "--guidance", "1", "--negative-prompt", "blurry")
    assert np.array_equal(g1, g1_negative)
    assert [r.getMessage() for r in caplog.records if r.name == "ralu"] == [
        "the negative prompt is ignored: at guidance_scale=1 sd3 runs no classifier-free guidance (as its diffusers "
        "pipeline); raise guidance_scale to use it"]


def test_compiled_backend_has_a_compile_row(tmp_path, monkeypatch, capsys):
    """--backend onnx: a warm-up builds every graph first (its own row); the real call builds nothing more."""
    from ralu_runtime import warmup as warmup_module
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.compile import available_backends

    if "onnx" not in available_backends("cpu"):
        pytest.skip("onnx and onnxruntime are not installed (pip install -e '.[onnx]')")
    seen = {}
    real_warmup = warmup_module.warmup

    def warmup(pipe, *args, **kwargs):
        result = real_warmup(pipe, *args, **kwargs)
        seen["adapter"], seen["builds"] = get_adapter(pipe), len(get_adapter(pipe).runner.builds)
        return result

    monkeypatch.setattr(warmup_module, "warmup", warmup)
    assert cli.main(["generate", "--height", "64", "--width", "64", "--speedup", "4x", "--backend", "onnx",
                     "--out", str(tmp_path / "a.png"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "speedup: 4x (flux preset): steps (5, 6, 7)" in text
    rows = [ln.split() for ln in text.splitlines()]
    assert ["compile", "(warm-up)"] == rows[[r[:1] for r in rows].index(["compile"])][:2]
    assert seen["builds"] > 0 and len(seen["adapter"].runner.builds) == seen["builds"]


# ------------------------------------------------------------------------------------------- reproducibility
VOCAB_CODE = ("import json; from ralu_runtime.tiny import byte_tokenizer; t = byte_tokenizer(77); "
              "v = t.get_vocab(); print(json.dumps([sorted(v.items(), key=lambda kv: kv[1]), "
              "t('a red fox, é')['input_ids']]))")


def test_tokenizer_vocab_is_the_same_in_every_process():
    procs = [subprocess.Popen([sys.executable, "-c", VOCAB_CODE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    first, second = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    assert first == second
    vocab, ids = first
    assert [i for _, i in vocab] == list(range(259))
    assert ids == [3 + b for b in "a red fox, é".encode()]


@pytest.mark.slow
def test_same_seed_same_png_across_processes(tmp_path):
    """Two processes (different hash seeds) with --seed 0 write byte-identical PNGs."""
    procs = [subprocess.Popen([sys.executable, "-m", "ralu_runtime.cli", "generate", "--height", "64", "--width", "64",
                               "--seed", "0", "--no-progress", "--out", str(tmp_path / f"{name}.png")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed})
             for name, seed in (("a", "1"), ("b", "2"))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# ------------------------------------------------------------------------------------------- info
def test_info_table():
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    for field in ("python", "ralu", "torch", "CUDA build", "diffusers", "transformers", "triton", "onnxruntime",
                  "opencv", "device", "transition (auto)", "varlen attention", "CUDA extension", "compile backends",
                  "precision fp8", "cache folder", "artifact key"):
        assert any(line.startswith(field) for line in res.stdout.splitlines()), field


def test_info_json(tmp_path, monkeypatch, capsys):
    import torch

    from ralu_runtime.compile import BACKENDS, available_backends

    cache = tmp_path / "cache"
    monkeypatch.setenv("RALU_CACHE_DIR", str(cache))
    monkeypatch.delenv("RALU_ARTIFACT_KEY_FILE", raising=False)
    monkeypatch.setenv("RALU_DISABLE_CSRC", "1")
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["python"]
    assert info["device"]["type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info["transition_auto"]["impl"] in ("cuda", "triton", "torch") and info["transition_auto"]["why"]
    assert info["varlen_attention_auto"]["backend"] == info["varlen_attention_auto"]["available"][0]
    assert info["cuda_extension"] == {"loaded": False, "why": "disabled by RALU_DISABLE_CSRC=1",
                                      "built": info["cuda_extension"]["built"]}
    usable = info["compile_backends"]["available"]
    assert usable == available_backends("cuda" if torch.cuda.is_available() else "cpu")
    assert set(usable) | set(info["compile_backends"]["unavailable"]) == set(BACKENDS)
    assert all(info["compile_backends"]["unavailable"].values())
    assert info["paths"]["cache_dir"] == str(cache) and info["paths"]["artifact_key"] == str(cache / "artifact.key")
    assert info["paths"]["artifact_key_status"] == "absent; created by the first save_compile_artifacts"
    assert not cache.exists()  # info only looks
    # a key file named by $RALU_ARTIFACT_KEY_FILE is never created, and one that would be refused says why
    for text, mode, status in ((None, None, "refused: $RALU_ARTIFACT_KEY_FILE names no file"),
                               ("not hex", 0o600, "refused: "), ("11" * 32, 0o644, "refused: "),
                               ("11" * 32, 0o600, "ok")):
        keyfile = tmp_path / f"key-{mode}-{bool(text)}"
        if text is not None:
            keyfile.write_text(text)
            keyfile.chmod(mode)
        monkeypatch.setenv("RALU_ARTIFACT_KEY_FILE", str(keyfile))
        assert cli.main(["info", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["paths"]["artifact_key_status"]
        assert got.startswith(status), (text, mode, got)
    monkeypatch.delenv("RALU_ARTIFACT_KEY_FILE")
    import importlib.util

    from ralu_runtime.compile.fp8 import resolve_kernel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fp8 = info["fp8"]
    if fp8["supported"]:  # the kernel precision="fp8" takes by default, and whether torchao is there
        assert fp8["auto_kernel"] == resolve_kernel("auto", dev)
        assert (fp8["torchao"] is None) == (importlib.util.find_spec("torchao") is None)


# ------------------------------------------------------------------------------------------- every family
def test_tiny_models_agree_with_their_adapters():
    """Each built-in model's CLI entry (family, size cap) is what its adapter says, and every entry builds."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.families import FAMILIES, family_for_pipeline
    from ralu_runtime.tiny import TINY_BUILDERS, build_tiny

    assert set(cli.TINY_MODELS) == set(TINY_BUILDERS)
    for name, (family, cap) in cli.TINY_MODELS.items():
        pipe = build_tiny(name)
        adapter = get_adapter(pipe)
        assert (adapter.family, adapter.max_size() or 4096) == (family, cap), name
        assert adapter.coarse_block_px == cli.COARSE_BLOCK_PX, name
        fam = family_for_pipeline(type(pipe).__name__)  # editing pipelines (FLUX.1 Fill, control, Kontext): their
        assert fam is not None and fam.name in (family, FAMILIES[family].variant_of), name  # base's family
    with pytest.raises(ValueError, match="unknown tiny model"):
        build_tiny("tiny-sdxl")


@pytest.mark.parametrize("name", ["tiny-sd35", "tiny-flux2", "tiny-flux2-klein", "tiny-qwen-image", "tiny-z-image",
                                  "tiny-chroma"])
def test_every_family_generates_from_the_cli(name, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "img.png"
    assert cli.main(["generate", "--model", name, "--height", "64", "--width", "96", "--out", str(out),
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    family = cli.TINY_MODELS[name][0]
    assert f"({family} default)" in text and "stage3" in text
    assert Image.open(out).size == (96, 64)


@pytest.mark.parametrize("cls,extra,family", [
    ("Flux2Pipeline", {}, "flux2"), ("Flux2KleinPipeline", {"is_distilled": True}, "flux2-klein"),
    ("Flux2KleinPipeline", {"is_distilled": False}, "flux2"), ("QwenImagePipeline", {}, "qwen-image"),
    ("ZImagePipeline", {}, "z-image"), ("ChromaPipeline", {}, "chroma"), ("WanPipeline", {}, "wan"),
    ("HunyuanVideo15Pipeline", {}, "hunyuan-video-1.5")])
def test_model_folder_family_from_model_index(tmp_path, cls, extra, family):
    """Family, default size and size cap of a folder, as its adapter would give them (caps from the default
    position tables where the folder's transformer config does not say)."""
    import json

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls, **extra}))
    hw = {"wan": (480, 832), "hunyuan-video-1.5": (480, 832)}.get(family, (1024, 1024))
    cap = {"z-image": 8192, "wan": 16384, "hunyuan-video-1.5": 2048}.get(family, 4096)
    assert cli._model_family(str(tmp_path)) == (family, hw, cap)


@pytest.mark.parametrize("name,regions,source", [("tiny-wan", "frame", "latent"),
                                                 ("tiny-hunyuan-video15", "clip", "decode")])
def test_video_models_write_an_animated_clip_and_overlay(name, regions, source, tmp_path, capsys):
    from PIL import Image

    out, mask = tmp_path / "clip.webp", tmp_path / "regions.webp"
    assert cli.main(["generate", "--model", name, "--height", "64", "--width", "96", "--frames", "5",
                     "--regions", regions, "--region-source", source, "--out", str(out), "--mask-out", str(mask),
                     "--no-progress"]) == 0
    assert "stage3" in capsys.readouterr().out
    for path in (out, mask):
        with Image.open(path) as im:
            assert im.is_animated and im.n_frames == 5 and im.size == (96, 64)


# ------------------------------------------------------------------------------------------- serve
SERVE_BAD = [
    (["--model", "tiny-wan"], "makes videos"),
    (["--speedup", "9x"], "'9x' is not a preset"),
    (["--model", "tiny-sd3", "--speedup", "7x"], "'7x' is not a preset"),
    (["--port", "70000"], "--port 70000"),
    (["--port", "http"], "'http'"),
    (["--max-active", "0"], "--max-active 0"),
    (["--max-queue", "-1"], "--max-queue -1"),
    (["--token-budget", "0"], "--token-budget 0"),
    (["--request-timeout", "0"], "--request-timeout 0"),
    (["--request-timeout", "1e10"], "need seconds <= 604800 (7 days"),   # a request's own timeout is capped there
    (["--grace", "nan"], "--grace nan"),
    (["--max-upload-mb", "0"], "--max-upload-mb 0"),
    (["--max-upload-pixels", "0"], "--max-upload-pixels 0"),
    (["--host", " "], "--host"),
    (["--device", "tpu"], "'tpu'"),
    (["--device", "cpu:2"], "there is one CPU device"),
    (["--model", "no/such/folder"], "model folder not found"),
    (["--device", "cpu", "--storage-dtype", "float16", "--dtype", "float16"], "--storage-dtype float16 is not "
                                                                               "narrower than the model's --dtype"),
    (["--device", "cpu", "--storage-dtype", "bfloat16", "--backend", "onnx"], "--storage-dtype with --backend onnx"),
    (["--device", "cpu", "--storage-dtype", "bfloat16", "--precision", "fp8"], "--storage-dtype with --precision "
                                                                                "fp8"),
    (["--device", "cpu", "--precision", "bf16"], "--precision bf16 but the model runs in float32"),
    (["--device", "cpu", "--precision", "fp9"], "invalid choice: 'fp9'"),
]


@pytest.mark.parametrize("args,needle", SERVE_BAD, ids=[" ".join(a) for a, _ in SERVE_BAD])
def test_serve_bad_argument_is_one_line_exit_2(workdir, capsys, args, needle):
    assert cli.main(["serve", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and needle in error_line(captured.err)


def test_serve_parser_defaults_and_plan(capsys):
    args = cli.build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.max_active, args.max_queue, args.token_budget, args.speedup,
            args.device, args.dtype, args.request_timeout, args.grace) == (
        "tiny-flux", "127.0.0.1", 8000, 8, 64, None, "default", None, None, 600.0, 30.0)
    plan = cli.check_serve(cli.build_parser().parse_args(["serve", "--speedup", "4x", "--device", "cpu"]))
    assert (plan.family, plan.device, plan.dtype) == ("flux", "cpu", "float32")
    assert plan.defaults == {"speedup": "4x", "height": cli.TINY_SIZE, "width": cli.TINY_SIZE,
                             "max_sequence_length": cli.TINY_TEXT_LEN}
    none = cli.check_serve(cli.build_parser().parse_args(["serve", "--speedup", "none", "--device", "cpu"]))
    assert none.defaults["speedup"] is None
    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--max-active", "--max-queue", "--token-budget", "--speedup",
                 "--device", "--dtype", "--request-timeout", "--grace", ".[serve]"):
        assert flag in out
    assert "serve" in cli.build_parser().format_help()


def test_serve_with_a_backend_warms_up_before_listening(monkeypatch, capsys):
    """``ralu serve --backend eager``: every request runs under the backend, installed by a warm-up request before
    the server listens (the server itself is replaced by a recorder here; tests/test_serving_http.py runs it)."""
    from ralu_runtime.serving import http

    seen = {}

    def fake_serve(engine, host, port, **kw):
        seen.update(defaults=dict(engine.defaults), ok=engine.metrics()["requests"]["ok"], host=host)

    import ralu_runtime.heap as W

    settled = []
    monkeypatch.setattr(http, "serve", fake_serve)
    # the server's process freezes its heap after warm-up (not this test process: recorded instead)
    monkeypatch.setattr(W, "settle_heap", lambda freeze=False: settled.append((freeze, seen.get("ok"))) or 0.25)
    assert cli.main(["serve", "--backend", "eager", "--device", "cpu", "--speedup", "4x", "--port", "0"]) == 0
    assert seen["defaults"]["backend"] == "eager" and seen["ok"] == 1 and seen["host"] == "127.0.0.1"
    assert settled == [(True, None)]  # after the warm-up request, before the server started
    out = capsys.readouterr().out
    assert "backend eager: warmed up" in out and "heap settled (gc.collect + gc.freeze) in 0.25 s" in out


def test_serve_storage_dtype_and_precision_reach_the_engine(monkeypatch, capsys):
    """``ralu serve --storage-dtype bfloat16 --precision fp8`` is refused (one or the other); ``--storage-dtype``
    casts the served transformer (diffusers' layerwise casting, float32 compute on the CPU) and ``--precision fp8``
    becomes every request's default (the CPU's fp8 kernel); both are named in the ready line. The server itself is
    replaced by a recorder that answers one request through the engine and calls ``on_ready``."""
    import torch

    from ralu_runtime.adapters.base import layerwise_casting
    from ralu_runtime.serving import http

    seen = {}

    def fake_serve(engine, host, port, on_ready=None, **kw):
        pipe = engine.pipe
        seen["casts"] = {(h.storage_dtype, h.compute_dtype) for h in map(layerwise_casting, pipe.transformer.modules())
                         if h is not None}
        seen["precision"] = engine.defaults.get("precision")
        out = engine.generate("a cat", seed=1, output_type="latent", num_inference_steps=2, speedup=None)
        seen["finite"] = bool(torch.isfinite(out.images).all())
        on_ready("http://127.0.0.1:1")

    monkeypatch.setattr(http, "serve", fake_serve)
    import ralu_runtime.heap as W

    monkeypatch.setattr(W, "settle_heap", lambda freeze=False: 0.0)
    for args in (["--storage-dtype", "bfloat16"], ["--precision", "fp8"]):
        seen.clear()
        assert cli.main(["serve", "--device", "cpu", "--port", "0", *args]) == 0
        out = capsys.readouterr().out
        assert seen["finite"]
        if "--storage-dtype" in args:
            assert seen["casts"] == {(torch.bfloat16, torch.float32)} and seen["precision"] is None
            assert "float32, weights stored in bfloat16)" in out
        else:
            assert seen["casts"] == set() and seen["precision"] == "fp8" and "float32, precision fp8)" in out


def test_the_cli_work_estimate_counts_tokens_as_the_adapters_do():
    """``ralu generate`` checks the work bound before loading with one latent token per 16 x 16 pixels per latent
    frame: what every family's adapter counts (a different count would refuse runs generate takes, or let through
    runs it refuses after the load)."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.families import FAMILIES, TINY_MODELS
    from ralu_runtime.tiny import build_tiny

    seen = set()
    for name, tiny in TINY_MODELS.items():
        if tiny.family in seen:
            continue
        seen.add(tiny.family)
        pipe = build_tiny(name)
        adapter = get_adapter(pipe)
        frames = 3 if adapter.is_video else 1
        assert adapter.temporal_factor == FAMILIES[tiny.family].temporal_factor, name
        assert adapter.fine_tokens(96, 160, frames) == frames * (96 // cli.TOKEN_PX) * (160 // cli.TOKEN_PX)


@pytest.mark.parametrize("out_args,flag", [(["--out", "{tmp}/in.png"], "--out"),
                                           (["--out", "o.png", "--mask-out", "{tmp}/./mask.png"], "--mask-out"),
                                           (["--out", "{tmp}/link.png"], "--out")])
def test_edit_refuses_to_write_over_its_own_input(workdir, capsys, out_args, flag):
    """``ralu edit --out`` naming the --image (or --mask) file, by any path or link, was written over: the input
    was lost. Refused before loading, the input left as it was."""
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(workdir / "in.png")
    Image.new("L", (64, 64), 255).save(workdir / "mask.png")
    (workdir / "link.png").symlink_to(workdir / "in.png")
    before = (workdir / "in.png").read_bytes(), (workdir / "mask.png").read_bytes()
    args = [a.replace("{tmp}", str(workdir)) for a in out_args]
    assert cli.main(["edit", "--no-progress", "--image", str(workdir / "in.png"), "--mask", str(workdir / "mask.png"),
                     "--strength", "1.0", "--height", "64", "--width", "64", *args]) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{flag} " in line and "would overwrite its own input" in line
    assert ((workdir / "in.png").read_bytes(), (workdir / "mask.png").read_bytes()) == before
