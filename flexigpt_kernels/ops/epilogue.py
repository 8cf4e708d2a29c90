"""shared_lora_linear_epilogue: the single op with its base product supplied.

    y0 [..., N]  x [..., K]  lora_a [r, K]  lora_b [N, r]  bias [N]  norm_weight [N]  residual [..., N]
    y = y0 + bias + scale * (x @ lora_a.T) @ lora_b.T
    if norm_weight is not None: y = norm_weight * (y - mean(y)) / sqrt(var(y) + eps)   (last dim)
    if residual is not None:    y = residual + y

For a base product computed by someone else's GEMM: an inference engine's packed (oneDNN) or
quantized linear (vLLM's `quant_method.apply(layer, x)`), so a shared base weight can stay in
whatever form the engine keeps it. y0 is read once (the expand is accumulated onto it); the
shrink and expand are two small GEMMs (epilogue_aten.py).

Two ops of the `flexigpt` library (ops/library.py): `flexigpt::shared_lora_linear_epilogue_fwd`
/ `_bwd`. With the C++ extension built their schemas and CPU kernels are C++
(csrc/epilogue.cpp: argument checks, the shrink and expand GEMMs, then ONE parallel pass over
the rows adding y0 and the bias, the output norm with the single op's fp32 statistics and the
residual; no Python per call); this module registers the fake kernels, autograd and the
kernel running the Python backends on them. Backends: reference -> fp32; cpp on the CPU ->
the C++ kernel for float32 / bfloat16 (epilogue_aten.py when it is not built; float16 /
float64 take the reference); triton, CUDA -> epilogue_aten.py in the input dtype.
The low-rank GEMMs are cuBLAS / oneDNN calls: at ranks <= 256 they are a small fraction of
the base GEMM, which is the engine's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, epilogue_aten, library
from .reference import ForwardResult
from .shared_lora_linear import _any_autocast, _no_autocast, autocast_dtype, cast_floating
from .stacked_validation import check_epilogue_args

_CPU_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def upcast_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the backend selected for (device, dtype) computes in fp32 (the reference)."""
    name = backends.resolve(device, dtype)
    if name == "reference" or dtype == torch.float64:
        return True
    return device.type == "cpu" and dtype not in _CPU_NATIVE_DTYPES


def _fwd_python(
    y0: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual: Tensor | None,
    save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y0 [M, N], x [M, K] -> (out [M, N], shrink [M, r], y_pre [M, N] or (0,), mean [M] or (0,), rstd)."""
    check_epilogue_args(y0, x, lora_a, lora_b, scale, bias, norm_weight, eps, residual)
    backends._sync_native_routes()  # the next CPU call goes native again after a selection change
    upcast = y0.shape[0] == 0 or upcast_for(y0.device, y0.dtype)
    with _no_autocast(y0):
        return tuple(
            epilogue_aten.forward(
                y0, x, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward, upcast
            )
        )


def _fwd_fake(y0, x, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward):
    m, n = y0.shape
    has_norm = norm_weight is not None
    stats = (m,) if has_norm else (0,)
    return (
        y0.new_empty((m, n)),
        y0.new_empty((m, lora_a.shape[0])),
        y0.new_empty((m, n) if has_norm and save_for_backward else (0,)),
        y0.new_empty(stats, dtype=torch.float32),
        y0.new_empty(stats, dtype=torch.float32),
    )


def _bwd_python(
    grad_out: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    norm_weight: Tensor | None,
    shrink: Tensor,
    y_pre: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_y0, grad_x, grad_a, grad_b, grad_bias [N] fp32, grad_norm_weight [N] fp32 or (0,))."""
    backends._sync_native_routes()
    upcast = x.shape[0] == 0 or upcast_for(x.device, x.dtype)
    saved = ForwardResult(x.new_empty((0,)), shrink, y_pre, mean, rstd)
    with _no_autocast(x):
        gy0, gx, ga, gb, gbias, gnorm = epilogue_aten.backward(
            grad_out, x, lora_a, lora_b, scale, norm_weight, saved, upcast
        )
    gy0 = gy0.to(grad_out.dtype)
    if gy0.data_ptr() == grad_out.data_ptr():
        gy0 = gy0.clone()  # an op's output must not alias its input
    return (
        gy0,
        gx.to(x.dtype),
        ga.to(lora_a.dtype),
        gb.to(lora_b.dtype),
        gbias.float(),
        gnorm.float() if gnorm is not None else x.new_empty((0,), dtype=torch.float32),
    )


def _bwd_fake(grad_out, x, lora_a, lora_b, scale, norm_weight, shrink, y_pre, mean, rstd):
    n = grad_out.shape[1]
    return (
        grad_out.new_empty(grad_out.shape),
        x.new_empty(x.shape),
        torch.empty_like(lora_a),
        torch.empty_like(lora_b),
        x.new_empty((n,), dtype=torch.float32),
        x.new_empty((n,) if norm_weight is not None else (0,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    y0, x, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward = inputs
    _, shrink, y_pre, mean, rstd = output
    ctx.mark_non_differentiable(shrink, y_pre, mean, rstd)
    # Called directly with save_for_backward=False, the op did not keep y_pre: recompute it.
    ctx.recompute = norm_weight is not None and not save_for_backward
    ctx.save_for_backward(
        x,
        lora_a,
        lora_b,
        norm_weight,
        shrink,
        y_pre,
        mean,
        rstd,
        y0 if ctx.recompute else None,
        bias if ctx.recompute else None,
    )
    ctx.scale, ctx.eps = scale, eps
    ctx.dtypes = [t.dtype if t is not None else None for t in (y0, bias, residual)]


def _backward(ctx, grad_out, *_unused):
    x, lora_a, lora_b, norm_weight, shrink, y_pre, mean, rstd, y0, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if ctx.recompute:
        y_pre = torch.ops.flexigpt.shared_lora_linear_epilogue_fwd(
            y0, x, lora_a, lora_b, ctx.scale, bias, norm_weight, ctx.eps, None, True
        )[2]
    gy0, gx, ga, gb, gbias, gnorm = torch.ops.flexigpt.shared_lora_linear_epilogue_bwd(
        grad_out, x, lora_a, lora_b, ctx.scale, norm_weight, shrink, y_pre, mean, rstd
    )
    y0_dtype, bias_dtype, residual_dtype = ctx.dtypes
    return (
        gy0.to(y0_dtype) if needs[0] else None,
        gx if needs[1] else None,
        ga if needs[2] else None,
        gb if needs[3] else None,
        None,
        gbias.to(bias_dtype) if needs[5] else None,
        gnorm.to(norm_weight.dtype) if needs[6] else None,
        None,
        grad_out.to(residual_dtype) if needs[8] else None,
        None,
    )


library.register_python(
    "shared_lora_linear_epilogue", (_fwd_python, _bwd_python), (_fwd_fake, _bwd_fake), _backward, _setup_context
)
_FWD = library.op("shared_lora_linear_epilogue_fwd")


def shared_lora_linear_epilogue(
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
    """y = [residual +] [gamma * LayerNorm_noBias](y0 + bias + scale (x @ lora_a.T) @ lora_b.T)

    Shapes: y0 [..., N] (the base product x @ W.T, from any GEMM), x [..., K] (same leading
    dims), lora_a [r, K], lora_b [N, r], bias / norm_weight [N], residual [..., N]; every
    tensor shares y0's dtype and device. Returns [..., N] in y0's dtype. Differentiable in
    every tensor argument (y0's gradient is the pre-norm gradient dy). Under torch.autocast
    every floating tensor is first cast to the autocast dtype.
    """
    if _any_autocast() and (dt := autocast_dtype(y0)) is not None:
        with torch.autocast(y0.device.type, enabled=False):
            y0, x, lora_a, lora_b, bias, norm_weight, residual = cast_floating(
                dt, y0, x, lora_a, lora_b, bias, norm_weight, residual
            )
            return shared_lora_linear_epilogue(
                y0, x, lora_a, lora_b, scale, bias, norm_weight=norm_weight, eps=eps, residual=residual
            )
    try:
        n = y0.shape[-1]
        y2d = y0 if y0.dim() == 2 else y0.reshape(-1, n)
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        res2d = residual if residual is None or residual.dim() == 2 else residual.reshape(-1, n)
        if residual is not None and residual.shape != y0.shape:  # flattening would hide the mismatch
            raise ValueError("residual")
        if type(scale) is not float or type(eps) is not float:  # ints, numpy scalars: checked, then cast
            check_epilogue_args(y0, x, lora_a, lora_b, scale, bias, norm_weight, eps, residual)
            scale, eps = float(scale), float(eps)
        tensors = (y0, x, lora_a, lora_b, bias, norm_weight, residual)
        out = library.call_forward(_FWD, tensors, y2d, x2d, lora_a, lora_b, scale, bias, norm_weight, eps, res2d)
    except (ValueError, TypeError, RuntimeError, IndexError, AttributeError):
        check_epilogue_args(y0, x, lora_a, lora_b, scale, bias, norm_weight, eps, residual)
        raise
    return out if y0.dim() == 2 else out.reshape(y0.shape)
