"""Training checkpoints that resume exactly.

A checkpoint is a folder ``<checkpoint_dir>/step-<NNNNNNNN>/`` holding

- ``state.pt``: the trainable tensors by parameter name (frozen ones are not saved: resume from
  the same starting model), the optimizer, LR scheduler and grad-scaler states, the history
  (losses, learning rates, eval perplexities, tokens seen) and the run's settings;
- ``rng-rank<R>.pt``: each process's RNG states (torch CPU and CUDA, Python, NumPy);
- ``complete``: written last; a folder without it (a run killed while saving) is ignored.

The data position needs no state of its own: the blocks read at step s are a function of s
(see :mod:`.data`). A folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

STATE, COMPLETE = "state.pt", "complete"


def step_dir(checkpoint_dir: Union[str, os.PathLike], step: int) -> Path:
    return Path(checkpoint_dir) / f"step-{step:08d}"


def latest_checkpoint(checkpoint_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The complete checkpoint with the highest step under `checkpoint_dir`, or None."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).exists())
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(runtime, checkpoint_dir, step: int, state: dict, write_shards=None) -> Path:
    """Write the checkpoint of `step` (collective: every process calls it). `write_shards(folder)`,
    when given, is called by every process before the folder is marked complete (sharded state)."""
    final = step_dir(checkpoint_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if runtime.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    runtime.wait()
    torch.save(rng_state(), tmp / f"rng-rank{runtime.rank}.pt")
    if write_shards is not None:
        write_shards(tmp)
    runtime.wait()
    if runtime.is_main:
        torch.save(state, tmp / STATE)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    runtime.wait()
    return final


def load_checkpoint(path: Union[str, os.PathLike], rank: int = 0) -> tuple[dict, Optional[dict]]:
    """(state, this process's RNG states or None) of the checkpoint folder `path`."""
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete heal() checkpoint (no {COMPLETE!r} marker)")
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    rng_file = path / f"rng-rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.exists() else None
    return state, rng
