"""One way to get a model, and one way to name text, from what a user typed.

:func:`load_model` turns a model *source* into a model:

- ``None`` or ``"default"``: the embedded SmolLM2-135M-Instruct (``assets.load_default_model``);
- a folder holding ``flexigpt.json``: a checkpoint of this package (``io.from_pretrained``);
- a folder holding ``config.json``: a plain Hugging Face causal LM (read locally only);
- any other string shaped like a hub id (``name`` or ``org/name``): the Hugging Face hub.

A string that looks like a path (absolute, ``./``, ``../``, ``~``, a trailing slash, more than
one ``/``) and does not exist is reported as a missing path, never as a hub id. Nothing read is
executed: ``trust_remote_code`` is never passed.

:func:`resolve_data` turns a text *source* into what ``token_batches`` / ``heal`` /
``perplexity`` read: ``None`` or ``"default"`` become the embedded texts of a split
(``assets.default_texts``), a local file or folder is checked (exists, is readable, holds a
supported non-empty file), a dataset name is checked against the hub (offline setting, then the
dataset's metadata). Texts, rows and token tensors pass through unchanged.

Both raise ValueError / FileNotFoundError / NotADirectoryError / PermissionError naming the
argument (``model:``, ``data:``) for bad input, before any weight is read where possible.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .manifest import torch_dtype

__all__ = [
    "DEFAULT",
    "LoadedModel",
    "load_model",
    "load_tokenizer_of",
    "locate_model",
    "looks_like_path",
    "no_init_weights",
    "resolve_data",
]

DEFAULT = "default"
# a hub repository id: "name" or "org/name" (letters, digits, "-", "_", ".")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def no_init_weights():
    """Context manager skipping transformers' weight initialisation (every tensor is loaded
    right after); a no-op where transformers has no such switch."""
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights as skip
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights as skip
        except ImportError:
            return contextlib.nullcontext()
    return skip()


def looks_like_path(source: str) -> bool:
    """True when `source` can only be meant as a local path (it is not a hub id)."""
    s = str(source)
    return (
        os.path.isabs(s)
        or s.startswith((".", "~"))
        or s.endswith(("/", os.sep))
        or "\\" in s
        or _HUB_ID.match(s) is None
    )


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        return True
    return bool(constants.HF_HUB_OFFLINE)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class LoadedModel:
    """What :func:`load_model` returns.

    model: the causal LM, in eval mode. tokenizer: its tokenizer, or None when the source has
    none (token-tensor sources still work). source: "default", the folder's absolute path or
    the hub id. kind: "default", "flexigpt" (a checkpoint of this package), "huggingface" (a
    local folder) or "hub"."""

    model: torch.nn.Module
    tokenizer: Any
    source: str
    kind: str


def _tokenizer(where: str, local: bool, converted: bool = False):
    """The tokenizer at `where`, or None when there is none (or it cannot be read)."""
    if local and not any((Path(where) / n).is_file() for n in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    from .checkpoint import load_tokenizer

    try:
        if converted:  # never runs (or asks whether to run) the checkpoint's custom code
            return load_tokenizer(where)
        return AutoTokenizer.from_pretrained(where, local_files_only=local)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer: the model still loads
        return None


def _hf_model(where: str, dtype, local: bool):
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    with _damaged_weights_are_value_errors(where):
        return AutoModelForCausalLM.from_pretrained(where, local_files_only=local, **kwargs)


@contextlib.contextmanager
def _damaged_weights_are_value_errors(where: str):
    """safetensors' error for a damaged weights file becomes a ValueError naming the folder."""
    try:
        yield
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError":
            raise ValueError(f"model: {where}: the weights file cannot be read ({_one_line(exc)})") from exc
        raise


def locate_model(source: str | os.PathLike | None = DEFAULT, *, allow_converted: bool = True) -> tuple[str, str]:
    """(kind, where) of a model source without reading any weight: ("default", "default"),
    ("flexigpt", absolute folder), ("huggingface", absolute folder) or ("hub", hub id).
    Raises what :func:`load_model` raises for a missing path, a file, a folder without a model,
    a converted checkpoint when allow_converted is False, or a hub id while the hub is offline."""
    from .checkpoint import FLEXIGPT_CONFIG_NAME

    if source is None or (isinstance(source, str) and source == DEFAULT):
        return "default", DEFAULT
    text = os.fspath(source)
    if not text.strip():
        raise ValueError("model: empty; give a folder, a hub id or 'default'")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model: {text} is a file, not a model folder")
        if (path / FLEXIGPT_CONFIG_NAME).is_file():
            if not allow_converted:
                raise ValueError(
                    f"model: {text} is a FlexiGPT-converted checkpoint; the dense source model is needed here"
                )
            return "flexigpt", str(path.resolve())
        if (path / "config.json").is_file():
            return "huggingface", str(path.resolve())
        raise ValueError(f"model: {text} holds neither {FLEXIGPT_CONFIG_NAME} nor config.json: not a model folder")
    if looks_like_path(text) or isinstance(source, os.PathLike):
        raise FileNotFoundError(f"model: {text} does not exist")
    if _hub_offline():
        raise FileNotFoundError(
            f"model: {text!r} is not a local folder, and the Hugging Face hub is offline (HF_HUB_OFFLINE is set)"
        )
    return "hub", text


def load_model(
    source: str | os.PathLike | None = DEFAULT,
    *,
    dtype=None,
    device=None,
    tokenizer: bool = True,
    allow_converted: bool = True,
) -> LoadedModel:
    """Load a causal LM from "default", a folder or a hub id (see the module doc).

    dtype: torch dtype or its name; None keeps the source's (float32 for "default").
    device: where the model goes (default: the CPU). tokenizer: also load the tokenizer.
    allow_converted: False refuses a checkpoint of this package (for callers that need the
    dense source model).

    Raises FileNotFoundError for a missing path (or a hub id the hub cannot provide, offline
    included), NotADirectoryError for a file, ValueError for a folder that holds no model or a
    damaged one (see :func:`locate_model`, which checks all but damage without reading weights).
    """
    dt = None if dtype is None else torch_dtype(dtype, "dtype")
    kind, where = locate_model(source, allow_converted=allow_converted)
    if kind == "default":
        from ..assets import load_default_model

        model, tok = load_default_model(dtype=dt or torch.float32)
        return _finish(LoadedModel(model, tok if tokenizer else None, DEFAULT, kind), device)
    if kind == "flexigpt":
        from .checkpoint import from_pretrained

        with _damaged_weights_are_value_errors(where):
            model = from_pretrained(where, dtype=dt)
    elif kind == "huggingface":
        model = _hf_model(where, dt, local=True)
    else:
        try:
            model = _hf_model(where, dt, local=False)
        except OSError as exc:
            raise FileNotFoundError(
                f"model: {where!r} is not a local folder, and the Hugging Face hub could not "
                f"provide it ({_one_line(exc)})"
            ) from exc
    tok = _tokenizer(where, local=kind != "hub", converted=kind == "flexigpt") if tokenizer else None
    return _finish(LoadedModel(model, tok, where, kind), device)


def _finish(loaded: LoadedModel, device) -> LoadedModel:
    if device is not None:
        loaded.model.to(device)
    loaded.model.eval()
    return loaded


# ----------------------------------------------------------------------------- text sources


def resolve_data(source: Any = DEFAULT, split: str = "calibration", *, what: str = "data") -> Any:
    """What a text source names, checked (see the module doc).

    None / "default": the embedded texts of `split` ("calibration": Wikipedia sample,
    "heldout": news text). A path: its string, once it is known to exist, be readable and hold
    at least one non-empty .txt/.jsonl/.json/.parquet file. A dataset name ("name" or
    "org/name[:config]"): returned unchanged once the hub has its metadata (not offline, the
    dataset exists). Texts, rows and token tensors: returned unchanged. `what` names the
    argument in errors.
    """
    if source is None or (isinstance(source, str) and source == DEFAULT):
        from ..assets import default_texts

        return default_texts(split)
    if not isinstance(source, (str, os.PathLike)):
        return source
    text = os.fspath(source)
    if not text.strip():
        raise ValueError(f"{what}: empty; give a file, a folder, a dataset name or 'default'")
    path = Path(text).expanduser()
    if path.exists():
        _check_local(path, what)
        return str(path)
    if looks_like_path(text) or isinstance(source, os.PathLike):
        raise FileNotFoundError(f"{what}: {text} does not exist")
    if _hub_offline():
        raise FileNotFoundError(
            f"{what}: {text!r} is not a local file or folder, and the Hugging Face hub is "
            "offline (HF_HUB_OFFLINE is set)"
        )
    try:  # what load_dataset reads first (metadata, no data): fails here, not minutes later
        import datasets

        name, _, config = text.partition(":")
        datasets.load_dataset_builder(name, config or None)
    except Exception as exc:  # noqa: BLE001 - unreachable, unknown, gated: all mean "cannot read it"
        raise FileNotFoundError(
            f"{what}: {text!r} is not a local file or folder, and the dataset hub could not "
            f"provide it ({_one_line(exc)})"
        ) from exc
    return text


def _check_local(path: Path, what: str) -> None:
    from ..convert.calibration import LOCAL_EXTENSIONS

    kinds = "/".join(sorted(LOCAL_EXTENSIONS))
    if path.is_file():
        if path.suffix.lower() not in LOCAL_EXTENSIONS:
            raise ValueError(f"{what}: {path} is a {path.suffix or 'suffix-less'} file; expected {kinds}")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_EXTENSIONS)
        if not files:
            raise ValueError(f"{what}: no {kinds} file under {path}")
    for f in files:
        if not os.access(f, os.R_OK):
            raise PermissionError(f"{what}: {f} is not readable")
    if all(_empty(f) for f in files):
        raise ValueError(f"{what}: {path} holds no text (empty or whitespace only)")


def _empty(path: Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return True
    if path.suffix.lower() == ".parquet" or size > 1 << 20:
        return False
    try:
        return not path.read_bytes().strip()
    except OSError:
        return False


def load_tokenizer_of(source: str | os.PathLike | None):
    """The tokenizer of a model source ("default", a folder or a hub id) without loading the
    model (the embedded default's comes with it), or None when there is none."""
    if source is None or source == DEFAULT:
        from ..assets import load_default_model

        return load_default_model()[1]
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        from .checkpoint import FLEXIGPT_CONFIG_NAME

        return _tokenizer(str(path), local=True, converted=(path / FLEXIGPT_CONFIG_NAME).is_file())
    if looks_like_path(os.fspath(source)) or _hub_offline():
        return None
    return _tokenizer(os.fspath(source), local=False)
