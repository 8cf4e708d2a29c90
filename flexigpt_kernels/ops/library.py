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

#: op name -> schema (the same text as csrc/bindings.cpp; tests/ops compare the two).
#: The _py twins carry a public op's arguments from the C++ CPU kernel to the Python backends.
SCHEMAS = {
    "shared_lora_linear_fwd": _FWD_ARGS,
    "shared_lora_linear_bwd": _BWD_ARGS,
    "_shared_lora_linear_fwd_py": _FWD_ARGS,
    "_shared_lora_linear_bwd_py": _BWD_ARGS,
}


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
