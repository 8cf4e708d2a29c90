"""The op, the unfused composition and dense F.linear at the quick grid's shapes (SmolLM2 widths,
M in {1, 512}, fwd under no_grad, fp32, 1 thread), timed in *thread CPU time*.

On a shared, loaded machine wall-clock minima swing by 2x between runs; the CPU time of the
calling thread (time.thread_time_ns) excludes the time it was preempted, so the ratios are
stable enough to compare two versions run one after the other. Complements
`flexigpt bench kernels` (wall clock, CSV, plots). One line per case:

    OMP_NUM_THREADS=1 python benchmarks/op_thread_time.py LABEL
    LABEL,layer,M,NxK,variant,op=us,unfused=us,dense=us,op/unfused=..,op/floor=..

The two other forms of the op, on SmolLM2's stacked projections (rank 32 per part) and on its
o / down projections with the output norm and residual (y0 = x @ W.T given, not timed):

    OMP_NUM_THREADS=1 python benchmarks/op_thread_time.py LABEL stacked
    LABEL,stacked,layer,M,op=us,per-part=us,unfused=us,dense=us,op/per-part=..,op/unfused=..,op/floor=..
    LABEL,epilogue,layer,M,op=us,unfused=us,op/unfused=..

Only the public functions are called, so the script times whichever flexigpt_kernels is on
PYTHONPATH (a before / after comparison runs it once per checkout).
"""

from __future__ import annotations

import functools
import sys
import time

import torch
import torch.nn.functional as F

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


def _least(fns: dict, rounds: int = 3, reps: int = 5) -> dict:
    ts = {k: float("inf") for k in fns}
    for _ in range(rounds):  # interleaved
        for k, f in fns.items():
            ts[k] = min(ts[k], thread_time_us(f, reps=reps))
    return ts


def _per_part(x, w, as_, bs, sc, bias, starts):
    """One single-op call per part on the weight's row blocks, concatenated."""
    outs = []
    for a, b, s, c0 in zip(as_, bs, sc, starts):
        n = b.shape[0]
        outs.append(fk.shared_lora_linear(x, w[c0 : c0 + n], a, b, s, bias[c0 : c0 + n]))
    return torch.cat(outs, -1)


def _unfused_stacked(x, w, as_, bs, sc, bias, starts):
    """F.linear over the stacked weight, then each part's LoRA delta added to its columns."""
    y = F.linear(x, w, bias)
    for a, b, s, c0 in zip(as_, bs, sc, starts):
        y[:, c0 : c0 + b.shape[0]] += s * ((x @ a.t()) @ b.t())
    return y


def _unfused_epilogue(y0, x, a, b, bias, gamma, res):
    y = torch.addmm(y0, x @ a.t(), b.t(), alpha=0.5) + bias
    return res + F.layer_norm(y, (y.shape[-1],), gamma, None, 1e-5)


def main_stacked(label: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    r = 32
    with torch.no_grad():
        for layer, widths in (("qkv", (576, 192, 192)), ("gate_up", (1536, 1536))):
            for m in (1, 512):
                k, n = 576, sum(widths)
                x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * k**-0.5
                a_buf = torch.randn(r * len(widths), k, generator=g) * k**-0.5
                as_, bs = list(a_buf.split(r)), [torch.randn(c, r, generator=g) * r**-0.5 for c in widths]
                sc, bias = [0.5] * len(widths), torch.randn(n, generator=g)
                starts = [sum(widths[:i]) for i in range(len(widths))]

                parts = (x, w, as_, bs, sc, bias, starts)
                ts = _least(
                    {
                        "op": functools.partial(fk.shared_lora_linear_stacked, x, w, as_, bs, sc, bias),
                        "per-part": functools.partial(_per_part, *parts),
                        "unfused": functools.partial(_unfused_stacked, *parts),
                        "dense": functools.partial(F.linear, x, w, bias),
                    },
                    reps=5 if m == 1 else 3,
                )
                floor = ts["dense"] * (1 + r * (len(widths) * k + n) / (n * k))  # + the adapters' FLOPs
                print(
                    f"{label},stacked,{layer},{m},op={ts['op']:.1f},per-part={ts['per-part']:.1f},"
                    f"unfused={ts['unfused']:.1f},dense={ts['dense']:.1f},op/per-part={ts['op'] / ts['per-part']:.3f},"
                    f"op/unfused={ts['op'] / ts['unfused']:.3f},op/floor={ts['op'] / floor:.3f}",
                    flush=True,
                )
        for layer, (n, k) in (("o", (576, 576)), ("down", (576, 1536))):
            for m in (1, 512):
                x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * k**-0.5
                y0 = x @ w.t()
                a, b = torch.randn(r, k, generator=g) * k**-0.5, torch.randn(n, r, generator=g) * r**-0.5
                bias, gamma, res = torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5, torch.randn(m, n)

                ts = _least(
                    {
                        "op": functools.partial(
                            fk.shared_lora_linear_epilogue, y0, x, a, b, 0.5, bias, norm_weight=gamma, residual=res
                        ),
                        "unfused": functools.partial(_unfused_epilogue, y0, x, a, b, bias, gamma, res),
                    },
                    reps=5 if m == 1 else 3,
                )
                print(
                    f"{label},epilogue,{layer},{m},op={ts['op']:.1f},unfused={ts['unfused']:.1f},"
                    f"op/unfused={ts['op'] / ts['unfused']:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "stacked":
        main_stacked(sys.argv[1])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "run")
