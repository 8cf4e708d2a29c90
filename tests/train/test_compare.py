"""The FlexiGPT vs ShortGPT + LoRA comparison on a tiny model: same blocks, matched trainable
parameters, same token budget, and the CSV / Markdown outputs."""

from __future__ import annotations

import csv

from flexigpt_kernels.train.compare import COLUMNS, compare_recovery, write_results

from .helpers import byte_tokenizer, tiny_llama

TRAIN = ["the cat sat on the mat and the dog sat on the log"] * 40
HELD = ["rain in spain falls mainly on the plain, said the dog"] * 10


def test_compare_recovery_on_a_tiny_model(tmp_path):
    result = compare_recovery(tokens=3 * 2 * 32, lrs=(1e-2,), seeds=(0,), ratio=0.5, rank=4, seq_len=32,
                              batch_size=2, eval_chunks=4, calib_samples=4, model=tiny_llama(vocab=257),
                              tokenizer=byte_tokenizer(), train_texts=TRAIN, heldout_texts=HELD, progress=False,
                              log=lambda *a: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "flexigpt", "shortgpt_lora"}
    flex, lora = rows["flexigpt"], rows["shortgpt_lora"]
    assert abs(flex["trainable_params"] - lora["trainable_params"]) <= 0.05 * flex["trainable_params"]
    assert flex["tokens"] == lora["tokens"] == 3 * 2 * 32
    assert len(result["meta"]["pruned"]) == 2
    csv_path, md_path = write_results(result, tmp_path, "recovery")
    with open(csv_path) as f:
        assert [tuple(r) for r in csv.reader(f)][0] == COLUMNS
    md = md_path.read_text()
    assert "| flexigpt |" in md and "| shortgpt_lora |" in md and "Best per method" in md
