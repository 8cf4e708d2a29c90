"""CPU microbenchmark of shared_lora_linear at SmolLM2-135M widths (hidden 576, MLP 1536,
adapter rank 32), side by side per shape:

    op-<backend>    the fused op through each CPU backend that exists here ("reference";
                    "cpp" once the extension is built). "triton" on CPU is the interpreter:
                    thousands of times slower than compiled code and meaningless to time,
                    so it is left out; Triton is timed on a GPU.
    unfused-peft    what a user writes without this package: F.linear, shrink, expand, add,
                    F.layer_norm, residual add (flexigpt_kernels.ops.unfused_peft_style)
    dense-F.linear  the base matmul alone (+ bias): the floor the fused op is measured against

Run: .venv/bin/python -m pytest benchmarks --benchmark-only   (or `make bench`).
Formulas for the GFLOP/s and GB/s columns: see benchmarks/README.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexigpt_kernels import shared_lora_linear, use_backend
from flexigpt_kernels.ops import backends, unfused_peft_style

K, RANK, SCALE = 576, 32, 2.0
WIDTHS = [576, 1536]  # attention projection, MLP gate/up
ROWS = [1, 32, 512]   # decode, short prefill, long prefill / training micro-batch
CPU_BACKENDS = ["reference"] + (["cpp"] if backends.cpp_available() else [])
IMPLS = [f"op-{b}" for b in CPU_BACKENDS] + ["unfused-peft", "dense-F.linear"]


def flops(m: int, n: int, k: int = K, r: int = RANK) -> int:
    """Base GEMM + shrink + expand (the norm and the adds are O(M N), not counted)."""
    return 2 * m * k * n + 2 * m * r * (k + n)


def bytes_moved(m: int, n: int, norm: bool, residual: bool, elt: int = 4, k: int = K, r: int = RANK) -> int:
    """Minimum traffic of the fused op: read x, W, A, B, bias (+ gamma, + residual), write y."""
    return elt * (m * k + n * k + r * (k + n) + n + (n if norm else 0) + (m * n if residual else 0) + m * n)


def operands(m: int, n: int, norm: bool, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, K, generator=g)
    weight = torch.randn(n, K, generator=g) * K ** -0.5
    a = torch.randn(RANK, K, generator=g) * K ** -0.5
    b = torch.randn(n, RANK, generator=g) * RANK ** -0.5
    bias = torch.randn(n, generator=g)
    gamma = torch.rand(n, generator=g) + 0.5 if norm else None
    residual = torch.randn(m, n, generator=g) if norm else None  # norm and residual come together in a block
    if grad:  # LoRA training: the shared weight is frozen, everything else learns
        for t in (x, a, b, bias, gamma, residual):
            if t is not None:
                t.requires_grad_()
    return x, weight, a, b, bias, gamma, residual


def forward_fn(impl: str, x, weight, a, b, bias, gamma, residual):
    if impl == "dense-F.linear":
        return lambda: F.linear(x, weight, bias)
    if impl == "unfused-peft":
        return lambda: unfused_peft_style(x, weight, a, b, SCALE, bias, norm_weight=gamma, residual=residual)
    backend = impl.removeprefix("op-")

    def run():
        with use_backend(backend):
            return shared_lora_linear(x, weight, a, b, SCALE, bias, norm_weight=gamma, residual=residual)

    return run


def _iterations(m: int) -> int:
    return {1: 20, 32: 5}.get(m, 1)  # keep each timed call well above the timer's resolution


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", [False, True], ids=["linear", "norm+residual"])
@pytest.mark.parametrize("n", WIDTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("m", ROWS, ids=lambda m: f"M{m}")
def test_forward(benchmark, record, m, n, norm, impl):
    group = f"fwd M={m} K={K} N={n} r={RANK}{' norm+res' if norm else ''}"
    benchmark.group = group
    tensors = operands(m, n, norm)
    fn = forward_fn(impl, *tensors)
    with torch.no_grad():
        out = benchmark.pedantic(fn, rounds=15, iterations=_iterations(m), warmup_rounds=1)
    assert out.shape == (m, n)
    dense = impl == "dense-F.linear"
    record(benchmark, group=group, impl=impl,
           flops=2 * m * K * n if dense else flops(m, n),
           bytes_moved=bytes_moved(m, n, norm and not dense, norm and not dense))


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward(benchmark, record, impl):
    """One training step's op work at M = 512, N = 1536 with the norm: forward, then the
    gradients of x, A, B, bias, gamma, residual (the shared weight frozen)."""
    m, n = 512, 1536
    group = f"fwd+bwd M={m} K={K} N={n} r={RANK} norm+res"
    benchmark.group = group
    tensors = operands(m, n, norm=True, grad=True)
    dense = impl == "dense-F.linear"
    fn = forward_fn(impl, *tensors)
    x, _, a, b, bias, gamma, residual = tensors
    inputs = [x, bias] if dense else [x, a, b, bias, gamma, residual]
    grad_out = torch.randn(m, n)

    def step():
        return torch.autograd.grad(fn(), inputs, grad_out)

    grads = benchmark.pedantic(step, rounds=8, iterations=1, warmup_rounds=1)
    assert len(grads) == len(inputs)
    # backward ~ 2x the forward's matmul work (grad x; grad A, B; no grad W)
    record(benchmark, group=group, impl=impl,
           flops=3 * 2 * m * K * n if dense else 3 * flops(m, n),
           bytes_moved=3 * bytes_moved(m, n, not dense, not dense))
