// stage_transition.cu: fused RALU stage transition (gather -> nearest upsample ->
// correlated noise with in-kernel Philox -> scale -> scatter, plus position ids),
// group-major ("v2"): one Philox normal4 per (upsampled group, channel) serves the 4
// children, one per (kept token, aligned quad of 4 channels) serves 4 channels.
//
// Pure CUDA: only CUDA runtime / fp16 / bf16 headers, no torch. The torch op lives
// in torch_binding.cpp; the C interface is in stage_transition.h.
//
// Evaluation order (float32), fixed so that the Triton kernel in
// ralu_kernels/transition.py produces the same bits (it uses the same order with
// explicit FMAs, enable_fp_fusion=False, and alpha / noise_std computed in float64
// on the host and passed as float32):
//   normal4(seed, off) = fast Box-Muller of Philox4x32-10 at counter off (ralu_philox.cuh)
//   upsampled child q >= 0 of group g, channel ch:
//     (u0, u1, u2, u3) = normal4(seed[b], uint32(g * C + ch))
//     s = ((u0 + u1) + u2) + u3;   n = fma(alpha, s, u_q)
//   kept token (q < 0), group g, channel ch:
//     (u0, u1, u2, u3) = normal4(seed[b], uint32(g * C + (ch & ~3)));   n = noise_std * u_{ch & 3}
//   out      = round_to_dtype(fma(a, float(x[b, p, ch]), b * n))
//   pos_out  = pos_scale * (pos[b, p, :] + child_step * (q >> 1, q & 1))   (q >= 0)
//              pos_scale * pos[b, p, :]                                     (q <  0)
//   (child_step is added only where the offset is 1, as in the Triton kernel; the same
//   bits as adding child_step * 0 except for a -0.0 position component)
//
// Work decomposition: `order` (B, Ld) lists per image the 4 rows of each of the U
// upsampled groups (child 0..3), then the Ld - 4U kept rows. One launch, grid-stride
// loop over B*U*chunks "up" items followed by B*(Ld-4U)*chunks "kept" items, where a
// chunk is VEC = 16 bytes of channels (8 for bf16/fp16, 4 for fp32; a multiple of 4,
// so kept quads are aligned). Up item: one 16-byte load of the parent's chunk, VEC
// normal4, 4 vector stores (one per child row). Kept item: VEC/4 normal4, one vector
// store. Scalar fallback (VEC = 1) when C % VEC != 0 or a pointer is not 16-byte
// aligned: same math per channel. The chunk-0 thread of an item writes its positions.
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

// Not yet tuned on a GPU.
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
  const int32_t* order;
  const int64_t* seeds;
  float* pos_out;
  int64_t src_len;
  int64_t dst_len;
  int64_t channels;
  int64_t num_up;   // U: upsampled groups per image
  float a;
  float b;
  float alpha;      // (sqrt(1 - 4c) - 1) / 4
  float noise_std;  // sqrt(1 - c) (exact_noise) or 1
  float pos_scale;
  float child_step;
};

__device__ __forceinline__ float select4(const Normal4& u, int k) {
  return k == 0 ? u.n0 : (k == 1 ? u.n1 : (k == 2 ? u.n2 : u.n3));
}

// out = round_to_dtype(fma(a, x, b * n))
template <typename T>
__device__ __forceinline__ T output_value(const TransitionParams& p, float xv, float n) {
  return DtypeOps<T>::from_float(__fmaf_rn(p.a, xv, __fmul_rn(p.b, n)));
}

__device__ __forceinline__ void store_position(const TransitionParams& p, float px, float py, float* po) {
  po[0] = __fmul_rn(p.pos_scale, px);
  po[1] = __fmul_rn(p.pos_scale, py);
}

// One upsampled group x one chunk of VEC channels: 4 output rows.
template <typename T, int VEC, typename IndexT>
__device__ __forceinline__ void up_item(const T* __restrict__ x, T* __restrict__ out, const TransitionParams& p,
                                        IndexT w) {
  const IndexT chunks = static_cast<IndexT>(p.channels / VEC);
  const IndexT channels = static_cast<IndexT>(p.channels);
  const IndexT dst_len = static_cast<IndexT>(p.dst_len);
  const IndexT num_up = static_cast<IndexT>(p.num_up);
  const IndexT gq = w / chunks;  // = image * U + j
  const IndexT chunk = w - gq * chunks;
  const IndexT image = gq / num_up;
  const IndexT j = gq - image * num_up;
  const IndexT img_rows = image * dst_len;

  const int32_t* ord = p.order + img_rows + 4 * j;
  IndexT tok[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) tok[q] = img_rows + static_cast<IndexT>(__ldg(ord + q));
  const int32_t src = __ldg(p.src_index + tok[0]);
  const int32_t g = __ldg(p.group + tok[0]);
  const uint64_t seed = static_cast<uint64_t>(__ldg(p.seeds + image));

  const IndexT src_row = image * static_cast<IndexT>(p.src_len) + static_cast<IndexT>(src);
  const IndexT ch0 = chunk * VEC;
  const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(x + src_row * channels + ch0);

  // Philox counter: uint32(group * C + ch), wrapping like Triton's int32 -> uint32.
  const uint32_t offset0 = static_cast<uint32_t>(g) * static_cast<uint32_t>(p.channels) + static_cast<uint32_t>(ch0);
  Pack<T, VEC> ov[4];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const Normal4 u = normal4(seed, offset0 + static_cast<uint32_t>(k));
    const float s = __fadd_rn(__fadd_rn(__fadd_rn(u.n0, u.n1), u.n2), u.n3);
    const float xf = DtypeOps<T>::to_float(xv.v[k]);
    ov[0].v[k] = output_value<T>(p, xf, __fmaf_rn(p.alpha, s, u.n0));
    ov[1].v[k] = output_value<T>(p, xf, __fmaf_rn(p.alpha, s, u.n1));
    ov[2].v[k] = output_value<T>(p, xf, __fmaf_rn(p.alpha, s, u.n2));
    ov[3].v[k] = output_value<T>(p, xf, __fmaf_rn(p.alpha, s, u.n3));
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) *reinterpret_cast<Pack<T, VEC>*>(out + tok[q] * channels + ch0) = ov[q];

  if (chunk == 0) {
    // child q: + child_step on component 0 if q >> 1, on component 1 if q & 1
    const float px = __ldg(p.pos + src_row * 2);
    const float py = __ldg(p.pos + src_row * 2 + 1);
    const float px1 = __fadd_rn(px, p.child_step);
    const float py1 = __fadd_rn(py, p.child_step);
    store_position(p, px, py, p.pos_out + tok[0] * 2);
    store_position(p, px, py1, p.pos_out + tok[1] * 2);
    store_position(p, px1, py, p.pos_out + tok[2] * 2);
    store_position(p, px1, py1, p.pos_out + tok[3] * 2);
  }
}

// One kept token x one chunk of VEC channels.
template <typename T, int VEC, typename IndexT>
__device__ __forceinline__ void kept_item(const T* __restrict__ x, T* __restrict__ out, const TransitionParams& p,
                                          IndexT w) {
  const IndexT chunks = static_cast<IndexT>(p.channels / VEC);
  const IndexT channels = static_cast<IndexT>(p.channels);
  const IndexT dst_len = static_cast<IndexT>(p.dst_len);
  const IndexT first_kept = static_cast<IndexT>(4 * p.num_up);
  const IndexT kept = dst_len - first_kept;
  const IndexT gk = w / chunks;  // = image * kept + i
  const IndexT chunk = w - gk * chunks;
  const IndexT image = gk / kept;
  const IndexT i = gk - image * kept;
  const IndexT img_rows = image * dst_len;

  const IndexT tok = img_rows + static_cast<IndexT>(__ldg(p.order + img_rows + first_kept + i));
  const int32_t src = __ldg(p.src_index + tok);
  const int32_t g = __ldg(p.group + tok);
  const uint64_t seed = static_cast<uint64_t>(__ldg(p.seeds + image));

  const IndexT src_row = image * static_cast<IndexT>(p.src_len) + static_cast<IndexT>(src);
  const IndexT ch0 = chunk * VEC;
  const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(x + src_row * channels + ch0);

  const uint32_t goff = static_cast<uint32_t>(g) * static_cast<uint32_t>(p.channels);
  Pack<T, VEC> ov;
  if constexpr (VEC % 4 == 0) {
    // ch0 is a multiple of 4: one normal4 per aligned quad.
#pragma unroll
    for (int k4 = 0; k4 < VEC; k4 += 4) {
      const Normal4 u = normal4(seed, goff + static_cast<uint32_t>(ch0) + static_cast<uint32_t>(k4));
      ov.v[k4 + 0] = output_value<T>(p, DtypeOps<T>::to_float(xv.v[k4 + 0]), __fmul_rn(p.noise_std, u.n0));
      ov.v[k4 + 1] = output_value<T>(p, DtypeOps<T>::to_float(xv.v[k4 + 1]), __fmul_rn(p.noise_std, u.n1));
      ov.v[k4 + 2] = output_value<T>(p, DtypeOps<T>::to_float(xv.v[k4 + 2]), __fmul_rn(p.noise_std, u.n2));
      ov.v[k4 + 3] = output_value<T>(p, DtypeOps<T>::to_float(xv.v[k4 + 3]), __fmul_rn(p.noise_std, u.n3));
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const uint32_t ch = static_cast<uint32_t>(ch0) + static_cast<uint32_t>(k);
      const Normal4 u = normal4(seed, goff + (ch & ~3u));
      ov.v[k] = output_value<T>(p, DtypeOps<T>::to_float(xv.v[k]),
                                __fmul_rn(p.noise_std, select4(u, static_cast<int>(ch & 3u))));
    }
  }
  *reinterpret_cast<Pack<T, VEC>*>(out + tok * channels + ch0) = ov;

  if (chunk == 0) {
    store_position(p, __ldg(p.pos + src_row * 2), __ldg(p.pos + src_row * 2 + 1), p.pos_out + tok * 2);
  }
}

// Items [0, up_total) are up items, [up_total, total) kept items.
template <typename T, int VEC, typename IndexT>
__global__ void __launch_bounds__(kThreads)
    stage_transition_kernel(const T* __restrict__ x, T* __restrict__ out, TransitionParams p, IndexT up_total,
                            IndexT total) {
  const IndexT stride = static_cast<IndexT>(gridDim.x) * static_cast<IndexT>(blockDim.x);
  for (IndexT w = static_cast<IndexT>(blockIdx.x) * static_cast<IndexT>(blockDim.x) + threadIdx.x; w < total;
       w += stride) {
    if (w < up_total) {
      up_item<T, VEC, IndexT>(x, out, p, w);
    } else {
      kept_item<T, VEC, IndexT>(x, out, p, w - up_total);
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
cudaError_t launch_typed(const T* x, T* out, const TransitionParams& p, int64_t up_total, int64_t total,
                         cudaStream_t stream) {
  const int64_t needed = (total + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(multiprocessor_count()) * kMaxBlocksPerSm;
  const unsigned blocks = static_cast<unsigned>(needed < cap ? needed : cap);
  stage_transition_kernel<T, VEC, IndexT><<<blocks, kThreads, 0, stream>>>(
      x, out, p, static_cast<IndexT>(up_total), static_cast<IndexT>(total));
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const void* x_ptr, void* out_ptr, const TransitionParams& p, int64_t batch,
                     cudaStream_t stream) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  static_assert(kVec % 4 == 0, "kept quads must be aligned to the vector width");
  const T* x = static_cast<const T*>(x_ptr);
  T* out = static_cast<T*>(out_ptr);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const bool vec = aligned && (p.channels % kVec == 0);
  const int64_t chunks = vec ? p.channels / kVec : p.channels;
  const int64_t up_total = batch * p.num_up * chunks;
  const int64_t total = batch * (p.dst_len - 3 * p.num_up) * chunks;  // B * (U + Ld - 4U) * chunks
  if (total == 0) return cudaSuccess;
  // 32-bit index arithmetic when it cannot overflow (items and all element offsets).
  const int64_t kLimit = int64_t{1} << 31;
  const bool small = total < kLimit && batch * p.dst_len * p.channels < kLimit &&
                     batch * p.src_len * p.channels < kLimit;
  if (vec) {
    return small ? launch_typed<T, kVec, uint32_t>(x, out, p, up_total, total, stream)
                 : launch_typed<T, kVec, uint64_t>(x, out, p, up_total, total, stream);
  }
  return small ? launch_typed<T, 1, uint32_t>(x, out, p, up_total, total, stream)
               : launch_typed<T, 1, uint64_t>(x, out, p, up_total, total, stream);
}

}  // namespace
}  // namespace ralu

extern "C" cudaError_t ralu_stage_transition_launch(
    const void* x, const float* pos, const int32_t* src_index, const int32_t* group, const int8_t* child,
    const int32_t* order, const int64_t* seeds, int64_t num_up, void* out, float* pos_out, int64_t batch,
    int64_t src_len, int64_t dst_len, int64_t channels, ralu_dtype dtype, double a, double b, double c,
    double pos_scale, double child_step, int exact_noise, cudaStream_t stream) {
  (void)child;  // the child slot of each row is implied by `order` (v2 contract)
  if (batch < 0 || src_len < 0 || dst_len < 0 || channels < 0) return cudaErrorInvalidValue;
  if (num_up < 0 || num_up > dst_len / 4) return cudaErrorInvalidValue;  // 0 <= 4U <= Ld
  if (!(c >= 0.0 && c <= 0.25)) return cudaErrorInvalidValue;           // alpha needs 1 - 4c >= 0
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
  p.order = order;
  p.seeds = seeds;
  p.pos_out = pos_out;
  p.src_len = src_len;
  p.dst_len = dst_len;
  p.channels = channels;
  p.num_up = num_up;
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
