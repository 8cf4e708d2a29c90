// Argument checks shared by the CPU kernels of the flexigpt ops (csrc/*.cpp). Every message
// starts with the op's prefix and names the argument and the shapes; TORCH_CHECK_VALUE /
// TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <vector>

namespace flexigpt {

inline std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

// t is a CPU tensor of `dtype` (the dtype of the argument called `ref`).
inline void check_cpu_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype,
                            const char* ref = "x") {
  TORCH_CHECK_TYPE(t.device().is_cpu(), op, name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, name, " has dtype ", t.scalar_type(), " but ", ref,
                   " has dtype ", dtype, "; all tensors must share it");
}

inline void check_shape(const char* op, const at::Tensor& t, const char* name, std::vector<int64_t> expected,
                        const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), op, name, " must be ", what, " = ",
                    at::IntArrayRef(expected), ", got shape ", shape_of(t));
}

// The first operand of an op: a 2-D CPU tensor of a supported floating dtype.
inline void check_leading(const char* op, const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_TYPE(t.device().is_cpu(), op, name, " must be a CPU tensor, got one on ", t.device(),
                   " (CUDA tensors go to flexigpt_kernels._C_cuda or Triton)");
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op, name,
                   " has dtype ", dt, "; supported: float16, bfloat16, float32, float64");
  TORCH_CHECK_VALUE(t.dim() == 2, op, name, " must be 2-D ", layout, " (flatten the leading dims), got shape ",
                    shape_of(t));
}

inline void check_scale_eps(const char* op, const char* name, double scale, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, name, " must be a finite float, got ", scale);
  TORCH_CHECK_VALUE(eps > 0, op, "eps must be a positive float, got ", eps);
}

inline bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace flexigpt
