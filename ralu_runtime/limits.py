"""Bounds on the work of one ``generate`` call, checked by :func:`ralu_runtime.prepare` before any work.

Two limits (:class:`Limits`), both with a default that a caller raises on purpose:

* ``max_images``: images (videos) in one call, ``len(prompts) x num_images_per_prompt`` (default 64);
* ``max_token_steps``: latent tokens x model calls summed over the call, for all its images: a baseline makes
  ``steps`` calls on the full token grid, a RALU schedule ``N1`` calls on a quarter of it, ``N2`` on the quarter
  plus the upsampled regions and ``N3`` on the full grid; video tokens count every latent frame (default
  ``2**24 = 16 777 216``: e.g. at most 9 FLUX.1 images at 4096 x 4096 with 28 steps (65 536 tokens each), while at
  1024 x 1024 with 50 steps ``max_images`` binds first; classifier-free guidance's doubled batch and the text tokens
  are not counted).

The process-wide defaults are :data:`LIMITS`; :func:`set_limits` changes them (e.g. for a server's flags), and
``generate(..., limits=Limits(...))`` / ``limits={"max_images": 256}`` sets them for one call; the serving engine
takes ``EngineConfig(max_images=..., max_token_steps=...)``. A call beyond a limit raises ValueError naming the
limit, the call's value and how to raise it.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_IMAGES", "DEFAULT_MAX_TOKEN_STEPS", "LIMITS", "Limits", "MAX_GUIDANCE_SCALE", "MAX_SEED",
           "MAX_SEQUENCE_LENGTH", "MAX_STEPS", "resolve_limits", "set_limits", "token_steps"]

DEFAULT_MAX_IMAGES = 64
DEFAULT_MAX_TOKEN_STEPS = 2**24
# The ranges of single arguments, shared by generate, the CLI and the server (this module imports no torch):
MAX_STEPS = 1000                 # num_inference_steps / --steps / "steps": 1..MAX_STEPS
MAX_SEQUENCE_LENGTH = 512        # text tokens: 1..MAX_SEQUENCE_LENGTH
MAX_TIMEOUT_S = 7 * 86400.0      # a request's deadline (HTTP 'timeout', ralu serve --request-timeout): 7 days
MAX_SEED = 2**63 - 1             # seeds: 0..MAX_SEED (a CPU torch.Generator's seed as a non-negative int64)
MAX_GUIDANCE_SCALE = 100.0       # guidance_scale / --guidance / "guidance_scale": 0..MAX_GUIDANCE_SCALE (the
                                 # published models use 1..10; far beyond, a model's output is saturated noise)


@dataclass(frozen=True)
class Limits:
    """``max_images``: images per call; ``max_token_steps``: latent tokens x model calls per call (module
    docstring). Positive integers."""

    max_images: int = DEFAULT_MAX_IMAGES
    max_token_steps: int = DEFAULT_MAX_TOKEN_STEPS

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f.name}={v!r} is not allowed: need a positive integer")


LIMITS = Limits()
_LOCK = threading.Lock()


def set_limits(max_images: int | None = None, max_token_steps: int | None = None) -> Limits:
    """Change the process-wide defaults (:data:`LIMITS`) for every later call that gives no ``limits``; None keeps
    a value. Returns the new :class:`Limits`. The function a server's flags call."""
    global LIMITS
    with _LOCK:
        changes = {k: v for k, v in (("max_images", max_images), ("max_token_steps", max_token_steps))
                   if v is not None}
        LIMITS = dataclasses.replace(LIMITS, **changes)
        return LIMITS


def resolve_limits(limits) -> Limits:
    """``limits`` argument -> :class:`Limits`: None (the process-wide :data:`LIMITS`), a Limits, or a dict of some
    of its fields (the others from :data:`LIMITS`)."""
    if limits is None:
        return LIMITS
    if isinstance(limits, Limits):
        return limits
    if isinstance(limits, dict):
        unknown = sorted(set(limits) - {f.name for f in dataclasses.fields(Limits)})
        if unknown:
            raise ValueError(f"limits: unknown field(s) {unknown}; allowed: max_images, max_token_steps")
        return dataclasses.replace(LIMITS, **limits)
    raise TypeError(f"limits={limits!r} is not allowed: give a ralu_runtime.limits.Limits, a dict of its fields, "
                    "or None (the process-wide defaults)")


def token_steps(batch: int, tokens: int, steps: int, schedule=None) -> int:
    """Latent tokens x model calls of a call: ``batch`` images of ``tokens`` full-resolution latent tokens each
    (every latent frame counted), ``steps`` baseline calls, or a RALU ``schedule`` (its stages' steps at a quarter of
    the tokens, a quarter plus the upsampled ratio, and all of them)."""
    if schedule is None:
        return batch * tokens * steps
    n1, n2, n3 = schedule.steps
    quarter = tokens // 4
    stage2 = quarter + int(3 * quarter * schedule.ratio)
    return batch * (n1 * quarter + n2 * stage2 + n3 * tokens)
