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
   (:func:`activation_aware_adapters`) and is copied in after (:func:`apply_adapters`).
2. ``gamma="lsq"`` (closed form): per channel, the least-squares output-norm gamma
   (:func:`flexigpt_kernels.convert.gamma_init.lsq_gamma`).
3. ``steps > 0``: gradient fit of each replacement block's adapters, own biases and gammas,
   minimising the block-output MSE (relative to the original block's output delta),
   AdamW + cosine, minibatches of whole recorded sequences.

Inputs: every block is fitted on the DENSE model's input to that block (recorded in one dense
forward pass), not on the input it will see in the pruned model, where earlier blocks are
replaced too. This keeps the blocks independent (any order, one at a time, parallelisable) and
needs a single recording pass; the upstream mismatch is left to end-to-end healing.

Recording (:func:`record_dense_blocks`) runs the dense model once over the calibration tokens
with hooks on the blocks to be pruned and keeps, on the CPU, for each such block: its input
[n, seq, hidden], its output, the attention sub-layer's residual contribution (for the
closed-form gamma), the keyword arguments the model passed to the layer (position embeddings,
mask, ...; captured once with a forward pre-hook, ``with_kwargs=True``) and, on request, the
input covariance of each of its linears. Memory: 3 x blocks x n x seq x hidden values in
``dtype`` (SmolLM2-135M, 9 blocks, 32 x 256 tokens, fp32: 0.5 GB) plus in^2 per distinct
linear input when covariances are recorded. The fit and the closed forms then call each layer
directly with the recorded kwargs, so nothing else of the model runs.

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
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..nn import OutputNorm, SharedLoRALinear
from .families import Family, decoder_layers, family_of, num_layers
from .importance import _first_tensor, _StopForward, calibration_forward

__all__ = [
    "DenseRecords",
    "LocalFit",
    "DEFAULT_LOCAL_FIT",
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
# helpers shared with gamma_init
# --------------------------------------------------------------------------------------------

def contribution_name(family: Family, which: str) -> str:
    """Name (inside a layer) of the module whose output is the sub-layer's residual
    contribution: the architecture's post norm when it has one, else the output linear."""
    if which == "attn":
        return family.attn_out_norm or family.attn_out
    if which == "mlp":
        return family.mlp_out_norm or family.mlp_out
    raise ValueError(f"which must be 'attn' or 'mlp', got {which!r}")


def sublayer_output_norms(block: nn.Module, family: Family) -> tuple[OutputNorm, OutputNorm]:
    """(attention OutputNorm, MLP OutputNorm) of a replacement block."""
    norms = []
    for which in ("attn", "mlp"):
        mod = block.get_submodule(contribution_name(family, which))
        norm = getattr(mod, "output_norm", None)
        if not isinstance(norm, OutputNorm):
            raise ValueError("replacement block has no output norm on its "
                             f"{which} sub-layer (converted with output_norm=False?)")
        norms.append(norm)
    return norms[0], norms[1]


def _to(obj, device=None, dtype=None, clone=False):
    """Tensors (also inside tuples/lists/dicts) moved/cast; anything else returned as is."""
    if isinstance(obj, Tensor):
        t = obj.detach()
        if device is not None or (dtype is not None and t.is_floating_point()):
            t = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        return t.clone() if clone else t
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype, clone) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype, clone) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype, clone) for k, v in obj.items()}
    return obj


def _rebatch(obj, recorded: int, n: int):
    """Adapt tensors recorded for a batch of `recorded` rows to `n` rows. Calibration batches
    carry an all-ones attention mask, so every row of a batch-dependent tensor is the same:
    take row 0 and expand. Tensors with a leading 1 broadcast and stay as they are."""
    if isinstance(obj, Tensor):
        if recorded > 1 and obj.dim() >= 1 and obj.shape[0] == recorded and n != recorded:
            return obj[:1].expand(n, *obj.shape[1:])
        return obj
    if isinstance(obj, tuple):
        return tuple(_rebatch(o, recorded, n) for o in obj)
    if isinstance(obj, list):
        return [_rebatch(o, recorded, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _rebatch(v, recorded, n) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------------

@dataclass
class DenseRecords:
    """What the dense model's blocks-to-be-pruned computed on calibration tokens (CPU).

    inputs/outputs/attn[i]: [n, seq, hidden] (attn: the attention sub-layer's residual
    contribution); kwargs[i]: the layer's keyword arguments for a batch of `batch_size` rows;
    cov[i][linear name]: X^T X (fp64, [in, in]) over `tokens` tokens (linears that read the same
    input share one tensor)."""

    blocks: list[int]
    inputs: dict[int, Tensor]
    outputs: dict[int, Tensor]
    attn: dict[int, Tensor]
    kwargs: dict[int, dict]
    batch_size: int
    cov: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def num_sequences(self) -> int:
        return next(iter(self.inputs.values())).shape[0] if self.inputs else 0

    @property
    def seq_len(self) -> int:
        return next(iter(self.inputs.values())).shape[1] if self.inputs else 0

    @property
    def tokens(self) -> int:
        """Calibration tokens recorded (what a fit on these records has seen)."""
        return self.num_sequences * self.seq_len


@torch.no_grad()
def record_dense_blocks(
    model: nn.Module,
    tokens: Tensor,
    blocks: Sequence[int],
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    attn: bool = True,
    covariances: bool = False,
    progress: bool = True,
) -> DenseRecords:
    """One forward pass of the (dense, unconverted) `model` over `tokens` [n, seq] with hooks on
    `blocks`: see :class:`DenseRecords`. The forward stops after the last recorded block.

    attn: also keep each block's attention contribution (needed by the closed-form gamma).
    covariances: also accumulate each linear's input covariance (needed by
    ``adapter_init="activation"``)."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError("tokens: expected a LongTensor [n, seq_len]")
    blocks = sorted(set(int(b) for b in blocks))
    if not blocks:
        raise ValueError("blocks: nothing to record")
    family = family_of(model)
    n_layers = num_layers(model)
    layers = list(decoder_layers(model))[:n_layers]
    for b in blocks:
        if not 0 <= b < n_layers:
            raise ValueError(f"blocks: {b} is not a block index in [0, {n_layers})")
        if hasattr(layers[b], "flexigpt_base"):
            raise ValueError(f"block {b} is already a replacement block: record on the dense model")
    t0 = time.perf_counter()
    ins = {b: [] for b in blocks}
    outs = {b: [] for b in blocks}
    attns = {b: [] for b in blocks}
    kwargs: dict[int, dict] = {}
    cov: dict[int, dict[str, Tensor]] = {b: {} for b in blocks}
    seen_input: dict[int, dict[int, tuple]] = {b: {} for b in blocks}  # id(x) -> first linear name, per call
    last = blocks[-1]
    handles = []

    def pre_hook(b):
        def hook(module, args, kw):
            x = args[0] if args else kw["hidden_states"]
            ins[b].append(x.detach().to("cpu", dtype))
            if b not in kwargs:
                kwargs[b] = _to({k: v for k, v in kw.items() if k != "hidden_states"}, "cpu", clone=True)
            seen_input[b].clear()
        return hook

    def out_hook(b):
        def hook(module, args, kw, output):
            outs[b].append(_first_tensor(output).detach().to("cpu", dtype))
            seen_input[b].clear()
            if b == last:
                raise _StopForward
        return hook

    def attn_hook(b):
        def hook(module, args, output):
            attns[b].append(_first_tensor(output).detach().to("cpu", dtype))
        return hook

    def cov_hook(b, name):
        def hook(module, args):
            x = args[0]
            seen = seen_input[b].get(id(x))
            if seen is not None and seen[0] is x:  # same input as an earlier linear of this call: share
                cov[b][name] = cov[b][seen[1]]
                return
            seen_input[b][id(x)] = (x, name)  # holds x, so its id is not reused within the call
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            c = (x2.T @ x2).to("cpu", torch.float64)
            if name in cov[b]:
                cov[b][name] += c
            else:
                cov[b][name] = c
        return hook

    for b in blocks:
        layer = layers[b]
        handles.append(layer.register_forward_pre_hook(pre_hook(b), with_kwargs=True))
        handles.append(layer.register_forward_hook(out_hook(b), with_kwargs=True))
        if attn:
            handles.append(layer.get_submodule(contribution_name(family, "attn")).register_forward_hook(attn_hook(b)))
        if covariances:
            for name in family.linears:
                handles.append(layer.get_submodule(name).register_forward_pre_hook(cov_hook(b, name)))
    calibration_forward(model, tokens, batch_size=batch_size, desc="Recording dense blocks", progress=progress,
                        handles=handles)
    # a shared covariance accumulated once per call (aliases point at the same tensor)
    return DenseRecords(
        blocks=blocks,
        inputs={b: torch.cat(ins[b]) for b in blocks},
        outputs={b: torch.cat(outs[b]) for b in blocks},
        attn={b: torch.cat(attns[b]) for b in blocks} if attn else {},
        kwargs=kwargs,
        batch_size=min(batch_size, tokens.shape[0]),
        cov=cov if covariances else {},
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------
# running a recorded block
# --------------------------------------------------------------------------------------------

def _run_block(layer: nn.Module, records: DenseRecords, b: int, x: Tensor) -> Tensor:
    kw = _rebatch(_to(records.kwargs[b], x.device), records.batch_size, x.shape[0])
    return _first_tensor(layer(x, **kw))


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


def _layer_dtype_device(layer: nn.Module):
    for p in layer.parameters():
        return p.dtype, p.device
    return torch.float32, torch.device("cpu")


@torch.no_grad()
def block_errors(model: nn.Module, records: DenseRecords, *, rows: Optional[slice] = None,
                 batch_size: int = 4) -> dict[int, float]:
    """Relative error of each replacement block on recorded rows:
    sum ||block(x) - y||^2 / sum ||y - x||^2  (1.0 = as bad as dropping the block)."""
    layers = decoder_layers(model)
    errs = {}
    was_training = model.training
    model.eval()
    try:
        for b in records.blocks:
            layer = layers[b]
            dt, dev = _layer_dtype_device(layer)
            xs, ys = records.inputs[b], records.outputs[b]
            if rows is not None:
                xs, ys = xs[rows], ys[rows]
            num = den = 0.0
            for sl in _batches(xs.shape[0], batch_size):
                x = xs[sl].to(dev, dt)
                y = ys[sl].to(dev, torch.float32)
                out = _run_block(layer, records, b, x).float()
                num += (out - y).pow(2).sum().item()
                den += (y - x.float()).pow(2).sum().item()
            errs[b] = num / max(den, 1e-30)
    finally:
        model.train(was_training)
    return errs


# --------------------------------------------------------------------------------------------
# activation-aware adapter initialisation (closed form)
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def activation_aware_adapters(
    model: nn.Module,
    records: DenseRecords,
    base_map: dict[int, int],
    *,
    rank: int,
    scale: float = 1.0,
    damping: float = 1e-2,
) -> tuple[dict[int, dict[str, tuple[Tensor, Tensor]]], dict[int, dict[str, dict[str, float]]]]:
    """Adapters minimising the activation-weighted error, computed on the DENSE model (before
    conversion: it needs each pruned block's own weights). Returns (factors, stats):
    factors[i][linear] = (A [r, in], B [out, r]) with W_j + scale * B A ~ W_i on the recorded
    inputs; stats[i][linear] = {"svd": e_svd, "activation": e_act}, the relative weighted error
    ||(W_i - W_j - scale B A) L||^2 / ||(W_i - W_j) L||^2 of the plain SVD init and of this one.

    damping: added to the covariance's diagonal, relative to its mean diagonal (keeps L^-1 tame
    for directions the calibration tokens never excite)."""
    if not records.cov:
        raise ValueError("records hold no covariances: record_dense_blocks(..., covariances=True)")
    family = family_of(model)
    layers = decoder_layers(model)
    factors: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
    stats: dict[int, dict[str, dict[str, float]]] = {}
    tokens = records.tokens
    for i, j in sorted(base_map.items()):
        factors[i], stats[i] = {}, {}
        chol_cache: dict[int, Tensor] = {}
        for name in family.linears:
            wi = layers[i].get_submodule(name).weight
            wj = layers[j].get_submodule(name).weight
            if isinstance(layers[i].get_submodule(name), SharedLoRALinear):
                raise ValueError(f"block {i} is already converted: compute the adapters on the dense model")
            c = records.cov[i][name]
            key = id(c)
            if key not in chol_cache:
                cm = c / tokens
                cm = cm + damping * cm.diagonal().mean() * torch.eye(cm.shape[0], dtype=cm.dtype)
                chol_cache[key] = torch.linalg.cholesky(cm)
            L = chol_cache[key]
            d = (wi.double() - wj.double()).cpu()
            r = min(rank, d.shape[0], d.shape[1])
            z = d @ L
            u, s, vh = torch.linalg.svd(z, full_matrices=False)
            a = torch.linalg.solve_triangular(L, vh[:r], upper=False, left=False)  # Vh_r L^-1: rows of A
            root = (s[:r] / abs(scale)).sqrt()
            sign = 1.0 if scale > 0 else -1.0
            b_mat = sign * u[:, :r] * root
            a_mat = root[:, None] * a
            factors[i][name] = (a_mat.to(wi.dtype), b_mat.to(wi.dtype))
            # diagnostics: weighted error of the plain SVD init vs this one
            total = z.pow(2).sum().item()
            e_act = s[r:].pow(2).sum().item() / max(total, 1e-300)
            u2, s2, vh2 = torch.linalg.svd(d, full_matrices=False)
            m_svd = (u2[:, :r] * s2[:r]) @ vh2[:r]
            e_svd = ((d - m_svd) @ L).pow(2).sum().item() / max(total, 1e-300)
            stats[i][name] = {"svd": e_svd, "activation": e_act}
    return factors, stats


@torch.no_grad()
def apply_adapters(model: nn.Module, factors: dict[int, dict[str, tuple[Tensor, Tensor]]]) -> None:
    """Copy (A, B) factors (from :func:`activation_aware_adapters`) into the converted model."""
    layers = decoder_layers(model)
    for i, per in factors.items():
        for name, (a, b) in per.items():
            mod = layers[i].get_submodule(name)
            if not isinstance(mod, SharedLoRALinear):
                raise ValueError(f"block {i} {name} is not a SharedLoRALinear (convert first)")
            if mod.lora_a.shape != a.shape or mod.lora_b.shape != b.shape:
                raise ValueError(f"block {i} {name}: adapter shapes {tuple(mod.lora_a.shape)}/"
                                 f"{tuple(mod.lora_b.shape)} vs factors {tuple(a.shape)}/{tuple(b.shape)}")
            mod.lora_a.copy_(a)
            mod.lora_b.copy_(b)


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
    gamma: Optional[str] = "lsq"
    steps: int = 40
    batch_size: int = 2
    lr: float = 1e-3
    gamma_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup: float = 0.05
    max_grad_norm: Optional[float] = 1.0
    trainable: str = "adapters"
    num_samples: Optional[int] = None
    val_fraction: float = 0.125
    damping: float = 1e-2
    ridge: float = 0.0
    record_dtype: torch.dtype = torch.float32
    seed: int = 0

    def __post_init__(self):
        if self.adapter_init not in ("svd", "activation"):
            raise ValueError(f"adapter_init must be 'svd' or 'activation', got {self.adapter_init!r}")
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
        return d


#: The documented default of ``prune(..., local_fit=True)``: activation-aware adapters, the
#: closed-form gamma, then 40 gradient steps of 2 recorded sequences per block (lr 1e-3,
#: AdamW, cosine). Measured on SmolLM2-135M, ratio 0.3, rank 32, 32 x 256 calibration tokens
#: (benchmarks/results/recovery_study_cpu.md): held-out ppl at init 131.3 vs 156.1 for the
#: paper's init (drop: 155.9). The closed forms alone do not carry over: closed-form gamma
#: 149.8, activation-aware adapters + closed-form gamma 156.5. It is the initialisation of the
#: measured recovery recipe (train.compare.FlexiGPTRecipe, benchmarks/results/recovery_cpu.md);
#: prune()'s own default stays local_fit=None (the paper's init) and the CLI's "gamma", the
#: cheap choice for a model that is not healed.
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


def _split_rows(n: int, val_fraction: float) -> tuple[slice, Optional[slice]]:
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


def _fit_block(layer: nn.Module, records: DenseRecords, b: int, rows: slice, opts: LocalFit,
               progress: bool, gen: torch.Generator) -> list[float]:
    other, gammas = _fit_params(layer, opts.trainable)
    params = other + gammas
    dt, dev = _layer_dtype_device(layer)
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
            for step in tqdm(range(opts.steps), desc=f"Local fit block {b}", unit="step", leave=False,
                             disable=not progress):
                if step < warm:
                    f = (step + 1) / warm
                else:
                    f = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, opts.steps - warm)))
                for g, lr0 in zip(optim.param_groups, base_lrs):
                    g["lr"] = lr0 * f
                idx = torch.randperm(n, generator=gen)[:bs]
                x = xs[idx].to(dev, dt)
                y = ys[idx].to(dev, torch.float32)
                out = _run_block(layer, records, b, x).float()
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
    options: Optional[LocalFit] = None,
    *,
    adapter_factors: Optional[dict] = None,
    adapter_stats: Optional[dict] = None,
    progress: bool = True,
    **overrides,
) -> LocalFitReport:
    """Fit the replacement blocks of the converted `model` to the dense blocks' recorded
    behaviour, in place (see the module doc). `options` (a :class:`LocalFit`, default
    :data:`DEFAULT_LOCAL_FIT`) may be overridden by keyword (``steps=200``...).

    adapter_factors: output of :func:`activation_aware_adapters` on the dense model; required
    when options.adapter_init == "activation" (prune(local_fit=...) computes it for you).
    Returns a :class:`LocalFitReport`; the model is left in its original train/eval mode."""
    from .gamma_init import lsq_gamma
    from .replacement import replacement_blocks

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
                raise ValueError("adapter_init='activation' needs adapter_factors "
                                 "(activation_aware_adapters on the dense model, before conversion)")
            apply_adapters(model, adapter_factors)
            report.adapter_stats = adapter_stats or {}
        report.errors["init"] = _errors(model, records, train_rows, val_rows, bs_eval)
        report.seconds["adapters"] = time.perf_counter() - t
        if opts.gamma == "lsq":
            t = time.perf_counter()
            report.gamma_stats = lsq_gamma(model, records, rows=train_rows, ridge=opts.ridge,
                                           batch_size=bs_eval, progress=progress)
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
