"""Calibration data: a LongTensor of token ids [num_samples, seq_len] from many kinds of source.

Sources accepted by :func:`token_batches`:

- a tensor of token ids: 2-D [n, s] (the first ``num_samples`` rows and ``seq_len`` columns are
  used; ``None`` keeps that dimension whole) or 1-D (one token stream, cut into chunks);
- an iterable of strings, or of dicts holding ``text_field`` (a list, a generator, a
  ``datasets.Dataset`` / ``IterableDataset``);
- a local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file, or a folder searched
  recursively for such files, read with ``datasets.load_dataset("text" | "json" | "parquet",
  data_files=...)``. The "text" builder yields one document per line; blank lines are skipped;
- any other string: a Hugging Face dataset name, streamed with
  ``load_dataset(name, split=split, streaming=True)``. ``"name:config"`` selects a config.
  Without ``split`` it tries "validation", then "train" (FlexiGPT calibrates on MiniPile's
  validation split).

Texts are tokenized without special tokens, joined with the tokenizer's EOS id between
documents (no BOS), and cut into non-overlapping chunks of ``seq_len`` tokens; reading stops as
soon as ``num_samples * seq_len`` tokens are collected, and the leftover tail is dropped.

``seed`` shuffles the document order of finite sources (lists, tuples, local files:
``Dataset.shuffle(seed)``; hub streams: ``IterableDataset.shuffle(seed, buffer_size=1000)``);
``seed=None`` keeps the source order. A one-shot iterator (a generator) is always read in order.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

__all__ = ["token_batches", "DEFAULT_SEQ_LEN", "DEFAULT_NUM_SAMPLES", "LOCAL_EXTENSIONS"]

DEFAULT_SEQ_LEN = 256  # ShortGPT's chunk length
DEFAULT_NUM_SAMPLES = 32

#: file suffix -> datasets builder name
LOCAL_EXTENSIONS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

_STREAM_SHUFFLE_BUFFER = 1000
_TOKENIZE_BATCH = 64


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _from_tensor(tokens: torch.Tensor, tokenizer, seq_len, num_samples) -> torch.Tensor:
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"source: token ids must be an integer tensor, got dtype {tokens.dtype}")
    if tokens.dim() not in (1, 2):
        raise ValueError(f"source: token ids must have shape [n, seq] or [tokens], got {tuple(tokens.shape)}")
    tokens = tokens.detach().to("cpu", torch.long)
    if tokens.numel() and tokens.min().item() < 0:
        raise ValueError(f"source: token ids must be >= 0, found {tokens.min().item()}")
    if tokenizer is not None and tokens.numel() and tokens.max().item() >= len(tokenizer):
        raise ValueError(
            f"source: token id {tokens.max().item()} is outside the tokenizer's vocabulary ({len(tokenizer)})"
        )
    if tokens.dim() == 1:
        return _chunk(tokens.tolist(), seq_len or DEFAULT_SEQ_LEN, num_samples or DEFAULT_NUM_SAMPLES)
    n, s = tokens.shape
    rows = n if num_samples is None else num_samples
    cols = s if seq_len is None else seq_len
    if rows > n or cols > s or n == 0 or s == 0:
        raise ValueError(
            f"source: token tensor of shape {(n, s)} is smaller than the requested [num_samples={rows}, seq_len={cols}]"
        )
    return tokens[:rows, :cols].contiguous()


def _chunk(ids: list[int], seq_len: int, num_samples: int) -> torch.Tensor:
    need = seq_len * num_samples
    if not ids:
        raise ValueError("source: no calibration text: the source is empty or holds only whitespace")
    if len(ids) < seq_len:
        raise ValueError(
            f"source: {len(ids)} tokens, fewer than one sequence of seq_len={seq_len} "
            f"(calibration needs num_samples={num_samples} x seq_len={seq_len} = {need}); "
            f"give more text or lower them"
        )
    if len(ids) < need:
        raise ValueError(
            f"source: not enough tokens for calibration: found {len(ids)}, need {need} "
            f"(num_samples={num_samples} x seq_len={seq_len}); give more text or lower them"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(num_samples, seq_len)


def _texts_of(rows: Iterable, text_field: str) -> Iterator[str]:
    for row in rows:
        if isinstance(row, str):
            text = row
        elif isinstance(row, dict):
            if text_field not in row:
                raise ValueError(f"text_field: {text_field!r} is not a column of the data; columns: {sorted(row)}")
            text = row[text_field]
        else:
            raise ValueError(f"source: expected strings or dicts with {text_field!r}, got {type(row).__name__}")
        if not isinstance(text, str):
            raise ValueError(f"text_field: column {text_field!r} holds {type(text).__name__}, not text")
        if text.strip():
            yield text


def _tokenize(texts: Iterator[str], tokenizer, need: int) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    ids: list[int] = []
    batch: list[str] = []

    def flush():
        for doc in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            if ids and eos is not None:
                ids.append(eos)
            ids.extend(doc)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == _TOKENIZE_BATCH:
            flush()
            if len(ids) >= need:
                return ids
    if batch:
        flush()
    return ids


def _local_files(path: Path) -> dict[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    groups: dict[str, list[str]] = {}
    for f in files:
        builder = LOCAL_EXTENSIONS.get(f.suffix.lower())
        if builder is not None:
            groups.setdefault(builder, []).append(str(f))
        elif path.is_file():
            raise ValueError(
                f"source: unsupported file type {f.suffix!r} ({f}); expected one of {sorted(LOCAL_EXTENSIONS)}"
            )
    if not groups:
        raise ValueError(f"source: no {'/'.join(sorted(LOCAL_EXTENSIONS))} files under {path}")
    return groups


def _load_local(path: Path, split, seed):
    import datasets

    parts = []
    for builder, files in _local_files(path).items():
        kwargs = {"sample_by": "line"} if builder == "text" else {}
        parts.append(datasets.load_dataset(builder, data_files=files, split=split or "train", **kwargs))
    if len(parts) > 1:
        common = set(parts[0].column_names).intersection(*(p.column_names for p in parts[1:]))
        parts = [p.select_columns(sorted(common)) for p in parts]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return ds if seed is None else ds.shuffle(seed=seed)


def _load_hub(name: str, split, seed):
    import datasets

    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    splits = [split] if split else ["validation", "train"]
    errors = []
    for s in splits:
        try:
            ds = datasets.load_dataset(name, config, split=s, streaming=True)
        except (ValueError, KeyError) as e:  # datasets reports an unknown split as ValueError
            if split or "split" not in str(e).lower():
                raise
            errors.append(f"{s}: {e}")
            continue
        return ds if seed is None else ds.shuffle(seed=seed, buffer_size=_STREAM_SHUFFLE_BUFFER)
    raise ValueError(f"split: dataset {name!r} has neither a 'validation' nor a 'train' split ({'; '.join(errors)})")


def _looks_like_path(s: str) -> bool:
    return Path(s).suffix.lower() in LOCAL_EXTENSIONS or s.startswith((".", "~")) or os.path.isabs(s)


def token_batches(
    source,
    tokenizer=None,
    *,
    seq_len: int | None = DEFAULT_SEQ_LEN,
    num_samples: int | None = DEFAULT_NUM_SAMPLES,
    split: str | None = None,
    text_field: str = "text",
    seed: int | None = 0,
) -> torch.Tensor:
    """Calibration token ids, LongTensor [num_samples, seq_len] (see the module docstring).

    Args:
        source: token tensor, iterable of texts/rows, local file or folder, or hub dataset name.
        tokenizer: a Hugging Face tokenizer; required for every text source.
        seq_len / num_samples: chunk length and count. ``None`` keeps a 2-D tensor's own
            dimension, and means 256 / 32 for text sources.
        split: dataset split (hub default: "validation", else "train"; local: "train").
        text_field: the text column of json/parquet files, datasets and dict rows.
        seed: document-order shuffle seed; ``None`` keeps the order.

    Raises ValueError when texts come without a tokenizer, for an empty or whitespace-only
    source string (``Path("")`` would be the current folder), when there are fewer tokens than
    ``num_samples * seq_len`` (with both counts; no text at all and less than one sequence are
    said as such), or for a malformed source.
    """
    if seq_len is not None:
        _check_positive("seq_len", seq_len)
    if num_samples is not None:
        _check_positive("num_samples", num_samples)
    if isinstance(source, torch.Tensor):
        return _from_tensor(source, tokenizer, seq_len, num_samples)

    if tokenizer is None:
        raise ValueError(
            f"tokenizer: texts need a tokenizer to become token ids (source {type(source).__name__}, "
            "tokenizer=None); pass a tokenizer or a LongTensor of token ids"
        )
    seq_len = seq_len or DEFAULT_SEQ_LEN
    num_samples = num_samples or DEFAULT_NUM_SAMPLES
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source).strip():  # Path("") is ".": never read the current folder unasked
            raise ValueError(
                f"source: empty calibration source {source!r}; give a file, a folder, a "
                f"dataset name, texts or token ids"
            )
        path = Path(source).expanduser()
        if path.exists():
            rows = _load_local(path, split, seed)
        elif isinstance(source, os.PathLike) or _looks_like_path(source):
            raise ValueError(f"source: no such file or folder: {str(source)!r}")
        else:
            rows = _load_hub(source, split, seed)
    elif isinstance(source, (bytes, dict)) or not isinstance(source, Iterable):
        raise ValueError(
            f"source: expected a token tensor, texts, a path or a dataset name, got {type(source).__name__}"
        )
    elif isinstance(source, Sequence) and seed is not None:
        rows = list(source)
        random.Random(seed).shuffle(rows)
    elif seed is not None and hasattr(source, "shuffle") and hasattr(source, "column_names"):
        try:  # datasets.Dataset / IterableDataset
            rows = source.shuffle(seed=seed)
        except TypeError:
            rows = source
    else:
        rows = source

    need = seq_len * num_samples
    ids = _tokenize(_texts_of(rows, text_field), tokenizer, need)
    return _chunk(ids, seq_len, num_samples)
