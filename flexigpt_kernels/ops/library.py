"""The `flexigpt` operator library: where its ops' schemas and native kernels come from.

With the C++ extension built, `flexigpt_kernels/_C*.so` declares the schemas
(TORCH_LIBRARY(flexigpt) in csrc/bindings.cpp) and registers the CPU kernels; it is loaded
here once with `torch.ops.load_library` (it is not a Python module). Without it, the same
schemas are declared from Python below, so `torch.ops.flexigpt.*` exists either way and
every caller (the public function, the vLLM layer, compiled graphs) uses the same names.

Python adds to the ops, whichever side declared them (ops/shared_lora_linear.py): fake
kernels, autograd, and a CompositeExplicitAutograd kernel that runs the backend the registry
(ops/backends.py) resolves, for every device without a native kernel.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NAMESPACE = "flexigpt"

_FWD_ARGS = ("(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, Tensor? bias, "
             "Tensor? norm_weight, float eps, Tensor? residual, bool save_for_backward) "
             "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_BWD_ARGS = ("(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
             "Tensor? norm_weight, Tensor shrink, Tensor y_pre, Tensor mean, Tensor rstd, "
             "bool needs_weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

#: op name -> schema (the same text as csrc/bindings.cpp; tests/ops compare the two).
#: The _py twins carry a public op's arguments from the C++ CPU kernel to the Python backends.
SCHEMAS = {
    "shared_lora_linear_fwd": _FWD_ARGS,
    "shared_lora_linear_bwd": _BWD_ARGS,
    "_shared_lora_linear_fwd_py": _FWD_ARGS,
    "_shared_lora_linear_bwd_py": _BWD_ARGS,
}


def _load_native() -> bool:
    """Load the C++ library (flexigpt_kernels/_C*.so) once; False when it is absent or unusable."""
    package = Path(__file__).resolve().parent.parent
    for path in sorted(package.glob("_C.*so")) + sorted(package.glob("_C.*pyd")):
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:  # built against another torch, missing symbols...
            logger.warning("flexigpt_kernels: cannot load %s (%s); the CPU path uses the PyTorch reference",
                           path.name, exc)
            return False
        return True
    logger.info("flexigpt_kernels._C is not built; the CPU path uses the PyTorch reference")
    return False


#: whether the C++ library is loaded (its CPU kernels serve the ops' CPU calls)
NATIVE_CPU: bool = _load_native()

#: the library object through which Python registers its kernels (kept alive for the process)
lib = torch.library.Library(NAMESPACE, "FRAGMENT")

if not NATIVE_CPU:
    for _name, _args in SCHEMAS.items():
        lib.define(_name + _args)


def op(name: str) -> torch._ops.OpOverload:
    """The default overload of torch.ops.flexigpt.<name>."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def set_native_routes(cpu: bool, env: str) -> None:
    """Tell the C++ CPU kernels whether they run the op (the selected backend is "cpp"), for the
    given FLEXIGPT_BACKEND value. No-op without the C++ library."""
    if NATIVE_CPU:
        torch.ops.flexigpt._set_native_routes(cpu, env)
