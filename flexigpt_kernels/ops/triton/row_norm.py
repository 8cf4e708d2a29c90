"""Triton kernels for the output normalization's second phase and its backward.

Forward finish, one program per row (any N: the row is streamed in BLOCK chunks):
    merge the per-tile (count, mean, M2) of linear_lora.py with Chan's parallel formula
        n = n_a + n_b,  d = mean_b - mean_a,
        mean = mean_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n
    var = M2 / N,  rstd = 1 / sqrt(var + eps)
    out = gamma * (y_pre - mean) * rstd (+ residual)

Backward, with xhat = (y_pre - mean) * rstd and g the incoming gradient:
    dy     = rstd * (g*gamma - mean_row(g*gamma) - xhat * mean_row(g*gamma*xhat))   per row
    dgamma = sum_rows g * xhat                                                      per column
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _norm_finish_kernel(
    y_ptr, out_ptr, gamma_ptr, res_ptr, pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr,
    N, T, eps, stride_ym, stride_om, stride_rm,
    TILE_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_acc = 0.0
    mean_acc = 0.0
    m2_acc = 0.0
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mt = t < T
        cnt = tl.where(mt, tl.minimum(N - t * TILE_N, TILE_N), 0).to(tl.float32)
        pm = tl.load(pmean_ptr + row * T + t, mask=mt, other=0.0)
        pm2 = tl.load(pm2_ptr + row * T + t, mask=mt, other=0.0)
        n_c = tl.sum(cnt, axis=0)
        mean_c = tl.sum(cnt * pm, axis=0) / n_c
        dev = tl.where(mt, pm - mean_c, 0.0)
        m2_c = tl.sum(pm2 + cnt * dev * dev, axis=0)
        n_new = n_acc + n_c
        delta = mean_c - mean_acc
        mean_acc = mean_acc + delta * (n_c / n_new)
        m2_acc = m2_acc + m2_c + delta * delta * (n_acc * n_c / n_new)
        n_acc = n_new
    rstd = 1.0 / tl.sqrt(m2_acc / N + eps)
    tl.store(mean_ptr + row, mean_acc)
    tl.store(rstd_ptr + row, rstd)
    for n0 in range(0, N, BLOCK):
        cols = n0 + tl.arange(0, BLOCK)
        mask = cols < N
        y = tl.load(y_ptr + row * stride_ym + cols, mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        o = (y - mean_acc) * rstd * gamma
        if HAS_RESIDUAL:
            o += tl.load(res_ptr + row * stride_rm + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + cols, o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_rows_kernel(
    g_ptr, y_ptr, gamma_ptr, mean_ptr, rstd_ptr, dy_ptr,
    N, stride_gm, stride_ym, stride_dm,
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
def _norm_backward_gamma_kernel(
    g_ptr, y_ptr, mean_ptr, rstd_ptr, dgamma_ptr,
    M, N, stride_gm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_n[None, :]
        mean = tl.load(mean_ptr + rows, mask=mask_m, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(g * (y - mean[:, None]) * rstd[:, None], axis=0)
    tl.store(dgamma_ptr + cols, acc, mask=mask_n)


def _chunk(n: int) -> int:
    return min(1024, triton.next_power_of_2(n))


def norm_finish(
    y_pre: Tensor,
    partial_mean: Tensor,
    partial_m2: Tensor,
    tile_n: int,
    norm_weight: Tensor,
    eps: float,
    residual: Optional[Tensor],
    out: Tensor,
) -> tuple[Tensor, Tensor]:
    """out = norm_weight * (y_pre - mean) * rstd (+ residual); returns (mean, rstd) [M] fp32.
    y_pre, residual and out are [M, N] with unit column stride; out may be y_pre (in place)."""
    m, n = y_pre.shape
    t = partial_mean.shape[1]
    mean = torch.empty(m, device=y_pre.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    res = residual if residual is not None else y_pre
    _norm_finish_kernel[(m,)](
        y_pre, out, norm_weight, res, partial_mean, partial_m2, mean, rstd,
        n, t, float(eps), y_pre.stride(0), out.stride(0), res.stride(0),
        TILE_N=tile_n, HAS_RESIDUAL=residual is not None,
        BLOCK_T=min(256, triton.next_power_of_2(t)), BLOCK=_chunk(n), num_warps=4,
    )
    return mean, rstd


def norm_backward(
    grad_out: Tensor, y_pre: Tensor, norm_weight: Tensor, mean: Tensor, rstd: Tensor, dy_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Returns (dy [M, N] in dy_dtype, grad_norm_weight [N] fp32). Inputs have unit column stride."""
    m, n = y_pre.shape
    dy = torch.empty((m, n), device=y_pre.device, dtype=dy_dtype)
    _norm_backward_rows_kernel[(m,)](
        grad_out, y_pre, norm_weight, mean, rstd, dy,
        n, grad_out.stride(0), y_pre.stride(0), dy.stride(0), BLOCK=_chunk(n), num_warps=4,
    )
    dgamma = torch.empty(n, device=y_pre.device, dtype=torch.float32)
    block_n = min(128, triton.next_power_of_2(n))
    _norm_backward_gamma_kernel[(triton.cdiv(n, block_n),)](
        grad_out, y_pre, mean, rstd, dgamma, m, n, grad_out.stride(0), y_pre.stride(0),
        BLOCK_M=32, BLOCK_N=block_n, num_warps=4,
    )
    return dy, dgamma
