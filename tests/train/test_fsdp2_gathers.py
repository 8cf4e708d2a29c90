"""How often FSDP2 gathers each unit of a model wrapped by sharing group (2 CPU processes,
gloo), as flexigpt_kernels.train.shard documents it: per micro-batch of a training step every
unit once in forward, however far apart a group's members are; once more in backward every
block unit a gradient flows through, plus the unit FSDP2 prefetches before the first of them;
the root once. A forward without gradients gathers every unit once. Each gather brings the
whole unit."""

from __future__ import annotations

import pytest
import torch

from .helpers import ROOT, torchrun


def gathers(tmp_path, model: str) -> dict:
    out = tmp_path / "gathers.pt"
    torchrun(str(ROOT / "tests/train/fsdp2_gather_worker.py"), str(out), model)
    return torch.load(out, weights_only=True)


def assert_whole_units_gathered(got: dict):
    for unit, calls in got["step_calls"].items():
        if unit == "root":
            continue
        stored = sum(got["block_bytes"][i] for i in unit.split("-"))
        per_call = got["step_bytes"][unit] / calls
        assert stored <= per_call <= stored * 1.05, (unit, stored, per_call)  # FSDP2 pads each shard


@pytest.mark.parametrize(
    "model, groups, units, step",
    [
        # far-apart groups that interleave: 0 _ _ 3 and 1 _ _ _ 5; gradients flow from block 1
        # on, so all four units are gathered again in backward (block unit 2 included)
        ("interleaved", [[0, 3], [1, 5]], [[0, 3], [1, 5], [2], [4]],
         {"0-3": 2, "1-5": 2, "2": 2, "4": 2, "root": 1}),
        # the first adapter is in block 4: blocks 0-2 are gathered in forward only, block 3 is
        # prefetched in backward before the group {4, 5}
        ("frozen_prefix", [[4, 5]], [[0], [1], [2], [3], [4, 5]],
         {"0": 1, "1": 1, "2": 1, "3": 2, "4-5": 2, "root": 1}),
    ],
)  # fmt: skip
def test_gathers_per_unit_per_micro_batch(tmp_path, model, groups, units, step):
    got = gathers(tmp_path, model)
    assert got["groups"] == groups
    assert sorted(got["units"]) == units  # shard() made the sharing groups the units
    accum = got["grad_accum"]
    assert got["step_calls"] == {unit: n * accum for unit, n in step.items()}
    assert got["eval_calls"] == {unit: 1 for unit in step}
    assert_whole_units_gathered(got)
