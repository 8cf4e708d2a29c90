"""The replacement linear of a FlexiGPT block inside a vLLM model.

vLLM stacks projections that read the same input into one weight: ``qkv_proj`` holds
[W_q; W_k; W_v] and ``gate_up_proj`` holds [W_gate; W_up] (rows concatenated). A replacement
block's stacked projection owns no weight: for the P parts of the base block's stacked linear
(part i owns output columns c_i .. c_i + n_i) it computes, in one output buffer,

    y = x @ W_base.T + b ;  y[:, c_i:c_i+n_i] += s_i * (x @ A_i.T) @ B_i.T
    y = gamma * LayerNorm_noBias(y)             (o_proj / down_proj with an output norm)

with the checkpoint's own adapters (A_i [r_i, K], B_i [n_i, r_i], s_i) and bias (its own, else
the base's). One call per projection, like the stock block's one GEMM, in either of two ways
(``base_gemm``, the environment variable FLEXIGPT_VLLM_BASE_GEMM, default "engine"):

- "engine": the base product comes from the base layer's own GEMM,
  ``base.quant_method.apply(base, x, bias)`` (on the CPU vLLM's packed oneDNN handle, the same
  one the base block runs; on a GPU whatever GEMM, or quantized GEMM, vLLM chose for it); the
  adapters are added onto it in place in one op call, the op of ``ops.stacked.add_stacked_delta_``
  (one shrink GEMM over the parts' concatenated A, one expand per part into its columns), or,
  with an output norm, that of ``shared_lora_linear_epilogue`` (delta, bias and norm in one
  call); the layer calls both ops directly, without the public functions' Python (vLLM runs
  the model under torch.inference_mode, so the dispatcher goes straight to the kernel). The base
  weight stays in whatever form the engine keeps it, which is how a quantized base would
  serve these blocks.
- "op": ``shared_lora_linear_stacked`` (q;k;v and gate;up) and ``shared_lora_linear`` (o, down,
  output norm fused) read the base weight tensor themselves; on the CPU the base linears must
  then keep a plain weight (``_cpu_skip_gemm_dispatch``, see model.py) and lose oneDNN packing.

The parts' A are held as row views of one [sum r_i, K] buffer (so the shrink reads them as one
matrix, no copy per call), each B [n_i, r_i] column-major (the transposed view of a contiguous
B_i^T [r_i, n_i]: at decode sizes the CPU expand kernel, csrc/cpu/lowrank_small_cpu.h, streams
B^T's rows, each a contiguous run of output columns), the parts' own biases, when every part
has one (Qwen2's q, k, v), as slices of one [N] buffer (the stacked bias, no copy per call),
gamma as stored: the bytes held are the checkpoint's.

Tensor parallelism (tensor_parallel.py has the arithmetic): every rank holds a shard of every
block, so a replacement's base shard is on its own rank. The checkpoint's full adapters are cut
per rank by the base layer's own vLLM weight loader (``checkpoint_tensors``), so they follow the
base exactly, kv-head replication included:

- column-parallel base (``QKVParallelLinear``, ``MergedColumnParallelLinear``): each part's
  B_i (and own bias) keeps the rows of the base's part i on this rank, A_i stays whole; the
  forward above is unchanged (it produces this rank's output columns);
- row-parallel base (``RowParallelLinear``, o / down): A is cut by columns like the base's
  input, B stays whole; this rank's partial ``x_r W_r^T + s (x_r A_r^T) B^T`` is summed by
  vLLM's tensor-parallel all-reduce (the one the base layer itself would run), then the bias
  and the output norm run once on the reduced output (``row_parallel_finish``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.parameter import ModelWeightParameter

from ...nn import OutputNorm
from ...ops import library, shared_lora_linear
from ...ops.epilogue import shared_lora_linear_epilogue
from ...ops.stacked import shared_lora_linear_stacked
from .tensor_parallel import row_parallel_finish

__all__ = ["AdapterSpec", "BASE_GEMMS", "FlexiGPTSharedLinear", "base_gemm_from_env"]

# the ops the engine path calls directly (ops/epilogue.py, ops/stacked.py register them)
_EPILOGUE_FWD = library.op("shared_lora_linear_epilogue_fwd")
_STACKED_DELTA = library.op("shared_lora_linear_stacked_delta_")

#: how a replacement part gets its base product (module doc)
BASE_GEMMS = ("engine", "op")
BASE_GEMM_ENV = "FLEXIGPT_VLLM_BASE_GEMM"


def base_gemm_from_env() -> str:
    """FLEXIGPT_VLLM_BASE_GEMM (default "engine"), checked."""
    value = os.environ.get(BASE_GEMM_ENV, "engine").strip().lower() or "engine"
    if value not in BASE_GEMMS:
        raise ValueError(f"{BASE_GEMM_ENV}={value!r}: choose one of {', '.join(BASE_GEMMS)}")
    return value


@dataclass(frozen=True)
class AdapterSpec:
    """One part of a stacked projection: its checkpoint name (e.g. "q_proj"), rank, scale and
    whether it carries its own bias."""

    name: str
    rank: int
    scale: float = 1.0
    own_bias: bool = False


class _Adapter(nn.Module):
    """lora_a [r, K] (a row view of the layer's A buffer), lora_b [N, r] stored column-major
    (the transposed view of a contiguous B^T [r, N], see the module doc) and an own bias [N]
    when the checkpoint has one."""

    def __init__(self, lora_a: Tensor, out_features: int, spec: AdapterSpec, bias: Tensor | None = None):
        super().__init__()
        kw = dict(dtype=lora_a.dtype, device=lora_a.device)
        self.scale = float(spec.scale)
        self.lora_a = nn.Parameter(lora_a, requires_grad=False)
        self.lora_b = nn.Parameter(torch.empty(spec.rank, out_features, **kw).t(), requires_grad=False)
        if spec.own_bias and bias is None:
            bias = torch.empty(out_features, **kw)
        self.bias = nn.Parameter(bias, requires_grad=False) if spec.own_bias else None


class FlexiGPTSharedLinear(nn.Module):
    """Stands in for vLLM's (stacked) linear `base` in a replacement block; returns
    (output, None) as vLLM's linear layers do. `base` is held by reference, not registered:
    its weight belongs to the base block and appears once in the model's parameters."""

    def __init__(
        self, base: nn.Module, parts: list[AdapterSpec], *, norm_eps: float | None = None, base_gemm: str = "engine"
    ):
        super().__init__()
        sizes = list(base.output_partition_sizes)
        if len(sizes) != len(parts):
            raise ValueError(
                f"{type(base).__name__} stacks {len(sizes)} projections, got adapters for {[p.name for p in parts]}"
            )
        if norm_eps is not None and len(parts) != 1:
            raise ValueError("an output norm follows a single projection (o_proj / down_proj)")
        if base_gemm not in BASE_GEMMS:
            raise ValueError(f"base_gemm={base_gemm!r}: choose one of {', '.join(BASE_GEMMS)}")
        self.row_parallel = isinstance(base, RowParallelLinear)
        if self.row_parallel and not base.input_is_parallel:
            raise ValueError(f"{type(base).__name__}: a replacement linear needs input_is_parallel=True")
        # under tensor parallelism a row-parallel part ends with vLLM's all-reduce (module doc)
        self.reduce = self.row_parallel and base.tp_size > 1
        if self.reduce and not base.reduce_results:
            raise ValueError("a row-parallel replacement linear under tensor parallelism needs reduce_results=True")
        if norm_eps is not None and not self.row_parallel:
            raise ValueError("an output norm follows a row-parallel projection (o_proj / down_proj)")
        if isinstance(base, QKVParallelLinear):
            self._shard_ids: list = ["q", "k", "v"]
        elif isinstance(base, MergedColumnParallelLinear):
            self._shard_ids = list(range(len(sizes)))
        else:
            self._shard_ids = [None]
        object.__setattr__(self, "_base", base)  # a reference, not a submodule
        self.base_gemm = base_gemm
        self.in_features = base.input_size_per_partition  # this rank's K (K/tp when row-parallel)
        self.out_features = sum(sizes)  # this rank's N (N/tp, per part, when column-parallel)
        kw = dict(dtype=base.params_dtype, device=base.weight.device)
        # every part's A is a row view of this one buffer (module doc); not a parameter itself
        self._lora_a = torch.empty(sum(p.rank for p in parts), self.in_features, **kw)
        views = self._lora_a.split([p.rank for p in parts])
        self._own_bias = [p.own_bias for p in parts]
        self._own = any(self._own_bias)
        # when every part has its own bias (Qwen2's q, k, v), they too are views of one [N]
        # buffer, which is then the stacked bias a call passes: no concatenation per call
        self._bias = torch.empty(self.out_features, **kw) if self._own and all(self._own_bias) else None
        bias_views = self._bias.split(sizes) if self._bias is not None else [None] * len(parts)
        self.adapters = nn.ModuleDict(
            {p.name: _Adapter(a, size, p, b) for p, a, size, b in zip(parts, views, sizes, bias_views)}
        )
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        # the op's per-part arguments, built once: the Parameter objects themselves (a load or a
        # move swaps their .data, never the objects), so a call does no module attribute lookups
        self._part_args = (
            [a.lora_a for a in self.adapters.values()],
            [a.lora_b for a in self.adapters.values()],
            [a.scale for a in self.adapters.values()],
        )
        self.output_norm = OutputNorm(self.out_features, 1.0, norm_eps, **kw) if norm_eps is not None else None
        if self.output_norm is not None:
            self.output_norm.weight.requires_grad_(False)

    @property
    def base(self) -> nn.Module:
        return self._base

    def checkpoint_tensors(self, prefix: str) -> dict[str, tuple[nn.Parameter, Callable[[Tensor], Tensor]]]:
        """{checkpoint name: (parameter, cut)} of what this layer loads; `prefix` is the block's
        sub-layer path in the checkpoint (e.g. "model.layers.3.self_attn."). ``cut(full)`` is
        this rank's part of the checkpoint's full tensor (the tensor itself without tensor
        parallelism): B and own biases of a column-parallel part by the base's rows, A of a
        row-parallel part by the base's input columns, the rest whole."""
        out = {}
        for i, (name, adapter) in enumerate(self.adapters.items()):
            for key, param in adapter.named_parameters():
                if self.row_parallel:
                    cut = self._input_columns if key == "lora_a" else _whole
                elif key == "lora_b":
                    cut = lambda t, i=i: self._part_rows(t, i)  # noqa: E731
                elif key == "bias":  # a vector: cut as a one-column matrix
                    cut = lambda t, i=i: self._part_rows(t.unsqueeze(1), i).squeeze(1)  # noqa: E731
                else:
                    cut = _whole
                out[f"{prefix}{name}.{key}"] = (param, cut)
        if self.output_norm is not None:
            out[f"{prefix}{next(iter(self.adapters))}.output_norm.weight"] = (self.output_norm.weight, _whole)
        return out

    def _base_loader_cut(self, full: Tensor, local_shape: tuple[int, int], shard_id=None) -> Tensor:
        """Runs the base weight's own vLLM loader on `full` [rows, cols] into a temporary vLLM
        parameter of `local_shape` (the base's local layout, with `full`'s column count) and
        returns it: the rank's cut of `full`, made exactly as the base weight's."""
        base = self._base
        loader = base.weight.weight_loader
        proxy = ModelWeightParameter(
            data=torch.empty(local_shape, dtype=self._lora_a.dtype, device=self._lora_a.device),
            input_dim=1,
            output_dim=0,
            weight_loader=loader,
        )
        proxy.tp_rank, proxy.tp_size = base.tp_rank, base.tp_size  # as LinearBase.update_param_tp_status
        if shard_id is None:
            loader(proxy, full)
        else:
            loader(proxy, full, shard_id)
        return proxy.data

    def _part_rows(self, full: Tensor, i: int) -> Tensor:
        """This rank's rows of part i's full [n_i, c] tensor (column-parallel base)."""
        start, size = self._starts[i], list(self.adapters.values())[i].lora_b.shape[0]
        stacked = self._base_loader_cut(full, (self.out_features, full.shape[1]), self._shard_ids[i])
        return stacked[start : start + size]

    def _input_columns(self, full: Tensor) -> Tensor:
        """This rank's input columns of a full [c, K] tensor (row-parallel base)."""
        return self._base_loader_cut(full, (full.shape[0], self.in_features))

    # -- per-call pieces ---------------------------------------------------------------------

    def _part_biases(self) -> list[Tensor | None]:
        """Each part's bias: its own, else the base's rows (None without either)."""
        base_bias = getattr(self._base, "bias", None)
        out = []
        for (adapter, own), start in zip(zip(self.adapters.values(), self._own_bias), self._starts):
            size = adapter.lora_b.shape[0]
            out.append(adapter.bias if own else (base_bias[start : start + size] if base_bias is not None else None))
        return out

    def _stacked_bias(self) -> Tensor | None:
        """The [N] bias of the stacked output: the base's when no part has its own, the own-bias
        buffer when every part has one; only a mix (not a layout any supported family
        produces) concatenates per call."""
        if not self._own:
            return getattr(self._base, "bias", None)
        if self._bias is not None:
            return self._bias
        biases = self._part_biases()
        return torch.cat(
            [
                b if b is not None else self._lora_a.new_zeros(a.lora_b.shape[0])
                for b, a in zip(biases, self.adapters.values())
            ]
        ).to(self._lora_a.dtype)

    def _forward_engine(self, x: Tensor) -> Tensor:
        """x [M, K] -> [M, N]: the engine's base product, then one direct op call (module doc)."""
        base, own = self._base, self._own
        # the base bias rides in the engine's GEMM unless a part has its own
        y0 = base.quant_method.apply(base, x, None if own else getattr(base, "bias", None))
        lora_as, lora_bs, scales = self._part_args
        if self.output_norm is not None:
            bias = next(iter(self.adapters.values())).bias if own else None
            norm = self.output_norm
            return _EPILOGUE_FWD(y0, x, lora_as[0], lora_bs[0], scales[0], bias, norm.weight, norm.eps, None, False)[0]
        # the shrink over the A buffer in place, one expand per part into its columns
        _STACKED_DELTA(y0, x, lora_as, lora_bs, scales, self._stacked_bias() if own else None)
        return y0

    def _forward_op(self, x: Tensor) -> Tensor:
        adapters = list(self.adapters.values())
        if len(adapters) == 1:
            a, norm = adapters[0], self.output_norm
            return shared_lora_linear(
                x,
                self._base.weight,
                a.lora_a,
                a.lora_b,
                a.scale,
                self._part_biases()[0],
                norm_weight=norm.weight if norm is not None else None,
                eps=norm.eps if norm is not None else 1e-5,
            )
        return shared_lora_linear_stacked(
            x,
            self._base.weight,
            [a.lora_a for a in adapters],
            [a.lora_b for a in adapters],
            [a.scale for a in adapters],
            self._stacked_bias(),
        )

    def partial(self, x: Tensor) -> Tensor:
        """Row-parallel part under tensor parallelism: this rank's share of the output before
        the all-reduce, ``x_r W_r^T + s (x_r A_r^T) B^T`` (no bias, no norm). x [M, K/tp]."""
        a = next(iter(self.adapters.values()))
        if self.base_gemm == "op":
            return shared_lora_linear(x, self._base.weight, a.lora_a, a.lora_b, a.scale, None)
        y0 = self._base.quant_method.apply(self._base, x, None)
        return shared_lora_linear_epilogue(y0, x, a.lora_a, a.lora_b, a.scale)

    def finish(self, reduced: Tensor) -> Tensor:
        """After the all-reduce: the bias (once) and the output norm on the whole rows."""
        norm = self.output_norm
        return row_parallel_finish(
            reduced,
            self._part_biases()[0],
            norm.weight if norm is not None else None,
            norm.eps if norm is not None else 1e-5,
            None,
        )

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.reduce:
            out = self.finish(tensor_model_parallel_all_reduce(self.partial(x)))
        elif self.base_gemm == "engine":
            out = self._forward_engine(x)
        else:
            out = self._forward_op(x)
        return out.reshape(*lead, out.shape[-1]), None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"parts={list(self.adapters)}, shares={type(self._base).__name__}, base_gemm={self.base_gemm}, "
            f"tp_size={self._base.tp_size}"
        )


def _whole(full: Tensor) -> Tensor:
    """A tensor every rank holds whole."""
    return full
