"""Tensor-parallel arithmetic of a replacement linear (plain PyTorch; no vLLM import).

With tensor parallelism every rank holds a shard of *every* block, so a replacement block's
base shard is on the same rank as the replacement's own shard. Per replacement linear

    y = x W^T + b + s (x A^T) B^T            W [N, K] (the base's), A [r, K], B [N, r]

- column-parallel parts (q, k, v, gate, up): the base's output rows are split into world
  shards [N/world, K]; B is split by rows the same way, A stays whole; each rank computes its
  own output columns exactly (no communication):
      y_rank = x W_rank^T + b_rank + s (x A^T) B_rank^T
- row-parallel parts (o, down): the base's input columns are split [N, K/world] and so is the
  input x_rank [.., K/world]; A is split by columns the same way, B stays whole; because the
  delta is linear in x the partials sum to the full product, so the layer's existing
  all-reduce adds them up:
      sum_rank (x_rank W_rank^T + s (x_rank A_rank^T) B^T) = x W^T + s (x A^T) B^T
  The bias is added once, and the output norm and residual run on the reduced output (a norm
  needs whole rows, which no rank holds before the reduce).

These functions are the specification the vLLM layer follows (layers.py: its adapters are cut
by vLLM's own weight loaders, which must agree with ``shard``, and ``row_parallel_finish`` is
its step after the all-reduce); tests check them against the unsharded op for several world
sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...ops.reference import shared_lora_linear_reference

__all__ = ["column_parallel_forward", "row_parallel_finish", "row_parallel_partial", "shard"]


def shard(t: Tensor, dim: int, rank: int, world: int, replicas: int = 1) -> Tensor:
    """Rank `rank`'s contiguous slice of `t` along `dim` (vLLM's even split): 1/world of it, or,
    when `replicas` ranks hold each slice (k and v with fewer kv heads than ranks: replicas =
    world / num_kv_heads), slice rank // replicas of world / replicas."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if replicas < 1 or world % replicas:
        raise ValueError(f"replicas must divide world={world}, got {replicas}")
    pieces, size = world // replicas, t.shape[dim]
    if size % pieces:
        raise ValueError(
            f"tensor parallelism: dimension {dim} of size {size} does not split evenly over "
            f"{pieces} ranks (shape {tuple(t.shape)})"
        )
    step = size // pieces
    return t.narrow(dim, (rank // replicas) * step, step)


def column_parallel_forward(
    x: Tensor,
    weight_shard: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    rank: int,
    world: int,
) -> Tensor:
    """Rank `rank`'s output columns of a column-parallel replacement linear.
    x [..., K], weight_shard [N/world, K] (the base's shard), lora_a [r, K] whole, lora_b [N, r]
    whole (sharded here by rows), bias [N] or None -> [..., N/world]."""
    b_shard = shard(lora_b, 0, rank, world)
    bias_shard = shard(bias, 0, rank, world) if bias is not None else None
    return shared_lora_linear_reference(x, weight_shard, lora_a, b_shard, scale, bias_shard)


def row_parallel_partial(
    x_shard: Tensor, weight_shard: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, rank: int, world: int
) -> Tensor:
    """Rank `rank`'s partial sum of a row-parallel replacement linear (no bias, no norm).
    x_shard [..., K/world], weight_shard [N, K/world], lora_a [r, K] whole (sharded here by
    columns), lora_b [N, r] whole -> [..., N]; the all-reduce over ranks sums the partials."""
    a_shard = shard(lora_a, 1, rank, world)
    return shared_lora_linear_reference(x_shard, weight_shard, a_shard, lora_b, scale, None)


def row_parallel_finish(
    reduced: Tensor, bias: Tensor | None, norm_weight: Tensor | None, eps: float, residual: Tensor | None
) -> Tensor:
    """After the all-reduce: y = norm(reduced + bias) [+ residual], every rank the same.
    This is the op's epilogue on a given pre-activation (a zero-rank, zero-weight call)."""
    y = reduced.float()
    if bias is not None:
        y = y + bias.float()
    if norm_weight is not None:
        y = torch.nn.functional.layer_norm(y, (y.shape[-1],), norm_weight.float(), None, eps)
    if residual is not None:
        y = residual.float() + y
    return y.to(reduced.dtype)
