"""The self-speculative draft: the converted model with its replacement blocks skipped.

A FlexiGPT model carries its draft for free: skipping every replacement block leaves the kept
blocks of the original model, i.e. the ShortGPT (drop) architecture, with no extra weights.
The draft runs through the model's own forward with the skipped positions swapped for an
identity module, so every family in the table works unchanged (the decoder layers of
transformers 5.x return the hidden states as a plain tensor).

KV caches: the draft and the full model see different hidden states at the kept blocks, so
they keep separate caches. The draft's cache holds entries for the kept blocks only: its
skipped positions are transformers' ``DummyLayer`` (stores nothing, crops as a no-op, and is
ignored when the mask and the sequence length are read off the cache).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from ..convert.families import decoder_layers
from ..convert.replacement import replacement_blocks

__all__ = ["SkippedBlock", "draft_positions", "skip_blocks", "make_cache", "cache_argument"]


class SkippedBlock(nn.Module):
    """Identity stand-in for a decoder layer: returns the hidden states it receives."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        return hidden_states


def draft_positions(model: nn.Module) -> list[int]:
    """Positions of the blocks the draft skips: every replacement block, ascending."""
    return sorted(replacement_blocks(model))


@contextlib.contextmanager
def skip_blocks(model: nn.Module, positions: Iterable[int]) -> Iterator[nn.Module]:
    """Within the block, `model`'s decoder layers at `positions` are identities; restored on
    exit (also on error). Not thread-safe: the model's layer list is edited in place."""
    layers = decoder_layers(model)
    positions = list(positions)
    saved = {i: layers[i] for i in positions}
    skipped = SkippedBlock()
    try:
        for i in positions:
            layers[i] = skipped
        yield model
    finally:
        for i, block in saved.items():
            layers[i] = block


def make_cache(model: nn.Module, skipped: Iterable[int] = (), *, max_cache_len: int | None = None):
    """A fresh KV cache for `model` whose `skipped` positions hold no entries (``DummyLayer``).

    max_cache_len=None: a ``DynamicCache`` (grows by concatenation). Past recording is switched
    on so that sliding-window layers can be rolled back with ``crop(-n)`` after a rejected
    draft (as transformers' assisted decoding does).
    max_cache_len=N: a ``StaticCache`` of N positions, preallocated: every decode step then has
    static shapes (what torch.compile's CUDA graphs need); ``crop(-n)`` only moves its length
    back. Sliding-window layers cannot be rolled back once their window is full, so models
    with sliding-window layers raise ValueError here."""
    from transformers.cache_utils import DummyLayer, DynamicCache, StaticCache

    if max_cache_len is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        if any(cache.is_sliding):
            raise ValueError(
                "a static cache cannot roll back sliding-window layers once their window is full; "
                "use the dynamic cache (static_cache=False) for this model"
            )
    skipped = list(skipped)
    if skipped and len(cache.layers) == 0:
        raise RuntimeError("the model's config did not size its cache; cannot build the draft cache")
    for i in skipped:
        cache.layers[i] = DummyLayer()
    if max_cache_len is None:
        cache.activate_past_recording()
    return cache


def cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache keyword of ``model.forward``: ``cache`` in transformers 5.x
    (``past_key_values`` before the rename)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
