"""shared_lora_linear_stacked: the shared-weight op for a projection that stacks P parts read
from the same input (vLLM's qkv_proj = q; k; v and gate_up_proj = gate; up), in one call.

    x [..., K]  weight [N, K] (the parts' rows stacked)  lora_as[i] [r_i, K]  lora_bs[i] [n_i, r_i]
    scales[i]  bias [N]      sum n_i = N; part i owns output columns c_i .. c_i + n_i
    y = x @ weight.T + bias ;  y[..., c_i : c_i + n_i] += scales[i] * (x @ lora_as[i].T) @ lora_bs[i].T

One base GEMM over the stacked weight, one shrink GEMM over the parts' concatenated A (all
ranks at once), each part's expand written into its own column slice of the one output
(stacked_aten.py; the Triton backend's launches are listed in stacked_triton.py).

Two ops of the `flexigpt` library (ops/library.py): `flexigpt::shared_lora_linear_stacked_fwd`
(returns the output and the shrink [M, sum r_i] the backward needs) and `..._stacked_bwd`.
With the C++ extension built their schemas and CPU kernels are C++ (csrc/stacked.cpp: argument
checks, then the ATen GEMMs in x's dtype, no Python per call); this module registers on them
the fake kernels (torch.compile traces the op without graph breaks), autograd, and the kernel
that runs the Python backends for every call the C++ kernel does not take. Backends
(FLEXIGPT_BACKEND / use_backend, resolved as for the single op): reference -> fp32 ATen
composition; cpp on the CPU -> the C++ kernel for float32 / bfloat16 (stacked_aten.py, the
same GEMMs from Python, when it is not built; other dtypes take the reference); triton, and
anything on CUDA -> stacked_triton.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import backends, library, stacked_aten
from .shared_lora_linear import _any_autocast, _no_autocast, autocast_dtype, cast_floating
from .stacked_validation import check_stacked_args

_CPU_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _triton():
    from . import stacked_triton

    return stacked_triton


def implementation(device: torch.device, dtype: torch.dtype):
    """(module with forward/backward, upcast flag) for tensors on `device` in `dtype`."""
    name = backends.resolve(device, dtype)
    if name == "triton" or (name == "cpp" and device.type == "cuda"):
        return _triton(), False
    if name == "cpp" and dtype in _CPU_NATIVE_DTYPES:
        return stacked_aten, False
    return stacked_aten, True


def _impl(x: Tensor):
    backends._sync_native_routes()  # the next CPU call goes native again after a selection change
    if x.shape[0] == 0:
        return stacked_aten, True
    return implementation(x.device, x.dtype)


def _fwd_python(
    x: Tensor,
    weight: Tensor,
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    scales: Sequence[float],
    bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """x [M, K] (2-D) -> (out [M, N], shrink [M, sum r_i]) in x's dtype."""
    check_stacked_args(x, weight, lora_as, lora_bs, scales, bias)
    impl, upcast = _impl(x)
    with _no_autocast(x):
        return impl.forward(x, weight, stacked_aten.concat_rows(lora_as), lora_bs, scales, bias, upcast)


def _fwd_fake(x, weight, lora_as, lora_bs, scales, bias):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], sum(a.shape[0] for a in lora_as)))


def _bwd_python(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    scales: Sequence[float],
    shrink: Tensor,
    needs_weight_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
    """Returns (grad_x, grad_weight or (0,), grad of the concatenated A [sum r_i, K],
    [grad_B_i], grad_bias [N] fp32)."""
    impl, upcast = _impl(x)
    with _no_autocast(x):
        gx, gw, ga, gbs, gbias = impl.backward(
            grad_out, x, weight, stacked_aten.concat_rows(lora_as), lora_bs, scales, shrink, needs_weight_grad, upcast
        )
    return (
        gx.to(x.dtype),
        gw.to(weight.dtype) if gw is not None else x.new_empty((0,)),
        ga.to(x.dtype),
        [g.to(b.dtype) for g, b in zip(gbs, lora_bs)],
        gbias.float(),
    )


def _bwd_fake(grad_out, x, weight, lora_as, lora_bs, scales, shrink, needs_weight_grad):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape) if needs_weight_grad else x.new_empty((0,)),
        x.new_empty((sum(a.shape[0] for a in lora_as), x.shape[1])),
        [torch.empty_like(b) for b in lora_bs],
        x.new_empty((weight.shape[0],), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    x, weight, lora_as, lora_bs, scales, bias = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.parts = len(lora_as)
    ctx.save_for_backward(x, weight, output[1], *lora_as, *lora_bs)
    ctx.scales = list(scales)
    ctx.ranks = [a.shape[0] for a in lora_as]
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_out, _grad_shrink):
    x, weight, shrink, *ab = ctx.saved_tensors
    lora_as, lora_bs = ab[: ctx.parts], ab[ctx.parts :]
    needs = ctx.needs_input_grad
    gx, gw, ga, gbs, gbias = torch.ops.flexigpt.shared_lora_linear_stacked_bwd(
        grad_out, x, weight, lora_as, lora_bs, ctx.scales, shrink, needs[1]
    )
    return (
        gx if needs[0] else None,
        gw if needs[1] else None,
        list(ga.split(ctx.ranks, 0)) if needs[2] else None,
        list(gbs) if needs[3] else None,
        None,
        gbias.to(ctx.bias_dtype) if needs[5] else None,
    )


library.register_python(
    "shared_lora_linear_stacked", (_fwd_python, _bwd_python), (_fwd_fake, _bwd_fake), _backward, _setup_context
)


def _delta_python(y, x, lora_as, lora_bs, scales, bias):
    """shared_lora_linear_stacked_delta_ without the C++ extension (ATen from Python)."""
    stacked_aten.add_expands(y, torch.mm(x, stacked_aten.concat_rows(lora_as).t()), lora_bs, scales)
    if bias is not None:
        y.add_(bias)


if not library.NATIVE_CPU:  # with it, csrc/stacked.cpp registers the kernel (every device)
    library.lib.impl("shared_lora_linear_stacked_delta_", _delta_python, "CompositeExplicitAutograd")
torch.library.register_fake(
    f"{library.NAMESPACE}::shared_lora_linear_stacked_delta_", lambda *args: None, lib=library.lib
)
_DELTA = library.op("shared_lora_linear_stacked_delta_")
_FWD = library.op("shared_lora_linear_stacked_fwd")
_any_requires_grad = torch._C._any_requires_grad
_below_autograd = torch._C._AutoDispatchBelowAutograd
_is_compiling = torch.compiler.is_compiling


def shared_lora_linear_stacked(
    x: Tensor,
    weight: Tensor,
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    scales: Sequence[float],
    bias: Tensor | None = None,
) -> Tensor:
    """y = x @ weight.T + bias; y[..., c_i:c_i+n_i] += scales[i] * (x @ lora_as[i].T) @ lora_bs[i].T

    Shapes: x [..., K], weight [N, K] (P parts stacked by rows, widths n_i = lora_bs[i].shape[0],
    sum n_i = N), lora_as[i] [r_i, K] (r_i >= 1: a part of rank 0 is an error), lora_bs[i]
    [n_i, r_i], scales: P floats, bias [N] or None; every tensor shares x's dtype and device.
    Returns [..., N] in x's dtype. Differentiable in x, weight (when it requires grad), every
    A_i and B_i, and bias. When the A_i are consecutive row blocks of one buffer (views of one
    [sum r_i, K] tensor) the shrink reads them in place; otherwise they are concatenated.
    One op call: the kernels validate the flattened operands; bad input is reported by
    stacked_validation.py with the caller's shapes. Under torch.autocast every floating tensor
    is first cast to the autocast dtype.
    """
    if _any_autocast() and (dt := autocast_dtype(x)) is not None:
        with torch.autocast(x.device.type, enabled=False):
            if not (isinstance(lora_as, (list, tuple)) and isinstance(lora_bs, (list, tuple))):
                check_stacked_args(x, weight, lora_as, lora_bs, scales, bias)  # the TypeError
            x, weight, bias = cast_floating(dt, x, weight, bias)
            lora_as, lora_bs = cast_floating(dt, *lora_as), cast_floating(dt, *lora_bs)
            return shared_lora_linear_stacked(x, weight, lora_as, lora_bs, scales, bias)
    if not (
        isinstance(lora_as, (list, tuple))
        and isinstance(lora_bs, (list, tuple))
        and isinstance(scales, (list, tuple))
        and all(type(s) is float for s in scales)
    ):
        check_stacked_args(x, weight, lora_as, lora_bs, scales, bias)  # the TypeError, or ints / numpy scalars
        scales = [float(s) for s in scales]
    try:
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if _is_compiling():  # traced: plain Python that dynamo understands
            out = _FWD(x2d, weight, lora_as, lora_bs, scales, bias)[0]
        elif torch.is_grad_enabled() and _any_requires_grad(x, weight, bias, *lora_as, *lora_bs):
            out = _FWD(x2d, weight, lora_as, lora_bs, scales, bias)[0]
        else:
            # Nothing to differentiate: skip the autograd kernel (it would only redispatch).
            with _below_autograd():
                out = _FWD(x2d, weight, lora_as, lora_bs, scales, bias)[0]
    except (ValueError, TypeError, RuntimeError, IndexError, AttributeError):
        check_stacked_args(x, weight, lora_as, lora_bs, scales, bias)
        raise
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.shape[0])


def add_stacked_delta_(
    y: Tensor,
    x: Tensor,
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    scales: Sequence[float],
    bias: Tensor | None = None,
) -> Tensor:
    """In place, inference only: y[..., c_i:c_i+n_i] += scales[i] * (x @ lora_as[i].T) @ lora_bs[i].T,
    then y += bias; returns y.

    For a stacked projection whose base product y = x @ W.T came from another GEMM (vLLM's
    `quant_method.apply`): one op call (csrc/stacked.cpp: one shrink GEMM over the concatenated
    A, one accumulating expand GEMM per part into its column slice, one bias pass), on every
    device, in y's dtype. Shapes: y [..., N] (a view of it must flatten to [M, N]), x [..., K]
    with y's leading dims, lora_as[i] [r_i, K] (r_i >= 1), lora_bs[i] [n_i, r_i], sum n_i = N,
    bias [N]; every tensor shares y's dtype and device. Not differentiable.
    """
    if not (isinstance(lora_as, (list, tuple)) and isinstance(lora_bs, (list, tuple))):
        raise TypeError(f"lora_as and lora_bs must be lists (one entry per part), got {type(lora_as).__name__}")
    y2d = y if y.dim() == 2 else y.view(-1, y.shape[-1])
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    _DELTA(y2d, x2d, lora_as, lora_bs, scales, bias)
    return y
