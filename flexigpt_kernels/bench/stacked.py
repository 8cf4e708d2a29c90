"""The multi-slice op beside what it replaces, for SmolLM2's stacked projections:

    stacked-op     shared_lora_linear_stacked: one call (one base GEMM over the stacked
                   weight, one shrink over the concatenated A, one expand per part)
    per-part-op    one shared_lora_linear call per part on the weight's row blocks, then
                   torch.cat (what a layer without the stacked op does)
    dense          F.linear over the stacked weight alone

Forward under torch.no_grad() (inference), fp32 by default, same rows/columns as the kernel
grid (variant "stacked", mode "fwd", N = sum of the part widths, r = the per-part rank), plus
"parts" and x_dense / x_per_part (from the medians; *_min from the minima). The backend is
selected once around the timing (not per call). On the CPU with one thread the times are the
thread's CPU time (bench/timing.py: robust to other processes' load), else wall clock.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..ops import shared_lora_linear, use_backend
from ..ops.stacked import shared_lora_linear_stacked
from .env import run_metadata
from .timing import time_cpu_interleaved, time_cuda

#: (layer, K, part widths, per-part rank): SmolLM2-135M's qkv_proj (9 query heads, 3 kv heads
#: of 64) and gate_up_proj, at the kernel grid's rank
STACKS = (("qkv", 576, (576, 192, 192), 32), ("gate_up", 576, (1536, 1536), 32))
PROVIDERS = ("stacked-op", "per-part-op", "dense")


def _operands(k, widths, r, m, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    weight = rnd(sum(widths), k, std=k**-0.5)
    lora_a = rnd(r * len(widths), k, std=k**-0.5)  # the parts' A as row views of one buffer
    return dict(
        x=rnd(m, k),
        weight=weight,
        lora_as=list(lora_a.split(r)),
        lora_bs=[rnd(n, r, std=r**-0.5) for n in widths],
        scales=[1.0] * len(widths),
    )


def _callables(o: dict) -> dict:
    """The providers, to be called under torch.no_grad() and use_backend(the backend)."""

    def stacked():
        return shared_lora_linear_stacked(o["x"], o["weight"], o["lora_as"], o["lora_bs"], o["scales"])

    def per_part():
        outs, start = [], 0
        for a, b, s in zip(o["lora_as"], o["lora_bs"], o["scales"]):
            n = b.shape[0]
            outs.append(shared_lora_linear(o["x"], o["weight"][start : start + n], a, b, s))
            start += n
        return torch.cat(outs, -1)

    def dense():
        return F.linear(o["x"], o["weight"])

    return {"stacked-op": stacked, "per-part-op": per_part, "dense": dense}


def run_stacked(
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    ms: Sequence[int] = (1, 512),
    budget_s: float = 0.5,
    backend: str | None = None,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    cuda_graphs: bool = False,
) -> list[dict]:
    """Time the providers side by side for every (stack, M); returns the rows.

    CUDA: triton.testing.do_bench (`warmup_ms`, `rep_ms`); with cuda_graphs=True the rows with
    M <= 32 (decode) are timed inside CUDA graphs (do_bench_cudagraph), which also shows that
    the op captures: a capture failure is printed and that row is timed eagerly (its "timer"
    column says which). CPU: interleaved rounds within about `budget_s` seconds per group."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = backend or ("triton" if device.type == "cuda" else "cpp")
    meta = run_metadata(device)
    meta.update(dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads())
    rows = []
    for layer, k, widths, r in STACKS:
        for m in ms:
            o = _operands(k, widths, r, m, device, dtype)
            fns = _callables(o)
            with use_backend(backend), torch.no_grad():
                want, got = fns["per-part-op"](), fns["stacked-op"]()
                err = (want.float() - got.float()).abs().max().item()
                if err > (2e-3 if dtype == torch.float32 else 6e-2) * max(1.0, want.abs().max().item()):
                    raise AssertionError(f"stacked-op differs from per-part-op by {err:.3e} ({layer}, M={m})")
                if device.type == "cuda":
                    graph = cuda_graphs and m <= 32
                    timings = {
                        p: time_cuda(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, cuda_graph=graph) for p, fn in fns.items()
                    }
                else:
                    timings = time_cpu_interleaved(fns, budget_s, thread_time=torch.get_num_threads() == 1)
            for p, t in timings.items():
                rows.append(
                    {
                        **meta,
                        "timer": t.timer,
                        "model": "smollm2",
                        "layer": layer,
                        "M": m,
                        "K": k,
                        "N": sum(widths),
                        "r": r,
                        "parts": len(widths),
                        "variant": "stacked",
                        "mode": "fwd",
                        "provider": f"{p}-{backend}" if p != "dense" else p,
                        "min_us": t.min_s * 1e6,
                        "median_us": t.median_s * 1e6,
                        "rounds": t.rounds,
                        "calls_per_round": t.calls_per_round,
                        "x_dense": t.median_s / timings["dense"].median_s,
                        "x_dense_min": t.min_s / timings["dense"].min_s,
                        "x_per_part": t.median_s / timings["per-part-op"].median_s,
                        "x_per_part_min": t.min_s / timings["per-part-op"].min_s,
                    }
                )
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    """One line per (stack, M, provider): min / median us and the ratios to per-part and dense."""
    lines = []
    for r in rows:
        lines.append(
            f"{r['layer']:>8} M={r['M']:<4} {r['provider']:<20} {r['min_us']:9.1f} / {r['median_us']:9.1f} us"
            f"  x per-part {r['x_per_part_min']:.2f} / {r['x_per_part']:.2f}"
            f"  x dense {r['x_dense_min']:.2f} / {r['x_dense']:.2f}"
        )
    return "\n".join(lines)
