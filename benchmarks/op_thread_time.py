"""The op, the unfused composition and dense F.linear at the quick grid's shapes (SmolLM2 widths,
M in {1, 512}, fwd under no_grad, fp32, 1 thread), timed in *thread CPU time*.

On a shared, loaded machine wall-clock minima swing by 2x between runs; the CPU time of the
calling thread (time.thread_time_ns) excludes the time it was preempted, so the ratios are
stable enough to compare two versions run one after the other. Complements
`flexigpt bench kernels` (wall clock, CSV, plots). One line per case:

    OMP_NUM_THREADS=1 python benchmarks/op_thread_time.py LABEL
    LABEL,layer,M,NxK,variant,op=us,unfused=us,dense=us,op/unfused=..,op/floor=..
"""

from __future__ import annotations

import functools
import sys
import time

import torch

import flexigpt_kernels as fk
from flexigpt_kernels.bench import shapes
from flexigpt_kernels.bench.formulas import floor_factor
from flexigpt_kernels.bench.providers import Operands
from flexigpt_kernels.ops import unfused_peft_style


def thread_time_us(fn, target_s: float = 0.02, reps: int = 5) -> float:
    """Least mean thread CPU time per call (us) over `reps` blocks of about target_s each."""
    fn()
    t0 = time.thread_time()
    fn()
    calls = max(1, int(target_s / max(time.thread_time() - t0, 1e-6)))
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time_ns() - t0) / calls / 1e3)
    return best


def main(label: str) -> None:
    torch.set_num_threads(1)
    with torch.no_grad():
        for s in shapes.quick_grid():
            for variant in ("linear", "norm+res"):
                o = Operands(s, variant == "norm+res", False, torch.device("cpu"), torch.float32)
                kw = {"norm_weight": o.norm_weight, "residual": o.residual}
                fns = {
                    "op": functools.partial(fk.shared_lora_linear, o.x, o.weight, o.lora_a, o.lora_b, 1.0, **kw),
                    "unfused": functools.partial(unfused_peft_style, o.x, o.weight, o.lora_a, o.lora_b, 1.0, **kw),
                    "dense": functools.partial(torch.nn.functional.linear, o.x, o.weight),
                }
                ts = {k: float("inf") for k in fns}
                for _ in range(3):  # interleaved
                    for k, f in fns.items():
                        ts[k] = min(ts[k], thread_time_us(f, reps=5 if s.m == 1 else 3))
                floor = ts["dense"] * floor_factor(s, "fwd")
                print(
                    f"{label},{s.layer},{s.m},{s.n}x{s.k},{variant},op={ts['op']:.1f},unfused={ts['unfused']:.1f},"
                    f"dense={ts['dense']:.1f},op/unfused={ts['op'] / ts['unfused']:.3f},"
                    f"op/floor={ts['op'] / floor:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "run")
