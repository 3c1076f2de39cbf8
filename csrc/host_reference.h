// host_reference.h: host C++ (C++14, no CUDA needed) transcription of the Philox
// normals in ralu_philox.cuh and of the v2 (group-major) stage-transition math in
// stage_transition.cu, per output row. Used by csrc/tests/transition_selftest.cu
// (GPU vs CPU) and by tests/test_csrc.py (compiled with g++, compared against
// Triton's tl.randint4x / tl.randn4x under TRITON_INTERPRET=1 and against the torch
// reference). Independent of ralu_philox.cuh on purpose: it is the tests' reference.
//
// The integer part (key/counter layout, rounds, constants) and the uniform
// conversion are the same formulas as the device code, so their results are
// bitwise identical. The Box-Muller step is the accurate one of tl.randn4x (host
// libm logf/cosf/sinf and an IEEE sqrt); the device uses the MUFU approximations
// lg2/cos/sin/sqrt.approx, which the host cannot reproduce. So the normals agree
// to a tolerance (~2^-21 absolute), not bitwise. Compile without -ffast-math and
// with -ffp-contract=off so no FMA is formed implicitly.
#ifndef RALU_HOST_REFERENCE_H_
#define RALU_HOST_REFERENCE_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace ralu_host {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;
constexpr uint32_t kUniformScaleBits = 0x2FFFFFFFu;  // 4.6566127342e-10f
constexpr uint32_t kTwoPiBits = 0x40C90FDBu;         // float(6.283185307179586)
constexpr float kUniformMin = 1.0e-7f;

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t umulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
}

struct Philox4 {
  uint32_t c0, c1, c2, c3;
};

struct Normal4 {
  float n0, n1, n2, n3;
};

inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t prev_c0 = c0;
    const uint32_t prev_c2 = c2;
    c0 = umulhi32(kPhiloxRoundB, prev_c2) ^ c1 ^ k0;
    c2 = umulhi32(kPhiloxRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * prev_c2;
    c3 = kPhiloxRoundA * prev_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Philox4{c0, c1, c2, c3};
}

inline Philox4 randint4x(uint64_t seed, uint32_t offset_lo, uint32_t offset_hi = 0u) {
  return philox4x32_10(offset_lo, offset_hi, 0u, 0u, static_cast<uint32_t>(seed & 0xffffffffull),
                       static_cast<uint32_t>(seed >> 32));
}

inline float uint_to_uniform_float(uint32_t bits) {
  int32_t x;
  std::memcpy(&x, &bits, sizeof x);
  x = x < 0 ? ~x : x;
  const float xf = static_cast<float>(x);  // round to nearest, like cvt.rn.f32.s32
  return xf * bits_to_float(kUniformScaleBits);
}

inline void pair_uniform_to_normal(float u1, float u2, float& n1, float& n2) {
  u1 = std::fmax(kUniformMin, u1);
  const float th = bits_to_float(kTwoPiBits) * u2;
  const float r = std::sqrt(-2.0f * std::log(u1));
  n1 = r * std::cos(th);
  n2 = r * std::sin(th);
}

inline Normal4 randn4x(uint64_t seed, uint32_t offset_lo, uint32_t offset_hi = 0u) {
  const Philox4 p = randint4x(seed, offset_lo, offset_hi);
  Normal4 n;
  pair_uniform_to_normal(uint_to_uniform_float(p.c0), uint_to_uniform_float(p.c1), n.n0, n.n1);
  pair_uniform_to_normal(uint_to_uniform_float(p.c2), uint_to_uniform_float(p.c3), n.n2, n.n3);
  return n;
}

struct TransitionScalars {
  float a, b, alpha, noise_std, pos_scale, child_step;
};

// Same float32 rounding of the host scalars as ralu_stage_transition_launch.
inline TransitionScalars make_scalars(double a, double b, double c, double pos_scale, double child_step,
                                      bool exact_noise) {
  TransitionScalars s;
  s.a = static_cast<float>(a);
  s.b = static_cast<float>(b);
  s.alpha = static_cast<float>((std::sqrt(1.0 - 4.0 * c) - 1.0) / 4.0);
  s.noise_std = static_cast<float>(exact_noise ? std::sqrt(1.0 - c) : 1.0);
  s.pos_scale = static_cast<float>(pos_scale);
  s.child_step = static_cast<float>(child_step);
  return s;
}

// Noise of one output element (v2): upsampled child q >= 0 of a group uses the normal4 at
// counter goff + ch (shared by the 4 children), a kept token (q < 0) the normal4 at the
// aligned quad goff + (ch & ~3), component ch & 3. goff = uint32(group * C).
inline float transition_noise(uint64_t seed, uint32_t goff, uint32_t ch, int q, const TransitionScalars& s) {
  if (q >= 0) {
    const Normal4 u = randn4x(seed, goff + ch);
    const float sum = ((u.n0 + u.n1) + u.n2) + u.n3;
    const float uq = q == 0 ? u.n0 : (q == 1 ? u.n1 : (q == 2 ? u.n2 : u.n3));
    return std::fma(s.alpha, sum, uq);
  }
  const Normal4 u = randn4x(seed, goff + (ch & ~3u));
  const uint32_t k = ch & 3u;
  const float uk = k == 0 ? u.n0 : (k == 1 ? u.n1 : (k == 2 ? u.n2 : u.n3));
  return s.noise_std * uk;
}

// Float32 result of one output element (before the cast to the output dtype).
inline float transition_value(float x, uint64_t seed, int32_t group, int64_t channels, int64_t ch, int q,
                              const TransitionScalars& s) {
  const uint32_t goff = static_cast<uint32_t>(group) * static_cast<uint32_t>(channels);
  const float n = transition_noise(seed, goff, static_cast<uint32_t>(ch), q, s);
  return std::fma(s.a, x, s.b * n);
}

// pos_out for one token: (px, py) of the parent in, scaled and offset values out. (The kernels
// add child_step only where the offset is 1: the same bits except for a -0.0 component.)
inline void transition_position(float px, float py, int q, const TransitionScalars& s, float& ox, float& oy) {
  if (q >= 0) {
    px = px + s.child_step * static_cast<float>(q >> 1);
    py = py + s.child_step * static_cast<float>(q & 1);
  }
  ox = s.pos_scale * px;
  oy = s.pos_scale * py;
}

}  // namespace ralu_host

#endif  // RALU_HOST_REFERENCE_H_
