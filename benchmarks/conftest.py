"""Shared setup of the microbenchmarks: 2 CPU threads, and a summary at the end of the run
(time per implementation, ratio to the dense F.linear floor, GFLOP/s and GB/s by the
formulas in README.md) printed and written to benchmarks/results/op_cpu.csv."""

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
    """record(benchmark, group=..., impl=..., flops=..., bytes_moved=...) after a benchmark ran."""

    def _record(benchmark, *, group: str, impl: str, flops: float, bytes_moved: float) -> None:
        benchmark.extra_info.update(flops=flops, bytes=bytes_moved)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once as a test, nothing timed
            return
        _rows.append({"group": group, "impl": impl, "mean_s": stats.stats.mean, "min_s": stats.stats.min,
                      "median_s": stats.stats.median, "rounds": stats.stats.rounds,
                      "flops": flops, "bytes": bytes_moved})

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    floor = {r["group"]: r["median_s"] for r in _rows if r["impl"] == "dense-F.linear"}
    write = terminalreporter.write_line
    floor_min = {r["group"]: r["min_s"] for r in _rows if r["impl"] == "dense-F.linear"}
    terminalreporter.section("throughput (GFLOP/s and GB/s from the median, by the formulas in README.md)")
    write(f"{'group':<42} {'impl':<15} {'min us':>9} {'median us':>10} {'x dense':>8} {'x dense':>8} "
          f"{'GFLOP/s':>8} {'GB/s':>7}")
    write(f"{'':<42} {'':<15} {'':>9} {'':>10} {'(min)':>8} {'(median)':>8}")
    for r in _rows:
        t, tmin, g = r["median_s"], r["min_s"], r["group"]
        ratio = t / floor[g] if g in floor else float("nan")
        ratio_min = tmin / floor_min[g] if g in floor_min else float("nan")
        r.update(x_dense_min=ratio_min, x_dense_median=ratio, gflops=r["flops"] / t / 1e9, gbps=r["bytes"] / t / 1e9)
        write(f"{g:<42} {r['impl']:<15} {tmin * 1e6:>9.1f} {t * 1e6:>10.1f} {ratio_min:>8.2f} {ratio:>8.2f} "
              f"{r['gflops']:>8.1f} {r['gbps']:>7.2f}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "op_cpu.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["machine", "threads", "torch", *_rows[0].keys()])
        writer.writeheader()
        for r in _rows:
            writer.writerow({"machine": platform.processor() or platform.machine(),
                             "threads": torch.get_num_threads(), "torch": torch.__version__, **r})
    write(f"written to {path}")
