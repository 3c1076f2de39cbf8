"""What a server process logs of the libraries it runs: no prompt text, no warnings its operator cannot act on.

diffusers' pipelines warn with the cut-off part of a prompt that is longer than a text encoder takes (up to a
megabyte a request: a flood and a leak); transformers warns at import that its image processors fall back to PIL
without torchvision (nothing a ralu user needs). :func:`quiet_library_logs` installs a filter on the ``diffusers``
and ``transformers`` loggers and their handlers (they do not propagate to the root logger) that replaces the first
with a line without the text and drops the second. Imports nothing heavy.
"""
from __future__ import annotations

import logging
import sys

__all__ = ["quiet_library_logs", "RedactPrompts", "server_log"]

LIBRARIES = ("diffusers", "transformers")
_PROMPT_MARKERS = ("was truncated because", "truncated because")
_DROPPED = ("requires torchvision (not installed)",)
REDACTED = ("a prompt was longer than the text encoder takes and was truncated (its text is not logged; start the "
            "server with --log-prompts to see it)")


class RedactPrompts(logging.Filter):
    """Replaces log records carrying prompt text with :data:`REDACTED`; drops the torchvision fallback notices."""

    keep_prompts = False

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: leave it to the handler
            return True
        if any(m in text for m in _DROPPED):
            return False
        if not self.keep_prompts and any(m in text for m in _PROMPT_MARKERS):
            record.msg, record.args = REDACTED, None
        return True


_FILTER = RedactPrompts()


def _library_logger(name: str) -> logging.Logger:
    """The library's root logger, with the handler the library itself adds (configured now, as on first use)."""
    try:
        if name == "diffusers":
            from diffusers.utils import logging as lib_logging
        else:
            from transformers.utils import logging as lib_logging
        lib_logging.get_logger(name)
    except Exception:  # noqa: BLE001 - not installed: its logger is an ordinary one
        pass
    return logging.getLogger(name)


def quiet_library_logs(log_prompts: bool = False) -> None:
    """Install the filter on the libraries' loggers and handlers and on the root logger's handlers (idempotent).
    ``log_prompts``: keep the prompt-carrying warnings as they are (only the torchvision notices are dropped)."""
    _FILTER.keep_prompts = log_prompts
    targets = []
    for name in LIBRARIES:
        lib = _library_logger(name)
        targets += [lib, *lib.handlers]
    targets += logging.getLogger().handlers
    for target in targets:
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)


class _CurrentStderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is emitted (a StreamHandler keeps the stream it was made
    with: a server started where stderr was replaced, e.g. captured by a test, wrote to a closed stream later)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):  # StreamHandler.__init__ sets it; the property always answers sys.stderr
        pass


def server_log(level: str) -> logging.Logger:
    """The ``ralu`` logger of a server process (``ralu serve``: its stopping and failed-request lines, as uvicorn
    prints its own), at ``level``, with one handler to the current stderr."""
    log = logging.getLogger("ralu")
    if not log.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        log.addHandler(handler)
    log.setLevel(level.upper())
    return log
