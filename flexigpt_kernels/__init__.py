"""flexigpt_kernels: fused kernels and tools for LLMs pruned (or extended) with FlexiGPT's
low-rank weight sharing."""

from .nn import OutputNorm, SharedLoRALinear
from .ops import shared_lora_linear, shared_lora_linear_reference, use_backend

__version__ = "0.1.0"

__all__ = ["OutputNorm", "SharedLoRALinear", "shared_lora_linear", "shared_lora_linear_reference",
           "use_backend", "__version__"]
