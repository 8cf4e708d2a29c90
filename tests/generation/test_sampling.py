"""Sampling: the warping matches Hugging Face's warpers, and speculative sampling draws from the
full model's distribution (not the draft's), checked with a chi-square test on a tiny vocab."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.generation import draft_positions, generate, probabilities, skip_blocks, speculative_accept
from flexigpt_kernels.generation.sampling import warp_logits

from .helpers import tiny_model


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; bins expecting < 5 samples are pooled."""
    from scipy.stats import chi2

    n = counts.sum().item()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    return float(chi2.sf(stat, max(1, obs.numel() - 1)))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (1.0, 0.3)])
def test_warping_matches_hf(temperature, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    ref = logits.clone()
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = warp_logits(logits, temperature, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1))


def test_acceptance_rule_reproduces_target():
    """speculative_accept alone, synthetic p and q over 6 tokens: the first emitted token is
    distributed as p_0 although drafts come from a very different q_0."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.1, 0.1, 0.1, 0.5], [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]])
    q = torch.tensor([[0.05, 0.05, 0.1, 0.2, 0.3, 0.3], [1 / 6] * 6])
    n = 2000
    firsts = torch.empty(n, dtype=torch.long)
    accepted = 0
    for s in range(n):
        drafts = torch.multinomial(q, 1, generator=g).squeeze(1)
        n_acc, extra = speculative_accept(drafts, q, p, g)
        accepted += int(n_acc > 0)
        firsts[s] = drafts[0] if n_acc > 0 else extra
    counts = torch.bincount(firsts, minlength=6)
    assert _chi2_pvalue(counts, p[0]) > 1e-3
    assert _chi2_pvalue(counts, q[0]) < 1e-6  # the test can tell p from q
    # P(accept d_0) = sum_x min(p(x), q(x))
    assert abs(accepted / n - torch.minimum(p[0], q[0]).sum().item()) < 0.03


def test_speculative_accept_identical_distributions_accepts_everything():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 10), -1)
    drafts = torch.multinomial(p[:3], 1, generator=g).squeeze(1)
    n_acc, extra = speculative_accept(drafts, p[:3], p, g)
    assert int(n_acc) == 3 and 0 <= int(extra) < 10


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_first_token_follows_full_model(temperature, top_p):
    """End to end: first new token of speculative sampling (k=1, so it is drafted and verified)
    over a few hundred runs vs the full model's warped softmax. The replacement blocks are made
    to matter (gamma 0.5) so that the draft's distribution is clearly different."""
    vocab = 16
    model = tiny_model("llama", layers=4, vocab=vocab, blocks=(1, 2), gamma=0.5)
    prompt = torch.tensor([[3]])  # one token: no prefill, two forwards per run
    with torch.no_grad():
        p = probabilities(model(prompt).logits[0, -1], temperature, top_p)
        with skip_blocks(model, draft_positions(model)):
            q = probabilities(model(prompt).logits[0, -1], temperature, top_p)
    assert 0.5 * (p - q).abs().sum() > 0.2  # the draft alone would fail the test below
    g = torch.Generator().manual_seed(0)
    n = 300
    firsts = torch.empty(n, dtype=torch.long)
    drafted = accepted = 0
    for s in range(n):
        out, stats = generate(
            model,
            prompt,
            max_new_tokens=2,
            draft_tokens=1,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            generator=g,
            eos_token_id=[],
            return_stats=True,
        )
        firsts[s] = out[0, 1]
        drafted += stats.drafted
        accepted += stats.accepted
    counts = torch.bincount(firsts, minlength=vocab)
    assert _chi2_pvalue(counts, p) > 1e-3, (counts.tolist(), p.tolist())
    assert _chi2_pvalue(counts, q) < 1e-3
    assert counts[p == 0].sum() == 0  # nothing outside the top-p nucleus
    assert drafted == n and 0 < accepted < n


def test_sampling_is_reproducible_with_a_generator(prompt):
    model = tiny_model("qwen2", gamma=0.1)
    runs = [
        generate(
            model,
            prompt,
            max_new_tokens=10,
            do_sample=True,
            temperature=0.9,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    plain = generate(
        model,
        prompt,
        max_new_tokens=10,
        do_sample=True,
        self_speculative=False,
        generator=torch.Generator().manual_seed(7),
    )
    assert plain.shape == runs[0].shape
