"""The cuda backend: the CUDA decode kernel of csrc/cuda (flexigpt_kernels._C_cuda) for the
forwards it takes, the Triton backend for everything else (larger M, float32, every backward).

The decode kernel takes a forward with 1 <= M <= 16 rows, float16 / bfloat16, K a multiple of 8
and 16-byte aligned operands (the matrix-vector regime, bound by the read of the shared weight).
Same calling convention as every backend (the `Backend` protocol in ops/backends.py).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from .reference import ForwardResult

logger = logging.getLogger(__name__)

try:
    from .. import _C_cuda  # type: ignore[attr-defined]
except ImportError as exc:
    _C_cuda = None
    logger.debug("flexigpt_kernels._C_cuda is not built (%s); CUDA tensors use the Triton kernels", exc)

CUDA_DECODE_DTYPES = (torch.float16, torch.bfloat16)
#: the CUDA decode kernel handles at most this many rows
CUDA_DECODE_MAX_M = 16


def is_built() -> bool:
    """Whether flexigpt_kernels._C_cuda imports (the CUDA decode kernel is built)."""
    return _C_cuda is not None


def _aligned16(t: Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def decode_applies(x2d: Tensor, weight: Tensor, lora_a: Tensor) -> bool:
    """Whether the CUDA decode kernel takes this forward (else Triton)."""
    return (
        _C_cuda is not None
        and x2d.is_cuda
        and 1 <= x2d.shape[0] <= CUDA_DECODE_MAX_M
        and x2d.dtype in CUDA_DECODE_DTYPES
        and x2d.shape[1] % 8 == 0
        and x2d.stride(1) == 1 and x2d.stride(0) % 8 == 0
        and weight.is_contiguous() and lora_a.is_contiguous()
        and all(_aligned16(t) for t in (x2d, weight, lora_a))
    )


def _triton():
    from .triton import shared_lora_linear as triton_backend

    return triton_backend


def _rows_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def forward(x2d: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
            bias: Optional[Tensor], norm_weight: Optional[Tensor], eps: float,
            residual2d: Optional[Tensor], save_for_backward: bool) -> ForwardResult:
    if decode_applies(x2d, weight, lora_a):
        return ForwardResult(*_C_cuda.forward(
            x2d, weight, lora_a, lora_b.contiguous(), float(scale),
            bias.contiguous() if bias is not None else None,
            norm_weight.contiguous() if norm_weight is not None else None,
            float(eps), _rows_contiguous(residual2d), bool(save_for_backward)))
    return _triton().forward(x2d, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual2d,
                             save_for_backward)


def backward(grad_out: Tensor, x2d: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
             norm_weight: Optional[Tensor], saved: ForwardResult, needs_weight_grad: bool):
    return _triton().backward(grad_out, x2d, weight, lora_a, lora_b, scale, norm_weight, saved, needs_weight_grad)
