// flexigpt_kernels._C: the `flexigpt` operator library and its CPU kernels.
//
// Loaded with torch.ops.load_library (flexigpt_kernels/ops/library.py); no Python module.
// TORCH_LIBRARY(flexigpt) declares the op schemas; TORCH_LIBRARY_IMPL(flexigpt, CPU) registers
// the CPU kernels. Fake (meta) kernels, autograd and the Python backends are registered from
// Python on these same ops (flexigpt_kernels/ops/shared_lora_linear.py). The multi-slice and
// epilogue forms of the op are declared and implemented the same way in stacked.cpp and
// epilogue.cpp (TORCH_LIBRARY_FRAGMENT(flexigpt, m)); the row passes they share are in
// row_passes.cpp, the argument checks in checks.h.
//
//   x [M, K]  weight [N, K]  lora_a [r, K]  lora_b [N, r]  bias [N]  norm_weight [N]
//   residual [M, N];  every tensor on the CPU in x's dtype.
//
// The CPU kernel of shared_lora_linear_fwd/_bwd validates its arguments (errors name the
// argument and the shapes: ValueError / TypeError in Python), then runs the C++ kernel below
// when the selected backend is "cpp" (or "auto") and the dtype is float32 or bfloat16;
// otherwise it calls _shared_lora_linear_fwd_py/_bwd_py, whose kernels (Python) run the
// backend the registry in flexigpt_kernels/ops/backends.py resolves. The registry pushes its
// CPU decision here with _set_native_routes(cpu, env) together with the FLEXIGPT_BACKEND value
// it resolved with: a call finding another value in the environment goes to Python once, which
// resolves again and pushes the new decision. No per-call Python on the native path.
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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include <algorithm>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/lowrank_small_cpu.h"
#include "native_routes.h"
#include "python_fallback.h"
#include "row_passes.h"

namespace {

using at::Tensor;
using c10::optional;

constexpr const char* kOp = "shared_lora_linear (C++ CPU): ";

using flexigpt::shape_of;

void check_cpu_dtype(const Tensor& t, const char* name, at::ScalarType dtype) {
  flexigpt::check_cpu_dtype(kOp, t, name, dtype);
}

void check_shape(const Tensor& t, const char* name, std::vector<int64_t> expected, const char* what) {
  flexigpt::check_shape(kOp, t, name, std::move(expected), what);
}

struct Dims {
  int64_t m, k, n, r;
};

// x, weight, lora_a, lora_b: device, dtype, shapes. Returns the sizes.
Dims check_core(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b) {
  flexigpt::check_leading(kOp, x, "x", "[M, K]");
  const auto dtype = x.scalar_type();
  check_cpu_dtype(weight, "weight", dtype);
  TORCH_CHECK_VALUE(weight.dim() == 2, kOp, "weight must be 2-D [N, K], got shape ", shape_of(weight));
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK_VALUE(k >= 1, kOp, "x's last dimension K must be >= 1 (an empty input feature dimension), got x ",
                    shape_of(x), ", weight ", shape_of(weight));
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

void check_scalars(double scale, double eps) { flexigpt::check_scale_eps(kOp, "scale", scale, eps); }

bool cpu_native(const Tensor& x) {
  return (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && flexigpt::cpp_selected();
}

using Fwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Bwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Every check of the forward's contract (all dtypes); returns the sizes.
Dims check_forward(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                   double scale, const optional<Tensor>& bias, const optional<Tensor>& norm_weight, double eps,
                   const optional<Tensor>& residual) {
  const Dims d = check_core(x, weight, lora_a, lora_b);
  const auto dtype = x.scalar_type();
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();
  check_scalars(scale, eps);
  if (bias.has_value() && bias->defined()) {
    check_cpu_dtype(*bias, "bias", dtype);
    check_shape(*bias, "bias", {d.n}, "[N]");
  }
  if (has_norm) {
    check_cpu_dtype(*norm_weight, "norm_weight", dtype);
    check_shape(*norm_weight, "norm_weight", {d.n}, "[N]");
  }
  if (residual.has_value() && residual->defined()) {
    check_cpu_dtype(*residual, "residual", dtype);
    check_shape(*residual, "residual", {d.m, d.n}, "[M, N]");
  }
  return d;
}

Fwd forward_native(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                   double scale, const optional<Tensor>& bias, const optional<Tensor>& norm_weight_arg,
                   double eps, const optional<Tensor>& residual_arg, bool save_for_backward, const Dims& d) {
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_norm = norm_weight_arg.has_value() && norm_weight_arg->defined();
  const bool has_res = residual_arg.has_value() && residual_arg->defined();
  // the row pass reads gamma with unit stride and residual rows with unit stride
  const optional<Tensor> norm_weight = has_norm ? optional<Tensor>(norm_weight_arg->contiguous()) : optional<Tensor>();
  const optional<Tensor> residual =
      has_res && residual_arg->size(1) > 1 && residual_arg->stride(1) != 1
          ? optional<Tensor>(residual_arg->contiguous()) : residual_arg;
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
  if (!finish) return Fwd{y, shrink, y_pre, mean, rstd};

  const bool keep_y = has_norm && save_for_backward;
  Tensor out = y;  // finish in place unless y must be kept for the backward
  if (keep_y) {
    out = at::empty_like(y);
    y_pre = y;
  }
  const optional<Tensor> bias_c = has_bias ? optional<Tensor>(bias->contiguous()) : optional<Tensor>();
  flexigpt::finish_rows(y, c10::nullopt, bias_c, keep_y, out, norm_weight, residual, mean, rstd, eps);
  return Fwd{out, shrink, y_pre, mean, rstd};
}

// Every check of the backward's contract (all dtypes); returns the sizes.
Dims check_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                    const Tensor& lora_b, double scale, const optional<Tensor>& norm_weight, const Tensor& shrink,
                    const Tensor& y_pre, const Tensor& mean, const Tensor& rstd) {
  const Dims d = check_core(x, weight, lora_a, lora_b);
  const auto dtype = x.scalar_type();
  check_scalars(scale, 1.0);
  check_cpu_dtype(grad_out, "grad_out", dtype);
  check_shape(grad_out, "grad_out", {d.m, d.n}, "[M, N]");
  check_cpu_dtype(shrink, "shrink", dtype);
  check_shape(shrink, "shrink", {d.m, d.r}, "[M, r]");
  if (norm_weight.has_value() && norm_weight->defined()) {
    check_cpu_dtype(*norm_weight, "norm_weight", dtype);
    check_shape(*norm_weight, "norm_weight", {d.n}, "[N]");
    check_cpu_dtype(y_pre, "y_pre", dtype);
    check_shape(y_pre, "y_pre", {d.m, d.n}, "[M, N] (the forward must run with save_for_backward=True)");
    check_cpu_dtype(mean, "mean", at::kFloat);
    check_shape(mean, "mean", {d.m}, "[M]");
    check_cpu_dtype(rstd, "rstd", at::kFloat);
    check_shape(rstd, "rstd", {d.m}, "[M]");
  }
  return d;
}

Bwd backward_native(const Tensor& grad_arg, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                    const Tensor& lora_b, double scale, const optional<Tensor>& norm_weight, const Tensor& shrink,
                    const Tensor& y_pre, const Tensor& mean, const Tensor& rstd, bool needs_weight_grad,
                    const Dims& d) {
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();
  // the norm pass reads rows of grad with unit stride, y_pre / gamma / statistics densely
  const Tensor grad_out = d.n > 1 && grad_arg.stride(1) != 1 ? grad_arg.contiguous() : grad_arg;
  const auto fopts = x.options().dtype(at::kFloat);

  Tensor dy, grad_bias, grad_norm_weight = at::empty({0}, fopts);
  if (has_norm) {
    auto parts = flexigpt::norm_backward(grad_out, y_pre.contiguous(), norm_weight->contiguous(), mean.contiguous(),
                               rstd.contiguous());
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
  return Bwd{grad_x, grad_weight, grad_a, grad_b, grad_bias, grad_norm_weight};
}

// The CPU kernels of the public ops: validate, then the C++ kernel or the Python backends.
Fwd forward_cpu(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                const optional<Tensor>& bias, const optional<Tensor>& norm_weight, double eps,
                const optional<Tensor>& residual, bool save_for_backward) {
  const Dims d = check_forward(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual);
  if (cpu_native(x)) {
    return forward_native(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward, d);
  }
  return flexigpt::python_forward(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual,
                                  save_for_backward);
}

Bwd backward_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& lora_a,
                 const Tensor& lora_b, double scale, const optional<Tensor>& norm_weight, const Tensor& shrink,
                 const Tensor& y_pre, const Tensor& mean, const Tensor& rstd, bool needs_weight_grad) {
  const Dims d = check_backward(grad_out, x, weight, lora_a, lora_b, scale, norm_weight, shrink, y_pre, mean, rstd);
  if (cpu_native(x)) {
    return backward_native(grad_out, x, weight, lora_a, lora_b, scale, norm_weight, shrink, y_pre, mean, rstd,
                           needs_weight_grad, d);
  }
  static const auto py = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("flexigpt::_shared_lora_linear_bwd_py", "")
                             .typed<Bwd(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                        double, const optional<Tensor>&, const Tensor&, const Tensor&,
                                        const Tensor&, const Tensor&, bool)>();
  return py.call(grad_out, x, weight, lora_a, lora_b, scale, norm_weight, shrink, y_pre, mean, rstd,
                 needs_weight_grad);
}

}  // namespace

// The schemas. shared_lora_linear_fwd/_bwd are the op (see ops/shared_lora_linear.py for the
// contract); the _py twins carry the same arguments to the Python backends; _set_native_routes
// is how the Python registry tells the CPU kernel which backend is selected.
#define FLEXIGPT_FWD_ARGS                                                                              \
  "(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, Tensor? norm_weight, " \
  "float eps, Tensor? residual, bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
#define FLEXIGPT_BWD_ARGS                                                                              \
  "(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? norm_weight, " \
  "Tensor shrink, Tensor y_pre, Tensor mean, Tensor rstd, bool needs_weight_grad) "                    \
  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

TORCH_LIBRARY(flexigpt, m) {
  m.set_python_module("flexigpt_kernels.ops.shared_lora_linear");  // where the fake kernels live
  m.def("shared_lora_linear_fwd" FLEXIGPT_FWD_ARGS);
  m.def("shared_lora_linear_bwd" FLEXIGPT_BWD_ARGS);
  m.def("_shared_lora_linear_fwd_py" FLEXIGPT_FWD_ARGS);
  m.def("_shared_lora_linear_bwd_py" FLEXIGPT_BWD_ARGS);
  m.def("_set_native_routes(bool cpu, str env) -> ()", &flexigpt::set_native_routes);
  // the decode-size CPU kernels: whether this build on this CPU has them, and how often they ran
  m.def("_small_rows_supported() -> bool", [] { return flexigpt::cpu::small_rows_supported(); });
  m.def("_small_kernel_calls() -> int", [] { return flexigpt::cpu::small_kernel_calls(); });
}

TORCH_LIBRARY_IMPL(flexigpt, CPU, m) {
  m.impl("shared_lora_linear_fwd", &forward_cpu);
  m.impl("shared_lora_linear_bwd", &backward_cpu);
}
