"""`flexigpt compare`: FlexiGPT vs ShortGPT + LoRA at an equal recovery budget on the embedded
default (SmolLM2-135M, ratio 0.3): same blocks, same training text and token budget, trainable
parameters within 5%, held-out perplexity before and after. Writes <out-dir>/<name>.csv and .md.
See flexigpt_kernels/train/compare.py for the protocol."""

from __future__ import annotations

import argparse
import json
import sys


def _list(kind):
    def parse(s: str):
        return [kind(x) for x in s.split(",") if x]
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=40_960, help="training tokens per run (default 40960 = 40 x 4 x 256)")
    p.add_argument("--lr", type=_list(float), default=[1e-3, 4e-3], help="learning rates to sweep, comma-separated")
    p.add_argument("--seed", type=_list(int), default=[0], help="seeds (data order, LoRA init), comma-separated")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--rank", type=int, help="FlexiGPT adapter rank (default: prune's, 256/4096 of the hidden size)")
    p.add_argument("--methods", type=_list(str), default=["flexigpt", "shortgpt_lora"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-chunks", type=int, default=40)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="recovery_cpu", help="file stem of the CSV and Markdown outputs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    from ..train.compare import compare_recovery, format_table, write_results

    result = compare_recovery(tokens=args.tokens, lrs=args.lr, seeds=args.seed, ratio=args.ratio, rank=args.rank,
                              seq_len=args.seq_len, batch_size=args.batch_size, eval_chunks=args.eval_chunks,
                              methods=args.methods, progress=not args.no_progress,
                              log=(lambda *a: print(*a, file=sys.stderr)))
    csv_path, md_path = write_results(result, args.out_dir, args.name)
    if args.json:
        json.dump(result, sys.stdout, default=str)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
        print(f"wrote {csv_path} and {md_path}")
    return 0
