// flexigpt_kernels._C_cuda: the CUDA decode path of shared_lora_linear (M <= 16 rows).
//
// Thin layer over csrc/cuda/shared_lora_linear_decode.{h,cu}: checks the arguments (device,
// dtype, shape, layout, alignment; errors name the argument), allocates the outputs and the
// small fp32 workspaces, and enqueues the kernels on PyTorch's current stream of x's device.
//
//   forward(x [M, K], weight [N, K], lora_a [r, K], lora_b [N, r], scale, bias [N] | None,
//           norm_weight [N] | None, eps, residual [M, N] | None, save_for_backward)
//     -> (out [M, N], shrink [M, r], y_pre [M, N] | (0,), mean [M] fp32 | (0,), rstd | (0,))
// float16 / bfloat16 on one CUDA device. The backward is not here (Triton runs it).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

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

std::vector<Tensor> forward(const Tensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
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
  p.partial_m2 = has_norm ? partial[1].data_ptr<float>() : nullptr;
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
  return {out, shrink, y_pre, mean, rstd};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flexigpt_kernels CUDA kernels: shared_lora_linear decode forward (M <= 16, float16/bfloat16)";
  m.attr("MAX_M") = fk::kDecodeMaxM;
  m.def("forward", &forward, "shared_lora_linear decode forward on CUDA -> (out, shrink, y_pre, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scale"), py::arg("bias"),
        py::arg("norm_weight"), py::arg("eps"), py::arg("residual"), py::arg("save_for_backward"));
}
