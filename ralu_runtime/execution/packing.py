"""The packed execution mode: many requests' model calls as one transformer call over a packed token sequence, each
image its own attention segment. Model independent; a family's block functions run on it unchanged
(:class:`Packed`, a :class:`~ralu_runtime.execution.modes.Mode`), and its ``packed_velocity`` lays out the packed
inputs with the helpers here.

Layout: a model call's streams (FLUX: text, image) keep all images' tokens one after another, stream ``s`` as one
``(1, N_s, D)`` tensor; segment ``i`` (image ``i``) is ``[stream 0 part i ; stream 1 part i ; ...]`` and the joined
sequence is segment-major. Per-image vectors (time embedding, AdaLN shift / scale / gate, guidance) are
``(n_images, D)`` and reach their tokens through the segment id of every token (:func:`per_token`).

Two layout objects serve :class:`Packed`:

* :class:`HostSegments` -- built on the host per call (:class:`~ralu_kernels.attention.StreamSegments`): eager calls;
* :class:`PackedSegments` -- device tensors only, one extra padding segment: compiled or CUDA-graph-captured calls
  (nothing depends on a host value that changes with the mix of requests, so one graph serves every mix of the same
  padded sizes).

:class:`PackedExecution` is how a packed call executes (directly here; the compile runner's subclass pads to
buckets and replays CUDA graphs, :mod:`ralu_runtime.compile.packed`).
"""
from __future__ import annotations

import torch

from ralu_kernels.attention import StreamSegments, varlen_attention

from .modes import JOINT, Mode


def per_token(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-image rows ``x (n_images, ...)`` -> per-token ``(1, N, ...)``, ``rows (N,)`` the image of every token."""
    return x.index_select(0, rows).unsqueeze(0)


def pad_rows(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``x`` with ``n`` zero rows appended on dim 0 (None stays None)."""
    if x is None or n == 0:
        return x
    return torch.cat([x, x.new_zeros(n, *x.shape[1:])])


def forward_override(module: torch.nn.Module) -> str | None:
    """What replaces ``module``'s own diffusers ``forward``, in words, or None: a ``forward`` set on the instance
    (an accelerate hook: enable_sequential_cpu_offload, a device_map, a model offload hook), or a class
    ``forward`` defined outside diffusers and torch (a patched class, a subclass's own). Code that runs a module's
    layers itself would bypass it. A diffusers hook registry's forward is not counted (its hooks are checked by
    name), nor the bound method of the module's own class ``forward`` that a removed registry hook leaves on the
    instance."""
    own = type(module).forward
    inst = vars(module).get("forward")
    if inst is not None and not (getattr(inst, "__func__", None) is own and getattr(inst, "__self__", None) is module):
        if hasattr(module, "_hf_hook"):
            if type(module._hf_hook).__name__ == "CpuOffload":  # a model's own is run by ralu_runtime.offload
                return "an accelerate model offload hook (enable_model_cpu_offload) on a part of the model"
            return "an accelerate hook (enable_sequential_cpu_offload or a device_map)"
        if getattr(module, "_diffusers_hook", None) is None:
            return "a forward set on the instance"
    where = getattr(own, "__module__", None) or ""
    if not where.startswith(("diffusers.", "torch.")):
        return f"{type(module).__name__}.forward from {where or 'outside diffusers'}"
    return None


def has_hooks(module: torch.nn.Module) -> bool:
    """True when ``module`` carries torch forward (pre-)hooks, a diffusers hook registry with hooks, or a forward of
    its own (:func:`forward_override`)."""
    registry = getattr(module, "_diffusers_hook", None)
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(registry, "hooks", None)
                or forward_override(module))


def can_pack(impl, bypassed) -> bool:
    """Whether a packed call may run: plain eager execution (``impl`` None or eager) or an impl that declares packed
    calls (``impl.packed_calls``: the compile runner's inductor / eager backends), no feature cache on the calling
    ``generate`` (its state is per request), and no hooks on the modules ``bypassed`` -- those the unpacked call runs
    as modules but the packed call decomposes into their layers (so their hooks would not run)."""
    from .call import EAGER, current_cache

    if impl is not None and impl is not EAGER and not getattr(impl, "packed_calls", False):
        return False
    if current_cache() is not None:
        return False
    return not any(has_hooks(m) for m in bypassed)


def split_calls(out: torch.Tensor, calls, batches: list[int] | None = None) -> list[torch.Tensor]:
    """Packed per-token output ``(1, N, C)`` -> one ``(n_i, L_i, C)`` view per call (``n_i`` = ``batches[i]``,
    default the call's batch)."""
    batches = batches or [c.tokens.shape[0] for c in calls]
    sizes = [n * c.tokens.shape[1] for n, c in zip(batches, calls)]
    return [o.view(n, c.tokens.shape[1], -1) for o, n, c in zip(out[0].split(sizes), batches, calls)]


def static_attention(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention of :class:`PackedSegments` for varlen backend name ``backend`` (checked as
    :func:`ralu_kernels.attention.select_backend` checks it): ``"torch_varlen"`` (torch's flash varlen kernel; CUDA,
    fp16/bf16) where it is available and ``backend`` is "auto", "torch_varlen" or "flash_attn" (the same kernel
    family), else ``"dense"`` (one SDPA call over the whole packed sequence with a block-diagonal mask: exact, but
    memory grows with the square of the packed length)."""
    from ralu_kernels.attention import available_backends, select_backend

    name = select_backend(backend, device, dtype)
    if name in ("flash_attn", "torch_varlen") and "torch_varlen" in available_backends(device, dtype):
        return "torch_varlen"
    return "dense"


class PackedExecution:
    """How a family's ``packed_velocity`` executes a packed call. This default runs it directly with ``impl``;
    :class:`ralu_runtime.compile.StageRunner` passes its own (CUDA graphs per token-count bucket).

    ``static_layout``: the packed forward is compiled or captured, so its segment layout must be device tensors only
    (:class:`PackedSegments`, one extra padding segment) instead of :class:`HostSegments` (host lists); true when
    ``impl`` compiles its blocks (``impl.compiles_blocks``). :meth:`pad` rounds the packed token and segment counts
    up (identity here), :meth:`run` executes the packed forward on its flat tensor inputs (``key``: everything else
    it depends on, hashable), :meth:`velocity` is the per-call fallback."""

    def __init__(self, adapter, impl=None):
        from .call import EAGER

        self.adapter = adapter
        self.impl = impl or EAGER
        self.static_layout = bool(getattr(self.impl, "compiles_blocks", False))

    def pad(self, kind: str, n: int) -> int:
        """Padded size of ``n`` for ``kind`` "image" / "text" (tokens of that stream) or "segments"."""
        return n

    def run(self, key, forward, tensors: list[torch.Tensor]) -> torch.Tensor:
        return forward(*tensors)

    def velocity(self, call) -> torch.Tensor:
        return self.adapter.velocity(call.tokens, call.grid, call.timestep, call.cond, self.impl)


def pair_masked_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int], pair: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """Attention of ``(N, heads, head_dim)`` q, k, v within the segments ``[cu[i], cu[i + 1])`` (host ints), each
    with the :func:`~ralu_runtime.execution.modes.pair_mask_4d` of its rows of the per-token mask ``pair (N,)``
    (float: added to the logits; bool: hard). One SDPA call per segment, as a one-request call runs it per image."""
    from .modes import pair_mask_4d

    out = torch.empty_like(q)
    for a, z in zip(cu[:-1], cu[1:]):
        if a == z:
            continue
        m = pair[a:z][None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q[a:z].permute(1, 0, 2)[None], k[a:z].permute(1, 0, 2)[None], v[a:z].permute(1, 0, 2)[None],
            attn_mask=pair_mask_4d(m, m), scale=scale)
        out[a:z] = o[0].permute(1, 0, 2)
    return out


# ------------------------------------------------------------------------------------------------ layouts
class HostSegments:
    """The segments of a packed call built on the host (eager calls): ``stream_lens[s][i]`` tokens of image ``i`` in
    stream ``s``. Methods as :class:`PackedSegments`; tokens on dim 0 (``(N_s, ...)`` streams, ``(total, ...)``
    segment-major)."""

    def __init__(self, stream_lens, device):
        self.stream_lens = [list(map(int, s)) for s in stream_lens]
        self.joint = StreamSegments(self.stream_lens, device)
        self._single = None
        self._streams = {}

    @property
    def num_streams(self) -> int:
        return len(self.stream_lens)

    def _stream(self, s: int) -> StreamSegments:
        seg = self._streams.get(s)
        if seg is None:
            seg = self._streams[s] = StreamSegments([self.stream_lens[s]], self.joint.device)
        return seg

    def _joined(self) -> StreamSegments:
        if self._single is None:
            self._single = StreamSegments([self.joint.segment_lens], self.joint.device)
        return self._single

    def segment_ids(self, stream: int) -> torch.Tensor:
        return self._joined().segment_ids(0) if stream == JOINT else self.joint.segment_ids(stream)

    def gather(self, *streams):
        return self.joint.gather(*streams)

    def split(self, packed):
        return self.joint.split(packed)

    def attend(self, q, k, v, *, stream: int = JOINT, scale=None, backend: str = "auto", pair=None):
        """``pair (N,)``: a per-token pair mask of the joined sequence (:func:`pair_masked_segments`: one SDPA call
        per segment), or None (varlen attention with ``backend``)."""
        seg = self.joint if (stream == JOINT or self.num_streams == 1) else self._stream(stream)
        if pair is not None:
            return pair_masked_segments(q, k, v, seg.cu_seqlens_host.tolist(), pair, scale)
        return seg.attend(q, k, v, scale=scale, backend=backend)

    def cross(self, q, k, v, *, q_stream: int, kv_stream: int, scale=None, backend: str = "auto"):
        from ralu_kernels.attention import select_backend

        qs, ks = self._stream(q_stream), self._stream(kv_stream)
        name = select_backend(backend, q.device, q.dtype)
        host = name == "sdpa"
        return varlen_attention(q, k, v, qs.cu_seqlens_host if host else qs.cu_seqlens,
                                ks.cu_seqlens_host if host else ks.cu_seqlens, qs.max_len, ks.max_len, scale=scale,
                                backend=name)


class PackedSegments:
    """The attention segments of a packed call as device tensors only: what a compiled or CUDA-graph-captured packed
    forward takes instead of :class:`HostSegments` (same methods). Nothing here reads a value on the host or holds a
    Python number that changes with the mix of requests, so a compiled block function with symbolic token dimensions
    serves every mix without a recompile, and a captured graph is valid for any mix of the same padded sizes.

    :meth:`build` lays out the real segments, then one padding segment (``pads[s]`` tokens of every stream: the
    padding of the packed lengths up to a bucket; real tokens never attend to it and it changes no real output),
    then empty segments up to ``num_segments``. Attention (``kind``): "dense" (SDPA, mask ``segment[q] ==
    segment[k]``) or "torch_varlen" (``cu_seqlens`` on the device, the packed length as the max segment length).
    """

    def __init__(self, kind: str, ids, pos, order, seg_ids, cu_seqlens, stream_cu=()):
        self.kind = kind
        self.ids = tuple(ids)          # per stream: (N_s,) segment of every token
        self.pos = tuple(pos)          # per stream: (N_s,) its place in the segment-major order (2+ streams)
        self.order = order             # (total,) segment-major -> index into the streams concatenated (2+ streams)
        self.seg_ids = seg_ids         # (total,) segment of every token, segment-major
        self.cu_seqlens = cu_seqlens   # (num_segments + 1,) int32, segments of the joined sequence
        self.stream_cu = tuple(stream_cu)  # per stream (2+ streams): (num_segments + 1,) int32, its own segments
        self.num_streams = len(self.ids)

    @classmethod
    def build(cls, stream_lens, pads, num_segments: int, device, kind: str) -> "PackedSegments":
        streams = [list(s) for s in stream_lens]
        n = len(streams[0])
        if num_segments < n + 1:
            raise ValueError(f"num_segments={num_segments}: need room for {n} segments and the padding segment")
        lens = [s + [int(p)] + [0] * (num_segments - n - 1) for s, p in zip(streams, pads)]
        host = StreamSegments(lens)
        seg_ids = torch.repeat_interleave(torch.arange(num_segments), torch.tensor(host.segment_lens))
        pos = [host.positions(s) for s in range(len(lens))]
        order = None
        stream_cu = []
        if len(lens) > 1:
            order = torch.empty(host.total, dtype=torch.long)
            order[torch.cat(pos)] = torch.arange(host.total)
            stream_cu = [StreamSegments([s]).cu_seqlens_host for s in lens]
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        return cls(kind, [to(host.segment_ids(s)) for s in range(len(lens))],
                   [to(p) for p in pos] if len(lens) > 1 else [], to(order), to(seg_ids), to(host.cu_seqlens_host),
                   [to(c) for c in stream_cu])

    def tensors(self) -> list[torch.Tensor]:
        """The flat tensors of this layout (:meth:`from_tensors` rebuilds it from them)."""
        if self.num_streams == 1:
            return [self.seg_ids, self.cu_seqlens]
        return [*self.ids, *self.pos, *self.stream_cu, self.order, self.seg_ids, self.cu_seqlens]

    @classmethod
    def from_tensors(cls, tensors, num_streams: int, kind: str) -> "PackedSegments":
        if num_streams == 1:
            seg_ids, cu = tensors
            return cls(kind, [seg_ids], [], None, seg_ids, cu)
        k = num_streams
        return cls(kind, tensors[:k], tensors[k:2 * k], tensors[3 * k], tensors[3 * k + 1], tensors[3 * k + 2],
                   tensors[2 * k:3 * k])

    @staticmethod
    def count(num_streams: int) -> int:
        """How many tensors :meth:`tensors` returns for ``num_streams`` streams."""
        return 2 if num_streams == 1 else 3 * num_streams + 3

    def joined(self) -> "PackedSegments":
        """The same segments as one stream (the segment-major sequence itself)."""
        return PackedSegments(self.kind, [self.seg_ids], [], None, self.seg_ids, self.cu_seqlens)

    def segment_ids(self, stream: int) -> torch.Tensor:
        return self.seg_ids if stream == JOINT else self.ids[stream]

    def gather(self, *streams: torch.Tensor) -> torch.Tensor:
        if len(streams) == 1:
            return streams[0]
        return torch.cat(streams).index_select(0, self.order)

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.num_streams == 1:
            return (packed,)
        return tuple(packed.index_select(0, p) for p in self.pos)

    def _attention(self, q, k, v, ids_q, ids_k, cu_q, cu_k, scale, pair=None):
        if self.kind == "torch_varlen":
            if pair is not None:
                raise NotImplementedError("PackedSegments kind 'torch_varlen' takes no pair mask: build the layout "
                                          "with kind 'dense' for masked calls")
            from torch.nn.attention.varlen import varlen_attn

            nq, nk = q.shape[0], k.shape[0]  # upper bounds of the segment lengths that never change the graph
            return varlen_attn(q, k, v, cu_q, cu_k, nq, nk, scale=scale)
        mask = ids_q[:, None] == ids_k[None, :]
        if pair is not None:  # within a segment the pair mask, across segments nothing (-inf / False)
            from .modes import pair_mask_4d

            within = pair_mask_4d(pair[None], pair[None])[0, 0]
            mask = mask & within if pair.dtype == torch.bool else \
                torch.where(mask, within, torch.full_like(within, float("-inf")))
        o = torch.nn.functional.scaled_dot_product_attention(
            q.permute(1, 0, 2)[None], k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None], attn_mask=mask, scale=scale)
        return o[0].permute(1, 0, 2)

    def attend(self, q, k, v, *, stream: int = JOINT, scale=None, backend=None, pair=None):
        """Attention of ``(N, heads, head_dim)`` q, k, v within each segment of ``stream`` (default: the joined
        sequence; ``backend`` is ignored: the kind was chosen when the layout was built). ``pair (N,)``: a per-token
        pair mask of the joined sequence (:func:`~ralu_runtime.execution.modes.pair_mask_4d` within every segment;
        kind "dense" only), or None."""
        if stream == JOINT or self.num_streams == 1:
            return self._attention(q, k, v, self.seg_ids, self.seg_ids, self.cu_seqlens, self.cu_seqlens, scale,
                                   pair)
        ids, cu = self.ids[stream], self.stream_cu[stream]
        return self._attention(q, k, v, ids, ids, cu, cu, scale)

    def cross(self, q, k, v, *, q_stream: int, kv_stream: int, scale=None, backend=None):
        """Attention of ``q_stream``'s tokens to ``kv_stream``'s tokens of the same segment."""
        return self._attention(q, k, v, self.ids[q_stream], self.ids[kv_stream], self.stream_cu[q_stream],
                               self.stream_cu[kv_stream], scale)


# ------------------------------------------------------------------------------------------------ the mode
class Packed(Mode):
    """Many images in one call (see the module docstring). ``layout``: :class:`HostSegments` or
    :class:`PackedSegments` over the family's streams; ``backend``: the varlen attention backend of host layouts
    ("auto", "sdpa", "torch_varlen", "flash_attn"). ``pair_mask``: ``(1, N)`` per token of the joined sequence
    (segment-major, e.g. ``layout.gather(text_mask, image_ones)[None]``), whose
    :func:`~ralu_runtime.execution.modes.pair_mask_4d` masks attention over :data:`JOINT` within every segment
    (``Dense(pair_mask=...)`` per image; 0 for a segment that has no mask: adding 0 is no mask), or None. Host
    layouts then run one SDPA call per segment, static layouts need kind "dense"."""

    suffix = "_packed"
    per_request = False

    def __init__(self, layout, backend: str = "auto", pair_mask: torch.Tensor | None = None):
        self.layout = layout
        self.backend = backend
        self.pair_mask = pair_mask

    def tok(self, v, stream):
        return per_token(v, self.layout.segment_ids(stream))

    def join(self, *streams):
        return self.layout.gather(*(x[0] for x in streams))[None]

    def split(self, x, first_len):
        return tuple(t[None] for t in self.layout.split(x[0]))

    def attend(self, q, k, v, *, stream=JOINT, backend=None, parallel_config=None, scale=None):
        if self.pair_mask is not None and stream == JOINT:
            return self.layout.attend(q[0], k[0], v[0], stream=stream, scale=scale, backend=self.backend,
                                      pair=self.pair_mask[0])[None]
        return self.layout.attend(q[0], k[0], v[0], stream=stream, scale=scale, backend=self.backend)[None]

    def cross_attend(self, q, k, v, *, q_stream, kv_stream, backend=None, scale=None):
        return self.layout.cross(q[0], k[0], v[0], q_stream=q_stream, kv_stream=kv_stream, scale=scale,
                                 backend=self.backend)[None]

    def ada_norm(self, norm, x, emb, stream):
        """diffusers' AdaLN modules decomposed (the same operations in the same order), the per-image shift / scale
        applied per token; NotImplementedError for other modules (a family decomposes those itself)."""
        kind = type(norm).__name__
        if kind == "AdaLayerNormContinuous":
            emb = norm.linear(norm.silu(emb).to(x.dtype))
            scale, shift = torch.chunk(emb, 2, dim=1)
            return norm.norm(x) * self.tok(1 + scale, stream) + self.tok(shift, stream)
        if kind in ("AdaLayerNormZero", "AdaLayerNormZeroSingle", "SD35AdaLayerNormZeroX") and \
                getattr(norm, "emb", None) is None:
            chunks = norm.linear(norm.silu(emb)).chunk({"AdaLayerNormZero": 6, "AdaLayerNormZeroSingle": 3,
                                                        "SD35AdaLayerNormZeroX": 9}[kind], dim=1)
            normed = norm.norm(x)
            out = normed * self.tok(1 + chunks[1], stream) + self.tok(chunks[0], stream)
            if kind == "AdaLayerNormZeroSingle":
                return out, chunks[2]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
            if kind == "AdaLayerNormZero":
                return out, gate_msa, shift_mlp, scale_mlp, gate_mlp
            shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
            out2 = normed * self.tok(1 + scale_msa2, stream) + self.tok(shift_msa2, stream)
            return out, gate_msa, shift_mlp, scale_mlp, gate_mlp, out2, gate_msa2
        if kind in _GIVEN_MODULATION and getattr(norm, "emb", None) is None:  # Chroma's: modulation given
            emb = emb.flatten(1, 2)
            if kind == "ChromaAdaLayerNormContinuousPruned":  # (shift, scale), in x's dtype
                shift, scale = emb.to(x.dtype).chunk(2, dim=1)
                return norm.norm(x) * self.tok(1 + scale, stream) + self.tok(shift, stream)
            chunks = emb.chunk(_GIVEN_MODULATION[kind], dim=1)
            return (norm.norm(x) * self.tok(1 + chunks[1], stream) + self.tok(chunks[0], stream), *chunks[2:])
        raise NotImplementedError(f"Packed.ada_norm: no packed form of {kind}; decompose it in the family's block "
                                  "function with Mode.tok")


# diffusers' AdaLN kinds that take their modulation ready-made, ``emb (n_images, k, D)`` (Chroma's approximator
# output): k chunks per image
_GIVEN_MODULATION = {"ChromaAdaLayerNormZeroPruned": 6, "ChromaAdaLayerNormZeroSinglePruned": 3,
                     "ChromaAdaLayerNormContinuousPruned": 2}


def packed_layout(stream_lens, pads, num_segments, device, kind: str | None):
    """:class:`HostSegments` (``kind`` None: eager) or :class:`PackedSegments` (``kind`` "dense" / "torch_varlen") for
    segments with ``stream_lens[s][i]`` tokens of image ``i`` in stream ``s``."""
    if kind is None:
        return HostSegments(stream_lens, device)
    return PackedSegments.build(stream_lens, pads, num_segments, device, kind)


__all__ = ["HostSegments", "Packed", "PackedExecution", "PackedSegments", "can_pack", "has_hooks", "packed_layout",
           "pad_rows", "pair_masked_segments", "per_token", "split_calls", "static_attention"]
