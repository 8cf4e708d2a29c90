"""Block Influence (ShortGPT), the importance score FlexiGPT prunes by (docs/method.md section 1).

    BI_i = 1 - (1 / T) * sum over calibration tokens t of cos(h_i[t], h_{i+1}[t])

h_i [batch, seq, hidden] enters decoder block i, h_{i+1} leaves it; T is the total token count.
Both are caught with one forward hook per block (``with_kwargs=True``, so the input is found
whether the model passes hidden_states positionally or by keyword, and the output may be a
tensor or a tuple). Not from ``output_hidden_states``: its last entry is taken after the final
norm, which inflates the last block's score.

The model runs in its own dtype; cosines and sums are fp32 (accumulated in fp64). The forward
stops right after the last block (StopForward, raised by its hook), so the final norm
and the LM head are never computed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .families import decoder_layers, num_layers

__all__ = ["block_influence", "calibration_forward", "first_tensor", "StopForward"]


class StopForward(Exception):
    """Raised by the last block's hook: everything after it is not needed."""


def first_tensor(value):
    """A decoder layer's hidden-state output: the tensor itself, or the first item of a tuple."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"decoder layer returned {type(value).__name__}, expected a tensor or a tuple")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def calibration_forward(
    model: nn.Module, tokens: torch.Tensor, *, batch_size: int, desc: str, progress: bool, handles: list
) -> None:
    """Run `tokens` [n, seq] through `model` in eval mode, `batch_size` rows at a time with an
    all-ones attention mask, for the forward hooks the caller registered (their `handles` are
    removed here, and the model's mode restored, whatever happens). A hook may raise
    StopForward to skip the rest of the network for that batch."""
    was_training = model.training
    device = _model_device(model)
    try:
        model.eval()
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
            ids = tokens[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def block_influence(
    model: nn.Module,
    batches: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Block Influence of every decoder block, fp32 tensor [num_layers] on the CPU.

    Args:
        model: a causal LM of a supported family (see ``families``); left in its own mode.
        batches: calibration token ids, LongTensor [n, seq_len]; run ``batch_size`` rows at a
            time with an all-ones attention mask.
        progress: show a tqdm bar over the batches.
    """
    if not isinstance(batches, torch.Tensor) or batches.dim() != 2 or batches.dtype != torch.long:
        desc = (
            f"{tuple(batches.shape)} {batches.dtype}" if isinstance(batches, torch.Tensor) else type(batches).__name__
        )
        raise ValueError(f"batches: expected a LongTensor [n, seq_len], got {desc}")
    if batches.shape[0] == 0 or batches.shape[1] == 0:
        raise ValueError(f"batches: empty token tensor of shape {tuple(batches.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")

    n = num_layers(model)
    layers = list(decoder_layers(model))[:n]
    cos_sum = torch.zeros(n, dtype=torch.float64)
    seen = torch.zeros(n, dtype=torch.long)

    def make_hook(i: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = first_tensor(output)
            cos = F.cosine_similarity(h_in.float(), h_out.float().view_as(h_in), dim=-1)
            cos_sum[i] += cos.sum(dtype=torch.float64).item()
            seen[i] += cos.numel()
            if i == n - 1:
                raise StopForward

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    calibration_forward(
        model, batches, batch_size=batch_size, desc="Block influence", progress=progress, handles=handles
    )

    if (seen == 0).any():
        missing = torch.nonzero(seen == 0).flatten().tolist()
        raise RuntimeError(f"model: decoder blocks {missing} never ran during the calibration forward")
    return (1.0 - cos_sum / seen).to(torch.float32)
