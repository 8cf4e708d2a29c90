"""The multi-slice op on the Triton GEMM kernel of triton/linear_lora.py (same calling
convention as stacked_aten.py).

Forward launches (P parts), each reading its rows of the stacked weight once:
  M <= FUSED_SHRINK_MAX_M (decode): P launches; part i's launch computes
      y[:, c_i:c_i+n_i] = x @ W_i.T + bias_i + scales[i] (x @ A_i.T) @ B_i.T
  with its shrink fused into the K loop and stored into its columns of the shrink buffer;
  larger M: 1 shrink launch over the concatenated A (all ranks at once) + P launches of
  base GEMM + precomputed expand + bias into the parts' column slices.
Backward launches: P (t_i = dy_i @ B_i) + 1 (grad_x = dy @ W + t @ a_cat, fused) + 1
(grad_a_cat = t.T @ x) + P (grad_B_i = dy_i.T @ s_i) + 1 when the weight needs its gradient;
the scalings and grad_bias are torch ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .triton.linear_lora import FUSED_SHRINK_MAX_M, LORA_FUSED, LORA_PRECOMPUTED, linear_lora


def _slice(t: Tensor | None, start: int, size: int) -> Tensor | None:
    return None if t is None else t[start : start + size]


def forward(
    x2d: Tensor,
    weight: Tensor,
    a_cat: Tensor,
    lora_bs: Sequence[Tensor],
    scales: Sequence[float],
    bias: Tensor | None,
    upcast: bool = False,
) -> tuple[Tensor, Tensor]:
    m = x2d.shape[0]
    out = torch.empty((m, weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
    shrink = torch.empty((m, a_cat.shape[0]), device=x2d.device, dtype=x2d.dtype)
    bias = bias if bias is None or bias.stride(0) == 1 else bias.contiguous()
    fused = m <= FUSED_SHRINK_MAX_M
    if not fused:
        linear_lora(x2d, a_cat, out=shrink)
    col = off = 0
    for b, s in zip(lora_bs, scales):
        n, r = b.shape
        linear_lora(
            x2d,
            weight[col : col + n],
            out=out[:, col : col + n],
            bias=_slice(bias, col, n),
            lora_a=a_cat[off : off + r],
            lora_b=b,
            scale=s,
            shrink=shrink[:, off : off + r],
            mode=LORA_FUSED if fused else LORA_PRECOMPUTED,
        )
        col, off = col + n, off + r
    return out, shrink


def backward(
    grad_out: Tensor,
    x2d: Tensor,
    weight: Tensor,
    a_cat: Tensor,
    lora_bs: Sequence[Tensor],
    scales: Sequence[float],
    shrink: Tensor,
    needs_weight_grad: bool,
    upcast: bool = False,
):
    m, k = x2d.shape
    g = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    g = g.to(x2d.dtype)
    new = dict(device=x2d.device, dtype=x2d.dtype)
    t = torch.empty((m, a_cat.shape[0]), **new)
    grad_bs = []
    col = off = 0
    for b, s in zip(lora_bs, scales):
        n, r = b.shape
        g_i = g[:, col : col + n]
        linear_lora(g_i, b.t(), out=t[:, off : off + r])
        t[:, off : off + r].mul_(s)
        grad_bs.append(linear_lora(g_i.t(), shrink[:, off : off + r].t(), out=torch.empty((n, r), **new)).mul_(s))
        col, off = col + n, off + r
    # grad_x = dy @ W + t @ a_cat: the kernel's precomputed-shrink mode on transposed operands
    grad_x = linear_lora(
        g, weight.t(), out=torch.empty((m, k), **new), lora_b=a_cat.t(), shrink=t, mode=LORA_PRECOMPUTED
    )
    grad_a = linear_lora(t.t(), x2d.t(), out=torch.empty(tuple(a_cat.shape), **new))
    grad_w = linear_lora(g.t(), x2d.t(), out=torch.empty(tuple(weight.shape), **new)) if needs_weight_grad else None
    return grad_x, grad_w, grad_a, grad_bs, g.sum(0, dtype=torch.float32)
