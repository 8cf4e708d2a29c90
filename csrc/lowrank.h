// The adapters' two small GEMMs on ATen tensors, for the forward kernels of the library:
//
//   shrink(x, a)                      s = x a^T                 x [M, K], a [R, K] -> s [M, R]
//   expand_(y, s, b, alpha, acc)      y = [y +] alpha s b^T     y [M, N] (a column slice is fine),
//                                                               s [M, r], b [N, r]
//
// On the CPU, for float32 with M <= cpu::kSmallRows (decode), on a CPU with AVX-512F, they run
// the streaming kernels of cpu/lowrank_small_cpu.h (split over threads by rows of a / columns
// of y); the expand only when b is stored column-major (b.stride(0) == 1: B^T's rows are
// contiguous, as the vLLM layer holds it). Otherwise ATen's GEMMs (at::mm / addmm), as before.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/lowrank_small_cpu.h"

namespace flexigpt {

// whether t [M, *] (rows read with unit column stride) takes the small-M kernels
inline bool small_rows(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.size(0) >= 1 &&
         t.size(0) <= cpu::kSmallRows && (t.size(1) <= 1 || t.stride(1) == 1) && cpu::small_rows_supported();
}

inline at::Tensor shrink(const at::Tensor& x, const at::Tensor& a) {
  const int64_t m = x.size(0), k = x.size(1), r = a.size(0);
  if (!small_rows(x) || k < 1 || (k > 1 && a.stride(1) != 1)) return at::mm(x, a.t());
  at::Tensor s = at::empty({m, r}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  const int64_t ldx = x.stride(0), lda = a.stride(0);
  // about 16k multiply-adds per task: one thread for SmolLM2-sized adapters at M = 8
  const int64_t grain = std::max<int64_t>(2, (int64_t{1} << 14) / std::max<int64_t>(1, m * k));
  at::parallel_for(0, r, grain, [&](int64_t qb, int64_t qe) {
    cpu::shrink_small_f32(xp, ldx, m, ap, lda, k, sp, r, qb, qe);
  });
  return s;
}

inline void expand_(const at::Tensor& y, const at::Tensor& s, const at::Tensor& b, double alpha, bool accumulate) {
  const int64_t m = y.size(0), n = y.size(1), r = b.size(1);
  const bool column_major = b.size(0) <= 1 || b.stride(0) == 1;
  if (!small_rows(y) || !small_rows(s) || !column_major || r < 1 || r > cpu::kSmallRank) {
    at::Tensor out = y;  // a column slice: addmm writes through to its base
    if (accumulate) {
      out.addmm_(s, b.t(), /*beta=*/1, /*alpha=*/alpha);
    } else {
      at::addmm_out(out, out, s, b.t(), /*beta=*/0, /*alpha=*/alpha);  // beta = 0: y is not read
    }
    return;
  }
  const float* sp = s.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t lds = s.stride(0), ldb = r > 1 ? b.stride(1) : n, ldy = y.stride(0);
  const int64_t blocks = (n + 31) / 32;  // tasks own whole blocks of 32 columns
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, 32 * m * r));
  at::parallel_for(0, blocks, grain, [&](int64_t bb, int64_t be) {
    cpu::expand_small_f32(sp, lds, m, bp, ldb, r, static_cast<float>(alpha), accumulate, yp, ldy, bb * 32,
                          std::min(n, be * 32));
  });
}

}  // namespace flexigpt
