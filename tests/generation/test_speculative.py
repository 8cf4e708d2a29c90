"""generate(): greedy self-speculative output equals Hugging Face's greedy generate() token for
token, KV caches roll back correctly when drafts are rejected, and the plain path matches too."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.generation import GenerationStats, draft_positions, generate, make_cache, skip_blocks
from flexigpt_kernels.generation import speculative as speculative_mod
from flexigpt_kernels.generation.speculative import _Forward

from .helpers import hf_greedy, set_gamma, tiny_model

FAMILIES = ["llama", "qwen2", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_self_speculative_equals_hf_generate(family, prompt):
    # mistral with a sliding window shorter than the output: rollback across the window edge
    model = tiny_model(family, sliding_window=8 if family == "mistral" else None)
    for gamma, k in [(1e-3, 4), (0.1, 3)]:  # draft nearly exact, then often wrong
        set_gamma(model, gamma)
        ref = hf_greedy(model, prompt, 16)
        out, stats = generate(model, prompt, max_new_tokens=16, draft_tokens=k, return_stats=True)
        assert torch.equal(out, ref), (family, gamma, out.tolist(), ref.tolist())
        assert stats.mode == "self_speculative" and stats.skipped_blocks == [2, 4]
        assert stats.drafted > 0 and stats.new_tokens == ref.shape[1] - prompt.shape[1]
        if gamma == 1e-3:
            assert stats.acceptance_rate > 0.9
        else:  # rejections happened, and the caches were rolled back after them
            assert 0 < stats.acceptance_rate < 1
        plain = generate(model, prompt, max_new_tokens=16, self_speculative=False)
        assert torch.equal(plain, ref)


@pytest.mark.parametrize("k", [1, 2, 6])
def test_identity_for_several_draft_lengths(k, prompt):
    model = tiny_model("llama", gamma=0.1)
    ref = hf_greedy(model, prompt, 13)
    assert torch.equal(generate(model, prompt, max_new_tokens=13, draft_tokens=k), ref)


def test_forced_wrong_drafts_roll_back(monkeypatch, prompt):
    """A draft that is always wrong: nothing is accepted, every round rolls both caches back
    by k tokens, and the output is still the full model's."""
    model = tiny_model("llama", gamma=1e-3)  # the honest draft would be right almost always
    ref = hf_greedy(model, prompt, 12)
    vocab = model.config.vocab_size
    monkeypatch.setattr(speculative_mod, "_greedy_draft_token", lambda logits: (logits.argmax(-1) + 1) % vocab)
    out, stats = generate(model, prompt, max_new_tokens=12, draft_tokens=4, return_stats=True)
    assert torch.equal(out, ref)
    assert stats.accepted == 0 and stats.drafted > 0 and stats.rounds == 12


def test_partially_wrong_drafts_roll_back(monkeypatch, prompt):
    """Every third draft is wrong: rounds accept 0, 1 or 2 tokens, so rollbacks of every depth
    (and the draft cache lagging by one after a full acceptance) are exercised."""
    model = tiny_model("qwen2", gamma=1e-3)
    ref = hf_greedy(model, prompt, 20)
    vocab = model.config.vocab_size
    calls = {"n": 0}

    def sometimes_wrong(logits):
        calls["n"] += 1
        token = logits.argmax(-1)
        return (token + 1) % vocab if calls["n"] % 3 == 0 else token

    monkeypatch.setattr(speculative_mod, "_greedy_draft_token", sometimes_wrong)
    for k in (2, 4):
        out, stats = generate(model, prompt, max_new_tokens=20, draft_tokens=k, return_stats=True)
        assert torch.equal(out, ref), k
        assert 0 < stats.acceptance_rate < 1


def test_prompt_of_one_token_and_budget_edges():
    model = tiny_model("llama", gamma=0.1)
    one = torch.tensor([[7]])
    for n in (1, 2, 5):
        assert torch.equal(generate(model, one, max_new_tokens=n, draft_tokens=4), hf_greedy(model, one, n))
    out, stats = generate(model, one, max_new_tokens=0, return_stats=True)
    assert torch.equal(out, one) and stats.new_tokens == 0


def test_eos_stops_like_hf(prompt):
    model = tiny_model("llama", gamma=0.1)
    free = generate(model, prompt, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, prompt.shape[1] + 5])  # a token the greedy output produces
    ref = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    out = generate(model, prompt, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out, ref)
    assert int(out[0, -1]) == eos and out.shape[1] <= prompt.shape[1] + 6


def test_no_replacement_blocks_falls_back_to_plain(prompt):
    model = tiny_model("llama", blocks=())
    out, stats = generate(model, prompt, max_new_tokens=8, return_stats=True)
    assert stats.mode == "plain" and "no replacement blocks" in stats.note
    assert stats.drafted == 0 and stats.acceptance_rate is None
    assert torch.equal(out, hf_greedy(model, prompt, 8))


def test_stats(prompt):
    model = tiny_model("llama", gamma=0.1)
    out, stats = generate(model, prompt, max_new_tokens=10, draft_tokens=3, return_stats=True)
    assert isinstance(stats, GenerationStats)
    assert stats.prompt_tokens == 6 and stats.new_tokens == out.shape[1] - 6 and stats.draft_tokens == 3
    assert stats.accepted <= stats.drafted and stats.acceptance_rate == stats.accepted / stats.drafted
    assert stats.tokens_per_s > 0 and stats.seconds > 0
    assert "acceptance=" in stats.summary() and stats.to_dict()["mode"] == "self_speculative"


def test_batch_and_argument_errors(prompt):
    model = tiny_model("llama", layers=4, blocks=(2,))
    with pytest.raises(ValueError, match="batch size 1"):
        generate(model, prompt.repeat(2, 1), max_new_tokens=4)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, prompt[0], max_new_tokens=4)
    with pytest.raises(ValueError, match="draft_tokens"):
        generate(model, prompt, max_new_tokens=4, draft_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, max_new_tokens=4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, max_new_tokens=4, do_sample=True, top_p=1.5)


def test_draft_cache_covers_only_kept_blocks(prompt):
    from transformers.cache_utils import DummyLayer

    model = tiny_model("llama", blocks=(0, 3))  # block 0 skipped: mask/positions must not read it
    skipped = draft_positions(model)
    assert skipped == [0, 3]
    cache = make_cache(model, skipped)
    forward = _Forward(model)
    with skip_blocks(model, skipped):
        incremental = torch.cat([forward(prompt[:, :4], cache, 0), forward(prompt[:, 4:], cache, 4)])
        whole = model(prompt).logits[0]
    torch.testing.assert_close(incremental, whole, rtol=1e-5, atol=1e-5)
    for i, layer in enumerate(cache.layers):
        if i in skipped:
            assert isinstance(layer, DummyLayer)
        else:
            assert layer.get_seq_length() == prompt.shape[1]
    cache.crop(-2)
    assert all(cache.layers[i].get_seq_length() == 4 for i in (1, 2, 4, 5))


def test_skip_blocks_restores_layers_on_error():
    from flexigpt_kernels.convert.families import decoder_layers

    model = tiny_model("llama", layers=4, blocks=(1,))
    before = list(decoder_layers(model))
    with pytest.raises(RuntimeError):
        with skip_blocks(model, [1]):
            assert decoder_layers(model)[1] is not before[1]
            raise RuntimeError("boom")
    assert list(decoder_layers(model)) == before


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_static_cache_gives_the_same_output(family, prompt):
    """Preallocated (static-shape) caches: rollback only moves the cache length back, and
    stale entries past it are masked; the output is still the full model's."""
    model = tiny_model(family, gamma=0.1)
    ref = hf_greedy(model, prompt, 14)
    for k in (1, 4):
        out, stats = generate(model, prompt, max_new_tokens=14, draft_tokens=k, static_cache=True, return_stats=True)
        assert torch.equal(out, ref), k
        assert 0 < stats.acceptance_rate < 1
    assert torch.equal(generate(model, prompt, max_new_tokens=14, self_speculative=False, static_cache=True), ref)


def test_static_cache_refuses_sliding_window(prompt):
    model = tiny_model("mistral", layers=4, blocks=(2,), sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window"):
        generate(model, prompt, max_new_tokens=4, static_cache=True)
