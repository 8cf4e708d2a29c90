"""The replacement linear of a FlexiGPT block inside a vLLM model.

vLLM stacks projections that read the same input into one weight: ``qkv_proj`` holds
[W_q; W_k; W_v] and ``gate_up_proj`` holds [W_gate; W_up] (rows concatenated). A replacement
block's stacked projection therefore owns no weight: it computes, for each part p of the
base block's stacked linear (rows start_p .. start_p + n_p),

    y_p = x @ W_base[start_p : start_p + n_p].T + b_p + s_p * (x @ A_p.T) @ B_p.T

with the checkpoint's own adapter (A_p [r_p, K], B_p [n_p, r_p]) and bias (its own, else the
base's slice), and concatenates the parts. ``W_base[rows]`` is a view of the base linear's
weight: the same memory, no copy. ``o_proj`` and ``down_proj`` are one part each and fuse the
output norm (gamma * LayerNorm_noBias) into the same op call. Every part is one call of
``torch.ops.flexigpt.shared_lora_linear_fwd``: the adapters stay as stored (no zero-padded
block-diagonal B, so the weights held equal the checkpoint's bytes), and the base rows are
read once per step as in the stacked GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ...nn import OutputNorm
# torch.ops.flexigpt.* is registered by importing flexigpt_kernels (its ops subpackage)

__all__ = ["AdapterSpec", "FlexiGPTSharedLinear"]


@dataclass(frozen=True)
class AdapterSpec:
    """One part of a stacked projection: its checkpoint name (e.g. "q_proj"), rank, scale and
    whether it carries its own bias."""

    name: str
    rank: int
    scale: float = 1.0
    own_bias: bool = False


class _Adapter(nn.Module):
    """lora_a [r, K], lora_b [N, r] and an own bias [N] when the checkpoint has one."""

    def __init__(self, in_features: int, out_features: int, spec: AdapterSpec, dtype: torch.dtype,
                 device: Optional[torch.device]):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.scale = float(spec.scale)
        self.lora_a = nn.Parameter(torch.empty(spec.rank, in_features, **kw), requires_grad=False)
        self.lora_b = nn.Parameter(torch.empty(out_features, spec.rank, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if spec.own_bias else None


class FlexiGPTSharedLinear(nn.Module):
    """Stands in for vLLM's (stacked) linear `base` in a replacement block; returns
    (output, None) as vLLM's linear layers do. `base` is held by reference, not registered:
    its weight belongs to the base block and appears once in the model's parameters."""

    def __init__(self, base: nn.Module, parts: list[AdapterSpec], *, norm_eps: Optional[float] = None):
        super().__init__()
        sizes = list(base.output_partition_sizes)
        if len(sizes) != len(parts):
            raise ValueError(f"{type(base).__name__} stacks {len(sizes)} projections, got adapters for "
                             f"{[p.name for p in parts]}")
        if norm_eps is not None and len(parts) != 1:
            raise ValueError("an output norm follows a single projection (o_proj / down_proj)")
        weight = base.weight
        object.__setattr__(self, "_base", base)  # a reference, not a submodule
        self.in_features = weight.shape[1]
        self.out_features = sum(sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._rows = [(start, size) for start, size in zip(starts, sizes)]
        self.adapters = nn.ModuleDict({
            p.name: _Adapter(self.in_features, size, p, weight.dtype, weight.device) for p, size in zip(parts, sizes)
        })
        self.output_norm = (OutputNorm(self.out_features, 1.0, norm_eps, device=weight.device, dtype=weight.dtype)
                            if norm_eps is not None else None)
        if self.output_norm is not None:
            self.output_norm.weight.requires_grad_(False)

    @property
    def base(self) -> nn.Module:
        return self._base

    def checkpoint_tensors(self, prefix: str) -> dict[str, nn.Parameter]:
        """{checkpoint name: parameter} of what this layer loads; `prefix` is the block's
        sub-layer path in the checkpoint (e.g. "model.layers.3.self_attn.")."""
        out = {}
        for name, adapter in self.adapters.items():
            for key, param in adapter.named_parameters():
                out[f"{prefix}{name}.{key}"] = param
        if self.output_norm is not None:
            out[f"{prefix}{next(iter(self.adapters))}.output_norm.weight"] = self.output_norm.weight
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        weight, base_bias = self._base.weight, getattr(self._base, "bias", None)
        norm = self.output_norm
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        outs = []
        for (start, size), adapter in zip(self._rows, self.adapters.values()):
            bias = adapter.bias
            if bias is None and base_bias is not None:
                bias = base_bias[start:start + size]
            outs.append(torch.ops.flexigpt.shared_lora_linear_fwd(
                x, weight[start:start + size], adapter.lora_a, adapter.lora_b, adapter.scale, bias,
                norm.weight if norm is not None else None, norm.eps if norm is not None else 1e-5, None, False,
            )[0])
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out.reshape(*lead, out.shape[-1]), None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"parts={list(self.adapters)}, shares={type(self._base).__name__}")
