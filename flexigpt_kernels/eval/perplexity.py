"""Held-out perplexity: exp(mean next-token NLL) over non-overlapping windows.

The method (the "non-overlapping windows" evaluation, stride = window length):

1. texts are tokenized without special tokens and joined into one stream with the
   tokenizer's EOS id between documents (no BOS anywhere), in the given order;
2. the stream is cut into consecutive, non-overlapping windows of ``seq_len`` tokens; the
   first ``num_chunks`` windows are used and the leftover tail is dropped (a token tensor
   [n, seq] is used as given: its first ``num_chunks`` rows and ``seq_len`` columns);
3. every window is an independent context (no cache, no carried state, no BOS): the model
   predicts tokens 2..seq_len of the window from the tokens before them, and the first token
   of each window is never predicted;
4. perplexity = exp(sum of NLL / number of predicted tokens)
              = exp(mean NLL over num_chunks * (seq_len - 1) tokens), accumulated in fp32.

Because early tokens of each window see little context, this reads higher than a
sliding-window evaluation (stride < seq_len) of the same model; numbers are comparable only
under the same tokenizer, text, seq_len and num_chunks. The project's default setting: the
gensim news text (``assets.default_texts("heldout")``), 40 windows of 256 tokens.
"""

from __future__ import annotations

import math

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
    num_chunks: int | None = 40,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of `model` on `texts` (see the module doc for the method).

    texts: any calibration source (a list of strings, a local file or folder, a dataset name)
    or a token tensor [n, seq], in which case no tokenizer is needed. Windows keep document
    order (no shuffle); num_chunks=None uses as many whole windows as the text holds. The model
    runs in eval mode (its mode is restored afterwards), batch_size windows per forward.
    """
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
            ids = tokens[start : start + batch_size].to(device)
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
    """Whole windows in the EOS-joined stream of `texts` (a list of strings)."""
    if tokenizer is None:
        raise ValueError("texts need a tokenizer")
    if isinstance(texts, (str, bytes)) or not isinstance(texts, (list, tuple)):
        raise ValueError(
            "num_chunks=None needs texts as a list of strings (or a token tensor); "
            f"got {type(texts).__name__}: pass num_chunks explicitly"
        )
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    n = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in docs) + max(0, len(docs) - 1)
    return max(1, n // seq_len)
