"""Conversion utilities: calibration data, block importance, block selection, base choice,
and the model-family table (docs/method.md sections 1-3)."""

from .base_selection import COMBINE_MODES, BaseChoice, choose_bases
from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, token_batches
from .families import (
    FAMILIES,
    SUPPORTED_MODEL_TYPES,
    Family,
    decoder_layers,
    family_of,
    linear_names,
    num_layers,
)
from .importance import block_influence
from .lowrank import Factors, lowrank_distance, truncated_svd
from .selection import num_blocks_to_prune, select_blocks

__all__ = [
    "BaseChoice",
    "COMBINE_MODES",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "FAMILIES",
    "Factors",
    "Family",
    "SUPPORTED_MODEL_TYPES",
    "block_influence",
    "choose_bases",
    "decoder_layers",
    "family_of",
    "linear_names",
    "lowrank_distance",
    "num_blocks_to_prune",
    "num_layers",
    "select_blocks",
    "token_batches",
    "truncated_svd",
]
