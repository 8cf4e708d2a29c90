"""The Triton backend of shared_lora_linear: forward and backward composed from the kernels
in linear_lora.py (GEMM + LoRA + bias + residual + partial row statistics) and row_norm.py.

Forward launches: 1 (decode at rank <= 64, no norm: the shrink is fused and the residual is in
the epilogue) to 3 (a split-K shrink, the GEMM, the norm finish). Backward: the norm backward
(rows; then dgamma and the bias gradient in one two-stage column reduction), grad_x (one fused
GEMM with the transposed adapter: dy @ W + scale (dy @ B) @ A), grad_A = scale (dy @ B).T @ x
and grad_B = scale dy.T @ s (the scale in the GEMM epilogue; s = x @ A.T saved by the forward),
grad_W = dy.T @ x when asked.

`forward` and `backward` keep the backend calling convention (backends.py calls them). Without
an explicit tile config they run through two torch.library ops, `flexigpt::triton_lora_fwd` and
`flexigpt::triton_lora_bwd`: `triton_op`s on a GPU (torch.compile sees and schedules their
kernels), plain custom ops with a shapes-only fake under the Triton interpreter (an interpreted
kernel cannot be traced).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ..reference import ForwardResult
from . import configs
from .launch import _is_fake
from .linear_lora import LORA_FUSED, LORA_PRECOMPUTED, TileConfig, linear_lora
from .linear_lora import shrink as shrink_launch
from .row_norm import norm_backward, norm_finish


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _vector(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def _gemm_config(
    x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, shrink: Tensor, stats: bool, config: TileConfig | None
) -> TileConfig:
    """The given config, the decode tile, or the prefill tile measured fastest for this shape."""
    m, k = x.shape
    if config is not None:
        return config
    if m <= configs.FUSED_SHRINK_MAX_M:
        return configs.decode_config(x.dtype)
    n = weight.shape[0]
    candidates = configs.prefill_candidates(x.dtype)
    if _is_fake((x,)):
        return candidates[0]
    key = (triton.next_power_of_2(m), n, k, lora_a.shape[0], x.dtype, stats, x.device)

    def run(cfg: TileConfig) -> None:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
        tiles = triton.cdiv(n, cfg.block_n)
        part = (torch.empty((m, tiles), device=x.device, dtype=torch.float32),) * 2 if stats else None
        linear_lora(
            x,
            weight,
            out=out,
            lora_a=lora_a,
            lora_b=lora_b,
            shrink=shrink,
            mode=LORA_PRECOMPUTED,
            partial_stats=part,
            config=cfg,
        )

    return configs.tuned(key, candidates, run, x.device)


def _fused_linear_lora(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    out: Tensor,
    stats: bool = False,
    residual: Tensor | None = None,
    config: TileConfig | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None, TileConfig]:
    """out = x @ weight.T + bias + scale (x @ lora_a.T) @ lora_b.T (+ residual); returns the
    shrink [M, r] (x's dtype), the partial statistics (when `stats`) and the tile config used.
    Decode at small rank fuses the shrink into the GEMM; otherwise a split-K shrink runs first."""
    m = x.shape[0]
    r = lora_a.shape[0]
    shrink = torch.empty((m, r), device=x.device, dtype=x.dtype)
    if config is not None or m <= configs.FUSED_SHRINK_MAX_M:
        cfg = config or configs.decode_config(x.dtype)
        fused = configs.use_fused_shrink(m, r, cfg)
    else:
        fused = False
    if not fused:
        shrink_launch(x, lora_a, shrink)
        cfg = _gemm_config(x, weight, lora_a, lora_b, shrink, stats, config)
    partial = None
    if stats:
        tiles = triton.cdiv(weight.shape[0], cfg.block_n)
        partial = (
            torch.empty((m, tiles), device=x.device, dtype=torch.float32),
            torch.empty((m, tiles), device=x.device, dtype=torch.float32),
        )
    linear_lora(
        x,
        weight,
        out=out,
        bias=bias,
        lora_a=lora_a,
        lora_b=lora_b,
        scale=scale,
        shrink=shrink,
        mode=LORA_FUSED if fused else LORA_PRECOMPUTED,
        partial_stats=partial,
        residual=residual,
        config=cfg,
    )
    return shrink, partial, cfg


def _forward_impl(
    x2d: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual2d: Tensor | None,
    save_for_backward: bool,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    m, _ = x2d.shape
    n = weight.shape[0]
    bias, norm_weight = _vector(bias), _vector(norm_weight)  # the kernels index them with unit stride
    if norm_weight is None:
        out = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
        shrink, _, _ = _fused_linear_lora(
            x2d, weight, lora_a, lora_b, scale, bias, out, residual=residual2d, config=config
        )
        no_stats = x2d.new_empty((0,), dtype=torch.float32)
        return out, shrink, x2d.new_empty((0,)), no_stats, no_stats.clone()
    y_pre = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
    shrink, partial, cfg = _fused_linear_lora(
        x2d, weight, lora_a, lora_b, scale, bias, y_pre, stats=True, config=config
    )
    # Without a backward to feed, the finish overwrites y_pre in place (each element is
    # read and written by the same program).
    out = torch.empty_like(y_pre) if save_for_backward else y_pre
    res = _rows_contiguous(residual2d) if residual2d is not None else None
    mean, rstd = norm_finish(y_pre, *partial, cfg.block_n, norm_weight, eps, res, out)
    return out, shrink, y_pre if save_for_backward else x2d.new_empty((0,)), mean, rstd


def _backward_impl(
    grad_out: Tensor,
    x2d: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    norm_weight: Tensor | None,
    shrink: Tensor,
    y_pre: Tensor,
    mean: Tensor,
    rstd: Tensor,
    needs_weight_grad: bool,
    config: TileConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    m, k = x2d.shape
    n = weight.shape[0]
    g = _rows_contiguous(grad_out)
    norm_weight = _vector(norm_weight)
    grad_norm_weight = x2d.new_empty((0,), dtype=torch.float32)
    if norm_weight is not None:
        dy, grad_norm_weight, grad_bias = norm_backward(g, y_pre, norm_weight, mean, rstd, x2d.dtype)
    else:
        dy = g.to(x2d.dtype)
        grad_bias = dy.sum(0, dtype=torch.float32)
    grad_x = torch.empty((m, k), device=x2d.device, dtype=x2d.dtype)
    # grad_x = dy @ W + scale (dy @ B) @ A: the forward op on transposed operands.
    dy_b, _, _ = _fused_linear_lora(dy, weight.t(), lora_b.t(), lora_a.t(), scale, None, grad_x, config=config)
    r = lora_a.shape[0]
    grad_a = linear_lora(dy_b.t(), x2d.t(), out=torch.empty((r, k), device=x2d.device, dtype=x2d.dtype), scale=scale)
    grad_b = linear_lora(dy.t(), shrink.t(), out=torch.empty((n, r), device=x2d.device, dtype=x2d.dtype), scale=scale)
    grad_weight = x2d.new_empty((0,))
    if needs_weight_grad:
        grad_weight = linear_lora(dy.t(), x2d.t(), out=torch.empty((n, k), device=x2d.device, dtype=x2d.dtype))
    return grad_x, grad_weight, grad_a, grad_b, grad_bias, grad_norm_weight


def _register():
    """The two ops: triton_op where the kernels are compiled, custom_op + fake under the interpreter."""
    from .launch import _is_interpreted
    from .linear_lora import _linear_lora_kernel

    if _is_interpreted(_linear_lora_kernel):

        def as_op(name, fn):
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fn)  # interpreted launches are skipped on fake tensors: shapes only
            return op
    else:

        def as_op(name, fn):
            return torch.library.triton_op(name, fn, mutates_args=())

    def fwd(
        x: Tensor,
        weight: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scale: float,
        bias: Tensor | None,
        norm_weight: Tensor | None,
        eps: float,
        residual: Tensor | None,
        save_for_backward: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _forward_impl(x, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual, save_for_backward)

    def bwd(
        grad_out: Tensor,
        x: Tensor,
        weight: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scale: float,
        norm_weight: Tensor | None,
        shrink: Tensor,
        y_pre: Tensor,
        mean: Tensor,
        rstd: Tensor,
        needs_weight_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _backward_impl(
            grad_out, x, weight, lora_a, lora_b, scale, norm_weight, shrink, y_pre, mean, rstd, needs_weight_grad
        )

    return as_op("flexigpt::triton_lora_fwd", fwd), as_op("flexigpt::triton_lora_bwd", bwd)


triton_lora_fwd, triton_lora_bwd = _register()


def forward(
    x2d: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    bias: Tensor | None,
    norm_weight: Tensor | None,
    eps: float,
    residual2d: Tensor | None,
    save_for_backward: bool,
    config: TileConfig | None = None,
) -> ForwardResult:
    if config is not None:
        return ForwardResult(
            *_forward_impl(
                x2d, weight, lora_a, lora_b, scale, bias, norm_weight, eps, residual2d, save_for_backward, config
            )
        )
    return ForwardResult(
        *triton_lora_fwd(
            x2d,
            weight,
            lora_a,
            lora_b,
            float(scale),
            bias,
            norm_weight,
            float(eps),
            residual2d,
            bool(save_for_backward),
        )
    )


def backward(
    grad_out: Tensor,
    x2d: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    norm_weight: Tensor | None,
    saved: ForwardResult,
    needs_weight_grad: bool,
    config: TileConfig | None = None,
):
    """Returns (grad_x, grad_weight | None, grad_a, grad_b, grad_bias (fp32), grad_norm_weight | None)."""
    args = (
        grad_out,
        x2d,
        weight,
        lora_a,
        lora_b,
        scale,
        norm_weight,
        saved.shrink,
        saved.y_pre,
        saved.mean,
        saved.rstd,
        needs_weight_grad,
    )
    if config is not None:
        gx, gw, ga, gb, gbias, gnorm = _backward_impl(*args, config=config)
    else:
        gx, gw, ga, gb, gbias, gnorm = triton_lora_bwd(*args[:5], float(scale), *args[6:11], bool(needs_weight_grad))
    return (gx, gw if needs_weight_grad else None, ga, gb, gbias, gnorm if norm_weight is not None else None)
