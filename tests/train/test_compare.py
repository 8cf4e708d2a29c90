"""The FlexiGPT vs ShortGPT + LoRA comparison on a tiny model: same blocks, matched trainable
parameters, same token budgets (block-local fit tokens included), the lr sweep then the
further seed at each method's best lr, and the CSV / Markdown outputs."""

from __future__ import annotations

import csv

import pytest

from flexigpt_kernels.convert.local_fit import LocalFit
from flexigpt_kernels.train.compare import COLUMNS, FlexiGPTRecipe, compare_recovery, write_results

from .helpers import byte_tokenizer, tiny_llama

TRAIN = ["the cat sat on the mat and the dog sat on the log"] * 40
HELD = ["rain in spain falls mainly on the plain, said the dog"] * 10
TINY = dict(ratio=0.5, rank=4, seq_len=32, batch_size=2, eval_chunks=4, calib_samples=4, train_texts=TRAIN,
            heldout_texts=HELD, progress=False, log=lambda *a: None)


def test_compare_recovery_on_a_tiny_model(tmp_path):
    recipe = FlexiGPTRecipe(local_fit=LocalFit(steps=2), fit_samples=2, adapter_share=0.5)
    saved = []
    result = compare_recovery(tokens=[4 * 2 * 32, 6 * 2 * 32], lrs=(1e-2, 3e-2), seeds=(0, 1), recipe=recipe,
                              model=tiny_llama(vocab=257), tokenizer=byte_tokenizer(),
                              on_row=lambda r: saved.append(len(r["rows"])), **TINY)
    rows = result["rows"]
    assert {r["method"] for r in rows} == {"dense", "flexigpt", "flexigpt_paper", "shortgpt_lora"}
    runs = [r for r in rows if r["method"] != "dense"]
    # per budget: 3 methods x 2 lrs on seed 0, then 3 methods on seed 1 at their best lr
    assert len(runs) == 2 * (3 * 2 + 3) and saved == list(range(2, 2 + len(runs)))
    target = result["meta"]["budget_params"]
    for r in runs:
        assert abs(r["trainable_params"] - target) <= 0.05 * target, r
        assert r["tokens"] <= r["budget"], r
    for budget in (4 * 2 * 32, 6 * 2 * 32):
        for method in ("flexigpt", "flexigpt_paper", "shortgpt_lora"):
            first = [r for r in runs if (r["budget"], r["method"], r["seed"]) == (budget, method, 0)]
            second = [r for r in runs if (r["budget"], r["method"], r["seed"]) == (budget, method, 1)]
            assert len(first) == 2 and len(second) == 1
            assert second[0]["lr"] == min(first, key=lambda r: r["ppl_after"])["lr"]
    flex = [r for r in runs if r["method"] == "flexigpt"]
    # the fit recorded 2 sequences of 32 tokens; the heal then had the rest of the budget
    assert all(r["tokens"] == r["budget"] for r in runs if r["method"] != "flexigpt")
    assert all(r["tokens"] == r["budget"] for r in flex)  # 64 fit tokens = exactly one step of 2 x 32
    assert "LoRA rank" in flex[0]["options"] and "activation adapters" in flex[0]["options"]
    csv_path, md_path = write_results(result, tmp_path, "recovery")
    with open(csv_path) as f:
        assert [tuple(r) for r in csv.reader(f)][0] == COLUMNS
    md = md_path.read_text()
    assert "| flexigpt |" in md and "| shortgpt_lora |" in md and "Best per budget and method" in md


def test_compare_recovery_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown method"):
        compare_recovery(methods=("lora",), model=tiny_llama(vocab=257), tokenizer=byte_tokenizer(), **TINY)
    with pytest.raises(ValueError, match="adapter_share"):
        FlexiGPTRecipe(adapter_share=0.0)
    with pytest.raises(ValueError, match="no healing step"):
        compare_recovery(tokens=32, lrs=(1e-2,), methods=("flexigpt",), model=tiny_llama(vocab=257),
                         recipe=FlexiGPTRecipe(local_fit=LocalFit(steps=1), fit_samples=2),
                         tokenizer=byte_tokenizer(), **TINY)


def test_recipe_without_local_fit_spends_the_whole_budget_on_healing_and_can_distill():
    recipe = FlexiGPTRecipe(local_fit=None, adapter_share=1.0)
    result = compare_recovery(tokens=2 * 2 * 32, lrs=(1e-2,), methods=("flexigpt",), recipe=recipe, distill="kl",
                              model=tiny_llama(vocab=257), tokenizer=byte_tokenizer(), **TINY)
    (run,) = [r for r in result["rows"] if r["method"] == "flexigpt"]
    assert run["tokens"] == 2 * 2 * 32 and run["options"].startswith("paper init")
    assert "LoRA" not in run["options"] and run["trainable_params"] == result["meta"]["budget_params"]
    assert "KL to the dense logits" in run["options"] and result["meta"]["distill"] == "kl"
    with pytest.raises(ValueError, match="distill"):
        compare_recovery(distill="mse", model=tiny_llama(vocab=257), tokenizer=byte_tokenizer(), **TINY)
