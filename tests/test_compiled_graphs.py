"""The graphs of ralu's compiled block functions: static model dimensions, one graph per block kind.

**Static model dimensions: only token and batch counts are symbolic.**

Block functions compile with ``dynamic=True`` (one graph for every token count), under which dynamo makes every
dimension of a plain tensor argument symbolic. Tensors that ralu owns or computes and passes into a block (fused q/k/v
weights, FLUX.2's modulation vectors, Chroma's per-block modulation rows, Wan's rotary tables, an AdaLN input under
fp8) must not bring a symbolic *model* dimension with them: it spreads to the head count and feature sizes of every
kernel around it (run-time index divisions, no specialisation). Before this was fixed, FLUX.1's fused q/k/v rows made
the head count of every attention symbolic (``(s // 3) // 128``).

What is checked (:func:`ralu_runtime.compile.graph_check.symbolic_feature_dims`, on every graph dynamo hands to a
recording backend that runs it eagerly): every floating-point tensor in a block graph has a static last (feature)
dimension, unless that dimension is one of the graph's sequence lengths. A symbolic feature dimension names the node
and its shape. The check itself is tested on a graph with a symbolic weight (it must object). Without the fix (the
marks and the fp8 check removed) the cases of every family that fuses q/k/v or passes its own tables fail.

**No restarted trace.** The block modules are arguments, so their float attributes (norm eps, dropout p) were
symbolic floats that AOTAutograd's scalar pass specialised by restarting the trace (one extra trace per cold
compile, in every family); the runner compiles with ``specialize_float=True``. The family cases run their graphs
through ``aot_eager`` and count the backend's calls against its graphs; without the setting all twelve fail.

**One graph per block kind.** The first block's inputs are the embedded tokens, views of a Linear's output; dynamo
guards a view argument's base, so block 0 used to compile a graph of its own and the blocks after it a second one
(FLUX.1's double blocks, Qwen-Image, HunyuanVideo 1.5: a cold compile traced the kind twice). The block stack now
hands its first state over as non-views (an alias under no_grad): after a whole RALU call (three stages, two token
counts) each family has exactly one graph per block kind, counted on models with several blocks of each kind.
Likewise the joined sequence entering FLUX's single blocks (a view in the packed layout): packed FLUX compiles two
graphs, not three.
"""
from __future__ import annotations

import pytest
import torch

import ralu_runtime
from ralu_runtime.adapters import TokenGrid, VelocityCall, get_adapter
from ralu_runtime.compile import compile_adapter, uncompile_adapter
from ralu_runtime.compile.graph_check import RecordingBackend
from ralu_runtime.execution.call import static_dims
from ralu_runtime.layout import grid_positions
from ralu_runtime.tiny import build_tiny

VIDEO = ("tiny-wan", "tiny-wan22", "tiny-hunyuan-video15")


def _generate(name: str, inner: str = "eager", **compile_options) -> RecordingBackend:
    torch._dynamo.reset()
    rec = RecordingBackend(inner)
    pipe = build_tiny(name)
    extra = {"num_frames": 5} if name in VIDEO else {}
    if compile_options.get("fused_qkv") and not get_adapter(pipe).fuses_projections:
        compile_options = {**compile_options, "fused_qkv": None}  # refused where there is nothing to fuse
    ralu_runtime.generate(pipe, "a red fox", height=128, width=128, seed=0, output_type="latent", progress=False,
                          backend="inductor", compile_options={"dynamo_backend": rec, "compile_vae": False,
                                                               **compile_options}, **extra)
    uncompile_adapter(pipe)
    return rec


def test_the_check_objects_to_a_symbolic_weight():
    """A weight passed as a plain argument under dynamic=True (what fused q/k/v did): its rows, and the head count
    taken from them, are symbolic; marked static, nothing is."""
    def block(x, w):
        q = torch.nn.functional.linear(x, w).unflatten(-1, (-1, 4))
        return q.flatten(2) * 2

    x, w = torch.randn(1, 6, 8), torch.randn(8, 8)
    for static in (False, True):
        torch._dynamo.reset()
        rec = RecordingBackend()
        if static:
            w = static_dims(w.clone())
        torch.compile(block, backend=rec, dynamic=True, fullgraph=True)(x, w)
        assert rec.graphs == 1
        assert bool(rec.bad) is not static, rec.bad


@pytest.mark.parametrize("name", [
    "tiny-flux",
    pytest.param("tiny-flux-kontext", marks=pytest.mark.slow),
    pytest.param("tiny-sd3", marks=pytest.mark.slow),
    pytest.param("tiny-sd35", marks=pytest.mark.slow),
    "tiny-flux2",
    pytest.param("tiny-flux2-klein", marks=pytest.mark.slow),
    pytest.param("tiny-qwen-image", marks=pytest.mark.slow),
    pytest.param("tiny-z-image", marks=pytest.mark.slow),
    "tiny-chroma",
    "tiny-wan",
    pytest.param("tiny-wan22", marks=pytest.mark.slow),
    pytest.param("tiny-hunyuan-video15", marks=pytest.mark.slow),
])
def test_compiled_blocks_of_every_family_have_static_model_dims(name):
    """Fused q/k/v (every family that fuses), FLUX.2's shared modulation, Chroma's modulation rows, Wan's rotary
    tables: RALU's default preset through generate with the inductor backend's block functions.

    The graphs go through AOTAutograd's passes (``aot_eager``) as inductor's would: no trace is restarted (the
    blocks' float attributes, norm eps and dropout p, are constants under the runner's dynamo settings; symbolic,
    they cost every block kind a second trace at a cold compile)."""
    rec = _generate(name, "aot_eager", fused_qkv=True)
    assert rec.graphs >= 1
    assert not rec.bad, f"{name}: symbolic feature dimensions in compiled blocks: {rec.bad[:6]}"
    assert rec.attempts == rec.graphs, f"{name}: {rec.attempts - rec.graphs} restarted traces"


@pytest.mark.parametrize("name", ["tiny-flux", pytest.param("tiny-wan", marks=pytest.mark.slow),
                                  pytest.param("tiny-hunyuan-video15", marks=pytest.mark.slow)])
def test_fp8_blocks_have_static_model_dims(name):
    """Under fp8 the AdaLN's Linear is an fp8 product whose fake kernel does not tie the input's features to the
    weight's: fp8_matmul checks them, which keeps the AdaLN input's feature dimension static."""
    rec = _generate(name, precision="fp8")
    assert rec.graphs >= 1
    assert not rec.bad, f"{name} fp8: symbolic feature dimensions in compiled blocks: {rec.bad[:6]}"


@torch.no_grad()
def test_packed_flux_blocks_have_static_model_dims():
    """Packed calls (the serving engine's): token and segment counts symbolic, the fused weights' sizes not."""
    torch._dynamo.reset()
    rec = RecordingBackend()
    pipe = build_tiny("tiny-flux")
    adapter = get_adapter(pipe)
    runner = compile_adapter(pipe, "inductor", dynamo_backend=rec, fused_qkv=True, compile_vae=False)
    g = torch.Generator().manual_seed(0)
    calls = []
    for hw, b, t, text_len in (((4, 4), 1, 900.0, 8), ((6, 4), 2, 300.0, 5)):
        pos = grid_positions(*hw).expand(b, -1, -1).contiguous()
        cond = adapter.encode_prompt(None, prompt_embeds=torch.randn(b, text_len, 32, generator=g),
                                     pooled_prompt_embeds=torch.randn(b, 32, generator=g), guidance_scale=3.5)
        x = torch.randn(b, pos.shape[1], adapter.token_channels, generator=g)
        calls.append(VelocityCall(x, TokenGrid(pos, hw, None, raster=True), torch.tensor(t), cond))
    try:
        runner.packed(calls)
        compiled = [n for n in runner.impl.compiled_blocks if n.endswith("_packed")]
    finally:
        uncompile_adapter(pipe)
    assert compiled == ["flux_double_packed", "flux_single_packed"]
    assert not rec.bad, f"symbolic feature dimensions in packed blocks: {rec.bad[:6]}"
    # the packed join of text and image (a view of the gathered rows) enters the single blocks as a non-view: both
    # single blocks share one graph (a view would give the first its own)
    assert len(pipe.transformer.single_transformer_blocks) >= 2
    assert rec.graphs == 2, f"{rec.graphs} graphs for the 2 packed block kinds"


# models with several blocks of each kind; graphs after a whole RALU call (the block kinds: FLUX.1 double and single,
# SD3's joint block and its last, context_pre_only variant, Qwen-Image's and HunyuanVideo 1.5's one block kind)
ONE_GRAPH_PER_KIND = [("flux-small", 2), ("tiny-sd3", 2), ("tiny-qwen-image", 1), ("tiny-hunyuan-video15", 1)]


@pytest.mark.parametrize("name,kinds", ONE_GRAPH_PER_KIND)
def test_every_block_of_a_kind_shares_one_graph(name, kinds):
    from ralu_runtime.tiny.flux import build_flux_pipeline

    torch._dynamo.reset()
    rec = RecordingBackend()
    pipe = build_flux_pipeline("small") if name == "flux-small" else build_tiny(name)
    stacks = [m for m in pipe.transformer.children() if isinstance(m, torch.nn.ModuleList)]
    assert all(len(s) >= 2 for s in stacks), "the test needs two or more blocks of every kind"
    extra = {"num_frames": 5} if name in VIDEO else {}
    prompt = {"prompt": "a red fox"} if name != "flux-small" else {
        "prompt_embeds": torch.randn(1, 7, 256), "pooled_prompt_embeds": torch.randn(1, 128)}
    fused = {"fused_qkv": True} if get_adapter(pipe).fuses_projections else {}
    for _ in range(2):
        ralu_runtime.generate(pipe, height=128, width=128, seed=0, output_type="latent", progress=False,
                              backend="inductor", compile_options={"dynamo_backend": rec, "compile_vae": False,
                                                                   **fused}, **prompt, **extra)
    uncompile_adapter(pipe)
    assert rec.graphs == kinds, f"{name}: {rec.graphs} graphs for {kinds} block kinds after two RALU calls"
