"""SharedLoRALinear: a linear layer that reuses another layer's weight plus its own low-rank
adapter, optionally followed by the output norm, computed by the fused op.

    y = x @ W_base.T + b + scale * (x @ A.T) @ B.T        x [..., in], A [r, in], B [out, r]
    y = gamma * LayerNorm_noBias(y)  (if output_norm)     ( + residual, if passed to forward )

The base nn.Linear is held by reference and deliberately *not registered* as a submodule: its
weight lives once in the model (in the block that owns it), several SharedLoRALinear may share
it, and this module's state_dict holds only what it owns (A, B, an own bias, gamma).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import shared_lora_linear
from .output_norm import OutputNorm


def _check_rank(rank: int, in_features: int, out_features: int) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if rank > min(in_features, out_features):
        raise ValueError(f"rank {rank} exceeds min(in_features, out_features) = min({in_features}, {out_features})")


class SharedLoRALinear(nn.Module):
    """Shares `base`'s weight (and bias, unless an own bias is given); owns lora_a, lora_b.

    Freezing policy: `train_base=False` (default) sets requires_grad=False on the base's
    weight and bias - the same tensors every user of the base sees; adapters, own bias and
    gamma train. Pass train_base=True to let gradients reach the shared weight (they sum over
    every layer that uses it).

    While healing with LoRA on the base's own block, :meth:`follow_base_lora` makes this layer
    compute with the base as that LoRA changes it, W_base + s_l B_l A_l (train.lora.share_kept_lora).
    """

    #: the LoRA of the base's own block this layer follows (None: the base weight alone)
    _base_lora: SharedLoRALinear | None = None

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        *,
        scale: float = 1.0,
        output_norm: OutputNorm | None = None,
        bias: Tensor | None = None,
        train_base: bool = False,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        _check_rank(rank, base.in_features, base.out_features)
        if output_norm is not None and output_norm.hidden_size != base.out_features:
            raise ValueError(
                f"output_norm has size {output_norm.hidden_size} but base.out_features is {base.out_features}"
            )
        object.__setattr__(self, "_base", base)  # a reference, not a submodule (see module doc)
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.scale = float(scale)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must be [{self.out_features}], got shape {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone().to(device=w.device, dtype=w.dtype))
        else:
            self.bias = None
        self.output_norm = output_norm
        for p in (base.weight, base.bias):
            if p is not None:
                p.requires_grad_(train_base)

    @property
    def base(self) -> nn.Linear:
        return self._base

    @property
    def weight(self) -> Tensor:
        """The shared weight [out, in]: the base's own tensor."""
        return self._base.weight

    def follow_base_lora(self, lora: SharedLoRALinear | None) -> None:
        """Compute with W_base + s_l B_l A_l, where `lora` (s_l, A_l [r_l, in], B_l [out, r_l])
        is the LoRA on the base linear itself, as one adapter of rank r + r_l:
        A' = [A; A_l], B' = [B, (s_l / s) B_l]. `lora` stays another module's (a reference,
        not a submodule); its gradient sums over this layer and the base's own. None: stop."""
        if lora is not None:
            if lora.base is not self._base:
                raise ValueError("follow_base_lora: `lora` must be a LoRA on this layer's own base linear")
            if self.scale == 0:
                raise ValueError("follow_base_lora: this layer's scale is 0")
        object.__setattr__(self, "_base_lora", lora)

    def _factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) this layer computes with: its own, joined by the followed base LoRA's."""
        lora = self._base_lora
        if lora is None:
            return self.lora_a, self.lora_b
        a = torch.cat([self.lora_a, lora.lora_a.to(self.lora_a.dtype)])
        b = torch.cat([self.lora_b, (lora.scale / self.scale) * lora.lora_b.to(self.lora_b.dtype)], dim=1)
        return a, b

    def effective_bias(self) -> Tensor | None:
        return self.bias if self.bias is not None else self._base.bias

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W_base + scale * B @ A, in fp32: the dense weight this layer computes with."""
        a, b = self._factors()
        return self.weight.float() + self.scale * (b.float() @ a.float())

    @classmethod
    @torch.no_grad()
    def from_difference(
        cls,
        target: nn.Linear,
        base: nn.Linear,
        rank: int,
        *,
        scale: float = 1.0,
        output_norm: OutputNorm | None = None,
        keep_target_bias: bool = True,
        train_base: bool = False,
    ) -> SharedLoRALinear:
        """Initialise the adapter from the SVD of target.weight - base.weight, so that
        base.weight + scale * B @ A is the best rank-`rank` approximation of target.weight
        (Eckart-Young). B = U_r sqrt(S_r / scale), A = sqrt(S_r / scale) V_r^T. The target's
        bias, if any, becomes this layer's own bias (keep_target_bias)."""
        if not isinstance(target, nn.Linear):
            raise TypeError(f"target must be an nn.Linear, got {type(target).__name__}")
        if target.weight.shape != base.weight.shape:
            raise ValueError(
                f"target.weight {tuple(target.weight.shape)} and base.weight {tuple(base.weight.shape)} differ in shape"
            )
        if scale == 0:
            raise ValueError("scale must be non-zero to initialise from a difference")
        _check_rank(rank, base.in_features, base.out_features)
        bias = target.bias if (keep_target_bias and target.bias is not None) else None
        module = cls(base, rank, scale=scale, output_norm=output_norm, bias=bias, train_base=train_base)
        module.init_from_difference(target.weight)
        return module

    @torch.no_grad()
    def init_from_difference(self, target_weight: Tensor) -> None:
        """Set (A, B) to the rank-r truncated SVD of target_weight - W_base (see from_difference)."""
        diff = target_weight.float() - self.weight.float()
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        root = (s[: self.rank] / abs(self.scale)).sqrt()
        sign = 1.0 if self.scale > 0 else -1.0
        self.lora_b.copy_(sign * u[:, : self.rank] * root)
        self.lora_a.copy_(root[:, None] * vh[: self.rank])

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """y = [residual +] [output_norm](x @ W_base.T + b + scale (x @ A.T) @ B.T), x [..., in];
        parameters in another dtype than x are cast to x's (no copy when they match)."""
        dt = x.dtype
        norm = self.output_norm
        bias = self.bias if self.bias is not None else self._base.bias
        weight, lora_a, lora_b = self._base.weight, self.lora_a, self.lora_b
        if self._base_lora is not None:
            lora_a, lora_b = self._factors()
        if weight.dtype != dt or lora_a.dtype != dt or lora_b.dtype != dt:
            weight, lora_a, lora_b = weight.to(dt), lora_a.to(dt), lora_b.to(dt)
        if bias is not None and bias.dtype != dt:
            bias = bias.to(dt)
        if residual is not None and residual.dtype != dt:
            residual = residual.to(dt)
        if norm is None:
            return shared_lora_linear(x, weight, lora_a, lora_b, self.scale, bias, residual=residual)
        gamma = norm.weight if norm.weight.dtype == dt else norm.weight.to(dt)
        return shared_lora_linear(
            x, weight, lora_a, lora_b, self.scale, bias, norm_weight=gamma, eps=norm.eps, residual=residual
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"scale={self.scale}, own_bias={self.bias is not None}"
        )
