"""The epilogue op (the single op with its base product y0 supplied) against its fp64 autograd
reference on every backend, forward and every gradient (y0, x, A, B, bias, gamma, residual),
fp32 and fp16, odd shapes; equality with the single op when y0 = x @ W.T; registration
(opcheck, torch.compile fullgraph) and argument errors."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels import shared_lora_linear, shared_lora_linear_epilogue, use_backend
from flexigpt_kernels.ops.reference import shared_lora_linear_epilogue_reference

from .helpers import TOL, assert_close_scaled, make_operands
from .test_stacked import assert_compiled_fullgraph_matches, assert_output_and_grads

SHAPES = [((1,), 100, 120, 1), ((3,), 70, 90, 5), ((2, 3), 33, 47, 16)]
FLAGS = [(False, False, False), (True, False, False), (False, True, False), (True, True, True)]
NAMES = ("y0", "x", "lora_a", "lora_b", "bias", "norm_weight", "residual")
FWD = torch.ops.flexigpt.shared_lora_linear_epilogue_fwd.default
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def operands(lead, k, n, r, dtype, bias, norm, residual):
    ops = make_operands(lead, k, n, r, dtype, bias=bias, norm=norm, residual=residual, weight_grad=False)
    with torch.no_grad():
        ops["y0"] = (ops["x"] @ ops.pop("weight").t()).requires_grad_()
    return ops


def run(fn, ops, grad_out, scale=0.7):
    out = fn(
        ops["y0"],
        ops["x"],
        ops["lora_a"],
        ops["lora_b"],
        scale,
        ops["bias"],
        norm_weight=ops["norm_weight"],
        residual=ops["residual"],
    )
    names = [k for k in NAMES if ops[k] is not None and ops[k].requires_grad]
    return out, dict(zip(names, torch.autograd.grad(out, [ops[k] for k in names], grad_out)))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,k,n,r", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias,norm,residual", FLAGS, ids=["plain", "bias", "norm", "all"])
def test_matches_reference_forward_and_grads(backend, dtype, lead, k, n, r, bias, norm, residual):
    ops = operands(lead, k, n, r, dtype, bias, norm, residual)
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    double = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in ops.items()}
    expected, expected_grads = run(shared_lora_linear_epilogue_reference, double, grad_out.double())
    with use_backend(backend):
        out, grads = run(shared_lora_linear_epilogue, ops, grad_out)
    assert_output_and_grads(out, grads, expected, expected_grads, dtype)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_equals_the_single_op_given_its_base_product(grad):
    ops = make_operands((5,), 40, 30, 4, torch.float32, weight_grad=False)
    if not grad:
        ops = {k: (v.detach() if v is not None else None) for k, v in ops.items()}
    args = (ops["lora_a"], ops["lora_b"], 0.7, ops["bias"])
    kw = dict(norm_weight=ops["norm_weight"], residual=ops["residual"])
    want = shared_lora_linear(ops["x"], ops["weight"], *args, **kw)
    got = shared_lora_linear_epilogue(ops["x"] @ ops["weight"].t(), ops["x"], *args, **kw)
    assert_close_scaled(got, want, 1e-5, "epilogue vs single op")


@pytest.mark.parametrize(
    "bias,norm,residual,save", [(True, True, True, True), (True, True, False, False), (False, False, True, False)]
)
def test_opcheck(bias, norm, residual, save):
    ops = operands((5,), 24, 20, 3, torch.float32, bias, norm, residual)
    torch.library.opcheck(
        FWD,
        (
            ops["y0"],
            ops["x"],
            ops["lora_a"],
            ops["lora_b"],
            0.7,
            ops["bias"],
            ops["norm_weight"],
            1e-5,
            ops["residual"],
            save,
        ),
    )


def test_compiles_fullgraph_forward_and_backward():
    ops = operands((6,), 16, 12, 2, torch.float32, True, True, True)
    assert_compiled_fullgraph_matches(shared_lora_linear_epilogue, run, ops, torch.randn(6, 12))


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(y0=torch.randn(3, 6)), ValueError, "share their leading dimensions"),
        (dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0)), ValueError, "rank must be >= 1"),
        (dict(lora_b=torch.randn(5, 2)), ValueError, r"lora_b must be \[N, r\] = \[6, 2\]"),
        (dict(norm_weight=torch.randn(5)), ValueError, r"norm_weight must be \[N\] = \[6\]"),
        (dict(residual=torch.randn(2, 5)), ValueError, "residual must have y0's shape"),
        (dict(x=torch.randn(2, 8).double()), TypeError, "x has dtype"),
        (dict(eps=0.0), ValueError, "eps must be a positive float"),
    ],
)
def test_bad_arguments_raise_clear_errors(changes, error, match):
    args = dict(
        y0=torch.randn(2, 6),
        x=torch.randn(2, 8),
        lora_a=torch.randn(2, 8),
        lora_b=torch.randn(6, 2),
        norm_weight=None,
        residual=None,
        eps=1e-5,
    )
    args.update(changes)
    with pytest.raises(error, match=match):
        shared_lora_linear_epilogue(
            args["y0"],
            args["x"],
            args["lora_a"],
            args["lora_b"],
            1.0,
            norm_weight=args["norm_weight"],
            eps=args["eps"],
            residual=args["residual"],
        )


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_autocast_casts_every_operand_to_its_dtype(grad):
    """Under torch.autocast(bf16) with fp32 operands the epilogue op runs in bf16 (y0 included)
    and matches the reference on the bf16-cast operands; fp32 leaves get fp32 gradients."""
    ops = operands((3,), 70, 90, 5, torch.float32, True, True, True)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = shared_lora_linear_epilogue(
            ops["y0"],
            ops["x"],
            ops["lora_a"],
            ops["lora_b"],
            0.7,
            ops["bias"],
            norm_weight=ops["norm_weight"],
            residual=ops["residual"],
        )
    assert out.dtype == torch.bfloat16
    cast = {k: v.detach().to(torch.bfloat16).double() for k, v in ops.items()}
    expected = shared_lora_linear_epilogue_reference(
        cast["y0"],
        cast["x"],
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
