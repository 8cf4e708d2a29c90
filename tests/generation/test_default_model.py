"""Self-speculative decoding on the embedded SmolLM2-135M, pruned with prune(): greedy output is
token for token Hugging Face's greedy generate() output."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.generation import generate

# Three middle blocks and one late one (the prototype's Block Influence ranks 12-17 and 25-26
# lowest on the embedded model). Explicit blocks skip the calibration pass and keep the test
# short; rank 8 keeps the SVD initialisation cheap.
BLOCKS = [13, 15, 16, 25]


@pytest.fixture(scope="module")
def pruned_default(default_model_and_tokenizer):
    from flexigpt_kernels.assets import load_default_model
    from flexigpt_kernels.convert.prune import prune

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_default_model()  # a private copy (the session's stays untouched)
        model, report = prune(model, None, blocks=BLOCKS, rank=8, progress=False)
    finally:
        torch.set_num_threads(before)
    return model, tokenizer, report


@pytest.mark.slow
def test_default_model_greedy_identity(pruned_default):
    model, tokenizer, report = pruned_default
    assert sorted(report.base_map) == BLOCKS
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    out, stats = generate(model, prompt, max_new_tokens=16, draft_tokens=4, return_stats=True)
    assert torch.equal(out, ref), (tokenizer.decode(out[0]), tokenizer.decode(ref[0]))
    assert stats.mode == "self_speculative" and stats.skipped_blocks == BLOCKS
    assert stats.drafted > 0 and 0 <= stats.acceptance_rate <= 1
    static = generate(model, prompt, max_new_tokens=16, draft_tokens=2, static_cache=True)
    assert torch.equal(static, ref)
