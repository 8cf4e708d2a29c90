"""LoRA on a kept block shared with the replacement blocks that reuse its weights
(train.lora.share_kept_lora, heal lora_shared, FlexiGPTRecipe.share_lora): each replacement
linear computes with W_base + s_l B_l A_l, the LoRA's gradient sums over every user, and merging
folds it in without growing any replacement adapter."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from flexigpt_kernels.commands import compare as compare_cmd
from flexigpt_kernels.convert.replacement import replacement_blocks
from flexigpt_kernels.nn import SharedLoRALinear
from flexigpt_kernels.train import LoRALinear, add_lora, heal, merge_lora
from flexigpt_kernels.train.compare import FlexiGPTRecipe, compare_recovery
from flexigpt_kernels.train.compare_budget import _recipe_dict
from flexigpt_kernels.train.lora import share_kept_lora

from .helpers import SEQ, byte_tokenizer, tiny_llama, tiny_pruned, token_data
from .test_compare import TINY

KW = dict(seq_len=SEQ, batch_size=4, progress=False)


def _replacement_linears(model):
    return [m for b in replacement_blocks(model).values() for m in b.modules() if isinstance(m, SharedLoRALinear)]


def _with_random_lora(rank=3):
    """LoRA of scale 7/3 on the kept blocks, replacement scales -0.5: the ratio s_l / s of the
    followed factors is neither 1 nor positive, so a wrong or missing ratio shows."""
    model = tiny_pruned()
    add_lora(model, rank, alpha=7.0)
    for m in _replacement_linears(model):
        m.scale = -0.5
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora.lora_b.copy_(torch.randn(m.lora.lora_b.shape, generator=g) * 0.05)
    return model


def test_a_following_linear_computes_with_the_base_as_its_lora_changes_it():
    model = _with_random_lora()
    users = _replacement_linears(model)
    assert share_kept_lora(model) == len(users) == 2 * 7  # every replacement linear's base has LoRA
    loras = {id(m.base): m.lora for m in model.modules() if isinstance(m, LoRALinear)}
    user = next(u for u in users if u.output_norm is None)
    lora = loras[id(user.base)]
    x = torch.randn(5, user.in_features, requires_grad=True)
    want = F.linear(x, user.weight + lora.scale * lora.lora_b @ lora.lora_a, user.effective_bias())
    want = want + user.scale * (x @ user.lora_a.t()) @ user.lora_b.t()
    torch.testing.assert_close(user(x), want, rtol=1e-5, atol=1e-5)
    user(x).square().sum().backward()  # the kept block's LoRA learns from this block too
    assert lora.lora_b.grad is not None and lora.lora_b.grad.abs().sum() > 0
    user.follow_base_lora(None)
    torch.testing.assert_close(
        user(x), F.linear(x, user.weight, user.effective_bias()) + user.scale * (x @ user.lora_a.t()) @ user.lora_b.t()
    )
    with pytest.raises(ValueError, match="own base linear"):
        user.follow_base_lora(next(lo for lo in loras.values() if lo.base is not user.base))


def test_merging_a_followed_lora_is_exact_and_grows_no_adapter():
    model = _with_random_lora()
    share_kept_lora(model)
    ids = token_data(2)
    before = model(input_ids=ids).logits
    ranks = [m.rank for m in _replacement_linears(model)]
    grown = copy.deepcopy(model)
    for m in _replacement_linears(grown):
        m.follow_base_lora(None)
    assert merge_lora(model) == 2 * 7
    assert [m.rank for m in _replacement_linears(model)] == ranks  # no adapter grew
    assert all(m._base_lora is None for m in _replacement_linears(model))
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    merge_lora(grown)  # not following: each replacement adapter absorbs -D, rank 4 + 3
    assert all(m.rank > 4 for m in _replacement_linears(grown))


def test_heal_with_lora_shared_trains_through_every_user_and_merges_exactly():
    model = tiny_pruned()
    heal(
        model,
        token_data(32),
        steps=3,
        lr=1e-2,
        trainable=("adapters", "lora_kept"),
        lora_rank=3,
        lora_shared=True,
        **KW,
    )
    users = _replacement_linears(model)
    assert all(u._base_lora is not None for u in users)
    ids = token_data(2)
    trained = model(input_ids=ids).logits
    merge_lora(model)
    assert all(u.rank == 4 for u in users)
    torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
    untouched = tiny_pruned()
    with pytest.raises(ValueError, match="lora_shared needs LoRA"):
        heal(untouched, token_data(8), steps=1, trainable="adapters", lora_rank=None, lora_shared=True, **KW)
    dropped = tiny_pruned("drop")
    with pytest.raises(ValueError, match="no replacement blocks"):
        heal(dropped, token_data(8), steps=1, trainable="lora_kept", lora_rank=2, lora_shared=True, **KW)
    assert not any(isinstance(m, LoRALinear) for m in (*untouched.modules(), *dropped.modules()))  # refused first


def test_resume_refuses_a_checkpoint_healed_with_the_other_lora_sharing(tmp_path):
    kw = dict(steps=2, lr=1e-2, trainable=("adapters", "lora_kept"), lora_rank=2, checkpoint_dir=tmp_path, **KW)
    heal(tiny_pruned(), token_data(16), lora_shared=True, **kw)
    with pytest.raises(ValueError, match="lora_shared"):
        heal(tiny_pruned(), token_data(16), resume=True, lora_shared=False, **kw)
    rep = heal(tiny_pruned(), token_data(16), resume=True, **kw)  # the default ("auto") shares here
    assert rep.resumed_from == 2 and rep.lora_shared is True
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        heal(tiny_pruned(), token_data(16), lora_shared="yes", **kw)


def test_recipe_share_lora_stores_less_at_the_same_trainable_parameters():
    common = dict(tokens=4 * 2 * 32, lrs=(1e-2,), methods=("flexigpt",), tokenizer=byte_tokenizer(), **TINY)
    rows = {}
    for share in (False, True):
        recipe = FlexiGPTRecipe(local_fit=None, adapter_share=0.5, share_lora=share)
        result = compare_recovery(recipe=recipe, model=tiny_llama(vocab=257), **common)
        (rows[share],) = [r for r in result["rows"] if r["method"] == "flexigpt"]
    assert rows[True]["trainable_params"] == rows[False]["trainable_params"]
    assert rows[True]["stored_params"] < rows[False]["stored_params"]
    assert "shared with the replacement blocks" in rows[True]["options"]
    p = argparse.ArgumentParser()
    compare_cmd.add_arguments(p)
    assert compare_cmd._recipe(p.parse_args(["--share-lora"])).share_lora is True
    assert compare_cmd._recipe(p.parse_args(["--no-share-lora"])).share_lora is False
    assert FlexiGPTRecipe().share_lora is True  # the default since it measured level at less storage
    assert "share_lora" not in _recipe_dict(FlexiGPTRecipe(share_lora=False))  # unshared sweeps resume


def test_heal_cli_shares_lora_by_default_and_saves_no_grown_adapters(tmp_path, capsys):
    from flexigpt_kernels.cli import main
    from flexigpt_kernels.io import from_pretrained, save_pretrained

    train = tmp_path / "train.txt"
    train.write_text("the cat sat on the mat and the dog sat on the log\n" * 40)
    src = tmp_path / "pruned"
    save_pretrained(tiny_pruned(vocab=257), src, byte_tokenizer())
    common = ["heal", str(src), "--data", str(train), "--steps", "2", "--lr", "1e-2", "--seq-len", "32"]
    common += ["--batch-size", "2", "--lora-rank", "3", "--json"]
    assert main([*common, "--out", str(tmp_path / "shared")]) == 0  # the default: shared where it can be
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["trainable"] == "adapters+lora_kept" and report["lora_shared"] is True
    assert main([*common, "--out", str(tmp_path / "own"), "--no-share-lora"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lora_shared"] is False
    assert "(LoRA shared with the replacement blocks)" in (tmp_path / "shared" / "README.md").read_text()
    assert "LoRA shared" not in (tmp_path / "own" / "README.md").read_text()
    before, shared, own = (from_pretrained(tmp_path / d) for d in ("pruned", "shared", "own"))
    assert {m.rank for m in _replacement_linears(shared)} == {4}  # the kept blocks' LoRA is in their weights
    assert {m.rank for m in _replacement_linears(own)} == {4 + 3}  # without: each replacement absorbs -D
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 - the shared base weights once
    assert n(shared) == n(before) < n(own)
    kept = [k for k, p in before.state_dict().items() if k.endswith("proj.weight")]
    assert any(not torch.equal(before.state_dict()[k], shared.state_dict()[k]) for k in kept)

    assert main([*common, "--out", str(tmp_path / "a"), "--share-lora", "--trainable", "adapters"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--share-lora:" in err and "has no 'lora_kept'" in err
    dropped = tmp_path / "dropped"
    save_pretrained(tiny_pruned("drop", vocab=257), dropped, byte_tokenizer())
    argv = [*common, "--out", str(tmp_path / "b"), "--share-lora", "--trainable", "lora_kept"]
    argv[1] = str(dropped)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--share-lora: the model has no replacement blocks" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
