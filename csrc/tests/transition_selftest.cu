// transition_selftest.cu: runs the CUDA stage-transition kernel (and the device
// Philox) on a GPU and compares with the host transcription in host_reference.h.
//
//   exit 0   all checks passed
//   exit 1   a mismatch (details on stderr)
//   exit 2   a CUDA error
//   exit 77  no CUDA device (CTest SKIP_RETURN_CODE)
//
// Checks: Philox uint32 outputs bitwise; randn4x normals to float precision (the
// host uses libm, the device libdevice + sqrt.approx); transition outputs for
// float32 / float16 / bfloat16, vectorised and scalar channel counts, upsampled and
// not upsampled tokens, both noise modes, to dtype precision; positions bitwise.
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
  const ralu::Normal4 z = ralu::randn4x(seeds[i], offsets[i]);
  bits[4 * i + 0] = p.c0;
  bits[4 * i + 1] = p.c1;
  bits[4 * i + 2] = p.c2;
  bits[4 * i + 3] = p.c3;
  normals[4 * i + 0] = z.n0;
  normals[4 * i + 1] = z.n1;
  normals[4 * i + 2] = z.n2;
  normals[4 * i + 3] = z.n3;
}

uint64_t g_lcg = 0x853c49e6748fea9bull;
uint32_t next_u32() {
  g_lcg = g_lcg * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<uint32_t>(g_lcg >> 33);
}
float next_float() { return static_cast<float>(next_u32() % 2000001u) / 1000000.0f - 1.0f; }

bool close(float got, float want, float tol) {
  if (std::isnan(got) || std::isnan(want)) return false;
  return std::fabs(got - want) <= tol * std::fmax(1.0f, std::fabs(want));
}

int check_philox() {
  const uint64_t seed_list[] = {0ull, 1ull, 42ull, 0xFFFFFFFFull, 0x123456789ABCDEFull,
                                static_cast<uint64_t>(-7LL)};
  std::vector<uint64_t> seeds;
  std::vector<uint32_t> offsets;
  for (uint64_t s : seed_list) {
    for (uint32_t o = 0; o < 256; ++o) {
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
  for (int i = 0; i < n; ++i) {
    const ralu_host::Philox4 p = ralu_host::randint4x(seeds[i], offsets[i]);
    const ralu_host::Normal4 z = ralu_host::randn4x(seeds[i], offsets[i]);
    const uint32_t want_bits[4] = {p.c0, p.c1, p.c2, p.c3};
    const float want_n[4] = {z.n0, z.n1, z.n2, z.n3};
    for (int k = 0; k < 4; ++k) {
      if (bits[4 * i + k] != want_bits[k]) {
        if (bad++ < 10)
          std::fprintf(stderr, "philox bits mismatch seed=%llu offset=%u k=%d: gpu %08x host %08x\n",
                       static_cast<unsigned long long>(seeds[i]), offsets[i], k, bits[4 * i + k], want_bits[k]);
      }
      if (!close(normals[4 * i + k], want_n[k], 2e-5f)) {
        if (bad++ < 10)
          std::fprintf(stderr, "randn4x mismatch seed=%llu offset=%u k=%d: gpu %.9g host %.9g\n",
                       static_cast<unsigned long long>(seeds[i]), offsets[i], k, normals[4 * i + k], want_n[k]);
      }
    }
  }
  std::printf("philox/randn4x: %d values, %d mismatches\n", 4 * n, bad);
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

template <typename T>
int check_transition(ralu_dtype dtype, const char* name, float tol, int64_t C, bool exact_noise) {
  const int64_t B = 2, Ls = 37, Ld = 150;
  const double a = 1.7, b = 0.83, c = 1.0 / (6.261 * 6.261), pos_scale = 2.0, child_step = 0.5;
  std::vector<T> x(B * Ls * C);
  std::vector<float> pos(B * Ls * 2);
  std::vector<int32_t> src(B * Ld), group(B * Ld);
  std::vector<int8_t> child(B * Ld);
  std::vector<int64_t> seeds = {1234567, static_cast<int64_t>(0x7654321012345ll)};
  for (auto& v : x) v = from_float<T>(next_float() * 3.0f);
  for (int64_t i = 0; i < B * Ls; ++i) {
    pos[2 * i] = static_cast<float>(next_u32() % 64);
    pos[2 * i + 1] = static_cast<float>(next_u32() % 64);
  }
  for (int64_t i = 0; i < B * Ld; ++i) {
    src[i] = static_cast<int32_t>(next_u32() % Ls);
    group[i] = static_cast<int32_t>(next_u32() % 300);
    const uint32_t r = next_u32() % 5;
    child[i] = static_cast<int8_t>(r == 4 ? -1 : static_cast<int>(r));
  }

  T *d_x = nullptr, *d_out = nullptr;
  float *d_pos = nullptr, *d_pos_out = nullptr;
  int32_t *d_src = nullptr, *d_group = nullptr;
  int8_t* d_child = nullptr;
  int64_t* d_seeds = nullptr;
  CHECK_CUDA(cudaMalloc(&d_x, x.size() * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&d_out, B * Ld * C * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&d_pos, pos.size() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_pos_out, B * Ld * 2 * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_src, src.size() * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_group, group.size() * sizeof(int32_t)));
  CHECK_CUDA(cudaMalloc(&d_child, child.size() * sizeof(int8_t)));
  CHECK_CUDA(cudaMalloc(&d_seeds, seeds.size() * sizeof(int64_t)));
  CHECK_CUDA(cudaMemcpy(d_x, x.data(), x.size() * sizeof(T), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_pos, pos.data(), pos.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_src, src.data(), src.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_group, group.data(), group.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_child, child.data(), child.size() * sizeof(int8_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_seeds, seeds.data(), seeds.size() * sizeof(int64_t), cudaMemcpyHostToDevice));

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  CHECK_CUDA(ralu_stage_transition_launch(d_x, d_pos, d_src, d_group, d_child, d_seeds, d_out, d_pos_out, B, Ls,
                                          Ld, C, dtype, a, b, c, pos_scale, child_step, exact_noise ? 1 : 0,
                                          stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  CHECK_CUDA(cudaStreamDestroy(stream));

  std::vector<T> out(B * Ld * C);
  std::vector<float> pos_out(B * Ld * 2);
  CHECK_CUDA(cudaMemcpy(out.data(), d_out, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(pos_out.data(), d_pos_out, pos_out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(d_x));
  CHECK_CUDA(cudaFree(d_out));
  CHECK_CUDA(cudaFree(d_pos));
  CHECK_CUDA(cudaFree(d_pos_out));
  CHECK_CUDA(cudaFree(d_src));
  CHECK_CUDA(cudaFree(d_group));
  CHECK_CUDA(cudaFree(d_child));
  CHECK_CUDA(cudaFree(d_seeds));

  const ralu_host::TransitionScalars s = ralu_host::make_scalars(a, b, c, pos_scale, child_step, exact_noise);
  int bad = 0;
  for (int64_t bi = 0; bi < B; ++bi) {
    for (int64_t i = 0; i < Ld; ++i) {
      const int64_t t = bi * Ld + i;
      const int64_t row = bi * Ls + src[t];
      const int q = child[t];
      for (int64_t ch = 0; ch < C; ++ch) {
        const float want = to_float(from_float<T>(ralu_host::transition_value(
            to_float(x[row * C + ch]), static_cast<uint64_t>(seeds[bi]), group[t], C, ch, q, s)));
        const float got = to_float(out[t * C + ch]);
        if (!close(got, want, tol)) {
          if (bad++ < 10)
            std::fprintf(stderr, "%s C=%lld exact=%d out mismatch b=%lld i=%lld ch=%lld q=%d: gpu %.9g host %.9g\n",
                         name, static_cast<long long>(C), exact_noise ? 1 : 0, static_cast<long long>(bi),
                         static_cast<long long>(i), static_cast<long long>(ch), q, got, want);
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
  std::printf("transition %-8s C=%-3lld exact_noise=%d: %lld values, %d mismatches\n", name,
              static_cast<long long>(C), exact_noise ? 1 : 0, static_cast<long long>(B * Ld * C), bad);
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
  for (int64_t C : {64, 16, 12, 5}) {
    for (bool exact : {false, true}) {
      bad += check_transition<float>(RALU_DTYPE_FLOAT32, "float32", 2e-5f, C, exact);
      bad += check_transition<__half>(RALU_DTYPE_FLOAT16, "float16", 2e-3f, C, exact);
      bad += check_transition<__nv_bfloat16>(RALU_DTYPE_BFLOAT16, "bfloat16", 1e-2f, C, exact);
    }
  }
  std::printf(bad == 0 ? "transition_selftest: PASS\n" : "transition_selftest: FAIL\n");
  return bad == 0 ? 0 : 1;
}
