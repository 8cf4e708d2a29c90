// flexigpt_kernels._C_cuda: the CUDA kernel of the `flexigpt` ops (M <= 16 rows: decode).
//
// Loaded with torch.ops.load_library after flexigpt_kernels._C (which declares the schemas);
// registers with TORCH_LIBRARY_IMPL(flexigpt, CUDA) the CUDA kernel of shared_lora_linear_fwd
// and, with TORCH_LIBRARY_FRAGMENT, two ops of its own:
//   _shared_lora_linear_decode_cuda  the decode kernel alone (same arguments and returns as
//                                    shared_lora_linear_fwd; the Python "cuda" backend calls it)
//   _set_cuda_routes(cuda, env)      the Python registry tells the CUDA kernel whether the
//                                    selection resolves to "cuda" for that FLEXIGPT_BACKEND value
// The CUDA kernel of shared_lora_linear_fwd runs the decode kernel when the selection is "cuda"
// (or "auto") and the call is one it takes (decode_applies: 1 <= M <= 16, float16 / bfloat16,
// K % 8 == 0, x / weight / lora_a 16-byte aligned with 16-byte row strides; the same conditions
// as flexigpt_kernels/ops/cuda_backend.py), else _shared_lora_linear_fwd_py (the Python
// backends: Triton). The backward has no CUDA kernel here (Triton runs it, through Python).
//
// decode_forward: thin layer over csrc/cuda/shared_lora_linear_decode.{h,cu}: checks the
// arguments (device, dtype, shape, layout, alignment; errors name the argument), allocates the
// outputs and the small fp32 workspaces, and enqueues the kernels on PyTorch's current stream
// of x's device (no host synchronisation, no data-dependent allocation: capturable).
//     -> (out [M, N], shrink [M, r], y_pre [M, N] | (0,), mean [M] fp32 | (0,), rstd | (0,))
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "../python_fallback.h"
#include "shared_lora_linear_decode.h"

namespace {

using at::Tensor;
using c10::optional;
namespace fk = flexigpt::cuda;

constexpr const char* kOp = "shared_lora_linear (CUDA decode): ";

void check_tensor(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK_TYPE(t.is_cuda(), kOp, name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(t.device() == x.device(), kOp, name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, name, " has dtype ", t.scalar_type(),
                   " but x has dtype ", x.scalar_type(), "; all tensors must share it");
}

void check_shape(const Tensor& t, const char* name, std::vector<int64_t> expected, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), kOp, name, " must be ", what, " = ",
                    at::IntArrayRef(expected), ", got shape ", t.sizes());
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, name, " must be contiguous, got strides ", t.strides());
}

void check_aligned16(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, kOp, name,
                    " must start on a 16-byte boundary (the kernel uses 16-byte vector loads)");
}

using Fwd = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

Fwd decode_forward(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                            double scale, const optional<Tensor>& bias, const optional<Tensor>& norm_weight,
                            double eps, const optional<Tensor>& residual, bool save_for_backward) {
  TORCH_CHECK_TYPE(x.is_cuda(), kOp, "x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, kOp, "x has dtype ",
                   x.scalar_type(), "; this kernel supports float16 and bfloat16");
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, "x must be 2-D [M, K], got shape ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK_VALUE(m >= 1 && m <= fk::kDecodeMaxM, kOp, "x must have 1 to ", fk::kDecodeMaxM,
                    " rows (the decode regime), got M = ", m);
  TORCH_CHECK_VALUE(k % 8 == 0 && k >= 8, kOp, "x's last dimension K must be a positive multiple of 8, got ", k);
  TORCH_CHECK_VALUE(x.stride(1) == 1 && x.stride(0) % 8 == 0, kOp,
                    "x must have contiguous rows whose stride is a multiple of 8 elements, got strides ",
                    x.strides());
  check_aligned16(x, "x");
  check_tensor(weight, "weight", x);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == k && weight.size(0) >= 1, kOp,
                    "weight must be [N, K] = [N, ", k, "], got shape ", weight.sizes());
  const int64_t n = weight.size(0);
  check_contiguous(weight, "weight");
  check_aligned16(weight, "weight");
  check_tensor(lora_a, "lora_a", x);
  TORCH_CHECK_VALUE(lora_a.dim() == 2 && lora_a.size(1) == k && lora_a.size(0) >= 1, kOp,
                    "lora_a must be [r, K] = [r, ", k, "] with r >= 1, got shape ", lora_a.sizes());
  const int64_t r = lora_a.size(0);
  check_contiguous(lora_a, "lora_a");
  check_aligned16(lora_a, "lora_a");
  check_tensor(lora_b, "lora_b", x);
  check_shape(lora_b, "lora_b", {n, r}, "[N, r]");
  check_contiguous(lora_b, "lora_b");
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();
  const bool has_res = residual.has_value() && residual->defined();
  if (has_bias) {
    check_tensor(*bias, "bias", x);
    check_shape(*bias, "bias", {n}, "[N]");
    check_contiguous(*bias, "bias");
  }
  if (has_norm) {
    check_tensor(*norm_weight, "norm_weight", x);
    check_shape(*norm_weight, "norm_weight", {n}, "[N]");
    check_contiguous(*norm_weight, "norm_weight");
    TORCH_CHECK_VALUE(eps > 0, kOp, "eps must be positive, got ", eps);
  }
  if (has_res) {
    check_tensor(*residual, "residual", x);
    check_shape(*residual, "residual", {m, n}, "[M, N]");
    TORCH_CHECK_VALUE(residual->stride(1) == 1 || n == 1, kOp,
                      "residual must have contiguous rows, got strides ", residual->strides());
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options();
  const auto fopts = opts.dtype(at::kFloat);
  const int tiles = fk::decode_tiles(static_cast<int>(n));
  Tensor out = at::empty({m, n}, opts);
  Tensor shrink = at::empty({m, r}, opts);
  Tensor y_pre = has_norm && save_for_backward ? at::empty({m, n}, opts) : at::empty({0}, opts);
  Tensor mean = at::empty({has_norm ? m : 0}, fopts);
  Tensor rstd = at::empty({has_norm ? m : 0}, fopts);
  Tensor shrink_f32 = at::empty({m, r}, fopts);
  Tensor partial = at::empty({2, has_norm ? m : 0, tiles}, fopts);

  fk::DecodeParams p{};
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.weight = weight.data_ptr();
  p.lora_a = lora_a.data_ptr();
  p.lora_b = lora_b.data_ptr();
  p.bias = has_bias ? bias->data_ptr() : nullptr;
  p.norm_weight = has_norm ? norm_weight->data_ptr() : nullptr;
  p.residual = has_res ? residual->data_ptr() : nullptr;
  p.residual_row_stride = has_res ? residual->stride(0) : 0;
  p.out = out.data_ptr();
  p.y = has_norm ? (save_for_backward ? y_pre.data_ptr() : out.data_ptr()) : nullptr;
  p.shrink = shrink.data_ptr();
  p.shrink_f32 = shrink_f32.data_ptr<float>();
  p.partial_mean = has_norm ? partial[0].data_ptr<float>() : nullptr;
  p.partial_std = has_norm ? partial[1].data_ptr<float>() : nullptr;
  p.mean = has_norm ? mean.data_ptr<float>() : nullptr;
  p.rstd = has_norm ? rstd.data_ptr<float>() : nullptr;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.r = static_cast<int>(r);
  p.scale = static_cast<float>(scale);
  p.eps = static_cast<float>(eps);

  const auto dtype = x.scalar_type() == at::kBFloat16 ? fk::DType::kBFloat16 : fk::DType::kFloat16;
  const cudaError_t err =
      fk::launch_shared_lora_linear_decode(p, dtype, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed: ", cudaGetErrorString(err));
  return Fwd{out, shrink, y_pre, mean, rstd};
}

bool aligned16(const Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// Whether decode_forward takes this call (see the file comment).
bool decode_applies(const Tensor& x, const Tensor& weight, const Tensor& lora_a) {
  const auto dt = x.scalar_type();
  return x.is_cuda() && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= fk::kDecodeMaxM &&
         (dt == at::kHalf || dt == at::kBFloat16) && x.size(1) % 8 == 0 && x.stride(1) == 1 &&
         x.stride(0) % 8 == 0 && weight.is_contiguous() && lora_a.is_contiguous() && aligned16(x) &&
         aligned16(weight) && aligned16(lora_a);
}

struct CudaRoutes {
  std::mutex mu;
  bool cuda = false;
  std::string env;
};

CudaRoutes& routes() {
  static CudaRoutes r;
  return r;
}

void set_cuda_routes(bool cuda, std::string env) {
  auto& r = routes();
  std::lock_guard<std::mutex> lock(r.mu);
  r.cuda = cuda;
  r.env = std::move(env);
}

bool cuda_selected() {
  const char* env = std::getenv("FLEXIGPT_BACKEND");
  auto& r = routes();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.cuda && r.env == (env != nullptr ? env : "");
}

Fwd forward_cuda(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b, double scale,
                 const optional<Tensor>& bias, const optional<Tensor>& norm_weight, double eps,
                 const optional<Tensor>& residual, bool save_for_backward) {
  if (cuda_selected() && decode_applies(x, weight, lora_a)) {
    const auto contiguous = [](const optional<Tensor>& t) {
      return t.has_value() && t->defined() ? optional<Tensor>(t->contiguous()) : optional<Tensor>();
    };
    optional<Tensor> res = residual;
    if (res.has_value() && res->defined() && res->dim() == 2 && res->size(1) > 1 && res->stride(1) != 1) {
      res = res->contiguous();
    }
    return decode_forward(x, weight, lora_a, lora_b.contiguous(), scale, contiguous(bias), contiguous(norm_weight),
                          eps, res, save_for_backward);
  }
  return flexigpt::python_forward(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual,
                                  save_for_backward);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flexigpt, m) {
  m.def("_shared_lora_linear_decode_cuda(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
        "Tensor? bias, Tensor? norm_weight, float eps, Tensor? residual, bool save_for_backward) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_set_cuda_routes(bool cuda, str env) -> ()", &set_cuda_routes);
}

TORCH_LIBRARY_IMPL(flexigpt, CUDA, m) {
  m.impl("shared_lora_linear_fwd", &forward_cuda);
  m.impl("_shared_lora_linear_decode_cuda", &decode_forward);
}
