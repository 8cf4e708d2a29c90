"""Parameter memory per process under FSDP2: one unit per sharing group vs the whole model as one
unit, on a SmolLM2-135M-shaped Llama (random weights) pruned at 0.3 with FlexiGPT.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/fsdp2_memory.py [--out benchmarks/results]

Each process builds the same model (adapters trainable), wraps it (``shard`` = by sharing
group, or ``fully_shard`` on the root only), runs one training micro-step (forward + backward of
1 x 32 tokens) counting FSDP2's all-gathers per unit and the bytes they bring
(flexigpt_kernels.train.shard.count_all_gathers), then one forward without gradients; both
record the parameter bytes it holds at every decoder block's entry and exit, forward and
backward (parameter_memory_trace).
Writes fsdp2_memory_cpu.csv / .md (process 0). Peak parameter bytes are what sizes a device;
activations and optimizer state come on top and are not measured here.
"""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from flexigpt_kernels.bench.model_convert import RANDOM_PRESETS
from flexigpt_kernels.convert.prune import prune
from flexigpt_kernels.train.params import select_trainable
from flexigpt_kernels.train.shard import (
    count_all_gathers,
    held_parameter_bytes,
    parameter_memory_trace,
    shard,
    sharing_groups,
)

SMOLLM2 = dict(RANDOM_PRESETS["smollm2-135m"], tie_word_embeddings=True)


def build(ratio: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).float().eval()
    n = SMOLLM2["num_hidden_layers"]
    k = round(ratio * n)
    blocks = list(range(n - 1 - k, n - 1))  # where Block Influence puts them on Llama models
    model, _ = prune(model, None, blocks=blocks, progress=False)
    return model


def measure(plan: str, ratio: float) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = build(ratio)
    select_trainable(model, "adapters")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    groups = sharing_groups(model)
    if plan == "sharing_groups":
        shard(model)
    else:
        fully_shard(model)
    resident = held_parameter_bytes(model)  # between steps: every unit sharded
    ids = torch.arange(32).view(1, 32)
    with count_all_gathers(model) as gathers, parameter_memory_trace(model, backward=True) as train_trace:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # from rest: ends resharded
    with parameter_memory_trace(model) as trace, torch.no_grad():
        model(input_ids=torch.zeros(1, 32, dtype=torch.long), use_cache=False)
    per_unit = sorted(
        gathers.calls.items(), key=lambda kv: [-1] if kv[0] == "root" else [int(x) for x in kv[0].split("-")]
    )
    return {
        "plan": plan,
        "ratio": ratio,
        "world_size": dist.get_world_size(),
        "stored_param_mib": total / 2**20,
        "peak_param_mib_per_rank": trace.peak / 2**20,
        "train_peak_param_mib_per_rank": train_trace.peak / 2**20,
        "resting_param_mib_per_rank": resident / 2**20,
        "all_gathers_per_step": sum(gathers.calls.values()),
        "gathered_mib_per_step_per_rank": sum(gathers.bytes.values()) / 2**20,
        "gathers_per_unit": " ".join(f"{unit}:{n}" for unit, n in per_unit),
        "groups": " ".join("-".join(map(str, g)) for g in groups),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ratio", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # the backward trace hooks blocks whose inputs need no gradient (frozen prefix): expected
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    dist.init_process_group("gloo")
    rows = [measure(plan, args.ratio) for plan in ("whole_model_unit", "sharing_groups")]
    if dist.get_rank() == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "fsdp2_memory_cpu.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        lines = [
            "| wrapping | processes | stored params (MiB) | peak params per process, forward (MiB) | "
            "peak params per process, training micro-step (MiB) | resting params per process (MiB) | "
            "all-gathers per training micro-step | gathered per micro-step per process (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['plan']} | {r['world_size']} | {r['stored_param_mib']:.1f} | "
                f"{r['peak_param_mib_per_rank']:.1f} | {r['train_peak_param_mib_per_rank']:.1f} | "
                f"{r['resting_param_mib_per_rank']:.1f} | "
                f"{r['all_gathers_per_step']} | {r['gathered_mib_per_step_per_rank']:.1f} |"
            )
        lines.append(f"\nSharing groups (base first): {rows[1]['groups']}")
        for r in rows:
            lines.append(f"\nAll-gathers per unit in one training micro-step ({r['plan']}): {r['gathers_per_unit']}")
        text = "\n".join(lines) + "\n"
        (out / "fsdp2_memory_cpu.md").write_text(text)
        print(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
