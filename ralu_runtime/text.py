"""Text that no tokenizer takes: strings with a lone surrogate (imports nothing heavy; used by the CLI, the API and
the HTTP server)."""
from __future__ import annotations


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (JSON's ``"\\ud800"``; non-UTF-8 bytes of a command line
    decode to such under surrogateescape), or None for text UTF-8 can encode. Tokenizers refuse such text with a
    TypeError that names no argument, after the model has loaded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None
