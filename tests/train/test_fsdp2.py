"""FSDP2 by sharing group on 2 CPU processes (torchrun, gloo): the same losses, eval perplexities,
trained adapters and saved checkpoint as one process; a run killed after a checkpoint resumes to
the same result on 2 processes and on 1 (another world size)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexigpt_kernels.io import save_pretrained
from flexigpt_kernels.train import heal
from flexigpt_kernels.train.shard import sharing_groups

from .helpers import ROOT, SEQ, assert_matches_one_process, assert_same_params, tiny_pruned, token_data, torchrun

KWARGS = dict(
    steps=4,
    lr=1e-2,
    seq_len=SEQ,
    batch_size=2,
    grad_accum=2,
    eval_data=token_data(5, seed=2),
    eval_chunks=5,
    progress=False,
    trainable="adapters",
)


def run_worker(*args: str):
    return torchrun(str(ROOT / "tests/train/fsdp2_worker.py"), *args)


@pytest.fixture(scope="module")
def one_process():
    model = tiny_pruned(blocks=(1, 3))
    report = heal(model, token_data(64), **KWARGS)
    return model, report


def test_sharing_groups_follow_the_base_map():
    model = tiny_pruned(blocks=(1, 3))
    bases = {i: int(b.flexigpt_base) for i, b in enumerate(model.model.layers) if hasattr(b, "flexigpt_base")}
    groups = sharing_groups(model)
    assert sorted(i for g in groups for i in g if i in bases) == [1, 3]
    for group in groups:
        base = [i for i in group if i not in bases]
        assert len(base) == 1 and all(bases[i] == base[0] for i in group if i in bases)


def test_two_fsdp2_processes_match_one_process(tmp_path, one_process):
    model, one = one_process
    out = str(tmp_path / "fsdp2.pt")
    run_worker(out, "full")
    got = torch.load(out, weights_only=True)
    assert_matches_one_process(got, one, model)
    # group-wrapped, a process never holds every parameter at once
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < got["peak"] < stored
    # save_pretrained of the sharded model (gathered state dict) and of an unsharded copy write
    # what one process writes
    save_pretrained(model, tmp_path / "one")
    single = load_file(tmp_path / "one" / "model.safetensors")
    for variant in ("fsdp2.pt.ckpt", "fsdp2.pt.plain"):
        saved = load_file(tmp_path / variant / "model.safetensors")
        assert saved.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(saved[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
        assert (tmp_path / variant / "flexigpt.json").read_text() == (tmp_path / "one" / "flexigpt.json").read_text()


def test_killed_fsdp2_run_resumes_on_two_processes_and_on_one(tmp_path, one_process):
    model, one = one_process
    ckdir = str(tmp_path / "ck")
    run_worker(str(tmp_path / "unused.pt"), "kill", ckdir)
    assert sorted(p.name for p in Path(ckdir).iterdir()) == ["step-00000002"]
    assert (Path(ckdir) / "step-00000002" / "dcp").is_dir()

    out = str(tmp_path / "resumed.pt")
    run_worker(out, "resume", ckdir)
    got = torch.load(out, weights_only=True)
    assert got["resumed_from"] == 2
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(one.losses), rtol=1e-5, atol=1e-5)
    assert_same_params(got["params"], model)

    # the same sharded checkpoint resumed by one process without torch.distributed
    single = tiny_pruned(blocks=(1, 3))
    report = heal(
        single,
        token_data(64),
        checkpoint_dir=str(tmp_path / "ck1"),
        resume=str(Path(ckdir) / "step-00000002"),
        **KWARGS,
    )
    assert report.resumed_from == 2
    torch.testing.assert_close(torch.tensor(report.losses), torch.tensor(one.losses), rtol=1e-5, atol=1e-5)
    assert_same_params({n: p.detach() for n, p in single.named_parameters() if p.requires_grad}, model)


def test_fsdp2_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        heal(tiny_pruned(), token_data(8), fsdp=True, **{**KWARGS, "eval_data": None})


@pytest.mark.parametrize("share_lora", [False, True], ids=["own_lora", "shared_lora"])
def test_heal_cli_with_fsdp_under_torchrun_saves_what_one_process_saves(tmp_path, share_lora):
    from flexigpt_kernels.cli import main

    from .helpers import byte_tokenizer

    train = tmp_path / "train.txt"
    train.write_text("the cat sat on the mat and the dog sat on the log\n" * 40)
    src = tmp_path / "pruned"
    save_pretrained(tiny_pruned(vocab=257), src, byte_tokenizer())
    common = [
        "heal",
        str(src),
        "--data",
        str(train),
        "--steps",
        "2",
        "--lr",
        "1e-2",
        "--seq-len",
        "32",
        "--lora-rank",
        "2",
        "--json",
    ]  # default trainable set: adapters + LoRA on kept blocks (merged)
    if share_lora:  # the replacement linears follow the kept blocks' LoRA: the gather keeps the links
        common.append("--share-lora")
    torchrun("-m", "flexigpt_kernels.cli", *common, "--batch-size", "1", "--out", str(tmp_path / "sharded"), "--fsdp")
    assert main([*common, "--batch-size", "2", "--out", str(tmp_path / "single")]) == 0
    sharded, single = (load_file(tmp_path / d / "model.safetensors") for d in ("sharded", "single"))
    assert sharded.keys() == single.keys()
    # 2 x batch 1 vs 1 x batch 2 round the gradients differently, and Adam turns a gradient near
    # zero into a step of up to lr x (g / eps): 1e-3 bounds that at lr 1e-2, while a wrong gather
    # or merge moves a tensor by O(1)
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")  # noqa: B023


def test_heal_cli_fsdp_outside_torchrun_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from flexigpt_kernels.cli import main

    from .helpers import byte_tokenizer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train = tmp_path / "train.txt"
    train.write_text("some text to train on\n" * 10)
    src = tmp_path / "pruned"
    save_pretrained(tiny_pruned(vocab=257), src, byte_tokenizer())
    assert main(["heal", str(src), "--data", str(train), "--steps", "1", "--out", str(tmp_path / "o"), "--fsdp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "start the command with torchrun" in err[0]
