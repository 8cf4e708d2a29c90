"""Timing: triton.testing.do_bench on CUDA, torch.utils.benchmark.Timer on the CPU (or, with one
thread, the thread's CPU time: time_cpu_interleaved(thread_time=True)).

Both report the minimum and the median over rounds (one round = the mean of a block of
calls). On a shared CPU the minimum is the better estimate of what the code costs; the
median says how noisy the machine was.

CPU: the implementations of one shape are timed *interleaved*: every round runs one block of
each (in rotating order), so a burst of load from other processes hits all of them alike
instead of skewing whichever was being timed alone. Block sizes follow blocked_autorange's
idea (enough calls per block to dwarf the timer's overhead); a shape whose single call takes
longer than the budget allows gets the minimum number of rounds (default 3), one call each.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    min_s: float
    median_s: float
    rounds: int
    calls_per_round: int
    timer: str  # how it was measured


def _calls_per_block(fns: dict[str, Callable[[], object]], block_s: float, clock, warmup: int) -> dict[str, int]:
    """{name: calls per timed block}: warm up, then estimate one call's cost on `clock` (the
    least of a few: load spikes) and fit about block_s seconds of calls in a block."""
    number = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        costs = []
        while len(costs) < 3 and sum(costs) < block_s:
            t0 = clock()
            fn()
            costs.append(clock() - t0)
        number[name] = max(1, int(block_s / max(min(costs), 1e-7)))
    return number


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]],
    budget_s: float = 1.0,
    *,
    min_rounds: int = 3,
    max_rounds: int = 200,
    block_s: float = 0.005,
    warmup: int = 1,
    thread_time: bool = False,
) -> dict[str, Timing]:
    """Time every callable of `fns` in interleaved rounds within about `budget_s` seconds in all
    (never fewer than `min_rounds` rounds). Returns {name: Timing}.

    thread_time=True: in the calling thread's CPU time (time.thread_time_ns) instead of wall
    clock: the time it was preempted by other processes is not counted, so on a loaded machine
    the minima stay put where wall-clock ones swing by 2x. Only meaningful with
    torch.get_num_threads() == 1 (work done by other threads is not seen): refused otherwise."""
    from torch.utils.benchmark import Timer

    names = list(fns)
    threads = torch.get_num_threads()
    if thread_time and threads != 1:
        raise ValueError(f"thread CPU time needs torch.get_num_threads() == 1, got {threads}")
    timers = {name: Timer(stmt="fn()", globals={"fn": fns[name]}, num_threads=threads) for name in names}

    def block(name: str, n: int) -> float:  # seconds per call
        if not thread_time:
            return timers[name].timeit(n).mean
        fn, t0 = fns[name], time.thread_time_ns()
        for _ in range(n):
            fn()
        return (time.thread_time_ns() - t0) / 1e9 / n

    number = _calls_per_block(fns, block_s, time.thread_time if thread_time else time.perf_counter, warmup)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start, i = time.perf_counter(), 0
    while i < max_rounds and (i < min_rounds or time.perf_counter() - start < budget_s):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            samples[name].append(block(name, number[name]))
        i += 1
    timer = "thread CPU time interleaved" if thread_time else "torch.utils.benchmark interleaved"
    return {name: Timing(min(v), statistics.median(v), i, number[name], timer) for name, v in samples.items()}


def time_cuda(
    fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100, cuda_graph: bool = False
) -> Timing:
    """triton.testing.do_bench (L2 flushed between calls); with cuda_graph=True,
    do_bench_cudagraph (launch overhead removed; falls back to do_bench if capture fails)."""
    import triton.testing

    if cuda_graph:
        try:
            times = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="all")
            return _from_ms(times, "triton do_bench_cudagraph")
        except Exception as exc:  # capture can fail for code that syncs or allocates oddly
            torch.cuda.synchronize()
            print(f"  (CUDA graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)")
    times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    return _from_ms(times, "triton do_bench")


def _from_ms(times, timer: str) -> Timing:
    times = [float(t) for t in (times if isinstance(times, (list, tuple)) else [times])]
    return Timing(min(times) / 1e3, statistics.median(times) / 1e3, len(times), 1, timer)


def time_cuda_each(fns: dict[str, Callable[[], object]], **kwargs) -> dict[str, Timing]:
    return {name: time_cuda(fn, **kwargs) for name, fn in fns.items()}
