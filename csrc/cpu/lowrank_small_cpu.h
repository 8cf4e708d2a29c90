// The low-rank GEMMs of the adapters for a few rows (decode: M = the batch), fp32, on the CPU.
// They know nothing of PyTorch: raw pointers, sizes, a range of the output to compute.
//
//   shrink: s[m, q] = sum_k x[m, k] a[q, k]          x [M, K] (row stride ldx), a [R, K] (row
//           for q in [q_begin, q_end)                  stride lda), s [M, R] (row stride lds)
//   expand: y[m, j] = [y[m, j] +] alpha sum_q s[m, q] bt[q, j]
//           for j in [j_begin, j_end)                  s [M, r] (row stride lds), bt [r, N] = B^T
//                                                      (row stride ldb), y [M, N] (row stride ldy)
//
// Why not the BLAS: at M <= kSmallRows a decode step reads each adapter matrix once, from
// memory (the base GEMMs between two calls evict it), and the time is the read plus each
// call's fixed cost. These loops stream a (shrink) and bt (expand) once, in order, with every
// row of x / s in registers or L1 (rows taken 8 at a time), and have no packing or dispatch
// of their own; measured in a vLLM decode step on one AMD EPYC core they take about half of
// MKL's sgemm time for SmolLM2's adapters (benchmarks/results/vllm_cpu.md).
// The expand reads B^T by rows (B stored column-major, [N, r] with unit row stride): each row of
// bt is a contiguous run of output columns, 32 of them per step (two AVX-512 vectors per row).
//
// Only x86-64 with AVX-512F and GCC or Clang has them: small_rows_supported() says whether this
// build on this CPU does; the callers (csrc/lowrank.h) fall back to ATen's GEMMs otherwise.
// Accumulation is fp32 in 16 lanes (shrink, summed at the end) or one FMA chain per output
// (expand): not bit-identical to the BLAS, within fp32 rounding of it.
#pragma once

#include <cstdint>

namespace flexigpt {
namespace cpu {

constexpr int64_t kSmallRows = 16;   // M up to this takes these kernels (decode batches)
constexpr int64_t kSmallRank = 256;  // the expand's r up to this (its scaled s lives on the stack)

bool small_rows_supported();

// How many times shrink_small_f32 / expand_small_f32 have run in this process (each call on each
// thread's range counts once): the tests read it to check that a decode-size call took them.
int64_t small_kernel_calls();

void shrink_small_f32(const float* x, int64_t ldx, int64_t m, const float* a, int64_t lda, int64_t k, float* s,
                      int64_t lds, int64_t q_begin, int64_t q_end);

void expand_small_f32(const float* s, int64_t lds, int64_t m, const float* bt, int64_t ldb, int64_t r, float alpha,
                      bool accumulate, float* y, int64_t ldy, int64_t j_begin, int64_t j_end);

}  // namespace cpu
}  // namespace flexigpt
