"""Shared setup of the microbenchmarks: 2 CPU threads, and a summary at the end of the run
(time per implementation, ratio to dense F.linear and to the floor = dense x the op's extra
work, GFLOP/s and GB/s by the formulas in README.md) printed and written to
benchmarks/results/op_cpu.csv."""

from __future__ import annotations

import csv
import platform
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
_rows: list[dict] = []

torch.set_num_threads(2)


@pytest.fixture
def record():
    """record(benchmark, group=..., impl=..., flops=..., bytes_moved=..., floor_factor=...) after a
    benchmark ran."""

    def _record(
        benchmark, *, group: str, impl: str, flops: float, bytes_moved: float, floor_factor: float = 1.0
    ) -> None:
        benchmark.extra_info.update(flops=flops, bytes=bytes_moved, floor_factor=floor_factor)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once as a test, nothing timed
            return
        _rows.append(
            {
                "group": group,
                "impl": impl,
                "mean_s": stats.stats.mean,
                "min_s": stats.stats.min,
                "median_s": stats.stats.median,
                "rounds": stats.stats.rounds,
                "flops": flops,
                "bytes": bytes_moved,
                "floor_factor": floor_factor,
            }
        )

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    dense = {r["group"]: r for r in _rows if r["impl"] == "dense"}
    write = terminalreporter.write_line
    terminalreporter.section("throughput (GFLOP/s and GB/s from the median, by the formulas in README.md)")
    write(
        f"{'group':<40} {'impl':<13} {'min us':>9} {'median us':>10} {'x dense':>8} {'x floor':>8} "
        f"{'x floor':>8} {'GFLOP/s':>8} {'GB/s':>7}"
    )
    write(f"{'':<40} {'':<13} {'':>9} {'':>10} {'(min)':>8} {'(min)':>8} {'(median)':>8}")
    nan = float("nan")
    for r in _rows:
        t, tmin, d = r["median_s"], r["min_s"], dense.get(r["group"])
        r.update(
            x_dense_min=tmin / d["min_s"] if d else nan,
            x_floor_min=tmin / (d["min_s"] * r["floor_factor"]) if d else nan,
            x_floor_median=t / (d["median_s"] * r["floor_factor"]) if d else nan,
            gflops=r["flops"] / t / 1e9,
            gbps=r["bytes"] / t / 1e9,
        )
        write(
            f"{r['group']:<40} {r['impl']:<13} {tmin * 1e6:>9.1f} {t * 1e6:>10.1f} {r['x_dense_min']:>8.2f} "
            f"{r['x_floor_min']:>8.2f} {r['x_floor_median']:>8.2f} {r['gflops']:>8.1f} {r['gbps']:>7.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "op_cpu.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["machine", "threads", "torch", *_rows[0].keys()])
        writer.writeheader()
        for r in _rows:
            writer.writerow(
                {
                    "machine": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    **r,
                }
            )
    write(f"written to {path}")
