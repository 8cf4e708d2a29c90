"""Closed-form output-norm gamma for replacement blocks (docs/method.md section 5).

A replacement sub-layer adds gamma * n to the residual stream, n = LayerNorm_noBias(y) its
normalized output. Instead of a fixed small gamma (docs/method.md 4: 1e-2), choose, per channel c,
the least-squares scale that maps n onto the original block's contribution t on calibration
activations:

    gamma_c = sum_t n[t, c] * t[t, c] / (sum_t n[t, c]^2 + ridge * T)

- attention: t = the dense block's attention contribution (recorded), n computed by the
  replacement block from the dense block input;
- MLP (after the attention gamma is set): t = n_mlp + (y_dense - y_repl), the contribution
  that would make the replacement block's output equal the dense block's output given its own
  attention (for pre-norm blocks this is y_dense - (x + attention contribution)).

When the replacement output is unrelated to the original, the solution is close to 0 (the
block then behaves like a dropped block, as a tiny gamma does); where it correlates, gamma
takes the scale that fits. It can be negative (anti-correlated channels). Cheap: two forwards
of each replacement block over the recorded tokens, no training.
"""

from __future__ import annotations

import torch
from torch import nn

from .dense_records import (
    DenseRecords,
    batches,
    contribution_name,
    layer_dtype_device,
    run_block,
    sublayer_output_norms,
)
from .families import decoder_layers, family_of
from .importance import first_tensor

__all__ = ["fit_block_gammas", "lsq_gamma", "lsq_scale"]


def lsq_scale(n: torch.Tensor, t: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Per-channel least-squares scale g minimising sum_t (g_c n[t,c] - t[t,c])^2 (+ ridge * T g_c^2);
    n, t: [..., N]. Returns fp32 [N]."""
    n2 = n.reshape(-1, n.shape[-1]).double()
    t2 = t.reshape(-1, t.shape[-1]).double()
    return ((n2 * t2).sum(0) / (n2.pow(2).sum(0) + ridge * n2.shape[0]).clamp_min(1e-300)).float()


@torch.no_grad()
def fit_block_gammas(
    layer: nn.Module,
    family,
    records: DenseRecords,
    block: int,
    *,
    rows: slice | None = None,
    ridge: float = 0.0,
    batch_size: int = 4,
) -> dict[str, float]:
    """Set the attention and then the MLP output-norm gamma of one replacement block `layer`
    (standing at position `block` of the recorded model) to their least-squares values (module
    doc) on the recorded rows. Returns the mean and mean |.| of each new gamma and
    "residual": sum ||block(x) - y||^2 over the rows with the fitted gammas (the MLP fit's
    objective at its optimum: sum_c tt_c - 2 g_c nt_c + g_c^2 nn_c, from the same sums)."""
    dt, dev = layer_dtype_device(layer)
    g_attn, g_mlp = sublayer_output_norms(layer, family)
    xs, ys, ts = records.inputs[block], records.outputs[block], records.attn[block]
    if rows is not None:
        xs, ys, ts = xs[rows], ys[rows], ts[rows]
    captured = {}

    def grab(key):
        def hook(module, args, output):
            captured[key] = first_tensor(output)

        return hook

    h_a = layer.get_submodule(contribution_name(family, "attn")).register_forward_hook(grab("attn"))
    h_m = layer.get_submodule(contribution_name(family, "mlp")).register_forward_hook(grab("mlp"))
    stats: dict[str, float] = {}
    try:
        for key, norm in (("attn", g_attn), ("mlp", g_mlp)):
            norm.weight.fill_(1.0)  # the sub-layer now outputs its normalized output n
            nn_ = torch.zeros(norm.hidden_size, dtype=torch.float64)
            nt = torch.zeros_like(nn_)
            tt = torch.zeros_like(nn_)
            count = 0
            for sl in batches(xs.shape[0], batch_size):
                out = run_block(layer, records, block, xs[sl].to(dev, dt)).float()
                n = captured[key].float().reshape(out.shape)  # OPT's MLP runs on [batch * seq, hidden]
                if key == "attn":
                    t = ts[sl].to(dev, torch.float32)
                else:  # the MLP contribution that would make the block's output the dense one
                    t = n + (ys[sl].to(dev, torch.float32) - out)
                n2, t2 = n.reshape(-1, n.shape[-1]).double().cpu(), t.reshape(-1, t.shape[-1]).double().cpu()
                nn_ += n2.pow(2).sum(0)
                nt += (n2 * t2).sum(0)
                tt += t2.pow(2).sum(0)
                count += n2.shape[0]
            g = nt / (nn_ + ridge * count).clamp_min(1e-300)
            norm.weight.copy_(g.to(norm.weight.dtype))
            stats[f"{key}_mean"] = g.mean().item()
            stats[f"{key}_abs_mean"] = g.abs().mean().item()
        stats["residual"] = (tt - 2 * g * nt + g.pow(2) * nn_).clamp_min(0).sum().item()
    finally:
        h_a.remove()
        h_m.remove()
    return stats


@torch.no_grad()
def lsq_gamma(
    model: nn.Module,
    records: DenseRecords,
    *,
    rows: slice | None = None,
    ridge: float = 0.0,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[int, dict[str, float]]:
    """Set the attention and MLP output-norm gammas of every recorded replacement block of the
    converted `model` to their per-channel least-squares values on `records` (rows: a slice of
    the recorded sequences, default all). Needs records.attn (record_dense_blocks(attn=True)).
    Returns per block what fit_block_gammas returns (the mean and mean |.| of the new gammas,
    the residual)."""
    if not records.attn:
        raise ValueError("records hold no attention contributions: record_dense_blocks(..., attn=True)")
    family = family_of(model)
    layers = decoder_layers(model)
    stats: dict[int, dict[str, float]] = {}
    was_training = model.training
    model.eval()
    try:
        for b in records.blocks:
            if not hasattr(layers[b], "flexigpt_base"):
                raise ValueError(f"block {b} is not a replacement block")
            stats[b] = fit_block_gammas(layers[b], family, records, b, rows=rows, ridge=ridge, batch_size=batch_size)
    finally:
        model.train(was_training)
    return stats
