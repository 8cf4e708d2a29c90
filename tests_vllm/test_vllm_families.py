"""The other Llama-family classes of the plugin: Qwen2 (q/k/v biases: each replacement
projection keeps its own) and Mistral, on tiny random checkpoints (one engine each)."""

from __future__ import annotations

import json

import pytest

import flexigpt_kernels as fk

from .helpers import assert_logprobs_match, hf_greedy, pruned_tiny, running_llm, vllm_greedy

PROMPTS = [[5, 17, 33, 100, 7], list(range(10, 40))]


@pytest.mark.parametrize(
    "model_type, architecture", [("qwen2", "FlexiGPTQwen2ForCausalLM"), ("mistral", "FlexiGPTMistralForCausalLM")]
)
def test_family_greedy_tokens_and_logprobs_equal_hugging_face(model_type, architecture, tmp_path):
    path = fk.save_pretrained(pruned_tiny(model_type), tmp_path / model_type)
    assert json.loads((path / "config.json").read_text())["architectures"] == [architecture]
    hf_tokens, hf_logits = hf_greedy(fk.from_pretrained(path), PROMPTS, 16)
    with running_llm(path, skip_tokenizer_init=True) as llm:
        tokens, logprobs = vllm_greedy(llm, PROMPTS, 16, logprobs=1)
    assert tokens == hf_tokens
    assert_logprobs_match(tokens, logprobs, hf_logits)
