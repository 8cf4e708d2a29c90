"""Named presets: the Python API and the command line share the measured recipe as their
default; the paper's recipe stays available by name."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

import flexigpt_kernels as fk
from flexigpt_kernels.convert.local_fit import GAMMA_ONLY_LOCAL_FIT
from flexigpt_kernels.nn import DEFAULT_GAMMA_INIT, OutputNorm
from flexigpt_kernels.presets import PAPER, PRESETS, RECIPE, get_preset

from .train.helpers import SEQ, tiny_llama, tiny_pruned, token_data


def _gammas(model):
    return torch.cat([m.weight.detach().flatten() for m in model.modules() if isinstance(m, OutputNorm)])


def test_prune_defaults_to_the_recipe_and_the_paper_is_one_name_away():
    calib = token_data(8)
    dense = tiny_llama()
    default, rep = fk.prune(copy.deepcopy(dense), calib, blocks=[1, 2], rank=4, progress=False)
    recipe, _ = fk.prune(copy.deepcopy(dense), calib, blocks=[1, 2], rank=4, progress=False, **RECIPE.prune_kwargs())
    paper, _ = fk.prune(copy.deepcopy(dense), calib, blocks=[1, 2], rank=4, progress=False, **PAPER.prune_kwargs())
    assert default.flexigpt_meta["local_fit"] == GAMMA_ONLY_LOCAL_FIT.to_dict() and rep.local_fit is not None
    assert torch.equal(_gammas(default), _gammas(recipe))
    # the recipe fits gamma per channel; the paper keeps the fixed 1e-2
    assert paper.flexigpt_meta["local_fit"] is None
    assert torch.all(_gammas(paper) == DEFAULT_GAMMA_INIT) and not torch.all(_gammas(default) == DEFAULT_GAMMA_INIT)
    # without calibration (or when dropping) there is nothing to fit: the default does not ask for it
    no_calib, _ = fk.prune(copy.deepcopy(dense), None, blocks=[1, 2], rank=4, progress=False)
    assert no_calib.flexigpt_meta["local_fit"] is None
    dropped, _ = fk.prune(copy.deepcopy(dense), calib, blocks=[1, 2], method="drop", progress=False)
    assert dropped.flexigpt_meta["method"] == "drop"


def test_heal_defaults_to_the_recipe_trainable_set():
    kw = dict(steps=1, lr=1e-2, seq_len=SEQ, batch_size=2, progress=False)
    default = fk.heal(tiny_pruned(), token_data(8), **kw)
    recipe = fk.heal(tiny_pruned(), token_data(8), **kw, **RECIPE.heal_kwargs())
    paper = fk.heal(tiny_pruned(), token_data(8), **kw, **PAPER.heal_kwargs())
    assert default.trainable == recipe.trainable == "adapters+lora_kept" and paper.trainable == "adapters"
    assert default.trainable_params == recipe.trainable_params > paper.trainable_params
    assert default.losses == pytest.approx(recipe.losses)


def test_the_command_line_reads_the_same_preset():
    from flexigpt_kernels.commands import heal as heal_cmd
    from flexigpt_kernels.commands import prune as prune_cmd

    p = argparse.ArgumentParser()
    heal_cmd.add_arguments(p)
    args = p.parse_args(["DIR", "--data", "default", "--out", "o", "--steps", "1"])
    assert tuple(args.trainable) == RECIPE.trainable and args.lora_rank == RECIPE.lora_rank
    p = argparse.ArgumentParser()
    prune_cmd.add_arguments(p)
    assert p.parse_args(["--out", "o"]).local_fit == RECIPE.local_fit


def test_presets_by_name():
    assert get_preset("recipe") is RECIPE and get_preset("paper") is PAPER and get_preset(PAPER) is PAPER
    assert set(PRESETS) == {"recipe", "paper"} and fk.RECIPE is RECIPE and fk.PAPER is PAPER
    with pytest.raises(ValueError, match="preset: unknown 'shortgpt'"):
        get_preset("shortgpt")
