"""Tests of the CUDA C++ transition op in csrc/ (everything but the last section runs on a CPU).

* ``.ci/compile_csrc.sh`` compiles the pure-CUDA kernel for sm_80/sm_90 (needs nvcc, no GPU).
* ``csrc/host_reference.h`` (compiled here with g++) matches Triton's ``tl.randint4x`` /
  ``tl.rand4x`` bitwise and ``tl.randn4x`` to float precision under ``TRITON_INTERPRET=1``, and
  its per-row v2 transition (children: normal4 at ``g*C + ch``; kept rows: normal4 at
  ``g*C + (ch & ~3)``, component ``ch & 3``) matches the torch reference. The device code in
  ``csrc/ralu_philox.cuh`` has the same key/counter layout, rounds, constants and uniform
  conversion; its Box-Muller uses the MUFU approximations (lg2/cos/sin/sqrt.approx) that only
  a GPU evaluates, so the device normals are checked on a GPU (here and in
  csrc/tests/transition_selftest.cu) to a tolerance, and bitwise against Triton.
* ``load_csrc()`` returns True exactly when ``ralu_kernels._C`` imports and
  ``torch.ops.ralu.stage_transition`` exists, False (without raising) otherwise or with
  ``RALU_DISABLE_CSRC=1``; the fake kernel's arguments match the op schema in torch_binding.cpp.
* GPU (``@pytest.mark.gpu``): the op on group-major maps (``example_transition_maps``,
  ``order``/``num_up``) against the torch reference (tolerance) and Triton (bitwise), vector vs
  scalar path, row-order invariance, torch.compile and CUDA graph capture.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

PROBE_SRC = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include "host_reference.h"

static uint32_t fbits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

template <typename T>
static std::vector<T> read_file(const char* dir, const char* name, size_t n) {
  std::vector<T> v(n);
  std::string path = std::string(dir) + "/" + name;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(T), n, f) != n) { std::fprintf(stderr, "read %s\n", path.c_str()); std::exit(3); }
  std::fclose(f);
  return v;
}

template <typename T>
static void write_file(const char* dir, const char* name, const std::vector<T>& v) {
  std::string path = std::string(dir) + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) { std::fprintf(stderr, "write %s\n", path.c_str()); std::exit(3); }
  std::fclose(f);
}

int main(int argc, char** argv) {
  if (argc >= 2 && std::strcmp(argv[1], "rng") == 0) {
    // stdin: lines "seed offset" (seed as unsigned 64-bit, offset as unsigned 32-bit)
    unsigned long long seed; unsigned long offset;
    while (std::scanf("%llu %lu", &seed, &offset) == 2) {
      const ralu_host::Philox4 p = ralu_host::randint4x(seed, static_cast<uint32_t>(offset));
      const ralu_host::Normal4 n = ralu_host::randn4x(seed, static_cast<uint32_t>(offset));
      const uint32_t c[4] = {p.c0, p.c1, p.c2, p.c3};
      std::printf("%u %u %u %u", c[0], c[1], c[2], c[3]);
      for (int k = 0; k < 4; ++k) std::printf(" %u", fbits(ralu_host::uint_to_uniform_float(c[k])));
      std::printf(" %u %u %u %u\n", fbits(n.n0), fbits(n.n1), fbits(n.n2), fbits(n.n3));
    }
    return 0;
  }
  if (argc == 13 && std::strcmp(argv[1], "transition") == 0) {
    const char* dir = argv[2];
    const long long B = std::atoll(argv[3]), Ls = std::atoll(argv[4]), Ld = std::atoll(argv[5]), C = std::atoll(argv[6]);
    const ralu_host::TransitionScalars s = ralu_host::make_scalars(
        std::atof(argv[7]), std::atof(argv[8]), std::atof(argv[9]), std::atof(argv[10]), std::atof(argv[11]),
        std::atoi(argv[12]) != 0);
    const auto x = read_file<float>(dir, "x.bin", B * Ls * C);
    const auto pos = read_file<float>(dir, "pos.bin", B * Ls * 2);
    const auto src = read_file<int32_t>(dir, "src.bin", B * Ld);
    const auto group = read_file<int32_t>(dir, "group.bin", B * Ld);
    const auto child = read_file<int8_t>(dir, "child.bin", B * Ld);
    const auto seeds = read_file<int64_t>(dir, "seeds.bin", B);
    std::vector<float> out(B * Ld * C), pos_out(B * Ld * 2);
    for (long long b = 0; b < B; ++b)
      for (long long i = 0; i < Ld; ++i) {
        const long long t = b * Ld + i, row = b * Ls + src[t];
        const int q = child[t];
        for (long long ch = 0; ch < C; ++ch)
          out[t * C + ch] = ralu_host::transition_value(x[row * C + ch], static_cast<uint64_t>(seeds[b]), group[t], C, ch, q, s);
        ralu_host::transition_position(pos[2 * row], pos[2 * row + 1], q, s, pos_out[2 * t], pos_out[2 * t + 1]);
      }
    write_file(dir, "out.bin", out);
    write_file(dir, "pos_out.bin", pos_out);
    return 0;
  }
  std::fprintf(stderr, "usage: probe rng < pairs | probe transition DIR B Ls Ld C a b c pos_scale child_step exact\n");
  return 2;
}
"""

SEEDS = [0, 1, 42, 2**32 - 1, 2**32, 0x123456789ABCDEF, -7, -(2**63)]
OFFSETS = list(range(0, 64)) + [1000, 4095, 65535, 2**20 + 17, 2**31 - 1, 2**31, 2**32 - 1, 3 * 2**30 + 5]


def _cxx():
    for cand in ("g++", "c++", "clang++"):
        if shutil.which(cand):
            return cand
    return None


@pytest.fixture(scope="module")
def host_probe(tmp_path_factory):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++/clang++) on PATH")
    d = tmp_path_factory.mktemp("ralu_host_probe")
    src = d / "probe.cpp"
    src.write_text(PROBE_SRC)
    exe = d / "probe"
    res = subprocess.run([cxx, "-std=c++14", "-O2", "-Wall", "-ffp-contract=off", f"-I{CSRC}", str(src), "-o",
                          str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"host probe failed to compile:\n{res.stderr[-4000:]}"
    return exe


def _host_rng(exe, pairs):
    text = "".join(f"{s & (2**64 - 1)} {o & (2**32 - 1)}\n" for s, o in pairs)
    res = subprocess.run([str(exe), "rng"], input=text, check=True, capture_output=True, text=True, timeout=60)
    rows = np.array([[int(v) for v in line.split()] for line in res.stdout.splitlines()], dtype=np.uint64)
    assert rows.shape == (len(pairs), 12)
    bits = rows[:, 0:4].astype(np.uint32)
    uniform = rows[:, 4:8].astype(np.uint32).view(np.float32)
    normal = rows[:, 8:12].astype(np.uint32).view(np.float32)
    return bits, uniform, normal


def _triton_rng(seed, offsets):
    """tl.randint4x / tl.rand4x / tl.randn4x for one int64 seed (loaded from a tensor, as in the
    transition kernel) and int32 offsets (bit patterns of the uint32 counters)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _probe(seed_ptr, off_ptr, bits_ptr, uni_ptr, nrm_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        seed = tl.load(seed_ptr)
        off = tl.load(off_ptr + i)
        r0, r1, r2, r3 = tl.randint4x(seed, off)
        tl.store(bits_ptr + 4 * i + 0, r0.to(tl.int32, bitcast=True))
        tl.store(bits_ptr + 4 * i + 1, r1.to(tl.int32, bitcast=True))
        tl.store(bits_ptr + 4 * i + 2, r2.to(tl.int32, bitcast=True))
        tl.store(bits_ptr + 4 * i + 3, r3.to(tl.int32, bitcast=True))
        f0, f1, f2, f3 = tl.rand4x(seed, off)
        tl.store(uni_ptr + 4 * i + 0, f0)
        tl.store(uni_ptr + 4 * i + 1, f1)
        tl.store(uni_ptr + 4 * i + 2, f2)
        tl.store(uni_ptr + 4 * i + 3, f3)
        n0, n1, n2, n3 = tl.randn4x(seed, off)
        tl.store(nrm_ptr + 4 * i + 0, n0)
        tl.store(nrm_ptr + 4 * i + 1, n1)
        tl.store(nrm_ptr + 4 * i + 2, n2)
        tl.store(nrm_ptr + 4 * i + 3, n3)

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cpu" if interpret else "cuda"
    if not interpret and not torch.cuda.is_available():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a GPU")
    n = 1
    while n < len(offsets):
        n *= 2
    offs = np.zeros(n, dtype=np.uint32)
    offs[: len(offsets)] = np.array([o & (2**32 - 1) for o in offsets], dtype=np.uint32)
    off_t = torch.from_numpy(offs.view(np.int32).copy()).to(device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    bits = torch.empty(4 * n, dtype=torch.int32, device=device)
    uni = torch.empty(4 * n, dtype=torch.float32, device=device)
    nrm = torch.empty(4 * n, dtype=torch.float32, device=device)
    _probe[(1,)](seed_t, off_t, bits, uni, nrm, N=n)
    k = len(offsets)
    return (bits.cpu().numpy().view(np.uint32).reshape(n, 4)[:k], uni.cpu().numpy().reshape(n, 4)[:k],
            nrm.cpu().numpy().reshape(n, 4)[:k])


# --------------------------------------------------------------------------------------------
# (1) nvcc compile check
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: CUDA compile check needs it")
def test_compile_csrc_script():
    # The full script (nvcc sm_80+sm_90 and the CMake build) takes ~40 s on 2 CPUs.
    res = subprocess.run(["bash", str(ROOT / ".ci" / "compile_csrc.sh")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "csrc compile check: OK" in res.stdout


def test_compile_csrc_script_without_nvcc(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    env = dict(os.environ, NVCC=str(tmp_path / "no-such-nvcc"))
    res = subprocess.run([bash, str(ROOT / ".ci" / "compile_csrc.sh")], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0
    assert "nvcc not found: skipping CUDA compile check" in res.stdout


# --------------------------------------------------------------------------------------------
# (2) host transcription of Philox + Box-Muller against Triton
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_host_reference_matches_triton_rng(host_probe, seed):
    t_bits, t_uni, t_nrm = _triton_rng(seed, OFFSETS)
    h_bits, h_uni, h_nrm = _host_rng(host_probe, [(seed, o) for o in OFFSETS])
    # Philox words and their uniform floats: bitwise.
    np.testing.assert_array_equal(h_bits, t_bits)
    np.testing.assert_array_equal(h_uni.view(np.uint32), t_uni.view(np.uint32))
    # Normals: libm (host) / numpy (interpreter) / libdevice (GPU) differ in the last bits only.
    np.testing.assert_allclose(h_nrm, t_nrm, rtol=2e-6, atol=2e-6)


def test_host_reference_uniform_edge_cases(host_probe):
    # Offsets / seeds that hit int32 sign flips; plus the value range of the uniforms.
    pairs = [(s, o) for s in (0, 5, 2**63 - 1) for o in (0, 1, 2**31 - 1, 2**31, 2**32 - 1)]
    bits, uni, nrm = _host_rng(host_probe, pairs)
    assert np.all(uni >= 0.0) and np.all(uni < 1.0)
    assert np.all(np.isfinite(nrm)) and np.all(np.abs(nrm) < 6.0)
    # Distinct counters give distinct words.
    assert len({tuple(r) for r in bits.tolist()}) == len(pairs)


def _transition_inputs(seed=0, B=2, Ls=23, Ld=70, C=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Ls, C, generator=g) * 2
    pos = torch.randint(0, 32, (B, Ls, 2), generator=g).float()
    src_index = torch.randint(0, Ls, (B, Ld), generator=g, dtype=torch.int32)
    group = torch.randint(0, 200, (B, Ld), generator=g, dtype=torch.int32)
    child = (torch.randint(0, 5, (B, Ld), generator=g) - 1).to(torch.int8)  # -1 .. 3
    seeds = torch.tensor([123456789, -(2**40) + 3][:B], dtype=torch.int64)
    return x, pos, src_index, group, child, seeds


SCALARS = dict(a=1.25, b=0.8, c=1.0 / 6.261**2, pos_scale=2.0, child_step=0.5)


def _host_transition(exe, tmp_path, x, pos, src_index, group, child, seeds, *, a, b, c, pos_scale, child_step,
                     exact_noise):
    B, Ls, C = x.shape
    Ld = src_index.shape[1]
    for name, t, dt in (("x", x, np.float32), ("pos", pos, np.float32), ("src", src_index, np.int32),
                        ("group", group, np.int32), ("child", child, np.int8), ("seeds", seeds, np.int64)):
        t.detach().cpu().numpy().astype(dt).tofile(tmp_path / f"{name}.bin")
    subprocess.run([str(exe), "transition", str(tmp_path), str(B), str(Ls), str(Ld), str(C), repr(a), repr(b),
                    repr(c), repr(pos_scale), repr(child_step), str(int(exact_noise))],
                   check=True, capture_output=True, text=True, timeout=60)
    out = np.fromfile(tmp_path / "out.bin", dtype=np.float32).reshape(B, Ld, C)
    pos_out = np.fromfile(tmp_path / "pos_out.bin", dtype=np.float32).reshape(B, Ld, 2)
    return torch.from_numpy(out), torch.from_numpy(pos_out)


def _reference_fn():
    try:
        mod = importlib.import_module("ralu_kernels.transition")
    except Exception as exc:  # not written yet / import error
        pytest.skip(f"ralu_kernels.transition not importable: {exc}")
    fn = getattr(mod, "stage_transition_reference", None)
    if fn is None:
        pytest.skip("ralu_kernels.transition.stage_transition_reference not found")
    return fn


def _call_transition(fn, x, pos, src_index, group, child, seeds, **kw):
    """Call a transition implementation with this module's argument names, passing only the
    keywords its signature accepts; returns (out, pos_out)."""
    params = inspect.signature(fn).parameters
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in kw.items() if accepts_var_kw or k in params}
    res = fn(x, pos, src_index, group, child, seeds, **kwargs)
    if isinstance(res, (tuple, list)):
        return res[0], res[1]
    if "out" in kw and "pos_out" in kw:
        return kw["out"], kw["pos_out"]
    raise AssertionError(f"cannot read (out, pos_out) from {type(res)}")


@pytest.mark.parametrize("exact_noise", [False, True])
def test_host_reference_transition_matches_torch_reference(host_probe, tmp_path, exact_noise):
    ref = _reference_fn()
    inputs = _transition_inputs()
    h_out, h_pos = _host_transition(host_probe, tmp_path, *inputs, exact_noise=exact_noise, **SCALARS)
    r_out, r_pos = _call_transition(ref, *inputs, exact_noise=exact_noise, **SCALARS)
    torch.testing.assert_close(r_out.float().cpu(), h_out, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(r_pos.float().cpu(), h_pos, rtol=0, atol=0)


@pytest.mark.parametrize("kind,shuffle,exact_noise", [("1to2", True, False), ("2to3", False, True)])
def test_host_reference_matches_torch_reference_on_group_major_maps(host_probe, tmp_path, kind, shuffle,
                                                                    exact_noise):
    # The maps the GPU tests use (complete groups of 4 children, realistic kept rows), C = 12.
    ref = _reference_fn()
    inputs, _, num_up, scalars = _map_inputs(torch.float32, kind, shuffle, C=12, height=6, width=8, device="cpu")
    assert num_up > 0
    h_out, h_pos = _host_transition(host_probe, tmp_path, *inputs, exact_noise=exact_noise, **scalars)
    r_out, r_pos = _call_transition(ref, *inputs, exact_noise=exact_noise, **scalars)
    torch.testing.assert_close(r_out.float(), h_out, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(r_pos.float(), h_pos, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# (3) load_csrc without the extension
# --------------------------------------------------------------------------------------------


def _fresh_csrc(monkeypatch):
    import ralu_kernels._csrc as csrc

    monkeypatch.setattr(csrc, "_LOADED", None)
    return csrc


def test_load_csrc_false_without_extension(monkeypatch):
    csrc = _fresh_csrc(monkeypatch)
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "ralu_kernels._C":
            raise ImportError("simulated: extension not built")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(csrc.importlib, "import_module", fake_import)
    assert csrc.load_csrc() is False
    assert csrc.load_csrc() is False  # cached, still no exception
    assert csrc.csrc_available() is False
    x, pos, src_index, group, child, seeds = _transition_inputs()
    order = torch.arange(src_index.shape[1], dtype=torch.int32).expand_as(src_index).contiguous()
    with pytest.raises(RuntimeError, match="not available"):
        csrc.stage_transition_cuda(x, pos, src_index, group, child, seeds, exact_noise=False, order=order,
                                   num_up=0, **SCALARS)


@pytest.mark.parametrize("value,disabled,warns", [
    (None, False, False), ("", False, False), ("0", False, False), ("off", False, False), (" False ", False, False),
    ("1", True, False), ("true", True, False), (" YES", True, False), ("on", True, False),
    ("disable", True, True),   # was ignored (only "1" disabled the op): now disabled, with a warning
])
def test_disable_csrc_values(monkeypatch, value, disabled, warns):
    import warnings

    from ralu_kernels._csrc import csrc_disabled

    if value is None:
        monkeypatch.delenv("RALU_DISABLE_CSRC", raising=False)
    else:
        monkeypatch.setenv("RALU_DISABLE_CSRC", value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert csrc_disabled() is disabled
    assert bool(caught) == warns


def test_load_csrc_broken_extension_does_not_raise(monkeypatch):
    csrc = _fresh_csrc(monkeypatch)

    def broken_import(name, *args, **kwargs):
        raise OSError("simulated: undefined symbol in _C.so")

    monkeypatch.setattr(csrc.importlib, "import_module", broken_import)
    assert csrc.load_csrc() is False


def test_load_csrc_disabled_by_env(monkeypatch):
    csrc = _fresh_csrc(monkeypatch)
    monkeypatch.setenv("RALU_DISABLE_CSRC", "1")
    tried = []
    monkeypatch.setattr(csrc.importlib, "import_module", lambda name, *a, **k: tried.append(name))
    assert csrc.load_csrc() is False
    assert csrc.csrc_available() is False
    assert tried == []  # the variable wins before any import is attempted


def _extension_usable() -> bool:
    """Independent of load_csrc: ``ralu_kernels._C`` imports and registered ``torch.ops.ralu.stage_transition``."""
    try:
        importlib.import_module("ralu_kernels._C")
    except Exception:
        return False
    try:
        return hasattr(torch.ops.ralu, "stage_transition")
    except Exception:
        return False


def test_load_csrc_real_environment(monkeypatch):
    # Whatever is installed here: True exactly when the extension imports and its op exists.
    monkeypatch.delenv("RALU_DISABLE_CSRC", raising=False)
    csrc = _fresh_csrc(monkeypatch)
    monkeypatch.setattr(csrc, "_FAKE_REGISTERED", csrc._FAKE_REGISTERED)
    expected = _extension_usable()
    ok = csrc.load_csrc()
    assert ok is expected, f"load_csrc() returned {ok}, extension importable with its op: {expected}"
    assert csrc._LOADED is ok and csrc.load_csrc() is ok  # cached
    assert csrc.csrc_available() is (ok and torch.cuda.is_available())
    if ok:
        assert csrc._FAKE_REGISTERED  # the meta kernel for torch.compile is registered with the op
    if torch.version.cuda is None:
        assert ok is False  # a CPU build of torch cannot have loaded the CUDA op
    # the environment variable turns a usable extension off as well
    monkeypatch.setattr(csrc, "_LOADED", None)
    monkeypatch.setenv("RALU_DISABLE_CSRC", "1")
    assert csrc.load_csrc() is False


@pytest.mark.parametrize("op_exists", [False, True])
def test_load_csrc_true_only_with_module_and_op(monkeypatch, op_exists):
    # Simulated extension module: importable; the op registered or not.
    csrc = _fresh_csrc(monkeypatch)
    monkeypatch.delenv("RALU_DISABLE_CSRC", raising=False)
    fake_module = type(sys)("ralu_kernels._C")
    real_import = importlib.import_module
    monkeypatch.setattr(csrc.importlib, "import_module",
                        lambda name, *a, **k: fake_module if name == "ralu_kernels._C" else real_import(name, *a, **k))
    monkeypatch.setattr(csrc, "_op_exists", lambda: op_exists)
    registered = []
    monkeypatch.setattr(csrc, "_register_fake", lambda: registered.append(True))
    assert csrc.load_csrc() is op_exists
    assert registered == ([True] if op_exists else [])
    # an op lookup that raises counts as absent, without raising
    monkeypatch.setattr(csrc, "_LOADED", None)

    def broken_lookup():
        raise RuntimeError("simulated: torch.ops lookup failed")

    monkeypatch.setattr(csrc, "_op_exists", broken_lookup)
    assert csrc.load_csrc() is False


def _schema_arguments():
    """Argument names of ralu::stage_transition in csrc/torch_binding.cpp (the m.def string)."""
    text = (CSRC / "torch_binding.cpp").read_text()
    block = text[text.index("m.def("):]
    block = block[: block.index(");") + 2]
    schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', block))
    m = re.fullmatch(r"stage_transition\((.*)\) -> \(\)", schema)
    assert m, schema
    return schema, [arg.strip().split()[-1] for arg in m.group(1).split(",")]


def test_fake_kernel_matches_op_schema(monkeypatch):
    import ralu_kernels._csrc as csrc

    schema, names = _schema_arguments()
    assert names == ["x", "pos", "src_index", "group", "child", "order", "seeds", "num_up", "a", "b", "c",
                     "pos_scale", "child_step", "exact_noise", "out", "pos_out"], schema
    assert "Tensor order" in schema and "int num_up" in schema
    captured = {}

    def fake_register(name, fn):
        captured[name] = fn

    monkeypatch.setattr(csrc, "_FAKE_REGISTERED", False)
    monkeypatch.setattr(csrc.torch.library, "register_fake", fake_register)
    csrc._register_fake()
    fake = captured["ralu::stage_transition"]
    assert list(inspect.signature(fake).parameters) == names
    # the Python wrapper: order and num_up are required keyword arguments
    params = inspect.signature(csrc.stage_transition_cuda).parameters
    for name in ("order", "num_up"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default is inspect.Parameter.empty


def test_stage_transition_cuda_checks_order_arguments(monkeypatch):
    # The Python wrapper's checks run before the op is called (no extension needed).
    csrc = _fresh_csrc(monkeypatch)
    monkeypatch.setattr(csrc, "load_csrc", lambda: True)
    x, pos, src_index, group, child, seeds = _transition_inputs(Ld=70)
    order = torch.arange(70, dtype=torch.int32).expand(2, 70).contiguous()
    with pytest.raises(ValueError, match="num_up"):
        csrc.stage_transition_cuda(x, pos, src_index, group, child, seeds, order=order, num_up=18, **SCALARS)
    with pytest.raises(ValueError, match="num_up"):
        csrc.stage_transition_cuda(x, pos, src_index, group, child, seeds, order=order, num_up=-1, **SCALARS)
    with pytest.raises(ValueError, match="order"):
        csrc.stage_transition_cuda(x, pos, src_index, group, child, seeds, order=order[:, :69], num_up=0,
                                   **SCALARS)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch path of setup.py")
def test_setup_without_cuda_torch():
    env = {k: v for k, v in os.environ.items() if k not in ("RALU_FORCE_CUDA", "RALU_BUILD_CUDA")}
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "0.1.0"
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(env, RALU_FORCE_CUDA="1"), timeout=120)
    assert res.returncode != 0
    assert "RALU_FORCE_CUDA=1" in res.stderr


# --------------------------------------------------------------------------------------------
# (4) GPU: the op against the torch reference and Triton, torch.compile, CUDA graphs
# --------------------------------------------------------------------------------------------


def _need_op():
    from ralu_kernels._csrc import load_csrc

    if not load_csrc():
        pytest.skip("ralu_kernels._C not built (pip install -e . with a CUDA build of torch)")


def _transition_module():
    try:
        return importlib.import_module("ralu_kernels.transition")
    except Exception as exc:
        pytest.skip(f"ralu_kernels.transition not importable: {exc}")


def _triton_fn():
    mod = _transition_module()
    for name in ("stage_transition_triton", "stage_transition_kernel_triton", "triton_stage_transition"):
        fn = getattr(mod, name, None)
        if fn is not None:
            return fn
    pytest.skip("no Triton entry point (stage_transition_triton) in ralu_kernels.transition")


# (kind, shuffle, exact_noise): group-major maps of example_transition_maps
MAP_CASES = [("1to2", False, False), ("1to2", True, True), ("2to3", False, True), ("2to3", True, False)]


def _map_inputs(dtype, kind="1to2", shuffle=False, C=64, B=2, height=12, width=20, ratio=0.3, seed=0,
                device="cuda"):
    """Inputs on group-major maps: ((x, pos, src_index, group, child, seeds), order, num_up, scalars)."""
    mod = _transition_module()
    g = torch.Generator().manual_seed(seed)
    maps = mod.example_transition_maps(kind, height, width, ratio, batch=B, generator=g, shuffle=shuffle)
    if "order" in maps:
        order, num_up = maps["order"], int(maps["num_up"])
    else:
        order, num_up = mod.group_major_order(maps["src_index"], maps["group"], maps["child"])
    pos = maps["pos"]
    x = torch.randn(B, pos.shape[1], C, generator=g) * 2
    seeds = torch.tensor([123456789, -(2**40) + 3, 7, 2**62 + 11][:B], dtype=torch.int64)
    inputs = tuple(t.to(device) for t in (x.to(dtype), pos, maps["src_index"], maps["group"], maps["child"], seeds))
    scalars = dict(SCALARS, pos_scale=maps["pos_scale"])
    return inputs, order.to(device=device, dtype=torch.int32).contiguous(), num_up, scalars


# GPU vs the torch reference. The kernels' normals use the MUFU approximations, the reference
# accurate math: typically |diff| ~1e-6 per normal (2^-21), but lg2.approx has only absolute
# accuracy (2^-22), so for the rare uniforms within ~2^-15 of 1 the Box-Muller radius can be off
# by up to ~6e-4. A few such elements are allowed; none may be far off or non-finite.
_REF_TOL = {torch.float32: (1e-5, 5e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


def _assert_close_to_reference(got, want, dtype, what="out"):
    got, want = got.float().cpu(), want.float().cpu()
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    rtol, atol = _REF_TOL[dtype]
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    n_bad = int(bad.sum())
    assert n_bad <= max(2, got.numel() // 20000), (
        f"{what}: {n_bad} of {got.numel()} values beyond rtol={rtol}, atol={atol}; max err {float(err.max()):.3g}")
    far = err > 2e-3 + rtol * want.abs()
    assert not bool(far.any()), f"{what}: max err {float(err.max()):.3g}"


def _as_bits(t):
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [64, 12, 5])
@pytest.mark.parametrize("kind,shuffle,exact_noise", MAP_CASES)
def test_gpu_op_matches_reference_and_triton(dtype, C, kind, shuffle, exact_noise):
    _need_op()
    from ralu_kernels._csrc import stage_transition_cuda

    inputs, order, num_up, scalars = _map_inputs(dtype, kind, shuffle, C=C)
    assert num_up > 0 and 4 * num_up < inputs[2].shape[1]  # both work kinds present
    out, pos_out = stage_transition_cuda(*inputs, exact_noise=exact_noise, order=order, num_up=num_up, **scalars)
    torch.cuda.synchronize()

    r_out, r_pos = _call_transition(_reference_fn(), *inputs, exact_noise=exact_noise, **scalars)
    _assert_close_to_reference(out, r_out, dtype)
    torch.testing.assert_close(pos_out, r_pos.float(), rtol=0, atol=0)

    t_out, t_pos = _call_transition(_triton_fn(), *inputs, exact_noise=exact_noise, order=order, num_up=num_up,
                                    **scalars)
    assert torch.equal(_as_bits(out), _as_bits(t_out)), \
        f"CUDA and Triton differ in {(_as_bits(out) != _as_bits(t_out)).sum().item()} of {out.numel()} values"
    assert torch.equal(pos_out, t_pos)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_vector_and_scalar_paths_agree(dtype):
    # A 16-byte-misaligned x selects the scalar path; it must give the vector path's bits.
    _need_op()
    from ralu_kernels._csrc import stage_transition_cuda

    inputs, order, num_up, scalars = _map_inputs(dtype, "1to2", True, C=64)
    x = inputs[0]
    storage = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    x_mis = storage[1:].view(x.shape)
    x_mis.copy_(x)
    assert x_mis.is_contiguous() and x_mis.data_ptr() % 16 != 0
    out_v, pos_v = stage_transition_cuda(*inputs, exact_noise=True, order=order, num_up=num_up, **scalars)
    out_s, pos_s = stage_transition_cuda(x_mis, *inputs[1:], exact_noise=True, order=order, num_up=num_up,
                                         **scalars)
    assert torch.equal(_as_bits(out_v), _as_bits(out_s))
    assert torch.equal(pos_v, pos_s)


@pytest.mark.gpu
def test_gpu_op_independent_of_row_order():
    # The noise depends on (seed, group, child, channel) only: permuting the output rows (and
    # recomputing the work order) permutes the outputs, bit for bit.
    _need_op()
    from ralu_kernels._csrc import stage_transition_cuda

    mod = _transition_module()
    (x, pos, src_index, group, child, seeds), order, num_up, scalars = _map_inputs(torch.bfloat16, "2to3", False)
    out, pos_out = stage_transition_cuda(x, pos, src_index, group, child, seeds, order=order, num_up=num_up,
                                         **scalars)
    perm = torch.randperm(src_index.shape[1], generator=torch.Generator().manual_seed(3)).cuda()
    src2, group2, child2 = src_index[:, perm].contiguous(), group[:, perm].contiguous(), child[:, perm].contiguous()
    order2, num_up2 = mod.group_major_order(src2, group2, child2)
    assert num_up2 == num_up
    out2, pos2 = stage_transition_cuda(x, pos, src2, group2, child2, seeds, order=order2.to(torch.int32),
                                       num_up=num_up2, **scalars)
    assert torch.equal(_as_bits(out2), _as_bits(out[:, perm]))
    assert torch.equal(pos2, pos_out[:, perm])


@pytest.mark.gpu
def test_gpu_op_rejects_bad_num_up():
    _need_op()
    inputs, order, num_up, scalars = _map_inputs(torch.float32, "1to2", False, C=8)
    x, pos, src_index, group, child, seeds = inputs
    out = torch.empty(x.shape[0], src_index.shape[1], x.shape[2], device="cuda")
    pos_out = torch.empty(x.shape[0], src_index.shape[1], 2, device="cuda")
    too_many = src_index.shape[1] // 4 + 1
    with pytest.raises(RuntimeError, match="num_up"):
        torch.ops.ralu.stage_transition(x, pos, src_index, group, child, order, seeds, too_many, scalars["a"],
                                        scalars["b"], scalars["c"], scalars["pos_scale"], scalars["child_step"],
                                        False, out, pos_out)
    with pytest.raises(RuntimeError, match="order"):
        torch.ops.ralu.stage_transition(x, pos, src_index, group, child, order.long(), seeds, num_up,
                                        scalars["a"], scalars["b"], scalars["c"], scalars["pos_scale"],
                                        scalars["child_step"], False, out, pos_out)


@pytest.mark.gpu
def test_gpu_host_reference_matches_op(host_probe, tmp_path):
    _need_op()
    from ralu_kernels._csrc import stage_transition_cuda

    inputs, order, num_up, scalars = _map_inputs(torch.float32, "1to2", True, C=64)
    out, pos_out = stage_transition_cuda(*inputs, exact_noise=True, order=order, num_up=num_up, **scalars)
    h_out, h_pos = _host_transition(host_probe, tmp_path, *[t.cpu() for t in inputs], exact_noise=True, **scalars)
    _assert_close_to_reference(out, h_out, torch.float32)
    torch.testing.assert_close(pos_out.cpu(), h_pos, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_op_torch_compile():
    _need_op()
    from ralu_kernels._csrc import stage_transition_cuda

    inputs, order, num_up, scalars = _map_inputs(torch.bfloat16, "1to2", True)
    B, Ld, C = inputs[0].shape[0], inputs[2].shape[1], inputs[0].shape[2]
    out = torch.empty(B, Ld, C, dtype=torch.bfloat16, device="cuda")
    pos_out = torch.empty(B, Ld, 2, dtype=torch.float32, device="cuda")

    def step(x, pos, src_index, group, child, seeds, order, out, pos_out):
        stage_transition_cuda(x * 1.0, pos, src_index, group, child, seeds, exact_noise=False, out=out,
                              pos_out=pos_out, order=order, num_up=num_up, **scalars)
        return out.float().sum(), pos_out + 0

    compiled = torch.compile(step, fullgraph=True)
    s_c, p_c = compiled(*inputs, order, out, pos_out)
    out_c = out.clone()
    s_e, p_e = step(*inputs, order, out, pos_out)
    assert torch.equal(out_c, out)
    torch.testing.assert_close(s_c, s_e)
    assert torch.equal(p_c, p_e)


@pytest.mark.gpu
def test_gpu_op_cuda_graph_capture():
    _need_op()
    from ralu_kernels._csrc import stage_transition_cuda

    (x, pos, src_index, group, child, seeds), order, num_up, scalars = _map_inputs(torch.bfloat16, "2to3", True)
    B, Ld, C = x.shape[0], src_index.shape[1], x.shape[2]
    out = torch.empty(B, Ld, C, dtype=x.dtype, device="cuda")
    pos_out = torch.empty(B, Ld, 2, dtype=torch.float32, device="cuda")
    kw = dict(exact_noise=True, out=out, pos_out=pos_out, order=order, num_up=num_up, **scalars)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        stage_transition_cuda(x, pos, src_index, group, child, seeds, **kw)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stage_transition_cuda(x, pos, src_index, group, child, seeds, **kw)

    # New inputs written in place, then replay.
    x.copy_(torch.randn_like(x))
    seeds.copy_(torch.tensor([7, 99], dtype=torch.int64, device="cuda"))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    want_out, want_pos = stage_transition_cuda(x, pos, src_index, group, child, seeds, exact_noise=True,
                                               order=order, num_up=num_up, **scalars)
    assert torch.equal(out, want_out)
    assert torch.equal(pos_out, want_pos)
