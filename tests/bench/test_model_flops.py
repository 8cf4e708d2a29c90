"""The FLOP floor of `bench model` (bench/model_flops.py): counted from the modules, checked
against the shapes by hand, on SmolLM2-135M's shape (meta tensors: no weights) and on a tiny
converted model (the adapters' FLOPs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexigpt_kernels.bench.model_convert import RANDOM_PRESETS
from flexigpt_kernels.bench.model_flops import count_flops, floor_ratios

SMOLLM2 = dict(RANDOM_PRESETS["smollm2-135m"], tie_word_embeddings=True)


def _meta_llama(**shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM._from_config(LlamaConfig(**shape))


def test_smollm2_prefill_floor_at_rank_36_is_above_1_02():
    dense = count_flops(_meta_llama(**SMOLLM2))
    h, i, kv = 576, 1536, 3 * 64
    per_layer = 2 * (h * h + 2 * h * kv + h * h + 3 * h * i)  # q, k, v, o, gate, up, down
    assert dense.linear == 30 * per_layer
    assert dense.lm_head == 2 * h * 49152
    assert dense.attention_per_pair == 4 * 9 * 64 * 30
    r = 36  # 9 replacement blocks (0.3 x 30), every projection adapted
    adapter = 9 * 2 * r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    pruned = dataclasses.replace(dense, adapter=float(adapter))
    floors = floor_ratios({"dense": dense, "flexigpt": pruned}, 512, 32)
    assert floors["dense"] == {"prefill": 1.0, "decode": 1.0}
    assert floors["flexigpt"]["prefill"] == pytest.approx(1.0286, abs=1e-4)
    assert floors["flexigpt"]["decode"] == pytest.approx(1.0216, abs=1e-4)
    assert (dense.linear + adapter) / dense.linear == pytest.approx(1.0311, abs=1e-4)  # linear layers alone


def test_converted_model_counts_its_adapters():
    from flexigpt_kernels.bench.model_convert import ModelBenchConfig, build_random_model, convert_copy

    dense = build_random_model("tiny", torch.device("cpu"), torch.float32)
    flex, conv = convert_copy(dense, ModelBenchConfig(random="tiny", quick=True, bases="nearest"), None, lambda m: None)
    d, f = count_flops(dense), count_flops(flex)
    assert (f.linear, f.lm_head, f.attention_per_pair) == (d.linear, d.lm_head, d.attention_per_pair)
    layers = [m for m in flex.modules() if hasattr(m, "lora_a") and hasattr(m, "rank")]
    assert len(layers) == 7 * len(conv.pruned)
    assert f.adapter == sum(2 * m.rank * (m.in_features + m.out_features) for m in layers) > 0
    assert floor_ratios({"dense": d, "flexigpt": f}, 16, 4)["flexigpt"]["prefill"] > 1.0
    assert floor_ratios({"flexigpt": f}, 16, 4) == {}
