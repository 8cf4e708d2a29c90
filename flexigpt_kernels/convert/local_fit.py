"""Block-local initialisation of replacement blocks from the dense model's activations (docs/method.md 5).

At conversion a replacement block computes with another block's weights plus a rank-r
correction; on its own that is a poor copy of the block it replaces, so FlexiGPT starts it
with a tiny output-norm gamma (docs/method.md 4). This module instead fits each replacement block
to reproduce what the ORIGINAL block computed, on calibration tokens, before any end-to-end
healing. Three steps, each optional, in this order:

1. ``adapter_init="activation"`` (closed form): the adapter B A of every linear becomes the
   best rank-r correction of W_pruned - W_base in the norm weighted by that linear's input
   activations, ``min ||X (W_i - W_j - B A)^T||_F``, instead of the plain Frobenius norm (the
   SVD init). With C = X^T X / T + damping, C = L L^T: B A = rank_r(D L) L^-1, D = W_i - W_j.
   Needs the dense weights and input covariances, so it runs before conversion
   (:func:`~.adapter_init.activation_aware_adapters`) and is copied in after
   (:func:`~.adapter_init.apply_adapters`).
2. ``gamma="lsq"`` (closed form): per channel, the least-squares output-norm gamma
   (:func:`flexigpt_kernels.convert.gamma_init.lsq_gamma`).
3. ``steps > 0``: gradient fit of each replacement block's adapters, own biases and gammas,
   minimising the block-output MSE (relative to the original block's output delta),
   AdamW + cosine, minibatches of whole recorded sequences.

Inputs: every block is fitted on the DENSE model's input to that block (recorded in one dense
forward pass), not on the input it will see in the pruned model, where earlier blocks are
replaced too. This keeps the blocks independent (any order, one at a time, parallelisable) and
needs a single recording pass; the upstream mismatch is left to end-to-end healing.

Recording: :func:`~.dense_records.record_dense_blocks` (convert/dense_records.py) runs the
dense model once over the calibration tokens and keeps each pruned block's input, output,
attention contribution, layer kwargs and (on request) input covariances; the fit and the closed
forms then call each layer directly on them, so nothing else of the model runs.

Tokens: the fit sees only the recorded calibration tokens (n x seq), repeatedly; count those
toward a recovery budget.

Defaults: :data:`DEFAULT_LOCAL_FIT` (activation-aware adapters + closed-form gamma + 40 fit
steps per block), measured on SmolLM2-135M at ratio 0.3 (benchmarks/results/recovery_study_cpu.md).
Only the combination helped end to end: each closed form alone lowers the block-local error but
not the held-out perplexity.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn import OutputNorm, SharedLoRALinear
from .adapter_init import activation_aware_adapters, apply_adapters
from .dense_records import (
    DenseRecords,
    block_errors,
    contribution_name,
    layer_dtype_device,
    record_dense_blocks,
    run_block,
    sublayer_output_norms,
)
from .families import decoder_layers
from .gamma_init import lsq_gamma
from .rank_allocation import RANK_ALLOCATIONS
from .replacement import replacement_blocks

# the recording and the closed-form adapters live in their own modules; their names stay
# importable from here
__all__ = [
    "DenseRecords",
    "LocalFit",
    "DEFAULT_LOCAL_FIT",
    "GAMMA_ONLY_LOCAL_FIT",
    "LocalFitReport",
    "record_dense_blocks",
    "activation_aware_adapters",
    "apply_adapters",
    "fit_replacement_blocks",
    "block_errors",
    "contribution_name",
    "sublayer_output_norms",
]


# --------------------------------------------------------------------------------------------
# gradient fit
# --------------------------------------------------------------------------------------------

FIT_TRAINABLE = ("adapters", "gamma", "replacement_blocks")


def _fit_params(block: nn.Module, trainable: str) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(non-gamma params, gamma params) of one replacement block for the chosen set."""
    gammas = [m.weight for m in block.modules() if isinstance(m, OutputNorm)]
    gamma_ids = {id(p) for p in gammas}
    if trainable == "gamma":
        return [], gammas
    if trainable == "adapters":
        other = []
        for m in block.modules():
            if isinstance(m, SharedLoRALinear):
                other += [p for p in (m.lora_a, m.lora_b, m.bias) if p is not None]
        return other, gammas
    if trainable == "replacement_blocks":  # + the block's own norms (registered params only)
        return [p for p in block.parameters() if id(p) not in gamma_ids], gammas
    raise ValueError(f"trainable must be one of {FIT_TRAINABLE}, got {trainable!r}")


@dataclass
class LocalFit:
    """Options of the block-local initialisation (see the module doc); pass to
    ``prune(..., local_fit=LocalFit(...))`` or to :func:`fit_replacement_blocks`.

    adapter_init: "svd" (the paper's: plain SVD of W_i - W_j) or "activation" (weighted by the
        recorded input covariance; closed form, needs covariances).
    rank_allocation: "uniform" (prune's rank on every linear) or "spectrum" (with
        adapter_init="activation": the same parameters per block, each linear's rank set by how
        much of its weighted residual a rank removes per parameter; convert/rank_allocation.py).
    gamma: "lsq" (closed-form per-channel least squares, before the gradient fit) or None
        (keep gamma_init).
    steps: gradient steps per block (0: closed forms only); batch_size: recorded sequences per
        step; lr / gamma_lr: AdamW learning rates of the adapters / of the gammas
        (gamma_lr None: lr); weight_decay; warmup: fraction of steps; max_grad_norm.
    trainable: "adapters" (lora_a, lora_b, own bias, gamma), "gamma", or "replacement_blocks"
        (adapters plus the block's own norms).
    num_samples: calibration sequences to record (None: all prune's calibration sequences).
    val_fraction: recorded sequences held out of the fit to report its error on unseen tokens.
    damping: covariance damping for adapter_init="activation"; ridge: for gamma="lsq".
    record_dtype: dtype of the recorded activations (CPU).
    """

    adapter_init: str = "activation"
    rank_allocation: str = "uniform"
    gamma: str | None = "lsq"
    steps: int = 40
    batch_size: int = 2
    lr: float = 1e-3
    gamma_lr: float | None = None
    weight_decay: float = 0.0
    warmup: float = 0.05
    max_grad_norm: float | None = 1.0
    trainable: str = "adapters"
    num_samples: int | None = None
    val_fraction: float = 0.125
    damping: float = 1e-2
    ridge: float = 0.0
    record_dtype: torch.dtype = torch.float32
    seed: int = 0

    def __post_init__(self):
        if self.adapter_init not in ("svd", "activation"):
            raise ValueError(f"adapter_init must be 'svd' or 'activation', got {self.adapter_init!r}")
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise ValueError(f"rank_allocation must be one of {RANK_ALLOCATIONS}, got {self.rank_allocation!r}")
        if self.rank_allocation != "uniform" and self.adapter_init != "activation":
            raise ValueError(
                "rank_allocation='spectrum' needs adapter_init='activation' (it reads the weighted spectra)"
            )
        if self.gamma not in (None, "lsq"):
            raise ValueError(f"gamma must be 'lsq' or None, got {self.gamma!r}")
        if self.trainable not in FIT_TRAINABLE:
            raise ValueError(f"trainable must be one of {FIT_TRAINABLE}, got {self.trainable!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["record_dtype"] = str(self.record_dtype).replace("torch.", "")
        if self.rank_allocation == "uniform":
            del d["rank_allocation"]  # as written before the option existed (older sweeps resume)
        return d


#: The documented default of ``prune(..., local_fit=True)``: activation-aware adapters, the
#: closed-form gamma, then 40 gradient steps of 2 recorded sequences per block (lr 1e-3,
#: AdamW, cosine). Measured on SmolLM2-135M, ratio 0.3, rank 32, 32 x 256 calibration tokens
#: (benchmarks/results/recovery_study_cpu.md): held-out ppl at init 131.3 vs 156.1 for the
#: paper's init (drop: 155.9). The closed forms alone do not carry over: closed-form gamma
#: 149.8, activation-aware adapters + closed-form gamma 156.5. It is the initialisation of the
#: measured recovery recipe (train.compare.FlexiGPTRecipe, benchmarks/results/recovery_cpu.md);
#: prune()'s own default is local_fit="default", the RECIPE preset's choice ("gamma" given calibration, the cheap
#: one for a model that is not healed; presets.py), which the CLI shares.
DEFAULT_LOCAL_FIT = LocalFit()
#: The cheap preset ("gamma"): the paper's SVD adapters, gamma set per channel by least squares
#: on a few recorded calibration sequences, no gradient steps. Its gamma shrinks toward zero
#: where the replacement output does not track the original, so the block cannot hurt much.
GAMMA_ONLY_LOCAL_FIT = LocalFit(adapter_init="svd", gamma="lsq", steps=0, num_samples=8, val_fraction=0.25)


@dataclass
class LocalFitReport:
    """Per block relative errors sum||block(x)-y||^2 / sum||y-x||^2 on the fit rows ("train")
    and on held-out recorded rows ("val"), at each stage: "init" (as converted / adapters
    applied), "gamma" (after the closed-form gamma), "fit" (after the gradient steps)."""

    options: dict[str, Any]
    errors: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    adapter_stats: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    gamma_stats: dict[int, dict[str, float]] = field(default_factory=dict)
    losses: dict[int, list[float]] = field(default_factory=dict)
    fit_tokens: int = 0
    train_rows: int = 0
    val_rows: int = 0
    trainable_params: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def mean_error(self, stage: str, split: str = "val") -> float:
        vals = [e[split] for e in self.errors.get(stage, {}).values() if split in e]
        return sum(vals) / len(vals) if vals else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"] = {s: {str(b): e for b, e in v.items()} for s, v in self.errors.items()}
        d["adapter_stats"] = {str(k): v for k, v in self.adapter_stats.items()}
        d["gamma_stats"] = {str(k): v for k, v in self.gamma_stats.items()}
        d["losses"] = {str(k): v for k, v in self.losses.items()}
        return d


def _split_rows(n: int, val_fraction: float) -> tuple[slice, slice | None]:
    n_val = int(round(n * val_fraction)) if n >= 2 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n >= 2 else 0), n - 1)
    if n_val == 0:
        return slice(0, n), None
    return slice(0, n - n_val), slice(n - n_val, n)


def _errors(model, records, train_rows, val_rows, batch_size) -> dict[int, dict[str, float]]:
    tr = block_errors(model, records, rows=train_rows, batch_size=batch_size)
    out = {b: {"train": e} for b, e in tr.items()}
    if val_rows is not None:
        for b, e in block_errors(model, records, rows=val_rows, batch_size=batch_size).items():
            out[b]["val"] = e
    return out


def _fit_block(
    layer: nn.Module, records: DenseRecords, b: int, rows: slice, opts: LocalFit, progress: bool, gen: torch.Generator
) -> list[float]:
    other, gammas = _fit_params(layer, opts.trainable)
    params = other + gammas
    dt, dev = layer_dtype_device(layer)
    xs, ys = records.inputs[b][rows], records.outputs[b][rows]
    n = xs.shape[0]
    den = (ys.float() - xs.float()).pow(2).sum(-1).mean().item()  # mean ||delta||^2 per token
    # freeze everything of the block except the fitted parameters, restore afterwards
    before = {id(p): p.requires_grad for p in layer.parameters()}
    chosen = {id(p) for p in params}
    for p in layer.parameters():
        p.requires_grad_(id(p) in chosen)
    for p in params:
        p.requires_grad_(True)
    groups = []
    if other:
        groups.append({"params": other, "lr": opts.lr})
    if gammas:
        groups.append({"params": gammas, "lr": opts.gamma_lr if opts.gamma_lr is not None else opts.lr})
    optim = torch.optim.AdamW(groups, weight_decay=opts.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    warm = max(1, int(round(opts.warmup * opts.steps))) if opts.warmup > 0 else 0
    losses = []
    bs = min(opts.batch_size, n)
    try:
        with torch.enable_grad():
            for step in tqdm(
                range(opts.steps), desc=f"Local fit block {b}", unit="step", leave=False, disable=not progress
            ):
                if step < warm:
                    f = (step + 1) / warm
                else:
                    f = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, opts.steps - warm)))
                for g, lr0 in zip(optim.param_groups, base_lrs):
                    g["lr"] = lr0 * f
                idx = torch.randperm(n, generator=gen)[:bs]
                x = xs[idx].to(dev, dt)
                y = ys[idx].to(dev, torch.float32)
                out = run_block(layer, records, b, x).float()
                loss = (out - y).pow(2).sum(-1).mean() / max(den, 1e-30)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                if opts.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
                optim.step()
                losses.append(loss.item())
    finally:
        for p in layer.parameters():
            p.requires_grad_(before.get(id(p), p.requires_grad))
    return losses


def fit_replacement_blocks(
    model: nn.Module,
    records: DenseRecords,
    options: LocalFit | None = None,
    *,
    adapter_factors: dict | None = None,
    adapter_stats: dict | None = None,
    progress: bool = True,
    **overrides,
) -> LocalFitReport:
    """Fit the replacement blocks of the converted `model` to the dense blocks' recorded
    behaviour, in place (see the module doc). `options` (a :class:`LocalFit`, default
    :data:`DEFAULT_LOCAL_FIT`) may be overridden by keyword (``steps=200``...).

    adapter_factors: output of :func:`activation_aware_adapters` on the dense model; required
    when options.adapter_init == "activation" (prune(local_fit=...) computes it for you).
    Returns a :class:`LocalFitReport`; the model is left in its original train/eval mode."""
    opts = options or DEFAULT_LOCAL_FIT
    if overrides:
        opts = LocalFit(**{**asdict(opts), **overrides})
    blocks = replacement_blocks(model)
    missing = [b for b in records.blocks if b not in blocks]
    if missing:
        raise ValueError(f"records cover blocks {missing} that are not replacement blocks of the model")
    if set(blocks) - set(records.blocks):
        raise ValueError(f"replacement blocks {sorted(set(blocks) - set(records.blocks))} have no records")
    report = LocalFitReport(options=opts.to_dict())
    train_rows, val_rows = _split_rows(records.num_sequences, opts.val_fraction)
    report.train_rows = train_rows.stop - train_rows.start
    report.val_rows = 0 if val_rows is None else val_rows.stop - val_rows.start
    report.fit_tokens = records.tokens  # every recorded token was read by the dense pass
    was_training = model.training
    model.eval()
    bs_eval = max(1, opts.batch_size)
    try:
        t = time.perf_counter()
        if opts.adapter_init == "activation":
            if adapter_factors is None:
                raise ValueError(
                    "adapter_init='activation' needs adapter_factors "
                    "(activation_aware_adapters on the dense model, before conversion)"
                )
            apply_adapters(model, adapter_factors)
            report.adapter_stats = adapter_stats or {}
        report.errors["init"] = _errors(model, records, train_rows, val_rows, bs_eval)
        report.seconds["adapters"] = time.perf_counter() - t
        if opts.gamma == "lsq":
            t = time.perf_counter()
            report.gamma_stats = lsq_gamma(
                model, records, rows=train_rows, ridge=opts.ridge, batch_size=bs_eval, progress=progress
            )
            report.errors["gamma"] = _errors(model, records, train_rows, val_rows, bs_eval)
            report.seconds["gamma"] = time.perf_counter() - t
        if opts.steps > 0:
            t = time.perf_counter()
            gen = torch.Generator().manual_seed(opts.seed)
            layers = decoder_layers(model)
            n_params = 0
            for b in tqdm(records.blocks, desc="Local fit", unit="block", disable=not progress):
                report.losses[b] = _fit_block(layers[b], records, b, train_rows, opts, progress, gen)
                o, g = _fit_params(layers[b], opts.trainable)
                n_params += sum(p.numel() for p in o + g)
            report.trainable_params = n_params
            report.errors["fit"] = _errors(model, records, train_rows, val_rows, bs_eval)
            report.seconds["fit"] = time.perf_counter() - t
    finally:
        model.train(was_training)
    return report
