"""What the kernel benchmark times side by side, for one shape:

    op-<backend>   flexigpt_kernels.shared_lora_linear through one backend: on the CPU
                   "reference" and "cpp" (when the extension is built); on CUDA "triton" and
                   "cuda" (the CUDA decode kernel, when built). Triton on CPU tensors is the
                   interpreter, a correctness tool, and is never timed. The backend that "auto"
                   picks is timed as a user calls it (no use_backend block around the call).
    unfused-peft   what a user writes without this package (ops.unfused_peft_style): F.linear,
                   shrink, expand, add, F.layer_norm, residual add, each its own kernel
    dense          F.linear(x, W) alone: what a merged weight would cost
    floor          not run: dense time x the op's extra work (formulas.floor_factor)

"fwd" runs under torch.no_grad() (inference). "fwd+bwd" is one adapter-training step of the
layer: forward, then torch.autograd.grad of x, A, B (and gamma, residual) for a fixed dy;
the shared weight is frozen. Dense fwd+bwd computes grad x only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..ops import backends, shared_lora_linear, unfused_peft_style, use_backend
from .shapes import Shape

SCALE = 1.0
DENSE, FLOOR, UNFUSED = "dense", "floor", "unfused-peft"


def op_backends(device: torch.device) -> list[str]:
    """The backends of the op worth timing on `device` (see module doc)."""
    built = backends.available_backends()
    if device.type == "cuda":
        return ["triton"] + (["cuda"] if built["cuda"] else [])  # cuda: the decode kernel, Triton for the rest
    return ["reference"] + (["cpp"] if built["cpp"] else [])


def default_providers(device: torch.device) -> list[str]:
    return [f"op-{b}" for b in op_backends(device)] + [UNFUSED, DENSE]


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Operands:
    """Random, well-scaled operands of one shape (outputs of order 1), on `device` in `dtype`."""

    def __init__(self, s: Shape, norm: bool, grad: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape, std=1.0):
            return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

        self.x = rnd(s.m, s.k)
        self.weight = rnd(s.n, s.k, std=s.k**-0.5)
        self.lora_a = rnd(s.r, s.k, std=s.k**-0.5)
        self.lora_b = rnd(s.n, s.r, std=s.r**-0.5)
        self.norm_weight = (torch.rand(s.n, generator=g, device=device) + 0.5).to(dtype) if norm else None
        self.residual = rnd(s.m, s.n) if norm else None
        self.grad_out = rnd(s.m, s.n) if grad else None
        if grad:  # adapter training: the shared weight is frozen, everything else learns
            for t in (self.x, self.lora_a, self.lora_b, self.norm_weight, self.residual):
                if t is not None:
                    t.requires_grad_()

    def grad_inputs(self, provider: str) -> list[torch.Tensor]:
        if provider == DENSE:
            return [self.x]
        return [t for t in (self.x, self.lora_a, self.lora_b, self.norm_weight, self.residual) if t is not None]


def forward_callable(provider: str, o: Operands) -> Callable[[], torch.Tensor]:
    if provider == DENSE:
        return lambda: F.linear(o.x, o.weight)
    if provider == UNFUSED:
        return lambda: unfused_peft_style(
            o.x, o.weight, o.lora_a, o.lora_b, SCALE, norm_weight=o.norm_weight, residual=o.residual
        )
    if not provider.startswith("op-"):
        raise ValueError(f"unknown provider {provider!r}")
    backend = provider.removeprefix("op-")
    if backend == backends.resolve(o.x.device, o.x.dtype):  # the default: exactly what a user pays
        return lambda: shared_lora_linear(
            o.x, o.weight, o.lora_a, o.lora_b, SCALE, norm_weight=o.norm_weight, residual=o.residual
        )

    def run():
        with use_backend(backend):
            return shared_lora_linear(
                o.x, o.weight, o.lora_a, o.lora_b, SCALE, norm_weight=o.norm_weight, residual=o.residual
            )

    return run


def bench_callable(provider: str, o: Operands, mode: str) -> Callable[[], object]:
    """The callable timed for `provider` in `mode` ("fwd" or "fwd+bwd")."""
    fwd = forward_callable(provider, o)
    if mode == "fwd":

        def inference():
            with torch.no_grad():
                return fwd()

        return inference
    if mode != "fwd+bwd":
        raise ValueError(f"unknown mode {mode!r}")
    inputs = o.grad_inputs(provider)

    def train_step():
        return torch.autograd.grad(fwd(), inputs, o.grad_out)

    return train_step


def check_agreement(providers: list[str], o: Operands, atol: float | None = None) -> None:
    """Every op provider and the unfused one must compute the same forward (a benchmark of a
    wrong result is worthless). Raises AssertionError naming the provider."""
    with torch.no_grad():
        outs = {p: forward_callable(p, o)().float() for p in providers if p != DENSE}
    if len(outs) < 2:
        return
    ref_name, ref = next(iter(outs.items()))
    tol = atol if atol is not None else (2e-3 if o.x.dtype == torch.float32 else 6e-2)
    scale = max(1.0, ref.abs().max().item())
    for name, out in outs.items():
        err = (out - ref).abs().max().item()
        if err > tol * scale:
            raise AssertionError(f"{name} differs from {ref_name} by {err:.3e} (> {tol:.0e} x {scale:.2f})")
