"""pytest-benchmark view of the CPU kernel benchmark: shared_lora_linear at SmolLM2-135M widths
(rank 32), every implementation of a shape in one pytest-benchmark group, side by side.

The shapes, operands, implementations ("providers") and flops/bytes formulas are the library's
(flexigpt_kernels.bench, the code behind `flexigpt bench kernels`), so both report the same
thing; this file adds pytest-benchmark's statistics, --benchmark-compare and
--benchmark-autosave. Providers: op-<backend> per CPU backend (reference; cpp once built),
unfused-peft, dense (F.linear alone). Triton on CPU is the interpreter and is not timed.

Run: .venv/bin/python -m pytest benchmarks --benchmark-only
The grid with floors, ratios, CSV and plots: flexigpt bench kernels --quick (benchmarks/README.md).
"""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.bench import formulas
from flexigpt_kernels.bench.providers import DENSE, Operands, bench_callable, default_providers
from flexigpt_kernels.bench.shapes import WIDTHS, Shape

CPU = torch.device("cpu")
RANK, LAYERS = WIDTHS["smollm2"]
ROWS = [1, 32, 512]  # decode, short prefill, long prefill / training micro-batch
IMPLS = default_providers(CPU)


def _iterations(m: int) -> int:
    return {1: 20, 32: 5}.get(m, 1)  # keep each timed call well above the timer's resolution


def _record(record, benchmark, s: Shape, variant: str, mode: str, impl: str, group: str) -> None:
    norm = variant == "norm+res"
    dense = impl == DENSE
    record(
        benchmark,
        group=group,
        impl=impl,
        flops=formulas.dense_flops(s, mode) if dense else formulas.op_flops(s, norm, mode),
        bytes_moved=formulas.dense_bytes(s, mode, 4) if dense else formulas.op_bytes(s, norm, mode, 4),
        floor_factor=formulas.floor_factor(s, mode),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["linear", "norm+res"])
@pytest.mark.parametrize("layer", LAYERS, ids=lambda lnk: lnk[0])
@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
def test_forward(benchmark, record, m, layer, variant, impl):
    name, n, k = layer
    s = Shape("smollm2", name, m, k, n, RANK)
    group = f"fwd M={m} {n}x{k} r={RANK} {variant}"
    benchmark.group = group
    fn = bench_callable(impl, Operands(s, variant == "norm+res", grad=False, device=CPU, dtype=torch.float32), "fwd")
    out = benchmark.pedantic(fn, rounds=15, iterations=_iterations(m), warmup_rounds=1)
    assert out.shape == (m, n)
    _record(record, benchmark, s, variant, "fwd", impl, group)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, record, impl):
    """One adapter-training step of the MLP up projection at M = 512 with the norm: forward,
    then the gradients of x, A, B, gamma, residual (the shared weight frozen)."""
    name, n, k = LAYERS[1]
    s = Shape("smollm2", name, 512, k, n, RANK)
    group = f"fwd+bwd M=512 {n}x{k} r={RANK} norm+res"
    benchmark.group = group
    ops = Operands(s, True, grad=True, device=CPU, dtype=torch.float32)
    grads = benchmark.pedantic(bench_callable(impl, ops, "fwd+bwd"), rounds=8, iterations=1, warmup_rounds=1)
    assert len(grads) == len(ops.grad_inputs(impl))
    _record(record, benchmark, s, "norm+res", "fwd+bwd", impl, group)
