"""Checks of flexigpt.json, done before anything is built from it.

A checkpoint folder is data from wherever the user got it, so its manifest is validated, and
every failure is a ValueError naming the file and the field:

1. :func:`parse_manifest` / :func:`validate_manifest`: the JSON against ``flexigpt.schema.json``
   (shipped beside this module; the format's description), then what a schema cannot say:
   every number finite, ``base_map`` positions distinct from their bases and not themselves
   replaced.
2. :func:`check_against_config`: ``base_map`` / ``pruned`` positions inside the model that
   config.json builds (``0 <= i < num_hidden_layers``), adapter ranks at most its hidden size
   (every block linear has hidden_size on one side, so no rank beyond it is ever saved; a
   larger one would only allocate memory).
3. :func:`check_aliases`: ``aliases`` ties only parameters that the architecture itself ties
   (the input/output embeddings with ``tie_word_embeddings``), so a manifest cannot make two
   unrelated parameters one.
4. :func:`check_shapes`: every stored tensor has the shape the rebuilt model expects.
5. :func:`torch_dtype`: dtype names from an explicit allow-list (never ``getattr(torch, ...)``).

The schema is interpreted here for the keywords it uses (type, enum, required, properties,
additionalProperties, propertyNames, items, minItems, minimum, exclusiveMinimum, pattern), with
JSON Schema's meaning: an "integer" or "number" is never a boolean; an integer is never a float
(3.7 and 3.0 alike are refused where an index belongs).
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["DTYPES", "SCHEMA_PATH", "check_against_config", "check_aliases", "check_shapes", "parse_manifest",
           "torch_dtype", "validate_manifest"]

SCHEMA_PATH = Path(__file__).with_name("flexigpt.schema.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The JSON Schema of flexigpt.json (flexigpt_kernels/io/flexigpt.schema.json)."""
    return json.loads(SCHEMA_PATH.read_text())


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def _errors(value: Any, rule: Mapping[str, Any], where: str):
    """Yield (field, problem) for each way `value` breaks `rule` (the schema subset above)."""
    types = rule.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in types):
            yield where, f"expected {' or '.join(types)}, got {_describe(value)}"
            return
    if "enum" in rule and value not in rule["enum"]:
        yield where, f"expected one of {rule['enum']}, got {_describe(value)}"
        return
    if _TYPES["number"](value):
        if "minimum" in rule and value < rule["minimum"]:
            yield where, f"must be >= {rule['minimum']}, got {value}"
        if "exclusiveMinimum" in rule and not value > rule["exclusiveMinimum"]:
            yield where, f"must be > {rule['exclusiveMinimum']}, got {value}"
    if isinstance(value, str) and "pattern" in rule and not re.search(rule["pattern"], value):
        yield where, f"{value!r} is not of the form {rule['pattern']}"
    if isinstance(value, list):
        if len(value) < rule.get("minItems", 0):
            yield where, f"expected at least {rule['minItems']} items, got {len(value)}"
        if "items" in rule:
            for i, item in enumerate(value):
                yield from _errors(item, rule["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        for key in rule.get("required", ()):
            if key not in value:
                yield f"{where}.{key}" if where else key, "missing"
        props, extra = rule.get("properties", {}), rule.get("additionalProperties", True)
        for key, item in value.items():
            field = f"{where}[{key!r}]" if where and key not in props else (f"{where}.{key}" if where else key)
            if "propertyNames" in rule:
                for _, problem in _errors(key, rule["propertyNames"], field):
                    yield field, f"key {problem}"
            if key in props:
                yield from _errors(item, props[key], field)
            elif extra is False:
                yield field, "unknown field"
            elif isinstance(extra, dict):
                yield from _errors(item, extra, field)


def _numbers(value: Any, where: str):
    """Yield (field, value) for every non-finite number in `value`."""
    if isinstance(value, float) and not math.isfinite(value):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}[{i}]")


def _fail(path, field: str, problem: str):
    raise ValueError(f"{path}: {field}: {problem}")


def parse_manifest(path: str | Path) -> dict[str, Any]:
    """flexigpt.json as a dict; ValueError when it is not a JSON object."""
    try:
        record = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def validate_manifest(record: dict[str, Any], path: str | Path) -> None:
    """Raise ValueError (naming `path` and the field) unless `record` is a well-formed manifest."""
    for field, problem in _errors(record, schema(), ""):
        _fail(path, field, problem)
    for field, value in _numbers({k: v for k, v in record.items() if k != "base_model_config"}, ""):
        _fail(path, field, f"must be a finite number, got {value}")
    base_map = {int(k): v for k, v in record["base_map"].items()}
    for pos, base in base_map.items():
        if pos == base:
            _fail(path, f"base_map[{str(pos)!r}]", "a block cannot share its own weights")
        if base in base_map:
            _fail(path, f"base_map[{str(pos)!r}]", f"its base {base} is itself a replacement block")
    if record["method"] in ("drop", "none") and base_map:
        _fail(path, "base_map", f"method {record['method']!r} has no replacement blocks, got {record['base_map']}")


def check_against_config(record: dict[str, Any], path: str | Path, config) -> None:
    """base_map positions (and, for method "flexigpt", `pruned`) inside 0..num_layers-1 of the
    Hugging Face `config`; shared-linear ranks <= its hidden size."""
    text = config.get_text_config(decoder=True)
    num_layers, hidden = text.num_hidden_layers, text.hidden_size
    for key, base in record["base_map"].items():
        for what, i in (("key", int(key)), ("value", base)):
            if not 0 <= i < num_layers:
                _fail(path, f"base_map[{key!r}]", f"{what} {i} is not a block of the model "
                      f"(config.json has {num_layers} layers: 0..{num_layers - 1})")
    if record["method"] == "flexigpt":
        bad = [i for i in record.get("pruned", []) if i >= num_layers]
        if bad:
            _fail(path, "pruned", f"{bad} past the last block ({num_layers - 1})")
    for name, spec in record["shared"].items():
        if spec["rank"] > hidden:
            _fail(path, f"shared[{name!r}].rank", f"{spec['rank']} exceeds the hidden size {hidden}")


def check_aliases(model: torch.nn.Module, record: dict[str, Any], path: str | Path) -> None:
    """Each alias must be a tie the architecture itself makes (input/output embeddings)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # transformers < 5: the embeddings, when the config ties them
        tied = {}
        text = model.config.get_text_config(decoder=True)
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if getattr(text, "tie_word_embeddings", False) and out_emb is not None and in_emb is not None:
            names = {id(m): n for n, m in model.named_modules()}
            tied = {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}
    for alias, source in record["aliases"].items():
        if dict(tied).get(alias) != source:
            _fail(path, f"aliases[{alias!r}]", f"ties {alias} to {source}, which the architecture does not tie "
                  f"(allowed: {dict(tied) or 'none, config.json does not tie weights'})")


def check_shapes(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Every stored tensor with the shape of the rebuilt model's tensor of that name."""
    expected = model.state_dict()
    wrong = [f"{k}: stored {tuple(v.shape)}, the model has {tuple(expected[k].shape)}"
             for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError(f"{path}: tensors of the wrong shape for the rebuilt model: {'; '.join(wrong[:4])}"
                         f"{f' and {len(wrong) - 4} more' if len(wrong) > 4 else ''}")


def torch_dtype(name: Any, field: str = "dtype", path: str | Path | None = None) -> torch.dtype:
    """The torch dtype of an allowed name ("float32", "torch.float16", ...); ValueError otherwise."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    key = name.removeprefix("torch.") if isinstance(name, str) else None
    if key not in DTYPES:
        raise ValueError(f"{f'{path}: ' if path else ''}{field}: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]
