"""The cuda backend: the CUDA decode kernel of csrc/cuda (flexigpt_kernels/_C_cuda*.so) for the
forwards it takes, the Triton backend for everything else (larger M, float32, every backward).

The decode kernel takes a forward with 1 <= M <= 16 rows, float16 / bfloat16, K a multiple of 8
and 16-byte aligned operands (the matrix-vector regime, bound by the read of the shared weight);
`decode_applies` states these conditions as csrc/cuda/bindings_cuda.cpp does. The op's CUDA
kernel (TORCH_LIBRARY_IMPL(flexigpt, CUDA)) runs it without Python when "cuda" is selected;
this module is the backend in the `Backend` protocol (ops/backends.py) for the calls that reach
the registry, and calls the kernel alone through torch.ops.flexigpt._shared_lora_linear_decode_cuda.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import library
from .reference import ForwardResult

CUDA_DECODE_DTYPES = (torch.float16, torch.bfloat16)
#: the CUDA decode kernel handles at most this many rows
CUDA_DECODE_MAX_M = 16


def is_built() -> bool:
    """Whether the CUDA decode kernel is built and loaded."""
    return library.NATIVE_CUDA


def _aligned16(t: Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def decode_applies(x2d: Tensor, weight: Tensor, lora_a: Tensor) -> bool:
    """Whether the CUDA decode kernel takes this forward (else Triton)."""
    return (
        library.NATIVE_CUDA
        and x2d.is_cuda
        and 1 <= x2d.shape[0] <= CUDA_DECODE_MAX_M
        and x2d.dtype in CUDA_DECODE_DTYPES
        and x2d.shape[1] % 8 == 0
        and x2d.stride(1) == 1
        and x2d.stride(0) % 8 == 0
        and weight.is_contiguous()
        and lora_a.is_contiguous()
        and all(_aligned16(t) for t in (x2d, weight, lora_a))
    )


def _triton():
    from .triton import shared_lora_linear as triton_backend

    return triton_backend


def _rows_contiguous(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


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
    if decode_applies(x2d, weight, lora_a):
        return ForwardResult(
            *torch.ops.flexigpt._shared_lora_linear_decode_cuda(
                x2d,
                weight,
                lora_a,
                lora_b.contiguous(),
                float(scale),
                bias.contiguous() if bias is not None else None,
                norm_weight.contiguous() if norm_weight is not None else None,
                float(eps),
                _rows_contiguous(residual2d),
                bool(save_for_backward),
            )
        )
    return _triton().forward(x2d, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual2d, save_for_backward)


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
    return _triton().backward(grad_out, x2d, weight, lora_a, lora_b, scale, norm_weight, saved, needs_weight_grad)
