// The row passes of the flexigpt CPU kernels on ATen tensors (see row_passes.h).
#include "row_passes.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/shared_lora_linear_cpu.h"

namespace flexigpt {
namespace {

using at::Tensor;
using bits = cpu::bf16_bits;

// Rows per parallel task: enough elements (~32k) to outweigh the scheduling.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n)); }

template <typename T>
T* ptr(const Tensor& t);
template <>
float* ptr<float>(const Tensor& t) {
  return t.data_ptr<float>();
}
template <>
bits* ptr<bits>(const Tensor& t) {
  return reinterpret_cast<bits*>(t.data_ptr<at::BFloat16>());
}
template <typename T>
const T* opt_ptr(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? ptr<T>(*t) : nullptr;
}

void finish_range(float* y, const float* add, int64_t as, const float* bias, bool keep, float* out, const float* g,
                  const float* res, int64_t rs, float* mean, float* rstd, int64_t n, float eps, int64_t b, int64_t e) {
  cpu::finish_rows_f32(y, add, as, bias, keep, out, g, res, rs, mean, rstd, n, eps, b, e);
}
void finish_range(bits* y, const bits* add, int64_t as, const bits* bias, bool keep, bits* out, const bits* g,
                  const bits* res, int64_t rs, float* mean, float* rstd, int64_t n, float eps, int64_t b, int64_t e) {
  cpu::finish_rows_bf16(y, add, as, bias, keep, out, g, res, rs, mean, rstd, n, eps, b, e);
}

template <typename T>
void finish_typed(const Tensor& y, const c10::optional<Tensor>& add, const c10::optional<Tensor>& bias, bool keep_y,
                  const Tensor& out, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& residual,
                  const Tensor& mean, const Tensor& rstd, double eps) {
  const int64_t m = y.size(0), n = y.size(1);
  const bool has_norm = gamma.has_value() && gamma->defined();
  T* yp = ptr<T>(y);
  T* op = ptr<T>(out);
  const T* ap = opt_ptr<T>(add);
  const T* bp = opt_ptr<T>(bias);
  const T* gp = opt_ptr<T>(gamma);
  const T* rp = opt_ptr<T>(residual);
  const int64_t as = ap != nullptr ? add->stride(0) : 0;
  const int64_t rs = rp != nullptr ? residual->stride(0) : 0;
  float* mean_p = has_norm ? mean.data_ptr<float>() : nullptr;
  float* rstd_p = has_norm ? rstd.data_ptr<float>() : nullptr;
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, m, row_grain(n), [&](int64_t b, int64_t e) {
    finish_range(yp, ap, as, bp, keep_y, op, gp, rp, rs, mean_p, rstd_p, n, feps, b, e);
  });
}

}  // namespace

void finish_rows(const Tensor& y, const c10::optional<Tensor>& add, const c10::optional<Tensor>& bias, bool keep_y,
                 const Tensor& out, const c10::optional<Tensor>& gamma, const c10::optional<Tensor>& residual,
                 const Tensor& mean, const Tensor& rstd, double eps) {
  if (y.scalar_type() == at::kFloat) {
    finish_typed<float>(y, add, bias, keep_y, out, gamma, residual, mean, rstd, eps);
  } else {
    TORCH_CHECK(y.scalar_type() == at::kBFloat16, "flexigpt row pass: float32 or bfloat16 only");
    finish_typed<bits>(y, add, bias, keep_y, out, gamma, residual, mean, rstd, eps);
  }
}

std::vector<Tensor> norm_backward(const Tensor& grad, const Tensor& y_pre, const Tensor& gamma, const Tensor& mean,
                                  const Tensor& rstd) {
  const int64_t m = y_pre.size(0), n = y_pre.size(1);
  Tensor dy = at::empty({m, n}, y_pre.options());
  const int64_t grain = row_grain(n);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (m + grain - 1) / grain));
  const int64_t rows_per_chunk = (m + chunks - 1) / chunks;
  Tensor acc = at::zeros({2, chunks, n}, y_pre.options().dtype(at::kFloat));
  float* acc_p = acc.data_ptr<float>();
  const float* mean_p = mean.const_data_ptr<float>();
  const float* rstd_p = rstd.const_data_ptr<float>();
  const int64_t gstride = grad.stride(0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * rows_per_chunk, e = std::min(m, b + rows_per_chunk);
      if (b >= e) continue;
      float* dgamma_acc = acc_p + c * n;
      float* dbias_acc = acc_p + (chunks + c) * n;
      if (y_pre.scalar_type() == at::kFloat) {
        cpu::norm_backward_rows_f32(grad.const_data_ptr<float>(), gstride, y_pre.const_data_ptr<float>(),
                                    gamma.const_data_ptr<float>(), mean_p, rstd_p, dy.data_ptr<float>(), dgamma_acc,
                                    dbias_acc, n, b, e);
      } else {
        cpu::norm_backward_rows_bf16(reinterpret_cast<const bits*>(grad.const_data_ptr<at::BFloat16>()), gstride,
                                     reinterpret_cast<const bits*>(y_pre.const_data_ptr<at::BFloat16>()),
                                     reinterpret_cast<const bits*>(gamma.const_data_ptr<at::BFloat16>()), mean_p,
                                     rstd_p, reinterpret_cast<bits*>(dy.data_ptr<at::BFloat16>()), dgamma_acc,
                                     dbias_acc, n, b, e);
      }
    }
  });
  Tensor sums = chunks == 1 ? acc.select(1, 0) : acc.sum(1);  // [2, N]
  return {dy, sums.select(0, 0).clone(), sums.select(0, 1).clone()};
}

}  // namespace flexigpt
