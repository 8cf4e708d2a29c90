"""Shared writing helpers: atomic output directories and safetensors with each tensor once."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"


# Written last into every directory this package writes: the names of everything in it. A folder
# may be replaced (overwrite=True) only when it holds nothing beyond what this list names.
WRITTEN_NAME = ".flexigpt-written.json"
# Folders written before that list existed: replaceable when they hold flexigpt.json and only these.
_LEGACY_NAMES = {
    WEIGHTS_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    "flexigpt.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
}
# temporary folders of a save in progress: .NAME.tmp-PID-XXXXXXXX (new) and .NAME.old-PID-XXXXXXXX
# (the replaced one, moved aside), XXXXXXXX as tempfile.mkdtemp makes it; pid-less names are from
# earlier versions
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}$")


def _entries(directory: Path) -> set[str]:
    """Every file and folder under `directory`, as relative POSIX paths."""
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")}


def _foreign(directory: Path) -> list[str]:
    """What in an existing `directory` this package did not write (empty: it may be replaced)."""
    entries = _entries(directory)
    try:
        written = set(json.loads((directory / WRITTEN_NAME).read_text())["files"])
    except FileNotFoundError:
        if "flexigpt.json" not in entries:
            return sorted(entries)
        written = _LEGACY_NAMES
    except (ValueError, KeyError, TypeError):
        return [WRITTEN_NAME + " (unreadable)"]
    return sorted(entries - written - {WRITTEN_NAME})


def check_output_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Raise unless `out` may be written: it does not exist, or is an empty directory, or (with
    overwrite=True) a directory this package wrote that holds nothing else. Never the current
    directory or one of its parents. Returns `out` as an absolute path.
    """
    out = Path(out).expanduser().absolute()
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(
            f"{out} is the current directory or a parent of it: refusing to write a model there; "
            f"name a new subfolder instead"
        )
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symlink; refusing to replace it (name a new folder)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
        foreign = _foreign(out)
        if foreign:
            raise FileExistsError(
                f"{out} holds files this package did not write ({', '.join(foreign[:3])}"
                f"{f' and {len(foreign) - 3} more' if len(foreign) > 3 else ''}); overwrite replaces only a "
                f"folder written by flexigpt_kernels with nothing added. Move them away or choose another folder"
            )
    return out


_ACTIVE: set[Path] = set()  # temporary folders of the saves in progress in this process


def _in_use(path: Path, pid: int | None) -> bool:
    """Whether the temporary folder `path` (named with `pid`) belongs to a save still running."""
    if pid is None:
        return False
    if pid == os.getpid():
        return path in _ACTIVE
    if os.name != "posix":  # no harmless liveness probe (os.kill would terminate it): keep it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(parent: Path) -> None:
    """Undo what killed saves left in `parent`: a replaced folder moved aside (.NAME.old-*) is moved
    back when NAME is missing, and every other temporary folder of a dead process is deleted."""
    if not parent.is_dir():
        return
    found = []
    for p in parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if not m or not p.is_dir() or p.is_symlink() or _in_use(p, int(m["pid"]) if m["pid"] else None):
            continue
        if m["kind"] == "old" and not ((p / WRITTEN_NAME).is_file() or (p / "flexigpt.json").is_file()):
            continue  # only a folder of ours is ever moved aside: this one is someone else's
        found.append((m["kind"], m["name"], p))
    for kind, name, p in sorted(found, key=lambda f: -f[2].stat().st_mtime):
        if kind == "old" and not os.path.lexists(parent / name):
            os.replace(p, parent / name)  # the newest complete old checkpoint goes back in place
    for _, _, p in found:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # the kernel or the filesystem cannot exchange
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the complete folder `tmp` at `out`; at every moment `out` is the old folder or the new one
    (where the platform cannot swap atomically, a kill between two renames leaves the old folder
    under .NAME.old-*, which the next save to the same parent moves back)."""
    (tmp / WRITTEN_NAME).write_text(json.dumps({"files": sorted(_entries(tmp))}, indent=1) + "\n")
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a checkpoint is an ordinary directory
    check_output_directory(out, overwrite=overwrite)  # again: it may have changed while we wrote
    if not out.is_dir() or not any(out.iterdir()):
        os.replace(tmp, out)  # onto nothing, or onto an empty directory
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}"
    _ACTIVE.add(old)
    try:
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # the old folder back in place
            raise
    finally:
        _ACTIVE.discard(old)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `out`; on success it becomes `out`.

    `out` must pass :func:`check_output_directory`: an empty or missing directory is written,
    an existing one only with overwrite=True and only when this package wrote it and nothing was
    added (the list of what was written is kept in it, in .flexigpt-written.json); never the
    current directory or a parent of it. Whatever fails, and whenever the process is killed,
    `out` holds the complete old folder or the complete new one; the temporary folders of a
    killed save are cleaned up (an old folder moved back) by the next save to the same parent.
    """
    out = check_output_directory(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    _ACTIVE.add(tmp)
    try:
        yield tmp
        _commit(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        _ACTIVE.discard(tmp)


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
