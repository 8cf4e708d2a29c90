"""The kernel benchmark's shape grid.

A weight is [N, K] (out x in), written N x K as in the issue: Llama-2-7B's q/o projections are
4096x4096, gate/up 11008x4096, down 4096x11008 (adapter rank 256); SmolLM2-135M's are 576x576,
1536x576, 576x1536 (rank 32). M is the number of rows of x: tokens in flight, decode
{1, 8, 32} and prefill {512, 2048, 8192}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DECODE_M = (1, 8, 32)
PREFILL_M = (512, 2048, 8192)
QUICK_M = (1, 512)

#: model -> (rank, [(layer, N, K)])
WIDTHS: dict[str, tuple[int, list[tuple[str, int, int]]]] = {
    "llama2-7b": (256, [("q/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)]),
    "smollm2": (32, [("q/o", 576, 576), ("gate/up", 1536, 576), ("down", 576, 1536)]),
}

VARIANTS = ("linear", "norm+res")  # without / with the output norm and the residual add
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    model: str  # width family ("llama2-7b", "smollm2", or "custom")
    layer: str
    m: int
    k: int
    n: int
    r: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.layer} M={self.m} {self.n}x{self.k} r={self.r}"


def grid(models=("llama2-7b", "smollm2"), ms=DECODE_M + PREFILL_M) -> list[Shape]:
    """Every (model widths, layer, M) of the grid, models and layers in table order."""
    shapes = []
    for model in models:
        if model not in WIDTHS:
            raise ValueError(f"unknown widths {model!r}; choose from {', '.join(WIDTHS)}")
        rank, layers = WIDTHS[model]
        for layer, n, k in layers:
            shapes.extend(Shape(model, layer, m, k, n, rank) for m in ms)
    return shapes


def quick_grid() -> list[Shape]:
    """--quick: SmolLM2 widths, M in {1, 512}."""
    return grid(models=("smollm2",), ms=QUICK_M)


_SHAPE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


def parse_shape(text: str) -> Shape:
    """'MxKxNxR' (e.g. '1x4096x4096x256') -> a custom Shape."""
    match = _SHAPE.match(text)
    if not match:
        raise ValueError(f"shape {text!r}: expected MxKxNxR, e.g. 1x4096x4096x256")
    m, k, n, r = (int(g) for g in match.groups())
    if min(m, k, n, r) < 1 or r > min(k, n):
        raise ValueError(f"shape {text!r}: need M, K, N, R >= 1 and R <= min(K, N)")
    return Shape("custom", f"{n}x{k}", m, k, n, r)
