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

The schema is applied with the ``jsonschema`` library (the draft its ``$schema`` names), with
one change: an "integer" is never a float (JSON Schema counts 3.0 as one; here 3.7 and 3.0
alike are refused where an index belongs). An "integer" or "number" is never a boolean. Of
several problems, the one :func:`jsonschema.exceptions.best_match` picks is reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import torch

__all__ = [
    "DTYPES",
    "SCHEMA_PATH",
    "check_against_config",
    "check_aliases",
    "check_shapes",
    "parse_manifest",
    "torch_dtype",
    "validate_manifest",
]

SCHEMA_PATH = Path(__file__).with_name("flexigpt.schema.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The JSON Schema of flexigpt.json (flexigpt_kernels/io/flexigpt.schema.json)."""
    return json.loads(SCHEMA_PATH.read_text())


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    """A validator of :func:`schema` (its declared draft) whose "integer" is never a float: JSON
    Schema counts 3.0 as an integer, but a block index written as 3.0 is a damaged file."""
    base = jsonschema.validators.validator_for(schema())
    base.check_schema(schema())
    strict = base.TYPE_CHECKER.redefine("integer", lambda checker, v: isinstance(v, int) and not isinstance(v, bool))
    return jsonschema.validators.extend(base, type_checker=strict)(schema())


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def _field(path, rule: Mapping[str, Any]) -> str:
    """`path` (keys and indices from the top of the manifest) as text: a field the schema names
    is .name, an entry of a mapping is ['key'], an item of a list is [i]."""
    text = ""
    for key in path:
        if isinstance(key, int):
            text, rule = f"{text}[{key}]", rule.get("items", {})
        elif key in rule.get("properties", {}):
            text, rule = f"{text}.{key}" if text else key, rule["properties"][key]
        else:
            extra = rule.get("additionalProperties")
            text, rule = f"{text}[{key!r}]" if text else key, extra if isinstance(extra, dict) else {}
    return text


# how a failed keyword reads: {rule} is the keyword's value in the schema, {value} the field's
_PROBLEMS = {
    "type": "expected {types}, got {described}",
    "enum": "expected one of {rule}, got {described}",
    "minimum": "must be >= {rule}, got {value}",
    "exclusiveMinimum": "must be > {rule}, got {value}",
    "minItems": "expected at least {rule} items, got {count}",
    "pattern": "{value!r} is not of the form {rule}",
}


def _problem(error: jsonschema.ValidationError) -> tuple[list, str]:
    """(path to the field, what is wrong with it) for one jsonschema error."""
    path, value, rule, kind = list(error.absolute_path), error.instance, error.validator_value, error.validator
    if kind == "required":
        return [*path, next(k for k in rule if k not in value)], "missing"
    if kind == "additionalProperties" and rule is False:
        known = error.schema.get("properties", {})
        return [*path, next(k for k in value if k not in known)], "unknown field"
    problem = error.message
    if kind in _PROBLEMS:
        types = " or ".join(rule) if kind == "type" and isinstance(rule, list) else rule
        count = len(value) if isinstance(value, (list, dict, str)) else None
        problem = _PROBLEMS[kind].format(rule=rule, value=value, described=_describe(value), types=types, count=count)
    if "propertyNames" in error.absolute_schema_path:  # `value` is a key of the object at `path`
        return [*path, value], f"key {problem}"
    return path, problem


def _numbers(value: Any, where: list):
    """Yield (path, value) for every non-finite number in `value` (JSON Schema has no word for
    NaN or Infinity, which Python's json module reads)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, [*where, k])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, [*where, i])


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
    error = jsonschema.exceptions.best_match(_validator().iter_errors(record))
    if error is not None:
        where, problem = _problem(error)
        _fail(path, _field(where, schema()), problem)
    for where, value in _numbers({k: v for k, v in record.items() if k != "base_model_config"}, []):
        _fail(path, _field(where, schema()), f"must be a finite number, got {value}")
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
                _fail(
                    path,
                    f"base_map[{key!r}]",
                    f"{what} {i} is not a block of the model "
                    f"(config.json has {num_layers} layers: 0..{num_layers - 1})",
                )
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
            _fail(
                path,
                f"aliases[{alias!r}]",
                f"ties {alias} to {source}, which the architecture does not tie "
                f"(allowed: {dict(tied) or 'none, config.json does not tie weights'})",
            )


def check_shapes(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Every stored tensor with the shape of the rebuilt model's tensor of that name."""
    expected = model.state_dict()
    wrong = [
        f"{k}: stored {tuple(v.shape)}, the model has {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(
            f"{path}: tensors of the wrong shape for the rebuilt model: {'; '.join(wrong[:4])}"
            f"{f' and {len(wrong) - 4} more' if len(wrong) > 4 else ''}"
        )


def torch_dtype(name: Any, field: str = "dtype", path: str | Path | None = None) -> torch.dtype:
    """The torch dtype of an allowed name ("float32", "torch.float16", ...); ValueError otherwise."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    key = name.removeprefix("torch.") if isinstance(name, str) else None
    if key not in DTYPES:
        raise ValueError(f"{f'{path}: ' if path else ''}{field}: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[key]
