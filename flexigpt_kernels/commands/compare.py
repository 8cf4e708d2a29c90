"""`flexigpt compare`: FlexiGPT (this package's recipe and the paper's) vs ShortGPT + LoRA at an
equal recovery budget on the embedded default (SmolLM2-135M, ratio 0.3): same blocks, same
training text and token budget(s), trainable parameters within 5%, learning rates swept, a
further seed for each method's best, held-out perplexity before and after. Writes
<out-dir>/<name>.csv and .md after every run. See flexigpt_kernels/train/compare.py.

With --ratios 0.2,0.3,0.4,0.5: the quality-per-byte frontier (train/frontier.py): per ratio,
drop, ShortGPT + LoRA on the same blocks, FlexiGPT and ShortGPT + LoRA at equal memory; writes
<name>.csv/.json/.md/.png (default name frontier_cpu) after every run and resumes from them."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import UsageError
from ._common import (
    fraction,
    fraction_or_one,
    listing,
    non_negative_int,
    nonempty,
    out_dir,
    positive_float,
    positive_int,
    rank,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.compare import METHODS

    p.add_argument(
        "--tokens",
        type=listing(positive_int),
        default=None,
        help="token budget(s) per run, comma-separated (default 40960 = 40 x 4 x 256; with --ratios 20480)",
    )
    p.add_argument(
        "--lr",
        type=listing(positive_float),
        default=None,
        help="learning rates swept on the first seed, comma-separated (default 1e-3,4e-3; with --ratios 4e-3)",
    )
    p.add_argument(
        "--seed",
        type=listing(non_negative_int, unique=True),
        default=None,
        help="seeds (data order, LoRA init), comma-separated; seeds after the first re-run each "
        "method at its best learning rate (default 0; with --ratios 0,1)",
    )
    p.add_argument("--ratio", type=fraction, default=0.3)
    p.add_argument(
        "--ratios",
        type=listing(fraction, unique=True),
        help="the frontier: one comparison per pruning ratio, e.g. 0.2,0.3,0.4,0.5",
    )
    p.add_argument("--rank", type=rank, help="FlexiGPT adapter rank (default: prune's, 256/4096 of the hidden size)")
    p.add_argument(
        "--methods",
        type=listing(str, choices=METHODS, unique=True),
        default=None,
        help="any of flexigpt (this package's recipe), flexigpt_paper, shortgpt_lora, "
        "shortgpt_lora_eqmem (default: the first three; with --ratios flexigpt, shortgpt_lora, "
        "shortgpt_lora_eqmem)",
    )
    p.add_argument(
        "--adapter-share",
        type=fraction_or_one,
        default=None,
        help="flexigpt recipe: share of the trainable budget for the replacement adapters; the rest "
        "is LoRA on the kept blocks (1.0: adapters only; default: FlexiGPTRecipe's)",
    )
    p.add_argument(
        "--fit-samples",
        type=positive_int,
        default=None,
        help="flexigpt recipe: calibration sequences recorded for the block-local fit "
        "(their tokens count toward the budget)",
    )
    p.add_argument(
        "--fit-steps", type=non_negative_int, default=None, help="flexigpt recipe: block-local fit steps per block"
    )
    p.add_argument(
        "--gamma-lr",
        type=positive_float,
        default=None,
        help="flexigpt recipe: the output-norm gammas' learning rate while healing (default: --lr)",
    )
    p.add_argument(
        "--adapter-lr",
        type=positive_float,
        default=None,
        help="flexigpt recipe: the replacement adapters' learning rate while healing (default: the recipe's)",
    )
    p.add_argument(
        "--train-norms",
        action="store_true",
        help="flexigpt recipe: heal also trains the replacement blocks' own norm weights (counted in the budget)",
    )
    p.add_argument(
        "--share-lora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flexigpt recipe: the replacement blocks compute with their base as the kept block's LoRA "
        "changes it (no extra parameter; the saved adapters do not grow by the LoRA rank); the default, "
        "--no-share-lora gives each replacement its own merged copy (the sweeps before 2026-12-03)",
    )
    p.add_argument(
        "--bases",
        choices=["weights", "functional"],
        default=None,
        help="flexigpt recipe: each pruned block's base by the low-rank weight distance (weights) or by "
        "how well the kept block's layer reproduces the pruned block's recorded output (functional; "
        "scored on the fit's recorded sequences, no extra tokens; default: FlexiGPTRecipe's)",
    )
    p.add_argument(
        "--select",
        choices=["influence", "recoverable"],
        default=None,
        help="flexigpt recipe: prune the Block-Influence blocks every method uses (influence) or its own "
        "choice of as many blocks, Block Influence discounted by the best stand-in's functional error "
        "(recoverable; default: FlexiGPTRecipe's)",
    )
    p.add_argument(
        "--rank-allocation",
        choices=["uniform", "spectrum"],
        default=None,
        help="flexigpt recipe: the replacement adapters' rank on every linear of a block (uniform) or the "
        "same parameters per block spread over its linears by their activation-weighted residual "
        "spectra (spectrum; default: FlexiGPTRecipe's)",
    )
    p.add_argument(
        "--distill",
        choices=["kl", "hidden", "kl+hidden"],
        help="every method distills from the dense model: kl (its logits), hidden (every block's output "
        "against the dense model's at the block's original index), or both",
    )
    p.add_argument(
        "--no-local-fit",
        action="store_true",
        help="flexigpt recipe: the paper's initialisation instead of the block-local fit (ablation)",
    )
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--eval-chunks", type=positive_int, default=40)
    p.add_argument("--out-dir", type=out_dir, default="benchmarks/results")
    p.add_argument(
        "--name",
        type=_file_stem,
        default=None,
        help="file stem of the outputs (default recovery_cpu; with --ratios frontier_cpu)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="with --ratios: start over instead of reusing the runs already in <name>.csv",
    )
    p.add_argument(
        "--keep-baselines",
        action="store_true",
        help="with --ratios: when <name>.csv holds another FlexiGPT recipe's sweep (other settings equal), "
        "reuse its dense, drop and shortgpt_lora rows and replace the rest",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")


def _file_stem(text: str) -> str:
    name = nonempty(text)
    if "/" in name or "\\" in name or name in (".", ".."):
        raise argparse.ArgumentTypeError(f"expected a file name without a folder, got {text!r}")
    return name


def _recipe(args):
    import dataclasses

    from ..train.compare import FlexiGPTRecipe

    recipe = FlexiGPTRecipe()
    if args.adapter_share is not None:
        recipe = dataclasses.replace(recipe, adapter_share=args.adapter_share)
    if args.fit_samples is not None:
        recipe = dataclasses.replace(recipe, fit_samples=args.fit_samples)
    if args.fit_steps is not None:
        recipe = dataclasses.replace(recipe, local_fit=dataclasses.replace(recipe.local_fit, steps=args.fit_steps))
    if args.gamma_lr is not None:
        recipe = dataclasses.replace(recipe, gamma_lr=args.gamma_lr)
    if args.adapter_lr is not None:
        recipe = dataclasses.replace(recipe, adapter_lr=args.adapter_lr)
    if args.train_norms:
        recipe = dataclasses.replace(recipe, train_norms=True)
    if args.share_lora is not None:
        recipe = dataclasses.replace(recipe, share_lora=args.share_lora)
    if args.bases is not None:
        recipe = dataclasses.replace(recipe, bases=args.bases)
    if args.select is not None:
        recipe = dataclasses.replace(recipe, select=args.select)
    if args.rank_allocation is not None:
        if args.no_local_fit and args.rank_allocation != "uniform":
            raise UsageError("--rank-allocation reads the block-local fit's activation spectra: drop --no-local-fit")
        recipe = dataclasses.replace(
            recipe, local_fit=dataclasses.replace(recipe.local_fit, rank_allocation=args.rank_allocation)
        )
    if args.no_local_fit:
        recipe = dataclasses.replace(recipe, local_fit=None)
    return recipe


def run(args: argparse.Namespace) -> int:
    if args.ratios:
        return _run_frontier(args)
    from ..train.compare import compare_recovery, format_table, write_results

    name = args.name or "recovery_cpu"
    result = compare_recovery(
        tokens=args.tokens or [40_960],
        lrs=args.lr or [1e-3, 4e-3],
        seeds=args.seed or [0],
        ratio=args.ratio,
        rank=args.rank,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_chunks=args.eval_chunks,
        methods=args.methods or ["flexigpt", "flexigpt_paper", "shortgpt_lora"],
        recipe=_recipe(args),
        distill=args.distill,
        progress=not args.no_progress,
        log=(lambda *a: print(*a, file=sys.stderr)),
        on_row=lambda partial: write_results(partial, args.out_dir, name),
    )
    csv_path, md_path = write_results(result, args.out_dir, name)
    if args.json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
        print(f"wrote {csv_path} and {md_path}")
    return 0


def _run_frontier(args: argparse.Namespace) -> int:
    from ..train.frontier import FRONTIER_METHODS, format_frontier, run_frontier, write_frontier

    name = args.name or "frontier_cpu"
    result = run_frontier(
        args.ratios,
        tokens=args.tokens or [20_480],
        lrs=args.lr or [4e-3],
        seeds=args.seed or [0, 1],
        methods=args.methods or list(FRONTIER_METHODS),
        recipe=_recipe(args),
        out_dir=args.out_dir,
        name=name,
        resume=not args.no_resume,
        keep_baselines=args.keep_baselines,
        rank=args.rank,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_chunks=args.eval_chunks,
        distill=args.distill,
        progress=not args.no_progress,
        log=(lambda *a: print(*a, file=sys.stderr)),
    )
    paths = write_frontier(result, args.out_dir, name)
    if args.json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(format_frontier(result))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
