"""Tiny converted models and a tiny tokenizer for the save / load / export tests."""

from __future__ import annotations

import contextlib

import torch
import transformers

from flexigpt_kernels.convert.prune import prune

VOCAB = 128
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]


@contextlib.contextmanager
def one_thread():
    """Tiny matrices: one intra-op thread is far faster than two on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def llama_config(**overrides) -> transformers.LlamaConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def tiny_model(config=None) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config or llama_config()).eval()


@torch.no_grad()
def converted(*, method="flexigpt", blocks=(1, 2), rank=4, output_norm=True, config=None, perturb=True):
    """A tiny pruned model; with perturb, gammas and adapters are randomised so that every
    stored tensor of a replacement block matters for the logits."""
    model, _ = prune(
        tiny_model(config), None, blocks=list(blocks), method=method, rank=rank, output_norm=output_norm, progress=False
    )
    if perturb and method == "flexigpt":
        gen = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if name.endswith(("lora_a", "lora_b")) or ".output_norm." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def inputs(seed: int = 1, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
