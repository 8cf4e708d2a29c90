"""Rank-r factors of weight matrices and FlexiGPT's low-rank distance between two of them.

For W [m, n] let W^ = L V^T be its rank-r truncation, L = U S [m, r] (left singular vectors
scaled by the singular values), V [n, r] orthonormal. docs/method.md section 3 defines

    d(W_i, W_j) = || W^_i - (W^_j + Delta_r(W^_i - W^_j)) ||_F
                = sqrt( sum_{k > r} sigma_k(W^_i - W^_j)^2 )

the part of W^_i - W^_j (rank <= 2r) that a rank-r adapter cannot cover. From the thin factors:

    W^_i - W^_j = [L_i, -L_j] [V_i, V_j]^T = (Q_a R_a) (Q_b R_b)^T = Q_a (R_a R_b^T) Q_b^T

with reduced QR of the stacked factors, [m, 2r] and [n, 2r]; Q_a and Q_b have orthonormal
columns, so the singular values of the difference are those of the 2r x 2r core R_a R_b^T.
Cost per pair: two tall-skinny QRs, ~8 (m + n) r^2 flops, plus a (2r)^3 SVD; never a full SVD.
"""

from __future__ import annotations

import torch

__all__ = ["Factors", "truncated_svd", "lowrank_distance"]


class Factors:
    """Rank-r factors of one matrix: W^ = left @ right.T, left = U S [m, r], right = V [n, r]."""

    __slots__ = ("left", "right")

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        self.left = left
        self.right = right

    @property
    def rank(self) -> int:
        return self.left.shape[1]


def _randomized_svd(w: torch.Tensor, r: int, q: int, niter: int, seed: int):
    """Randomized range finder with ``niter`` QR-stabilised power iterations (Halko, Martinsson,
    Tropp 2011, alg. 4.4), then an exact SVD of the small [q, n] projection. Own generator: the
    result is deterministic and the global RNG is untouched."""
    g = torch.Generator(device=w.device).manual_seed(seed)
    omega = torch.randn(w.shape[1], q, generator=g, device=w.device, dtype=w.dtype)
    basis = torch.linalg.qr(w @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(w.mT @ basis).Q
        basis = torch.linalg.qr(w @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ w, full_matrices=False)
    return basis @ u[:, :r], s[:r], vh[:r].mT


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    *,
    method: str = "auto",
    dtype: torch.dtype = torch.float32,
    oversample: int | None = None,
    niter: int = 4,
    seed: int = 0,
) -> Factors:
    """Rank-``rank`` truncation of ``weight`` [m, n] as :class:`Factors` (computed in ``dtype``).

    ``rank`` is capped at min(m, n). ``method``:
      - "exact": ``torch.linalg.svd(full_matrices=False)``, the best rank-r approximation;
        ~12 m n min(m, n) flops in LAPACK;
      - "lowrank": randomized SVD with q = rank + oversample columns (default oversample =
        max(10, rank // 4)) and ``niter`` power iterations, ~(2 niter + 2) * 2 m n q flops of
        GEMM; deterministic for a given ``seed``. On SmolLM2-135M (rank 32) its block
        distances are within 2% of the exact ones and choose the same bases, 10x faster;
      - "auto" (default): "exact" when min(m, n) <= 2 q (randomization would save little),
        else "lowrank".
    Only one ``dtype`` copy of ``weight`` exists at a time.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D matrix, got shape {tuple(weight.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    if method not in ("auto", "exact", "lowrank"):
        raise ValueError(f"method: expected 'auto', 'exact' or 'lowrank', got {method!r}")
    m, n = weight.shape
    r = min(rank, m, n)
    q = min(r + (max(10, r // 4) if oversample is None else oversample), m, n)
    if method == "auto":
        method = "exact" if min(m, n) <= 2 * q else "lowrank"
    w = weight.detach().to(dtype)
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, v = u[:, :r], s[:r], vh[:r].mT
    else:
        u, s, v = _randomized_svd(w, r, q, niter, seed)
    return Factors((u * s).contiguous(), v.contiguous())


def _r_factor(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(a, mode="r").R


def lowrank_distance(fi: Factors, fj: Factors | list[Factors]) -> torch.Tensor:
    """d(W_i, W_j) for one ``fi`` against one or many ``fj`` (batched), fp tensor [] or [len(fj)].

    Both sides must have the same shape and rank r; the tail starts at singular value r + 1.
    """
    many = isinstance(fj, (list, tuple))
    group = list(fj) if many else [fj]
    if not group:
        return fi.left.new_zeros(0)
    r = fi.rank
    for f in group:
        if f.left.shape != fi.left.shape or f.right.shape != fi.right.shape:
            raise ValueError(
                f"fj: factor shapes {tuple(f.left.shape)}/{tuple(f.right.shape)} differ from "
                f"fi's {tuple(fi.left.shape)}/{tuple(fi.right.shape)}"
            )
    k = len(group)
    left = torch.cat([fi.left.expand(k, -1, -1), -torch.stack([f.left for f in group])], dim=2)
    right = torch.cat([fi.right.expand(k, -1, -1), torch.stack([f.right for f in group])], dim=2)
    core = _r_factor(left) @ _r_factor(right).mT  # [k, min(m, 2r), min(n, 2r)]
    sv = torch.linalg.svdvals(core)  # descending
    d = sv[:, r:].square().sum(-1).sqrt()
    return d if many else d[0]
