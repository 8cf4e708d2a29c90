"""Functional base choice (convert/functional_bases.py) and prune(bases="functional") on tiny models."""

import copy

import pytest
import torch

from flexigpt_kernels.convert.base_selection import choose_bases
from flexigpt_kernels.convert.dense_records import block_errors, record_dense_blocks
from flexigpt_kernels.convert.families import decoder_layers
from flexigpt_kernels.convert.functional_bases import functional_bases
from flexigpt_kernels.convert.gamma_init import lsq_gamma
from flexigpt_kernels.convert.prune import prune
from flexigpt_kernels.convert.replacement import convert_blocks

from .conftest import tiny_model


def _tokens(n=6, seq=16, seed=0):
    return torch.randint(3, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _disguised_copy_with_small_decoy(copy_of=1, into=4, decoy=0, layers=6):
    """Block `into` computes exactly what block `copy_of` does, but its MLP weights are permuted
    along the intermediate dimension and rescaled (up x 5, down / 5): the same function with
    other weights. Block `decoy`'s weights are shrunk 1000x: it looks close to every block by
    the weight distance (base_selection.py's docstring) and computes almost nothing."""
    m = tiny_model("llama", layers=layers)
    layers_ = decoder_layers(m)
    src, dst = layers_[copy_of], layers_[into]
    dst.load_state_dict(src.state_dict())
    perm = torch.randperm(src.mlp.gate_proj.out_features, generator=torch.Generator().manual_seed(1))
    dst.mlp.gate_proj.weight.copy_(src.mlp.gate_proj.weight[perm])
    dst.mlp.up_proj.weight.copy_(src.mlp.up_proj.weight[perm] * 5.0)
    dst.mlp.down_proj.weight.copy_(src.mlp.down_proj.weight[:, perm] / 5.0)
    for p in layers_[decoy].parameters():
        if p.dim() == 2:
            p.mul_(1e-3)
    return m


def test_functional_choice_finds_a_disguised_copy_the_weight_distance_misses():
    m = _disguised_copy_with_small_decoy()
    x = _tokens()
    y_dense = m(x).logits
    records = record_dense_blocks(m, x, [4], batch_size=4, progress=False)
    choice = functional_bases(m, records, num_samples=None, progress=False)
    assert choice.base_map == {4: 1}
    d = dict(zip(choice.kept, choice.distances[0].tolist()))
    assert d[1] < 0.1 * min(v for k, v in d.items() if k != 1)
    assert choice.combine == "functional" and choice.seconds["functional"] > 0
    # the weight distance is drawn to the shrunk block
    assert choose_bases(m, [4], rank=8, progress=False).base_map == {4: 0}
    # scoring does not change the model
    torch.testing.assert_close(m(x).logits, y_dense, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "opt"])
def test_score_equals_the_block_error_of_a_zero_adapter_lsq_gamma_replacement(model_type):
    """D(i, j) is the block-local relative error of block i replaced with base j, adapters B = 0
    and the closed-form gammas, on the same recorded rows (odd batch split: 4 rows by 3)."""
    m = tiny_model(model_type, layers=5)
    records = record_dense_blocks(m, _tokens(), [1, 3], batch_size=4, progress=False)
    choice = functional_bases(m, records, num_samples=4, batch_size=3, progress=False)
    assert choice.pruned == [1, 3] and choice.kept == [0, 2, 4]
    assert choice.distances.shape == (2, 3)
    for j in choice.kept:
        mm = copy.deepcopy(m)
        convert_blocks(mm, {1: j, 3: 0 if j == 2 else 2}, rank=4, svd_init=False)
        lsq_gamma(mm, records, rows=slice(0, 4), batch_size=3, progress=False)
        err = block_errors(mm, records, rows=slice(0, 4), batch_size=3)
        assert choice.distance(1, j) == pytest.approx(err[1], rel=1e-5)


def test_prune_functional_uses_the_fit_records_and_reports_the_choice():
    m = _disguised_copy_with_small_decoy()
    x = _tokens(n=8)
    model, rep = prune(copy.deepcopy(m), x, blocks=[2, 4], rank=8, local_fit="full", bases="functional", progress=False)
    assert rep.base_map[4] == 1
    assert rep.combine == "functional"
    assert rep.base_distance[4] == pytest.approx(min(rep.base_distance[4], rep.base_distance[2]))
    assert "base_choice" in rep.seconds and "record" not in rep.seconds  # recorded once, for the fit
    assert model.flexigpt_meta["base_map"] == {"2": rep.base_map[2], "4": 1}
    # without a fit: records its own 4 sequences
    _, rep2 = prune(copy.deepcopy(m), x, blocks=[2, 4], rank=8, local_fit=None, bases="functional", progress=False)
    assert rep2.base_map == rep.base_map and "record" in rep2.seconds


def test_bad_input_raises_clear_errors():
    m = tiny_model("llama", layers=4)
    x = _tokens()
    no_attn = record_dense_blocks(m, x, [1], batch_size=4, attn=False, progress=False)
    with pytest.raises(ValueError, match="attn=True"):
        functional_bases(m, no_attn, progress=False)
    records = record_dense_blocks(m, x, [1], batch_size=4, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        functional_bases(m, records, num_samples=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        functional_bases(m, records, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="records: expected DenseRecords"):
        functional_bases(m, {"inputs": {}}, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        functional_bases(tiny_model("llama", layers=2), record_dense_blocks(m, x, [3], progress=False), progress=False)
    converted, _ = prune(copy.deepcopy(m), None, blocks=[2], rank=4, progress=False)
    with pytest.raises(ValueError, match="replacement blocks"):
        functional_bases(converted, records, progress=False)
    with pytest.raises(ValueError, match="bases: expected one of"):
        prune(copy.deepcopy(m), x, blocks=[1], bases="function", progress=False)
    with pytest.raises(ValueError, match="needs calibration"):
        prune(copy.deepcopy(m), None, blocks=[1], bases="functional", progress=False)


def test_least_damage_prefers_a_block_with_a_stand_in_and_iterates_on_the_kept_set():
    from flexigpt_kernels.convert.recoverable import least_damage

    inf = float("inf")
    # 4 blocks; block 2 matters most (BI 0.5) but block 1 reproduces it (D = 0.1): replacing 2
    # costs 0.05, less than replacing block 0 (BI 0.2, no stand-in), 1 (0.25 x 0.4) or 3 (BI 0.3)
    errors = torch.tensor(
        [[inf, 1.0, 1.0, 1.0], [1.0, inf, 0.4, 1.0], [1.0, 0.1, inf, 1.0], [1.0, 1.0, 1.0, inf]], dtype=torch.float64
    )
    bi = [0.2, 0.25, 0.5, 0.3]
    pruned, damage, passes = least_damage(bi, errors, 1)
    assert pruned == [2] and damage[2] == pytest.approx(0.05) and passes >= 1
    # two blocks: the first pass takes 1 and 2, each the other's stand-in; with both gone neither
    # has one, so the next pass takes 0 and 1 (1 replaced by the kept 2), which then repeats
    pruned, damage, passes = least_damage(bi, errors, 2)
    assert pruned == [0, 1] and damage[1] == pytest.approx(0.1) and passes == 2
    with pytest.raises(ValueError, match="errors"):
        least_damage(bi, errors[:3], 1)
    with pytest.raises(ValueError, match="k"):
        least_damage(bi, errors, 4)


def test_prune_select_recoverable_on_a_tiny_model():
    m = _disguised_copy_with_small_decoy(layers=6)
    x = _tokens(n=8)
    model, rep = prune(
        copy.deepcopy(m), x, ratio=0.34, rank=8, select="recoverable", bases="functional", progress=False
    )
    assert len(rep.pruned) == 2 and "selection" in rep.seconds
    # block 4 copies block 1: replacing one of them costs little, so one goes
    assert {1, 4} & set(rep.pruned)
    with pytest.raises(ValueError, match="select: expected one of"):
        prune(copy.deepcopy(m), x, ratio=0.3, select="damage", progress=False)
    with pytest.raises(ValueError, match="method=.flexigpt. only"):
        prune(copy.deepcopy(m), x, ratio=0.3, select="recoverable", method="drop", progress=False)
