"""Shared helpers for the op tests: random operands and a scaled closeness check."""

from __future__ import annotations

import torch

# Error allowed relative to max(1, max|expected|), per dtype (fp32 accumulation throughout).
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.double().abs().max().item() if expected.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.1e} * {scale:.3e}"


def make_operands(lead, k, n, r, dtype, *, bias=True, norm=True, residual=True, weight_grad=True, device="cpu", seed=0):
    """Well-scaled random operands (outputs of order 1) that all require grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    ops = {
        "x": rnd(*lead, k).requires_grad_(),
        "weight": rnd(n, k, std=k**-0.5).requires_grad_(weight_grad),
        "lora_a": rnd(r, k, std=k**-0.5).requires_grad_(),
        "lora_b": rnd(n, r, std=r**-0.5).requires_grad_(),
        "bias": rnd(n).requires_grad_() if bias else None,
        "norm_weight": (torch.rand(n, generator=g) + 0.5).to(device=device, dtype=dtype).requires_grad_()
        if norm
        else None,
        "residual": rnd(*lead, n).requires_grad_() if residual else None,
    }
    return ops


def call(fn, ops, scale=0.7):
    return fn(
        ops["x"],
        ops["weight"],
        ops["lora_a"],
        ops["lora_b"],
        scale,
        ops["bias"],
        norm_weight=ops["norm_weight"],
        residual=ops["residual"],
    )


def grads_of(fn, ops, grad_out, scale=0.7):
    """(output, {name: grad}) for every operand that requires grad."""
    names = [k for k, v in ops.items() if v is not None and v.requires_grad]
    out = call(fn, ops, scale)
    gs = torch.autograd.grad(out, [ops[k] for k in names], grad_out)
    return out, dict(zip(names, gs))


def as_double(ops):
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None) for k, v in ops.items()}


def check_against_reference(backend, ops, grad_out, dtype):
    """Output and every gradient of `backend` vs the fp64 autograd reference, per-dtype tolerance."""
    from flexigpt_kernels import shared_lora_linear, shared_lora_linear_reference, use_backend

    expected, expected_grads = grads_of(shared_lora_linear_reference, as_double(ops), grad_out.double())
    with use_backend(backend):
        out, out_grads = grads_of(shared_lora_linear, ops, grad_out)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close_scaled(out, expected, TOL[dtype], "output")
    assert set(out_grads) == set(expected_grads)
    for name, g in out_grads.items():
        assert g.dtype == dtype, name
        assert_close_scaled(g, expected_grads[name], TOL[dtype], f"grad {name}")
