"""Parameter memory per process under FSDP2: one unit per sharing group vs the whole model as one
unit, on a SmolLM2-135M-shaped Llama (random weights) pruned at 0.3 with FlexiGPT.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/fsdp2_memory.py [--out benchmarks/results]

Each process builds the same model, wraps it (``shard`` = by sharing group, or ``fully_shard``
on the root only), runs one forward of 1 x 32 tokens and records the parameter bytes it holds at
every decoder block's entry and exit (flexigpt_kernels.train.shard.parameter_memory_trace).
Writes fsdp2_memory_cpu.csv / .md (process 0). Peak parameter bytes are what sizes a device;
activations and optimizer state come on top and are not measured here.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torch.distributed as dist

from flexigpt_kernels.bench.model_convert import RANDOM_PRESETS
from flexigpt_kernels.convert.prune import prune
from flexigpt_kernels.train.shard import held_parameter_bytes, parameter_memory_trace, shard, sharing_groups

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
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    groups = sharing_groups(model)
    if plan == "sharing_groups":
        shard(model)
    else:
        fully_shard(model)
    resident = held_parameter_bytes(model)  # between steps: every unit sharded
    with parameter_memory_trace(model) as trace, torch.no_grad():
        model(input_ids=torch.zeros(1, 32, dtype=torch.long), use_cache=False)
    return {
        "plan": plan,
        "ratio": ratio,
        "world_size": dist.get_world_size(),
        "stored_param_mib": total / 2**20,
        "peak_param_mib_per_rank": trace.peak / 2**20,
        "resting_param_mib_per_rank": resident / 2**20,
        "groups": " ".join("-".join(map(str, g)) for g in groups),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ratio", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(1)
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
            "| wrapping | processes | stored params (MiB) | peak params per process (MiB) | "
            "resting params per process (MiB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['plan']} | {r['world_size']} | {r['stored_param_mib']:.1f} | "
                f"{r['peak_param_mib_per_rank']:.1f} | {r['resting_param_mib_per_rank']:.1f} |"
            )
        lines.append(f"\nSharing groups (base first): {rows[1]['groups']}")
        text = "\n".join(lines) + "\n"
        (out / "fsdp2_memory_cpu.md").write_text(text)
        print(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
