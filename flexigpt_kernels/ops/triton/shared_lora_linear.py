"""The Triton backend of shared_lora_linear: forward and backward composed from the kernels
in linear_lora.py (GEMM + LoRA + bias + partial row statistics) and row_norm.py.

Forward launches: 1 (small M, no norm) to 3 (large M: shrink, GEMM, norm finish).
Backward: norm backward (rows, gamma), then grad_x (one fused GEMM with the transposed
adapter: dy @ W + scale (dy @ B) @ A), grad_A = scale (dy @ B).T @ x,
grad_B = scale dy.T @ s (s = x @ A.T saved by the forward), grad_W = dy.T @ x when asked.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..reference import ForwardResult
from .linear_lora import (
    FUSED_SHRINK_MAX_M,
    LORA_FUSED,
    LORA_PRECOMPUTED,
    TileConfig,
    default_config,
    linear_lora,
)
from .row_norm import norm_backward, norm_finish


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def _fused_linear_lora(
    x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, bias: Optional[Tensor],
    out: Tensor, partial_stats=None, config: Optional[TileConfig] = None,
) -> Tensor:
    """out = x @ weight.T + bias + scale (x @ lora_a.T) @ lora_b.T; returns the shrink [M, r]
    (x's dtype). Small M fuses the shrink into the GEMM; large M precomputes it once."""
    m = x.shape[0]
    shrink = torch.empty((m, lora_a.shape[0]), device=x.device, dtype=x.dtype)
    if m <= FUSED_SHRINK_MAX_M:
        mode = LORA_FUSED
    else:
        mode = LORA_PRECOMPUTED
        linear_lora(x, lora_a, out=shrink)
    linear_lora(x, weight, out=out, bias=bias, lora_a=lora_a, lora_b=lora_b, scale=scale,
                shrink=shrink, mode=mode, partial_stats=partial_stats, config=config)
    return shrink


def forward(
    x2d: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
    bias: Optional[Tensor], norm_weight: Optional[Tensor], eps: float, residual2d: Optional[Tensor],
    save_for_backward: bool, config: Optional[TileConfig] = None,
) -> ForwardResult:
    m, _ = x2d.shape
    n = weight.shape[0]
    bias, norm_weight = _vector(bias), _vector(norm_weight)  # the kernels index them with unit stride
    if norm_weight is None:
        out = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
        shrink = _fused_linear_lora(x2d, weight, lora_a, lora_b, scale, bias, out, config=config)
        if residual2d is not None:
            out += residual2d
        no_stats = x2d.new_empty((0,), dtype=torch.float32)
        return ForwardResult(out, shrink, x2d.new_empty((0,)), no_stats, no_stats.clone())
    cfg = config or default_config(m, x2d.dtype, lora_a.shape[0])
    tiles = triton.cdiv(n, cfg.block_n)
    partial = (
        torch.empty((m, tiles), device=x2d.device, dtype=torch.float32),
        torch.empty((m, tiles), device=x2d.device, dtype=torch.float32),
    )
    y_pre = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
    shrink = _fused_linear_lora(x2d, weight, lora_a, lora_b, scale, bias, y_pre, partial, cfg)
    # Without a backward to feed, the finish overwrites y_pre in place (each element is
    # read and written by the same program).
    out = torch.empty_like(y_pre) if save_for_backward else y_pre
    res = _rows_contiguous(residual2d) if residual2d is not None else None
    mean, rstd = norm_finish(y_pre, *partial, cfg.block_n, norm_weight, eps, res, out)
    return ForwardResult(out, shrink, y_pre if save_for_backward else x2d.new_empty((0,)), mean, rstd)


def backward(
    grad_out: Tensor, x2d: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
    norm_weight: Optional[Tensor], saved: ForwardResult, needs_weight_grad: bool,
    config: Optional[TileConfig] = None,
):
    """Returns (grad_x, grad_weight | None, grad_a, grad_b, grad_bias (fp32), grad_norm_weight | None)."""
    m, k = x2d.shape
    n = weight.shape[0]
    g = _rows_contiguous(grad_out)
    norm_weight = _vector(norm_weight)
    grad_norm_weight = None
    if norm_weight is not None:
        dy, grad_norm_weight = norm_backward(g, saved.y_pre, norm_weight, saved.mean, saved.rstd, x2d.dtype)
    else:
        dy = g.to(x2d.dtype)
    grad_bias = dy.sum(0, dtype=torch.float32)
    grad_x = torch.empty((m, k), device=x2d.device, dtype=x2d.dtype)
    # grad_x = dy @ W + scale (dy @ B) @ A: the forward op on transposed operands.
    dy_b = _fused_linear_lora(dy, weight.t(), lora_b.t(), lora_a.t(), scale, None, grad_x, config=config)
    r = lora_a.shape[0]
    grad_a = linear_lora(dy_b.t(), x2d.t(), out=torch.empty((r, k), device=x2d.device, dtype=x2d.dtype))
    grad_a.mul_(scale)
    grad_b = linear_lora(dy.t(), saved.shrink.t(), out=torch.empty((n, r), device=x2d.device, dtype=x2d.dtype))
    grad_b.mul_(scale)
    grad_weight = None
    if needs_weight_grad:
        grad_weight = linear_lora(dy.t(), x2d.t(), out=torch.empty((n, k), device=x2d.device, dtype=x2d.dtype))
    return grad_x, grad_weight, grad_a, grad_b, grad_bias, grad_norm_weight
