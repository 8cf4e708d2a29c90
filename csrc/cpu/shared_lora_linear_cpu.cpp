// Row kernels of shared_lora_linear on the CPU (see the header for the formulas).
//
// Plain loops written for the auto-vectoriser (-O3, lane-split reductions). On x86-64 with
// GCC or Clang each entry point is cloned for AVX-512 and AVX2 and the best clone is picked
// at load time, so one binary runs everywhere and still uses wide vectors.
#include "shared_lora_linear_cpu.h"

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FLEXIGPT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FLEXIGPT_MULTIVERSION
#endif

#if defined(__GNUC__)
#define FLEXIGPT_INLINE inline __attribute__((always_inline))
#else
#define FLEXIGPT_INLINE inline
#endif

namespace flexigpt {
namespace cpu {
namespace {

// fp32 <-> element type. bfloat16: the high half of an fp32; stores round to nearest even
// (NaN stays NaN), the same rounding as c10::BFloat16.
FLEXIGPT_INLINE float to_f32(float v) { return v; }
FLEXIGPT_INLINE float to_f32(bf16_bits v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
FLEXIGPT_INLINE T from_f32(float v);

template <>
FLEXIGPT_INLINE float from_f32<float>(float v) { return v; }

template <>
FLEXIGPT_INLINE bf16_bits from_f32<bf16_bits>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<bf16_bits>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// sum_j f(j) for j in [0, n) in kLanes independent partial sums, combined pairwise at the end:
// the compiler vectorises this without reassociating (a plain `omp simd reduction` stays a
// serial chain of scalar adds without -ffast-math), and the sum is more accurate.
constexpr int kLanes = 16;

template <typename F>
FLEXIGPT_INLINE float lane_sum(int64_t n, F&& f) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += f(j + l);
  }
  float tail = 0.0f;
  for (; j < n; ++j) tail += f(j);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0] + tail;
}

// v = y [+ add] [+ bias]; the bias (and the epilogue's base product `add`) are added here
// rather than by the GEMM, saving a pass over y. Which of them are present is a template
// flag (kAdd, kBias), not a test in the loops: a load behind a runtime test inside the
// reductions kept the compiler from vectorising them.
template <bool kAdd, bool kBias, typename T>
FLEXIGPT_INLINE float pre_norm(const T* yr, const T* ar, const T* bias, int64_t j) {
  float v = to_f32(yr[j]);
  if (kAdd) v += to_f32(ar[j]);
  if (kBias) v += to_f32(bias[j]);
  return v;
}

// 1 / sqrt(var + eps) for a row whose sum of squared deviations overflowed fp32 (|v| above
// ~1e17 at N = 576) although var itself, or at least rstd, is representable: a third pass
// over the deviations scaled by a power of two (exact) that brings the largest to ~1, then
// rstd = 2^-e / sqrt(sum((d 2^-e)^2) / N + eps 2^-2e). Rows with Inf/NaN keep m2_overflowed
// (the result is NaN or 0, as in the reference). Never taken by ordinary rows.
template <bool kAdd, bool kBias, typename T>
float rescaled_rstd(const T* yr, const T* ar, const T* bias, float mean, int64_t n, float eps, float m2_overflowed) {
  float amax = 0.0f;
  for (int64_t j = 0; j < n; ++j) amax = std::fmax(amax, std::fabs(pre_norm<kAdd, kBias>(yr, ar, bias, j) - mean));
  if (!std::isfinite(amax) || !std::isfinite(mean)) {
    return 1.0f / std::sqrt(m2_overflowed / static_cast<float>(n) + eps);
  }
  int e = 0;
  std::frexp(amax, &e);  // amax = f 2^e with f in [0.5, 1)
  const float down = std::ldexp(1.0f, -e);
  const float m2 = lane_sum(n, [&](int64_t j) {
    const float d = (pre_norm<kAdd, kBias>(yr, ar, bias, j) - mean) * down;
    return d * d;
  });
  const float eps_scaled = std::ldexp(eps, -2 * e);  // underflows to 0 when negligible
  return down / std::sqrt(m2 / static_cast<float>(n) + eps_scaled);
}

template <bool kAdd, bool kBias, typename T>
FLEXIGPT_INLINE void finish_rows(T* y, const T* add, int64_t add_row_stride, const T* bias, bool keep_y,
                                 T* out, const T* gamma, const T* residual, int64_t residual_row_stride,
                                 float* mean_out, float* rstd_out, int64_t n, float eps, int64_t row_begin,
                                 int64_t row_end) {
  const float inv_n = 1.0f / static_cast<float>(n);
  const bool write_y = keep_y && (kBias || kAdd);  // y must end up holding v
  for (int64_t i = row_begin; i < row_end; ++i) {
    T* yr = y + i * n;
    const T* ar = kAdd ? add + i * add_row_stride : nullptr;
    T* orow = out + i * n;
    const T* rr = residual != nullptr ? residual + i * residual_row_stride : nullptr;
    if (gamma == nullptr) {
      if (rr != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) orow[j] = from_f32<T>(pre_norm<kAdd, kBias>(yr, ar, bias, j) + to_f32(rr[j]));
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) orow[j] = from_f32<T>(pre_norm<kAdd, kBias>(yr, ar, bias, j));
      }
      continue;
    }
    const float mean = lane_sum(n, [&](int64_t j) { return pre_norm<kAdd, kBias>(yr, ar, bias, j); }) * inv_n;
    const float m2 = lane_sum(n, [&](int64_t j) {
      const float d = pre_norm<kAdd, kBias>(yr, ar, bias, j) - mean;
      return d * d;
    });
    const float rstd = std::isfinite(m2) ? 1.0f / std::sqrt(m2 * inv_n + eps)
                                         : rescaled_rstd<kAdd, kBias>(yr, ar, bias, mean, n, eps, m2);
    mean_out[i] = mean;
    rstd_out[i] = rstd;
    if (rr != nullptr && write_y) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float v = pre_norm<kAdd, kBias>(yr, ar, bias, j);
        orow[j] = from_f32<T>((v - mean) * rstd * to_f32(gamma[j]) + to_f32(rr[j]));
        yr[j] = from_f32<T>(v);
      }
    } else if (rr != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        orow[j] = from_f32<T>((pre_norm<kAdd, kBias>(yr, ar, bias, j) - mean) * rstd * to_f32(gamma[j]) + to_f32(rr[j]));
    } else if (write_y) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float v = pre_norm<kAdd, kBias>(yr, ar, bias, j);
        orow[j] = from_f32<T>((v - mean) * rstd * to_f32(gamma[j]));
        yr[j] = from_f32<T>(v);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        orow[j] = from_f32<T>((pre_norm<kAdd, kBias>(yr, ar, bias, j) - mean) * rstd * to_f32(gamma[j]));
    }
  }
}

template <typename T>
FLEXIGPT_INLINE void norm_backward_rows(const T* grad, int64_t grad_row_stride, const T* y,
                                        const T* gamma, const float* mean, const float* rstd, T* dy,
                                        float* dgamma_acc, float* dbias_acc, int64_t n,
                                        int64_t row_begin, int64_t row_end) {
  const float inv_n = 1.0f / static_cast<float>(n);
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* g = grad + i * grad_row_stride;
    const T* yr = y + i * n;
    T* d = dy + i * n;
    const float mu = mean[i];
    const float rs = rstd[i];
    const float sum_gg = lane_sum(n, [&](int64_t j) { return to_f32(g[j]) * to_f32(gamma[j]); });
    const float sum_ggx =
        lane_sum(n, [&](int64_t j) { return to_f32(g[j]) * to_f32(gamma[j]) * (to_f32(yr[j]) - mu) * rs; });
    const float a = sum_gg * inv_n;
    const float b = sum_ggx * inv_n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float gj = to_f32(g[j]);
      const float xhat = (to_f32(yr[j]) - mu) * rs;
      const float dj = rs * (gj * to_f32(gamma[j]) - a - xhat * b);
      d[j] = from_f32<T>(dj);
      dgamma_acc[j] += gj * xhat;
      dbias_acc[j] += dj;
    }
  }
}

// finish_rows with the template flags of the operands present (one test per call, not per element)
template <typename T>
FLEXIGPT_INLINE void finish_dispatch(T* y, const T* add, int64_t add_row_stride, const T* bias, bool keep_y, T* out,
                                     const T* gamma, const T* residual, int64_t residual_row_stride, float* mean,
                                     float* rstd, int64_t n, float eps, int64_t row_begin, int64_t row_end) {
  if (add != nullptr && bias != nullptr) {
    finish_rows<true, true>(y, add, add_row_stride, bias, keep_y, out, gamma, residual, residual_row_stride, mean,
                            rstd, n, eps, row_begin, row_end);
  } else if (add != nullptr) {
    finish_rows<true, false>(y, add, add_row_stride, bias, keep_y, out, gamma, residual, residual_row_stride, mean,
                             rstd, n, eps, row_begin, row_end);
  } else if (bias != nullptr) {
    finish_rows<false, true>(y, add, 0, bias, keep_y, out, gamma, residual, residual_row_stride, mean, rstd, n, eps,
                             row_begin, row_end);
  } else {
    finish_rows<false, false>(y, add, 0, bias, keep_y, out, gamma, residual, residual_row_stride, mean, rstd, n, eps,
                              row_begin, row_end);
  }
}

}  // namespace

FLEXIGPT_MULTIVERSION
void finish_rows_f32(float* y, const float* add, int64_t add_row_stride, const float* bias, bool keep_y,
                     float* out, const float* gamma, const float* residual, int64_t residual_row_stride,
                     float* mean, float* rstd, int64_t n, float eps, int64_t row_begin, int64_t row_end) {
  finish_dispatch(y, add, add_row_stride, bias, keep_y, out, gamma, residual, residual_row_stride, mean, rstd, n,
                  eps, row_begin, row_end);
}

FLEXIGPT_MULTIVERSION
void finish_rows_bf16(bf16_bits* y, const bf16_bits* add, int64_t add_row_stride, const bf16_bits* bias,
                      bool keep_y, bf16_bits* out, const bf16_bits* gamma, const bf16_bits* residual,
                      int64_t residual_row_stride, float* mean, float* rstd, int64_t n, float eps,
                      int64_t row_begin, int64_t row_end) {
  finish_dispatch(y, add, add_row_stride, bias, keep_y, out, gamma, residual, residual_row_stride, mean, rstd, n,
                  eps, row_begin, row_end);
}

FLEXIGPT_MULTIVERSION
void norm_backward_rows_f32(const float* grad, int64_t grad_row_stride, const float* y,
                            const float* gamma, const float* mean, const float* rstd, float* dy,
                            float* dgamma_acc, float* dbias_acc, int64_t n, int64_t row_begin,
                            int64_t row_end) {
  norm_backward_rows<float>(grad, grad_row_stride, y, gamma, mean, rstd, dy, dgamma_acc, dbias_acc, n,
                            row_begin, row_end);
}

FLEXIGPT_MULTIVERSION
void norm_backward_rows_bf16(const bf16_bits* grad, int64_t grad_row_stride, const bf16_bits* y,
                             const bf16_bits* gamma, const float* mean, const float* rstd,
                             bf16_bits* dy, float* dgamma_acc, float* dbias_acc, int64_t n,
                             int64_t row_begin, int64_t row_end) {
  norm_backward_rows<bf16_bits>(grad, grad_row_stride, y, gamma, mean, rstd, dy, dgamma_acc, dbias_acc,
                                n, row_begin, row_end);
}

}  // namespace cpu
}  // namespace flexigpt
