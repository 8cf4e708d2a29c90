"""`flexigpt heal` on a saved tiny model and text files; `flexigpt compare`'s rank matching."""

from __future__ import annotations

import json

import pytest
import torch

from flexigpt_kernels.cli import main
from flexigpt_kernels.io import from_pretrained, save_pretrained
from flexigpt_kernels.nn import SharedLoRALinear

from .helpers import byte_tokenizer, tiny_pruned

TEXT = [
    "the cat sat on the mat and the dog sat on the log",
    "a stitch in time saves nine, said the tailor",
    "rain in spain falls mainly on the plain",
]


@pytest.fixture()
def files(tmp_path):
    train, held = tmp_path / "train.txt", tmp_path / "held.txt"
    train.write_text("\n".join(TEXT * 10) + "\n")
    held.write_text("the dog sat on the mat in the rain\n" * 6)
    return train, held


@pytest.mark.parametrize("method,trainable", [("flexigpt", "adapters"), ("drop", "lora_kept"), ("flexigpt", None)])
def test_heal_cli_trains_and_saves(tmp_path, files, capsys, method, trainable):
    train, held = files
    src, out = tmp_path / "pruned", tmp_path / "healed"
    save_pretrained(tiny_pruned(method, vocab=257), src, byte_tokenizer())
    argv = [
        "heal",
        str(src),
        "--data",
        str(train),
        "--out",
        str(out),
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-data",
        str(held),
        "--eval-chunks",
        "2",
        "--json",
    ]
    if trainable is not None:
        argv += ["--trainable", trainable]
    if trainable == "lora_kept":
        argv += ["--lora-rank", "2"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["tokens_seen"] == 3 * 2 * 32
    assert [s for s, _ in summary["eval_perplexities"]] == [0, 3]
    assert json.loads((out / "heal_report.json").read_text())["trainable"] == (trainable or "adapters+lora_kept")
    before, after = from_pretrained(src), from_pretrained(out)
    changed = [
        n for (n, p), (_, q) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(p, q)
    ]
    assert changed
    if trainable is None:  # the default hybrid: LoRA merged into the kept blocks, shared by the replacements
        assert summary["lora_layers_merged"] == 14
        assert summary["lora_shared"] is True
        assert any(n.endswith("proj.weight") for n in changed)
        ranks = {m.rank for m in after.modules() if isinstance(m, SharedLoRALinear)}
        assert ranks == {4}  # they computed with the LoRA-changed base: no adapter grows at the merge
    elif method == "flexigpt":
        assert all(n.endswith(("lora_a", "lora_b", "output_norm.weight")) for n in changed)
        assert sum(isinstance(m, SharedLoRALinear) for m in after.modules()) == 14
    else:  # LoRA merged into the kept blocks' own weights: a plain model again
        assert summary["lora_layers_merged"] == 14
        assert all(n.endswith("proj.weight") for n in changed)
    assert main(argv) == 2  # the non-empty --out is refused, one line
    assert "not empty" in capsys.readouterr().err


def test_matching_lora_rank_is_within_tolerance():
    from flexigpt_kernels.train import count_parameters, lora_parameter_count, select_trainable
    from flexigpt_kernels.train.compare import matching_lora_rank

    flex, drop = tiny_pruned(rank=4), tiny_pruned("drop")
    target = count_parameters(select_trainable(flex, "adapters"))
    rank, n = matching_lora_rank(drop, target)
    assert n == lora_parameter_count(drop, rank) and abs(n - target) <= 0.05 * target
    with pytest.raises(ValueError, match="within"):
        matching_lora_rank(drop, target, tolerance=1e-6)
