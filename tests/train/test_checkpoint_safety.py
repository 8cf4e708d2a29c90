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
        heal(tiny_pruned(), token_data(16), steps=2, lr=1e-2, seq_len=SEQ, batch_size=2,
             checkpoint_dir=tmp_path / "ckpt", resume=True, progress=False)
    assert not marker.exists()


def test_a_state_of_the_wrong_shape_is_a_value_error(tmp_path):
    step = tmp_path / "step-00000001"
    step.mkdir()
    (step / COMPLETE).write_text("{}")
    torch.save([1, 2], step / STATE)
    with pytest.raises(ValueError, match="not a heal"):
        load_checkpoint(step)


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
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               step / "rng-rank0.pt")
    expected = np.random.rand()
    _, rng = load_checkpoint(step)
    set_rng_state(rng)
    assert np.random.rand() == expected
