"""The decode-size CPU kernels of the adapters' GEMMs (csrc/cpu/lowrank_small_cpu.h, through
csrc/lowrank.h): float32, M <= 16 rows, B stored column-major (as the vLLM layer holds it)
take them on a CPU with AVX-512F; everything else takes ATen's GEMMs. Both ops that use them,
the stacked delta (in place, accumulating) and the epilogue (written, then the norm), against
an fp64 reference on odd shapes: every row count around the 8-row chunks and the 16-row limit,
K and widths that are not multiples of 16 or 32, rank 1, ranks above the kernel's limit, strided
x, and a y that is a column slice of a wider buffer."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.ops import library
from flexigpt_kernels.ops.epilogue import shared_lora_linear_epilogue
from flexigpt_kernels.ops.stacked import add_stacked_delta_

ROWS = [1, 2, 7, 8, 9, 15, 16, 17]
TOL = 2e-5  # fp32 accumulation against fp64, relative to the output's scale


def column_major(b: torch.Tensor) -> torch.Tensor:
    """b [N, r] with the same values, stored as the transposed view of a contiguous [r, N]."""
    out = b.t().contiguous().t()
    assert out.stride(0) == 1 or b.shape[0] == 1
    return out


def delta_reference(y, x, lora_as, lora_bs, scales, bias):
    out, col = y.double().clone(), 0
    for a, b, s in zip(lora_as, lora_bs, scales):
        out[:, col : col + b.shape[0]] += s * (x.double() @ a.double().t()) @ b.double().t()
        col += b.shape[0]
    return out + bias.double() if bias is not None else out


def assert_close(got, want, what):
    err = (got.double() - want).abs().max().item() / (want.abs().max().item() + 1.0)
    assert err < TOL, f"{what}: relative error {err:.2e}"


def parts(k, widths, ranks, seed, layout):
    g = torch.Generator().manual_seed(seed)
    a_buf = torch.randn(sum(ranks), k, generator=g) * k**-0.5  # the parts' A: row views of one buffer
    lora_as = list(a_buf.split(ranks))
    lora_bs = [torch.randn(n, r, generator=g) * r**-0.5 for n, r in zip(widths, ranks)]
    if layout == "column_major":
        lora_bs = [column_major(b) for b in lora_bs]
    return lora_as, lora_bs


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(
    "k,widths,ranks",
    [(1, [5], [1]), (17, [33, 16, 47], [3, 3, 3]), (40, [64, 31], [36, 2]), (576, [576, 192, 192], [36, 36, 36])],
    ids=str,
)
@pytest.mark.parametrize("layout", ["column_major", "row_major"])
def test_stacked_delta_at_decode_sizes(m, k, widths, ranks, layout):
    lora_as, lora_bs = parts(k, widths, ranks, m, layout)
    scales = [0.5 + i for i in range(len(widths))]
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, k + 3, generator=g)[:, 1 : k + 1]  # rows with a stride of k + 3
    wide = torch.randn(m, sum(widths) + 9, generator=g)
    y = wide[:, 4 : 4 + sum(widths)]  # a column slice: the delta accumulates into the view
    bias = torch.randn(sum(widths), generator=g)
    want = delta_reference(y, x, lora_as, lora_bs, scales, bias)
    before = wide.clone()
    got = add_stacked_delta_(y, x, lora_as, lora_bs, scales, bias)
    assert got is y
    assert_close(y, want, "stacked delta")
    end = 4 + sum(widths)
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, end:], before[:, end:])  # untouched


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("k,n,r", [(1, 7, 1), (33, 47, 5), (576, 576, 36), (70, 40, 300)], ids=str)
@pytest.mark.parametrize("layout", ["column_major", "row_major"])
@pytest.mark.parametrize("norm", [False, True], ids=["no_norm", "norm"])
def test_epilogue_at_decode_sizes(m, k, n, r, layout, norm):
    """r = 300 is above the expand kernel's rank limit: ATen's GEMM, the same result."""
    (lora_a,), (lora_b,) = parts(k, [n], [r], m, layout)
    g = torch.Generator().manual_seed(200 + m)
    x, y0, bias = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g), torch.randn(n, generator=g)
    gamma = torch.rand(n, generator=g) + 0.5 if norm else None
    v = delta_reference(y0, x, [lora_a], [lora_b], [0.7], bias)
    if norm:
        v = gamma.double() * (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-5)
    got = shared_lora_linear_epilogue(y0, x, lora_a, lora_b, 0.7, bias, norm_weight=gamma, eps=1e-5)
    assert_close(got, v, "epilogue")


def test_column_major_and_row_major_b_agree():
    """The kernel (column-major B) and ATen's GEMM (row-major B) on the same values."""
    lora_as, lora_bs = parts(576, [1536, 1536], [36, 36], 0, "row_major")
    x = torch.randn(8, 576)
    y = torch.randn(8, 3072)
    by_aten = add_stacked_delta_(y.clone(), x, lora_as, lora_bs, [2.0, 2.0])
    by_kernel = add_stacked_delta_(y.clone(), x, lora_as, [column_major(b) for b in lora_bs], [2.0, 2.0])
    torch.testing.assert_close(by_kernel, by_aten, rtol=1e-5, atol=1e-5)


def kernel_calls() -> int:
    return torch.ops.flexigpt._small_kernel_calls()


@pytest.mark.skipif(not library.NATIVE_CPU, reason="the C++ extension flexigpt_kernels._C is not built")
@pytest.mark.parametrize(
    "case,m,layout,dtype,taken",
    [
        ("decode rows, column-major B: one shrink and one expand per part", 8, "column_major", torch.float32, 4),
        ("M = 1", 1, "column_major", torch.float32, 4),
        ("M = 16, the limit", 16, "column_major", torch.float32, 4),
        ("row-major B: the shrink only, ATen expands", 8, "row_major", torch.float32, 1),
        ("M = 17: ATen", 17, "column_major", torch.float32, 0),
        ("float64: ATen", 8, "column_major", torch.float64, 0),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_which_path_a_call_takes(case, m, layout, dtype, taken):
    """The kernels run exactly where the header says (counted by the extension), so the parity
    tests above check them and not only ATen; a CPU without AVX-512F takes ATen everywhere."""
    lora_as, lora_bs = parts(576, [576, 192, 192], [36, 36, 36], 0, layout)
    lora_as, lora_bs = [a.to(dtype) for a in lora_as], [b.to(dtype) for b in lora_bs]
    if layout == "column_major":
        lora_bs = [column_major(b) for b in lora_bs]
    x, y = torch.randn(m, 576, dtype=dtype), torch.randn(m, 960, dtype=dtype)
    want = delta_reference(y, x, lora_as, lora_bs, [1.0] * 3, None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one task per parallel region: one count per kernel call
    try:
        before = kernel_calls()
        add_stacked_delta_(y, x, lora_as, lora_bs, [1.0] * 3)
        counted = kernel_calls() - before
    finally:
        torch.set_num_threads(threads)
    assert counted == (taken if torch.ops.flexigpt._small_rows_supported() else 0), case
    assert_close(y, want, case)


@pytest.mark.skipif(not library.NATIVE_CPU, reason="the C++ extension flexigpt_kernels._C is not built")
def test_the_epilogue_takes_the_kernels_below_the_rank_limit_only():
    x, y0 = torch.randn(4, 70), torch.randn(4, 40)
    counts = []
    for r in (36, 300):
        (lora_a,), (lora_b,) = parts(70, [40], [r], r, "column_major")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            before = kernel_calls()
            shared_lora_linear_epilogue(y0, x, lora_a, lora_b, 0.5)
            counts.append(kernel_calls() - before)
        finally:
            torch.set_num_threads(threads)
    assert counts == ([2, 1] if torch.ops.flexigpt._small_rows_supported() else [0, 0])
