"""Python command lines run in processes forked from one that has imported torch, diffusers' model modules and ralu.

The GPU suite's CPU dry run (``gpu_suite --dry-run``) runs about fifteen ``python ...`` steps; each fresh interpreter
spends about 5 s of CPU importing torch, diffusers and ralu before its real work (under a second at toy sizes). Here
one fork server imports :data:`PRELOAD` once and every step is forked from it: the same command line, working
folder and environment, its own session (so the suite's kill of the process group works), stdout and stderr into
one pipe, exit status as a subprocess's (negative for a signal). The real GPU run keeps fresh processes
(``subprocess.Popen``); a dry run can too (``gpu_suite --dry-run --fresh-processes``).

What differs from a fresh interpreter: the modules in :data:`PRELOAD` are imported before the command's environment
is applied, so a variable read at their import time keeps the server's value. A command that sets variables of its
own is therefore forked only when they are in :data:`READ_AT_USE` (read when used, not at import); any other (such as
``TRITON_INTERPRET``, which triton reads at its import) gets a fresh interpreter. The atexit handlers run; non-daemon
threads are not waited for.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
import sys

from ralu_runtime.parallel.launch import PRELOAD as WORKER_PRELOAD

#: imported once by the fork server (a module that fails to import is skipped by multiprocessing): what the
#: multi-rank launcher preloads, and the text encoders and tiny models the benchmarks build
PRELOAD = (*WORKER_PRELOAD, "transformers", "ralu_runtime.tiny")

#: variables a command may set and still be forked: read when used, not when torch / triton / diffusers are imported
READ_AT_USE = frozenset({"PYTHONUNBUFFERED", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"})


def python_command(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """``(kind, target, args)`` for ``[sys.executable, "-m", module, ...]`` ("module"), ``[sys.executable, "-c",
    code, ...]`` ("code") or ``[sys.executable, script.py, ...]`` ("path"); None for anything else (another
    program, interpreter options)."""
    if len(argv) < 2 or os.path.realpath(argv[0]) != os.path.realpath(sys.executable):
        return None
    if argv[1] in ("-m", "-c") and len(argv) >= 3:
        return ("module" if argv[1] == "-m" else "code"), argv[2], list(argv[3:])
    if argv[1].startswith("-"):
        return None
    return "path", argv[1], list(argv[2:])


def _child(kind: str, target: str, args: list[str], env: dict, cwd: str, out) -> None:
    """In the forked process: become a session leader, take the command's folder, environment, argv and output,
    run it as ``__main__`` and exit with its status."""
    import atexit
    import runpy
    import traceback

    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, errors="replace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, errors="replace")
    code = 0
    try:
        if kind == "module":
            sys.argv = [target, *args]
            sys.path[0] = cwd
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "path":
            sys.argv = [target, *args]
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")
        else:
            sys.argv = ["-c", *args]
            sys.path[0] = ""
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported like the interpreter does, as exit 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkedPython:
    """A running command (the part of ``subprocess.Popen`` the suite uses): ``pid`` (also its process group),
    ``stdout`` (text lines of stdout and stderr), ``wait(timeout)`` (raises ``subprocess.TimeoutExpired``)."""

    def __init__(self, ctx, command: tuple[str, str, list[str]], env: dict, cwd: str):
        read, write = ctx.Pipe(duplex=False)
        self.argv = command
        self._proc = ctx.Process(target=_child, args=(*command, dict(env), str(cwd), write), daemon=False)
        self._proc.start()
        write.close()
        self.pid = self._proc.pid
        self.stdout = io.TextIOWrapper(io.FileIO(os.dup(read.fileno()), "r"), errors="replace")
        read.close()

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.argv, timeout)
        return self._proc.exitcode


class Preloaded:
    """Starts ``python`` command lines from the preloaded fork server (started on first use, one per process)."""

    def __init__(self, preload=PRELOAD):
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))

    def popen(self, argv: list[str], env: dict, cwd, extra: dict | None = None) -> ForkedPython | None:
        """The command started from the fork server, or None when ``argv`` is not a plain ``python`` command line
        or its own variables ``extra`` (included in ``env``) go beyond :data:`READ_AT_USE` (the caller starts those
        as subprocesses)."""
        command = python_command(argv)
        if command is None or set(extra or {}) - READ_AT_USE:
            return None
        return ForkedPython(self._ctx, command, env, str(cwd))
