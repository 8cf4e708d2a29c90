"""Which parameters recovery training updates.

Trainable sets (``trainable=`` of :func:`heal`; a name or a tuple of names, unioned):

- ``"adapters"`` (default, FlexiGPT): in every replacement block, each SharedLoRALinear's
  ``lora_a``, ``lora_b`` and own bias, and every OutputNorm's gamma.
- ``"replacement_blocks"``: every parameter registered under a replacement block (the adapters
  plus the block's own norms). The shared base weights belong to their base blocks: not included.
- ``"lora_kept"``: LoRA (see :mod:`.lora`) on every linear of every kept block (not a
  replacement block): the ShortGPT + LoRA baseline on a dropped model, or a hybrid with
  ``("adapters", "lora_kept")`` on a FlexiGPT model.
- ``"all"``: every parameter, shared base weights included (their gradient sums over every
  layer that uses them; tied embeddings count once).

Everything else gets ``requires_grad=False``. A callable ``(name, param) -> bool`` also works.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..convert.replacement import replacement_blocks
from ..nn import OutputNorm, SharedLoRALinear
from .lora import LoRALinear, add_lora

__all__ = ["TRAINABLE_SETS", "select_trainable", "count_parameters", "with_adapter_lr"]

TRAINABLE_SETS = ("adapters", "replacement_blocks", "lora_kept", "all")

Trainable = str | tuple | list | Callable[[str, nn.Parameter], bool]


def _adapter_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for block in replacement_blocks(model).values():
        for m in block.modules():
            if isinstance(m, SharedLoRALinear):
                ids.update(id(p) for p in (m.lora_a, m.lora_b, m.bias) if p is not None)
            elif isinstance(m, OutputNorm):
                ids.add(id(m.weight))
    return ids


def with_adapter_lr(model: nn.Module, groups: list[dict], adapter_lr: float | None) -> list[dict]:
    """Optimizer parameter groups with the replacement blocks' adapter factors (A [r, K] and
    B [N, r] of every SharedLoRALinear) moved to learning rate `adapter_lr`; every other option
    of their group is kept. None returns `groups` unchanged."""
    if adapter_lr is None:
        return groups
    if not adapter_lr > 0:
        raise ValueError(f"adapter_lr must be positive, got {adapter_lr}")
    ids = {
        id(p)
        for block in replacement_blocks(model).values()
        for m in block.modules()
        if isinstance(m, SharedLoRALinear)
        for p in (m.lora_a, m.lora_b)
    }
    out = []
    for g in groups:
        rest = [p for p in g["params"] if id(p) not in ids]
        mine = [p for p in g["params"] if id(p) in ids]
        out += [{**g, "params": rest}] if rest else []
        out += [{**g, "params": mine, "lr": adapter_lr}] if mine else []
    return out


def _lora_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora.lora_a, m.lora.lora_b)}


def normalize_trainable(trainable: Trainable):
    if callable(trainable):
        return trainable
    names = (trainable,) if isinstance(trainable, str) else tuple(trainable)
    if not names:
        raise ValueError("trainable: empty selection")
    for n in names:
        if n not in TRAINABLE_SETS:
            raise ValueError(
                f"trainable: unknown set {n!r}; choose from {', '.join(TRAINABLE_SETS)} "
                "(or a tuple of them, or a callable(name, param) -> bool)"
            )
    return names


def select_trainable(
    model: nn.Module,
    trainable: Trainable = "adapters",
    *,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """Set requires_grad on `model` for the chosen set (adding LoRA modules for "lora_kept")
    and return the trainable (name, parameter) pairs, each tensor once."""
    sel = normalize_trainable(trainable)
    if callable(sel):
        keep = lambda name, p: bool(sel(name, p))  # noqa: E731
    else:
        ids: set[int] = set()
        everything = "all" in sel
        if "lora_kept" in sel:
            if lora_rank is None:
                raise ValueError("trainable 'lora_kept' needs lora_rank")
            add_lora(model, lora_rank, alpha=lora_alpha)
            ids |= _lora_param_ids(model)
        if "adapters" in sel or "replacement_blocks" in sel:
            blocks = replacement_blocks(model)
            if not blocks and not everything:
                raise ValueError(
                    f"trainable {sel}: the model has no FlexiGPT replacement blocks (a dense or dropped "
                    "model); use 'lora_kept' or 'all'"
                )
            if "adapters" in sel:
                ids |= _adapter_param_ids(model)
            if "replacement_blocks" in sel:
                ids |= {id(p) for b in blocks.values() for p in b.parameters()}
        keep = lambda name, p: everything or id(p) in ids  # noqa: E731
    chosen = []
    for name, p in model.named_parameters():  # each tensor once (tied/shared ones too)
        on = keep(name, p)
        p.requires_grad_(on)
        if on:
            chosen.append((name, p))
    if not chosen:
        raise ValueError(f"trainable {trainable!r}: selects no parameter of this model")
    return chosen


def count_parameters(params) -> int:
    """Number of elements of distinct tensors among `params` ((name, p) pairs or tensors)."""
    seen, total = set(), 0
    for item in params:
        p = item[1] if isinstance(item, tuple) else item
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
