"""`flexigpt extend`: grow a model by repeating blocks that share the original weights, and save it.

    flexigpt extend [DIR_OR_DEFAULT] --layers a:b [--pattern block|sequential] [--repeats k] --out DIR

Each repeat after the first shares its original's weights and owns a zero-initialised adapter
and output norms with a small gamma (flexigpt_kernels.convert.extend). Unless --no-eval, the
held-out perplexity of the model before and after is printed: at initialisation the extended
model should read close to the original.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..cli import UsageError
from ._common import DTYPES, check_out, finite_float, nonempty, out_dir, positive_int, rank, user_input


def _layer_range(text: str) -> str:
    import re

    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if m is None or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected a block range a:b with a < b, e.g. 10:20, got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="DIR_OR_DEFAULT",
        type=nonempty,
        nargs="?",
        default="default",
        help="Hugging Face folder or hub name of a dense causal LM, or 'default' (the embedded "
        "SmolLM2-135M, also when omitted)",
    )
    p.add_argument(
        "--layers", required=True, type=_layer_range, help="source block range a:b (b exclusive), e.g. 10:20"
    )
    p.add_argument(
        "--pattern",
        choices=["block", "sequential"],
        default="block",
        help="block: a,a,..,a+1,a+1,..; sequential: a..b-1, a..b-1, .. (default block)",
    )
    p.add_argument("--repeats", type=positive_int, default=2, help="occurrences of each block in the range (default 2)")
    p.add_argument("--rank", type=rank, help="adapter rank, int or fraction of the hidden size (default 256/4096)")
    p.add_argument("--gamma-init", type=finite_float, default=None, help="initial output-norm gamma (default 1e-2)")
    p.add_argument(
        "--no-output-norm",
        action="store_true",
        help="no output norm on repeats (a repeat then applies its block again, unchanged)",
    )
    p.add_argument("--scale", type=finite_float, default=1.0, help="adapter scale s (default 1)")
    p.add_argument("--data", type=nonempty, help="held-out text for perplexity (default: embedded gensim news text)")
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--eval-chunks", type=positive_int, default=40, help="held-out windows of --seq-len tokens")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after perplexity")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--out", required=True, type=out_dir, help="directory to save the extended model to")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from ..convert.extend import extend
    from ..io import load_model, resolve_data, save_pretrained
    from ..io.load import locate_model

    check_out(args.out, args.overwrite)
    with user_input("DIR_OR_DEFAULT"):
        locate_model(args.model)
    heldout = None
    if not args.no_eval:
        with user_input("--data"):
            heldout = resolve_data(args.data, "heldout", what="data")
    t0 = time.perf_counter()
    with user_input("DIR_OR_DEFAULT"):
        loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer, ident = loaded.model, loaded.tokenizer, loaded.source
    seconds = {"load": time.perf_counter() - t0}
    ppl = {}
    if heldout is not None:
        if tokenizer is None:
            raise UsageError(f"DIR_OR_DEFAULT: {args.model} has no tokenizer; pass --no-eval")
        from ..eval import perplexity

        t = time.perf_counter()
        ppl["before"] = perplexity(
            model,
            tokenizer,
            heldout,
            seq_len=args.seq_len,
            num_chunks=args.eval_chunks,
            progress=not args.json,
            desc="perplexity (before)",
        )
        seconds["eval_before"] = time.perf_counter() - t
    kwargs = {} if args.gamma_init is None else {"gamma_init": args.gamma_init}
    t = time.perf_counter()
    _, report = extend(
        model,
        args.layers,
        pattern=args.pattern,
        repeats=args.repeats,
        rank=args.rank,
        scale=args.scale,
        output_norm=not args.no_output_norm,
        source=ident,
        **kwargs,
    )
    seconds["extend"] = time.perf_counter() - t
    if heldout is not None:
        t = time.perf_counter()
        ppl["after"] = perplexity(
            model,
            tokenizer,
            heldout,
            seq_len=args.seq_len,
            num_chunks=args.eval_chunks,
            progress=not args.json,
            desc="perplexity (after)",
        )
        seconds["eval_after"] = time.perf_counter() - t
    t = time.perf_counter()
    save_pretrained(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    seconds["save"] = time.perf_counter() - t
    summary = {
        "report": report.to_dict(),
        "perplexity": ppl,
        "source": ident,
        "out": args.out,
        "gamma_init": model.flexigpt_meta["gamma_init"],
        "seconds": seconds,
    }
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
        return 0
    rep = report
    print(
        f"extended {ident}: {rep.num_blocks_before} -> {rep.num_blocks_after} blocks "
        f"(layers {rep.layers[0]}:{rep.layers[1]}, pattern {rep.pattern}, repeats {rep.repeats}, "
        f"rank {rep.rank}, gamma_init {summary['gamma_init']})"
    )
    print(f"order: {rep.order}")
    print(f"stored parameters: {rep.params_before:,} -> {rep.params_after:,} (adapters + gamma {rep.adapter_params:,})")
    if ppl:
        print(
            f"held-out perplexity ({args.eval_chunks} x {args.seq_len} tokens): "
            f"before {ppl['before']:.3f}, after {ppl['after']:.3f}"
        )
    print(f"saved to {args.out}")
    return 0
