"""Result files: CSVs that grow by appending (every row tagged with its run), markdown tables."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path


def append_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Append `rows` to the CSV at `path` (created with a header if absent). If the file's
    header lacks some of the new columns, the file is rewritten with the union of columns
    (old rows get empty cells), so runs from different versions can share one file."""
    if not rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            if set(fields) <= set(old_fields):
                fields = old_fields
                old_rows = None
            else:
                old_rows = list(reader)
                fields = list(dict.fromkeys(old_fields + fields))
        if old_rows is None:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerows(_fmt(r) for r in rows)
            return path
        rows = list(old_rows) + list(rows)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(_fmt(r) for r in rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _fmt(row: dict) -> dict:
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


def num(value) -> float:
    """A CSV cell as a float (nan for empty or non-numeric)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    out += ["  ".join(c.rjust(w) if i >= 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(out)


def fmt_ratio(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def fmt_us(x: float) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"
