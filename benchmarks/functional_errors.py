"""The functional error table D(i, j) of every block pair of the embedded SmolLM2-135M and what
it chooses (convert/functional_bases.py, convert/recoverable.py), on the calibration tokens
`flexigpt compare` uses (32 x 256 of the Wikipedia sample; D on the first 2 sequences):

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/functional_errors.py [OUT.json]

Prints per block the smallest D and its block, Block Influence, and at ratios 0.5 and 0.4 the
Block-Influence blocks, their functional bases, and the "recoverable" choice; writes
{bi, errors, seconds, "0.5": {...}, "0.4": {...}} to OUT.json
(default benchmarks/results/functional_errors_cpu.json). ~2.5 min on one CPU thread.
"""

from __future__ import annotations

import json
import sys
import time

from flexigpt_kernels.convert.calibration import token_batches
from flexigpt_kernels.convert.importance import block_influence
from flexigpt_kernels.convert.recoverable import least_damage, recoverable_blocks
from flexigpt_kernels.convert.selection import num_blocks_to_prune, select_blocks
from flexigpt_kernels.io.load import load_model, resolve_data


def main(out: str = "benchmarks/results/functional_errors_cpu.json") -> None:
    loaded = load_model("default")
    model, tok = loaded.model.eval(), loaded.tokenizer
    tokens = token_batches(resolve_data(None, "calibration", what="calib"), tok, seq_len=256, num_samples=32)
    t = time.perf_counter()
    bi = block_influence(model, tokens, batch_size=8, progress=False)
    print(f"Block Influence {time.perf_counter() - t:.0f} s")
    ch = recoverable_blocks(model, tokens, bi, ratio=0.5, progress=False)
    errors, n = ch.errors, len(bi)
    print("seconds", ch.seconds)
    print("min D per block", [round(float(errors[i].min()), 3) for i in range(n)])
    print("argmin D per block", [int(errors[i].argmin()) for i in range(n)])
    print("BI", [round(float(b), 4) for b in bi])
    result = {"bi": bi.tolist(), "errors": errors.tolist(), "seconds": ch.seconds}
    for ratio in (0.5, 0.4):
        pruned, _, passes = least_damage(bi, errors, num_blocks_to_prune(ratio, n))
        by_bi = select_blocks(bi, ratio=ratio)
        kept = [b for b in range(n) if b not in by_bi]
        bases = {i: kept[int(errors[i, kept].argmin())] for i in by_bi}
        print(ratio, "BI blocks", by_bi)
        print(ratio, "functional bases", bases, {i: round(float(errors[i, bases[i]]), 3) for i in by_bi})
        print(ratio, "recoverable", pruned, "passes", passes)
        result[str(ratio)] = {"bi_blocks": by_bi, "functional_bases": bases, "recoverable": pruned}
    with open(out, "w") as f:
        json.dump(result, f, default=str)


if __name__ == "__main__":
    main(*sys.argv[1:])
