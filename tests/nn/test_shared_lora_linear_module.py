"""SharedLoRALinear: shares the base's own tensors (never copies, never a submodule), freezes
them by default, initialises the adapter from an SVD of the weight difference, and computes
F.linear with the merged weight (then the output norm) through the fused op."""

from __future__ import annotations

import os

# The Triton kernels run in the interpreter on CPU tensors; triton reads the flag when the
# kernels are first imported (lazily, by the first call on the triton backend).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from flexigpt_kernels import OutputNorm, SharedLoRALinear, use_backend  # noqa: E402

from ..ops.helpers import TOL, assert_close_scaled  # noqa: E402

IN, OUT = 24, 18


def linear(seed, in_features=IN, out_features=OUT, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def truncated(diff: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- sharing ---------------------------------------------------------------------------


def test_holds_the_base_tensors_themselves():
    base = linear(0)
    layer = SharedLoRALinear(base, 4)
    assert layer.weight is base.weight
    assert layer.base is base
    assert layer.effective_bias() is base.bias
    assert all(p is not base.weight and p is not base.bias for p in layer.parameters())
    with torch.no_grad():
        base.weight.add_(1.0)  # an update to the base is seen, not a stale copy (B = 0 at init)
    assert torch.equal(layer.merged_weight(), base.weight.float())


@pytest.mark.parametrize("own_bias", [False, True])
def test_base_is_not_a_submodule_and_state_dict_holds_only_own_tensors(own_bias):
    base = linear(0)
    bias = torch.randn(OUT) if own_bias else None
    layer = SharedLoRALinear(base, 4, output_norm=OutputNorm(OUT), bias=bias)
    assert [name for name, _ in layer.named_children()] == ["output_norm"]
    expected = {"lora_a", "lora_b", "output_norm.weight"} | ({"bias"} if own_bias else set())
    assert set(layer.state_dict()) == expected
    assert {name for name, _ in layer.named_parameters()} == expected
    if own_bias:
        assert layer.effective_bias() is layer.bias and torch.equal(layer.bias, bias)


def test_two_modules_share_one_base():
    base = linear(0)
    first, second = SharedLoRALinear(base, 2), SharedLoRALinear(base, 5)
    assert first.weight is second.weight is base.weight
    holder = nn.ModuleDict({"base": base, "first": first, "second": second})
    assert sum(1 for k in holder.state_dict() if k.endswith("weight") and "lora" not in k) == 1  # base.weight once
    x = torch.randn(3, IN)
    with use_backend("reference"):
        before = first(x), second(x)
        with torch.no_grad():
            base.weight.mul_(2.0)
        after = first(x), second(x)
    for b, a in zip(before, after):
        assert not torch.allclose(a, b)  # both see the update


def test_base_frozen_by_default_and_train_base_unfreezes():
    base = linear(0)
    layer = SharedLoRALinear(base, 3, output_norm=OutputNorm(OUT))
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_a.requires_grad and layer.lora_b.requires_grad and layer.output_norm.weight.requires_grad
    SharedLoRALinear(base, 3, train_base=True)
    assert base.weight.requires_grad and base.bias.requires_grad


def test_default_init_equals_the_base():
    base = linear(0)
    layer = SharedLoRALinear(base, 4, scale=3.0)
    assert torch.count_nonzero(layer.lora_b) == 0 and torch.count_nonzero(layer.lora_a) > 0
    assert torch.equal(layer.merged_weight(), base.weight.float())
    x = torch.randn(2, 5, IN)
    with use_backend("reference"), torch.no_grad():
        assert_close_scaled(layer(x), base(x), 1e-6, "output")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank must be an int >= 1"),
        ({"rank": 19}, r"rank 19 exceeds min\(in_features, out_features\) = min\(24, 18\)"),
        ({"rank": 2.0}, "rank must be an int"),
        ({"rank": 2, "output_norm": OutputNorm(OUT + 1)}, "output_norm has size 19 but base.out_features is 18"),
        ({"rank": 2, "bias": torch.zeros(OUT + 1)}, r"bias must be \[18\], got shape \(19,\)"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharedLoRALinear(linear(0), **kwargs)


def test_base_must_be_a_linear():
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        SharedLoRALinear(nn.Conv1d(4, 4, 1), 1)


# --- from_difference -------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 7])
@pytest.mark.parametrize("scale", [1.0, 0.25, -2.0])
def test_from_difference_is_the_rank_r_truncation(rank, scale):
    target, base = linear(1), linear(0)
    layer = SharedLoRALinear.from_difference(target, base, rank, scale=scale)
    expected = base.weight.double() + truncated(target.weight - base.weight, rank)
    assert_close_scaled(layer.merged_weight(), expected, 1e-5, f"rank {rank} scale {scale}")
    # Eckart-Young: no other rank-r delta is closer; its error is the tail of the spectrum.
    s = torch.linalg.svdvals((target.weight - base.weight).double())
    err = (layer.merged_weight().double() - target.weight.double()).norm()
    assert err.item() == pytest.approx(s[rank:].norm().item(), rel=1e-4)


@pytest.mark.parametrize("scale", [1.0, -0.5])
def test_from_difference_at_full_rank_is_the_target(scale):
    target, base = linear(1), linear(0)
    layer = SharedLoRALinear.from_difference(target, base, min(IN, OUT), scale=scale)
    assert rel_err(layer.merged_weight(), target.weight) < 1e-5


def test_from_difference_keeps_the_target_bias():
    target, base = linear(1), linear(0)
    layer = SharedLoRALinear.from_difference(target, base, 2)
    assert layer.bias is not None and layer.bias is not target.bias
    assert torch.equal(layer.bias, target.bias) and layer.effective_bias() is layer.bias
    assert "bias" in layer.state_dict()
    dropped = SharedLoRALinear.from_difference(target, base, 2, keep_target_bias=False)
    assert dropped.bias is None and dropped.effective_bias() is base.bias
    no_bias = SharedLoRALinear.from_difference(linear(1, bias=False), base, 2)
    assert no_bias.bias is None


@pytest.mark.parametrize(
    "rank,match",
    [
        (0, "rank must be an int >= 1"),
        (19, r"rank 19 exceeds min\(in_features, out_features\) = min\(24, 18\)"),
    ],
)
def test_from_difference_rank_errors(rank, match):
    with pytest.raises(ValueError, match=match):
        SharedLoRALinear.from_difference(linear(1), linear(0), rank)


def test_from_difference_shape_and_scale_errors():
    with pytest.raises(ValueError, match=r"target.weight \(18, 25\) and base.weight \(18, 24\) differ in shape"):
        SharedLoRALinear.from_difference(linear(1, in_features=IN + 1), linear(0), 2)
    with pytest.raises(ValueError, match="scale must be non-zero"):
        SharedLoRALinear.from_difference(linear(1), linear(0), 2, scale=0.0)
    with pytest.raises(TypeError, match="target must be an nn.Linear"):
        SharedLoRALinear.from_difference(nn.Identity(), linear(0), 2)


# --- forward ---------------------------------------------------------------------------


def _layer(norm: bool, own_bias: bool = True, rank: int = 4, scale: float = 0.5) -> SharedLoRALinear:
    target, base = linear(1), linear(0)
    layer = SharedLoRALinear.from_difference(
        target,
        base,
        rank,
        scale=scale,
        keep_target_bias=own_bias,
        output_norm=OutputNorm(OUT, init=torch.rand(OUT) + 0.5) if norm else None,
    )
    return layer


@pytest.mark.parametrize("norm", [False, True], ids=["linear", "norm"])
@pytest.mark.parametrize("own_bias", [False, True], ids=["base-bias", "own-bias"])
def test_forward_is_linear_with_the_merged_weight(norm, own_bias):
    layer = _layer(norm, own_bias)
    x, residual = torch.randn(2, 3, IN), torch.randn(2, 3, OUT)
    expected = F.linear(x.double(), layer.merged_weight().double(), layer.effective_bias().double())
    if norm:
        gamma = layer.output_norm.weight.double()
        expected = F.layer_norm(expected, (OUT,), weight=gamma, bias=None, eps=layer.output_norm.eps)
    with use_backend("reference"), torch.no_grad():
        assert_close_scaled(layer(x), expected, TOL[torch.float32], "output")
        assert_close_scaled(
            layer(x, residual=residual), residual.double() + expected, TOL[torch.float32], "output + residual"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_backend_equals_reference(dtype):
    layer = _layer(norm=True)
    x, residual = torch.randn(3, IN).to(dtype), torch.randn(3, OUT).to(dtype)
    with torch.no_grad():
        with use_backend("reference"):
            expected = layer(x, residual=residual)
        with use_backend("triton"):
            got = layer(x, residual=residual)
    assert got.dtype == dtype
    assert_close_scaled(got, expected, TOL[dtype], "triton vs reference")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_reach_adapters_and_gamma_not_the_frozen_base(backend):
    layer = _layer(norm=True)
    x = torch.randn(4, IN, requires_grad=True)
    with use_backend(backend):
        layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


def test_trained_shared_weight_gets_the_sum_of_both_layers_gradients():
    base = linear(0)
    first = SharedLoRALinear(base, 2, train_base=True)
    second = SharedLoRALinear(base, 3, scale=2.0, train_base=True)
    with torch.no_grad():
        first.lora_b.normal_()
        second.lora_b.normal_()
    x = torch.randn(5, IN)
    g1, g2 = torch.randn(5, OUT), torch.randn(5, OUT)
    with use_backend("reference"):
        ((first(x) * g1).sum() + (second(x) * g2).sum()).backward()
    # d/dW of sum(g * (x W^T + ...)) = g^T x for each use
    assert_close_scaled(base.weight.grad, g1.t() @ x + g2.t() @ x, TOL[torch.float32], "shared weight grad")
    assert_close_scaled(base.bias.grad, g1.sum(0) + g2.sum(0), TOL[torch.float32], "shared bias grad")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp16_input_with_fp32_parameters(backend):
    """Adapters, bias and gamma are cast to x's dtype; the output is fp16; parameter
    gradients come back in the parameters' own dtype (fp32)."""
    layer = _layer(norm=True)
    assert layer.lora_a.dtype == torch.float32
    x = torch.randn(3, IN)
    with use_backend(backend):
        expected = layer(x)
        out = layer(x.half())
        out.float().sum().backward()
    assert out.dtype == torch.float16
    assert_close_scaled(out, expected.detach(), TOL[torch.float16], "fp16 vs fp32")
    for name, p in layer.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name


# --- the inference path ------------------------------------------------------------------


@pytest.mark.parametrize("norm", [False, True])
def test_inference_forward_is_one_op_call_without_casts_or_environment_reads(monkeypatch, norm):
    """Under no_grad with matching dtypes, forward dispatches the op once and nothing else that
    touches data (no .to() copies), and reads no setting of the package from the environment."""
    import os as os_module

    from torch.utils._python_dispatch import TorchDispatchMode

    layer = SharedLoRALinear(linear(0), rank=3, output_norm=OutputNorm(OUT, init=0.5) if norm else None)
    x, residual = torch.randn(2, 5, IN), torch.randn(2, 5, OUT)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.name())
            return func(*args, **(kwargs or {}))

    reads = []

    class NoReads(dict):  # records the package's settings read from the environment
        def get(self, key, default=None):
            reads.append(key)
            return super().get(key, default)

        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    with torch.no_grad():
        expected = layer(x, residual)  # warm: the first call may resolve the backend
        monkeypatch.setattr(os_module, "environ", NoReads(os_module.environ))
        out = layer(x, residual)
        monkeypatch.undo()
        with Record():
            layer(x, residual)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert reads == []
    ops = [name for name in seen if not name.startswith("aten::view") and name != "aten::reshape"]
    assert ops == ["flexigpt::shared_lora_linear_fwd"], seen
