"""OutputNorm: gamma * (y - mean(y)) / sqrt(var(y) + eps) over the last dim (no bias), an
optional residual add, its init and its argument errors."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels import OutputNorm, shared_lora_linear, use_backend
from flexigpt_kernels.nn import DEFAULT_GAMMA_INIT

from ..ops.helpers import TOL, assert_close_scaled

N = 10


def formula(y: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    y = y.double()
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return gamma.double() * (y - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_formula(eps):
    gamma = torch.rand(N) + 0.5
    norm = OutputNorm(N, init=gamma, eps=eps)
    y = torch.randn(2, 3, N) * 4 + 7
    out = norm(y)
    assert out.shape == y.shape and out.dtype == y.dtype
    assert_close_scaled(out, formula(y, gamma, eps), TOL[torch.float32], "output")


def test_residual_add():
    norm = OutputNorm(N, init=0.7)
    y, residual = torch.randn(4, N), torch.randn(4, N)
    assert_close_scaled(
        norm(y, residual=residual),
        residual.double() + formula(y, norm.weight, norm.eps),
        TOL[torch.float32],
        "output + residual",
    )
    assert torch.equal(norm(y, residual), residual + norm(y))


def test_init_float_default_and_tensor():
    assert torch.equal(OutputNorm(N).weight, torch.full((N,), DEFAULT_GAMMA_INIT))
    assert torch.equal(OutputNorm(N, init=2.5).weight, torch.full((N,), 2.5))
    init = torch.linspace(0.1, 1.0, N)
    norm = OutputNorm(N, init=init)
    assert torch.equal(norm.weight, init)
    assert norm.weight.data_ptr() != init.data_ptr()  # a copy: training gamma leaves init alone
    assert isinstance(norm.weight, torch.nn.Parameter) and norm.weight.requires_grad
    norm.reset_parameters(1.0)
    assert torch.equal(norm.weight, torch.ones(N))
    half = OutputNorm(N, init=init, dtype=torch.float16)
    assert half.weight.dtype == torch.float16
    assert list(norm.state_dict()) == ["weight"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"hidden_size": 0}, "hidden_size must be >= 1, got 0"),
        ({"hidden_size": -3}, "hidden_size must be >= 1, got -3"),
        ({"hidden_size": N, "eps": 0.0}, "eps must be positive, got 0.0"),
        ({"hidden_size": N, "eps": -1e-6}, "eps must be positive"),
        ({"hidden_size": N, "eps": float("nan")}, "eps must be positive, got nan"),
        ({"hidden_size": N, "init": torch.ones(N + 1)}, r"init must be a float or a tensor \[10\], got shape \(11,\)"),
        ({"hidden_size": N, "init": torch.ones(1, N)}, r"got shape \(1, 10\)"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OutputNorm(**kwargs)


def test_wrong_input_width():
    with pytest.raises(ValueError, match=r"OutputNorm\(10\) got input of shape \(2, 11\)"):
        OutputNorm(N)(torch.randn(2, N + 1))


def test_half_input_with_float_gamma_and_gradient():
    norm = OutputNorm(N, init=torch.rand(N) + 0.5)
    y = torch.randn(3, N)
    out = norm(y.half())
    assert out.dtype == torch.float16
    assert_close_scaled(out, formula(y, norm.weight, norm.eps), TOL[torch.float16], "fp16 output")
    out.float().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


def test_matches_the_fused_op_norm():
    """The module and the op's norm_weight path compute the same function."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 12, generator=g), torch.randn(N, 12, generator=g) / 4
    a, b, bias = torch.randn(2, 12, generator=g) / 4, torch.randn(N, 2, generator=g), torch.randn(N, generator=g)
    residual = torch.randn(5, N, generator=g)
    norm = OutputNorm(N, init=torch.rand(N, generator=g) + 0.5)
    with use_backend("reference"), torch.no_grad():
        fused = shared_lora_linear(x, w, a, b, 0.3, bias, norm_weight=norm.weight, eps=norm.eps, residual=residual)
        plain = shared_lora_linear(x, w, a, b, 0.3, bias)
        assert_close_scaled(fused, norm(plain, residual=residual), TOL[torch.float32], "op vs module")
