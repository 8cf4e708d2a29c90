"""Per-matrix adapter ranks within a block's parameter budget (convert/rank_allocation.py,
LocalFit(rank_allocation="spectrum")): the greedy allocation against brute force, the
activation-aware adapters it sizes, and a pruned model that saves and loads with them."""

import copy
import itertools

import pytest
import torch

from flexigpt_kernels.convert.adapter_init import activation_aware_adapters
from flexigpt_kernels.convert.dense_records import record_dense_blocks
from flexigpt_kernels.convert.families import decoder_layers, family_of
from flexigpt_kernels.convert.local_fit import LocalFit
from flexigpt_kernels.convert.prune import prune
from flexigpt_kernels.convert.rank_allocation import allocate_ranks
from flexigpt_kernels.convert.replacement import convert_blocks
from flexigpt_kernels.io import from_pretrained, save_pretrained
from flexigpt_kernels.nn import SharedLoRALinear

from .conftest import tiny_model

RANK = 8


def _remaining(spectra, ranks):
    """Sum over linears of the relative error a rank leaves: sum(s[r:]^2) / sum(s^2)."""
    return sum((s[ranks[n] :].pow(2).sum() / s.pow(2).sum()).item() for n, s in spectra.items())


def test_equal_widths_greedy_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    spectra = {
        "flat": torch.linspace(1.0, 0.9, 6),
        "steep": torch.tensor([10.0, 1.0, 0.5, 0.1, 0.05, 0.01]),
        "random": torch.rand(6, generator=g).sort(descending=True).values,
    }
    widths = dict.fromkeys(spectra, 10)
    for budget in range(30, 181, 10):
        ranks = allocate_ranks(spectra, widths, budget)
        assert sum(ranks[n] * widths[n] for n in ranks) <= budget
        best = min(
            _remaining(spectra, dict(zip(spectra, combo)))
            for combo in itertools.product(range(1, 7), repeat=3)
            if sum(combo) * 10 <= budget
        )
        assert _remaining(spectra, ranks) == pytest.approx(best, abs=1e-9)


def test_steep_spectrum_gives_ranks_to_flat_one_and_budget_is_spent():
    spectra = {"steep": torch.tensor([10.0, 0.1, 0.1, 0.1]), "flat": torch.ones(4)}
    widths = {"steep": 3, "flat": 5}
    ranks = allocate_ranks(spectra, widths, 3 + 3 * 5)
    assert ranks == {"steep": 1, "flat": 3}  # the steep one's 2nd rank is worth less than flat's 3rd
    ranks = allocate_ranks(spectra, widths, 4 * 3 + 4 * 5)
    assert ranks == {"steep": 4, "flat": 4}  # capped by the spectra's length, all spent
    # the wide linear's next rank is worth more but no longer fits: the narrow one's still does
    spectra = {"a": torch.tensor([1.0, 1.0, 0.01, 0.01]), "b": torch.tensor([1.0, 0.1, 0.1, 0.1])}
    assert allocate_ranks(spectra, {"a": 5, "b": 2}, 10) == {"a": 1, "b": 2}


def test_allocation_errors_name_the_problem():
    with pytest.raises(ValueError, match="below rank 1"):
        allocate_ranks({"a": torch.ones(3)}, {"a": 10}, 9)
    with pytest.raises(ValueError, match="different linears"):
        allocate_ranks({"a": torch.ones(3)}, {"b": 10}, 100)
    with pytest.raises(ValueError, match="rank_allocation must be one of"):
        LocalFit(rank_allocation="adaptive")
    with pytest.raises(ValueError, match="adapter_init='activation'"):
        LocalFit(adapter_init="svd", rank_allocation="spectrum")
    dense = tiny_model("llama", layers=4)
    tokens = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    rec = record_dense_blocks(dense, tokens, [1], batch_size=4, covariances=True, progress=False)
    with pytest.raises(ValueError, match="allocation must be one of"):
        activation_aware_adapters(dense, rec, {1: 0}, rank=RANK, allocation="adaptive")


def _adapter_params(factors):
    return {i: sum(a.numel() + b.numel() for a, b in per.values()) for i, per in factors.items()}


def test_spectrum_adapters_spend_the_uniform_budget_with_less_weighted_error():
    dense = tiny_model("llama", layers=4)
    tokens = torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    rec = record_dense_blocks(dense, tokens, [1, 2], batch_size=4, covariances=True, progress=False)
    base_map = {1: 0, 2: 3}
    uni, s_uni = activation_aware_adapters(dense, rec, base_map, rank=RANK)
    spr, s_spr = activation_aware_adapters(dense, rec, base_map, rank=RANK, allocation="spectrum")
    family = family_of(dense)
    widths = {n: sum(decoder_layers(dense)[0].get_submodule(n).weight.shape) for n in family.linears}
    for i in base_map:
        budget = _adapter_params(uni)[i]
        assert budget - min(widths.values()) < _adapter_params(spr)[i] <= budget
        ranks = [s_spr[i][n]["rank"] for n in family.linears]
        assert len(set(ranks)) > 1 and all(s_uni[i][n]["rank"] == RANK for n in family.linears)
        for n in family.linears:
            a, b = spr[i][n]
            assert a.shape[0] == b.shape[1] == s_spr[i][n]["rank"]
        assert sum(s_spr[i][n]["activation"] for n in family.linears) < sum(
            s_uni[i][n]["activation"] for n in family.linears
        )


def test_prune_with_spectrum_ranks_saves_and_loads(tmp_path):
    dense = tiny_model("llama", layers=4)
    tokens = torch.randint(3, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    fit = dict(rank_allocation="spectrum", steps=1, batch_size=2)
    model, rep = prune(copy.deepcopy(dense), tokens, blocks=[1, 2], rank=RANK, local_fit=fit, progress=False)
    fit_uniform = dict(fit, rank_allocation="uniform")
    uniform, _ = prune(copy.deepcopy(dense), tokens, blocks=[1, 2], rank=RANK, local_fit=fit_uniform, progress=False)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, SharedLoRALinear)}
    assert len(set(ranks.values())) > 1
    assert model.flexigpt_meta["local_fit"]["rank_allocation"] == "spectrum"
    assert "rank_allocation" not in uniform.flexigpt_meta["local_fit"]
    n_adapters = lambda m: sum(  # noqa: E731
        x.rank * (x.in_features + x.out_features) for x in m.modules() if isinstance(x, SharedLoRALinear)
    )
    narrowest = min(m.in_features + m.out_features for m in model.modules() if isinstance(m, SharedLoRALinear))
    assert n_adapters(uniform) - narrowest < n_adapters(model) <= n_adapters(uniform)
    save_pretrained(model, tmp_path / "ckpt")
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert f"| adapter rank | {min(ranks.values())}-{max(ranks.values())}, per linear |" in card
    loaded = from_pretrained(tmp_path / "ckpt")
    assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, SharedLoRALinear)} == ranks
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens[:2]).logits, model(tokens[:2]).logits)


def test_convert_blocks_checks_ranks_before_touching_the_model():
    model = tiny_model("llama", layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [
        ({1: {"mlp.up_proj": 0}}, r"ranks\['mlp.up_proj'\] = 0: expected an int in \[1, 64\]"),
        ({1: {"self_attn.k_proj": 33}}, r"expected an int in \[1, 32\]"),
        ({1: {"mlp.fc9": 2}}, "not linears of this family"),
        ({3: {"mlp.up_proj": 2}}, r"blocks \[3\] are not in base_map"),
        ({1: {"mlp.up_proj": 2}, 2: {"mlp.down_proj": 99}}, "down_proj"),  # the second block's fault
    ]
    for ranks, message in bad:
        with pytest.raises(ValueError, match=message):
            convert_blocks(model, {1: 0, 2: 0}, rank=4, ranks=ranks)
        assert not any(isinstance(m, SharedLoRALinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    convert_blocks(model, {1: 0, 2: 0}, rank=4, ranks={2: {"self_attn.k_proj": 32}})
    assert decoder_layers(model)[2].self_attn.k_proj.rank == 32 and decoder_layers(model)[2].mlp.up_proj.rank == 4
