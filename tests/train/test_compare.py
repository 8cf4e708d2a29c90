"""The FlexiGPT vs ShortGPT + LoRA comparison on a tiny model: same blocks, matched trainable
parameters, same token budgets (block-local fit tokens included), the lr sweep then the
further seed at each method's best lr, and the CSV / Markdown outputs."""

from __future__ import annotations

import copy
import csv
import dataclasses

import pytest

from flexigpt_kernels.convert.local_fit import LocalFit
from flexigpt_kernels.train.compare import COLUMNS, FlexiGPTRecipe, compare_recovery, write_results
from flexigpt_kernels.train.compare_budget import recipe_adapter_rank

from .helpers import byte_tokenizer, tiny_llama

TRAIN = ["the cat sat on the mat and the dog sat on the log"] * 40
HELD = ["rain in spain falls mainly on the plain, said the dog"] * 10
TINY = dict(
    ratio=0.5,
    rank=4,
    seq_len=32,
    batch_size=2,
    eval_chunks=4,
    calib_samples=4,
    train_texts=TRAIN,
    heldout_texts=HELD,
    progress=False,
    log=lambda *a: None,
)


def test_compare_recovery_on_a_tiny_model(tmp_path):
    recipe = FlexiGPTRecipe(local_fit=LocalFit(steps=2), fit_samples=2, adapter_share=0.5)
    saved = []
    result = compare_recovery(
        tokens=[4 * 2 * 32, 6 * 2 * 32],
        lrs=(1e-2, 3e-2),
        seeds=(0, 1),
        recipe=recipe,
        model=tiny_llama(vocab=257),
        tokenizer=byte_tokenizer(),
        on_row=lambda r: saved.append(len(r["rows"])),
        **TINY,
    )
    rows = result["rows"]
    assert {r["method"] for r in rows} == {"dense", "drop", "flexigpt", "flexigpt_paper", "shortgpt_lora"}
    runs = [r for r in rows if r["method"] not in ("dense", "drop")]
    # per budget: 3 methods x 2 lrs on seed 0, then 3 methods on seed 1 at their best lr
    assert len(runs) == 2 * (3 * 2 + 3) and saved == list(range(3, 3 + len(runs)))
    (drop,) = [r for r in rows if r["method"] == "drop"]
    assert drop["tokens"] == 0 and drop["blocks"] == 2 and drop["ratio"] == 0.5
    assert drop["ppl_after"] == next(r for r in runs if r["method"] == "shortgpt_lora")["ppl_init"]
    target = result["meta"]["budget_params"]
    for r in runs:
        assert abs(r["trainable_params"] - target) <= 0.05 * target, r
        assert r["tokens"] <= r["budget"], r
    for budget in (4 * 2 * 32, 6 * 2 * 32):
        for method in ("flexigpt", "flexigpt_paper", "shortgpt_lora"):
            first = [r for r in runs if (r["budget"], r["method"], r["seed"]) == (budget, method, 0)]
            second = [r for r in runs if (r["budget"], r["method"], r["seed"]) == (budget, method, 1)]
            assert len(first) == 2 and len(second) == 1
            assert second[0]["lr"] == min(first, key=lambda r: r["ppl_after"])["lr"]
    flex = [r for r in runs if r["method"] == "flexigpt"]
    # the fit recorded 2 sequences of 32 tokens; the heal then had the rest of the budget
    assert all(r["tokens"] == r["budget"] for r in runs if r["method"] != "flexigpt")
    assert all(r["tokens"] == r["budget"] for r in flex)  # 64 fit tokens = exactly one step of 2 x 32
    assert "LoRA rank" in flex[0]["options"] and "activation adapters" in flex[0]["options"]
    csv_path, md_path = write_results(result, tmp_path, "recovery")
    with open(csv_path) as f:
        assert [tuple(r) for r in csv.reader(f)][0] == COLUMNS
    md = md_path.read_text()
    assert "| flexigpt |" in md and "| shortgpt_lora |" in md and "Best per budget and method" in md


def test_recipe_with_functional_bases_prunes_the_same_blocks_and_says_so():
    """FlexiGPTRecipe(bases="functional") reaches prune(): the same blocks, bases chosen on the
    fit's records (no extra tokens), the choice named in the options; the CLI flag builds it."""
    import argparse

    from flexigpt_kernels.commands import compare as compare_cmd
    from flexigpt_kernels.train.compare_budget import _recipe_dict

    recipe = FlexiGPTRecipe(local_fit=LocalFit(steps=1), fit_samples=2, bases="functional")
    result = compare_recovery(
        tokens=3 * 2 * 32,
        lrs=(1e-2,),
        methods=("flexigpt",),
        recipe=recipe,
        model=tiny_llama(vocab=257),
        tokenizer=byte_tokenizer(),
        **TINY,
    )
    (run,) = [r for r in result["rows"] if r["method"] == "flexigpt"]
    assert run["options"].endswith("functional bases") and run["tokens"] == 3 * 2 * 32
    assert result["meta"]["recipe"]["bases"] == "functional"
    assert sorted(map(int, result["meta"]["recipe_base_map"])) == result["meta"]["pruned"]
    assert result["meta"]["recipe_prune_seconds"]["base_choice"] > 0
    own = compare_recovery(
        tokens=3 * 2 * 32,
        lrs=(1e-2,),
        methods=("flexigpt", "shortgpt_lora"),
        recipe=dataclasses.replace(recipe, select="recoverable"),
        model=tiny_llama(vocab=257),
        tokenizer=byte_tokenizer(),
        **TINY,
    )
    meta = own["meta"]
    assert len(meta["recipe_pruned"]) == len(meta["pruned"])  # its own blocks, as many
    assert sorted(map(int, meta["recipe_base_map"])) == meta["recipe_pruned"]
    by = {r["method"]: r for r in own["rows"]}
    assert by["flexigpt"]["blocks"] == by["shortgpt_lora"]["blocks"] and by["flexigpt"]["options"].endswith(
        "own blocks (recoverable)"
    )
    assert "bases" not in _recipe_dict(FlexiGPTRecipe())  # sweeps written before the option resume
    assert "select" not in _recipe_dict(FlexiGPTRecipe())
    with pytest.raises(ValueError, match="bases"):
        FlexiGPTRecipe(bases="function")
    with pytest.raises(ValueError, match="select"):
        FlexiGPTRecipe(select="damage")
    p = argparse.ArgumentParser()
    compare_cmd.add_arguments(p)
    assert compare_cmd._recipe(p.parse_args(["--bases", "functional"])).bases == "functional"
    assert compare_cmd._recipe(p.parse_args(["--select", "recoverable"])).select == "recoverable"
    assert compare_cmd._recipe(p.parse_args([])).bases == FlexiGPTRecipe().bases
    spread = compare_cmd._recipe(p.parse_args(["--rank-allocation", "spectrum"]))
    assert spread.local_fit.rank_allocation == "spectrum" and "ranks spread by spectrum" in spread.describe(9, 27)
    assert _recipe_dict(spread)["local_fit"]["rank_allocation"] == "spectrum"
    assert "rank_allocation" not in _recipe_dict(FlexiGPTRecipe())["local_fit"]  # older sweeps resume
    assert compare_cmd._recipe(p.parse_args(["--rank-allocation", "uniform", "--no-local-fit"])).local_fit is None


def _closest_multiple(step):
    return lambda rest: min((rest // step) * step, (rest // step + 1) * step, key=lambda n: (abs(n - rest), n))


def test_recipe_adapter_rank_moves_off_the_share_only_when_lora_steps_miss_the_budget():
    """SmolLM2 at ratio 0.2: 6 replaced blocks (61,056 adapter parameters per rank, 6,912
    gammas), 24 kept blocks (244,224 LoRA parameters per rank), budget 2,204,928 (rank 36).
    Share 0.5 gives rank 18: LoRA rank 4 or 5 lands 5.5% off either way, so the rank moves by
    two, where a LoRA rank fills the budget exactly (16 + LoRA 5 and 20 + LoRA 4 tie: the smaller)."""
    per_rank, fixed, target = 61_056, 6_912, 2_204_928
    lora = _closest_multiple(244_224)
    assert 18 * per_rank + fixed + lora(target - 18 * per_rank - fixed) == 2_082_816  # the failed sweep's count
    assert recipe_adapter_rank(18, per_rank, fixed, lora, target, 0.05) == 16
    # within tolerance at the share's rank: kept (the published sweeps at 0.3-0.5 stay as they were)
    assert recipe_adapter_rank(18, per_rank, fixed, _closest_multiple(1_000), target, 0.05) == 18
    # the budget taken by the adapters alone: no LoRA, the rank closest to it
    assert recipe_adapter_rank(40, per_rank, fixed, lora, target, 0.01) == 37


def test_compare_recovery_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown method"):
        compare_recovery(methods=("lora",), model=tiny_llama(vocab=257), tokenizer=byte_tokenizer(), **TINY)
    with pytest.raises(ValueError, match="adapter_share"):
        FlexiGPTRecipe(adapter_share=0.0)
    with pytest.raises(ValueError, match="no healing step"):
        compare_recovery(
            tokens=32,
            lrs=(1e-2,),
            methods=("flexigpt",),
            model=tiny_llama(vocab=257),
            recipe=FlexiGPTRecipe(local_fit=LocalFit(steps=1), fit_samples=2),
            tokenizer=byte_tokenizer(),
            **TINY,
        )


def test_recipe_without_local_fit_spends_the_whole_budget_on_healing_and_can_distill():
    recipe = FlexiGPTRecipe(local_fit=None, adapter_share=1.0)
    result = compare_recovery(
        tokens=2 * 2 * 32,
        lrs=(1e-2,),
        methods=("flexigpt",),
        recipe=recipe,
        distill="kl",
        model=tiny_llama(vocab=257),
        tokenizer=byte_tokenizer(),
        **TINY,
    )
    (run,) = [r for r in result["rows"] if r["method"] == "flexigpt"]
    assert run["tokens"] == 2 * 2 * 32 and run["options"].startswith("paper init")
    assert "LoRA" not in run["options"] and run["trainable_params"] == result["meta"]["budget_params"]
    assert "KL to the dense logits" in run["options"] and result["meta"]["distill"] == "kl"
    with pytest.raises(ValueError, match="distill"):
        compare_recovery(distill="mse", model=tiny_llama(vocab=257), tokenizer=byte_tokenizer(), **TINY)


def test_equal_memory_blocks_keeps_at_least_the_flexigpt_storage():
    from flexigpt_kernels.convert.prune import prune, stored_parameters
    from flexigpt_kernels.train.compare import equal_memory_blocks

    model = tiny_llama(vocab=257)
    flex, _ = prune(copy.deepcopy(model), None, blocks=[1, 2], rank=4, local_fit=None, progress=False)
    stored = stored_parameters(flex)
    scores = [0.9, 0.2, 0.1, 0.8]  # block 2 scores lowest: dropped first
    chosen = equal_memory_blocks(model, [1, 2], scores, stored)
    assert chosen == [2]
    drop, _ = prune(copy.deepcopy(model), None, blocks=chosen, method="drop", progress=False)
    assert stored_parameters(drop) >= stored
    two, _ = prune(copy.deepcopy(model), None, blocks=[1, 2], method="drop", progress=False)
    assert stored_parameters(two) < stored  # dropping one more would store less
    with pytest.raises(ValueError, match="stores at least"):
        equal_memory_blocks(model, [1], scores, stored_parameters(model))


def test_frontier_sweep_writes_rows_plot_and_resumes(tmp_path):
    from flexigpt_kernels.train.frontier import frontier_summary, read_frontier_rows, run_frontier

    recipe = FlexiGPTRecipe(local_fit=LocalFit(steps=1), fit_samples=2, adapter_share=0.5)
    kw = {k: v for k, v in TINY.items() if k != "ratio"}
    logs = []
    common = dict(
        tokens=2 * 2 * 32,
        lrs=(1e-2,),
        seeds=(0, 1),
        recipe=recipe,
        out_dir=tmp_path,
        name="fr",
        param_tolerance=0.3,  # LoRA ranks are coarse on a 64-wide model
        model=tiny_llama(vocab=257),
        tokenizer=byte_tokenizer(),
    )
    result = run_frontier((0.25, 0.5), **common, **{**kw, "log": logs.append})
    rows = result["rows"]
    assert {r["run_ratio"] for r in rows} == {0.25, 0.5}
    for r in rows:
        assert r["stored_params"] > 0 and r["blocks"] is not None and r["ratio"] is not None
    dense = next(r for r in rows if r["method"] == "dense")
    at = {(r["run_ratio"], r["method"], r["seed"]): r for r in rows}
    # 0.5 prunes 2 of 4 blocks; equal memory drops one, storing at least FlexiGPT's parameters
    flex, same, eq = (at[(0.5, m, 0)] for m in ("flexigpt", "shortgpt_lora", "shortgpt_lora_eqmem"))
    assert flex["blocks"] == same["blocks"] == 2 and eq["blocks"] == 1
    assert same["stored_params"] < flex["stored_params"] <= eq["stored_params"] < dense["stored_params"]
    # FlexiGPT's storage is that of the saved model: LoRA merged; the replacements followed it
    # (the recipe's default shared LoRA), so no adapter grew
    from flexigpt_kernels.convert.prune import prune, stored_parameters
    from flexigpt_kernels.train import merge_lora, select_trainable
    from flexigpt_kernels.train.lora import share_kept_lora

    lora_rank = int(flex["options"].split("LoRA rank ")[1].split()[0])
    merged, _ = prune(
        tiny_llama(vocab=257),
        None,
        blocks=result["meta"]["ratios"]["0.5"]["pruned"],
        rank=2,
        local_fit=None,
        progress=False,
    )
    plain = stored_parameters(merged)
    select_trainable(merged, ("adapters", "lora_kept"), lora_rank=lora_rank)
    unshared = copy.deepcopy(merged)
    share_kept_lora(merged)
    merge_lora(merged)
    merge_lora(unshared)
    assert flex["stored_params"] == stored_parameters(merged) == plain < stored_parameters(unshared)
    assert eq["trainable_params"] == pytest.approx(result["meta"]["ratios"]["0.5"]["budget_params"], rel=0.3)
    assert at[(0.5, "drop", None)]["ppl_after"] == same["ppl_init"] and at[(0.5, "drop", None)]["tokens"] == 0
    # 0.25 prunes one block: no ShortGPT model stores as much as FlexiGPT there
    assert not any(k[0] == 0.25 and k[1] == "shortgpt_lora_eqmem" for k in at)
    assert any("not measured at this ratio" in line for line in logs)
    assert sum("dense held-out perplexity" in line for line in logs) == 1  # measured once per sweep
    summary = {e["run_ratio"]: e for e in frontier_summary(rows)}
    assert set(summary[0.5]["vs_equal_memory"]) == {0, 1} and not summary[0.25]["vs_equal_memory"]
    g = summary[0.5]["vs_same_blocks"][1]
    assert g == pytest.approx(
        (at[(0.5, "shortgpt_lora", 1)]["ppl_after"] - at[(0.5, "flexigpt", 1)]["ppl_after"])
        / at[(0.5, "shortgpt_lora", 1)]["ppl_after"]
    )
    for ext in ("csv", "json", "md", "png"):
        assert (tmp_path / f"fr.{ext}").stat().st_size > 0
    md = (tmp_path / "fr.md").read_text()
    assert "gain, equal memory" in md and "### ratio 0.5" in md
    assert len(read_frontier_rows(tmp_path / "fr.csv")) == len(rows)
    # resume: every run is there, nothing is set up or trained again
    logs.clear()
    again = run_frontier((0.25, 0.5), **common, **{**kw, "log": logs.append})
    assert sum("not repeated" in line for line in logs) == 2
    assert [r["ppl_after"] for r in again["rows"]] == pytest.approx([r["ppl_after"] for r in rows])
    # a sweep of some of the ratios keeps the others' rows in the files it rewrites
    run_frontier((0.5,), **common, **kw)
    assert {r["run_ratio"] for r in read_frontier_rows(tmp_path / "fr.csv")} == {0.25, 0.5}
    with pytest.raises(ValueError, match="other settings"):
        run_frontier((0.5,), **common, **{**kw, "seq_len": 16})
    # another recipe: refused unless asked; keep_baselines reuses the rows that do not depend on it
    other = {**common, "recipe": dataclasses.replace(recipe, gamma_lr=0.1)}
    with pytest.raises(ValueError, match="keep_baselines"):
        run_frontier((0.5,), **other, **kw)
    with pytest.raises(ValueError, match="other settings"):  # not when more than the recipe differs
        run_frontier((0.5,), **other, keep_baselines=True, **{**kw, "seq_len": 16})
    logs.clear()
    third = run_frontier((0.5,), **other, keep_baselines=True, **{**kw, "log": logs.append})
    new = {(r["method"], r["seed"]): r for r in third["rows"] if r["run_ratio"] == 0.5}
    for s in (0, 1):
        assert new[("shortgpt_lora", s)]["ppl_after"] == pytest.approx(at[(0.5, "shortgpt_lora", s)]["ppl_after"])
        assert "gamma lr 0.1" in new[("flexigpt", s)]["options"]
        assert "gamma lr" not in at[(0.5, "flexigpt", s)]["options"]
    assert sum("shortgpt_lora lr" in line and "done before" in line for line in logs) == 2
    assert not any("flexigpt lr" in line and "done before" in line for line in logs)


def test_hidden_distillation_reaches_both_methods():
    recipe = FlexiGPTRecipe(local_fit=None, adapter_share=1.0)
    result = compare_recovery(
        tokens=2 * 2 * 32,
        lrs=(1e-2,),
        methods=("flexigpt", "shortgpt_lora"),
        recipe=recipe,
        distill="kl+hidden",
        model=tiny_llama(vocab=257),
        tokenizer=byte_tokenizer(),
        **TINY,
    )
    runs = [r for r in result["rows"] if r["method"] in ("flexigpt", "shortgpt_lora")]
    assert len(runs) == 2
    for r in runs:
        assert "KL to the dense logits" in r["options"] and "block outputs matched" in r["options"]
    with pytest.raises(ValueError, match="distill"):
        compare_recovery(distill="hidden+mse", model=tiny_llama(vocab=257), tokenizer=byte_tokenizer(), **TINY)
