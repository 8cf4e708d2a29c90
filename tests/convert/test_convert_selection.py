import pytest
import torch

from flexigpt_kernels.convert import num_blocks_to_prune, select_blocks


def test_lowest_scores_sorted():
    scores = [0.9, 0.1, 0.5, 0.05, 0.7, 0.2]
    assert select_blocks(scores, ratio=0.5) == [1, 3, 5]
    assert select_blocks(torch.tensor(scores), ratio=0.34) == [1, 3]


@pytest.mark.parametrize(
    "ratio,num_blocks,k",
    [(0.3, 30, 9), (0.25, 6, 2), (0.5, 3, 2), (0.125, 4, 1), (0.01, 10, 1), (0.99, 10, 9), (0.4, 32, 13)],
)
def test_rounding_rule(ratio, num_blocks, k):
    # round half to even (0.25*6=1.5 -> 2; 0.5*3=1.5 -> 2), at least 1, at most L-1
    assert num_blocks_to_prune(ratio, num_blocks) == k
    assert len(select_blocks(torch.rand(num_blocks), ratio=ratio)) == k


def test_ties_prune_lower_index_first():
    assert select_blocks([0.2, 0.1, 0.1, 0.1, 0.5], ratio=0.4) == [1, 2]
    assert select_blocks([0.0] * 5, ratio=0.4) == [0, 1]


def test_explicit_blocks_validated_and_sorted():
    assert select_blocks(torch.zeros(6), blocks=[4, 1, torch.tensor(2)]) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"blocks: indices \[6\] out of range.*0\.\.5"):
        select_blocks(torch.zeros(6), blocks=[1, 6])
    with pytest.raises(ValueError, match=r"blocks: indices \[-1\]"):
        select_blocks(torch.zeros(6), blocks=[-1])
    with pytest.raises(ValueError, match=r"duplicate indices \[2\]"):
        select_blocks(torch.zeros(6), blocks=[2, 2])
    with pytest.raises(ValueError, match="cannot prune all 3"):
        select_blocks(torch.zeros(3), blocks=[0, 1, 2])
    with pytest.raises(ValueError, match="empty"):
        select_blocks(torch.zeros(3), blocks=[])
    with pytest.raises(ValueError, match="integer"):
        select_blocks(torch.zeros(3), blocks=[1.0])
    with pytest.raises(ValueError, match="integer"):
        select_blocks(torch.zeros(3), blocks=[True])


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1, 1.0, 1.5, float("nan"), "0.3", True])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        select_blocks(torch.zeros(10), ratio=ratio)


def test_exactly_one_of_ratio_and_blocks():
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(torch.zeros(10))
    with pytest.raises(ValueError, match=r"ratio=0\.3, blocks=\[1\]"):
        select_blocks(torch.zeros(10), ratio=0.3, blocks=[1])


def test_bad_scores():
    with pytest.raises(ValueError, match="scores: need at least 2"):
        select_blocks([0.5], ratio=0.5)
    with pytest.raises(ValueError, match=r"scores: NaN score for blocks \[1\]"):
        select_blocks([0.5, float("nan"), 0.1], ratio=0.5)
    with pytest.raises(ValueError, match="1-D"):
        select_blocks(torch.zeros(2, 3), ratio=0.5)
