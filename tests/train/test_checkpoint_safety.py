"""Training checkpoints are data, never code: a crafted state.pt or rng file in a checkpoint
folder is refused on resume and its payload does not run."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from flexigpt_kernels.train import heal
from flexigpt_kernels.train.checkpoint import COMPLETE, STATE, load_checkpoint, rng_state, set_rng_state

from .helpers import SEQ, tiny_pruned, token_data

_PLAIN_STATE = {"step": 1, **{k: {} for k in ("settings", "params", "optimizer", "scheduler", "scaler", "history")}}


class _Payload:
    """Unpickling this creates `marker` (what a hostile file could do instead: anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _hostile_checkpoint(root: Path, marker: Path, file: str = STATE, legacy: bool = False) -> Path:
    step = root / "step-00000002"
    step.mkdir(parents=True)
    (step / COMPLETE).write_text('{"step": 2}')
    payload = {"step": 2, "evil": _Payload(marker)}
    if legacy:  # a plain (non-zip) pickle
        with open(step / file, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, step / file)
    if file != STATE:
        torch.save(_PLAIN_STATE, step / STATE)
    return step


def test_the_payload_is_live(tmp_path):
    """The crafted file would run code under an unsafe load (so the tests below mean something)."""
    marker = tmp_path / "pwned"
    step = _hostile_checkpoint(tmp_path / "ckpt", marker)
    torch.load(step / STATE, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "plain-pickle"])
@pytest.mark.parametrize("file", [STATE, "rng-rank0.pt"])
def test_load_checkpoint_refuses_code_and_does_not_run_it(tmp_path, file, legacy):
    marker = tmp_path / "pwned"
    step = _hostile_checkpoint(tmp_path / "ckpt", marker, file, legacy)
    with pytest.raises(ValueError, match=f"{file}: refusing to load"):
        load_checkpoint(step)
    assert not marker.exists()


def test_heal_resume_from_a_hostile_folder_fails_clearly(tmp_path):
    marker = tmp_path / "pwned"
    _hostile_checkpoint(tmp_path / "ckpt", marker)
    with pytest.raises(ValueError, match=r"state\.pt: refusing to load"):
        heal(
            tiny_pruned(),
            token_data(16),
            steps=2,
            lr=1e-2,
            seq_len=SEQ,
            batch_size=2,
            checkpoint_dir=tmp_path / "ckpt",
            resume=True,
            progress=False,
        )
    assert not marker.exists()


def test_a_state_of_the_wrong_shape_is_a_value_error(tmp_path):
    step = tmp_path / "step-00000001"
    step.mkdir()
    (step / COMPLETE).write_text("{}")
    torch.save([1, 2], step / STATE)
    with pytest.raises(ValueError, match="not a heal"):
        load_checkpoint(step)


def test_a_sharded_checkpoint_holds_its_tensors_in_dcp_not_in_state(tmp_path):
    """Under FSDP2 state.pt has no params/optimizer (they are the dcp/ shards): it loads; the same
    state without dcp/ is refused."""
    step = tmp_path / "step-00000002"
    step.mkdir()
    (step / COMPLETE).write_text("{}")
    torch.save({k: v for k, v in _PLAIN_STATE.items() if k not in ("params", "optimizer")}, step / STATE)
    with pytest.raises(ValueError, match=r"not a heal\(\) training state \(missing \['params', 'optimizer'\]\)"):
        load_checkpoint(step)
    (step / "dcp").mkdir()
    state, rng = load_checkpoint(step)
    assert state["step"] == 1 and "params" not in state and rng is None


def test_damaged_state_is_a_value_error(tmp_path):
    step = tmp_path / "step-00000001"
    step.mkdir()
    (step / COMPLETE).write_text("{}")
    (step / STATE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="state.pt"):
        load_checkpoint(step)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_rng_files_of_earlier_versions_still_load(tmp_path):
    """Earlier versions stored NumPy's state as an ndarray: exactly that is allow-listed."""
    step = tmp_path / "step-00000001"
    step.mkdir()
    (step / COMPLETE).write_text("{}")
    torch.save(_PLAIN_STATE, step / STATE)
    np.random.seed(5)
    torch.save(
        {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        step / "rng-rank0.pt",
    )
    expected = np.random.rand()
    _, rng = load_checkpoint(step)
    set_rng_state(rng)
    assert np.random.rand() == expected


def _trained(extra: bool = False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), *([torch.nn.Linear(2, 2)] if extra else [])
    )
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sharded_state_round_trips_and_a_missing_tensor_is_a_value_error(tmp_path):
    from flexigpt_kernels.train.sharded_state import load_shards, save_shards

    model, optimizer = _trained()
    save_shards(tmp_path, model, optimizer)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fresh[0].weight.requires_grad_(False)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    assert not torch.equal(fresh[1].weight, model[1].weight)
    load_shards(tmp_path, fresh, fresh_opt)
    torch.testing.assert_close(fresh[1].weight, model[1].weight)
    torch.testing.assert_close(
        fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )

    bigger, bigger_opt = _trained(extra=True)
    with pytest.raises(ValueError, match=r"dcp lacks trainable tensors \['2.bias', '2.weight'\]"):
        load_shards(tmp_path, bigger, bigger_opt)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3))
    wider[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"dcp holds tensors of other shapes .*1.bias \(2,\) vs \(3,\)"):
        load_shards(tmp_path, wider, torch.optim.AdamW([p for p in wider.parameters() if p.requires_grad]))


def test_resuming_with_another_adapter_rank_is_a_value_error(tmp_path):
    kwargs = dict(steps=2, lr=1e-2, seq_len=SEQ, batch_size=2, checkpoint_dir=tmp_path / "ckpt", progress=False)
    heal(tiny_pruned(rank=4), token_data(16), **kwargs)
    with pytest.raises(
        ValueError, match=r"resume: .*step-00000002 holds tensors of other shapes.*lora_a \(4, 64\) vs \(2, 64\)"
    ):
        heal(tiny_pruned(rank=2), token_data(16), resume=True, **kwargs)
