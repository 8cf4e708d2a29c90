"""Wall-clock time of each decoder layer and its modules inside a running vLLM engine.

An end-to-end throughput ratio on a small shared machine moves by several percent between runs;
the time a replacement block adds over a plain block is a fraction of that. These timers run in
the engine's own process (through ``LLM.apply_model``, which pickles these module-level functions
by reference) and time every decoder layer and its modules two levels down (attention, its linear
layers, norms, MLP) per forward call, so one run gives, per module, the median over many decode steps of both models:

    engine.apply_model(install_timers)          # forward pre/post hooks on the layers
    engine.generate(...)                        # the workload
    times = engine.apply_model(read_timers)[0]  # {module name: {rows: [ns, ...]}}
    engine.apply_model(remove_timers)

``rows`` is the number of token rows of the call (a decode step at batch B has B rows), so the
reader can keep the decode steps apart from the prefill. Both models carry the same hooks on
the same modules, so their cost (not measured separately) is common to both columns.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

#: the module attribute holding a model's timers and hook handles
_ATTR = "_flexigpt_timers"


def _timed(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder layers ("model.layers.N") and their modules two levels down ("self_attn",
    "self_attn.qkv_proj", "mlp.act_fn", ...), not the insides of a replacement linear."""
    out = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if "layers" not in parts[:-1]:
            continue
        below = parts[parts.index("layers") + 2 :]
        if len(below) <= 2 and not any(p.startswith("_") or p in ("adapters", "output_norm") for p in below):
            out.append((name, module))
    return out


def _rows(args, kwargs) -> int:
    """Token rows of a call: its hidden states (keyword "hidden_states", else the second input
    of a decoder layer or attention, whose first is the positions, else its only input), as
    [rows, features] or [..., features]; -1 when it has no tensor input to count."""
    hidden = kwargs.get("hidden_states")
    if hidden is None and args:
        hidden = args[1] if len(args) > 1 and torch.is_tensor(args[1]) else args[0]
    if not torch.is_tensor(hidden) or hidden.dim() == 0:
        return -1
    return int(hidden.numel() // hidden.shape[-1])


def install_timers(model: nn.Module) -> int:
    """Hooks on every module _timed picks in `model`; returns how many modules are timed."""
    remove_timers(model)
    samples: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    handles = []
    for name, module in _timed(model):
        start: list[int] = []

        def pre(_module, args, kwargs, start=start):
            start.append(time.perf_counter_ns())

        def post(_module, args, kwargs, _output, name=name, start=start):
            samples[name][_rows(args, kwargs)].append(time.perf_counter_ns() - start.pop())

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    setattr(model, _ATTR, (samples, handles))
    return len(handles) // 2


def read_timers(model: nn.Module) -> dict[str, dict[int, list[int]]]:
    """{module name: {rows: [ns per call, ...]}} since install_timers (plain dicts, picklable)."""
    samples, _ = getattr(model, _ATTR, ({}, []))
    return {name: {rows: list(ns) for rows, ns in by_rows.items()} for name, by_rows in samples.items()}


def remove_timers(model: nn.Module) -> None:
    """Removes the hooks of install_timers (no-op without them)."""
    _, handles = getattr(model, _ATTR, ({}, []))
    for handle in handles:
        handle.remove()
    if hasattr(model, _ATTR):
        delattr(model, _ATTR)
