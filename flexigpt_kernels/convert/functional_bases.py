"""Base choice by function: which kept block best stands in for a pruned one on recorded activations.

The weight distance of ``base_selection.py`` compares weights; on a model whose blocks' weights
are nearly unrelated (SmolLM2-135M) it is drawn to blocks with small weights and says little
about what a replacement block will compute. This module scores every (pruned i, kept j) pair
by what block i's replacement would compute with block j's linears, a zero adapter and the
closed-form output-norm gammas (convert/gamma_init.py), on block i's recorded dense input x
[n, seq, hidden] (convert/dense_records.py). As in the replacement block (replacement.py), the
hybrid h_ij keeps block i's own norms and biases and takes block j's linear weights:

    n_a = LN(a_ij(x))                    attention contribution of h_ij, LayerNorm without affine
    g_a = argmin_g ||g * n_a - a_i||^2   per channel; a_i: block i's recorded contribution
    (h_ij re-run with its attention output replaced by g_a * n_a and its MLP output by n_m)
    n_m = LN(m_ij),  t = n_m + (y_i - out)   the MLP target, as gamma_init.lsq_gamma defines it
    g_m = argmin_g ||g * n_m - t||^2     per channel
    D(i, j) = ||t - g_m * n_m||^2 / ||y_i - x||^2     (summed over tokens and channels)

D(i, j) is exactly the block-local relative error (``block_errors``) of the replacement of i with
base j, zero adapter and lsq gammas: 0 when block j computes what block i did, about 1 when its
output is unrelated (the gammas shrink to 0 and the block acts as dropped). base(i) = argmin over
kept j (ties: the lower j). The rank-r adapter the fit adds later is not modelled.

Each pair costs two runs of one layer on the scored rows (the first stops after the attention
contribution); the hybrid is a copy of block i (one block's memory) whose linears point at
block j's weights. It runs with the keyword arguments recorded for block i (position
embeddings, mask), as the replacement block will.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .arguments import positive_int
from .base_selection import BaseChoice
from .dense_records import DenseRecords, batches, contribution_name, layer_dtype_device, run_block
from .families import decoder_layers, family_of, num_layers
from .importance import StopForward, first_tensor
from .replacement import _set_submodule

__all__ = ["functional_bases", "functional_errors", "DEFAULT_SCORE_SAMPLES"]

#: recorded sequences scored per pair by default (the first ones: inside the local fit's train rows)
DEFAULT_SCORE_SAMPLES = 4


def _ln(y: torch.Tensor) -> torch.Tensor:
    """OutputNorm with gamma 1: LayerNorm over the last dim, no affine, eps 1e-5 (nn/output_norm.py)."""
    return nn.functional.layer_norm(y, (y.shape[-1],), None, None, 1e-5)


def _borrow_linears(hybrid: nn.Module, base: nn.Module, own: nn.Module, family) -> None:
    """Point every linear of `hybrid` (a copy of block i) at `base`'s weight, keeping `own`'s bias."""
    for name in family.linears:
        src, mine = base.get_submodule(name), own.get_submodule(name)
        if not isinstance(src, nn.Linear) or not isinstance(mine, nn.Linear):
            raise ValueError(f"model: {name} is not an nn.Linear; the functional base choice needs plain linears")
        lin = nn.Linear(src.in_features, src.out_features, bias=False, device="meta")
        lin.weight = src.weight
        lin.bias = mine.bias
        _set_submodule(hybrid, name, lin)


class _Hooks:
    """Forward hooks on the hybrid's attention and MLP contribution modules (see the module doc)."""

    def __init__(self, layer: nn.Module, family):
        self.attn_mod = layer.get_submodule(contribution_name(family, "attn"))
        self.mlp_mod = layer.get_submodule(contribution_name(family, "mlp"))
        self.g_attn: torch.Tensor | None = None  # None: capture n_a and stop; else replace by g_a * n_a
        self.n_attn = self.n_mlp = None

    def attn(self, module, args, output):
        n = _ln(first_tensor(output).float())
        if self.g_attn is None:
            self.n_attn = n
            raise StopForward
        return (self.g_attn.to(n.device) * n).to(first_tensor(output).dtype)

    def mlp(self, module, args, output):
        self.n_mlp = _ln(first_tensor(output).float())
        return self.n_mlp.to(first_tensor(output).dtype)


@torch.no_grad()
def _pair_error(layer, hooks: _Hooks, records: DenseRecords, i: int, rows: slice, batch_size: int) -> float:
    dt, dev = layer_dtype_device(layer)
    xs, ys, ts = records.inputs[i][rows], records.outputs[i][rows], records.attn[i][rows]
    h = ys.shape[-1]
    # pass 1: attention gamma
    num = torch.zeros(h, dtype=torch.float64)
    den = torch.zeros(h, dtype=torch.float64)
    hooks.g_attn = None
    for sl in batches(xs.shape[0], batch_size):
        try:
            run_block(layer, records, i, xs[sl].to(dev, dt))
        except StopForward:
            pass
        n = hooks.n_attn.reshape(-1, h).double().cpu()
        t = ts[sl].reshape(-1, h).double()
        num += (n * t).sum(0)
        den += n.pow(2).sum(0)
    hooks.g_attn = (num / den.clamp_min(1e-300)).float()
    # pass 2: MLP gamma and the residual, in closed form from per-channel sums
    nn_ = torch.zeros(h, dtype=torch.float64)
    nt = torch.zeros(h, dtype=torch.float64)
    tt = torch.zeros(h, dtype=torch.float64)
    energy = 0.0
    for sl in batches(xs.shape[0], batch_size):
        x = xs[sl].to(dev, dt)
        out = run_block(layer, records, i, x).double().cpu()
        y = ys[sl].double()
        n = hooks.n_mlp.double().cpu().reshape(out.shape)  # OPT's MLP runs on [batch * seq, hidden]
        t = (n + y - out).reshape(-1, h)
        n = n.reshape(-1, h)
        nn_ += n.pow(2).sum(0)
        nt += (n * t).sum(0)
        tt += t.pow(2).sum(0)
        energy += (y - xs[sl].double()).pow(2).sum().item()
    resid = (tt - nt.pow(2) / nn_.clamp_min(1e-300)).clamp_min(0).sum().item()
    return resid / max(energy, 1e-30)


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
            hybrid = copy.deepcopy(layers[i])
            for col, j in enumerate(candidates):
                bar.update()
                if j == i:
                    continue
                _borrow_linears(hybrid, layers[j], layers[i], family)
                hooks = _Hooks(hybrid, family)
                handles = [
                    hooks.attn_mod.register_forward_hook(hooks.attn),
                    hooks.mlp_mod.register_forward_hook(hooks.mlp),
                ]
                try:
                    table[row, col] = _pair_error(hybrid, hooks, records, i, rows, batch_size)
                finally:
                    for h in handles:
                        h.remove()
            del hybrid
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
