"""benchmarks/preloaded.py: python command lines forked from a preloaded server behave as fresh interpreters for the
GPU suite's dry run (output, exit status, environment, folder, timeouts, process group)."""
import os
import signal
import subprocess
import sys

import pytest

from benchmarks.preloaded import READ_AT_USE, Preloaded, python_command

PY = sys.executable


@pytest.fixture(scope="module")
def server():
    return Preloaded(preload=("json",))   # the mechanism, without the 5 s imports


def test_python_command_lines_are_recognised_and_others_are_not():
    assert python_command([PY, "-m", "benchmarks.gpu_smoke", "--dry-run"]) == ("module", "benchmarks.gpu_smoke",
                                                                             ["--dry-run"])
    assert python_command([PY, "-c", "print(1)", "a"]) == ("code", "print(1)", ["a"])
    assert python_command([PY, "benchmarks/latency.py", "--out", "w"]) == ("path", "benchmarks/latency.py",
                                                                          ["--out", "w"])
    assert python_command(["cmake", "-S", "."]) is None
    assert python_command([PY, "-X", "importtime", "-c", "1"]) is None     # interpreter options: a real process
    assert python_command([PY]) is None


def _run(server, argv, env=None, cwd=None, extra=None, timeout=60):
    proc = server.popen(argv, {**os.environ, **(env or {})}, cwd or os.getcwd(), extra)
    assert proc is not None
    rc = proc.wait(timeout)
    return rc, proc.stdout.read()


def test_output_status_environment_and_folder_are_the_commands(server, tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import os, sys\nprint('argv', sys.argv[1:], 'cwd', os.getcwd(), flush=True)\n"
                      "print('mark', os.environ.get('RALU_MARK'), file=sys.stderr)\nsys.exit(int(sys.argv[1]))\n")
    rc, out = _run(server, [PY, str(script), "3"], {"RALU_MARK": "m1"}, tmp_path)
    assert rc == 3 and f"argv ['3'] cwd {tmp_path}" in out and "mark m1" in out
    rc, out = _run(server, [PY, str(script), "0"], {"RALU_MARK": "m2"}, tmp_path)
    assert rc == 0 and "mark m2" in out
    rc, out = _run(server, [PY, "-c", "import sys; sys.exit('went wrong')"])
    assert rc == 1 and "went wrong" in out
    rc, out = _run(server, [PY, "-c", "raise KeyError('no such row')"])
    assert rc == 1 and "KeyError: 'no such row'" in out
    rc, out = _run(server, [PY, "-m", "json.tool", "--help"])
    assert rc == 0 and "json" in out
    rc, out = _run(server, [PY, "-c", "import atexit; atexit.register(print, 'at exit ran')"])
    assert rc == 0 and "at exit ran" in out


def test_a_timeout_raises_and_the_process_group_can_be_killed(server):
    proc = server.popen([PY, "-c", "import time; print('started', flush=True); time.sleep(120)"], dict(os.environ),
                        os.getcwd())
    assert proc.stdout.readline().strip() == "started"
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)
    assert os.getpgid(proc.pid) == proc.pid           # its own session: the suite's killpg reaches its children
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def test_variables_read_at_import_time_get_a_fresh_interpreter(server):
    env = dict(os.environ)
    assert server.popen([PY, "-c", "1"], env, os.getcwd(), {"TRITON_INTERPRET": "1"}) is None
    assert server.popen(["cmake", "--version"], env, os.getcwd()) is None
    assert "TRITON_INTERPRET" not in READ_AT_USE
    proc = server.popen([PY, "-c", "1"], env, os.getcwd(), {"TRITON_CACHE_DIR": "/tmp/x"})
    assert proc is not None and proc.wait(60) == 0
