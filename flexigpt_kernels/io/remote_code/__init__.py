"""The custom-code files that :func:`flexigpt_kernels.save_pretrained` copies into a checkpoint.

``configuration_flexigpt.py`` and ``modeling_flexigpt.py`` are ordinary modules of this package
(imported and tested here) and, copied verbatim beside ``config.json``, the Hugging Face
"custom code" of a checkpoint: ``config.json["auto_map"]`` names their classes, so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

builds the correct model with only torch and transformers installed. They import nothing from
flexigpt_kernels except, optionally, the fused op (see modeling_flexigpt).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .configuration_flexigpt import CONFIG_CLASSES, PREFIX, flexigpt_model_type

__all__ = [
    "CONFIG_CLASSES",
    "REMOTE_CODE_FILES",
    "auto_map",
    "copy_remote_code",
    "flexigpt_model_type",
    "hf_config_dict",
    "write_custom_model",
]

#: the files copied into a checkpoint, as named in config.json's auto_map
REMOTE_CODE_FILES = ("configuration_flexigpt.py", "modeling_flexigpt.py")


def auto_map(hf_model_type: str, model_class: str) -> dict[str, str] | None:
    """config.json's ``auto_map`` for a model of `hf_model_type` whose custom class is
    `model_class` (e.g. "FlexiGPTLlamaForCausalLM"); None when no custom class covers the type."""
    config_class = CONFIG_CLASSES.get(hf_model_type)
    if config_class is None:
        return None
    return {
        "AutoConfig": f"configuration_flexigpt.{config_class.__name__}",
        "AutoModelForCausalLM": f"modeling_flexigpt.{model_class}",
    }


def copy_remote_code(directory: Path) -> None:
    """Copy the custom-code files into `directory` (byte for byte)."""
    here = Path(__file__).parent
    for name in REMOTE_CODE_FILES:
        (Path(directory) / name).write_bytes((here / name).read_bytes())


def write_custom_model(directory: Path, *, hf_model_type: str, model_class: str, spec: dict[str, Any]) -> bool:
    """Turn the Hugging Face config.json in `directory` into a FlexiGPT one: ``model_type``
    "flexigpt_<hf_model_type>", ``architectures`` [model_class], ``flexigpt`` = spec (see
    configuration_flexigpt) and, when a custom class covers the type, ``auto_map`` plus the
    custom-code files. Returns whether the custom code was written."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["model_type"] = flexigpt_model_type(hf_model_type)
    config["architectures"] = [model_class]
    config["flexigpt"] = spec
    mapping = auto_map(hf_model_type, model_class)
    if mapping is not None:
        config["auto_map"] = mapping
        copy_remote_code(directory)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return mapping is not None


def hf_config_dict(config: dict[str, Any], hf_model_type: str) -> dict[str, Any]:
    """The source family's config dict inside a FlexiGPT config.json (model_type restored,
    auto_map and the flexigpt spec removed); a plain config dict is returned unchanged."""
    if not str(config.get("model_type", "")).startswith(PREFIX):
        return config
    out = {k: v for k, v in config.items() if k not in ("auto_map", "flexigpt")}
    out["model_type"] = hf_model_type
    return out
