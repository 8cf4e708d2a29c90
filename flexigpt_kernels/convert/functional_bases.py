"""Base choice by function: which kept block best stands in for a pruned one on recorded activations.

The weight distance of ``base_selection.py`` compares weights; on a model whose blocks' weights
are nearly unrelated (SmolLM2-135M) it is drawn to blocks with small weights and says little
about what a replacement block will compute. This module scores every (pruned i, kept j) pair
by what block i's replacement with base j computes: a copy of block i converted by
``make_replacement_block`` (block j's linear weights, block i's own norms and biases, output
norms) with a zero adapter (B = 0) and the closed-form output-norm gammas of
``gamma_init.fit_block_gammas``, run on block i's recorded dense input x [n, seq, hidden]
(convert/dense_records.py):

    D(i, j) = sum ||h_ij(x) - y_i||^2 / sum ||y_i - x||^2     (over the scored tokens and channels)

that is, the block-local relative error (``block_errors``) of that replacement: 0 when block j
computes what block i did, about 1 when its output is unrelated (the gammas shrink to 0 and the
block acts as dropped). base(i) = argmin over kept j (ties: the lower j). The rank-r adapter the
fit adds later is not modelled.

Each pair costs two runs of one block on the scored rows (one per gamma) and a copy of block i
(one block's memory, its linears replaced by views of block j's); it runs with the keyword
arguments recorded for block i (position embeddings, mask), as the replacement block will.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .arguments import positive_int
from .base_selection import BaseChoice
from .dense_records import DenseRecords, batches
from .families import decoder_layers, family_of, num_layers
from .gamma_init import fit_block_gammas
from .replacement import make_replacement_block

__all__ = ["functional_bases", "functional_errors", "DEFAULT_SCORE_SAMPLES"]

#: recorded sequences scored per pair by default (the first ones: inside the local fit's train rows)
DEFAULT_SCORE_SAMPLES = 4


def _change_energy(records: DenseRecords, i: int, rows: slice, batch_size: int) -> float:
    """sum ||y_i - x||^2 over the scored rows: what dropping block i would get wrong."""
    xs, ys = records.inputs[i][rows], records.outputs[i][rows]
    return sum((ys[sl].double() - xs[sl].double()).pow(2).sum().item() for sl in batches(xs.shape[0], batch_size))


@torch.no_grad()
def _pair_error(dense_block: nn.Module, base_block: nn.Module, family, records, i: int, rows, batch_size) -> float:
    """D(i, j) (module doc) of block i's replacement on base j's linears."""
    hybrid = make_replacement_block(copy.deepcopy(dense_block), base_block, family, rank=1, svd_init=False)
    residual = fit_block_gammas(hybrid, family, records, i, rows=rows, batch_size=batch_size)["residual"]
    return residual / max(_change_energy(records, i, rows, batch_size), 1e-30)


def _check_records(records) -> None:
    if not isinstance(records, DenseRecords):
        raise ValueError(f"records: expected DenseRecords (record_dense_blocks), got {type(records).__name__}")
    if not records.attn:
        raise ValueError("records: no attention contributions recorded; use record_dense_blocks(..., attn=True)")


@torch.no_grad()
def functional_errors(
    model: nn.Module,
    records: DenseRecords,
    candidates,
    *,
    num_samples: int | None = DEFAULT_SCORE_SAMPLES,
    batch_size: int = 4,
    progress: bool = True,
) -> torch.Tensor:
    """D(i, j) (module doc), fp64 [len(records.blocks), len(candidates)]: rows follow
    records.blocks, columns `candidates` (blocks of the dense `model` that own their weights);
    D(i, i) is +inf. num_samples: recorded sequences scored (the first ones; None: all)."""
    _check_records(records)
    num_samples = positive_int("num_samples", num_samples)
    batch_size = positive_int("batch_size", batch_size, allow_none=False)
    family = family_of(model)
    n_layers = num_layers(model)
    layers = list(decoder_layers(model))[:n_layers]
    blocks, candidates = list(records.blocks), list(candidates)
    bad = [b for b in blocks + candidates if not 0 <= b < n_layers]
    if bad:
        raise ValueError(f"records/candidates: blocks {bad} out of range for a model with {n_layers} blocks")
    if not candidates:
        raise ValueError("candidates: no block to be a base")
    converted = [b for b in candidates if hasattr(layers[b], "flexigpt_base")]
    if converted:
        raise ValueError(f"model: blocks {converted} are replacement blocks; score bases on the dense model")
    rows = slice(0, records.num_sequences if num_samples is None else min(num_samples, records.num_sequences))
    table = torch.full((len(blocks), len(candidates)), float("inf"), dtype=torch.float64)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(blocks) * len(candidates), desc="Functional base scores", disable=not progress)
    try:
        for row, i in enumerate(blocks):
            for col, j in enumerate(candidates):
                bar.update()
                if j != i:
                    table[row, col] = _pair_error(layers[i], layers[j], family, records, i, rows, batch_size)
    finally:
        bar.close()
        model.train(was_training)
    return table


def functional_bases(
    model: nn.Module,
    records: DenseRecords,
    *,
    num_samples: int | None = DEFAULT_SCORE_SAMPLES,
    batch_size: int = 4,
    progress: bool = True,
) -> BaseChoice:
    """Base block for every recorded (pruned) block by the functional error D(i, j) (module doc).

    model: the DENSE model (before conversion) the records were taken on.
    records: ``record_dense_blocks(model, tokens, pruned, attn=True)``; its blocks are the pruned ones.
    num_samples: recorded sequences scored (the first ones; None: all).
    Returns a BaseChoice with combine="functional", rank 0, distances = D [pruned, kept] and
    seconds {"functional": wall time}; per_matrix and norms are empty.
    """
    _check_records(records)
    pruned = list(records.blocks)
    kept = [b for b in range(num_layers(model)) if b not in set(pruned)]
    if not kept:
        raise ValueError("records: every block is recorded as pruned; no kept block to be a base")
    t0 = time.perf_counter()
    table = functional_errors(model, records, kept, num_samples=num_samples, batch_size=batch_size, progress=progress)
    return BaseChoice.argmin(
        pruned,
        kept,
        table,
        per_matrix={},
        norms={},
        rank=0,
        combine="functional",
        svd="none",
        seconds={"functional": time.perf_counter() - t0},
    )
