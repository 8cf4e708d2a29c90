"""prune(): FlexiGPT (or the ShortGPT "drop" baseline) on a Hugging Face causal LM, in place.

Steps (docs/method.md sections 1-4): calibration tokens -> Block Influence per block -> the
lowest-scoring blocks -> a base block for each by the low-rank distance -> replacement
blocks (shared weights + SVD-initialised adapters + output norms). The model is converted
in place and returned; pass copy.deepcopy(model) to keep the original.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..nn import DEFAULT_GAMMA_INIT
from ..presets import RECIPE
from .adapter_init import activation_aware_adapters
from .arguments import check_bool, check_not_converted, finite_number, positive_int
from .base_selection import COMBINE_MODES, choose_bases
from .calibration import token_batches
from .dense_records import record_dense_blocks
from .families import family_of, num_layers
from .functional_bases import DEFAULT_SCORE_SAMPLES, functional_bases
from .importance import block_influence
from .local_fit import DEFAULT_LOCAL_FIT, GAMMA_ONLY_LOCAL_FIT, LocalFit, fit_replacement_blocks
from .recoverable import recoverable_blocks
from .replacement import convert_blocks, drop_blocks, resolve_rank
from .selection import num_blocks_to_prune, select_blocks

METHODS = ("flexigpt", "drop")
#: how prune() chooses each pruned block's base: by the low-rank weight distance
#: (base_selection.py, the paper's) or by the recorded function (functional_bases.py)
BASE_MODES = ("weights", "functional")
#: which blocks prune() removes at a ratio: the lowest Block Influence (ShortGPT's, the paper's)
#: or the lowest damage once replaced (recoverable.py)
SELECT_MODES = ("influence", "recoverable")


def stored_parameters(model: nn.Module) -> int:
    """Parameters stored by the model, each shared or tied tensor counted once."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        DTensor = ()
    seen, total = set(), 0
    for p in model.parameters():
        # a sharded (FSDP2) parameter has no storage of its own here: it is one parameter object
        key = id(p) if isinstance(p, DTensor) else (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


@dataclass
class PruneReport:
    """What prune() did. scores: Block Influence of every original block (None if blocks
    were given and no calibration was passed); base_map/base_distance: flexigpt only."""

    method: str
    num_blocks: int
    pruned: list[int]
    scores: list[float] | None
    base_map: dict[int, int] = field(default_factory=dict)
    base_distance: dict[int, float] = field(default_factory=dict)
    ties: list[tuple[int, int, int]] = field(default_factory=list)
    rank: int | None = None
    combine: str | None = None
    params_before: int = 0
    params_after: int = 0
    adapter_params: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    local_fit: dict[str, Any] | None = None  # LocalFitReport.to_dict() when local_fit was asked

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["base_map"] = {str(k): v for k, v in self.base_map.items()}
        d["base_distance"] = {str(k): v for k, v in self.base_distance.items()}
        return d


def _adapter_params(model: nn.Module) -> int:
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if n.endswith(("lora_a", "lora_b")) or ".output_norm." in n or n.endswith("output_norm.weight")
    )


def prune(
    model: nn.Module,
    calibration=None,
    *,
    tokenizer=None,
    ratio: float | None = 0.3,
    blocks: Sequence[int] | None = None,
    rank: int | float | None = None,
    method: str = "flexigpt",
    seq_len: int | None = None,
    num_samples: int | None = None,
    combine: str = "sum",
    bases: str = "weights",
    select: str = "influence",
    scale: float = 1.0,
    gamma_init: float = DEFAULT_GAMMA_INIT,
    output_norm: bool = True,
    svd_init: bool = True,
    batch_size: int = 8,
    local_fit="default",
    progress: bool = True,
) -> tuple[nn.Module, PruneReport]:
    """Prune `model` in place; returns (model, report).

    calibration: a token tensor [n, seq], texts, a local file/folder or a hub dataset name
        (texts need `tokenizer`); may be None only when `blocks` is given.
    ratio / blocks: the fraction of decoder blocks to prune (k = round(ratio * L)) or the
        explicit list; `blocks` wins when given (ratio is then ignored).
    rank: adapter rank, an int or a fraction of the hidden size (default 256/4096), capped
        per matrix at its smaller dimension.
    seq_len / num_samples: calibration chunk length and count; None keeps a token tensor's
        own shape and means 256 / 32 for text sources.
    method: "flexigpt" (replacement blocks) or "drop" (ShortGPT: remove the blocks).
    combine: how per-matrix distances form the block distance (see choose_bases).
    bases: "weights" (the low-rank weight distance, combined by `combine`; the paper's) or
        "functional" (convert/functional_bases.py: the kept block whose own layer, run on the
        pruned block's recorded dense input with lsq output-norm gammas, best reproduces its
        output; scored on the first 4 recorded sequences, those of the local fit when there is
        one, so it reads no extra tokens). "functional" needs calibration.
    select: with `ratio`, which blocks go: "influence" (the lowest Block Influence) or
        "recoverable" (flexigpt only: the lowest Block Influence times the functional error of
        the best kept stand-in, convert/recoverable.py; 2 calibration sequences recorded).
    gamma_init, output_norm, scale, svd_init: the replacement block's knobs (docs/method.md 4).
    local_fit: "default" (the RECIPE preset's, flexigpt_kernels/presets.py: "gamma" when
        method="flexigpt" and calibration is given, else none), None/False (the paper's init;
        presets.PAPER), "gamma" (closed-form per-channel gamma on 8 recorded sequences:
        cheap), True or "full" (DEFAULT_LOCAL_FIT), a
        LocalFit or a dict of its fields: fit the replacement blocks to the dense blocks'
        recorded behaviour on the calibration tokens before returning (activation-aware
        adapters, closed-form gamma, optional gradient steps; see convert/local_fit.py).
        Needs calibration; flexigpt only. report.local_fit holds the fit's report.

    Every argument is checked (and a model that was already converted refused) before the
    model is touched: a call that raises ValueError leaves the model as it was.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(local_fit, str) and local_fit == "default":
        local_fit = RECIPE.local_fit if (method == "flexigpt" and calibration is not None) else None
    fit_opts = _local_fit_options(local_fit)
    if fit_opts is not None and method != "flexigpt":
        raise ValueError("local_fit applies to method='flexigpt' only")
    if fit_opts is not None and calibration is None:
        raise ValueError("local_fit needs calibration tokens (the dense blocks are recorded on them)")
    family = family_of(model)
    n_blocks = num_layers(model)
    check_not_converted(model, "prune")
    scale = finite_number("scale", scale, nonzero=True)
    gamma_init = finite_number("gamma_init", gamma_init)
    seq_len, num_samples = positive_int("seq_len", seq_len), positive_int("num_samples", num_samples)
    batch_size = positive_int("batch_size", batch_size, allow_none=False)
    output_norm, svd_init = check_bool("output_norm", output_norm), check_bool("svd_init", svd_init)
    if select not in SELECT_MODES:
        raise ValueError(f"select: expected one of {SELECT_MODES}, got {select!r}")
    if select == "recoverable" and method != "flexigpt":
        raise ValueError("select='recoverable' applies to method='flexigpt' only (a dropped block has no stand-in)")
    if blocks is not None:
        select_blocks(torch.zeros(n_blocks), blocks=blocks)  # validates the indices
    elif calibration is not None:
        num_blocks_to_prune(ratio, n_blocks)  # validates the ratio
    if method == "flexigpt":
        resolve_rank(rank, model.config.get_text_config(decoder=True).hidden_size)  # validates the rank
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine: expected one of {COMBINE_MODES}, got {combine!r}")
        if bases not in BASE_MODES:
            raise ValueError(f"bases: expected one of {BASE_MODES}, got {bases!r}")
        if bases == "functional" and calibration is None:
            raise ValueError("bases='functional' needs calibration tokens (the dense blocks are recorded on them)")
    seconds: dict[str, float] = {}
    params_before = stored_parameters(model)
    # the unpruned model's config, JSON-clean (saved in flexigpt.json), taken before "drop" shrinks it
    base_model_config = json.loads(model.config.to_json_string(use_diff=False))
    scores = None
    tokens = None
    if calibration is not None:
        t = time.perf_counter()
        tokens = token_batches(calibration, tokenizer, seq_len=seq_len, num_samples=num_samples)
        seconds["calibration_data"] = time.perf_counter() - t
        t = time.perf_counter()
        scores = block_influence(model, tokens, batch_size=batch_size, progress=progress)
        seconds["importance"] = time.perf_counter() - t
    elif blocks is None:
        raise ValueError("calibration is required unless an explicit `blocks` list is given")
    if blocks is not None:
        pruned = select_blocks(torch.zeros(n_blocks) if scores is None else scores, blocks=list(blocks))
    elif select == "recoverable":
        t = time.perf_counter()
        pruned = recoverable_blocks(model, tokens, scores, ratio=ratio, batch_size=batch_size, progress=progress).pruned
        seconds["selection"] = time.perf_counter() - t
    else:
        pruned = select_blocks(scores, ratio=ratio)
    report = PruneReport(
        method=method,
        num_blocks=n_blocks,
        pruned=pruned,
        scores=None if scores is None else [float(s) for s in scores],
        params_before=params_before,
    )
    if method == "drop":
        t = time.perf_counter()
        drop_blocks(model, pruned)
        seconds["conversion"] = time.perf_counter() - t
    else:
        hidden = model.config.get_text_config(decoder=True).hidden_size
        r = resolve_rank(rank, hidden)
        records = factors = factor_stats = None
        if fit_opts is not None or bases == "functional":  # record the dense blocks before conversion
            t = time.perf_counter()
            n_rec = DEFAULT_SCORE_SAMPLES if fit_opts is None else fit_opts.num_samples
            records = record_dense_blocks(
                model,
                tokens if n_rec is None else tokens[:n_rec],
                pruned,
                batch_size=batch_size,
                dtype=torch.float32 if fit_opts is None else fit_opts.record_dtype,
                attn=bases == "functional" or fit_opts.gamma == "lsq",
                covariances=fit_opts is not None and fit_opts.adapter_init == "activation",
                progress=progress,
            )
            seconds["local_fit_record" if fit_opts is not None else "record"] = time.perf_counter() - t
        if bases == "functional":
            choice = functional_bases(model, records, batch_size=batch_size, progress=progress)
        else:
            choice = choose_bases(model, pruned, rank=r, combine=combine, progress=progress)
        seconds["base_choice"] = sum(choice.seconds.values()) if choice.seconds else 0.0
        if fit_opts is not None and fit_opts.adapter_init == "activation":
            t = time.perf_counter()
            factors, factor_stats = activation_aware_adapters(
                model,
                records,
                choice.base_map,
                rank=r,
                scale=scale,
                damping=fit_opts.damping,
                allocation=fit_opts.rank_allocation,
            )
            records.cov = {}
            seconds["local_fit_record"] += time.perf_counter() - t
        if fit_opts is None:
            records = None
        t = time.perf_counter()
        convert_blocks(
            model,
            choice.base_map,
            rank=r,
            ranks=_factor_ranks(factors),
            scale=scale,
            output_norm=output_norm,
            gamma_init=gamma_init,
            svd_init=svd_init,
        )
        seconds["conversion"] = time.perf_counter() - t
        if fit_opts is not None:
            t = time.perf_counter()
            fit_report = fit_replacement_blocks(
                model, records, fit_opts, adapter_factors=factors, adapter_stats=factor_stats, progress=progress
            )
            seconds["local_fit"] = time.perf_counter() - t
            report.local_fit = fit_report.to_dict()
            del records, factors
        report.base_map = dict(choice.base_map)
        report.base_distance = {i: choice.distance(i, j) for i, j in choice.base_map.items()}
        report.ties = list(choice.ties)
        report.rank, report.combine = r, "functional" if bases == "functional" else combine
        report.adapter_params = _adapter_params(model)
    report.params_after = stored_parameters(model)
    report.seconds = seconds
    model.flexigpt_meta = {
        "format_version": 2,  # io.checkpoint.FORMAT_VERSION (the io tests compare them)
        "method": method,
        "family": family.name,
        "num_blocks": n_blocks,
        "pruned": pruned,
        "base_map": {str(k): v for k, v in report.base_map.items()},
        "rank": report.rank,
        "scale": scale,
        "output_norm": output_norm,
        "gamma_init": gamma_init,
        "local_fit": None if fit_opts is None else fit_opts.to_dict(),
        "norm_eps": 1e-5,
        "base_model_config": base_model_config,
    }
    return model, report


def _factor_ranks(factors) -> dict[int, dict[str, int]] | None:
    """{block: {linear: rank}} of activation_aware_adapters' factors (None: no factors)."""
    return None if factors is None else {i: {n: a.shape[0] for n, (a, _) in f.items()} for i, f in factors.items()}


def _local_fit_options(local_fit):
    """None (no local fit) or a LocalFit from None/False/True/"gamma"/"full"/LocalFit/dict
    ("default" is resolved by prune())."""
    if local_fit is None or local_fit is False:
        return None
    if local_fit is True or local_fit == "full":
        return DEFAULT_LOCAL_FIT
    if local_fit == "gamma":
        return GAMMA_ONLY_LOCAL_FIT
    if isinstance(local_fit, LocalFit):
        return local_fit
    if isinstance(local_fit, dict):
        return LocalFit(**local_fit)
    raise ValueError(f"local_fit must be None, 'gamma', 'full', a bool, a LocalFit or a dict, got {local_fit!r}")
