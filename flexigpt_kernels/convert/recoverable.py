"""Which blocks to prune when they are replaced, not dropped: Block Influence discounted by how
well a kept block can stand in for each (beyond the paper; docs/method.md section 2).

ShortGPT's Block Influence BI_i (convert/importance.py) measures what is lost when block i is
DROPPED. A FlexiGPT replacement block keeps part of block i's function; the functional error
D(i, j) of convert/functional_bases.py (the replacement of i with base j, zero adapter, lsq
gammas: 1 = as bad as dropping) measures how much of it is still lost. The damage of replacing i
when the blocks K are kept:

    damage(i | K) = BI_i * min(1, min over j in K of D(i, j))

and the k blocks with the lowest damage are pruned. K depends on the choice, so it is iterated:
K_0 = every other block, then K_t = the blocks not pruned at step t-1, until the set repeats
(at most `iterations` times; the last set is returned). Equal damage prunes the lower index.

Cost: one dense forward over `num_samples` calibration sequences recording EVERY block (3 x L x
n x seq x hidden values; SmolLM2-135M, 2 x 256 tokens: 106 MB in fp32), then L x (L - 1) pair
scores (two runs of one layer each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .arguments import positive_int
from .dense_records import record_dense_blocks
from .families import num_layers
from .functional_bases import functional_errors
from .selection import num_blocks_to_prune

__all__ = ["RecoverableChoice", "recoverable_blocks", "least_damage", "DEFAULT_SELECTION_SAMPLES"]

#: calibration sequences recorded for the block choice by default
DEFAULT_SELECTION_SAMPLES = 2


@dataclass
class RecoverableChoice:
    """pruned: the chosen blocks (ascending); damage: fp64 [L] for the final kept set (kept blocks
    too: what replacing each would cost); errors: D fp64 [L, L] (inf on the diagonal);
    iterations: passes until the set repeated; seconds: "record", "scores"."""

    pruned: list[int]
    damage: torch.Tensor
    errors: torch.Tensor
    iterations: int
    seconds: dict[str, float] = field(default_factory=dict)


def _damage(influence: torch.Tensor, errors: torch.Tensor, kept: list[int]) -> torch.Tensor:
    return influence * errors[:, kept].amin(1).clamp(max=1.0)


@torch.no_grad()
def recoverable_blocks(
    model: nn.Module,
    tokens: torch.Tensor,
    influence,
    *,
    ratio: float,
    num_samples: int = DEFAULT_SELECTION_SAMPLES,
    batch_size: int = 8,
    iterations: int = 8,
    progress: bool = True,
) -> RecoverableChoice:
    """The round(ratio * L) blocks of the dense `model` with the lowest damage (module doc).

    tokens: calibration LongTensor [n, seq]; the first `num_samples` rows are recorded.
    influence: per-block Block Influence [L] (block_influence on the same model)."""
    n_layers = num_layers(model)
    k = num_blocks_to_prune(ratio, n_layers)
    bi = torch.as_tensor(influence, dtype=torch.float64).detach().cpu()
    if bi.shape != (n_layers,):
        raise ValueError(f"influence: expected one score per block, shape ({n_layers},), got {tuple(bi.shape)}")
    if not torch.isfinite(bi).all():
        raise ValueError("influence: every score must be finite")
    num_samples = positive_int("num_samples", num_samples, allow_none=False)
    iterations = positive_int("iterations", iterations, allow_none=False)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens: expected a LongTensor [n, seq_len], got {getattr(tokens, 'shape', tokens)!r}")
    t = time.perf_counter()
    records = record_dense_blocks(
        model, tokens[:num_samples], range(n_layers), batch_size=batch_size, attn=True, progress=progress
    )
    seconds = {"record": time.perf_counter() - t}
    t = time.perf_counter()
    errors = functional_errors(
        model, records, range(n_layers), num_samples=None, batch_size=batch_size, progress=progress
    )
    seconds["scores"] = time.perf_counter() - t
    del records
    pruned, damage, passes = least_damage(bi, errors, k, iterations=iterations)
    return RecoverableChoice(pruned, damage, errors, passes, seconds)


def least_damage(
    influence, errors: torch.Tensor, k: int, *, iterations: int = 8
) -> tuple[list[int], torch.Tensor, int]:
    """(pruned, damage [L] for the final kept set, passes): the iteration of the module doc on a
    precomputed D `errors` [L, L] (+inf on the diagonal) and Block Influence `influence` [L]."""
    bi = torch.as_tensor(influence, dtype=torch.float64)
    n_layers = bi.numel()
    if errors.shape != (n_layers, n_layers):
        raise ValueError(f"errors: expected shape ({n_layers}, {n_layers}), got {tuple(errors.shape)}")
    if not 1 <= k < n_layers:
        raise ValueError(f"k: expected 1 <= k < {n_layers}, got {k}")
    kept = list(range(n_layers))
    seen: list[list[int]] = []
    pruned: list[int] = []
    while len(seen) < iterations:
        order = torch.sort(_damage(bi, errors, kept), stable=True).indices
        pruned = sorted(order[:k].tolist())
        if pruned in seen:
            break
        seen.append(pruned)
        kept = [b for b in range(n_layers) if b not in set(pruned)]
    kept = [b for b in range(n_layers) if b not in set(pruned)]
    return pruned, _damage(bi, errors, kept), len(seen)
