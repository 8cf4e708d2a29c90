"""The reference backend: the spec's forward (fp32 accumulation) and its closed-form backward,
with the same calling convention as the Triton backend."""

from __future__ import annotations

from torch import Tensor

from .reference import ForwardResult, reference_backward, reference_forward


def forward(
    x2d: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual2d: Tensor | None,
    save_for_backward: bool,
) -> ForwardResult:
    res = reference_forward(x2d, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual2d)
    y_pre = res.y_pre if save_for_backward else x2d.new_empty((0,))
    return res._replace(shrink=res.shrink.to(x2d.dtype), y_pre=y_pre)


def backward(
    grad_out: Tensor,
    x2d: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    norm_weight: Tensor | None,
    saved: ForwardResult,
    needs_weight_grad: bool,
):
    return reference_backward(grad_out, x2d, weight, lora_a, lora_b, scale, norm_weight, saved, needs_weight_grad)
