"""fp32 on a GPU: the Triton backend against the fp64 reference with IEEE products (the default,
the fp32 tolerance) and with TF32 requested through torch's new API (the 10-bit-mantissa
tolerance of fp16), forward and every gradient. Also a second device when there is one."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels import shared_lora_linear, shared_lora_linear_reference, use_backend

from .helpers import TOL, as_double, assert_close_scaled, grads_of, make_operands

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPES = [
    ((1,), 100, 120, 1),
    ((3,), 70, 90, 5),
    ((257,), 48, 80, 64),
    ((2, 3), 123, 123, 16),
    ((8,), 4096, 4096, 256),
    ((512,), 576, 1536, 32),
    ((1,), 512, 256, 1024),
]
FLAGS = [(False, False, False), (True, True, True), (False, False, True)]
PRECISION_TOL = {"ieee": TOL[torch.float32], "tf32": TOL[torch.float16]}


@pytest.fixture
def fp32_precision(request):
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = request.param
    yield request.param
    torch.backends.cuda.matmul.fp32_precision = before


def _check(lead, k, n, r, bias, norm, residual, tol, device="cuda", dtype=torch.float32):
    ops = make_operands(lead, k, n, r, dtype, bias=bias, norm=norm, residual=residual, device=device)
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    expected, expected_grads = grads_of(shared_lora_linear_reference, as_double(ops), grad_out.double())
    with use_backend("triton"):
        out, got = grads_of(shared_lora_linear, ops, grad_out)
    assert out.dtype == dtype and out.device == ops["x"].device
    assert_close_scaled(out, expected, tol, "output")
    for name, g in got.items():
        assert_close_scaled(g, expected_grads[name], tol, f"grad {name}")


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("fp32_precision", ["ieee", "tf32"], indirect=True)
@pytest.mark.parametrize("lead,k,n,r", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias,norm,residual", FLAGS, ids=["plain", "all", "residual"])
def test_fp32_matches_reference_on_gpu(fp32_precision, lead, k, n, r, bias, norm, residual):
    _check(lead, k, n, r, bias, norm, residual, PRECISION_TOL[fp32_precision])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tensors_on_the_second_device_while_the_first_is_current(dtype):
    """Every launch is guarded with the tensors' device (cuda:1), not the current one (0)."""
    torch.cuda.set_device(0)
    _check((5,), 64, 48, 8, True, True, True, TOL[dtype], device="cuda:1", dtype=dtype)
    _check((300,), 64, 48, 80, True, True, False, TOL[dtype], device="cuda:1", dtype=dtype)
