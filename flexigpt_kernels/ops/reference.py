"""Plain-PyTorch reference of the fused op: the specification.

    x [..., K]  weight [N, K]  lora_a [r, K]  lora_b [N, r]  bias [N]
    norm_weight [N]  residual [..., N]

    s     = x @ lora_a.T                                   [..., r]
    y_pre = x @ weight.T + bias + scale * s @ lora_b.T     [..., N]
    y     = norm_weight * (y_pre - mean(y_pre)) * rsqrt(var(y_pre) + eps)   (if norm_weight)
    out   = residual + y                                   (if residual)

Every product and reduction accumulates in fp32 (fp64 for fp64 inputs); the result is cast to
x's dtype. The saved row statistics are fp32 whatever the input (the fake kernels say so).
Tests and benchmarks import this module as the ground truth; the backends must match it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ForwardResult(NamedTuple):
    """What a forward pass returns, and what the backward needs from it.

    out:   [M, N] in x's dtype (flattened leading dims)
    shrink: [M, r], x @ lora_a.T (stored: the backward needs it for grad lora_b)
    y_pre: [M, N] in x's dtype, the pre-norm output (shape (0,) when there is no norm)
    mean, rstd: [M] fp32 row statistics of y_pre (empty when there is no norm)
    """

    out: Tensor
    shrink: Tensor
    y_pre: Tensor
    mean: Tensor
    rstd: Tensor


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=torch.float32)


def accumulation_dtype(t: Tensor) -> torch.dtype:
    """fp64 for fp64 tensors, else fp32: the precision every product and reduction runs in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reference_forward(
    x2d: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual2d: Tensor | None,
) -> ForwardResult:
    """Forward on flattened x [M, K]; returns the output and the saved intermediates."""
    acc = accumulation_dtype(x2d)
    xf = x2d.to(acc)
    shrink = xf @ lora_a.to(acc).t()
    w = weight.to(acc).t()
    y = torch.addmm(bias.to(acc), xf, w) if bias is not None else xf @ w
    y = y + scale * (shrink @ lora_b.to(acc).t())
    y_pre, mean, rstd = x2d.new_empty((0,)), _empty(x2d), _empty(x2d)
    if norm_weight is not None:
        var, mean = torch.var_mean(y, dim=-1, correction=0)
        rstd = torch.rsqrt(var + eps)
        y_pre = y.to(x2d.dtype)
        y = (y - mean[:, None]) * rstd[:, None] * norm_weight.to(acc)
        mean, rstd = mean.float(), rstd.float()
    if residual2d is not None:
        y = y + residual2d.to(acc)
    return ForwardResult(y.to(x2d.dtype), shrink, y_pre, mean, rstd)


def reference_backward(
    grad_out: Tensor,
    x2d: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    norm_weight: Tensor | None,
    saved: ForwardResult,
    needs_weight_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of the op from the saved intermediates, in fp32 (fp64 for fp64 inputs).

    With g = grad_out [M, N] and, when the norm is present, xhat = (y_pre - mean) * rstd:
        grad_norm_weight = sum_rows g * xhat
        dy = rstd * (g*gamma - mean(g*gamma) - xhat * mean(g*gamma*xhat))   (else dy = g)
        grad_bias = sum_rows dy            grad_x = dy @ W + scale * (dy @ B) @ A
        grad_A = scale * (dy @ B).T @ x    grad_B = scale * dy.T @ s       grad_W = dy.T @ x
    Returns (grad_x, grad_weight, grad_a, grad_b, grad_bias, grad_norm_weight), all in that precision;
    grad_residual is grad_out itself and is not returned.
    """
    acc = accumulation_dtype(x2d)
    g = grad_out.to(acc)
    grad_norm_weight = None
    if norm_weight is not None:
        mean, rstd = saved.mean.to(acc)[:, None], saved.rstd.to(acc)[:, None]
        xhat = (saved.y_pre.to(acc) - mean) * rstd
        grad_norm_weight = (g * xhat).sum(0)
        gg = g * norm_weight.to(acc)
        dy = rstd * (gg - gg.mean(-1, keepdim=True) - xhat * (gg * xhat).mean(-1, keepdim=True))
    else:
        dy = g
    xf = x2d.to(acc)
    dy_b = dy @ lora_b.to(acc)  # [M, r]
    grad_x = dy @ weight.to(acc) + scale * (dy_b @ lora_a.to(acc))
    grad_a = scale * (dy_b.t() @ xf)
    grad_b = scale * (dy.t() @ saved.shrink.to(acc))
    grad_weight = dy.t() @ xf if needs_weight_grad else None
    grad_bias = dy.sum(0)
    return grad_x, grad_weight, grad_a, grad_b, grad_bias, grad_norm_weight


def shared_lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float = 1.0,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor:
    """The op's specification, differentiable through plain autograd. Shapes as in the module doc."""
    lead = x.shape[:-1]
    res2d = residual.reshape(-1, residual.shape[-1]) if residual is not None else None
    out = reference_forward(
        x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, scale, bias, norm_weight, eps, res2d
    ).out
    return out.reshape(*lead, weight.shape[0])


def unfused_peft_style(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float = 1.0,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor:
    """What a user writes without this package (PEFT's LoRA + a separate LayerNorm), in x's
    dtype: base matmul, shrink, expand, add, layer norm, residual add. The benchmarks' baseline."""
    y = torch.nn.functional.linear(x, weight, bias)
    y = y + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b)
    if norm_weight is not None:
        y = torch.nn.functional.layer_norm(y, (y.shape[-1],), norm_weight, None, eps)
    if residual is not None:
        y = residual + y
    return y


# --- multi-slice (stacked) form and epilogue form: specifications --------------------------


def shared_lora_linear_stacked_reference(
    x: Tensor,
    weight: Tensor,
    lora_as,
    lora_bs,
    scales,
    bias: Tensor | None = None,
) -> Tensor:
    """Spec of the multi-slice op, in fp32 (fp64 for fp64 inputs), differentiable through plain autograd.

        x [..., K]  weight [N, K] (parts stacked by rows)  lora_as[i] [r_i, K]  lora_bs[i] [n_i, r_i]
        sum n_i = N, part i owns output columns c_i .. c_i + n_i (c_i = n_0 + ... + n_{i-1})
        y = x @ weight.T + bias ;  y[..., c_i : c_i + n_i] += scales[i] * (x @ lora_as[i].T) @ lora_bs[i].T
    Returns [..., N] in x's dtype.
    """
    acc = accumulation_dtype(x)
    xf = x.to(acc)
    y = xf @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    deltas = [s * ((xf @ a.to(acc).t()) @ b.to(acc).t()) for a, b, s in zip(lora_as, lora_bs, scales)]
    return (y + torch.cat(deltas, dim=-1)).to(x.dtype)


def shared_lora_linear_epilogue_reference(
    y0: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float = 1.0,
    bias: Tensor | None = None,
    *,
    norm_weight: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor:
    """Spec of the epilogue op (the single op with its base product y0 = x @ W.T supplied),
    in fp32 (fp64 for fp64 inputs), differentiable through plain autograd.

        y0 [..., N]  x [..., K]  lora_a [r, K]  lora_b [N, r]  bias, norm_weight [N]  residual [..., N]
        y = y0 + bias + scale * (x @ lora_a.T) @ lora_b.T
        y = norm_weight * (y - mean(y)) * rsqrt(var(y) + eps)   (if norm_weight; last dim)
        y = residual + y                                        (if residual)
    Returns [..., N] in y0's dtype.
    """
    acc = accumulation_dtype(y0)
    y = y0.to(acc) + scale * ((x.to(acc) @ lora_a.to(acc).t()) @ lora_b.to(acc).t())
    if bias is not None:
        y = y + bias.to(acc)
    if norm_weight is not None:
        var, mean = torch.var_mean(y, dim=-1, correction=0, keepdim=True)
        y = (y - mean) * torch.rsqrt(var + eps) * norm_weight.to(acc)
    if residual is not None:
        y = y + residual.to(acc)
    return y.to(y0.dtype)
