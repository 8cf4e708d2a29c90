"""Triton kernels for the output normalization's second phase and its backward.

Forward finish, one program per row (any N: the row is streamed in BLOCK chunks):
    merge the per-tile (count n_t, mean_t, std_t) of linear_lora.py:
        mean = sum_t n_t mean_t / N          (a running convex combination: no sum overflows)
        M2   = sum_t n_t (std_t^2 + (mean_t - mean)^2)
    the squares taken after scaling by 2^-e, 2^e ~ max_t max(std_t, |mean_t - mean|), so that
    rows of |y| ~ 1e19 (squares past fp32's range) or ~1e-19 keep their variance:
        rstd = 1 / sqrt(M2 / N + eps) = 2^-e / sqrt((M2 / 2^2e) / N + eps 2^-2e)
    out = gamma * (y_pre - mean) * rstd (+ residual)

Backward, with xhat = (y_pre - mean) * rstd and g the incoming gradient:
    c1 = mean_row(g*gamma),  c2 = mean_row(g*gamma*xhat)                            per row
    dy     = rstd * (g*gamma - c1 - xhat * c2)                                      per row
    dgamma = sum_rows g * xhat,   dbias = sum_rows dy                               per column
The column sums are two-stage: programs over (column tile, row slice) write fp32 partials
[slices, N] (enough slices to fill the machine at N = 576), then one sum over the slices. dbias
is recomputed there from the per-row c1, c2 the row kernel stores (no extra pass over dy).
All launches go through launch.py (device guard, tracing, recording).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch

# Programs the two-stage column reduction aims for, and its row-block height.
COLUMN_TARGET_PROGRAMS = 256
COLUMN_BLOCK_M = 32


@triton.jit
def pow2_scale(amax, LOW: tl.constexpr):
    """(down, up) = (2^-e, 2^e) with 2^e <= amax < 2^(e+1), e clamped to [LOW, 126] (LOW >= -126):
    amax * down lies in [1, 2) inside the clamp; both are normal fp32 powers of two (exact
    products). amax >= 0, any shape; 0 gives e = LOW."""
    b = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # the biased exponent
    b = tl.minimum(tl.maximum(b, 127 + LOW), 253)
    down = ((254 - b) << 23).to(tl.float32, bitcast=True)
    up = (b << 23).to(tl.float32, bitcast=True)
    return down, up


@triton.jit
def _tile_stats(pmean_ptr, pstd_ptr, row, t0, N, T, TILE_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """(count, mean, std) of tiles t0 .. t0 + BLOCK_T of one row (count 0 past the last tile)."""
    t = t0 + tl.arange(0, BLOCK_T)
    mt = t < T
    cnt = tl.where(mt, tl.minimum(N - t * TILE_N, TILE_N), 0).to(tl.float32)
    pm = tl.load(pmean_ptr + row * T + t, mask=mt, other=0.0)
    ps = tl.load(pstd_ptr + row * T + t, mask=mt, other=0.0)
    return cnt, pm, ps


@triton.jit
def _norm_finish_kernel(
    y_ptr,
    out_ptr,
    gamma_ptr,
    res_ptr,
    pmean_ptr,
    pstd_ptr,
    mean_ptr,
    rstd_ptr,
    N,
    T,
    eps,
    stride_ym,
    stride_om,
    stride_rm,
    TILE_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # 1. the row mean: a running convex combination of the chunks' count-weighted means
    n_acc = 0.0
    mean = 0.0
    for t0 in range(0, T, BLOCK_T):
        cnt, pm, _ = _tile_stats(pmean_ptr, pstd_ptr, row, t0, N, T, TILE_N, BLOCK_T)
        n_c = tl.sum(cnt, axis=0)
        n_new = n_acc + n_c
        mean = mean * (n_acc / n_new) + tl.sum(pm * (cnt / n_c), axis=0) * (n_c / n_new)
        n_acc = n_new
    # 2. the largest deviation scale, |tile mean - mean| or tile std: it picks the power of two
    dmax = 0.0
    for t0 in range(0, T, BLOCK_T):
        cnt, pm, ps = _tile_stats(pmean_ptr, pstd_ptr, row, t0, N, T, TILE_N, BLOCK_T)
        dmax = tl.maximum(dmax, tl.max(tl.where(cnt > 0, tl.maximum(ps, tl.abs(pm - mean)), 0.0), axis=0))
    down, _ = pow2_scale(dmax, -40)  # e >= -40: eps 2^-2e stays finite
    # 3. M2 / 2^2e = sum_t count_t (std_t^2 + (mean_t - mean)^2) / 2^2e
    m2 = 0.0
    for t0 in range(0, T, BLOCK_T):
        cnt, pm, ps = _tile_stats(pmean_ptr, pstd_ptr, row, t0, N, T, TILE_N, BLOCK_T)
        sd = ps * down
        d = (pm - mean) * down
        m2 += tl.sum(cnt * (sd * sd + d * d), axis=0)
    # rstd = 1 / sqrt(M2 / N + eps) = 2^-e / sqrt(M2 / 2^2e / N + eps 2^-2e)
    rstd = down / tl.sqrt(m2 / N + eps * down * down)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    for n0 in range(0, N, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        mask = cols < N
        y = tl.load(y_ptr + row * stride_ym + cols, mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        o = (y - mean) * rstd * gamma
        if HAS_RESIDUAL:
            o += tl.load(res_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + cols, o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_rows_kernel(
    g_ptr,
    y_ptr,
    gamma_ptr,
    mean_ptr,
    rstd_ptr,
    dy_ptr,
    c_ptr,
    N,
    stride_gm,
    stride_ym,
    stride_dm,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    c1 = 0.0
    c2 = 0.0
    for n0 in range(0, N, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(g_ptr + row * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * stride_ym + cols, mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (y - mean) * rstd, 0.0)
        gg = g * gamma
        c1 += tl.sum(gg, axis=0)
        c2 += tl.sum(gg * xhat, axis=0)
    c1 = c1 / N
    c2 = c2 / N
    tl.store(c_ptr + row * 2, c1)
    tl.store(c_ptr + row * 2 + 1, c2)
    for n0 in range(0, N, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        mask = cols < N
        g = tl.load(g_ptr + row * stride_gm + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * stride_ym + cols, mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = (y - mean) * rstd
        dy = rstd * (g * gamma - c1 - xhat * c2)
        tl.store(dy_ptr + row * stride_dm + cols, dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_columns_kernel(
    g_ptr,
    y_ptr,
    gamma_ptr,
    mean_ptr,
    rstd_ptr,
    c_ptr,
    dgamma_ptr,
    dbias_ptr,
    M,
    N,
    ROWS,
    stride_gm,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Partial column sums over rows [pid1 * ROWS, (pid1 + 1) * ROWS): row pid1 of the
    [slices, N] fp32 outputs."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    row0 = tl.program_id(1).to(tl.int64) * ROWS
    gamma = tl.load(gamma_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, ROWS, BLOCK_M):
        rows = row0 + m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = (rows < M) & (m0 + tl.arange(0, BLOCK_M) < ROWS)
        mask = mask_m[:, None] & mask_n[None, :]
        mean = tl.load(mean_ptr + rows, mask=mask_m, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)
        c1 = tl.load(c_ptr + rows * 2, mask=mask_m, other=0.0)
        c2 = tl.load(c_ptr + rows * 2 + 1, mask=mask_m, other=0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = (y - mean[:, None]) * rstd[:, None]
        acc_g += tl.sum(g * xhat, axis=0)
        dy = rstd[:, None] * (g * gamma[None, :] - c1[:, None] - xhat * c2[:, None])
        acc_b += tl.sum(tl.where(mask, dy, 0.0), axis=0)
    out = tl.program_id(1).to(tl.int64) * N + cols
    tl.store(dgamma_ptr + out, acc_g, mask=mask_n)
    tl.store(dbias_ptr + out, acc_b, mask=mask_n)


def _chunk(n: int) -> int:
    return min(1024, triton.next_power_of_2(n))


def norm_finish(
    y_pre: Tensor,
    partial_mean: Tensor,
    partial_std: Tensor,
    tile_n: int,
    norm_weight: Tensor,
    eps: float,
    residual: Tensor | None,
    out: Tensor,
) -> tuple[Tensor, Tensor]:
    """out = norm_weight * (y_pre - mean) * rstd (+ residual); returns (mean, rstd) [M] fp32.
    y_pre, residual and out are [M, N] with unit column stride; out may be y_pre (in place)."""
    m, n = y_pre.shape
    t = partial_mean.shape[1]
    mean = torch.empty(m, device=y_pre.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    res = residual if residual is not None else y_pre
    launch(
        _norm_finish_kernel,
        (m,),
        y_pre,
        out,
        norm_weight,
        res,
        partial_mean,
        partial_std,
        mean,
        rstd,
        n,
        t,
        float(eps),
        y_pre.stride(0),
        out.stride(0),
        res.stride(0),
        TILE_N=tile_n,
        HAS_RESIDUAL=residual is not None,
        BLOCK_T=min(256, triton.next_power_of_2(t)),
        BLOCK=_chunk(n),
        num_warps=4,
    )
    return mean, rstd


def column_slices(m: int, n: int, block_n: int) -> tuple[int, int]:
    """(slices, rows per slice) of the two-stage column reduction: enough row slices that
    cdiv(N, block_n) * slices programs fill the machine, each slice a whole number of row blocks."""
    blocks = triton.cdiv(m, COLUMN_BLOCK_M)
    slices = max(1, min(blocks, triton.cdiv(COLUMN_TARGET_PROGRAMS, triton.cdiv(n, block_n))))
    rows = triton.cdiv(blocks, slices) * COLUMN_BLOCK_M
    return triton.cdiv(m, rows), rows


def norm_backward(
    grad_out: Tensor, y_pre: Tensor, norm_weight: Tensor, mean: Tensor, rstd: Tensor, dy_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dy [M, N] in dy_dtype, grad_norm_weight [N] fp32, grad_bias = sum_rows dy [N] fp32).
    Inputs have unit column stride."""
    m, n = y_pre.shape
    dy = torch.empty((m, n), device=y_pre.device, dtype=dy_dtype)
    c = torch.empty((m, 2), device=y_pre.device, dtype=torch.float32)
    launch(
        _norm_backward_rows_kernel,
        (m,),
        grad_out,
        y_pre,
        norm_weight,
        mean,
        rstd,
        dy,
        c,
        n,
        grad_out.stride(0),
        y_pre.stride(0),
        dy.stride(0),
        BLOCK=_chunk(n),
        num_warps=4,
    )
    block_n = min(128, triton.next_power_of_2(n))
    slices, rows = column_slices(m, n, block_n)
    partial = torch.empty((2, slices, n), device=y_pre.device, dtype=torch.float32)
    launch(
        _norm_backward_columns_kernel,
        (triton.cdiv(n, block_n), slices),
        grad_out,
        y_pre,
        norm_weight,
        mean,
        rstd,
        c,
        partial[0],
        partial[1],
        m,
        n,
        rows,
        grad_out.stride(0),
        y_pre.stride(0),
        BLOCK_M=COLUMN_BLOCK_M,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return dy, partial[0].sum(0), partial[1].sum(0)
