"""The C++ backend (csrc/ -> flexigpt_kernels/_C*.so, the CPU kernel of torch.ops.flexigpt.*)
against the fp64 reference: output and every gradient, fp32 and bf16, odd shapes, layouts;
the kernel's own argument checks; the CUDA decode kernel (parity on a GPU, compile-only with
nvcc elsewhere).

`make test` builds the extension (editable install with a C++ compiler present), so it must be
importable here; only FLEXIGPT_SKIP_CPU_BUILD=1 (no build asked for) turns these tests into skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexigpt_kernels import shared_lora_linear, shared_lora_linear_reference, use_backend
from flexigpt_kernels.ops import backends, cuda_backend, library

from .helpers import TOL, assert_close_scaled, check_against_reference, grads_of, make_operands

ROOT = Path(__file__).resolve().parents[2]
SKIP_BUILD = os.environ.get("FLEXIGPT_SKIP_CPU_BUILD", "").strip().lower() in ("1", "true", "yes", "on")

needs_ext = pytest.mark.skipif(
    not library.NATIVE_CPU and SKIP_BUILD,
    reason="FLEXIGPT_SKIP_CPU_BUILD=1: the C++ extension flexigpt_kernels._C was deliberately not built",
)
pytestmark = needs_ext

# (leading dims of x, K, N, rank): M = 1, 3, 257; K and N not multiples of 16; rank 1; 3-D x.
SHAPES = [((1,), 100, 120, 1), ((3,), 70, 90, 5), ((257,), 48, 80, 64), ((2, 3), 123, 123, 16), ((4,), 33, 17, 3)]
FLAGS = [(False, False, False), (True, False, False), (False, True, False), (True, True, True), (False, False, True)]
FLAG_IDS = ["plain", "bias", "norm", "all", "residual"]
DTYPES = [torch.float32, torch.bfloat16]


def test_extension_is_built_and_is_the_default_cpu_backend():
    """CI builds the extension: a failed or skipped build must fail here, not skip silently."""
    assert library.NATIVE_CPU, (
        "flexigpt_kernels/_C*.so is not loaded; `pip install --no-build-isolation -e .` "
        "with a C++ compiler builds it (set FLEXIGPT_SKIP_CPU_BUILD=1 to build and test without it)"
    )
    assert backends.available_backends()["cpp"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("flexigpt::shared_lora_linear_fwd", "CPU")
    with use_backend("auto"):
        assert backends.resolve(torch.device("cpu"), torch.float32) == "cpp"
        assert backends.resolve(torch.device("cpu"), torch.bfloat16) == "cpp"


class _Native:
    """The native kernel called through the op with the cpp backend selected."""

    @staticmethod
    def forward(*args, **kw):
        with use_backend("cpp"):
            return torch.ops.flexigpt.shared_lora_linear_fwd(*args, **kw)

    @staticmethod
    def backward(*args, **kw):
        with use_backend("cpp"):
            return torch.ops.flexigpt.shared_lora_linear_bwd(*args, **kw)


_C = _Native()


def _check(lead, k, n, r, dtype, bias, norm, residual, *, x_layout="contiguous", seed=0):
    ops = make_operands(lead, k, n, r, dtype, bias=bias, norm=norm, residual=residual, seed=seed)
    if x_layout == "strided":  # every other column of a wider buffer: stride(-1) == 2
        wide = torch.randn(*lead, 2 * k, generator=torch.Generator().manual_seed(5)).to(dtype)
        ops["x"] = wide[..., ::2].detach().requires_grad_()
    elif x_layout == "transposed":  # x [M, K] as a view of a [K, M] buffer
        ops["x"] = (
            torch.randn(k, *lead, generator=torch.Generator().manual_seed(5)).to(dtype).t().detach().requires_grad_()
        )
        if residual:
            ops["residual"] = torch.randn(n, *lead).to(dtype).t().detach().requires_grad_()
        if bias:  # every other element
            ops["bias"] = torch.randn(2 * n).to(dtype)[::2].detach().requires_grad_()
    assert x_layout == "contiguous" or not ops["x"].is_contiguous()
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_against_reference("cpp", ops, grad_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,k,n,r", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bias,norm,residual", FLAGS, ids=FLAG_IDS)
def test_matches_reference_forward_and_grads(dtype, lead, k, n, r, bias, norm, residual):
    _check(lead, k, n, r, dtype, bias, norm, residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_inputs(dtype, layout):
    _check((5,), 37, 29, 4, dtype, True, True, True, x_layout=layout)


def test_weight_without_grad_and_wide_rows():
    _check((2,), 24, 4100, 2, torch.float32, True, True, True)  # one row spans many vector widths
    ops = make_operands((3,), 40, 50, 4, torch.float32, weight_grad=False)
    with use_backend("cpp"):
        _, grads = grads_of(shared_lora_linear, ops, torch.ones(3, 50))
    assert "weight" not in grads


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm,residual", [(True, True), (True, False), (False, True), (False, False)])
def test_direct_forward_outputs_follow_the_contract(dtype, norm, residual):
    """Shapes and dtypes of (out, shrink, y_pre, mean, rstd); no output aliases another or an
    input; save_for_backward only decides whether y_pre is kept."""
    m, k, n, r = 6, 40, 24, 3
    ops = {
        name: (t.detach() if t is not None else None)
        for name, t in make_operands((m,), k, n, r, dtype, norm=norm, residual=residual).items()
    }
    args = (
        ops["x"],
        ops["weight"],
        ops["lora_a"],
        ops["lora_b"],
        0.5,
        ops["bias"],
        ops["norm_weight"],
        1e-5,
        ops["residual"],
    )
    saved = _C.forward(*args, True)
    unsaved = _C.forward(*args, False)
    ref = shared_lora_linear_reference(
        ops["x"].double(),
        *(t.double() if t is not None else None for t in (ops["weight"], ops["lora_a"], ops["lora_b"])),
        0.5,
        ops["bias"].double(),
        norm_weight=ops["norm_weight"].double() if norm else None,
        residual=ops["residual"].double() if residual else None,
    )
    for res in (saved, unsaved):
        out, shrink, y_pre, mean, rstd = res
        assert out.shape == (m, n) and out.dtype == dtype
        assert shrink.shape == (m, r) and shrink.dtype == dtype
        assert mean.dtype == rstd.dtype == torch.float32
        assert mean.shape == rstd.shape == ((m,) if norm else (0,))
        assert_close_scaled(out, ref, TOL[dtype], "out")
        assert_close_scaled(shrink, ops["x"].double() @ ops["lora_a"].double().t(), TOL[dtype], "shrink")
        ptrs = [t.data_ptr() for t in res if t.numel()] + [t.data_ptr() for t in ops.values() if t is not None]
        assert len(ptrs) == len(set(ptrs)), "an output aliases another output or an input"
    assert saved[2].shape == ((m, n) if norm else (0,))
    assert unsaved[2].shape == (0,)
    torch.testing.assert_close(saved[0], unsaved[0], rtol=0, atol=0)


def test_float16_and_float64_fall_back_to_the_reference():
    for dtype in (torch.float16, torch.float64):
        ops = make_operands((3,), 20, 12, 2, dtype)
        expected = shared_lora_linear_reference(
            *(ops[k] for k in ("x", "weight", "lora_a", "lora_b")),
            0.7,
            ops["bias"],
            norm_weight=ops["norm_weight"],
            residual=ops["residual"],
        )
        with use_backend("cpp"):
            out, grads = grads_of(shared_lora_linear, ops, torch.ones(3, 12, dtype=dtype))
        torch.testing.assert_close(out, expected)
        assert grads["x"].dtype == dtype


def test_schemas_declared_in_cpp_match_the_python_fallback():
    """Without the extension, ops/library.py declares the same schemas from Python."""
    for name, args in library.SCHEMAS.items():
        assert str(library.op(name)._schema) == f"flexigpt::{name}{args}"


def test_selection_reaches_the_cpp_kernel_without_python(monkeypatch):
    """With cpp selected, a CPU call never enters the Python backends; with reference selected,
    or after FLEXIGPT_BACKEND changed, it does (once, for the new value)."""
    ops = {k: (v.detach() if v is not None else None) for k, v in make_operands((4,), 16, 8, 2, torch.float32).items()}
    args = (
        ops["x"],
        ops["weight"],
        ops["lora_a"],
        ops["lora_b"],
        0.7,
        ops["bias"],
        ops["norm_weight"],
        1e-5,
        ops["residual"],
        False,
    )
    seen = []
    real = backends.for_call
    monkeypatch.setattr(backends, "for_call", lambda x: seen.append(1) or real(x))
    with use_backend("cpp"):
        native = torch.ops.flexigpt.shared_lora_linear_fwd(*args)
    assert seen == []
    with use_backend("reference"):
        ref = torch.ops.flexigpt.shared_lora_linear_fwd(*args)
    assert seen == [1]
    torch.testing.assert_close(native[0], ref[0], rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FLEXIGPT_BACKEND", "reference")
    torch.ops.flexigpt.shared_lora_linear_fwd(*args)
    torch.ops.flexigpt.shared_lora_linear_fwd(*args)
    assert seen == [1, 1, 1]  # every call: reference is Python
    monkeypatch.setenv("FLEXIGPT_BACKEND", "cpp")
    torch.ops.flexigpt.shared_lora_linear_fwd(*args)  # the new value goes through Python once ...
    torch.ops.flexigpt.shared_lora_linear_fwd(*args)  # ... then the C++ kernel takes it
    assert seen == [1, 1, 1, 1]


# ---- the binding's argument checks -------------------------------------------------------------


def _args(**over):
    m, k, n, r = 4, 16, 8, 2
    g = torch.Generator().manual_seed(0)
    args = dict(
        x=torch.randn(m, k, generator=g),
        weight=torch.randn(n, k, generator=g),
        lora_a=torch.randn(r, k, generator=g),
        lora_b=torch.randn(n, r, generator=g),
        scale=1.0,
        bias=torch.randn(n, generator=g),
        norm_weight=torch.rand(n, generator=g) + 0.5,
        eps=1e-5,
        residual=torch.randn(m, n, generator=g),
        save_for_backward=True,
    )
    args.update(over)
    return args


BAD_FORWARD = [
    ("lora_b", dict(lora_b=torch.randn(8, 3)), ValueError, r"lora_b must be \[N, r\] = \[8, 2\]"),
    ("lora_a", dict(lora_a=torch.randn(2, 15)), ValueError, r"lora_a must be \[r, K\]"),
    ("weight", dict(weight=torch.randn(8, 15)), ValueError, r"weight must be \[N, K\] with K = 16"),
    ("x-3d", dict(x=torch.randn(2, 2, 16)), ValueError, r"x must be 2-D"),
    ("bias-shape", dict(bias=torch.randn(9)), ValueError, r"bias must be \[N\] = \[8\]"),
    ("bias-dtype", dict(bias=torch.randn(8, dtype=torch.float64)), TypeError, r"bias has dtype Double"),
    ("norm-dtype", dict(norm_weight=torch.ones(8, dtype=torch.bfloat16)), TypeError, r"norm_weight has dtype BFloat16"),
    ("residual-shape", dict(residual=torch.randn(4, 9)), ValueError, r"residual must be \[M, N\] = \[4, 8\]"),
    ("x-int", dict(x=torch.ones(4, 16, dtype=torch.int32)), TypeError, r"x has dtype Int; supported"),
    (
        "K-zero",
        dict(x=torch.randn(4, 0), weight=torch.randn(8, 0), lora_a=torch.randn(2, 0)),
        ValueError,
        r"K must be >= 1",
    ),
    (
        "N-zero",
        dict(
            weight=torch.randn(0, 16), lora_b=torch.randn(0, 2), bias=None, norm_weight=None, residual=torch.randn(4, 0)
        ),
        ValueError,
        r"N >= 1 output features",
    ),
    ("scale", dict(scale=float("nan")), ValueError, r"scale must be a finite float"),
    ("x-device", dict(x=torch.empty(4, 16, device="meta")), TypeError, r"weight is on cpu but x is on meta"),
    ("weight-device", dict(weight=torch.empty(8, 16, device="meta")), TypeError, r"weight is on meta but x is on cpu"),
    ("eps", dict(eps=0.0), ValueError, r"eps must be a positive float"),
]


@pytest.mark.parametrize("name,over,exc,match", BAD_FORWARD, ids=[b[0] for b in BAD_FORWARD])
def test_binding_rejects_bad_forward_arguments(name, over, exc, match):
    with pytest.raises(exc, match=match):
        _C.forward(**_args(**over))


def test_registered_op_reports_the_binding_error():
    """torch.ops.flexigpt.* skips the Python validation: the binding's check still names the argument."""
    a = _args(lora_b=torch.randn(8, 3))
    with use_backend("cpp"), pytest.raises(ValueError, match="lora_b must be"):
        torch.ops.flexigpt.shared_lora_linear_fwd(*a.values())


def test_binding_rejects_bad_backward_arguments():
    a = _args()
    out, shrink, y_pre, mean, rstd = _C.forward(**a)
    common = dict(
        grad_out=torch.randn_like(out),
        x=a["x"],
        weight=a["weight"],
        lora_a=a["lora_a"],
        lora_b=a["lora_b"],
        scale=1.0,
        norm_weight=a["norm_weight"],
        shrink=shrink,
        y_pre=y_pre,
        mean=mean,
        rstd=rstd,
        needs_weight_grad=True,
    )
    assert len(_C.backward(**common)) == 6
    cases = [
        (dict(y_pre=torch.empty(0)), ValueError, r"y_pre must be \[M, N\]"),
        (dict(mean=mean.double()), TypeError, r"mean has dtype Double"),
        (dict(rstd=rstd[:2]), ValueError, r"rstd must be \[M\] = \[4\]"),
        (dict(grad_out=torch.randn(4, 9)), ValueError, r"grad_out must be \[M, N\]"),
        (dict(shrink=shrink[:, :1]), ValueError, r"shrink must be \[M, r\] = \[4, 2\]"),
    ]
    for over, exc, match in cases:
        with pytest.raises(exc, match=match):
            _C.backward(**{**common, **over})


# ---- CUDA decode kernel ---------------------------------------------------------------------------


def test_cuda_kernel_compiles_with_nvcc():
    """What CI can check of the CUDA kernel: nvcc compiles it for sm_90a (no GPU needed)."""
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("nvcc not found: the CUDA kernel compile check needs the CUDA toolkit")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "csrc" / "check_cuda_compile.py"), "--archs", "9.0a", "--kernel-only"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


CUDA_DECODE = pytest.mark.skipif(
    not torch.cuda.is_available() or not cuda_backend.is_built(),
    reason="needs a GPU and the CUDA extension flexigpt_kernels._C_cuda",
)


@pytest.mark.gpu
@CUDA_DECODE
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,k,n,r", [(1, 576, 1536, 32), (3, 64, 123, 1), (16, 4096, 4096, 256), (8, 136, 8195, 5)])
@pytest.mark.parametrize("bias,norm,residual", FLAGS, ids=FLAG_IDS)
def test_cuda_decode_kernel_matches_reference(dtype, m, k, n, r, bias, norm, residual):
    ops = {
        key: (v.detach() if v is not None else None)
        for key, v in make_operands(
            (m,), k, n, r, dtype, bias=bias, norm=norm, residual=residual, device="cuda"
        ).items()
    }
    assert cuda_backend.decode_applies(ops["x"], ops["weight"], ops["lora_a"])
    for save in (True, False):
        res = cuda_backend.forward(
            ops["x"],
            ops["weight"],
            ops["lora_a"],
            ops["lora_b"],
            0.7,
            ops["bias"],
            ops["norm_weight"],
            1e-5,
            ops["residual"],
            save,
        )
        ref = shared_lora_linear_reference(
            *(ops[key].double() for key in ("x", "weight", "lora_a", "lora_b")),
            0.7,
            ops["bias"].double() if bias else None,
            norm_weight=ops["norm_weight"].double() if norm else None,
            residual=ops["residual"].double() if residual else None,
        )
        assert_close_scaled(res.out, ref, TOL[dtype], "out")
        assert_close_scaled(res.shrink, ops["x"].double() @ ops["lora_a"].double().t(), TOL[dtype], "shrink")
        assert res.y_pre.shape == ((m, n) if norm and save else (0,))
        assert res.mean.shape == ((m,) if norm else (0,))


# ---- norm statistics at the ends of the fp32 range ------------------------------------------------


@pytest.mark.parametrize(
    "backend,magnitude", [("cpp", 1e19), ("cpp", 1e-19), ("cpp", 1e36), ("reference", 1e19), ("reference", 1e-19)]
)
def test_norm_of_huge_and_tiny_outputs_matches_fp64(backend, magnitude):
    """Outputs near 1e19 square past fp32's range (a plain sum of squared deviations overflows
    and the norm would return zeros); the C++ kernel rescales that row. Compared with an fp64
    LayerNorm of the same pre-norm values wherever fp32 represents var (1e19, 1e-19) or, for
    the C++ kernel, rstd (1e36: var itself overflows, so the reference returns zeros there)."""
    m, k, n = 3, 16, 576
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    weight = torch.randn(n, k, generator=g) * (magnitude / k**0.5)  # outputs ~ magnitude
    lora_a, lora_b = torch.randn(2, k, generator=g), torch.zeros(n, 2)
    gamma = torch.rand(n, generator=g) + 0.5
    with use_backend(backend), torch.no_grad():
        out = shared_lora_linear(x, weight, lora_a, lora_b, 1.0, norm_weight=gamma)
    y = x.double() @ weight.double().t()
    expected = torch.nn.functional.layer_norm(y, (n,), gamma.double(), None, 1e-5)
    peak = expected.abs().max().item()
    assert peak > 0 and torch.isfinite(out).all()
    err = (out.double() - expected).abs().max().item()
    assert err <= 1e-4 * peak, f"{backend} at {magnitude:g}: max error {err:.3e} vs peak {peak:.3e}"


@CUDA_DECODE
@pytest.mark.parametrize("magnitude", [1e19, 1e-19, 1e36])
def test_cuda_decode_norm_of_huge_and_tiny_bf16_outputs_matches_fp64(magnitude):
    """bf16 holds y_pre near 1e19 and 1e36, whose squares overflow fp32: the decode kernel's tile
    statistics and their merge are power-of-two scaled like the Triton path's."""
    m, k, n = 3, 64, 1000  # 125 tiles of 8 columns per row
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    weight = (torch.randn(n, k, generator=g) * (magnitude / k**0.5)).to("cuda", torch.bfloat16)
    lora_a = torch.randn(2, k, generator=g).to("cuda", torch.bfloat16)
    lora_b = torch.zeros(n, 2, device="cuda", dtype=torch.bfloat16)
    gamma = (torch.rand(n, generator=g) + 0.5).to("cuda", torch.bfloat16)
    res = cuda_backend.forward(x, weight, lora_a, lora_b, 1.0, None, gamma, 1e-5, None, True)
    y = res.y_pre.double()  # the bf16-rounded pre-norm values the kernel normalised
    expected = torch.nn.functional.layer_norm(y, (n,), gamma.double(), None, 1e-5)
    peak = expected.abs().max().item()
    assert peak > 0 and torch.isfinite(res.out).all()
    assert (res.out.double() - expected).abs().max().item() <= TOL[torch.bfloat16] * peak
