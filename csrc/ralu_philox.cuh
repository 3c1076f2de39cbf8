// ralu_philox.cuh: Philox4x32-10 and the Box-Muller normal transform as CUDA
// device functions, written to reproduce Triton's `tl.randn4x(seed, offset)`
// (triton/language/random.py, Triton 3.x) bit for bit.
//
// What Triton does, and what this file transcribes:
//   * key:     seed (any int, converted to uint64) -> k0 = low 32 bits, k1 = high 32 bits.
//   * counter: offset -> c0 = low 32 bits of offset, c1 = high 32 bits when the
//              offset tensor is 64-bit (0 for an int32 offset), c2 = c3 = 0.
//   * rounds:  10 Philox rounds; in each round
//                c0' = umulhi(B, c2) ^ c1 ^ k0     c2' = umulhi(A, c0) ^ c3 ^ k1
//                c1' = B * c2                      c3' = A * c0
//              then k0 += 0x9E3779B9, k1 += 0xBB67AE85,
//              with A = 0xD2511F53, B = 0xCD9E8D57.
//   * uniform: uint32 bit-cast to int32, x = x < 0 ? ~x : x, float(x) (round to
//              nearest) * 4.6566127342e-10f (bits 0x2FFFFFFF).
//   * normal:  pairs (u0, u1) and (u2, u3):
//                u = max(1e-7f, u_first); th = 6.283185307179586f * u_second;
//                r = sqrt(-2.0f * log(u)); n = (r * cos(th), r * sin(th)).
//
// Floating-point details, checked against the LLVM IR / PTX that Triton 3.9
// generates for tl.randn4x on sm_90 (compiled without a GPU):
//   * log, cos, sin lower to libdevice __nv_logf, __nv_cosf, __nv_sinf (the
//     accurate versions). Triton sets the libdevice reflect flag __CUDA_FTZ=1; the
//     FTZ and non-FTZ paths of these functions differ only for subnormal inputs or
//     intermediates, which cannot occur here (u in [1e-7, 1), th in [0, 2*pi)), so
//     the plain logf/cosf/sinf of nvcc (without --use_fast_math) give the same bits.
//   * tl.sqrt lowers to __nv_sqrtf with __CUDA_PREC_SQRT=0 and FTZ=1, i.e. the PTX
//     instruction sqrt.approx.ftz.f32. We emit exactly that instruction with inline
//     PTX (sqrtf would give the IEEE sqrt.rn.f32 and differ in the last bit).
//   * the products are single roundings (mul.rn); there is no add for the compiler
//     to contract into an FMA, and we use __fmul_rn so none can appear.
//
// The host transcription used by the tests lives in host_reference.h.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace ralu {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

// Bit patterns of the float constants Triton uses (see file comment).
constexpr uint32_t kUniformScaleBits = 0x2FFFFFFFu;  // 4.6566127342e-10f
constexpr uint32_t kTwoPiBits = 0x40C90FDBu;         // 6.283185307179586 -> float
constexpr float kUniformMin = 1.0e-7f;

struct Philox4 {
  uint32_t c0, c1, c2, c3;
};

struct Normal4 {
  float n0, n1, n2, n3;
};

__device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                 uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t prev_c0 = c0;
    const uint32_t prev_c2 = c2;
    c0 = __umulhi(kPhiloxRoundB, prev_c2) ^ c1 ^ k0;
    c2 = __umulhi(kPhiloxRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * prev_c2;
    c3 = kPhiloxRoundA * prev_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{c0, c1, c2, c3};
}

// Triton's randint4x(seed, offset): key from the 64-bit seed, counter (offset_lo, offset_hi, 0, 0).
__device__ __forceinline__ Philox4 randint4x(uint64_t seed, uint32_t offset_lo, uint32_t offset_hi = 0u) {
  const uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
  const uint32_t k1 = static_cast<uint32_t>((seed >> 32) & 0xffffffffull);
  return philox4x32_10(offset_lo, offset_hi, 0u, 0u, k0, k1);
}

// Triton's uint_to_uniform_float for 32-bit inputs: a float in [0, 1).
__device__ __forceinline__ float uint_to_uniform_float(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return __fmul_rn(__int2float_rn(x), __uint_as_float(kUniformScaleBits));
}

// sqrt.approx.ftz.f32: what tl.sqrt compiles to.
__device__ __forceinline__ float sqrt_approx_ftz(float v) {
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

// Triton's pair_uniform_to_normal (Box-Muller).
__device__ __forceinline__ void pair_uniform_to_normal(float u1, float u2, float& n1, float& n2) {
  u1 = fmaxf(kUniformMin, u1);
  const float th = __fmul_rn(__uint_as_float(kTwoPiBits), u2);
  const float r = sqrt_approx_ftz(__fmul_rn(-2.0f, logf(u1)));
  n1 = __fmul_rn(r, cosf(th));
  n2 = __fmul_rn(r, sinf(th));
}

// Only the first normal (what tl.randn returns; also the first of randn4x).
__device__ __forceinline__ float pair_uniform_to_normal_first(float u1, float u2) {
  u1 = fmaxf(kUniformMin, u1);
  const float th = __fmul_rn(__uint_as_float(kTwoPiBits), u2);
  const float r = sqrt_approx_ftz(__fmul_rn(-2.0f, logf(u1)));
  return __fmul_rn(r, cosf(th));
}

// Triton's randn4x(seed, offset) for a 32-bit offset (offset_hi = 0) or a 64-bit one.
__device__ __forceinline__ Normal4 randn4x(uint64_t seed, uint32_t offset_lo, uint32_t offset_hi = 0u) {
  const Philox4 p = randint4x(seed, offset_lo, offset_hi);
  Normal4 n;
  pair_uniform_to_normal(uint_to_uniform_float(p.c0), uint_to_uniform_float(p.c1), n.n0, n.n1);
  pair_uniform_to_normal(uint_to_uniform_float(p.c2), uint_to_uniform_float(p.c3), n.n2, n.n3);
  return n;
}

}  // namespace ralu
