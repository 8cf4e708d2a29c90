// Small-M low-rank GEMMs (see the header for the formulas and why).
//
// AVX-512F intrinsics in functions compiled for that target only (the rest of the library is
// built for plain x86-64); small_rows_supported() checks the CPU once before any is called.
#include "lowrank_small_cpu.h"

#include <algorithm>
#include <atomic>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FLEXIGPT_HAVE_AVX512_KERNELS 1
#include <immintrin.h>
#define FLEXIGPT_AVX512 __attribute__((target("avx512f")))
#else
#define FLEXIGPT_HAVE_AVX512_KERNELS 0
#endif

namespace flexigpt {
namespace cpu {

namespace {
std::atomic<int64_t> kernel_calls{0};
}  // namespace

int64_t small_kernel_calls() { return kernel_calls.load(std::memory_order_relaxed); }

#if FLEXIGPT_HAVE_AVX512_KERNELS

namespace {

// lanes [0, n) of a 16-lane vector, n in [0, 16]
FLEXIGPT_AVX512 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// A prefetch of the cache line holding p into L1 (no fault past the end of a buffer). The
// distances: a few KB ahead of each stream, about what memory delivers in its latency.
FLEXIGPT_AVX512 inline void prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
constexpr int64_t kPrefetchRows = 4;      // shrink: rows of a ahead (2 rows are read at once)
constexpr int64_t kPrefetchColumns = 512;  // expand: columns ahead in each row of bt

// rows [0, MB) of x against rows [qb, qe) of a, two rows of a per step
template <int MB>
FLEXIGPT_AVX512 void shrink_rows(const float* x, int64_t ldx, const float* a, int64_t lda, int64_t k, float* s,
                                 int64_t lds, int64_t qb, int64_t qe) {
  const int64_t kv = k & ~int64_t{15};
  const __mmask16 tail = lanes(k - kv);
  int64_t q = qb;
  for (; q + 2 <= qe; q += 2) {
    const float* a0 = a + q * lda;
    const float* a1 = a0 + lda;
    __m512 c0[MB], c1[MB];
    for (int m = 0; m < MB; ++m) c0[m] = c1[m] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < kv; kk += 16) {
      const __m512 v0 = _mm512_loadu_ps(a0 + kk), v1 = _mm512_loadu_ps(a1 + kk);
      prefetch(a0 + kPrefetchRows * lda + kk);  // a is read once, from memory: ask for it early
      prefetch(a1 + kPrefetchRows * lda + kk);
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * ldx + kk);
        c0[m] = _mm512_fmadd_ps(xv, v0, c0[m]);
        c1[m] = _mm512_fmadd_ps(xv, v1, c1[m]);
      }
    }
    if (tail) {
      const __m512 v0 = _mm512_maskz_loadu_ps(tail, a0 + kv), v1 = _mm512_maskz_loadu_ps(tail, a1 + kv);
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * ldx + kv);
        c0[m] = _mm512_fmadd_ps(xv, v0, c0[m]);
        c1[m] = _mm512_fmadd_ps(xv, v1, c1[m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      s[m * lds + q] = _mm512_reduce_add_ps(c0[m]);
      s[m * lds + q + 1] = _mm512_reduce_add_ps(c1[m]);
    }
  }
  if (q < qe) {
    const float* a0 = a + q * lda;
    __m512 c0[MB];
    for (int m = 0; m < MB; ++m) c0[m] = _mm512_setzero_ps();
    for (int64_t kk = 0; kk < kv; kk += 16) {
      const __m512 v0 = _mm512_loadu_ps(a0 + kk);
      for (int m = 0; m < MB; ++m) c0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + kk), v0, c0[m]);
    }
    if (tail) {
      const __m512 v0 = _mm512_maskz_loadu_ps(tail, a0 + kv);
      for (int m = 0; m < MB; ++m) {
        c0[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + m * ldx + kv), v0, c0[m]);
      }
    }
    for (int m = 0; m < MB; ++m) s[m * lds + q] = _mm512_reduce_add_ps(c0[m]);
  }
}

// y[m, c:c+16*V] (+)= sum_{q in [q0, q1)} s[m, q] bt[q, c:c+16*V] for a block of V vectors of
// output columns (the last one's lanes masked by `last`); s already holds alpha * s.
template <int MB, int V>
FLEXIGPT_AVX512 inline void expand_block(const float* s, int64_t lds, const float* bt, int64_t ldb, int64_t q0,
                                         int64_t q1, bool load_y, float* y, int64_t ldy, int64_t c, __mmask16 last) {
  __m512 acc[MB][V];
  for (int m = 0; m < MB; ++m) {
    for (int v = 0; v < V; ++v) {
      const __mmask16 mask = v == V - 1 ? last : static_cast<__mmask16>(0xFFFF);
      acc[m][v] = load_y ? _mm512_maskz_loadu_ps(mask, y + m * ldy + c + 16 * v) : _mm512_setzero_ps();
    }
  }
  for (int64_t q = q0; q < q1; ++q) {
    const float* b = bt + q * ldb + c;
    prefetch(b + kPrefetchColumns);
    if (V > 1) prefetch(b + kPrefetchColumns + 16);
    __m512 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_maskz_loadu_ps(v == V - 1 ? last : 0xFFFF, b + 16 * v);
    for (int m = 0; m < MB; ++m) {
      const __m512 sv = _mm512_set1_ps(s[m * lds + q]);
      for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(sv, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int v = 0; v < V; ++v) {
      _mm512_mask_storeu_ps(y + m * ldy + c + 16 * v, v == V - 1 ? last : static_cast<__mmask16>(0xFFFF), acc[m][v]);
    }
  }
}

// Rows of bt in chunks of kRowsPerPass: each pass streams that many rows of bt in order (a few
// sequential streams, which the hardware prefetcher follows) and updates y[0:MB, jb:je] (in
// L1 / L2) once; the first pass writes y, or adds to it when accumulating.
constexpr int64_t kRowsPerPass = 6;

template <int MB>
FLEXIGPT_AVX512 void expand_rows(const float* s, int64_t lds, const float* bt, int64_t ldb, int64_t r, float alpha,
                                 bool accumulate, float* y, int64_t ldy, int64_t jb, int64_t je) {
  float sa[MB * kSmallRank];  // alpha * s, the scale folded into the MB x r left operand
  for (int m = 0; m < MB; ++m)
    for (int64_t q = 0; q < r; ++q) sa[m * r + q] = alpha * s[m * lds + q];
  for (int64_t q0 = 0; q0 < r; q0 += kRowsPerPass) {
    const int64_t q1 = std::min(r, q0 + kRowsPerPass);
    const bool load_y = accumulate || q0 > 0;
    int64_t j = jb;
    for (; j + 32 <= je; j += 32) expand_block<MB, 2>(sa, r, bt, ldb, q0, q1, load_y, y, ldy, j, 0xFFFF);
    for (; j < je; j += 16) expand_block<MB, 1>(sa, r, bt, ldb, q0, q1, load_y, y, ldy, j, lanes(je - j));
  }
}

// Calls fn.template operator()<MB>(row0) for rows in chunks of up to 8 (MB a constant).
template <typename F>
FLEXIGPT_AVX512 void by_row_chunks(int64_t m, F&& fn) {
  for (int64_t row = 0; row < m; row += 8) {
    switch (m - row >= 8 ? 8 : m - row) {
      case 8: fn.template operator()<8>(row); break;
      case 7: fn.template operator()<7>(row); break;
      case 6: fn.template operator()<6>(row); break;
      case 5: fn.template operator()<5>(row); break;
      case 4: fn.template operator()<4>(row); break;
      case 3: fn.template operator()<3>(row); break;
      case 2: fn.template operator()<2>(row); break;
      default: fn.template operator()<1>(row); break;
    }
  }
}

}  // namespace

bool small_rows_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

FLEXIGPT_AVX512 void shrink_small_f32(const float* x, int64_t ldx, int64_t m, const float* a, int64_t lda, int64_t k,
                                      float* s, int64_t lds, int64_t q_begin, int64_t q_end) {
  kernel_calls.fetch_add(1, std::memory_order_relaxed);
  by_row_chunks(m, [&]<int MB>(int64_t row) {
    shrink_rows<MB>(x + row * ldx, ldx, a, lda, k, s + row * lds, lds, q_begin, q_end);
  });
}

FLEXIGPT_AVX512 void expand_small_f32(const float* s, int64_t lds, int64_t m, const float* bt, int64_t ldb, int64_t r,
                                      float alpha, bool accumulate, float* y, int64_t ldy, int64_t j_begin,
                                      int64_t j_end) {
  kernel_calls.fetch_add(1, std::memory_order_relaxed);
  by_row_chunks(m, [&]<int MB>(int64_t row) {
    expand_rows<MB>(s + row * lds, lds, bt, ldb, r, alpha, accumulate, y + row * ldy, ldy, j_begin, j_end);
  });
}

#else  // no AVX-512 kernels in this build: the callers use ATen's GEMMs

bool small_rows_supported() { return false; }

void shrink_small_f32(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t,
                      int64_t) {}

void expand_small_f32(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float, bool, float*, int64_t,
                      int64_t, int64_t) {}

#endif

}  // namespace cpu
}  // namespace flexigpt
