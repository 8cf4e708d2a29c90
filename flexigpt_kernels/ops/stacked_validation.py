"""Argument checks of the multi-slice (stacked) op and of the epilogue op: every bad input
fails here, before any kernel, with a ValueError (shapes, values) or TypeError (types, dtypes,
devices) that names the argument and the shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from .validation import SUPPORTED_DTYPES, _check_tensor, _shape


def _check_scale(name: str, scale: object) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{name} must be a finite float, got {scale!r}")


def _check_same_dtype_device(x: Tensor, named: Sequence[tuple[str, Tensor | None]], x_name: str = "x") -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{x_name} has dtype {x.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {x_name} has dtype {x.dtype}; all tensors must share it")
        if t.device != x.device:
            raise TypeError(f"{name} is on {t.device} but {x_name} is on {x.device}; all tensors must share the device")


def check_stacked_args(
    x: Tensor,
    weight: Tensor,
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    scales: Sequence[float],
    bias: Tensor | None,
) -> None:
    """Validate against the contract

        x [..., K]  weight [N, K]  lora_as[i] [r_i, K] (r_i >= 1)  lora_bs[i] [n_i, r_i]
        len(lora_as) == len(lora_bs) == len(scales) = P >= 1,  sum n_i = N,  bias [N]

    and that every tensor shares x's dtype and device."""
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    for name, seq in (("lora_as", lora_as), ("lora_bs", lora_bs), ("scales", scales)):
        if isinstance(seq, Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple (one entry per part), got {type(seq).__name__}")
    parts = len(lora_as)
    if parts < 1 or len(lora_bs) != parts or len(scales) != parts:
        raise ValueError(
            f"lora_as, lora_bs and scales must have one entry per part (>= 1), got "
            f"{len(lora_as)}, {len(lora_bs)} and {len(scales)}"
        )
    if x.dim() < 1:
        raise ValueError(f"x must have at least one dimension [..., K], got shape {_shape(x)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {_shape(weight)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must equal weight's in_features K ({k}): "
            f"x {_shape(x)}, weight {_shape(weight)}"
        )
    widths = []
    for i, (a, b, s) in enumerate(zip(lora_as, lora_bs, scales)):
        _check_tensor(f"lora_as[{i}]", a)
        _check_tensor(f"lora_bs[{i}]", b)
        if a.dim() != 2 or a.shape[1] != k:
            raise ValueError(f"lora_as[{i}] must be [r_{i}, K] = [r, {k}], got shape {_shape(a)}")
        if a.shape[0] < 1:
            raise ValueError(
                f"part {i} has rank 0 (lora_as[{i}] of shape {_shape(a)}): every part needs "
                "rank >= 1 (leave a part without adapter out of the stacked op)"
            )
        if b.dim() != 2 or b.shape[1] != a.shape[0] or b.shape[0] < 1:
            raise ValueError(
                f"lora_bs[{i}] must be [n_{i}, r_{i}] = [n, {a.shape[0]}] with n >= 1 (r from "
                f"lora_as[{i}] {_shape(a)}), got shape {_shape(b)}"
            )
        _check_scale(f"scales[{i}]", s)
        widths.append(b.shape[0])
    if sum(widths) != n:
        raise ValueError(
            f"the parts' widths {widths} (rows of lora_bs) sum to {sum(widths)}, but weight "
            f"{_shape(weight)} has N = {n} rows"
        )
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [N] = [{n}], got shape {_shape(bias)}")
    named = [("weight", weight), ("bias", bias)]
    named += [(f"lora_as[{i}]", a) for i, a in enumerate(lora_as)]
    named += [(f"lora_bs[{i}]", b) for i, b in enumerate(lora_bs)]
    _check_same_dtype_device(x, named)


def check_epilogue_args(
    y0: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual: Tensor | None,
) -> None:
    """Validate against the contract

        y0 [..., N]  x [..., K] (same leading dims)  lora_a [r, K] (r >= 1)  lora_b [N, r]
        bias [N]  norm_weight [N]  residual [..., N]

    and that every tensor shares y0's dtype and device."""
    for name, t in (("y0", y0), ("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        _check_tensor(name, t)
    if y0.dim() < 1 or x.dim() < 1 or tuple(y0.shape[:-1]) != tuple(x.shape[:-1]):
        raise ValueError(
            f"y0 [..., N] and x [..., K] must share their leading dimensions, got y0 {_shape(y0)} and x {_shape(x)}"
        )
    n, k = y0.shape[-1], x.shape[-1]
    if lora_a.dim() != 2 or lora_a.shape[1] != k:
        raise ValueError(f"lora_a must be [r, K] = [r, {k}] (K from x {_shape(x)}), got shape {_shape(lora_a)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"the adapter rank must be >= 1, got lora_a of shape {_shape(lora_a)}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
        raise ValueError(
            f"lora_b must be [N, r] = [{n}, {r}] (N from y0 {_shape(y0)}, r from lora_a "
            f"{_shape(lora_a)}), got shape {_shape(lora_b)}"
        )
    for name, t in (("bias", bias), ("norm_weight", norm_weight)):
        if t is not None:
            _check_tensor(name, t)
            if tuple(t.shape) != (n,):
                raise ValueError(f"{name} must be [N] = [{n}] (N from y0 {_shape(y0)}), got shape {_shape(t)}")
    if residual is not None:
        _check_tensor("residual", residual)
        if tuple(residual.shape) != tuple(y0.shape):
            raise ValueError(f"residual must have y0's shape {_shape(y0)}, got shape {_shape(residual)}")
    _check_scale("scale", scale)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    _check_same_dtype_device(
        y0,
        [
            ("x", x),
            ("lora_a", lora_a),
            ("lora_b", lora_b),
            ("bias", bias),
            ("norm_weight", norm_weight),
            ("residual", residual),
        ],
        x_name="y0",
    )
