/* stage_transition.h: C interface of the fused RALU stage-transition kernel.
 *
 * Pure CUDA runtime interface (no torch): plain device pointers, sizes, a dtype
 * enum and a stream. All tensors are dense, row-major, on the same device:
 *
 *   x         (B, Ls, C)  dtype      source tokens
 *   pos       (B, Ls, 2)  float32    source positions
 *   src_index (B, Ld)     int32      parent token of each output token, in [0, Ls)
 *   group     (B, Ld)     int32      noise group of each output token (offset = group*C + ch)
 *   child     (B, Ld)     int8       child slot 0..3 (upsampled) or < 0 (not upsampled)
 *   seeds     (B,)        int64      Philox seed per image
 *   out       (B, Ld, C)  dtype      written
 *   pos_out   (B, Ld, 2)  float32    written
 *
 * Math (float32; see csrc/stage_transition.cu for the exact evaluation order):
 *   (u0..u3) = randn4x(seeds[b], group*C + ch)   (Triton tl.randn4x, bitwise)
 *   q >= 0:  n = u_q + alpha * (u0 + u1 + u2 + u3),  alpha = (sqrt(1 - 4c) - 1) / 4
 *   q <  0:  n = sqrt(v) * u0,  v = exact_noise ? 1 - c : 1
 *   out      = a * x[b, p] + b * n
 *   pos_out  = pos_scale * (pos[b, p] + child_step * (q / 2, q % 2))   (q >= 0)
 *            = pos_scale * pos[b, p]                                    (q <  0)
 *
 * The launch is asynchronous on `stream`, allocates nothing and never synchronises,
 * so it may be captured in a CUDA graph. Returns the launch status.
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
    const int8_t* child, const int64_t* seeds, void* out, float* pos_out,
    int64_t batch, int64_t src_len, int64_t dst_len, int64_t channels, ralu_dtype dtype,
    double a, double b, double c, double pos_scale, double child_step, int exact_noise,
    cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* RALU_STAGE_TRANSITION_H_ */
