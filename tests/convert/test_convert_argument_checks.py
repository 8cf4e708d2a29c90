"""prune() / extend() check every argument before touching the model: NaN / Inf knobs, bad
ranks, ratios and indices, an already converted model, an empty calibration source - each a
ValueError naming the argument, and the model is left exactly as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flexigpt_kernels.convert.calibration import token_batches
from flexigpt_kernels.convert.extend import extend
from flexigpt_kernels.convert.prune import prune

from .conftest import tiny_model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def _assert_untouched(model, snapshot):
    state, types = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m).__name__ for m in model.modules()] == types
    assert getattr(model, "flexigpt_meta", None) is None


TOKENS = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))

BAD_PRUNE = {
    "scale-nan": (dict(scale=math.nan), "scale: expected a finite number"),
    "scale-inf": (dict(scale=math.inf), "scale: expected a finite number"),
    "scale-zero": (dict(scale=0.0), "scale: must be non-zero"),
    "scale-string": (dict(scale="1"), "scale: expected a finite number"),
    "gamma-nan": (dict(gamma_init=math.nan), "gamma_init: expected a finite number"),
    "gamma-inf": (dict(gamma_init=-math.inf), "gamma_init: expected a finite number"),
    "ratio-nan": (dict(blocks=None, ratio=math.nan), "ratio"),
    "ratio-one": (dict(blocks=None, ratio=1.0), "ratio"),
    "rank-nan": (dict(rank=math.nan), "rank"),
    "rank-zero": (dict(rank=0), "rank"),
    "rank-too-big-fraction": (dict(rank=1.5), "rank"),
    "blocks-out-of-range": (dict(blocks=[1, 9]), "blocks: indices"),
    "blocks-all": (dict(blocks=list(range(6))), "blocks: cannot prune all"),
    "seq-len-zero": (dict(seq_len=0), "seq_len"),
    "num-samples-float": (dict(num_samples=2.5), "num_samples"),
    "batch-size-zero": (dict(batch_size=0), "batch_size"),
    "combine": (dict(combine="mean"), "combine"),
    "output-norm-string": (dict(output_norm="no"), "output_norm"),
}


@pytest.mark.parametrize("case", sorted(BAD_PRUNE))
def test_prune_rejects_a_bad_argument_before_touching_the_model(case):
    kwargs, message = BAD_PRUNE[case]
    model = tiny_model()
    before = _snapshot(model)
    args = dict(blocks=[1, 2], rank=4, progress=False, seq_len=16, num_samples=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        prune(model, TOKENS, **args)
    _assert_untouched(model, before)


@pytest.mark.parametrize("method", ["flexigpt", "drop"])
def test_pruning_twice_is_refused_and_leaves_the_model_as_it_was(method):
    model, _ = prune(tiny_model(), None, blocks=[1, 2], rank=4, method=method, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    meta = dict(model.flexigpt_meta)
    with pytest.raises(ValueError, match="already converted"):
        prune(model, None, blocks=[3, 4], rank=4, method="flexigpt", progress=False)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == modules
    assert model.flexigpt_meta == meta


def test_numpy_scalars_are_accepted_and_stored_as_floats():
    model, _ = prune(
        tiny_model(), None, blocks=[1], rank=4, scale=np.float32(0.5), gamma_init=np.float64(0.02), progress=False
    )
    assert type(model.flexigpt_meta["scale"]) is float and model.flexigpt_meta["scale"] == 0.5
    assert type(model.flexigpt_meta["gamma_init"]) is float


BAD_EXTEND = {
    "scale-nan": (dict(scale=math.nan), "scale: expected a finite number"),
    "scale-zero": (dict(scale=0), "scale: must be non-zero"),
    "gamma-inf": (dict(gamma_init=math.inf), "gamma_init: expected a finite number"),
    "eps-zero": (dict(norm_eps=0.0), "norm_eps: must be > 0"),
    "eps-nan": (dict(norm_eps=math.nan), "norm_eps: expected a finite number"),
    "rank-nan": (dict(rank=math.nan), "rank"),
    "repeats-zero": (dict(repeats=0), "repeats"),
    "output-norm-int": (dict(output_norm=1), "output_norm"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXTEND))
def test_extend_rejects_a_bad_argument_before_touching_the_model(case):
    kwargs, message = BAD_EXTEND[case]
    model = tiny_model()
    before = _snapshot(model)
    requires_grad = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        extend(model, "1:3", **{"rank": 4, **kwargs})
    _assert_untouched(model, before)
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    assert model.config.num_hidden_layers == 6


def test_extend_refuses_a_pruned_model():
    model, _ = prune(tiny_model(), None, blocks=[1, 2], rank=4, progress=False)
    with pytest.raises(ValueError, match="replacement blocks|already converted"):
        extend(model, "3:5")


# --- calibration sources ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["", "   ", "\n\t"])
def test_an_empty_source_string_never_reads_the_current_folder(source, word_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "private.txt").write_text(" ".join(f"w{i % 100}" for i in range(5000)))
    with pytest.raises(ValueError, match="source: empty calibration source"):
        token_batches(source, word_tokenizer, seq_len=8, num_samples=2)
    model = tiny_model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="source: empty calibration source"):
        prune(model, source, tokenizer=word_tokenizer, blocks=[1], rank=4, seq_len=8, num_samples=2, progress=False)
    _assert_untouched(model, before)


def test_whitespace_only_texts_are_no_calibration_text(word_tokenizer):
    with pytest.raises(ValueError, match="no calibration text"):
        token_batches(["", "  ", "\n"], word_tokenizer, seq_len=8, num_samples=2)
    with pytest.raises(ValueError, match="no calibration text"):
        token_batches([], word_tokenizer, seq_len=8, num_samples=2)


def test_fewer_tokens_than_one_sequence(word_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="3 tokens, fewer than one sequence of seq_len=8"):
        token_batches(["w1 w2 w3"], word_tokenizer, seq_len=8, num_samples=2)
    (tmp_path / "short.txt").write_text("w1 w2\n")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        token_batches(tmp_path / "short.txt", word_tokenizer, seq_len=8, num_samples=2)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        token_batches(torch.arange(5), seq_len=8, num_samples=1)
