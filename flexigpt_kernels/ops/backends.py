"""Which implementation runs the op, chosen per call from the tensors' device.

    FLEXIGPT_BACKEND=auto (default) | reference | triton | cpp
    auto: CUDA tensors -> cpp when the CUDA decode extension is built (it takes M <= 16 and
          hands the rest to Triton), else triton; CPU tensors -> cpp (the C++ extension)
          when built, else reference.

Triton on CPU tensors needs TRITON_INTERPRET=1 in the environment *before* triton kernels
are first imported (triton reads it when the kernels are decorated); that is how CI tests the
kernels. `use_backend("triton")` overrides the environment inside a `with` block.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "triton", "cpp")
_override: Optional[str] = None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} (FLEXIGPT_BACKEND)")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the op with backend `name` inside the block (overrides FLEXIGPT_BACKEND)."""
    global _override
    previous, _override = _override, _check_name(name)
    try:
        yield
    finally:
        _override = previous


def requested_backend() -> str:
    return _override or _check_name(os.environ.get("FLEXIGPT_BACKEND", "auto").strip().lower() or "auto")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def cpp_available() -> bool:
    """Whether the C++ extension imports (checked once per process)."""
    try:
        importlib.import_module("flexigpt_kernels._C")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def cuda_ext_available() -> bool:
    """Whether the CUDA decode extension imports (checked once per process)."""
    try:
        importlib.import_module("flexigpt_kernels._C_cuda")
    except ImportError:
        return False
    return True


def resolve(device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for tensors on `device`, or a clear error if it cannot run there."""
    name = requested_backend()
    if name == "auto":
        if dtype == torch.float64:
            return "reference"  # no kernel implements fp64
        if device.type == "cuda":
            # the C++ backend routes decode shapes to the CUDA kernel and the rest to Triton
            return "cpp" if cuda_ext_available() else "triton"
        return "cpp" if device.type == "cpu" and cpp_available() else "reference"
    if name == "triton":
        if device.type == "cpu" and not triton_interpreter_enabled():
            raise RuntimeError(
                "backend 'triton' got CPU tensors; set TRITON_INTERPRET=1 before importing "
                "flexigpt_kernels to run the Triton kernels in the interpreter, or use 'reference'"
            )
        if dtype == torch.float64:
            raise TypeError("backend 'triton' supports float16, bfloat16 and float32, not float64")
    if name == "cpp" and device.type == "cpu" and not cpp_available():
        raise RuntimeError("backend 'cpp' requested but the C++ extension flexigpt_kernels._C is not built")
    return name


def load(name: str) -> ModuleType:
    """The module implementing `forward(...)` and `backward(...)` for a concrete backend."""
    if name == "triton":
        return importlib.import_module("flexigpt_kernels.ops.triton.shared_lora_linear")
    if name == "cpp":
        return importlib.import_module("flexigpt_kernels.ops.cpp_backend")
    return importlib.import_module("flexigpt_kernels.ops.reference_backend")
