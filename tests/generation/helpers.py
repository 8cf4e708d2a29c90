"""Tiny random converted models for the generation tests (hidden 64, 6 layers, small vocab)."""

from __future__ import annotations

import torch

VOCAB = 96


def tiny_model(
    family: str,
    *,
    layers: int = 6,
    vocab: int = VOCAB,
    blocks=(2, 4),
    seed: int = 0,
    gamma: float | None = None,
    sliding_window: int | None = None,
    **overrides,
):
    """A tiny random causal LM of `family`, pruned FlexiGPT-style at `blocks` (rank 8).

    initializer_range 0.1 (not HF's 0.02) gives peaked next-token distributions, so greedy
    choices are far from ties. `gamma` overwrites every output-norm gamma: the larger, the
    more the replacement blocks matter, the more the draft (which skips them) disagrees."""
    import transformers

    from flexigpt_kernels.convert.prune import prune

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    kwargs = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
    )
    if family == "mistral":
        kwargs["sliding_window"] = sliding_window
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    if blocks:
        model, _ = prune(model, None, blocks=list(blocks), rank=8, progress=False)
    if gamma is not None:
        set_gamma(model, gamma)
    return model


def set_gamma(model, value: float) -> None:
    """Fill every replacement block's output-norm gamma with `value`."""
    from flexigpt_kernels.nn import OutputNorm

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OutputNorm):
                module.weight.fill_(value)


def hf_greedy(model, ids, max_new_tokens):
    """Hugging Face's own greedy generate() (the reference output). Like ours, it stops at the
    model's generation_config.eos_token_id."""
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )


PROMPT = [[5, 17, 42, 8, 91, 33]]
