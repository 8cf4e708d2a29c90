"""FlexiGPT checkpoints served natively by vLLM (plugin, tiny Llama): greedy parity with Hugging Face
generate() and the weights vLLM holds (the checkpoint's bytes, shared tensors once)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import flexigpt_kernels as fk
from flexigpt_kernels.integrations.vllm import SUPPORTED_ARCHITECTURES
from flexigpt_kernels.integrations.vllm.model import held_weights

from .helpers import (
    NEW_TOKENS,
    TINY_BLOCKS,
    assert_logprobs_match,
    checkpoint_bytes,
    hf_greedy,
    pruned_tiny,
    running_llm,
    vllm_greedy,
)


def test_importing_the_package_does_not_import_vllm():
    code = "import sys, flexigpt_kernels as fk; fk.save_pretrained; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugin_entry_point_registers_the_architectures():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "flexigpt"]
    assert ep.value == "flexigpt_kernels.integrations.vllm:register"
    load_general_plugins()
    assert set(SUPPORTED_ARCHITECTURES) <= set(ModelRegistry.get_supported_archs())
    assert "FlexiGPTLlamaForCausalLM" in SUPPORTED_ARCHITECTURES


# ----------------------------------------------------------------------------- tiny Llama


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    with running_llm(tiny_dir, skip_tokenizer_init=True) as llm:
        yield llm


TINY_PROMPTS = [[5, 17, 33, 100, 7], [9, 8, 7, 6, 5, 4, 3, 200], list(range(10, 60))]


def test_tiny_config_names_the_plugin_architecture(tiny_dir):
    assert json.loads((tiny_dir / "config.json").read_text())["architectures"] == ["FlexiGPTLlamaForCausalLM"]


def test_tiny_greedy_tokens_and_logprobs_equal_hugging_face(tiny_dir, tiny_llm):
    model = fk.from_pretrained(tiny_dir)
    hf_tokens, hf_logits = hf_greedy(model, TINY_PROMPTS, NEW_TOKENS)
    assert len({tuple(t) for t in hf_tokens}) == len(TINY_PROMPTS) and len(set(hf_tokens[2])) > 3  # not degenerate
    tokens, logprobs = vllm_greedy(tiny_llm, TINY_PROMPTS, NEW_TOKENS, logprobs=1)
    assert tokens == hf_tokens
    assert_logprobs_match(tokens, logprobs, hf_logits)


def test_tiny_parity_is_not_vacuous(tiny_dir, tiny_llm):
    """The replacement blocks' adapters change the tokens: without them Hugging Face
    decodes differently from vLLM (which matched the model with them above)."""
    model = fk.from_pretrained(tiny_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.zero_()
    hf_tokens, _ = hf_greedy(model, TINY_PROMPTS[:1], NEW_TOKENS)
    tokens, _ = vllm_greedy(tiny_llm, TINY_PROMPTS[:1], NEW_TOKENS)
    assert tokens != hf_tokens


def test_tiny_weights_held_equal_the_checkpoint(tiny_dir, tiny_llm, tmp_path):
    (held,) = tiny_llm.apply_model(held_weights)
    stored = checkpoint_bytes(tiny_dir)
    assert held["bytes"] == stored
    assert held["replacement_linears"] == 4 * len(TINY_BLOCKS)  # qkv, o, gate_up, down per block
    assert held["sharing_base_modules"] == held["replacement_linears"]
    # a dense export (of the same model without output norms, which export_dense refuses)
    # stores every block in full
    dense = fk.export_dense(pruned_tiny(output_norm=False), tmp_path / "dense")
    assert checkpoint_bytes(dense) > stored


def test_tiny_engine_base_gemm_packs_every_linear_and_op_base_gemm_matches_too(tiny_dir, tiny_llm, monkeypatch):
    """base_gemm="engine" (the default, tiny_llm): the base linears stay packed as in the stock
    model (vLLM's oneDNN handle gives the replacement blocks their base product).
    FLEXIGPT_VLLM_BASE_GEMM=op: our ops read the shared weight tensors, so exactly the base
    blocks' 4 linears each stay unpacked; the tokens, log-probabilities and bytes are the same."""
    (engine_held,) = tiny_llm.apply_model(held_weights)
    bases = set(json.loads((tiny_dir / "flexigpt.json").read_text())["base_map"].values())
    assert bases and engine_held["packed_linears"] >= 4 * (6 - len(TINY_BLOCKS))
    monkeypatch.setenv("FLEXIGPT_VLLM_BASE_GEMM", "op")
    hf_tokens, hf_logits = hf_greedy(fk.from_pretrained(tiny_dir), TINY_PROMPTS, NEW_TOKENS)
    with running_llm(tiny_dir, skip_tokenizer_init=True) as llm:
        tokens, logprobs = vllm_greedy(llm, TINY_PROMPTS, NEW_TOKENS, logprobs=1)
        (op_held,) = llm.apply_model(held_weights)
    assert tokens == hf_tokens
    assert_logprobs_match(tokens, logprobs, hf_logits)
    assert op_held["bytes"] == engine_held["bytes"] == checkpoint_bytes(tiny_dir)
    assert op_held["packed_linears"] == engine_held["packed_linears"] - 4 * len(bases)
