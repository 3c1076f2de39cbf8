"""Execution modes of a model call: how its token streams are laid out, how attention runs and how per-image
modulation reaches the tokens. A family's block functions are written once, against :class:`Mode`.

A model call holds one or more token *streams* (FLUX: text then image; SD3: image then text; Wan: image, with the
text a separate cross-attention stream). A stream is addressed by its index in the family's own order, and
:data:`JOINT` names the joined sequence ``join(stream 0, stream 1, ...)`` (FLUX's single-stream blocks). Three modes:

* :class:`Dense` -- one request, batch ``B``: streams ``(B, L_s, D)``, the joined sequence their concatenation on
  dim 1, attention diffusers' ``dispatch_attention_fn`` (the processor's backend), per-image vectors ``(B, D)``
  broadcast over the tokens, diffusers' AdaLN modules called as modules (their hooks run). That layout is
  :class:`PerRequest`'s, which Sharded shares.
* :class:`ralu_runtime.execution.packing.Packed` -- many requests in one call: every image one attention segment,
  streams ``(1, N_s, D)`` holding all images' tokens one after another, the joined sequence segment-major,
  attention varlen within segments, per-image vectors ``(n_images, D)`` gathered to their tokens.
* :class:`ralu_runtime.execution.sharding.Sharded` -- one request's sequence cut across ranks: streams are this
  rank's rows ``(B, l_s, D)``, attention exact over all ranks' rows (Ulysses / ring), per-image vectors as in Dense.

The same block function run in the three modes performs the same operations in the same order on the same
values, so the modes agree up to float rounding (Dense and a one-rank Sharded: bitwise).

Dynamo: a mode object is an argument of compiled block functions. It keeps only tensors and constants that do not
change between calls of one kind (sizes come from tensor shapes), so one compiled graph serves every token count.
"""
from __future__ import annotations

import torch

JOINT = -1  # the joined sequence of all streams (FLUX's single-stream blocks)


class Mode:
    """How a model call executes (see the module docstring). Subclasses implement every method.

    ``suffix``: appended to block names for :meth:`ralu_runtime.adapters.base.ModelImpl.block` (each mode gets
    its own compiled function; packed modes compile with symbolic token counts).
    ``per_request``: True when the call holds exactly one request's batch as the leading dim (Dense, Sharded),
    False for packed calls (leading dim 1, images as segments).
    """

    suffix = ""
    per_request = True

    def block_name(self, name: str) -> str:
        """The compile-cache name of block kind ``name`` in this mode."""
        return name + self.suffix

    def tok(self, v: torch.Tensor, stream: int) -> torch.Tensor:
        """Per-image rows ``v (n_images, ...)`` -> broadcastable against the tokens of ``stream``."""
        raise NotImplementedError

    def join(self, *streams: torch.Tensor) -> torch.Tensor:
        """Stream tensors (all of them, in order) -> the joined sequence (dim 1)."""
        raise NotImplementedError

    def split(self, x: torch.Tensor, first_len) -> tuple[torch.Tensor, ...]:
        """Inverse of :meth:`join` for two streams; ``first_len``: tokens of stream 0 in the per-request layouts
        (a shape entry, symbolic under dynamo); packed layouts ignore it."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stream: int = JOINT, backend=None,
               parallel_config=None, scale: float | None = None) -> torch.Tensor:
        """Self-attention ``(B, S, H, Dh)`` over ``stream`` (default: the joined sequence), each image's tokens
        attending to its own keys only (and not to keys this mode's key mask drops)."""
        raise NotImplementedError

    def cross_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_stream: int, kv_stream: int,
                     backend=None, scale: float | None = None) -> torch.Tensor:
        """Attention of ``q_stream``'s tokens ``(B, Sq, H, Dh)`` to ``kv_stream``'s keys ``(B, Sk, H, Dh)`` of the
        same image (Wan's text cross-attention)."""
        raise NotImplementedError

    def ada_norm(self, norm, x: torch.Tensor, emb: torch.Tensor, stream: int):
        """diffusers' AdaLN module ``norm`` (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous,
        SD35AdaLayerNormZeroX) applied to ``x`` with per-image conditioning ``emb``; returns what the module
        returns."""
        raise NotImplementedError

    def local(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """This mode's rows (dim 1) of a whole-request tensor of ``stream`` (identity except when sharded)."""
        return x

    def whole(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """Inverse of :meth:`local`: the whole stream from this mode's rows (identity except when sharded)."""
        return x

    def call(self, module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` for per-token output modules (``proj_out``); sharded calls skip diffusers' gather hooks."""
        return module(x)


def call_ada_norm(norm, x, emb):
    """``norm(x, emb)`` with the calling convention of its class (AdaLayerNormContinuous takes the conditioning
    positionally, the AdaLN-Zero kinds as ``emb=``)."""
    if type(norm).__name__ == "AdaLayerNormContinuous":
        return norm(x, emb)
    return norm(x, emb=emb)


def pair_mask_4d(query_rows: torch.Tensor, key_rows: torch.Tensor) -> torch.Tensor:
    """The attention mask ``(B, 1, S_q, S_k)`` of a per-token *pair mask*: ``m[:, None, None, :] * m[:, None, :,
    None]`` for ``query_rows`` ``(B, S_q)`` and ``key_rows`` ``(B, S_k)`` of one mask ``m`` (diffusers' Chroma blocks
    build exactly this from their ``(B, S)`` mask: float 0/1 values are *added* to the logits, a +1 bias between
    valid tokens; bool values form a hard mask, a query row of False attending to nothing)."""
    return key_rows[:, None, None, :] * query_rows[:, None, :, None]


class PerRequest(Mode):
    """The layout of the per-request modes (:class:`Dense`, and :class:`~ralu_runtime.execution.sharding.Sharded` on
    its rows): the request's batch as the leading dim, its streams joined along dim 1, per-image conditioning
    broadcast over the tokens, diffusers' AdaLN modules applied as they are."""

    def tok(self, v, stream):
        return v.unsqueeze(1)

    def join(self, *streams):
        return torch.cat(streams, dim=1)

    def split(self, x, first_len):
        return x[:, :first_len], x[:, first_len:]

    def ada_norm(self, norm, x, emb, stream):
        return call_ada_norm(norm, x, emb)


class Dense(PerRequest):
    """One request, batch ``B`` (see the module docstring). ``attn_mask``: the mask of attention over the joined
    sequence (:data:`JOINT`), in the form the family's diffusers processor hands to ``dispatch_attention_fn`` (e.g.
    ``(B, 1, 1, S)`` bool from a text padding mask), or None. ``pair_mask``: instead, a per-token ``(B, S)`` mask of
    the joined sequence whose :func:`pair_mask_4d` is that mask, built inside :meth:`attend` (so inside a compiled
    block function, as diffusers builds it in every block), or None. ``stream_masks``: ``{stream: mask}`` in the
    processor's form for attention over one stream (e.g. Z-Image's caption refiner over captions of different padded
    lengths); streams not in it (or None) attend unmasked."""

    def __init__(self, attn_mask: torch.Tensor | None = None, pair_mask: torch.Tensor | None = None,
                 stream_masks: dict | None = None):
        if attn_mask is not None and pair_mask is not None:
            raise ValueError("Dense takes attn_mask or pair_mask, not both")
        self.attn_mask = attn_mask
        self.pair_mask = pair_mask
        self.stream_masks = stream_masks or {}

    def attend(self, q, k, v, *, stream=JOINT, backend=None, parallel_config=None, scale=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        mask = self.stream_masks.get(stream)
        if stream == JOINT:
            mask = self.attn_mask if self.pair_mask is None else pair_mask_4d(self.pair_mask, self.pair_mask)
        return dispatch_attention_fn(q, k, v, attn_mask=mask, scale=scale, backend=backend,
                                     parallel_config=parallel_config)

    def cross_attend(self, q, k, v, *, q_stream, kv_stream, backend=None, scale=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(q, k, v, attn_mask=None, scale=scale, backend=backend)


DENSE = Dense()

__all__ = ["DENSE", "Dense", "JOINT", "Mode", "PerRequest", "call_ada_norm", "pair_mask_4d"]
