"""The ahead-of-time compile check's collection step: the recording stand-in sees exactly the
launches the Triton backend makes, and triton's binder turns them into the specialisations a
GPU launch would compile. (Compiling is `make gpu-compile`; here at most one small kernel.)"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexigpt_kernels.ops.triton import aot_check, aot_specs, launch
from flexigpt_kernels.ops.triton.configs import SMEM_LIMIT, block_r, smem_estimate
from flexigpt_kernels.ops.triton.linear_lora import LORA_FUSED, LORA_NONE, LORA_PRECOMPUTED

ROOT = Path(__file__).resolve().parents[2]
GEMM, FINISH = "_linear_lora_kernel", "_norm_finish_kernel"
ROWS, COLUMNS = "_norm_backward_rows_kernel", "_norm_backward_columns_kernel"


def _names(case):
    return [(phase, ln.name, ln.kwargs.get("LORA_MODE")) for phase, ln in aot_specs.record(case)]


def test_decode_small_rank_is_one_fused_launch():
    assert _names(aot_specs.Case("bf16", 1, 256, 128, 16, backward=False)) == [("fwd", GEMM, LORA_FUSED)]


def test_decode_large_rank_runs_a_separate_shrink_then_the_gemm():
    got = _names(aot_specs.Case("bf16", 1, 256, 128, 256, norm=True, backward=False))
    assert got == [("fwd", GEMM, LORA_NONE), ("fwd", GEMM, LORA_PRECOMPUTED), ("fwd", FINISH, None)]


def test_prefill_forward_and_backward_launches():
    got = _names(aot_specs.Case("fp16", 100, 64, 48, 8, norm=True, residual=True))
    assert got == [
        ("fwd", GEMM, LORA_NONE),
        ("fwd", GEMM, LORA_PRECOMPUTED),
        ("fwd", FINISH, None),
        ("bwd", ROWS, None),
        ("bwd", COLUMNS, None),
        ("bwd", GEMM, LORA_NONE),
        ("bwd", GEMM, LORA_PRECOMPUTED),  # grad_x: shrink dy @ B, then the GEMM
        ("bwd", GEMM, LORA_NONE),
        ("bwd", GEMM, LORA_NONE),
        ("bwd", GEMM, LORA_NONE),  # grad_A, grad_B, grad_W
    ]


def test_residual_without_norm_is_in_the_gemm_epilogue():
    ((phase, ln),) = aot_specs.record(aot_specs.Case("bf16", 4, 64, 32, 8, bias=False, residual=True, backward=False))
    assert ln.kwargs["HAS_RESIDUAL"] and not ln.kwargs["STATS"]


def test_recording_runs_nothing_and_restores_the_launch():
    with launch.recording() as seen:
        aot_specs.record(aot_specs.Case("fp32", 2, 32, 32, 4, backward=False))
    assert seen == []  # the inner recording kept its own list
    assert launch._recorder is None


def test_specialisations_of_the_quick_matrix():
    """Every kernel of the backend appears, every regime (fused decode, separate shrink, prefill),
    both fp32 precisions, and every shared-memory estimate fits the smallest limit."""
    from triton.backends.compiler import GPUTarget

    cases = [
        aot_specs.Case("bf16", 1, 128, 128, 16, backward=False),
        aot_specs.Case("bf16", 1, 128, 128, 256, backward=False),
        aot_specs.Case("tf32", 80, 128, 128, 16, norm=True),
        aot_specs.Case("fp32", 1, 128, 128, 1024, norm=True, backward=False),
    ]
    specs = aot_specs.collect(cases, GPUTarget("cuda", 90, 32))
    assert {s.name for s in specs} == {GEMM, FINISH, ROWS, COLUMNS}
    gemms = [s for s in specs if s.name == GEMM]
    assert {s.kwargs["LORA_MODE"] for s in gemms} == {LORA_NONE, LORA_FUSED, LORA_PRECOMPUTED}
    assert {s.kwargs["IEEE_F32"] for s in gemms if s.case.dtype in ("fp32", "tf32")} == {True, False}
    for s in gemms:
        k = s.kwargs
        fused_r = k["BLOCK_R"] if k["LORA_MODE"] == LORA_FUSED else 0
        elsize = s.args[0].element_size()
        cfg = aot_specs_config(k)
        assert smem_estimate(cfg, elsize, fused_r) <= SMEM_LIMIT[80], s.label
    # fp32 at rank 1024 decodes with the separate shrink (its fused tile cannot fit)
    big = [s for s in gemms if s.case.r == 1024 and s.case.m == 1]
    assert big and all(s.kwargs["LORA_MODE"] != LORA_FUSED for s in big)
    assert block_r(1024) == 1024


def aot_specs_config(kwargs):
    from flexigpt_kernels.ops.triton.configs import TileConfig

    return TileConfig(
        kwargs["BLOCK_M"],
        kwargs["BLOCK_N"],
        kwargs["BLOCK_K"],
        kwargs["GROUP_M"],
        kwargs["num_warps"],
        kwargs["num_stages"],
    )


def test_binder_specialises_like_a_gpu_launch():
    """M = 1 and unit strides become constants; 16-divisible sizes get the divisibility hint."""
    from triton.backends.compiler import GPUTarget

    ((_, ln),) = aot_specs.record(aot_specs.Case("bf16", 1, 256, 128, 16, backward=False))
    signature, constexprs, attrs, options = aot_specs.specialise(
        ln.kernel, ln.args, ln.kwargs, GPUTarget("cuda", 80, 32)
    )
    names = aot_specs.jit_of(ln.kernel).arg_names
    assert signature["x_ptr"] == "*bf16" and signature["M"] == "constexpr" and signature["N"] == "i32"
    assert constexprs[(names.index("M"),)] == 1
    assert ["tt.divisibility", 16] in attrs[(names.index("N"),)]
    assert options.num_warps == ln.kwargs["num_warps"]


def test_occupancy_bound():
    assert aot_check.occupancy(90, 32, 0, 4) == 1.0  # threads-bound: 16 blocks of 4 warps
    assert aot_check.occupancy(90, 255, 0, 4) == 0.125  # registers: 65536 / (256 * 32 * 4) = 2 blocks of 4 warps
    assert aot_check.occupancy(80, 64, 100_000, 4) == pytest.approx(1 * 4 / 64)  # one block's shared memory


def test_problem_rules():
    row = aot_check.Row("k", "decode", "sm_80", shared=SMEM_LIMIT[80] + 1, registers=64, spills=8, default_regime=True)
    assert len(row.problems()) == 2
    row.default_regime = False
    assert row.problems() == [f"shared memory {SMEM_LIMIT[80] + 1} > {SMEM_LIMIT[80]} bytes"]
    assert aot_check.Row("k", "r", "sm_90a", shared=SMEM_LIMIT[80] + 1).problems() == []


@pytest.mark.slow
def test_one_kernel_compiles_for_sm90(tmp_path):
    """One real ahead-of-time compile (the row norm finish, the smallest kernel), in a process
    without TRITON_INTERPRET (the interpreter's patched triton.language cannot compile)."""
    script = """
from triton.backends.compiler import GPUTarget
from flexigpt_kernels.ops.triton import aot_check, aot_specs
launches = aot_specs.record(aot_specs.Case("bf16", 1, 64, 32, 4, norm=True, backward=False))
ln = next(ln for _, ln in launches if ln.name == "_norm_finish_kernel")
sig, constexprs, attrs, options = aot_specs.specialise(ln.kernel, ln.args, ln.kwargs, GPUTarget("cuda", 90, 32))
print(aot_check._compile((ln.kernel.fn.__module__, ln.name, 90, sig, constexprs, attrs, options.__dict__)))
"""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shared, regs, spills, warps, error = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert error == "" and regs > 0 and spills == 0 and warps == 4 and shared >= 0
