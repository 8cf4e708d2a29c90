"""The physical floor of `bench model`: each variant's FLOPs relative to the dense model's,
counted from the model's own modules and config, printed beside the measured time ratios.

Per sequence of T tokens (prefill, batch 1) and per decode step at context L:

    linear     2 * in * out per token for every nn.Linear of the model, except the LM head,
               which prefill runs on one position (logits_to_keep=1) and decode on one token
    adapter    2 * r * (in + out) per token for every SharedLoRALinear (its shrink and expand)
               on top of its base product 2 * in * out
    attention  2 * 2 * H * d per (query, key) pair per decoder layer (scores and weighted sum;
               H query heads of width d): prefill has T (T + 1) / 2 causal pairs, a decode step L

Not counted: norms, activations, rotary embeddings, residual adds and the replacement blocks'
output norms (memory-bound, O(T * hidden) each). So the floor is what the pruned model's
arithmetic alone costs relative to the dense model's: a time ratio below it means the dense
run was slowed by something else, and above it is overhead that can still be removed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Flops:
    linear: float  # per token, LM head excluded
    adapter: float  # per token
    lm_head: float  # per position computed
    attention_per_pair: float  # per (query, key) pair, all layers

    def prefill(self, seq_len: int) -> float:
        """FLOPs of one sequence's prefill (last-position logits)."""
        pairs = seq_len * (seq_len + 1) / 2
        return seq_len * (self.linear + self.adapter) + self.lm_head + pairs * self.attention_per_pair

    def decode(self, context: int) -> float:
        """FLOPs of one decode step attending to `context` positions."""
        return self.linear + self.adapter + self.lm_head + context * self.attention_per_pair


def count_flops(model: nn.Module) -> Flops:
    """Flops of `model` (a Hugging Face causal LM, FlexiGPT-converted or not)."""
    from ..convert.families import num_layers
    from ..nn import SharedLoRALinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = adapter = lm_head = 0.0
    for m in model.modules():
        if isinstance(m, SharedLoRALinear):
            linear += 2.0 * m.in_features * m.out_features
            adapter += 2.0 * m.rank * (m.in_features + m.out_features)
        elif isinstance(m, nn.Linear):
            if m is head:
                lm_head += 2.0 * m.in_features * m.out_features
            else:
                linear += 2.0 * m.in_features * m.out_features
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Flops(linear, adapter, lm_head, 4.0 * heads * head_dim * num_layers(model))


def floor_ratios(flops: dict[str, Flops], seq_len: int, new_tokens: int) -> dict[str, dict[str, float]]:
    """{variant: {"prefill": FLOPs / dense FLOPs for a seq_len prefill, "decode": the same for
    a decode step at the middle of the measured steps}}; empty without a dense variant."""
    dense = flops.get("dense")
    if dense is None:
        return {}
    context = seq_len + new_tokens // 2
    return {
        v: {"prefill": f.prefill(seq_len) / dense.prefill(seq_len), "decode": f.decode(context) / dense.decode(context)}
        for v, f in flops.items()
    }
