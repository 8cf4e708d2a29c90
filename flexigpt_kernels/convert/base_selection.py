"""Which kept block each pruned block shares its weights with (docs/method.md section 3).

For every weight matrix name m (``q_proj``, ..., ``down_proj``), pruned block i and kept block j,
d_m(i, j) is the low-rank distance of ``lowrank.py``. The block distance combines them:

    "sum"            D(i, j) = sum_m d_m(i, j)                    (default)
    "sum_sq"         D(i, j) = sum_m d_m(i, j)^2
    "max"            D(i, j) = max_m d_m(i, j)
    "normalized_sum" D(i, j) = sum_m d_m(i, j) / ||W_{i,m}||_F

and base(i) = argmin over kept j of D(i, j) (ties: the lower j). The default is "sum": the paper
implies a sum of per-matrix distances and gives no weighting, so the default follows the paper.
"normalized_sum" weighs every matrix type equally whatever its scale; "sum_sq" is the squared
residual of the whole block seen as one (block-diagonal) matrix.

Measured on SmolLM2-135M (blocks 3, 12-17, 25, 26 pruned, rank 32): "sum" maps 3->4, 12/13->11,
14->8, 15-17->18, 25/26->0; "sum_sq" differs only in 25/26->27 (and matches the prototype of
an early throwaway prototype on 8 of 9). Since d <= ||W^_j||_F (the rank-r adapter W^_i leaves
-W^_j), a base with small weights looks close to everything: block 0's v_proj/o_proj norms are
16/37 against 40-140 elsewhere, which draws "sum" (25, 26) and "normalized_sum" (7 of 9 blocks)
to block 0. Held-out perplexity
at initialisation (gamma 1e-2) was the same for all four modes: 151.0-151.5.

Cost and memory: the outer loop is over matrix names. For one name, the rank-r factors of
that matrix in every block are computed (one fp32 copy of one weight at a time, see
``truncated_svd``) and kept: L * (m + n) * r values, less than one block's weights for
r << hidden size. Then every (pruned, kept) pair costs two tall-skinny QRs and a 2r x 2r SVD,
batched over the kept blocks. Work happens on the weights' device unless ``device`` is given.
Measured on one busy CPU thread: SmolLM2-135M, 30 layers, rank 32: ~7 s ("auto" SVD 5 s,
distances 2 s; the exact SVD takes 34 s). 7B-shaped (rank 256): one 11008 x 4096 factorisation
13 s, one 4096 x 4096 6 s, one pair distance ~0.6 s, so 32 layers with 10 pruned would take
~50 min on that thread (SVDs ~33 min, distances ~16 min); it is GEMM/QR work, ~50 TFLOP in
all, so minutes on a GPU or a many-core CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .families import decoder_layers, linear_names, num_layers
from .lowrank import lowrank_distance, truncated_svd
from .selection import _validate_blocks

__all__ = ["BaseChoice", "choose_bases", "COMBINE_MODES", "TIE_RTOL"]

COMBINE_MODES = ("sum", "sum_sq", "max", "normalized_sum")
#: best and second-best block distances within this relative gap are reported as a tie
TIE_RTOL = 1e-6
# stacked factors per batched QR call: at most this many elements (64 MiB in fp32)
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class BaseChoice:
    """Result of :func:`choose_bases`.

    distances: combined block distance, fp64 [len(pruned), len(kept)] (rows follow ``pruned``,
    columns ``kept``); per_matrix: name -> d_m, same shape; norms: name -> ||W_{b,m}||_F for
    every block b, fp64 [num_layers]; ties: (pruned block, chosen base, runner-up) triples whose
    two distances are within TIE_RTOL relative; seconds: wall time of the "svd" and "distance"
    phases.
    """

    pruned: list[int]
    kept: list[int]
    base_map: dict[int, int]
    distances: torch.Tensor
    per_matrix: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]
    ties: list[tuple[int, int, int]]
    rank: int
    combine: str
    svd: str
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def argmin(cls, pruned: list[int], kept: list[int], distances: torch.Tensor, **rest) -> BaseChoice:
        """base(i) = argmin over kept j of distances[i, j] (ties: the lower j), ties reported;
        `rest`: the other fields."""
        best = torch.sort(distances, dim=1, stable=True).indices[:, 0]
        base_map = {i: kept[best[row].item()] for row, i in enumerate(pruned)}
        return cls(pruned, kept, base_map, distances, ties=_ties(distances, pruned, kept, base_map), **rest)

    def distance(self, pruned_block: int, kept_block: int) -> float:
        """Combined distance D(pruned_block, kept_block)."""
        return float(self.distances[self.pruned.index(pruned_block), self.kept.index(kept_block)])

    def to_dict(self) -> dict:
        """JSON-ready summary (plain lists, floats and ints)."""
        return {
            "pruned": list(self.pruned),
            "kept": list(self.kept),
            "base_map": {str(i): j for i, j in self.base_map.items()},
            "base_distance": {str(i): self.distance(i, j) for i, j in self.base_map.items()},
            "distances": self.distances.tolist(),
            "per_matrix": {k: v.tolist() for k, v in self.per_matrix.items()},
            "ties": [list(t) for t in self.ties],
            "rank": self.rank,
            "combine": self.combine,
            "svd": self.svd,
            "seconds": dict(self.seconds),
        }


def _combine(per_matrix: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], pruned, combine: str):
    stacked = torch.stack(list(per_matrix.values()))  # [M, P, K]
    if combine == "sum":
        return stacked.sum(0)
    if combine == "sum_sq":
        return stacked.square().sum(0)
    if combine == "max":
        return stacked.amax(0)
    scale = torch.stack([norms[name][pruned] for name in per_matrix])[:, :, None]  # [M, P, 1]
    return torch.where(scale > 0, stacked / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0).sum(0)


def _ties(distances: torch.Tensor, pruned, kept, base_map) -> list[tuple[int, int, int]]:
    out = []
    if len(kept) < 2:
        return out
    for row, i in enumerate(pruned):
        vals, idx = torch.sort(distances[row], stable=True)
        best, second = vals[0].item(), vals[1].item()
        if second - best <= TIE_RTOL * max(abs(best), abs(second)):
            out.append((i, base_map[i], kept[idx[1].item()]))
    return out


def _weight(layer: nn.Module, name: str, block: int) -> torch.Tensor:
    try:
        w = layer.get_submodule(name).weight
    except AttributeError:
        raise ValueError(f"matrices: block {block} has no linear {name!r}") from None
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"matrices: {name!r} of block {block} has no 2-D weight")
    return w


@torch.no_grad()
def choose_bases(
    model: nn.Module,
    pruned,
    *,
    rank: int,
    combine: str = "sum",
    matrices=None,
    svd: str = "auto",
    dtype: torch.dtype = torch.float32,
    device=None,
    progress: bool = True,
) -> BaseChoice:
    """Base block for every pruned block by the low-rank distance (module docstring).

    Args:
        model: causal LM of a supported family.
        pruned: block indices to prune (validated; at least one block must stay).
        rank: adapter rank r (capped per matrix at min(m, n)).
        combine: one of COMBINE_MODES.
        matrices: linear names relative to a decoder layer; default: every linear of the family.
        svd: "auto" | "exact" | "lowrank", see ``truncated_svd``.
        dtype / device: where and in which precision factors and distances are computed.
        progress: tqdm bar over the SVD and distance steps.
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine: expected one of {COMBINE_MODES}, got {combine!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    n_layers = num_layers(model)
    layers = list(decoder_layers(model))[:n_layers]
    pruned = _validate_blocks(pruned, n_layers)
    kept = [b for b in range(n_layers) if b not in set(pruned)]
    names = tuple(linear_names(model) if matrices is None else matrices)
    if isinstance(matrices, str) or not names:
        raise ValueError(f"matrices: expected a non-empty list of linear names, got {matrices!r}")

    per_matrix: dict[str, torch.Tensor] = {}
    norms: dict[str, torch.Tensor] = {}
    seconds = {"svd": 0.0, "distance": 0.0}
    bar = tqdm(total=len(names) * (n_layers + len(pruned)), desc="Base choice", disable=not progress)
    try:
        for name in names:
            t0 = time.perf_counter()
            factors, norm = [], torch.zeros(n_layers, dtype=torch.float64)
            for b, layer in enumerate(layers):
                w = _weight(layer, name, b)
                w = w if device is None else w.to(device)
                norm[b] = torch.linalg.matrix_norm(w.to(dtype)).item()
                factors.append(truncated_svd(w, rank, method=svd, dtype=dtype))
                bar.update()
            seconds["svd"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            m, n = factors[0].left.shape[0], factors[0].right.shape[0]
            chunk = max(1, _CHUNK_ELEMENTS // ((m + n) * 2 * factors[0].rank))
            table = torch.empty(len(pruned), len(kept), dtype=torch.float64)
            for row, i in enumerate(pruned):
                for c in range(0, len(kept), chunk):
                    group = [factors[j] for j in kept[c : c + chunk]]
                    table[row, c : c + len(group)] = lowrank_distance(factors[i], group).double().cpu()
                bar.update()
            per_matrix[name], norms[name] = table, norm
            del factors
            seconds["distance"] += time.perf_counter() - t0
    finally:
        bar.close()

    distances = _combine(per_matrix, norms, pruned, combine)
    return BaseChoice.argmin(
        pruned,
        kept,
        distances,
        per_matrix=per_matrix,
        norms=norms,
        rank=rank,
        combine=combine,
        svd=svd,
        seconds=seconds,
    )
