"""extend(): grow a model by repeating decoder blocks that share the original weights (FlexiGPT
section 5; docs/method.md section 6).

Over the index range ``layers = range(a, b)`` of the source model:

- ``pattern="block"`` repeats each block ``repeats`` times in place:
  ``0 .. a-1, a, a, .., a+1, a+1, .., b-1, b-1, .., b .. L-1``;
- ``pattern="sequential"`` repeats the whole range: ``0 .. a-1, (a .. b-1) x repeats, b .. L-1``.

The first occurrence of each block is the original module, untouched. Every later occurrence
(a *repeat*) is a new block module: a structural copy of the original whose linear layers are
:class:`~flexigpt_kernels.nn.SharedLoRALinear` on the original's linears (the same weight
tensors, never copies), with its own low-rank adapter, its own output-norm gamma, its own copies
of the block's small norms (and of any linear bias), and its own layer index (the KV cache is
per position). Repeats are built by :func:`~flexigpt_kernels.convert.replacement.make_replacement_block`,
exactly like a pruned model's replacement blocks, and carry the same marker
(``block.flexigpt_base`` = the position of the block whose weights they share), so
``flexigpt_kernels.io`` saves and reloads extended models as it does pruned ones.

What a repeat computes at initialisation
----------------------------------------
The adapter starts as an exact no-op correction: ``B = 0`` (``A`` Kaiming-uniform, as in LoRA),
so every repeated linear computes ``x W^T (+ b)`` with the original's weight. (Initialising from
the SVD of ``W_target - W_base``, as pruning does, does not apply: a repeat's target *is* its
base, the difference is zero, and zero A and B would receive no gradient.)

- ``output_norm=True`` (default, the paper's choice): each sub-layer output passes through
  ``gamma * LayerNorm_noBias(.)`` before its residual add, so a repeat with input ``h`` computes ::

      h' = h  + gamma_attn * LN(attn(norm1(h)))
      h''= h' + gamma_mlp  * LN(mlp(norm2(h')))

  Each sub-layer adds a vector of L2 norm at most ``max|gamma| * sqrt(hidden)`` per token (a
  LayerNorm output has RMS <= 1), so a repeat moves the residual stream by at most
  ``2 * max|gamma| * sqrt(hidden)`` per token, whatever its weights. With a small gamma (default
  1e-2) the extended model starts close to the original; the tests measure how close, and how
  the gap grows with gamma.
- ``output_norm=False``: a repeat is the original block applied again (weights, biases and
  norms equal; only the layer index differs), so ``pattern="block", repeats=2`` on block i
  computes ``f_i(f_i(h))`` - the layer-duplication ("depth up-scaling") model. It is equal, up to
  floating-point rounding, to a plain model whose layer list holds the block twice; it does *not*
  stay close to the original model.

Side effects on the model (converted in place, like prune()): the decoder layer list is
replaced; every layer's attention ``layer_idx`` is renumbered to its new position;
``config.num_hidden_layers`` and ``config.layer_types`` (when present; a repeat takes its
original's type) follow the new stack; the shared base weights get ``requires_grad=False``
(SharedLoRALinear's default freezing policy); ``model.flexigpt_meta`` records method "extend".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..nn import DEFAULT_GAMMA_INIT, SharedLoRALinear
from .arguments import check_bool, check_not_converted, finite_number
from .families import Family, decoder_layers, family_of, num_layers
from .prune import stored_parameters
from .replacement import make_replacement_block, replacement_blocks, resolve_rank

__all__ = ["PATTERNS", "ExtendReport", "extend", "extension_order", "parse_layers"]

PATTERNS = ("block", "sequential")


def parse_layers(spec: str | Sequence[int] | range, num_blocks: int | None = None) -> range:
    """A layer range from ``"a:b"`` (``":b"``, ``"a:"`` with num_blocks), a range, or a
    contiguous list of ints. Raises ValueError for anything else."""
    if isinstance(spec, range):
        r = spec
    elif isinstance(spec, str):
        start, sep, stop = spec.partition(":")
        if not sep:
            raise ValueError(f"layers: expected 'a:b', got {spec!r}")
        try:
            a = int(start) if start.strip() else 0
            if stop.strip():
                b = int(stop)
            elif num_blocks is not None:
                b = num_blocks
            else:
                raise ValueError(f"layers: {spec!r} has no end and the block count is unknown")
        except ValueError as e:
            if "layers:" in str(e):
                raise
            raise ValueError(f"layers: expected 'a:b' with integers, got {spec!r}") from None
        r = range(a, b)
    else:
        items = [int(i) for i in spec]
        if not items or items != list(range(items[0], items[-1] + 1)):
            raise ValueError(f"layers: expected a contiguous ascending range of block indices, got {list(spec)}")
        r = range(items[0], items[-1] + 1)
    if r.step != 1:
        raise ValueError(f"layers: expected a contiguous range (step 1), got {r}")
    return r


def extension_order(num_blocks: int, layers: range, pattern: str, repeats: int) -> list[int]:
    """The source block index at each position of the extended stack."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if len(layers) == 0 or layers.start < 0 or layers.stop > num_blocks or layers.step != 1:
        raise ValueError(f"layers {layers} must be a non-empty contiguous range inside 0..{num_blocks}")
    inner = (
        [i for i in layers for _ in range(repeats)]
        if pattern == "block"
        else [i for _ in range(repeats) for i in layers]
    )
    return list(range(layers.start)) + inner + list(range(layers.stop, num_blocks))


@dataclass
class ExtendReport:
    """What extend() did. order: the source block of each new position; base_map: each repeat's
    new position -> the new position of the original it shares weights with."""

    pattern: str
    repeats: int
    layers: tuple[int, int]
    num_blocks_before: int
    num_blocks_after: int
    order: list[int]
    base_map: dict[int, int] = field(default_factory=dict)
    rank: int = 0
    params_before: int = 0
    params_after: int = 0
    adapter_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["base_map"] = {str(k): v for k, v in self.base_map.items()}
        d["layers"] = list(self.layers)
        return d


def _copy_structure(block: nn.Module, family: Family, keep: Sequence[object]) -> nn.Module:
    """A deep copy of `block` in which the family's linear weights/biases and the objects in
    `keep` (configs) are the very same objects, not copies (no big tensor is duplicated)."""
    memo: dict[int, object] = {id(o): o for o in keep}
    for name in family.linears:
        linear = block.get_submodule(name)
        if isinstance(linear, SharedLoRALinear):
            raise ValueError(
                f"extend: block {name} is already a shared layer (a replacement block); "
                "extend a model whose blocks in `layers` own their weights"
            )
        for p in (linear.weight, linear.bias):
            if p is not None:
                memo[id(p)] = p
    return copy.deepcopy(block, memo)


def _set_layer_list(model: nn.Module, family: Family, blocks: list[nn.Module]) -> None:
    for path in family.layer_paths:
        try:
            current = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(current, nn.ModuleList):
            parent_name, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.ModuleList(blocks))
            return
    raise ValueError(f"extend: no decoder layer list in {type(model).__name__} (tried {family.layer_paths})")


def _remap_layer_config(config, order: list[int]) -> None:
    text = config.get_text_config(decoder=True)
    for cfg in {id(config): config, id(text): text}.values():
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(order)
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) > max(order):
            cfg.layer_types = [types[i] for i in order]


def _adapter_params(blocks: list[nn.Module]) -> int:
    return sum(
        p.numel()
        for b in blocks
        for n, p in b.named_parameters()
        if n.endswith(("lora_a", "lora_b")) or "output_norm" in n
    )


@torch.no_grad()
def extend(
    model: nn.Module,
    layers: range | Sequence[int] | str,
    *,
    pattern: str = "block",
    repeats: int = 2,
    rank: int | float | None = None,
    scale: float = 1.0,
    output_norm: bool = True,
    gamma_init: float = DEFAULT_GAMMA_INIT,
    norm_eps: float = 1e-5,
    source: str | None = None,
) -> tuple[nn.Module, ExtendReport]:
    """Extend `model` in place by repeating blocks; returns (model, report). See the module doc.

    layers: the source block range, ``range(a, b)``, ``"a:b"`` or a contiguous list.
    pattern: "block" (each block `repeats` times in place) or "sequential" (the range `repeats` times).
    repeats: total occurrences of each block in the range (1 = unchanged); the model grows by
        ``(repeats - 1) * len(layers)`` blocks.
    rank: adapter rank of each repeat, an int or a fraction of the hidden size (default 256/4096),
        capped per matrix at its smaller dimension. Adapters start with B = 0 (exact no-op).
    output_norm / gamma_init / norm_eps: the output norm on every repeat (gamma starts at gamma_init).
    scale: the adapter's scale s in y = x W^T + s (x A^T) B^T.
    source: recorded in ``flexigpt_meta["source"]`` (where the model came from), for evaluation.

    Raises ValueError for an unsupported family, a bad range/pattern/repeats/rank, a scale,
    gamma_init or norm_eps that is not a finite number (scale non-zero, norm_eps > 0), or a model
    that already has replacement blocks (extending a pruned model is not supported); all of it
    is checked before the model is touched.
    """
    family = family_of(model)
    if replacement_blocks(model):
        raise ValueError(
            "extend: the model already has replacement blocks (it was pruned or extended); "
            "extend the dense model instead"
        )
    check_not_converted(model, "extend", allowed_methods=("none", "drop"))  # a "drop" model is a plain one
    scale = finite_number("scale", scale, nonzero=True)
    gamma_init = finite_number("gamma_init", gamma_init)
    norm_eps = finite_number("norm_eps", norm_eps, positive=True)
    output_norm = check_bool("output_norm", output_norm)
    if source is not None and not isinstance(source, str):
        raise ValueError(f"source: expected a string or None, got {source!r}")
    n = num_layers(model)
    layer_range = parse_layers(layers, n)
    order = extension_order(n, layer_range, pattern, repeats)
    text_config = model.config.get_text_config(decoder=True)
    r = resolve_rank(rank, text_config.hidden_size)
    params_before = stored_parameters(model)
    old = decoder_layers(model)
    keep = [model.config, text_config]

    first_pos: dict[int, int] = {}
    new_blocks: list[nn.Module] = []
    repeats_made: list[nn.Module] = []
    base_map: dict[int, int] = {}
    for pos, src in enumerate(order):
        original = old[src]
        if src not in first_pos:
            first_pos[src] = pos
            new_blocks.append(original)
            continue
        block = _copy_structure(original, family, keep)
        make_replacement_block(
            block,
            original,
            family,
            rank=r,
            scale=scale,
            output_norm=output_norm,
            gamma_init=gamma_init,
            norm_eps=norm_eps,
            svd_init=False,
        )
        block.flexigpt_base = first_pos[src]
        base_map[pos] = first_pos[src]
        new_blocks.append(block)
        repeats_made.append(block)
    # layers past num_layers(model) (never run by the model's forward) are dropped
    for pos, block in enumerate(new_blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = pos
    _set_layer_list(model, family, new_blocks)
    _remap_layer_config(model.config, order)

    report = ExtendReport(
        pattern=pattern,
        repeats=repeats,
        layers=(layer_range.start, layer_range.stop),
        num_blocks_before=n,
        num_blocks_after=len(order),
        order=order,
        base_map=base_map,
        rank=r,
        params_before=params_before,
        params_after=stored_parameters(model),
        adapter_params=_adapter_params(repeats_made),
    )
    model.flexigpt_meta = {
        "format_version": 2,  # io.checkpoint.FORMAT_VERSION (the io tests compare them)
        "method": "extend",
        "family": family.name,
        "num_blocks": n,
        "num_blocks_after": len(order),
        "pruned": [],
        "layers": [layer_range.start, layer_range.stop],
        "pattern": pattern,
        "repeats": repeats,
        "order": order,
        "base_map": {str(k): v for k, v in base_map.items()},
        "rank": r,
        "scale": scale,
        "output_norm": output_norm,
        "gamma_init": gamma_init,
        "norm_eps": norm_eps,
        "source": source,
    }
    return model, report
