"""The recipe's option to heal the replacement blocks' own RMSNorm weights too (train_norms)."""

from __future__ import annotations

import argparse

import pytest

from flexigpt_kernels.commands import compare as compare_cmd
from flexigpt_kernels.convert.local_fit import LocalFit
from flexigpt_kernels.convert.replacement import replacement_blocks
from flexigpt_kernels.train import compare as compare_mod
from flexigpt_kernels.train.compare import FlexiGPTRecipe, compare_recovery
from flexigpt_kernels.train.compare_budget import _recipe_dict

from .helpers import byte_tokenizer, tiny_llama
from .test_compare import TINY


def _own_norm_weights(model):
    """The replacement blocks' own RMSNorm weights (input and post-attention norms)."""
    return [
        p
        for block in replacement_blocks(model).values()
        for name, p in block.named_parameters()
        if name.endswith("layernorm.weight")
    ]


def _heal_spy(monkeypatch):
    seen = []
    real = compare_mod.heal

    def spy(model, *args, **kwargs):
        norms = _own_norm_weights(model)
        before = [p.detach().clone() for p in norms]
        rep = real(model, *args, **kwargs)
        moved = max((p.detach() - b).abs().max().item() for p, b in zip(norms, before)) if norms else 0.0
        seen.append((kwargs["trainable"], moved))
        return rep

    monkeypatch.setattr(compare_mod, "heal", spy)
    return seen


@pytest.mark.parametrize("train_norms", [False, True])
def test_train_norms_heals_the_replacement_norms_within_the_budget(monkeypatch, train_norms):
    seen = _heal_spy(monkeypatch)
    recipe = FlexiGPTRecipe(local_fit=LocalFit(steps=1), fit_samples=2, adapter_share=0.5, train_norms=train_norms)
    result = compare_recovery(
        tokens=4 * 2 * 32,
        lrs=(1e-2,),
        methods=("flexigpt",),
        recipe=recipe,
        model=tiny_llama(vocab=257),
        tokenizer=byte_tokenizer(),
        **TINY,
    )
    (run,) = [r for r in result["rows"] if r["method"] == "flexigpt"]
    target = result["meta"]["budget_params"]
    assert abs(run["trainable_params"] - target) <= 0.05 * target
    ((trainable, moved),) = seen
    if train_norms:
        assert trainable == ("replacement_blocks", "lora_kept") and moved > 1e-5
        assert "own norms trained" in run["options"] and result["meta"]["recipe"]["train_norms"] is True
    else:
        assert trainable == ("adapters", "lora_kept") and moved == 0.0
        assert "own norms" not in run["options"] and "train_norms" not in result["meta"]["recipe"]


def test_train_norms_counts_the_norms_in_the_budget_and_the_cli_sets_it(monkeypatch):
    """With the norms trained the LoRA on the kept blocks gets what they take: the total stays
    the budget's, and the norms' share is exactly the extra of "replacement_blocks"."""
    common = dict(tokens=4 * 2 * 32, lrs=(1e-2,), methods=("flexigpt",), tokenizer=byte_tokenizer(), **TINY)
    plain = compare_recovery(
        recipe=FlexiGPTRecipe(local_fit=None, adapter_share=1.0), model=tiny_llama(vocab=257), **common
    )
    normed = compare_recovery(
        recipe=FlexiGPTRecipe(local_fit=None, adapter_share=1.0, train_norms=True),
        model=tiny_llama(vocab=257),
        **common,
    )
    hidden = tiny_llama(vocab=257).config.hidden_size
    blocks = len(plain["meta"]["pruned"])
    (a,) = [r for r in plain["rows"] if r["method"] == "flexigpt"]
    (b,) = [r for r in normed["rows"] if r["method"] == "flexigpt"]
    assert b["trainable_params"] - a["trainable_params"] == 2 * hidden * blocks
    p = argparse.ArgumentParser()
    compare_cmd.add_arguments(p)
    assert compare_cmd._recipe(p.parse_args(["--train-norms"])).train_norms is True
    assert compare_cmd._recipe(p.parse_args([])).train_norms is False
    assert "train_norms" not in _recipe_dict(FlexiGPTRecipe())  # older sweeps resume
    assert FlexiGPTRecipe(train_norms=True).describe(4, 2).count("own norms trained") == 1
