"""The `flexigpt` operator library: where its ops' schemas and native kernels come from.

With the C++ extension built, `flexigpt_kernels/_C*.so` declares the schemas
(TORCH_LIBRARY(flexigpt) in csrc/bindings.cpp) and registers the CPU kernels; it is loaded
here once with `torch.ops.load_library` (it is not a Python module). Without it, the same
schemas are declared from Python below, so `torch.ops.flexigpt.*` exists either way and
every caller (the public function, the vLLM layer, compiled graphs) uses the same names.

Python adds to the ops, whichever side declared them (ops/shared_lora_linear.py, stacked.py,
epilogue.py): fake kernels, autograd, and a CompositeExplicitAutograd kernel that runs the backend the registry
(ops/backends.py) resolves, for every device without a native kernel.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NAMESPACE = "flexigpt"

_FWD_ARGS = (
    "(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, "
    "Tensor? norm_weight, float eps, Tensor? residual, bool save_for_backward) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_ARGS = (
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
    "Tensor? norm_weight, Tensor shrink, Tensor y_pre, Tensor mean, Tensor rstd, "
    "bool needs_weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_STACKED_FWD_ARGS = (
    "(Tensor x, Tensor weight, Tensor[] lora_as, Tensor[] lora_bs, float[] scales, Tensor? bias) -> (Tensor, Tensor)"
)
_STACKED_BWD_ARGS = (
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor[] lora_as, Tensor[] lora_bs, float[] scales, "
    "Tensor shrink, bool needs_weight_grad) -> (Tensor, Tensor, Tensor, Tensor[], Tensor)"
)
_EPILOGUE_FWD_ARGS = (
    "(Tensor y0, Tensor x, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, Tensor? norm_weight, "
    "float eps, Tensor? residual, bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_EPILOGUE_BWD_ARGS = (
    "(Tensor grad_out, Tensor x, Tensor lora_a, Tensor lora_b, float scale, Tensor? norm_weight, "
    "Tensor shrink, Tensor y_pre, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

#: op name -> schema (the same text as csrc/bindings.cpp, stacked.cpp, epilogue.cpp; tests/ops
#: compare the two). The _py twins carry a public op's arguments from the C++ CPU kernel to
#: the Python backends.
SCHEMAS = {}
for _op, _fwd, _bwd in (
    ("shared_lora_linear", _FWD_ARGS, _BWD_ARGS),
    ("shared_lora_linear_stacked", _STACKED_FWD_ARGS, _STACKED_BWD_ARGS),
    ("shared_lora_linear_epilogue", _EPILOGUE_FWD_ARGS, _EPILOGUE_BWD_ARGS),
):
    SCHEMAS.update({f"{_op}_fwd": _fwd, f"{_op}_bwd": _bwd, f"_{_op}_fwd_py": _fwd, f"_{_op}_bwd_py": _bwd})
#: in place, inference only: y += the stacked parts' adapters (csrc/stacked.cpp, ops/stacked.py)
SCHEMAS["shared_lora_linear_stacked_delta_"] = (
    "(Tensor(a!) y, Tensor x, Tensor[] lora_as, Tensor[] lora_bs, float[] scales, Tensor? bias) -> ()"
)


def _load_native(stem: str, without: str) -> bool:
    """Load flexigpt_kernels/<stem>*.so once; False when it is absent or unusable."""
    package = Path(__file__).resolve().parent.parent
    for path in sorted(package.glob(f"{stem}.*so")) + sorted(package.glob(f"{stem}.*pyd")):
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:  # built against another torch, no CUDA runtime...
            logger.warning("flexigpt_kernels: cannot load %s (%s); %s", path.name, exc, without)
            return False
        return True
    logger.info("flexigpt_kernels.%s is not built; %s", stem, without)
    return False


#: whether the C++ library is loaded (it declares the schemas; its CPU kernels serve CPU calls)
NATIVE_CPU: bool = _load_native("_C", "the CPU path uses the PyTorch reference")
#: whether the CUDA library is loaded (csrc/cuda: the decode kernel, under the CUDA dispatch key);
#: it registers on the schemas of _C, so it is only loaded after it
NATIVE_CUDA: bool = (
    NATIVE_CPU and torch.version.cuda is not None and _load_native("_C_cuda", "CUDA tensors use the Triton kernels")
)

#: the library object through which Python registers its kernels (kept alive for the process)
lib = torch.library.Library(NAMESPACE, "FRAGMENT")

if not NATIVE_CPU:
    for _name, _args in SCHEMAS.items():
        lib.define(_name + _args)


def register_python(name: str, kernel, fake, backward, setup_context) -> None:
    """Python's part of the op pair `name`_fwd / `name`_bwd and of their _py twins (whichever
    side declared them): `kernel[0/1]` runs the Python backends for every device without a
    native kernel (and for the calls the C++ CPU kernel hands to the twins), `fake[0/1]` are
    the fake kernels, `backward`/`setup_context` the forward's autograd."""
    for i, kind in enumerate(("fwd", "bwd")):
        for op_name in (f"{name}_{kind}", f"_{name}_{kind}_py"):
            lib.impl(op_name, kernel[i], "CompositeExplicitAutograd")
            # _stacklevel: the caller (the module the C++ schema names with set_python_module)
            torch.library.register_fake(f"{NAMESPACE}::{op_name}", fake[i], lib=lib, _stacklevel=2)
    torch.library.register_autograd(f"{NAMESPACE}::{name}_fwd", backward, setup_context=setup_context, lib=lib)


_below_autograd = torch._C._AutoDispatchBelowAutograd
_any_requires_grad = torch._C._any_requires_grad


def call_forward(fwd: torch._ops.OpOverload, tensors: tuple, *args):
    """fwd(*args, save_for_backward)[0], where save_for_backward says whether autograd needs the
    forward's intermediates (grad enabled and one of `tensors` requires grad); when nothing
    does, below the autograd kernel (it would only redispatch). Traced: plain Python."""
    if torch.compiler.is_compiling():
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return fwd(*args, save)[0]
    if torch.is_grad_enabled() and _any_requires_grad(*tensors):
        return fwd(*args, True)[0]
    with _below_autograd():
        return fwd(*args, False)[0]


def op(name: str) -> torch._ops.OpOverload:
    """The default overload of torch.ops.flexigpt.<name>."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def set_native_routes(cpu: bool, cuda: bool, env: str) -> None:
    """Tell the native kernels whether they run the op (the selection resolves to "cpp" on CPU
    tensors, to "cuda" on CUDA tensors), for the given FLEXIGPT_BACKEND value."""
    if NATIVE_CPU:
        torch.ops.flexigpt._set_native_routes(cpu, env)
    if NATIVE_CUDA:
        torch.ops.flexigpt._set_cuda_routes(cuda, env)
