"""Two CPU processes (torchrun + accelerate's Accelerator(cpu=True): DDP over gloo) on the same global
batch reach the same losses and parameters as one process."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.train import heal

from .helpers import ROOT, SEQ, assert_matches_one_process, tiny_pruned, token_data, torchrun


def test_two_processes_match_one_process(tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "ddp.pt"
    # `accelerate launch --cpu` starts a single process unless MPI is set up; torchrun starts
    # two, and Accelerator(cpu=True) in each joins them with gloo (DistributedType.MULTI_CPU)
    torchrun(str(ROOT / "tests/train/ddp_worker.py"), str(out), timeout=180)
    ddp = torch.load(out, weights_only=False)
    assert ddp["world_size"] == 2

    model = tiny_pruned()
    one = heal(
        model,
        token_data(64),
        steps=4,
        lr=1e-2,
        seq_len=SEQ,
        batch_size=4,
        eval_data=token_data(5, seed=2),
        eval_chunks=5,
        progress=False,
    )
    assert_matches_one_process(ddp, one, model)
