"""`flexigpt generate DIR --prompt ...`: decode with a converted model saved by save_pretrained,
self-speculatively by default (the draft skips the replacement blocks), and report the
acceptance rate and tokens/s.

Greedy unless --temperature, --top-p or --sample is given (then sampling with the speculative
acceptance rule, which keeps the full model's distribution; --seed makes it reproducible).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..cli import UsageError
from ._common import DTYPES, fraction_or_one, non_negative_int, nonempty, positive_float, positive_int, user_input


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "directory",
        metavar="DIR",
        type=nonempty,
        help="a model directory written by flexigpt (save_pretrained); with --no-self-speculative "
        "also a Hugging Face folder or 'default'",
    )
    p.add_argument("--prompt", required=True, type=nonempty, help="the text to continue")
    p.add_argument(
        "--self-speculative",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draft with the model minus its replacement blocks, verify with the full model "
        "(default: on; --no-self-speculative decodes plainly)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--draft-tokens", type=positive_int, default=4, help="tokens drafted per round (k, default 4)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, help="sampling temperature (implies --sample)")
    p.add_argument("--top-p", type=fraction_or_one, help="nucleus sampling mass in (0, 1] (implies --sample)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--static-cache",
        action="store_true",
        help="preallocated KV caches: static-shape decode steps (for torch.compile / CUDA graphs)",
    )
    p.add_argument("--dtype", choices=DTYPES, help="default: the stored dtype")
    p.add_argument("--device", default="cpu", type=nonempty, help="e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text and stats)")


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {name}, but no CUDA device is available here")
    return device


def run(args: argparse.Namespace) -> int:
    import torch

    from ..generation import generate
    from ..io import load_model

    device = _device(args.device)
    t = time.perf_counter()
    with user_input("DIR"):
        loaded = load_model(args.directory, dtype=args.dtype, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise UsageError(f"DIR: {args.directory} has no tokenizer (save_pretrained(..., tokenizer=...) writes one)")
    load_s = time.perf_counter() - t
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    if input_ids.shape[1] == 0:
        raise UsageError("--prompt: the tokenizer makes no token of it")
    do_sample = args.sample or args.temperature is not None or args.top_p is not None
    generator = None
    if do_sample:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    ids, stats = generate(
        model,
        input_ids,
        max_new_tokens=args.max_new_tokens,
        self_speculative=args.self_speculative,
        draft_tokens=args.draft_tokens,
        do_sample=do_sample,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p,
        generator=generator,
        static_cache=args.static_cache,
        return_stats=True,
    )
    completion = tokenizer.decode(ids[0, input_ids.shape[1] :], skip_special_tokens=True)
    if args.json:
        json.dump(
            {
                "prompt": args.prompt,
                "completion": completion,
                "token_ids": ids[0].tolist(),
                "do_sample": do_sample,
                "load_seconds": load_s,
                "stats": stats.to_dict(),
            },
            sys.stdout,
        )
        sys.stdout.write("\n")
    else:
        print(args.prompt + completion)
        print(f"[{stats.summary()}]", file=sys.stderr)
    return 0
