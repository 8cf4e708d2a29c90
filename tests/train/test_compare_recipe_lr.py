"""The recipe's separate learning rate for the replacement adapters (heal adapter_lr)."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.convert.replacement import replacement_blocks
from flexigpt_kernels.nn import SharedLoRALinear
from flexigpt_kernels.train import heal
from flexigpt_kernels.train.compare import FlexiGPTRecipe
from flexigpt_kernels.train.params import with_adapter_lr

from .helpers import SEQ, tiny_pruned, token_data

KW = dict(seq_len=SEQ, batch_size=4, progress=False, trainable=("adapters", "lora_kept"), lora_rank=2)


def _adapters(model):
    return [p.detach().clone() for p in _adapters_params(model)]


def test_adapter_lr_moves_only_the_replacement_adapters_to_their_rate():
    model = tiny_pruned()
    for m in model.modules():  # non-zero B (before LoRA exists on the kept blocks), so that A gets a gradient too
        if isinstance(m, SharedLoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.02)
    before = _adapters(model)
    heal(model, token_data(8), steps=2, lr=1e-2, adapter_lr=1e-12, **KW)
    after = _adapters(model)
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) < 1e-9
    other = tiny_pruned()
    for m in other.modules():
        if isinstance(m, SharedLoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.02)
    start = _adapters(other)
    heal(other, token_data(8), steps=2, lr=1e-2, **KW)
    assert [a.shape for a in start] == [a.shape for a in _adapters(other)]
    assert max((a - b).abs().max().item() for a, b in zip(_adapters(other), start)) > 1e-4


def test_with_adapter_lr_splits_groups_and_rejects_bad_rates():
    model = tiny_pruned()
    params = [p for p in model.parameters()]
    groups = [{"params": params, "lr": 1e-2, "weight_decay": 0.0}]
    assert with_adapter_lr(model, groups, None) is groups
    split = with_adapter_lr(model, groups, 1e-3)
    ids = {id(p) for p in _adapters_params(model)}
    assert [g["lr"] for g in split] == [1e-2, 1e-3]
    assert {id(p) for p in split[1]["params"]} == ids and sum(len(g["params"]) for g in split) == len(params)
    with pytest.raises(ValueError, match="adapter_lr"):
        with_adapter_lr(model, groups, 0.0)
    with pytest.raises(ValueError, match="adapter_lr"):
        heal(model, token_data(8), steps=1, adapter_lr=-1.0, **KW)
    with pytest.raises(ValueError, match="adapter_lr"):
        FlexiGPTRecipe(adapter_lr=0.0)
    assert "adapter lr 0.001" in FlexiGPTRecipe(adapter_lr=1e-3).describe(4, 2)


def _adapters_params(model):
    """The replacement blocks' adapter factors (LoRA on kept blocks is a SharedLoRALinear too)."""
    blocks = replacement_blocks(model).values()
    return [p for b in blocks for m in b.modules() if isinstance(m, SharedLoRALinear) for p in (m.lora_a, m.lora_b)]
