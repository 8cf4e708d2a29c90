"""Tiny offline fixtures for the conversion tests: random models of every family, a tokenizer."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

_COMMON = dict(vocab_size=256, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)

# model_type -> extra config kwargs (head_dim where the family wants it explicit)
TINY_CONFIGS = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=16),
    "gemma2": dict(_DECODER, head_dim=16),
    "gemma3_text": dict(_DECODER, head_dim=16),
    "phi3": _DECODER,
    "opt": dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64),
}


def tiny_model(model_type: str = "llama", layers: int = 6, seed: int = 0, **overrides):
    """A random tiny causal LM of ``model_type`` in eval mode (fp32, CPU)."""
    torch.manual_seed(seed)
    kwargs = dict(_COMMON, **TINY_CONFIGS[model_type], num_hidden_layers=layers, **overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def word_tokenizer():
    """A whitespace word-level tokenizer over the words w0..w99 plus [UNK] (0) and [EOS] (1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i + 2 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(autouse=True)
def _one_thread():
    """LAPACK calls (SVD) on 2 oversubscribed cores run ~100x slower with 2 threads than with 1
    (measured: 0.7 s vs 5 ms for a 128 x 64 SVD); these tests use tiny shapes, so run them on one
    thread and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
