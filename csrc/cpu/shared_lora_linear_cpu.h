// Row kernels of shared_lora_linear on the CPU: the norm + residual finishing pass of the
// forward and the norm backward. They know nothing of PyTorch: raw pointers, sizes, a row
// range. The caller (csrc/bindings.cpp) runs the GEMMs with ATen and splits the rows over
// threads; each call here handles rows [row_begin, row_end) sequentially.
//
//   y [M, N] (row stride N)       the GEMM output  x W^T + scale (x A^T) B^T, bias not yet added
//   add [M, N] (row stride given) or nullptr: a base product computed elsewhere (the epilogue op)
//   forward:                      v_ij = y_ij [+ add_ij] [+ bias_j]  (the pre-norm output; written
//                                 back to y when keep_y, so that y holds it for the backward)
//            gamma != nullptr:    mean_i = mean_j v_ij,  rstd_i = 1 / sqrt(var_j v_ij + eps)
//                                 out_ij = gamma_j (v_ij - mean_i) rstd_i [+ residual_ij]
//            gamma == nullptr:    out_ij = v_ij [+ residual_ij]
//   backward (gamma required):    xhat = (y - mean) rstd,  gg = g gamma
//                                 dy = rstd (gg - mean_j(gg) - xhat mean_j(gg xhat))
//                                 dgamma_acc_j += sum_i g_ij xhat_ij,  dbias_acc_j += sum_i dy_ij
//
// Statistics and arithmetic are fp32 (two passes over each row, which stays in cache; a third,
// rescaled pass only for a row whose sum of squared deviations overflows, so rows of outputs
// near 1e19 still normalise wherever var or rstd is representable in fp32).
// Element types: float, or bfloat16 as raw uint16_t bits (round-to-nearest-even stores).
// `out` may equal `y` (in place, keep_y false); other pointers must not overlap the outputs.
#pragma once

#include <cstdint>

namespace flexigpt {
namespace cpu {

using bf16_bits = uint16_t;

void finish_rows_f32(float* y, const float* add, int64_t add_row_stride, const float* bias, bool keep_y,
                     float* out, const float* gamma, const float* residual, int64_t residual_row_stride,
                     float* mean, float* rstd, int64_t n, float eps, int64_t row_begin, int64_t row_end);

void finish_rows_bf16(bf16_bits* y, const bf16_bits* add, int64_t add_row_stride, const bf16_bits* bias,
                      bool keep_y, bf16_bits* out, const bf16_bits* gamma, const bf16_bits* residual,
                      int64_t residual_row_stride, float* mean, float* rstd, int64_t n, float eps,
                      int64_t row_begin, int64_t row_end);

void norm_backward_rows_f32(const float* grad, int64_t grad_row_stride, const float* y,
                            const float* gamma, const float* mean, const float* rstd, float* dy,
                            float* dgamma_acc, float* dbias_acc, int64_t n, int64_t row_begin,
                            int64_t row_end);

void norm_backward_rows_bf16(const bf16_bits* grad, int64_t grad_row_stride, const bf16_bits* y,
                             const bf16_bits* gamma, const float* mean, const float* rstd,
                             bf16_bits* dy, float* dgamma_acc, float* dbias_acc, int64_t n,
                             int64_t row_begin, int64_t row_end);

}  // namespace cpu
}  // namespace flexigpt
