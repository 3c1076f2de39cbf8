// ralu_philox.cuh: Philox4x32-10 and a fast Box-Muller normal transform as CUDA
// device functions. The Philox words and the uniforms reproduce Triton's
// `tl.randint4x` / `tl.rand4x` (triton/language/random.py, Triton 3.x) bit for bit;
// the normals reproduce the Triton kernel in ralu_kernels/transition.py, whose
// Box-Muller uses libdevice fast_logf / fast_cosf / fast_sinf (not tl.randn4x).
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
//
// Normal transform (normal4), pairs (u0, u1) and (u2, u3); the PTX that Triton 3.9
// emits for the fast libdevice calls on sm_90, one instruction per line:
//     v  = max.f32(1e-7f, u_first)
//     th = mul.rn.f32(6.283185307179586f (0x40C90FDB), u_second)
//     lg = mul.rn.f32(lg2.approx.ftz.f32(v), ln2 (0x3F317218))      // fast_logf
//     r  = sqrt.approx.ftz.f32(max.f32(mul.rn.f32(lg, -2.0f), 0.0f)) // tl.sqrt(tl.maximum(..., 0))
//     n_first  = mul.rn.f32(r, cos.approx.ftz.f32(th))              // fast_cosf
//     n_second = mul.rn.f32(r, sin.approx.ftz.f32(th))              // fast_sinf
// The approx instructions are emitted with inline PTX so the sequence is exactly
// this (and ptxas lowers them to MUFU.LG2 / MUFU.COS / MUFU.SIN / MUFU.SQRT, as
// for Triton); products use __fmul_rn so nothing is contracted into an FMA.
// Why fast: the accurate libdevice logf/cosf/sinf made the kernel compute-bound,
// and the noise is rounded to bf16/fp16 anyway; the MUFU approximations have
// ~2^-21 absolute error in [0, 2*pi) / near 1, far below that rounding.
//
// The host transcription used by the tests lives in host_reference.h (it uses
// accurate libm math for the normals, so it agrees to a tolerance, not bitwise).
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
constexpr uint32_t kLn2Bits = 0x3F317218u;           // ln(2) in libdevice fast_logf
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

// The MUFU approximations, as single PTX instructions.
__device__ __forceinline__ float sqrt_approx_ftz(float v) {
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

__device__ __forceinline__ float lg2_approx_ftz(float v) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

__device__ __forceinline__ float cos_approx_ftz(float v) {
  float r;
  asm("cos.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

__device__ __forceinline__ float sin_approx_ftz(float v) {
  float r;
  asm("sin.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

// Fast Box-Muller on one pair of uniforms (see file comment for the exact sequence).
__device__ __forceinline__ void pair_uniform_to_normal_fast(float u_first, float u_second, float& n_first,
                                                            float& n_second) {
  const float v = fmaxf(kUniformMin, u_first);
  const float th = __fmul_rn(__uint_as_float(kTwoPiBits), u_second);
  const float lg = __fmul_rn(lg2_approx_ftz(v), __uint_as_float(kLn2Bits));
  // lg2.approx is specified to an absolute error (~2^-22) near 1, where log2(v) ~ -1e-7: it could
  // come out >= 0 and -2*lg < 0 would make sqrt NaN. Clamp at 0 (max.f32; Triton does the same).
  const float r = sqrt_approx_ftz(fmaxf(__fmul_rn(lg, -2.0f), 0.0f));
  n_first = __fmul_rn(r, cos_approx_ftz(th));
  n_second = __fmul_rn(r, sin_approx_ftz(th));
}

// normal4(seed, off): four N(0, 1) floats from one Philox4x32-10 call at counter (off, 0, 0, 0).
__device__ __forceinline__ Normal4 normal4(uint64_t seed, uint32_t offset) {
  const Philox4 p = randint4x(seed, offset);
  Normal4 n;
  pair_uniform_to_normal_fast(uint_to_uniform_float(p.c0), uint_to_uniform_float(p.c1), n.n0, n.n1);
  pair_uniform_to_normal_fast(uint_to_uniform_float(p.c2), uint_to_uniform_float(p.c3), n.n2, n.n3);
  return n;
}

}  // namespace ralu
