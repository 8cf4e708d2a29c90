"""FSDP2 for FlexiGPT models: one ``fully_shard`` unit per *sharing group*.

A replacement block reads its base block's linear weights at forward time (SharedLoRALinear
holds the base ``nn.Linear`` by reference). FSDP2 materialises a unit's full parameters only
while that unit runs, so a replacement block wrapped on its own would read a *sharded* weight.
The unit that works and still saves memory is the sharing group:

    group(j) = {block j} U {blocks i : base_map[i] = j}        (j a base block)

(for an extended model every repeat of a block belongs to the source block's group). Each
group is one ``fully_shard([blocks...])`` call, every other block is its own unit, and the
root call takes what is left (embeddings, final norm, LM head: tied embeddings stay one
tensor). FSDP2 gathers a grouped unit at the forward of its first member to run and frees it
after the last member has run, so a group is gathered once per forward however far apart its
members are; it then stays resident from its first member to its last (see
:func:`parameter_memory_trace`, which measures what that costs). The backward mirrors it: one
gather when the gradient reaches the group's last member, freed after its first. Per
micro-batch of a training step (``reshard_after_forward=True``):

    forward:   every unit once, however far apart a group's members are (the root included:
               it stays gathered from its forward to the end of the backward)
    backward:  once more every block unit a gradient flows through, and the unit whose
               forward ended just before the first of those (FSDP2 prefetches it)

so a unit of frozen blocks before the first trainable parameter is gathered once (if not the
prefetched one), every other block unit twice, the root once; a forward without backward
(evaluation) gathers every unit once (:func:`count_all_gathers` counts them).

Mixed ``requires_grad`` inside a unit (frozen shared weights, trainable adapters and gammas) is
supported by FSDP2 per parameter.

    shard(model, mesh)              wrap in place (returns the model, now an FSDPModule)
    sharing_groups(model)           the groups, as sorted block positions
    full_state_dict(model)          the whole tensors, for save_pretrained(..., state_dict=)
    load_into_unsharded(model, fresh)  the trained tensors in an unwrapped copy (merge, save)
    parameter_memory_trace(model)   context: peak parameter bytes held by this rank in a forward
    fsdp_units(model)               the FSDP2 units over the blocks, read back from FSDP2 itself
    count_all_gathers(model)        context: all-gathers (count, bytes) per unit
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..convert.families import decoder_layers
from ..convert.replacement import replacement_blocks
from ..nn import SharedLoRALinear

__all__ = [
    "GatherCount",
    "MemoryTrace",
    "count_all_gathers",
    "fsdp_units",
    "full_state_dict",
    "held_parameter_bytes",
    "load_into_unsharded",
    "parameter_memory_trace",
    "shard",
    "sharing_groups",
]


def sharing_groups(model: nn.Module) -> list[list[int]]:
    """Block positions grouped by the base whose weights they read: [[j, i1, i2, ...], ...],
    one list per base block with at least one replacement block, each sorted."""
    groups: dict[int, set[int]] = {}
    for i, block in replacement_blocks(model).items():
        base = int(block.flexigpt_base)
        groups.setdefault(base, {base}).add(i)
    return [sorted(g) for _, g in sorted(groups.items())]


def shard(
    model: nn.Module, mesh=None, *, reshard_after_forward: bool = True, mp_policy=None, offload_policy=None
) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to `model` in place, one unit per sharing group.

    Args:
        mesh: a 1-D DeviceMesh (default: all processes of the default group, on the device
            type of the model's parameters).
        reshard_after_forward, mp_policy, offload_policy: passed to every ``fully_shard`` call
            (True becomes FSDP2's root default at the root: no reshard between forward and backward).
    Returns the model (its class is now also an FSDPModule).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if isinstance(model, FSDPModule):
        raise ValueError("shard(): the model is already wrapped by FSDP2 (fully_shard)")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        if not torch.distributed.is_initialized():
            raise RuntimeError(
                "shard(): torch.distributed is not initialised; call init_process_group "
                "(torchrun / accelerate launch) or pass a mesh"
            )
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
    }
    layers = decoder_layers(model)
    grouped = sharing_groups(model)
    in_group = {i for g in grouped for i in g}
    for group in grouped:
        fully_shard([layers[i] for i in group], **kwargs)
    for i, layer in enumerate(layers):
        if i not in in_group:
            fully_shard(layer, **kwargs)
    # the root (embeddings, final norm, LM head) is needed again as soon as the backward starts:
    # FSDP2's default for a root (None) keeps it gathered from forward to backward
    root_reshard = None if reshard_after_forward is True else reshard_after_forward
    fully_shard(model, **{**kwargs, "reshard_after_forward": root_reshard})
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every sharded tensor gathered whole (collective: every process
    calls it, and every process gets the full tensors). Tensors tied in the model (one
    parameter under two names, like tied embeddings) stay one tensor, so

        sd = full_state_dict(model)
        if rank == 0: save_pretrained(model, out, state_dict=sd)

    writes the same checkpoint as one process would. A model without FSDP2 passes through."""
    from torch.distributed.tensor import DTensor

    # the state dict hands out a new DTensor per name: tie by the parameter behind each name
    owner = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            key = owner.get(name, id(value))
            if key not in gathered:
                gathered[key] = value.full_tensor()
            value = gathered[key]
        out[name] = value
    return out


def _held_bytes(params: list[nn.Parameter]) -> int:
    """Bytes of parameters this process holds right now: a sharded DTensor counts its local
    shard, a plain (gathered or never sharded) tensor its full size."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in params:
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


def load_into_unsharded(sharded: nn.Module, fresh: nn.Module) -> nn.Module:
    """Copy a sharded model's tensors into `fresh`, an unwrapped model of the same structure
    (the same source model with the same trainable set applied), and return it (collective).
    Use it to merge LoRA and save after FSDP2 training: the wrapped model's tensors are DTensors.
    Replacement linears that follow their base's LoRA in `sharded` (heal lora_shared) follow it in
    `fresh` too, so that merging stays exact."""
    from .lora import share_kept_lora

    if any(getattr(m, "_base_lora", None) is not None for m in sharded.modules()):
        share_kept_lora(fresh)
    missing, unexpected = fresh.load_state_dict(full_state_dict(sharded), strict=False)
    tied = {n for n, p in fresh.named_parameters(remove_duplicate=False)} - {n for n, _ in fresh.named_parameters()}
    if unexpected or set(missing) - tied:
        raise ValueError(
            f"load_into_unsharded: the models differ (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}); build `fresh` with the same trainable set"
        )
    return fresh


def held_parameter_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters this process holds now (each tensor once, a replacement
    linear's base weight included): a sharded DTensor counts its local shard, a gathered or
    unsharded tensor its full size. FSDP2 swaps the registered tensors between the two states,
    so they are looked up afresh on every call."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    for module in model.modules():
        if isinstance(module, SharedLoRALinear):
            seen.setdefault(id(module.base.weight), module.base.weight)
    return _held_bytes(list(seen.values()))


@dataclass
class MemoryTrace:
    """Parameter bytes held by this process, sampled at every decoder block's forward."""

    samples: list[int] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


@contextlib.contextmanager
def parameter_memory_trace(model: nn.Module, backward: bool = False) -> Iterator[MemoryTrace]:
    """Record the parameter bytes this process holds at the start and end of every decoder
    block's forward, and with `backward` of its backward too (full backward hooks; a block no
    gradient flows through has no backward). FSDP2 has gathered the running unit by then. The
    peak is the number a user sizes a device by; compare it between wrapping plans."""
    trace = MemoryTrace()

    def sample():
        trace.samples.append(held_parameter_bytes(model))

    handles = []
    for layer in decoder_layers(model):
        handles.append(layer.register_forward_pre_hook(lambda *a: sample()))
        handles.append(layer.register_forward_hook(lambda *a: sample(), prepend=True))
        if backward:
            handles.append(layer.register_full_backward_pre_hook(lambda *a: sample()))
            handles.append(layer.register_full_backward_hook(lambda *a: sample()))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


def fsdp_units(model: nn.Module) -> list[list[int]]:
    """The FSDP2 units that hold decoder blocks, as sorted block positions, read back from FSDP2
    (collective; call it between steps): every unit is resharded, then for each wrapped block
    ``FSDPModule.unshard()`` gathers its unit, and the unit is every block whose parameters are
    then whole. Blocks not wrapped on their own (a whole-model unit) are left out; a model
    wrapped by :func:`shard` gives the sharing groups plus one unit per other block. Every unit
    is left resharded."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    layers = decoder_layers(model)

    def whole(layer: nn.Module) -> bool:
        params = list(layer.parameters())
        return bool(params) and not any(isinstance(p, DTensor) for p in params)

    for module in [model, *layers]:  # a unit may still be gathered (reshard_after_forward=False)
        if isinstance(module, FSDPModule):
            module.reshard()
    units, seen = [], set()
    for i, layer in enumerate(layers):
        if i in seen or not isinstance(layer, FSDPModule):
            continue
        layer.unshard()
        unit = [j for j, other in enumerate(layers) if whole(other)]
        layer.reshard()
        if i not in unit:
            raise RuntimeError(f"fsdp_units: unsharding block {i} left its own parameters sharded")
        seen.update(unit)
        units.append(unit)
    return units


@dataclass
class GatherCount:
    """All-gathers issued by FSDP2 per unit ("root", or the unit's block positions "1-21-24")
    and the bytes they gathered (the whole unit, on every process)."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)


class _CountingAllGather:
    """An FSDP2 all-gather (``FSDPModule.set_custom_all_gather``) that counts, then calls
    ``torch.distributed.all_gather_single`` as FSDP2's default does."""

    def __init__(self, record: GatherCount | None, unit: str):
        self.record, self.unit = record, unit

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        if self.record is not None:
            self.record.calls[self.unit] = self.record.calls.get(self.unit, 0) + 1
            nbytes = output_tensor.numel() * output_tensor.element_size()
            self.record.bytes[self.unit] = self.record.bytes.get(self.unit, 0) + nbytes
        return torch.distributed.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


@contextlib.contextmanager
def count_all_gathers(model: nn.Module) -> Iterator[GatherCount]:
    """Count the all-gathers of every FSDP2 unit of `model` (wrapped by :func:`shard`, or a
    whole-model unit) while the context is open (collective on entry, which reshards every
    unit: counting starts from rest). Units are labelled by their block positions ("1-21-24")
    and "root". On exit the units keep a pass-through
    all-gather equivalent to FSDP2's default (a custom all-gather set before is replaced)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        raise ValueError("count_all_gathers: the model is not wrapped by FSDP2 (fully_shard)")
    record = GatherCount()
    layers = decoder_layers(model)
    owners = [(layers[u[0]], "-".join(map(str, u))) for u in fsdp_units(model)] + [(model, "root")]
    for module, unit in owners:
        module.set_custom_all_gather(_CountingAllGather(record, unit))
    try:
        yield record
    finally:
        for module, unit in owners:
            module.set_custom_all_gather(_CountingAllGather(None, unit))
