"""Where the pruned model's prefill time above the dense model's goes: per ATen / flexigpt op,
the *thread CPU time* of a 1 x SEQ prefill of the dense and the FlexiGPT model (SmolLM2-135M
pruned at 0.3 as `flexigpt bench model --quick` builds it: nearest bases, rank 36), 1 thread,
fp32, models interleaved, least over the rounds per op.

Each top-level op call (a TorchDispatchMode sees the calls the model makes, not those inside
an op's kernel) is timed with time.thread_time_ns, which excludes preemption: robust on a
shared machine where wall-clock times are not. Also prints the whole forward's thread time
(no mode) and the FLOP floor. Usage:

    OMP_NUM_THREADS=1 python benchmarks/prefill_op_profile.py [--seq-len 512] [--rounds 3] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ThreadTimer(TorchDispatchMode):
    """{op name: thread CPU ns} and {op name: calls} of the ops dispatched under it."""

    by_shape = ("linear", "shared_lora_linear_fwd", "mm", "addmm")

    def __init__(self):
        super().__init__()
        self.ns = collections.Counter()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time_ns()
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        if name in self.by_shape:  # the GEMM-like ops, split by (M, K) x (N, K)
            name += " " + "x".join(str(list(a.shape)) for a in args[:2])
        self.ns[name] += time.thread_time_ns() - t0
        self.calls[name] += 1
        return out


def main() -> None:
    from flexigpt_kernels.bench.model_convert import ModelBenchConfig, convert_copy, load_source
    from flexigpt_kernels.bench.model_flops import count_flops, floor_ratios

    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dense, tok, source = load_source(None, None, torch.device("cpu"), torch.float32)
    flex, conv = convert_copy(dense, ModelBenchConfig(quick=True, bases="nearest"), tok, lambda m: None)
    models = {"dense": dense, "flexigpt": flex}
    floors = floor_ratios({k: count_flops(m) for k, m in models.items()}, args.seq_len, 32)
    ids = torch.randint(0, dense.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(1234))
    kw = dict(input_ids=ids, use_cache=True, logits_to_keep=1)
    whole = {k: float("inf") for k in models}
    per_op = {k: {} for k in models}
    calls = {}
    with torch.inference_mode():
        for m in models.values():
            m(**kw)
        for _ in range(args.rounds):
            for k, m in models.items():
                t0 = time.thread_time_ns()
                m(**kw)
                whole[k] = min(whole[k], (time.thread_time_ns() - t0) / 1e6)
                with ThreadTimer() as timer:
                    m(**kw)
                for op, ns in timer.ns.items():
                    per_op[k][op] = min(per_op[k].get(op, float("inf")), ns / 1e6)
                calls[k] = timer.calls
    print(f"{source}: pruned blocks {conv.pruned}, rank {conv.rank}; prefill 1x{args.seq_len}, 1 thread, fp32")
    print(
        f"whole forward, thread ms (least of {args.rounds}): dense {whole['dense']:.1f}, flexigpt "
        f"{whole['flexigpt']:.1f}, ratio {whole['flexigpt'] / whole['dense']:.3f} "
        f"(FLOP floor {floors['flexigpt']['prefill']:.3f})"
    )
    ops = sorted(
        set(per_op["dense"]) | set(per_op["flexigpt"]),
        key=lambda o: -max(per_op["dense"].get(o, 0), per_op["flexigpt"].get(o, 0)),
    )
    tot = {k: sum(v.values()) for k, v in per_op.items()}
    print(f"sum over ops, thread ms: dense {tot['dense']:.1f}, flexigpt {tot['flexigpt']:.1f}")
    print(f"{'op':60s} {'dense ms':>9s} {'calls':>6s} {'flex ms':>9s} {'calls':>6s} {'flex-dense':>10s}")
    for op in ops[: args.top]:
        d, f = per_op["dense"].get(op, 0.0), per_op["flexigpt"].get(op, 0.0)
        print(
            f"{op:60s} {d:9.2f} {calls['dense'].get(op, 0):6d} {f:9.2f} {calls['flexigpt'].get(op, 0):6d} {f - d:10.2f}"
        )


if __name__ == "__main__":
    main()
