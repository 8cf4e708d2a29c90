// The multi-slice ("stacked") form of the op in the flexigpt library: schemas and CPU kernels.
//
//   x [M, K]  weight [N, K] (P parts stacked by rows)  lora_as[i] [r_i, K]  lora_bs[i] [n_i, r_i]
//   scales[i]  bias [N]        sum n_i = N; part i owns output columns c_i .. c_i + n_i,
//   a_cat = [A_0; A_1; ...] [R, K] (R = sum r_i; read in place when the A_i are consecutive row
//   blocks of one buffer, as the vLLM layer holds them)
//
// forward: s = x a_cat^T [M, R]                    one shrink GEMM for every part
//          y[:, c_i:c_i+n_i] = scales[i] s_i B_i^T [+ bias_i]   per part, the small GEMM
//                                                    initialises its column slice (the bias
//                                                    seeds it: no separate pass)
//          y += x W^T                               one base GEMM accumulates (beta = 1)
//          returns (y, s)
// backward (dy [M, N]): t_i = scales[i] dy_i B_i (into t [M, R]),  grad_B_i = scales[i] dy_i^T s_i,
//          grad_x = dy W + t a_cat,  grad_a_cat = t^T x,  grad_W = dy^T x (when asked),
//          grad_bias = sum_rows dy (fp32); returns (grad_x, grad_W or (0,), grad_a_cat, [grad_B_i],
//          grad_bias).
//
// The CPU kernels validate every argument (errors name the argument and the shapes), then run
// the ATen GEMMs above in x's dtype when the selected backend is "cpp" (or "auto") and the dtype
// is float32 or bfloat16; otherwise they hand the call to the _py twin op, whose Python kernel
// (flexigpt_kernels/ops/stacked.py) runs the backend the registry resolves.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "lowrank.h"
#include "native_routes.h"
#include "row_passes.h"

namespace {

using at::Tensor;
using at::TensorList;
using c10::ArrayRef;
using c10::optional;

constexpr const char* kOp = "shared_lora_linear_stacked (C++ CPU): ";

using Fwd = std::tuple<Tensor, Tensor>;
using Bwd = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, Tensor>;

struct Dims {
  int64_t m, k, n, r;  // r = sum of the ranks
};

std::string part(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// The parts' adapters and scales against x [M, K]; returns {widths, ranks} summed. `device_of`
// checks each tensor's device and dtype against x's.
template <typename CheckTensor>
std::pair<int64_t, int64_t> check_parts(const Tensor& x, TensorList lora_as, TensorList lora_bs,
                                        ArrayRef<double> scales, CheckTensor&& check_tensor) {
  const int64_t k = x.size(1);
  const size_t parts = lora_as.size();
  TORCH_CHECK_VALUE(parts >= 1 && lora_bs.size() == parts && scales.size() == parts, kOp,
                    "lora_as, lora_bs and scales must have one entry per part (>= 1), got ", lora_as.size(), ", ",
                    lora_bs.size(), " and ", scales.size());
  int64_t widths = 0, ranks = 0;
  for (size_t i = 0; i < parts; ++i) {
    const Tensor& a = lora_as[i];
    const Tensor& b = lora_bs[i];
    check_tensor(a, part("lora_as", i));
    check_tensor(b, part("lora_bs", i));
    TORCH_CHECK_VALUE(a.dim() == 2 && a.size(1) == k, kOp, "lora_as[", i, "] must be [r_", i, ", K] = [r, ", k,
                      "], got shape ", flexigpt::shape_of(a));
    TORCH_CHECK_VALUE(a.size(0) >= 1, kOp, "part ", i, " has rank 0 (lora_as[", i, "] of shape ",
                      flexigpt::shape_of(a), "): every part needs rank >= 1");
    TORCH_CHECK_VALUE(b.dim() == 2 && b.size(1) == a.size(0) && b.size(0) >= 1, kOp, "lora_bs[", i, "] must be [n_",
                      i, ", r_", i, "] = [n, ", a.size(0), "] with n >= 1, got shape ", flexigpt::shape_of(b));
    TORCH_CHECK_VALUE(std::isfinite(scales[i]), kOp, "scales[", i, "] must be a finite float, got ", scales[i]);
    widths += b.size(0);
    ranks += a.size(0);
  }
  return {widths, ranks};
}

Dims check_args(const Tensor& x, const Tensor& weight, TensorList lora_as, TensorList lora_bs,
                ArrayRef<double> scales) {
  flexigpt::check_leading(kOp, x, "x", "[M, K]");
  const auto dtype = x.scalar_type();
  flexigpt::check_cpu_dtype(kOp, weight, "weight", dtype);
  TORCH_CHECK_VALUE(weight.dim() == 2, kOp, "weight must be 2-D [N, K], got shape ", flexigpt::shape_of(weight));
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == k, kOp, "x's last dimension (", k, ") must equal weight's in_features K (",
                    weight.size(1), "): x ", flexigpt::shape_of(x), ", weight ", flexigpt::shape_of(weight));
  const auto [widths, ranks] = check_parts(x, lora_as, lora_bs, scales, [&](const Tensor& t, const std::string& name) {
    flexigpt::check_cpu_dtype(kOp, t, name.c_str(), dtype);
  });
  TORCH_CHECK_VALUE(widths == n, kOp, "the parts' widths (rows of lora_bs) sum to ", widths, ", but weight ",
                    flexigpt::shape_of(weight), " has N = ", n, " rows");
  return {m, k, n, ranks};
}

// torch.cat(lora_as), read in place when the parts are consecutive row blocks of one row-major buffer.
Tensor concat_rows(TensorList parts, int64_t k, int64_t rows) {
  if (parts.size() == 1) return parts[0];
  const Tensor& first = parts[0];
  const void* storage = first.storage().data();
  int64_t offset = first.storage_offset();
  bool in_place = true;
  for (const Tensor& p : parts) {
    if ((p.stride(1) != 1 && k > 1) || (p.size(0) > 1 && p.stride(0) != k) || p.storage_offset() != offset ||
        p.storage().data() != storage) {
      in_place = false;
      break;
    }
    offset += p.size(0) * k;
  }
  return in_place ? first.as_strided({rows, k}, {k, 1}) : at::cat(parts, 0);
}

bool native(const Tensor& x) {
  return (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && flexigpt::cpp_selected();
}

Fwd forward_cpu(const Tensor& x, const Tensor& weight, TensorList lora_as, TensorList lora_bs,
                ArrayRef<double> scales, const optional<Tensor>& bias) {
  const Dims d = check_args(x, weight, lora_as, lora_bs, scales);
  const bool has_bias = flexigpt::has(bias);
  if (has_bias) {
    flexigpt::check_cpu_dtype(kOp, *bias, "bias", x.scalar_type());
    flexigpt::check_shape(kOp, *bias, "bias", {d.n}, "[N]");
  }
  if (!native(x)) {
    static const auto py = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("flexigpt::_shared_lora_linear_stacked_fwd_py", "")
                               .typed<Fwd(const Tensor&, const Tensor&, TensorList, TensorList, ArrayRef<double>,
                                          const optional<Tensor>&)>();
    return py.call(x, weight, lora_as, lora_bs, scales, bias);
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Tensor a_cat = concat_rows(lora_as, d.k, d.r);
  Tensor shrink = at::mm(x, a_cat.t());  // [M, R]
  Tensor y = at::empty({d.m, d.n}, x.options());
  int64_t col = 0, off = 0;
  for (size_t i = 0; i < lora_as.size(); ++i) {
    const int64_t n = lora_bs[i].size(0), r = lora_bs[i].size(1);
    Tensor ys = y.narrow(1, col, n);
    const Tensor si = shrink.narrow(1, off, r);
    if (has_bias) {
      at::addmm_out(ys, bias->narrow(0, col, n), si, lora_bs[i].t(), /*beta=*/1, /*alpha=*/scales[i]);
    } else {
      at::addmm_out(ys, ys, si, lora_bs[i].t(), /*beta=*/0, /*alpha=*/scales[i]);  // ys is not read
    }
    col += n;
    off += r;
  }
  y.addmm_(x, weight.t());
  return Fwd{y, shrink};
}

Bwd backward_cpu(const Tensor& grad_arg, const Tensor& x, const Tensor& weight, TensorList lora_as,
                 TensorList lora_bs, ArrayRef<double> scales, const Tensor& shrink, bool needs_weight_grad) {
  const Dims d = check_args(x, weight, lora_as, lora_bs, scales);
  const auto dtype = x.scalar_type();
  flexigpt::check_cpu_dtype(kOp, grad_arg, "grad_out", dtype);
  flexigpt::check_shape(kOp, grad_arg, "grad_out", {d.m, d.n}, "[M, N]");
  flexigpt::check_cpu_dtype(kOp, shrink, "shrink", dtype);
  flexigpt::check_shape(kOp, shrink, "shrink", {d.m, d.r}, "[M, sum r_i]");
  if (!native(x)) {
    static const auto py = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("flexigpt::_shared_lora_linear_stacked_bwd_py", "")
                               .typed<Bwd(const Tensor&, const Tensor&, const Tensor&, TensorList, TensorList,
                                          ArrayRef<double>, const Tensor&, bool)>();
    return py.call(grad_arg, x, weight, lora_as, lora_bs, scales, shrink, needs_weight_grad);
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Tensor g = flexigpt::unit_columns(grad_arg);
  const Tensor a_cat = concat_rows(lora_as, d.k, d.r);
  Tensor t = at::empty({d.m, d.r}, x.options());
  std::vector<Tensor> grad_bs;
  grad_bs.reserve(lora_bs.size());
  int64_t col = 0, off = 0;
  for (size_t i = 0; i < lora_bs.size(); ++i) {
    const int64_t n = lora_bs[i].size(0), r = lora_bs[i].size(1);
    const Tensor gi = g.narrow(1, col, n);
    Tensor ti = t.narrow(1, off, r);
    at::addmm_out(ti, ti, gi, lora_bs[i], /*beta=*/0, /*alpha=*/scales[i]);
    Tensor gb = at::empty({n, r}, x.options());
    at::addmm_out(gb, gb, gi.t(), shrink.narrow(1, off, r), /*beta=*/0, /*alpha=*/scales[i]);
    grad_bs.push_back(gb);
    col += n;
    off += r;
  }
  Tensor grad_x = at::mm(g, weight);
  grad_x.addmm_(t, a_cat);
  Tensor grad_a = at::mm(t.t(), x);
  Tensor grad_w = needs_weight_grad ? at::mm(g.t(), x) : at::empty({0}, x.options());
  Tensor grad_bias = at::sum(g, {0}, /*keepdim=*/false, at::kFloat);
  return Bwd{grad_x, grad_w, grad_a, grad_bs, grad_bias};
}

// In place, on any device: y[:, c_i:c_i+n_i] += scales[i] (x a_cat^T)_i B_i^T [+ bias]. The
// adapters of a stacked projection whose base product y came from someone else's GEMM (the
// vLLM layer's engine path): one shrink GEMM, one expand GEMM per part accumulating into its
// column slice, the bias added to the whole output in one pass. Inference only (no autograd),
// in y's dtype on every device (registered as CompositeExplicitAutograd): ATen's GEMMs, or on
// the CPU at decode sizes the streaming kernels of lowrank.h.
void delta_(const Tensor& y, const Tensor& x, TensorList lora_as, TensorList lora_bs, ArrayRef<double> scales,
            const optional<Tensor>& bias) {
  constexpr const char* op = "shared_lora_linear_stacked_delta_: ";
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), op,
                    "x [M, K] and y [M, N] must be 2-D with the same M, got x ", flexigpt::shape_of(x), ", y ",
                    flexigpt::shape_of(y));
  auto same = [&](const Tensor& t, const std::string& name) {
    TORCH_CHECK_TYPE(t.device() == y.device(), op, name, " is on ", t.device(), " but y is on ", y.device());
    TORCH_CHECK_TYPE(t.scalar_type() == y.scalar_type(), op, name, " has dtype ", t.scalar_type(), " but y has dtype ",
                     y.scalar_type(), "; all tensors must share it");
  };
  same(x, "x");
  const auto [widths, ranks] = check_parts(x, lora_as, lora_bs, scales, same);
  TORCH_CHECK_VALUE(widths == y.size(1), op, "the parts' widths (rows of lora_bs) sum to ", widths, ", but y ",
                    flexigpt::shape_of(y), " has N = ", y.size(1), " columns");
  if (flexigpt::has(bias)) {
    same(*bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == widths, op, "bias must be [N] = [", widths,
                      "], got shape ", flexigpt::shape_of(*bias));
  }
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Tensor shrink = flexigpt::shrink(x, concat_rows(lora_as, x.size(1), ranks));
  int64_t col = 0, off = 0;
  for (size_t i = 0; i < lora_bs.size(); ++i) {
    const int64_t n = lora_bs[i].size(0), r = lora_bs[i].size(1);
    flexigpt::expand_(y.narrow(1, col, n), shrink.narrow(1, off, r), lora_bs[i], scales[i], /*accumulate=*/true);
    col += n;
    off += r;
  }
  if (flexigpt::has(bias)) y.add_(*bias);
}

}  // namespace

#define FLEXIGPT_STACKED_FWD_ARGS                                                                  \
  "(Tensor x, Tensor weight, Tensor[] lora_as, Tensor[] lora_bs, float[] scales, Tensor? bias) " \
  "-> (Tensor, Tensor)"
#define FLEXIGPT_STACKED_BWD_ARGS                                                                   \
  "(Tensor grad_out, Tensor x, Tensor weight, Tensor[] lora_as, Tensor[] lora_bs, float[] scales, " \
  "Tensor shrink, bool needs_weight_grad) -> (Tensor, Tensor, Tensor, Tensor[], Tensor)"

TORCH_LIBRARY_FRAGMENT(flexigpt, m) {
  m.set_python_module("flexigpt_kernels.ops.stacked");  // where the fake kernels live
  m.def("shared_lora_linear_stacked_fwd" FLEXIGPT_STACKED_FWD_ARGS);
  m.def("shared_lora_linear_stacked_bwd" FLEXIGPT_STACKED_BWD_ARGS);
  m.def("_shared_lora_linear_stacked_fwd_py" FLEXIGPT_STACKED_FWD_ARGS);
  m.def("_shared_lora_linear_stacked_bwd_py" FLEXIGPT_STACKED_BWD_ARGS);
  m.def(
      "shared_lora_linear_stacked_delta_(Tensor(a!) y, Tensor x, Tensor[] lora_as, Tensor[] lora_bs, "
      "float[] scales, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(flexigpt, CompositeExplicitAutograd, m) { m.impl("shared_lora_linear_stacked_delta_", &delta_); }

TORCH_LIBRARY_IMPL(flexigpt, CPU, m) {
  m.impl("shared_lora_linear_stacked_fwd", &forward_cpu);
  m.impl("shared_lora_linear_stacked_bwd", &backward_cpu);
}
