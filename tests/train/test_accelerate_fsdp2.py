"""heal() through `accelerate launch --config_file python/accelerate_fsdp2.yaml` on 2 CPU
processes. accelerate (1.15) enables FSDP only on an accelerator device: without one its
processes run alone (refused by heal() with the remedy); with ACCELERATE_USE_CPU=true they join
over gloo and heal() shards by sharing group with the config's FSDP2 settings. The run equals
the one-process run (losses, eval perplexities, adapters, and the CLI's saved checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexigpt_kernels.io import save_pretrained
from flexigpt_kernels.train import heal

from .helpers import ROOT, accelerate_launch, assert_matches_one_process, byte_tokenizer, tiny_pruned, token_data
from .test_fsdp2 import KWARGS

CONFIG = str(ROOT / "python/accelerate_fsdp2.yaml")
ON_CPU = {"ACCELERATE_USE_CPU": "true"}
WORKER = str(ROOT / "tests/train/accelerate_worker.py")


@pytest.mark.parametrize("reshard", [True, False])
def test_accelerate_fsdp2_config_on_two_cpu_processes_matches_one_process(tmp_path, reshard):
    config = CONFIG
    if not reshard:  # the shipped config with one setting changed, to see it reach shard()
        text = (ROOT / "python/accelerate_fsdp2.yaml").read_text()
        assert "fsdp_reshard_after_forward: true" in text
        config = str(tmp_path / "no_reshard.yaml")
        Path(config).write_text(text.replace("fsdp_reshard_after_forward: true", "fsdp_reshard_after_forward: false"))
    out = tmp_path / "acc.pt"
    accelerate_launch(config, WORKER, str(out), env=ON_CPU)
    got = torch.load(out, weights_only=True)
    # what accelerate made of the config on CPUs: gloo processes, FSDP2 settings read
    assert got["distributed_type"] == "DistributedType.MULTI_CPU" and got["backend"] == "gloo"
    assert got["fsdp_version"] == 2 and got["reshard_after_forward"] is reshard
    # heal() wrapped by sharing group: the groups are units, every other block its own
    assert got["groups"] == [[1, 2, 3]]
    assert sorted(got["units"]) == [[0], [1, 2, 3]]
    # ... with the config's resharding: a unit resharded after forward is gathered again for
    # the backward (block 0 as FSDP2's prefetch), otherwise it stays gathered; the root once
    again = 1 if reshard else 0
    assert got["gathers"] == {"0": 1 + again, "1-2-3": 1 + again, "root": 1}

    model = tiny_pruned(blocks=(1, 3))
    assert_matches_one_process(got, heal(model, token_data(64), **KWARGS), model)


def test_accelerate_fsdp_config_without_cpu_flag_is_refused_not_run_twice(tmp_path):
    proc = accelerate_launch(CONFIG, WORKER, str(tmp_path / "never.pt"), check=False)
    assert proc.returncode != 0
    assert "accelerate was asked for FSDP but runs NO on 1 of 2 launched processes" in proc.stderr
    assert "ACCELERATE_USE_CPU=true" in proc.stderr
    assert not (tmp_path / "never.pt").exists()


def test_accelerate_fsdp_config_without_cpu_flag_is_a_one_line_cli_error(tmp_path, cli_inputs):
    out = tmp_path / "never"
    proc = accelerate_launch(CONFIG, "-m", "flexigpt_kernels.cli", *cli_inputs, "--out", str(out), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("flexigpt heal: ")]
    expected = "flexigpt heal: error: accelerate launch: accelerate was asked for FSDP but runs NO"
    assert errors and all(e.startswith(expected) for e in errors), proc.stderr[-2000:]
    assert proc.returncode != 0 and not out.exists()
    assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), "the first failing process should exit with status 2"


@pytest.fixture()
def cli_inputs(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("the cat sat on the mat and the dog sat on the log\n" * 40)
    src = tmp_path / "pruned"
    save_pretrained(tiny_pruned(vocab=257), src, byte_tokenizer())
    return ["heal", str(src), "--data", str(train), "--steps", "2", "--lr", "1e-2", "--seq-len", "32",
            "--lora-rank", "2", "--json"]  # fmt: skip


def test_accelerate_launch_heal_cli_saves_what_one_process_saves(tmp_path, cli_inputs):
    from flexigpt_kernels.cli import main

    accelerate_launch(
        CONFIG, "-m", "flexigpt_kernels.cli", *cli_inputs, "--batch-size", "1", "--out", str(tmp_path / "acc"),
        env=ON_CPU,
    )  # fmt: skip
    assert main([*cli_inputs, "--batch-size", "2", "--out", str(tmp_path / "single")]) == 0
    sharded, single = (load_file(tmp_path / d / "model.safetensors") for d in ("acc", "single"))
    assert sharded.keys() == single.keys()
    # the same bound as the torchrun --fsdp CLI test (test_fsdp2.py): 2 x batch 1 vs 1 x batch 2
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")  # noqa: B023
