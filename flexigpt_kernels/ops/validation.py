"""Argument checks for the fused op: every bad input fails here, before any kernel launch,
with a ValueError (shapes, values) or TypeError (dtypes, devices) naming the argument."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _is_real(v: object) -> bool:
    """A Python or numpy real number (bool excluded); 0-d tensors are not scalars here."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def as_float(v: object, name: str) -> float:
    """`v` as a Python float (numpy float32/float64 scalars accepted), else ValueError."""
    if type(v) is float:
        return v
    if not _is_real(v):
        raise ValueError(f"{name} must be a real number (float, int or numpy scalar), got {v!r} ({type(v).__name__})")
    return float(v)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_shared_lora_linear_args(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual: Tensor | None,
) -> None:
    """Validate the op's arguments against the contract

        x [..., K]  weight [N, K]  lora_a [r, K] (r >= 1)  lora_b [N, r]
        bias [N]  norm_weight [N]  residual [..., N] (same leading dims as x)

    and that all tensors share x's dtype and device."""
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    _check_tensor("lora_a", lora_a)
    _check_tensor("lora_b", lora_b)
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension [..., K], got shape {_shape(x)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {_shape(weight)}")
    n, k = weight.shape
    if k < 1 or n < 1:
        raise ValueError(
            f"weight must be [N, K] with N >= 1 and K >= 1 (an empty feature dimension has nothing to "
            f"compute), got weight {_shape(weight)}, x {_shape(x)}"
        )
    if x.shape[-1] != k:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must equal weight's in_features K ({k}): "
            f"x {_shape(x)}, weight {_shape(weight)}"
        )
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a must be [r, K] = [r, {k}], got shape {_shape(lora_a)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"the adapter rank must be >= 1, got lora_a of shape {_shape(lora_a)}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
        raise ValueError(
            f"lora_b must be [N, r] = [{n}, {r}] (N from weight {_shape(weight)}, r from lora_a "
            f"{_shape(lora_a)}), got shape {_shape(lora_b)}"
        )
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [N] = [{n}], got shape {_shape(bias)}")
    if norm_weight is not None:
        _check_tensor("norm_weight", norm_weight)
        if tuple(norm_weight.shape) != (n,):
            raise ValueError(f"norm_weight must be [N] = [{n}], got shape {_shape(norm_weight)}")
    if residual is not None:
        _check_tensor("residual", residual)
        expected = (*x.shape[:-1], n)
        if tuple(residual.shape) != expected:
            raise ValueError(
                f"residual must be [..., N] = {expected} (x {_shape(x)}, weight {_shape(weight)}), "
                f"got shape {_shape(residual)}"
            )
    if not _is_real(scale) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    if not _is_real(eps) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    named = [
        ("weight", weight),
        ("lora_a", lora_a),
        ("lora_b", lora_b),
        ("bias", bias),
        ("norm_weight", norm_weight),
        ("residual", residual),
    ]
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; all tensors must share it")
        if t.device != x.device:
            raise TypeError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share the device")
