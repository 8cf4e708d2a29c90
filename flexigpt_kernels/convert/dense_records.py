"""Recording what the dense model's blocks compute, and running one recorded block on its own.

The block-local initialisation (convert/local_fit.py) and the closed-form gamma
(convert/gamma_init.py) both fit a replacement block to what the ORIGINAL block computed on
calibration tokens. This module holds what they share:

- :func:`record_dense_blocks` runs the dense model once over the calibration tokens with hooks
  on the blocks to be pruned and keeps, on the CPU, for each such block: its input
  [n, seq, hidden], its output, the attention sub-layer's residual contribution (for the
  closed-form gamma), the keyword arguments the model passed to the layer (position
  embeddings, mask, ...; captured once with a forward pre-hook, ``with_kwargs=True``) and, on
  request, the input covariance of each of its linears (:class:`DenseRecords`). Memory:
  3 x blocks x n x seq x hidden values in ``dtype`` (SmolLM2-135M, 9 blocks, 32 x 256 tokens,
  fp32: 0.5 GB) plus in^2 per distinct linear input when covariances are recorded.
- :func:`run_block` calls one layer directly on recorded inputs with the recorded kwargs, so
  nothing else of the model runs; :func:`block_errors` measures a converted model's
  replacement blocks against the records.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nn import OutputNorm
from .families import Family, decoder_layers, family_of, num_layers
from .importance import StopForward, calibration_forward, first_tensor

__all__ = [
    "DenseRecords",
    "record_dense_blocks",
    "run_block",
    "batches",
    "layer_dtype_device",
    "block_errors",
    "contribution_name",
    "sublayer_output_norms",
]


# --------------------------------------------------------------------------------------------
# sub-layer names and nested tensors
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
            raise ValueError(
                f"replacement block has no output norm on its {which} sub-layer (converted with output_norm=False?)"
            )
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
            outs[b].append(first_tensor(output).detach().to("cpu", dtype))
            seen_input[b].clear()
            if b == last:
                raise StopForward

        return hook

    def attn_hook(b):
        def hook(module, args, output):
            attns[b].append(first_tensor(output).detach().to("cpu", dtype))

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
    calibration_forward(
        model, tokens, batch_size=batch_size, desc="Recording dense blocks", progress=progress, handles=handles
    )
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


def run_block(layer: nn.Module, records: DenseRecords, b: int, x: Tensor) -> Tensor:
    kw = _rebatch(_to(records.kwargs[b], x.device), records.batch_size, x.shape[0])
    return first_tensor(layer(x, **kw))


def batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


def layer_dtype_device(layer: nn.Module):
    for p in layer.parameters():
        return p.dtype, p.device
    return torch.float32, torch.device("cpu")


@torch.no_grad()
def block_errors(
    model: nn.Module, records: DenseRecords, *, rows: slice | None = None, batch_size: int = 4
) -> dict[int, float]:
    """Relative error of each replacement block on recorded rows:
    sum ||block(x) - y||^2 / sum ||y - x||^2  (1.0 = as bad as dropping the block)."""
    layers = decoder_layers(model)
    errs = {}
    was_training = model.training
    model.eval()
    try:
        for b in records.blocks:
            layer = layers[b]
            dt, dev = layer_dtype_device(layer)
            xs, ys = records.inputs[b], records.outputs[b]
            if rows is not None:
                xs, ys = xs[rows], ys[rows]
            num = den = 0.0
            for sl in batches(xs.shape[0], batch_size):
                x = xs[sl].to(dev, dt)
                y = ys[sl].to(dev, torch.float32)
                out = run_block(layer, records, b, x).float()
                num += (out - y).pow(2).sum().item()
                den += (y - x.float()).pow(2).sum().item()
            errs[b] = num / max(den, 1e-30)
    finally:
        model.train(was_training)
    return errs
