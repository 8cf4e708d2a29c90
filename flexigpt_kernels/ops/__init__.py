"""Functional ops on tensors. Each op has a plain-PyTorch reference in reference.py."""

from .backends import use_backend
from .reference import shared_lora_linear_reference, unfused_peft_style
from .shared_lora_linear import shared_lora_linear

__all__ = ["shared_lora_linear", "shared_lora_linear_reference", "unfused_peft_style", "use_backend"]
