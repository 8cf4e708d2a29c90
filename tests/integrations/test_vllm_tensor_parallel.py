"""Tensor-parallel arithmetic of a replacement linear, checked against the unsharded op: the
column-parallel shards concatenate to the full output, the row-parallel partials sum to it, for
several world sizes, with bias, output norm and residual."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.integrations.vllm.tensor_parallel import (
    column_parallel_forward,
    row_parallel_finish,
    row_parallel_partial,
    shard,
)
from flexigpt_kernels.ops.reference import shared_lora_linear_reference


def tensors(m=3, k=24, n=36, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float32)
    w = torch.randn(n, k, generator=g, dtype=torch.float32) / k**0.5
    a = torch.randn(r, k, generator=g, dtype=torch.float32) / k**0.5
    b = torch.randn(n, r, generator=g, dtype=torch.float32)
    bias = torch.randn(n, generator=g, dtype=torch.float32)
    gamma = torch.rand(n, generator=g, dtype=torch.float32) + 0.5
    residual = torch.randn(m, n, generator=g, dtype=torch.float32)
    return x, w, a, b, bias, gamma, residual


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_column_parallel_shards_concatenate_to_the_full_output(world):
    x, w, a, b, bias, _, _ = tensors()
    full = shared_lora_linear_reference(x, w, a, b, 0.7, bias)
    parts = [
        column_parallel_forward(x, shard(w, 0, rank, world), a, b, 0.7, bias, rank, world) for rank in range(world)
    ]
    torch.testing.assert_close(torch.cat(parts, dim=-1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("with_norm", [False, True])
def test_row_parallel_partials_sum_to_the_full_output(world, with_norm):
    x, w, a, b, bias, gamma, residual = tensors()
    norm = gamma if with_norm else None
    full = shared_lora_linear_reference(x, w, a, b, 1.3, bias, norm_weight=norm, eps=1e-5, residual=residual)
    partials = [
        row_parallel_partial(shard(x, 1, rank, world), shard(w, 1, rank, world), a, b, 1.3, rank, world)
        for rank in range(world)
    ]
    reduced = torch.stack(partials).sum(0)  # what the all-reduce does
    torch.testing.assert_close(row_parallel_finish(reduced, bias, norm, 1e-5, residual), full, rtol=1e-5, atol=1e-5)


def test_a_row_partial_alone_is_not_the_output():
    x, w, a, b, bias, _, _ = tensors()
    full = shared_lora_linear_reference(x, w, a, b, 1.0, None)
    partial = row_parallel_partial(shard(x, 1, 0, 2), shard(w, 1, 0, 2), a, b, 1.0, 0, 2)
    assert not torch.allclose(partial, full)


def test_uneven_split_is_refused_with_the_shape():
    with pytest.raises(ValueError, match=r"size 36 does not split evenly over 5 ranks \(shape \(36, 24\)\)"):
        shard(torch.zeros(36, 24), 0, 0, 5)
    with pytest.raises(ValueError, match="rank must be in"):
        shard(torch.zeros(36, 24), 0, 2, 2)


@pytest.mark.parametrize("world, replicas", [(2, 2), (4, 2), (4, 4)])
def test_replicated_slices_give_each_rank_its_heads_slice(world, replicas):
    """k / v with fewer kv heads than ranks: `replicas` consecutive ranks hold one slice."""
    t = torch.arange(8 * 3).reshape(8, 3)
    pieces = world // replicas
    got = [shard(t, 0, rank, world, replicas) for rank in range(world)]
    for rank in range(world):
        torch.testing.assert_close(got[rank], t.chunk(pieces)[rank // replicas])
    with pytest.raises(ValueError, match="replicas must divide world=4, got 3"):
        shard(t, 0, 0, 4, 3)
