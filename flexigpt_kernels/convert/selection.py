"""Which decoder blocks to prune: the k blocks with the lowest importance score.

Rounding rule (documented contract): for ``ratio`` in (0, 1) and L blocks,

    k = min(max(round(ratio * L), 1), L - 1)

with Python's ``round`` on the float product (round half to even: 0.25 * 6 = 1.5 -> 2,
0.125 * 4 = 0.5 -> 0 -> clamped to 1). At least one block is pruned and at least one kept.
The k lowest scores are pruned; equal scores prune the lower block index first.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch

__all__ = ["select_blocks", "num_blocks_to_prune"]


def num_blocks_to_prune(ratio: float, num_blocks: int) -> int:
    """k = min(max(round(ratio * num_blocks), 1), num_blocks - 1); ratio must lie in (0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or math.isnan(ratio):
        raise ValueError(f"ratio: expected a number in (0, 1), got {ratio!r}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio: must satisfy 0 < ratio < 1, got {ratio!r}")
    if num_blocks < 2:
        raise ValueError(f"num_blocks: need at least 2 blocks to prune one and keep one, got {num_blocks}")
    return min(max(round(float(ratio) * num_blocks), 1), num_blocks - 1)


def _as_scores(scores) -> torch.Tensor:
    t = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if t.dim() != 1:
        raise ValueError(f"scores: expected a 1-D sequence of per-block scores, got shape {tuple(t.shape)}")
    if t.numel() < 2:
        raise ValueError(f"scores: need at least 2 blocks, got {t.numel()}")
    if torch.isnan(t).any():
        bad = torch.nonzero(torch.isnan(t)).flatten().tolist()
        raise ValueError(f"scores: NaN score for blocks {bad}")
    return t


def _validate_blocks(blocks: Sequence[int], num_blocks: int) -> list[int]:
    try:
        items = list(blocks)
    except TypeError:
        raise ValueError(f"blocks: expected a sequence of block indices, got {blocks!r}") from None
    out = []
    for b in items:
        if isinstance(b, bool):
            raise ValueError(f"blocks: expected integer block indices, got {b!r} in {items}")
        try:
            out.append(operator.index(b))
        except TypeError:
            raise ValueError(f"blocks: expected integer block indices, got {b!r} in {items}") from None
    if not out:
        raise ValueError("blocks: empty list, nothing to prune")
    bad = [b for b in out if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"blocks: indices {bad} out of range; the model has blocks 0..{num_blocks - 1}")
    dupes = sorted({b for b in out if out.count(b) > 1})
    if dupes:
        raise ValueError(f"blocks: duplicate indices {dupes} in {items}")
    if len(out) >= num_blocks:
        raise ValueError(f"blocks: cannot prune all {num_blocks} blocks; keep at least one")
    return sorted(out)


def select_blocks(scores, *, ratio: float | None = None, blocks: Sequence[int] | None = None) -> list[int]:
    """Sorted list of block indices to prune.

    Args:
        scores: per-block importance, shape [L] (e.g. Block Influence; lower = less important).
        ratio: fraction of blocks to prune, 0 < ratio < 1; k from the module's rounding rule.
        blocks: explicit block indices instead of ``ratio`` (validated: integers, unique,
            0 <= b < L, not all blocks). ``scores`` only provides L then.

    Exactly one of ``ratio`` and ``blocks`` must be given. Returns ascending indices.
    """
    if (ratio is None) == (blocks is None):
        raise ValueError(f"ratio/blocks: give exactly one of them, got ratio={ratio!r}, blocks={blocks!r}")
    t = _as_scores(scores)
    num_blocks = t.numel()
    if blocks is not None:
        return _validate_blocks(blocks, num_blocks)
    k = num_blocks_to_prune(ratio, num_blocks)
    # Stable sort on the score: equal scores keep index order, so the lower index goes first.
    order = torch.sort(t, stable=True).indices
    return sorted(order[:k].tolist())
