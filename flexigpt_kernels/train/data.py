"""Training token blocks for recovery training, and the order they are read in.

The same sources as calibration (:func:`flexigpt_kernels.convert.calibration.token_batches`):
token tensors, iterables of texts or rows, local files/folders, hub dataset names. All blocks a
run needs are tokenized once, up front, into a LongTensor [n, seq_len]. When the source holds
fewer than the run needs, every block it holds is kept and the run cycles over them (epochs),
with a warning.

Order: the block read at global position p (0, 1, 2, ...) is ``rows[perm(p // n)[p % n]]``,
where ``perm(e)`` is a permutation of the n blocks drawn from ``torch.Generator`` seeded with
``seed + e`` (or the identity with ``shuffle=False``). Optimizer step s reads positions
``[s * G, (s + 1) * G)`` with G the global batch (per-process batch x grad_accum x processes).
The data position is therefore a pure function of the step: a resumed run reads exactly the
blocks the uninterrupted run would have read, with no iterator state to save.
"""

from __future__ import annotations

import collections.abc
import re
import warnings

import torch

from ..convert.calibration import token_batches

__all__ = ["TrainBlocks", "load_blocks"]

_NOT_ENOUGH = re.compile(r"not enough tokens.*found (\d+)")


def load_blocks(
    source,
    tokenizer=None,
    *,
    seq_len: int,
    num_blocks: int,
    seed: int | None = 0,
    split: str | None = None,
    text_field: str = "text",
    what: str = "data",
) -> torch.Tensor:
    """Up to `num_blocks` blocks of `seq_len` tokens from `source`: LongTensor [n, seq_len],
    n = num_blocks when the source holds that many, else every whole block it holds (n >= 1)."""
    if isinstance(source, torch.Tensor):
        t = source.detach().to("cpu", torch.long)
        if t.dim() == 2:
            if t.shape[1] < seq_len:
                raise ValueError(f"{what}: token tensor {tuple(t.shape)} has rows shorter than seq_len={seq_len}")
            t = t[:, :seq_len]
        elif t.dim() == 1:
            n = t.numel() // seq_len
            if n == 0:
                raise ValueError(f"{what}: {t.numel()} tokens hold no block of seq_len={seq_len}")
            t = t[: n * seq_len].view(n, seq_len)
        else:
            raise ValueError(f"{what}: token ids must have shape [n, seq] or [tokens], got {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{what}: empty token tensor")
        return t[:num_blocks].contiguous()
    if isinstance(source, collections.abc.Iterator):  # a one-shot generator: read it once
        source = list(source)
    kwargs = dict(seq_len=seq_len, split=split, text_field=text_field, seed=seed)
    try:
        return token_batches(source, tokenizer, num_samples=num_blocks, **kwargs)
    except ValueError as exc:
        m = _NOT_ENOUGH.search(str(exc))
        if m is None:
            raise
        available = int(m.group(1)) // seq_len
        if available < 1:
            raise ValueError(
                f"{what}: the source holds {m.group(1)} tokens, less than one block of seq_len={seq_len}"
            ) from None
        return token_batches(source, tokenizer, num_samples=available, **kwargs)


class TrainBlocks:
    """Blocks [n, seq_len] read in a seeded order that depends only on the position (see module doc)."""

    def __init__(self, blocks: torch.Tensor, *, seed: int = 0, shuffle: bool = True):
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be a non-empty [n, seq_len] tensor, got {tuple(blocks.shape)}")
        self.blocks = blocks
        self.seed = int(seed)
        self.shuffle = shuffle
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    @classmethod
    def from_source(
        cls, source, tokenizer=None, *, seq_len: int, num_blocks: int, seed: int = 0, shuffle: bool = True, **kwargs
    ) -> TrainBlocks:
        blocks = load_blocks(source, tokenizer, seq_len=seq_len, num_blocks=num_blocks, seed=seed, **kwargs)
        if blocks.shape[0] < num_blocks:
            warnings.warn(
                f"data: the source holds {blocks.shape[0]} blocks of {seq_len} tokens but the run reads "
                f"{num_blocks}; it will cycle over them ({num_blocks / blocks.shape[0]:.2f} epochs)",
                stacklevel=3,
            )
        return cls(blocks, seed=seed, shuffle=shuffle)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1]

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            n = len(self)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(n, generator=g)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def rows(self, start: int, count: int) -> torch.Tensor:
        """The blocks at global positions [start, start + count): LongTensor [count, seq_len]."""
        n = len(self)
        idx = []
        for p in range(start, start + count):
            idx.append(int(self._permutation(p // n)[p % n]))
        return self.blocks[torch.tensor(idx, dtype=torch.long)]

    def fingerprint(self) -> list[int]:
        """A cheap identity check for resume: shape and a few token sums."""
        b = self.blocks
        return [int(b.shape[0]), int(b.shape[1]), int(b[0].sum()), int(b[-1].sum()), int(b.sum() % 1_000_003)]
