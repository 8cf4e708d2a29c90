"""Recovery training (heal), LoRA baselines and the FlexiGPT vs ShortGPT + LoRA comparison."""

from .heal import HealReport, heal, lm_loss
from .lora import LoRALinear, add_lora, lora_parameter_count, merge_lora
from .params import TRAINABLE_SETS, count_parameters, select_trainable

__all__ = [
    "HealReport",
    "LoRALinear",
    "TRAINABLE_SETS",
    "add_lora",
    "count_parameters",
    "heal",
    "lm_loss",
    "lora_parameter_count",
    "merge_lora",
    "select_trainable",
]
