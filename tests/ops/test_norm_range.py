"""The output norm at the ends of fp32's range, Triton and reference paths: pre-norm outputs near
1e19 (their squares overflow fp32), 1e-19 (their squares underflow) and, for the Triton kernels,
1e36 (the variance itself overflows; rstd does not). Forward and every gradient are compared
with fp64 autograd, each tensor relative to its own largest entry (the gradients are ~1e-19 at
1e19). The C++ kernel's checks at these magnitudes are in test_cpp_backend.py."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels import shared_lora_linear, use_backend

from .helpers import TOL

NAMES = ("x", "weight", "lora_a", "lora_b", "bias", "norm_weight")


def _operands(magnitude: float, dtype: torch.dtype, m: int = 3, k: int = 16, n: int = 200, r: int = 2):
    """Pre-norm outputs y = x W^T + bias + 0.5 (x A^T) B^T of order `magnitude` (base, adapter and
    bias each contribute), gamma ~ U(0.5, 1.5); all require grad."""
    g = torch.Generator().manual_seed(1)
    ops = {
        "x": torch.randn(m, k, generator=g),
        "weight": torch.randn(n, k, generator=g) * (magnitude / k**0.5),
        "lora_a": torch.randn(r, k, generator=g) / k**0.5,
        "lora_b": torch.randn(n, r, generator=g) * (magnitude / r**0.5),
        "bias": torch.randn(n, generator=g) * magnitude,
        "norm_weight": torch.rand(n, generator=g) + 0.5,
    }
    return {key: v.to(dtype).requires_grad_() for key, v in ops.items()}, torch.randn(m, n, generator=g).to(dtype)


def _fp64_op(x, weight, lora_a, lora_b, scale, bias, norm_weight):
    """The op in fp64 through torch's LayerNorm: an independent check of the reference spec (whose
    fp32 autograd through var_mean would underflow rstd^3 at 1e19)."""
    y = x @ weight.t() + bias + scale * (x @ lora_a.t()) @ lora_b.t()
    return torch.nn.functional.layer_norm(y, (y.shape[-1],), norm_weight, None, 1e-5)


def _run(fn, ops, grad_out):
    out = fn(ops["x"], ops["weight"], ops["lora_a"], ops["lora_b"], 0.5, ops["bias"], norm_weight=ops["norm_weight"])
    grads = torch.autograd.grad(out, [ops[k] for k in NAMES], grad_out)
    return out, dict(zip(NAMES, grads))


def _assert_close_to_peak(actual, expected, tol, what):
    peak = expected.abs().max().item()
    assert peak > 0 and torch.isfinite(actual).all(), f"{what}: not finite, or a zero expectation"
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * peak, f"{what}: max error {err:.3e} > {tol:.0e} * peak {peak:.3e}"


def _check(backend, magnitude, dtype, tol):
    ops, grad_out = _operands(magnitude, dtype)
    exact = {k: v.detach().double().requires_grad_() for k, v in ops.items()}
    want, want_grads = _run(lambda *a, norm_weight: _fp64_op(*a, norm_weight), exact, grad_out.double())
    with use_backend(backend):
        got, got_grads = _run(shared_lora_linear, ops, grad_out)
    assert got.dtype == dtype
    _assert_close_to_peak(got, want, tol, f"{backend} {magnitude:g} output")
    for name in NAMES:
        _assert_close_to_peak(got_grads[name], want_grads[name], tol, f"{backend} {magnitude:g} grad {name}")


@pytest.mark.parametrize(
    "backend,magnitude",
    [("triton", 1e19), ("triton", 1e-19), ("triton", 1e36), ("reference", 1e19), ("reference", 1e-19)],
)
def test_fp32_norm_at_huge_and_tiny_outputs_matches_fp64(backend, magnitude):
    _check(backend, magnitude, torch.float32, 1e-4)


@pytest.mark.parametrize("magnitude", [1e36, 1e-30])
def test_fp64_reference_backend_keeps_fp64_at_1e36(magnitude):
    """fp64 inputs are computed in fp64 by the reference (not squeezed through fp32, where var
    overflows at 1e36 and the output collapses to zeros): forward and every gradient match torch's
    fp64 LayerNorm, the gradients to the fp32 precision of the saved row statistics."""
    _check("reference", magnitude, torch.float64, 1e-6)


@pytest.mark.parametrize("magnitude", [3e3, 1e-3])
def test_fp16_norm_near_the_ends_of_its_range_matches_fp64(magnitude):
    """fp16 cannot hold y_pre near 1e19 or 1e-19; at the largest and smallest magnitudes whose
    outputs it represents the fp32 statistics stay exact."""
    _check("triton", magnitude, torch.float16, TOL[torch.float16])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_constant_rows_at_1e19_normalise_to_zero(backend):
    """Every row the same value 1e19 (var = 0): out = 0, not 0 * inf = NaN, since the scale of the
    squares comes from the deviations, not from the values."""
    m, k, n = 2, 8, 70
    x = torch.randn(m, k)
    zero_w, lora_a, lora_b = torch.zeros(n, k), torch.randn(1, k), torch.zeros(n, 1)
    bias = torch.full((n,), 1e19)
    with use_backend(backend), torch.no_grad():
        out = shared_lora_linear(x, zero_w, lora_a, lora_b, 1.0, bias, norm_weight=torch.ones(n))
    assert torch.equal(out, torch.zeros(m, n))


def test_triton_statistics_merge_across_small_tiles_at_1e19():
    """16-wide tiles: each row merges 5 tiles' (mean, std) of very different means; the ramp
    takes var to ~5e38, past fp32 (rstd ~4e-20 is not)."""
    from flexigpt_kernels.ops.triton import shared_lora_linear as triton_backend
    from flexigpt_kernels.ops.triton.linear_lora import TileConfig

    ops, _ = _operands(1e19, torch.float32, m=5, n=70)
    args = [ops[k].detach() for k in ("x", "weight", "lora_a", "lora_b")]
    bias = ops["bias"].detach() + torch.linspace(-4e19, 4e19, 70)  # a different mean in every tile
    gamma = ops["norm_weight"].detach()
    cfg = TileConfig(block_m=16, block_n=16, block_k=16, group_m=2)
    got = triton_backend.forward(*args, 0.5, bias, gamma, 1e-5, None, True, config=cfg)
    x, w, a, b = (t.double() for t in args)
    y = x @ w.t() + bias.double() + 0.5 * (x @ a.t()) @ b.t()
    var, mean = torch.var_mean(y, dim=-1, correction=0)
    assert var.max() > torch.finfo(torch.float32).max
    _assert_close_to_peak(got.out, _fp64_op(x, w, a, b, 0.5, bias.double(), gamma.double()), 1e-4, "out")
    _assert_close_to_peak(got.mean, mean, 1e-5, "mean")
    _assert_close_to_peak(got.rstd, (var + 1e-5).rsqrt(), 1e-5, "rstd")
