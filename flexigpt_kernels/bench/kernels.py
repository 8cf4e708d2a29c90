"""The kernel grid: every provider of one (shape, variant, mode) timed side by side, the floor
derived from the dense time, and the ratios, TFLOP/s and GB/s (formulas.py) per provider.

    rows = run_kernels(shapes, device=torch.device("cpu"))
    append_csv(path, rows); print(format_table(rows))

One row per (shape, variant, mode, provider), "floor" included, so every provider has its own
rows with the same columns: min_us / median_us, x_floor and x_unfused (from the median, and
from the minima: *_min), tflops and gbps (from the median).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from . import formulas
from .env import run_metadata
from .providers import (
    DENSE,
    FLOOR,
    UNFUSED,
    Operands,
    bench_callable,
    check_agreement,
    default_dtype,
    default_providers,
)
from .results import fmt_ratio, fmt_us, markdown_table, text_table
from .shapes import MODES, VARIANTS, Shape
from .timing import Timing, time_cpu_interleaved, time_cuda

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def run_kernels(
    shapes: Sequence[Shape],
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    providers: Sequence[str] | None = None,
    variants: Sequence[str] = VARIANTS,
    modes: Sequence[str] = MODES,
    budget_s: float = 1.0,
    min_rounds: int = 3,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    cuda_graphs: bool = False,
    check: bool = True,
    log: Callable[[str], None] | None = lambda msg: print(msg, flush=True),
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Time the grid; returns the result rows (see module doc). budget_s: CPU seconds per
    (shape, variant, mode) group across its providers; warmup_ms/rep_ms: do_bench's, per
    provider on CUDA; cuda_graphs: decode shapes (M <= 32, fwd) timed with CUDA graphs;
    on_rows: called with each group's rows as soon as they exist (e.g. to append them to the CSV,
    so that an interrupted run keeps what it measured)."""
    dtype = dtype or default_dtype(device)
    providers = list(providers or default_providers(device))
    if DENSE not in providers:
        providers.append(DENSE)  # the floor needs it
    bad = [p for p in providers if p not in (DENSE, UNFUSED) and not p.startswith("op-")]
    if bad:
        raise ValueError(f"unknown providers {bad}; use op-<backend>, {UNFUSED}, {DENSE}")
    elt = DTYPE_BYTES[dtype]
    meta = run_metadata(device)
    meta.update(dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads())
    rows: list[dict] = []
    for s in shapes:
        for variant in variants:
            norm = variant == "norm+res"
            for mode in modes:
                try:
                    o = Operands(s, norm, grad=mode == "fwd+bwd", device=device, dtype=dtype)
                    if check and mode == "fwd":
                        check_agreement(providers, o)
                    fns = {p: bench_callable(p, o, mode) for p in providers}
                    if device.type == "cuda":
                        graphs = cuda_graphs and mode == "fwd" and s.m <= 32
                        timings = {
                            p: time_cuda(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, cuda_graph=graphs)
                            for p, fn in fns.items()
                        }
                    else:
                        timings = time_cpu_interleaved(fns, budget_s, min_rounds=min_rounds)
                except torch.cuda.OutOfMemoryError:
                    if log:
                        log(f"{s.label} {variant} {mode}: out of memory, skipped")
                    torch.cuda.empty_cache()
                    continue
                finally:
                    o = fns = None  # noqa: F841 - free the operands before the next group
                group = [{**meta, **r} for r in _group_rows(s, variant, mode, timings, elt)]
                rows += group
                if on_rows:
                    on_rows(group)
                if log:
                    log(_progress_line(s, variant, mode, group))
    return rows


def _group_rows(s: Shape, variant: str, mode: str, timings: dict[str, Timing], elt: int) -> list[dict]:
    norm = variant == "norm+res"
    factor = formulas.floor_factor(s, mode)
    dense = timings[DENSE]
    all_t = dict(timings)
    all_t[FLOOR] = Timing(
        dense.min_s * factor,
        dense.median_s * factor,
        dense.rounds,
        dense.calls_per_round,
        "derived: dense x floor_factor",
    )
    floor, unfused = all_t[FLOOR], all_t.get(UNFUSED)
    rows = []
    for p, t in all_t.items():
        flops = formulas.dense_flops(s, mode) if p == DENSE else formulas.op_flops(s, norm, mode)
        nbytes = formulas.dense_bytes(s, mode, elt) if p == DENSE else formulas.op_bytes(s, norm, mode, elt)
        rows.append(
            {
                "timer": t.timer,
                "model": s.model,
                "layer": s.layer,
                "M": s.m,
                "K": s.k,
                "N": s.n,
                "r": s.r,
                "variant": variant,
                "mode": mode,
                "provider": p,
                "min_us": t.min_s * 1e6,
                "median_us": t.median_s * 1e6,
                "rounds": t.rounds,
                "calls_per_round": t.calls_per_round,
                "floor_factor": factor,
                "x_floor": t.median_s / floor.median_s,
                "x_floor_min": t.min_s / floor.min_s,
                "x_unfused": t.median_s / unfused.median_s if unfused else math.nan,
                "x_unfused_min": t.min_s / unfused.min_s if unfused else math.nan,
                "tflops": flops / t.median_s / 1e12,
                "gbps": nbytes / t.median_s / 1e9,
                "flops": flops,
                "bytes": nbytes,
            }
        )
    return rows


def _progress_line(s: Shape, variant: str, mode: str, group: list[dict]) -> str:
    parts = [
        f"{r['provider']} {fmt_us(r['min_us'])}/{fmt_us(r['median_us'])}us x{r['x_floor_min']:.2f}fl"
        for r in group
        if r["provider"] != FLOOR
    ]
    return f"{s.label} {variant} {mode}: " + ", ".join(parts)


def _groups(rows: Sequence[dict]):
    order: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["model"], r["layer"], int(r["M"]), int(r["K"]), int(r["N"]), int(r["r"]), r["variant"], r["mode"])
        order.setdefault(key, {})[r["provider"]] = r
    return order


def summary_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """One line per (shape, variant, mode): floor and every provider's time (min / median us),
    then each implementation's ratio to the floor and ours to the unfused path (min / median)."""
    from .results import num

    groups = _groups(rows)
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["provider"] != FLOOR))
    ours = [p for p in providers if p.startswith("op-")]
    impls = ours + ([UNFUSED] if UNFUSED in providers else [])
    headers = (
        ["widths", "layer", "M", "NxK r", "variant", "mode", "floor us"]
        + [f"{p} us" for p in providers]
        + [f"{p} x floor" for p in impls]
        + ([f"{p} x unfused" for p in ours] if UNFUSED in providers else [])
        + [f"{p} TFLOP/s" for p in ours]
    )
    out = []
    for (model, layer, m, k, n, r, variant, mode), by_p in groups.items():

        def us(p):
            row = by_p.get(p)  # noqa: B023
            return "-" if row is None else f"{fmt_us(num(row['min_us']))} / {fmt_us(num(row['median_us']))}"

        def ratio(p, col):
            row = by_p.get(p)  # noqa: B023
            return "-" if row is None else f"{fmt_ratio(num(row[col + '_min']))} / {fmt_ratio(num(row[col]))}"

        line = [model, layer, m, f"{n}x{k} r{r}", variant, mode, us(FLOOR)]
        line += [us(p) for p in providers]
        line += [ratio(p, "x_floor") for p in impls]
        if UNFUSED in providers:
            line += [ratio(p, "x_unfused") for p in ours]
        line += ["-" if p not in by_p else f"{num(by_p[p]['tflops']):.3g}" for p in ours]
        out.append(line)
    return markdown_table(headers, out) if markdown else text_table(headers, out)


def targets_report(rows: Sequence[dict]) -> list[str]:
    """Where the best of our backends stands against the issue's targets (minima-based ratios)."""
    from .results import num

    lines = []
    device = rows[0]["device"] if rows else "cpu"
    for key, by_p in _groups(rows).items():
        model, layer, m, _k, _n, _r, variant, mode = key
        ours = {p: v for p, v in by_p.items() if p.startswith("op-")}
        if not ours or (device == "cuda" and mode != "fwd"):  # the GPU targets are inference ones
            continue
        best_p, best = min(ours.items(), key=lambda kv: num(kv[1]["min_us"]))
        xf, xu = num(best["x_floor_min"]), num(best["x_unfused_min"])
        if device == "cuda":
            if m >= 512:
                limit = 1.05 if variant == "linear" else 1.10
                ok = xf <= limit and (variant == "linear" or xu <= 1 / 1.2)
                want = f"x floor <= {limit}" + ("" if variant == "linear" else ", >= 1.2x faster than unfused")
            else:
                ok, want = xu <= 0.5, ">= 2x faster than unfused"
        else:
            ok = xu <= 1.0 and (m < 512 or xf <= 1.10)
            want = "not slower than unfused" + (", x floor <= 1.10" if m >= 512 else "")
        lines.append(
            f"{'ok  ' if ok else 'MISS'} {model} {layer} M={m} {variant} {mode}: {best_p} "
            f"x floor {xf:.2f}, x unfused {xu:.2f}  (target: {want})"
        )
    return lines
