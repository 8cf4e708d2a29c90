"""Tiny random models and a byte-level tokenizer for the evaluation and extension tests
(no download: everything is built from configs in memory)."""

from __future__ import annotations

import torch

EOS = "<|endoftext|>"


def byte_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens + EOS (id 256). Round-trips any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, bos_token=EOS)


def tiny_model(
    model_type: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 32,
    vocab: int = 257,
    seed: int = 0,
    embed_std: float = 1.0,
    **overrides,
):
    """A random tiny causal LM of `model_type` in fp32 eval mode. Embeddings get std
    `embed_std` (HF's init uses 0.02, far below a trained model's residual-stream scale)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=vocab - 1,
        bos_token_id=vocab - 1,
        pad_token_id=None,
    )
    if model_type in ("gemma2", "gemma3_text"):
        kw.update(head_dim=hidden // 4, sliding_window=8, query_pre_attn_scalar=hidden // 4)
    if model_type == "qwen3":
        kw.update(head_dim=hidden // 4)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init of a fresh HF model is small; widen the norms a little so blocks differ
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, embed_std)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
