"""save_pretrained / from_pretrained: shared tensors once, the sharing map, identical logits,
atomic writes, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open

from flexigpt_kernels.convert.families import decoder_layers
from flexigpt_kernels.convert.prune import stored_parameters
from flexigpt_kernels.io import FLEXIGPT_CONFIG_NAME, from_pretrained, load_tokenizer, save_pretrained
from flexigpt_kernels.io import checkpoint as checkpoint_module
from flexigpt_kernels.nn import SharedLoRALinear

from .helpers import converted, inputs, logits, one_thread, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model():
    return converted()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "model", tiny_tokenizer())


def _stored(directory) -> dict[str, tuple]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_files_written(saved):
    names = set(os.listdir(saved))
    assert {
        "model.safetensors",
        "config.json",
        FLEXIGPT_CONFIG_NAME,
        "generation_config.json",
        "tokenizer.json",
    } <= names
    assert not [n for n in os.listdir(saved.parent) if ".tmp-" in n]  # the temp dir was renamed
    config = json.loads((saved / "config.json").read_text())
    # the serving name (registered by the vLLM plugin); the Hugging Face class stays in flexigpt.json
    assert config["num_hidden_layers"] == 4 and config["architectures"] == ["FlexiGPTLlamaForCausalLM"]
    assert json.loads((saved / FLEXIGPT_CONFIG_NAME).read_text())["architectures"] == ["LlamaForCausalLM"]


def test_each_shared_tensor_stored_once(model, saved):
    stored = _stored(saved)
    # replacement blocks 1, 2 store no full weights, only adapters and output norms
    assert "model.layers.1.self_attn.q_proj.weight" not in stored
    assert "model.layers.1.self_attn.q_proj.lora_a" in stored
    assert "model.layers.2.mlp.down_proj.output_norm.weight" in stored
    # tied embeddings: once
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    numel = sum(torch.Size(s).numel() for s in stored.values())
    assert numel == stored_parameters(model)


def test_flexigpt_json_holds_meta_and_sharing_map(model, saved):
    record = json.loads((saved / FLEXIGPT_CONFIG_NAME).read_text())
    for key, value in model.flexigpt_meta.items():
        assert record[key] == value
    assert record["method"] == "flexigpt" and record["pruned"] == [1, 2]
    j = record["base_map"]["1"]
    entry = record["shared"]["model.layers.1.self_attn.q_proj"]
    assert entry["base"] == f"model.layers.{j}.self_attn.q_proj"
    assert entry["base_weight"] == f"model.layers.{j}.self_attn.q_proj.weight"
    assert entry["rank"] == 4 and entry["output_norm"] is False
    assert record["shared"]["model.layers.1.self_attn.o_proj"]["output_norm"] is True
    assert len(record["shared"]) == 2 * 7
    assert record["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_load_gives_identical_logits_and_structure(model, saved):
    loaded = from_pretrained(saved)
    ids = inputs()
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    assert not loaded.training
    assert loaded.flexigpt_meta == model.flexigpt_meta
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    assert loaded.config.architectures == ["LlamaForCausalLM"]  # not the serving name
    layers = decoder_layers(loaded)
    for i, j in model.flexigpt_meta["base_map"].items():
        shared = layers[int(i)].self_attn.q_proj
        assert isinstance(shared, SharedLoRALinear) and shared.weight is layers[j].self_attn.q_proj.weight
    assert stored_parameters(loaded) == stored_parameters(model)


def test_save_of_loaded_model_round_trips(saved, tmp_path):
    again = save_pretrained(from_pretrained(saved), tmp_path / "again")
    assert json.loads((again / FLEXIGPT_CONFIG_NAME).read_text()) == json.loads(
        (saved / FLEXIGPT_CONFIG_NAME).read_text()
    )


def test_tokenizer_round_trip(saved):
    tok = load_tokenizer(saved)
    text = "w1 w17 w99 w3"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_per_matrix_ranks_round_trip(tmp_path):
    # rank 48 is capped at 32 for k_proj / v_proj (2 kv heads x 16): ranks differ per matrix
    model = converted(rank=48)
    ranks = {m.rank for m in model.modules() if isinstance(m, SharedLoRALinear)}
    assert ranks == {32, 48}
    loaded = from_pretrained(save_pretrained(model, tmp_path / "m"))
    ids = inputs()
    assert torch.equal(logits(model, ids), logits(loaded, ids))


def test_dtype_argument(saved):
    loaded = from_pretrained(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(loaded, inputs()).float()).all()


def test_drop_checkpoint_is_plain_hugging_face(tmp_path):
    model = converted(method="drop")
    path = save_pretrained(model, tmp_path / "drop")
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["architectures"] == ["LlamaForCausalLM"]
    record = json.loads((path / FLEXIGPT_CONFIG_NAME).read_text())
    assert record["method"] == "drop" and record["pruned"] == [1, 2]
    assert record["base_model_config"]["num_hidden_layers"] == 4  # the unpruned model's config
    stock = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = inputs()
    assert torch.equal(logits(model, ids), logits(stock, ids))
    assert torch.equal(logits(model, ids), logits(from_pretrained(path), ids))
    assert stock.lm_head.weight is stock.model.embed_tokens.weight


def test_refuses_non_empty_directory(model, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=str(target)):
        save_pretrained(model, target)
    with pytest.raises(FileExistsError, match="did not write.*keep.txt"):  # not a folder of ours
        save_pretrained(model, target, overwrite=True)
    assert os.listdir(target) == ["keep.txt"]
    (target / "keep.txt").unlink()
    save_pretrained(model, target)
    save_pretrained(model, target, overwrite=True)  # a checkpoint of ours: replaced
    assert "model.safetensors" in os.listdir(target)
    assert sorted(os.listdir(tmp_path)) == ["busy"]  # no temp or old dirs left behind


def test_empty_existing_directory_is_fine(model, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "flexigpt.json" in os.listdir(save_pretrained(model, tmp_path / "empty"))


def test_failed_write_leaves_nothing(model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_tensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_missing_flexigpt_json_is_a_clear_error(tmp_path):
    save_pretrained(converted(method="drop"), tmp_path / "m")
    (tmp_path / "m" / FLEXIGPT_CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no flexigpt.json.*AutoModelForCausalLM"):
        from_pretrained(tmp_path / "m")


def test_unknown_format_version_is_a_clear_error(saved, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    record = json.loads((copy / FLEXIGPT_CONFIG_NAME).read_text())
    record["format_version"] = 99
    (copy / FLEXIGPT_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="unknown format_version 99"):
        from_pretrained(copy)


def test_tensors_that_do_not_fit_are_refused(saved, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    record = json.loads((copy / FLEXIGPT_CONFIG_NAME).read_text())
    record["output_norm"] = False  # the rebuilt model then lacks the stored gammas
    record["output_norms"] = {}
    for spec in record["shared"].values():
        spec["output_norm"] = False
    (copy / FLEXIGPT_CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not fit the rebuilt model.*unexpected.*output_norm"):
        from_pretrained(copy)


def test_models_without_prune_metadata(tmp_path):
    from flexigpt_kernels.convert.replacement import convert_blocks

    from .helpers import tiny_model

    plain = tiny_model()
    loaded = from_pretrained(save_pretrained(plain, tmp_path / "plain"))
    assert loaded.flexigpt_meta["method"] == "none" and loaded.flexigpt_meta["base_map"] == {}
    ids = inputs()
    assert torch.equal(logits(plain, ids), logits(loaded, ids))

    by_hand = tiny_model()
    convert_blocks(by_hand, {1: 0}, rank=4)  # no prune(), so no flexigpt_meta
    loaded = from_pretrained(save_pretrained(by_hand, tmp_path / "by_hand"))
    assert loaded.flexigpt_meta["method"] == "flexigpt" and loaded.flexigpt_meta["base_map"] == {"1": 0}
    assert loaded.flexigpt_meta["output_norm"] is True and loaded.flexigpt_meta["rank"] == 4
    assert torch.equal(logits(by_hand, ids), logits(loaded, ids))
