// stage_transition.cu: fused RALU stage transition (gather -> nearest upsample ->
// correlated noise with in-kernel Philox -> scale -> scatter, plus position ids).
//
// Pure CUDA: only CUDA runtime / fp16 / bf16 headers, no torch. The torch op lives
// in torch_binding.cpp; the C interface is in stage_transition.h.
//
// Evaluation order (float32), fixed so that the Triton kernel can produce the
// same bits. The Triton kernel must (a) use the same order with explicit FMAs,
// tl.fma(alpha, s, u_q) and tl.fma(a, x, b * n), (b) be compiled with
// enable_fp_fusion=False (with fusion on, ptxas/LLVM fuse the last multiply of
// tl.randn4x into the following add and ~0.4% of float32 outputs differ by an
// ulp), and (c) get alpha and sqrt(v) computed in float64 in Python and the
// scalars as float32 kernel arguments. Checked on an H100 (Triton 3.6): with
// (a)-(c) the outputs are bitwise equal for float32, float16 and bfloat16.
//   (u0, u1, u2, u3) = randn4x(seed[b], uint32(group * C + ch))
//   q >= 0:  s = ((u0 + u1) + u2) + u3;   n = fma(alpha, s, u_q)
//   q <  0:  n = noise_std * u0
//   out      = round_to_dtype(fma(a, float(x[b, p, ch]), b * n))
//   pos_out  = pos_scale * (pos[b, p, :] + child_step * (q >> 1, q & 1))   (q >= 0)
//              pos_scale * pos[b, p, :]                                     (q <  0)
//
// Work decomposition: one thread per (output token, 16-byte chunk of channels),
// i.e. 8 channels per thread for bf16/fp16 and 4 for fp32, C/VEC threads per token
// (8 threads = 128 bytes per token for C = 64 bf16), grid-stride loop over all
// chunks of all tokens of all images. Loads and stores are 16-byte vectors when C
// and the pointers allow it, else scalar. The thread holding channel chunk 0
// writes the token's position.
#include "stage_transition.h"

#include <atomic>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ralu_philox.cuh"

namespace ralu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerSm = 8;

template <typename T>
struct DtypeOps;

template <>
struct DtypeOps<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct DtypeOps<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct DtypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

struct TransitionParams {
  const float* pos;
  const int32_t* src_index;
  const int32_t* group;
  const int8_t* child;
  const int64_t* seeds;
  float* pos_out;
  int64_t src_len;
  int64_t dst_len;
  int64_t channels;
  float a;
  float b;
  float alpha;      // (sqrt(1 - 4c) - 1) / 4
  float noise_std;  // sqrt(1 - c) (exact_noise) or 1
  float pos_scale;
  float child_step;
};

// Noise value for one channel: the exact op sequence described in the file comment.
__device__ __forceinline__ float transition_noise(uint64_t seed, uint32_t offset, int q, float alpha,
                                                  float noise_std) {
  if (q >= 0) {
    const Normal4 u = randn4x(seed, offset);
    const float s = __fadd_rn(__fadd_rn(__fadd_rn(u.n0, u.n1), u.n2), u.n3);
    const float uq = q == 0 ? u.n0 : (q == 1 ? u.n1 : (q == 2 ? u.n2 : u.n3));
    return __fmaf_rn(alpha, s, uq);
  }
  const Philox4 r = randint4x(seed, offset);
  const float u0 = pair_uniform_to_normal_first(uint_to_uniform_float(r.c0), uint_to_uniform_float(r.c1));
  return __fmul_rn(noise_std, u0);
}

template <typename T, int VEC, typename IndexT>
__global__ void __launch_bounds__(kThreads)
    stage_transition_kernel(const T* __restrict__ x, T* __restrict__ out, TransitionParams p, IndexT total) {
  const IndexT chunks = static_cast<IndexT>(p.channels / VEC);
  const IndexT dst_len = static_cast<IndexT>(p.dst_len);
  const IndexT stride = static_cast<IndexT>(gridDim.x) * static_cast<IndexT>(blockDim.x);
  for (IndexT w = static_cast<IndexT>(blockIdx.x) * static_cast<IndexT>(blockDim.x) + threadIdx.x; w < total;
       w += stride) {
    const IndexT token = w / chunks;  // = image * dst_len + i
    const IndexT chunk = w - token * chunks;
    const IndexT image = token / dst_len;

    const int32_t src = __ldg(p.src_index + token);
    const int32_t g = __ldg(p.group + token);
    const int q = static_cast<int>(__ldg(p.child + token));
    const uint64_t seed = static_cast<uint64_t>(__ldg(p.seeds + image));

    const int64_t src_row = static_cast<int64_t>(image) * p.src_len + src;
    const int64_t ch0 = static_cast<int64_t>(chunk) * VEC;
    const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(x + src_row * p.channels + ch0);

    // Philox counter: uint32(group * C + ch), wrapping like Triton's int32 -> uint32.
    const uint32_t offset0 = static_cast<uint32_t>(g) * static_cast<uint32_t>(p.channels) +
                             static_cast<uint32_t>(ch0);
    Pack<T, VEC> ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float n = transition_noise(seed, offset0 + static_cast<uint32_t>(k), q, p.alpha, p.noise_std);
      const float v = __fmaf_rn(p.a, DtypeOps<T>::to_float(xv.v[k]), __fmul_rn(p.b, n));
      ov.v[k] = DtypeOps<T>::from_float(v);
    }
    *reinterpret_cast<Pack<T, VEC>*>(out + static_cast<int64_t>(token) * p.channels + ch0) = ov;

    if (chunk == 0) {
      float px = __ldg(p.pos + src_row * 2);
      float py = __ldg(p.pos + src_row * 2 + 1);
      if (q >= 0) {
        px = __fadd_rn(px, __fmul_rn(p.child_step, static_cast<float>(q >> 1)));
        py = __fadd_rn(py, __fmul_rn(p.child_step, static_cast<float>(q & 1)));
      }
      float* po = p.pos_out + static_cast<int64_t>(token) * 2;
      po[0] = __fmul_rn(p.pos_scale, px);
      po[1] = __fmul_rn(p.pos_scale, py);
    }
  }
}

int multiprocessor_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 132;
  if (dev < 64) {
    const int cached = cache[dev].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || count <= 0) {
    (void)cudaGetLastError();
    count = 132;
  }
  if (dev < 64) cache[dev].store(count, std::memory_order_relaxed);
  return count;
}

template <typename T, int VEC, typename IndexT>
cudaError_t launch_typed(const T* x, T* out, const TransitionParams& p, int64_t total, cudaStream_t stream) {
  const int64_t needed = (total + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * kMaxBlocksPerSm;
  const unsigned blocks = static_cast<unsigned>(needed < cap ? needed : cap);
  stage_transition_kernel<T, VEC, IndexT><<<blocks, kThreads, 0, stream>>>(x, out, p, static_cast<IndexT>(total));
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const void* x_ptr, void* out_ptr, const TransitionParams& p, int64_t batch,
                     cudaStream_t stream) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  const T* x = static_cast<const T*>(x_ptr);
  T* out = static_cast<T*>(out_ptr);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const bool vec = aligned && (p.channels % kVec == 0);
  const int64_t tokens = batch * p.dst_len;
  const int64_t total = tokens * (vec ? p.channels / kVec : p.channels);
  if (total == 0) return cudaSuccess;
  // 32-bit index arithmetic when it cannot overflow (also the element offsets).
  const bool small = total < (int64_t{1} << 31) && tokens * p.channels < (int64_t{1} << 31);
  if (vec) {
    return small ? launch_typed<T, kVec, uint32_t>(x, out, p, total, stream)
                 : launch_typed<T, kVec, uint64_t>(x, out, p, total, stream);
  }
  return small ? launch_typed<T, 1, uint32_t>(x, out, p, total, stream)
               : launch_typed<T, 1, uint64_t>(x, out, p, total, stream);
}

}  // namespace
}  // namespace ralu

extern "C" cudaError_t ralu_stage_transition_launch(
    const void* x, const float* pos, const int32_t* src_index, const int32_t* group, const int8_t* child,
    const int64_t* seeds, void* out, float* pos_out, int64_t batch, int64_t src_len, int64_t dst_len,
    int64_t channels, ralu_dtype dtype, double a, double b, double c, double pos_scale, double child_step,
    int exact_noise, cudaStream_t stream) {
  if (batch < 0 || src_len < 0 || dst_len < 0 || channels < 0) return cudaErrorInvalidValue;
  if (!(c >= 0.0 && c <= 0.25)) return cudaErrorInvalidValue;  // alpha needs 1 - 4c >= 0
  if (batch == 0 || dst_len == 0) return cudaSuccess;
  if (src_len == 0) return cudaErrorInvalidValue;
  if (channels == 0) {
    // Only positions would be written; keep the kernel simple and require C > 0.
    return cudaErrorInvalidValue;
  }

  ralu::TransitionParams p;
  p.pos = pos;
  p.src_index = src_index;
  p.group = group;
  p.child = child;
  p.seeds = seeds;
  p.pos_out = pos_out;
  p.src_len = src_len;
  p.dst_len = dst_len;
  p.channels = channels;
  p.a = static_cast<float>(a);
  p.b = static_cast<float>(b);
  p.alpha = static_cast<float>((std::sqrt(1.0 - 4.0 * c) - 1.0) / 4.0);
  p.noise_std = static_cast<float>(exact_noise ? std::sqrt(1.0 - c) : 1.0);
  p.pos_scale = static_cast<float>(pos_scale);
  p.child_step = static_cast<float>(child_step);

  switch (dtype) {
    case RALU_DTYPE_FLOAT32:
      return ralu::dispatch<float>(x, out, p, batch, stream);
    case RALU_DTYPE_FLOAT16:
      return ralu::dispatch<__half>(x, out, p, batch, stream);
    case RALU_DTYPE_BFLOAT16:
      return ralu::dispatch<__nv_bfloat16>(x, out, p, batch, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
