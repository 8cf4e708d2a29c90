"""Checkpoints resume exactly: an interrupted run continued from its checkpoint ends with the
same parameters, losses, learning rates and eval history as the uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.presets import PAPER
from flexigpt_kernels.train import heal
from flexigpt_kernels.train.checkpoint import latest_checkpoint

from .helpers import SEQ, tiny_pruned, token_data

ARGS = dict(
    steps=6, lr=1e-2, seq_len=SEQ, batch_size=2, grad_accum=2, warmup=2, eval_every=2, eval_chunks=4, progress=False
)


@pytest.mark.parametrize("trainable", ["adapters", "lora_kept"])
def test_resume_from_the_middle_equals_the_uninterrupted_run(tmp_path, trainable):
    extra = {"trainable": trainable, "lora_rank": 2} if trainable == "lora_kept" else PAPER.heal_kwargs()
    method = "drop" if trainable == "lora_kept" else "flexigpt"
    data, heldout = token_data(40), token_data(8, seed=3)

    full = tiny_pruned(method)
    ref = heal(full, data, eval_data=heldout, checkpoint_dir=tmp_path / "full", checkpoint_every=3, **ARGS, **extra)
    assert [p.rsplit("/", 1)[-1] for p in ref.checkpoints] == ["step-00000003", "step-00000006"]

    # the "interrupted" run: its checkpoint at step 3 is all that survives
    part = tmp_path / "part"
    (part).mkdir()
    (tmp_path / "full" / "step-00000003").rename(part / "step-00000003")
    resumed_model = tiny_pruned(method)
    rep = heal(resumed_model, data, eval_data=heldout, checkpoint_dir=part, resume=True, **ARGS, **extra)
    assert rep.resumed_from == 3
    assert rep.losses == ref.losses and rep.lrs == ref.lrs
    assert rep.eval_perplexities == ref.eval_perplexities
    assert rep.tokens_seen == ref.tokens_seen
    for (n, p), (_, q) in zip(full.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(p, q), n
    assert latest_checkpoint(part).name == "step-00000006"


def test_resume_refuses_different_settings(tmp_path):
    data = token_data(40)
    heal(tiny_pruned(), data, steps=2, lr=1e-2, seq_len=SEQ, batch_size=2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="total_steps"):
        heal(
            tiny_pruned(),
            data,
            steps=4,
            lr=1e-2,
            seq_len=SEQ,
            batch_size=2,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_incomplete_checkpoints_are_ignored(tmp_path):
    (tmp_path / "step-00000009").mkdir()  # killed while saving: no "complete" marker
    assert latest_checkpoint(tmp_path) is None
