"""The rows and tables of `bench model` (bench/model.py): one CSV row per variant with the run's
metadata, the text table, and the markdown report; times as ratios to the dense model (prefill
from the minima, decode from the median ms/token), each beside its FLOP floor (the variant's
FLOPs / the dense model's, bench/model_flops.py)."""

from __future__ import annotations

import math
import statistics

import torch

from .env import run_metadata
from .model_convert import Conversion
from .model_measure import VARIANTS, Measurement, Settings
from .results import markdown_table, text_table


def _ratio3(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def _rows(
    results: dict[str, Measurement],
    st: Settings,
    device,
    dtype,
    source,
    conv: Conversion,
    ours,
    floors: dict[str, dict[str, float]] | None = None,
) -> list[dict]:
    """One row per variant; `floors` is model_flops.floor_ratios (FLOP floors; NaN without)."""
    floors = floors or {}
    meta = run_metadata(device)
    meta.update(
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        model=source,
        pruned_blocks=" ".join(map(str, conv.pruned)),
        rank=conv.rank,
        bases=conv.bases,
        our_backend=ours,
        seq_len=st.seq_len,
        new_tokens=st.new_tokens,
        rounds=st.rounds,
    )
    dense = results.get("dense")
    ref_tokens = results["flexigpt"].tokens if "flexigpt" in results else None
    rows = []
    for v in [v for v in VARIANTS if v in results]:
        r = results[v]
        floor = floors.get(v, {})
        row = {
            **meta,
            "variant": v,
            "layers": r.layers,
            "replaced_blocks": r.replaced,
            "params_M": r.params / 1e6,
            "weights_MiB": r.weights_bytes / 2**20,
        }
        for b in st.batches:
            mn, med = r.prefill(b)
            key = f"prefill_{b}x{st.seq_len}"
            row[key + "_min_ms"] = mn * 1e3
            row[key + "_median_ms"] = med * 1e3
            row[key + "_x_dense"] = mn / dense.prefill(b)[0] if dense else math.nan
            row[key + "_flop_floor"] = floor.get("prefill", math.nan)  # per sequence: the same at every batch
        step_med = statistics.median(r.steps)
        row["decode_tok_s"] = len(r.steps) / sum(r.steps)
        row["decode_ms_per_token_min"] = min(r.steps) * 1e3
        row["decode_ms_per_token_median"] = step_med * 1e3
        row["decode_x_dense"] = step_med / statistics.median(dense.steps) if dense else math.nan
        row["decode_flop_floor"] = floor.get("decode", math.nan)
        row["kv_cache_MiB"] = r.kv_cache_bytes / 2**20
        row["peak_activation_MiB"] = r.peak_bytes / 2**20
        row["memory_method"] = r.memory_method
        if ref_tokens is not None and v == "flexigpt-unfused":
            row["same_tokens_as_flexigpt"] = f"{sum(a == b for a, b in zip(r.tokens, ref_tokens))}/{len(ref_tokens)}"
        rows.append(row)
    return rows


def _table(rows: list[dict], st: Settings):
    headers = ["model", "layers (replaced)", "params M", "weights MiB"]
    for b in st.batches:
        headers += [f"prefill {b}x{st.seq_len} ms min / med", "x dense", "FLOP floor"]
    headers += ["decode tok/s", "ms/token min / med", "x dense", "FLOP floor", "KV cache MiB", "peak activations MiB"]
    body = []
    for r in rows:
        line = [
            r["variant"],
            f"{r['layers']} ({r['replaced_blocks']})",
            f"{r['params_M']:.1f}",
            f"{r['weights_MiB']:.0f}",
        ]
        for b in st.batches:
            key = f"prefill_{b}x{st.seq_len}"
            line += [
                f"{r[key + '_min_ms']:.1f} / {r[key + '_median_ms']:.1f}",
                _ratio3(r[key + "_x_dense"]),
                _ratio3(r.get(key + "_flop_floor", math.nan)),
            ]
        line += [
            f"{r['decode_tok_s']:.1f}",
            f"{r['decode_ms_per_token_min']:.2f} / {r['decode_ms_per_token_median']:.2f}",
            _ratio3(r["decode_x_dense"]),
            _ratio3(r.get("decode_flop_floor", math.nan)),
            f"{r['kv_cache_MiB']:.1f}",
            f"{r['peak_activation_MiB']:.0f}",
        ]
        body.append(line)
    return headers, body


def format_table(rows: list[dict], st: Settings) -> str:
    headers, body = _table(rows, st)
    text = text_table(headers, body)
    same = [r["same_tokens_as_flexigpt"] for r in rows if "same_tokens_as_flexigpt" in r]
    if same:
        text += f"\ngreedy tokens of flexigpt-unfused equal to flexigpt's: {same[0]}"
    return text


def _markdown(rows: list[dict], st: Settings) -> str:
    first = rows[0]
    headers, body = _table(rows, st)
    same = [r["same_tokens_as_flexigpt"] for r in rows if "same_tokens_as_flexigpt" in r]
    return (
        f"# End-to-end benchmark: {first['model']} on {first['device_name']}, {first['dtype']}\n\n"
        f"run {first['run_id']} ({first['date']}), torch {first['torch']}, triton {first['triton']}, commit "
        f"{first['commit']}, OMP_WAIT_POLICY={first['omp_wait_policy']}; our op's backend: "
        f"{first['our_backend']}; pruned blocks {first['pruned_blocks']}, rank {first['rank']}, bases by "
        f"{first['bases']}.\n\n"
        f"Prefill: batch x {st.seq_len} random tokens, KV cache built, last-position logits only; {st.rounds} "
        f"rounds after a warm-up, all models interleaved per round; ratio to dense from the minima. Decode: "
        f"greedy, {st.new_tokens} one-token steps after a {st.seq_len}-token prompt, models interleaved per "
        f"step; tok/s = steps / their total time; ratio to dense from the median ms/token. Memory: weights "
        f"(each shared tensor once), the KV cache after decoding, and the largest transient peak of one "
        f"call ({first['memory_method']}). FLOP floor: the variant's FLOPs / the dense model's from the "
        f"models' shapes (linear layers, the adapters' 2 r (in + out) per token, causal attention; the "
        f"decode step at the middle context), the time ratio no implementation can beat by arithmetic "
        f"alone (decode at batch 1 is memory-bound: there it is a reference point, not a bound).\n\n"
        + markdown_table(headers, body)
        + "\n"
        + (f"\nGreedy tokens of flexigpt-unfused equal to flexigpt's: {same[0]}.\n" if same else "")
    )
