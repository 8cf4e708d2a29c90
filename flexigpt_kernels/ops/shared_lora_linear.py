"""shared_lora_linear: the shared-weight matmul, the low-rank delta and the output norm in one op.

    x [..., K]  weight [N, K]  lora_a [r, K]  lora_b [N, r]  bias [N]  norm_weight [N]
    residual [..., N]
    y = x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T
    if norm_weight is not None: y = norm_weight * (y - mean(y)) / sqrt(var(y) + eps)   (last dim)
    if residual is not None:    y = residual + y

Two ops of the `flexigpt` library (ops/library.py): `flexigpt::shared_lora_linear_fwd` (returns
the output and the intermediates the backward needs) and `flexigpt::shared_lora_linear_bwd`.
Their schemas and CPU kernels are C++ (csrc/bindings.cpp) when the extension is built; this
module registers on them, from Python: the fake kernels (torch.compile traces the op without
graph breaks), autograd, and the kernel that runs the backend the registry resolves
(ops/backends.py) for every call the C++ kernel does not take (CUDA, other backends, dtypes).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import backends, library
from .reference import ForwardResult
from .validation import as_float, check_shared_lora_linear_args

_AUTOCAST_DEVICES = ("cpu", "cuda")


def _no_autocast(x: Tensor):
    """The backends pick their own precisions (fp32 accumulation); an enclosing autocast
    must not re-cast the ATen calls inside them."""
    if x.device.type in _AUTOCAST_DEVICES:
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _check_2d(x: Tensor, residual: Optional[Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K] (flatten the leading dims), got shape {tuple(x.shape)}")


def _fwd_python(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    eps: float,
    residual: Optional[Tensor],
    save_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x [M, K] (2-D) -> (out [M, N], shrink [M, r], y_pre [M, N] or (0,), mean [M] or (0,), rstd)."""
    _check_2d(x, residual)
    check_shared_lora_linear_args(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual)
    impl = backends.for_call(x)
    with _no_autocast(x):
        return tuple(
            impl.forward(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward)
        )


def _fwd_fake(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward):
    _check_2d(x, residual)
    check_shared_lora_linear_args(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual)
    m, n, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    has_norm = norm_weight is not None
    return (
        x.new_empty((m, n)),
        x.new_empty((m, r)),
        x.new_empty((m, n) if has_norm and save_for_backward else (0,)),
        x.new_empty((m,) if has_norm else (0,), dtype=torch.float32),
        x.new_empty((m,) if has_norm else (0,), dtype=torch.float32),
    )


def _bwd_python(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    norm_weight: Optional[Tensor],
    shrink: Tensor,
    y_pre: Tensor,
    mean: Tensor,
    rstd: Tensor,
    needs_weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_weight or (0,), grad_a, grad_b, grad_bias [N] fp32,
    grad_norm_weight [N] fp32 or (0,))."""
    impl = backends.for_call(x)
    saved = ForwardResult(x.new_empty((0,)), shrink, y_pre, mean, rstd)
    with _no_autocast(x):
        gx, gw, ga, gb, gbias, gnorm = impl.backward(
            grad_out, x, weight, lora_a, lora_b, scale, norm_weight, saved, needs_weight_grad
        )
    empty = x.new_empty((0,), dtype=torch.float32)
    return (
        gx.to(x.dtype),
        gw.to(weight.dtype) if gw is not None else x.new_empty((0,)),
        ga.to(lora_a.dtype),
        gb.to(lora_b.dtype),
        gbias.float(),
        gnorm.float() if gnorm is not None else empty,
    )


def _bwd_fake(grad_out, x, weight, lora_a, lora_b, scale, norm_weight, shrink, y_pre, mean, rstd, needs_weight_grad):
    n = weight.shape[0]
    return (
        x.new_empty(x.shape),  # the backends return row-major gradients whatever x's strides
        weight.new_empty(weight.shape) if needs_weight_grad else x.new_empty((0,)),
        torch.empty_like(lora_a),
        torch.empty_like(lora_b),
        x.new_empty((n,), dtype=torch.float32),
        x.new_empty((n,) if norm_weight is not None else (0,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward = inputs
    _, shrink, y_pre, mean, rstd = output
    ctx.mark_non_differentiable(shrink, y_pre, mean, rstd)
    # Called directly with save_for_backward=False, the op did not keep y_pre: the backward
    # through the norm recomputes it (needs bias and eps).
    ctx.recompute_y_pre = norm_weight is not None and not save_for_backward
    ctx.save_for_backward(
        x, weight, lora_a, lora_b, norm_weight, shrink, y_pre, mean, rstd, bias if ctx.recompute_y_pre else None
    )
    ctx.scale = scale
    ctx.eps = eps
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _backward(ctx, grad_out, *_unused):
    x, weight, lora_a, lora_b, norm_weight, shrink, y_pre, mean, rstd, bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if ctx.recompute_y_pre:
        y_pre = torch.ops.flexigpt.shared_lora_linear_fwd(
            x, weight, lora_a, lora_b, ctx.scale, bias, norm_weight, ctx.eps, None, True
        )[2]
    gx, gw, ga, gb, gbias, gnorm = torch.ops.flexigpt.shared_lora_linear_bwd(
        grad_out, x, weight, lora_a, lora_b, ctx.scale, norm_weight, shrink, y_pre, mean, rstd, needs[1]
    )
    return (
        gx if needs[0] else None,
        gw if needs[1] else None,
        ga if needs[2] else None,
        gb if needs[3] else None,
        None,
        gbias.to(ctx.bias_dtype) if needs[5] else None,
        gnorm.to(norm_weight.dtype) if needs[6] else None,
        None,
        grad_out.to(ctx.residual_dtype) if needs[8] else None,
        None,
    )


def _register() -> None:
    """Python's part of the ops (whichever side declared them): the backend-running kernel for
    every device without a native kernel, the fake kernels, autograd."""
    lib = library.lib
    for name, fn in (
        ("shared_lora_linear_fwd", _fwd_python),
        ("shared_lora_linear_bwd", _bwd_python),
        ("_shared_lora_linear_fwd_py", _fwd_python),
        ("_shared_lora_linear_bwd_py", _bwd_python),
    ):
        lib.impl(name, fn, "CompositeExplicitAutograd")
    for name, fake in (
        ("shared_lora_linear_fwd", _fwd_fake),
        ("shared_lora_linear_bwd", _bwd_fake),
        ("_shared_lora_linear_fwd_py", _fwd_fake),
        ("_shared_lora_linear_bwd_py", _bwd_fake),
    ):
        torch.library.register_fake(f"{library.NAMESPACE}::{name}", fake, lib=lib)
    torch.library.register_autograd(
        f"{library.NAMESPACE}::shared_lora_linear_fwd", _backward, setup_context=_setup_context, lib=lib
    )


_register()
_FWD = library.op("shared_lora_linear_fwd")
_any_requires_grad = torch._C._any_requires_grad
_any_autocast = torch._C._is_any_autocast_enabled
_below_autograd = torch._C._AutoDispatchBelowAutograd
_is_compiling = torch.compiler.is_compiling


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype an enclosing torch.autocast asks of x's device; None when it is off there. The
    public ops (this one, the stacked and the epilogue forms) cast every floating tensor to it
    once, then run with autocast off."""
    if isinstance(x, Tensor) and x.device.type in _AUTOCAST_DEVICES:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
    return None


def cast_floating(dtype: torch.dtype, *tensors):
    """Each floating tensor of `tensors` in `dtype` (others, and None, as given); a list."""
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype else t for t in tensors]


def shared_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float = 1.0,
    bias: Optional[Tensor] = None,
    *,
    norm_weight: Optional[Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """y = [residual +] [LayerNorm_noBias_gamma=norm_weight](x @ weight.T + bias + scale (x @ lora_a.T) @ lora_b.T)

    Shapes: x [..., K], weight [N, K], lora_a [r, K], lora_b [N, r], bias [N], norm_weight [N],
    residual [..., N]; all tensors share x's dtype and device. Returns [..., N] in x's dtype,
    accumulated in fp32. Differentiable in every tensor argument; weight's gradient is
    computed only when it requires grad (a shared weight's gradient sums over its uses).
    Under torch.autocast, every floating tensor is first cast to the autocast dtype.
    """
    dt = autocast_dtype(x) if _any_autocast() else None  # the check first: no call on the hot path
    if dt is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _call(
                *cast_floating(dt, x, weight, lora_a, lora_b),
                scale,
                *cast_floating(dt, bias, norm_weight),
                eps,
                *cast_floating(dt, residual),
            )
    return _call(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual)


def _call(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual) -> Tensor:
    """The op on x [..., K]: flatten, one op call, unflatten. Bad input is reported by
    validation.py with the caller's shapes (the kernels validate the flattened operands)."""
    try:
        scale = scale if type(scale) is float else as_float(scale, "scale")
        eps = eps if type(eps) is float else as_float(eps, "eps")
        lead = x.shape[:-1]
        n = weight.shape[0]
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        res2d = None
        if residual is not None:
            if residual.shape[:-1] != lead:  # flattening would hide the mismatch
                raise ValueError("residual")
            res2d = residual if residual.dim() == 2 else residual.reshape(-1, residual.shape[-1])
        if _is_compiling():  # traced: plain Python that dynamo understands
            save = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b, bias, norm_weight, residual)
            )
            out = _FWD(x2d, weight, lora_a, lora_b, scale, bias, norm_weight, eps, res2d, save)[0]
        elif torch.is_grad_enabled() and _any_requires_grad(x, weight, lora_a, lora_b, bias, norm_weight, residual):
            out = _FWD(x2d, weight, lora_a, lora_b, scale, bias, norm_weight, eps, res2d, True)[0]
        else:
            # Nothing to differentiate: skip the autograd kernel (it would only redispatch).
            with _below_autograd():
                out = _FWD(x2d, weight, lora_a, lora_b, scale, bias, norm_weight, eps, res2d, False)[0]
    except (ValueError, TypeError, RuntimeError, IndexError, AttributeError):
        check_shared_lora_linear_args(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual)
        raise
    return out if x.dim() == 2 else out.reshape(*lead, n)
