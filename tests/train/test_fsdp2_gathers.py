"""How often FSDP2 gathers each unit of a model wrapped by sharing group (2 CPU processes,
gloo): per micro-batch of a training step every block unit is gathered twice (forward and
backward), the root once, however far apart a group's members are; a forward without gradients
gathers every unit once. Each gather brings the whole unit."""

from __future__ import annotations

import torch

from .helpers import ROOT, torchrun


def test_each_unit_is_gathered_once_per_forward_and_once_per_backward(tmp_path):
    out = tmp_path / "gathers.pt"
    torchrun(str(ROOT / "tests/train/fsdp2_gather_worker.py"), str(out))
    got = torch.load(out, weights_only=True)
    groups, units, accum = got["groups"], got["units"], got["grad_accum"]

    # the model has far-apart, interleaved groups, and shard() made exactly them the units
    assert groups == [[0, 3], [1, 5]]
    assert sorted(units) == [[0, 3], [1, 5], [2], [4]]

    labels = {"-".join(map(str, u)) for u in units}
    assert got["step_calls"] == {**{u: 2 * accum for u in labels}, "root": accum}
    assert got["eval_calls"] == {**{u: 1 for u in labels}, "root": 1}
    # one gather brings the whole unit (each member block's parameters, once), never part of it
    for unit in labels:
        stored = sum(got["block_bytes"][str(i)] for i in unit.split("-"))
        per_call = got["step_bytes"][unit] / got["step_calls"][unit]
        assert stored <= per_call <= stored * 1.05, (unit, stored, per_call)
