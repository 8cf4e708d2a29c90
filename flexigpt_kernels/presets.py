"""Named recipes for prune() then heal(): the measured one is the default, the paper's by name.

A :class:`Preset` holds the choices where this package departs from the paper; everything else
(rank, learning rate, schedule, ...) is the same in both. The Python API (``fk.prune`` /
``fk.heal``) and the command line (``flexigpt prune`` / ``flexigpt heal``) take their defaults
from :data:`RECIPE`:

- RECIPE ("recipe", the default): prune fits each replacement block's output-norm gamma in
  closed form on a few recorded calibration sequences (``local_fit="gamma"``; where prune has
  no calibration, or drops blocks, nothing is fitted); heal trains the replacement adapters and
  gammas plus LoRA of rank 8 on every kept block (``trainable=("adapters", "lora_kept")``),
  shared with the replacement blocks that reuse a kept block's weights (``lora_shared="auto"``:
  they compute with the base as the LoRA changes it, so the merged model stores no extra
  adapter rank for it). On SmolLM2-135M at ratio 0.3 this hybrid trainable set gave 81.8
  held-out perplexity where the paper's set gave 103.5 at the same budget (README, "Recovery");
  sharing the LoRA kept the perplexity and stored 3 points less of the dense model at 0.5
  (README, "Quality per byte").
- PAPER ("paper"): the paper's recipe: SVD-initialised adapters and gamma 1e-2 (no fit), heal
  trains the adapters and gammas only.

Use::

    from flexigpt_kernels.presets import PAPER
    model, report = fk.prune(model, texts, tokenizer=tok, **PAPER.prune_kwargs())
    fk.heal(model, texts, tokenizer=tok, tokens=100_000, **PAPER.heal_kwargs())
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Preset", "RECIPE", "PAPER", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """name; local_fit: prune()'s block-local initialisation (None, "gamma" or "full", see
    convert/local_fit.py); trainable / lora_rank: heal()'s trainable set (see train/params.py)
    and the rank of LoRA on the kept blocks (None when the set has no "lora_kept"); lora_shared:
    heal()'s LoRA sharing (True, False, or "auto": where the set has "lora_kept" and the model
    has replacement blocks)."""

    name: str
    local_fit: str | None
    trainable: str | tuple[str, ...]
    lora_rank: int | None
    lora_shared: bool | str = False
    description: str = ""

    def prune_kwargs(self) -> dict:
        """Keyword arguments of prune() that select this preset."""
        return {"local_fit": self.local_fit}

    def heal_kwargs(self) -> dict:
        """Keyword arguments of heal() that select this preset."""
        return {"trainable": self.trainable, "lora_rank": self.lora_rank, "lora_shared": self.lora_shared}


RECIPE = Preset(
    "recipe",
    local_fit="gamma",
    trainable=("adapters", "lora_kept"),
    lora_rank=8,
    lora_shared="auto",
    description="closed-form gamma at prune; adapters + gammas + LoRA rank 8 on the kept blocks, shared with "
    "the replacement blocks, at heal",
)
PAPER = Preset(
    "paper",
    local_fit=None,
    trainable="adapters",
    lora_rank=None,
    description="SVD adapters and gamma 1e-2 at prune; adapters + gammas at heal",
)
PRESETS = {p.name: p for p in (RECIPE, PAPER)}


def get_preset(name: str | Preset) -> Preset:
    """The preset called `name` ("recipe" or "paper"); a Preset is returned as is."""
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"preset: unknown {name!r}; choose from {', '.join(PRESETS)}") from None
