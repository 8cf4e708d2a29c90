"""Triton kernel: one tiled GEMM with the low-rank delta, bias and per-tile row statistics.

    y[M, N] = x[M, K] @ w[N, K].T (+ bias[N]) (+ scale * (x @ a[R, K].T) @ b[N, R].T) (+ res[M, N])

Every operand is addressed through strides, so the backward reuses the same kernel on
transposed views (grad_x = dy @ W + s (dy @ B) @ A is this op with w = W.T, a = B.T, b = A.T).

LoRA modes (configs.py chooses between them):
  LORA_NONE       plain GEMM times `scale` (the shrink x @ a.T itself, weight gradients),
                  optionally split over K into fp32 partials (grid axis 1).
  LORA_FUSED      decode at rank <= 64: the shrink s = x @ a.T accumulates inside the K loop
                  from the x tile already loaded for the base GEMM; the expand s @ b.T is added
                  before the store. One launch; each N tile recomputes the (cheap) shrink.
  LORA_PRECOMPUTED prefill, training, and decode above rank 64: s [M, R] was computed once by
                  a split-K LORA_NONE launch; the accumulator starts from scale * s @ b.T.
Without the norm, the residual is added in the epilogue (HAS_RESIDUAL).
With STATS, every (row, N-tile) writes the partial statistics of its fp32 accumulator - tile
mean and std = sqrt(sum (y - tile_mean)^2 / count), computed on the values times a power of two
(so no square overflows at |y| ~ 1e19) - for the row-norm phase to merge (row_norm.py), so no
program ever needs a whole row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs
from .configs import (  # noqa: F401  (re-exported: the names the backend and tests use)
    FUSED_SHRINK_MAX_M,
    LORA_FUSED,
    LORA_NONE,
    LORA_PRECOMPUTED,
    TileConfig,
    default_config,
)
from .configs import (
    block_r as _block_r,
)
from .launch import ieee_f32, launch
from .row_norm import pow2_scale


@triton.jit
def _linear_lora_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    s_ptr,
    y_ptr,
    pmean_ptr,
    pstd_ptr,
    res_ptr,
    M,
    N,
    K,
    R,
    scale,
    K_SPLIT,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_sm,
    stride_sr,
    stride_ym,
    stride_yn,
    stride_ys,
    stride_rm,
    stride_rn,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    LORA_MODE: tl.constexpr,
    STORE_SHRINK: tl.constexpr,
    STATS: tl.constexpr,
    IEEE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_RC: tl.constexpr,
    GROUP_M: tl.constexpr,
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
    # Split-K (LORA_NONE only): slice pid_k covers K_SPLIT columns of K and writes its own
    # fp32 partial at y + pid_k * stride_ys.
    pid_k = tl.program_id(1)
    k_start = pid_k.to(tl.int64) * K_SPLIT
    k_len = tl.minimum(K - k_start, K_SPLIT)

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
            s = tl.load(
                s_ptr + offs_m[:, None] * stride_sm + rr[None, :] * stride_sr,
                mask=mask_m[:, None] & mask_rc[None, :],
                other=0.0,
            )
            bt = tl.load(
                b_ptr + rr[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=mask_rc[:, None] & mask_n[None, :],
                other=0.0,
            )
            if IEEE_F32:
                acc = tl.dot(s.to(bt.dtype), bt, acc, input_precision="ieee")
            else:
                acc = tl.dot(s.to(bt.dtype), bt, acc)
        acc = acc * scale
    if LORA_MODE == 1:
        s_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    for k0 in range(0, tl.cdiv(k_len, BLOCK_K)):
        kk = k_start + k0 * BLOCK_K + offs_k
        mask_k = kk < k_start + k_len
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        wt = tl.load(
            w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if IEEE_F32:
            acc = tl.dot(x, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, wt, acc)
        if LORA_MODE == 1:
            at = tl.load(
                a_ptr + kk[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )
            if IEEE_F32:
                s_acc = tl.dot(x, at, s_acc, input_precision="ieee")
            else:
                s_acc = tl.dot(x, at, s_acc)

    if LORA_MODE == 1:
        bt = tl.load(
            b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        s_cast = s_acc.to(bt.dtype)
        if IEEE_F32:
            acc += tl.dot(s_cast, bt, input_precision="ieee") * scale
        else:
            acc += tl.dot(s_cast, bt) * scale
        if STORE_SHRINK:
            # Every N tile computed the same shrink; the first one stores it for the backward.
            if pid_n == 0:
                tl.store(
                    s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    s_cast.to(s_ptr.dtype.element_ty),
                    mask=mask_m[:, None] & mask_r[None, :],
                )

    if LORA_MODE == 0:
        acc = acc * scale  # the weight gradients' adapter scale, folded (1.0 otherwise)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    if STATS:
        # Scaled by a power of two that brings the tile's largest |value| to [1, 2) (exact), so
        # neither the sum nor the squares overflow or underflow fp32 at outputs near 1e19 / 1e-19;
        # the stored (mean, std) are of the order of the values, hence representable.
        count = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(tl.float32)
        valid = mask_n[None, :]
        # acc is 0 in the masked columns (every N-indexed load has other=0)
        down, up = pow2_scale(tl.max(tl.abs(acc), axis=1), -126)
        mean_s = tl.sum(acc * down[:, None], axis=1) / count
        dev = tl.where(valid, acc * down[:, None] - mean_s[:, None], 0.0)
        tile_std = tl.sqrt(tl.sum(dev * dev, axis=1) / count) * up
        stat_offs = offs_m * num_pid_n + pid_n
        tl.store(pmean_ptr + stat_offs, mean_s * up, mask=mask_m)
        tl.store(pstd_ptr + stat_offs, tile_std, mask=mask_m)

    if HAS_RESIDUAL:
        # residual without the norm, in the epilogue (one rounding, no separate pass)
        res = tl.load(
            res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc += res.to(tl.float32)

    tl.store(
        y_ptr + pid_k.to(tl.int64) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def linear_lora(
    x: Tensor,
    weight: Tensor,
    *,
    out: Tensor,
    bias: Tensor | None = None,
    lora_a: Tensor | None = None,
    lora_b: Tensor | None = None,
    scale: float = 1.0,
    shrink: Tensor | None = None,
    mode: int = LORA_NONE,
    partial_stats: tuple[Tensor, Tensor] | None = None,
    residual: Tensor | None = None,
    config: TileConfig | None = None,
    k_split: int = 1,
) -> Tensor:
    """Launch the kernel: out[M, N] = x[M, K] @ weight[N, K].T (+ bias) (+ LoRA per `mode`)
    (+ residual [M, N]); with LORA_NONE the product is multiplied by `scale`.

    shrink [M, R]: written in LORA_FUSED mode (if given), read in LORA_PRECOMPUTED mode.
    partial_stats: (mean, std) buffers of shape [M, cdiv(N, block_n)] fp32, filled when given.
    k_split > 1 (LORA_NONE, no bias/residual/stats): out is [k_split, M, N] fp32 partial sums.
    Any strides; x, weight, lora_a, lora_b share one dtype. The config is checked against the
    device's shared memory (fewer stages / a shorter K step when it would not fit).
    """
    m, k = x.shape
    n = weight.shape[0]
    r = lora_a.shape[0] if lora_a is not None else (lora_b.shape[1] if lora_b is not None else 1)
    if residual is not None and partial_stats is not None:
        raise ValueError("linear_lora: the residual is added after the norm, not before its statistics")
    if k_split > 1 and (mode != LORA_NONE or bias is not None or residual is not None or partial_stats is not None):
        raise ValueError("linear_lora: k_split > 1 is for plain GEMMs only")
    cfg = config or default_config(m, x.dtype, r)
    fitted = configs.fit_config(
        cfg, x.element_size(), configs.smem_limit(x.device), configs.block_r(r) if mode == LORA_FUSED else 0
    )
    if fitted is None:
        raise ValueError(
            f"linear_lora: no tile of {cfg} fits in shared memory at rank {r} ({x.dtype}); use the precomputed shrink"
        )
    cfg = fitted
    dummy = out  # placeholder pointer for absent operands (never dereferenced)
    a = lora_a if lora_a is not None else dummy
    b = lora_b if lora_b is not None else dummy
    s = shrink if shrink is not None else dummy
    res = residual if residual is not None else dummy
    pmean, pstd = partial_stats if partial_stats is not None else (dummy, dummy)
    if k_split > 1 and (out.dim() != 3 or out.shape[0] != k_split or out.dtype != torch.float32):
        raise ValueError(
            f"linear_lora: k_split={k_split} needs an fp32 out of shape [k_split, M, N], "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    # slices of whole 64-element steps (aligned loads); trailing empty slices store zeros
    k_len = triton.cdiv(triton.cdiv(k, k_split), 64) * 64 if k_split > 1 else k
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), k_split)
    launch(
        _linear_lora_kernel,
        grid,
        x,
        weight,
        bias if bias is not None else dummy,
        a,
        b,
        s,
        out,
        pmean,
        pstd,
        res,
        m,
        n,
        k,
        r,
        float(scale),
        k_len,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        a.stride(0) if lora_a is not None else 0,
        a.stride(1) if lora_a is not None else 0,
        b.stride(0) if lora_b is not None else 0,
        b.stride(1) if lora_b is not None else 0,
        s.stride(0) if shrink is not None else 0,
        s.stride(1) if shrink is not None else 0,
        out.stride(-2),
        out.stride(-1),
        out.stride(0) if k_split > 1 else 0,
        res.stride(0) if residual is not None else 0,
        res.stride(1) if residual is not None else 0,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        LORA_MODE=mode,
        STORE_SHRINK=shrink is not None and mode == LORA_FUSED,
        STATS=partial_stats is not None,
        IEEE_F32=ieee_f32(x.dtype),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_R=_block_r(r),
        BLOCK_RC=min(64, _block_r(r)),
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def shrink(x: Tensor, lora_a: Tensor, out: Tensor, scale: float = 1.0) -> Tensor:
    """out[M, r] = scale * x[M, K] @ lora_a[r, K].T, split over K when the M x r tiles alone
    would leave the machine idle (fp32 partials [splits, M, r], summed, then cast to out)."""
    m, k = x.shape
    r = lora_a.shape[0]
    cfg = configs.shrink_config(m, r, x.dtype)
    splits = configs.split_k(m, r, k, cfg)
    if splits == 1:
        return linear_lora(x, lora_a, out=out, scale=scale, config=cfg)
    partial = torch.empty((splits, m, r), device=x.device, dtype=torch.float32)
    linear_lora(x, lora_a, out=partial, scale=scale, config=cfg, k_split=splits)
    return out.copy_(partial.sum(0))
