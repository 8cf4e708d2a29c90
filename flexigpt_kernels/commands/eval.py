"""`flexigpt eval`: perplexity (and lm-eval tasks) of a model, side by side with its dense source.

    flexigpt eval DIR [--data SOURCE] [--tasks NAME_OR_YAML ...] [--baseline SOURCE_MODEL|none]

DIR: a checkpoint written by flexigpt_kernels (flexigpt.json beside it), a plain Hugging Face
model folder or hub name, or "default" (the embedded SmolLM2-135M-Instruct).
The dense baseline: --baseline when given ("none" skips it); else the source recorded in the
checkpoint's flexigpt.json ("source"); else the embedded default model when the checkpoint's
architecture is SmolLM2-135M's (llama, hidden 576, 9 heads, vocab 49152, 30 source blocks).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..cli import UsageError
from ._common import (
    DTYPES,
    existing_dir,
    non_negative_int,
    nonempty,
    positive_float,
    positive_int,
    print_result,
    user_input,
)

DEFAULT_SOURCE = "default"
# SmolLM2-135M(-Instruct): what a checkpoint derived from the embedded default looks like
_SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "vocab_size": 49152}
_SMOLLM2_BLOCKS = 30


def source_tokenizer(model):
    """The tokenizer of the source recorded in ``model.flexigpt_meta`` (or of the embedded
    default when the model looks derived from it), or None."""
    from ..io.load import load_tokenizer_of

    source = baseline_source(model, None)
    return None if source is None else load_tokenizer_of(source)


def looks_like_default(model) -> bool:
    """True when `model`'s architecture is the embedded SmolLM2-135M's (a heuristic)."""
    cfg = model.config
    if any(getattr(cfg, k, None) != v for k, v in _SMOLLM2.items()):
        return False
    meta = getattr(model, "flexigpt_meta", None) or {}
    return int(meta.get("num_blocks") or getattr(cfg, "num_hidden_layers", 0)) == _SMOLLM2_BLOCKS


def baseline_source(model, requested: str | None) -> str | None:
    """Which dense model to compare with (see the module doc); None = no baseline."""
    if requested is not None:
        return None if requested.lower() == "none" else requested
    meta = getattr(model, "flexigpt_meta", None) or {}
    if meta.get("source"):
        return meta["source"]
    if meta and looks_like_default(model):
        return DEFAULT_SOURCE
    return None


def evaluate_model(
    model,
    tokenizer,
    *,
    data,
    tasks,
    seq_len: int,
    num_chunks: int | None,
    batch_size: int,
    task_batch_size: int,
    limit,
    num_fewshot,
    include_path,
    progress: bool,
    label: str,
) -> dict[str, Any]:
    """{"perplexity": float|None, "tasks": {task: {metric: value}}, "seconds": {...}}."""
    from ..eval import perplexity

    out: dict[str, Any] = {"perplexity": None, "tasks": {}, "seconds": {}}
    if data is not None:
        t = time.perf_counter()
        out["perplexity"] = perplexity(
            model,
            tokenizer,
            data,
            seq_len=seq_len,
            num_chunks=num_chunks,
            batch_size=batch_size,
            progress=progress,
            desc=f"perplexity ({label})",
        )
        out["seconds"]["perplexity"] = time.perf_counter() - t
    if tasks:
        from ..eval import evaluate_tasks

        t = time.perf_counter()
        res = evaluate_tasks(
            model,
            tokenizer,
            tasks,
            batch_size=task_batch_size,
            limit=limit,
            num_fewshot=num_fewshot,
            include_path=include_path,
        )
        out["tasks"] = res.metrics
        out["seconds"]["tasks"] = time.perf_counter() - t
    return out


def format_table(summary: dict[str, Any]) -> str:
    """Rows: perplexity, then each task metric; columns: the baseline (if any), the model."""
    cols = [("model", summary["model"])]
    if summary.get("baseline") is not None:
        cols.insert(0, ("baseline", summary["baseline"]))
    rows: list[tuple[str, list[str]]] = []

    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}")

    rows.append(("perplexity", [fmt(c[1]["perplexity"]) for c in cols]))
    names = []
    for _, res in cols:
        for task, metrics in res["tasks"].items():
            for metric in metrics:
                if metric.endswith("_stderr") or metric == "num_samples" or (task, metric) in names:
                    continue
                names.append((task, metric))
    for task, metric in names:
        rows.append((f"{task} {metric}", [fmt(c[1]["tasks"].get(task, {}).get(metric)) for c in cols]))
    labels = summary.get("labels", {})
    headers = [f"{labels.get(name, name)} ({summary['sources'][name]})" for name, _ in cols]
    w0 = max(len(r[0]) for r in rows + [("metric", [])])
    widths = [max(len(h), 10) for h in headers]
    lines = ["  ".join(["metric".ljust(w0)] + [h.rjust(w) for h, w in zip(headers, widths)])]
    for name, vals in rows:
        lines.append("  ".join([name.ljust(w0)] + [v.rjust(w) for v, w in zip(vals, widths)]))
    settings = summary["settings"]
    if settings.get("data") is not None:
        lines.append(
            f"perplexity: {settings['num_chunks']} non-overlapping windows of {settings['seq_len']} "
            f"tokens of {settings['data']}, no BOS, exp(mean NLL)"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="DIR",
        type=nonempty,
        help="flexigpt_kernels checkpoint, Hugging Face folder or hub name, or 'default' (embedded SmolLM2-135M)",
    )
    p.add_argument(
        "--data",
        type=nonempty,
        help="held-out text for perplexity: .txt/.jsonl/.parquet file or "
        "folder, or a dataset name (default: embedded gensim news text); "
        "'none' skips perplexity",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="TASK",
        type=nonempty,
        help="lm-eval task names (need the hub) or local task YAML files",
    )
    p.add_argument("--include-path", type=existing_dir, help="folder of task YAMLs whose task names --tasks may use")
    p.add_argument(
        "--baseline",
        type=nonempty,
        help="dense model to compare with ('default', a folder, a hub name, or 'none'; "
        "default: the source recorded in the checkpoint)",
    )
    p.add_argument("--seq-len", type=positive_int, default=256, help="perplexity window length (default 256)")
    p.add_argument("--num-chunks", type=non_negative_int, default=40, help="perplexity windows (default 40; 0 = all)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--task-batch-size", type=positive_int, default=8, help="lm-eval requests per forward pass")
    p.add_argument("--limit", type=positive_float, help="lm-eval: at most this many examples per task (smoke tests)")
    p.add_argument("--num-fewshot", type=non_negative_int, help="lm-eval: few-shot examples (default: the task's, 0)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _check_tasks(tasks) -> None:
    for task in tasks:
        if task.endswith((".yaml", ".yml")) and not Path(task).expanduser().is_file():
            raise UsageError(f"--tasks: {task} does not exist")


def run(args: argparse.Namespace) -> int:
    from ..io import load_model, resolve_data
    from ..io.load import locate_model

    _check_tasks(args.tasks)
    with user_input("DIR"):
        locate_model(args.model)
    if args.baseline and args.baseline.lower() != "none":
        with user_input("--baseline"):
            locate_model(args.baseline)
    data: Any = args.data
    if data is not None and data.lower() == "none":
        data = None
    else:
        with user_input("--data"):
            data = resolve_data(data, "heldout", what="data")
    data_name = None if data is None else (args.data or "embedded gensim news text (lee_background.cor)")
    t0 = time.perf_counter()
    with user_input("DIR"):
        loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer, ident = loaded.model, loaded.tokenizer, loaded.source
    load_s = time.perf_counter() - t0
    base = baseline_source(model, args.baseline)
    base_model = base_tok = None
    if base is not None:
        t = time.perf_counter()
        where = "--baseline" if args.baseline else "--baseline (the source recorded in DIR's flexigpt.json)"
        with user_input(where):
            base_loaded = load_model(base, dtype=args.dtype)
        base_model, base_tok, base_ident = base_loaded.model, base_loaded.tokenizer, base_loaded.source
        load_s += time.perf_counter() - t
    if tokenizer is None:
        tokenizer = base_tok if base_tok is not None else source_tokenizer(model)
    if tokenizer is None:
        raise UsageError(
            f"DIR: {args.model} has no tokenizer and no known source to take one from; pass --baseline SOURCE_MODEL"
        )
    if base_model is not None and base_tok is None:
        base_tok = tokenizer
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    kw = dict(
        data=data,
        tasks=args.tasks,
        seq_len=args.seq_len,
        num_chunks=args.num_chunks or None,
        batch_size=args.batch_size,
        task_batch_size=args.task_batch_size,
        limit=limit,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        progress=not args.json,
    )
    summary: dict[str, Any] = {
        "sources": {"model": ident},
        "meta": {
            k: v
            for k, v in (getattr(model, "flexigpt_meta", None) or {}).items()
            if k
            in (
                "method",
                "family",
                "num_blocks",
                "pruned",
                "base_map",
                "layers",
                "pattern",
                "repeats",
                "rank",
                "source",
            )
        },
        "settings": {
            "data": data_name,
            "seq_len": args.seq_len,
            "num_chunks": args.num_chunks or None,
            "tasks": args.tasks,
        },
        "baseline": None,
    }
    method = summary["meta"].get("method")
    summary["labels"] = {"baseline": "dense", "model": method if method not in (None, "none") else "model"}
    if base_model is not None:
        summary["sources"]["baseline"] = base_ident
        summary["baseline"] = evaluate_model(base_model, base_tok, label="baseline", **kw)
        del base_model
    summary["model"] = evaluate_model(model, tokenizer, label="model", **kw)
    summary["seconds"] = {"load": load_s, "total": time.perf_counter() - t0}
    print_result(summary, args.json, lambda: format_table(summary))
    return 0
