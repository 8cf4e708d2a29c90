// The epilogue form of the op in the flexigpt library (the base product y0 = x W^T supplied by
// someone else's GEMM): schemas and CPU kernels.
//
//   y0 [M, N]  x [M, K]  lora_a [r, K]  lora_b [N, r]  bias [N]  norm_weight [N]  residual [M, N]
//
// forward: s = x A^T [M, r];  e = scale s B^T [M, N] (the small GEMM writes e, reading nothing;
//          both GEMMs through lowrank.h: streaming kernels at decode sizes, else ATen)
//          then ONE parallel pass over the rows (row_passes.h): v = e + y0 + bias,
//          out = [gamma (v - mean) rstd] [+ residual], the same fp32 two-pass statistics (with
//          the power-of-two rescaled pass for overflowing rows) as the single op's C++ norm.
//          returns (out, s, y_pre = v when the norm is present and save_for_backward else (0,),
//          mean, rstd [M] fp32 when the norm is present else (0,)).
// backward (g [M, N]): dy = the norm backward of g (one fused pass that also sums dgamma and
//          dbias) or g itself;  t = scale dy B,  grad_x = t A,  grad_A = t^T x,
//          grad_B = scale dy^T s;  returns (grad_y0 = dy, grad_x, grad_A, grad_B,
//          grad_bias [N] fp32, grad_norm_weight [N] fp32 or (0,)).
//
// The CPU kernels validate every argument, then run the above in y0's dtype when the selected
// backend is "cpp" (or "auto") and the dtype is float32 or bfloat16; otherwise they hand the
// call to the _py twin op (flexigpt_kernels/ops/epilogue.py runs the backend the registry resolves).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "lowrank.h"
#include "native_routes.h"
#include "row_passes.h"

namespace {

using at::Tensor;
using c10::optional;

constexpr const char* kOp = "shared_lora_linear_epilogue (C++ CPU): ";

using Fwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Bwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

struct Dims {
  int64_t m, k, n, r;
};

// y0 / x / lora_a / lora_b: devices, dtypes (y0's), shapes.
Dims check_core(const Tensor& y0, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b, const char* y_name) {
  flexigpt::check_leading(kOp, y0, y_name, "[M, N]");
  const auto dtype = y0.scalar_type();
  flexigpt::check_cpu_dtype(kOp, x, "x", dtype, y_name);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == y0.size(0), kOp, y_name, " [M, N] and x [M, K] must share M, got ",
                    y_name, " ", flexigpt::shape_of(y0), " and x ", flexigpt::shape_of(x));
  const int64_t m = y0.size(0), n = y0.size(1), k = x.size(1);
  flexigpt::check_cpu_dtype(kOp, lora_a, "lora_a", dtype, y_name);
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_a.size(1) == k && lora_a.size(0) >= 1, kOp,
                    "lora_a must be [r, K] = [r, ", k, "] with r >= 1, got shape ", flexigpt::shape_of(lora_a));
  const int64_t r = lora_a.size(0);
  flexigpt::check_cpu_dtype(kOp, lora_b, "lora_b", dtype, y_name);
  flexigpt::check_shape(kOp, lora_b, "lora_b", {n, r}, "[N, r]");
  return {m, k, n, r};
}

void check_vector(const optional<Tensor>& t, const char* name, at::ScalarType dtype, int64_t n, const char* y_name) {
  if (!flexigpt::has(t)) return;
  flexigpt::check_cpu_dtype(kOp, *t, name, dtype, y_name);
  flexigpt::check_shape(kOp, *t, name, {n}, "[N]");
}

bool native(const Tensor& t) {
  return (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) && flexigpt::cpp_selected();
}

Fwd forward_cpu(const Tensor& y0, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b, double scale,
                const optional<Tensor>& bias, const optional<Tensor>& norm_weight, double eps,
                const optional<Tensor>& residual, bool save_for_backward) {
  const Dims d = check_core(y0, x, lora_a, lora_b, "y0");
  const auto dtype = y0.scalar_type();
  flexigpt::check_scale_eps(kOp, "scale", scale, eps);
  check_vector(bias, "bias", dtype, d.n, "y0");
  check_vector(norm_weight, "norm_weight", dtype, d.n, "y0");
  if (flexigpt::has(residual)) {
    flexigpt::check_cpu_dtype(kOp, *residual, "residual", dtype, "y0");
    flexigpt::check_shape(kOp, *residual, "residual", {d.m, d.n}, "[M, N] (y0's shape)");
  }
  if (!native(y0)) {
    static const auto py = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("flexigpt::_shared_lora_linear_epilogue_fwd_py", "")
                               .typed<Fwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                          const optional<Tensor>&, const optional<Tensor>&, double,
                                          const optional<Tensor>&, bool)>();
    return py.call(y0, x, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward);
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool has_norm = flexigpt::has(norm_weight);
  const auto opts = y0.options();
  const auto fopts = opts.dtype(at::kFloat);
  Tensor shrink = flexigpt::shrink(x, lora_a);  // [M, r]
  Tensor y = at::empty({d.m, d.n}, opts);
  flexigpt::expand_(y, shrink, lora_b, scale, /*accumulate=*/false);  // y is not read
  Tensor mean = at::empty({has_norm ? d.m : 0}, fopts);
  Tensor rstd = at::empty({has_norm ? d.m : 0}, fopts);
  Tensor y_pre = at::empty({0}, opts);
  const bool keep_y = has_norm && save_for_backward;
  Tensor out = y;  // finished in place unless y must be kept for the backward
  if (keep_y) {
    out = at::empty_like(y);
    y_pre = y;
  }
  const optional<Tensor> add(flexigpt::unit_columns(y0));
  const optional<Tensor> bias_c = flexigpt::has(bias) ? optional<Tensor>(bias->contiguous()) : optional<Tensor>();
  const optional<Tensor> gamma = has_norm ? optional<Tensor>(norm_weight->contiguous()) : optional<Tensor>();
  const optional<Tensor> res =
      flexigpt::has(residual) ? optional<Tensor>(flexigpt::unit_columns(*residual)) : optional<Tensor>();
  flexigpt::finish_rows(y, add, bias_c, keep_y, out, gamma, res, mean, rstd, eps);
  return Fwd{out, shrink, y_pre, mean, rstd};
}

Bwd backward_cpu(const Tensor& grad_arg, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b, double scale,
                 const optional<Tensor>& norm_weight, const Tensor& shrink, const Tensor& y_pre, const Tensor& mean,
                 const Tensor& rstd) {
  const Dims d = check_core(grad_arg, x, lora_a, lora_b, "grad_out");
  const auto dtype = grad_arg.scalar_type();
  flexigpt::check_scale_eps(kOp, "scale", scale, 1.0);
  flexigpt::check_cpu_dtype(kOp, shrink, "shrink", dtype, "grad_out");
  flexigpt::check_shape(kOp, shrink, "shrink", {d.m, d.r}, "[M, r]");
  const bool has_norm = flexigpt::has(norm_weight);
  if (has_norm) {
    check_vector(norm_weight, "norm_weight", dtype, d.n, "grad_out");
    flexigpt::check_cpu_dtype(kOp, y_pre, "y_pre", dtype, "grad_out");
    flexigpt::check_shape(kOp, y_pre, "y_pre", {d.m, d.n},
                          "[M, N] (the forward must run with save_for_backward=True)");
    flexigpt::check_cpu_dtype(kOp, mean, "mean", at::kFloat, "an fp32 statistic");
    flexigpt::check_shape(kOp, mean, "mean", {d.m}, "[M]");
    flexigpt::check_cpu_dtype(kOp, rstd, "rstd", at::kFloat, "an fp32 statistic");
    flexigpt::check_shape(kOp, rstd, "rstd", {d.m}, "[M]");
  }
  if (!native(grad_arg)) {
    static const auto py = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("flexigpt::_shared_lora_linear_epilogue_bwd_py", "")
                               .typed<Bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                                          const optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&)>();
    return py.call(grad_arg, x, lora_a, lora_b, scale, norm_weight, shrink, y_pre, mean, rstd);
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Tensor g = flexigpt::unit_columns(grad_arg);
  Tensor dy, grad_bias, grad_norm = at::empty({0}, x.options().dtype(at::kFloat));
  if (has_norm) {
    auto parts = flexigpt::norm_backward(g, y_pre.contiguous(), norm_weight->contiguous(), mean.contiguous(),
                                         rstd.contiguous());
    dy = parts[0];
    grad_norm = parts[1];
    grad_bias = parts[2];
  } else {
    dy = g.is_same(grad_arg) ? grad_arg.clone() : g;  // an op's output must not alias its input
    grad_bias = at::sum(dy, {0}, /*keepdim=*/false, at::kFloat);
  }
  Tensor t = at::empty({d.m, d.r}, x.options());
  at::addmm_out(t, t, dy, lora_b, /*beta=*/0, /*alpha=*/scale);
  Tensor grad_x = at::mm(t, lora_a);
  Tensor grad_a = at::mm(t.t(), x);
  Tensor grad_b = at::empty({d.n, d.r}, x.options());
  at::addmm_out(grad_b, grad_b, dy.t(), shrink, /*beta=*/0, /*alpha=*/scale);
  return Bwd{dy, grad_x, grad_a, grad_b, grad_bias, grad_norm};
}

}  // namespace

#define FLEXIGPT_EPILOGUE_FWD_ARGS                                                                          \
  "(Tensor y0, Tensor x, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, Tensor? norm_weight, " \
  "float eps, Tensor? residual, bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
#define FLEXIGPT_EPILOGUE_BWD_ARGS                                                                       \
  "(Tensor grad_out, Tensor x, Tensor lora_a, Tensor lora_b, float scale, Tensor? norm_weight, "      \
  "Tensor shrink, Tensor y_pre, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

TORCH_LIBRARY_FRAGMENT(flexigpt, m) {
  m.set_python_module("flexigpt_kernels.ops.epilogue");  // where the fake kernels live
  m.def("shared_lora_linear_epilogue_fwd" FLEXIGPT_EPILOGUE_FWD_ARGS);
  m.def("shared_lora_linear_epilogue_bwd" FLEXIGPT_EPILOGUE_BWD_ARGS);
  m.def("_shared_lora_linear_epilogue_fwd_py" FLEXIGPT_EPILOGUE_FWD_ARGS);
  m.def("_shared_lora_linear_epilogue_bwd_py" FLEXIGPT_EPILOGUE_BWD_ARGS);
}

TORCH_LIBRARY_IMPL(flexigpt, CPU, m) {
  m.impl("shared_lora_linear_epilogue_fwd", &forward_cpu);
  m.impl("shared_lora_linear_epilogue_bwd", &backward_cpu);
}
