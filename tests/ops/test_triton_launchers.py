"""The Triton launchers' choices and guards, on the CPU (interpreter): tile fitting, the decode
fused/separate shrink choice, split-K, the two-stage column reduction, fp32 precision from
torch's new API, the device guard, and the torch.library ops."""

from __future__ import annotations

import contextlib

import pytest
import torch

from flexigpt_kernels.ops.triton import configs, launch
from flexigpt_kernels.ops.triton import shared_lora_linear as triton_backend
from flexigpt_kernels.ops.triton.linear_lora import LORA_FUSED, LORA_PRECOMPUTED, linear_lora, shrink
from flexigpt_kernels.ops.triton.row_norm import column_slices

from .helpers import TOL, assert_close_scaled, check_against_reference, make_operands


@pytest.fixture
def restore_precision():
    before = torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision = before


# --- shared memory and the decode choice -----------------------------------------------------


def test_fit_config_steps_down_stages_then_k():
    cfg = configs.TileConfig(16, 64, 64, num_stages=4)
    est = configs.smem_estimate(cfg, 4, fused_r=1024)  # fp32, the old rank-1024 fused tile
    assert est > configs.SMEM_LIMIT[90]
    fitted = configs.fit_config(cfg, 4, configs.SMEM_LIMIT[80], fused_r=1024)
    assert fitted.num_stages == 2 and fitted.block_k < 64
    assert configs.smem_estimate(fitted, 4, 1024) <= configs.SMEM_LIMIT[80]
    assert configs.fit_config(configs.TileConfig(16, 64, 16, num_stages=2), 4, 1000, fused_r=1024) is None


@pytest.mark.parametrize("r,fused", [(1, True), (16, True), (64, True), (65, False), (256, False), (1024, False)])
def test_decode_fuses_the_shrink_only_up_to_the_n_tile(r, fused):
    cfg = configs.decode_config(torch.float32)
    assert configs.use_fused_shrink(1, r, cfg) is fused
    assert not configs.use_fused_shrink(65, 16, cfg)  # prefill never fuses


def _record(x, w, a, b, **kw):
    with launch.recording() as seen:
        triton_backend.forward(x, w, a, b, 0.5, None, kw.get("norm"), 1e-5, None, False)
    return seen


def test_fp32_rank_1024_decode_gets_tiles_that_fit():
    """The launcher, not the GPU, decides: separate shrink + precomputed GEMM, every tile in budget."""
    x, w = torch.empty(1, 512), torch.empty(256, 512)
    a, b = torch.empty(1024, 512), torch.empty(256, 1024)
    seen = _record(x, w, a, b, norm=torch.empty(256))
    modes = [ln.kwargs.get("LORA_MODE") for ln in seen]
    assert LORA_FUSED not in modes and LORA_PRECOMPUTED in modes
    for ln in seen:
        if ln.name == "_linear_lora_kernel":
            k = ln.kwargs
            cfg = configs.TileConfig(
                k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], k["GROUP_M"], k["num_warps"], k["num_stages"]
            )
            assert configs.smem_estimate(cfg, 4) <= configs.SMEM_LIMIT[80]


def test_split_k_fills_the_machine_and_matches():
    cfg = configs.shrink_config(512, 32, torch.float16)
    assert configs.split_k(512, 32, 4096, cfg) > 1  # 8 tiles alone would leave a 132-SM GPU idle
    assert configs.split_k(2, 8, 200, configs.shrink_config(2, 8, torch.float32)) == 1  # K too short to split
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(5, 1100, generator=g), torch.randn(7, 1100, generator=g)
    assert configs.split_k(5, 7, 1100, configs.shrink_config(5, 7, torch.float32)) == 4
    out = shrink(x, a, torch.empty(5, 7), scale=0.5)
    assert_close_scaled(out, 0.5 * x.double() @ a.double().t(), TOL[torch.float32], "split-K shrink")


def test_k_split_needs_a_partial_buffer():
    x, w = torch.empty(4, 64), torch.empty(8, 64)
    with pytest.raises(ValueError, match="k_split"):
        linear_lora(x, w, out=torch.empty(4, 8), k_split=2)
    with pytest.raises(ValueError, match="plain GEMMs"):
        linear_lora(x, w, out=torch.empty(2, 4, 8), bias=torch.empty(8), k_split=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "lead,k,n,r,norm",
    [((3,), 600, 70, 96, True), ((2,), 520, 40, 65, False), ((300,), 40, 24, 4, True)],
    ids=["decode-r96", "decode-r65", "rows300"],
)
def test_separate_shrink_and_column_reduction_match_reference(dtype, lead, k, n, r, norm):
    """Decode above rank 64 (split-K shrink + precomputed GEMM) and a 300-row backward whose
    dgamma/dbias reduce over 10 row slices, forward and every gradient."""
    ops = make_operands(lead, k, n, r, dtype, norm=norm, residual=True)
    grad_out = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_against_reference("triton", ops, grad_out, dtype)


def test_column_slices():
    assert column_slices(300, 24, 32) == (10, 32)
    slices, rows = column_slices(4096, 576, 128)  # 5 column tiles: many row slices
    assert slices * 5 >= 200 and rows % 32 == 0 and slices * rows >= 4096  # ~256 programs, whole row blocks
    assert column_slices(1, 8192, 128) == (1, 32)


# --- fp32 precision ----------------------------------------------------------------------------


def test_fp32_precision_follows_the_new_api_and_never_reads_allow_tf32(restore_precision):
    assert launch.ieee_f32(torch.float32)  # default: IEEE
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        _ = torch.backends.cuda.matmul.allow_tf32  # what the old code read: raises once the new API was used
    assert not launch.ieee_f32(torch.float32)
    assert launch.ieee_f32(torch.float64) is False and not launch.ieee_f32(torch.float16)
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with launch.recording() as seen:
        linear_lora(x, w, out=torch.empty(2, 8))
    assert seen[0].kwargs["IEEE_F32"] is False
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    assert launch.ieee_f32(torch.float32)


def test_fp32_forward_runs_after_the_new_api_was_set(restore_precision):
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    ops = make_operands((3,), 40, 24, 4, torch.float32)
    grad_out = torch.randn(3, 24, generator=torch.Generator().manual_seed(1))
    check_against_reference("triton", ops, grad_out, torch.float32)  # the interpreter multiplies in fp32


# --- device guard ------------------------------------------------------------------------------


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with launch.device_guard(torch.device("cuda", 1)):
        pass
    with launch.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]
    assert launch.kernel_device((3, None, torch.empty(1, device="meta"), torch.empty(1))) == torch.device("meta")


def test_every_launch_goes_through_the_guard_with_the_first_tensor_device(monkeypatch):
    guarded, launched = [], []

    @contextlib.contextmanager
    def guard(device):
        guarded.append(device)
        yield

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append((grid, len(args)))

    monkeypatch.setattr(launch, "device_guard", guard)
    launch.launch(Kernel(), (2, 1), 4, torch.empty(3), torch.empty(2), BLOCK=16)
    assert guarded == [torch.device("cpu")] and launched == [((2, 1), 3)]
    # the real backend: one guard per kernel launch
    guarded.clear()
    monkeypatch.setattr(launch, "device_guard", lambda d: (guarded.append(d), contextlib.nullcontext())[1])
    ops = make_operands((2,), 32, 16, 4, torch.float32, residual=False)
    args = [ops[k].detach() for k in ("x", "weight", "lora_a", "lora_b")]
    triton_backend.forward(*args, 0.5, None, ops["norm_weight"].detach(), 1e-5, None, False)
    assert guarded == [torch.device("cpu")] * 2  # the fused GEMM, the norm finish


# --- torch.library ------------------------------------------------------------------------------


def _op_args(m=3, norm=True):
    ops = make_operands((m,), 32, 24, 4, torch.float32, residual=True)
    return (
        ops["x"].detach(),
        ops["weight"].detach(),
        ops["lora_a"].detach(),
        ops["lora_b"].detach(),
        0.5,
        ops["bias"].detach(),
        ops["norm_weight"].detach() if norm else None,
        1e-5,
        ops["residual"].detach(),
        True,
    )


def test_ops_are_registered_and_pass_opcheck():
    fwd = torch.ops.flexigpt.triton_lora_fwd
    args = _op_args()
    torch.library.opcheck(fwd.default, args, test_utils=("test_schema", "test_faketensor"))
    out = fwd(*args)
    saved = tuple(out[1:])
    g = torch.randn_like(out[0])
    bwd_args = (g, *args[:5], args[6], *saved, True)
    torch.library.opcheck(
        torch.ops.flexigpt.triton_lora_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor")
    )


def test_torch_compile_fullgraph_traces_the_triton_path():
    args = _op_args(m=2)

    def f(x, w, a, b, bias, nw, res):
        return triton_backend.forward(x, w, a, b, 0.5, bias, nw, 1e-5, res, False).out * 2

    tensors = [args[i] for i in (0, 1, 2, 3, 5, 6, 8)]
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert_close_scaled(compiled(*tensors), f(*tensors), 1e-6, "compiled")
