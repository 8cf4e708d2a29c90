"""Every backend of shared_lora_linear against the fp64 autograd reference, forward and every
gradient, on odd shapes, fp32 and fp16 (the interpreter), bf16 on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flexigpt_kernels import shared_lora_linear, shared_lora_linear_reference, use_backend
from flexigpt_kernels.ops import backends

from .helpers import TOL, as_double, assert_close_scaled, check_against_reference, grads_of, make_operands

# (leading dims of x, K, N, rank): M = 1, 3, 257, K and N not multiples of 16, ranks 1..64, 3-D x.
SHAPES = [((1,), 100, 120, 1), ((3,), 70, 90, 5), ((257,), 48, 80, 64), ((2, 3), 123, 123, 16)]
# (bias, norm, residual)
FLAGS = [(False, False, False), (True, False, False), (False, True, False), (True, True, True), (False, False, True)]

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 and CUDA run only on a GPU")


def _check(backend, lead, k, n, r, dtype, bias, norm, residual, device="cpu"):
    ops = make_operands(lead, k, n, r, dtype, bias=bias, norm=norm, residual=residual, device=device)
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    check_against_reference(backend, ops, grad_out, dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,k,n,r", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias,norm,residual", FLAGS, ids=["plain", "bias", "norm", "all", "residual"])
def test_matches_reference_forward_and_grads(backend, dtype, lead, k, n, r, bias, norm, residual):
    _check(backend, lead, k, n, r, dtype, bias, norm, residual)


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "lead,k,n,r", SHAPES + [((8,), 4096, 4096, 256), ((512,), 576, 1536, 32)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("bias,norm,residual", FLAGS, ids=["plain", "bias", "norm", "all", "residual"])
def test_matches_reference_on_gpu(backend, dtype, lead, k, n, r, bias, norm, residual):
    _check(backend, lead, k, n, r, dtype, bias, norm, residual, device="cuda")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_wide_row_at_m1_norm_spans_many_tiles(backend):
    """Hidden size 8192 at M = 1: no program holds a whole row; the norm merges 128 tiles."""
    _check(backend, (1,), 32, 8192, 4, torch.float32, True, True, True)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_norm_statistics_survive_a_large_mean(backend):
    """Rows with mean ~1e3 and unit spread: E[y^2] - E[y]^2 in fp32 would lose the variance;
    the Chan merge of per-tile (mean, M2) keeps it."""
    ops = make_operands((40,), 64, 300, 4, torch.float32, bias=True, norm=True, residual=False)
    with torch.no_grad():
        ops["bias"].add_(1000.0)
    expected = shared_lora_linear_reference(
        *[as_double(ops)[k] for k in ("x", "weight", "lora_a", "lora_b")],
        0.7,
        as_double(ops)["bias"],
        norm_weight=as_double(ops)["norm_weight"],
    )
    with use_backend(backend), torch.no_grad():
        out = shared_lora_linear(
            ops["x"], ops["weight"], ops["lora_a"], ops["lora_b"], 0.7, ops["bias"], norm_weight=ops["norm_weight"]
        )
    assert_close_scaled(out, expected, 1e-3, "normalized output")


def test_triton_small_tiles_merge_statistics_across_tiles():
    """Force 16-wide tiles so every row's statistics come from 7 partial tiles (last one ragged)."""
    from flexigpt_kernels.ops.reference import reference_forward
    from flexigpt_kernels.ops.triton import shared_lora_linear as triton_backend
    from flexigpt_kernels.ops.triton.linear_lora import TileConfig

    ops = make_operands((33,), 40, 100, 3, torch.float32)
    args = [ops[k].detach() for k in ("x", "weight", "lora_a", "lora_b")]
    cfg = TileConfig(block_m=16, block_n=16, block_k=16, group_m=2)
    got = triton_backend.forward(
        *args, 0.7, ops["bias"].detach(), ops["norm_weight"].detach(), 1e-5, ops["residual"].detach(), True, config=cfg
    )
    want = reference_forward(
        *args, 0.7, ops["bias"].detach(), ops["norm_weight"].detach(), 1e-5, ops["residual"].detach()
    )
    for name in ("out", "shrink", "y_pre", "mean", "rstd"):
        assert_close_scaled(getattr(got, name), getattr(want, name), 1e-4, name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_non_contiguous_inputs(backend):
    """x, weight and the adapters as transposed / strided views; results equal the contiguous ones."""
    base = make_operands((6,), 40, 24, 4, torch.float32, residual=True)
    x_t = base["x"].detach().t().contiguous().t().requires_grad_()  # [M, K] with strides (1, M)
    w_t = base["weight"].detach().t().contiguous().t().requires_grad_()  # [N, K] with strides (1, N)
    a_big = torch.zeros(4, 80)
    a_big[:, ::2] = base["lora_a"].detach()
    a_strided = a_big[:, ::2].requires_grad_()  # [r, K] with stride 2
    res_t = base["residual"].detach().t().contiguous().t().requires_grad_()
    assert not x_t.is_contiguous() and not w_t.is_contiguous() and not a_strided.is_contiguous()
    ops = dict(base, x=x_t, weight=w_t, lora_a=a_strided, residual=res_t)
    grad_out = torch.randn(6, 24)
    expected, expected_grads = grads_of(shared_lora_linear_reference, as_double(ops), grad_out.double())
    with use_backend(backend):
        out, out_grads = grads_of(shared_lora_linear, ops, grad_out)
    assert_close_scaled(out, expected, TOL[torch.float32], "output")
    for name, g in out_grads.items():
        assert_close_scaled(g, expected_grads[name], TOL[torch.float32], f"grad {name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_shared_weight_gradient_sums_over_users(backend):
    """One weight used by two layers with their own adapters: its gradient is the sum."""
    first = make_operands((5,), 24, 20, 2, torch.float32, seed=0)
    second = make_operands((5,), 24, 20, 3, torch.float32, seed=1)
    second["weight"] = first["weight"]
    g1, g2 = torch.randn(5, 20), torch.randn(5, 20)
    with use_backend(backend):
        from .helpers import call

        out = (call(shared_lora_linear, first) * g1).sum() + (call(shared_lora_linear, second) * g2).sum()
        (gw,) = torch.autograd.grad(out, [first["weight"]])
    _, e1 = grads_of(shared_lora_linear_reference, as_double(first), g1.double())
    second_d = as_double(second)
    _, e2 = grads_of(shared_lora_linear_reference, second_d, g2.double())
    assert_close_scaled(gw, e1["weight"] + e2["weight"], TOL[torch.float32], "shared weight grad")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_frozen_weight_gets_no_gradient_and_inference_saves_nothing(backend):
    ops = make_operands((4,), 16, 12, 2, torch.float32, weight_grad=False)
    with use_backend(backend):
        out, grads = grads_of(shared_lora_linear, ops, torch.ones(4, 12))
        assert "weight" not in grads and ops["weight"].grad is None
        with torch.no_grad():
            again = shared_lora_linear(
                ops["x"],
                ops["weight"],
                ops["lora_a"],
                ops["lora_b"],
                0.7,
                ops["bias"],
                norm_weight=ops["norm_weight"],
                residual=ops["residual"],
            )
    assert torch.equal(out.detach(), again)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("FLEXIGPT_BACKEND", "reference")
    assert backends.resolve(cpu, torch.float32) == "reference"
    monkeypatch.setenv("FLEXIGPT_BACKEND", "triton")
    assert backends.resolve(cpu, torch.float32) == "triton"  # TRITON_INTERPRET=1 in this suite
    with pytest.raises(TypeError, match="float64"):
        backends.resolve(cpu, torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backends.resolve(cpu, torch.float32)
    monkeypatch.setenv("FLEXIGPT_BACKEND", "magic")
    with pytest.raises(ValueError, match="unknown backend 'magic'"):
        backends.resolve(cpu, torch.float32)
    monkeypatch.setenv("FLEXIGPT_BACKEND", "auto")
    assert backends.resolve(torch.device("cuda"), torch.float16) == (
        "cuda" if backends.available_backends()["cuda"] else "triton"
    )
    with use_backend("cpp"), pytest.raises(RuntimeError, match="'cuda'"):
        backends.resolve(torch.device("cuda"), torch.float16)  # cpp is the CPU kernel
    with use_backend("cuda"), pytest.raises(RuntimeError, match="CPU tensors"):
        backends.resolve(cpu, torch.float32)
    with use_backend("reference"):
        monkeypatch.setenv("FLEXIGPT_BACKEND", "triton")
        assert backends.resolve(cpu, torch.float32) == "reference"


def test_explicit_cpp_without_the_extension_is_an_error_not_the_reference(monkeypatch):
    """The cpp route's reference covers only the dtypes cpp does not take (fp16, fp64); an
    explicit cpp request for fp32 with no extension built says so instead of running slower."""
    unbuilt = dataclasses.replace(backends.REGISTRY["cpp"], built=lambda: False)
    monkeypatch.setitem(backends.REGISTRY, "cpp", unbuilt)
    monkeypatch.setenv("FLEXIGPT_BACKEND", "auto")
    backends._resolved.cache_clear()
    try:
        cpu = torch.device("cpu")
        with use_backend("cpp"):
            with pytest.raises(RuntimeError, match="flexigpt_kernels._C is not built"):
                backends.resolve(cpu, torch.float32)
            assert backends.resolve(cpu, torch.float16) == "reference"  # not a cpp dtype: the route's fallback
        assert backends.resolve(cpu, torch.float32) == "reference"  # auto falls back quietly
    finally:
        monkeypatch.undo()
        backends._resolved.cache_clear()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("grad", [False, True])
def test_autocast_casts_inputs_once_and_keeps_backend_math(backend, grad):
    """Under torch.autocast(bf16) with fp32 parameters, the op runs in bf16 (all inputs cast
    to the autocast dtype) and matches the reference on the bf16-cast inputs."""
    ops = make_operands((5,), 24, 20, 3, torch.float32)
    with use_backend(backend), torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = shared_lora_linear(
            ops["x"],
            ops["weight"],
            ops["lora_a"],
            ops["lora_b"],
            0.7,
            ops["bias"],
            norm_weight=ops["norm_weight"],
            residual=ops["residual"],
        )
    assert out.dtype == torch.bfloat16
    cast = {k: v.detach().to(torch.bfloat16).double() if v is not None else None for k, v in ops.items()}
    expected = shared_lora_linear_reference(
        cast["x"],
        cast["weight"],
        cast["lora_a"],
        cast["lora_b"],
        0.7,
        cast["bias"],
        norm_weight=cast["norm_weight"],
        residual=cast["residual"],
    )
    assert_close_scaled(out, expected, TOL[torch.bfloat16], "autocast output")
    if grad:
        out.float().sum().backward()
        assert ops["lora_a"].grad is not None and ops["lora_a"].grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_strided_bias_and_norm_weight(backend):
    """bias and norm_weight as strided views (every other element of a longer vector)."""
    ops = make_operands((5,), 24, 20, 3, torch.float32)
    bias = torch.zeros(40)
    bias[::2] = ops["bias"].detach()
    gamma = torch.zeros(40)
    gamma[::2] = ops["norm_weight"].detach()
    ops = dict(ops, bias=bias[::2].requires_grad_(), norm_weight=gamma[::2].requires_grad_())
    grad_out = torch.randn(5, 20)
    expected, expected_grads = grads_of(shared_lora_linear_reference, as_double(ops), grad_out.double())
    with use_backend(backend):
        out, grads = grads_of(shared_lora_linear, ops, grad_out)
    assert_close_scaled(out, expected, TOL[torch.float32], "output")
    for name, g in grads.items():
        assert_close_scaled(g, expected_grads[name], TOL[torch.float32], f"grad {name}")


def test_float64_auto_uses_the_reference():
    assert backends.resolve(torch.device("cpu"), torch.float64) == "reference"
    assert backends.resolve(torch.device("cuda"), torch.float64) == "reference"
