"""heal(): recovery training of a pruned model (docs/method.md section 7).

    loss = lm_weight * CE(logits[:, :-1], ids[:, 1:])  (+ distillation terms, see .distill)

on blocks of `seq_len` tokens from the same sources as calibration (see .data), AdamW with
linear warmup and cosine decay (LambdaLR, see .schedule), gradient accumulation, gradient-norm
clipping, a step count or a token budget, periodic held-out perplexity and checkpoints that
resume exactly (see .checkpoint). The forward and backward of every replacement layer run
through the fused op (flexigpt_kernels.shared_lora_linear and its autograd), as the model's
SharedLoRALinear modules call it.

Batching: `batch_size` sequences per process per micro-step, `grad_accum` micro-steps per
optimizer step, so an optimizer step reads a global batch of G = batch_size x grad_accum x
processes blocks (G x seq_len tokens). Micro-step k of process r reads rows
[(k * P + r) * batch_size, ... + batch_size) of the step's global batch, so one process with
batch_size 4 and two processes with batch_size 2 train on the same sequences per step. Every
block has the same token count, so the mean of the micro-batch means is the global mean.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..convert.replacement import replacement_blocks
from ..presets import RECIPE
from .checkpoint import latest_checkpoint, save_checkpoint
from .data import TrainBlocks, load_blocks
from .distill import Distiller, normalize_distill
from .heal_report import (
    HealReport,
    _evaluate,
    _param_groups,
    _positive,
    _seed_everything,
    _trainable_label,
    lm_loss,
)
from .heal_state import _check_checkpointing, _restore, _state
from .lora import share_kept_lora
from .params import count_parameters, normalize_trainable, select_trainable, with_adapter_lr
from .runtime import make_runtime
from .schedule import WarmupCosine, warmup_steps
from .sharded_state import save_shards

__all__ = ["HealReport", "heal", "lm_loss"]


def resolve_lora_shared(lora_shared, model: nn.Module, trainable) -> bool:
    """heal()'s lora_shared as a bool: "auto" shares where it can, True where it must (ValueError
    when `trainable` has no "lora_kept" or `model` no replacement blocks)."""
    if lora_shared not in (True, False, "auto"):
        raise ValueError(f"lora_shared must be True, False or 'auto', got {lora_shared!r}")
    has_lora = not callable(trainable) and "lora_kept" in normalize_trainable(trainable)
    if lora_shared == "auto":
        return has_lora and bool(replacement_blocks(model))
    if lora_shared:
        if not has_lora:
            raise ValueError(f"lora_shared needs LoRA on the kept blocks: trainable {trainable!r} has no 'lora_kept'")
        if not replacement_blocks(model):
            raise ValueError("lora_shared: the model has no replacement blocks to share the kept blocks' LoRA with")
    return lora_shared


def heal(
    model: nn.Module,
    data,
    *,
    tokenizer=None,
    steps: int | None = None,
    tokens: int | None = None,
    lr: float = 4e-3,
    seq_len: int = 256,
    batch_size: int = 4,
    grad_accum: int = 1,
    warmup: float = 0.05,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    max_grad_norm: float | None = 1.0,
    gamma_lr: float | None = None,
    adapter_lr: float | None = None,
    teacher: nn.Module | None = None,
    distill=("kl",),
    kl_temperature: float = 1.0,
    distill_positions=None,
    lm_weight: float = 1.0,
    trainable=RECIPE.trainable,
    lora_rank: int | None = RECIPE.lora_rank,
    lora_alpha: float | None = None,
    lora_shared: bool | str = RECIPE.lora_shared,
    eval_data=None,
    eval_every: int | None = None,
    eval_chunks: int = 40,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    resume=False,
    mixed_precision: str = "no",
    seed: int = 0,
    shuffle: bool = True,
    progress: bool = True,
    accelerator=None,
    fsdp=None,
) -> HealReport:
    """Recovery-train `model` in place; returns a :class:`HealReport`.

    Args:
        data: training text or tokens, any calibration source (token tensor, texts or rows,
            local file/folder, hub dataset name); texts need `tokenizer`. Cycled if too short.
        steps / tokens: optimizer steps, or a token budget (steps = ceil(tokens / (G x seq_len))).
        lr, warmup (fraction of the steps if < 1, else a step count), min_lr_ratio: the schedule.
        batch_size: sequences per process per micro-step; grad_accum: micro-steps per step.
        max_grad_norm: clip the trainable gradients' global norm (None: no clipping).
        gamma_lr: a separate learning rate for the output-norm gammas (default: lr).
        adapter_lr: a separate learning rate for the replacement blocks' adapter factors A, B
            (default: lr); e.g. lower, so that fitted adapters are not thrown off by the first
            full-rate Adam steps while LoRA on the kept blocks learns at lr.
        teacher: the dense model; with it, `distill` adds "kl" (logits, temperature
            kl_temperature), "mse" (replacement blocks' outputs) and/or "hidden" (every block's
            output, relative per token; see .distill); a dict gives weights.
        distill_positions: for "hidden" on a model shallower than the teacher (a dropped
            one): each student block's teacher block (default: the identity, same depth).
        trainable: "adapters", "replacement_blocks", "lora_kept" (needs lora_rank;
            lora_alpha defaults to the rank, i.e. scale 1), "all", a tuple of them, or a
            callable(name, param) -> bool (see .params). Other parameters are frozen. Default:
            the RECIPE preset's ("adapters", "lora_kept") with lora_rank 8 (presets.py); the
            paper's set is ``**presets.PAPER.heal_kwargs()`` (trainable="adapters"). A dropped
            model (no replacement blocks) takes trainable="lora_kept".
        lora_shared: with "lora_kept", every replacement linear also computes with its base
            as the kept block's LoRA changes it (train.lora.share_kept_lora): the LoRA trains on
            every block that shares the weight, and merging it grows no adapter. "auto" (the
            RECIPE preset's default) shares where `trainable` names "lora_kept" and the model has
            replacement blocks; True requires both (ValueError otherwise); False never shares.
        eval_data: held-out source; perplexity over `eval_chunks` chunks of seq_len tokens at
            step 0, every `eval_every` steps, and at the end.
        checkpoint_dir / checkpoint_every: save every N steps and at the end; resume=True
            continues from the latest complete checkpoint there (resume=<path>: that one).
        mixed_precision: "no", "bf16" (autocast), "fp16" (autocast + grad scaling, CUDA).
            With an accelerator, its own setting rules.
        accelerator: an accelerate.Accelerator for multi-process training (DDP; FSDP2, wrapped
            by sharing group; FSDP1 only as one unit, see .runtime). It must have
            gradient_accumulation_steps=1.
        fsdp: True (or a 1-D DeviceMesh) to shard with FSDP2 by sharing group over plain
            torch.distributed (start with torchrun); checkpoints are then sharded and resume
            at any world size (see .shard, .sharded_state).
    """
    t_call = time.perf_counter()
    for name, v in (
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("grad_accum", grad_accum),
        ("eval_chunks", eval_chunks),
    ):
        _positive(name, v)
    if (steps is None) == (tokens is None):
        raise ValueError("give exactly one of steps= and tokens=")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if adapter_lr is not None and not adapter_lr > 0:
        raise ValueError(f"adapter_lr must be positive, got {adapter_lr}")
    if eval_every is not None and eval_data is None:
        raise ValueError("eval_every needs eval_data")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir")
    if resume is True and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir (or pass resume=<checkpoint folder>)")
    weights = normalize_distill(distill) if teacher is not None else {}
    if teacher is None and distill not in (None, ("kl",), "kl"):
        raise ValueError(f"distill={distill!r} needs a teacher model")

    runtime = make_runtime(model, accelerator, mixed_precision, fsdp)
    world = runtime.world_size
    global_batch = batch_size * grad_accum * world
    tokens_per_step = global_batch * seq_len
    total_steps = _positive("steps", steps) if steps is not None else max(1, math.ceil(tokens / tokens_per_step))

    _seed_everything(seed)
    lora_shared = resolve_lora_shared(lora_shared, model, trainable)  # before select_trainable changes the model
    named = select_trainable(model, trainable, lora_rank=lora_rank, lora_alpha=lora_alpha)
    if lora_shared:
        share_kept_lora(model)
    names = [n for n, _ in named]
    wrapped = runtime.prepare_model(model)  # FSDP2 replaces the parameters: look them up again
    if wrapped is not model or runtime.is_fsdp2:
        current = dict(wrapped.named_parameters())
        named = [(n, current[n]) for n in names]
    params = [p for _, p in named]
    blocks = TrainBlocks.from_source(
        data, tokenizer, seq_len=seq_len, num_blocks=total_steps * global_batch, seed=seed, shuffle=shuffle
    )
    eval_tokens = None
    if eval_data is not None:
        eval_tokens = load_blocks(
            eval_data, tokenizer, seq_len=seq_len, num_blocks=eval_chunks, seed=None, what="eval_data"
        )

    distiller = None
    if teacher is not None and weights:
        if next(teacher.parameters()).device != runtime.device:
            teacher.to(runtime.device)
        distiller = Distiller(model, teacher, weights, temperature=kl_temperature, positions=distill_positions)

    optimizer = torch.optim.AdamW(
        with_adapter_lr(
            model, _param_groups(model, named, lr=lr, weight_decay=weight_decay, gamma_lr=gamma_lr), adapter_lr
        ),
        lr=lr,
        betas=betas,
    )
    wrapped, optimizer = runtime.prepare(wrapped, optimizer)
    base_optimizer = getattr(optimizer, "optimizer", optimizer)
    schedule = WarmupCosine(total_steps, warmup_steps(warmup, total_steps), min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, schedule)
    unwrapped = runtime.unwrap(wrapped)

    settings = {
        "total_steps": total_steps,
        "global_batch": global_batch,
        "seq_len": seq_len,
        "data": blocks.fingerprint(),
        "trainable": names,
        "shuffle": shuffle,
        "seed": seed,
        "lora_shared": bool(lora_shared),
    }
    report = HealReport(
        steps=total_steps,
        tokens_seen=0,
        tokens_per_step=tokens_per_step,
        trainable_params=count_parameters(params),
        trainable=_trainable_label(trainable),
        lr=lr,
        world_size=world,
        lora_shared=lora_shared,
    )
    report.loss_terms = {k: [] for k in (["lm", *weights] if weights else [])}

    start_step = 0
    ckpt_path = None
    if resume:
        ckpt_path = latest_checkpoint(checkpoint_dir) if resume is True else resume
        if ckpt_path is None and runtime.is_main:
            tqdm.write(f"heal: no checkpoint under {checkpoint_dir}; starting from step 0")
    if ckpt_path is not None:
        _check_checkpointing(runtime)
        start_step = _restore(ckpt_path, runtime, unwrapped, base_optimizer, scheduler, report, settings)

    was_training = wrapped.training
    wrapped.train()
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="heal",
        unit="step",
        disable=not (progress and runtime.is_main),
        dynamic_ncols=True,
    )
    try:
        if eval_tokens is not None and start_step == 0:
            report.eval_perplexities.append((0, _evaluate(wrapped, unwrapped, eval_tokens, runtime, batch_size)))
        train_time = 0.0
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            rows = blocks.rows(step * global_batch, global_batch).view(grad_accum, world, batch_size, seq_len)
            local = rows[:, runtime.rank]
            stats = torch.zeros(2 + len(weights), dtype=torch.float64)
            for k in range(grad_accum):
                ids = local[k].to(runtime.device)
                sync = runtime.no_sync(wrapped) if k < grad_accum - 1 else contextlib.nullcontext()
                with sync:
                    with runtime.autocast():
                        t_logits = distiller.teacher_logits(ids) if distiller is not None else None
                        logits = wrapped(input_ids=ids, use_cache=False).logits
                        lm = lm_loss(logits, ids)
                        loss = lm_weight * lm
                        terms = distiller.terms(logits, t_logits) if distiller is not None else {}
                        for name, value in terms.items():
                            loss = loss + weights[name] * value
                    runtime.backward(loss / grad_accum)
                stats += (
                    torch.tensor([loss.item(), lm.item(), *(terms[n].item() for n in weights)], dtype=torch.float64)
                    / grad_accum
                )
            grad_norm = runtime.clip(optimizer, params, max_grad_norm)
            step_lr = base_optimizer.param_groups[0]["lr"]
            runtime.step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats = runtime.reduce_mean(stats).tolist()
            train_time += time.perf_counter() - t0

            report.losses.append(stats[0])
            report.lrs.append(step_lr)
            report.grad_norms.append(grad_norm)
            if weights:
                report.loss_terms["lm"].append(stats[1])
                for i, name in enumerate(weights):
                    report.loss_terms[name].append(stats[2 + i])
            report.tokens_seen = (step + 1) * tokens_per_step
            done = step + 1
            steps_here = done - start_step
            bar.update(1)
            bar.set_postfix(
                loss=f"{stats[0]:.4f}",
                lr=f"{step_lr:.2e}",
                tok_s=f"{steps_here * tokens_per_step / max(train_time, 1e-9):.0f}",
            )
            if eval_tokens is not None and (done == total_steps or (eval_every and done % eval_every == 0)):
                ppl = _evaluate(wrapped, unwrapped, eval_tokens, runtime, batch_size)
                report.eval_perplexities.append((done, ppl))
                bar.set_postfix(loss=f"{stats[0]:.4f}", ppl=f"{ppl:.2f}")
            if checkpoint_dir is not None and (
                done == total_steps or (checkpoint_every and done % checkpoint_every == 0)
            ):
                _check_checkpointing(runtime)
                report.train_seconds = train_time
                shards = (lambda folder: save_shards(folder, unwrapped, base_optimizer)) if runtime.is_fsdp2 else None
                path = save_checkpoint(
                    runtime,
                    checkpoint_dir,
                    done,
                    _state(unwrapped, optimizer, scheduler, runtime, report, settings, done),
                    write_shards=shards,
                )
                report.checkpoints.append(str(path))
        report.train_seconds = train_time
    finally:
        bar.close()
        wrapped.train(was_training)
        if distiller is not None:
            distiller.close()
    report.seconds = time.perf_counter() - t_call
    return report
