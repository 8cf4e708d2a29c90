"""Ratio-vs-M plots from a kernels CSV (matplotlib, Agg backend: no display needed).

For every width family in the CSV, two PNGs:
    <stem>_<widths>_x_floor.png     time / floor per implementation (1.0 = the floor)
    <stem>_<widths>_x_unfused.png   time / unfused-PEFT time per backend of ours (< 1 = faster)
one panel per (layer) x (variant, mode), M on a log axis. Ratios come from the minima by
default (robust on a busy machine; stat="median" for the medians).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .results import num, read_csv

_STYLE = {
    "unfused-peft": dict(color="tab:red", marker="s"),
    "dense": dict(color="tab:gray", marker="v"),
    "op-triton": dict(color="tab:blue", marker="o"),
    "op-cpp": dict(color="tab:green", marker="o"),
    "op-reference": dict(color="tab:purple", marker="o"),
}


def select_run(rows: Sequence[dict], run: str | None = "latest") -> list[dict]:
    """Rows of one run (its run_id; "latest" = the newest run in the file) or, with run="all",
    the newest row of every (shape, variant, mode, provider) across runs."""
    if not rows:
        return []
    if run == "all":
        newest: dict[tuple, dict] = {}
        for r in sorted(rows, key=lambda r: r.get("run_id", "")):
            key = (
                r["device_name"],
                r["model"],
                r["layer"],
                r["M"],
                r["K"],
                r["N"],
                r["r"],
                r["variant"],
                r["mode"],
                r["provider"],
            )
            newest[key] = r
        return list(newest.values())
    run_id = max(r.get("run_id", "") for r in rows) if run in (None, "latest") else run
    picked = [r for r in rows if r.get("run_id", "") == run_id]
    if not picked:
        raise ValueError(f"no rows with run_id {run_id!r}")
    return picked


def plot_csv(csv_path: Path, out_dir: Path, *, run: str | None = "latest", stat: str = "min") -> list[Path]:
    """Draw the plots of one kernels CSV into out_dir; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = select_run(read_csv(csv_path), run)
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_min" if stat == "min" else ""
    device_name = rows[0].get("device_name", "")
    dtype = rows[0].get("dtype", "")
    paths = []
    for widths in dict.fromkeys(r["model"] for r in rows):
        wrows = [r for r in rows if r["model"] == widths]
        layers = list(dict.fromkeys(r["layer"] for r in wrows))
        panels = list(dict.fromkeys((r["variant"], r["mode"]) for r in wrows))
        for metric, title in (
            ("x_floor", "time / floor (dense x extra work)"),
            ("x_unfused", "time / unfused PEFT-style time"),
        ):
            providers = [
                p
                for p in dict.fromkeys(r["provider"] for r in wrows)
                if p != "floor" and (metric == "x_floor" or p.startswith("op-"))
            ]
            fig, axes = plt.subplots(
                len(panels), len(layers), squeeze=False, sharex=True, figsize=(4.2 * len(layers), 2.9 * len(panels))
            )
            for j, layer in enumerate(layers):
                for i, (variant, mode) in enumerate(panels):
                    ax = axes[i][j]
                    sel = [r for r in wrows if r["layer"] == layer and r["variant"] == variant and r["mode"] == mode]
                    for p in providers:
                        pts = sorted((int(r["M"]), num(r[metric + suffix])) for r in sel if r["provider"] == p)
                        pts = [(m, v) for m, v in pts if not math.isnan(v)]
                        if pts:
                            ax.plot(*zip(*pts), label=p, **_STYLE.get(p, dict(marker="o")))
                    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
                    ax.set_xscale("log", base=2)
                    ms = sorted({int(r["M"]) for r in sel})
                    if ms:
                        ax.set_xticks(ms, [str(m) for m in ms])
                    ax.set_title(f"{layer} {_nk(sel)}  {variant}, {mode}", fontsize=9)
                    ax.grid(True, alpha=0.3)
                    if j == 0:
                        ax.set_ylabel(metric.replace("_", " "))
                    if i == len(panels) - 1:
                        ax.set_xlabel("M (rows)")
            handles, labels = axes[0][0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=len(labels))
            fig.suptitle(
                f"{widths}: {title}, {stat} over rounds\n{device_name}, {dtype}", fontsize=10, x=0.02, ha="left"
            )
            fig.tight_layout(rect=(0, 0, 1, 0.955 if len(panels) > 2 else 0.9))
            path = out_dir / f"{Path(csv_path).stem}_{widths.replace('/', '-')}_{metric}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths


def _nk(sel: Sequence[dict]) -> str:
    if not sel:
        return ""
    r = sel[0]
    return f"{r['N']}x{r['K']} r{r['r']}"
