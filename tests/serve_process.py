"""``ralu serve`` as a subprocess for the command tests of the HTTP and Ray Serve modules: started, its URL read
from its output, killed on the way out if it is still running. ``OUTLASTS_GRACE``: request fields of a generation that
outlasts ``--grace 3`` on the tiny model (the drain tests' running request)."""
import contextlib
import os
import queue
import subprocess
import sys
import threading
import time

#: 1000 steps at 512x512 take 10-20 s on the 2-core CPU; at 256x256 the request once finished within the 3 s grace
OUTLASTS_GRACE = {"size": "512x512", "steps": 1000}


def _read_lines(stream, lines: queue.Queue):
    for line in stream:
        lines.put(line)
    lines.put(None)


@contextlib.contextmanager
def serve_command(args: list[str], start_timeout: float):
    """Run ``python -m ralu_runtime.cli serve *args``; yields ``(url, proc, seen)`` once it prints "listening on URL"
    (``seen``: its output lines so far). On exit the process is killed if still running, and the rest of its
    output is appended to ``seen``."""
    proc = subprocess.Popen([sys.executable, "-m", "ralu_runtime.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        url, deadline = None, time.monotonic() + start_timeout
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"ralu serve {' '.join(args)} exited:\n" + "".join(seen)
            seen.append(line)
            if "listening on " in line:
                url = line.split("listening on ")[1].split()[0]
        yield url, proc, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        while (line := lines.get(timeout=10)) is not None:
            seen.append(line)
