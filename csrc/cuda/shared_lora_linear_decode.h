// CUDA decode kernel of shared_lora_linear (M <= 16 rows: the matrix-vector regime, bound by
// the read of the shared weight). No PyTorch here: raw pointers, sizes and a stream; the
// binding (bindings_cuda.cpp) checks the arguments, allocates and launches.
//
//   x [M, K] (row stride x_row_stride)  weight [N, K]  lora_a [r, K]  lora_b [N, r]  bias [N]
//   norm_weight [N]  residual [M, N] (row stride residual_row_stride); all fp16 or all bf16,
//   fp32 accumulation throughout.
//
// Launches, in order on `stream`:
//   1. shrink:  s = x A^T [M, r] (fp32 workspace + a copy in x's dtype), one warp per adapter
//               row, every row of x at once: A is read once.
//   2. matvec:  split over N, one block per tile of kTileN columns, one warp per kColsPerWarp
//               columns; each warp streams its weight rows with 16-byte loads (kMatvecUnroll steps
//               of them issued before the multiplies, to keep enough bytes in flight) and multiplies
//               them with all M rows of x (the weight is read once for all rows). The expand
//               scale * s B^T and the bias are added before the store. Without the norm the
//               residual is added there too and this is the last launch; with it, the block
//               stores y and per-(row, tile) partial statistics (mean, std) of its columns,
//               computed on the values times a power of two (no overflow at |y| ~ 1e19).
//   3. finish (norm only): one block per row merges the tile statistics (the squares scaled by
//               a power of two from the largest deviation), writes mean/rstd and
//               out = gamma (y - mean) rstd [+ residual].
// Requirements (checked by the binding): 1 <= M <= kDecodeMaxM, K % 8 == 0, x / weight /
// lora_a 16-byte aligned with rows of 16-byte multiples, everything else contiguous.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flexigpt {
namespace cuda {

enum class DType { kFloat16, kBFloat16 };

constexpr int kDecodeMaxM = 16;
constexpr int kWarpsPerBlock = 4;
constexpr int kColsPerWarp = 2;
constexpr int kTileN = kWarpsPerBlock * kColsPerWarp;
constexpr int kMatvecUnroll = 4;  // K-loop steps whose weight loads are issued together
constexpr int kFinishThreads = 256;

struct DecodeParams {
  const void* x;
  int64_t x_row_stride;
  const void* weight;
  const void* lora_a;
  const void* lora_b;
  const void* bias;         // nullptr: none
  const void* norm_weight;  // nullptr: no norm
  const void* residual;     // nullptr: none
  int64_t residual_row_stride;
  void* out;                // [M, N]
  void* y;                  // [M, N] pre-norm values (norm only; may equal out)
  void* shrink;             // [M, r], x's dtype
  float* shrink_f32;        // [M, r] workspace
  float* partial_mean;      // [M, tiles] workspace (norm only)
  float* partial_std;       // [M, tiles] workspace (norm only)
  float* mean;              // [M] (norm only)
  float* rstd;              // [M] (norm only)
  int m, n, k, r;
  float scale, eps;
};

inline int decode_tiles(int n) { return (n + kTileN - 1) / kTileN; }

// Enqueues the launches; returns the launch error, if any (cudaErrorInvalidValue for
// arguments outside the requirements above).
cudaError_t launch_shared_lora_linear_decode(const DecodeParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace flexigpt
