"""The family registry (ralu_runtime.families): one torch-free table that the CLI, the adapters, tiny/, the schedule's
presets and the benchmarks read; and the published settings it holds (issue 22, item 16), each checked against what
runs (a test per setting, failing on the old values)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ralu_runtime.families import FAMILIES, MODELS, TINY_MODELS, family_for_pipeline, load_object

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_the_registry_and_the_cli_import_without_torch():
    code = ("import sys, ralu_runtime.families, ralu_runtime.cli; ralu_runtime.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_table_is_read_from_the_registry():
    import diffusers

    from ralu_runtime import cli
    from ralu_runtime.adapters import ADAPTERS
    from ralu_runtime.schedule import PRESET_SPECS
    from ralu_runtime.tiny import TINY_BUILDERS

    assert ADAPTERS == {cls: f.adapter for f in FAMILIES.values() for cls in f.pipelines}
    assert all(hasattr(diffusers, cls) for cls in ADAPTERS)
    assert {name: dict(spec) for name, spec in PRESET_SPECS.items()} == {n: dict(f.presets) for n, f in FAMILIES.items()}
    assert TINY_BUILDERS == {n: (t.builder, dict(t.kwargs)) for n, t in TINY_MODELS.items()}
    assert cli.TINY_MODELS == {n: (t.family, t.max_side_px) for n, t in TINY_MODELS.items()}
    assert cli.PIPELINE_FAMILIES == {cls: f.name for f in FAMILIES.values() for cls in f.pipelines}
    for fam in FAMILIES.values():
        cls = fam.adapter_class()
        assert fam.default_preset in fam.presets
        if fam.variant_of is None:  # variants are set per pipeline in the adapter's __init__
            assert (cls.family, cls.default_steps, cls.default_guidance, cls.default_preset) == \
                (fam.name, fam.default_steps, fam.default_guidance, fam.default_preset), fam.name
        else:
            assert family_for_pipeline(FAMILIES[fam.variant_of].pipelines[0]).adapter == fam.adapter
    for model in MODELS.values():
        assert callable(load_object(model.builder)) and callable(load_object(model.embeds))
        assert set(model.preset_names) <= set(FAMILIES[model.family].presets)


def test_every_default_names_its_source():
    """Each default of a family or a published model in families.py carries a comment (where it comes from)."""
    text = (ROOT / "ralu_runtime" / "families.py").read_text()
    keys = ("default_steps=", "default_guidance=", "base_shift=", "steps=", "guidance=", "guidance_2=", "flow_shift=")
    bare = [line.strip() for line in text.splitlines()
            if re.match(r"\s+(" + "|".join(keys) + ")", line) and "#" not in line]
    assert not bare


def test_unknown_references_are_refused():
    with pytest.raises(ValueError, match="module:name"):
        load_object("ralu_runtime.families")
    with pytest.raises(ValueError, match="size='medium'"):
        MODELS["flux"].build("medium")


# ------------------------------------------------------------------------------------------ published settings
def test_wan21_720p_uses_flow_shift_5():
    """Wan 2.1's model card: flow shift 5.0 at 720p (3.0 is the 480p setting); the 720p presets are solved for it."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.schedule import get_preset

    assert (MODELS["wan-720p"].flow_shift, MODELS["wan-480p"].flow_shift) == (5.0, 3.0)
    for key, shift in (("wan-720p", 5.0), ("wan-480p", 3.0)):
        pipe = MODELS[key].build("full", device="meta", dtype=torch.bfloat16)
        adapter = get_adapter(pipe)
        h, w = MODELS[key].native
        assert adapter.preset_base_shift(h, w) == shift
        assert get_preset(adapter.family, "7x", adapter.preset_base_shift(h, w)).base_shift == shift


def test_z_image_turbo_baseline_is_8_model_calls():
    """Z-Image-Turbo's release is 8 model calls; diffusers 0.42.1 makes N steps N calls: the baseline is 8 steps."""
    from ralu_runtime.tiny import build_tiny

    assert (MODELS["z-image-turbo"].steps, MODELS["z-image-turbo"].guidance) == (8, 0.0)
    pipe = build_tiny("tiny-z-image")
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        pipe(prompt="a cat", height=64, width=64, num_inference_steps=MODELS["z-image-turbo"].steps,
             guidance_scale=0.0, output_type="latent")
    finally:
        handle.remove()
    assert len(calls) == 8


def test_wan22_a14b_defaults_are_the_release_with_per_expert_guidance():
    """Wan 2.2 T2V A14B: 40 steps, guidance 4.0 for the high-noise expert and 3.0 for the low-noise one; generate with
    no guidance equals pipe(guidance_scale=4.0, guidance_scale_2=3.0); one-transformer Wan keeps 50 steps, 5.0."""
    from ralu_runtime import generate, prepare
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.tiny.wan import build_tiny_wan_pipeline, random_embeds

    a14b = MODELS["wan22-a14b"]
    assert (a14b.steps, a14b.guidance, a14b.guidance_2) == (40, 4.0, 3.0)
    pipe = build_tiny_wan_pipeline(seed=0, two_experts=True, num_layers=1)
    adapter = get_adapter(pipe)
    assert (adapter.default_steps, adapter.default_guidance, adapter.guidance_scale_2) == (40, 4.0, 3.0)
    pipe21 = build_tiny_wan_pipeline(seed=0, num_layers=1)
    one = get_adapter(pipe21)
    assert (one.default_steps, one.default_guidance, one.guidance_scale_2) == (50, 5.0, None)
    emb = random_embeds(pipe, 1, 12, seed=0, cfg=True)
    kw = dict(height=64, width=96, num_frames=9, output_type="latent")
    plan = prepare(pipe, **emb, speedup=None, progress=False, **kw)
    assert (plan.steps, plan.guidance) == (40, 4.0)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    ours = generate(pipe, **emb, generator=g(), speedup=None, num_inference_steps=3, progress=False, **kw).images
    ref = pipe(**emb, generator=g(), num_inference_steps=3, guidance_scale=4.0, guidance_scale_2=3.0, **kw).frames
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    same = pipe(**emb, generator=g(), num_inference_steps=3, guidance_scale=4.0, **kw).frames  # 4.0 for both
    assert (same - ref).abs().max() > 1e-4  # the low-noise expert's guidance reaches it


def test_sd35_medium_baseline_is_40_steps_at_guidance_4_5():
    assert (MODELS["sd35-medium"].steps, MODELS["sd35-medium"].guidance) == (40, 4.5)
    assert (MODELS["sd35-large"].steps, MODELS["sd35-large"].guidance) == (28, 3.5)


@pytest.mark.parametrize("name,key,steps,base_shift", [
    ("families_flops", "z-image-turbo", 8, 3.0), ("families_flops", "sd35-medium", 40, 3.0),
    ("families_video_flops", "wan-720p", 50, 5.0), ("families_video_flops", "wan22-a14b", 40, 3.0)])
def test_committed_flop_tables_use_the_published_settings(name, key, steps, base_shift):
    """The committed FLOP tables were recomputed with the registry's settings (benchmarks/families.py)."""
    rows = {r["family"]: r for r in json.loads((RESULTS / f"{name}.json").read_text())["flops"]}
    runs = rows[key]["runs"]
    assert runs[0]["run"] == "baseline" and runs[0]["steps"] == steps == MODELS[key].steps
    assert all(r["base_shift"] == base_shift for r in runs[1:])
    assert [r["run"] for r in runs[1:]] == list(MODELS[key].preset_names)


def test_negative_prompt_flag_is_the_adapters():
    """Family.negative_prompt (what ralu generate --negative-prompt checks without loading a model) equals every
    built-in tiny model's adapter.supports_negative_prompt (FLUX.2: the tiny model is a FLUX.2-dev, no CFG)."""
    from ralu_runtime.adapters import get_adapter
    from ralu_runtime.families import FAMILIES, TINY_MODELS
    from ralu_runtime.tiny import build_tiny

    seen = set()
    for name, tiny in TINY_MODELS.items():
        if tiny.family in seen:
            continue
        seen.add(tiny.family)
        assert get_adapter(build_tiny(name)).supports_negative_prompt == FAMILIES[tiny.family].negative_prompt, name
    assert {"sd3", "flux", "flux2", "flux2-klein", "wan", "hunyuan-video-1.5"} <= seen
