"""The arguments and the run of a pruning job from the command line, shared by `flexigpt prune`
and `flexigpt demo` (flexigpt_kernels/commands/demo.py). Not a command itself."""

from __future__ import annotations

import argparse
import time

from ..cli import UsageError
from ..presets import RECIPE
from ._common import (
    DTYPES,
    check_out,
    finite_float,
    fraction,
    listing,
    non_negative_int,
    nonempty,
    out_dir,
    positive_int,
    print_result,
    rank,
    user_input,
)


def add_arguments(p: argparse.ArgumentParser, *, require_out: bool = True) -> None:
    p.add_argument(
        "--model", type=nonempty, help="local folder or hub name of a causal LM (default: embedded SmolLM2-135M)"
    )
    p.add_argument(
        "--calib",
        type=nonempty,
        help="calibration source: dataset name, .txt/.jsonl/.parquet file or "
        "folder (default: embedded gensim Wikipedia sample)",
    )
    p.add_argument(
        "--eval",
        dest="eval_source",
        type=nonempty,
        help="held-out text source for perplexity (default: embedded gensim news text)",
    )
    p.add_argument("--ratio", type=fraction, default=0.3, help="fraction of decoder blocks to prune (default 0.3)")
    p.add_argument("--blocks", type=listing(non_negative_int, unique=True), help="explicit blocks, e.g. 3,12,13")
    p.add_argument("--rank", type=rank, help="adapter rank, int or fraction of hidden size (default 256/4096)")
    p.add_argument("--method", choices=["flexigpt", "drop"], default="flexigpt")
    p.add_argument("--gamma-init", type=finite_float, help="initial output-norm gamma (default 1e-2)")
    p.add_argument(
        "--local-fit",
        choices=["none", "gamma", "full"],
        default=RECIPE.local_fit or "none",
        help="fit replacement blocks to the dense blocks on calibration tokens: 'gamma' "
        "(default: per-channel least-squares gamma, seconds), 'full' (activation-aware "
        "adapters + gamma + 40 gradient steps per block, minutes), 'none' (the paper's init)",
    )
    p.add_argument(
        "--bases",
        choices=["weights", "functional"],
        default="weights",
        help="each pruned block's base: by the low-rank weight distance (default, the paper's) or "
        "'functional': the kept block whose layer, run on the pruned block's recorded input, best "
        "reproduces its output (4 calibration sequences, ~1 min for SmolLM2-135M at ratio 0.5)",
    )
    p.add_argument(
        "--select",
        choices=["influence", "recoverable"],
        default="influence",
        help="with --ratio, which blocks go: the lowest Block Influence (default) or 'recoverable': "
        "Block Influence times how badly the best kept block stands in for each (flexigpt only)",
    )
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--num-samples", type=positive_int, default=32, help="calibration chunks")
    p.add_argument("--eval-chunks", type=positive_int, default=40, help="held-out chunks of --seq-len tokens")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    p.add_argument("--no-baseline", action="store_true", help="skip the drop baseline's perplexity")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--out", type=out_dir, required=require_out, help="directory to save the pruned model to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def load_inputs(args: argparse.Namespace):
    """(model, tokenizer, calibration source, held-out source or None) from the arguments."""
    from ..io import load_model, resolve_data
    from ..io.load import locate_model

    with user_input("--model"):
        locate_model(args.model, allow_converted=False)
    with user_input("--calib"):
        calib = resolve_data(args.calib, "calibration", what="calib")
    heldout = None
    if not args.no_eval:
        with user_input("--eval"):
            heldout = resolve_data(args.eval_source, "heldout", what="eval")
    with user_input("--model"):
        loaded = load_model(args.model, dtype=args.dtype, allow_converted=False)
    if loaded.tokenizer is None:
        raise UsageError(f"--model: {args.model} has no tokenizer, which calibration on text needs")
    return loaded.model, loaded.tokenizer, calib, heldout


def run(args: argparse.Namespace) -> int:
    from ..prune_job import format_summary, run_prune_job

    if args.out is not None:
        check_out(args.out, args.overwrite)  # fail before minutes of work, not after
    t = time.perf_counter()
    model, tokenizer, calib, heldout = load_inputs(args)
    load_s = time.perf_counter() - t
    from ..io.model_card import set_card_info

    set_card_info(model, source=args.model or "default")  # the model card's source model
    summary = run_prune_job(
        model,
        tokenizer,
        calib,
        heldout,
        ratio=args.ratio,
        blocks=args.blocks,
        rank=args.rank,
        method=args.method,
        out=args.out,
        overwrite=args.overwrite,
        baseline=not args.no_baseline,
        seq_len=args.seq_len,
        num_samples=args.num_samples,
        eval_chunks=args.eval_chunks,
        gamma_init=args.gamma_init,
        local_fit=None if args.local_fit == "none" else args.local_fit,
        bases=args.bases,
        select=args.select,
        progress=not args.json,
    )
    summary["seconds"] = {"load_model": load_s, **summary["seconds"]}
    print_result(summary, args.json, lambda: format_summary(summary))
    return 0
