"""Argument checks shared by prune() and extend(): run before the model is touched, so a bad
value is a ValueError naming the argument, never an all-NaN model or a half-converted one."""

from __future__ import annotations

import math
import numbers

from torch import nn

__all__ = ["check_bool", "check_not_converted", "finite_number", "positive_int"]


def finite_number(name: str, value, *, nonzero: bool = False, positive: bool = False) -> float:
    """`value` as a float; ValueError unless it is a real, finite number (non-zero / > 0 when asked).
    Accepts Python and NumPy scalars (never bools)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a finite number, got {value!r} ({type(value).__name__})")
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if positive and not f > 0:
        raise ValueError(f"{name}: must be > 0, got {value!r}")
    if nonzero and f == 0:
        raise ValueError(f"{name}: must be non-zero, got {value!r}")
    return f


def positive_int(name: str, value, *, allow_none: bool = True) -> int | None:
    """`value` as an int >= 1 (or None when allowed); ValueError otherwise (bools and floats too)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def check_not_converted(model: nn.Module, what: str, allowed_methods: tuple[str, ...] = ("none",)) -> None:
    """ValueError when `model` was already pruned or extended (shared or output-norm layers, or
    a flexigpt_meta whose method is not in `allowed_methods`)."""
    from ..nn import OutputNorm, SharedLoRALinear

    layers = [n for n, m in model.named_modules() if isinstance(m, (SharedLoRALinear, OutputNorm))]
    method = (getattr(model, "flexigpt_meta", None) or {}).get("method", "none")
    if layers or method not in allowed_methods:
        found = f"it has {layers[0]}" if layers else f"its flexigpt_meta says method {method!r}"
        raise ValueError(
            f"{what}: the model was already converted ({found}); {what} a dense model "
            f"(load the original again; prune() and extend() convert in place)"
        )
