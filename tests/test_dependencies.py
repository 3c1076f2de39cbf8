"""The package map's dependency directions (see the design note): read off the import statements of every module.

The CLI calls the API; the API calls the sampler and the compiler; warm-up calls both; the sampler uses schedule,
layout, transition, edges and adapters; kernels import nothing from the runtime; the schedule knows no model.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _modules(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


def _hits(files, forbidden) -> list[str]:
    bad = []
    for f in files:
        for imp in _imports(f):
            if any(imp == x or imp.startswith(x + ".") for x in forbidden):
                bad.append(f"{f.relative_to(ROOT)} imports {imp}")
    return bad


def test_compile_package_knows_nothing_of_generate():
    """ralu_runtime.compile is below the API: no import of the API, warm-up, sampler or CLI (no cycle)."""
    assert not _hits(_modules("ralu_runtime/compile"), ["ralu_runtime.api", "ralu_runtime.warmup",
                                                         "ralu_runtime.sampler", "ralu_runtime.cli"])


def test_kernels_import_nothing_from_the_runtime():
    assert not _hits(_modules("ralu_kernels"), ["ralu_runtime"])


@pytest.mark.parametrize("module", ["schedule.py", "layout.py"])
def test_schedule_and_layout_know_no_model(module):
    assert not _hits([ROOT / "ralu_runtime" / module], ["ralu_runtime.adapters", "ralu_runtime.api", "diffusers",
                                                        "ralu_runtime.compile", "ralu_runtime.sampler"])


def test_adapters_know_nothing_of_the_sampler_or_compiler():
    assert not _hits(_modules("ralu_runtime/adapters"), ["ralu_runtime.sampler", "ralu_runtime.api",
                                                         "ralu_runtime.compile", "ralu_runtime.warmup"])


def test_the_checker_sees_relative_imports():
    assert "ralu_runtime.api" in _imports(ROOT / "ralu_runtime" / "warmup.py")


def _private_imports(path: Path) -> list[str]:
    """Private names ``path`` takes from other ralu / benchmark modules: ``from m import _name`` and ``alias._name``
    for a module imported as ``alias``."""
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([mod] if mod else []))
            if mod.startswith(("ralu_runtime", "benchmarks")):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        out.append(f"{path.relative_to(ROOT)}: from {mod} import {a.name}")
                    elif node.level or a.name[:1].islower():
                        aliases.add(a.asname or a.name)  # possibly a module (from . import protocol)
        elif isinstance(node, ast.Import):
            aliases.update(a.asname for a in node.names if a.asname and a.name.startswith("ralu_runtime"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            out.append(f"{path.relative_to(ROOT)}: {node.value.id}.{node.attr}")
    return out


MINE = ["ralu_runtime/serving", "ralu_runtime/tiny"]
MINE_FILES = ["ralu_runtime/api.py", "ralu_runtime/cli.py", "ralu_runtime/families.py", "ralu_runtime/schedule.py",
              "ralu_runtime/oracle_metrics.py", "ralu_runtime/threads.py", "ralu_runtime/adapters/oracle.py",
              "ralu_runtime/adapters/oracle_video.py", "benchmarks/families.py", "benchmarks/flops.py",
              "benchmarks/latency.py"]


def test_no_private_names_across_modules():
    """The serving front-ends share ralu_runtime.serving.protocol, the oracles ralu_runtime.threads.one_thread, the
    tiny models tiny's public builders: no module takes another's private names."""
    files = [f for d in MINE for f in _modules(d)] + [ROOT / f for f in MINE_FILES]
    assert not [p for f in files for p in _private_imports(f)]


def test_the_serving_engine_uses_only_public_api():
    """The engine runs requests with ralu_runtime.prepare / run and their documented hooks; api keeps no hidden
    per-call switches (no ContextVar) and returns one type from generate."""
    assert not [p for f in _modules("ralu_runtime/serving") for p in _private_imports(f)]
    assert "contextvars" not in _imports(ROOT / "ralu_runtime" / "api.py")


def test_benchmarks_import_no_cycle():
    """benchmarks/*.py import each other (at module level or in a function) without a cycle: the model facts they
    share come from ralu_runtime.families, not from one another."""
    graph = {f.stem: {i.split(".")[1] for i in _imports(f) if i.startswith("benchmarks.")} - {f.stem}
             for f in _modules("benchmarks")}
    state: dict[str, int] = {}

    def visit(node, path):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])
        state[node] = 2

    for node in graph:
        visit(node, [])


def test_the_family_registry_imports_nothing_heavy():
    assert not _hits([ROOT / "ralu_runtime" / "families.py"], ["torch", "numpy", "scipy", "diffusers", "ralu_runtime"])
