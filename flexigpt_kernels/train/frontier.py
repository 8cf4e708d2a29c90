"""Quality per byte: held-out perplexity against stored parameters over pruning ratios.

For each ratio p of `ratios`, one :func:`~.compare.compare_recovery` run (its protocol: the
Block-Influence blocks at p, one tokenization, equal token budgets, trainable parameters within
5% of the paper's adapters at p) measures

- drop: the blocks removed, no training;
- shortgpt_lora: the same blocks removed, LoRA on the kept blocks;
- flexigpt: this package's recipe (train.compare.FlexiGPTRecipe);
- shortgpt_lora_eqmem: ShortGPT + LoRA at equal memory: fewer blocks dropped, so that it stores
  at least as many parameters as the flexigpt model (see compare.equal_memory_blocks).

Every row carries its token budget, trainable and stored parameters and wall time. Files, all
rewritten after every run so an interrupted sweep keeps what finished:

    <name>.csv   every run of every ratio (run_ratio: the sweep point; ratio: the model's own)
    <name>.json  the settings and each ratio's protocol metadata
    <name>.md    the per-ratio verdict (FlexiGPT vs ShortGPT + LoRA, same blocks and equal
                 memory, per seed) and every row
    <name>.png   perplexity vs stored parameters (matplotlib; skipped when it is missing)

Resume: rows of an earlier sweep under the same name are reused when its settings match (a
ValueError otherwise); a ratio whose runs are all there is not set up again. The dense model's
perplexity is measured once per sweep. keep_baselines=True: when only the FlexiGPT recipe
differs, the rows that do not depend on it (dense, drop, shortgpt_lora) are reused and the
old recipe's flexigpt and shortgpt_lora_eqmem rows (sized against it) are replaced.
"""

from __future__ import annotations

import csv
import inspect
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from .compare import FlexiGPTRecipe, compare_recovery
from .compare_report import COLUMNS, format_table, read_rows

__all__ = ["FRONTIER_METHODS", "run_frontier", "frontier_summary", "format_frontier", "plot_frontier", "write_frontier"]

FRONTIER_METHODS = ("flexigpt", "shortgpt_lora", "shortgpt_lora_eqmem")
_SETTINGS = ("seq_len", "batch_size", "eval_chunks", "calib_samples", "rank", "distill", "param_tolerance")


def _settings(recipe: FlexiGPTRecipe, kwargs: dict) -> dict:
    from .compare import _recipe_dict

    defaults = inspect.signature(compare_recovery).parameters
    s = {k: kwargs.get(k, defaults[k].default) for k in _SETTINGS}
    s["recipe"] = json.loads(json.dumps(_recipe_dict(recipe), default=str))
    return s


def run_frontier(
    ratios: Sequence[float],
    *,
    tokens=20_480,
    lrs: Sequence[float] = (4e-3,),
    seeds: Sequence[int] = (0, 1),
    methods: Sequence[str] = FRONTIER_METHODS,
    recipe: FlexiGPTRecipe | None = None,
    out_dir="benchmarks/results",
    name: str = "frontier_cpu",
    resume: bool = True,
    keep_baselines: bool = False,
    log=print,
    **compare_kwargs,
) -> dict:
    """Run the sweep (see the module doc); returns {"rows": [...], "meta": {...}} with every
    row tagged by run_ratio. compare_kwargs go to compare_recovery (seq_len, batch_size,
    eval_chunks, distill, model, tokenizer, texts, progress...)."""
    if not ratios:
        raise ValueError("ratios: need at least one pruning ratio")
    for p in ratios:
        if not 0.0 < float(p) < 1.0:
            raise ValueError(f"ratios: each must lie in (0, 1), got {p!r}")
    recipe = recipe or FlexiGPTRecipe()
    budgets = [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]
    out = Path(out_dir)
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    settings = _settings(recipe, compare_kwargs)
    previous: list[dict] = []
    meta = {"settings": settings, "ratios": {}}
    if resume and csv_path.exists():
        old = json.loads(json_path.read_text()) if json_path.exists() else {}
        previous = read_frontier_rows(csv_path)
        if old.get("settings") != settings:
            if not (keep_baselines and _only_recipe_differs(old.get("settings"), settings)):
                raise ValueError(
                    f"{csv_path} was written with other settings ({old.get('settings')}); this sweep has "
                    f"{settings}: pass another name, resume=False to start over, or keep_baselines=True "
                    "when only the recipe differs"
                )
            previous = [r for r in previous if r["method"] in RECIPE_FREE_METHODS]
            log(f"{csv_path}: other FlexiGPT recipe; its dense, drop and shortgpt_lora rows are reused")
        meta["ratios"] = old.get("ratios", {})
    done_rows = {float(p): [r for r in previous if r["run_ratio"] == float(p)] for p in ratios}
    results: dict[float, list[dict]] = {}  # every ratio of the file, swept now or not: rewriting keeps them
    for r in previous:
        results.setdefault(r["run_ratio"], []).append(r)

    def save(current: float | None = None, partial: dict | None = None):
        if partial is not None:
            results[current] = [{**r, "run_ratio": current} for r in partial["rows"]]
            meta["ratios"][str(current)] = partial["meta"]
        write_frontier({"rows": [r for p in sorted(results) for r in results[p]], "meta": meta}, out, name)

    for p in ratios:
        p = float(p)
        skipped = meta["ratios"].get(str(p), {}).get("skipped", {})
        if _complete(done_rows[p], budgets, [m for m in methods if m not in skipped], lrs, seeds):
            log(f"ratio {p}: every run is in {csv_path}; not repeated")
            continue
        log(f"ratio {p}: {', '.join(methods)}")
        dense = [m["dense_ppl"] for m in meta["ratios"].values() if m.get("dense_ppl") is not None]
        result = compare_recovery(
            ratio=p,
            tokens=budgets,
            lrs=lrs,
            seeds=seeds,
            methods=methods,
            recipe=recipe,
            done=done_rows[p],
            dense_ppl=dense[0] if dense else None,
            log=log,
            on_row=lambda partial, p=p: save(p, partial),
            **compare_kwargs,
        )
        save(p, result)
    save()
    return {"rows": [r for p in sorted(results) for r in results[p]], "meta": meta}


RECIPE_FREE_METHODS = ("dense", "drop", "shortgpt_lora")


def _only_recipe_differs(old: dict | None, new: dict) -> bool:
    if not old:
        return False
    return {k: v for k, v in old.items() if k != "recipe"} == {k: v for k, v in new.items() if k != "recipe"}


def _complete(rows: list[dict], budgets, methods, lrs, seeds) -> bool:
    have = {(r["budget"], r["method"], r["lr"], r["seed"]) for r in rows}
    for b in budgets:
        for m in methods:
            if not all((b, m, float(lr), seeds[0]) in have for lr in lrs):
                return False
            if not all(any((b, m, float(lr), s) in have for lr in lrs) for s in seeds[1:]):
                return False
    return bool(rows)


def read_frontier_rows(path) -> list[dict]:
    """Rows of a frontier CSV (read_rows plus the float run_ratio)."""
    rows = read_rows(path)
    with open(path, newline="") as f:
        for row, raw in zip(rows, csv.DictReader(f)):
            row["run_ratio"] = float(raw["run_ratio"])
    return rows


def _runs(rows, p, budget, method) -> list[dict]:
    """The runs of one method at one point: every seed at the first seed's best lr."""
    rs = [r for r in rows if r["run_ratio"] == p and r["budget"] == budget and r["method"] == method]
    if not rs:
        return []
    first_seed = min(r["seed"] for r in rs)
    best_lr = min((r for r in rs if r["seed"] == first_seed), key=lambda r: r["ppl_after"])["lr"]
    return sorted((r for r in rs if r["lr"] == best_lr), key=lambda r: r["seed"])


def frontier_summary(rows: Sequence[dict]) -> list[dict]:
    """Per (run_ratio, budget): each method's runs at its best lr, and FlexiGPT's relative
    perplexity reduction against ShortGPT + LoRA (same blocks; equal memory) on each seed both
    measured: (ppl_shortgpt - ppl_flexigpt) / ppl_shortgpt, positive = FlexiGPT better."""
    out = []
    points = sorted({(r["run_ratio"], r["budget"]) for r in rows if r["method"] not in ("dense", "drop")})
    for p, b in points:
        entry = {"run_ratio": p, "budget": b, "methods": {}}
        for m in FRONTIER_METHODS:
            runs = _runs(rows, p, b, m)
            if runs:
                entry["methods"][m] = runs
        drop = [r for r in rows if r["run_ratio"] == p and r["method"] == "drop"]
        if drop:
            entry["drop"] = drop[0]
        flex = {r["seed"]: r["ppl_after"] for r in entry["methods"].get("flexigpt", [])}
        for m, key in (("shortgpt_lora", "vs_same_blocks"), ("shortgpt_lora_eqmem", "vs_equal_memory")):
            other = {r["seed"]: r["ppl_after"] for r in entry["methods"].get(m, [])}
            entry[key] = {s: (other[s] - flex[s]) / other[s] for s in sorted(flex) if s in other}
        out.append(entry)
    return out


def _verdict(gains: dict, *runs: list[dict]) -> str:
    """FlexiGPT / ShortGPT + LoRA / level: a method wins when it is ahead on every seed and by
    more than the larger seed-to-seed spread (relative) of the two; one seed is tentative."""
    if not gains:
        return "not measured"
    spread = 0.0
    for rs in runs:
        ppls = [r["ppl_after"] for r in rs]
        if len(ppls) > 1:
            spread = max(spread, (max(ppls) - min(ppls)) / statistics.mean(ppls))
    lo, hi = min(gains.values()), max(gains.values())
    mean = statistics.mean(gains.values())
    tag = "" if len(gains) > 1 else " (one seed)"
    if lo > 0 and mean > spread:
        return f"FlexiGPT, {mean:.1%} lower{tag}"
    if hi < 0 and -mean > spread:
        return f"ShortGPT + LoRA, {-mean:.1%} lower{tag}"
    return f"level within seed noise ({mean:+.1%} for FlexiGPT, seed spread {spread:.1%}){tag}"


def _seeds_text(runs) -> str:
    return " / ".join(f"{r['ppl_after']:.2f}" for r in runs)


def format_frontier(result: dict) -> str:
    """Markdown: the settings, the per-ratio verdict table, then every ratio's rows."""
    rows, meta = result["rows"], result["meta"]
    s = meta["settings"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    dense_stored = dense["stored_params"] if dense else None
    lines = [
        "Quality per byte: held-out perplexity after healing against stored parameters "
        f"(seq_len {s['seq_len']}, batch {s['batch_size']}, {s['eval_chunks']} held-out chunks, "
        f"distill {s['distill'] or 'none'}; recipe {json.dumps(s['recipe'])}).",
        "",
        "Gain = (ppl ShortGPT + LoRA - ppl FlexiGPT) / ppl ShortGPT + LoRA per seed, then averaged; "
        "positive favours FlexiGPT. Equal memory: ShortGPT + LoRA drops fewer blocks so it stores "
        "at least as many parameters as FlexiGPT.",
        "",
        "| ratio | tokens | drop (no training) | ShortGPT + LoRA, same blocks (seeds) | FlexiGPT recipe (seeds) "
        "| gain, same blocks | pick, same blocks | ShortGPT + LoRA, equal memory (seeds) | gain, equal memory "
        "| pick, equal memory |",
        "|---:|---:|---:|---|---|---|---|---|---|---|",
    ]

    def pct(r):
        return f"{r['stored_params'] / dense_stored:.1%}" if dense_stored and r.get("stored_params") else "?"

    for e in frontier_summary(rows):
        m = e["methods"]
        drop = f"{e['drop']['ppl_after']:.2f} ({pct(e['drop'])})" if "drop" in e else ""

        def cell(name):
            runs = m.get(name, [])  # noqa: B023
            if not runs:
                return "not run"
            r0 = runs[0]
            return (
                f"{_seeds_text(runs)} ({r0['blocks']} blocks, {pct(r0)} stored, {r0['trainable_params']:,} "
                f"trained, lr {r0['lr']:g}, {statistics.mean(r['wall_s'] for r in runs):.0f} s)"
            )

        def gain(g):
            return " / ".join(f"{v:+.1%}" for v in g.values()) if g else ""

        lines.append(
            f"| {e['run_ratio']:g} | {e['budget']:,} | {drop} | {cell('shortgpt_lora')} | "
            f"{cell('flexigpt')} | {gain(e['vs_same_blocks'])} | "
            f"{_verdict(e['vs_same_blocks'], m.get('flexigpt', []), m.get('shortgpt_lora', []))} | "
            f"{cell('shortgpt_lora_eqmem')} | "
            f"{gain(e['vs_equal_memory'])} | "
            f"{_verdict(e['vs_equal_memory'], m.get('flexigpt', []), m.get('shortgpt_lora_eqmem', []))} |"
        )
    for p in sorted({r["run_ratio"] for r in rows}):
        rmeta = meta.get("ratios", {}).get(str(p))
        if rmeta:
            lines += [
                "",
                f"### ratio {p:g}",
                "",
                format_table({"rows": [r for r in rows if r["run_ratio"] == p], "meta": rmeta}).rstrip(),
            ]
    return "\n".join(lines) + "\n"


def plot_frontier(rows: Sequence[dict], path) -> Path | None:
    """PNG: held-out perplexity after healing (log scale) against stored parameters; one point
    per run, a line through each method's seed means; the dense model as a dashed line.
    Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        return None
    style = {
        "drop": ("drop (no training)", "tab:gray", "x"),
        "shortgpt_lora": ("ShortGPT + LoRA", "tab:blue", "o"),
        "shortgpt_lora_eqmem": ("ShortGPT + LoRA (equal memory)", "tab:blue", "s"),
        "flexigpt": ("FlexiGPT (recipe)", "tab:red", "D"),
    }
    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted({r["budget"] for r in rows if r["budget"]})
    for method, (label, color, marker) in style.items():
        pts = {}
        for e in frontier_summary(rows):
            runs = e.get("methods", {}).get(method) or ([e["drop"]] if method == "drop" and "drop" in e else [])
            for r in runs:
                pts.setdefault(r["stored_params"], []).append(r["ppl_after"])
        if not pts:
            continue
        xs = sorted(pts)
        for x in xs:
            ax.scatter(
                [x / 1e6] * len(pts[x]),
                pts[x],
                color=color,
                marker=marker,
                alpha=0.45,
                facecolors="none" if method == "shortgpt_lora_eqmem" else color,
            )
        ax.plot(
            [x / 1e6 for x in xs],
            [statistics.mean(pts[x]) for x in xs],
            color=color,
            marker=marker,
            linestyle=":" if method in ("drop", "shortgpt_lora_eqmem") else "-",
            label=label,
            markerfacecolor="none" if method == "shortgpt_lora_eqmem" else color,
        )
    for e in frontier_summary(rows):
        for r in e["methods"].get("flexigpt", [])[:1]:
            ax.annotate(
                f"{e['run_ratio']:g}",
                (r["stored_params"] / 1e6, r["ppl_after"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
                color="tab:red",
            )
    dense = next((r for r in rows if r["method"] == "dense"), None)
    if dense:
        ax.axhline(
            dense["ppl_after"], color="black", linestyle="--", linewidth=0.8, label=f"dense ({dense['ppl_after']:.1f})"
        )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.0f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.0f"))
    ax.set_xlabel("stored parameters (M)")
    ax.set_ylabel("held-out perplexity after healing")
    ax.set_title(
        f"Quality per byte ({', '.join(f'{b:,}' for b in budgets)} tokens; labels: pruning ratio)", fontsize=10
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_frontier(result: dict, out_dir, name: str) -> dict[str, Path]:
    """Write <name>.csv, .json, .md and .png (see the module doc); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{name}.csv", "json": out / f"{name}.json", "md": out / f"{name}.md"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("run_ratio", *COLUMNS))
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: r.get(k) for k in ("run_ratio", *COLUMNS)})
    paths["json"].write_text(json.dumps(result["meta"], indent=1, default=str) + "\n")
    paths["md"].write_text(format_frontier(result))
    png = plot_frontier(result["rows"], out / f"{name}.png") if result["rows"] else None
    if png is not None:
        paths["png"] = png
    return paths
