"""The cpp backend: the C++ CPU kernel of csrc/ (flexigpt_kernels/_C*.so), float32 / bfloat16.

The kernel is the CPU kernel of the ops themselves (TORCH_LIBRARY_IMPL(flexigpt, CPU) in
csrc/bindings.cpp): a CPU call whose selection resolves to "cpp" runs it without entering
Python. This module is that kernel in the `Backend` protocol (ops/backends.py), for the calls
that reach the registry first (e.g. the first call after FLEXIGPT_BACKEND changed): it hands
them to the ops' CPU kernel, which the registry has just told to run them natively.

    forward(x2d [M, K], weight [N, K], lora_a [r, K], lora_b [N, r], scale, bias, norm_weight,
            eps, residual2d, save_for_backward) -> ForwardResult
    backward(grad_out, x2d, weight, lora_a, lora_b, scale, norm_weight, saved, needs_weight_grad)
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import library
from .reference import ForwardResult

_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


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
    return ForwardResult(
        *library.op("shared_lora_linear_fwd").redispatch(
            _CPU,
            x2d,
            weight,
            lora_a,
            lora_b,
            float(scale),
            bias,
            norm_weight,
            float(eps),
            residual2d,
            bool(save_for_backward),
        )
    )


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
    gx, gw, ga, gb, gbias, gnorm = library.op("shared_lora_linear_bwd").redispatch(
        _CPU,
        grad_out,
        x2d,
        weight,
        lora_a,
        lora_b,
        float(scale),
        norm_weight,
        saved.shrink,
        saved.y_pre,
        saved.mean,
        saved.rstd,
        bool(needs_weight_grad),
    )
    return gx, (gw if needs_weight_grad else None), ga, gb, gbias, (gnorm if norm_weight is not None else None)
