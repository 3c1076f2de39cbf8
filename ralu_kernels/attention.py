"""Variable-length (packed) attention over segments of different lengths, model independent.

RALU's stages run the transformer on token sets of different sizes (a coarse grid, a mixed
coarse/fine set, the full grid). Serving several requests at once therefore means a batch of
sequences with different lengths. Padding them to the longest wastes work and needs a mask;
this module packs them instead.

Contents
--------
1. :func:`varlen_attention` -- non-causal attention over packed sequences
   ``(total_tokens, heads, head_dim)`` delimited by ``cu_seqlens`` (int32, ``n_seq + 1``).
   Backends: ``"flash_attn"`` (``flash_attn.flash_attn_varlen_func``), ``"torch_varlen"``
   (``torch.nn.attention.varlen.varlen_attn``, CUDA only), ``"sdpa"`` (reference: one
   :func:`torch.nn.functional.scaled_dot_product_attention` call per group of equally long
   segments; runs anywhere) and ``"auto"`` (first available for the device and dtype).
2. :func:`cu_seqlens_from_lens`, :func:`pack_sequences` / :func:`unpack_sequences` and two padded
   references (:func:`block_diagonal_mask`, :func:`padded_attention`) used by tests and benchmarks.
3. :class:`StreamSegments` -- attention segments assembled from several token *streams* (e.g. the
   text tokens and the image tokens of a packed batch, which a model projects with different
   weights): index maps between the stream-major storage and the segment-major order attention
   needs, and :meth:`StreamSegments.attend`.

What a model does with these (which tokens form a segment, in which order, its modulation and
positions) belongs to that model's adapter in ``ralu_runtime.adapters`` (``packed_velocity``).
This module imports nothing from ``ralu_runtime`` and nothing from diffusers.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "available_backends",
    "select_backend",
    "varlen_attention",
    "cu_seqlens_from_lens",
    "pack_sequences",
    "unpack_sequences",
    "block_diagonal_mask",
    "padded_attention",
    "StreamSegments",
]

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
_GPU_DTYPES = (torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------------------------
# Backend discovery
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    """``flash_attn.flash_attn_varlen_func`` or None when the package is not importable."""
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA build raising at import
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen_func():
    """``torch.nn.attention.varlen.varlen_attn`` or None on torch builds without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # noqa: BLE001
        return None
    return varlen_attn


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Backends usable for tensors on ``device`` with ``dtype``, in ``"auto"`` preference order."""
    device = torch.device(device)
    out = []
    if device.type == "cuda" and dtype in _GPU_DTYPES:
        if _flash_attn_func() is not None:
            out.append("flash_attn")
        if _torch_varlen_func() is not None:
            out.append("torch_varlen")
    out.append("sdpa")
    return out


def select_backend(backend: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Resolve ``backend`` (``"auto"`` or a name from :data:`BACKENDS`) or raise a clear error."""
    device = torch.device(device)
    if backend == "auto":
        return available_backends(device, dtype)[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown varlen attention backend {backend!r}; choose 'auto' or one of {BACKENDS}")
    if backend == "sdpa":
        return backend
    if backend == "flash_attn" and _flash_attn_func() is None:
        raise ImportError(
            "varlen_attention(backend='flash_attn') needs the `flash-attn` package "
            "(pip install flash-attn --no-build-isolation); it is not importable here. "
            "Use backend='auto', 'torch_varlen' (CUDA) or 'sdpa'."
        )
    if backend == "torch_varlen" and _torch_varlen_func() is None:
        raise ImportError(
            "varlen_attention(backend='torch_varlen') needs `torch.nn.attention.varlen.varlen_attn` "
            f"(torch >= 2.10 built with CUDA); torch {torch.__version__} does not provide it. "
            "Use backend='auto' or 'sdpa'."
        )
    if device.type != "cuda":
        raise RuntimeError(f"varlen_attention(backend={backend!r}) runs on CUDA only; got tensors on {device}. "
                           "Use backend='sdpa' (or 'auto') on this device.")
    if dtype not in _GPU_DTYPES:
        raise TypeError(f"varlen_attention(backend={backend!r}) supports float16/bfloat16 only; got {dtype}. "
                        "Use backend='sdpa' for float32.")
    return backend


# --------------------------------------------------------------------------------------------
# varlen_attention
# --------------------------------------------------------------------------------------------
def _check_cu(cu: torch.Tensor, name: str, total: int, max_len: int, check_values: bool) -> list[int] | None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (int32, shape (n_seq + 1,)); got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32; got {cu.dtype}")
    if cu.ndim != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape (n_seq + 1,) with n_seq >= 1; got {tuple(cu.shape)}")
    if not check_values:
        return None
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0; got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"{name} must be non-decreasing; got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] = {vals[-1]} must equal the number of packed tokens ({total})")
    if max(lens) > max_len:
        raise ValueError(f"max_seqlen ({max_len}) is smaller than the longest sequence in {name} ({max(lens)})")
    return vals


def _sdpa_varlen(q, k, v, cu_q: list[int], cu_k: list[int], scale: float | None) -> torch.Tensor:
    """Reference: SDPA per segment; segments with equal (len_q, len_k) are batched together."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(len(cu_q) - 1):
        lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if lq == 0:
            continue
        if lk == 0:  # no keys: define the output as 0 (what flash attention returns)
            out[cu_q[i]:cu_q[i + 1]] = 0
            continue
        groups.setdefault((lq, lk), []).append(i)
    for (lq, lk), idx in groups.items():
        if len(idx) == 1:
            i = idx[0]
            # (L, H, D) -> (1, H, L, D): the same strided view diffusers' native backend passes to SDPA.
            qs = q[cu_q[i]:cu_q[i + 1]].permute(1, 0, 2).unsqueeze(0)
            ks = k[cu_k[i]:cu_k[i + 1]].permute(1, 0, 2).unsqueeze(0)
            vs = v[cu_k[i]:cu_k[i + 1]].permute(1, 0, 2).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=0.0, is_causal=False, scale=scale)
            out[cu_q[i]:cu_q[i + 1]] = o[0].permute(1, 0, 2)
        else:
            qs = torch.stack([q[cu_q[i]:cu_q[i + 1]] for i in idx]).permute(0, 2, 1, 3)
            ks = torch.stack([k[cu_k[i]:cu_k[i + 1]] for i in idx]).permute(0, 2, 1, 3)
            vs = torch.stack([v[cu_k[i]:cu_k[i + 1]] for i in idx]).permute(0, 2, 1, 3)
            o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=0.0, is_causal=False, scale=scale)
            o = o.permute(0, 2, 1, 3)
            for j, i in enumerate(idx):
                out[cu_q[i]:cu_q[i + 1]] = o[j]
    return out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float | None = None,
    backend: str = "auto",
    check_values: bool | None = None,
) -> torch.Tensor:
    """Non-causal attention over packed variable-length sequences.

    Args:
        q: ``(total_q, heads, head_dim)``; sequence ``i`` is ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]``.
        k, v: ``(total_k, heads, head_dim)`` (same heads and head_dim as ``q``).
        cu_seqlens_q, cu_seqlens_k: int32 ``(n_seq + 1,)`` cumulative lengths starting at 0. On the
            ``"sdpa"`` path they may (and, on a GPU, should) live on the CPU: it needs their values on
            the host, and reading a CPU tensor costs no device sync; the GPU kernels move them to
            ``q``'s device.
        max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence lengths (the GPU kernels size
            their grids with them).
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: ``"auto"``, ``"flash_attn"``, ``"torch_varlen"`` or ``"sdpa"``.
        check_values: also check the *values* of ``cu_seqlens`` (start 0, non-decreasing, end
            at the token count, within ``max_seqlen``). That reads them on the host: default on
            for ``"sdpa"`` (which needs them on the host anyway), off for the GPU kernels, so
            they stay free of host syncs (and CUDA-graph capturable).

    Returns:
        ``(total_q, heads, head_dim)`` in ``q``'s dtype. A sequence with queries but no keys gets 0.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D tensor (total_tokens, heads, head_dim); got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q and k must have the same (heads, head_dim); got {tuple(q.shape[1:])} and {tuple(k.shape[1:])}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point; got {q.dtype}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; "
                         f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    name = select_backend(backend, q.device, q.dtype)
    if check_values is None:
        check_values = name == "sdpa"
    cu_q_vals = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, check_values or name == "sdpa")
    cu_k_vals = _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, check_values or name == "sdpa")

    if name == "sdpa":
        return _sdpa_varlen(q, k, v, cu_q_vals, cu_k_vals, scale)

    cu_q = cu_seqlens_q.to(q.device, non_blocking=True)
    cu_k = cu_seqlens_k.to(q.device, non_blocking=True)
    if name == "flash_attn":
        return _flash_attn_func()(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p=0.0, softmax_scale=scale, causal=False)
    # torch_varlen
    return _torch_varlen_func()(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale=scale)


# --------------------------------------------------------------------------------------------
# Packing helpers and padded references
# --------------------------------------------------------------------------------------------
def cu_seqlens_from_lens(lens: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """int32 ``[0, l0, l0 + l1, ...]`` for the given lengths."""
    lens = [int(n) for n in lens]
    if any(n < 0 for n in lens):
        raise ValueError(f"sequence lengths must be >= 0; got {lens}")
    return torch.tensor([0, *_cumsum(lens)], dtype=torch.int32, device=device)


def _cumsum(lens: Sequence[int]) -> list[int]:
    """Running sums ``[l0, l0 + l1, ...]``."""
    out, acc = [], 0
    for n in lens:
        acc += n
        out.append(acc)
    return out


def pack_sequences(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pack ``(L_i, H, D)`` tensors into ``(sum L_i, H, D)``; returns ``(packed, cu_seqlens, max_len)``.

    ``cu_seqlens`` is int32 on the tensors' device.
    """
    if len(seqs) == 0:
        raise ValueError("pack_sequences needs at least one sequence")
    tail = seqs[0].shape[1:]
    for i, s in enumerate(seqs):
        if s.ndim < 1 or s.shape[1:] != tail:
            raise ValueError(f"sequence {i} has shape {tuple(s.shape)}; all must be (L_i, {', '.join(map(str, tail))})")
    lens = [s.shape[0] for s in seqs]
    return torch.cat(list(seqs), dim=0), cu_seqlens_from_lens(lens, seqs[0].device), max(lens)


def unpack_sequences(packed: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of :func:`pack_sequences`: views ``packed[cu[i]:cu[i+1]]``."""
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != packed.shape[0]:
        raise ValueError(f"cu_seqlens {cu} does not describe {packed.shape[0]} packed tokens")
    return [packed[a:b] for a, b in zip(cu[:-1], cu[1:])]


def block_diagonal_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``(total_q, total_k)`` mask, True where query and key belong to the same sequence."""
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    device = device if device is not None else cu_seqlens_q.device
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long().to(device)
    lk = (cu_k[1:] - cu_k[:-1]).long().to(device)
    seg_q = torch.repeat_interleave(torch.arange(lq.numel(), device=device), lq)
    seg_k = torch.repeat_interleave(torch.arange(lk.numel(), device=device), lk)
    return seg_q[:, None] == seg_k[None, :]


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *,
                     scale: float | None = None, use_mask: bool = True) -> torch.Tensor:
    """Padded reference: pad every sequence to the longest, one batched SDPA, key-padding mask.

    Returns the packed ``(total_q, heads, head_dim)`` result. ``use_mask=False`` drops the mask
    (wrong for padded keys: only a cost lower bound for benchmarks).
    """
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    n = len(cu_q) - 1
    H, D = q.shape[1], q.shape[2]
    qp = q.new_zeros(n, max_seqlen_q, H, D)
    kp = k.new_zeros(n, max_seqlen_k, H, D)
    vp = v.new_zeros(n, max_seqlen_k, H, D)
    for i in range(n):
        qp[i, :cu_q[i + 1] - cu_q[i]] = q[cu_q[i]:cu_q[i + 1]]
        kp[i, :cu_k[i + 1] - cu_k[i]] = k[cu_k[i]:cu_k[i + 1]]
        vp[i, :cu_k[i + 1] - cu_k[i]] = v[cu_k[i]:cu_k[i + 1]]
    mask = None
    if use_mask:
        lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(q.device)
        mask = (torch.arange(max_seqlen_k, device=q.device)[None, :] < lk[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
                                       attn_mask=mask, scale=scale).transpose(1, 2)
    return torch.cat([o[i, :cu_q[i + 1] - cu_q[i]] for i in range(n)], dim=0)


# --------------------------------------------------------------------------------------------
# Segments assembled from several token streams
# --------------------------------------------------------------------------------------------
class StreamSegments:
    """Attention segments built from parts of several token streams.

    A packed batch often keeps its tokens in separate *streams* -- e.g. every request's text tokens
    one after another in one tensor and every request's image tokens in another, because they go
    through different weights. Attention needs each segment contiguous instead: segment ``i`` is
    ``[part i of stream 0 ; part i of stream 1 ; ...]`` (streams in the order given). This class holds
    the index maps between the two orders, the segments' ``cu_seqlens``, and runs
    :func:`varlen_attention` over them.

    Args:
        stream_lens: one sequence per stream with the token count of every segment in that stream
            (all streams describe the same segments; counts may be 0).
        device: where the index tensors and ``cu_seqlens`` live (the tokens' device). A host copy of
            ``cu_seqlens`` is kept as well: the ``"sdpa"`` backend reads it without a device sync.

    Tokens are on dim 0 everywhere: a stream is ``(N_s, ...)``, the segment-major tensor
    ``(total, ...)``. With one stream both orders are the same and :meth:`gather` / :meth:`split`
    return their input.
    """

    def __init__(self, stream_lens: Sequence[Sequence[int]], device: torch.device | str | None = None):
        streams = [tuple(int(n) for n in s) for s in stream_lens]
        if not streams or not streams[0]:
            raise ValueError("StreamSegments needs at least one stream with at least one segment")
        if any(len(s) != len(streams[0]) for s in streams):
            raise ValueError(f"every stream must give one length per segment; got {[len(s) for s in streams]} "
                             "segments")
        if any(n < 0 for s in streams for n in s):
            raise ValueError(f"segment lengths must be >= 0; got {streams}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.stream_lens = tuple(streams)
        self.num_segments = len(streams[0])
        self.segment_lens = tuple(sum(parts) for parts in zip(*streams))
        self.stream_totals = tuple(sum(s) for s in streams)
        self.total = sum(self.segment_lens)
        self.max_len = max(self.segment_lens)
        self.cu_seqlens_host = cu_seqlens_from_lens(self.segment_lens)
        self.cu_seqlens = self.cu_seqlens_host.to(self.device)
        seg = torch.arange(self.num_segments)
        starts = self.cu_seqlens_host[:-1].long()
        self._ids, self._pos = [], []
        before = torch.zeros(self.num_segments, dtype=torch.long)  # tokens of earlier streams in each segment
        for lens in streams:
            n = torch.tensor(lens, dtype=torch.long)
            ids = torch.repeat_interleave(seg, n)
            first = torch.cumsum(n, 0) - n                         # each segment's first row in this stream
            pos = starts[ids] + before[ids] + torch.arange(int(n.sum())) - first[ids]
            self._ids.append(ids.to(self.device))
            self._pos.append(pos.to(self.device))
            before = before + n

    @property
    def num_streams(self) -> int:
        return len(self.stream_lens)

    def segment_ids(self, stream: int) -> torch.Tensor:
        """``(N_stream,)`` int64 on :attr:`device`: the segment of every token of ``stream`` (in stream order)."""
        return self._ids[stream]

    def positions(self, stream: int) -> torch.Tensor:
        """``(N_stream,)`` int64: where every token of ``stream`` sits in the segment-major order."""
        return self._pos[stream]

    def _check_stream(self, s: int, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] != self.stream_totals[s]:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"stream {s} must have {self.stream_totals[s]} tokens on dim 0 (segment lengths "
                             f"{self.stream_lens[s]}); got {shape}")

    def gather(self, *streams: torch.Tensor) -> torch.Tensor:
        """Stream tensors ``(N_s, ...)`` (one per stream, equal trailing shapes and dtypes) -> the
        segment-major ``(total, ...)`` tensor."""
        if len(streams) != self.num_streams:
            raise ValueError(f"gather needs {self.num_streams} stream tensors; got {len(streams)}")
        for s, x in enumerate(streams):
            self._check_stream(s, x)
        if self.num_streams == 1:
            return streams[0]
        tail = streams[0].shape[1:]
        if any(x.shape[1:] != tail or x.dtype != streams[0].dtype for x in streams):
            raise ValueError(f"stream tensors must share trailing shape and dtype; got "
                             f"{[(tuple(x.shape[1:]), x.dtype) for x in streams]}")
        out = streams[0].new_empty(self.total, *tail)
        for pos, x in zip(self._pos, streams):
            out.index_copy_(0, pos, x)
        return out

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inverse of :meth:`gather`: the segment-major ``(total, ...)`` tensor -> one tensor per stream."""
        if not isinstance(packed, torch.Tensor) or packed.ndim < 1 or packed.shape[0] != self.total:
            shape = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
            raise ValueError(f"split needs the {self.total} segment-major tokens on dim 0; got {shape}")
        if self.num_streams == 1:
            return (packed,)
        return tuple(packed.index_select(0, pos) for pos in self._pos)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
               backend: str = "auto") -> torch.Tensor:
        """:func:`varlen_attention` of segment-major ``(total, heads, head_dim)`` q, k, v within each segment."""
        name = select_backend(backend, q.device, q.dtype)
        cu = self.cu_seqlens_host if name == "sdpa" else self.cu_seqlens
        return varlen_attention(q, k, v, cu, cu, self.max_len, self.max_len, scale=scale, backend=name)
