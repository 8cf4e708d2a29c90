"""Training checkpoints that resume exactly.

A checkpoint is a folder ``<checkpoint_dir>/step-<NNNNNNNN>/`` holding

- ``state.pt``: the trainable tensors by parameter name (frozen ones are not saved: resume from
  the same starting model), the optimizer, LR scheduler and grad-scaler states, the history
  (losses, learning rates, eval perplexities, tokens seen) and the run's settings;
- ``rng-rank<R>.pt``: each process's RNG states (torch CPU and CUDA, Python, NumPy);
- ``dcp/`` instead of the tensors in ``state.pt`` for a run sharded with FSDP2: every process's
  shard of the trainable tensors and optimizer state (see :mod:`.sharded_state`);
- ``complete``: written last; a folder without it (a run killed while saving) is ignored.

Both files are read with ``torch.load(weights_only=True)``: only tensors and plain containers
(dict, list, tuple, str, numbers) are accepted, so a crafted file in a checkpoint folder cannot
run code on resume; it is refused with a ValueError. The RNG states are stored as tensors and
plain values for that reason (NumPy's state array as an int64 tensor).

The data position needs no state of its own: the blocks read at step s are a function of s
(see :mod:`.data`). A folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from .sharded_state import has_shards

STATE, COMPLETE = "state.pt", "complete"


def step_dir(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    return Path(checkpoint_dir) / f"step-{step:08d}"


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `checkpoint_dir`, or None."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).exists())
    return found[-1] if found else None


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
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

        kind, keys, *rest = state["numpy"]
        if isinstance(keys, torch.Tensor):
            keys = keys.numpy().astype(np.uint32)
        np.random.set_state((kind, keys, *rest))


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


def load_checkpoint(path: str | os.PathLike, rank: int = 0) -> tuple[dict, dict | None]:
    """(state, this process's RNG states or None) of the checkpoint folder `path`."""
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise FileNotFoundError(f"{path} is not a complete heal() checkpoint (no {COMPLETE!r} marker)")
    state = _safe_load(path / STATE)
    # params/optimizer live in state.pt, or in the sharded dcp/ folder written under FSDP2
    needed = [k for k in _STATE_KEYS if not (has_shards(path) and k in ("params", "optimizer"))]
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path / STATE} is not a heal() training state (missing {missing})")
    rng_file = path / f"rng-rank{rank}.pt"
    rng = _safe_load(rng_file, legacy_numpy=True) if rng_file.exists() else None
    if rng is not None and not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)):
        raise ValueError(f"{rng_file} is not a heal() RNG state")
    return state, rng


_STATE_KEYS = ("step", "settings", "params", "optimizer", "scheduler", "scaler", "history")
# what NumPy's RNG state array pickles as (RNG files written before the state became a tensor)
_LEGACY_NUMPY_GLOBALS = {
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
}


def _safe_load(file: Path, legacy_numpy: bool = False):
    """torch.load(weights_only=True): tensors and plain containers only, never code.

    legacy_numpy: also accept a NumPy uint32 array (exactly the globals it needs), as in RNG
    files of earlier versions. Anything else is refused with a ValueError naming the file.
    """
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        error = e
    except (RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"{file}: damaged or not a torch file ({e})") from None
    if legacy_numpy:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        except Exception:  # not a zip file: no legacy RNG file of ours
            unsafe = {"?"}
        if unsafe and unsafe <= _LEGACY_NUMPY_GLOBALS:
            import numpy as np

            allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
            with torch.serialization.safe_globals(allowed):
                return torch.load(file, map_location="cpu", weights_only=True)
    detail = next((line.strip() for line in str(error).splitlines() if "Unsupported" in line), "")
    raise ValueError(
        f"{file}: refusing to load it: it holds objects other than tensors and plain containers, "
        f"which could run code (a file not written by heal(), or a crafted one)"
        f"{': ' + detail if detail else ''}"
    ) from None
