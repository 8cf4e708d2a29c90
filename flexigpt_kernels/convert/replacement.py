"""Turn a decoder block into a FlexiGPT replacement block, or drop blocks (ShortGPT).

A replacement block is the pruned block's own module, kept at its position with its own
layer index (so the KV cache stays per position) and its own small norms, whose linear
layers become SharedLoRALinear on the base block's linears (the same weight tensors):

    y = x W_base^T (+ b) + scale * (x A^T) B^T,  B A = rank-r SVD of (W_pruned - W_base) / scale

and whose attention and MLP outputs pass through OutputNorm (gamma * LayerNorm_noBias)
before their residual adds. Llama-like families fuse that norm into the o_proj / down_proj op;
families that already normalise the sub-layer output (Gemma's post norms) get it after
that norm. The pruned block's original weights are released matrix by matrix, so conversion
never holds more than one extra matrix (plus its SVD) beyond the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..nn import DEFAULT_GAMMA_INIT, OutputNorm, SharedLoRALinear
from .families import Family, decoder_layers, family_of, num_layers

# The paper's adapter rank: 256 on 4096-wide models.
DEFAULT_RANK_FRACTION = 256 / 4096


class PostNormThenOutputNorm(nn.Module):
    """The architecture's own sub-layer output norm followed by FlexiGPT's OutputNorm."""

    def __init__(self, norm: nn.Module, output_norm: OutputNorm):
        super().__init__()
        self.norm = norm
        self.output_norm = output_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_norm(self.norm(x))


def resolve_rank(rank: int | float | None, hidden_size: int) -> int:
    """rank: an int >= 1, a fraction in (0, 1] of the hidden size, or None for the paper's 1/16.
    A fraction rounds to the nearest int (at least 1)."""
    if rank is None:
        rank = DEFAULT_RANK_FRACTION
    if isinstance(rank, bool):
        raise ValueError(f"rank must be an int or a fraction, got {rank!r}")
    if isinstance(rank, float):
        if not 0 < rank <= 1:
            raise ValueError(f"rank as a fraction of the hidden size must be in (0, 1], got {rank}")
        return max(1, round(rank * hidden_size))
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1 or a fraction in (0, 1], got {rank!r}")
    return rank


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _check_ranks(base_block: nn.Module, family: Family, ranks: Mapping[str, int] | None) -> None:
    """Per-linear ranks name linears of the family and lie in [1, min(in, out)] (checked before
    any linear is converted)."""
    unknown = sorted(set(ranks or {}) - set(family.linears))
    if unknown:
        raise ValueError(f"ranks: {unknown} are not linears of this family ({list(family.linears)})")
    for name, r in (ranks or {}).items():
        base = base_block.get_submodule(name)
        cap = min(base.in_features, base.out_features)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= cap:
            raise ValueError(
                f"ranks[{name!r}] = {r!r}: expected an int in [1, {cap}] "
                f"(min(in, out) of {base.out_features} x {base.in_features})"
            )


def make_replacement_block(
    block: nn.Module,
    base_block: nn.Module,
    family: Family,
    *,
    rank: int,
    ranks: Mapping[str, int] | None = None,
    scale: float = 1.0,
    output_norm: bool = True,
    gamma_init: float = DEFAULT_GAMMA_INIT,
    norm_eps: float = 1e-5,
    svd_init: bool = True,
) -> nn.Module:
    """Convert `block` in place into a replacement block sharing `base_block`'s linears.

    rank is capped per matrix at min(in, out); ranks: {linear name: rank in [1, min(in, out)]}
    for linears that take another (LocalFit.rank_allocation="spectrum"). With svd_init=False the adapter starts as an
    exact no-op correction (B = 0): the block computes with the base weights alone.
    """
    _check_ranks(base_block, family, ranks)
    for name in family.linears:
        target = block.get_submodule(name)
        base = base_block.get_submodule(name)
        if isinstance(base, SharedLoRALinear):
            raise ValueError(f"base block's {name} is itself a shared layer; choose a block that owns its weights")
        r = min(rank, base.in_features, base.out_features) if ranks is None or name not in ranks else ranks[name]
        fused_norm = None
        if output_norm and name in (family.attn_out, family.mlp_out):
            own_norm_name = family.attn_out_norm if name == family.attn_out else family.mlp_out_norm
            norm = OutputNorm(
                base.out_features, gamma_init, norm_eps, device=base.weight.device, dtype=base.weight.dtype
            )
            if own_norm_name is None:
                fused_norm = norm  # computed in the same op as the linear
            else:
                _set_submodule(block, own_norm_name, PostNormThenOutputNorm(block.get_submodule(own_norm_name), norm))
        if svd_init:
            shared = SharedLoRALinear.from_difference(target, base, r, scale=scale, output_norm=fused_norm)
        else:
            shared = SharedLoRALinear(base, r, scale=scale, output_norm=fused_norm, bias=target.bias)
            with torch.no_grad():
                shared.lora_b.zero_()
        _set_submodule(block, name, shared)  # the target's own weight is released here
        del target
    return block


def replacement_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """{position: block} for every replacement block of a converted model."""
    return {i: b for i, b in enumerate(decoder_layers(model)) if hasattr(b, "flexigpt_base")}


def convert_blocks(
    model: nn.Module, base_map: dict[int, int], *, ranks: Mapping[int, Mapping[str, int]] | None = None, **kwargs
) -> None:
    """Replace every block i in base_map by a replacement block sharing block base_map[i]
    (kwargs: make_replacement_block's; ranks[i]: block i's per-linear ranks, when not uniform)."""
    family = family_of(model)
    layers = decoder_layers(model)
    stray = sorted(set(ranks or {}) - set(base_map))
    if stray:
        raise ValueError(f"ranks: blocks {stray} are not in base_map {sorted(base_map)}")
    for i, block_ranks in (ranks or {}).items():  # every block's ranks before any block changes
        _check_ranks(layers[base_map[i]], family, block_ranks)
    for i, j in sorted(base_map.items()):
        if i in base_map.values():
            raise ValueError(f"block {i} is pruned but also serves as a base")
        block = make_replacement_block(layers[i], layers[j], family, ranks=(ranks or {}).get(i), **kwargs)
        block.flexigpt_base = j  # marks the block as a replacement (see replacement_blocks)


def _subset_layer_config(config, keep: list[int]) -> None:
    text = config.get_text_config(decoder=True)
    for cfg in {id(config): config, id(text): text}.values():
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(keep)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) >= len(keep):
            cfg.layer_types = [types[i] for i in keep]


def drop_blocks(model: nn.Module, blocks: list[int]) -> None:
    """The ShortGPT baseline: remove `blocks` and renumber the remaining layers' cache indices."""
    family = family_of(model)
    layers = decoder_layers(model)
    keep = [i for i in range(num_layers(model)) if i not in set(blocks)]
    kept_layers = [layers[i] for i in keep]
    for new_idx, layer in enumerate(kept_layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    layers_parent_path = next(p for p in family.layer_paths if _has_path(model, p))
    parent_name, _, attr = layers_parent_path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.ModuleList(kept_layers))
    _subset_layer_config(model.config, keep)


def _has_path(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(model.get_submodule(path), nn.ModuleList)
    except AttributeError:
        return False
