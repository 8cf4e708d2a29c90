"""Serve a FlexiGPT-pruned model natively with vLLM (needs `pip install "flexigpt-kernels[vllm]"`).

    python python/serve_vllm.py                          # prune the embedded SmolLM2 at 0.3, generate
    python python/serve_vllm.py --checkpoint DIR         # any directory written by fk.save_pretrained
    python python/serve_vllm.py --bench --out benchmarks/results   # the throughput table of the README
    python python/serve_vllm.py --tensor-parallel-size 2  # the same over 2 ranks; prints each rank's weights

A directory written by `flexigpt_kernels.save_pretrained` names `FlexiGPTLlamaForCausalLM`
(or the Mistral / Qwen2 variant) in its config.json; the `vllm.general_plugins` entry point of
this package registers that class, so `vllm.LLM(model=DIR)` and `vllm serve DIR` load it as it
is: the shared weights once, each replacement block's adapters and output norms, our op.

--bench measures vLLM's greedy decoding throughput (tokens/s; batch 1 and 8 prompts, 64 new
tokens each, fp32, eager; every engine open at once and timed in interleaved rounds) for the
dense SmolLM2, the dense export of a FlexiGPT model converted
without output norms (export_dense refuses output norms), the same FlexiGPT model served
natively, and the default FlexiGPT model (with output norms) served natively with each way of
getting the shared base product (FLEXIGPT_VLLM_BASE_GEMM: "engine", the base layer's own GEMM,
the default; "op", our op on the plain weight), plus the weight bytes of each checkpoint and,
for the native models, the bytes vLLM holds, and each row's tokens/s relative to the dense
model's in the same run.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The history of the Roman Empire",
    "Photosynthesis is the process by which",
    "The capital of France is",
    "In mathematics, a prime number",
    "Once upon a time, in a small village,",
    "The theory of relativity states that",
    "Water boils at",
    "The best way to learn a language is",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        help="a directory written by flexigpt_kernels.save_pretrained "
        "(default: prune the embedded SmolLM2-135M into a temporary directory)",
    )
    p.add_argument("--ratio", type=float, default=0.3, help="pruning ratio for the default model")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", help="vLLM dtype (float32, bfloat16 on CPUs with AVX512-BF16)")
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="vLLM ranks sharing each layer (generation only); prints the weight MB each rank holds",
    )
    p.add_argument("--bench", action="store_true", help="measure the throughput table instead")
    p.add_argument("--new-tokens", type=int, default=64, help="--bench: tokens generated per prompt")
    p.add_argument("--rounds", type=int, default=3, help="--bench: interleaved timing rounds")
    p.add_argument("--out", help="--bench: directory for vllm_cpu.md and vllm_cpu.csv")
    return p.parse_args(argv)


def prune_default(ratio: float, *, output_norm: bool = True, blocks=None):
    """(model, tokenizer, report) of the embedded SmolLM2 pruned by FlexiGPT (Block Influence
    on the default calibration texts unless `blocks` are given; closed-form gammas when
    output norms are on)."""
    import flexigpt_kernels as fk
    from flexigpt_kernels.assets import default_texts, load_default_model

    model, tokenizer = load_default_model()
    model, report = fk.prune(
        model,
        default_texts(),
        tokenizer=tokenizer,
        ratio=ratio,
        blocks=blocks,
        num_samples=8,
        output_norm=output_norm,
        local_fit="gamma" if output_norm else None,
        progress=False,
    )
    return model, tokenizer, report


def write_dense_and_default(work: Path, ratio: float):
    """Saves the embedded dense SmolLM2 to work/dense and the default FlexiGPT model pruned at
    `ratio` to work/flexigpt; returns (prune report, tokenizer)."""
    import flexigpt_kernels as fk
    from flexigpt_kernels.assets import load_default_model

    dense, tokenizer = load_default_model()
    dense.save_pretrained(work / "dense")
    tokenizer.save_pretrained(work / "dense")
    del dense
    model, _, report = prune_default(ratio)
    fk.save_pretrained(model, work / "flexigpt", tokenizer)
    return report, tokenizer


def llm(path, dtype: str = "float32", **kw):
    from vllm import LLM

    return LLM(model=str(path), dtype=dtype, max_model_len=512, enforce_eager=True, seed=0, **kw)


def generate(path, prompts, max_new_tokens: int, dtype: str, tensor_parallel_size: int = 1):
    """Greedy texts; with tensor_parallel_size > 1 also prints the weight MB each rank holds."""
    from vllm import SamplingParams
    from vllm.platforms import current_platform

    from flexigpt_kernels.integrations.vllm import cpu_threads_binding

    if tensor_parallel_size > 1 and current_platform.is_cpu():
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_binding(tensor_parallel_size))
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model(held_weights)
    engine = llm(path, dtype, tensor_parallel_size=tensor_parallel_size)
    try:
        outs = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0), use_tqdm=False)
        if tensor_parallel_size > 1:
            from flexigpt_kernels.integrations.vllm.model import held_weights

            held = [round(h["bytes"] / 2**20, 1) for h in engine.apply_model(held_weights)]
            print(f"weights held per rank (MB): {held}; checkpoint: {checkpoint_bytes(path) / 2**20:.1f} MB")
        return [o.outputs[0].text for o in outs]
    finally:
        engine.llm_engine.engine_core.shutdown()


def checkpoint_bytes(path) -> int:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


def open_engine(path, dtype: str, base_gemm: str = "engine"):
    """A vLLM engine on `path` whose replacement blocks get their base product the `base_gemm` way
    (read from the environment by the engine process when it builds the model)."""
    from flexigpt_kernels.integrations.vllm.layers import BASE_GEMM_ENV

    previous = os.environ.get(BASE_GEMM_ENV)
    os.environ[BASE_GEMM_ENV] = base_gemm
    try:
        return llm(path, dtype)
    finally:
        if previous is None:
            del os.environ[BASE_GEMM_ENV]
        else:
            os.environ[BASE_GEMM_ENV] = previous


def time_generate(engine, batch: int, new_tokens: int) -> float:
    """Seconds of one greedy generation of `new_tokens` tokens for the first `batch` prompts."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    engine.generate(PROMPTS[:batch], params, use_tqdm=False)
    return time.perf_counter() - start


def bench(args) -> list[dict]:
    """Every model's engine open at once; each round times every engine in turn at batch 1 and 8,
    so that a change of the machine's load hits every model alike. tok/s from each engine's best
    round; x dense: tok/s over the dense row's (and the median over rounds of the same ratio
    taken within each round)."""
    import statistics

    from vllm import SamplingParams

    import flexigpt_kernels as fk
    from flexigpt_kernels.integrations.vllm.model import held_weights

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model(held_weights)
    work = Path(tempfile.mkdtemp(prefix="serve_vllm_"))
    report, tokenizer = write_dense_and_default(work, args.ratio)
    plain, _, _ = prune_default(args.ratio, output_norm=False, blocks=report.pruned)  # the same blocks
    fk.save_pretrained(plain, work / "flexigpt_no_norm", tokenizer)
    fk.export_dense(work / "flexigpt_no_norm", work / "dense_export")
    del plain
    models = (
        ("dense SmolLM2-135M (stock vLLM Llama)", "dense", False, "engine"),
        (f"dense export of FlexiGPT {args.ratio} without output norms (stock vLLM Llama)", "dense_export", False,
         "engine"),
        (f"FlexiGPT {args.ratio} without output norms, native", "flexigpt_no_norm", True, "engine"),
        (f"FlexiGPT {args.ratio} with output norms (default), native", "flexigpt", True, "engine"),
        (f"FlexiGPT {args.ratio} with output norms (default), native, base_gemm=op", "flexigpt", True, "op"),
    )  # fmt: skip
    engines = [open_engine(work / directory, args.dtype, base_gemm) for _, directory, _, base_gemm in models]
    try:
        for engine in engines:  # warm-up
            engine.generate(PROMPTS[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        seconds = {(i, b): [] for i in range(len(models)) for b in (1, 8)}
        for _ in range(args.rounds):
            for batch in (1, 8):
                for i, engine in enumerate(engines):
                    seconds[i, batch].append(time_generate(engine, batch, args.new_tokens))
        rows = []
        for i, (name, directory, native, _) in enumerate(models):
            row = {"model": name}
            for b in (1, 8):
                row[f"tok_s_batch{b}"] = round(b * args.new_tokens / min(seconds[i, b]), 1)
                row[f"x_dense_batch{b}"] = round(min(seconds[0, b]) / min(seconds[i, b]), 3)
                per_round = [d / t for d, t in zip(seconds[0, b], seconds[i, b])]
                row[f"x_dense_batch{b}_median_round"] = round(statistics.median(per_round), 3)
            row["checkpoint_MB"] = round(checkpoint_bytes(work / directory) / 2**20, 1)
            if native:
                row["held_by_vllm_MB"] = round(engines[i].apply_model(held_weights)[0]["bytes"] / 2**20, 1)
            print(row, flush=True)
            rows.append(row)
        return rows
    finally:
        for engine in engines:
            engine.llm_engine.engine_core.shutdown()


def write_results(rows: list[dict], out: str, args) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fields = [
        "model",
        "tok_s_batch1",
        "tok_s_batch8",
        "x_dense_batch1",
        "x_dense_batch8",
        "x_dense_batch1_median_round",
        "x_dense_batch8_median_round",
        "checkpoint_MB",
        "held_by_vllm_MB",
        "loadavg_before",
        "loadavg_after",
    ]
    with open(out / "vllm_cpu.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# vLLM (vllm-cpu 0.32.0) greedy throughput, SmolLM2-135M, {args.dtype}, eager",
        "",
        f"`python python/serve_vllm.py --bench --out {out}`: {args.new_tokens} new tokens per prompt, "
        f"batch 1 and 8 prompts, every engine open at once, {args.rounds} interleaved rounds after a warm-up; "
        "tok/s from each engine's best round; x dense: tok/s over the dense row's (median: of the "
        "ratios within each round). "
        f"Load average (1, 5, 15 min) before the run: {rows[0]['loadavg_before']}, after: "
        f"{rows[0]['loadavg_after']}.",
        "",
        "| model | tok/s batch 1 | tok/s batch 8 | x dense batch 1 (median) | x dense batch 8 (median) "
        "| checkpoint MB | held by vLLM MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['tok_s_batch1']} | {r['tok_s_batch8']} | {r['x_dense_batch1']} "
            f"({r['x_dense_batch1_median_round']}) | {r['x_dense_batch8']} ({r['x_dense_batch8_median_round']}) | "
            f"{r['checkpoint_MB']} | {r.get('held_by_vllm_MB', '')} |"
        )
    (out / "vllm_cpu.md").write_text("\n".join(lines) + "\n")


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (how busy the machine was: numbers are relative)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> None:
    args = parse_args(argv)
    # a fixed KV cache (GiB); without it vLLM's CPU worker reserves 92% of the machine's memory
    # and refuses to start when other processes hold more than 8% of it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.bench:
        before = loadavg()
        rows = bench(args)
        after = loadavg()
        for row in rows:
            row.update(loadavg_before=before, loadavg_after=after)
        if args.out:
            write_results(rows, args.out, args)
        return
    import flexigpt_kernels as fk

    path = args.checkpoint
    if path is None:
        model, tokenizer, _ = prune_default(args.ratio)
        path = fk.save_pretrained(model, Path(tempfile.mkdtemp(prefix="serve_vllm_")) / "flexigpt", tokenizer)
        del model
    print(f"serving {path} with vLLM")
    texts = generate(path, PROMPTS[:3], args.max_new_tokens, args.dtype, args.tensor_parallel_size)
    for prompt, text in zip(PROMPTS[:3], texts):
        print(f"{prompt!r} -> {text!r}")


if __name__ == "__main__":  # vLLM starts its engine in a new process: keep the guard
    main()
