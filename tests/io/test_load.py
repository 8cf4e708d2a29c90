"""io.load_model / locate_model / resolve_data: every kind of source, and every bad one named."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.io import load_model, resolve_data, save_pretrained
from flexigpt_kernels.io.load import locate_model, looks_like_path

from .helpers import converted, inputs, logits, one_thread, tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("load")
    with one_thread():
        dense = tiny_model()
        dense.save_pretrained(d / "hf")
        flex = converted()
        save_pretrained(flex, d / "flex")
    (d / "empty").mkdir()
    (d / "file.bin").write_bytes(b"x")
    return d, dense, flex


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_each_kind_loads_to_the_same_logits(folders):
    d, dense, flex = folders
    with one_thread():
        hf = load_model(d / "hf", dtype="float32")
        assert (hf.kind, hf.source, hf.tokenizer) == ("huggingface", str((d / "hf").resolve()), None)
        assert not hf.model.training
        torch.testing.assert_close(logits(hf.model, inputs()), logits(dense, inputs()), rtol=0, atol=0)
        ours = load_model(str(d / "flex"))
        assert ours.kind == "flexigpt" and ours.model.flexigpt_meta["method"] == "flexigpt"
        torch.testing.assert_close(logits(ours.model, inputs()), logits(flex, inputs()), rtol=0, atol=0)
        half = load_model(d / "flex", dtype=torch.bfloat16)
        assert next(half.model.parameters()).dtype == torch.bfloat16


def test_locate_names_every_bad_source(folders, offline):
    d, _, _ = folders
    assert locate_model(None) == locate_model("default") == ("default", "default")
    assert locate_model(d / "hf")[0] == "huggingface" and locate_model(d / "flex")[0] == "flexigpt"
    with pytest.raises(FileNotFoundError, match="does not exist") as exc:
        locate_model("/nonexistent/model")
    assert "hub" not in str(exc.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate_model("pruned/")  # a trailing slash is a path, not a hub id
    with pytest.raises(NotADirectoryError, match="is a file"):
        locate_model(d / "file.bin")
    with pytest.raises(ValueError, match="not a model folder"):
        locate_model(d / "empty")
    with pytest.raises(ValueError, match="dense source"):
        locate_model(d / "flex", allow_converted=False)
    with pytest.raises(FileNotFoundError, match="offline"):
        locate_model("someorg/some-model")
    with pytest.raises(ValueError, match="empty"):
        locate_model("  ")
    with pytest.raises(ValueError, match="dtype"):
        load_model(d / "hf", dtype="int8")


def test_path_or_hub_id():
    assert not looks_like_path("gpt2") and not looks_like_path("org/name")
    for p in ("/abs", "./rel", "../up", "~/home", "dir/", "a/b/c", "with space"):
        assert looks_like_path(p), p


def test_damaged_weights_are_a_value_error(folders, tmp_path):
    import shutil

    d, _, _ = folders
    broken = tmp_path / "broken"
    shutil.copytree(d / "flex", broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="weights file cannot be read"):
        load_model(broken)


def test_resolve_data(tmp_path, offline):
    from flexigpt_kernels.assets import default_texts

    assert resolve_data(None, "heldout") == resolve_data("default", "heldout") == default_texts("heldout")
    texts, tokens = ["a b c"], torch.zeros(2, 4, dtype=torch.long)
    assert resolve_data(texts) is texts and resolve_data(tokens) is tokens
    good = tmp_path / "good.txt"
    good.write_text("some words\n")
    assert resolve_data(good) == str(good)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jsonl").write_text('{"text": "x"}\n')
    assert resolve_data(tmp_path / "folder") == str(tmp_path / "folder")
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "t.csv").write_text("a\n")
    (tmp_path / "none").mkdir()
    cases = [
        ("", ValueError, "empty"),
        ("/nonexistent/x.txt", FileNotFoundError, "does not exist"),
        (str(tmp_path / "empty.txt"), ValueError, "no text"),
        (str(tmp_path / "t.csv"), ValueError, ".csv"),
        (str(tmp_path / "none"), ValueError, "no .json"),
        ("org/data", FileNotFoundError, "offline"),
    ]
    for source, kind, words in cases:
        with pytest.raises(kind, match=words) as exc:
            resolve_data(source, what="calib")
        assert str(exc.value).startswith("calib: "), exc.value


def test_one_no_init_weights_helper():
    import flexigpt_kernels.assets as assets
    import flexigpt_kernels.io.checkpoint as checkpoint

    assert not hasattr(assets, "_no_init_weights") and not hasattr(checkpoint, "_no_init")
    from flexigpt_kernels.io.load import no_init_weights

    with no_init_weights():
        pass


def test_unreachable_dataset_name_is_named(monkeypatch):
    import datasets

    def unreachable(name, config=None, **kw):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    with pytest.raises(FileNotFoundError, match="data: 'org/data' is not a local file.*Couldn't reach"):
        resolve_data("org/data")
