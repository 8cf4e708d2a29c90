"""Shared writing helpers: atomic output directories and safetensors with each tensor once."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `out`; on success it becomes `out`.

    An existing empty directory is replaced; an existing non-empty one only with overwrite=True
    (the old one is moved aside, the new one renamed into place, then the old one deleted).
    On failure the temporary directory is removed and `out` is left as it was.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint is an ordinary directory
        old = None
        if out.is_dir():
            if any(out.iterdir()):
                if not overwrite:  # appeared while we were writing
                    raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old)  # rename onto an empty directory is allowed
            else:
                out.rmdir()
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_class(model: nn.Module) -> type:
    """The model's own class (FSDP2 makes an `FSDP<Class>` subclass of a wrapped module)."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    if issubclass(cls, FSDPModule):
        cls = next(b for b in cls.__bases__ if b is not FSDPModule)
    return cls


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else (t.device, id(t))


def dedupe_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop names that alias an earlier name's tensor (same storage, offset, shape and stride),
    e.g. tied input/output embeddings. Returns (tensors to store, {dropped name: kept name}).

    The first name in state-dict order is kept: for every supported family that is the input
    embedding, which is also what Hugging Face keeps for tied weights. Partially overlapping
    views (never produced by the supported families) are stored as separate copies.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set = set()
    for name, t in state_dict.items():
        t = t.detach()
        view = (_storage_key(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in by_view:
            aliases[name] = by_view[view]
            continue
        by_view[view] = name
        if _storage_key(t) in storages:
            t = t.clone()  # another view of a stored storage: safetensors refuses aliasing
        storages.add(_storage_key(t))
        kept[name] = t.contiguous()
    return kept, aliases


def save_tensors(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """Write `state_dict` to `path` (safetensors, CPU tensors, each tensor once). Returns aliases."""
    tensors, aliases = dedupe_state_dict(state_dict)
    save_file({k: v.to("cpu") for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return aliases


def dominant_dtype(tensors) -> torch.dtype | None:
    """The floating dtype holding the most elements (None when there is no floating tensor)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else None


def write_hf_files(directory: Path, model: nn.Module, dtype: torch.dtype | None, tokenizer=None) -> None:
    """config.json (the model's config, architectures and dtype set), generation_config.json
    when the model has one, and the tokenizer when given."""
    config = copy.deepcopy(model.config)
    config.architectures = [model_class(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
