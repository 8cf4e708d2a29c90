"""SmolLM2-135M pruned at 0.3 (the embedded default) served natively by vLLM: greedy parity
with Hugging Face generate() and the weights vLLM holds. Its own module, so that the tiny
model's engine is shut down before this one starts."""

from __future__ import annotations

import pytest

import flexigpt_kernels as fk
from flexigpt_kernels.integrations.vllm.model import held_weights

from .helpers import NEW_TOKENS, assert_same_greedy, checkpoint_bytes, hf_greedy, running_llm, vllm_greedy

SMOL_TEXTS = ["The history of the Roman Empire", "Photosynthesis is the process by which", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smol_llm(smol):
    path, _, _ = smol
    with running_llm(path) as llm:
        yield llm


def test_smol_greedy_tokens_equal_hugging_face(smol, smol_llm):
    path, tokenizer, _ = smol
    prompts = [tokenizer(t)["input_ids"] for t in SMOL_TEXTS]
    hf_tokens, hf_logits = hf_greedy(fk.from_pretrained(path), prompts, NEW_TOKENS)
    tokens, _ = vllm_greedy(smol_llm, prompts, NEW_TOKENS)
    assert_same_greedy(hf_tokens, hf_logits, tokens)


def test_smol_weights_held_equal_the_checkpoint_and_less_than_dense(smol, smol_llm):
    path, _, dense_params = smol
    (held,) = smol_llm.apply_model(held_weights)
    stored = checkpoint_bytes(path)
    assert held["bytes"] == stored
    assert held["sharing_base_modules"] == held["replacement_linears"] == 4 * 9
    assert held["packed_linears"] > 0  # linears no block shares are packed by vLLM as in the stock model
    # a dense export has the unpruned architecture's tensors: dense_params fp32 values
    assert stored < 0.8 * dense_params * 4
