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

// (down, up) = (2^-e, 2^e) with 2^e <= a < 2^(e+1), e clamped to [low, 126] (low >= -126): a * down
// lies in [1, 2) inside the clamp; both are normal powers of two, so the products are exact.
__device__ __forceinline__ float2 pow2_scale(float a, int low) {
  int b = (__float_as_int(a) >> 23) & 0xff;  // the biased exponent (a >= 0)
  b = min(max(b, 127 + low), 253);
  return make_float2(__int_as_float((254 - b) << 23), __int_as_float(b << 23));
}

// op-reduction of v over the finish block, returned to every thread; scratch holds one value per warp.
template <typename Op>
__device__ __forceinline__ float block_all_reduce(float v, Op op, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int i = 1; i < kFinishThreads / 32; ++i) r = op(r, scratch[i]);
  __syncthreads();  // scratch is reused by the next reduction
  return r;
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
  // Per-row (mean, std) of this tile's valid columns, on the values times the power of two that
  // brings the largest to [1, 2): no sum or square overflows at |y| ~ 1e19 or underflows at 1e-19,
  // and (mean, std), of the order of the values, are representable.
  const int count = min(kTileN, p.n - tile * kTileN);
  const int tiles = gridDim.x;
  for (int m = threadIdx.x; m < p.m; m += blockDim.x) {
    float amax = 0.0f;
    for (int c = 0; c < count; ++c) amax = fmaxf(amax, fabsf(tile_vals[m][c]));
    const float2 sc = pow2_scale(amax, -126);
    float s = 0.0f;
    for (int c = 0; c < count; ++c) s += tile_vals[m][c] * sc.x;
    const float mean = s / count;
    float m2 = 0.0f;
    for (int c = 0; c < count; ++c) {
      const float d = tile_vals[m][c] * sc.x - mean;
      m2 += d * d;
    }
    p.partial_mean[m * tiles + tile] = mean * sc.y;
    p.partial_std[m * tiles + tile] = sqrtf(m2 / count) * sc.y;
  }
}

// 3. One block per row: merge the tile statistics (count n_t, mean_t, std_t),
//      mean = sum_t (n_t / N) mean_t            (convex weights: no partial sum overflows)
//      M2   = sum_t n_t (std_t^2 + (mean_t - mean)^2), the squares scaled by 2^-e with
//             2^e ~ max_t max(std_t, |mean_t - mean|),
//      rstd = 2^-e / sqrt(M2 2^-2e / N + eps 2^-2e); then normalise, scale, add the residual.
template <typename T>
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const DecodeParams p, const int tiles) {
  __shared__ float scratch[kFinishThreads / 32];
  const int m = blockIdx.x;
  const float* pmean = p.partial_mean + static_cast<int64_t>(m) * tiles;
  const float* pstd = p.partial_std + static_cast<int64_t>(m) * tiles;
  const float inv_n = 1.0f / static_cast<float>(p.n);
  const auto count = [&](int t) { return static_cast<float>(min(kTileN, p.n - t * kTileN)); };
  const auto add = [](float a, float b) { return a + b; };
  const auto max_of = [](float a, float b) { return fmaxf(a, b); };

  float v = 0.0f;
  for (int t = threadIdx.x; t < tiles; t += blockDim.x) v += (count(t) * inv_n) * pmean[t];
  const float mu = block_all_reduce(v, add, scratch);
  v = 0.0f;
  for (int t = threadIdx.x; t < tiles; t += blockDim.x) v = fmaxf(v, fmaxf(pstd[t], fabsf(pmean[t] - mu)));
  const float down = pow2_scale(block_all_reduce(v, max_of, scratch), -40).x;  // e >= -40: eps 2^-2e finite
  v = 0.0f;
  for (int t = threadIdx.x; t < tiles; t += blockDim.x) {
    const float sd = pstd[t] * down, d = (pmean[t] - mu) * down;
    v += count(t) * (sd * sd + d * d);
  }
  const float q = block_all_reduce(v, add, scratch);
  const float rstd = down * rsqrtf(q * inv_n + p.eps * down * down);
  if (threadIdx.x == 0) {
    p.mean[m] = mu;
    p.rstd[m] = rstd;
  }
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
