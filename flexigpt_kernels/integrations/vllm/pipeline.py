"""Pipeline parallelism for FlexiGPT checkpoints: which base maps fit a stage partition
(plain Python; no vLLM import).

vLLM's pipeline parallelism gives each stage a contiguous range of decoder blocks
(``vllm.distributed.utils.get_pp_indices``: stage s holds blocks [start_s, end_s)). A
replacement block reads its base block's weights, so it can run only where its base is: every
pair (replacement i -> base j) of the checkpoint's base map must lie in one stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["check_pipeline_stages", "stage_of"]


def stage_of(block: int, stages: Sequence[tuple[int, int]]) -> int:
    """The stage whose [start, end) holds `block`."""
    for s, (start, end) in enumerate(stages):
        if start <= block < end:
            return s
    raise ValueError(f"block {block} is in no pipeline stage of {list(stages)}")


def check_pipeline_stages(base_map: Mapping[int, int], stages: Sequence[tuple[int, int]]) -> None:
    """Raise ValueError naming every replacement block whose base block is on another stage.

    base_map: {replacement block: base block}; stages: [(start, end)] per pipeline stage, in
    order, as vLLM partitions the blocks. Passes silently when every pair shares a stage."""
    crossing = []
    for i, j in sorted(base_map.items()):
        si, sj = stage_of(i, stages), stage_of(j, stages)
        if si != sj:
            crossing.append(f"block {i} (stage {si}) reads block {j} (stage {sj})")
    if crossing:
        ranges = ", ".join(f"stage {s}: blocks {a}-{b - 1}" for s, (a, b) in enumerate(stages))
        raise ValueError(
            f"pipeline parallelism: a replacement block must be on its base block's stage, but "
            f"{'; '.join(crossing)} ({ranges}). Choose another pipeline_parallel_size, set "
            f"VLLM_PP_LAYER_PARTITION so that each pair shares a stage, or use tensor parallelism"
        )
