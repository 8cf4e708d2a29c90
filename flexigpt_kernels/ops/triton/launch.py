"""The one place every Triton kernel of this backend is launched from.

    launch(kernel, grid, *args, **kwargs)

- Device guard: Triton launches on the *current* CUDA device, not the tensors'. Tensors on
  cuda:1 while the current device is 0 (multi-GPU, `device_map="auto"`) would run on the wrong
  device; every launch enters `torch.cuda.device(<the first tensor argument's device>)`.
- torch.library: traced (fake or functional tensors, inside a `triton_op`), the kernel goes
  through `torch.library.wrap_triton`, so torch.compile sees the kernel itself; an interpreted
  kernel cannot be traced and nothing is launched (the outputs are already allocated with their
  shapes). Eager calls launch directly (the traceable wrapper costs about a millisecond).
- Recording: `recording()` swaps the launch for a stand-in that stores (kernel, grid, args,
  kwargs) instead of running anything. `aot_check.py` runs the real launchers under it to collect
  the exact specialisations they produce (so its compile list cannot drift from the code).
- fp32 precision: `fp32_uses_tf32()` reads torch's new API
  (`torch.backends.cuda.matmul.fp32_precision`, default "none" -> IEEE). Reading the legacy
  `allow_tf32` raises on torch 2.13 once a user has set the new API, so it is never read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def fp32_uses_tf32() -> bool:
    """Whether fp32 products may use TF32 tensor cores: only when the user asked for it with
    `torch.backends.cuda.matmul.fp32_precision = "tf32"` (or the global
    `torch.backends.fp32_precision`, which "none" at the matmul level inherits)."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def ieee_f32(dtype: torch.dtype) -> bool:
    """The IEEE_F32 kernel flag: fp32 inputs multiplied in full fp32 (the default)."""
    return dtype in (torch.float32, torch.float64) and not fp32_uses_tf32()


def kernel_device(args) -> torch.device | None:
    """The device of the first tensor argument (the one the launch must run on)."""
    for a in args:
        if isinstance(a, Tensor):
            return a.device
    return None


def device_guard(device: torch.device | None):
    """`torch.cuda.device(device)` for a CUDA device, else a no-op context."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _is_fake(args) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return any(
        isinstance(a, Tensor) and (a.device.type == "meta" or isinstance(a, FunctionalTensor) or is_fake(a))
        for a in args
    )


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - older triton
        return False
    return isinstance(kernel, InterpretedFunction)


@dataclass
class Launch:
    """One recorded launch: the kernel object, the grid and the arguments as passed."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", repr(fn))


_recorder: list | None = None


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Within the block, launches are appended to the yielded list instead of running."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def launch(kernel: Callable, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on the tensors' device (see the module docstring)."""
    if _recorder is not None:
        _recorder.append(Launch(kernel, tuple(grid), args, dict(kwargs)))
        return
    if _is_fake(args):  # traced (the fake implementation, or a triton_op decomposition)
        if _is_interpreted(kernel):
            return  # shapes only: the caller allocated the outputs
        from torch.library import wrap_triton

        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    with device_guard(kernel_device(args)):
        kernel[grid](*args, **kwargs)
