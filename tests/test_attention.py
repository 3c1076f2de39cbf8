"""Tests for ralu_kernels.attention: varlen attention backends, packing, packed diffusers forwards."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ralu_kernels import attention as A
from ralu_kernels.attention import (
    PackedAttentionContext,
    block_diagonal_mask,
    cu_seqlens_from_lens,
    flux_packed_forward,
    pack_flux_inputs,
    pack_sequences,
    packed_attention,
    padded_attention,
    sd3_packed_forward,
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
# PackedAttentionContext
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["text_first", "image_first", "image_only"])
def test_context_attend_equals_per_request_attention(layout):
    img, txt, B, H, D = (5, 3, 8), (2, 4, 1), 2, 2, 8
    ctx = PackedAttentionContext(img, txt)
    streams = A._LAYOUTS[layout]
    lens = {"text": txt, "image": img}
    S = sum(sum(lens[s]) for s in streams)
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    out = ctx.attend(q, k, v, layout)
    # reference: collect each request's rows from every stream
    starts, acc = {}, 0
    for s in streams:
        starts[s] = acc
        acc += sum(lens[s])
    for b in range(B):
        for i in range(len(img)):
            rows = torch.cat([torch.arange(starts[s] + sum(lens[s][:i]), starts[s] + sum(lens[s][:i + 1]))
                              for s in streams])
            qs, ks, vs = (t[b, rows].transpose(0, 1)[None] for t in (q, k, v))
            ref = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
            torch.testing.assert_close(out[b, rows], ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="expects"):
        ctx.attend(q[:, :-1], k[:, :-1], v[:, :-1], layout)


def test_context_validation():
    with pytest.raises(ValueError, match="one entry per request"):
        PackedAttentionContext((1, 2), (3,))
    with pytest.raises(ValueError, match=">= 0"):
        PackedAttentionContext((1, -2), (3, 3))


# ------------------------------------------------------------------------------------------
# Tiny FLUX
# ------------------------------------------------------------------------------------------
def _tiny_flux(guidance_embeds=False):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        guidance_embeds=guidance_embeds,
    ).eval()


def _grid_ids(h, w, offset=0.0, scale=1.0):
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h).repeat_interleave(w) * scale + offset
    ids[:, 2] = torch.arange(w).repeat(h) * scale + offset
    return ids


def _flux_requests():
    g = torch.Generator().manual_seed(5)
    # 16, 36 and 20 image tokens; different grids, a fractional (mixed-resolution-like) offset, and text lengths
    grids = [(4, 4, 0.0, 1.0), (6, 6, 0.5, 0.5), (4, 5, 0.0, 2.0)]
    text = [7, 5, 9]
    hs = [torch.randn(1, h * w, 16, generator=g) for h, w, _, _ in grids]
    img_ids = [_grid_ids(h, w, o, s) for h, w, o, s in grids]
    es = [torch.randn(1, t, 32, generator=g) for t in text]
    txt_ids = [torch.zeros(t, 3) for t in text]
    pooled = [torch.randn(1, 32, generator=g) for _ in text]
    timesteps = [torch.tensor([0.3]), torch.tensor([0.8]), torch.tensor([0.05])]
    return hs, es, pooled, timesteps, img_ids, txt_ids


def _flux_separate(model, hs, es, pooled, ts, img_ids, txt_ids, guidance=None):
    out = []
    for i in range(len(hs)):
        kw = {} if guidance is None else {"guidance": guidance[i]}
        out.append(model(hidden_states=hs[i], encoder_hidden_states=es[i], pooled_projections=pooled[i],
                         timestep=ts[i], img_ids=img_ids[i], txt_ids=txt_ids[i], **kw).sample)
    return out


@torch.no_grad()
def test_flux_shared_timestep_route_equals_separate_forwards():
    model = _tiny_flux()
    hs, es, pooled, ts, img_ids, txt_ids = _flux_requests()
    pooled, ts = [pooled[0]] * 3, [ts[0]] * 3  # this route shares temb
    ref = _flux_separate(model, hs, es, pooled, ts, img_ids, txt_ids)
    originals = [m.processor for m in model.modules() if type(m).__name__ == "FluxAttention"]
    p = pack_flux_inputs(hs, es, img_ids, txt_ids)
    assert p["image_lens"] == [16, 36, 20] and p["text_lens"] == [7, 5, 9]
    with packed_attention(model, p["image_lens"], p["text_lens"], backend="sdpa") as ctx:
        assert ctx.num_requests == 3
        out = model(hidden_states=p["hidden_states"], encoder_hidden_states=p["encoder_hidden_states"],
                    pooled_projections=pooled[0], timestep=ts[0], img_ids=p["img_ids"], txt_ids=p["txt_ids"]).sample
    assert [m.processor for m in model.modules() if type(m).__name__ == "FluxAttention"] == originals
    for r, o in zip(ref, out[0].split(p["image_lens"])):
        torch.testing.assert_close(o[None], r, atol=1e-5, rtol=1e-5)
    # without packing the requests would see each other: the check above is not vacuous
    mixed = model(hidden_states=p["hidden_states"], encoder_hidden_states=p["encoder_hidden_states"],
                  pooled_projections=pooled[0], timestep=ts[0], img_ids=p["img_ids"], txt_ids=p["txt_ids"]).sample
    assert (mixed[0, :16] - ref[0][0]).abs().max() > 1e-3


@torch.no_grad()
def test_flux_packed_attention_restores_processors_on_error_and_checks_lengths():
    model = _tiny_flux()
    hs, es, pooled, ts, img_ids, txt_ids = _flux_requests()
    p = pack_flux_inputs(hs, es, img_ids, txt_ids)
    originals = [m.processor for m in model.modules() if type(m).__name__ == "FluxAttention"]
    with pytest.raises(ValueError, match="expects"):
        with packed_attention(model, [16, 36, 21], p["text_lens"]):
            model(hidden_states=p["hidden_states"], encoder_hidden_states=p["encoder_hidden_states"],
                  pooled_projections=pooled[0], timestep=ts[0], img_ids=p["img_ids"], txt_ids=p["txt_ids"])
    assert [m.processor for m in model.modules() if type(m).__name__ == "FluxAttention"] == originals
    with pytest.raises(ValueError, match="no FLUX or SD3"):
        with packed_attention(torch.nn.Linear(2, 2), [1], [1]):
            pass


@torch.no_grad()
def test_flux_per_token_route_equals_separate_forwards_at_different_timesteps():
    model = _tiny_flux()
    hs, es, pooled, ts, img_ids, txt_ids = _flux_requests()
    ref = _flux_separate(model, hs, es, pooled, ts, img_ids, txt_ids)
    out = flux_packed_forward(model, hs, es, pooled, ts, img_ids, txt_ids, backend="sdpa")
    assert [o.shape for o in out] == [r.shape for r in ref]
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    # one request: bitwise the diffusers forward (same ops on the same shapes; measured equal on CPU)
    single = flux_packed_forward(model, hs[:1], es[:1], pooled[:1], ts[:1], img_ids[:1], txt_ids[:1])
    assert torch.equal(single[0], ref[0]), f"max abs diff {(single[0] - ref[0]).abs().max().item():.3g}"


@torch.no_grad()
def test_flux_per_token_route_with_guidance_and_2d_inputs():
    model = _tiny_flux(guidance_embeds=True)
    hs, es, pooled, ts, img_ids, txt_ids = _flux_requests()
    guidance = [torch.tensor([3.5]), torch.tensor([1.0]), torch.tensor([7.0])]
    ref = _flux_separate(model, hs, es, pooled, ts, img_ids, txt_ids, guidance)
    out = flux_packed_forward(model, [h[0] for h in hs], [e[0] for e in es], [p[0] for p in pooled],
                              [float(t) for t in ts], img_ids, txt_ids, [float(g) for g in guidance])
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="guidance_list"):
        flux_packed_forward(model, hs, es, pooled, ts, img_ids, txt_ids)
    with pytest.raises(ValueError, match="img_ids rows"):
        flux_packed_forward(model, hs, es, pooled, ts, img_ids[::-1], txt_ids, guidance)


# ------------------------------------------------------------------------------------------
# Tiny SD3 / SD3.5
# ------------------------------------------------------------------------------------------
def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    # block 0 uses SD3.5's dual attention, the last block is context_pre_only
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def _sd3_requests():
    g = torch.Generator().manual_seed(7)
    latents = [torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 12, 8, generator=g),
               torch.randn(1, 4, 6, 10, generator=g)]  # 16, 24, 15 image tokens
    text = [7, 5, 9]
    es = [torch.randn(1, t, 32, generator=g) for t in text]
    pooled = [torch.randn(1, 32, generator=g) for _ in text]
    ts = [torch.tensor([300.0]), torch.tensor([900.0]), torch.tensor([20.0])]
    return latents, es, pooled, ts


@torch.no_grad()
def test_sd3_per_token_route_equals_separate_forwards():
    model = _tiny_sd3()
    latents, es, pooled, ts = _sd3_requests()
    ref = [model(hidden_states=latents[i], encoder_hidden_states=es[i], pooled_projections=pooled[i],
                 timestep=ts[i]).sample for i in range(3)]
    out = sd3_packed_forward(model, latents, es, pooled, ts, backend="sdpa")
    for r, o in zip(ref, out):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    # token route: embedded tokens in, per-token projections out
    toks = [model.pos_embed(lat).contiguous() for lat in latents]
    tok_out = sd3_packed_forward(model, toks, es, pooled, ts, image_tokens=True)
    assert [t.shape[1] for t in tok_out] == [16, 24, 15]
    # one request: bitwise the diffusers forward (same ops on the same shapes; measured equal on CPU)
    single = sd3_packed_forward(model, latents[:1], es[:1], pooled[:1], ts[:1])
    assert torch.equal(single[0], ref[0]), f"max abs diff {(single[0] - ref[0]).abs().max().item():.3g}"


@torch.no_grad()
def test_sd3_processor_level_packed_joint_attention():
    """Shared-temb route at the processor level: JointAttention (+ SD3.5 attn2) on packed vs separate inputs."""
    model = _tiny_sd3()
    block = model.transformer_blocks[0]
    g = torch.Generator().manual_seed(9)
    img, txt = [16, 24, 15], [7, 5, 9]
    hs = [torch.randn(1, n, 16, generator=g) for n in img]
    es = [torch.randn(1, n, 16, generator=g) for n in txt]
    ref = [block.attn(hidden_states=hs[i], encoder_hidden_states=es[i]) for i in range(3)]
    ref2 = [block.attn2(hidden_states=hs[i]) for i in range(3)]
    with packed_attention(model, img, txt):
        a, c = block.attn(hidden_states=torch.cat(hs, 1), encoder_hidden_states=torch.cat(es, 1))
        a2 = block.attn2(hidden_states=torch.cat(hs, 1))
        # CFG-style batch of 2 with the same packing
        ab, cb = block.attn(hidden_states=torch.cat(hs, 1).repeat(2, 1, 1),
                            encoder_hidden_states=torch.cat(es, 1).repeat(2, 1, 1))
    for i, (r, rc) in enumerate(ref):
        torch.testing.assert_close(a.split(img, 1)[i], r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.split(txt, 1)[i], rc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a2.split(img, 1)[i], ref2[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ab[1].split(img, 0)[i], r[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cb[1].split(txt, 0)[i], rc[0], atol=1e-5, rtol=1e-5)
    assert type(block.attn.processor).__name__ == "JointAttnProcessor2_0"


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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "sdpa", "torch_varlen", "flash_attn"])
@torch.no_grad()
def test_gpu_flux_per_token_route_bf16(backend):
    if backend != "auto" and backend not in A.available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} not available on this machine")
    model = _tiny_flux().to("cuda", torch.bfloat16)
    hs, es, pooled, ts, img_ids, txt_ids = _flux_requests()
    cuda = lambda xs: [x.to("cuda", torch.bfloat16) for x in xs]  # noqa: E731
    hs, es, pooled = cuda(hs), cuda(es), cuda(pooled)
    ts, img_ids, txt_ids = [t.cuda() for t in ts], [i.cuda() for i in img_ids], [i.cuda() for i in txt_ids]
    ref = _flux_separate(model, hs, es, pooled, ts, img_ids, txt_ids)
    out = flux_packed_forward(model, hs, es, pooled, ts, img_ids, txt_ids, backend=backend)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o.float(), r.float(), atol=5e-2, rtol=5e-2)
