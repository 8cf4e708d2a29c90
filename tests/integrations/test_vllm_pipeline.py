"""Pipeline parallelism of a FlexiGPT checkpoint: a replacement block must be on its base block's
stage (pure check over the base map and vLLM's stage ranges; no vLLM needed)."""

from __future__ import annotations

import pytest

from flexigpt_kernels.integrations.vllm.pipeline import check_pipeline_stages, stage_of

TWO_STAGES = [(0, 3), (3, 6)]


def test_stage_of_finds_the_range_and_refuses_a_block_outside():
    assert [stage_of(b, TWO_STAGES) for b in range(6)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="block 6 is in no pipeline stage"):
        stage_of(6, TWO_STAGES)


@pytest.mark.parametrize(
    "base_map, stages",
    [
        ({2: 1, 4: 3}, TWO_STAGES),
        ({1: 0, 2: 0, 5: 4}, TWO_STAGES),
        ({2: 1, 3: 1}, [(0, 6)]),  # one stage: anything goes
        ({}, TWO_STAGES),
    ],
)
def test_pairs_within_a_stage_pass(base_map, stages):
    check_pipeline_stages(base_map, stages)


def test_crossing_pairs_are_named_with_their_stages():
    with pytest.raises(ValueError) as info:
        check_pipeline_stages({2: 1, 3: 1, 5: 0}, TWO_STAGES)
    msg = str(info.value)
    assert "block 3 (stage 1) reads block 1 (stage 0)" in msg
    assert "block 5 (stage 1) reads block 0 (stage 0)" in msg
    assert "block 2" not in msg  # 2 -> 1 is within stage 0
    assert "stage 0: blocks 0-2, stage 1: blocks 3-5" in msg


def test_three_uneven_stages():
    stages = [(0, 3), (3, 7), (7, 10)]  # vLLM's partition of 10 blocks over 3 stages
    check_pipeline_stages({4: 6, 8: 9}, stages)
    with pytest.raises(ValueError, match=r"block 7 \(stage 2\) reads block 6 \(stage 1\)"):
        check_pipeline_stages({7: 6}, stages)
