// CUDA decode kernel of shared_lora_linear: see shared_lora_linear_decode.h.
#include "shared_lora_linear_decode.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flexigpt {
namespace cuda {
namespace {

template <typename T>
struct Packed;
template <>
struct Packed<__half> {
  using type = __half2;
};
template <>
struct Packed<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// acc + dot(a, b) over 8 packed 16-bit elements, in fp32.
template <typename T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b, float acc) {
  using T2 = typename Packed<T>::type;
  const T2* pa = reinterpret_cast<const T2*>(&a);
  const T2* pb = reinterpret_cast<const T2*>(&b);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = to_float2(pa[i]);
    const float2 fb = to_float2(pb[i]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
  return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Chan et al.: merge (count b, mean b, M2 b) into (count a, mean a, M2 a).
__device__ __forceinline__ void chan_merge(float& na, float& ma, float& m2a, float nb, float mb, float m2b) {
  if (nb == 0.0f) return;
  const float n = na + nb;
  const float delta = mb - ma;
  ma += delta * (nb / n);
  m2a += m2b + delta * delta * (na * nb / n);
  na = n;
}

// 1. s[m, j] = sum_k x[m, k] A[j, k] for every row m, one warp per adapter row j.
template <typename T, int MAXM>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) shrink_kernel(const DecodeParams p) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kWarpsPerBlock + warp;
  if (j >= p.r) return;  // whole warps only: no block-level synchronisation follows
  const T* x = static_cast<const T*>(p.x);
  const uint4* a = reinterpret_cast<const uint4*>(static_cast<const T*>(p.lora_a) + static_cast<int64_t>(j) * p.k);
  const int k8 = p.k / 8;
  const int rows = p.m;
  // x in 16-byte units (the row stride is a multiple of 8 elements): one running pointer and a
  // stride, not MAXM row addresses kept live across the loop (which made ptxas spill at MAXM 16)
  const uint4* x4 = reinterpret_cast<const uint4*>(x) + lane;
  const int64_t xs8 = p.x_row_stride / 8;
  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) acc[m] = 0.0f;
  for (int c = lane; c < k8; c += 32, x4 += 32) {
    const uint4 av = __ldg(a + c);
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < rows) acc[m] = dot8<T>(av, __ldg(x4 + m * xs8), acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0 && m < p.m) {
      p.shrink_f32[m * p.r + j] = v;
      static_cast<T*>(p.shrink)[m * p.r + j] = from_float<T>(v);
    }
  }
}

// 2. y[m, n] = x[m] . W[n] + bias[n] + scale * s[m] . B[n], split over N.
template <typename T, int MAXM>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) matvec_kernel(const DecodeParams p) {
  __shared__ float tile_vals[MAXM][kTileN];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int tile = blockIdx.x;
  const int n0 = tile * kTileN + warp * kColsPerWarp;  // this warp's first column
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);
  const int k8 = p.k / 8;

  // Columns past N (last tile) read row N-1 and are dropped at the store: no divergence.
  const uint4* wrow[kColsPerWarp];
#pragma unroll
  for (int c = 0; c < kColsPerWarp; ++c) {
    const int n = min(n0 + c, p.n - 1);
    wrow[c] = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(n) * p.k);
  }
  float acc[kColsPerWarp][MAXM];
#pragma unroll
  for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[c][m] = 0.0f;

  // kMatvecUnroll steps of the K loop issue all their weight loads before any multiply:
  // kMatvecUnroll * kColsPerWarp independent 16-byte loads in flight per lane.
  int idx = lane;
  for (; idx + (kMatvecUnroll - 1) * 32 < k8; idx += kMatvecUnroll * 32) {
    uint4 wv[kMatvecUnroll][kColsPerWarp];
#pragma unroll
    for (int u = 0; u < kMatvecUnroll; ++u)
#pragma unroll
      for (int c = 0; c < kColsPerWarp; ++c) wv[u][c] = __ldcs(wrow[c] + idx + u * 32);  // streamed once
#pragma unroll
    for (int u = 0; u < kMatvecUnroll; ++u) {
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < p.m) {
          const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + m * p.x_row_stride) + idx + u * 32);
#pragma unroll
          for (int c = 0; c < kColsPerWarp; ++c) acc[c][m] = dot8<T>(wv[u][c], xv, acc[c][m]);
        }
      }
    }
  }
  for (; idx < k8; idx += 32) {  // the remainder, one step at a time
    uint4 wv[kColsPerWarp];
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c) wv[c] = __ldcs(wrow[c] + idx);  // streamed once: evict first
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < p.m) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + m * p.x_row_stride) + idx);  // reused: cached
#pragma unroll
        for (int c = 0; c < kColsPerWarp; ++c) acc[c][m] = dot8<T>(wv[c], xv, acc[c][m]);
      }
    }
  }

  // The expand, before the reduction: the lanes split the rank.
  const T* b = static_cast<const T*>(p.lora_b);
  for (int j = lane; j < p.r; j += 32) {
#pragma unroll
    for (int c = 0; c < kColsPerWarp; ++c) {
      const int n = min(n0 + c, p.n - 1);
      const float bv = p.scale * to_float(b[static_cast<int64_t>(n) * p.r + j]);
#pragma unroll
      for (int m = 0; m < MAXM; ++m)
        if (m < p.m) acc[c][m] = fmaf(bv, p.shrink_f32[m * p.r + j], acc[c][m]);
    }
  }
#pragma unroll
  for (int c = 0; c < kColsPerWarp; ++c)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[c][m] = warp_sum(acc[c][m]);

  const bool has_norm = p.norm_weight != nullptr;
  const T* bias = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
#pragma unroll
  for (int c = 0; c < kColsPerWarp; ++c) {
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      const int n = n0 + c;
      if (m < p.m && lane == ((c * MAXM + m) & 31)) {  // spread the stores over the lanes
        float v = acc[c][m] + (bias != nullptr && n < p.n ? to_float(bias[n]) : 0.0f);
        if (has_norm) {
          tile_vals[m][warp * kColsPerWarp + c] = v;
          if (n < p.n) static_cast<T*>(p.y)[static_cast<int64_t>(m) * p.n + n] = from_float<T>(v);
        } else if (n < p.n) {
          if (res != nullptr) v += to_float(res[m * p.residual_row_stride + n]);
          static_cast<T*>(p.out)[static_cast<int64_t>(m) * p.n + n] = from_float<T>(v);
        }
      }
    }
  }
  if (!has_norm) return;
  __syncthreads();
  // Per-row statistics of this tile's valid columns (two passes over at most kTileN values).
  const int count = min(kTileN, p.n - tile * kTileN);
  const int tiles = gridDim.x;
  for (int m = threadIdx.x; m < p.m; m += blockDim.x) {
    float s = 0.0f;
    for (int c = 0; c < count; ++c) s += tile_vals[m][c];
    const float mean = s / count;
    float m2 = 0.0f;
    for (int c = 0; c < count; ++c) {
      const float d = tile_vals[m][c] - mean;
      m2 += d * d;
    }
    p.partial_mean[m * tiles + tile] = mean;
    p.partial_m2[m * tiles + tile] = m2;
  }
}

// 3. One block per row: merge the tile statistics, normalise, scale, add the residual.
template <typename T>
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const DecodeParams p, const int tiles) {
  __shared__ float s_cnt[kFinishThreads / 32], s_mean[kFinishThreads / 32], s_m2[kFinishThreads / 32];
  __shared__ float s_stats[2];
  const int m = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  float cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
  for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
    const float nb = static_cast<float>(min(kTileN, p.n - t * kTileN));
    chan_merge(cnt, mean, m2, nb, p.partial_mean[m * tiles + t], p.partial_m2[m * tiles + t]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float nb = __shfl_down_sync(0xffffffffu, cnt, offset);
    const float mb = __shfl_down_sync(0xffffffffu, mean, offset);
    const float m2b = __shfl_down_sync(0xffffffffu, m2, offset);
    chan_merge(cnt, mean, m2, nb, mb, m2b);
  }
  if (lane == 0) {
    s_cnt[warp] = cnt;
    s_mean[warp] = mean;
    s_m2[warp] = m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float c = 0.0f, mu = 0.0f, q = 0.0f;
    for (int i = 0; i < kFinishThreads / 32; ++i) chan_merge(c, mu, q, s_cnt[i], s_mean[i], s_m2[i]);
    const float rstd = rsqrtf(q / static_cast<float>(p.n) + p.eps);
    s_stats[0] = mu;
    s_stats[1] = rstd;
    p.mean[m] = mu;
    p.rstd[m] = rstd;
  }
  __syncthreads();
  const float mu = s_stats[0], rstd = s_stats[1];
  const T* y = static_cast<const T*>(p.y) + static_cast<int64_t>(m) * p.n;
  const T* gamma = static_cast<const T*>(p.norm_weight);
  const T* res = p.residual != nullptr ? static_cast<const T*>(p.residual) + m * p.residual_row_stride : nullptr;
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(m) * p.n;
  for (int n = threadIdx.x; n < p.n; n += blockDim.x) {
    float v = (to_float(y[n]) - mu) * rstd * to_float(gamma[n]);
    if (res != nullptr) v += to_float(res[n]);
    out[n] = from_float<T>(v);  // out may be y: each element is read then written by one thread
  }
}

template <typename T, int MAXM>
cudaError_t launch_typed(const DecodeParams& p, cudaStream_t stream) {
  const dim3 block(kWarpsPerBlock * 32);
  const int tiles = decode_tiles(p.n);
  shrink_kernel<T, MAXM><<<(p.r + kWarpsPerBlock - 1) / kWarpsPerBlock, block, 0, stream>>>(p);
  matvec_kernel<T, MAXM><<<tiles, block, 0, stream>>>(p);
  if (p.norm_weight != nullptr) finish_kernel<T><<<p.m, kFinishThreads, 0, stream>>>(p, tiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rows(const DecodeParams& p, cudaStream_t stream) {
  if (p.m <= 1) return launch_typed<T, 1>(p, stream);
  if (p.m <= 2) return launch_typed<T, 2>(p, stream);
  if (p.m <= 4) return launch_typed<T, 4>(p, stream);
  if (p.m <= 8) return launch_typed<T, 8>(p, stream);
  return launch_typed<T, 16>(p, stream);
}

}  // namespace

cudaError_t launch_shared_lora_linear_decode(const DecodeParams& p, DType dtype, cudaStream_t stream) {
  if (p.m < 1 || p.m > kDecodeMaxM || p.n < 1 || p.k < 8 || p.k % 8 != 0 || p.r < 1 ||
      p.x_row_stride % 8 != 0 || (p.norm_weight != nullptr && (p.y == nullptr || p.mean == nullptr))) {
    return cudaErrorInvalidValue;
  }
  return dtype == DType::kBFloat16 ? launch_rows<__nv_bfloat16>(p, stream) : launch_rows<__half>(p, stream);
}

}  // namespace cuda
}  // namespace flexigpt
