"""Save and load converted models: each shared tensor stored once, the sharing map beside it.

Pruned ("flexigpt", "drop") and extended ("extend") models alike: every replacement block is
marked by ``block.flexigpt_base`` and listed in ``base_map``. A checkpoint directory holds

- ``model.safetensors``: the model's state dict. Replacement linears (SharedLoRALinear) hold
  their base weight by an unregistered reference, so a shared weight appears once, under the
  block that owns it; tied tensors (input/output embeddings) are stored once under the first
  name and listed in ``flexigpt.json["aliases"]``.
- ``config.json``: the Hugging Face config of the converted model (for "flexigpt" the layer
  count is unchanged; for "drop" it is the reduced count, for "extend" the grown one; a
  "drop" directory is a plain Hugging Face checkpoint that stock
  ``AutoModelForCausalLM.from_pretrained`` loads). A model with replacement blocks
  ("flexigpt", "extend") is a custom architecture (format 2): ``model_type``
  ``"flexigpt_" + the family's`` (``flexigpt_llama``: stock transformers refuses it instead of
  building a plain model with random blocks), ``architectures`` ``"FlexiGPT" + its class``
  (``FlexiGPTLlamaForCausalLM``: the class the vLLM plugin registers and the custom code
  defines), ``auto_map`` naming ``configuration_flexigpt.py`` / ``modeling_flexigpt.py``
  (copied from ``io/remote_code``, so ``AutoModelForCausalLM.from_pretrained(DIR,
  trust_remote_code=True)`` builds the correct model without this package), and ``flexigpt``,
  the rebuild spec the custom code reads (base_map, blocks, shared, output_norms).
- ``flexigpt.json``: ``model.flexigpt_meta`` (format_version, method, family, pruned blocks,
  base_map, rank, scale, norm settings) plus what rebuilding needs::

      "shared":  {"model.layers.3.self_attn.q_proj":
                     {"base": "model.layers.4.self_attn.q_proj",
                      "base_weight": "model.layers.4.self_attn.q_proj.weight",
                      "rank": 4, "scale": 1.0, "own_bias": false, "output_norm": true}, ...}
      "output_norms": {"model.layers.3.self_attn.o_proj.output_norm": 1e-05, ...}   # name -> eps
      "aliases": {"lm_head.weight": "model.embed_tokens.weight"}
      "dtype": "float32"
      "architectures": ["LlamaForCausalLM"]       # the Hugging Face class
      "hf_model_type": "llama"                    # the family's model_type (format 2)
      "card": {...}                               # model.flexigpt_card: what README.md reports

- ``README.md``: the model card (:mod:`flexigpt_kernels.io.model_card`).
- ``generation_config.json`` when the model has one, and the tokenizer files when given.

Format 1 (config.json the plain Hugging Face one, no hf_model_type) still loads: it is
migrated on reading, and saving the loaded model writes format 2.

Loading builds the architecture from config.json (the family's Hugging Face config, FlexiGPT's
model_type, auto_map and spec removed; ``from_config`` with weight initialisation skipped; the
custom code is never run), re-creates the replacement blocks from the base map (no SVD: the
adapters are loaded), loads the state dict strictly and checks the rebuilt sharing map equals
the stored one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convert.families import family_of, num_layers
from ..convert.replacement import convert_blocks, replacement_blocks
from ..nn import OutputNorm, SharedLoRALinear
from ._write import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_directory,
    dominant_dtype,
    model_class,
    save_tensors,
    write_hf_files,
)
from .load import no_init_weights
from .manifest import check_against_config, check_aliases, check_shapes, parse_manifest, torch_dtype, validate_manifest
from .model_card import write_model_card
from .remote_code import hf_config_dict, write_custom_model

__all__ = [
    "read_flexigpt_config",
    "read_manifest",
    "FLEXIGPT_CONFIG_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "from_pretrained",
    "load_tokenizer",
    "save_pretrained",
    "serving_architecture",
    "sharing_map",
]

FLEXIGPT_CONFIG_NAME = "flexigpt.json"
# 2: config.json names model_type "flexigpt_<family>" (+ auto_map, custom code, "flexigpt" spec)
# and flexigpt.json records "hf_model_type"; 1: config.json was the plain Hugging Face one
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
# keys of flexigpt.json written by this module (not part of model.flexigpt_meta)
_IO_KEYS = ("shared", "output_norms", "aliases", "dtype", "architectures", "hf_model_type", "card")
SERVING_PREFIX = "FlexiGPT"


def serving_architecture(hf_architecture: str) -> str:
    """The architecture name config.json gives a model with replacement blocks:
    "LlamaForCausalLM" -> "FlexiGPTLlamaForCausalLM" (what serving plugins register)."""
    return SERVING_PREFIX + hf_architecture


#: The Hugging Face families whose FlexiGPT checkpoints the vLLM plugin serves natively
#: (integrations/vllm registers one model class per name; the model card says which).
VLLM_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _write_custom_model(directory: Path, model: nn.Module, shared: dict, output_norms: dict) -> None:
    """config.json of a model with replacement blocks: its own model_type, the serving
    architecture name, the rebuild spec, auto_map and the custom code (io/remote_code)."""
    names = {id(m): n for n, m in model.named_modules()}
    blocks = {names[id(b)]: int(b.flexigpt_base) for b in replacement_blocks(model).values()}
    spec = {
        "format_version": FORMAT_VERSION,
        "base_map": {str(k): v for k, v in sorted(_base_map(model).items())},
        "blocks": blocks,
        "shared": shared,
        "output_norms": output_norms,
    }
    write_custom_model(
        directory,
        hf_model_type=model.config.model_type,
        model_class=serving_architecture(model_class(model).__name__),
        spec=spec,
    )


def _migrate(record: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """flexigpt.json of any supported format_version as the current one. Format 1 kept the
    plain Hugging Face config.json, so its model_type is the source family's."""
    record = dict(record)
    if record.get("format_version") == 1:
        record["hf_model_type"] = config.get("model_type")
        record["format_version"] = 2
    return record


def sharing_map(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{replacement linear name: {"base", "base_weight", "rank", "scale", "own_bias",
    "output_norm"}} for every SharedLoRALinear of `model`, names as in its state dict."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, SharedLoRALinear):
            continue
        base_name = names.get(id(module.base))
        if base_name is None:
            raise ValueError(f"{name}: its base linear is not a submodule of the model, so it cannot be saved")
        out[name] = {
            "base": base_name,
            "base_weight": f"{base_name}.weight",
            "rank": module.rank,
            "scale": module.scale,
            "own_bias": module.bias is not None,
            "output_norm": module.output_norm is not None,
        }
    return out


def _base_map(model: nn.Module) -> dict[int, int]:
    """{position: base position} of the replacement blocks (pruned or extended models)."""
    return {i: int(b.flexigpt_base) for i, b in replacement_blocks(model).items()}


def _derived_meta(model: nn.Module, shared: dict, output_norms: dict) -> dict[str, Any]:
    """flexigpt_meta for a model without one (converted by convert_blocks / drop_blocks directly,
    or never converted: method "none")."""
    base_map = _base_map(model)
    first = next(iter(shared.values()), None)
    return {
        "format_version": FORMAT_VERSION,
        "method": "flexigpt" if base_map else "none",
        "family": family_of(model).name,
        "num_blocks": num_layers(model),
        "pruned": sorted(base_map),
        "base_map": {str(k): v for k, v in sorted(base_map.items())},
        "rank": max((s["rank"] for s in shared.values()), default=None),
        "scale": first["scale"] if first else None,
        "output_norm": bool(output_norms),
        "gamma_init": None,
        "norm_eps": next(iter(output_norms.values()), None),
    }


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    *,
    overwrite: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (converted by prune(), or a plain supported model) to `directory`.

    Writes model.safetensors (each shared or tied tensor once), config.json, flexigpt.json,
    generation_config.json when present and the tokenizer when given (see the module doc).
    Refuses an existing non-empty `directory` unless overwrite=True; writes into a temporary
    directory beside it and renames it into place. Returns the directory's path.
    `state_dict` replaces model.state_dict() (a model sharded with FSDP2: pass
    train.shard.full_state_dict(model), gathered by every process, and save on one).
    """
    output_norms = {n: float(m.eps) for n, m in model.named_modules() if isinstance(m, OutputNorm)}
    shared = sharing_map(model)
    meta = dict(getattr(model, "flexigpt_meta", None) or _derived_meta(model, shared, output_norms))
    version = meta.get("format_version", FORMAT_VERSION)
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"model.flexigpt_meta has format_version {version!r}; this version writes {SUPPORTED_FORMAT_VERSIONS}"
        )
    meta["format_version"] = FORMAT_VERSION  # what is written is always the current format
    base_map = _base_map(model)
    if {int(k): int(v) for k, v in meta.get("base_map", {}).items()} != base_map:
        raise ValueError(
            f"model.flexigpt_meta['base_map'] {meta.get('base_map')} disagrees with the model's "
            f"replacement blocks {base_map}"
        )
    if state_dict is None:
        state_dict = model.state_dict()
    dtype = dominant_dtype(state_dict.values())
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        aliases = save_tensors(state_dict, tmp / WEIGHTS_NAME)
        write_hf_files(tmp, model, dtype, tokenizer)
        hf_architecture = model_class(model).__name__
        if base_map:
            _write_custom_model(tmp, model, shared, output_norms)
        record = {
            **meta,
            "shared": shared,
            "output_norms": output_norms,
            "aliases": aliases,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "architectures": [hf_architecture],
            "hf_model_type": model.config.model_type,
            "card": dict(getattr(model, "flexigpt_card", None) or {}),
        }
        (tmp / FLEXIGPT_CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        write_model_card(tmp, record, model, name=Path(directory).name)
    return Path(directory)


def read_flexigpt_config(directory: str | os.PathLike) -> dict[str, Any]:
    """flexigpt.json of a checkpoint directory, its format version checked and its content validated
    (see .manifest): ValueError naming the file and the field. An older format is migrated to
    the current one."""
    path = Path(directory) / FLEXIGPT_CONFIG_NAME
    if not path.is_file():
        hint = ""
        if (Path(directory) / CONFIG_NAME).is_file():
            hint = (
                " (it looks like a plain Hugging Face checkpoint: load it with "
                "transformers.AutoModelForCausalLM.from_pretrained)"
            )
        raise FileNotFoundError(f"{directory}: no {FLEXIGPT_CONFIG_NAME}, so not a flexigpt_kernels checkpoint{hint}")
    record = read_manifest(path)
    config_path = Path(directory) / CONFIG_NAME
    return _migrate(record, json.loads(config_path.read_text()) if config_path.is_file() else {})


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The flexigpt.json file `path` as written (not migrated), its format version checked and
    its content validated (see .manifest): ValueError naming the file and the field."""
    record = parse_manifest(path)
    version = record.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{path}: unknown format_version {version!r}; this flexigpt_kernels reads format_version "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))} (a newer release may read it)"
        )
    validate_manifest(record, path)
    return record


def _resize_adapter(module: SharedLoRALinear, rank: int) -> None:
    w = module.lora_a
    module.lora_a = nn.Parameter(torch.empty(rank, module.in_features, device=w.device, dtype=w.dtype))
    module.lora_b = nn.Parameter(torch.empty(module.out_features, rank, device=w.device, dtype=w.dtype))
    module.rank = rank


def _rebuild(model: nn.Module, record: dict[str, Any]) -> None:
    """Re-create the replacement blocks of `record` in a freshly built model."""
    base_map = {int(k): int(v) for k, v in record.get("base_map", {}).items()}
    shared = record.get("shared", {})
    if not base_map:
        if shared:
            raise ValueError(f"{FLEXIGPT_CONFIG_NAME}: shared linears {sorted(shared)[:3]}... but an empty base_map")
        return
    ranks = [int(s["rank"]) for s in shared.values()]
    convert_blocks(
        model,
        base_map,
        rank=max(ranks) if ranks else int(record["rank"]),
        scale=float(record.get("scale") or 1.0),
        output_norm=bool(record.get("output_norm")),
        norm_eps=float(record.get("norm_eps") or 1e-5),
        svd_init=False,
    )
    modules = dict(model.named_modules())
    for name, spec in shared.items():
        module = modules.get(name)
        if not isinstance(module, SharedLoRALinear):
            raise ValueError(
                f"{FLEXIGPT_CONFIG_NAME}: {name} is a shared linear, but the rebuilt model has "
                f"{type(module).__name__ if module is not None else 'no such module'}"
            )
        if module.rank != spec["rank"]:
            _resize_adapter(module, int(spec["rank"]))
        module.scale = float(spec["scale"])
        if spec["own_bias"] and module.bias is None:
            module.bias = nn.Parameter(
                torch.empty(module.out_features, device=module.weight.device, dtype=module.weight.dtype)
            )
        elif not spec["own_bias"] and module.bias is not None:
            module.bias = None
    for name, eps in record.get("output_norms", {}).items():
        norm = modules.get(name)
        if not isinstance(norm, OutputNorm):
            raise ValueError(f"{FLEXIGPT_CONFIG_NAME}: {name} is an output norm, but the rebuilt model lacks it")
        norm.eps = float(eps)
    rebuilt = sharing_map(model)
    if rebuilt != shared:
        diff = sorted(k for k in set(rebuilt) | set(shared) if rebuilt.get(k) != shared.get(k))
        raise ValueError(f"{FLEXIGPT_CONFIG_NAME}: the rebuilt sharing map differs from the stored one at {diff[:5]}")


def _retie(model: nn.Module, alias: str, source: str) -> None:
    """Make parameter `alias` the very tensor `source` (as it was when saved)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if alias not in params or source not in params:
        raise ValueError(f"checkpoint aliases {alias} -> {source}, but the rebuilt model lacks one of them")
    if params[alias] is not params[source]:
        owner_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, params[source])


def _hf_config(directory: Path, record: dict[str, Any]):
    """The source family's Hugging Face config of a checkpoint (config.json without FlexiGPT's
    model_type, auto_map and spec): built here, no custom code is run."""
    from transformers import CONFIG_MAPPING

    hf_type = record.get("hf_model_type")
    if hf_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{directory / FLEXIGPT_CONFIG_NAME}: hf_model_type {hf_type!r} is unknown to this transformers"
        )
    return CONFIG_MAPPING[hf_type].from_dict(hf_config_dict(json.loads((directory / CONFIG_NAME).read_text()), hf_type))


def from_pretrained(
    directory: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained`, in eval mode, with
    ``model.flexigpt_meta`` restored. dtype: default the stored one; device: default CPU.

    Raises FileNotFoundError when flexigpt.json is missing, ValueError when its format_version
    is unknown or the stored tensors do not fit the rebuilt model exactly.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    record = read_flexigpt_config(directory)
    config = _hf_config(directory, record)
    if dtype is not None:
        dtype = torch_dtype(dtype, "dtype")
    if dtype is None and record.get("dtype"):
        dtype = torch_dtype(record["dtype"], "dtype", directory / FLEXIGPT_CONFIG_NAME)
    check_against_config(record, directory / FLEXIGPT_CONFIG_NAME, config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if record.get("architectures"):
        config.architectures = list(record["architectures"])  # the Hugging Face class, not the serving name
    with device, no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _rebuild(model, record)
    check_aliases(model, record, directory / FLEXIGPT_CONFIG_NAME)
    state_dict = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    aliases = record.get("aliases", {})
    for alias, source in aliases.items():
        _retie(model, alias, source)
        if source in state_dict:  # else reported as missing below
            state_dict.setdefault(alias, state_dict[source])
    check_shapes(model, state_dict, directory / WEIGHTS_NAME)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} does not fit the rebuilt model: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.flexigpt_meta = {k: v for k, v in record.items() if k not in _IO_KEYS}
    model.flexigpt_card = dict(record.get("card") or {})
    from transformers import GenerationConfig

    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved beside a checkpoint (transformers.AutoTokenizer; the checkpoint's
    custom code is never run)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    config = None
    if (directory / FLEXIGPT_CONFIG_NAME).is_file() and (directory / CONFIG_NAME).is_file():
        config = _hf_config(directory, read_flexigpt_config(directory))
    return AutoTokenizer.from_pretrained(directory, config=config, trust_remote_code=False)
