"""Variable-length (packed) attention and packed-batch attention processors for diffusers DiTs.

RALU's stages run the transformer on token sets of different sizes (a coarse grid, a mixed
coarse/fine set, the full grid). Serving several requests at once therefore means a batch of
sequences with different lengths. Padding them to the longest wastes work and needs a mask;
this module packs them instead.

Layers
------
1. :func:`varlen_attention` -- non-causal attention over packed sequences
   ``(total_tokens, heads, head_dim)`` delimited by ``cu_seqlens`` (int32, ``n_seq + 1``).
   Backends: ``"flash_attn"`` (``flash_attn.flash_attn_varlen_func``), ``"torch_varlen"``
   (``torch.nn.attention.varlen.varlen_attn``, CUDA only), ``"sdpa"`` (reference: one
   :func:`torch.nn.functional.scaled_dot_product_attention` call per group of equally long
   segments; runs anywhere) and ``"auto"`` (first available for the device and dtype).
2. :func:`pack_sequences` / :func:`unpack_sequences` and two padded references
   (:func:`block_diagonal_mask`, :func:`padded_attention`) used by tests and benchmarks.
3. diffusers attention processors that run a *packed batch* of requests through one forward
   of ``FluxTransformer2DModel`` or ``SD3Transformer2DModel``:
   :class:`PackedFluxAttnProcessor`, :class:`PackedJointAttnProcessor` and the context manager
   :func:`packed_attention` that installs them (and restores the originals on exit).
4. Per-token-modulation forwards, :func:`flux_packed_forward` and :func:`sd3_packed_forward`,
   which run the model's blocks themselves so that every request keeps its own timestep,
   pooled prompt embedding and guidance.

Packed layout used by the processors
------------------------------------
The transformer is called with batch size 1 (or B, every batch row having the same packing),
``hidden_states = cat(image tokens of request 0, 1, ...)`` of shape ``(1, sum L_i, C)`` and
``encoder_hidden_states = cat(text tokens of request 0, 1, ...)`` of shape ``(1, sum T_i, C)``.
Inside attention, diffusers concatenates the two streams:

* FLUX: ``[all text ; all image]`` (text first), also in the single-stream blocks;
* SD3:  ``[all image ; all text]`` (image first); SD3.5's second, image-only attention sees
  ``[all image]``.

The processors gather each request's tokens into one segment (``[text_i ; image_i]`` for FLUX,
``[image_i ; text_i]`` for SD3: the order diffusers itself uses for a single request), call
:func:`varlen_attention`, and scatter the result back. The gather/scatter indices are computed
once per context, layout, batch size and device.

FLUX RoPE: diffusers computes ``image_rotary_emb = pos_embed(cat(txt_ids, img_ids))`` and applies
it to the concatenated ``[text ; image]`` stream *before* attention. With
``txt_ids = cat(txt_ids_0, txt_ids_1, ...)`` and ``img_ids = cat(img_ids_0, img_ids_1, ...)``
(the same request order as the tokens), row ``r`` of the rotary table belongs to token ``r``
of the global stream; the processor applies RoPE in that global order and only then regroups
tokens per request, so positions always travel with their tokens.

LIMITATION of the plain ``transformer(...)`` route under :func:`packed_attention`: diffusers
applies AdaLN modulation (timestep, guidance and pooled text embedding: ``temb``) per *batch
element*. With all requests packed into one batch element they share one ``temb``: one timestep,
one guidance value and one pooled prompt embedding. That is right for e.g. several images of one
prompt at one step, wrong otherwise. :func:`flux_packed_forward` / :func:`sd3_packed_forward`
lift it: they compute ``temb`` per request and expand the modulation to per-token tensors.

This module imports nothing from ``ralu_runtime``; diffusers is imported lazily and only by the
functions that need it.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator, Sequence

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
    "PackedAttentionContext",
    "PackedFluxAttnProcessor",
    "PackedJointAttnProcessor",
    "packed_attention",
    "pack_flux_inputs",
    "flux_packed_forward",
    "sd3_packed_forward",
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
# Packed-batch context and processors
# --------------------------------------------------------------------------------------------
@dataclass
class _Segments:
    perm: torch.Tensor | None        # global row -> segment row gather index (None: identity)
    inv_perm: torch.Tensor | None    # segment row -> global row
    cu_seqlens: torch.Tensor         # int32 on the device (GPU kernels)
    cu_seqlens_host: torch.Tensor    # the same on the CPU: the sdpa path reads it without a device sync
    max_len: int
    total: int                       # rows of one batch element in the global layout


# layout name -> order of streams inside the global tensor (and inside every segment)
_LAYOUTS = {
    "text_first": ("text", "image"),   # FLUX joint and single-stream attention
    "image_first": ("image", "text"),  # SD3 joint attention
    "image_only": ("image",),          # SD3.5 second (self-)attention on image tokens
}


@dataclass
class PackedAttentionContext:
    """Token counts of a packed batch: ``image_lens[i]`` image and ``text_lens[i]`` text tokens of request i.

    ``backend`` is passed to :func:`varlen_attention`. Index tensors are built lazily and cached per
    (layout, batch size, device).
    """

    image_lens: tuple[int, ...]
    text_lens: tuple[int, ...]
    backend: str = "auto"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.image_lens = tuple(int(n) for n in self.image_lens)
        self.text_lens = tuple(int(n) for n in self.text_lens)
        if len(self.image_lens) == 0 or len(self.image_lens) != len(self.text_lens):
            raise ValueError(f"image_lens and text_lens need one entry per request; got {len(self.image_lens)} "
                             f"and {len(self.text_lens)}")
        if any(n < 0 for n in self.image_lens + self.text_lens):
            raise ValueError("token counts must be >= 0")

    @property
    def num_requests(self) -> int:
        return len(self.image_lens)

    @property
    def total_image(self) -> int:
        return sum(self.image_lens)

    @property
    def total_text(self) -> int:
        return sum(self.text_lens)

    def cu_seqlens_image(self, device=None) -> torch.Tensor:
        return cu_seqlens_from_lens(self.image_lens, device)

    def cu_seqlens_text(self, device=None) -> torch.Tensor:
        return cu_seqlens_from_lens(self.text_lens, device)

    def segments(self, layout: str, batch: int, device: torch.device) -> _Segments:
        key = (layout, batch, str(device))
        seg = self._cache.get(key)
        if seg is None:
            seg = self._build(layout, batch, device)
            self._cache[key] = seg
        return seg

    def _build(self, layout: str, batch: int, device: torch.device) -> _Segments:
        streams = _LAYOUTS[layout]
        lens = {"text": self.text_lens, "image": self.image_lens}
        stream_start, acc = {}, 0
        for s in streams:
            stream_start[s] = acc
            acc += sum(lens[s])
        total = acc
        offsets = {s: [stream_start[s], *[stream_start[s] + c for c in _cumsum(lens[s])]] for s in streams}
        pieces, seg_lens = [], []
        for i in range(self.num_requests):
            n = 0
            for s in streams:
                pieces.append(torch.arange(offsets[s][i], offsets[s][i + 1], dtype=torch.long))
                n += lens[s][i]
            seg_lens.append(n)
        perm = torch.cat(pieces)
        all_lens = seg_lens * batch
        cu_host = cu_seqlens_from_lens(all_lens)
        cu = cu_host.to(device)
        max_len = max(all_lens) if all_lens else 0
        if torch.equal(perm, torch.arange(total)):
            return _Segments(None, None, cu, cu_host, max_len, total)
        perm_b = torch.cat([perm + b * total for b in range(batch)])
        inv = torch.empty_like(perm_b)
        inv[perm_b] = torch.arange(perm_b.numel())
        return _Segments(perm_b.to(device), inv.to(device), cu, cu_host, max_len, total)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: str) -> torch.Tensor:
        """Per-request attention over global-layout ``(B, S, H, D)`` tensors; returns ``(B, S, H, D)``."""
        B, S, H, D = query.shape
        seg = self.segments(layout, B, query.device)
        if S != seg.total:
            streams = " + ".join(f"{s} ({self.total_text if s == 'text' else self.total_image})"
                                 for s in _LAYOUTS[layout])
            raise ValueError(f"packed attention ({layout}) got a sequence of {S} tokens but the packed context "
                             f"expects {streams} = {seg.total}; image_lens={self.image_lens}, text_lens={self.text_lens}")
        q, k, v = (t.reshape(B * S, H, t.shape[-1]) for t in (query, key, value))
        if seg.perm is not None:
            q, k, v = (t.index_select(0, seg.perm) for t in (q, k, v))
        backend = select_backend(self.backend, q.device, q.dtype)
        cu = seg.cu_seqlens_host if backend == "sdpa" else seg.cu_seqlens
        out = varlen_attention(q, k, v, cu, cu, seg.max_len, seg.max_len, backend=backend)
        if seg.inv_perm is not None:
            out = out.index_select(0, seg.inv_perm)
        return out.view(B, S, H, out.shape[-1])


class PackedFluxAttnProcessor:
    """Drop-in for diffusers' ``FluxAttnProcessor`` on a packed batch (same op order).

    Joint (double-stream) blocks get ``encoder_hidden_states``; single-stream blocks get the
    already concatenated ``[text ; image]`` stream. Both use the text-first layout.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, context: PackedAttentionContext):
        self.context = context

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise NotImplementedError("PackedFluxAttnProcessor: attention_mask is not supported "
                                      "(the packing itself defines which tokens attend to which)")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.context.attend(query, key, value, "text_first")
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class PackedJointAttnProcessor:
    """Drop-in for diffusers' ``JointAttnProcessor2_0`` (SD3 / SD3.5) on a packed batch.

    With ``encoder_hidden_states`` the layout is ``[image ; text]``; without (SD3.5's ``attn2``)
    it is image-only.
    """

    def __init__(self, context: PackedAttentionContext):
        self.context = context

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("PackedJointAttnProcessor: attention_mask is not supported")
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
            layout = "image_first"
        else:
            layout = "image_only"

        # (B, H, S, D) -> (B, S, H, D) for the packed attention, back to (B, S, H * D).
        hidden_states = self.context.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), layout)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1]:],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _packed_processor_for(module, context: PackedAttentionContext):
    """The packed processor replacing ``module.processor``, None if ``module`` is no attention, else raises."""
    proc = getattr(module, "processor", None)
    if proc is None or not callable(proc):
        return None
    cls = type(module).__name__
    pname = type(proc).__name__
    if cls == "FluxAttention":
        if pname not in ("FluxAttnProcessor", "FluxAttnProcessor2_0", "PackedFluxAttnProcessor"):
            raise NotImplementedError(f"packed_attention: FluxAttention with processor {pname} is not supported")
        return PackedFluxAttnProcessor(context)
    if pname in ("JointAttnProcessor2_0", "PackedJointAttnProcessor"):
        return PackedJointAttnProcessor(context)
    return None


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, image_lens: Sequence[int], text_lens: Sequence[int], *,
                     backend: str = "auto") -> Iterator[PackedAttentionContext]:
    """Install packed-batch processors on every FLUX / SD3 joint attention of ``model``.

    Inside the ``with`` block, call the transformer with the packed batch (see the module
    docstring for the layout); originals are restored on exit, also on errors. Yields the
    :class:`PackedAttentionContext`. Every request shares ``temb`` on this route (see LIMITATION).
    """
    context = PackedAttentionContext(tuple(image_lens), tuple(text_lens), backend)
    originals = []
    try:
        for _, module in model.named_modules():
            new = _packed_processor_for(module, context)
            if new is not None:
                originals.append((module, module.processor))
                module.processor = new
        if not originals:
            raise ValueError(f"packed_attention: {type(model).__name__} has no FLUX or SD3 joint attention modules")
        yield context
    finally:
        for module, proc in originals:
            module.processor = proc


# --------------------------------------------------------------------------------------------
# FLUX: packed inputs and per-token-modulation forward
# --------------------------------------------------------------------------------------------
def _tokens2d(t: torch.Tensor, name: str, i: int) -> torch.Tensor:
    if t.ndim == 3:
        if t.shape[0] != 1:
            raise ValueError(f"{name}[{i}] must have batch size 1 (one request); got {tuple(t.shape)}")
        return t[0]
    if t.ndim != 2:
        raise ValueError(f"{name}[{i}] must be (L, C) or (1, L, C); got {tuple(t.shape)}")
    return t


def pack_flux_inputs(hidden_states_list, encoder_hidden_states_list, img_ids_list, txt_ids_list) -> dict:
    """Concatenate per-request FLUX inputs for the shared-``temb`` route.

    Returns ``hidden_states (1, sum L_i, C)``, ``encoder_hidden_states (1, sum T_i, C_txt)``,
    ``img_ids``, ``txt_ids`` (concatenated in the same request order), ``image_lens``, ``text_lens``.
    """
    hs = [_tokens2d(h, "hidden_states_list", i) for i, h in enumerate(hidden_states_list)]
    es = [_tokens2d(e, "encoder_hidden_states_list", i) for i, e in enumerate(encoder_hidden_states_list)]
    n = len(hs)
    if not (len(es) == len(img_ids_list) == len(txt_ids_list) == n):
        raise ValueError("all per-request lists must have the same length")
    img_ids = [_tokens2d(x, "img_ids_list", i) for i, x in enumerate(img_ids_list)]
    txt_ids = [_tokens2d(x, "txt_ids_list", i) for i, x in enumerate(txt_ids_list)]
    for i in range(n):
        if img_ids[i].shape[0] != hs[i].shape[0]:
            raise ValueError(f"request {i}: {hs[i].shape[0]} image tokens but {img_ids[i].shape[0]} img_ids rows")
        if txt_ids[i].shape[0] != es[i].shape[0]:
            raise ValueError(f"request {i}: {es[i].shape[0]} text tokens but {txt_ids[i].shape[0]} txt_ids rows")
    return {
        "hidden_states": torch.cat(hs, 0)[None],
        "encoder_hidden_states": torch.cat(es, 0)[None],
        "img_ids": torch.cat(img_ids, 0),
        "txt_ids": torch.cat(txt_ids, 0),
        "image_lens": [h.shape[0] for h in hs],
        "text_lens": [e.shape[0] for e in es],
    }


def _per_request(values, n: int, name: str, device, dtype=None) -> torch.Tensor:
    """Stack one value per request into an ``(n,)`` or ``(n, ...)`` tensor."""
    if len(values) != n:
        raise ValueError(f"{name} needs one entry per request ({n}); got {len(values)}")
    rows = []
    for i, x in enumerate(values):
        t = torch.as_tensor(x, device=device)
        if dtype is not None:
            t = t.to(dtype)
        rows.append(t.reshape(1, -1) if t.numel() > 1 or t.ndim == 2 else t.reshape(1))
    return torch.cat(rows, 0)


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-request ``(n, C)`` -> per-token ``(1, N, C)``."""
    return x.index_select(0, idx).unsqueeze(0)


def _request_index(image_lens, text_lens, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Request number of every packed image token and of every packed text token: ``(sum image_lens,)``,
    ``(sum text_lens,)`` int64."""
    req = torch.arange(len(image_lens), device=device)
    return (torch.repeat_interleave(req, torch.tensor(image_lens, device=device)),
            torch.repeat_interleave(req, torch.tensor(text_lens, device=device)))


def _packed_norm_out(transformer, hs: torch.Tensor, temb: torch.Tensor, img_idx: torch.Tensor) -> torch.Tensor:
    """The final AdaLN of FLUX / SD3 with each request's own shift and scale: ``(1, N, D)`` -> ``(1, N, D)``."""
    norm_out = transformer.norm_out
    emb = norm_out.linear(norm_out.silu(temb).to(hs.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return norm_out.norm(hs) * _rows(1 + scale, img_idx) + _rows(shift, img_idx)


def _flux_double_block(block, hs, ehs, temb, rot, img_idx, txt_idx):
    """``FluxTransformerBlock.forward`` with per-token AdaLN modulation (same op order)."""
    emb = block.norm1.linear(block.norm1.silu(temb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        _rows(c, img_idx) for c in emb.chunk(6, dim=1))
    norm_hs = block.norm1.norm(hs) * (1 + scale_msa) + shift_msa

    cemb = block.norm1_context.linear(block.norm1_context.silu(temb))
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
        _rows(c, txt_idx) for c in cemb.chunk(6, dim=1))
    norm_ehs = block.norm1_context.norm(ehs) * (1 + c_scale_msa) + c_shift_msa

    attn_output, context_attn_output = block.attn(hidden_states=norm_hs, encoder_hidden_states=norm_ehs,
                                                  image_rotary_emb=rot)
    hs = hs + gate_msa * attn_output
    norm_hs = block.norm2(hs)
    norm_hs = norm_hs * (1 + scale_mlp) + shift_mlp
    hs = hs + gate_mlp * block.ff(norm_hs)

    ehs = ehs + c_gate_msa * context_attn_output
    norm_ehs = block.norm2_context(ehs)
    norm_ehs = norm_ehs * (1 + c_scale_mlp) + c_shift_mlp
    ehs = ehs + c_gate_mlp * block.ff_context(norm_ehs)
    if ehs.dtype == torch.float16:
        ehs = ehs.clip(-65504, 65504)
    return ehs, hs


def _flux_single_block(block, hs, ehs, temb, rot, tok_idx):
    """``FluxSingleTransformerBlock.forward`` with per-token AdaLN modulation (same op order)."""
    text_seq_len = ehs.shape[1]
    x = torch.cat([ehs, hs], dim=1)
    residual = x
    emb = block.norm.linear(block.norm.silu(temb))
    shift, scale, gate = (_rows(c, tok_idx) for c in emb.chunk(3, dim=1))
    norm_x = block.norm.norm(x) * (1 + scale) + shift
    mlp = block.act_mlp(block.proj_mlp(norm_x))
    attn_output = block.attn(hidden_states=norm_x, image_rotary_emb=rot)
    x = torch.cat([attn_output, mlp], dim=2)
    x = gate * block.proj_out(x)
    x = residual + x
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x[:, :text_seq_len], x[:, text_seq_len:]


def flux_packed_forward(transformer, hidden_states_list, encoder_hidden_states_list, pooled_list, timestep_list,
                        img_ids_list, txt_ids_list, guidance_list=None, *, backend: str = "auto") -> list[torch.Tensor]:
    """One forward of a diffusers ``FluxTransformer2DModel`` over a packed batch of requests.

    Each request ``i`` brings its own image tokens ``(L_i, C_in)`` (or ``(1, L_i, C_in)``), text
    embeddings ``(T_i, C_txt)``, pooled embedding ``(P,)``/``(1, P)``, timestep (sigma in [0, 1],
    scaled by 1000 here like diffusers' forward), ``img_ids (L_i, 3)``, ``txt_ids (T_i, 3)`` and,
    for guidance-distilled models, a guidance scale. ``temb`` is computed per request and the
    AdaLN shift/scale/gate vectors are expanded to the tokens of their request, so requests at
    different timesteps, prompts and token counts share one forward; attention is per request
    via :func:`varlen_attention`.

    Returns one ``(1, L_i, C_out)`` tensor per request (the model's ``sample``). Not supported:
    ControlNet residuals, IP-Adapter, LoRA scale kwargs, gradient checkpointing.
    """
    packed = pack_flux_inputs(hidden_states_list, encoder_hidden_states_list, img_ids_list, txt_ids_list)
    image_lens, text_lens = packed["image_lens"], packed["text_lens"]
    n = len(image_lens)
    hs = transformer.x_embedder(packed["hidden_states"])
    device, dtype = hs.device, hs.dtype

    timestep = _per_request(timestep_list, n, "timestep_list", device).to(dtype) * 1000
    pooled = _per_request(pooled_list, n, "pooled_list", device)
    if transformer.config.guidance_embeds:
        if guidance_list is None:
            raise ValueError("this FLUX transformer has guidance_embeds=True: pass guidance_list")
        guidance = _per_request(guidance_list, n, "guidance_list", device).to(dtype) * 1000
        temb = transformer.time_text_embed(timestep, guidance, pooled)
    else:
        temb = transformer.time_text_embed(timestep, pooled)
    ehs = transformer.context_embedder(packed["encoder_hidden_states"])

    ids = torch.cat((packed["txt_ids"], packed["img_ids"]), dim=0)
    rot = transformer.pos_embed(ids)

    img_idx, txt_idx = _request_index(image_lens, text_lens, device)
    single_idx = torch.cat([txt_idx, img_idx])

    with packed_attention(transformer, image_lens, text_lens, backend=backend):
        for block in transformer.transformer_blocks:
            ehs, hs = _flux_double_block(block, hs, ehs, temb, rot, img_idx, txt_idx)
        for block in transformer.single_transformer_blocks:
            ehs, hs = _flux_single_block(block, hs, ehs, temb, rot, single_idx)

    hs = _packed_norm_out(transformer, hs, temb, img_idx)
    out = transformer.proj_out(hs)
    return [o.unsqueeze(0) for o in out[0].split(image_lens, dim=0)]


# --------------------------------------------------------------------------------------------
# SD3: per-token-modulation forward
# --------------------------------------------------------------------------------------------
def _sd3_block(block, hs, ehs, temb, img_idx, txt_idx):
    """``JointTransformerBlock.forward`` (SD3 / SD3.5) with per-token AdaLN modulation."""
    if block.use_dual_attention:
        emb = block.norm1.linear(block.norm1.silu(temb))
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_msa2, scale_msa2, gate_msa2) = (_rows(c, img_idx) for c in emb.chunk(9, dim=1))
        normed = block.norm1.norm(hs)
        norm_hs = normed * (1 + scale_msa) + shift_msa
        norm_hs2 = normed * (1 + scale_msa2) + shift_msa2
    else:
        emb = block.norm1.linear(block.norm1.silu(temb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            _rows(c, img_idx) for c in emb.chunk(6, dim=1))
        norm_hs = block.norm1.norm(hs) * (1 + scale_msa) + shift_msa

    if block.context_pre_only:
        nc = block.norm1_context
        cemb = nc.linear(nc.silu(temb).to(ehs.dtype))
        c_scale, c_shift = torch.chunk(cemb, 2, dim=1)
        norm_ehs = nc.norm(ehs) * _rows(1 + c_scale, txt_idx) + _rows(c_shift, txt_idx)
    else:
        cemb = block.norm1_context.linear(block.norm1_context.silu(temb))
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
            _rows(c, txt_idx) for c in cemb.chunk(6, dim=1))
        norm_ehs = block.norm1_context.norm(ehs) * (1 + c_scale_msa) + c_shift_msa

    attn_output, context_attn_output = block.attn(hidden_states=norm_hs, encoder_hidden_states=norm_ehs)
    hs = hs + gate_msa * attn_output
    if block.use_dual_attention:
        hs = hs + gate_msa2 * block.attn2(hidden_states=norm_hs2)

    norm_hs = block.norm2(hs)
    norm_hs = norm_hs * (1 + scale_mlp) + shift_mlp
    if block._chunk_size is not None:
        from diffusers.models.attention import _chunked_feed_forward
        ff_output = _chunked_feed_forward(block.ff, norm_hs, block._chunk_dim, block._chunk_size)
    else:
        ff_output = block.ff(norm_hs)
    hs = hs + gate_mlp * ff_output

    if block.context_pre_only:
        return None, hs
    ehs = ehs + c_gate_msa * context_attn_output
    norm_ehs = block.norm2_context(ehs)
    norm_ehs = norm_ehs * (1 + c_scale_mlp) + c_shift_mlp
    ehs = ehs + c_gate_mlp * block.ff_context(norm_ehs)
    return ehs, hs


def sd3_packed_forward(transformer, hidden_states_list, encoder_hidden_states_list, pooled_list, timestep_list, *,
                       image_tokens: bool = False, backend: str = "auto") -> list[torch.Tensor]:
    """One forward of a diffusers ``SD3Transformer2DModel`` over a packed batch of requests.

    ``hidden_states_list[i]`` is either a latent ``(1, C, H_i, W_i)`` (patch-embedded with the
    model's own ``pos_embed``, position embedding included, and unpatchified on the way out, so
    the result equals ``transformer(latent_i, ...)``), or with ``image_tokens=True`` already
    embedded image tokens ``(L_i, inner_dim)`` / ``(1, L_i, inner_dim)`` (the route for RALU's
    mixed-resolution token sets, whose adapter adds its own positions); then the per-token
    ``proj_out`` outputs ``(1, L_i, p*p*C_out)`` are returned. Timesteps are passed unscaled,
    as the SD3 pipeline does. Per-request ``temb``, per-token modulation, attention per request.
    """
    n = len(hidden_states_list)
    if image_tokens:
        toks = [_tokens2d(h, "hidden_states_list", i) for i, h in enumerate(hidden_states_list)]
        shapes = None
    else:
        toks, shapes = [], []
        for i, lat in enumerate(hidden_states_list):
            if lat.ndim != 4 or lat.shape[0] != 1:
                raise ValueError(f"hidden_states_list[{i}] must be a latent (1, C, H, W); got {tuple(lat.shape)}")
            shapes.append(lat.shape[-2:])
            toks.append(transformer.pos_embed(lat).contiguous()[0])
    ehs_list = [_tokens2d(e, "encoder_hidden_states_list", i) for i, e in enumerate(encoder_hidden_states_list)]
    if len(ehs_list) != n:
        raise ValueError("encoder_hidden_states_list needs one entry per request")
    image_lens = [t.shape[0] for t in toks]
    text_lens = [e.shape[0] for e in ehs_list]
    hs = torch.cat(toks, 0)[None]
    device = hs.device
    timestep = _per_request(timestep_list, n, "timestep_list", device)
    pooled = _per_request(pooled_list, n, "pooled_list", device)
    temb = transformer.time_text_embed(timestep, pooled)
    ehs = transformer.context_embedder(torch.cat(ehs_list, 0)[None])

    img_idx, txt_idx = _request_index(image_lens, text_lens, device)
    with packed_attention(transformer, image_lens, text_lens, backend=backend):
        for block in transformer.transformer_blocks:
            ehs, hs = _sd3_block(block, hs, ehs, temb, img_idx, txt_idx)

    hs = _packed_norm_out(transformer, hs, temb, img_idx)
    hs = transformer.proj_out(hs)
    outs = [o.unsqueeze(0) for o in hs[0].split(image_lens, dim=0)]
    if image_tokens:
        return outs
    p = transformer.config.patch_size
    c_out = transformer.out_channels
    result = []
    for o, (h, w) in zip(outs, shapes):
        h, w = h // p, w // p
        o = o.reshape(1, h, w, p, p, c_out)
        o = torch.einsum("nhwpqc->nchpwq", o)
        result.append(o.reshape(1, c_out, h * p, w * p))
    return result

