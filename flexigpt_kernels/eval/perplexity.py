"""Held-out perplexity: exp(mean next-token NLL) over non-overlapping chunks.

    texts -> tokens (documents joined with EOS) -> [num_chunks, seq_len] -> mean NLL of
    tokens 2..seq_len of every chunk (no BOS; each chunk starts a fresh context).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..convert.calibration import token_batches


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer=None,
    texts=None,
    *,
    seq_len: int = 256,
    num_chunks: Optional[int] = 40,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of `model` on `texts` (any calibration source: texts, files, a dataset name,
    or a token tensor [n, seq], in which case no tokenizer is needed). Chunks keep document
    order (no shuffle); num_chunks=None uses as many as the text holds."""
    if texts is None:
        raise ValueError("texts is required: a list of strings, a path, a dataset name or a token tensor")
    if isinstance(texts, torch.Tensor):
        tokens = token_batches(texts, seq_len=seq_len, num_samples=num_chunks)
    else:
        if num_chunks is None:
            num_chunks = _max_chunks(tokenizer, texts, seq_len)
        tokens = token_batches(texts, tokenizer, seq_len=seq_len, num_samples=num_chunks, seed=None)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            ids = tokens[start:start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def _max_chunks(tokenizer, texts, seq_len: int) -> int:
    if tokenizer is None:
        raise ValueError("texts need a tokenizer")
    n = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    return max(1, n // seq_len)
