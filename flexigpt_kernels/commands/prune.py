"""`flexigpt prune`: prune a Hugging Face causal LM the FlexiGPT way (or drop blocks) and save it.
With no --model and no --calib it runs on the embedded default (SmolLM2-135M + gensim text)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_arguments(p: argparse.ArgumentParser, *, require_out: bool = True) -> None:
    from ..presets import RECIPE
    p.add_argument("--model", help="local directory or hub name of a causal LM (default: embedded SmolLM2-135M)")
    p.add_argument("--calib", help="calibration source: dataset name, .txt/.jsonl/.parquet file or folder "
                                   "(default: embedded gensim Wikipedia sample)")
    p.add_argument("--eval", dest="eval_source", help="held-out text source for perplexity "
                                                      "(default: embedded gensim news text)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of decoder blocks to prune (default 0.3)")
    p.add_argument("--blocks", type=lambda s: [int(b) for b in s.split(",")], help="explicit blocks, e.g. 3,12,13")
    p.add_argument("--rank", type=lambda s: float(s) if "." in s else int(s),
                   help="adapter rank, int or fraction of hidden size (default 256/4096)")
    p.add_argument("--method", choices=["flexigpt", "drop"], default="flexigpt")
    p.add_argument("--gamma-init", type=float, help="initial output-norm gamma (default 1e-2)")
    p.add_argument("--local-fit", choices=["none", "gamma", "full"], default=RECIPE.local_fit or "none",
                   help="fit replacement blocks to the dense blocks on calibration tokens: 'gamma' "
                        "(default: per-channel least-squares gamma, seconds), 'full' (activation-aware "
                        "adapters + gamma + 40 gradient steps per block, minutes), 'none' (the paper's init)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=32, help="calibration chunks")
    p.add_argument("--eval-chunks", type=int, default=40, help="held-out chunks of --seq-len tokens")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    p.add_argument("--no-baseline", action="store_true", help="skip the drop baseline's perplexity")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", required=require_out, help="directory to save the pruned model to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def load_inputs(args: argparse.Namespace):
    """(model, tokenizer, calibration source, held-out source) from the arguments."""
    import torch

    dtype = getattr(torch, args.dtype)
    if args.model is None:
        from ..assets import load_default_model

        model, tokenizer = load_default_model(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.eval()
    calib, heldout = args.calib, args.eval_source
    if calib is None or (heldout is None and not args.no_eval):
        from ..assets import default_texts

        calib = calib if calib is not None else default_texts("calibration")
        heldout = heldout if heldout is not None else default_texts("heldout")
    return model, tokenizer, calib, (None if args.no_eval else heldout)


def run(args: argparse.Namespace) -> int:
    from ..prune_job import check_out_dir, format_summary, run_prune_job

    if args.out is not None:
        check_out_dir(args.out, args.overwrite)  # fail before minutes of work, not after
    t = time.perf_counter()
    model, tokenizer, calib, heldout = load_inputs(args)
    load_s = time.perf_counter() - t
    summary = run_prune_job(
        model, tokenizer, calib, heldout, ratio=args.ratio, blocks=args.blocks, rank=args.rank,
        method=args.method, out=args.out, overwrite=args.overwrite, baseline=not args.no_baseline,
        seq_len=args.seq_len, num_samples=args.num_samples, eval_chunks=args.eval_chunks,
        gamma_init=args.gamma_init, local_fit=None if args.local_fit == "none" else args.local_fit,
        progress=not args.json,
    )
    summary["seconds"] = {"load_model": load_s, **summary["seconds"]}
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_summary(summary))
    return 0
