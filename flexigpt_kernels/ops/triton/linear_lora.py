"""Triton kernel: one tiled GEMM with the low-rank delta, bias and per-tile row statistics.

    y[M, N] = x[M, K] @ w[N, K].T (+ bias[N]) (+ scale * (x @ a[R, K].T) @ b[N, R].T)

Every operand is addressed through strides, so the backward reuses the same kernel on
transposed views (grad_x = dy @ W + s (dy @ B) @ A is this op with w = W.T, a = B.T, b = A.T).

LoRA modes (README, "Triton kernel regimes"):
  LORA_NONE       plain GEMM (the shrink x @ a.T itself, weight gradients).
  LORA_FUSED      small M (decode): the shrink s = x @ a.T accumulates inside the K loop from
                  the x tile already loaded for the base GEMM; the expand s @ b.T is added
                  before the store. One launch; each N tile recomputes the (cheap) shrink.
  LORA_PRECOMPUTED large M (prefill, training): s [M, R] was computed once by a LORA_NONE
                  launch; the accumulator starts from scale * s @ b.T.
With STATS, every (row, N-tile) writes the count-weighted partial statistics of its fp32
accumulator - tile mean and M2 = sum (y - tile_mean)^2 - for the row-norm phase to merge
with Chan's formula (row_norm.py), so no program ever needs a whole row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

LORA_NONE, LORA_FUSED, LORA_PRECOMPUTED = 0, 1, 2

# At or below this many rows the shrink is fused into the base GEMM's K loop.
FUSED_SHRINK_MAX_M = 64


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def default_config(m: int, dtype: torch.dtype, rank: int = 16) -> TileConfig:
    """Block sizes by regime: decode tiles are short in M and wide in K (weight-read bound);
    prefill tiles are square, 128x128 for 16-bit inputs (tensor-core bound)."""
    wide = dtype in (torch.float32, torch.float64)
    if m <= FUSED_SHRINK_MAX_M:
        # The fused shrink keeps an [BLOCK_K, BLOCK_R] adapter tile per stage: shrink K and the
        # pipeline depth as the rank grows so the stages fit in shared memory (228 KB on H100).
        if rank > 64:
            return TileConfig(block_m=16, block_n=64, block_k=32 if wide else 64, group_m=1, num_warps=4, num_stages=2)
        return TileConfig(block_m=16, block_n=64, block_k=64 if wide else 128, group_m=1, num_warps=4, num_stages=4)
    if wide:
        return TileConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)
    return TileConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)


@triton.jit
def _linear_lora_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, s_ptr, y_ptr, pmean_ptr, pm2_ptr,
    M, N, K, R, scale,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_ar, stride_ak, stride_bn, stride_br,
    stride_sm, stride_sr, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, LORA_MODE: tl.constexpr, STORE_SHRINK: tl.constexpr,
    STATS: tl.constexpr, IEEE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_RC: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row tiles sweep the N tiles together (L2 reuse of w).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # 64-bit offsets: the weight-gradient GEMMs address [tokens x N] operands past 2^31 elements
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if LORA_MODE == 2:
        # acc starts from scale * s @ b.T, R in chunks of BLOCK_RC (bounded registers at r = 256).
        offs_rc = tl.arange(0, BLOCK_RC)
        for r0 in range(0, tl.cdiv(R, BLOCK_RC)):
            rr = r0 * BLOCK_RC + offs_rc
            mask_rc = rr < R
            s = tl.load(s_ptr + offs_m[:, None] * stride_sm + rr[None, :] * stride_sr,
                        mask=mask_m[:, None] & mask_rc[None, :], other=0.0)
            bt = tl.load(b_ptr + rr[:, None] * stride_br + offs_n[None, :] * stride_bn,
                         mask=mask_rc[:, None] & mask_n[None, :], other=0.0)
            if IEEE_F32:
                acc = tl.dot(s.to(bt.dtype), bt, acc, input_precision="ieee")
            else:
                acc = tl.dot(s.to(bt.dtype), bt, acc)
        acc = acc * scale
    if LORA_MODE == 1:
        s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k0 * BLOCK_K + offs_k
        mask_k = kk < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if IEEE_F32:
            acc = tl.dot(x, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wt, acc)
        if LORA_MODE == 1:
            at = tl.load(a_ptr + kk[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if IEEE_F32:
                s_acc = tl.dot(x, at, s_acc, input_precision="ieee")
            else:
                s_acc = tl.dot(x, at, s_acc)

    if LORA_MODE == 1:
        bt = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        s_cast = s_acc.to(bt.dtype)
        if IEEE_F32:
            acc += tl.dot(s_cast, bt, input_precision="ieee") * scale
        else:
            acc += tl.dot(s_cast, bt) * scale
        if STORE_SHRINK:
            # Every N tile computed the same shrink; the first one stores it for the backward.
            if pid_n == 0:
                tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                         s_cast.to(s_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    if STATS:
        count = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(tl.float32)
        valid = mask_n[None, :]
        tile_mean = tl.sum(tl.where(valid, acc, 0.0), axis=1) / count
        dev = tl.where(valid, acc - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=1)
        stat_offs = offs_m * num_pid_n + pid_n
        tl.store(pmean_ptr + stat_offs, tile_mean, mask=mask_m)
        tl.store(pm2_ptr + stat_offs, tile_m2, mask=mask_m)

    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def linear_lora(
    x: Tensor,
    weight: Tensor,
    *,
    out: Tensor,
    bias: Optional[Tensor] = None,
    lora_a: Optional[Tensor] = None,
    lora_b: Optional[Tensor] = None,
    scale: float = 1.0,
    shrink: Optional[Tensor] = None,
    mode: int = LORA_NONE,
    partial_stats: Optional[tuple[Tensor, Tensor]] = None,
    config: Optional[TileConfig] = None,
) -> Tensor:
    """Launch the kernel: out[M, N] = x[M, K] @ weight[N, K].T (+ bias) (+ LoRA per `mode`).

    shrink [M, R]: written in LORA_FUSED mode (if given), read in LORA_PRECOMPUTED mode.
    partial_stats: (mean, m2) buffers of shape [M, cdiv(N, block_n)] fp32, filled when given.
    Any strides; x, weight, lora_a, lora_b share one dtype.
    """
    m, k = x.shape
    n = weight.shape[0]
    r = lora_a.shape[0] if lora_a is not None else (lora_b.shape[1] if lora_b is not None else 1)
    cfg = config or default_config(m, x.dtype, r)
    dummy = out  # placeholder pointer for absent operands (never dereferenced)
    a = lora_a if lora_a is not None else dummy
    b = lora_b if lora_b is not None else dummy
    s = shrink if shrink is not None else dummy
    pmean, pm2 = partial_stats if partial_stats is not None else (dummy, dummy)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    ieee = x.dtype in (torch.float32, torch.float64) and not torch.backends.cuda.matmul.allow_tf32
    _linear_lora_kernel[grid](
        x, weight, bias if bias is not None else dummy, a, b, s, out, pmean, pm2,
        m, n, k, r, float(scale),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        a.stride(0) if lora_a is not None else 0, a.stride(1) if lora_a is not None else 0,
        b.stride(0) if lora_b is not None else 0, b.stride(1) if lora_b is not None else 0,
        s.stride(0) if shrink is not None else 0, s.stride(1) if shrink is not None else 0,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, LORA_MODE=mode,
        STORE_SHRINK=shrink is not None and mode == LORA_FUSED,
        STATS=partial_stats is not None, IEEE_F32=ieee,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_R=_block_r(r), BLOCK_RC=min(64, _block_r(r)), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
