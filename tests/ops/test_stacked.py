"""The multi-slice (stacked) op against its fp64 autograd reference on every backend, forward
and every gradient (x, W, each A_i and B_i, bias), fp32 and fp16, M = 1, odd widths, ranks 1
and different per part; its torch.library registration (opcheck, torch.compile fullgraph) and
its argument errors; the in-place delta of a stacked projection whose base product is given."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels import shared_lora_linear, shared_lora_linear_stacked, use_backend
from flexigpt_kernels.ops.reference import shared_lora_linear_stacked_reference
from flexigpt_kernels.ops.stacked import add_stacked_delta_
from flexigpt_kernels.ops.stacked_aten import concat_rows

from .helpers import TOL, assert_close_scaled

# (leading dims of x, K, part widths, part ranks): M = 1 / 3 / 70 (past the fused-shrink
# limit of the Triton path), 3-D x, widths and K not multiples of 16, rank 1, one part.
SHAPES = [
    ((1,), 100, (40, 24, 24), (1, 3, 5)),
    ((3,), 70, (90, 17), (4, 1)),
    ((2, 3), 33, (31,), (2,)),
    ((70,), 48, (64, 36, 20), (8, 16, 2)),
]
SCALES = (0.7, -1.3, 2.0)
FWD = torch.ops.flexigpt.shared_lora_linear_stacked_fwd.default
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def operands(lead, k, widths, ranks, dtype, *, bias=True, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype).requires_grad_()

    n = sum(widths)
    return {
        "x": rnd(*lead, k),
        "weight": rnd(n, k, std=k**-0.5).requires_grad_(weight_grad),
        "lora_as": [rnd(r, k, std=k**-0.5) for r in ranks],
        "lora_bs": [rnd(w, r, std=r**-0.5) for w, r in zip(widths, ranks)],
        "scales": list(SCALES[: len(ranks)]),
        "bias": rnd(n) if bias else None,
    }


def leaves(ops):
    out = {"x": ops["x"], "weight": ops["weight"], "bias": ops["bias"]}
    out.update({f"A{i}": a for i, a in enumerate(ops["lora_as"])})
    out.update({f"B{i}": b for i, b in enumerate(ops["lora_bs"])})
    return {k: v for k, v in out.items() if v is not None and v.requires_grad}


def run(fn, ops, grad_out):
    out = fn(ops["x"], ops["weight"], ops["lora_as"], ops["lora_bs"], ops["scales"], ops["bias"])
    named = leaves(ops)
    return out, dict(zip(named, torch.autograd.grad(out, list(named.values()), grad_out)))


def assert_output_and_grads(out, grads, expected, expected_grads, dtype):
    """Output and every gradient in `dtype`, within its tolerance of the fp64 reference's."""
    assert out.dtype == dtype
    assert_close_scaled(out, expected, TOL[dtype], "output")
    assert set(grads) == set(expected_grads)
    for name, g in grads.items():
        assert g.dtype == dtype, name
        assert_close_scaled(g, expected_grads[name], TOL[dtype], f"grad {name}")


def as_double(ops):
    def d(t):
        return t.detach().double().requires_grad_(t.requires_grad) if t is not None else None

    return {
        k: (
            [d(t) for t in v]
            if isinstance(v, list) and k != "scales"
            else (d(v) if isinstance(v, torch.Tensor) or v is None else v)
        )
        for k, v in ops.items()
    }


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,k,widths,ranks", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference_forward_and_grads(backend, dtype, lead, k, widths, ranks, bias):
    ops = operands(lead, k, widths, ranks, dtype, bias=bias)
    grad_out = torch.randn(*lead, sum(widths), generator=torch.Generator().manual_seed(1)).to(dtype)
    expected, expected_grads = run(shared_lora_linear_stacked_reference, as_double(ops), grad_out.double())
    with use_backend(backend):
        out, grads = run(shared_lora_linear_stacked, ops, grad_out)
    assert_output_and_grads(out, grads, expected, expected_grads, dtype)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_equals_one_single_op_call_per_part(backend):
    """The stacked call is the per-part single op with the weight's row blocks, concatenated."""
    ops = operands((5,), 37, (23, 9, 9), (3, 1, 2), torch.float32)
    with use_backend(backend), torch.no_grad():
        got = shared_lora_linear_stacked(
            ops["x"], ops["weight"], ops["lora_as"], ops["lora_bs"], ops["scales"], ops["bias"]
        )
        parts, col = [], 0
        for a, b, s in zip(ops["lora_as"], ops["lora_bs"], ops["scales"]):
            n = b.shape[0]
            parts.append(
                shared_lora_linear(ops["x"], ops["weight"][col : col + n], a, b, s, ops["bias"][col : col + n])
            )
            col += n
    assert_close_scaled(got, torch.cat(parts, -1), 1e-5, "stacked vs per part")


def test_frozen_weight_gets_no_gradient_and_inference_path_matches():
    ops = operands((4,), 20, (8, 8), (2, 2), torch.float32, weight_grad=False)
    out = shared_lora_linear_stacked(
        ops["x"], ops["weight"], ops["lora_as"], ops["lora_bs"], ops["scales"], ops["bias"]
    )
    out.sum().backward()
    assert ops["weight"].grad is None and ops["lora_as"][1].grad is not None
    with torch.no_grad():  # the fast path that skips the dispatcher
        again = shared_lora_linear_stacked(
            ops["x"], ops["weight"], ops["lora_as"], ops["lora_bs"], ops["scales"], ops["bias"]
        )
    assert torch.equal(out.detach(), again)


def test_concat_rows_reads_views_of_one_buffer_in_place():
    buf = torch.randn(7, 5)
    views = list(buf.split([3, 1, 3]))
    assert concat_rows(views).data_ptr() == buf.data_ptr() and torch.equal(concat_rows(views), buf)
    apart = [torch.randn(3, 5), torch.randn(2, 5)]
    assert torch.equal(concat_rows(apart), torch.cat(apart))
    shuffled = [views[2], views[0]]
    assert torch.equal(concat_rows(shuffled), torch.cat(shuffled))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_opcheck(backend):
    ops = operands((5,), 24, (12, 6, 6), (3, 1, 2), torch.float32)
    with use_backend(backend):
        torch.library.opcheck(
            FWD, (ops["x"], ops["weight"], ops["lora_as"], ops["lora_bs"], ops["scales"], ops["bias"])
        )
        nograd = {
            k: (
                [t.detach() for t in v]
                if k in ("lora_as", "lora_bs")
                else (v.detach() if isinstance(v, torch.Tensor) else v)
            )
            for k, v in ops.items()
        }
        torch.library.opcheck(
            FWD, (nograd["x"], nograd["weight"], nograd["lora_as"], nograd["lora_bs"], nograd["scales"], None)
        )


def assert_compiled_fullgraph_matches(fn, runner, ops, grad_out):
    """torch.compile(fn, fullgraph=True) traces the op (no graph break) and gives the eager
    output and gradients; runner(fn, ops, grad_out) -> (output, {name: grad})."""
    torch._dynamo.reset()
    got, got_grads = runner(torch.compile(fn, fullgraph=True, backend="aot_eager"), ops, grad_out)
    want, want_grads = runner(fn, ops, grad_out)
    assert_close_scaled(got, want, 1e-5, "compiled output")
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert_close_scaled(got_grads[name], want_grads[name], 1e-5, f"compiled grad {name}")


def test_compiles_fullgraph_forward_and_backward():
    ops = operands((6,), 16, (10, 6), (2, 3), torch.float32)
    assert_compiled_fullgraph_matches(shared_lora_linear_stacked, run, ops, torch.randn(6, 16))


def _bad(**changes):
    ops = operands((2,), 8, (4, 3), (2, 1), torch.float32)
    ops = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in ops.items()}
    ops.update(changes)
    return ops


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (
            dict(lora_as=[torch.randn(0, 8), torch.randn(1, 8)], lora_bs=[torch.randn(4, 0), torch.randn(3, 1)]),
            ValueError,
            "part 0 has rank 0",
        ),
        (dict(lora_bs=[torch.randn(4, 2), torch.randn(2, 1)]), ValueError, r"widths \[4, 2\] .* sum to 6"),
        (dict(lora_bs=[torch.randn(4, 3), torch.randn(3, 1)]), ValueError, r"lora_bs\[0\] must be"),
        (dict(lora_as=[torch.randn(2, 9), torch.randn(1, 8)]), ValueError, r"lora_as\[0\] must be \[r_0, K\]"),
        (dict(scales=[1.0]), ValueError, "one entry per part"),
        (dict(scales=[1.0, float("nan")]), ValueError, r"scales\[1\] must be a finite float"),
        (dict(bias=torch.randn(6)), ValueError, r"bias must be \[N\] = \[7\]"),
        (dict(x=torch.randn(2, 9)), ValueError, "in_features K"),
        (dict(lora_bs=[torch.randn(4, 2).double(), torch.randn(3, 1)]), TypeError, r"lora_bs\[0\] has dtype"),
        (dict(lora_as=torch.randn(3, 8)), TypeError, "lora_as must be a list"),
    ],
)
def test_bad_arguments_raise_clear_errors(changes, error, match):
    ops = _bad(**changes)
    with pytest.raises(error, match=match):
        shared_lora_linear_stacked(ops["x"], ops["weight"], ops["lora_as"], ops["lora_bs"], ops["scales"], ops["bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,k,widths,ranks", SHAPES[:3], ids=lambda v: str(v))
def test_stacked_delta_adds_the_adapters_to_a_given_base_product_in_place(dtype, lead, k, widths, ranks):
    """add_stacked_delta_(x @ W.T, ...) is the stacked op, computed into the given buffer."""
    ops = {
        key: (v.detach() if isinstance(v, torch.Tensor) else v)
        for key, v in operands(lead, k, widths, ranks, dtype).items()
    }
    ops["lora_as"] = [a.detach() for a in ops["lora_as"]]
    ops["lora_bs"] = [b.detach() for b in ops["lora_bs"]]
    y = ops["x"] @ ops["weight"].t()
    got = add_stacked_delta_(y, ops["x"], ops["lora_as"], ops["lora_bs"], ops["scales"], ops["bias"])
    assert got is y
    want = shared_lora_linear_stacked_reference(
        ops["x"].double(),
        ops["weight"].double(),
        [a.double() for a in ops["lora_as"]],
        [b.double() for b in ops["lora_bs"]],
        ops["scales"],
        ops["bias"].double(),
    )
    assert_close_scaled(got, want, TOL[dtype], "stacked delta")


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(lora_bs=[torch.randn(4, 2), torch.randn(2, 1)]), ValueError, r"widths .* sum to 6, but y"),
        (
            dict(lora_as=[torch.randn(0, 8), torch.randn(1, 8)], lora_bs=[torch.randn(4, 0), torch.randn(3, 1)]),
            ValueError,
            "part 0 has rank 0",
        ),
        (dict(x=torch.randn(2, 8).double()), TypeError, "x has dtype"),
        (dict(bias=torch.randn(6)), ValueError, r"bias must be \[N\] = \[7\]"),
    ],
)
def test_stacked_delta_rejects_bad_arguments(changes, error, match):
    ops = _bad(**changes)
    with pytest.raises(error, match=match):
        add_stacked_delta_(torch.zeros(2, 7), ops["x"], ops["lora_as"], ops["lora_bs"], ops["scales"], ops["bias"])


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_autocast_casts_every_operand_to_its_dtype(backend, grad):
    """Under torch.autocast(bf16) with fp32 operands the stacked op runs in bf16 (every floating
    tensor cast once) and matches the reference on the bf16-cast operands; fp32 leaves get fp32
    gradients. Without the cast the fp32 operands would run in fp32 (autocast is off inside)."""
    ops = operands((3,), 70, (90, 17), (4, 1), torch.float32)
    with use_backend(backend), torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = shared_lora_linear_stacked(
            ops["x"], ops["weight"], ops["lora_as"], ops["lora_bs"], ops["scales"], ops["bias"]
        )
    assert out.dtype == torch.bfloat16

    def bf16(t):
        return t.detach().to(torch.bfloat16).double()

    cast = {k: [bf16(t) for t in v] if k in ("lora_as", "lora_bs") else v for k, v in ops.items()}
    cast.update(x=bf16(ops["x"]), weight=bf16(ops["weight"]), bias=bf16(ops["bias"]))
    expected = shared_lora_linear_stacked_reference(
        cast["x"], cast["weight"], cast["lora_as"], cast["lora_bs"], cast["scales"], cast["bias"]
    )
    assert_close_scaled(out, expected, TOL[torch.bfloat16], "autocast output")
    if grad:
        out.float().sum().backward()
        assert all(a.grad is not None and a.grad.dtype == torch.float32 for a in ops["lora_as"])
