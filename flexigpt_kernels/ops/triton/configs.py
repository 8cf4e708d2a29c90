"""Tile choices of the Triton GEMM (linear_lora.py): by regime, checked against shared memory,
and for prefill picked by measurement from a short fixed list (cached per shape).

Decode (M <= 64): recompute the shrink in every N tile, or compute it once beforehand?
    Fused, each of the cdiv(N, BLOCK_N) programs re-reads A [r, K]: A traffic = cdiv(N, BLOCK_N)
    * r * K elements against N * K for the base weight, i.e. a ratio of r / BLOCK_N. Separate,
    A is read once by a split-K shrink launch (one extra launch, M * r values written/read).
    Rule: fuse while next_pow2(r) <= BLOCK_N (A traffic at most the weight's, mostly L2 hits,
    and the [BLOCK_K, BLOCK_R] adapter tile keeps registers and shared memory bounded); above
    that (ranks > 64) run the separate shrink. That also bounds the fused tile's shared memory:
    fp32 at rank 1024 fused needed 327,680 bytes (over sm_80's 163 KB and sm_90's 227 KB).
Prefill (M > 64): the shrink is always separate, split over K so that a rank-32 shrink at
    M = 512 runs ~256 programs instead of 4.
Shared memory: the launcher estimates the pipelined operand tiles (num_stages copies of the
    [BM, BK] x tile, [BK, BN] weight tile and, fused, [BK, BR] adapter tile) and steps down
    stages, then BLOCK_K, until the estimate fits the device's opt-in limit (sm_80's when no
    device is known). `aot_check.py` compares the estimate with the compiled kernels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import triton

LORA_NONE, LORA_FUSED, LORA_PRECOMPUTED = 0, 1, 2

# At or below this many rows the decode tiles (short in M, wide in K) are used.
FUSED_SHRINK_MAX_M = 64
# Opt-in shared memory per block, bytes: sm_80 (A100) 163 KB, sm_90 (H100/H200) 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}
# Programs a split-K shrink aims for (about two waves on a 132-SM GPU), and the least K per split.
SPLIT_K_TARGET_PROGRAMS = 256
SPLIT_K_MIN_K = 256


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _wide(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def decode_config(dtype: torch.dtype) -> TileConfig:
    """Decode tiles: 16 rows, 64 columns, long K steps (weight-read bound); fp32 K steps of 32
    (an IEEE fp32 dot runs on FMA units from registers: 64-wide steps took 255 registers and
    spilled with the fused shrink)."""
    return TileConfig(
        block_m=16,
        block_n=64,
        block_k=32 if _wide(dtype) else 128,
        group_m=1,
        num_warps=8 if _wide(dtype) else 4,
        num_stages=4,
    )


#: prefill candidates, the first being the default (no measurement on the CPU or while tracing)
PREFILL_16BIT = (
    TileConfig(128, 128, 64, num_warps=8, num_stages=3),
    TileConfig(128, 64, 64, num_warps=4, num_stages=4),
    TileConfig(64, 128, 64, num_warps=4, num_stages=4),
    TileConfig(64, 64, 64, num_warps=4, num_stages=4),
)
PREFILL_FP32 = (  # 128-wide fp32 tiles need 8 warps: with 4 they spilled on sm_80
    TileConfig(64, 64, 32, num_warps=8, num_stages=3),
    TileConfig(128, 64, 32, num_warps=8, num_stages=3),
    TileConfig(64, 128, 32, num_warps=8, num_stages=3),
)


def prefill_candidates(dtype: torch.dtype) -> tuple[TileConfig, ...]:
    return PREFILL_FP32 if _wide(dtype) else PREFILL_16BIT


def default_config(m: int, dtype: torch.dtype, rank: int = 16) -> TileConfig:
    """The unmeasured choice by regime (rank is accepted for callers of the older signature)."""
    return decode_config(dtype) if m <= FUSED_SHRINK_MAX_M else prefill_candidates(dtype)[0]


def shrink_config(m: int, r: int, dtype: torch.dtype) -> TileConfig:
    """Tiles of the separate shrink s = x A^T [M, r]: N = r is small, so small N tiles."""
    bn = min(64, block_r(r))
    if m <= FUSED_SHRINK_MAX_M:
        return TileConfig(16, bn, 64, group_m=1, num_warps=4, num_stages=4)  # K 128 spilled at M 8 (sm_90a)
    return TileConfig(64, bn, 32 if _wide(dtype) else 64, group_m=8, num_warps=4, num_stages=3)


def split_k(m: int, n: int, k: int, cfg: TileConfig) -> int:
    """How many K slices a narrow GEMM (the shrink) splits into to fill the machine."""
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    return max(1, min(triton.cdiv(SPLIT_K_TARGET_PROGRAMS, tiles), k // SPLIT_K_MIN_K))


def use_fused_shrink(m: int, r: int, cfg: TileConfig) -> bool:
    """Decode: recompute the shrink per N tile only while its A traffic is at most the weight's."""
    return m <= FUSED_SHRINK_MAX_M and block_r(r) <= cfg.block_n


def smem_estimate(cfg: TileConfig, elsize: int, fused_r: int = 0) -> int:
    """Bytes of the pipelined operand tiles (x, weight, and the adapter tile when fused)."""
    per_stage = cfg.block_m * cfg.block_k + cfg.block_k * cfg.block_n + cfg.block_k * fused_r
    return cfg.num_stages * per_stage * elsize


@functools.cache
def _device_smem_limit(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", SMEM_LIMIT[80]))


def smem_limit(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return _device_smem_limit(device.index if device.index is not None else torch.cuda.current_device())
    return SMEM_LIMIT[80]


def fit_config(cfg: TileConfig, elsize: int, limit: int, fused_r: int = 0) -> TileConfig | None:
    """`cfg` with fewer stages, then a shorter K step, until the estimate fits; None if even
    2 stages of a 16-wide K step do not."""
    while smem_estimate(cfg, elsize, fused_r) > limit:
        if cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_k > 16:
            cfg = replace(cfg, block_k=cfg.block_k // 2)
        else:
            return None
    return cfg


_TUNED: dict = {}


def autotune_enabled() -> bool:
    return os.environ.get("FLEXIGPT_TRITON_AUTOTUNE", "1").lower() not in ("0", "false", "off", "no")


def tuned(
    key: tuple, candidates: Sequence[TileConfig], run: Callable[[TileConfig], None], device: torch.device
) -> TileConfig:
    """The fastest of `candidates` for `key`, measured once per process with triton's do_bench
    (on a CUDA device, outside graph capture, unless FLEXIGPT_TRITON_AUTOTUNE=0); otherwise
    the first. `run(cfg)` launches the kernel with that config."""
    if key in _TUNED:
        return _TUNED[key]
    if (
        len(candidates) == 1
        or device.type != "cuda"
        or not autotune_enabled()
        or torch.cuda.is_current_stream_capturing()
    ):
        return candidates[0]
    from triton.testing import do_bench

    times = [(do_bench(lambda c=c: run(c), warmup=5, rep=20), i) for i, c in enumerate(candidates)]
    best = candidates[min(times)[1]]
    _TUNED[key] = best
    return best
