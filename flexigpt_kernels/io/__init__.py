"""Saving, loading and exporting converted models (docs/design.md section 4).

- :func:`save_pretrained` / :func:`from_pretrained`: a checkpoint that stores each shared tensor
  once plus ``flexigpt.json`` (method, blocks, base map, the sharing map), reloaded to
  identical logits; :func:`load_tokenizer` reads the tokenizer saved beside it.
- :func:`export_dense`: a plain Hugging Face checkpoint (W_base + s B A per replacement linear)
  for engines that know nothing of sharing; refused for models with output norms.
- :func:`load_model`: "default", a checkpoint folder, a Hugging Face folder or a hub id, one
  way; :func:`resolve_data`: "default" or a checked file / folder / dataset name for text.
"""

from .checkpoint import (
    FLEXIGPT_CONFIG_NAME,
    FORMAT_VERSION,
    from_pretrained,
    load_tokenizer,
    read_flexigpt_config,
    save_pretrained,
    sharing_map,
)
from .export import dense_state_dict, export_dense
from .load import LoadedModel, load_model, resolve_data

__all__ = [
    "FLEXIGPT_CONFIG_NAME",
    "LoadedModel",
    "FORMAT_VERSION",
    "dense_state_dict",
    "export_dense",
    "from_pretrained",
    "load_model",
    "load_tokenizer",
    "read_flexigpt_config",
    "save_pretrained",
    "resolve_data",
    "sharing_map",
]
