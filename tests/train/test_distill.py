"""The "hidden" distillation term: every block's output against the teacher's at its position."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.train import heal
from flexigpt_kernels.train.distill import Distiller, hidden_loss, hidden_positions

from .helpers import SEQ, tiny_llama, tiny_pruned, token_data


def _hidden_term(student, teacher, positions=None):
    d = Distiller(student, teacher, {"hidden": 1.0}, positions=positions)
    try:
        ids = token_data(2)
        with torch.no_grad():
            d.teacher_logits(ids)
            logits = student(input_ids=ids, use_cache=False).logits
        return d.terms(logits, None)["hidden"].item()
    finally:
        d.close()


def test_hidden_loss_is_the_relative_error_per_token():
    t = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    s = torch.tensor([[[3.0, 4.0 + 5.0], [0.0, 0.0]]])
    # token 0: 25 / 25 = 1; token 1: 1 / 1 = 1; token errors are averaged
    assert hidden_loss(s, t).item() == pytest.approx(1.0)
    assert hidden_loss(t, t).item() == 0.0
    with pytest.raises(ValueError, match="student"):
        hidden_loss(s[..., :1], t)


def test_hidden_is_zero_for_the_teacher_itself_and_positive_after_pruning():
    teacher = tiny_llama()
    assert _hidden_term(tiny_llama(), teacher) == pytest.approx(0.0, abs=1e-6)
    assert _hidden_term(tiny_pruned(), teacher) > 1e-3


def test_hidden_on_a_dropped_model_matches_kept_blocks_to_their_original_index():
    teacher = tiny_llama()
    dropped = tiny_pruned("drop", blocks=(3,))  # kept blocks 0, 1, 2 are the teacher's own
    with pytest.raises(ValueError, match="distill_positions"):
        hidden_positions(dropped, teacher)
    assert _hidden_term(dropped, teacher, positions=[0, 1, 2]) == pytest.approx(0.0, abs=1e-6)
    assert _hidden_term(dropped, teacher, positions=[1, 2, 3]) > 1e-3
    with pytest.raises(ValueError, match="out of range"):
        hidden_positions(dropped, teacher, [0, 1, 4])
    with pytest.raises(ValueError, match="entries"):
        hidden_positions(dropped, teacher, [0, 1])


def test_heal_adds_the_hidden_term_for_both_methods():
    teacher = tiny_llama()
    for model, kw in (
        (tiny_pruned(), dict(trainable="adapters")),
        (tiny_pruned("drop", blocks=(1, 2)), dict(trainable="lora_kept", lora_rank=2, distill_positions=[0, 3])),
    ):
        report = heal(
            model,
            token_data(8),
            steps=2,
            lr=1e-2,
            teacher=teacher,
            distill={"hidden": 0.5},
            seq_len=SEQ,
            batch_size=4,
            progress=False,
            **kw,
        )
        terms = report.loss_terms
        assert set(terms) == {"lm", "hidden"} and all(v > 0 for v in terms["hidden"])
        for i in range(2):
            assert report.losses[i] == pytest.approx(terms["lm"][i] + 0.5 * terms["hidden"][i], rel=1e-5)
