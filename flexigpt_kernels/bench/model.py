"""End-to-end benchmark: the dense model, the drop baseline (ShortGPT: the same blocks removed),
the FlexiGPT-pruned model on our ops, and the same pruned weights composed PEFT-style from plain
torch ops (each SharedLoRALinear swapped for F.linear + LoRA + a separate F.layer_norm).

run_model_bench here; how each model is measured (interleaved prefill and decode, memory) in
model_measure.py, how the models are built and converted in model_convert.py, the rows and
tables in model_report.py. Times are reported as ratios to the dense model: prefill from the
minima, decode from the median ms/token.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from .env import device_slug
from .model_convert import (
    RANDOM_PRESETS,
    Conversion,
    ModelBenchConfig,
    build_random_model,
    convert_copy,
    default_blocks,
    load_source,
    nearest_bases,
)
from .model_convert import (
    _randomize_adapters as _randomize_adapters,  # re-exported (tests)
)
from .model_flops import count_flops, floor_ratios
from .model_measure import (
    VARIANTS,
    Measurement,
    PeakMemory,
    Settings,
    UnfusedSharedLoRALinear,
    Variant,
    _log,
    cache_bytes,
    measure_all,
    stored_bytes,
    unfused_view,
)
from .model_report import _markdown, _rows, format_table
from .model_report import _table as _table  # re-exported
from .results import append_csv

__all__ = [
    "VARIANTS",
    "RANDOM_PRESETS",
    "Conversion",
    "Measurement",
    "ModelBenchConfig",
    "PeakMemory",
    "Settings",
    "UnfusedSharedLoRALinear",
    "Variant",
    "build_random_model",
    "cache_bytes",
    "convert_copy",
    "default_blocks",
    "format_table",
    "load_source",
    "measure_all",
    "nearest_bases",
    "run_model_bench",
    "stored_bytes",
    "unfused_view",
]


def run_model_bench(
    cfg: ModelBenchConfig, *, device: torch.device, dtype: torch.dtype | None, out: Path, log=_log
) -> int:
    from ..convert.families import num_layers
    from ..convert.prune import prune
    from ..ops import backends

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quick = cfg.quick
    st = Settings(
        seq_len=cfg.seq_len,
        batches=tuple(cfg.batches or ((1,) if quick else (1, 8))),
        new_tokens=cfg.new_tokens or (32 if quick else 128),
        rounds=cfg.rounds or (2 if quick else (5 if device.type == "cuda" else 3)),
    )
    wanted = list(cfg.variants or VARIANTS)
    t_start = time.perf_counter()
    dense, tok, source = load_source(cfg.model, cfg.random, device, dtype)
    vocab = dense.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (max(st.batches), st.seq_len), generator=torch.Generator().manual_seed(1234))
    ids = ids.to(device)
    ours = backends.resolve(device, dtype)
    log(
        f"bench model: {source}, {num_layers(dense)} layers, {dtype}, on {device} (our op's backend: {ours}); "
        f"prefill {','.join(map(str, st.batches))}x{st.seq_len}, {st.new_tokens} new tokens, {st.rounds} rounds"
    )
    flex, conv = convert_copy(dense, cfg, tok, log)
    variants = []
    if "dense" in wanted:
        variants.append(Variant("dense", dense))
    if "drop" in wanted:
        drop, _ = prune(copy.deepcopy(dense), None, blocks=conv.pruned, method="drop", progress=False)
        variants.append(Variant("drop", drop.eval()))
    if "dense" not in wanted:
        del dense
    if "flexigpt" in wanted:
        variants.append(Variant("flexigpt", flex))
    if "flexigpt-unfused" in wanted:
        variants.append(Variant("flexigpt-unfused", flex, unfused=True))
    flops = {v.name: count_flops(v.model) for v in variants}  # the unfused variant: the same model
    floors = floor_ratios(flops, st.seq_len, st.new_tokens)
    measure_all(variants, ids, st, device, log)
    results = {v.name: v.result for v in variants}
    rows = _rows(results, st, device, dtype, source, conv, ours, floors)
    slug = device_slug(device)
    csv_path = append_csv(out / f"model_{slug}.csv", rows)
    md_path = out / f"model_{slug}.md"
    md_path.write_text(_markdown(rows, st))
    log("")
    log(format_table(rows, st))
    log(f"\n{time.perf_counter() - t_start:.0f} s in all; appended to {csv_path}; table in {md_path}")
    return 0
