"""Activation-aware adapter initialisation (closed form), step 1 of the block-local fit.

The adapter B A of every linear of a replacement block becomes the best rank-r correction of
W_pruned - W_base in the norm weighted by that linear's input activations,
``min ||X (W_i - W_j - B A)^T||_F``, instead of the plain Frobenius norm (the SVD init). With
C = X^T X / T + damping, C = L L^T: B A = rank_r(D L) L^-1, D = W_i - W_j. It needs the dense
weights and input covariances (:func:`~.dense_records.record_dense_blocks` with
``covariances=True``), so it runs before conversion (:func:`activation_aware_adapters`) and is
copied in after (:func:`apply_adapters`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import SharedLoRALinear
from .dense_records import DenseRecords
from .families import decoder_layers, family_of
from .rank_allocation import RANK_ALLOCATIONS, allocate_ranks

__all__ = ["activation_aware_adapters", "apply_adapters"]


@torch.no_grad()
def activation_aware_adapters(
    model: nn.Module,
    records: DenseRecords,
    base_map: dict[int, int],
    *,
    rank: int,
    scale: float = 1.0,
    damping: float = 1e-2,
    allocation: str = "uniform",
) -> tuple[dict[int, dict[str, tuple[Tensor, Tensor]]], dict[int, dict[str, dict[str, float]]]]:
    """Adapters minimising the activation-weighted error, computed on the DENSE model (before
    conversion: it needs each pruned block's own weights). Returns (factors, stats):
    factors[i][linear] = (A [r, in], B [out, r]) with W_j + scale * B A ~ W_i on the recorded
    inputs; stats[i][linear] = {"svd": e_svd, "activation": e_act}, the relative weighted error
    ||(W_i - W_j - scale B A) L||^2 / ||(W_i - W_j) L||^2 of the plain SVD init and of this one.

    damping: added to the covariance's diagonal, relative to its mean diagonal (keeps L^-1 tame
    for directions the calibration tokens never excite). allocation: "uniform" (rank r on every
    linear, capped at min(in, out)) or "spectrum" (the same parameters per block, spread over its
    linears by their weighted residual spectra: convert/rank_allocation.py); stats[i][linear]
    also holds the rank given."""
    if not records.cov:
        raise ValueError("records hold no covariances: record_dense_blocks(..., covariances=True)")
    family = family_of(model)
    layers = decoder_layers(model)
    factors: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
    stats: dict[int, dict[str, dict[str, float]]] = {}
    tokens = records.tokens
    if allocation not in RANK_ALLOCATIONS:
        raise ValueError(f"allocation must be one of {RANK_ALLOCATIONS}, got {allocation!r}")
    for i, j in sorted(base_map.items()):
        factors[i], stats[i] = {}, {}
        chol_cache: dict[int, Tensor] = {}
        svds, diffs, chols = {}, {}, {}
        for name in family.linears:
            wi = layers[i].get_submodule(name).weight
            wj = layers[j].get_submodule(name).weight
            if isinstance(layers[i].get_submodule(name), SharedLoRALinear):
                raise ValueError(f"block {i} is already converted: compute the adapters on the dense model")
            c = records.cov[i][name]
            key = id(c)
            if key not in chol_cache:
                cm = c / tokens
                cm = cm + damping * cm.diagonal().mean() * torch.eye(cm.shape[0], dtype=cm.dtype)
                chol_cache[key] = torch.linalg.cholesky(cm)
            chols[name] = chol_cache[key]
            diffs[name] = (wi.double() - wj.double()).cpu()
            svds[name] = torch.linalg.svd(diffs[name] @ chols[name], full_matrices=False)
        caps = {name: min(rank, *diffs[name].shape) for name in family.linears}
        if allocation == "spectrum":
            widths = {name: sum(diffs[name].shape) for name in family.linears}
            ranks = allocate_ranks(
                {name: svds[name][1] for name in family.linears},
                widths,
                sum(caps[name] * widths[name] for name in family.linears),
            )
        else:
            ranks = caps
        for name in family.linears:
            dtype = layers[i].get_submodule(name).weight.dtype
            L, d, r = chols[name], diffs[name], ranks[name]
            u, s, vh = svds[name]
            a = torch.linalg.solve_triangular(L, vh[:r], upper=False, left=False)  # Vh_r L^-1: rows of A
            root = (s[:r] / abs(scale)).sqrt()
            sign = 1.0 if scale > 0 else -1.0
            b_mat = sign * u[:, :r] * root
            a_mat = root[:, None] * a
            factors[i][name] = (a_mat.to(dtype), b_mat.to(dtype))
            # diagnostics: weighted error of the plain SVD init vs this one
            total = s.pow(2).sum().item()
            e_act = s[r:].pow(2).sum().item() / max(total, 1e-300)
            u2, s2, vh2 = torch.linalg.svd(d, full_matrices=False)
            m_svd = (u2[:, :r] * s2[:r]) @ vh2[:r]
            e_svd = ((d - m_svd) @ L).pow(2).sum().item() / max(total, 1e-300)
            stats[i][name] = {"svd": e_svd, "activation": e_act, "rank": r}
    return factors, stats


@torch.no_grad()
def apply_adapters(model: nn.Module, factors: dict[int, dict[str, tuple[Tensor, Tensor]]]) -> None:
    """Copy (A, B) factors (from :func:`activation_aware_adapters`) into the converted model."""
    layers = decoder_layers(model)
    for i, per in factors.items():
        for name, (a, b) in per.items():
            mod = layers[i].get_submodule(name)
            if not isinstance(mod, SharedLoRALinear):
                raise ValueError(f"block {i} {name} is not a SharedLoRALinear (convert first)")
            if mod.lora_a.shape != a.shape or mod.lora_b.shape != b.shape:
                raise ValueError(
                    f"block {i} {name}: adapter shapes {tuple(mod.lora_a.shape)}/"
                    f"{tuple(mod.lora_b.shape)} vs factors {tuple(a.shape)}/{tuple(b.shape)}"
                )
            mod.lora_a.copy_(a)
            mod.lora_b.copy_(b)
