// transition_selftest.cu: runs the CUDA stage-transition kernel (v2, group-major) and
// the device Philox / fast Box-Muller on a GPU and compares with the host
// transcription in host_reference.h.
//
//   exit 0   all checks passed
//   exit 1   a mismatch (details on stderr)
//   exit 2   a CUDA error
//   exit 77  no CUDA device (CTest SKIP_RETURN_CODE)
//
// Checks: Philox uint32 outputs bitwise; the device normal4 (MUFU lg2/cos/sin/sqrt)
// against the host's accurate Box-Muller within an error bound derived from the
// documented MUFU accuracy (see normal_error_bound), including the extreme uniforms
// (u close to 1, where lg2.approx has only absolute accuracy), and finite everywhere;
// transition outputs for float32 / float16 / bfloat16, vectorised and scalar channel
// counts, several group-major layouts (U = 0, kept = 0, mixed), both noise modes,
// within that bound plus one unit of the output dtype; positions bitwise; the
// launcher's rejection of 4 * num_up > Ld.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "host_reference.h"
#include "ralu_philox.cuh"
#include "stage_transition.h"

namespace {

#define CHECK_CUDA(expr)                                                                       \
  do {                                                                                         \
    cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), __FILE__, \
                   __LINE__, cudaGetErrorString(err_));                                        \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

__global__ void philox_probe_kernel(const uint64_t* seeds, const uint32_t* offsets, int n, uint32_t* bits,
                                    float* normals) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const ralu::Philox4 p = ralu::randint4x(seeds[i], offsets[i]);
  const ralu::Normal4 z = ralu::normal4(seeds[i], offsets[i]);
  bits[4 * i + 0] = p.c0;
  bits[4 * i + 1] = p.c1;
  bits[4 * i + 2] = p.c2;
  bits[4 * i + 3] = p.c3;
  normals[4 * i + 0] = z.n0;
  normals[4 * i + 1] = z.n1;
  normals[4 * i + 2] = z.n2;
  normals[4 * i + 3] = z.n3;
}

__global__ void box_muller_probe_kernel(const float* u_first, const float* u_second, int n, float* normals) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  ralu::pair_uniform_to_normal_fast(u_first[i], u_second[i], normals[2 * i], normals[2 * i + 1]);
}

uint64_t g_lcg = 0x853c49e6748fea9bull;
uint32_t next_u32() {
  g_lcg = g_lcg * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<uint32_t>(g_lcg >> 33);
}
float next_float() { return static_cast<float>(next_u32() % 2000001u) / 1000000.0f - 1.0f; }

// Bound on |fast Box-Muller - exact Box-Muller| for one pair, from the documented accuracy of
// the MUFU approximations (CUDA math API, __log2f / __sinf / __cosf; PTX sqrt.approx):
//   lg2.approx: 2^-22 absolute for x in [0.5, 2], 2 ulp elsewhere;
//   sin/cos.approx: 2^-21.41 absolute in [-pi, pi]; we allow 2^-20 on [0, 2 pi);
//   sqrt.approx: allow 2^-21 relative; each mul.rn: 2^-24 relative.
// r = sqrt(L), L = -2 ln(v): an absolute error dL in L gives at most
// min(sqrt(dL), dL / (2 sqrt(L))) in r (the first term matters for v close to 1).
// Returns the bound for both normals of the pair (times a safety factor of 2).
double normal_error_bound(float u_first) {
  const double v = std::max(1.0e-7, static_cast<double>(u_first));
  const double lg2 = std::log2(v);
  const double d_lg2 = std::ldexp(1.0, -22) * std::max(1.0, std::fabs(lg2));
  const double L = -2.0 * std::log(v);
  const double dL = 2.0 * std::log(2.0) * d_lg2 + L * std::ldexp(1.0, -22);
  const double r = std::sqrt(L);
  const double dr = std::min(std::sqrt(dL), L > 0.0 ? dL / (2.0 * r) : std::sqrt(dL)) + r * std::ldexp(1.0, -21);
  const double dn = dr + (r + dr) * std::ldexp(1.0, -20) + (r + 1.0) * std::ldexp(1.0, -22);
  return 2.0 * dn + 1e-7;
}

struct Bound4 {
  double e0, e1, e2, e3;
};

Bound4 normal4_error_bound(uint64_t seed, uint32_t offset) {
  const ralu_host::Philox4 p = ralu_host::randint4x(seed, offset);
  const double e01 = normal_error_bound(ralu_host::uint_to_uniform_float(p.c0));
  const double e23 = normal_error_bound(ralu_host::uint_to_uniform_float(p.c2));
  return Bound4{e01, e01, e23, e23};
}

bool within(float got, float want, double bound) {
  if (!std::isfinite(got) || !std::isfinite(want)) return false;
  return std::fabs(static_cast<double>(got) - static_cast<double>(want)) <= bound;
}

int check_philox() {
  const uint64_t seed_list[] = {0ull, 1ull, 42ull, 0xFFFFFFFFull, 0x123456789ABCDEFull,
                                static_cast<uint64_t>(-7LL)};
  std::vector<uint64_t> seeds;
  std::vector<uint32_t> offsets;
  for (uint64_t s : seed_list) {
    for (uint32_t o = 0; o < 4096; ++o) {
      seeds.push_back(s);
      offsets.push_back(o * 977u + (o & 1u ? 0x80000000u : 0u));
    }
  }
  const int n = static_cast<int>(seeds.size());
  uint64_t* d_seeds = nullptr;
  uint32_t* d_offsets = nullptr;
  uint32_t* d_bits = nullptr;
  float* d_normals = nullptr;
  CHECK_CUDA(cudaMalloc(&d_seeds, n * sizeof(uint64_t)));
  CHECK_CUDA(cudaMalloc(&d_offsets, n * sizeof(uint32_t)));
  CHECK_CUDA(cudaMalloc(&d_bits, 4 * n * sizeof(uint32_t)));
  CHECK_CUDA(cudaMalloc(&d_normals, 4 * n * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(d_seeds, seeds.data(), n * sizeof(uint64_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_offsets, offsets.data(), n * sizeof(uint32_t), cudaMemcpyHostToDevice));
  philox_probe_kernel<<<(n + 127) / 128, 128>>>(d_seeds, d_offsets, n, d_bits, d_normals);
  CHECK_CUDA(cudaGetLastError());
  std::vector<uint32_t> bits(4 * n);
  std::vector<float> normals(4 * n);
  CHECK_CUDA(cudaMemcpy(bits.data(), d_bits, bits.size() * sizeof(uint32_t), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(normals.data(), d_normals, normals.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(d_seeds));
  CHECK_CUDA(cudaFree(d_offsets));
  CHECK_CUDA(cudaFree(d_bits));
  CHECK_CUDA(cudaFree(d_normals));

  int bad = 0;
  double max_err = 0.0;
  for (int i = 0; i < n; ++i) {
    const ralu_host::Philox4 p = ralu_host::randint4x(seeds[i], offsets[i]);
    const ralu_host::Normal4 z = ralu_host::randn4x(seeds[i], offsets[i]);
    const Bound4 e = normal4_error_bound(seeds[i], offsets[i]);
    const uint32_t want_bits[4] = {p.c0, p.c1, p.c2, p.c3};
    const float want_n[4] = {z.n0, z.n1, z.n2, z.n3};
    const double bound[4] = {e.e0, e.e1, e.e2, e.e3};
    for (int k = 0; k < 4; ++k) {
      if (bits[4 * i + k] != want_bits[k]) {
        if (bad++ < 10)
          std::fprintf(stderr, "philox bits mismatch seed=%llu offset=%u k=%d: gpu %08x host %08x\n",
                       static_cast<unsigned long long>(seeds[i]), offsets[i], k, bits[4 * i + k], want_bits[k]);
      }
      const float got = normals[4 * i + k];
      if (std::isfinite(got)) max_err = std::max(max_err, std::fabs(static_cast<double>(got) - want_n[k]));
      if (!within(got, want_n[k], bound[k])) {
        if (bad++ < 10)
          std::fprintf(stderr, "normal4 mismatch seed=%llu offset=%u k=%d: gpu %.9g host %.9g bound %.3g\n",
                       static_cast<unsigned long long>(seeds[i]), offsets[i], k, got, want_n[k], bound[k]);
      }
    }
  }
  std::printf("philox/normal4: %d values, %d mismatches, max |gpu - host| %.3g\n", 4 * n, bad, max_err);
  return bad;
}

// The fast transform at extreme uniforms: the largest floats below 1 (u_first <= 1 - 2^-24 is the
// largest uniform Triton's conversion produces), the 1e-7 clamp, and a spread in between.
int check_box_muller_extremes() {
  std::vector<float> uf, us;
  const float second[] = {0.0f, 0.125f, 0.25f, 0.3f, 0.5f, 0.75f, 0.99999994f};
  std::vector<float> firsts;
  for (int k = 1; k <= 8192; ++k) firsts.push_back(1.0f - static_cast<float>(k) * 5.9604645e-8f);  // 1 - k 2^-24
  for (int k = 0; k < 64; ++k) firsts.push_back(std::ldexp(1.0f, -k / 2) * 0.75f);
  firsts.push_back(0.0f);
  firsts.push_back(1.0e-7f);
  firsts.push_back(4.6566126e-10f);
  for (float f : firsts) {
    for (float s : second) {
      uf.push_back(f);
      us.push_back(s);
    }
  }
  const int n = static_cast<int>(uf.size());
  float *d_uf = nullptr, *d_us = nullptr, *d_n = nullptr;
  CHECK_CUDA(cudaMalloc(&d_uf, n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_us, n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_n, 2 * n * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(d_uf, uf.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_us, us.data(), n * sizeof(float), cudaMemcpyHostToDevice));
  box_muller_probe_kernel<<<(n + 127) / 128, 128>>>(d_uf, d_us, n, d_n);
  CHECK_CUDA(cudaGetLastError());
  std::vector<float> got(2 * n);
  CHECK_CUDA(cudaMemcpy(got.data(), d_n, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(d_uf));
  CHECK_CUDA(cudaFree(d_us));
  CHECK_CUDA(cudaFree(d_n));

  int bad = 0, nonfinite = 0;
  double max_err = 0.0;
  for (int i = 0; i < n; ++i) {
    float w0, w1;
    ralu_host::pair_uniform_to_normal(uf[i], us[i], w0, w1);
    const double bound = normal_error_bound(uf[i]);
    const float want[2] = {w0, w1};
    for (int k = 0; k < 2; ++k) {
      const float g = got[2 * i + k];
      if (!std::isfinite(g)) {
        ++nonfinite;
      } else {
        max_err = std::max(max_err, std::fabs(static_cast<double>(g) - want[k]));
      }
      if (!within(g, want[k], bound)) {
        if (bad++ < 10)
          std::fprintf(stderr, "box-muller u=(%.9g, %.9g) k=%d: gpu %.9g host %.9g bound %.3g\n", uf[i], us[i], k,
                       g, want[k], bound);
      }
    }
  }
  std::printf("box-muller extremes: %d values, %d mismatches, %d non-finite, max |gpu - host| %.3g\n", 2 * n, bad,
              nonfinite, max_err);
  return bad;
}

template <typename T>
T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
__half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

float to_float(float v) { return v; }
float to_float(__half v) { return __half2float(v); }
float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Spacing of the output dtype at |v| (one unit of the last place).
template <typename T>
double dtype_ulp(double v);
template <>
double dtype_ulp<float>(double v) { return std::ldexp(std::max(std::fabs(v), 1e-30), -23); }
template <>
double dtype_ulp<__half>(double v) { return std::ldexp(std::max(std::fabs(v), std::ldexp(1.0, -14)), -10); }
template <>
double dtype_ulp<__nv_bfloat16>(double v) { return std::ldexp(std::max(std::fabs(v), 1e-30), -7); }

// Group-major maps for one image: U groups of 4 children then `kept` kept rows, rows permuted.
struct ImageMaps {
  std::vector<int32_t> src, group, order;
  std::vector<int8_t> child;
};

ImageMaps make_image_maps(int64_t num_up, int64_t kept, int64_t src_len) {
  const int64_t Ld = 4 * num_up + kept;
  std::vector<int32_t> perm(Ld);
  for (int64_t i = 0; i < Ld; ++i) perm[i] = static_cast<int32_t>(i);
  for (int64_t i = Ld - 1; i > 0; --i) std::swap(perm[i], perm[next_u32() % (i + 1)]);
  ImageMaps m;
  m.src.assign(Ld, 0);
  m.group.assign(Ld, 0);
  m.child.assign(Ld, 0);
  m.order = perm;  // order[4j + q] = row of child q of group j; order[4U + i] = kept row i
  for (int64_t j = 0; j < num_up; ++j) {
    const int32_t p = static_cast<int32_t>(next_u32() % src_len);
    const int32_t g = static_cast<int32_t>(3 * j + next_u32() % 3);  // distinct per group
    for (int q = 0; q < 4; ++q) {
      const int32_t row = perm[4 * j + q];
      m.src[row] = p;
      m.group[row] = g;
      m.child[row] = static_cast<int8_t>(q);
    }
  }
  for (int64_t i = 0; i < kept; ++i) {
    const int32_t row = perm[4 * num_up + i];
    m.src[row] = static_cast<int32_t>(next_u32() % src_len);
    m.group[row] = static_cast<int32_t>(3 * num_up + 5 * i + next_u32() % 5);
    m.child[row] = -1;
  }
  return m;
}

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T)));
  if (!v.empty()) CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
int check_transition(ralu_dtype dtype, const char* name, int64_t C, int64_t num_up, int64_t kept, bool exact_noise) {
  const int64_t B = 2, Ls = 37, Ld = 4 * num_up + kept;
  const double a = 1.7, b = 0.83, c = 1.0 / (6.261 * 6.261), pos_scale = 2.0, child_step = 0.5;
  std::vector<T> x(B * Ls * C);
  std::vector<float> pos(B * Ls * 2);
  std::vector<int32_t> src, group, order;
  std::vector<int8_t> child;
  std::vector<int64_t> seeds = {1234567, static_cast<int64_t>(0x7654321012345ll)};
  for (auto& v : x) v = from_float<T>(next_float() * 3.0f);
  for (int64_t i = 0; i < B * Ls; ++i) {
    pos[2 * i] = static_cast<float>(next_u32() % 64);
    pos[2 * i + 1] = static_cast<float>(next_u32() % 64);
  }
  for (int64_t bi = 0; bi < B; ++bi) {
    const ImageMaps m = make_image_maps(num_up, kept, Ls);
    src.insert(src.end(), m.src.begin(), m.src.end());
    group.insert(group.end(), m.group.begin(), m.group.end());
    child.insert(child.end(), m.child.begin(), m.child.end());
    order.insert(order.end(), m.order.begin(), m.order.end());
  }

  T* d_x = to_device(x);
  T* d_out = nullptr;
  float* d_pos_out = nullptr;
  CHECK_CUDA(cudaMalloc(&d_out, B * Ld * C * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&d_pos_out, B * Ld * 2 * sizeof(float)));
  CHECK_CUDA(cudaMemset(d_out, 0xff, B * Ld * C * sizeof(T)));  // NaN: unwritten outputs fail the check
  CHECK_CUDA(cudaMemset(d_pos_out, 0xff, B * Ld * 2 * sizeof(float)));
  float* d_pos = to_device(pos);
  int32_t* d_src = to_device(src);
  int32_t* d_group = to_device(group);
  int8_t* d_child = to_device(child);
  int32_t* d_order = to_device(order);
  int64_t* d_seeds = to_device(seeds);

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  // 4 * num_up > Ld is rejected before anything is launched.
  if (ralu_stage_transition_launch(d_x, d_pos, d_src, d_group, d_child, d_order, d_seeds, Ld / 4 + 1, d_out,
                                   d_pos_out, B, Ls, Ld, C, dtype, a, b, c, pos_scale, child_step, 0,
                                   stream) != cudaErrorInvalidValue) {
    std::fprintf(stderr, "%s: num_up = Ld / 4 + 1 was not rejected\n", name);
    return 1;
  }
  CHECK_CUDA(ralu_stage_transition_launch(d_x, d_pos, d_src, d_group, d_child, d_order, d_seeds, num_up, d_out,
                                          d_pos_out, B, Ls, Ld, C, dtype, a, b, c, pos_scale, child_step,
                                          exact_noise ? 1 : 0, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  CHECK_CUDA(cudaStreamDestroy(stream));

  std::vector<T> out(B * Ld * C);
  std::vector<float> pos_out(B * Ld * 2);
  CHECK_CUDA(cudaMemcpy(out.data(), d_out, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(pos_out.data(), d_pos_out, pos_out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  for (void* ptr : {static_cast<void*>(d_x), static_cast<void*>(d_out), static_cast<void*>(d_pos),
                    static_cast<void*>(d_pos_out), static_cast<void*>(d_src), static_cast<void*>(d_group),
                    static_cast<void*>(d_child), static_cast<void*>(d_order), static_cast<void*>(d_seeds)}) {
    CHECK_CUDA(cudaFree(ptr));
  }

  const ralu_host::TransitionScalars s = ralu_host::make_scalars(a, b, c, pos_scale, child_step, exact_noise);
  int bad = 0;
  for (int64_t bi = 0; bi < B; ++bi) {
    const uint64_t seed = static_cast<uint64_t>(seeds[bi]);
    for (int64_t i = 0; i < Ld; ++i) {
      const int64_t t = bi * Ld + i;
      const int64_t row = bi * Ls + src[t];
      const int q = child[t];
      const uint32_t goff = static_cast<uint32_t>(group[t]) * static_cast<uint32_t>(C);
      for (int64_t ch = 0; ch < C; ++ch) {
        const float exact = ralu_host::transition_value(to_float(x[row * C + ch]), seed, group[t], C, ch, q, s);
        const float want = to_float(from_float<T>(exact));
        // bound of the noise error: |b| * (e_q + |alpha| * sum e) (child) or |b| * noise_std * e_k (kept)
        double e_noise;
        if (q >= 0) {
          const Bound4 e = normal4_error_bound(seed, goff + static_cast<uint32_t>(ch));
          const double eq = q == 0 ? e.e0 : (q == 1 ? e.e1 : (q == 2 ? e.e2 : e.e3));
          e_noise = eq + std::fabs(s.alpha) * (e.e0 + e.e1 + e.e2 + e.e3);
        } else {
          const Bound4 e = normal4_error_bound(seed, goff + (static_cast<uint32_t>(ch) & ~3u));
          const int k = static_cast<int>(ch & 3);
          e_noise = s.noise_std * (k == 0 ? e.e0 : (k == 1 ? e.e1 : (k == 2 ? e.e2 : e.e3)));
        }
        const double bound = std::fabs(s.b) * e_noise * 1.01 + dtype_ulp<T>(exact) + 1e-6 * std::fabs(exact);
        const float got = to_float(out[t * C + ch]);
        if (!within(got, want, bound)) {
          if (bad++ < 10)
            std::fprintf(stderr,
                         "%s C=%lld U=%lld kept=%lld exact=%d out mismatch b=%lld i=%lld ch=%lld q=%d: gpu %.9g "
                         "host %.9g bound %.3g\n",
                         name, static_cast<long long>(C), static_cast<long long>(num_up),
                         static_cast<long long>(kept), exact_noise ? 1 : 0, static_cast<long long>(bi),
                         static_cast<long long>(i), static_cast<long long>(ch), q, got, want, bound);
        }
      }
      float ox, oy;
      ralu_host::transition_position(pos[2 * row], pos[2 * row + 1], q, s, ox, oy);
      if (pos_out[2 * t] != ox || pos_out[2 * t + 1] != oy) {
        if (bad++ < 10)
          std::fprintf(stderr, "%s pos mismatch b=%lld i=%lld: gpu (%g, %g) host (%g, %g)\n", name,
                       static_cast<long long>(bi), static_cast<long long>(i), pos_out[2 * t], pos_out[2 * t + 1],
                       ox, oy);
      }
    }
  }
  std::printf("transition %-8s C=%-3lld U=%-3lld kept=%-3lld exact_noise=%d: %lld values, %d mismatches\n", name,
              static_cast<long long>(C), static_cast<long long>(num_up), static_cast<long long>(kept),
              exact_noise ? 1 : 0, static_cast<long long>(B * Ld * C), bad);
  return bad;
}

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipping transition_selftest\n");
    return 77;
  }
  int bad = check_philox();
  bad += check_box_muller_extremes();
  const int64_t layouts[][2] = {{30, 30}, {0, 37}, {37, 0}, {25, 51}};  // (U, kept rows)
  for (int64_t C : {64, 16, 12, 5}) {
    for (const auto& layout : layouts) {
      for (bool exact : {false, true}) {
        bad += check_transition<float>(RALU_DTYPE_FLOAT32, "float32", C, layout[0], layout[1], exact);
        bad += check_transition<__half>(RALU_DTYPE_FLOAT16, "float16", C, layout[0], layout[1], exact);
        bad += check_transition<__nv_bfloat16>(RALU_DTYPE_BFLOAT16, "bfloat16", C, layout[0], layout[1], exact);
      }
    }
  }
  std::printf(bad == 0 ? "transition_selftest: PASS\n" : "transition_selftest: FAIL\n");
  return bad == 0 ? 0 : 1;
}
