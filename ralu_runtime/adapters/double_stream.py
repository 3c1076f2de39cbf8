"""What Qwen-Image and HunyuanVideo 1.5 share: a double-stream MMDiT (a text and an image stream with their own
weights, joint attention over both) with a text *key* mask and classifier-free guidance run as one batch of ``2B``
(negative rows first), in every execution mode (:mod:`ralu_runtime.execution`).

A family subclasses :class:`DoubleStreamAdapter` and provides four pieces:

* ``TEXT`` / ``IMAGE``: the streams' indices in the order of its joined sequence (Qwen-Image ``[text ; image]``,
  HunyuanVideo 1.5 ``[image ; text]``);
* :meth:`~DoubleStreamAdapter._inputs`: one request's model inputs as per-token tensors of each stream, per-image
  rows and the text key mask (:class:`StreamInputs`);
* :meth:`~DoubleStreamAdapter._forward`: the transformer in a mode ``ex`` on those inputs (in ``ex``'s layout);
* :meth:`~DoubleStreamAdapter._guide`: its classifier-free guidance combination of ``[negative ; positive]``.

The class then gives :meth:`~DoubleStreamAdapter.velocity` (one request: :class:`~ralu_runtime.execution.modes.Dense`
with the key mask as the joint attention mask diffusers' processors pass, or
:class:`~ralu_runtime.execution.sharding.Sharded` with it as ``key_mask`` when the running ``generate`` call has a
sharding plan) and :meth:`~DoubleStreamAdapter.packed_velocity` (many requests in one call:
:class:`~ralu_runtime.execution.packing.Packed`). The text masks of both families are hard key masks (a masked text
token is never a key of any token, and only image tokens reach the output), so a packed call leaves the masked text
tokens out: every image's segment holds only its valid text tokens (exact up to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..execution.modes import DENSE, Dense, Mode
from ..execution.packing import (HostSegments, Packed, PackedExecution, PackedSegments, can_pack, pad_rows,
                                 split_calls, static_attention)
from ..execution.sharding import Sharded
from .base import (EAGER, BlockStack, DiTAdapter, ModelImpl, VelocityCall, call_with_hooks, check_velocity_calls,
                   current_sharding)


@dataclass
class StreamInputs:
    """One request's model inputs (``B'`` images: ``2B`` under classifier-free guidance).

    ``image``: per-token tensors of the image stream, each ``(B', L, ...)`` (the tokens first); ``text``: per-token
    tensors of the text stream, each ``(B', T, ...)``; ``text_mask``: ``(B', T)`` bool, the valid text tokens (the
    keys every token may attend to besides the image tokens), or None (all valid); ``per_image``: per-image rows,
    each ``(B', ...)`` (e.g. the timestep)."""

    image: tuple
    text: tuple
    text_mask: torch.Tensor | None
    per_image: tuple


class DoubleStreamAdapter(DiTAdapter):
    """Base of the double-stream families with a text key mask and batched CFG (see the module docstring)."""
    bypassed_modules = ("attn",)  # its attention runs as ralu's own code (hooks on the module would not)

    TEXT: int = 0
    IMAGE: int = 1
    packs = True
    shards = True
    packed_attention_backend = "auto"  # varlen_attention backend of packed_velocity ("auto", "sdpa", ...)

    # ---- what a family provides ------------------------------------------------------------------------------
    def _inputs(self, x: torch.Tensor, grid, timestep: torch.Tensor, data: dict) -> StreamInputs:
        """The inputs of one request for tokens ``x (B', L, C)`` (already doubled under CFG), its ``grid`` (for
        ``B = B' / 2`` or ``B'`` images) and 0-dim ``timestep``; ``data``: its conditioning data."""
        raise NotImplementedError

    def _forward(self, ex: Mode, image: list, text: list, per_image: list, impl: ModelImpl, timestep=None,
                 text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer in mode ``ex`` on :class:`StreamInputs` parts in ``ex``'s layout; returns the image
        stream's velocity ``(B, L, C)`` in that layout. ``timestep``: the 0-dim timestep for a feature cache
        (one-request modes); ``text_mask``: the request's ``(B', T)`` mask, for block hooks' keyword arguments."""
        raise NotImplementedError

    def _guide(self, out: torch.Tensor, data: dict) -> torch.Tensor:
        """Classifier-free guidance: ``out (2B, L, C)`` = [negative ; positive] velocities -> ``(B, L, C)``."""
        raise NotImplementedError

    def _bypassed_by_packing(self) -> list:
        """Modules the one-request call runs as modules (hooks included) and the packed call decomposes."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------------------------
    def _streams(self, image, text) -> list:
        """``image`` and ``text`` (anything per stream) in the order of the joined sequence."""
        return [image, text] if self.IMAGE == 0 else [text, image]

    def _block_stack(self, ex: Mode, fn, blocks, state0: tuple, image_index: int, args, hook_kwargs) -> BlockStack:
        """The block stack of a :meth:`_forward` as a :class:`BlockStack`: ``blocks`` are ``(block, extra)`` pairs
        run by ``fn(*args(block, state, extra))``, which returns the new state tuple (``state[image_index]`` the
        image stream); a block with torch forward hooks runs them around ``fn`` with ``hook_kwargs(state)`` (the
        keyword arguments of diffusers' block forward)."""
        def run(state, start, stop):
            for blk, extra in blocks[start:stop]:
                call_args = args(blk, state, extra)
                if blk._forward_hooks or blk._forward_pre_hooks:
                    state = call_with_hooks(blk, fn, call_args, hook_kwargs(state))
                else:
                    state = fn(*call_args)
            return state

        return BlockStack(run, len(blocks), state0, lambda state: state[image_index], ex, self.IMAGE)

    def _request_mode(self, inp: StreamInputs) -> Mode:
        """The mode of a one-request call: :class:`Dense` with the joint key mask ``(B', 1, 1, S)`` (diffusers'
        processors' form), or :class:`Sharded` with it as ``(B', S)`` ``key_mask`` when the running ``generate``
        call has a sharding plan."""
        b, l = inp.image[0].shape[:2]
        t = inp.text[0].shape[1]
        key_mask = None
        if inp.text_mask is not None:
            ones = torch.ones(b, l, dtype=torch.bool, device=inp.text_mask.device)
            key_mask = torch.cat(self._streams(ones, inp.text_mask), dim=1)
        plan = current_sharding()
        if plan is None:
            return DENSE if key_mask is None else Dense(key_mask[:, None, None, :])
        return Sharded(plan, self._streams(l, t), key_mask)

    def velocity(self, tokens, grid, timestep, cond, impl: ModelImpl | None = None):
        """One request's velocity ``(B, L, C)`` (both CFG halves as one batch of ``2B``); sharded across ranks when
        the running ``generate`` call has a sharding plan (context parallelism: every rank returns the whole
        velocity)."""
        data = cond.data
        x = torch.cat([tokens, tokens]) if data["cfg"] else tokens
        inp = self._inputs(x, grid, timestep, data)
        ex = self._request_mode(inp)
        image = [ex.local(v, self.IMAGE) for v in inp.image]
        text = [ex.local(v, self.TEXT) for v in inp.text]
        out = self._forward(ex, image, text, list(inp.per_image), impl or EAGER, timestep, inp.text_mask)
        out = ex.whole(out, self.IMAGE)
        return self._guide(out, data) if data["cfg"] else out

    def packed_velocity(self, calls, impl: ModelImpl | None = None, *,
                        execution: PackedExecution | None = None) -> list[torch.Tensor]:
        """:meth:`velocity` of every call, all run as one transformer call over a packed token sequence.

        Every image of every call is one attention segment (its valid text tokens and its image tokens, in the
        family's joined order); under classifier-free guidance a call brings its images twice (negative rows
        first, as :meth:`velocity`) and its result is combined with its own guidance settings. Timestep embedding
        and modulation per image, rotary positions per token (from each call's own grid), text lengths and masks
        per image. Results equal the unpacked calls up to float rounding.

        Eager (``impl`` None / EAGER, or a runner's execution without compiled blocks): a
        :class:`~ralu_runtime.execution.packing.HostSegments` layout and varlen attention
        (:attr:`packed_attention_backend`). Compiled (a runner's impl with ``compiles_blocks``, or CUDA graphs per
        bucket): a :class:`~ralu_runtime.execution.packing.PackedSegments` layout (device tensors only, one padding
        segment, sizes padded by ``execution.pad``), so a new mix of requests reuses the graphs.

        Falls back to one :meth:`velocity` per call (correct, unpacked; through the runner when it passes its
        ``execution``) when ``impl`` is neither None / EAGER nor a packing impl, when the calling ``generate`` has
        a feature cache (its state is per request), or when a block, an AdaLN module or the output norm that the
        packed call decomposes carries torch or diffusers hooks (they would not run)."""
        calls = check_velocity_calls(calls)
        execution = execution or PackedExecution(self, impl)
        if not can_pack(execution.impl, self._bypassed_by_packing()):
            return [execution.velocity(c) for c in calls]
        return self._packed_call(calls, execution)

    def _packed_call(self, calls: list[VelocityCall], execution: PackedExecution) -> list[torch.Tensor]:
        device, dtype = calls[0].tokens.device, calls[0].tokens.dtype
        image, text, per_image = [], [], []
        image_lens, text_lens, counts = [], [], []
        for c in calls:
            data = c.cond.data
            x = torch.cat([c.tokens, c.tokens]) if data["cfg"] else c.tokens
            inp = self._inputs(x, c.grid, c.timestep, data)
            b, l = x.shape[:2]
            t = inp.text[0].shape[1]
            counts.append(b)
            image_lens += [l] * b
            image.append([v.reshape(b * l, *v.shape[2:]) for v in inp.image])
            rows = [v.reshape(b * t, *v.shape[2:]) for v in inp.text]
            if inp.text_mask is None:
                text_lens += [t] * b
            else:  # masked text tokens are keys of no token: left out of the packed sequence
                keep = inp.text_mask.reshape(-1)
                text_lens += [int(n) for n in inp.text_mask.sum(1).tolist()]
                rows = [v[keep] for v in rows]
            text.append(rows)
            per_image.append(inp.per_image)
        cat = lambda parts: [torch.cat(p) for p in zip(*parts)]  # noqa: E731
        image, text, per_image = cat(image), cat(text), cat(per_image)
        impl, backend = execution.impl, self.packed_attention_backend
        lens = self._streams(image_lens, text_lens)
        n_img = len(image[0])

        def forward(ex, img, txt, per):
            return self._forward(ex, img, txt, per, impl)

        if not execution.static_layout:
            ex = Packed(HostSegments(lens, device), backend)
            out = forward(ex, [v[None] for v in image], [v[None] for v in text], per_image)
            return self._split(out, calls, counts)

        n_txt, n_seg = len(text[0]), len(image_lens)
        pad_img, pad_txt = execution.pad("image", n_img) - n_img, execution.pad("text", n_txt) - n_txt
        segs = execution.pad("segments", n_seg + 1)
        kind = static_attention(backend, device, dtype)
        lay = PackedSegments.build(lens, self._streams(pad_img, pad_txt), segs, device, kind)
        ni, nt, npi = len(image), len(text), len(per_image)
        # the padded image stream first (a runner's CUDA-graph record reads its size from tensors[0])
        tensors = [*(pad_rows(v, pad_img) for v in image), *(pad_rows(v, pad_txt) for v in text),
                   *(pad_rows(v, segs - n_seg) for v in per_image), *lay.tensors()]

        def flat_forward(*ts):  # the flat tensors only (a captured graph replays it for every mix of the same sizes)
            ex = Packed(PackedSegments.from_tensors(ts[ni + nt + npi:], 2, kind), backend)
            return forward(ex, [v[None] for v in ts[:ni]], [v[None] for v in ts[ni:ni + nt]],
                           list(ts[ni + nt:ni + nt + npi]))

        out = execution.run((self.family, kind, backend), flat_forward, tensors)
        return self._split(out[:, :n_img], calls, counts)

    def _split(self, out: torch.Tensor, calls, counts) -> list[torch.Tensor]:
        """Packed image velocities ``(1, N, C)`` -> one per call, CFG combined."""
        return [self._guide(o, c.cond.data) if c.cond.data["cfg"] else o
                for c, o in zip(calls, split_calls(out, calls, counts))]


__all__ = ["DoubleStreamAdapter", "StreamInputs"]
