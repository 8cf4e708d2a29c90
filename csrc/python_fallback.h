// Handing a call of shared_lora_linear_fwd to the Python backends: its _py twin op, whose
// kernel (flexigpt_kernels/ops/shared_lora_linear.py) runs the backend the registry resolves.
// Used by the op's native kernels (CPU: csrc/bindings.cpp, CUDA: csrc/cuda/bindings_cuda.cpp)
// for the calls they do not take.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace flexigpt {

using FwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline FwdResult python_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, double scale, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& norm_weight, double eps,
                                const std::optional<at::Tensor>& residual, bool save_for_backward) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("flexigpt::_shared_lora_linear_fwd_py", "")
                             .typed<FwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, double, const std::optional<at::Tensor>&,
                                              const std::optional<at::Tensor>&, double,
                                              const std::optional<at::Tensor>&, bool)>();
  return op.call(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward);
}

}  // namespace flexigpt
