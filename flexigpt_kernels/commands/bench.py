"""`flexigpt bench`: the benchmarks behind every speed claim, as commands anyone can rerun.

    flexigpt bench kernels [--quick] [--out DIR] [--device cpu|cuda]   the op vs unfused vs dense/floor
    flexigpt bench model [DIR] [--quick] [--out DIR] [--device ...]    dense vs drop vs ours vs unfused
    flexigpt bench plot CSV [--out DIR]                                ratio-vs-M PNGs from a kernels CSV

Results append to benchmarks/results/kernels_<device>.csv and model_<device>.csv (tagged with
device name, torch/triton versions, date and git commit); the latest run's table is also
written as markdown beside them. See benchmarks/README.md for the formulas.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import UsageError
from ._common import (
    fraction,
    listing,
    non_negative_float,
    nonempty,
    out_dir,
    positive_float,
    positive_int,
    rank,
    user_input,
)

_csv_list = listing(str)
_int_list = listing(positive_int)


def _shape(text: str) -> str:
    from ..bench.shapes import parse_shape

    try:
        parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _csv_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} {'is not a file' if path.exists() else 'does not exist'}")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="WHAT", required=True)

    k = sub.add_parser(
        "kernels",
        help="time the fused op against the unfused path, dense and the floor",
        description="Time shared_lora_linear per backend against the PEFT-style unfused "
        "composition, dense F.linear and the floor, over a shape grid.",
    )
    k.add_argument(
        "--quick",
        action="store_true",
        help="reduced grid: SmolLM2 widths, M in {1, 512} (about a minute on 2 CPU cores)",
    )
    k.add_argument("--out", type=out_dir, help="results folder (default: benchmarks/results)")
    k.add_argument("--device", default=None, type=nonempty, help="cpu or cuda (default: cuda when available)")
    k.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on the CPU"
    )
    k.add_argument("--models", type=_csv_list, help="width families, e.g. llama2-7b,smollm2")
    k.add_argument("--m", type=_int_list, help="rows M, e.g. 1,8,32,512")
    k.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="MxKxNxR",
        type=_shape,
        help="a custom shape instead of the grid (repeatable), e.g. 1x4096x4096x256",
    )
    k.add_argument(
        "--variants",
        type=listing(str, choices=("linear", "norm+res"), unique=True),
        help="linear,norm+res (default both)",
    )
    k.add_argument(
        "--modes", type=listing(str, choices=("fwd", "fwd+bwd"), unique=True), help="fwd,fwd+bwd (default both)"
    )
    k.add_argument(
        "--providers",
        type=_csv_list,
        help="op-<backend>,unfused-peft,dense (default: every available backend of ours, unfused, dense)",
    )
    k.add_argument("--budget", type=positive_float, help="CPU: seconds per shape group (default 0.5 quick, 1.5 full)")
    k.add_argument("--rep-ms", type=positive_float, default=100, help="CUDA: do_bench rep per provider (ms)")
    k.add_argument("--warmup-ms", type=non_negative_float, default=25, help="CUDA: do_bench warmup per provider (ms)")
    k.add_argument("--cuda-graphs", action="store_true", help="CUDA: time decode shapes (M <= 32, fwd) in CUDA graphs")
    k.add_argument("--threads", type=positive_int, default=2, help="CPU threads (default 2)")
    k.add_argument("--no-plot", action="store_true", help="do not draw the PNGs after the run")
    k.add_argument("--no-check", action="store_true", help="skip the cross-provider output check")
    k.add_argument(
        "--no-stacked",
        action="store_true",
        help="skip the multi-slice group (stacked op vs one call per part, bench/stacked.py)",
    )

    m = sub.add_parser(
        "model",
        help="end to end: dense vs drop vs our pruned model vs the same weights unfused",
        description="Prefill latency, decode tokens/s and peak memory of the dense model, the "
        "drop baseline, the FlexiGPT-pruned model on our ops and the same pruned "
        "weights composed PEFT-style from plain torch ops.",
    )
    m.add_argument(
        "model",
        nargs="?",
        default=None,
        type=nonempty,
        help="local directory of a dense Hugging Face causal LM (default: the embedded SmolLM2-135M)",
    )
    m.add_argument(
        "--random",
        choices=["llama2-7b", "tiny"],
        help="instead of a checkpoint: a Llama model of that shape with random weights",
    )
    m.add_argument("--quick", action="store_true", help="1x512 prefill and 32 new tokens only")
    m.add_argument("--out", type=out_dir, help="results folder (default: benchmarks/results)")
    m.add_argument("--device", default=None, type=nonempty, help="cpu or cuda (default: cuda when available)")
    m.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on the CPU"
    )
    m.add_argument("--ratio", type=fraction, default=0.3, help="fraction of blocks to prune (default 0.3)")
    m.add_argument(
        "--blocks", type=listing(int, unique=True), help="explicit blocks to prune (else chosen by Block Influence)"
    )
    m.add_argument("--rank", type=rank, help="adapter rank (default: prune()'s, hidden/16)")
    m.add_argument(
        "--bases",
        choices=["distance", "nearest"],
        help="how pruned blocks pick their base: prune()'s low-rank distance (default) or the "
        "nearest kept block (--quick's default: same shapes, same timing, no SVD search)",
    )
    m.add_argument(
        "--calib-samples",
        type=positive_int,
        default=8,
        help="calibration chunks of 256 tokens for choosing the blocks (default 8)",
    )
    m.add_argument("--seq-len", type=positive_int, default=512, help="prompt length (default 512)")
    m.add_argument("--batches", type=_int_list, help="prefill batch sizes (default 1,8; quick: 1)")
    m.add_argument("--new-tokens", type=positive_int, help="greedy decode steps (default 128; quick: 32)")
    m.add_argument("--rounds", type=positive_int, help="timed prefill rounds (default: 5 on CUDA, 3 on CPU, 2 quick)")
    m.add_argument("--variants", type=_variants, help="dense,drop,flexigpt,flexigpt-unfused (default all)")
    m.add_argument("--threads", type=positive_int, default=2, help="CPU threads (default 2)")

    p = sub.add_parser("plot", help="ratio-vs-M PNG plots from a kernels CSV")
    p.add_argument("csv", type=_csv_file, nargs="+", help="kernels_<device>.csv file(s)")
    p.add_argument("--out", type=out_dir, help="folder for the PNGs (default: beside the CSV)")
    p.add_argument("--run", default="latest", help="run_id to plot, 'latest' (default) or 'all'")
    p.add_argument("--stat", choices=["min", "median"], default="min", help="ratios from minima or medians")


def run(args: argparse.Namespace) -> int:
    return {"kernels": _kernels, "model": _model, "plot": _plot}[args.bench_command](args)


def _variants(text: str) -> list[str]:
    from ..bench.model import VARIANTS

    return listing(str, choices=VARIANTS, unique=True)(text)


def _setup(args):
    import torch

    from ..bench.env import default_results_dir, oversubscription_hint, resolve_device

    with user_input("--device"):
        device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = Path(args.out) if args.out else default_results_dir()
    hint = oversubscription_hint(device)
    if hint:
        print(hint, file=sys.stderr)
    return device, dtype, out


def _kernels(args) -> int:
    from ..bench import shapes as S
    from ..bench.env import device_slug, triton_version
    from ..bench.kernels import run_kernels, summary_table, targets_report
    from ..bench.results import append_csv
    from ..ops import backends

    device, dtype, out = _setup(args)
    if device.type == "cuda" and backends.triton_interpreter_enabled():
        print(
            "warning: TRITON_INTERPRET is set: Triton kernels run in the interpreter; unset it to time them",
            file=sys.stderr,
        )
    if args.shape:
        shapes = [S.parse_shape(t) for t in args.shape]
    elif args.quick and not (args.models or args.m):
        shapes = S.quick_grid()
    else:
        shapes = S.grid(models=args.models or tuple(S.WIDTHS), ms=args.m or (S.DECODE_M + S.PREFILL_M))
    budget = args.budget if args.budget is not None else (0.5 if args.quick or args.shape else 1.5)
    print(
        f"bench kernels on {device} ({'quick, ' if args.quick else ''}{len(shapes)} shapes), "
        f"torch {__import__('torch').__version__}, triton {triton_version()}"
    )
    csv_path = out / f"kernels_{device_slug(device)}.csv"
    rows = run_kernels(
        shapes,
        device=device,
        dtype=dtype,
        providers=args.providers,
        variants=args.variants or S.VARIANTS,
        modes=args.modes or S.MODES,
        budget_s=budget,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
        cuda_graphs=args.cuda_graphs,
        check=not args.no_check,
        on_rows=lambda group: append_csv(csv_path, group),
    )
    if not rows:
        print("no results (every group failed)", file=sys.stderr)
        return 1
    stacked = "" if args.no_stacked or args.shape else _stacked_group(args, device, dtype, budget, csv_path)
    md = out / f"kernels_{device_slug(device)}.md"
    first = rows[0]
    md.write_text(
        f"# Kernel benchmark: {first['device_name']}, {first['dtype']}\n\n"
        f"run {first['run_id']} ({first['date']}), torch {first['torch']}, triton {first['triton']}, "
        f"commit {first['commit']}, OMP_WAIT_POLICY={first['omp_wait_policy']}, timer: {first['timer']}.\n"
        "Times: min / median over rounds (us). Ratios: from the minima / from the medians. "
        "Formulas: benchmarks/README.md.\n\n" + summary_table(rows, markdown=True) + "\n\n"
        "Targets (minima):\n\n" + "\n".join(f"    {t}" for t in targets_report(rows)) + "\n" + stacked
    )
    print()
    print(summary_table(rows))
    print()
    print("\n".join(targets_report(rows)))
    print(f"\nappended {len(rows)} rows to {csv_path}; table in {md}")
    if not args.no_plot:
        try:
            from ..bench.plot import plot_csv

            for path in plot_csv(csv_path, out, run=first["run_id"]):
                print(f"plot: {path}")
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
    return 0


def _stacked_group(args, device, dtype, budget, csv_path) -> str:
    """Time the multi-slice op beside one call per part; append its rows; a markdown block."""
    from ..bench.results import append_csv
    from ..bench.stacked import format_rows, run_stacked

    rows = run_stacked(device=device, dtype=dtype, ms=args.m or (1, 512), budget_s=budget)
    append_csv(csv_path, rows)
    print(format_rows(rows))
    return (
        "\nMulti-slice op (min / median us, ratios to one call per part and to dense):\n\n"
        + "\n".join(f"    {line}" for line in format_rows(rows).splitlines())
        + "\n"
    )


def _model(args) -> int:
    from ..bench.model import ModelBenchConfig, run_model_bench

    if args.model is not None and args.random is not None:
        raise UsageError("--random: give either a model or --random, not both")
    cfg = ModelBenchConfig(
        model=args.model,
        random=args.random,
        quick=args.quick,
        ratio=args.ratio,
        blocks=args.blocks,
        rank=args.rank,
        bases=args.bases,
        calib_samples=args.calib_samples,
        seq_len=args.seq_len,
        batches=tuple(args.batches) if args.batches else None,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        variants=args.variants,
    )
    if args.model is not None:
        with user_input("MODEL"):  # fail on a bad path before anything is timed
            from ..io.load import locate_model

            locate_model(args.model, allow_converted=False)
    device, dtype, out = _setup(args)
    return run_model_bench(cfg, device=device, dtype=dtype, out=out)


def _plot(args) -> int:
    from ..bench.plot import plot_csv

    for csv_path in args.csv:
        for path in plot_csv(csv_path, args.out or csv_path.parent, run=args.run, stat=args.stat):
            print(path)
    return 0
