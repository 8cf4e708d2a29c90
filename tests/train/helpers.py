"""Tiny random Llama models for the training tests (hidden 64, 4 layers, vocab 128)."""

from __future__ import annotations

import torch

VOCAB, SEQ = 128, 32


def tiny_llama(seed: int = 0, layers: int = 4, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        eos_token_id=vocab - 1,
        bos_token_id=vocab - 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).float().eval()
    return model


def tiny_pruned(method: str = "flexigpt", seed: int = 0, blocks=(1, 2), rank: int = 4, vocab: int = VOCAB):
    from flexigpt_kernels.convert.prune import prune

    model = tiny_llama(seed, vocab=vocab)
    model, _ = prune(model, None, blocks=list(blocks), rank=rank, method=method, progress=False)
    return model


def token_data(n: int = 64, seed: int = 1) -> torch.Tensor:
    """Learnable token streams: a few repeated random patterns, so a few steps lower the loss."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, VOCAB, (4, 8), generator=g)
    idx = torch.randint(0, 4, (n, SEQ // 8), generator=g)
    return patterns[idx].reshape(n, SEQ)


def byte_tokenizer():
    """Byte-level tokenizer without merges: 256 byte tokens + EOS (id 256); pairs with vocab=257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>")
