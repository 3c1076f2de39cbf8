"""Execution modes (``ralu_runtime.execution``): one block function per family serves every mode, the modes agree
with each other, and the package layering holds (adapters import neither ``parallel/`` nor ``serving/``)."""
import ast
from pathlib import Path

import pytest
import torch

from ralu_runtime.execution import DENSE, JOINT
from ralu_runtime.execution.packing import HostSegments, Packed, PackedSegments

ROOT = Path(__file__).resolve().parents[1] / "ralu_runtime"


# ------------------------------------------------------------------------------------------------ layering
def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports (absolute names; relative ones resolved against the package)."""
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "adapters").glob("*.py")) + sorted((ROOT / "execution").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_adapters_and_execution_import_no_parallel_or_serving(path):
    bad = {m for m in _imports(path) if m.startswith(("ralu_runtime.parallel", "ralu_runtime.serving"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_execution_imports_no_adapter():
    for path in (ROOT / "execution").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("ralu_runtime.adapters", "ralu_runtime.sampler",
                                                          "ralu_runtime.api", "ralu_runtime.compile"))}
        assert not bad, f"{path.name} imports {sorted(bad)}"


# ------------------------------------------------------------------------------------------------ one copy
def _functions(path: Path):
    """Every function of the module, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _statements(fn) -> list[str]:
    """The function's statements, flattened in order, as AST dumps without positions (names kept)."""
    out = []

    def visit(body):
        for st in body:
            out.append(ast.dump(st, annotate_fields=False, include_attributes=False))
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue  # a nested function is a function of its own (compared separately)
            for field in ("body", "orelse", "finalbody"):
                visit(getattr(st, field, []) or [])

    visit(fn.body)
    return out


def _shared_run(a: list[str], b: list[str]) -> int:
    """Length of the longest run of identical consecutive statements of ``a`` and ``b``."""
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                cur[j + 1] = prev[j] + 1
                best = max(best, cur[j + 1])
        prev = cur
    return best


def test_no_block_function_exists_in_two_copies():
    """No two functions of the adapters, the execution modes and ``parallel/`` share a run of 6 or more identical
    statements (the old per-mode copies of FLUX's blocks shared 10+: ``flux_double_block`` / ``sp_flux_double_block``
    / the packed one), and no module defines a block function per mode (``*_packed`` / ``sp_*`` block names)."""
    fns = []
    for sub in ("adapters", "execution", "parallel"):
        for path in sorted((ROOT / sub).glob("*.py")):
            for fn in _functions(path):
                sts = _statements(fn)
                if len(sts) >= 6:
                    fns.append((f"{sub}/{path.name}:{fn.name}", sts))
                assert not (fn.name.endswith(("_block_packed", "_attention_packed")) or fn.name.startswith("sp_")), \
                    f"{sub}/{path.name} defines a per-mode block function {fn.name}"
    dup = []
    for i, (na, a) in enumerate(fns):
        for nb, b in fns[i + 1:]:
            n = _shared_run(a, b)
            if n >= 6:
                dup.append((na, nb, n))
    assert not dup, f"functions sharing 6+ identical statements: {dup}"


def test_shared_run_detects_a_copy():
    """The detector above is not vacuous: a copied block body is found."""
    src = "def f(a):\n" + "".join(f"    a = a + {i}\n" for i in range(8)) + "    return a\n"
    f = next(_functions_from(src))
    g = next(_functions_from(src.replace("def f", "def g")))
    assert _shared_run(_statements(f), _statements(g)) == 9


def _functions_from(src: str):
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef):
            yield node


# ------------------------------------------------------------------------------------------------ modes agree
def _packed_and_dense(static: bool):
    """Two images with text lengths (2, 3) and image lengths (4, 1) as Dense calls (one per image) and one packed
    call (host or static layout, with one padding token per stream)."""
    g = torch.Generator().manual_seed(0)
    txt = [torch.randn(1, n, 6, generator=g) for n in (2, 3)]
    img = [torch.randn(1, n, 6, generator=g) for n in (4, 1)]
    if static:
        lay = PackedSegments.build([[2, 3], [4, 1]], [1, 1], 4, "cpu", "dense")
        pt = torch.cat([*(t[0] for t in txt), torch.zeros(1, 6)])[None]
        pi = torch.cat([*(t[0] for t in img), torch.zeros(1, 6)])[None]
    else:
        lay = HostSegments([[2, 3], [4, 1]], "cpu")
        pt = torch.cat([t[0] for t in txt])[None]
        pi = torch.cat([t[0] for t in img])[None]
    return txt, img, Packed(lay, "sdpa"), pt, pi


@pytest.mark.parametrize("static", [False, True])
def test_packed_join_attend_and_tok_equal_dense_per_image(static):
    txt, img, ex, pt, pi = _packed_and_dense(static)
    joined = ex.join(pt, pi)
    t2, i2 = ex.split(joined, None)
    assert torch.equal(t2, pt) and torch.equal(i2, pi)
    q = k = v = joined.view(1, -1, 2, 3)
    out = ex.attend(q, k, v)
    seg_out = []
    for t, i in zip(txt, img):
        x = DENSE.join(t, i).view(1, -1, 2, 3)
        seg_out.append(DENSE.attend(x, x, x))
    # the packed output of each image's segment equals that image's dense attention
    ot, oi = ex.split(out.flatten(2), None)
    ref_t = torch.cat([o.flatten(2)[:, :t.shape[1]] for o, t in zip(seg_out, txt)], dim=1)
    ref_i = torch.cat([o.flatten(2)[:, t.shape[1]:] for o, t in zip(seg_out, txt)], dim=1)
    torch.testing.assert_close(ot[:, :ref_t.shape[1]], ref_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(oi[:, :ref_i.shape[1]], ref_i, rtol=1e-6, atol=1e-6)
    # per-image vectors reach their tokens; JOINT is the segment-major order
    v_img = torch.tensor([[1.0], [2.0]] + ([[0.0], [0.0]] if static else []))
    assert ex.tok(v_img, 1)[0, :5, 0].tolist() == [1, 1, 1, 1, 2]
    assert ex.tok(v_img, JOINT)[0, :10, 0].tolist() == [1] * 6 + [2] * 4


@pytest.mark.parametrize("static", [False, True])
def test_packed_stream_and_cross_attention_stay_within_an_image(static):
    """Attention over one stream (SD3.5's image-only attention) and cross-attention between streams (Wan's text)
    equal the per-image dense results."""
    txt, img, ex, pt, pi = _packed_and_dense(static)
    q, kv = pi.view(1, -1, 2, 3), pt.view(1, -1, 2, 3)
    own = ex.attend(q, q, q, stream=1).flatten(2)
    cross = ex.cross_attend(q, kv, kv, q_stream=1, kv_stream=0).flatten(2)
    a = 0
    for t, i in zip(txt, img):
        qi, ki = i.view(1, -1, 2, 3), t.view(1, -1, 2, 3)
        n = i.shape[1]
        torch.testing.assert_close(own[:, a:a + n], DENSE.attend(qi, qi, qi, stream=1).flatten(2), rtol=1e-6,
                                   atol=1e-6)
        torch.testing.assert_close(cross[:, a:a + n], DENSE.cross_attend(qi, ki, ki, q_stream=1, kv_stream=0)
                                   .flatten(2), rtol=1e-6, atol=1e-6)
        a += n


@pytest.mark.parametrize("kind", ["AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous",
                                  "SD35AdaLayerNormZeroX"])
def test_packed_ada_norm_equals_the_module_per_image_bitwise(kind):
    from diffusers.models import normalization as N

    torch.manual_seed(0)
    dim = 8
    norm = {"AdaLayerNormZero": lambda: N.AdaLayerNormZero(dim),
            "AdaLayerNormZeroSingle": lambda: N.AdaLayerNormZeroSingle(dim),
            "AdaLayerNormContinuous": lambda: N.AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6),
            "SD35AdaLayerNormZeroX": lambda: N.SD35AdaLayerNormZeroX(dim)}[kind]().eval()
    ex = Packed(HostSegments([[3, 3]], "cpu"), "sdpa")  # two images of 3 tokens: the module sees them as a batch
    x = torch.randn(1, 6, dim)
    emb = torch.randn(2, dim)
    with torch.no_grad():
        got = ex.ada_norm(norm, x, emb, 0)
        ref = DENSE.ada_norm(norm, x.view(2, 3, dim), emb, 0)
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert torch.equal(g.reshape(r.shape), r)  # per-token outputs and per-image vectors alike


def test_packed_ada_norm_refuses_unknown_modules():
    ex = Packed(HostSegments([[1]], "cpu"))
    with pytest.raises(NotImplementedError, match="Linear"):
        ex.ada_norm(torch.nn.Linear(2, 2), torch.zeros(1, 1, 2), torch.zeros(1, 2), 0)
