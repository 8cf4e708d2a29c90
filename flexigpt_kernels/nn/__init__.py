"""nn.Modules built on the fused ops."""

from .output_norm import DEFAULT_GAMMA_INIT, OutputNorm
from .shared_lora_linear import SharedLoRALinear

__all__ = ["DEFAULT_GAMMA_INIT", "OutputNorm", "SharedLoRALinear"]
