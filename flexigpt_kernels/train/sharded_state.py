"""Trainable state of heal() as a sharded checkpoint (torch.distributed.checkpoint).

Under FSDP2 every process holds a shard of each trainable tensor and of its optimizer state.
They are written by every process into ``<step folder>/dcp/`` with ``dcp.save`` (no process
gathers the model) and read back with ``dcp.load``, which reshards: a run saved by N processes
resumes on M processes, or on one process without torch.distributed. Frozen tensors (the
shared base weights) are not saved: resume from the same starting model, as in .checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from torch.optim import Optimizer

SHARDS = "dcp"

__all__ = ["SHARDS", "has_shards", "load_shards", "save_shards"]


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # loading: the frozen tensors are absent on purpose (strict=False), the trainable ones are checked below
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_shards(folder: str | os.PathLike, model: nn.Module, optimizer: Optimizer) -> None:
    """Write `model`'s trainable tensors and `optimizer`'s state under folder/dcp (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=Path(folder) / SHARDS)


def has_shards(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SHARDS).is_dir()


def load_shards(folder: str | os.PathLike, model: nn.Module, optimizer: Optimizer) -> None:
    """Load folder/dcp into `model` and `optimizer` in place, resharding to this run's layout.
    ValueError naming the folder when it lacks one of `model`'s trainable tensors or holds one
    of another shape."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    # checked before dcp.load, which would raise a CheckpointException (a BaseException) instead;
    # dcp flattens the nested state into "model.<parameter name>", "optimizer.state...."
    stored = dcp.FileSystemReader(Path(folder) / SHARDS).read_metadata().state_dict_metadata
    missing = sorted(name for name in model_sd if f"model.{name}" not in stored)
    if missing:
        raise ValueError(
            f"resume: {Path(folder) / SHARDS} lacks trainable tensors {missing[:5]}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}; resume with the "
            "same model and trainable set"
        )
    wrong = [
        f"{name} {tuple(stored[f'model.{name}'].size)} vs {tuple(t.shape)}"
        for name, t in model_sd.items()
        if tuple(getattr(stored[f"model.{name}"], "size", t.shape)) != tuple(t.shape)
    ]  # global shapes
    if wrong:
        raise ValueError(
            f"resume: {Path(folder) / SHARDS} holds tensors of other shapes than this model's "
            f"({'; '.join(wrong[:3])}); resume from the same starting model"
        )
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=Path(folder) / SHARDS)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_options(strict=False),
    )
