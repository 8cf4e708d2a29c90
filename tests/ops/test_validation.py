"""Bad input to shared_lora_linear fails before any kernel runs (the C++ kernel validates first;
the Python kernel validates before it picks a backend), with a ValueError (shapes, values) or
TypeError (types, dtypes, devices) whose message (validation.py) names the offending argument
and shows the shapes the caller passed."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from flexigpt_kernels import shared_lora_linear, use_backend
from flexigpt_kernels.ops import backends

M, K, N, R = 4, 16, 12, 3


class KernelLaunched(AssertionError):
    pass


@pytest.fixture
def no_kernels(monkeypatch):
    """Any attempt of the Python kernel to pick a backend fails the test (the C++ kernel checks
    its arguments before its first ATen call: test_cpp_backend.py)."""

    def forbidden(x):
        raise KernelLaunched("a backend was picked: validation let a bad input through")

    monkeypatch.setattr(backends, "for_call", forbidden)


def good(**overrides):
    """Valid operands (x [4, 16], weight [12, 16], lora_a [3, 16], lora_b [12, 3], bias,
    norm_weight, residual), with some replaced."""
    g = torch.Generator().manual_seed(0)
    args = {
        "x": torch.randn(M, K, generator=g),
        "weight": torch.randn(N, K, generator=g),
        "lora_a": torch.randn(R, K, generator=g),
        "lora_b": torch.randn(N, R, generator=g),
        "scale": 0.5,
        "bias": torch.randn(N, generator=g),
        "norm_weight": torch.ones(N),
        "eps": 1e-5,
        "residual": torch.randn(M, N, generator=g),
    }
    args.update(overrides)
    return args


def run(args):
    return shared_lora_linear(
        args["x"],
        args["weight"],
        args["lora_a"],
        args["lora_b"],
        args["scale"],
        args["bias"],
        norm_weight=args["norm_weight"],
        eps=args["eps"],
        residual=args["residual"],
    )


def pattern(*parts: str) -> str:
    """A regex matching the literal parts in this order, anything in between."""
    return ".*".join(re.escape(p) for p in parts)


# (id, overrides, exception type, literal message parts in order: argument name, shapes/values)
BAD = [
    (
        "K-mismatch",
        {"weight": torch.randn(N, K + 1)},
        ValueError,
        ["x's last dimension (16)", "weight", "(17)", "x (4, 16)", "weight (12, 17)"],
    ),
    (
        "K-mismatch-3d-x",
        {"x": torch.randn(2, 3, K - 1), "residual": None},
        ValueError,
        ["x's last dimension (15)", "x (2, 3, 15)", "weight (12, 16)"],
    ),
    ("lora_a-wrong-K", {"lora_a": torch.randn(R, K - 2)}, ValueError, ["lora_a", "[r, 16]", "(3, 14)"]),
    ("lora_a-1d", {"lora_a": torch.randn(K)}, ValueError, ["lora_a", "[r, 16]", "(16,)"]),
    ("lora_b-wrong-r", {"lora_b": torch.randn(N, R + 1)}, ValueError, ["lora_b", "[12, 3]", "(12, 4)"]),
    ("lora_b-transposed", {"lora_b": torch.randn(R, N)}, ValueError, ["lora_b", "[12, 3]", "(3, 12)"]),
    (
        "lora_b-wrong-N",
        {"lora_b": torch.randn(N + 1, R)},
        ValueError,
        ["lora_b", "[12, 3]", "weight (12, 16)", "lora_a (3, 16)", "(13, 3)"],
    ),
    (
        "rank-0",
        {"lora_a": torch.randn(0, K), "lora_b": torch.randn(N, 0)},
        ValueError,
        ["rank must be >= 1", "lora_a", "(0, 16)"],
    ),
    ("weight-1d", {"weight": torch.randn(K)}, ValueError, ["weight", "2-D", "(16,)"]),
    ("x-0d", {"x": torch.tensor(1.0), "residual": None}, ValueError, ["x", "at least one dimension", "()"]),
    ("norm_weight-size", {"norm_weight": torch.ones(N - 1)}, ValueError, ["norm_weight", "[12]", "(11,)"]),
    ("norm_weight-2d", {"norm_weight": torch.ones(1, N)}, ValueError, ["norm_weight", "[12]", "(1, 12)"]),
    ("bias-size", {"bias": torch.randn(N + 2)}, ValueError, ["bias", "[12]", "(14,)"]),
    ("bias-2d", {"bias": torch.randn(1, N)}, ValueError, ["bias", "[12]", "(1, 12)"]),
    (
        "residual-wrong-N",
        {"residual": torch.randn(M, N + 1)},
        ValueError,
        ["residual", "(4, 12)", "x (4, 16)", "weight (12, 16)", "(4, 13)"],
    ),
    (
        "residual-flattened-for-3d-x",
        {"x": torch.randn(2, 2, K), "residual": torch.randn(4, N)},
        ValueError,
        ["residual", "(2, 2, 12)", "x (2, 2, 16)", "(4, 12)"],
    ),
    ("eps-zero", {"eps": 0.0}, ValueError, ["eps", "positive", "0.0"]),
    ("eps-negative", {"eps": -1e-5}, ValueError, ["eps", "positive", "-1e-05"]),
    ("eps-nan", {"eps": float("nan")}, ValueError, ["eps", "nan"]),
    ("scale-inf", {"scale": float("inf")}, ValueError, ["scale", "finite", "inf"]),
    ("scale-nan", {"scale": float("nan")}, ValueError, ["scale", "finite", "nan"]),
    ("x-list", {"x": [[1.0] * K] * M}, TypeError, ["x must be a torch.Tensor", "list"]),
    ("weight-ndarray", {"weight": torch.randn(N, K).numpy()}, TypeError, ["weight must be a torch.Tensor", "ndarray"]),
    ("bias-list", {"bias": [0.0] * N}, TypeError, ["bias must be a torch.Tensor", "list"]),
    (
        "weight-fp16",
        {"weight": torch.randn(N, K, dtype=torch.float16)},
        TypeError,
        ["weight", "torch.float16", "x", "torch.float32"],
    ),
    (
        "lora_b-fp64",
        {"lora_b": torch.randn(N, R, dtype=torch.float64)},
        TypeError,
        ["lora_b", "torch.float64", "x", "torch.float32"],
    ),
    (
        "norm_weight-fp16",
        {"norm_weight": torch.ones(N, dtype=torch.float16)},
        TypeError,
        ["norm_weight", "torch.float16", "torch.float32"],
    ),
    (
        "residual-bf16",
        {"residual": torch.randn(M, N, dtype=torch.bfloat16)},
        TypeError,
        ["residual", "torch.bfloat16", "torch.float32"],
    ),
    (
        "K-zero",
        {"x": torch.randn(M, 0), "weight": torch.randn(N, 0), "lora_a": torch.randn(R, 0)},
        ValueError,
        ["weight", "N >= 1 and K >= 1", "weight (12, 0)", "x (4, 0)"],
    ),
    (
        "N-zero",
        {
            "weight": torch.randn(0, K),
            "lora_b": torch.randn(0, R),
            "bias": None,
            "norm_weight": None,
            "residual": torch.randn(M, 0),
        },
        ValueError,
        ["weight", "N >= 1 and K >= 1", "weight (0, 16)"],
    ),
    ("scale-str", {"scale": "0.5"}, ValueError, ["scale", "finite float", "'0.5'"]),
    (
        "x-int",
        {"x": torch.ones(M, K, dtype=torch.int64), "weight": torch.ones(N, K, dtype=torch.int64)},
        TypeError,
        ["x", "torch.int64", "supported"],
    ),
]


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
@pytest.mark.parametrize("overrides,exc,parts", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_before_any_kernel(no_kernels, backend, overrides, exc, parts):
    with use_backend(backend), pytest.raises(exc, match=pattern(*parts)):
        run(good(**overrides))


def _meta_supported() -> bool:
    try:
        torch.empty(N, K, device="meta")
    except Exception:  # pragma: no cover - meta tensors exist on every torch this package supports
        return False
    return True


@pytest.mark.parametrize("name", ["weight", "lora_a", "lora_b", "bias", "norm_weight", "residual"])
def test_device_mismatch_names_the_tensor(no_kernels, name):
    if not _meta_supported():
        pytest.skip("this torch cannot create tensors on the 'meta' device")
    args = good()
    args[name] = args[name].to("meta")
    with pytest.raises(TypeError, match=pattern(name, "meta", "x", "cpu")):
        run(args)


def test_x_on_another_device_than_the_rest(no_kernels):
    if not _meta_supported():
        pytest.skip("this torch cannot create tensors on the 'meta' device")
    args = good(x=torch.empty(M, K, device="meta"))
    with pytest.raises(TypeError, match=pattern("weight", "cpu", "x", "meta")):
        run(args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_guard_sees_valid_calls(no_kernels, backend):
    """The monkeypatch is what a valid call reaches: the tests above are not vacuous."""
    with use_backend(backend), pytest.raises(KernelLaunched):
        run(good())


def test_valid_optional_combinations_pass_validation():
    """The boundaries that are legal: no bias/norm/residual, rank 1, 1-D x, integer scale/eps."""
    args = good(bias=None, norm_weight=None, residual=None, lora_a=torch.randn(1, K), lora_b=torch.randn(N, 1))
    assert run(args).shape == (M, N)
    assert run(good(x=torch.randn(K), residual=torch.randn(N), scale=2, eps=1)).shape == (N,)
    assert run(good(scale=0.0)).shape == (M, N)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_numpy_scalars_for_scale_and_eps(backend):
    with use_backend(backend), torch.no_grad():
        expected = run(good(scale=0.5, eps=1e-5))
        for scale, eps in (
            (np.float32(0.5), np.float32(1e-5)),
            (np.float64(0.5), np.float64(1e-5)),
            (np.int64(1), 1e-5),
        ):
            out = run(good(scale=scale, eps=eps))
            if scale == 0.5:
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            assert out.shape == (M, N) and torch.isfinite(out).all()
