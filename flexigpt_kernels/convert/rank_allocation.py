"""Per-matrix adapter ranks within one block's parameter budget (LocalFit.rank_allocation).

A rank-r adapter on a linear of shape [out, in] costs r (in + out) parameters. The uniform
recipe gives every linear of a replacement block the same r. "spectrum" spends the same
parameters, sum_m r (in_m + out_m), where they remove the most of the residual: with s_m the
singular values of linear m's (activation-weighted) residual D_m L_m, the k-th rank of m
removes the fraction e_m[k] = s_m[k]^2 / sum(s_m^2) of its error, at the price of
(in_m + out_m) parameters. Ranks are handed out greedily by e_m[k] / (in_m + out_m), each
linear keeping at least rank 1 (a SharedLoRALinear has no rank 0) and at most min(in, out).
Because the s_m are sorted, the greedy choice is optimal for the sum of relative errors
(a concave knapsack with unit steps), up to the last step that does not fit the budget.
"""

from __future__ import annotations

import heapq

from torch import Tensor

__all__ = ["RANK_ALLOCATIONS", "allocate_ranks"]

RANK_ALLOCATIONS = ("uniform", "spectrum")


def allocate_ranks(spectra: dict[str, Tensor], widths: dict[str, int], budget: int) -> dict[str, int]:
    """{name: rank} spending at most `budget` parameters (rank x widths[name] each).

    spectra[name]: the residual's singular values, descending (their count caps the rank);
    widths[name]: in + out of that linear. Every name gets rank >= 1; the budget must cover
    that floor."""
    if set(spectra) != set(widths):
        raise ValueError(f"spectra and widths name different linears: {sorted(spectra)} vs {sorted(widths)}")
    floor = sum(widths.values())
    if budget < floor:
        raise ValueError(f"budget {budget:,} parameters is below rank 1 on every linear ({floor:,})")
    ranks = {name: 1 for name in spectra}
    left = budget - floor
    energy = {name: s.double().pow(2) for name, s in spectra.items()}
    total = {name: max(e.sum().item(), 1e-300) for name, e in energy.items()}

    def gain(name: str, k: int) -> float:  # relative error removed by rank k+1, per parameter
        return energy[name][k].item() / total[name] / widths[name]

    heap = [(-gain(n, 1), n) for n in sorted(spectra) if len(spectra[n]) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if widths[name] > left:
            continue  # too wide for what is left; narrower linears may still fit
        ranks[name] += 1
        left -= widths[name]
        if ranks[name] < len(spectra[name]):
            heapq.heappush(heap, (-gain(name, ranks[name]), name))
    return ranks
