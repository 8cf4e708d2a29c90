"""FlexiGPT vs ShortGPT + LoRA at an equal recovery budget (issue 4 item 5; METHOD.md 6-7).

Protocol, one function (and `flexigpt compare`):

1. The dense model (default: the embedded SmolLM2-135M) and its held-out perplexity.
2. prune(..., method="flexigpt") at `ratio` with calibration on the training text: the pruned
   blocks and their bases. The same blocks are then dropped (method="drop") for ShortGPT.
3. Trainable parameters: FlexiGPT trains its adapters and output-norm gammas; ShortGPT + LoRA
   trains LoRA on every linear of every kept block, with the LoRA rank whose parameter count
   is closest to FlexiGPT's (it must be within `param_tolerance`, default 5%).
4. The same training tokens for every run (one tokenization, the same seeded block order) and
   the same token budget; each method at every learning rate in `lrs`, for every seed.
5. Held-out perplexity before and after healing on text no training step saw (default: the
   embedded news text; the training text is the embedded Wikipedia sample).

Rows: method, options, lr, seed, trainable params, tokens, ppl at init and after, wall time.

Cost on a CPU: one training step of 4 x 256 tokens on SmolLM2-135M takes ~3.5 s on 2 free
cores and a 40 x 256-token perplexity ~10 forwards of that size, so the default (40 steps x 2
learning rates x 2 methods, 7 evaluations, one prune) is ~15 minutes; on a loaded machine it
is several times that. Prefer a GPU for the budgets of issue 8 (150k and 1M tokens).
"""

from __future__ import annotations

import copy
import csv
import platform
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..convert.prune import prune
from ..eval.perplexity import perplexity
from .data import load_blocks
from .heal import heal
from .lora import lora_parameter_count
from .params import count_parameters, select_trainable

__all__ = ["COLUMNS", "matching_lora_rank", "compare_recovery", "write_results", "format_table"]

METHODS = ("flexigpt", "shortgpt_lora")
COLUMNS = ("method", "options", "lr", "seed", "trainable_params", "tokens", "ppl_init", "ppl_after", "wall_s")


def matching_lora_rank(model, target_params: int, *, tolerance: float = 0.05, max_rank: int = 4096) -> tuple[int, int]:
    """(rank, parameter count) of LoRA on the kept blocks of `model` closest to `target_params`.
    Raises ValueError when even the closest rank is off by more than `tolerance` (relative)."""
    per_rank = lora_parameter_count(model, 1)
    if per_rank == 0:
        raise ValueError("the model has no kept block to put LoRA on")
    best = None
    for r in {max(1, target_params // per_rank), max(1, target_params // per_rank + 1)}:
        n = lora_parameter_count(model, min(r, max_rank))
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (r, n)
    rank, n = best
    if abs(n - target_params) > tolerance * target_params:
        raise ValueError(f"no LoRA rank matches {target_params:,} trainable parameters within {tolerance:.0%}: "
                         f"rank {rank} gives {n:,}")
    return rank, n


def compare_recovery(
    *,
    tokens: int = 40_960,
    lrs: Sequence[float] = (1e-3, 4e-3),
    seeds: Sequence[int] = (0,),
    ratio: float = 0.3,
    rank=None,
    seq_len: int = 256,
    batch_size: int = 4,
    eval_chunks: int = 40,
    calib_samples: int = 32,
    methods: Iterable[str] = METHODS,
    param_tolerance: float = 0.05,
    model=None,
    tokenizer=None,
    train_texts=None,
    heldout_texts=None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the comparison; returns {"rows": [...], "meta": {...}} (see the module doc).
    model/tokenizer/texts default to the embedded SmolLM2-135M and gensim texts."""
    methods = tuple(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    t_all = time.perf_counter()
    if model is None:
        from ..assets import load_default_model

        model, tokenizer = load_default_model()
    if train_texts is None or heldout_texts is None:
        from ..assets import default_texts

        train_texts = default_texts("calibration") if train_texts is None else train_texts
        heldout_texts = default_texts("heldout") if heldout_texts is None else heldout_texts
    model.eval()
    steps = max(1, -(-tokens // (batch_size * seq_len)))
    budget = steps * batch_size * seq_len
    heldout = load_blocks(heldout_texts, tokenizer, seq_len=seq_len, num_blocks=eval_chunks, seed=None,
                          what="heldout")
    if heldout.shape[0] < eval_chunks:
        log(f"held-out text holds only {heldout.shape[0]} chunks of {seq_len} tokens")
    train_tokens = {s: load_blocks(train_texts, tokenizer, seq_len=seq_len, num_blocks=steps * batch_size, seed=s,
                                   what="training text") for s in seeds}

    def ppl(m):
        return perplexity(m, None, heldout, seq_len=seq_len, num_chunks=None, progress=False)

    t = time.perf_counter()
    dense_ppl = ppl(model)
    log(f"dense held-out perplexity {dense_ppl:.2f} ({time.perf_counter() - t:.0f} s)")

    t = time.perf_counter()
    flex, prune_report = prune(copy.deepcopy(model), train_texts, tokenizer=tokenizer, ratio=ratio, rank=rank,
                               seq_len=seq_len, num_samples=calib_samples, progress=progress)
    prune_s = time.perf_counter() - t
    blocks = prune_report.pruned
    log(f"pruned blocks {blocks}, bases {prune_report.base_map}, adapter rank {prune_report.rank} "
        f"({prune_s:.0f} s)")
    target = count_parameters(select_trainable(flex, "adapters"))
    drop, _ = prune(copy.deepcopy(model), None, blocks=blocks, method="drop", progress=False)
    lora_rank, lora_params = matching_lora_rank(drop, target, tolerance=param_tolerance)
    log(f"trainable parameters: FlexiGPT adapters+gamma {target:,}; LoRA rank {lora_rank} on the kept blocks "
        f"{lora_params:,} ({(lora_params - target) / target:+.1%})")

    setups = {
        "flexigpt": dict(model=flex, trainable="adapters", lora_rank=None,
                         options=f"adapters+gamma, rank {prune_report.rank}, blocks {len(blocks)}"),
        "shortgpt_lora": dict(model=drop, trainable="lora_kept", lora_rank=lora_rank,
                              options=f"drop + LoRA rank {lora_rank} on {len(_kept(drop))} kept blocks"),
    }
    rows = [dict(method="dense", options="no pruning", lr=None, seed=None, trainable_params=0, tokens=0,
                 ppl_init=dense_ppl, ppl_after=dense_ppl, wall_s=0.0)]
    init_ppl = {}
    for method in methods:
        init_ppl[method] = ppl(setups[method]["model"])
        log(f"{method}: held-out perplexity at init {init_ppl[method]:.2f}")
    for seed in seeds:
        for method in methods:
            setup = setups[method]
            for lr in lrs:
                m = copy.deepcopy(setup["model"])
                rep = heal(m, train_tokens[seed], steps=steps, lr=lr, seq_len=seq_len, batch_size=batch_size,
                           trainable=setup["trainable"], lora_rank=setup["lora_rank"], seed=seed, progress=progress)
                after = ppl(m)
                rows.append(dict(method=method, options=setup["options"], lr=lr, seed=seed,
                                 trainable_params=rep.trainable_params, tokens=rep.tokens_seen,
                                 ppl_init=init_ppl[method], ppl_after=after, wall_s=rep.seconds))
                log(f"{method} lr {lr:g} seed {seed}: ppl {init_ppl[method]:.2f} -> {after:.2f}, loss "
                    f"{rep.losses[0]:.3f} -> {rep.losses[-1]:.3f}, {rep.seconds:.0f} s")
                del m
    meta = dict(model=getattr(model.config, "_name_or_path", "") or "SmolLM2-135M-Instruct (embedded)",
                ratio=ratio, pruned=blocks, base_map={str(k): v for k, v in prune_report.base_map.items()},
                adapter_rank=prune_report.rank, lora_rank=lora_rank, steps=steps, tokens=budget,
                seq_len=seq_len, batch_size=batch_size, eval_chunks=int(heldout.shape[0]), seeds=list(seeds),
                lrs=list(lrs), dense_ppl=dense_ppl, prune_seconds=prune_s,
                total_seconds=time.perf_counter() - t_all, torch_threads=torch.get_num_threads(),
                machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                torch=torch.__version__)
    return {"rows": rows, "meta": meta}


def _kept(model):
    from ..convert.families import decoder_layers

    return [b for b in decoder_layers(model) if not hasattr(b, "flexigpt_base")]


def _fmt(v, nd=2):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_table(result: dict) -> str:
    """A Markdown table of the rows, plus the run's settings and the best run per method."""
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"Recovery at equal budget: {meta['model']}, ratio {meta['ratio']} (pruned blocks {meta['pruned']}), "
        f"{meta['tokens']:,} training tokens ({meta['steps']} steps x {meta['batch_size']} x {meta['seq_len']}), "
        f"held-out perplexity on {meta['eval_chunks']} x {meta['seq_len']} tokens of unseen text. "
        f"torch {meta['torch']}, {meta['torch_threads']} threads.",
        "",
        "| method | options | lr | seed | trainable params | tokens | ppl at init | ppl after | wall s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lr = "" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(f"| {r['method']} | {r['options']} | {lr} | {_fmt(r['seed'])} | {r['trainable_params']:,} | "
                     f"{r['tokens']:,} | {_fmt(r['ppl_init'])} | {_fmt(r['ppl_after'])} | {_fmt(r['wall_s'], 0)} |")
    best = {}
    for r in rows:
        if r["method"] != "dense" and (r["method"] not in best or r["ppl_after"] < best[r["method"]]["ppl_after"]):
            best[r["method"]] = r
    if best:
        lines += ["", "Best per method: " + "; ".join(f"{m} {r['ppl_after']:.2f} (lr {r['lr']:g})"
                                                      for m, r in best.items())]
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
            w.writerow({k: r[k] for k in COLUMNS})
    md_path.write_text(format_table(result))
    return csv_path, md_path
