"""The model card (README.md) written into every checkpoint: the Hub's metadata block (parsed by
huggingface_hub), the facts it states against the model, its round trip through flexigpt.json,
the prune job's perplexities and `flexigpt heal`'s record."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

import flexigpt_kernels as fk
from flexigpt_kernels.cli import main
from flexigpt_kernels.convert.prune import stored_parameters
from flexigpt_kernels.io import from_pretrained, save_pretrained
from flexigpt_kernels.io.model_card import add_healing, pruned_source_parameters, set_card_info
from flexigpt_kernels.prune_job import run_prune_job
from tests.eval.helpers import byte_tokenizer
from tests.eval.helpers import tiny_model as family_tiny_model

from .helpers import converted, one_thread, tiny_model, tiny_tokenizer
from .test_remote_code import family_model

SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
PPL = {"dense": 10.0, "flexigpt": 12.5, "drop": 20.25}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _card(path) -> tuple[dict, str]:
    card = ModelCard((path / "README.md").read_text())
    return card.data.to_dict(), card.text


def test_card_metadata_and_facts(tmp_path):
    model = converted()
    set_card_info(model, perplexity=PPL, perplexity_setup="40 windows of 256 tokens", source=SOURCE)
    path = save_pretrained(model, tmp_path / "my-pruned", tiny_tokenizer())
    meta, text = _card(path)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == SOURCE
    assert {"flexigpt", "pruned", "custom_code"} <= set(meta["tags"])
    base_map = model.flexigpt_meta["base_map"]
    groups = {}
    for k, v in sorted(base_map.items()):
        groups.setdefault(v, []).append(k)
    for row in (
        f"| source model | {SOURCE} |",
        "| method | flexigpt |",
        "| decoder blocks | 4 (2 pruned) |",
        "| pruned blocks | 1, 2 |",
        "| adapter rank | 4 |",
        f"| stored parameters | {stored_parameters(model):,} "
        f"({100 * stored_parameters(model) / stored_parameters(tiny_model()):.1f}% of the source's "
        f"{stored_parameters(tiny_model()):,}) |",
        "| dense | 10.00 |",
        "| flexigpt | 12.50 |",
        "| drop | 20.25 |",
        "40 windows of 256 tokens",
    ):
        assert row in text, row
    assert all(f"{'/'.join(ks)} -> {b}" in text for b, ks in groups.items())
    for line in (
        'fk.from_pretrained("my-pruned")',
        'from_pretrained("my-pruned", trust_remote_code=True)',
        'LLM(model="my-pruned")',
        f"flexigpt_kernels {fk.__version__}",
    ):
        assert line in text, line
    assert "## Healing" not in text


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2", "opt"])
def test_source_parameters_of_a_pruned_model_are_the_dense_models(model_type):
    kw = {"ffn_dim": 64, "word_embed_proj_dim": 32} if model_type == "opt" else {}
    dense = family_tiny_model(model_type, layers=4, hidden=32, **kw)
    assert pruned_source_parameters(family_model(model_type)) == stored_parameters(dense)


def test_card_round_trips_and_records_healing(tmp_path):
    model = converted()
    set_card_info(model, perplexity=PPL, source=SOURCE)
    first = save_pretrained(model, tmp_path / "a")
    loaded = from_pretrained(first)
    assert loaded.flexigpt_card == json.loads((first / "flexigpt.json").read_text())["card"]
    assert loaded.flexigpt_card["perplexity"] == PPL
    report = {
        "steps": 3,
        "tokens_seen": 192,
        "trainable": "adapters",
        "trainable_params": 1234,
        "lr": 0.01,
        "losses": [2.0, 1.75, 1.5],
        "eval_perplexities": [[0, 30.0], [3, 25.5]],
        "data": "train.txt",
    }
    add_healing(loaded, report)
    healed = save_pretrained(loaded, tmp_path / "b")
    _, text = _card(healed)
    assert "## Perplexity when it was made (before healing)" in text and "| flexigpt | 12.50 |" in text
    assert (
        "| 1 | train.txt | - | 3 | 192 | adapters | 1,234 | 0.01 | 2.0000 -> 1.5000 | step 0: 30.00, step 3: 25.50 |"
        in text
    )
    add_healing(loaded, {**report, "losses": [float("nan")], "eval_perplexities": [[0, float("inf")]]})  # diverged
    diverged = save_pretrained(loaded, tmp_path / "diverged")
    assert "| 2 | train.txt | - | 3 | 192 | adapters | 1,234 | 0.01 | - -> - | step 0: - |" in _card(diverged)[1]
    assert from_pretrained(diverged).flexigpt_card["healing"][1]["eval_perplexities"] == [[0, None]]
    again = from_pretrained(healed)
    add_healing(again, {**report, "steps": 5})
    _, text = _card(save_pretrained(again, tmp_path / "c"))
    assert "| 2 | train.txt | - | 5 |" in text


def test_drop_and_extend_cards(tmp_path):
    drop = save_pretrained(converted(method="drop"), tmp_path / "dropped")
    meta, text = _card(drop)
    assert "custom_code" not in meta["tags"] and "trust_remote_code" not in text
    assert 'AutoModelForCausalLM.from_pretrained("dropped")' in text and 'LLM(model="dropped")' in text
    ext = save_pretrained(family_model("gemma2", method="extend"), tmp_path / "extended")
    meta, text = _card(ext)
    assert {"extended", "custom_code"} <= set(meta["tags"]) and "| method | extend |" in text
    assert "| decoder blocks | 4 -> 6 |" in text
    assert "LLM(model=" not in text and "does not serve this family" in text  # no vLLM plugin class for Gemma 2


@pytest.mark.slow
def test_prune_job_and_heal_command_fill_the_card(tmp_path, capsys):
    words = "the cat sat on the mat and the dog sat on the log while rain fell on the plain".split()
    texts = [" ".join(words[i:] + words[:i]) * 3 for i in range(len(words))]
    model = family_tiny_model("llama", layers=4, hidden=32)
    dense_params = stored_parameters(model)
    pruned = tmp_path / "pruned"
    summary = run_prune_job(
        model,
        byte_tokenizer(),
        texts[:8],
        texts[8:],
        blocks=[1, 2],
        rank=4,
        out=str(pruned),
        seq_len=32,
        num_samples=4,
        eval_chunks=2,
        progress=False,
    )
    _, text = _card(pruned)
    for k, v in summary["perplexity"].items():
        assert f"| {k} | {v:.2f} |" in text
    assert f"of the source's {dense_params:,})" in text and "2 held-out windows of 32 tokens" in text
    train = tmp_path / "train.txt"
    train.write_text("\n".join(texts * 4) + "\n")
    healed = tmp_path / "healed"
    assert (
        main(
            [
                "heal",
                str(pruned),
                "--data",
                str(train),
                "--out",
                str(healed),
                "--steps",
                "2",
                "--seq-len",
                "32",
                "--batch-size",
                "2",
                "--trainable",
                "adapters",
                "--json",
            ]
        )
        == 0
    )
    capsys.readouterr()
    _, text = _card(healed)
    assert "## Healing (`flexigpt heal`)" in text and f"| 1 | {train} | - | 2 | 128 | adapters |" in text
    assert "(before healing)" in text and f"of the source's {dense_params:,})" in text
