"""`flexigpt heal DIR --data SOURCE --out DIR`: recovery-train a pruned model and save it.

DIR is a checkpoint written by `flexigpt prune` (flexigpt_kernels.io.save_pretrained), a
plain Hugging Face causal-LM folder, or "default" (see flexigpt_kernels.io.load_model). SOURCE
is any calibration source (dataset name, .txt / .jsonl / .parquet file or folder), or "default"
for the embedded Wikipedia sample. Multi-process:
`accelerate launch -m flexigpt_kernels.cli heal ...` (or torchrun) trains with DDP;
`torchrun ... heal ... --fsdp`, or accelerate with an FSDP2 config, shards the model by sharing
group (flexigpt_kernels.train.shard). Only the main process writes. LoRA added by --trainable
lora_kept (the default, with the replacement adapters) is merged into the weights before saving;
where a kept block is also a replacement block's base, the replacement absorbs the difference in
its adapter (see train.merge_lora).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..cli import UsageError
from ._common import (
    check_out,
    finite_float,
    listing,
    non_negative_float,
    non_negative_int,
    nonempty,
    out_dir,
    positive_float,
    positive_int,
    print_result,
    user_input,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..presets import RECIPE
    from ..train.params import TRAINABLE_SETS

    p.add_argument(
        "model",
        metavar="DIR",
        type=nonempty,
        help="pruned checkpoint (flexigpt prune --out), a Hugging Face model folder, or 'default'",
    )
    p.add_argument(
        "--data",
        required=True,
        type=nonempty,
        help="training text: dataset name, file or folder; 'default' = embedded Wikipedia sample",
    )
    p.add_argument("--out", required=True, type=out_dir, help="directory to save the healed model to")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=positive_int, help="optimizer steps")
    budget.add_argument(
        "--tokens", type=positive_int, help="token budget (steps = ceil(tokens / (global batch x seq len)))"
    )
    p.add_argument("--lr", type=positive_float, default=4e-3)
    p.add_argument("--gamma-lr", type=positive_float, help="separate learning rate for output-norm gammas")
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per process per micro-step")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--warmup", type=non_negative_float, default=0.05, help="fraction of steps (< 1) or a step count")
    p.add_argument("--min-lr-ratio", type=non_negative_float, default=0.0)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--max-grad-norm", type=finite_float, default=1.0, help="<= 0 disables clipping")
    p.add_argument(
        "--trainable",
        type=listing(str, choices=TRAINABLE_SETS, unique=True),
        default=[RECIPE.trainable] if isinstance(RECIPE.trainable, str) else list(RECIPE.trainable),
        help=f"comma-separated sets from {', '.join(TRAINABLE_SETS)}; default adapters,lora_kept: the "
        "replacement adapters and gammas plus LoRA on the kept blocks (the measured recipe; "
        "'adapters' alone is the paper's set); a dropped model takes lora_kept",
    )
    p.add_argument(
        "--lora-rank",
        type=positive_int,
        default=RECIPE.lora_rank,
        help=f"LoRA rank for lora_kept (default {RECIPE.lora_rank})",
    )
    p.add_argument("--lora-alpha", type=positive_float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument(
        "--share-lora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the replacement blocks compute with their base as the kept block's LoRA changes it: the "
        "LoRA learns from every block that uses the weights, and the merged model stores no extra "
        "adapter for it (default: shared wherever --trainable has lora_kept and the model has "
        "replacement blocks; --share-lora requires both)",
    )
    p.add_argument(
        "--teacher",
        type=nonempty,
        help="dense teacher for distillation: a model folder, or 'default' (embedded SmolLM2)",
    )
    p.add_argument(
        "--distill",
        type=listing(str, choices=("kl", "mse", "hidden"), unique=True),
        default=["kl"],
        help="with --teacher: any of kl, mse, hidden, comma-separated (default kl; see train/distill.py)",
    )
    p.add_argument("--kl-temperature", type=positive_float, default=1.0)
    p.add_argument("--eval-data", type=nonempty, help="held-out text for perplexity; 'default' = embedded news text")
    p.add_argument("--eval-every", type=positive_int)
    p.add_argument("--eval-chunks", type=positive_int, default=40)
    p.add_argument("--checkpoint-dir", type=out_dir, help="save resumable training checkpoints here")
    p.add_argument("--checkpoint-every", type=positive_int)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument(
        "--mixed-precision",
        choices=["no", "bf16", "fp16"],
        help="default: 'no', or under accelerate what its launch config says",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--accelerate",
        action="store_true",
        help="use Hugging Face accelerate (automatic when launched by accelerate launch / torchrun)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard with FSDP2, one unit per sharing group, over plain torch.distributed (launch with "
        "torchrun); with accelerate launch, use an FSDP2 config instead (python/accelerate_fsdp2.yaml)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run(args: argparse.Namespace) -> int:
    from ..io import load_model, resolve_data
    from ..io.load import locate_model
    from ..presets import RECIPE
    from ..train import heal, merge_lora, select_trainable
    from ..train.shard import load_into_unsharded

    out = Path(args.out)
    check_out(args.out, args.overwrite)
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume: needs --checkpoint-dir (where the checkpoints to resume from are)")
    if args.checkpoint_every and not args.checkpoint_dir:
        raise UsageError("--checkpoint-every: needs --checkpoint-dir")
    with user_input("DIR"):
        locate_model(args.model)
    if args.teacher:
        with user_input("--teacher"):
            locate_model(args.teacher)
    with user_input("--data"):
        data = resolve_data(args.data, "calibration", what="data")
    eval_data = None
    if args.eval_data:
        with user_input("--eval-data"):
            eval_data = resolve_data(args.eval_data, "heldout", what="eval_data")
    accelerator = None
    if args.fsdp:
        if args.accelerate:
            raise UsageError("--fsdp: not with --accelerate (give accelerate an FSDP2 config instead)")
        _init_process_group()
    elif args.accelerate or _distributed_launch():
        from accelerate import Accelerator

        from ..train.runtime import check_accelerate_launch

        accelerator = Accelerator(mixed_precision=args.mixed_precision)  # None: the launch config's
        with user_input("accelerate launch"):
            check_accelerate_launch(accelerator)
    is_main = accelerator.is_main_process if accelerator is not None else _rank() == 0
    with user_input("DIR"):
        loaded = load_model(args.model)
    teacher = None
    if args.teacher:
        with user_input("--teacher"):
            teacher = load_model(args.teacher, tokenizer=False).model
    model, tokenizer = loaded.model, loaded.tokenizer
    trainable = tuple(args.trainable)
    if args.share_lora:  # what heal() would refuse, named by the flag, before anything trains
        from ..train.heal import resolve_lora_shared

        with user_input("--share-lora"):
            resolve_lora_shared(True, model, _trainable_arg(trainable))
    report = heal(
        model,
        data,
        tokenizer=tokenizer,
        steps=args.steps,
        tokens=args.tokens,
        lr=args.lr,
        gamma_lr=args.gamma_lr,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        teacher=teacher,
        distill=tuple(args.distill) if teacher is not None else None,
        kl_temperature=args.kl_temperature,
        trainable=_trainable_arg(trainable),
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_shared=RECIPE.lora_shared if args.share_lora is None else args.share_lora,
        eval_data=eval_data,
        eval_every=args.eval_every,
        eval_chunks=args.eval_chunks,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        mixed_precision="no" if accelerator is not None else (args.mixed_precision or "no"),
        seed=args.seed,
        progress=is_main and not args.json,
        accelerator=accelerator,
        fsdp=args.fsdp or None,
    )
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):  # --fsdp, or accelerate with an FSDP2 config
        # the trained tensors are sharded DTensors: gather them into an unwrapped copy of the
        # same model (every process takes part) before merging LoRA and saving on process 0
        fresh = load_model(args.model, tokenizer=False).model
        select_trainable(fresh, _trainable_arg(trainable), lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)
        model = load_into_unsharded(model, fresh)
    if is_main:
        from ..io import save_pretrained
        from ..io.model_card import add_healing

        add_healing(model, {**report.to_dict(), "data": args.data, "teacher": args.teacher})  # the model card's record
        merged = merge_lora(model)
        for p in model.parameters():
            p.requires_grad_(False)
        save_pretrained(model, out, tokenizer, overwrite=args.overwrite)
        summary = report.to_dict()
        summary.update(out=str(out), lora_layers_merged=merged)
        (out / "heal_report.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_result(summary, args.json, lambda: format_report(report, out))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    elif args.fsdp:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _trainable_arg(trainable: tuple[str, ...]):
    """One set name as itself, several as a tuple (what heal() and select_trainable take)."""
    return trainable if len(trainable) > 1 else trainable[0]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _init_process_group() -> None:
    """--fsdp: join the processes torchrun started (gloo on the CPU, nccl with CUDA)."""
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        raise UsageError(
            "--fsdp: start the command with torchrun (e.g. torchrun --nproc_per_node 2 -m "
            "flexigpt_kernels.cli heal ... --fsdp)"
        )
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def format_report(report, out=None) -> str:
    lines = [
        f"healed {report.steps} steps, {report.tokens_seen:,} tokens, {report.trainable_params:,} trainable "
        f"parameters ({report.trainable}{', LoRA shared with the replacement blocks' if report.lora_shared else ''}), "
        f"{report.seconds:.1f} s ({report.tokens_per_second:.0f} tokens/s)"
    ]
    if report.losses:
        lines.append(f"loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}")
    if report.eval_perplexities:
        lines.append("held-out perplexity: " + ", ".join(f"step {s}: {p:.2f}" for s, p in report.eval_perplexities))
    if out is not None:
        lines.append(f"saved to {out}")
    return "\n".join(lines)
