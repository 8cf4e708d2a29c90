"""flexigpt.json is validated before anything is built from it: every malformed or hostile
field is a ValueError naming the file and the field (never a silent wrong model, never a raw
KeyError / IndexError / RuntimeError)."""

from __future__ import annotations

import json
import math
import shutil

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file

from flexigpt_kernels.convert.extend import extend
from flexigpt_kernels.io import FLEXIGPT_CONFIG_NAME, from_pretrained, read_flexigpt_config, save_pretrained
from flexigpt_kernels.io.manifest import SCHEMA_PATH, schema, torch_dtype, validate_manifest

from .helpers import converted, inputs, llama_config, logits, one_thread, tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_pretrained(converted(), tmp_path_factory.mktemp("ckpt") / "model")


def _edited(saved, tmp_path, edit):
    """A copy of the checkpoint whose flexigpt.json went through edit(record)."""
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    path = copy / FLEXIGPT_CONFIG_NAME
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))  # NaN / Infinity written as JSON allows Python to read back
    return copy


def _set(key, value):
    def edit(record):
        record[key] = value

    return edit


def _set_base(pos, value):
    def edit(record):
        record["base_map"][pos] = value

    return edit


def _shared(field, value):
    def edit(record):
        first = next(iter(record["shared"].values()))
        if value is KeyError:
            del first[field]
        else:
            first[field] = value

    return edit


def _delete(key):
    def edit(record):
        del record[key]

    return edit


BAD = {
    # aliases: only the architecture's own tie (lm_head <- embed_tokens) is allowed
    "alias-two-layers": (
        lambda r: r["aliases"].update(
            {"model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.o_proj.weight"}
        ),
        r"aliases\['model.layers.0.self_attn.q_proj.weight'\].*does not tie",
    ),
    "alias-not-a-string": (lambda r: r["aliases"].update({"lm_head.weight": 3}), r"aliases\['lm_head.weight'\]"),
    # base_map values: non-negative ints inside the model, no floats, no bools
    "base-float": (_set_base("1", 3.7), r"base_map\['1'\]: expected integer"),
    "base-float-whole": (_set_base("1", 3.0), r"base_map\['1'\]: expected integer"),
    "base-bool": (_set_base("1", True), r"base_map\['1'\]: expected integer"),
    "base-negative": (_set_base("1", -1), r"base_map\['1'\]: must be >= 0"),
    "base-past-the-end": (_set_base("1", 9), r"base_map\['1'\]: value 9 is not a block"),
    "base-itself": (_set_base("1", 1), r"base_map\['1'\]: a block cannot share its own"),
    "base-replaced": (_set_base("1", 2), r"base_map\['1'\]: its base 2 is itself a replacement"),
    "base-key-negative": (_set_base("-1", 0), r"base_map\['-1'\]: key"),
    "base-key-past-the-end": (_set_base("7", 0), r"base_map\['7'\]: key 7 is not a block"),
    "base-map-a-list": (_set("base_map", [[1, 3]]), "base_map: expected object"),
    # dtype from an allow-list
    "dtype-not-a-dtype": (_set("dtype", "Tensor"), "dtype: expected one of"),
    "dtype-not-float": (_set("dtype", "int8"), "dtype: expected one of"),
    # wrong types and missing keys
    "shared-a-list": (_set("shared", []), "shared: expected object"),
    "shared-missing": (_delete("shared"), "shared: missing"),
    "aliases-missing": (_delete("aliases"), "aliases: missing"),
    "shared-rank-string": (_shared("rank", "4"), r"shared\['model.layers.1.self_attn.q_proj'\].rank: expected integer"),
    "shared-rank-zero": (_shared("rank", 0), r"\.rank: must be >= 1"),
    "shared-rank-huge": (_shared("rank", 10**12), r"\.rank: 1000000000000 exceeds the hidden size 64"),
    "shared-own-bias-missing": (_shared("own_bias", KeyError), r"own_bias: missing"),
    "shared-unknown-field": (_shared("code", "import os"), r"\['code'\]: unknown field"),
    "shared-scale-nan": (_shared("scale", math.nan), r"\.scale: must be a finite number"),
    "eps-inf": (
        lambda r: r["output_norms"].update({next(iter(r["output_norms"])): math.inf}),
        r"output_norms.*must be a finite number",
    ),
    "eps-negative": (
        lambda r: r["output_norms"].update({next(iter(r["output_norms"])): -1e-5}),
        r"output_norms.*must be > 0",
    ),
    "method-unknown": (_set("method", "magic"), "method: expected one of"),
    "architectures-not-a-name": (_set("architectures", ["os.system"]), r"architectures\[0\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_manifest_is_a_value_error_naming_the_file_and_field(saved, tmp_path, case):
    edit, message = BAD[case]
    copy = _edited(saved, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        from_pretrained(copy)
    assert str(copy / FLEXIGPT_CONFIG_NAME) in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_a_manifest_that_is_not_a_json_object(saved, tmp_path, text):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    (copy / FLEXIGPT_CONFIG_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="flexigpt.json: (not valid JSON|expected a JSON object)"):
        read_flexigpt_config(copy)


def test_an_alias_on_an_untied_model_is_refused(tmp_path):
    model = converted(output_norm=False, config=llama_config(tie_word_embeddings=False))
    out = save_pretrained(model, tmp_path / "untied")
    record = json.loads((out / FLEXIGPT_CONFIG_NAME).read_text())
    assert record["aliases"] == {}
    record["aliases"] = {"lm_head.weight": "model.embed_tokens.weight"}
    (out / FLEXIGPT_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"aliases\['lm_head.weight'\].*does not tie"):
        from_pretrained(out)


def test_a_tensor_of_the_wrong_shape_is_a_value_error(saved, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.lora_a"
    tensors[name] = torch.zeros(5, tensors[name].shape[1])
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(ValueError, match=f"model.safetensors: tensors of the wrong shape.*{name}: stored \\(5, 64\\)"):
        from_pretrained(copy)


def test_every_method_writes_a_manifest_the_schema_accepts(tmp_path):
    models = {
        "flexigpt": converted(),
        "drop": converted(method="drop"),
        "extend": extend(tiny_model(), "1:3")[0],
        "none": tiny_model(),
    }
    for name, model in models.items():
        out = save_pretrained(model, tmp_path / name)
        record = read_flexigpt_config(out)
        assert record["method"] == name
        validate_manifest(record, out)
        ids = inputs()
        torch.testing.assert_close(logits(from_pretrained(out), ids), logits(model, ids), atol=1e-5, rtol=0)


def test_the_schema_describes_every_field_written(saved):
    record = json.loads((saved / FLEXIGPT_CONFIG_NAME).read_text())
    assert SCHEMA_PATH.is_file() and set(record) <= set(schema()["properties"])


def test_dtype_argument_from_the_allow_list(saved):
    assert torch_dtype("torch.float16") is torch.float16 and torch_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="dtype: expected one of"):
        from_pretrained(saved, dtype="Tensor")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        torch_dtype(torch.int8)


def test_the_schema_is_valid_json_schema_of_its_draft():
    validator = jsonschema.validators.validator_for(schema())
    assert validator.META_SCHEMA["$id"].startswith(schema()["$schema"].rstrip("#"))
    validator.check_schema(schema())


def test_several_faults_report_one_field_and_a_nested_non_finite_number(saved):
    record = read_flexigpt_config(saved)
    record.update(method="magic", aliases=3)
    with pytest.raises(ValueError, match=r"flexigpt.json: (method|aliases): expected"):
        validate_manifest(record, saved / FLEXIGPT_CONFIG_NAME)
    record = read_flexigpt_config(saved)
    record["local_fit"] = {"errors": [1.0, math.nan]}
    with pytest.raises(ValueError, match=r"local_fit\['errors'\]\[1\]: must be a finite number, got nan"):
        validate_manifest(record, saved / FLEXIGPT_CONFIG_NAME)
