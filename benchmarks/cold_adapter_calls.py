"""The adapter op calls of one vLLM replacement block at decode sizes, with the adapters' weights
cold (coming from memory, as in a decode step, where the base GEMMs between two calls evict them)
or hot (in cache), against reading the same bytes.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/cold_adapter_calls.py [--rows 1,8] [--hot]

SmolLM2-135M's four calls per replacement block at rank 36, as the vLLM layer makes them (B held
column-major): qkv_proj and gate_up_proj through the stacked delta (3 and 2 parts), o_proj
through it with one part, down_proj through the epilogue op with the output norm. "Cold" cycles
each call over enough copies of its adapters (> 80 MB) that none is in the last-level cache; the
reference "bytes" sums each copy's matrices once (one flat buffer of the same size), which is
what the reads alone cost. Prints us per call and GB/s (wall clock: the point is memory time).
Timing only; numbers and what they say are in benchmarks/results/vllm_cpu.md ("Where the
replacement block's time goes").
"""

from __future__ import annotations

import argparse
import time

import torch

import flexigpt_kernels  # noqa: F401  (loads the ops)
from flexigpt_kernels.ops import library

RANK, HIDDEN, INTER, KV = 36, 576, 1536, 192
#: name -> (input features K, the parts' output widths)
PROJECTIONS = {"qkv": (HIDDEN, [HIDDEN, KV, KV]), "o": (HIDDEN, [HIDDEN]), "gate_up": (HIDDEN, [INTER, INTER]),
               "down": (INTER, [HIDDEN])}  # fmt: skip
COLD_BYTES = 80e6


def adapters(k: int, widths: list[int], copies: int):
    """[(A parts as row views of one buffer, B parts column-major, a flat buffer of the same size)]."""
    out = []
    for _ in range(copies):
        a = torch.randn(RANK * len(widths), k)
        bs = [torch.randn(RANK, n).t() for n in widths]
        out.append((list(a.split(RANK)), bs, torch.randn(a.numel() + RANK * sum(widths))))
    return out


def calls(name: str, m: int, hot: bool):
    """(op calls, byte reads): two lists of zero-argument callables over the copies."""
    k, widths = PROJECTIONS[name]
    size = 4 * RANK * (len(widths) * k + sum(widths))
    sets = adapters(k, widths, 1 if hot else int(COLD_BYTES / size) + 1)
    x, y = torch.randn(m, k), torch.randn(m, sum(widths))
    if name == "down":
        epilogue, norm = library.op("shared_lora_linear_epilogue_fwd"), torch.ones(sum(widths))
        ops = [lambda a=a, b=b: epilogue(y, x, a[0], b[0], 0.5, None, norm, 1e-5, None, False) for a, b, _ in sets]
    else:
        delta, scales = library.op("shared_lora_linear_stacked_delta_"), [0.5] * len(widths)
        ops = [lambda a=a, b=b: delta(y, x, a, b, scales, None) for a, b, _ in sets]
    return ops, [flat.sum for _, _, flat in sets], size


def best_us(fns, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for fn in fns:
            fn()
        best = min(best, (time.perf_counter() - start) / len(fns) * 1e6)
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8", help="decode batch sizes M, comma-separated")
    p.add_argument("--hot", action="store_true", help="one copy of each adapter set: in cache")
    args = p.parse_args(argv)
    print(f"threads {torch.get_num_threads()}, {'hot' if args.hot else 'cold'} adapters, us per call (GB/s)")
    for m in (int(v) for v in args.rows.split(",")):
        total_op = total_bytes = 0.0
        cells = []
        for name in PROJECTIONS:
            ops, reads, size = calls(name, m, args.hot)
            op_us, read_us = best_us(ops), best_us(reads)
            total_op, total_bytes = total_op + op_us, total_bytes + read_us
            cells.append(f"{name} {op_us:.1f} ({size / op_us / 1e3:.1f}) vs bytes {read_us:.1f}")
        print(f"M = {m}: " + "; ".join(cells) + f"; block total {total_op:.1f} vs bytes {total_bytes:.1f}")


if __name__ == "__main__":
    main()
