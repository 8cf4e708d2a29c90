"""LoRA on ordinary linear layers, computed by the same fused op as FlexiGPT's adapters.

A LoRA layer y = x W^T + b + (alpha / r) (x A^T) B^T is a SharedLoRALinear whose base is the
layer's own linear (B = 0 at initialisation, A Kaiming-uniform: PEFT's default init). Because
SharedLoRALinear holds its base by an *unregistered* reference, :class:`LoRALinear` registers the
linear itself (``.base``) so that its weight stays in ``model.parameters()``, ``state_dict``,
``.to()`` and DDP; the adapter lives in ``.lora``. This is the "ShortGPT + LoRA" baseline's
adapter (LoRA on the kept blocks of a model whose pruned blocks were dropped).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..convert.families import decoder_layers, family_of
from ..nn import SharedLoRALinear

__all__ = ["LoRALinear", "add_lora", "merge_lora", "lora_parameter_count", "share_kept_lora"]


class LoRALinear(nn.Module):
    """`base` (registered, frozen) plus a LoRA adapter of rank `rank` and scale alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, *, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        rank = min(rank, base.in_features, base.out_features)
        alpha = float(rank if alpha is None else alpha)
        self.base = base
        self.lora = SharedLoRALinear(base, rank, scale=alpha / rank)  # B = 0: an exact no-op at init
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with scale * B @ A added to its weight (in place), to put back into the model."""
        w = self.base.weight
        w.copy_((self.lora.merged_weight()).to(w.dtype))
        return self.base


def _lora_targets(model: nn.Module, blocks: Iterable[int] | None, targets: Iterable[str] | None):
    family = family_of(model)
    layers = decoder_layers(model)
    names = tuple(targets) if targets is not None else family.linears
    positions = range(len(layers)) if blocks is None else blocks
    for i in positions:
        block = layers[i]
        if hasattr(block, "flexigpt_base"):  # a replacement block: its linears are shared, not its own
            continue
        for name in names:
            yield i, block, name


def add_lora(
    model: nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    blocks: Iterable[int] | None = None,
    targets: Iterable[str] | None = None,
) -> list[str]:
    """Wrap the linears of the kept decoder blocks (every block that is not a FlexiGPT
    replacement block; or only `blocks`) in LoRALinear, in place. `targets` are linear names
    relative to a block (default: every projection of the model family). Linears already
    wrapped are left alone. Returns the dotted names of the new LoRA modules."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be an int >= 1, got {rank!r}")
    added = []
    for i, block, name in _lora_targets(model, blocks, targets):
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        module = getattr(parent, child)
        if isinstance(module, LoRALinear):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"block {i}: {name} is a {type(module).__name__}, not an nn.Linear")
        setattr(parent, child, LoRALinear(module, rank, alpha=alpha))
        added.append(f"{i}.{name}")
    return added


def lora_parameter_count(
    model: nn.Module, rank: int, *, blocks: Iterable[int] | None = None, targets: Iterable[str] | None = None
) -> int:
    """How many parameters add_lora(model, rank, ...) would add (without changing the model)."""
    total = 0
    for _, block, name in _lora_targets(model, blocks, targets):
        m = block.get_submodule(name)
        base = m.base if isinstance(m, LoRALinear) else m
        r = min(rank, base.in_features, base.out_features)
        total += r * (base.in_features + base.out_features)
    return total


def share_kept_lora(model: nn.Module) -> int:
    """Make every replacement linear whose base is wrapped by a LoRALinear follow that LoRA
    (SharedLoRALinear.follow_base_lora): it then computes with its base as the LoRA changes it,
    W_base + s_l B_l A_l, as the base's own block does, and the LoRA's gradient sums over the
    base's block and every block sharing it. No parameter is added; merging is then exact
    without growing the replacement adapters (merge_lora). Returns the number of linears that
    follow a LoRA."""
    loras = {id(m.base): m.lora for m in model.modules() if isinstance(m, LoRALinear)}
    owned = {id(lora) for lora in loras.values()}
    linked = 0
    for m in model.modules():
        if isinstance(m, SharedLoRALinear) and id(m) not in owned and id(m.base) in loras:
            m.follow_base_lora(loras[id(m.base)])
            linked += 1
    return linked


@torch.no_grad()
def merge_lora(model: nn.Module, *, compensate_shared: bool = True) -> int:
    """Fold every LoRALinear's delta D = s B A into its base weight and put the plain nn.Linear
    back. Returns the number of merged layers.

    A base linear may also be the shared base of FlexiGPT replacement layers (the hybrid
    trainable set: LoRA on kept blocks plus the replacement adapters). Merging changes what
    those layers compute, W -> W + D; with compensate_shared=True each of them absorbs -D into
    its own adapter, exactly and still low-rank: B' = [B_i, -(s / s_i) B], A' = [A_i; A], rank
    r_i + r (when that exceeds min(in, out), the exact difference at full rank). With
    compensate_shared=False such a merge is refused (ValueError). A layer that follows the LoRA
    (share_kept_lora) already computes with W + D: it just stops following, its adapter as is."""
    sharers: dict[int, list[SharedLoRALinear]] = {}
    for m in model.modules():
        if isinstance(m, SharedLoRALinear) and not _owned_by_lora(model, m):
            sharers.setdefault(id(m.base), []).append(m)
    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        users = []
        for user in sharers.get(id(module.base), []):
            if user._base_lora is module.lora:
                user.follow_base_lora(None)  # W + D is what it computed with
            else:
                users.append(user)
        if users and not compensate_shared:
            raise ValueError(
                f"{name}: its base linear is shared by a replacement block; merging LoRA "
                "into it would change that block as well (compensate_shared=True absorbs it)"
            )
        for user in users:
            _absorb_negative_delta(user, module.lora)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
        merged += 1
    return merged


def _absorb_negative_delta(user: SharedLoRALinear, lora: SharedLoRALinear) -> None:
    """Grow `user`'s adapter so that it computes the same after `lora`'s delta joins the base."""
    a_old, b_old = user.lora_a, user.lora_b
    ratio = lora.scale / user.scale
    b = torch.cat([b_old.float(), -ratio * lora.lora_b.float()], dim=1)
    a = torch.cat([a_old.float(), lora.lora_a.float()], dim=0)
    if a.shape[0] > min(user.in_features, user.out_features):  # the exact delta at full rank
        u, sv, vh = torch.linalg.svd(b @ a, full_matrices=False)
        r = min(user.in_features, user.out_features)
        b, a = u[:, :r] * sv[:r], vh[:r]
    user.lora_a = nn.Parameter(a.to(a_old.dtype), requires_grad=a_old.requires_grad)
    user.lora_b = nn.Parameter(b.to(b_old.dtype), requires_grad=b_old.requires_grad)
    user.rank = a.shape[0]


def _owned_by_lora(model: nn.Module, shared: SharedLoRALinear) -> bool:
    return any(isinstance(m, LoRALinear) and m.lora is shared for m in model.modules())
