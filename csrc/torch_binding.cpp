// torch_binding.cpp: registers torch.ops.ralu.stage_transition (CUDA) around the
// pure-CUDA launcher in stage_transition.cu (v2, group-major: `order` / `num_up`
// as described in stage_transition.h; the caller validates the order contract).
//
// The op mutates its preallocated outputs and returns nothing, allocates nothing and
// never synchronises, so it can be captured in a CUDA graph. Its fake (meta)
// kernel is registered in Python (ralu_kernels/_csrc.py) so torch.compile can trace
// it. The library block is a FRAGMENT so that Python code may register other ops in
// the same `ralu` namespace (torch.library.custom_op uses fragments too).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdio>
#include <string>

#include "stage_transition.h"

// Error messages are formatted with snprintf, never with iostream number insertion: on the H200 image
// (torch 2.11 wheel, extension built by the system g++ 13) c10::str's ostream << long crashed with
// SIGSEGV inside a libstdc++ locale facet, turning a bad-argument error into a process crash.
static std::string ralu_fmt(const char* fmt, long long a, long long b = 0) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), fmt, a, b);
  return std::string(buf);
}
static std::string ralu_fmt_f(const char* fmt, double a) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), fmt, a);
  return std::string(buf);
}

namespace {

void check_cuda_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "ralu::stage_transition: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), "ralu::stage_transition: ", name, " must be contiguous");
}

void stage_transition_cuda(const at::Tensor& x, const at::Tensor& pos, const at::Tensor& src_index,
                           const at::Tensor& group, const at::Tensor& child, const at::Tensor& order,
                           const at::Tensor& seeds, int64_t num_up, double a, double b, double c, double pos_scale,
                           double child_step, bool exact_noise, const at::Tensor& out, const at::Tensor& pos_out) {
  check_cuda_contiguous(x, "x");
  check_cuda_contiguous(pos, "pos");
  check_cuda_contiguous(src_index, "src_index");
  check_cuda_contiguous(group, "group");
  check_cuda_contiguous(child, "child");
  check_cuda_contiguous(order, "order");
  check_cuda_contiguous(seeds, "seeds");
  check_cuda_contiguous(out, "out");
  check_cuda_contiguous(pos_out, "pos_out");

  TORCH_CHECK(x.dim() == 3, "ralu::stage_transition: x must be (B, Ls, C)");
  const int64_t B = x.size(0), Ls = x.size(1), C = x.size(2);
  TORCH_CHECK(src_index.dim() == 2 && src_index.size(0) == B,
              "ralu::stage_transition: src_index must be (B, Ld)");
  const int64_t Ld = src_index.size(1);
  TORCH_CHECK(pos.dim() == 3 && pos.size(0) == B && pos.size(1) == Ls && pos.size(2) == 2,
              "ralu::stage_transition: pos must be (B, Ls, 2)");
  TORCH_CHECK(group.sizes() == src_index.sizes(), "ralu::stage_transition: group must be (B, Ld)");
  TORCH_CHECK(child.sizes() == src_index.sizes(), "ralu::stage_transition: child must be (B, Ld)");
  TORCH_CHECK(order.sizes() == src_index.sizes(), "ralu::stage_transition: order must be (B, Ld)");
  TORCH_CHECK(num_up >= 0 && num_up <= Ld / 4,
              ralu_fmt("ralu::stage_transition: num_up must satisfy 0 <= 4 * num_up <= Ld = %lld, got num_up = %lld",
                       static_cast<long long>(Ld), static_cast<long long>(num_up)));
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == B, "ralu::stage_transition: seeds must be (B,)");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == Ld && out.size(2) == C,
              "ralu::stage_transition: out must be (B, Ld, C)");
  TORCH_CHECK(pos_out.dim() == 3 && pos_out.size(0) == B && pos_out.size(1) == Ld && pos_out.size(2) == 2,
              "ralu::stage_transition: pos_out must be (B, Ld, 2)");

  TORCH_CHECK(pos.scalar_type() == at::kFloat && pos_out.scalar_type() == at::kFloat,
              "ralu::stage_transition: pos and pos_out must be float32");
  TORCH_CHECK(src_index.scalar_type() == at::kInt && group.scalar_type() == at::kInt &&
                  order.scalar_type() == at::kInt,
              "ralu::stage_transition: src_index, group and order must be int32");
  TORCH_CHECK(child.scalar_type() == at::kChar, "ralu::stage_transition: child must be int8");
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "ralu::stage_transition: seeds must be int64");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "ralu::stage_transition: out must have the dtype of x");

  ralu_dtype dtype;
  switch (x.scalar_type()) {
    case at::kFloat:
      dtype = RALU_DTYPE_FLOAT32;
      break;
    case at::kHalf:
      dtype = RALU_DTYPE_FLOAT16;
      break;
    case at::kBFloat16:
      dtype = RALU_DTYPE_BFLOAT16;
      break;
    default:
      TORCH_CHECK(false, "ralu::stage_transition: x must be float32, float16 or bfloat16, got ",
                  std::string(c10::toString(x.scalar_type())));
  }
  TORCH_CHECK(c >= 0.0 && c <= 0.25, ralu_fmt_f("ralu::stage_transition: c must be in [0, 0.25], got %g", c));
  TORCH_CHECK(B * Ld == 0 || (Ls > 0 && C > 0), "ralu::stage_transition: Ls and C must be positive");
  if (B * Ld == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = ralu_stage_transition_launch(
      x.data_ptr(), pos.data_ptr<float>(), src_index.data_ptr<int32_t>(), group.data_ptr<int32_t>(),
      child.data_ptr<int8_t>(), order.data_ptr<int32_t>(), seeds.data_ptr<int64_t>(), num_up, out.data_ptr(),
      pos_out.data_ptr<float>(), B, Ls, Ld, C, dtype, a, b, c, pos_scale, child_step, exact_noise ? 1 : 0, stream);
  TORCH_CHECK(err == cudaSuccess, "ralu::stage_transition: kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ralu, m) {
  m.def(
      "stage_transition(Tensor x, Tensor pos, Tensor src_index, Tensor group, Tensor child, Tensor order, "
      "Tensor seeds, int num_up, float a, float b, float c, float pos_scale, float child_step, bool exact_noise, "
      "Tensor(a!) out, Tensor(b!) pos_out) -> ()");
}

TORCH_LIBRARY_IMPL(ralu, CUDA, m) { m.impl("stage_transition", &stage_transition_cuda); }

// Importable as `ralu_kernels._C`; importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "RALU CUDA ops (registered as torch.ops.ralu.*)",
      -1,
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
