/* stage_transition.h: C interface of the fused RALU stage-transition kernel (v2, group-major).
 *
 * Pure CUDA runtime interface (no torch): plain device pointers, sizes, a dtype
 * enum and a stream. All tensors are dense, row-major, on the same device:
 *
 *   x         (B, Ls, C)  dtype      source tokens
 *   pos       (B, Ls, 2)  float32    source positions
 *   src_index (B, Ld)     int32      parent token of each output row, in [0, Ls)
 *   group     (B, Ld)     int32      noise group of each output row
 *   child     (B, Ld)     int8       child slot 0..3 (upsampled) or < 0 (kept); not read by
 *                                    the kernel (implied by `order`), kept for the interface
 *   order     (B, Ld)     int32      per image a permutation of the rows [0, Ld): entries
 *                                    4j+q (j < U, q = 0..3) are the row of child q of the j-th
 *                                    upsampled group (the 4 rows share src_index and group),
 *                                    entries 4U.. are the kept rows (child < 0)
 *   seeds     (B,)        int64      Philox seed per image
 *   num_up    U                      upsampled groups per image, 0 <= 4U <= Ld
 *   out       (B, Ld, C)  dtype      written
 *   pos_out   (B, Ld, 2)  float32    written
 * The caller guarantees the `order` contract; the kernel does not check it.
 *
 * Math (float32; see csrc/stage_transition.cu for the exact evaluation order):
 *   normal4(seed, off) = 4 normals: Philox4x32-10 at counter (off, 0, 0, 0), fast
 *                        Box-Muller (MUFU lg2/cos/sin/sqrt, see ralu_philox.cuh)
 *   q >= 0:  (u0..u3) = normal4(seeds[b], g*C + ch)
 *            n = u_q + alpha * (u0 + u1 + u2 + u3),  alpha = (sqrt(1 - 4c) - 1) / 4
 *   q <  0:  (u0..u3) = normal4(seeds[b], g*C + (ch & ~3))
 *            n = sqrt(v) * u_{ch & 3},  v = exact_noise ? 1 - c : 1
 *   out      = a * x[b, p] + b * n
 *   pos_out  = pos_scale * (pos[b, p] + child_step * (q / 2, q % 2))   (q >= 0)
 *            = pos_scale * pos[b, p]                                    (q <  0)
 * (offsets as uint32, wrapping). One normal4 per (group, channel) serves the 4 children;
 * one per (kept row, aligned quad of channels) serves 4 channels.
 *
 * The launch is asynchronous on `stream`, allocates nothing and never synchronises,
 * so it may be captured in a CUDA graph. Returns the launch status
 * (cudaErrorInvalidValue for bad sizes, c outside [0, 1/4] or 4 * num_up > Ld).
 */
#ifndef RALU_STAGE_TRANSITION_H_
#define RALU_STAGE_TRANSITION_H_

#include <stdint.h>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum ralu_dtype {
  RALU_DTYPE_FLOAT32 = 0,
  RALU_DTYPE_FLOAT16 = 1,
  RALU_DTYPE_BFLOAT16 = 2
} ralu_dtype;

cudaError_t ralu_stage_transition_launch(
    const void* x, const float* pos, const int32_t* src_index, const int32_t* group,
    const int8_t* child, const int32_t* order, const int64_t* seeds, int64_t num_up, void* out,
    float* pos_out, int64_t batch, int64_t src_len, int64_t dst_len, int64_t channels,
    ralu_dtype dtype, double a, double b, double c, double pos_scale, double child_step,
    int exact_noise, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* RALU_STAGE_TRANSITION_H_ */
