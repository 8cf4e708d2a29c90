"""The multi-slice op on ATen GEMMs (the CPU backend; with `upcast=True`, the reference backend).

    x2d [M, K]  weight [N, K]  a_cat [R, K] = the parts' lora_a stacked by rows (R = sum r_i)
    lora_bs[i] [n_i, r_i]  scales[i]  bias [N] | None

Forward, into one output buffer: one base GEMM over the stacked weight (with the bias), one
shrink GEMM over a_cat, then per part one in-place `addmm_` of its expand into its own column
slice of the output:

    y = x @ weight.T + bias ;  s = x @ a_cat.T ;  y[:, c_i:c_i+n_i] += scales[i] s[:, o_i:o_i+r_i] @ B_i.T

Backward (dy [M, N], t_i = scales[i] dy_i @ B_i, t = [t_0 | t_1 | ...] [M, R]):
    grad_x = dy @ W + t @ a_cat      grad_a_cat = t.T @ x      grad_B_i = scales[i] dy_i.T @ s_i
    grad_W = dy.T @ x (when asked)   grad_bias = sum_rows dy
`upcast=True` computes in fp32 (what the reference backend does); otherwise in x's dtype
(ATen's CPU GEMMs accumulate in fp32 for bf16).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def concat_rows(parts: Sequence[Tensor]) -> Tensor:
    """torch.cat(parts, 0), without a copy when the parts are consecutive row blocks of one
    row-major buffer (views of one [R, K] tensor, as the vLLM layer holds its adapters)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    k = first.shape[1]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for p in parts:
        if (
            (p.stride(1) != 1 and k > 1)
            or (p.shape[0] > 1 and p.stride(0) != k)
            or p.storage_offset() != offset
            or p.untyped_storage().data_ptr() != storage
        ):
            return torch.cat(list(parts), 0)
        offset += p.shape[0] * k
    return first.as_strided((sum(p.shape[0] for p in parts), k), (k, 1))


def _cast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def forward(
    x2d: Tensor,
    weight: Tensor,
    a_cat: Tensor,
    lora_bs: Sequence[Tensor],
    scales: Sequence[float],
    bias: Tensor | None,
    upcast: bool = False,
) -> tuple[Tensor, Tensor]:
    """(out [M, N], shrink [M, R]), both in x's dtype."""
    ct = torch.float32 if upcast else None
    x, w, a = _cast(x2d, ct), _cast(weight, ct), _cast(a_cat, ct)
    out = F.linear(x, w, _cast(bias, ct))
    shrink = torch.mm(x, a.t())
    add_expands(out, shrink, [_cast(b, ct) for b in lora_bs], scales)
    return out.to(x2d.dtype), shrink.to(x2d.dtype)


def add_expands(out: Tensor, shrink: Tensor, lora_bs: Sequence[Tensor], scales: Sequence[float]) -> Tensor:
    """In place: out[:, c_i:c_i+n_i] += scales[i] * shrink[:, o_i:o_i+r_i] @ lora_bs[i].T for
    consecutive column blocks c_i of out and o_i of shrink; returns out. Also the epilogue of
    a stacked projection whose base product out came from another GEMM (the vLLM layer)."""
    col = off = 0
    for b, s in zip(lora_bs, scales):
        n, r = b.shape
        out[:, col : col + n].addmm_(shrink[:, off : off + r], b.t(), alpha=s)
        col, off = col + n, off + r
    return out


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
    """(grad_x, grad_weight | None, grad_a_cat [R, K], [grad_B_i], grad_bias fp32), in the
    compute dtype (the caller casts)."""
    ct = torch.float32 if upcast else x2d.dtype
    g, x, s_all = grad_out.to(ct), x2d.to(ct), shrink.to(ct)
    ts, grad_bs = [], []
    col = off = 0
    for b, s in zip(lora_bs, scales):
        n, r = b.shape
        g_i = g[:, col : col + n]
        ts.append(torch.mm(g_i, b.to(ct)).mul_(s))
        grad_bs.append(torch.mm(g_i.t(), s_all[:, off : off + r]).mul_(s))
        col, off = col + n, off + r
    t = ts[0] if len(ts) == 1 else torch.cat(ts, 1)
    grad_x = torch.mm(g, weight.to(ct)).addmm_(t, a_cat.to(ct))
    grad_a = torch.mm(t.t(), x)
    grad_w = torch.mm(g.t(), x) if needs_weight_grad else None
    return grad_x, grad_w, grad_a, grad_bs, g.sum(0, dtype=torch.float32)
