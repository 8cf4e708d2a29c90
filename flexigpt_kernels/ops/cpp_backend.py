"""The C++ backend of shared_lora_linear: csrc/ compiled into `flexigpt_kernels._C` (CPU) and,
where built, `flexigpt_kernels._C_cuda` (the CUDA decode kernel).

Same calling convention as reference_backend.py and triton/shared_lora_linear.py:
    forward(x2d [M, K], weight [N, K], lora_a [r, K], lora_b [N, r], scale, bias [N] | None,
            norm_weight [N] | None, eps, residual2d [M, N] | None, save_for_backward)
        -> ForwardResult(out [M, N], shrink [M, r] (x's dtype), y_pre [M, N] | (0,),
                         mean [M] fp32 | (0,), rstd [M] fp32 | (0,))
    backward(grad_out, x2d, weight, lora_a, lora_b, scale, norm_weight, saved, needs_weight_grad)
        -> (grad_x, grad_weight | None, grad_a, grad_b, grad_bias fp32, grad_norm_weight fp32 | None)

Routing:
- CPU, float32 / bfloat16: the C++ kernel (ATen GEMMs into one preallocated output, then one
  fused parallel pass for the norm and residual). float16 / float64 on the CPU go to the
  reference backend (the kernel does not implement them).
- CUDA, forward with M <= 16 rows, float16 / bfloat16, K a multiple of 8 and 16-byte aligned
  operands: the CUDA decode kernel when `_C_cuda` was built; everything else (and every
  backward) on CUDA runs the Triton backend.

Neither extension is required to import this module: a missing one is logged once and the
calls that would need it fall back (or, for the CPU kernel, raise a clear error).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from . import reference_backend
from .reference import ForwardResult

logger = logging.getLogger(__name__)

try:
    from .. import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only in builds without the extension
    _C = None
    logger.info("flexigpt_kernels._C is not built (%s); the CPU path uses the PyTorch reference", exc)

try:
    from .. import _C_cuda  # type: ignore[attr-defined]
except ImportError as exc:
    _C_cuda = None
    logger.debug("flexigpt_kernels._C_cuda is not built (%s); CUDA tensors use the Triton kernels", exc)

CPU_DTYPES = (torch.float32, torch.bfloat16)
CUDA_DECODE_DTYPES = (torch.float16, torch.bfloat16)
#: the CUDA decode kernel handles at most this many rows (the matrix-vector regime)
CUDA_DECODE_MAX_M = 16


def _rows_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _aligned16(t: Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def cuda_decode_applies(x2d: Tensor, weight: Tensor, lora_a: Tensor) -> bool:
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


def _require_cpu_extension() -> None:
    if _C is None:
        raise RuntimeError(
            "the C++ extension flexigpt_kernels._C is not built: reinstall with a C++ compiler "
            "(pip install --no-build-isolation -e .) or select FLEXIGPT_BACKEND=reference"
        )


def forward(x2d: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
            bias: Optional[Tensor], norm_weight: Optional[Tensor], eps: float,
            residual2d: Optional[Tensor], save_for_backward: bool) -> ForwardResult:
    if x2d.is_cuda:
        if cuda_decode_applies(x2d, weight, lora_a):
            res = _rows_contiguous(residual2d)
            return ForwardResult(*_C_cuda.forward(
                x2d, weight, lora_a, lora_b.contiguous(), float(scale),
                bias.contiguous() if bias is not None else None,
                norm_weight.contiguous() if norm_weight is not None else None,
                float(eps), res, bool(save_for_backward)))
        return _triton().forward(x2d, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual2d,
                                 save_for_backward)
    if x2d.dtype not in CPU_DTYPES:
        return reference_backend.forward(x2d, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual2d,
                                         save_for_backward)
    _require_cpu_extension()
    return ForwardResult(*_C.forward(
        x2d, weight, lora_a, lora_b, float(scale), bias,
        norm_weight.contiguous() if norm_weight is not None else None,
        float(eps), _rows_contiguous(residual2d), bool(save_for_backward)))


def backward(grad_out: Tensor, x2d: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
             norm_weight: Optional[Tensor], saved: ForwardResult, needs_weight_grad: bool):
    if x2d.is_cuda:
        return _triton().backward(grad_out, x2d, weight, lora_a, lora_b, scale, norm_weight, saved,
                                  needs_weight_grad)
    if x2d.dtype not in CPU_DTYPES:
        return reference_backend.backward(grad_out, x2d, weight, lora_a, lora_b, scale, norm_weight, saved,
                                          needs_weight_grad)
    _require_cpu_extension()
    has_norm = norm_weight is not None
    gx, gw, ga, gb, gbias, gnorm = _C.backward(
        _rows_contiguous(grad_out), x2d, weight, lora_a, lora_b, float(scale),
        norm_weight.contiguous() if has_norm else None,
        saved.shrink, saved.y_pre.contiguous() if has_norm else saved.y_pre, saved.mean, saved.rstd,
        bool(needs_weight_grad))
    return gx, (gw if needs_weight_grad else None), ga, gb, gbias, (gnorm if has_norm else None)
