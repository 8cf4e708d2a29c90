"""`flexigpt heal DIR --data SOURCE --out DIR`: recovery-train a pruned model and save it.

DIR is a checkpoint written by `flexigpt prune` (flexigpt_kernels.io.save_pretrained) or a
plain Hugging Face causal-LM folder. SOURCE is any calibration source (dataset name, .txt /
.jsonl / .parquet file or folder), or "default" for the embedded Wikipedia sample. Multi-process:
`accelerate launch -m flexigpt_kernels.cli heal ...` (or torchrun) trains with DDP; only the
main process writes. LoRA added by --trainable lora_kept (the default, with the replacement
adapters) is merged into the weights before saving; where a kept block is also a replacement
block's base, the replacement absorbs the difference in its adapter (see train.merge_lora).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _names(s: str) -> tuple[str, ...]:
    return tuple(x for x in s.split(",") if x)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..presets import RECIPE
    from ..train.params import TRAINABLE_SETS

    p.add_argument("model", metavar="DIR", help="pruned checkpoint (flexigpt prune --out) or a Hugging Face model folder")
    p.add_argument("--data", required=True, help="training text: dataset name, file or folder; 'default' = embedded "
                                                 "Wikipedia sample")
    p.add_argument("--out", required=True, help="directory to save the healed model to")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="optimizer steps")
    budget.add_argument("--tokens", type=int, help="token budget (steps = ceil(tokens / (global batch x seq len)))")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--gamma-lr", type=float, help="separate learning rate for output-norm gammas")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps (< 1) or a step count")
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="<= 0 disables clipping")
    p.add_argument("--trainable", default=",".join((RECIPE.trainable,) if isinstance(RECIPE.trainable, str)
                                                    else RECIPE.trainable),
                   help=f"comma-separated sets from {', '.join(TRAINABLE_SETS)}; default adapters,lora_kept: the "
                        "replacement adapters and gammas plus LoRA on the kept blocks (issue 8's measured recipe; "
                        "'adapters' alone is the paper's set); a dropped model takes lora_kept")
    p.add_argument("--lora-rank", type=int, default=RECIPE.lora_rank,
                   help=f"LoRA rank for lora_kept (default {RECIPE.lora_rank})")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--teacher", help="dense teacher for distillation: a model folder, or 'default' (embedded SmolLM2)")
    p.add_argument("--distill", type=_names, default=("kl",), help="with --teacher: kl, mse or kl,mse (default kl)")
    p.add_argument("--kl-temperature", type=float, default=1.0)
    p.add_argument("--eval-data", help="held-out text for perplexity; 'default' = embedded news text")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-chunks", type=int, default=40)
    p.add_argument("--checkpoint-dir", help="save resumable training checkpoints here")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerate", action="store_true",
                   help="use Hugging Face accelerate (automatic when launched by accelerate launch / torchrun)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _load_model(path: str):
    from ..io import from_pretrained, load_tokenizer
    from ..io.checkpoint import FLEXIGPT_CONFIG_NAME

    if path == "default":
        from ..assets import load_default_model

        return load_default_model()
    if (Path(path) / FLEXIGPT_CONFIG_NAME).is_file():
        model = from_pretrained(path)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path)
    try:
        tokenizer = load_tokenizer(path)
    except Exception:  # a folder without a tokenizer: token-tensor sources still work
        tokenizer = None
    return model, tokenizer


def _source(value, split: str):
    if value == "default":
        from ..assets import default_texts

        return default_texts(split)
    return value


def _distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run(args: argparse.Namespace) -> int:
    from ..train import heal, merge_lora

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"flexigpt heal: {out} exists and is not empty (pass --overwrite)")
    accelerator = None
    if args.accelerate or _distributed_launch():
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision=args.mixed_precision)
    is_main = accelerator is None or accelerator.is_main_process
    model, tokenizer = _load_model(args.model)
    teacher = _load_model(args.teacher)[0] if args.teacher else None
    trainable = tuple(s for s in args.trainable.split(",") if s)
    report = heal(
        model, _source(args.data, "calibration"), tokenizer=tokenizer, steps=args.steps, tokens=args.tokens,
        lr=args.lr, gamma_lr=args.gamma_lr, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        teacher=teacher, distill=args.distill if teacher is not None else None,
        kl_temperature=args.kl_temperature, trainable=trainable if len(trainable) > 1 else trainable[0],
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        eval_data=_source(args.eval_data, "heldout") if args.eval_data else None, eval_every=args.eval_every,
        eval_chunks=args.eval_chunks, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        resume=args.resume, mixed_precision="no" if accelerator is not None else args.mixed_precision,
        seed=args.seed, progress=is_main and not args.json, accelerator=accelerator,
    )
    if is_main:
        from ..io import save_pretrained

        merged = merge_lora(model)
        for p in model.parameters():
            p.requires_grad_(False)
        save_pretrained(model, out, tokenizer, overwrite=args.overwrite)
        summary = report.to_dict()
        summary.update(out=str(out), lora_layers_merged=merged)
        (out / "heal_report.json").write_text(json.dumps(summary, indent=2) + "\n")
        if args.json:
            json.dump(summary, sys.stdout)
            sys.stdout.write("\n")
        else:
            print(format_report(report, out))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return 0


def format_report(report, out=None) -> str:
    lines = [f"healed {report.steps} steps, {report.tokens_seen:,} tokens, {report.trainable_params:,} trainable "
             f"parameters ({report.trainable}), {report.seconds:.1f} s ({report.tokens_per_second:.0f} tokens/s)"]
    if report.losses:
        lines.append(f"loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}")
    if report.eval_perplexities:
        lines.append("held-out perplexity: " + ", ".join(f"step {s}: {p:.2f}" for s, p in report.eval_perplexities))
    if out is not None:
        lines.append(f"saved to {out}")
    return "\n".join(lines)
