"""What heal() (train/heal.py) reports and the helpers its loop uses: HealReport, the next-token
loss, argument checks, seeding, AdamW parameter groups (gammas at their own learning rate, no
decay on 1-D tensors) and the held-out perplexity sharded over processes."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..eval.perplexity import perplexity
from ..nn import OutputNorm
from .params import normalize_trainable


@dataclass
class HealReport:
    """What heal() did. losses[s] is the loss of optimizer step s (mean over the global batch,
    before that step's update); eval_perplexities holds (step, held-out perplexity) pairs,
    step 0 = before training. Histories cover the whole run, resumed parts included; seconds,
    train_seconds and tokens_per_second cover this call only."""

    steps: int
    tokens_seen: int
    tokens_per_step: int
    trainable_params: int
    trainable: str
    lr: float
    world_size: int
    lora_shared: bool = False  # the replacement blocks computed with the kept blocks' LoRA (heal lora_shared)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    loss_terms: dict[str, list[float]] = field(default_factory=dict)
    eval_perplexities: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    train_seconds: float = 0.0
    resumed_from: int | None = None
    checkpoints: list[str] = field(default_factory=list)

    @property
    def ppl_init(self) -> float | None:
        return next((p for s, p in self.eval_perplexities if s == 0), None)

    @property
    def ppl_final(self) -> float | None:
        return self.eval_perplexities[-1][1] if self.eval_perplexities else None

    @property
    def tokens_per_second(self) -> float:
        steps_here = self.steps - (self.resumed_from or 0)
        return steps_here * self.tokens_per_step / self.train_seconds if self.train_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ppl_init=self.ppl_init, ppl_final=self.ppl_final, tokens_per_second=self.tokens_per_second)
        return d


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, S, V] on input_ids [B, S] (positions 2..S)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _param_groups(model: nn.Module, named, *, lr: float, weight_decay: float, gamma_lr: float | None):
    gamma_ids = {id(m.weight) for m in model.modules() if isinstance(m, OutputNorm)}
    groups: dict[tuple, list] = {}
    for _, p in named:
        is_gamma = id(p) in gamma_ids
        g_lr = gamma_lr if (is_gamma and gamma_lr is not None) else lr
        wd = weight_decay if p.dim() >= 2 else 0.0  # no decay on gamma, biases, norms
        groups.setdefault((g_lr, wd), []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]


def _trainable_label(trainable) -> str:
    sel = normalize_trainable(trainable)
    return getattr(sel, "__name__", "callable") if callable(sel) else "+".join(sel)


@torch.no_grad()
def _evaluate(wrapped, unwrapped, eval_tokens: torch.Tensor, runtime, batch_size: int) -> float:
    """Held-out perplexity (eval.perplexity's definition), chunks sharded over processes.
    Under FSDP every process evaluates every chunk through the wrapped model (the forward
    gathers parameters collectively, so all processes must run the same batches)."""
    if runtime.is_fsdp:
        return perplexity(
            wrapped,
            None,
            eval_tokens,
            seq_len=eval_tokens.shape[1],
            num_chunks=None,
            batch_size=batch_size,
            progress=False,
        )
    shard = eval_tokens[runtime.rank :: runtime.world_size]
    per_chunk = eval_tokens.shape[1] - 1
    nll = 0.0
    if shard.shape[0]:
        ppl = perplexity(
            unwrapped, None, shard, seq_len=shard.shape[1], num_chunks=None, batch_size=batch_size, progress=False
        )
        nll = math.log(ppl) * shard.shape[0] * per_chunk
    sums = runtime.reduce_sum(torch.tensor([nll, shard.shape[0] * per_chunk], dtype=torch.float64))
    return math.exp(sums[0].item() / sums[1].item())
