"""Where a FlexiGPT model's decode time goes inside vLLM, layer by layer, against the dense model.

    python python/profile_vllm.py                       # batch 8, the default model at 0.3
    python python/profile_vllm.py --batch 1 --out benchmarks/results

Opens the dense SmolLM2 and the default FlexiGPT model (output norms, base_gemm=engine) in vLLM,
times every decoder layer and its modules (attention, linears, norms, MLP) in the engine
process over the decode steps of interleaved greedy generations
(flexigpt_kernels.integrations.vllm.profile), and prints, per module, the median time per step
in both models. What `serve_vllm.py --bench` cannot resolve on a
noisy machine (a few percent of a step) shows here as the replacement blocks' excess over the
same blocks of the dense model: their adapters, output norm and Python.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from serve_vllm import PROMPTS, loadavg, open_engine, write_dense_and_default


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratio", type=float, default=0.3, help="pruning ratio of the default model")
    p.add_argument("--batch", type=int, default=8, help="prompts decoded together (1..8)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved generations per model")
    p.add_argument("--out", help="directory for vllm_profile_cpu.md")
    args = p.parse_args(argv)
    if not 1 <= args.batch <= len(PROMPTS):
        p.error(f"--batch must be in 1..{len(PROMPTS)}, got {args.batch}")
    return args


def medians(samples: dict[str, dict[int, list[int]]], rows: int) -> dict[str, float]:
    """{module: median us per call} over the calls with `rows` token rows (the decode steps)."""
    return {name: statistics.median(by[rows]) / 1e3 for name, by in samples.items() if by.get(rows)}


def profile(args) -> tuple[dict[str, float], dict[str, float], list[int]]:
    from vllm import SamplingParams

    from flexigpt_kernels.integrations.vllm.profile import install_timers, read_timers

    work = Path(tempfile.mkdtemp(prefix="profile_vllm_"))
    report, _ = write_dense_and_default(work, args.ratio)
    engines = [open_engine(work / "dense", "float32"), open_engine(work / "flexigpt", "float32")]
    try:
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        for engine in engines:  # warm-up, then the timers
            engine.generate(PROMPTS[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
            engine.apply_model(install_timers)
        for _ in range(args.rounds):
            for engine in engines:
                engine.generate(PROMPTS[: args.batch], params, use_tqdm=False)
        dense_us, flex_us = (medians(engine.apply_model(read_timers)[0], args.batch) for engine in engines)
    finally:
        for engine in engines:
            engine.llm_engine.engine_core.shutdown()
    return dense_us, flex_us, sorted(report.pruned)


def summarize(dense: dict[str, float], flex: dict[str, float], replaced: list[int]) -> list[str]:
    """Markdown lines: the layers' sums, the replacement blocks' excess and its split by linear."""
    layers = sorted((n for n in dense if n.count(".") == 2), key=lambda n: int(n.rsplit(".", 1)[1]))
    blocks = {int(n.rsplit(".", 1)[1]): n for n in layers}
    dense_sum, flex_sum = sum(dense[n] for n in layers), sum(flex[n] for n in layers)
    kept = [i for i in blocks if i not in replaced]
    kept_excess = statistics.mean(flex[blocks[i]] - dense[blocks[i]] for i in kept)
    repl_excess = [flex[blocks[i]] - dense[blocks[i]] for i in replaced]
    lines = [
        f"decoder layers per decode step: dense {dense_sum:.0f} us, FlexiGPT {flex_sum:.0f} us "
        f"(x {flex_sum / dense_sum:.3f}; the dense model over FlexiGPT: {dense_sum / flex_sum:.3f})",
        f"replacement blocks ({len(replaced)}): {statistics.mean(repl_excess):.0f} us more than the same "
        f"dense block each (min {min(repl_excess):.0f}, max {max(repl_excess):.0f}); kept blocks "
        f"{kept_excess:+.0f} us (the two engines' own difference)",
        "",
        "| module of a replacement block | dense us | FlexiGPT us | excess us |",
        "|---|---:|---:|---:|",
    ]
    inner = sorted({n.split(".", 3)[3] for n in flex if n.count(".") >= 3})
    for suffix in inner:
        names = [f"model.layers.{i}.{suffix}" for i in replaced]
        names = [n for n in names if n in dense and n in flex]
        if names:
            d = statistics.mean(dense[n] for n in names)
            f = statistics.mean(flex[n] for n in names)
            lines.append(f"| {suffix} | {d:.1f} | {f:.1f} | {f - d:+.1f} |")
    in_linears = sum(
        flex[n] - dense[n] for n in flex if n.endswith("_proj") and n in dense and int(n.split(".")[2]) in replaced
    ) / len(replaced)
    predicted = dense_sum / (dense_sum + len(replaced) * in_linears)
    lines.append(
        f"\nper replacement block: {in_linears:.0f} us of the excess inside its linear layers, "
        f"{statistics.mean(repl_excess) - in_linears:.0f} us outside them (where the two models run the "
        f"same code: the engines' own difference, cache effects). From the linear layers' excess alone, "
        f"the dense model's layer time over FlexiGPT's: {predicted:.3f}"
    )
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model's results
    before = loadavg()
    dense, flex, replaced = profile(args)
    header = (
        f"`python python/profile_vllm.py --batch {args.batch} --rounds {args.rounds}` (SmolLM2-135M, "
        f"FlexiGPT {args.ratio} with output norms, base_gemm=engine; median over the decode steps; "
        f"load average before {before}, after {loadavg()})"
    )
    lines = [header, "", *summarize(dense, flex, replaced)]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vllm_profile_cpu.md").write_text("# vLLM decode step by layer\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":  # vLLM starts its engine in a new process: keep the guard
    main()
