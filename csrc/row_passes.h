// The row passes of the flexigpt CPU kernels on ATen tensors: the forward's finishing pass
// (bias, a base product given by the caller, output norm, residual: one parallel pass over y)
// and the norm backward. They split the rows over threads and call the raw-pointer row kernels
// of cpu/shared_lora_linear_cpu.h for float32 and bfloat16 (the only dtypes they take).
//
//   finish_rows:   v = y [+ add] [+ bias]
//                  out = [gamma (v - mean) rstd] [+ residual]; mean/rstd [M] fp32 written when
//                  gamma is given; keep_y: y is left holding v (out must then be another buffer),
//                  else out may be y itself (in place).
//                  y, out [M, N] contiguous; add, residual [M, N] with unit column stride;
//                  bias, gamma [N] contiguous.
//   norm_backward: (dy [M, N], dgamma [N] fp32, dbias [N] fp32) for the norm above, given the
//                  upstream gradient, y_pre = v, gamma and the statistics; deterministic (rows
//                  cut into at most get_num_threads() chunks with their own accumulators).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace flexigpt {

void finish_rows(const at::Tensor& y, const c10::optional<at::Tensor>& add, const c10::optional<at::Tensor>& bias,
                 bool keep_y, const at::Tensor& out, const c10::optional<at::Tensor>& gamma,
                 const c10::optional<at::Tensor>& residual, const at::Tensor& mean, const at::Tensor& rstd,
                 double eps);

std::vector<at::Tensor> norm_backward(const at::Tensor& grad, const at::Tensor& y_pre, const at::Tensor& gamma,
                                      const at::Tensor& mean, const at::Tensor& rstd);

// a [M, N] operand read by rows with unit stride (copied only when its columns are strided)
inline at::Tensor unit_columns(const at::Tensor& t) {
  return t.size(1) > 1 && t.stride(1) != 1 ? t.contiguous() : t;
}

}  // namespace flexigpt
