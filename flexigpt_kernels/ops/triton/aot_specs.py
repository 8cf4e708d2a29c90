"""The specialisations the Triton backend launches, collected by running its real launchers.

    collect(cases) -> [Spec]       every distinct (kernel, specialisation) the cases launch
    specialise(spec, target)       (signature, constexprs, attrs, options) as triton's JIT derives them

Each case runs `forward` (and `backward`) of triton/shared_lora_linear.py on small CPU tensors
inside `launch.recording()`: no kernel runs, every launch is recorded with its exact
arguments. The signature, the constexprs and the divisibility attributes then come from
triton's own binder for the target (the code path `kernel[grid](...)` takes on a GPU), so the
ahead-of-time compile list is the launchers' list and cannot drift from the code.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from . import launch as launch_mod
from .configs import FUSED_SHRINK_MAX_M

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One call of the op: x [m, k], weight [n, k], rank r, the flags, forward (+ backward)."""

    dtype: str  # fp16 | bf16 | fp32 (IEEE) | tf32 (fp32 inputs, TF32 products)
    m: int
    n: int
    k: int
    r: int
    bias: bool = True
    norm: bool = False
    residual: bool = False
    backward: bool = True

    @property
    def regime(self) -> str:
        return "decode" if self.m <= FUSED_SHRINK_MAX_M else "prefill"

    @property
    def default_regime(self) -> bool:
        """What the package runs by default: 16-bit inputs, ranks up to 256."""
        return self.dtype in ("fp16", "bf16") and self.r <= 256


@dataclass
class Spec:
    """A distinct kernel specialisation and the first case that launched it."""

    kernel: object  # the JITFunction
    case: Case
    phase: str  # fwd | bwd
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def label(self) -> str:
        c = self.case
        flags = "".join(f for f, on in (("b", c.bias), ("n", c.norm), ("r", c.residual)) if on) or "-"
        return f"{c.regime} {self.phase} {c.dtype} M={c.m} r={c.r} {flags}"


def default_cases(full: bool = False) -> list[Case]:
    """The matrix: M = 1 and 8 (decode, forward only: nothing trains at decode batch sizes) and
    512 (prefill, forward and backward); flags plain+bias, bias+norm+residual, residual alone.
    Quick (CI): bf16 at ranks 16/64/256 (the fused/separate decode boundary and the largest
    default rank) with every flag combination at every M; fp16 at ranks 64/256, fp32 IEEE at
    ranks 64/1024 (1024: the tile that used to overflow shared memory) and TF32 at rank 64, at
    M = 1 and 512 with the norm (fp32 also without). Full: every dtype, rank 16..1024, M, flags."""
    shape = dict(n=1024, k=1024)
    plain, every_flag, no_norm_res = (
        dict(bias=True),
        dict(bias=True, norm=True, residual=True),
        dict(bias=False, residual=True),
    )
    if full:
        plan = [
            (d, (16, 64, 256, 1024), (1, 8, 512), (plain, every_flag, no_norm_res))
            for d in ("bf16", "fp16", "fp32", "tf32")
        ]
    else:
        plan = [
            ("bf16", (16, 64, 256), (1, 8, 512), (plain, every_flag, no_norm_res)),
            ("fp16", (64, 256), (1, 512), (every_flag,)),
            ("fp32", (64, 1024), (1, 512), (every_flag, plain)),
            ("tf32", (64,), (1, 512), (every_flag,)),
        ]
    cases = []
    for dtype, ranks, ms, flag_sets in plan:
        for r, m, f in itertools.product(ranks, ms, flag_sets):
            cases.append(Case(dtype, m, r=r, **shape, **f, backward=m > FUSED_SHRINK_MAX_M))
    return cases


def _tensors(case: Case):
    dtype = DTYPES[case.dtype]
    t = lambda *s: torch.empty(*s, dtype=dtype)  # noqa: E731  (values never matter: nothing runs)
    return dict(
        x=t(case.m, case.k),
        weight=t(case.n, case.k),
        lora_a=t(case.r, case.k),
        lora_b=t(case.n, case.r),
        bias=t(case.n) if case.bias else None,
        norm_weight=t(case.n) if case.norm else None,
        residual=t(case.m, case.n) if case.residual else None,
    )


def record(case: Case) -> list[tuple[str, launch_mod.Launch]]:
    """The launches of one case, in order, tagged fwd/bwd."""
    from . import shared_lora_linear as backend

    ops = _tensors(case)
    precision = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if case.dtype == "tf32" else "ieee"
    try:
        with launch_mod.recording() as fwd_launches:
            saved = backend.forward(
                ops["x"],
                ops["weight"],
                ops["lora_a"],
                ops["lora_b"],
                0.5,
                ops["bias"],
                ops["norm_weight"],
                1e-5,
                ops["residual"],
                case.backward,
            )
        bwd_launches: list = []
        if case.backward:
            with launch_mod.recording() as bwd_launches:
                backend.backward(
                    torch.empty_like(saved.out),
                    ops["x"],
                    ops["weight"],
                    ops["lora_a"],
                    ops["lora_b"],
                    0.5,
                    ops["norm_weight"],
                    saved,
                    True,
                )
    finally:
        torch.backends.cuda.matmul.fp32_precision = precision
    return [("fwd", x) for x in fwd_launches] + [("bwd", x) for x in bwd_launches]


_JIT: dict = {}


def jit_of(kernel):
    """The JITFunction of a kernel (under TRITON_INTERPRET=1 the decorator returned an
    InterpretedFunction; the same Python function makes the JITFunction)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if kernel.fn not in _JIT:
        _JIT[kernel.fn] = JITFunction(kernel.fn)
    return _JIT[kernel.fn]


_BINDERS: dict = {}


def _binder(fn, target):
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (id(fn), target)
    if key not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    return _BINDERS[key]


def specialise(kernel, args: Sequence, kwargs: dict, target):
    """(signature, constexprs, attrs, options) of kernel[grid](*args, **kwargs) on `target`,
    from triton's own binder (create_function_from_signature + _pack_args, as JITFunction.run)."""
    fn = jit_of(kernel)
    backend, binder = _binder(fn, target)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, spec, opts)
    return signature, constexprs, attrs, options


def spec_key(name: str, signature, constexprs, attrs, options) -> str:
    return repr(
        (
            name,
            sorted(signature.items()),
            sorted(constexprs.items()),
            sorted(attrs.items()),
            sorted(options.__dict__.items()),
        )
    )


def collect(cases: Iterable[Case], target) -> list[Spec]:
    """Distinct specialisations (on `target`) over the cases, in first-seen order."""
    seen: dict[str, Spec] = {}
    for case in cases:
        for phase, ln in record(case):
            key = spec_key(ln.name, *specialise(ln.kernel, ln.args, ln.kwargs, target))
            if key not in seen:
                seen[key] = Spec(jit_of(ln.kernel), case, phase, ln.args, ln.kwargs)
    return list(seen.values())
