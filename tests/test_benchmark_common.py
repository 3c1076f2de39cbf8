"""benchmarks/_common.py: what every benchmark script shares (argument types, the table, the JSON), and the scripts'
refusal of bad arguments before any model is built: argparse's one-line error and exit 2, not a traceback."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import _common as C

ROOT = Path(__file__).resolve().parents[1]


def test_count_types_refuse_what_is_not_a_count():
    assert C.positive_int("3") == 3 and C.non_negative_int("0") == 0
    for bad in ("0", "-1", "2.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            C.positive_int(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        C.non_negative_int("-1")
    with pytest.raises(ValueError, match="reps=0"):
        C.time_fn(lambda: None, reps=0, device="cpu")


def test_json_holds_null_where_a_figure_is_nan_and_the_table_prints_no_rows(tmp_path, capsys):
    path = C.write_json(tmp_path, "t", {"rows": [{"GBps": math.nan, "ms": 1.5, "x": (math.inf, 2)}]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text)["rows"][0]          # strict JSON: a parser without NaN support reads it
    assert row == {"GBps": None, "ms": 1.5, "x": [None, 2]}
    C.print_table([], ["a", "bb"])
    assert "(no rows)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["benchmarks/latency.py", "--rows", "ralu-99x-eager"], "has no preset '99x'"),
    (["benchmarks/latency.py", "--rows", "bogus"], "row 'bogus'"),
    (["benchmarks/offload.py", "--speedup", "99x"], "invalid choice: '99x'"),
    (["benchmarks/region_source.py", "--families", "bogus", "--what", "flops"], "invalid choice: 'bogus'"),
    (["benchmarks/bench_attention.py", "--quick", "--reps", "-1"], "-1 is not allowed"),
    (["benchmarks/context_parallel.py", "--quick", "--world-sizes", "-1"], "--world-sizes '-1'"),
    (["benchmarks/quality_oracle_video.py", "--quick", "--seeds", "0"], "0 is not allowed"),
    (["benchmarks/precision.py", "--quick", "--rows", "bogus"], "row 'bogus'"),
])
def test_bad_arguments_are_one_line_errors(argv, needle, tmp_path):
    proc = subprocess.run([sys.executable, *argv, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.iterdir())
