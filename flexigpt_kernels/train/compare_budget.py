"""The recipe and budget arithmetic of the recovery comparison (train/compare.py): the methods,
this package's FlexiGPT recipe, the LoRA rank matching a trainable-parameter budget, the blocks
ShortGPT drops at equal memory, and the "flexigpt" method's setup (prune at the recipe's adapter
rank, LoRA on the kept blocks with the rest of the budget)."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..convert.local_fit import LocalFit
from ..convert.prune import BASE_MODES, SELECT_MODES, prune, stored_parameters
from ..convert.replacement import replacement_blocks
from ..nn import SharedLoRALinear
from .lora import lora_parameter_count, merge_lora, share_kept_lora
from .params import count_parameters, select_trainable

METHODS = ("flexigpt", "flexigpt_paper", "shortgpt_lora", "shortgpt_lora_eqmem")


@dataclass(frozen=True)
class FlexiGPTRecipe:
    """This package's FlexiGPT recovery recipe (docs/method.md 8), the "flexigpt" method of the comparison.

    local_fit: the block-local initialisation, a LocalFit (default: activation-aware adapters,
        closed-form gamma, 40 fit steps per block; see convert/local_fit.py), or None for the
        paper's initialisation (SVD adapters, gamma 1e-2; no tokens).
    fit_samples: calibration sequences the fit records; their tokens count toward the budget.
    adapter_share: the fraction of the trainable-parameter budget given to the replacement
        blocks' adapters (their rank is scaled by it); the rest goes to LoRA on every kept block.
        1.0 trains the adapters only (the paper's trainable set).
    gamma_lr: the output-norm gammas' learning rate while healing (None: the run's lr).
    adapter_lr: the replacement adapters' learning rate while healing (None: the run's lr);
        LoRA on the kept blocks always learns at the run's lr.
    bases: how each pruned block's base is chosen (prune's `bases`): "weights" (the low-rank
        weight distance) or "functional" (the recorded function, scored on the fit's records).
    select: which blocks this recipe prunes at the comparison's ratio (prune's `select`):
        "influence" (the Block-Influence blocks every method uses) or "recoverable" (its own
        choice, the same count: Block Influence discounted by the best stand-in's functional error).
    train_norms: heal also trains each replacement block's own norm weights (trainable set
        "replacement_blocks" instead of "adapters": on Llama, a per-channel scale of what the
        shared linears read, 2 x hidden parameters per block); they count toward the budget.
    share_lora: the replacement blocks compute with their base as the kept block's LoRA changes
        it (heal lora_shared; train.lora.share_kept_lora): no extra parameter, the LoRA trains on
        every block sharing the weight, and the saved model's adapters do not grow by its rank.
        The default since it measured level in perplexity at 3 points less storage (0.5, 20k and
        184k tokens); False is the recipe of the sweeps before.
    """

    local_fit: LocalFit | None = field(default_factory=LocalFit)
    fit_samples: int = 16
    adapter_share: float = 0.5
    gamma_lr: float | None = None
    adapter_lr: float | None = None
    bases: str = "weights"
    select: str = "influence"
    train_norms: bool = False
    share_lora: bool = True

    def __post_init__(self):
        if self.bases not in BASE_MODES:
            raise ValueError(f"bases must be one of {BASE_MODES}, got {self.bases!r}")
        if self.select not in SELECT_MODES:
            raise ValueError(f"select must be one of {SELECT_MODES}, got {self.select!r}")
        if not 0.0 < self.adapter_share <= 1.0:
            raise ValueError(f"adapter_share must be in (0, 1], got {self.adapter_share}")
        if self.fit_samples < 2:
            raise ValueError(f"fit_samples must be >= 2 (one is held out of the fit), got {self.fit_samples}")
        for name in ("gamma_lr", "adapter_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive or None, got {v}")

    def describe(self, adapter_rank: int, lora_rank: int | None) -> str:
        lf = self.local_fit
        fit = (
            "paper init (SVD adapters, gamma 1e-2)"
            if lf is None
            else f"{lf.adapter_init} adapters, gamma {lf.gamma or 'fixed'}, fit {lf.steps} steps/block on "
            f"{self.fit_samples} seq"
        )
        lora = f" + LoRA rank {lora_rank} on kept blocks" if lora_rank else ""
        glr = f"; gamma lr {self.gamma_lr:g}" if self.gamma_lr is not None else ""
        alr = f"; adapter lr {self.adapter_lr:g}" if self.adapter_lr is not None else ""
        bases = "; functional bases" if self.bases == "functional" else ""
        select = "; own blocks (recoverable)" if self.select == "recoverable" else ""
        spread = "; ranks spread by spectrum" if lf is not None and lf.rank_allocation == "spectrum" else ""
        norms = "; own norms trained" if self.train_norms else ""
        shared = " (shared with the replacement blocks)" if self.share_lora and lora_rank else ""
        return f"{fit}; adapters rank {adapter_rank}{spread}{norms}{lora}{shared}{glr}{alr}{bases}{select}"

    @property
    def replacement_set(self) -> str:
        """The trainable set of the replacement blocks (train/params.py)."""
        return "replacement_blocks" if self.train_norms else "adapters"


def matching_lora_rank(model, target_params: int, *, tolerance: float = 0.05, max_rank: int = 4096) -> tuple[int, int]:
    """(rank, parameter count) of LoRA on the kept blocks of `model` closest to `target_params`.
    Raises ValueError when even the closest rank is off by more than `tolerance` (relative)."""
    per_rank = lora_parameter_count(model, 1)
    if per_rank == 0:
        raise ValueError("the model has no kept block to put LoRA on")
    best = None
    for r in {max(1, target_params // per_rank), max(1, target_params // per_rank + 1)}:
        n = lora_parameter_count(model, min(r, max_rank))
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (r, n)
    rank, n = best
    if abs(n - target_params) > tolerance * target_params:
        raise ValueError(
            f"no LoRA rank matches {target_params:,} trainable parameters within {tolerance:.0%}: "
            f"rank {rank} gives {n:,}"
        )
    return rank, n


def recipe_adapter_rank(
    nominal: int, per_rank: int, fixed: int, lora_for, target: int, tolerance: float, *, spread: int = 3
) -> int:
    """The replacement adapters' rank for a recipe: `nominal` (the paper's rank x adapter_share)
    when its total lies within `tolerance` of `target`, else the rank within `spread` of it whose
    total is closest (ties: the one nearer `nominal`, then the smaller). Total(a) = a * per_rank + fixed (the
    adapters and gammas at rank a) + lora_for(rest) (the parameters of the LoRA rank on the kept
    blocks closest to the rest of the budget). One LoRA rank on many kept blocks can be a coarser
    step than 5% of a small budget (ratio 0.2 on SmolLM2: 24 kept blocks, 244,224 parameters per
    rank against a budget of 2.2M); moving the adapter rank by one or two closes it."""

    def total(a: int) -> int:
        adapters = a * per_rank + fixed
        rest = target - adapters
        return adapters + (lora_for(rest) if rest > 0 else 0)

    if abs(total(nominal) - target) <= tolerance * target:
        return nominal
    candidates = range(max(1, nominal - spread), nominal + spread + 1)
    return min(candidates, key=lambda a: (abs(total(a) - target), abs(a - nominal), a))


def adapter_parameters_per_rank(model: torch.nn.Module) -> int:
    """Parameters one unit of rank adds to `model`'s replacement adapters: sum of (in + out)
    over its SharedLoRALinear modules."""
    return sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, SharedLoRALinear))


@dataclass
class _Setup:
    model: torch.nn.Module
    trainable: object
    lora_rank: int | None
    options: str
    fit_tokens: int = 0
    prep_s: float = 0.0
    params: int = 0
    ppl_init: float | None = None
    blocks: int = 0
    stored: int = 0
    gamma_lr: float | None = None
    adapter_lr: float | None = None
    positions: list[int] | None = None  # a dropped model's blocks' original indices (distill "hidden")
    base_map: dict[int, int] | None = None  # a FlexiGPT model's bases (pruned block -> kept block)
    pruned: list[int] | None = None  # the blocks it replaced or dropped, where a recipe chose its own
    prune_seconds: dict[str, float] | None = None  # a recipe's prune() phases (PruneReport.seconds)
    lora_shared: bool = False  # heal's lora_shared (FlexiGPTRecipe.share_lora)


def _recipe_setup(
    model,
    recipe: FlexiGPTRecipe,
    blocks,
    paper_rank: int,
    target: int,
    tolerance: float,
    *,
    train_texts,
    tokenizer,
    seq_len: int,
    calib_samples: int,
    progress: bool,
    ratio: float | None = None,
    paper=None,
) -> _Setup:
    """The "flexigpt" method: prune the same blocks (or, with recipe.select="recoverable", its
    own choice at `ratio`) at the recipe's adapter rank with the block-local fit, then size LoRA
    on the kept blocks so the total matches `target`. `paper` (the paper's model on the same
    blocks, whose adapters and gammas are `target`) lets the adapter rank move off the share's
    where LoRA's rank steps are too coarse to land within `tolerance` (recipe_adapter_rank)."""
    adapter_rank = max(1, round(paper_rank * recipe.adapter_share))
    if paper is not None and recipe.select == "influence" and recipe.adapter_share < 1.0:
        per_rank = adapter_parameters_per_rank(paper)
        fixed = target - paper_rank * per_rank  # the gammas and own biases
        if recipe.train_norms:  # and the replacement blocks' own norms (their other parameters: the target)
            fixed += count_parameters(p for b in replacement_blocks(paper).values() for p in b.parameters()) - target
        adapter_rank = recipe_adapter_rank(
            adapter_rank,
            per_rank,
            fixed,
            lambda rest: matching_lora_rank(paper, rest, tolerance=float("inf"))[1],
            target,
            tolerance,
        )
    fit = None if recipe.local_fit is None else dataclasses.replace(recipe.local_fit, num_samples=recipe.fit_samples)
    t = time.perf_counter()
    flex, rep = prune(
        copy.deepcopy(model),
        train_texts,
        tokenizer=tokenizer,
        **({"ratio": ratio, "select": recipe.select} if recipe.select != "influence" else {"blocks": blocks}),
        rank=adapter_rank,
        seq_len=seq_len,
        num_samples=calib_samples,
        local_fit=fit,
        bases=recipe.bases,
        progress=progress,
    )
    prep_s = time.perf_counter() - t
    own = recipe.replacement_set
    adapters = count_parameters(select_trainable(copy.deepcopy(flex), own))
    lora_rank, lora_n = None, 0
    if recipe.adapter_share < 1.0 and target - adapters > 0:
        lora_rank, lora_n = matching_lora_rank(flex, target - adapters, tolerance=float("inf"))
    total = adapters + lora_n
    if abs(total - target) > tolerance * target:
        raise ValueError(
            f"recipe adapter_share={recipe.adapter_share}: {total:,} trainable parameters "
            f"(replacement blocks' {own}, adapter rank {adapter_rank}: {adapters:,} + LoRA {lora_n:,}) are not within "
            f"{tolerance:.0%} of the budget {target:,}"
        )
    trainable = (own, "lora_kept") if lora_rank else own
    fit_tokens = int((rep.local_fit or {}).get("fit_tokens", 0))
    return _Setup(
        flex,
        trainable,
        lora_rank,
        recipe.describe(adapter_rank, lora_rank),
        fit_tokens=fit_tokens,
        prep_s=prep_s,
        params=total,
        blocks=len(blocks),
        stored=_merged_stored(flex, trainable, lora_rank, shared=recipe.share_lora),
        gamma_lr=recipe.gamma_lr,
        adapter_lr=recipe.adapter_lr,
        base_map=dict(rep.base_map),
        pruned=list(rep.pruned),
        prune_seconds=dict(rep.seconds),
        lora_shared=bool(recipe.share_lora and lora_rank),
    )


def _merged_stored(model, trainable, lora_rank, *, shared: bool = False) -> int:
    """Stored parameters of `model` once healed and saved: LoRA on the kept blocks merged into
    their weights, where a replacement block shares such a weight its adapter grows by the LoRA
    rank to stay exact (train.merge_lora), unless it followed that LoRA while healing (`shared`).
    The values do not matter, only the shapes."""
    if not lora_rank:
        return stored_parameters(model)
    m = copy.deepcopy(model)
    select_trainable(m, trainable, lora_rank=lora_rank)
    if shared:
        share_kept_lora(m)
    merge_lora(m)
    return stored_parameters(m)


def _recipe_dict(recipe: FlexiGPTRecipe) -> dict:
    return dict(
        local_fit=None if recipe.local_fit is None else recipe.local_fit.to_dict(),
        fit_samples=recipe.fit_samples,
        adapter_share=recipe.adapter_share,
        gamma_lr=recipe.gamma_lr,
        **({"adapter_lr": recipe.adapter_lr} if recipe.adapter_lr is not None else {}),  # older sweeps resume
        **({"bases": recipe.bases} if recipe.bases != "weights" else {}),
        **({"select": recipe.select} if recipe.select != "influence" else {}),
        **({"train_norms": True} if recipe.train_norms else {}),
        **({"share_lora": True} if recipe.share_lora else {}),  # unshared sweeps resume
    )


def equal_memory_blocks(model, blocks: Sequence[int], scores: Sequence[float] | None, stored: int) -> list[int]:
    """The blocks ShortGPT drops to store at least `stored` parameters: the k' lowest-scoring of
    `blocks` (Block Influence `scores`; None keeps the given order), k' the largest count whose
    dropped `model` still stores >= `stored` (each block's own parameters leave with it).
    ValueError when even dropping one block stores less."""
    layers = _layers(model)
    order = sorted(blocks, key=lambda b: (scores[b], b)) if scores is not None else list(blocks)
    total = stored_parameters(model)
    k = 0
    for b in order:
        after = total - sum(p.numel() for p in layers[b].parameters())
        if after < stored:
            break
        total, k = after, k + 1
    if k == 0:
        raise ValueError(f"no ShortGPT model stores at least {stored:,} parameters: dropping one block leaves less")
    return sorted(order[:k])


def _layers(model):
    from ..convert.families import decoder_layers

    return list(decoder_layers(model))


def _kept(model):
    return [b for b in _layers(model) if not hasattr(b, "flexigpt_base")]
