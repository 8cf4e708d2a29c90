"""The backend registry: which implementation runs the op, decided in one routing table.

    backend    module                       runs
    reference  ops/reference_backend.py     the plain-PyTorch spec (fp32 accumulation), any device and dtype
    cpp        ops/cpp_backend.py           the C++ CPU kernel (csrc/), float32 / bfloat16
    triton     ops/triton/                  the Triton kernels (CUDA; CPU tensors only in the interpreter)
    cuda       ops/cuda_backend.py          the CUDA decode kernel (csrc/cuda) for forwards it takes
                                            (M <= 16, fp16/bf16), Triton for the rest

Every backend implements the `Backend` protocol below. The selection is FLEXIGPT_BACKEND=
auto (default) | reference | cpp | triton | cuda, or `with use_backend(name)` (wins over the
environment). `ROUTES` maps (device type, selection) to the candidates in order of preference;
the first one that is available and takes the dtype runs:

    auto on CPU tensors:  cpp, else reference      auto on CUDA tensors: cuda, else triton
    float64 (any device): reference (no kernel implements it); cpp with float16: reference

Triton on CPU tensors needs TRITON_INTERPRET=1 in the environment *before* the Triton kernels
are first imported (triton reads it when it decorates them); that is how CI tests them.

Where the decision is taken: the op's C++ CPU kernel runs the cpp backend itself (and its
CUDA kernel the decode kernel, for the calls that one takes) when `_sync_native_routes()` told
it that "cpp" ("cuda") is what such a call resolves to (done at import, by `use_backend`, and
by every call that reaches Python), for the FLEXIGPT_BACKEND value it resolved with; every
other call (other devices, backends, dtypes, another FLEXIGPT_BACKEND) reaches `for_call()`
here, through the op's Python kernel.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from . import library
from .reference import ForwardResult

BACKENDS = ("auto", "reference", "triton", "cpp", "cuda")
_ENV = "FLEXIGPT_BACKEND"


class Backend(Protocol):
    """The calling convention of every backend (2-D operands, already validated).

    forward(x2d [M, K], weight [N, K], lora_a [r, K], lora_b [N, r], scale, bias [N] | None,
            norm_weight [N] | None, eps, residual2d [M, N] | None, save_for_backward)
        -> ForwardResult(out [M, N], shrink [M, r] (x's dtype), y_pre [M, N] | (0,),
                         mean [M] fp32 | (0,), rstd [M] fp32 | (0,))
           (y_pre only with a norm and save_for_backward; mean/rstd only with a norm)
    backward(grad_out [M, N], x2d, weight, lora_a, lora_b, scale, norm_weight | None, saved
             (the forward's ForwardResult), needs_weight_grad)
        -> (grad_x, grad_weight | None, grad_a, grad_b, grad_bias fp32, grad_norm_weight fp32 | None)
    """

    def forward(
        self,
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
    ) -> ForwardResult: ...

    def backward(
        self,
        grad_out: Tensor,
        x2d: Tensor,
        weight: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scale: float,
        norm_weight: Tensor | None,
        saved: ForwardResult,
        needs_weight_grad: bool,
    ) -> tuple: ...


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class BackendInfo:
    """One row of the registry: a backend's module (implementing `Backend`), the devices and
    dtypes it takes, and whether it is built/importable here."""

    name: str
    module: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    built: Callable[[], bool]

    def load(self) -> Backend:
        return _import(self.module)


@functools.cache
def _import(module: str) -> Backend:
    return importlib.import_module(module)  # a module implementing the protocol


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
REGISTRY: dict[str, BackendInfo] = {
    "reference": BackendInfo(
        "reference", "flexigpt_kernels.ops.reference_backend", ("*",), _FLOATS + (torch.float64,), lambda: True
    ),
    "cpp": BackendInfo(
        "cpp", "flexigpt_kernels.ops.cpp_backend", ("cpu",), (torch.float32, torch.bfloat16), lambda: library.NATIVE_CPU
    ),
    "triton": BackendInfo(
        "triton", "flexigpt_kernels.ops.triton.shared_lora_linear", ("cuda", "cpu"), _FLOATS, _triton_importable
    ),
    "cuda": BackendInfo("cuda", "flexigpt_kernels.ops.cuda_backend", ("cuda",), _FLOATS, lambda: library.NATIVE_CUDA),
}

#: (device type, selection) -> candidates in order; "*" is any other device type
ROUTES: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "auto"): ("cpp", "reference"),
    ("cuda", "auto"): ("cuda", "triton", "reference"),
    ("*", "auto"): ("reference",),
    ("cpu", "cpp"): ("cpp", "reference"),  # cpp takes float32/bfloat16; the reference the rest
}


def available_backends() -> dict[str, bool]:
    """{backend name: whether it is built/importable in this installation} (devices aside)."""
    return {name: info.built() for name, info in REGISTRY.items()}


_override: str | None = None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} ({_ENV})")
    return name


def requested_backend() -> str:
    return _override or _check_name(os.environ.get(_ENV, "auto").strip().lower() or "auto")


_pushed: tuple[bool, bool, str] | None = None


def _sync_native_routes() -> None:
    """Tell the native kernels whether CPU calls resolve to "cpp" and CUDA calls to "cuda"
    under the current selection."""
    global _pushed
    env = os.environ.get(_ENV, "")
    try:
        requested = requested_backend()
    except ValueError:  # an unknown FLEXIGPT_BACKEND: let the Python path raise it on the next call
        requested = None
    routes = (
        requested in ("auto", "cpp") and library.NATIVE_CPU,
        requested in ("auto", "cuda") and library.NATIVE_CUDA,
        env,
    )
    if _pushed != routes:
        library.set_native_routes(*routes)
        _pushed = routes


class use_backend(contextlib.AbstractContextManager, contextlib.ContextDecorator):
    """`with use_backend(name):` runs the op with backend `name` inside the block (overrides
    FLEXIGPT_BACKEND; process-wide, not per thread); also a decorator."""

    def __init__(self, name: str):
        self._name = _check_name(name)
        self._previous: list[str | None] = []

    def __enter__(self) -> None:
        global _override
        self._previous.append(_override)
        _override = self._name
        _sync_native_routes()

    def __exit__(self, *exc) -> None:
        global _override
        _override = self._previous.pop()
        _sync_native_routes()


def _pick(device_type: str, dtype: torch.dtype, requested: str) -> str:
    routes = ROUTES.get((device_type, requested)) or ROUTES.get(("*", requested))
    if routes is None:  # an explicit choice without a route: that backend, checked below
        routes = (requested,)
    for name in routes:
        info = REGISTRY[name]
        takes_device = device_type in info.devices or "*" in info.devices
        if takes_device and dtype in info.dtypes:
            if info.built():
                return name
            if name == requested:  # asked for by name and it would take the call: not a fallback case
                return _refuse(name, device_type, dtype)
    return _refuse(routes[0], device_type, dtype)


def _refuse(name: str, device_type: str, dtype: torch.dtype) -> str:
    info = REGISTRY[name]
    if device_type not in info.devices and "*" not in info.devices:
        hint = {"cpp": "; for CUDA tensors use 'cuda' or 'triton'", "cuda": "; for CPU tensors use 'cpp'"}
        raise RuntimeError(f"backend {name!r} does not run on {device_type} tensors{hint.get(name, '')}")
    if dtype not in info.dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in info.dtypes)
        raise TypeError(f"backend {name!r} supports {names}, not {str(dtype).removeprefix('torch.')}")
    if name == "cpp":
        raise RuntimeError(
            "backend 'cpp' requested but the C++ extension flexigpt_kernels._C is not built: "
            "reinstall with a C++ compiler (pip install --no-build-isolation -e .)"
        )
    if name == "cuda":
        raise RuntimeError("backend 'cuda' requested but the CUDA extension flexigpt_kernels._C_cuda is not built")
    raise RuntimeError(f"backend {name!r} is not available: triton is not installed")


def resolve(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs the op on tensors of `device` and `dtype` under the current
    selection, or a clear error if the selected one cannot run there."""
    requested = requested_backend()
    name = _resolved(requested, device.type, dtype)
    if name == "triton" and device.type == "cpu" and not triton_interpreter_enabled():
        raise RuntimeError(
            "backend 'triton' got CPU tensors; set TRITON_INTERPRET=1 before importing "
            "flexigpt_kernels to run the Triton kernels in the interpreter, or use 'reference'"
        )
    return name


@functools.lru_cache(maxsize=256)
def _resolved(requested: str, device_type: str, dtype: torch.dtype) -> str:
    return _pick(device_type, dtype, requested)


def for_call(x: Tensor) -> Backend:
    """The backend module for a call with input x (the op's Python kernels use this)."""
    _sync_native_routes()
    if x.shape[0] == 0:
        return REGISTRY["reference"].load()  # nothing to compute: no kernel launch for M = 0
    return REGISTRY[resolve(x.device, x.dtype)].load()


def load(name: str) -> Backend:
    """The module implementing `Backend` for a concrete backend name."""
    return REGISTRY[name].load()


_sync_native_routes()
