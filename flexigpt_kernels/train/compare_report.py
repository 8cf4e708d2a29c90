"""Tables of `compare_recovery` results: one row per run (see train/compare.py for the protocol).

COLUMNS: budget (token budget of the run), method, options, lr, seed, trainable_params, tokens
(seen, block-local fit included), ppl_init / ppl_after (held-out perplexity before / after
healing), wall_s (preparation + healing), ratio (blocks removed or replaced / all blocks),
blocks (their count), stored_params (the deployable model: shared tensors once, LoRA merged).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

__all__ = ["COLUMNS", "best_runs", "format_table", "write_results", "read_rows"]

COLUMNS = (
    "budget",
    "method",
    "options",
    "lr",
    "seed",
    "trainable_params",
    "tokens",
    "ppl_init",
    "ppl_after",
    "wall_s",
    "ratio",
    "blocks",
    "stored_params",
)
_INT = ("budget", "seed", "trainable_params", "tokens", "blocks", "stored_params")
_FLOAT = ("lr", "ppl_init", "ppl_after", "wall_s", "ratio")


def _fmt(v, nd=2):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def best_runs(rows: Sequence[dict]) -> dict[tuple[int, str], dict]:
    """{(budget, method): the row with the lowest held-out perplexity after healing}."""
    best: dict[tuple[int, str], dict] = {}
    for r in rows:
        key = (r["budget"], r["method"])
        if r["method"] not in ("dense", "drop") and (key not in best or r["ppl_after"] < best[key]["ppl_after"]):
            best[key] = r
    return best


def format_table(result: dict) -> str:
    """A Markdown table of the rows, plus the run's settings and the best run per budget and method."""
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Recovery at equal budget: {meta['model']}, ratio {meta['ratio']} (pruned blocks {meta['pruned']}), "
        f"trainable-parameter budget {meta['budget_params']:,}, token budgets "
        f"{', '.join(f'{b:,}' for b in meta['budgets'])} ({meta['batch_size']} x {meta['seq_len']} tokens per "
        f"step), held-out perplexity on {meta['eval_chunks']} x {meta['seq_len']} tokens of unseen text. "
        f"torch {meta['torch']}, {meta['torch_threads']} threads.",
        "",
        "| budget | method | options | lr | seed | trainable params | stored params | tokens | ppl at init | "
        "ppl after | wall s |",
        "|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lr = "" if r["lr"] is None else f"{r['lr']:g}"
        stored = f"{r['stored_params']:,}" if r.get("stored_params") is not None else ""
        lines.append(
            f"| {r['budget']:,} | {r['method']} | {r['options']} | {lr} | {_fmt(r['seed'])} | "
            f"{r['trainable_params']:,} | {stored} | {r['tokens']:,} | {_fmt(r['ppl_init'])} | "
            f"{_fmt(r['ppl_after'])} | {_fmt(r['wall_s'], 0)} |"
        )
    best = best_runs(rows)
    if best:
        lines += [
            "",
            "Best per budget and method (lowest ppl after; seed of that row): "
            + "; ".join(f"{b:,} tokens {m} {r['ppl_after']:.2f} (lr {r['lr']:g})" for (b, m), r in best.items()),
        ]
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir="benchmarks/results", name: str = "recovery_cpu") -> tuple[Path, Path]:
    """Write <out_dir>/<name>.csv (one row per run) and <name>.md (format_table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: r.get(k) for k in COLUMNS})
    md_path.write_text(format_table(result))
    return csv_path, md_path


def read_rows(path) -> list[dict]:
    """Rows of a CSV written by :func:`write_results` (or an older one without the model-shape
    columns: those come back as None), typed as compare_recovery makes them."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k in COLUMNS:
                v = raw.get(k)
                if v in (None, ""):
                    row[k] = None
                elif k in _INT:
                    row[k] = int(float(v))
                elif k in _FLOAT:
                    row[k] = float(v)
                else:
                    row[k] = v
            rows.append(row)
    return rows
