"""FlexiGPT vs ShortGPT + LoRA at an equal recovery budget (docs/method.md 8).

Protocol, one function (and `flexigpt compare`):

1. The dense model (default: the embedded SmolLM2-135M) and its held-out perplexity.
2. prune(..., method="flexigpt") at `ratio` with calibration on the training text: the pruned
   blocks. Every method uses these blocks; ShortGPT drops them (method="drop").
3. The trainable-parameter budget is that of the paper's recipe: the adapters and output-norm
   gammas of the replacement blocks at prune's default rank. Every method trains within
   `param_tolerance` (default 5%) of it:

   - "flexigpt_paper": the paper's recipe: SVD-initialised adapters, gamma = 1e-2, trains the
     adapters and gammas.
   - "flexigpt": this package's recipe (:class:`FlexiGPTRecipe`): block-local initialisation
     (activation-aware adapters, closed-form gamma, a short per-block fit on recorded dense
     activations), and a hybrid trainable set: the replacement adapters at a share of the
     budget, LoRA on every kept block with the rest.
   - "shortgpt_lora": LoRA on every linear of every kept block of the dropped model, the rank
     whose parameter count is closest to the budget.
   - "shortgpt_lora_eqmem": the same at equal memory: drop only the k' lowest-Block-Influence
     blocks of the pruned ones, k' the largest count whose dropped model still stores at least
     as many parameters as the "flexigpt" model once healed and merged (its replacement
     adapters grow by the LoRA rank where LoRA merges into a weight they share), so
     ShortGPT + LoRA never gets less memory than FlexiGPT; same trainable budget.

   Without training, "drop" (the pruned blocks removed) is reported as its own row whenever
   "shortgpt_lora" is measured (its perplexity at init).

4. The same training tokens for every run (one tokenization, the same seeded block order) and
   the same token budget per row; tokens the block-local fit records count toward it (its run
   heals for fewer steps). Each budget in `tokens` is a separate set of runs. Every method at
   every learning rate in `lrs` on the first seed; every further seed re-runs each method at
   its best learning rate of that budget (the final pair).
5. Held-out perplexity before and after healing on text no training step saw (default: the
   embedded news text; the training text is the embedded Wikipedia sample).
6. Optionally every method adds distillation from the dense model (COMPARE_DISTILL): "kl" (its
   logits), "hidden" (every block's output matched, relative per token, to the dense model's
   output at the block's original index: FlexiGPT at every position, ShortGPT + LoRA at the
   blocks it keeps; see train/distill.py), or "kl+hidden".

Rows: budget, method, options, lr, seed, trainable params, tokens, ppl at init and after, wall,
and the model's ratio, blocks removed or replaced and stored parameters (shared tensors once,
LoRA merged into the kept weights). `done` rows (from an interrupted run with the same
settings) are kept instead of re-run, so a run resumes at the next missing row.

Cost on a CPU: one training step of 4 x 256 tokens on SmolLM2-135M takes ~3.5 s on 2 free
cores (more for the FlexiGPT models, which run all 30 blocks, than for the dropped one), and a
40 x 256-token perplexity ~10 forwards of that size; a 150k-token run is ~10 minutes. Prefer a
GPU for a 1M-token budget.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from ..convert.prune import prune, stored_parameters
from ..eval.perplexity import perplexity
from ..presets import PAPER
from .compare_budget import (
    METHODS,
    FlexiGPTRecipe,
    _kept,
    _layers,
    _recipe_dict,
    _recipe_setup,
    _Setup,
    equal_memory_blocks,
    matching_lora_rank,
)
from .compare_report import COLUMNS, best_runs, format_table, read_rows, write_results
from .data import load_blocks
from .heal import heal
from .params import count_parameters, select_trainable

__all__ = [
    "COLUMNS",
    "COMPARE_DISTILL",
    "METHODS",
    "FlexiGPTRecipe",
    "matching_lora_rank",
    "equal_memory_blocks",
    "compare_recovery",
    "best_runs",
    "read_rows",
    "write_results",
    "format_table",
]


def compare_recovery(
    *,
    tokens: int | Sequence[int] = 40_960,
    lrs: Sequence[float] = (1e-3, 4e-3),
    seeds: Sequence[int] = (0,),
    ratio: float = 0.3,
    rank=None,
    seq_len: int = 256,
    batch_size: int = 4,
    eval_chunks: int = 40,
    calib_samples: int = 32,
    methods: Iterable[str] = METHODS[:3],
    recipe: FlexiGPTRecipe | None = None,
    distill: str | None = None,
    param_tolerance: float = 0.05,
    done: Sequence[dict] = (),
    dense_ppl: float | None = None,
    model=None,
    tokenizer=None,
    train_texts=None,
    heldout_texts=None,
    progress: bool = True,
    log=print,
    on_row: Callable[[dict], None] | None = None,
) -> dict:
    """Run the comparison; returns {"rows": [...], "meta": {...}} (see the module doc).

    tokens: one budget or several (each a separate set of runs); lrs: swept on seeds[0];
    seeds[1:]: each method again at its best lr per budget. recipe: the "flexigpt" method's
    (default FlexiGPTRecipe()). distill: None (next-token loss) or one of COMPARE_DISTILL: every
    method adds those terms to the dense model while healing (one teacher forward per step). on_row(result
    so far) is called after every run (to save partial results). done: rows of an earlier,
    interrupted run with the same settings; a run whose (budget, method, lr, seed) is among
    them is not repeated (its row is reused). dense_ppl: the dense model's held-out perplexity
    when already measured on the same text and settings (not measured again). model/tokenizer/
    texts default to the embedded SmolLM2-135M and texts."""
    methods = tuple(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
    budgets = [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]
    if not budgets or min(budgets) < 1:
        raise ValueError(f"tokens: need one or more positive budgets, got {tokens!r}")
    if distill is not None and distill not in COMPARE_DISTILL:
        raise ValueError(f"distill must be None or one of {COMPARE_DISTILL}, got {distill!r}")
    if not lrs or not seeds:
        raise ValueError("lrs and seeds must each hold at least one value")
    if "shortgpt_lora_eqmem" in methods and "flexigpt" not in methods:
        raise ValueError("method 'shortgpt_lora_eqmem' is sized against 'flexigpt': measure both")
    methods = tuple(m for m in METHODS if m in methods)  # flexigpt first: the equal-memory baseline needs it
    previous = {_run_key(r): r for r in done if r.get("method") not in ("dense", "drop")}
    recipe = recipe or FlexiGPTRecipe()
    t_all = time.perf_counter()
    if model is None:
        from ..io.load import load_model

        loaded = load_model("default")
        model, tokenizer = loaded.model, loaded.tokenizer
    from ..io.load import resolve_data

    train_texts = resolve_data(train_texts, "calibration", what="train_texts")
    heldout_texts = resolve_data(heldout_texts, "heldout", what="heldout_texts")
    model.eval()
    tokens_per_step = batch_size * seq_len
    max_steps = max(1, -(-max(budgets) // tokens_per_step))
    heldout = load_blocks(heldout_texts, tokenizer, seq_len=seq_len, num_blocks=eval_chunks, seed=None, what="heldout")
    if heldout.shape[0] < eval_chunks:
        log(f"held-out text holds only {heldout.shape[0]} chunks of {seq_len} tokens")
    train_tokens = {
        s: load_blocks(
            train_texts, tokenizer, seq_len=seq_len, num_blocks=max_steps * batch_size, seed=s, what="training text"
        )
        for s in seeds
    }

    def ppl(m):
        return perplexity(m, None, heldout, seq_len=seq_len, num_chunks=None, progress=False)

    if dense_ppl is None:
        t = time.perf_counter()
        dense_ppl = ppl(model)
        log(f"dense held-out perplexity {dense_ppl:.2f} ({time.perf_counter() - t:.0f} s)")

    t = time.perf_counter()
    paper, prune_report = prune(
        copy.deepcopy(model),
        train_texts,
        tokenizer=tokenizer,
        ratio=ratio,
        rank=rank,
        seq_len=seq_len,
        num_samples=calib_samples,
        progress=progress,
        **PAPER.prune_kwargs(),
    )
    prune_s = time.perf_counter() - t
    blocks = prune_report.pruned
    log(f"pruned blocks {blocks}, bases {prune_report.base_map}, adapter rank {prune_report.rank} ({prune_s:.0f} s)")
    target = count_parameters(select_trainable(paper, PAPER.trainable))
    log(f"trainable-parameter budget: {target:,} (the paper's adapters + gammas at rank {prune_report.rank})")

    n_layers = len(_layers(model))
    dense_stored = stored_parameters(model)
    setups: dict[str, _Setup] = {}
    skipped: dict[str, str] = {}
    for method in methods:
        if method == "flexigpt_paper":
            setups[method] = _Setup(
                paper,
                PAPER.trainable,
                PAPER.lora_rank,
                f"paper: SVD adapters rank {prune_report.rank}, gamma 1e-2; trains adapters + gamma",
                params=target,
                prep_s=prune_s,
                blocks=len(blocks),
                stored=stored_parameters(paper),
            )
        elif method in ("shortgpt_lora", "shortgpt_lora_eqmem"):
            dropped = blocks
            if method == "shortgpt_lora_eqmem":
                try:
                    dropped = equal_memory_blocks(model, blocks, prune_report.scores, setups["flexigpt"].stored)
                except ValueError as e:
                    log(f"{method}: not measured at this ratio: {e}")
                    skipped[method] = str(e)
                    continue
            drop, _ = prune(copy.deepcopy(model), None, blocks=dropped, method="drop", local_fit=None, progress=False)
            lora_rank, n = matching_lora_rank(drop, target, tolerance=param_tolerance)
            setups[method] = _Setup(
                drop,
                "lora_kept",
                lora_rank,
                f"drop {len(dropped)} + LoRA rank {lora_rank} on {len(_kept(drop))} kept blocks",
                params=n,
                blocks=len(dropped),
                stored=stored_parameters(drop),
                positions=[i for i in range(n_layers) if i not in set(dropped)],
            )
        else:
            setups[method] = _recipe_setup(
                model,
                recipe,
                blocks,
                prune_report.rank,
                target,
                param_tolerance,
                train_texts=train_texts,
                tokenizer=tokenizer,
                seq_len=seq_len,
                calib_samples=calib_samples,
                progress=progress,
                ratio=ratio,
                paper=paper,
            )
        s = setups[method]
        if s.pruned is not None and s.pruned != blocks:
            log(f"{method}: its own blocks {s.pruned}")
        if s.base_map is not None and s.base_map != prune_report.base_map:
            log(f"{method}: bases {s.base_map}")
        if s.prune_seconds:
            log(f"{method}: prune phases " + ", ".join(f"{k} {v:.0f} s" for k, v in s.prune_seconds.items()))
        s.ppl_init = ppl(s.model)
        log(
            f"{method}: {s.options}; {s.params:,} trainable ({(s.params - target) / target:+.1%}); "
            f"{s.stored:,} stored ({s.stored / dense_stored:.1%}); held-out perplexity at init {s.ppl_init:.2f}"
        )

    rows = [
        dict(
            budget=0,
            method="dense",
            options="no pruning",
            lr=None,
            seed=None,
            trainable_params=0,
            tokens=0,
            ppl_init=dense_ppl,
            ppl_after=dense_ppl,
            wall_s=0.0,
            ratio=0.0,
            blocks=0,
            stored_params=dense_stored,
        )
    ]
    if "shortgpt_lora" in setups:
        s = setups["shortgpt_lora"]
        rows.append(
            dict(
                budget=0,
                method="drop",
                options=f"drop {s.blocks} blocks, no training",
                lr=None,
                seed=None,
                trainable_params=0,
                tokens=0,
                ppl_init=s.ppl_init,
                ppl_after=s.ppl_init,
                wall_s=0.0,
                ratio=s.blocks / n_layers,
                blocks=s.blocks,
                stored_params=s.stored,
            )
        )
    meta = dict(
        model=getattr(model.config, "_name_or_path", "") or "SmolLM2-135M-Instruct (embedded)",
        ratio=ratio,
        pruned=blocks,
        base_map={str(k): v for k, v in prune_report.base_map.items()},
        adapter_rank=prune_report.rank,
        budget_params=target,
        budgets=budgets,
        seq_len=seq_len,
        batch_size=batch_size,
        eval_chunks=int(heldout.shape[0]),
        seeds=list(seeds),
        lrs=list(lrs),
        dense_ppl=dense_ppl,
        dense_stored_params=dense_stored,
        num_layers=n_layers,
        prune_seconds=prune_s,
        recipe=_recipe_dict(recipe),
        **(
            {
                "recipe_base_map": {str(k): v for k, v in setups["flexigpt"].base_map.items()},
                "recipe_pruned": setups["flexigpt"].pruned,
                "recipe_prune_seconds": setups["flexigpt"].prune_seconds,
            }
            if "flexigpt" in setups and setups["flexigpt"].base_map is not None
            else {}
        ),
        distill=distill,
        skipped=skipped,
        torch_threads=torch.get_num_threads(),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        torch=torch.__version__,
    )
    result = {"rows": rows, "meta": meta}

    def run(budget, method, lr, seed):
        s = setups[method]
        shape = dict(ratio=s.blocks / n_layers, blocks=s.blocks, stored_params=s.stored)
        if (budget, method, lr, seed) in previous:
            row = {**previous[(budget, method, lr, seed)], **shape}
            rows.append(row)
            log(f"[{budget:,} tokens] {method} lr {lr:g} seed {seed}: done before, ppl {row['ppl_after']:.2f}")
            return row
        steps = (budget - s.fit_tokens) // tokens_per_step
        if steps < 1:
            raise ValueError(
                f"budget {budget:,} tokens leaves no healing step after the {s.fit_tokens:,} "
                f"tokens of the block-local fit; raise tokens or lower the recipe's fit_samples"
            )
        m = copy.deepcopy(s.model)
        rep = heal(
            m,
            train_tokens[seed],
            steps=steps,
            lr=lr,
            seq_len=seq_len,
            batch_size=batch_size,
            trainable=s.trainable,
            lora_rank=s.lora_rank,
            gamma_lr=s.gamma_lr,
            adapter_lr=s.adapter_lr,
            lora_shared=s.lora_shared,
            teacher=model if distill else None,
            distill=tuple(distill.split("+")) if distill else None,
            distill_positions=s.positions if distill and "hidden" in distill else None,
            seed=seed,
            progress=progress,
        )
        after = ppl(m)
        row = dict(
            budget=budget,
            method=method,
            options=s.options + _distill_text(distill),
            lr=lr,
            seed=seed,
            trainable_params=rep.trainable_params,
            tokens=s.fit_tokens + rep.tokens_seen,
            ppl_init=s.ppl_init,
            ppl_after=after,
            wall_s=s.prep_s + rep.seconds,
            **shape,
        )
        rows.append(row)
        log(
            f"[{budget:,} tokens] {method} lr {lr:g} seed {seed}: ppl {s.ppl_init:.2f} -> {after:.2f}, loss "
            f"{rep.losses[0]:.3f} -> {rep.losses[-1]:.3f}, {rep.seconds:.0f} s"
        )
        meta["total_seconds"] = time.perf_counter() - t_all
        if on_row is not None:
            on_row(result)
        return row

    methods = tuple(m for m in methods if m in setups)
    for budget in budgets:
        for method in methods:
            for lr in lrs:
                run(budget, method, lr, seeds[0])
        for seed in seeds[1:]:
            for method in methods:
                first = [r for r in rows if r["budget"] == budget and r["method"] == method and r["seed"] == seeds[0]]
                run(budget, method, min(first, key=lambda r: r["ppl_after"])["lr"], seed)
    meta["total_seconds"] = time.perf_counter() - t_all
    return result


COMPARE_DISTILL = ("kl", "hidden", "kl+hidden")


def _distill_text(distill: str | None) -> str:
    text = {"kl": "KL to the dense logits", "hidden": "block outputs matched to the dense model's"}
    return "".join(f"; + {text[t]}" for t in distill.split("+")) if distill else ""


def _run_key(r: dict) -> tuple:
    return (
        int(r["budget"]),
        r["method"],
        None if r["lr"] in (None, "") else float(r["lr"]),
        None if r["seed"] in (None, "") else int(r["seed"]),
    )
