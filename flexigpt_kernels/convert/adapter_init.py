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


def _residual(layers, records: DenseRecords, i: int, j: int, name: str, damping: float, chol_cache: dict):
    """(D, L): block i's weight minus block j's for linear `name` (float64, CPU), and the
    Cholesky factor of block i's damped input covariance for it (cached by covariance)."""
    if isinstance(layers[i].get_submodule(name), SharedLoRALinear):
        raise ValueError(f"block {i} is already converted: compute the adapters on the dense model")
    c = records.cov[i][name]
    if id(c) not in chol_cache:
        cm = c / records.tokens
        cm = cm + damping * cm.diagonal().mean() * torch.eye(cm.shape[0], dtype=cm.dtype)
        chol_cache[id(c)] = torch.linalg.cholesky(cm)
    wi = layers[i].get_submodule(name).weight
    wj = layers[j].get_submodule(name).weight
    return (wi.double() - wj.double()).cpu(), chol_cache[id(c)]


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
    if allocation not in RANK_ALLOCATIONS:
        raise ValueError(f"allocation must be one of {RANK_ALLOCATIONS}, got {allocation!r}")
    for i, j in sorted(base_map.items()):
        factors[i], stats[i] = {}, {}
        chol_cache: dict[int, Tensor] = {}
        shapes = {name: tuple(layers[i].get_submodule(name).weight.shape) for name in family.linears}
        ranks = {name: min(rank, *shapes[name]) for name in family.linears}
        if allocation == "spectrum":  # a first pass for the singular values only (one matrix at a time)
            spectra = {}
            for name in family.linears:
                d, L = _residual(layers, records, i, j, name, damping, chol_cache)
                spectra[name] = torch.linalg.svdvals(d @ L)
            widths = {name: sum(shapes[name]) for name in family.linears}
            ranks = allocate_ranks(spectra, widths, sum(ranks[name] * widths[name] for name in family.linears))
        for name in family.linears:
            d, L = _residual(layers, records, i, j, name, damping, chol_cache)
            r = ranks[name]
            u, s, vh = torch.linalg.svd(d @ L, full_matrices=False)
            a = torch.linalg.solve_triangular(L, vh[:r], upper=False, left=False)  # Vh_r L^-1: rows of A
            root = (s[:r] / abs(scale)).sqrt()
            sign = 1.0 if scale > 0 else -1.0
            b_mat = sign * u[:, :r] * root
            a_mat = root[:, None] * a
            dtype = layers[i].get_submodule(name).weight.dtype
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
