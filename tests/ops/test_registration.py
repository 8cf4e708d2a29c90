"""torch.library registration of the fused op: opcheck (schema, fake tensors, autograd
registration, AOT dispatch) on the CPU reference path and once on the Triton interpreter,
and torch.compile tracing the public function and the modules without graph breaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexigpt_kernels import OutputNorm, SharedLoRALinear, shared_lora_linear, use_backend
from flexigpt_kernels.ops import library

from .helpers import TOL, assert_close_scaled, grads_of, make_operands

FWD = torch.ops.flexigpt.shared_lora_linear_fwd.default
BWD = torch.ops.flexigpt.shared_lora_linear_bwd.default

# opcheck's internals call a deprecated torch.jit API; that is torch's business, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _fwd_args(ops, save, scale=0.7, eps=1e-5):
    return (
        ops["x"],
        ops["weight"],
        ops["lora_a"],
        ops["lora_b"],
        scale,
        ops["bias"],
        ops["norm_weight"],
        eps,
        ops["residual"],
        save,
    )


def _operands(bias, norm, residual, grad, weight_grad=True, dtype=torch.float32):
    ops = make_operands(
        (5,), 24, 20, 3, dtype, bias=bias, norm=norm, residual=residual, weight_grad=weight_grad and grad
    )
    if not grad:
        ops = {k: (v.detach() if v is not None else None) for k, v in ops.items()}
    return ops


# (bias, norm, residual, save_for_backward, inputs require grad, weight requires grad)
FWD_CASES = [
    (False, False, False, False, False, False),
    (True, False, False, True, True, True),
    (False, True, False, True, True, False),
    (True, True, True, True, True, True),
    # save_for_backward=False with grads needed: the backward recomputes y_pre
    (True, True, True, False, True, False),
    (False, False, True, False, True, True),
]


@pytest.mark.parametrize(
    "bias,norm,residual,save,grad,weight_grad",
    FWD_CASES,
    ids=["plain-nograd", "bias", "norm-frozenW", "all", "all-nosave", "residual-nosave"],
)
def test_opcheck_forward_reference(bias, norm, residual, save, grad, weight_grad):
    ops = _operands(bias, norm, residual, grad, weight_grad)
    with use_backend("reference"):
        torch.library.opcheck(FWD, _fwd_args(ops, save))


def test_opcheck_forward_triton_interpreter():
    ops = _operands(True, True, True, True)
    with use_backend("triton"):
        torch.library.opcheck(FWD, _fwd_args(ops, True))


@pytest.mark.skipif(not library.NATIVE_CPU, reason="the C++ extension is not built (FLEXIGPT_SKIP_CPU_BUILD)")
@pytest.mark.parametrize(
    "bias,norm,residual,save,grad,weight_grad", FWD_CASES[:4], ids=["plain-nograd", "bias", "norm-frozenW", "all"]
)
def test_opcheck_forward_cpp(bias, norm, residual, save, grad, weight_grad):
    """The op declared in C++ with its C++ CPU kernel, and fake/autograd registered from Python."""
    ops = _operands(bias, norm, residual, grad, weight_grad)
    with use_backend("cpp"):
        torch.library.opcheck(FWD, _fwd_args(ops, save))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("norm,needs_weight_grad", [(True, True), (False, False)], ids=["norm-gradW", "plain"])
def test_opcheck_backward(backend, norm, needs_weight_grad):
    if backend == "cpp" and not library.NATIVE_CPU:
        pytest.skip("the C++ extension is not built (FLEXIGPT_SKIP_CPU_BUILD)")
    ops = _operands(True, norm, False, False)
    with use_backend(backend):
        _, shrink, y_pre, mean, rstd = FWD(*_fwd_args(ops, True))
        grad_out = torch.randn(5, 20)
        torch.library.opcheck(
            BWD,
            (
                grad_out,
                ops["x"],
                ops["weight"],
                ops["lora_a"],
                ops["lora_b"],
                0.7,
                ops["norm_weight"],
                shrink,
                y_pre,
                mean,
                rstd,
                needs_weight_grad,
            ),
        )


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_op_called_without_saving_still_differentiates(backend):
    """The raw op with save_for_backward=False (y_pre not kept) gives the same gradients as
    with it: the backward recomputes y_pre instead of failing on an empty tensor."""
    ops = _operands(True, True, True, True)
    names = [k for k, v in ops.items() if v is not None]
    grad_out = torch.randn(5, 20)
    with use_backend(backend):
        results = []
        for save in (True, False):
            out = FWD(*_fwd_args(ops, save))[0]
            results.append((out, torch.autograd.grad(out, [ops[k] for k in names], grad_out)))
    (out_s, g_s), (out_n, g_n) = results
    assert torch.equal(out_s, out_n)
    for name, a, b in zip(names, g_s, g_n):
        assert_close_scaled(b, a, 1e-6, f"grad {name}")


def _fn(x, weight, lora_a, lora_b, scale, bias, *, norm_weight=None, residual=None):
    """Something around the op, so the compiled graph holds more than the op alone."""
    y = shared_lora_linear(x * 2.0, weight, lora_a, lora_b, scale, bias, norm_weight=norm_weight, residual=residual)
    return torch.tanh(y)


@pytest.mark.parametrize("norm,residual", [(False, False), (True, True)], ids=["plain", "norm+residual"])
def test_compile_aot_eager_fullgraph_matches_eager(norm, residual):
    ops = make_operands((2, 3), 24, 20, 3, torch.float32, bias=True, norm=norm, residual=residual)
    grad_out = torch.randn(2, 3, 20)
    with use_backend("reference"):
        expected, expected_grads = grads_of(_fn, ops, grad_out)
        torch._dynamo.reset()
        compiled = torch.compile(_fn, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
        out, out_grads = grads_of(compiled, ops, grad_out)
    assert_close_scaled(out, expected, TOL[torch.float32], "output")
    assert set(out_grads) == set(expected_grads)
    for name, g in out_grads.items():
        assert_close_scaled(g, expected_grads[name], TOL[torch.float32], f"grad {name}")


class _TinyBlock(nn.Module):
    """Two SharedLoRALinear over one frozen base, each with an OutputNorm and a residual add."""

    def __init__(self, hidden=16, rank=2):
        super().__init__()
        self.base = nn.Linear(hidden, hidden)
        self.first = SharedLoRALinear(self.base, rank, scale=0.5, output_norm=OutputNorm(hidden, init=0.5))
        self.second = SharedLoRALinear(self.base, rank, scale=2.0, output_norm=OutputNorm(hidden, init=0.3))
        with torch.no_grad():
            for layer in (self.first, self.second):
                layer.lora_b.normal_()

    def forward(self, x):
        h = self.first(x, residual=x)
        return self.second(torch.relu(h), residual=h)


def test_compile_aot_eager_fullgraph_module_matches_eager():
    torch.manual_seed(0)
    block = _TinyBlock()
    x = torch.randn(2, 5, 16, requires_grad=True)
    params = [p for p in block.parameters() if p.requires_grad]
    assert all(p is not block.base.weight for p in params)  # frozen by the SharedLoRALinear
    with use_backend("reference"):
        expected = block(x)
        expected_grads = torch.autograd.grad(expected.square().sum(), [x, *params])
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *params])
    assert_close_scaled(out, expected, TOL[torch.float32], "output")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_close_scaled(g, e, TOL[torch.float32], f"grad #{i}")


def test_compile_inductor_forward_on_cpu():
    """Inductor lowers the custom op as an extern call. Only the op in the graph: a pointwise
    op around it would make inductor compile C++ (~15-45 s cold on 2 cores)."""

    def fn(x, weight, lora_a, lora_b, bias, norm_weight, residual):
        return shared_lora_linear(x, weight, lora_a, lora_b, 0.7, bias, norm_weight=norm_weight, residual=residual)

    ops = {k: v.detach() for k, v in make_operands((2, 3), 24, 20, 3, torch.float32).items()}
    args = [ops[k] for k in ("x", "weight", "lora_a", "lora_b", "bias", "norm_weight", "residual")]
    with use_backend("reference"), torch.no_grad():
        expected = fn(*args)
        torch._dynamo.reset()
        out = torch.compile(fn, fullgraph=True, backend="inductor")(*args)
    assert_close_scaled(out, expected, TOL[torch.float32], "output")
