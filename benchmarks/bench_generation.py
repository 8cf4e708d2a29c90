"""Plain vs self-speculative decoding on the embedded SmolLM2-135M, pruned FlexiGPT-style at init.

    python benchmarks/bench_generation.py [--ratio 0.3] [--new-tokens 64] [--ks 2 4 6] [--repeats 3]
                                          [--device cpu|cuda] [--threads N] [--out CSV]

What it measures (greedy decoding, batch 1, EOS ignored so every run makes --new-tokens tokens):

- hf_generate: Hugging Face's model.generate() on the pruned model (reference point);
- plain: flexigpt_kernels.generate(self_speculative=False), the full model step by step;
- self_speculative k: drafts of k tokens by the model minus its replacement blocks, verified by
  the full model in one forward, for each k of --ks;
- draft_alone: the draft model decoding by itself (the ShortGPT "drop" model): an upper bound on
  what drafting can gain, not a valid output of the pruned model.

Each prompt is the start of a held-out news article (--prompt-tokens tokens). A round runs every
method once per prompt (all methods on a prompt before the next prompt, in rotating order, so
that load from other processes hits them alike); tokens/s = new tokens / wall time over all
prompts of a round, prefill included. The table reports the median and the best round, and the
speedup over plain decoding as the median of per-round ratios (paired: slow drifts of the load
cancel). Self-speculative rows also check that their tokens equal plain decoding's.

Step costs (printed, and in the CSV as rows of method "step"): the median time of one full-model
decode step, one draft step, and one full-model verify forward of k + 1 tokens, after a prefill.
Self-speculative decoding pays k draft steps plus one verify per round and gains up to k + 1
tokens, so these ratios bound its speedup: on a CPU the verify of k + 1 tokens costs well over
one step, on a GPU about one step. Rows go to --out (CSV, appended; default
benchmarks/results/generation_<device>.csv) with versions, date and device.

The model is pruned at initialisation (no recovery training): gamma starts at 1e-2, so the
replacement blocks change the hidden states little and the draft agrees with the full model
often. A healed model's replacement blocks matter more, and its acceptance rate will be lower.
On a busy CPU, set OMP_WAIT_POLICY=PASSIVE (or --threads 1): spinning OpenMP threads otherwise
dominate the timings.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from flexigpt_kernels.bench.env import device_name, synchronize

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of blocks pruned (default 0.3)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank (default: prune()'s, 36 at width 576)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration chunks for Block Influence")
    p.add_argument("--calib-len", type=int, default=128, help="calibration chunk length")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6], help="draft lengths")
    p.add_argument("--prompts", type=int, default=3, help="number of prompts")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--static-cache", action="store_true", help="preallocated KV caches")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def build(args, device):
    from flexigpt_kernels.assets import default_texts, load_default_model
    from flexigpt_kernels.convert.calibration import token_batches
    from flexigpt_kernels.convert.prune import prune

    model, tokenizer = load_default_model()
    calib = token_batches(
        default_texts("calibration"), tokenizer, seq_len=args.calib_len, num_samples=args.calib_samples
    )
    t = time.perf_counter()
    model, report = prune(model, calib, ratio=args.ratio, rank=args.rank, progress=False)
    prune_s = time.perf_counter() - t
    model.to(device)
    prompts = []
    for article in default_texts("heldout"):
        ids = tokenizer(article, return_tensors="pt").input_ids[:, : args.prompt_tokens]
        if ids.shape[1] == args.prompt_tokens:
            prompts.append(ids.to(device))
        if len(prompts) == args.prompts:
            break
    return model, tokenizer, report, prune_s, prompts


def step_costs(model, skipped, ids, ks, device, reps: int = 7) -> dict[str, float]:
    """Median ms of: a full decode step, a draft step, a full verify of k + 1 tokens (each k)."""
    from flexigpt_kernels.generation import make_cache, skip_blocks
    from flexigpt_kernels.generation.speculative import _Forward

    forward = _Forward(model)
    n = ids.shape[1] - 8
    full, draft = make_cache(model), make_cache(model, skipped)
    times: dict[str, list[float]] = {"full step": [], "draft step": [], **{f"verify {k + 1}": [] for k in ks}}
    with torch.no_grad():
        forward(ids[:, :n], full, 0, keep=1)
        with skip_blocks(model, skipped):
            forward(ids[:, :n], draft, 0, keep=1)
        for _ in range(reps):
            for name in times:
                width = 1 if "step" in name else int(name.split()[1])
                cache = draft if name == "draft step" else full
                with skip_blocks(model, skipped if name == "draft step" else []):
                    synchronize(device)
                    t = time.perf_counter()
                    forward(ids[:, n : n + width], cache, n, keep=1 if width == 1 else 0)
                    synchronize(device)
                    times[name].append(time.perf_counter() - t)
                cache.crop(-width)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import transformers

    from flexigpt_kernels.generation import draft_positions, generate, skip_blocks

    model, tokenizer, report, prune_s, prompts = build(args, device)
    skipped = draft_positions(model)
    n = args.new_tokens
    print(
        f"pruned {report.pruned} (bases {report.base_map}, rank {report.rank}) in {prune_s:.1f} s; "
        f"{len(prompts)} prompts x {n} new tokens",
        flush=True,
    )

    def hf(ids):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        return out, None

    def ours(ids, **kw):
        return generate(
            model, ids, max_new_tokens=n, eos_token_id=[], return_stats=True, static_cache=args.static_cache, **kw
        )

    def draft_alone(ids):
        with skip_blocks(model, skipped):
            return generate(
                model,
                ids,
                max_new_tokens=n,
                eos_token_id=[],
                self_speculative=False,
                return_stats=True,
                static_cache=args.static_cache,
            )

    methods = {"hf_generate": hf, "plain": lambda ids: ours(ids, self_speculative=False)}
    for k in args.ks:
        methods[f"self_speculative k={k}"] = lambda ids, k=k: ours(ids, draft_tokens=k)
    methods["draft_alone"] = draft_alone

    step_ms = step_costs(model, skipped, prompts[0], args.ks, device)
    print("step costs (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in step_ms.items()), flush=True)

    # warm up every path once (allocator, first-call overheads)
    for fn in methods.values():
        fn(prompts[0][:, :8])
    names = list(methods)
    seconds = {m: [] for m in names}  # per round: wall time over all prompts
    accepted = {m: [0, 0, 0] for m in names}  # accepted, drafted, rounds (first round)
    outputs: dict[str, list] = {m: [] for m in names}
    for r in range(args.repeats):
        for m in names:
            seconds[m].append(0.0)
        # finely interleaved: every method runs on a prompt before the next prompt, in an order
        # that rotates, so that load from other processes hits all methods alike
        for p_i, ids in enumerate(prompts):
            shift = (r * len(prompts) + p_i) % len(names)
            for m in names[shift:] + names[:shift]:
                synchronize(device)
                t = time.perf_counter()
                out, stats = methods[m](ids)
                synchronize(device)
                seconds[m][-1] += time.perf_counter() - t
                if r == 0:
                    outputs[m].append(out[0, ids.shape[1] :].tolist())
                    if stats is not None:
                        accepted[m][0] += stats.accepted
                        accepted[m][1] += stats.drafted
                        accepted[m][2] += stats.rounds
        print(
            f"round {r + 1}/{args.repeats} tokens/s: "
            + ", ".join(f"{m} {len(prompts) * n / seconds[m][-1]:.2f}" for m in names),
            flush=True,
        )

    now = dt.datetime.now(dt.timezone.utc)
    meta = {
        "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
        "model": "SmolLM2-135M-Instruct (embedded default), fp32",
        "ratio": args.ratio,
        "pruned_blocks": " ".join(map(str, report.pruned)),
        "rank": report.rank,
        "healed": "no (at init, gamma 1e-2)",
        "static_cache": args.static_cache,
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": n,
        "repeats": args.repeats,
    }
    rows = []
    for m in names:
        med = statistics.median(seconds[m])
        tps = len(prompts) * n / med
        acc, drafted, rounds = accepted[m]
        spec = m.startswith("self_speculative")
        rows.append(
            {
                **meta,
                "method": m.split(" ")[0],
                "draft_tokens": m.split("=")[1] if spec else "",
                "tokens_per_s": f"{tps:.3f}",
                "tokens_per_s_best": f"{len(prompts) * n / min(seconds[m]):.3f}",
                # paired per round (same load conditions), median over rounds
                "speedup_vs_plain": f"{statistics.median(p / t for p, t in zip(seconds['plain'], seconds[m])):.3f}",
                "acceptance_rate": f"{acc / drafted:.3f}" if drafted else "",
                "tokens_per_round": f"{len(prompts) * n / rounds:.2f}" if spec and rounds else "",
                "same_tokens_as_plain": (outputs[m] == outputs["plain"])
                if m != "draft_alone"
                else "n/a (different model)",
            }
        )

    for name, ms in step_ms.items():
        rows.append(
            {
                **meta,
                "method": "step",
                "draft_tokens": name.split()[1] if "verify" in name else "",
                "step": name,
                "tokens_per_s": "",
                "tokens_per_s_best": "",
                "speedup_vs_plain": "",
                "acceptance_rate": "",
                "tokens_per_round": "",
                "same_tokens_as_plain": "",
                "step_ms": f"{ms:.2f}",
                "step_x_full_step": f"{ms / step_ms['full step']:.3f}",
            }
        )
    for row in rows:
        row.setdefault("step", "")
        row.setdefault("step_ms", "")
        row.setdefault("step_x_full_step", "")

    out = args.out or RESULTS / f"generation_{device.type}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out.exists() or out.stat().st_size == 0
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)

    print(
        f"\n{meta['device_name']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"load {meta['loadavg_1m']}, {meta['date']}"
    )
    print("| method | k | tokens/s (median) | best | vs plain | acceptance | tokens/round | same tokens as plain |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["method"] == "step":
            continue
        print(
            f"| {row['method']} | {row['draft_tokens']} | {row['tokens_per_s']} | {row['tokens_per_s_best']} | "
            f"{row['speedup_vs_plain']} | {row['acceptance_rate']} | {row['tokens_per_round']} | "
            f"{row['same_tokens_as_plain']} |"
        )
    print("\n| step | median ms | x full step |\n|---|---|---|")
    for name, ms in step_ms.items():
        print(f"| {name} | {ms:.1f} | {ms / step_ms['full step']:.2f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
