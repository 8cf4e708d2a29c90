"""heal()'s checkpoint state (train/heal.py): what a checkpoint holds (step, settings, trainable
tensors and optimizer state unless FSDP2 shards them, scheduler, scaler, the report's history)
and its exact restore, refused with a ValueError when the settings or tensor shapes differ."""

from __future__ import annotations

import torch

from .checkpoint import load_checkpoint, set_rng_state
from .heal_report import HealReport
from .sharded_state import has_shards, load_shards


def _check_checkpointing(runtime) -> None:
    if runtime.is_fsdp and not runtime.is_fsdp2:
        raise ValueError(
            "heal(): checkpoints under FSDP1 (one unit) are not supported; use FSDP2 "
            "(fsdp_version: 2 in the accelerate config, or heal(fsdp=True)) or DDP"
        )


def _state(unwrapped, optimizer, scheduler, runtime, report: HealReport, settings: dict, step: int) -> dict:
    # under FSDP2 the trainable tensors and optimizer state are sharded: .sharded_state writes them
    tensors = (
        {}
        if runtime.is_fsdp2
        else {
            "params": {n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
        }
    )
    return {
        "step": step,
        "settings": settings,
        **tensors,
        "scheduler": scheduler.state_dict(),
        "scaler": runtime.scaler_state(),
        "history": {
            "losses": list(report.losses),
            "lrs": list(report.lrs),
            "grad_norms": list(report.grad_norms),
            "loss_terms": {k: list(v) for k, v in report.loss_terms.items()},
            "eval_perplexities": list(report.eval_perplexities),
            "tokens_seen": report.tokens_seen,
        },
    }


def _check_saved_shapes(path, saved: dict, params: dict) -> None:
    """ValueError unless every saved tensor has its parameter's shape (the names already match:
    they are the `trainable` setting). A checkpoint of another starting model, e.g. another
    adapter rank, would otherwise fail deep in copy_."""
    wrong = [
        f"{n} {tuple(v.shape)} vs {tuple(params[n].shape)}"
        for n, v in saved.items()
        if n in params and v.shape != params[n].shape
    ]
    if wrong:
        raise ValueError(
            f"resume: {path} holds tensors of other shapes than this model's ({'; '.join(wrong[:3])}); "
            "resume from the same starting model"
        )


def _restore(path, runtime, unwrapped, optimizer, scheduler, report: HealReport, settings: dict) -> int:
    state, rng = load_checkpoint(path, runtime.rank)
    saved = state["settings"]
    defaults = {"lora_shared": False}  # checkpoints written before the setting existed
    for key in ("total_steps", "global_batch", "seq_len", "data", "trainable", "shuffle", "seed", "lora_shared"):
        if saved.get(key, defaults.get(key)) != settings[key]:
            raise ValueError(
                f"resume: the checkpoint {path} was made with {key}={saved.get(key)!r}, this run "
                f"has {settings[key]!r}; resume with the same settings and data"
            )
    if has_shards(path):  # written under FSDP2: dcp reshards to this run (any world size, or one process)
        load_shards(path, unwrapped, optimizer)
    elif runtime.is_fsdp2:
        raise ValueError(
            f"resume: {path} was written without FSDP2 (whole tensors, not shards); resume it "
            "without fsdp, or start the FSDP2 run from step 0"
        )
    else:
        params = dict(unwrapped.named_parameters())
        _check_saved_shapes(path, state["params"], params)
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value.to(params[name].device))
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    runtime.load_scaler_state(state["scaler"])
    if rng is not None:
        set_rng_state(rng)
    h = state["history"]
    report.losses, report.lrs, report.grad_norms = list(h["losses"]), list(h["lrs"]), list(h["grad_norms"])
    report.loss_terms = {k: list(v) for k, v in h["loss_terms"].items()}
    report.eval_perplexities = [tuple(x) for x in h["eval_perplexities"]]
    report.tokens_seen = h["tokens_seen"]
    report.resumed_from = state["step"]
    return int(state["step"])
