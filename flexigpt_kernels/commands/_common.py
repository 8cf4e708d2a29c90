"""What the `flexigpt` subcommands share: argparse ``type=`` validators (a bad value is an
argparse error, one line, exit 2, before anything loads) and :func:`user_input`, which marks the
steps that read what the user named so that their errors become one-line usage errors (see
flexigpt_kernels/cli.py for the rules). Not a command itself."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from ..cli import UsageError

DTYPES = ("float32", "bfloat16", "float16")
_LIBRARY_PREFIX = re.compile(r"^[a-z_]+: ")  # "model: ...", "source: ...": the library's argument name


@contextlib.contextmanager
def user_input(argument: str):
    """Inside the block, a ValueError or OSError (whoever raised it) is about `argument`:
    it becomes a UsageError ``"<argument>: <message>"``."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as exc:
        message = _LIBRARY_PREFIX.sub("", " ".join(str(exc).split()), count=1) or type(exc).__name__
        raise UsageError(f"{argument}: {message}") from exc


def _error(message: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(message)


def _number(text: str, kind):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise _error(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise _error(f"expected a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float)


def _in_range(kind, what: str, *, above=None, at_least=None, below=None, at_most=None) -> Callable[[str], object]:
    """A validator of `kind` numbers within the given bounds (`what` says which, in errors)."""

    def parse(text: str):
        value = _number(text, kind)
        if (
            (above is not None and value <= above)
            or (at_least is not None and value < at_least)
            or (below is not None and value >= below)
            or (at_most is not None and value > at_most)
        ):
            raise _error(f"expected {what}, got {text!r}")
        return value

    return parse


positive_float = _in_range(float, "a number > 0", above=0)
non_negative_float = _in_range(float, "a number >= 0", at_least=0)
fraction = _in_range(float, "a fraction in (0, 1)", above=0, below=1)
fraction_or_one = _in_range(float, "a number in (0, 1]", above=0, at_most=1)
positive_int = _in_range(int, "an integer >= 1", at_least=1)
non_negative_int = _in_range(int, "an integer >= 0", at_least=0)


def rank(text: str):
    """An adapter rank: an integer >= 1, or a fraction of the hidden size in (0, 1]."""
    if re.fullmatch(r"\s*\d+\s*", text):
        return positive_int(text)
    return _in_range(float, "an integer >= 1 or a fraction of the hidden size in (0, 1]", above=0, at_most=1)(text)


def listing(
    item: Callable[[str], object], *, choices: tuple[str, ...] | None = None, unique: bool = False
) -> Callable[[str], list]:
    """A comma-separated, non-empty list of `item` values (optionally from `choices`)."""

    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",")]
        if not text.strip() or any(not t for t in parts):
            raise _error(f"expected a comma-separated list with no empty item, got {text!r}")
        if choices is not None:
            bad = [t for t in parts if t not in choices]
            if bad:
                raise _error(f"unknown {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
        values = [item(t) for t in parts]
        if unique and len(set(values)) != len(values):
            raise _error(f"repeated values in {text!r}")
        return values

    return parse


def nonempty(value: str) -> str:
    """A non-empty string."""
    if not value.strip():
        raise _error("expected a non-empty value")
    return value


def out_dir(text: str) -> str:
    """A folder to write: not empty, not an existing file."""
    if not text.strip():
        raise _error("expected a folder name")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise _error(f"{text} is a file, not a folder")
    return text


def existing_dir(text: str) -> str:
    """A folder that exists (a checkpoint or model folder named on the command line)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise _error(f"{text} does not exist")
    if not path.is_dir():
        raise _error(f"{text} is a file, not a folder")
    return text


def check_out(path: str, overwrite: bool, argument: str = "--out") -> None:
    """Refuse an existing non-empty `path` unless `overwrite` (before minutes of work)."""
    from ..prune_job import check_out_dir

    with user_input(argument):
        check_out_dir(path, overwrite)


def print_result(result: dict, as_json: bool, text: Callable[[], str]) -> None:
    """Print `result` as one JSON line, or the human-readable `text()`."""
    if as_json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(text())
