"""flexigpt_kernels: fused kernels and tools for LLMs pruned (or extended) with FlexiGPT's
low-rank weight sharing.

The op and the modules import eagerly; the model-level tools (prune, save/load, healing,
generation, evaluation) import on first use so that `import flexigpt_kernels` stays light.
"""

from __future__ import annotations

import importlib

from .nn import OutputNorm, SharedLoRALinear
from .ops import shared_lora_linear, shared_lora_linear_reference, use_backend
from .ops.epilogue import shared_lora_linear_epilogue
from .ops.stacked import shared_lora_linear_stacked

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, see __getattr__)
_LAZY = {
    "prune": "flexigpt_kernels.convert.prune",
    "PruneReport": "flexigpt_kernels.convert.prune",
    "extend": "flexigpt_kernels.convert.extend",
    "ExtendReport": "flexigpt_kernels.convert.extend",
    "save_pretrained": "flexigpt_kernels.io",
    "from_pretrained": "flexigpt_kernels.io",
    "load_tokenizer": "flexigpt_kernels.io",
    "export_dense": "flexigpt_kernels.io",
    "perplexity": "flexigpt_kernels.eval",
    "evaluate_tasks": "flexigpt_kernels.eval",
    "HealReport": "flexigpt_kernels.train",
    "heal": "flexigpt_kernels.train",
    "generate": "flexigpt_kernels.generation",
    "GenerationStats": "flexigpt_kernels.generation",
    "Preset": "flexigpt_kernels.presets",
    "RECIPE": "flexigpt_kernels.presets",
    "PAPER": "flexigpt_kernels.presets",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flexigpt_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "OutputNorm",
    "SharedLoRALinear",
    "shared_lora_linear",
    "shared_lora_linear_reference",
    "shared_lora_linear_epilogue",
    "shared_lora_linear_stacked",
    "use_backend",
    "__version__",
    *_LAZY,
]
