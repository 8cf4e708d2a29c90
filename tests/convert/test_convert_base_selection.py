import json

import pytest
import torch

from flexigpt_kernels.convert import (
    COMBINE_MODES,
    choose_bases,
    decoder_layers,
    linear_names,
    lowrank_distance,
    truncated_svd,
)

from .conftest import tiny_model

F64 = torch.float64


def full_svd_distance(wi, wj, r):
    """docs/method.md section 3 computed the slow way: full SVDs of W^_i, W^_j and their difference."""

    def trunc(w):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :r] * s[:r]) @ vh[:r]

    r = min(r, *wi.shape)
    diff = trunc(wi) - trunc(wj)
    u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    residual = diff - (u[:, :r] * s[:r]) @ vh[:r]  # || W^_i - (W^_j + Delta_r(W^_i - W^_j)) ||_F
    return torch.linalg.matrix_norm(residual)


@pytest.mark.parametrize("m,n,r", [(24, 24, 4), (40, 16, 3), (16, 40, 5), (30, 20, 1), (12, 9, 5), (8, 6, 10)])
def test_thin_factor_distance_equals_full_svd(m, n, r):
    g = torch.Generator().manual_seed(m * 100 + n + r)
    wi, wj = torch.randn(m, n, generator=g, dtype=F64), torch.randn(m, n, generator=g, dtype=F64)
    fi, fj = truncated_svd(wi, r, method="exact", dtype=F64), truncated_svd(wj, r, method="exact", dtype=F64)
    expected = full_svd_distance(wi, wj, r)
    assert expected > 0 or min(m, n) <= r
    torch.testing.assert_close(lowrank_distance(fi, fj), expected, rtol=1e-9, atol=1e-10)
    # batched against several candidates, including itself (distance 0)
    batched = lowrank_distance(fi, [fj, fi])
    torch.testing.assert_close(batched[0], expected, rtol=1e-9, atol=1e-10)
    assert batched[1].abs() < 1e-10


def test_fp32_thin_factors_close_to_fp64_reference():
    g = torch.Generator().manual_seed(1)
    wi, wj = torch.randn(48, 32, generator=g), torch.randn(48, 32, generator=g)
    d = lowrank_distance(truncated_svd(wi, 6), truncated_svd(wj, 6))
    assert d.dtype == torch.float32
    torch.testing.assert_close(d.double(), full_svd_distance(wi.double(), wj.double(), 6), rtol=1e-5, atol=1e-5)


def test_lowrank_svd_factors_approximate_exact_on_decaying_spectrum():
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(80, 40, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(60, 40, generator=g, dtype=F64))
    w = (u * 0.7 ** torch.arange(40, dtype=F64)) @ v.T
    exact = truncated_svd(w, 5, method="exact", dtype=F64)
    rng = torch.get_rng_state()
    approx = truncated_svd(w, 5, method="lowrank", dtype=F64)
    assert torch.equal(torch.get_rng_state(), rng)  # own generator: the global RNG is untouched
    torch.testing.assert_close(approx.left @ approx.right.T, exact.left @ exact.right.T, rtol=0, atol=1e-8)
    again = truncated_svd(w.T, 5, method="lowrank", dtype=F64)  # wide matrices too
    torch.testing.assert_close(again.left @ again.right.T, (exact.left @ exact.right.T).T, rtol=0, atol=1e-8)
    assert torch.equal(truncated_svd(w, 5, method="lowrank").left, truncated_svd(w, 5, method="lowrank").left)


def test_truncated_svd_errors_and_rank_cap():
    assert truncated_svd(torch.randn(5, 3), 8).rank == 3
    with pytest.raises(ValueError, match="weight"):
        truncated_svd(torch.randn(5), 2)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(torch.randn(5, 3), 0)
    with pytest.raises(ValueError, match="method"):
        truncated_svd(torch.randn(5, 3), 1, method="qr")
    with pytest.raises(ValueError, match="differ"):
        lowrank_distance(truncated_svd(torch.randn(5, 3), 1), truncated_svd(torch.randn(3, 5), 1))


def _low_rank(shape, rank, g):
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) / rank**0.5


@torch.no_grad()
def _make_block3_from_block1(model, r):
    """Block 1: rank r/2 weights; block 3 = block 1 + a rank-r/2 perturbation (so W^_3 - W^_1 has
    rank <= r and its distance is 0); all other blocks keep their random full-rank init."""
    g = torch.Generator().manual_seed(7)
    layers = decoder_layers(model)
    for name in linear_names(model):
        w1 = layers[1].get_submodule(name).weight
        scale = w1.norm() / 4
        w1.copy_(_low_rank(w1.shape, r // 2, g) * scale / _low_rank(w1.shape, r // 2, g).norm())
        layers[3].get_submodule(name).weight.copy_(w1 + 0.3 * scale * _low_rank(w1.shape, r // 2, g) / w1.norm())


def test_rank_r_perturbation_of_a_kept_block_is_its_base():
    r = 4
    model = tiny_model("llama", layers=6)
    _make_block3_from_block1(model, r)
    res = choose_bases(model, [3, 4], rank=r, svd="exact", dtype=F64, progress=False)
    assert res.pruned == [3, 4] and res.kept == [0, 1, 2, 5]
    assert res.base_map[3] == 1
    assert res.distance(3, 1) < 1e-5  # fp32 weights: W_3 - W_1 has rank r only up to rounding
    assert min(res.distance(3, j) for j in (0, 2, 5)) > 1.0
    for name, table in res.per_matrix.items():
        assert table.shape == (2, 4) and table[0, 1] < 1e-5, name
    assert res.ties == []


def test_identical_candidates_are_reported_as_ties_and_lower_index_wins():
    model = tiny_model("llama", layers=6)
    _make_block3_from_block1(model, 4)
    with torch.no_grad():
        layers = decoder_layers(model)
        for name in linear_names(model):
            layers[5].get_submodule(name).weight.copy_(layers[1].get_submodule(name).weight)
    res = choose_bases(model, [3], rank=4, svd="exact", progress=False)
    assert res.base_map == {3: 1}
    assert res.ties == [(3, 1, 5)]
    assert res.distance(3, 1) == res.distance(3, 5)


@pytest.mark.parametrize("combine", COMBINE_MODES)
def test_combine_modes(combine):
    model = tiny_model("llama", layers=5)
    res = choose_bases(model, [1, 3], rank=4, combine=combine, progress=False)
    stacked = torch.stack(list(res.per_matrix.values()))
    scale = torch.stack([res.norms[n][[1, 3]] for n in res.per_matrix])[:, :, None]
    expected = {
        "sum": stacked.sum(0),
        "sum_sq": stacked.square().sum(0),
        "max": stacked.amax(0),
        "normalized_sum": (stacked / scale).sum(0),
    }[combine]
    torch.testing.assert_close(res.distances, expected)
    assert res.base_map == {i: res.kept[int(res.distances[k].argmin())] for k, i in enumerate(res.pruned)}
    json.dumps(res.to_dict())  # the report is JSON-ready
    for name, norm in res.norms.items():
        w = decoder_layers(model)[2].get_submodule(name).weight
        torch.testing.assert_close(norm[2].item(), w.norm().item(), rtol=1e-5, atol=0)


def test_matrices_subset_and_errors():
    model = tiny_model("llama", layers=4)
    res = choose_bases(model, [2], rank=2, matrices=["mlp.down_proj"], progress=False)
    assert list(res.per_matrix) == ["mlp.down_proj"]
    with pytest.raises(ValueError, match="combine"):
        choose_bases(model, [2], rank=2, combine="mean")
    with pytest.raises(ValueError, match="rank"):
        choose_bases(model, [2], rank=0)
    with pytest.raises(ValueError, match="matrices: block 0 has no linear 'mlp.nope'"):
        choose_bases(model, [2], rank=2, matrices=["mlp.nope"], progress=False)
    with pytest.raises(ValueError, match="matrices"):
        choose_bases(model, [2], rank=2, matrices="mlp.down_proj", progress=False)
    with pytest.raises(ValueError, match="cannot prune all"):
        choose_bases(model, [0, 1, 2, 3], rank=2, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        choose_bases(model, [4], rank=2, progress=False)


@pytest.mark.parametrize("model_type", ["phi3", "opt", "gemma3_text", "qwen2"])
def test_other_families(model_type):
    model = tiny_model(model_type, layers=4)
    res = choose_bases(model, [1, 2], rank=4, progress=False)
    assert set(res.per_matrix) == set(linear_names(model))
    assert set(res.base_map) == {1, 2} and set(res.base_map.values()) <= {0, 3}
    assert torch.isfinite(res.distances).all()
