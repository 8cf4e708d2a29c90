"""perplexity(): non-overlapping windows, no BOS, exp(mean NLL over every predicted token)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flexigpt_kernels.eval import perplexity
from tests.eval.helpers import byte_tokenizer, tiny_model


class BigramStub(nn.Module):
    """logits[t] = log P(. | token t) from a fixed bigram table: a model whose perplexity can
    be computed by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.log_probs = nn.Parameter(table.log(), requires_grad=False)
        self.calls = []

    def forward(self, input_ids, use_cache=False):
        self.calls.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=self.log_probs[input_ids])


def test_matches_hand_computed_cross_entropy():
    # vocabulary {0, 1, 2}; P(next | prev) rows sum to 1
    table = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    stub = BigramStub(table)
    tokens = torch.tensor([[0, 1, 1, 2], [2, 0, 0, 1], [1, 1, 1, 1]])
    # predicted pairs (prev -> next) per window; the first token of each window is not predicted
    pairs = [(0, 1), (1, 1), (1, 2), (2, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 1)]
    by_hand = math.exp(-sum(math.log(table[a, b].item()) for a, b in pairs) / len(pairs))
    got = perplexity(stub, None, tokens, seq_len=4, num_chunks=3, batch_size=2, progress=False)
    assert got == pytest.approx(by_hand, rel=1e-6)
    assert stub.calls == [(2, 4), (1, 4)]  # windows in order, batch_size per forward
    # seq_len / num_chunks select the leading block of a token tensor
    first = math.exp(-sum(math.log(table[a, b].item()) for a, b in [(0, 1), (1, 1), (2, 0), (0, 0)]) / 4)
    assert perplexity(stub, None, tokens, seq_len=3, num_chunks=2, progress=False) == pytest.approx(first, rel=1e-6)


def test_uniform_model_has_perplexity_vocab_size():
    stub = BigramStub(torch.full((7, 7), 1 / 7))
    tokens = torch.randint(0, 7, (5, 11))
    assert perplexity(stub, None, tokens, seq_len=11, num_chunks=5, progress=False) == pytest.approx(7.0, rel=1e-6)


def test_tiny_model_matches_direct_computation():
    """Texts -> EOS-joined stream -> windows; compared with a per-window loop over the model."""
    model = tiny_model("llama")
    tok = byte_tokenizer()
    texts = ["The first document is short.", "A second one follows it, a bit longer than the first.", "Third."]
    stream = []
    for t in texts:
        if stream:
            stream.append(tok.eos_token_id)
        stream.extend(tok(t, add_special_tokens=False)["input_ids"])
    seq_len, n = 16, len(stream) // 16
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            ids = torch.tensor(stream[w * seq_len : (w + 1) * seq_len])[None]
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            for t in range(seq_len - 1):
                nll -= logp[t, ids[0, t + 1]].item()
                count += 1
    direct = math.exp(nll / count)
    got = perplexity(model, tok, texts, seq_len=seq_len, num_chunks=n, batch_size=3, progress=False)
    assert got == pytest.approx(direct, rel=1e-5)
    # num_chunks=None: every whole window of the stream
    assert perplexity(model, tok, texts, seq_len=seq_len, num_chunks=None, progress=False) == pytest.approx(
        direct, rel=1e-5
    )
    assert model.training is False


def test_restores_training_mode_and_rejects_missing_texts():
    model = tiny_model("llama", layers=1).train()
    perplexity(model, None, torch.randint(0, 256, (2, 8)), seq_len=8, num_chunks=2, progress=False)
    assert model.training
    with pytest.raises(ValueError, match="texts is required"):
        perplexity(model, None, None)
