// flexigpt_kernels._C: the CPU implementation of shared_lora_linear.
//
// Thin layer: checks the arguments (device, dtype, shape, layout; errors name the argument),
// runs the GEMMs with ATen into preallocated outputs and calls the row kernels of
// csrc/cpu/shared_lora_linear_cpu.h over the rows in parallel (at::parallel_for).
//
//   x [M, K]  weight [N, K]  lora_a [r, K]  lora_b [N, r]  bias [N]  norm_weight [N]
//   residual [M, N];  every tensor on the CPU in x's dtype (float32 or bfloat16).
//
// forward: shrink = x A^T                         [M, r]   (x's dtype)
//          y      = scale * shrink B^T             the small GEMM initialises y
//          y     += x W^T                          the large GEMM accumulates into it (beta = 1)
//          out    = [gamma (v - mean) rstd] [+ residual],  v = y + bias: one fused pass over
//                   the rows (without norm or residual the bias seeds the first GEMM instead)
//          returns (out, shrink, y_pre, mean, rstd) with y_pre = y when the norm is present and
//          save_for_backward (else shape (0,)), mean/rstd [M] fp32 when the norm is present.
//          Without y_pre to keep, the finishing pass writes in place: the only full-size
//          buffer is the output.
// backward: dy = norm backward (fused pass that also sums dgamma and dbias), then
//          grad_x = dy W + scale (dy B) A,  grad_A = scale (dy B)^T x,  grad_B = scale dy^T s,
//          grad_W = dy^T x (when asked).  Returns (grad_x, grad_weight or (0,), grad_a, grad_b,
//          grad_bias fp32 [N], grad_norm_weight fp32 [N] or (0,)).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/shared_lora_linear_cpu.h"

namespace {

using at::Tensor;
using c10::optional;

constexpr const char* kOp = "shared_lora_linear (C++ CPU): ";

std::string shape_of(const Tensor& t) { return c10::str(t.sizes()); }

void check_cpu_dtype(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, name, " has dtype ", t.scalar_type(), " but x has dtype ",
                   dtype, "; all tensors must share it");
}

void check_shape(const Tensor& t, const char* name, std::vector<int64_t> expected, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), kOp, name, " must be ", what, " = ",
                    at::IntArrayRef(expected), ", got shape ", shape_of(t));
}

void check_rows_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1), kOp, name,
                    " must have contiguous rows (stride 1 along the last dimension), got strides ",
                    t.strides());
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, name, " must be contiguous, got shape ", shape_of(t),
                    " with strides ", t.strides());
}

struct Dims {
  int64_t m, k, n, r;
};

// x, weight, lora_a, lora_b: device, dtype, shapes. Returns the sizes.
Dims check_core(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b) {
  TORCH_CHECK_TYPE(x.device().is_cpu(), kOp, "x must be a CPU tensor, got one on ", x.device(),
                   " (CUDA tensors go to flexigpt_kernels._C_cuda or Triton)");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, kOp,
                   "x has dtype ", x.scalar_type(), "; this kernel supports float32 and bfloat16");
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, "x must be 2-D [M, K] (flatten the leading dims), got shape ",
                    shape_of(x));
  const auto dtype = x.scalar_type();
  check_cpu_dtype(weight, "weight", dtype);
  TORCH_CHECK_VALUE(weight.dim() == 2, kOp, "weight must be 2-D [N, K], got shape ", shape_of(weight));
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == k, kOp, "weight must be [N, K] with K = ", k,
                    " (x's last dimension), got shape ", shape_of(weight));
  check_cpu_dtype(lora_a, "lora_a", dtype);
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_a.size(1) == k && lora_a.size(0) >= 1, kOp,
                    "lora_a must be [r, K] = [r, ", k, "] with r >= 1, got shape ", shape_of(lora_a));
  const int64_t r = lora_a.size(0);
  check_cpu_dtype(lora_b, "lora_b", dtype);
  check_shape(lora_b, "lora_b", {n, r}, "[N, r]");
  TORCH_CHECK_VALUE(n >= 1, kOp, "weight must have N >= 1 output features, got shape ", shape_of(weight));
  return {m, k, n, r};
}

// Rows per parallel task: enough elements (~32k) to outweigh the scheduling.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n)); }

std::vector<Tensor> forward(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                            double scale, const optional<Tensor>& bias, const optional<Tensor>& norm_weight,
                            double eps, const optional<Tensor>& residual, bool save_for_backward) {
  const Dims d = check_core(x, weight, lora_a, lora_b);
  const auto dtype = x.scalar_type();
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();
  const bool has_res = residual.has_value() && residual->defined();
  if (has_bias) {
    check_cpu_dtype(*bias, "bias", dtype);
    check_shape(*bias, "bias", {d.n}, "[N]");
  }
  if (has_norm) {
    check_cpu_dtype(*norm_weight, "norm_weight", dtype);
    check_shape(*norm_weight, "norm_weight", {d.n}, "[N]");
    check_contiguous(*norm_weight, "norm_weight");
    TORCH_CHECK_VALUE(eps > 0, kOp, "eps must be positive, got ", eps);
  }
  if (has_res) {
    check_cpu_dtype(*residual, "residual", dtype);
    check_shape(*residual, "residual", {d.m, d.n}, "[M, N]");
    check_rows_contiguous(*residual, "residual");
  }

  const auto opts = x.options();
  const auto fopts = opts.dtype(at::kFloat);
  Tensor shrink = at::mm(x, lora_a.t());  // [M, r], x's dtype
  Tensor y = at::empty({d.m, d.n}, opts);
  Tensor y_pre = at::empty({0}, opts);
  Tensor mean = at::empty({has_norm ? d.m : 0}, fopts);
  Tensor rstd = at::empty({has_norm ? d.m : 0}, fopts);
  const bool finish = has_norm || has_res;
  // The small expand GEMM first (it initialises y), then the large one accumulates into it:
  // one write plus one read-modify-write of y. With a finishing pass the bias is added there;
  // without one, it seeds the expand GEMM.
  if (has_bias && !finish) {
    at::addmm_out(y, *bias, shrink, lora_b.t(), /*beta=*/1, /*alpha=*/scale);
  } else {
    at::addmm_out(y, y, shrink, lora_b.t(), /*beta=*/0, /*alpha=*/scale);  // beta = 0: y is not read
  }
  y.addmm_(x, weight.t());
  if (!finish) return {y, shrink, y_pre, mean, rstd};

  const bool keep_y = has_norm && save_for_backward;
  const Tensor bias_c = has_bias ? bias->contiguous() : Tensor();  // [N], read by the row pass
  Tensor out = y;  // finish in place unless y must be kept for the backward
  if (keep_y) {
    out = at::empty_like(y);
    y_pre = y;
  }
  const int64_t n = d.n;
  const int64_t res_stride = has_res ? residual->stride(0) : 0;
  float* mean_p = has_norm ? mean.data_ptr<float>() : nullptr;
  float* rstd_p = has_norm ? rstd.data_ptr<float>() : nullptr;
  const float feps = static_cast<float>(eps);
  if (dtype == at::kFloat) {
    float* yp = y.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float* bp = has_bias ? bias_c.const_data_ptr<float>() : nullptr;
    const float* gp = has_norm ? norm_weight->const_data_ptr<float>() : nullptr;
    const float* rp = has_res ? residual->const_data_ptr<float>() : nullptr;
    at::parallel_for(0, d.m, row_grain(n), [&](int64_t b, int64_t e) {
      flexigpt::cpu::finish_rows_f32(yp, bp, keep_y, op, gp, rp, res_stride, mean_p, rstd_p, n, feps, b, e);
    });
  } else {
    using bits = flexigpt::cpu::bf16_bits;
    bits* yp = reinterpret_cast<bits*>(y.data_ptr<at::BFloat16>());
    bits* op = reinterpret_cast<bits*>(out.data_ptr<at::BFloat16>());
    const bits* bp = has_bias ? reinterpret_cast<const bits*>(bias_c.const_data_ptr<at::BFloat16>()) : nullptr;
    const bits* gp = has_norm ? reinterpret_cast<const bits*>(norm_weight->const_data_ptr<at::BFloat16>()) : nullptr;
    const bits* rp = has_res ? reinterpret_cast<const bits*>(residual->const_data_ptr<at::BFloat16>()) : nullptr;
    at::parallel_for(0, d.m, row_grain(n), [&](int64_t b, int64_t e) {
      flexigpt::cpu::finish_rows_bf16(yp, bp, keep_y, op, gp, rp, res_stride, mean_p, rstd_p, n, feps, b, e);
    });
  }
  return {out, shrink, y_pre, mean, rstd};
}

// dy and the fp32 column sums (dgamma, dbias) of the norm backward, in one parallel pass.
// The rows are cut into at most get_num_threads() chunks, each with its own accumulators,
// summed afterwards: the result does not depend on the scheduling.
std::vector<Tensor> norm_backward(const Tensor& grad, const Tensor& y_pre, const Tensor& gamma,
                                  const Tensor& mean, const Tensor& rstd) {
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
        flexigpt::cpu::norm_backward_rows_f32(grad.const_data_ptr<float>(), gstride, y_pre.const_data_ptr<float>(),
                                              gamma.const_data_ptr<float>(), mean_p, rstd_p, dy.data_ptr<float>(),
                                              dgamma_acc, dbias_acc, n, b, e);
      } else {
        using bits = flexigpt::cpu::bf16_bits;
        flexigpt::cpu::norm_backward_rows_bf16(
            reinterpret_cast<const bits*>(grad.const_data_ptr<at::BFloat16>()), gstride,
            reinterpret_cast<const bits*>(y_pre.const_data_ptr<at::BFloat16>()),
            reinterpret_cast<const bits*>(gamma.const_data_ptr<at::BFloat16>()), mean_p, rstd_p,
            reinterpret_cast<bits*>(dy.data_ptr<at::BFloat16>()), dgamma_acc, dbias_acc, n, b, e);
      }
    }
  });
  Tensor sums = chunks == 1 ? acc.select(1, 0) : acc.sum(1);  // [2, N]
  return {dy, sums.select(0, 0).clone(), sums.select(0, 1).clone()};
}

std::vector<Tensor> backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                             const Tensor& lora_b, double scale, const optional<Tensor>& norm_weight,
                             const Tensor& shrink, const Tensor& y_pre, const Tensor& mean, const Tensor& rstd,
                             bool needs_weight_grad) {
  const Dims d = check_core(x, weight, lora_a, lora_b);
  const auto dtype = x.scalar_type();
  check_cpu_dtype(grad_out, "grad_out", dtype);
  check_shape(grad_out, "grad_out", {d.m, d.n}, "[M, N]");
  check_cpu_dtype(shrink, "shrink", dtype);
  check_shape(shrink, "shrink", {d.m, d.r}, "[M, r]");
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();
  const auto fopts = x.options().dtype(at::kFloat);

  Tensor dy, grad_bias, grad_norm_weight = at::empty({0}, fopts);
  if (has_norm) {
    check_cpu_dtype(*norm_weight, "norm_weight", dtype);
    check_shape(*norm_weight, "norm_weight", {d.n}, "[N]");
    check_contiguous(*norm_weight, "norm_weight");
    check_rows_contiguous(grad_out, "grad_out");
    check_cpu_dtype(y_pre, "y_pre", dtype);
    check_shape(y_pre, "y_pre", {d.m, d.n}, "[M, N] (the forward must run with save_for_backward=True)");
    check_contiguous(y_pre, "y_pre");
    check_cpu_dtype(mean, "mean", at::kFloat);
    check_shape(mean, "mean", {d.m}, "[M]");
    check_contiguous(mean, "mean");
    check_cpu_dtype(rstd, "rstd", at::kFloat);
    check_shape(rstd, "rstd", {d.m}, "[M]");
    check_contiguous(rstd, "rstd");
    auto parts = norm_backward(grad_out, y_pre, *norm_weight, mean, rstd);
    dy = parts[0];
    grad_norm_weight = parts[1];
    grad_bias = parts[2];
  } else {
    dy = grad_out;
    grad_bias = at::sum(grad_out, {0}, /*keepdim=*/false, at::kFloat);
  }

  Tensor dy_b = at::mm(dy, lora_b);  // [M, r]
  Tensor grad_x = at::mm(dy, weight);
  grad_x.addmm_(dy_b, lora_a, /*beta=*/1, /*alpha=*/scale);
  Tensor grad_a = at::empty({d.r, d.k}, x.options());
  at::addmm_out(grad_a, grad_a, dy_b.t(), x, /*beta=*/0, /*alpha=*/scale);
  Tensor grad_b = at::empty({d.n, d.r}, x.options());
  at::addmm_out(grad_b, grad_b, dy.t(), shrink, /*beta=*/0, /*alpha=*/scale);
  Tensor grad_weight = needs_weight_grad ? at::mm(dy.t(), x) : at::empty({0}, x.options());
  return {grad_x, grad_weight, grad_a, grad_b, grad_bias, grad_norm_weight};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flexigpt_kernels C++ CPU kernels: shared_lora_linear forward/backward (float32, bfloat16)";
  m.def("forward", &forward, "shared_lora_linear forward on the CPU -> (out, shrink, y_pre, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"), py::arg("bias"),
        py::arg("norm_weight"), py::arg("eps"), py::arg("residual"), py::arg("save_for_backward"));
  m.def("backward", &backward,
        "shared_lora_linear backward on the CPU -> (grad_x, grad_weight | (0,), grad_a, grad_b, grad_bias fp32, "
        "grad_norm_weight fp32 | (0,))",
        py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"),
        py::arg("norm_weight"), py::arg("shrink"), py::arg("y_pre"), py::arg("mean"), py::arg("rstd"),
        py::arg("needs_weight_grad"));
}
