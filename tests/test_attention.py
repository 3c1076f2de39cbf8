"""Tests for ralu_kernels.attention: varlen attention backends, packing helpers, stream segments.

The packed model calls built on them (FLUX, SD3 / SD3.5 ``packed_velocity``) are tested in
tests/test_packed_velocity.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ralu_kernels import attention as A
from ralu_kernels.attention import (
    StreamSegments,
    block_diagonal_mask,
    cu_seqlens_from_lens,
    pack_sequences,
    padded_attention,
    unpack_sequences,
    varlen_attention,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _random_packed(lens, heads, head_dim, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [[torch.randn(n, heads, head_dim, generator=g).to(device=device, dtype=dtype) for n in lens] for _ in range(3)]
    (q, cu, mx), (k, _, _), (v, _, _) = (pack_sequences(s) for s in seqs)
    return q, k, v, cu, mx


def _per_sequence_sdpa(q, k, v, cu):
    outs = []
    c = cu.tolist()
    for a, b in zip(c[:-1], c[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
    return torch.cat(outs, 0)


# ------------------------------------------------------------------------------------------
# varlen_attention, sdpa reference
# ------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([8, 16, 32]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_sdpa_backend_matches_per_sequence_and_masked(lens, heads, head_dim, dtype, seed):
    q, k, v, cu, mx = _random_packed(lens, heads, head_dim, dtype, seed=seed)
    out = varlen_attention(q, k, v, cu, cu, mx, mx, backend="sdpa")
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, _per_sequence_sdpa(q, k, v, cu), **TOL[dtype])
    # one packed sequence with a block-diagonal mask
    mask = block_diagonal_mask(cu)
    masked = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                            attn_mask=mask)[0].transpose(0, 1)
    torch.testing.assert_close(out, masked, **TOL[dtype])
    # padded to the longest with a key-padding mask
    torch.testing.assert_close(out, padded_attention(q, k, v, cu, cu, mx, mx), **TOL[dtype])
    # auto on the CPU is the sdpa reference
    assert torch.equal(varlen_attention(q, k, v, cu, cu, mx, mx), out)


def test_sdpa_backend_cross_lengths_scale_and_empty_segments():
    g = torch.Generator().manual_seed(1)
    lq, lk = [3, 0, 5, 4], [6, 2, 0, 4]
    q = torch.randn(sum(lq), 2, 8, generator=g)
    k = torch.randn(sum(lk), 2, 8, generator=g)
    v = torch.randn(sum(lk), 2, 8, generator=g)
    cq, ck = cu_seqlens_from_lens(lq), cu_seqlens_from_lens(lk)
    out = varlen_attention(q, k, v, cq, ck, 5, 6, scale=0.3, backend="sdpa")
    mask = block_diagonal_mask(cq, ck)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=0.3)[0].transpose(0, 1)
    rows_with_keys = torch.cat([torch.arange(0, 3), torch.arange(8, 12)])
    torch.testing.assert_close(out[rows_with_keys], ref[rows_with_keys])
    assert torch.all(out[3:8] == 0)  # queries without keys -> 0


def test_equal_length_segments_are_batched_identically():
    q, k, v, cu, mx = _random_packed([7, 7, 7, 3], 2, 16, torch.float32, seed=3)
    out = varlen_attention(q, k, v, cu, cu, mx, mx, backend="sdpa")
    torch.testing.assert_close(out, _per_sequence_sdpa(q, k, v, cu), atol=1e-6, rtol=1e-6)


def test_pack_unpack_roundtrip():
    seqs = [torch.randn(n, 3, 4) for n in (5, 1, 9)]
    packed, cu, mx = pack_sequences(seqs)
    assert packed.shape == (15, 3, 4) and cu.dtype == torch.int32 and cu.tolist() == [0, 5, 6, 15] and mx == 9
    for a, b in zip(seqs, unpack_sequences(packed, cu)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="all must be"):
        pack_sequences([torch.randn(2, 3, 4), torch.randn(2, 2, 4)])
    with pytest.raises(ValueError):
        unpack_sequences(packed, cu_seqlens_from_lens([5, 1, 8]))


def test_input_validation_messages():
    q, k, v, cu, mx = _random_packed([4, 6], 2, 8, torch.float32)
    with pytest.raises(TypeError, match="int32"):
        varlen_attention(q, k, v, cu.long(), cu, mx, mx)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\]"):
        varlen_attention(q, k, v, cu_seqlens_from_lens([4, 5]), cu, mx, mx)
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, k, v, torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.tensor([0, 6, 4, 10], dtype=torch.int32), mx, mx)
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, k, v, cu, cu, 5, mx)
    with pytest.raises(ValueError, match="3-D"):
        varlen_attention(q[None], k, v, cu, cu, mx, mx)
    with pytest.raises(ValueError, match="same shape"):
        varlen_attention(q, k, v[:, :1], cu, cu, mx, mx)
    with pytest.raises(TypeError, match="dtype"):
        varlen_attention(q, k.double(), v, cu, cu, mx, mx)
    with pytest.raises(ValueError, match="same number of sequences"):
        varlen_attention(q, k, v, cu, cu_seqlens_from_lens([4, 6, 0]), mx, mx)
    with pytest.raises(ValueError, match="unknown varlen attention backend"):
        varlen_attention(q, k, v, cu, cu, mx, mx, backend="xformers")


def test_forced_unavailable_backends_raise_naming_the_package(monkeypatch):
    q, k, v, cu, mx = _random_packed([4, 6], 2, 8, torch.bfloat16)
    monkeypatch.setattr(A, "_flash_attn_func", lambda: None)
    with pytest.raises(ImportError, match="flash-attn"):
        varlen_attention(q, k, v, cu, cu, mx, mx, backend="flash_attn")
    monkeypatch.setattr(A, "_torch_varlen_func", lambda: None)
    with pytest.raises(ImportError, match="torch.nn.attention.varlen"):
        varlen_attention(q, k, v, cu, cu, mx, mx, backend="torch_varlen")
    assert A.available_backends("cuda", torch.bfloat16) == ["sdpa"]


def test_gpu_backends_refuse_cpu_tensors_and_fp32(monkeypatch):
    monkeypatch.setattr(A, "_torch_varlen_func", lambda: (lambda *a, **kw: None))
    q, k, v, cu, mx = _random_packed([4, 6], 2, 8, torch.bfloat16)
    with pytest.raises(RuntimeError, match="CUDA only"):
        varlen_attention(q, k, v, cu, cu, mx, mx, backend="torch_varlen")
    with pytest.raises(TypeError, match="float16/bfloat16"):
        A.select_backend("torch_varlen", "cuda", torch.float32)
    assert A.select_backend("auto", "cuda", torch.float32) == "sdpa"
    assert A.select_backend("auto", "cuda", torch.bfloat16) in ("flash_attn", "torch_varlen")
    assert A.select_backend("auto", "cpu", torch.bfloat16) == "sdpa"


# ------------------------------------------------------------------------------------------
# StreamSegments
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream_lens", [
    [(2, 4, 1), (5, 3, 8)],             # two streams (e.g. text, image), one segment per request
    [(5, 3, 8), (2, 0, 1)],             # an empty part
    [(3, 1), (2, 2), (0, 4)],           # three streams
    [(5, 3, 8)],                        # one stream: identity
])
def test_stream_segments_attend_equals_per_segment_attention(stream_lens):
    H, D = 2, 8
    seg = StreamSegments(stream_lens)
    n_seg = len(stream_lens[0])
    assert seg.num_segments == n_seg and seg.num_streams == len(stream_lens)
    assert seg.segment_lens == tuple(sum(p) for p in zip(*stream_lens)) and seg.total == sum(seg.segment_lens)
    assert seg.cu_seqlens.dtype == torch.int32 and seg.cu_seqlens_host.device.type == "cpu"
    g = torch.Generator().manual_seed(len(stream_lens))
    streams = [[torch.randn(sum(lens), H, D, generator=g) for lens in stream_lens] for _ in range(3)]
    q, k, v = (seg.gather(*s) for s in streams)
    assert q.shape == (seg.total, H, D)
    # segment i = [part i of stream 0 ; part i of stream 1 ; ...]
    for i in range(n_seg):
        parts = [s[sum(lens[:i]):sum(lens[:i + 1])] for s, lens in zip(streams[0], stream_lens)]
        a, b = seg.cu_seqlens_host[i].item(), seg.cu_seqlens_host[i + 1].item()
        assert torch.equal(q[a:b], torch.cat(parts))
    for s, lens in enumerate(stream_lens):  # segment ids: the segment of every token of a stream
        assert seg.segment_ids(s).tolist() == [i for i, n in enumerate(lens) for _ in range(n)]
        assert torch.equal(q[seg.positions(s)], streams[0][s])
    out = seg.attend(q, k, v, backend="sdpa")
    torch.testing.assert_close(out, _per_sequence_sdpa(q, k, v, seg.cu_seqlens_host), atol=1e-6, rtol=1e-6)
    back = seg.split(q)
    assert len(back) == len(stream_lens) and all(torch.equal(x, y) for x, y in zip(back, streams[0]))


def test_stream_segments_validation():
    with pytest.raises(ValueError, match="one length per segment"):
        StreamSegments([(1, 2), (3,)])
    with pytest.raises(ValueError, match=">= 0"):
        StreamSegments([(1, -2), (3, 3)])
    with pytest.raises(ValueError, match="at least one"):
        StreamSegments([])
    seg = StreamSegments([(2, 3), (4, 1)])
    with pytest.raises(ValueError, match="stream 1 must have 5 tokens"):
        seg.gather(torch.randn(5, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="2 stream tensors"):
        seg.gather(torch.randn(5, 2))
    with pytest.raises(ValueError, match="trailing shape and dtype"):
        seg.gather(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="10 segment-major tokens"):
        seg.split(torch.randn(9, 2))


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn"])
def test_gpu_backend_matches_sdpa_reference(backend):
    if backend not in A.available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} not available on this machine")
    lens = [1, 17, 128, 333, 1024]
    for heads, head_dim in ((2, 64), (24, 128)):
        q, k, v, cu, mx = _random_packed(lens, heads, head_dim, torch.bfloat16, device="cuda", seed=heads)
        out = varlen_attention(q, k, v, cu, cu, mx, mx, backend=backend)
        ref = varlen_attention(q.float(), k.float(), v.float(), cu, cu, mx, mx, backend="sdpa")
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
        ref_bf16 = varlen_attention(q, k, v, cu, cu, mx, mx, backend="sdpa")
        torch.testing.assert_close(out, ref_bf16, atol=2e-2, rtol=2e-2)
