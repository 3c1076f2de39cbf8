"""Tests for ralu_kernels.philox and ralu_kernels.transition (fused RALU stage transition).

On the CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py). Tests marked
``gpu`` run the compiled kernels (``RALU_TEST_GPU=1`` on a machine with CUDA).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ralu_kernels import philox
from helpers import assert_kernel_matches_reference
from ralu_kernels import transition as T
from ralu_kernels.transition import (
    correlated_noise_alpha,
    dense_mvn_noise,
    example_transition_maps,
    stage_transition,
    stage_transition_reference,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not (T.HAS_TRITON and INTERPRETED),
                                       reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")

if T.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _philox_probe_kernel(off_ptr, seed, n_ptr, w_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        off = tl.load(off_ptr + i)
        n0, n1, n2, n3 = tl.randn4x(seed, off)
        tl.store(n_ptr + i, n0)
        tl.store(n_ptr + N + i, n1)
        tl.store(n_ptr + 2 * N + i, n2)
        tl.store(n_ptr + 3 * N + i, n3)
        w0, w1, w2, w3 = tl.randint4x(seed, off)
        tl.store(w_ptr + i, w0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(w_ptr + N + i, w1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(w_ptr + 2 * N + i, w2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(w_ptr + 3 * N + i, w3.to(tl.int64) & 0xFFFFFFFF)


    @triton.jit
    def _philox_wide_probe_kernel(off_ptr, seed_ptr, w_ptr, N: tl.constexpr):
        """ralu's Philox (64-bit products) next to Triton's, on an int32 counter and a seed loaded as int64 (as the
        transition kernel has them)."""
        i = tl.arange(0, N)
        off = tl.load(off_ptr + i)
        seed = tl.load(seed_ptr)
        a0, a1, a2, a3 = T._philox4x32_10(seed, off)
        b0, b1, b2, b3 = tl.randint4x(seed, off)
        for k, (x, y) in enumerate(((a0, b0), (a1, b1), (a2, b2), (a3, b3))):
            tl.store(w_ptr + k * N + i, x.to(tl.int64) & 0xFFFFFFFF)
            tl.store(w_ptr + (4 + k) * N + i, y.to(tl.int64) & 0xFFFFFFFF)


def _triton_philox(seed, off: torch.Tensor):
    n = off.numel()
    normals = torch.empty(4 * n, dtype=torch.float32, device=off.device)
    words = torch.empty(4 * n, dtype=torch.int64, device=off.device)
    _philox_probe_kernel[(1,)](off, seed, normals, words, N=n)
    return normals.view(4, n), words.view(4, n)


# ---------------------------------------------------------------------------------------------
# Philox
# ---------------------------------------------------------------------------------------------
def _py_mulhilo(a: int, b: int):
    p = a * b
    return p & 0xFFFFFFFF, p >> 32


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([philox.PHILOX_ROUND_A, philox.PHILOX_ROUND_B]))
def test_mul_lo_hi_matches_python_ints(x, const):
    lo, hi = philox._mul_lo_hi(const, torch.tensor([x], dtype=torch.int64))
    assert (int(lo), int(hi)) == _py_mulhilo(const, x)


def test_philox_known_answer_from_python_ints():
    """The torch Philox against a plain-Python transcription of random.py (independent of Triton)."""
    def py_philox(seed, offset):
        k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
        c0, c1, c2, c3 = offset & 0xFFFFFFFF, (offset >> 32) & 0xFFFFFFFF, 0, 0
        for _ in range(10):
            c0, c1, c2, c3 = ((0xCD9E8D57 * c2) >> 32) ^ c1 ^ k0, (0xCD9E8D57 * c2) & 0xFFFFFFFF, \
                ((0xD2511F53 * c0) >> 32) ^ c3 ^ k1, (0xD2511F53 * c0) & 0xFFFFFFFF
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        return c0, c1, c2, c3

    for seed in (0, 7, 2**32 + 3, 2**64 - 1):
        offs = [0, 1, 12345, 2**31 - 1, 2**33 + 17]
        words = philox.randint4x(seed, torch.tensor(offs, dtype=torch.int64))
        for j, o in enumerate(offs):
            assert tuple(int(w[j]) for w in words) == py_philox(seed, o)


@pytest.mark.skipif(not (T.HAS_TRITON and INTERPRETED), reason="needs the Triton interpreter")
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**40 + 2**33 + 5, 2**63 - 1, -5])
@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_philox_randn4x_bitwise_equals_triton(seed, offset_dtype):
    g = torch.Generator().manual_seed(abs(seed) % 1000)
    n = 1024
    off = torch.randint(0, 2**31 - 1, (n,), generator=g, dtype=torch.int64)
    off[:4] = torch.tensor([0, 1, 2, 2**31 - 1])
    bits = 32
    if offset_dtype == torch.int64:
        off[4:64] += torch.randint(1, 2**20, (60,), generator=g) << 32  # high counter word
        bits = 64
    normals, words = _triton_philox(seed, off.to(offset_dtype))
    ours_w = philox.randint4x(seed, off, offset_bits=bits)
    for k in range(4):
        assert torch.equal(words[k], ours_w[k]), f"word {k} differs"
    ours_n = philox.randn4x(seed, off, offset_bits=bits)
    for k in range(4):
        assert torch.equal(normals[k], ours_n[k]), f"normal {k}: max diff {(normals[k] - ours_n[k]).abs().max()}"
    # tl.randn == first output of randn4x
    assert torch.equal(philox.randn_first(seed, off, offset_bits=bits), ours_n[0])
    # the other math back-ends agree to float32 precision
    for m in ("torch", "float64"):
        alt = philox.randn4x(seed, off, offset_bits=bits, math=m)
        for k in range(4):
            torch.testing.assert_close(alt[k], ours_n[k], atol=2e-6, rtol=2e-6)


@pytest.mark.skipif(not (T.HAS_TRITON and INTERPRETED), reason="needs the Triton interpreter")
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 + 7, 2**40 + 2**33 + 5, 2**63 - 1, -5, -(2**63)])
def test_kernel_philox_with_64bit_products_equals_triton_randint4x(seed):
    """The kernel's Philox4x32-10 (each round's products as one 64-bit product) gives tl.randint4x's words."""
    g = torch.Generator().manual_seed(abs(seed) % 997)
    n = 512
    off = torch.randint(0, 2**31 - 1, (n,), generator=g, dtype=torch.int64)
    off[:3] = torch.tensor([0, 1, 2**31 - 1])
    words = torch.empty(8 * n, dtype=torch.int64)
    _philox_wide_probe_kernel[(1,)](off.to(torch.int32), torch.tensor([seed], dtype=torch.int64), words, N=n)
    words = words.view(8, n)
    for k in range(4):
        assert torch.equal(words[k], words[4 + k]), f"word {k} differs"
    assert words[:4].unique().numel() > 4 * n * 0.99  # really random words, not a constant both agree on


def test_philox_tensor_seed_broadcasts():
    off = torch.arange(8, dtype=torch.int64)
    seeds = torch.tensor([[3], [2**35 + 1]])
    both = philox.randn4x(seeds, off[None, :].expand(2, 8))
    assert torch.equal(both[0][0], philox.randn4x(3, off)[0])
    assert torch.equal(both[1][1], philox.randn4x(2**35 + 1, off)[1])


# ---------------------------------------------------------------------------------------------
# Triton kernel (interpreter) vs torch reference
# ---------------------------------------------------------------------------------------------
def _case(kind, batch, h, w, ratio, channels, dtype, seed, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    maps = example_transition_maps(kind, h, w, ratio, batch, generator=g, shuffle=shuffle)
    src_len = maps["pos"].shape[1]
    x = (torch.randn(batch, src_len, channels, generator=g) * 2).to(dtype)
    seeds = torch.randint(0, 2**62, (batch,), generator=g, dtype=torch.int64)
    return x, maps, seeds


def _run(impl, x, maps, seeds, *, with_order=True, **kw):
    if impl != "torch" and with_order:
        kw.update(order=maps["order"], num_up=maps["num_up"])
    return stage_transition(x, maps["pos"], maps["src_index"], maps["group"], maps["child"], seeds,
                            pos_scale=maps["pos_scale"], impl=impl, **kw)


@needs_interpreter
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    kind=st.sampled_from(["1to2", "2to3"]),
    batch=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    ratio=st.floats(0.0, 1.0),
    channels=st.sampled_from([4, 16, 64, 24]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    exact=st.booleans(),
    shuffle=st.booleans(),
    c=st.sampled_from([0.0, 1 / 6.317**2, 0.1, 0.25]),
    seed=st.integers(0, 2**16),
)
def test_triton_kernel_matches_reference(kind, batch, h, w, ratio, channels, dtype, exact, shuffle, c, seed):
    x, maps, seeds = _case(kind, batch, h, w, ratio, channels, dtype, seed, shuffle)
    kw = dict(a=1.0 / (6.317 * 0.7 + 0.3), b=0.61, c=c, exact_noise=exact)
    out_t, pos_t = _run("triton", x, maps, seeds, **kw)
    out_r, pos_r = _run("torch", x, maps, seeds, **kw)
    assert out_t.dtype == dtype
    assert_kernel_matches_reference(out_t, out_r)  # bitwise (the reference evaluates the kernel's float32 expression)
    assert torch.equal(pos_t, pos_r)


@needs_interpreter
@pytest.mark.parametrize("kind", ["1to2", "2to3"])
def test_triton_large_tiles_and_computed_order(kind, monkeypatch):
    """Both tile sizes of the group-major kernel, and the order computed by the wrapper when not given."""
    x, maps, seeds = _case(kind, 2, 6, 9, 0.3, 64, torch.bfloat16, 21, shuffle=True)
    kw = dict(a=0.8, b=0.6, c=0.05, exact_noise=True)
    out_r, pos_r = _run("torch", x, maps, seeds, **kw)
    out_s, pos_s = _run("triton", x, maps, seeds, with_order=False, **kw)  # small tiles, order computed
    monkeypatch.setattr(T, "_MIN_PROGRAMS_FOR_LARGE", 0)
    assert T._tiles(maps["num_up"], 10, 1, 64, 16)[:2] == T._LARGE_TILES
    out_l, pos_l = _run("triton", x, maps, seeds, **kw)
    for o, p in ((out_s, pos_s), (out_l, pos_l)):
        assert_kernel_matches_reference(o, out_r)
        assert torch.equal(p, pos_r)


@needs_interpreter
def test_triton_kernel_preallocated_outputs_and_dtype_change():
    x, maps, seeds = _case("1to2", 2, 4, 4, 0.5, 16, torch.float32, 3)
    ld = maps["src_index"].shape[1]
    out = torch.full((2, ld, 16), float("nan"), dtype=torch.bfloat16)
    pos_out = torch.full((2, ld, 2), float("nan"))
    kw = dict(a=0.9, b=0.3, c=0.05)
    r1 = _run("triton", x, maps, seeds, out=out, pos_out=pos_out, **kw)
    assert r1[0] is out and r1[1] is pos_out
    ref, ref_pos = _run("torch", x, maps, seeds, out=torch.empty_like(out), **kw)
    assert_kernel_matches_reference(out, ref)
    assert torch.equal(pos_out, ref_pos)


def test_positions_and_copies_1to2():
    """Children sit at parent + 0.5*(dy, dx); with b = 0 the outputs are a * parent copies."""
    x, maps, seeds = _case("1to2", 1, 4, 5, 0.4, 8, torch.float32, 1)
    out, pos = _run("torch", x, maps, seeds, a=2.0, b=0.0, c=0.1)
    p = maps["src_index"][0].long()
    q = maps["child"][0].long()
    assert torch.equal(out[0], 2.0 * x[0, p])
    exp = maps["pos"][0, p].clone()
    exp[q >= 0, 0] += 0.5 * (q[q >= 0] // 2)
    exp[q >= 0, 1] += 0.5 * (q[q >= 0] % 2)
    assert torch.equal(pos[0], exp)


def test_positions_2to3_are_the_fine_raster():
    x, maps, seeds = _case("2to3", 2, 3, 5, 0.3, 4, torch.float32, 2)
    _, pos = _run("torch", x, maps, seeds, a=1.0, b=1.0, c=0.1)
    fy = torch.arange(6 * 10) // 10
    fx = torch.arange(6 * 10) % 10
    exp = torch.stack((fy, fx), -1).float()
    assert torch.equal(pos[0], exp) and torch.equal(pos[1], exp)


def test_noise_follows_tokens_under_permutation():
    x, maps, seeds = _case("1to2", 2, 4, 4, 0.5, 16, torch.float32, 5)
    kw = dict(a=0.8, b=0.5, c=0.1)
    out, pos = _run("torch", x, maps, seeds, **kw)
    perm = torch.randperm(maps["src_index"].shape[1], generator=torch.Generator().manual_seed(0))
    pm = dict(maps)
    for k in ("src_index", "group", "child"):
        pm[k] = maps[k][:, perm]
    out_p, pos_p = _run("torch", x, pm, seeds, **kw)
    assert torch.equal(out_p, out[:, perm]) and torch.equal(pos_p, pos[:, perm])


# ---------------------------------------------------------------------------------------------
# statistics of the noise (torch reference, large samples)
# ---------------------------------------------------------------------------------------------
def _pure_noise(c, exact, ratio, h=64, w=64, channels=16, batch=1, seed0=1234):
    """Noise only (a = 0, b = 1) of a 1->2 transition; returns (noise (B, Ld, C), maps)."""
    g = torch.Generator().manual_seed(seed0)
    maps = example_transition_maps("1to2", h, w, ratio, batch, generator=g)
    x = torch.zeros(batch, h * w, channels)
    seeds = torch.arange(batch, dtype=torch.int64) * 7919 + seed0
    out, _ = _run("torch", x, maps, seeds, a=0.0, b=1.0, c=c, exact_noise=exact)
    return out, maps


def test_children_covariance_is_I_minus_cJ():
    c = 0.2
    out, maps = _pure_noise(c, False, 1.0)  # all 4096 parents upsampled: children in groups of 4
    q = maps["child"][0]
    assert torch.equal(q[:8].long(), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    z = out[0].double().view(-1, 4, out.shape[-1]).permute(0, 2, 1).reshape(-1, 4)  # (groups*C, 4)
    n = z.shape[0]
    cov = z.T @ z / n  # mean is 0
    target = torch.eye(4, dtype=torch.float64) - c * torch.ones(4, 4, dtype=torch.float64)
    # standard error of a second moment of a Gaussian: sqrt((s_ii s_jj + s_ij^2) / n)
    se = torch.sqrt((torch.diag(target)[:, None] * torch.diag(target)[None, :] + target**2) / n)
    assert ((cov - target).abs() <= 5 * se).all(), f"cov {cov}\nse {se}"
    mean = z.mean(0)
    assert (mean.abs() <= 5 * torch.sqrt(torch.diag(target) / n)).all()
    # sum over the 4 children has variance 4 - 16c
    s = z.sum(1)
    assert abs(s.var().item() - (4 - 16 * c)) <= 5 * (4 - 16 * c) * math.sqrt(2 / n)


@pytest.mark.parametrize("exact", [False, True])
def test_kept_tokens_variance(exact):
    c = 0.2
    out, maps = _pure_noise(c, exact, 0.0)  # nothing upsampled: every token kept
    z = out[0].double().flatten()
    n = z.numel()
    v = (1 - c) if exact else 1.0
    assert abs(z.var().item() - v) <= 5 * v * math.sqrt(2 / n)
    assert abs(z.mean().item()) <= 5 * math.sqrt(v / n)


def test_independence_across_channels_groups_and_images():
    c = 0.2
    out, maps = _pure_noise(c, False, 1.0, h=32, w=32, channels=32, batch=2)
    z = out.double()  # (2, 4096, 32): children of parent k are tokens 4k..4k+3
    se = 1 / math.sqrt(z[0].numel())
    # across channels (same token)
    r_ch = (z[0, :, :-1] * z[0, :, 1:]).mean() / (1 - c)
    assert abs(r_ch.item()) < 5 * se * 1.5
    # across groups: child q of parent k vs child q of parent k + 1
    zz = z[0].view(-1, 4, 32)
    r_g = (zz[:-1] * zz[1:]).mean() / (1 - c)
    assert abs(r_g.item()) < 5 * se * 1.5
    # across images (different seeds; the maps differ too, compare token by token)
    r_img = (z[0] * z[1]).mean() / (1 - c)
    assert abs(r_img.item()) < 5 * se * 1.5


@pytest.mark.parametrize("exact", [False, True])
def test_kept_tokens_channel_quads_are_independent(exact):
    """Kept tokens take 4 channels from one Philox call: those 4 (and neighbouring quads) are uncorrelated."""
    c = 0.2
    out, _ = _pure_noise(c, exact, 0.0, channels=16)
    v = (1 - c) if exact else 1.0
    z = out[0].double().view(-1, 4, 4)  # (tokens, quad, channel in quad)
    q = z.reshape(-1, 4)
    n = q.shape[0]
    cov = q.T @ q / n
    target = v * torch.eye(4, dtype=torch.float64)
    se = torch.sqrt((torch.diag(target)[:, None] * torch.diag(target)[None, :] + target**2) / n)
    assert ((cov - target).abs() <= 5 * se).all(), f"cov {cov}"
    # channel 3 of quad j vs channel 0 of quad j + 1, and the same channel of neighbouring tokens
    r_q = (z[:, :-1, 3] * z[:, 1:, 0]).mean() / v
    r_t = (z[:-1] * z[1:]).mean() / v
    assert abs(r_q.item()) < 5 / math.sqrt(z[:, :-1, 3].numel())
    assert abs(r_t.item()) < 5 / math.sqrt(z[:-1].numel())


def test_determinism_and_seed_dependence():
    x, maps, seeds = _case("2to3", 2, 4, 4, 0.3, 16, torch.bfloat16, 9)
    kw = dict(a=1.1, b=0.4, c=0.05)
    o1, p1 = _run("torch", x, maps, seeds, **kw)
    o2, p2 = _run("torch", x, maps, seeds, **kw)
    assert torch.equal(o1, o2) and torch.equal(p1, p2)
    o3, _ = _run("torch", x, maps, seeds + 1, **kw)
    assert (o3 != o1).float().mean() > 0.5
    # seeds of one image do not affect another
    s2 = seeds.clone()
    s2[1] += 1
    o4, _ = _run("torch", x, maps, s2, **kw)
    assert torch.equal(o4[0], o1[0]) and not torch.equal(o4[1], o1[1])


def test_same_noise_as_explicit_philox_formula():
    """Spot check of the contract in plain terms, independent of the reference's code path."""
    x, maps, seeds = _case("1to2", 1, 3, 3, 0.5, 8, torch.float32, 4)
    c, a, b = 0.1, 0.7, 0.9
    out, _ = _run("torch", x, maps, seeds, a=a, b=b, c=c)
    alpha = correlated_noise_alpha(c)
    for i in range(maps["src_index"].shape[1]):
        p, g, q = (int(maps[k][0, i]) for k in ("src_index", "group", "child"))
        if q >= 0:  # child q: counter g*C + ch, u_q + alpha * sum
            u = philox.randn4x(int(seeds[0]), torch.arange(8) + g * 8, math="float64")
            n = u[q] + alpha * (u[0] + u[1] + u[2] + u[3])
        else:  # kept: counter g*C + 4*(ch // 4), normal number ch % 4 of that call
            u = philox.randn4x(int(seeds[0]), g * 8 + 4 * (torch.arange(8) // 4), math="float64")
            n = torch.stack(u)[torch.arange(8) % 4, torch.arange(8)]
        torch.testing.assert_close(out[0, i], a * x[0, p] + b * n, atol=5e-6, rtol=5e-6)


def test_alpha_and_dense_mvn_covariance():
    for c in (0.0, 0.05, 0.25):
        al = correlated_noise_alpha(c)
        m = torch.eye(4, dtype=torch.float64) + al * torch.ones(4, 4, dtype=torch.float64)
        torch.testing.assert_close(m @ m.T, torch.eye(4, dtype=torch.float64) - c * torch.ones(4, 4,
                                                                                            dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    maps = example_transition_maps("1to2", 4, 4, 0.5, 1, generator=g)
    grp, ch = maps["group"][0], maps["child"][0]
    n = dense_mvn_noise(grp, ch, 0.2, 20000, generator=g, method="cholesky").double()
    cov = n @ n.T / n.shape[1]
    assert abs(cov[0, 0].item() - 0.8) < 0.05 and abs(cov[0, 1].item() + 0.2) < 0.05
    kept = int((ch < 0).nonzero()[0])
    assert abs(cov[kept, kept].item() - 1.0) < 0.05
    torch.manual_seed(0)
    assert dense_mvn_noise(grp, ch, 0.2, 4).shape == (grp.numel(), 4)


# ---------------------------------------------------------------------------------------------
# validation and dispatch
# ---------------------------------------------------------------------------------------------
def _good():
    x, maps, seeds = _case("1to2", 2, 3, 3, 0.5, 8, torch.float32, 0)
    return dict(x=x, pos=maps["pos"], src_index=maps["src_index"], group=maps["group"], child=maps["child"],
                seeds=seeds)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda d: d.update(x=d["x"][0]), ValueError, "x must be"),
    (lambda d: d.update(x=d["x"].double()), TypeError, "x must be float32"),
    (lambda d: d.update(pos=d["pos"][:, :-1]), ValueError, "pos must be"),
    (lambda d: d.update(pos=d["pos"].double()), TypeError, "pos must be float32"),
    (lambda d: d.update(src_index=d["src_index"].long()), TypeError, "src_index must be torch.int32"),
    (lambda d: d.update(group=d["group"][:, :-1]), ValueError, "group must be"),
    (lambda d: d.update(child=d["child"].int()), TypeError, "child must be torch.int8"),
    (lambda d: d.update(seeds=d["seeds"][:1]), ValueError, "seeds must be"),
    (lambda d: d.update(seeds=d["seeds"].int()), TypeError, "seeds must be int64"),
    (lambda d: d["src_index"].__setitem__((0, 0), 99), ValueError, "src_index out of range"),
    (lambda d: d["group"].__setitem__((0, 0), -1), ValueError, "group ids"),
    (lambda d: d["group"].__setitem__((0, 0), 2**28), ValueError, "G\\*C"),
    (lambda d: d["child"].__setitem__((0, 0), 4), ValueError, "child must be in"),
])
def test_validation_errors(mutate, exc, match):
    d = _good()
    mutate(d)
    with pytest.raises(exc, match=match):
        stage_transition(**d, a=1.0, b=1.0, c=0.1, impl="torch")


@pytest.mark.parametrize("c", [-0.01, 0.2501, float("nan")])
def test_bad_c(c):
    with pytest.raises(ValueError, match="0 <= c <= 1/4"):
        stage_transition(**_good(), a=1.0, b=1.0, c=c)
    with pytest.raises(ValueError, match="0 <= c <= 1/4"):
        correlated_noise_alpha(c)


def test_bad_out_and_impl():
    d = _good()
    with pytest.raises(ValueError, match="out must be"):
        stage_transition(**d, a=1.0, b=1.0, c=0.1, out=torch.empty(1, 2, 3))
    with pytest.raises(ValueError, match="pos_out must be"):
        stage_transition(**d, a=1.0, b=1.0, c=0.1, pos_out=torch.empty(1, 2, 3))
    with pytest.raises(ValueError, match="impl must be"):
        stage_transition(**d, a=1.0, b=1.0, c=0.1, impl="magic")
    with pytest.raises(RuntimeError, match="CUDA"):
        stage_transition(**d, a=1.0, b=1.0, c=0.1, impl="cuda")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    if not T.HAS_TRITON:
        pytest.skip("triton not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        stage_transition(**_good(), a=1.0, b=1.0, c=0.1, impl="triton")


def test_auto_on_cpu_is_the_reference_and_empty_inputs():
    d = _good()
    o1 = stage_transition(**d, a=1.0, b=0.5, c=0.1)
    o2 = stage_transition_reference(**d, a=1.0, b=0.5, c=0.1)
    assert torch.equal(o1[0], o2[0]) and torch.equal(o1[1], o2[1])
    d["src_index"], d["group"], d["child"] = (t[:, :0] for t in (d["src_index"], d["group"], d["child"]))
    out, pos = stage_transition(**d, a=1.0, b=0.5, c=0.1)
    assert out.shape == (2, 0, 8) and pos.shape == (2, 0, 2)


def test_fma_emulation_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100000, generator=g)
    y = torch.randn(100000, generator=g)
    z = torch.randn(100000, generator=g) * 1e-3
    ours = T._fma_f32(x, y, z)
    # reference with exact rationals on a subset
    from fractions import Fraction
    for i in range(0, 100000, 997):
        v = Fraction(float(x[i])) * Fraction(float(y[i])) + Fraction(float(z[i]))
        f = np.float32(float(v))  # float(v) is correctly rounded to float64; check double rounding below
        lo, hi = np.nextafter(f, np.float32(-np.inf)), np.nextafter(f, np.float32(np.inf))
        best = min((lo, f, hi), key=lambda t: (abs(Fraction(float(t)) - v), int(np.float32(t).view(np.int32)) & 1))
        assert np.float32(ours[i].item()) == best, i


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["1to2", "2to3"])
def test_gpu_triton_matches_reference_and_csrc(dtype, kind):
    if not T.HAS_TRITON or INTERPRETED:
        pytest.skip("compiled Triton needed (run with RALU_TEST_GPU=1)")
    x, maps, seeds = _case(kind, 2, 32, 32, 0.3, 64, dtype, 11, shuffle=True)
    dev = torch.device("cuda")
    xg = x.to(dev)
    mg = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in maps.items()}
    sg = seeds.to(dev)
    for exact in (False, True):
        kw = dict(a=1.0 / (6.317 * 0.7 + 0.3), b=0.61, c=1 / 6.317**2, exact_noise=exact)
        out_t, pos_t = _run("triton", xg, mg, sg, **kw)
        out_r, pos_r = _run("torch", xg, mg, sg, **kw)  # reference on CUDA (torch float32 math)
        out_c, _ = _run("torch", x, maps, seeds, **kw)  # reference on CPU (numpy math)
        assert torch.equal(pos_t, pos_r)
        # compiled kernels use MUFU lg2/sin/cos.approx (abs. error ~2^-21 on the normals), the reference
        # accurate math: float32 outputs agree to ~1e-5 of b * |n|
        tol = dict(atol=5e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(out_t.float(), out_r.float(), **tol)
        torch.testing.assert_close(out_t.float().cpu(), out_c.float(), **tol)
        if T._csrc_usable(xg, None):
            out_k, pos_k = _run("cuda", xg, mg, sg, **kw)
            assert torch.equal(out_k, out_t), "CUDA op and Triton kernel differ"
            assert torch.equal(pos_k, pos_t)
        if dtype != torch.float32:
            # one ulp of the output dtype, plus the float32 noise difference (a few float32 ulps of the
            # noise, which can exceed an ulp of a small output where a*x and b*n cancel)
            big = torch.maximum(out_t.float().abs(), out_r.float().abs())
            ulp = torch.finfo(dtype).eps * big.clamp_min(torch.finfo(dtype).tiny)
            assert ((out_t.float() - out_r.float()).abs() <= ulp + 5e-5).all()


# ---------------------------------------------------------------------------------------------
# group-major work order
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["1to2", "2to3"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_group_major_order_lists_complete_groups_then_kept_rows(kind, shuffle):
    _, maps, _ = _case(kind, 3, 5, 4, 0.4, 4, torch.float32, 8, shuffle=shuffle)
    order, num_up = maps["order"], maps["num_up"]
    assert order.dtype == torch.int32 and order.shape == maps["child"].shape
    for b in range(3):
        o = order[b].long()
        assert torch.equal(o.sort().values, torch.arange(o.numel()))
        q = maps["child"][b, o].long()
        assert torch.equal(q[: 4 * num_up], torch.arange(4).repeat(num_up))
        assert (q[4 * num_up:] < 0).all()
        g = maps["group"][b, o[: 4 * num_up]].view(-1, 4)
        assert (g == g[:, :1]).all() and g[:, 0].unique().numel() == num_up
    T._check_order(order, num_up, maps["src_index"], maps["group"], maps["child"])  # accepts its own output


def test_group_major_order_errors():
    _, maps, seeds = _case("2to3", 2, 4, 4, 0.5, 4, torch.float32, 3)
    src, grp, chd = maps["src_index"], maps["group"], maps["child"]
    bad = chd.clone()
    bad[0, bad[0] == 3] = -1  # drop child 3 of every group in image 0
    with pytest.raises(ValueError, match="same number"):
        T.group_major_order(src, grp, bad)
    bad[1, bad[1] == 3] = -1
    with pytest.raises(ValueError, match="multiple of 4|children 0, 1, 2, 3"):
        T.group_major_order(src, grp, bad)
    g2 = grp.clone()
    rows = (chd[0] == 1).nonzero().flatten()
    g2[0, rows[0]] = 10**6  # a child whose group differs from its siblings
    with pytest.raises(ValueError, match="children 0, 1, 2, 3|share one group"):
        T.group_major_order(src, g2, chd)
    order, num_up = maps["order"], maps["num_up"]
    with pytest.raises(ValueError, match="permutation"):
        T._check_order(torch.zeros_like(order), num_up, src, grp, chd)
    with pytest.raises(ValueError, match="num_up"):
        T._check_order(order, num_up + 1, src, grp, chd)
    with pytest.raises(ValueError, match="int32"):
        T._check_order(order.long(), num_up, src, grp, chd)
    swapped = order.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    with pytest.raises(ValueError, match="children 0, 1, 2, 3"):
        T._check_order(swapped, num_up, src, grp, chd)
    if T.HAS_TRITON and INTERPRETED:
        x = torch.randn(2, maps["pos"].shape[1], 4)
        kw = dict(a=1.0, b=1.0, c=0.1, pos_scale=2.0, impl="triton")
        with pytest.raises(ValueError, match="both order and num_up"):
            stage_transition(x, maps["pos"], src, grp, chd, seeds, order=order, **kw)
        with pytest.raises(ValueError, match="num_up must be in"):
            stage_transition(x, maps["pos"], src, grp, chd, seeds, order=order, num_up=10**6, **kw)


def test_compiled_sass_draws_one_normal4_per_4_outputs(tmp_path):
    """Offline sm_90 compile (no GPU needed): 8 MUFU ops (one normal4) per 4 output elements, no spills."""
    if not T.HAS_TRITON:
        pytest.skip("triton not installed")
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("Triton's NVIDIA backend (cuobjdump) not installed")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "sass_transition.py"), "--out", str(tmp_path)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    rows = json.loads((tmp_path / "transition_sass_sm90.json").read_text())["rows"]
    assert {(r["tiles"], r["part"]) for r in rows} == {(t, p) for t in ("small", "large") for p in ("up", "kept")}
    for r in rows:
        assert r["mufu_per_elem"] == 2.0, r  # lg2, sqrt, sin, cos per Box-Muller pair: 8 per normal4
        assert r["local_bytes"] == 0, r
        assert r["instr_per_elem"] < 80, r  # the token-major kernel needed ~276
        assert r["registers"] <= T._MAX_REGISTERS, r  # 8 programs of 4 warps per SM
    # the 64-bit Philox products take fewer instructions than Triton's umulhi + mul (Triton 3.6 and 3.9: 6-9 %)
    abl = {r["variant"]: r for r in json.loads((tmp_path / "transition_sass_sm90.json").read_text())["ablations"]}
    for part in ("up_instr_per_elem", "kept_instr_per_elem"):
        assert abl["kernel"][part] < abl["tl_philox"][part], (part, abl)
        assert abl["no_noise"][part] < abl["kernel"][part] / 2, (part, abl)  # the noise is most of the work


# ---------------------------------------------------------------------------------------------
# explicit tiles (tuning): the output must not depend on the tiling
# ---------------------------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("tiles", [(1, 1, 1), (2, 8, 2), (8, 32, 4), (32, 4, 8)])
def test_triton_output_independent_of_tiles(tiles):
    x, maps, seeds = _case("2to3", 2, 4, 6, 0.4, 64, torch.bfloat16, 5, shuffle=True)
    kw = dict(a=0.3, b=0.8, c=1 / 6.3**2, pos_scale=maps["pos_scale"], order=maps["order"], num_up=maps["num_up"])
    args = (x, maps["pos"], maps["src_index"], maps["group"], maps["child"], seeds)
    ref, ref_pos = T.stage_transition_triton(*args, **kw)
    out, pos = T.stage_transition_triton(*args, **kw, tiles=tiles)
    assert torch.equal(out, ref) and torch.equal(pos, ref_pos)


@needs_interpreter
@pytest.mark.parametrize("tiles", [(3, 16, 4), (4, 0, 4), (4, 16, 6)])
def test_triton_rejects_tiles_that_are_not_powers_of_two(tiles):
    x, maps, seeds = _case("1to2", 1, 2, 2, 0.5, 8, torch.float32, 1)
    with pytest.raises(ValueError, match="power of two"):
        T.stage_transition_triton(x, maps["pos"], maps["src_index"], maps["group"], maps["child"], seeds, a=0.3,
                                  b=0.8, c=0.02, order=maps["order"], num_up=maps["num_up"], tiles=tiles)


# ---------------------------------------------------------------------------------------------
# timing ablations (benchmarks/transition_ablation.py): what they compute
# ---------------------------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("kind", ["1to2", "2to3"])
def test_transition_ablations(kind):
    """``kernel``, ``tl_philox`` (Triton's own Philox) and ``work_maps`` (maps in work order) are the transition,
    bitwise; ``no_noise`` is the transition
    with b = 0; ``direct`` and ``direct_no_noise`` (maps not read) write finite values of the same shapes."""
    x, maps, seeds = _case(kind, 2, 4, 6, 0.4, 64, torch.bfloat16, 3, shuffle=True)
    kw = dict(a=0.3, b=0.8, c=1 / 6.3**2, pos_scale=maps["pos_scale"], order=maps["order"], num_up=maps["num_up"])
    args = (x, maps["pos"], maps["src_index"], maps["group"], maps["child"], seeds)
    ref, ref_pos = T.stage_transition_triton(*args, **kw)
    zero, _ = T.stage_transition_triton(*args, **dict(kw, b=0.0))
    outs = {}
    for variant in T.ABLATIONS:
        out, pos = torch.full_like(ref, float("nan")), torch.full_like(ref_pos, float("nan"))
        T.transition_ablation(variant, *args, **kw, out=out, pos_out=pos)
        assert torch.isfinite(out.float()).all() and torch.isfinite(pos).all(), variant
        outs[variant] = (out, pos)
    for variant in ("kernel", "tl_philox", "work_maps"):
        assert torch.equal(outs[variant][0], ref) and torch.equal(outs[variant][1], ref_pos), variant
    assert torch.equal(outs["no_noise"][0], zero) and torch.equal(outs["no_noise"][1], ref_pos)
    assert not torch.equal(outs["direct"][0], ref)  # wrong on purpose (rows from the work index)
    with pytest.raises(ValueError, match="variant='fast'"):
        T.transition_ablation("fast", *args, **kw, out=outs["kernel"][0], pos_out=outs["kernel"][1])
