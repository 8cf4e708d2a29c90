"""Two timing steps of benchmarks/gpu_suite.sh that `bench kernels` / `bench model` do not cover:

    python -m flexigpt_kernels.bench.suite_steps stacked --device cuda --out DIR --cuda-graphs
        the multi-slice op (shared_lora_linear_stacked) vs one call per part vs dense
        (bench/stacked.py), decode rows (M <= 32) timed inside CUDA graphs
    python -m flexigpt_kernels.bench.suite_steps decode-graph --device cuda --out DIR
        one whole-model decode step (M = 1 token per sequence, a static KV cache after a
        prompt) of the pruned model vs the dense model, each captured in one CUDA graph

Decode step: `prompt_len` random tokens are prefilled into a transformers StaticCache of
prompt_len + 1 positions; the step is one forward of the next token at position prompt_len with
static input tensors (same shapes and addresses every call; the cache's device-side length is
rewound in-step, so each call and replay rewrites the same cache slot), so it can be captured
with torch.cuda.graph and replayed. A capture that fails (a host sync or a data-dependent
allocation somewhere in the forward) is reported and that model is timed eagerly. The
captured output is checked against an eager call of the same step.
On the CPU (the suite's smoke mode) the same step runs eagerly, without capture, and says so.
Rows are appended to OUT/stacked_<device>.csv and OUT/decode_graph_<device>.csv.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..generation.draft import cache_argument, make_cache
from .env import device_slug, resolve_device, run_metadata
from .model import ModelBenchConfig, build_random_model, convert_copy
from .results import append_csv
from .timing import Timing, time_cpu_interleaved, time_cuda


def random_prompt(model: torch.nn.Module, batch: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """[batch, prompt_len] random token ids on the model's device."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g)
    return ids.to(next(model.parameters()).device)


def static_decode_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable:
    """Prefill `ids` [batch, prompt_len] into a StaticCache of prompt_len + 1 positions; return
    step(): the logits [batch, 1, vocab] of the greedy next token at position prompt_len."""
    batch, prompt_len = ids.shape
    device = ids.device
    cache = make_cache(model, max_cache_len=prompt_len + 1)
    kw = {cache_argument(model): cache}
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw).logits
    token = logits[:, -1:].argmax(-1)  # [batch, 1]: static input of every step
    position = torch.full((batch, 1), prompt_len, device=device)
    lengths = [layer.cumulative_length for layer in cache.layers if torch.is_tensor(layer.cumulative_length)]
    if len(lengths) != len(cache.layers):
        raise RuntimeError("the static cache did not initialize every layer during the prefill")

    def step():
        for n in lengths:  # rewind: every call (and replay) writes the same slot, prompt_len
            n.fill_(prompt_len)
        with torch.no_grad():
            return model(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1, **kw).logits

    return step


def capture(step: Callable) -> tuple[Callable, torch.Tensor]:
    """(replay, static output) of `step` captured in a torch.cuda.CUDAGraph, after a warm-up on a
    side stream (lazy allocations, Triton compilation, cuBLAS workspaces happen outside capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph.replay, out


def _graph_or_eager(name: str, step: Callable) -> tuple[Callable, str]:
    """The CUDA-graph replay of `step` if it captures and agrees with eager, else `step` itself."""
    try:
        replay, out = capture(step)
    except Exception as exc:  # a host sync or a data-dependent allocation inside the forward
        torch.cuda.synchronize()
        print(f"  {name}: CUDA graph capture failed ({type(exc).__name__}: {exc}); timing eagerly")
        return step, "eager (capture failed)"
    replay()
    eager = step()
    err = (out.float() - eager.float()).abs().max().item()
    scale = max(1.0, eager.float().abs().max().item())
    if err > 2e-2 * scale:
        raise AssertionError(f"{name}: the CUDA-graph replay differs from eager by {err:.3e}")
    print(f"  {name}: captured in a CUDA graph (replay vs eager max |diff| {err:.2e})")
    return replay, "cuda graph"


def run_decode_graph(
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    preset: str = "llama2-7b",
    blocks: Sequence[int] | None = None,
    rank: int | None = None,
    batch: int = 1,
    prompt_len: int = 512,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    budget_s: float = 1.0,
) -> list[dict]:
    """Time one decode step of the dense random `preset` model and of its FlexiGPT conversion
    (`blocks` replaced at `rank`, each sharing the nearest kept block); returns the rows."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dense = build_random_model(preset, device, dtype)
    cfg = ModelBenchConfig(random=preset, blocks=list(blocks) if blocks else None, rank=rank, bases="nearest")
    flex, conv = convert_copy(dense, cfg, None)
    steps = {
        "dense": static_decode_step(dense, random_prompt(dense, batch, prompt_len)),
        "flexigpt": static_decode_step(flex, random_prompt(flex, batch, prompt_len)),
    }
    timings: dict[str, Timing] = {}
    how: dict[str, str] = {}
    if device.type == "cuda":
        for name, step in steps.items():
            fn, how[name] = _graph_or_eager(name, step)
            timings[name] = time_cuda(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    else:
        print("  CPU: the same static-cache decode step, eager (no CUDA graph capture on the CPU)")
        how = dict.fromkeys(steps, "eager (CPU, no capture)")
        timings = time_cpu_interleaved(steps, budget_s)
    meta = run_metadata(device)
    meta.update(dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads())
    base = timings["dense"]
    return [
        {
            **meta,
            "timer": t.timer,
            "model": f"random {preset}",
            "variant": name,
            "replaced_blocks": 0 if name == "dense" else len(conv.pruned),
            "rank": "" if name == "dense" else conv.rank,
            "batch": batch,
            "prompt_len": prompt_len,
            "step": how[name],
            "min_ms": t.min_s * 1e3,
            "median_ms": t.median_s * 1e3,
            "tok_s": batch / t.median_s,
            "x_dense": t.median_s / base.median_s,
            "x_dense_min": t.min_s / base.min_s,
        }
        for name, t in timings.items()
    ]


def format_decode_rows(rows: Sequence[dict]) -> str:
    return "\n".join(
        f"{r['variant']:>9} batch {r['batch']} after {r['prompt_len']} tokens, {r['step']}: "
        f"{r['min_ms']:.3f} / {r['median_ms']:.3f} ms per step (min / median), {r['tok_s']:.1f} tok/s, "
        f"x dense {r['x_dense_min']:.3f} / {r['x_dense']:.3f}"
        for r in rows
    )


def _parser() -> argparse.ArgumentParser:
    from ..commands._common import listing, non_negative_float, out_dir, positive_float, positive_int

    p = argparse.ArgumentParser(prog="python -m flexigpt_kernels.bench.suite_steps", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("stacked", "decode-graph"):
        s = sub.add_parser(name)
        s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        s.add_argument("--out", type=out_dir, required=True, help="folder for the CSV")
        s.add_argument("--rep-ms", type=positive_float, default=100, help="CUDA: do_bench rep (ms)")
        s.add_argument("--warmup-ms", type=non_negative_float, default=25, help="CUDA: do_bench warmup (ms)")
        s.add_argument("--budget", type=positive_float, default=1.0, help="CPU: seconds per group")
        s.add_argument("--threads", type=positive_int, default=2, help="CPU threads")
    st = sub.choices["stacked"]
    st.add_argument("--m", type=listing(positive_int), default=[1, 8, 32, 512], help="rows M")
    st.add_argument("--cuda-graphs", action="store_true", help="CUDA: time rows with M <= 32 in CUDA graphs")
    dg = sub.choices["decode-graph"]
    dg.add_argument("--random", choices=["llama2-7b", "tiny"], default="llama2-7b", help="model shape")
    dg.add_argument("--blocks", type=listing(int, unique=True), help="pruned blocks (default: 0.3 x L before the last)")
    dg.add_argument("--rank", type=positive_int, help="adapter rank (default hidden/16)")
    dg.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together")
    dg.add_argument("--prompt-len", type=positive_int, default=512, help="tokens in the KV cache before the step")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.what == "stacked":
        from .stacked import format_rows, run_stacked

        rows = run_stacked(
            device=device,
            ms=args.m,
            budget_s=args.budget,
            warmup_ms=args.warmup_ms,
            rep_ms=args.rep_ms,
            cuda_graphs=args.cuda_graphs,
        )
        text = format_rows(rows)
    else:
        rows = run_decode_graph(
            device=device,
            preset=args.random,
            blocks=args.blocks,
            rank=args.rank,
            batch=args.batch,
            prompt_len=args.prompt_len,
            warmup_ms=args.warmup_ms,
            rep_ms=args.rep_ms,
            budget_s=args.budget,
        )
        text = format_decode_rows(rows)
    csv_path = out / f"{args.what.replace('-', '_')}_{device_slug(device)}.csv"
    append_csv(csv_path, rows)
    print(text)
    print(f"appended {len(rows)} rows to {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
