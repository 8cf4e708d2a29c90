"""The epilogue op on ATen (every backend; `upcast=True` computes in fp32, the reference).

    y0 [M, N] (the base product, e.g. from a packed or quantized GEMM)  x2d [M, K]
    lora_a [r, K]  lora_b [N, r]  bias, norm_weight [N] | None  residual2d [M, N] | None

Forward: s = x @ A.T (one GEMM), y = y0 + scale s @ B.T (one addmm: y0 is read once, y
written once), += bias, then gamma * LayerNorm_noBias (ATen's native_layer_norm, which also
gives the row mean and rstd) and += residual.
Backward (g [M, N]; dy = g without a norm, else
          dy = rstd (g gamma - mean_row(g gamma) - xhat mean_row(g gamma xhat))):
    grad_y0 = dy   t = scale dy @ B   grad_x = t @ A   grad_A = t.T @ x   grad_B = scale dy.T @ s
    grad_bias = sum_rows dy           grad_norm_weight = sum_rows g * xhat
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import ForwardResult


def forward(
    y0: Tensor,
    x2d: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual2d: Tensor | None,
    save_for_backward: bool,
    upcast: bool = False,
) -> ForwardResult:
    """ForwardResult(out [M, N] in y0's dtype, shrink [M, r], y_pre [M, N] | (0,), mean, rstd [M] fp32 | (0,))."""
    dt = y0.dtype
    ct = torch.float32 if upcast else dt
    shrink = torch.mm(x2d.to(ct), lora_a.to(ct).t())
    y = torch.addmm(y0.to(ct), shrink, lora_b.to(ct).t(), alpha=scale)
    if bias is not None:
        y.add_(bias.to(ct))
    y_pre = y0.new_empty((0,))
    mean, rstd = y0.new_empty((0,), dtype=torch.float32), y0.new_empty((0,), dtype=torch.float32)
    if norm_weight is not None:
        n = y.shape[-1]
        out, mean, rstd = torch.native_layer_norm(y, [n], norm_weight.to(ct), None, eps)
        mean, rstd = mean.reshape(-1).float(), rstd.reshape(-1).float()
        if save_for_backward:
            y_pre = y.to(dt)
        y = out
    if residual2d is not None:
        y.add_(residual2d.to(ct))
    return ForwardResult(y.to(dt), shrink.to(dt), y_pre, mean, rstd)


def backward(
    grad_out: Tensor,
    x2d: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    norm_weight: Tensor | None,
    saved: ForwardResult,
    upcast: bool = False,
):
    """(grad_y0, grad_x, grad_a, grad_b, grad_bias fp32, grad_norm_weight fp32 | None), in the
    compute dtype (the caller casts)."""
    ct = torch.float32 if upcast else x2d.dtype
    grad_norm = None
    if norm_weight is not None:
        # in fp32 (y_pre was rounded to x's dtype when saved); xhat = (y_pre - mean) * rstd
        g = grad_out.float()
        xhat = (saved.y_pre.float() - saved.mean[:, None]) * saved.rstd[:, None]
        grad_norm = (g * xhat).sum(0)
        gg = g * norm_weight.float()
        dy = (saved.rstd[:, None] * (gg - gg.mean(-1, keepdim=True) - xhat * (gg * xhat).mean(-1, keepdim=True))).to(ct)
    else:
        dy = grad_out.to(ct)
    t = torch.mm(dy, lora_b.to(ct)).mul_(scale)
    grad_x = torch.mm(t, lora_a.to(ct))
    grad_a = torch.mm(t.t(), x2d.to(ct))
    grad_b = torch.mm(dy.t(), saved.shrink.to(ct)).mul_(scale)
    return dy, grad_x, grad_a, grad_b, dy.sum(0, dtype=torch.float32), grad_norm
