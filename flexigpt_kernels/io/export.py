"""Export a converted model as a plain dense Hugging Face checkpoint (no sharing, no adapters).

Every replacement linear becomes an ordinary nn.Linear weight

    W = W_base + scale * B @ A        (SharedLoRALinear.merged_weight(), computed in fp32,
                                       stored in the base weight's dtype)

with its effective bias (its own, else the base's). The result has exactly the state-dict
names and shapes of the stock architecture, so ``transformers.AutoModelForCausalLM
.from_pretrained(out)`` loads it without this package; it stores every replacement block in
full, so it is as large as the unpruned model ("drop" models export at their reduced size).

Output norms are refused. FlexiGPT's output norm is a bias-free, mean-subtracting LayerNorm
after o_proj / down_proj. Its centring could be folded into the linear (C W with
C = I - 11^T/n), leaving an RMSNorm - but the Llama-like architectures have no norm after
those projections to hold it, and Gemma 2/3's post norms (RMSNorm with (1 + w) scaling) would
need the norm of a norm, which matches only up to where epsilon enters. Neither is faithful,
so ``export_dense`` raises ValueError for such models.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..convert.families import family_of
from ..nn import OutputNorm, SharedLoRALinear
from ._write import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    WEIGHTS_NAME,
    WRITTEN_NAME,
    atomic_directory,
    dominant_dtype,
    save_tensors,
    write_hf_files,
)
from .checkpoint import FLEXIGPT_CONFIG_NAME, from_pretrained
from .model_card import CARD_NAME
from .remote_code import REMOTE_CODE_FILES

__all__ = ["export_dense", "dense_state_dict"]

# what a dense export writes itself or must not carry over (the custom code and the card describe
# the FlexiGPT checkpoint, not the dense one)
_CHECKPOINT_FILES = {
    WEIGHTS_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    FLEXIGPT_CONFIG_NAME,
    WRITTEN_NAME,
    *REMOTE_CODE_FILES,
    CARD_NAME,
}


def _check_no_output_norms(model: nn.Module) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, OutputNorm)]
    if names:
        try:
            family = family_of(model).name
        except ValueError:
            family = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"cannot export a dense checkpoint: the model has FlexiGPT output norms ({names[0]}"
            f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}). The output LayerNorm after "
            f"the attention/MLP outputs (gamma * (y - mean) / std, before the residual add) has no "
            f"counterpart in the stock {family} architecture, so a plain Hugging Face checkpoint "
            f"cannot compute it. Export a model converted with output_norm=False, or serve this one "
            f"with flexigpt_kernels.from_pretrained."
        )


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stock architecture's state dict of `model`: replacement linears merged (see module doc).

    Raises ValueError when the model has output norms.
    """
    _check_no_output_norms(model)
    state_dict = dict(model.state_dict())
    for name, module in model.named_modules():
        if not isinstance(module, SharedLoRALinear):
            continue
        for key in ("lora_a", "lora_b", "bias"):
            state_dict.pop(f"{name}.{key}", None)
        state_dict[f"{name}.weight"] = module.merged_weight().to(module.weight.dtype)
        bias = module.effective_bias()
        if bias is not None:
            state_dict[f"{name}.bias"] = bias.detach().clone()
    return state_dict


def _stock_shapes(config) -> dict[str, tuple[int, ...]]:
    """State-dict names (tied duplicates included) and shapes of the stock model, built on meta."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return {k: tuple(v.shape) for k, v in stock.state_dict().items()}


def export_dense(
    directory_or_model: str | os.PathLike | nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write a plain Hugging Face checkpoint of a converted model to `out`; returns its path.

    directory_or_model: a directory written by save_pretrained (its tokenizer files are
    copied along; a symlink out of it is refused) or an in-memory model. tokenizer: saved with
    it when given. Refuses an existing non-empty `out` unless overwrite=True, and even then
    replaces only a folder this package wrote (see ``_write.atomic_directory``); the write is
    atomic. Raises ValueError for a model with output norms (why: see the module doc).
    """
    source_dir = None
    if isinstance(directory_or_model, nn.Module):
        model = directory_or_model
    else:
        source_dir = Path(directory_or_model)
        model = from_pretrained(source_dir)
    state_dict = dense_state_dict(model)
    stock = _stock_shapes(model.config)
    ours = {k: tuple(v.shape) for k, v in state_dict.items()}
    wrong = sorted(k for k in set(stock) ^ set(ours) if not k.endswith("rotary_emb.inv_freq"))
    wrong += sorted(k for k in set(stock) & set(ours) if stock[k] != ours[k])
    if wrong:
        raise ValueError(f"export: the dense state dict does not match the stock {type(model).__name__} at {wrong[:8]}")
    dtype = dominant_dtype(state_dict.values())
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_tensors(state_dict, tmp / WEIGHTS_NAME)
        write_hf_files(tmp, model, dtype, tokenizer)
        if tokenizer is None and source_dir is not None:
            for f in _files_to_copy(source_dir):
                shutil.copy2(f, tmp / f.name)
    return Path(out)


def _files_to_copy(source_dir: Path) -> list[Path]:
    """The extra files (tokenizer etc.) of a checkpoint folder to copy into an export.

    A symlink is followed only when its target lies inside the folder: a link out of it (say to
    a private key) is refused with a ValueError, so an export never carries a file from
    elsewhere on the disk.
    """
    root = source_dir.resolve()
    files = []
    for f in sorted(source_dir.iterdir()):
        if f.name in _CHECKPOINT_FILES or not f.is_file():
            continue
        if f.is_symlink() and not f.resolve().is_relative_to(root):
            raise ValueError(
                f"export: {f} is a symlink to {f.resolve()}, outside the checkpoint folder "
                f"{source_dir}; refusing to copy it (replace the link by the file itself)"
            )
        files.append(f)
    return files
