"""OutputNorm: the bias-free LayerNorm with a learnable per-channel gamma that FlexiGPT puts
after a replacement block's attention and MLP outputs, before the residual add.

    out = gamma * (y - mean(y)) / sqrt(var(y) + eps)     over the last dim, y [..., N], gamma [N]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

DEFAULT_GAMMA_INIT = 1e-2


class OutputNorm(nn.Module):
    """gamma starts at `init` (small: a fresh replacement block contributes little and grows
    during training, as LoRA's zero-initialised B does). `init` may also be a tensor [N]."""

    def __init__(
        self, hidden_size: int, init: float | Tensor = DEFAULT_GAMMA_INIT, eps: float = 1e-5, device=None, dtype=None
    ):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.hidden_size = hidden_size
        self.eps = float(eps)  # a Python float (numpy scalars too): the op's schema takes a float
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: float | Tensor = DEFAULT_GAMMA_INIT) -> None:
        if isinstance(init, Tensor):
            if init.shape != (self.hidden_size,):
                raise ValueError(
                    f"init must be a float or a tensor [{self.hidden_size}], got shape {tuple(init.shape)}"
                )
            self.weight.copy_(init)
        else:
            self.weight.fill_(float(init))

    def forward(self, y: Tensor, residual: Tensor | None = None) -> Tensor:
        if y.shape[-1] != self.hidden_size:
            raise ValueError(f"OutputNorm({self.hidden_size}) got input of shape {tuple(y.shape)}")
        out = nn.functional.layer_norm(y, (self.hidden_size,), self.weight.to(y.dtype), None, self.eps)
        return out if residual is None else residual + out

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
