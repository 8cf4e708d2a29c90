"""The C++ CPU kernels of the multi-slice (stacked) and epilogue ops (csrc/stacked.cpp,
csrc/epilogue.cpp) against their fp64 autograd references: output and every gradient in fp32
and bf16 on odd shapes (M = 1, widths not multiples of 16, rank 1, parts of different ranks,
strided operands), outputs near the ends of fp32's range through the epilogue's norm, that a
CPU call with cpp selected never enters Python, and the kernels' own argument checks."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels import shared_lora_linear_epilogue, shared_lora_linear_stacked, use_backend
from flexigpt_kernels.ops import epilogue, library, stacked
from flexigpt_kernels.ops.reference import (
    shared_lora_linear_epilogue_reference,
    shared_lora_linear_stacked_reference,
)

from . import test_stacked, test_stacked_epilogue
from .test_stacked import as_double, assert_output_and_grads

pytestmark = pytest.mark.skipif(not library.NATIVE_CPU, reason="the C++ extension flexigpt_kernels._C is not built")

STACKED_SHAPES = [
    ((1,), 100, (40, 24, 24), (1, 3, 5)),  # decode, q/k/v-like widths, rank 1
    ((3,), 70, (90, 17), (4, 1)),  # gate/up-like, widths and K not multiples of 16
    ((2, 3), 33, (31,), (2,)),  # one part, 3-D x
    ((257,), 48, (64, 36, 20), (8, 16, 2)),  # a prefill-sized M split over threads
]
EPILOGUE_SHAPES = [((1,), 100, 120, 1), ((3,), 70, 90, 5), ((2, 3), 33, 47, 16), ((257,), 48, 77, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,k,widths,ranks", STACKED_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_stacked_kernel_matches_reference(dtype, lead, k, widths, ranks, bias):
    ops = test_stacked.operands(lead, k, widths, ranks, dtype, bias=bias)
    grad_out = torch.randn(*lead, sum(widths), generator=torch.Generator().manual_seed(1)).to(dtype)
    expected, expected_grads = test_stacked.run(shared_lora_linear_stacked_reference, as_double(ops), grad_out.double())
    with use_backend("cpp"):
        out, grads = test_stacked.run(shared_lora_linear_stacked, ops, grad_out)
    assert_output_and_grads(out, grads, expected, expected_grads, dtype)


def test_stacked_kernel_reads_adapter_views_and_strided_gradients():
    """A_i as row views of one buffer (the vLLM layout, read in place), a transposed grad_out."""
    ops = test_stacked.operands((5,), 37, (23, 9, 9), (3, 1, 2), torch.float32)
    buf = torch.cat([a.detach() for a in ops["lora_as"]]).requires_grad_()
    ops["lora_as"] = list(buf.split([3, 1, 2]))
    grad_out = torch.randn(41, 5).t()  # [5, 41] with column stride 5
    expected, expected_grads = test_stacked.run(shared_lora_linear_stacked_reference, as_double(ops), grad_out.double())
    with use_backend("cpp"):
        out, grads = test_stacked.run(shared_lora_linear_stacked, ops, grad_out)
    assert_output_and_grads(out, grads, expected, expected_grads, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,k,n,r", EPILOGUE_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias,norm,residual", test_stacked_epilogue.FLAGS, ids=["plain", "bias", "norm", "all"])
def test_epilogue_kernel_matches_reference(dtype, lead, k, n, r, bias, norm, residual):
    ops = test_stacked_epilogue.operands(lead, k, n, r, dtype, bias, norm, residual)
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    double = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in ops.items()}
    expected, expected_grads = test_stacked_epilogue.run(
        shared_lora_linear_epilogue_reference, double, grad_out.double()
    )
    with use_backend("cpp"):
        out, grads = test_stacked_epilogue.run(shared_lora_linear_epilogue, ops, grad_out)
    assert_output_and_grads(out, grads, expected, expected_grads, dtype)


def test_epilogue_kernel_with_strided_y0_and_residual():
    ops = test_stacked_epilogue.operands((6,), 20, 30, 2, torch.float32, True, True, True)
    with torch.no_grad():
        ops["y0"] = ops["y0"].detach().t().contiguous().t().requires_grad_()  # column-major [6, 30]
        ops["residual"] = ops["residual"].detach().t().contiguous().t().requires_grad_()
    grad_out = torch.randn(6, 30)
    double = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in ops.items()}
    expected, expected_grads = test_stacked_epilogue.run(
        shared_lora_linear_epilogue_reference, double, grad_out.double()
    )
    with use_backend("cpp"):
        out, grads = test_stacked_epilogue.run(shared_lora_linear_epilogue, ops, grad_out)
    assert_output_and_grads(out, grads, expected, expected_grads, torch.float32)


@pytest.mark.parametrize("magnitude", [1e19, 1e-19, 1e36])
def test_epilogue_norm_of_huge_and_tiny_outputs_matches_fp64(magnitude):
    """The epilogue's norm uses the single op's statistics: a row whose squared deviations
    overflow fp32 (y0 near 1e19, 1e36) gets the power-of-two rescaled pass; compared with an
    fp64 LayerNorm wherever fp32 represents rstd."""
    m, k, n = 3, 16, 576
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    y0 = torch.randn(m, n, generator=g) * magnitude
    lora_a, lora_b = torch.randn(2, k, generator=g), torch.randn(n, 2, generator=g)
    gamma = torch.rand(n, generator=g) + 0.5
    with use_backend("cpp"), torch.no_grad():
        out = shared_lora_linear_epilogue(y0, x, lora_a, lora_b, 0.5, norm_weight=gamma)
    y = y0.double() + 0.5 * (x.double() @ lora_a.double().t()) @ lora_b.double().t()
    expected = torch.nn.functional.layer_norm(y, (n,), gamma.double(), None, 1e-5)
    assert torch.isfinite(out).all()
    err = (out.double() - expected).abs().max().item()
    assert err <= 1e-4 * expected.abs().max().item(), f"{magnitude:g}: max error {err:.3e}"


def test_cpu_calls_with_cpp_selected_never_enter_python(monkeypatch):
    """With cpp selected, fp32 calls of both ops run C++ only; bf16 too; with reference
    selected (or fp16) they reach the Python kernels."""
    seen = []
    real_impl, real_upcast = stacked._impl, epilogue.upcast_for
    monkeypatch.setattr(stacked, "_impl", lambda x: seen.append("stacked") or real_impl(x))
    monkeypatch.setattr(epilogue, "upcast_for", lambda d, t: seen.append("epilogue") or real_upcast(d, t))
    x, w = torch.randn(4, 16), torch.randn(10, 16)
    parts = ([torch.randn(2, 16), torch.randn(1, 16)], [torch.randn(6, 2), torch.randn(4, 1)], [0.5, 2.0])
    y0, a, b, gamma = torch.randn(4, 10), torch.randn(3, 16), torch.randn(10, 3), torch.rand(10) + 0.5

    def both(dtype):
        c = [t.to(dtype) for t in (x, w, y0, a, b, gamma)]
        s = shared_lora_linear_stacked(
            c[0], c[1], [t.to(dtype) for t in parts[0]], [t.to(dtype) for t in parts[1]], parts[2]
        )
        e = shared_lora_linear_epilogue(c[2], c[0], c[3], c[4], 0.7, norm_weight=c[5])
        return s, e

    with use_backend("cpp"):
        native = both(torch.float32)
        both(torch.bfloat16)
    assert seen == []
    with use_backend("cpp"):
        both(torch.float16)  # no C++ kernel for fp16: the reference, through Python
    assert seen == ["stacked", "epilogue"]
    with use_backend("reference"):
        ref = both(torch.float32)
    assert seen[2:] == ["stacked", "epilogue"]
    for got, want in zip(native, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the kernels' own argument checks (the op called directly, no Python validation) ----------

STACKED_FWD = torch.ops.flexigpt.shared_lora_linear_stacked_fwd.default
EPILOGUE_FWD = torch.ops.flexigpt.shared_lora_linear_epilogue_fwd.default


def _stacked(**over):
    args = dict(
        x=torch.randn(2, 8),
        weight=torch.randn(7, 8),
        lora_as=[torch.randn(2, 8), torch.randn(1, 8)],
        lora_bs=[torch.randn(4, 2), torch.randn(3, 1)],
        scales=[1.0, 0.5],
        bias=torch.randn(7),
    )
    args.update(over)
    return tuple(args.values())


@pytest.mark.parametrize(
    "over,error,match",
    [
        (dict(lora_as=[torch.randn(0, 8), torch.randn(1, 8)]), ValueError, "part 0 has rank 0"),
        (dict(lora_bs=[torch.randn(4, 2), torch.randn(2, 1)]), ValueError, r"widths .* sum to 6, but weight"),
        (dict(scales=[1.0]), ValueError, "one entry per part"),
        (dict(scales=[1.0, float("inf")]), ValueError, r"scales\[1\] must be a finite float"),
        (dict(bias=torch.randn(6)), ValueError, r"bias must be \[N\] = \[7\]"),
        (dict(x=torch.randn(2, 9)), ValueError, r"x's last dimension \(9\) must equal weight's in_features K \(8\)"),
        (dict(x=torch.randn(2, 1, 8)), ValueError, "x must be 2-D"),
        (dict(lora_bs=[torch.randn(4, 2).double(), torch.randn(3, 1)]), TypeError, r"lora_bs\[0\] has dtype"),
    ],
)
def test_stacked_kernel_rejects_bad_arguments(over, error, match):
    with pytest.raises(error, match=match), torch.no_grad():
        STACKED_FWD(*_stacked(**over))


def _epilogue(**over):
    args = dict(
        y0=torch.randn(2, 6),
        x=torch.randn(2, 8),
        lora_a=torch.randn(2, 8),
        lora_b=torch.randn(6, 2),
        scale=1.0,
        bias=None,
        norm_weight=torch.rand(6),
        eps=1e-5,
        residual=None,
        save_for_backward=False,
    )
    args.update(over)
    return tuple(args.values())


@pytest.mark.parametrize(
    "over,error,match",
    [
        (dict(x=torch.randn(3, 8)), ValueError, "must share M"),
        (dict(lora_b=torch.randn(5, 2)), ValueError, r"lora_b must be \[N, r\] = \[6, 2\]"),
        (dict(norm_weight=torch.rand(5)), ValueError, r"norm_weight must be \[N\] = \[6\]"),
        (dict(residual=torch.randn(2, 5)), ValueError, r"residual must be \[M, N\]"),
        (dict(eps=0.0), ValueError, "eps must be a positive float"),
        (dict(scale=float("nan")), ValueError, "scale must be a finite float"),
        (dict(x=torch.randn(2, 8).double()), TypeError, "x has dtype Double but y0 has dtype Float"),
    ],
)
def test_epilogue_kernel_rejects_bad_arguments(over, error, match):
    with pytest.raises(error, match=match), torch.no_grad():
        EPILOGUE_FWD(*_epilogue(**over))
