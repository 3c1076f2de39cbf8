"""The documentation: README.md and docs/*.md.

Every relative link (and image) points to a file of the repository, and a ``#anchor`` to a heading of that file;
the README opens with its two commands, the demo and the test command, and the test command is the one ``.ci/run``
runs; docs/layout.md's map names every source file; every ``--flag`` the pages give ``ralu <command>`` or a
benchmark / example script is one that command declares. Plain file reads, regular expressions and the CLI's
torch-free parser: no network, no model, no torch. One test runs the README's Python example, on the built-in tiny
random FLUX.1 pipeline instead of the weights it names (about 8 s on a 2-core CPU). The tables of figures that
pages copy (families.md's and video.md's FLOPs, method.md's presets) are compared with their result files, and the
presets solved again with ``get_preset`` (a few seconds).
"""
import ast
import itertools
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans (links there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_there_are_pages_and_links():
    assert README.is_file() and DOCS, "README.md and docs/*.md"
    assert sum(len(links(p)) for p in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    bad = []
    for target in links(page):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # a web address: not checked (no network)
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            bad.append(f"{target}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


# ------------------------------------------------------------------------------------------- the two commands
def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)]


def ci_run() -> tuple[str, list[str], list[str]]:
    """(python, pip install arguments, pytest arguments) of the README's test command as .ci/run runs it."""
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    py = re.search(r"^PY=\$\{PYTHON:-(\S+)\}", text, re.M).group(1)
    install = [ln for ln in text.splitlines() if re.search(r"-m pip install .*-e ", ln)]
    assert len(install) == 1, install
    pip_args = [a for a in shlex.split(install[0].split("pip install", 1)[1]) if a != "-q"]
    pytest_line = [ln for ln in text.splitlines() if "-m pytest" in ln]
    assert len(pytest_line) == 1, pytest_line
    pytest_args = shlex.split(pytest_line[0].split("-m pytest", 1)[1].split("2>&1")[0])
    return py, pip_args, pytest_args


def test_readme_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    blocks = bash_blocks(text)
    assert len(blocks) >= 2
    demo, tests = blocks[0], blocks[1]
    assert "\n" not in demo and "\n" not in tests, "each command is one line, to copy and paste"
    first_heading = re.search(r"^## (.*)$", text, re.M).group(1)
    assert first_heading == "Two commands"
    assert text.index(demo) < text.index("\n## ", text.index("## Two commands") + 1)
    assert text.index(tests) < text.index("\n## ", text.index("## Two commands") + 1)


def test_test_command_is_what_ci_runs():
    py, pip_args, pytest_args = ci_run()
    tests = bash_blocks(README.read_text(encoding="utf-8"))[1]
    steps = [shlex.split(s) for s in tests.split("&&")]
    assert steps[0] == [py, "-m", "venv", ".venv"]
    assert steps[1][:2] == [".venv/bin/pip", "install"] and steps[1][2:] == pip_args
    assert steps[2][:3] == [".venv/bin/python", "-m", "pytest"]
    readme_pytest = steps[2][3:]
    assert pytest_args[:len(readme_pytest)] == readme_pytest, (pytest_args, readme_pytest)
    assert len(steps) == 3


def _setup_requirements() -> tuple[list[str], dict]:
    """``INSTALL_REQUIRES`` and ``EXTRAS`` of setup.py, read by running its top-level list assignments only."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    names = {"INSTALL_REQUIRES", "SERVE", "RAY", "EXTRAS"}
    body = [n for n in tree.body if isinstance(n, ast.Assign) and {getattr(t, "id", "") for t in n.targets} & names]
    ns: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), "setup.py", "exec"), ns)  # literals only
    return ns["INSTALL_REQUIRES"], ns["EXTRAS"]


def test_constraints_pin_every_requirement_within_setup_py():
    """constraints.txt (used by both commands) pins one exact version of each package, torch excepted (the commands
    pin it), and every requirement of the package and of its [test] extra is pinned to a version it allows."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line.strip())
            assert m, f"constraints.txt: {line!r} is not name==version"
            name = canonicalize_name(m.group(1))
            assert name not in pins, f"constraints.txt pins {name} twice"
            pins[name] = m.group(2)
    assert "torch" not in pins, "torch is pinned by the commands themselves (torch==2.13.0), not in constraints.txt"
    install, extras = _setup_requirements()
    unpinned, outside = [], []
    for spec in install + extras["test"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch" or (req.marker is not None and not req.marker.evaluate()):
            continue
        if name not in pins:
            unpinned.append(spec)
        elif not req.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{spec} (pinned {pins[name]})")
    assert not unpinned, f"requirements with no pin in constraints.txt: {unpinned}"
    assert not outside, f"pins that setup.py does not allow: {outside}"


def test_demo_command_installs_the_same_torch_and_runs_ralu_generate():
    py, pip_args, _ = ci_run()
    demo = bash_blocks(README.read_text(encoding="utf-8"))[0]
    steps = [shlex.split(s) for s in demo.split("&&")]
    assert steps[0] == [py, "-m", "venv", ".venv"]
    torch_pin = [a for a in pip_args if a.startswith("torch==")]
    assert steps[1] == [".venv/bin/pip", "install", *torch_pin, "-e", ".", "-c", "constraints.txt"]
    assert steps[2][:2] == [".venv/bin/ralu", "generate"]
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert re.search(r"""["']ralu\s*=\s*ralu_runtime\.cli:main["']""", setup), "the ralu console script"
    from ralu_runtime import cli  # imports no torch (tests/test_cli.py)

    args = cli.build_parser().parse_args(steps[2][1:])
    assert args.command == "generate" and args.model == "tiny-flux" and args.speedup == "default"


# ------------------------------------------------------------------------------------------- code map and flags
def test_layout_names_every_source_file():
    """docs/layout.md's map names every module of the packages, the CUDA sources and the benchmark scripts."""
    block = re.search(r"^```\n(ralu_runtime/.*?)^```", (ROOT / "docs" / "layout.md").read_text(encoding="utf-8"),
                      re.S | re.M).group(1)
    named = set(re.findall(r"[\w.]+\.(?:py|sh|cu|cuh|h|cpp)\b", block))
    files = [*(ROOT / "ralu_runtime").rglob("*.py"), *(ROOT / "ralu_kernels").glob("*.py"),
             *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "benchmarks").glob("*.sh"), *(ROOT / "csrc").glob("*.*")]
    missing = sorted(str(f.relative_to(ROOT)) for f in files if f.name != "__init__.py" and f.name not in named)
    assert not missing, f"docs/layout.md does not name {missing}"


def _doc_segments(path: Path):
    """(line number, text) of each code span, and of each line of a fenced block with its indented continuation
    lines joined to it: where a command and its flags are written."""
    text = path.read_text(encoding="utf-8")
    for m in FENCE.finditer(text):
        first = text.count("\n", 0, m.start()) + 1
        lines = m.group(0).splitlines()[1:-1]
        for i, line in enumerate(lines):
            if line[:1].isspace() and i:
                continue
            more = list(itertools.takewhile(lambda s: s[:1].isspace(), lines[i + 1:]))
            yield first + 1 + i, " ".join([line, *more])
    for n, line in enumerate(FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text).splitlines(), 1):
        for span in re.findall(r"`([^`\n]+)`", line):
            yield n, span


COMMAND = re.compile(r"\bralu (generate|edit|serve|info)\b|python3? -m benchmarks\.(\w+)|"
                     r"\b(?:benchmarks/|examples/)?(\w+)\.(?:py|sh)\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _script_flags(name: str) -> set[str] | None:
    """The --flags a benchmark or example script declares (read from its source: no import, no torch)."""
    for path in (ROOT / "benchmarks" / f"{name}.py", ROOT / "examples" / f"{name}.py"):
        if path.is_file():
            return set(re.findall(r"""add_argument\(\s*["'](--[a-z][a-z0-9-]*)""", path.read_text(encoding="utf-8")))
    return None


def test_every_flag_the_docs_give_a_command_exists():
    """A `--flag` written after `ralu <command>` is one of that command's options (its argparse parser), and one
    written after a benchmark or example script (`benchmarks/latency.py`, `python -m benchmarks.gpu_suite`,
    `gpu_suite.sh`) is declared by that script."""
    from ralu_runtime import cli  # imports no torch (tests/test_cli.py)

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    known = {name: {o for a in p._actions for o in a.option_strings} for name, p in commands.items()}
    bad, checked = [], 0
    for page in PAGES:
        for line, seg in _doc_segments(page):
            found = list(COMMAND.finditer(seg))
            for k, m in enumerate(found):
                tail = seg[m.end():found[k + 1].start() if k + 1 < len(found) else len(seg)]
                flags = FLAG.findall(tail)
                allowed = known[m.group(1)] if m.group(1) else _script_flags(m.group(2) or m.group(3))
                if allowed is None or not flags:
                    continue
                checked += len(flags)
                bad += [f"{page.relative_to(ROOT)}:{line}: {m.group(0)} {f}" for f in flags if f not in allowed]
    assert checked > 50, checked
    assert not bad, "flags the commands do not have:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------------- the README's Python
def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


# The one substitution made in the README's example: its model line (a local FLUX.1-dev folder, moved to CUDA)
# becomes the built-in tiny random FLUX.1 pipeline on the CPU. Nothing is downloaded and no GPU is needed.
README_MODEL_LINE = re.compile(r"^pipe = FluxPipeline\.from_pretrained\(.*\)$", re.M)
TINY_MODEL_LINE = 'from ralu_runtime.tiny import build_tiny\npipe = build_tiny("tiny-flux")'


def test_readme_python_example_runs_on_the_tiny_model(tmp_path, monkeypatch):
    """The README's "Use from Python" example runs as written, with its model line replaced by the tiny random
    FLUX.1 pipeline and ``generate`` called at 64x64 without a progress bar (defaults added around the real
    function; the tiny model at the 1024² default would only take longer). Its comment holds: ``fox.png`` is
    written, ``out.timings`` has seconds per stage, and ``return_masks=True`` adds ``out.masks``."""
    import torch

    import ralu_runtime

    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == 1, "the README has one Python example"
    code, n = README_MODEL_LINE.subn(TINY_MODEL_LINE, blocks[0])
    assert n == 1, "the example loads its pipeline with FluxPipeline.from_pretrained(...) on one line"

    real = ralu_runtime.generate

    def small(pipe, prompt=None, **kwargs):
        kwargs.setdefault("height", 64)
        kwargs.setdefault("width", 64)
        kwargs.setdefault("progress", False)
        return real(pipe, prompt, **kwargs)

    monkeypatch.setattr(ralu_runtime, "generate", small)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md (Use from Python)", "exec"), ns)

    out = ns["out"]
    assert (tmp_path / "fox.png").is_file()
    assert out.schedule is not None and out.schedule.name == "flux/7x"
    assert {"stage1", "stage2", "stage3"} <= set(out.timings)
    assert all(isinstance(s, float) and s >= 0 for s in out.timings.values())
    assert out.masks is None
    with_masks = real(ns["pipe"], "a red fox in the snow", speedup="7x", seed=0, height=64, width=64,
                      progress=False, return_masks=True)
    assert with_masks.masks is not None and with_masks.masks.dtype == torch.bool


# ------------------------------------------------------------------------ figures the pages copy from result files
NUMBER = r"\d[\d ]*"   # the pages group digits with spaces (167 800)


def _table_rows(page: Path, header_start: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the body rows (cells) of the first table of ``page`` whose header starts with
    ``header_start``."""
    lines = page.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    cells = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells.append([c.strip() for c in line.strip().strip("|").split("|")])
    return cells[0], cells[2:]


def _num(text: str) -> float:
    return float(text.replace(" ", ""))


def _check_run(where: str, run: dict, tflops: str, ratio: str | None) -> list[str]:
    bad = []
    if abs(_num(tflops) - run["tflops"]) > max(0.5, 1e-3 * run["tflops"]):   # rounded to 4 significant digits
        bad.append(f"{where}: {tflops} TFLOPs, the result file {run['tflops']:.1f}")
    if ratio is not None and abs(float(ratio) - run["ratio"]) > 0.0051:
        bad.append(f"{where}: {ratio}x, the result file {run['ratio']:.3f}x")
    return bad


def _runs(entry: dict) -> dict:
    return {r["run"]: r for r in entry["runs"]}


def test_families_flops_table_is_its_result_file():
    """docs/families.md's FLOPs table is benchmarks/results/families_flops.json (it once kept the baselines of an
    earlier run: Z-Image-Turbo 9 steps, SD3.5 Medium 28, after the file moved to 8 and 40)."""
    data = json.loads((ROOT / "benchmarks/results/families_flops.json").read_text())
    _header, rows = _table_rows(ROOT / "docs/families.md", "| model (params) |")
    strip = lambda s: re.sub(r"\s*\(.*?\)", "", s).strip()   # noqa: E731 - labels without their parentheses
    by_label = {strip(r[0]): r for r in rows}
    assert len(rows) == len(data["flops"]) and set(by_label) == {strip(e["label"]) for e in data["flops"]}
    bad = []
    for entry in data["flops"]:
        row, runs = by_label[strip(entry["label"])], _runs(entry)
        m = re.fullmatch(rf"(\d+) steps: ({NUMBER})", row[2])
        assert m, row
        if int(m.group(1)) != runs["baseline"]["steps"]:
            bad.append(f"{entry['label']}: {m.group(1)} steps, the result file {runs['baseline']['steps']}")
        bad += _check_run(f"{entry['label']} baseline", runs["baseline"], m.group(2), None)
        presets = re.findall(rf"(\w+): ({NUMBER}), ([\d.]+)×", row[3])
        assert {p for p, _, _ in presets} == set(runs) - {"baseline"}, row
        for name, tflops, ratio in presets:
            bad += _check_run(f"{entry['label']} {name}", runs[name], tflops, ratio)
    assert not bad, bad


def test_video_flops_table_is_its_result_file():
    data = json.loads((ROOT / "benchmarks/results/families_video_flops.json").read_text())
    header, rows = _table_rows(ROOT / "docs/video.md", "| model | size | baseline |")
    presets = header[3:]
    assert len(rows) == len(data["flops"])
    bad = []
    for entry in data["flops"]:
        h, w = entry["resolution"]
        row = next((r for r in rows if entry["label"].startswith(" ".join(r[0].split()[:2]))
                    and r[1].startswith(f"{h}×{w}, {entry['num_frames']} frames")), None)
        assert row is not None, f"no row for {entry['label']}"
        runs = _runs(entry)
        m = re.fullmatch(rf"(\d+) steps: ({NUMBER}) TFLOPs", row[2])
        assert m and int(m.group(1)) == runs["baseline"]["steps"], (row, runs["baseline"])
        bad += _check_run(f"{entry['label']} baseline", runs["baseline"], m.group(2), None)
        for name, cell in zip(presets, row[3:]):
            m = re.fullmatch(rf"({NUMBER}), ([\d.]+)×", cell)
            assert m, cell
            bad += _check_run(f"{entry['label']} {name}", runs[name], m.group(1), m.group(2))
    assert not bad, bad


def test_method_preset_table_is_what_get_preset_solves():
    """docs/method.md's preset table, every row with numbers, solved again by ``get_preset`` (NT-Matching, the
    pinned scipy): steps, ends, ratio, shifts (3 decimals), Z (4 significant digits, or the bound) and the JS
    distance (4 decimals). The table once kept an earlier solver's FLUX.2 and Qwen-Image rows."""
    from ralu_runtime.schedule import get_preset

    _header, rows = _table_rows(ROOT / "docs/method.md", "| family / preset |")
    bad, checked = [], 0
    for cells in rows:
        m = re.match(r"([\w-]+) (\w+)\b", cells[0])
        shifts = re.fullmatch(r"([\d.]+), ([\d.]+), ([\d.]+)", cells[4])
        if not (m and shifts):          # "as flux 4x / 7x" rows
            continue
        h = re.search(r"h_ori ([\d.]+)", cells[0])
        s = get_preset(m.group(1), m.group(2), float(h.group(1)) if h else None)
        ends = tuple(float(e) for e in cells[2].split(","))
        z = float(cells[5].split()[0])
        got = (tuple(int(n) for n in cells[1].split(",")), ends, float(cells[3]))
        if got != (tuple(s.steps), tuple(s.ends), s.ratio):
            bad.append(f"{cells[0]}: N, e, r {got} vs {(s.steps, s.ends, s.ratio)}")
        if any(abs(float(a) - b) > 0.0015 for a, b in zip(shifts.groups(), s.shifts)):
            bad.append(f"{cells[0]}: shifts {cells[4]} vs {[round(x, 3) for x in s.shifts]}")
        if abs(z - s.z) > 1e-3 * s.z or ("bound" in cells[5]) != (s.z == 100.0):
            bad.append(f"{cells[0]}: Z {cells[5]} vs {s.z:.4g}")
        if abs(float(cells[6]) - s.jsd) > 6e-5:
            bad.append(f"{cells[0]}: JS {cells[6]} vs {s.jsd:.4f}")
        checked += 1
    assert checked >= 15 and not bad, (checked, bad)
