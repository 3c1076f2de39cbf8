"""Installed package versions, read from distribution metadata (no import of the package, no torch)."""
from __future__ import annotations


def installed_version(*dists: str) -> str | None:
    """Version of the first of ``dists`` that is installed (e.g. ``"onnxruntime", "onnxruntime-gpu"``), or None."""
    from importlib import metadata

    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
