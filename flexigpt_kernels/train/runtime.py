"""Where the training step runs: one local process, or Hugging Face accelerate (DDP / FSDP).

Both runtimes offer the handful of operations heal() needs (prepare, autocast, backward,
no_sync, clip, step, reduce). heal() keeps its own data sharding, gradient accumulation and LR
schedule in both, so one process and N processes read the same global batch per optimizer step
and follow the same schedule.

Shared weights under wrapping:

- DDP: the model is replicated whole; a replacement layer reads its base block's weight through
  a module reference at forward time, which is the same tensor DDP broadcasts and (when it
  trains) all-reduces once. Sharing is untouched.
- FSDP: a SharedLoRALinear reads ``base.weight`` from the base *module* at forward time. FSDP
  (1 and 2) only materialises a unit's full parameters while that unit runs, so a replacement
  block and its base must be in the same FSDP unit: use ``auto_wrap_policy="no_wrap"`` (the
  whole model is one unit, whose parameters are gathered for the forward and sharded again
  after, which also keeps tied embeddings and every shared weight a single tensor). With
  per-layer wrapping (``transformer_based_wrap``) block 15 would read block 18's *sharded*
  weight, so heal() refuses it on a model with replacement blocks. FSDP1 needs
  ``use_orig_params=True`` to mix frozen and trainable tensors in one unit. LoRA on kept blocks
  (``LoRALinear`` registers its base) has no such constraint. Checkpoint/resume is implemented
  for one process and DDP, not FSDP.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..convert.replacement import replacement_blocks

MIXED_PRECISION = ("no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LocalRuntime:
    world_size, rank, is_main, is_fsdp = 1, 0, True, False

    def __init__(self, device: torch.device, mixed_precision: str = "no"):
        self.device = device
        self.mixed_precision = mixed_precision
        self.scaler = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None

    def prepare(self, model, optimizer):
        return model, optimizer

    def unwrap(self, model):
        return model

    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.mixed_precision])

    def no_sync(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip(self, optimizer, params, max_norm: Optional[float]) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_norm is None:
            norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            return float(torch.stack(norms).norm()) if norms else 0.0
        return float(nn.utils.clip_grad_norm_(params, max_norm))

    def step(self, optimizer):
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def wait(self):
        pass

    def scaler_state(self):
        return None if self.scaler is None else self.scaler.state_dict()

    def load_scaler_state(self, state):
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)


class AccelerateRuntime:
    def __init__(self, accelerator, mixed_precision: str = "no"):
        self.acc = accelerator
        if accelerator.gradient_accumulation_steps != 1:
            raise ValueError(
                f"accelerator: gradient_accumulation_steps={accelerator.gradient_accumulation_steps}; heal() "
                "accumulates itself: create the Accelerator with 1 and pass grad_accum= to heal()")
        acc_mp = str(accelerator.mixed_precision)
        if mixed_precision != "no" and mixed_precision != acc_mp:
            raise ValueError(f"mixed_precision={mixed_precision!r} but the accelerator uses {acc_mp!r}; "
                             "set it on the Accelerator")
        self.mixed_precision = acc_mp
        self.device = accelerator.device
        self.world_size = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.is_fsdp = "FSDP" in str(accelerator.distributed_type)

    def prepare(self, model, optimizer):
        if self.is_fsdp:
            check_fsdp_wrapping(model, self.acc)
        return self.acc.prepare(model, optimizer)

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def autocast(self):
        return self.acc.autocast()

    def no_sync(self, model):
        return self.acc.no_sync(model)

    def backward(self, loss):
        self.acc.backward(loss)

    def clip(self, optimizer, params, max_norm: Optional[float]) -> float:
        if max_norm is None:
            max_norm = float("inf")
        norm = self.acc.clip_grad_norm_(params, max_norm)
        return float(norm) if norm is not None else float("nan")

    def step(self, optimizer):
        optimizer.step()

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(values.to(self.device), reduction="mean").cpu()

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(values.to(self.device), reduction="sum").cpu()

    def wait(self):
        self.acc.wait_for_everyone()

    def scaler_state(self):
        scaler = getattr(self.acc, "scaler", None)
        return None if scaler is None else scaler.state_dict()

    def load_scaler_state(self, state):
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state is not None:
            scaler.load_state_dict(state)


def check_fsdp_wrapping(model: nn.Module, accelerator) -> None:
    """Refuse FSDP auto-wrap policies that would split a replacement block from its base."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "auto_wrap_policy", None)
    if policy is not None and replacement_blocks(model):
        raise ValueError(
            "FSDP: this model has FlexiGPT replacement blocks that read their base block's weights at "
            "forward time; per-layer auto wrapping would hand them a sharded weight. Use "
            "auto_wrap_policy='no_wrap' (one FSDP unit) or DDP.")


def make_runtime(model: nn.Module, accelerator=None, mixed_precision: str = "no"):
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if accelerator is not None:
        return AccelerateRuntime(accelerator, mixed_precision)
    device = next(model.parameters()).device
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'bf16' on the CPU")
    return LocalRuntime(device, mixed_precision)
