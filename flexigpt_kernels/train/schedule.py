"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``.

    factor(s) = (s + 1) / W                                        s < W   (W warmup steps)
    factor(s) = r + (1 - r) * 0.5 * (1 + cos(pi * (s - W) / (T - W)))   W <= s < T

s is the index of the optimizer step about to run (LambdaLR calls it with 0 before the first
step), T the total step count, r = min_lr_ratio. The first step already has a non-zero rate and
the last step's rate is above r * lr (the cosine reaches its floor one step after the end).
"""

from __future__ import annotations

import math

__all__ = ["WarmupCosine", "warmup_steps"]


def warmup_steps(warmup: float, total_steps: int) -> int:
    """warmup < 1: a fraction of the run (rounded up); warmup >= 1: a step count."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    w = math.ceil(warmup * total_steps) if warmup < 1 else int(warmup)
    return min(w, total_steps)


class WarmupCosine:
    """A picklable lr_lambda for torch.optim.lr_scheduler.LambdaLR (its state_dict saves our fields)."""

    def __init__(self, total_steps: int, warmup: int, min_lr_ratio: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.total_steps, self.warmup, self.min_lr_ratio = int(total_steps), int(warmup), float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
