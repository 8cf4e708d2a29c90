"""vLLM model classes for FlexiGPT checkpoints of the Llama family (Llama, Mistral, Qwen2).

Each class is vLLM's own model for the family (its decoder layers, attention layer with the
paged KV cache, rotary embedding, fused RMSNorm + residual, stacked qkv_proj / gate_up_proj,
weight-loading iterator) with the replacement blocks of ``flexigpt.json["base_map"]``
changed after construction:

- a kept block is exactly vLLM's block;
- a replacement block keeps its own attention layer (its own KV cache: it has its own layer
  index) and its own input / post-attention RMSNorms, and its four linear layers become
  :class:`FlexiGPTSharedLinear` on the base block's linear layers: one call per projection
  (q;k;v and gate;up stacked, o and down with the output norm), the base product from the
  base layer's own GEMM (``quant_method.apply``) or from our op (layers.py, ``base_gemm``).

Weight loading: vLLM's iterator over model.safetensors is filtered: the replacement blocks'
tensors (``...q_proj.lora_a``, ``...o_proj.output_norm.weight``, own biases) are copied into
their parameters here, everything else goes to the family's own ``load_weights`` (which
stacks q/k/v and gate/up of the kept blocks). The checkpoint holds no weight for a replacement
block's projections, so nothing is copied or merged.

On the CPU, vLLM repacks each linear weight into an opaque oneDNN handle after loading and
frees the tensor. With ``base_gemm="engine"`` (the default, FLEXIGPT_VLLM_BASE_GEMM) every
linear is packed as in the stock model and a replacement block runs its base's packed GEMM
through ``quant_method.apply``; with ``base_gemm="op"`` our op reads the shared weight tensor,
so the linears that serve as a base keep it (``_cpu_skip_gemm_dispatch``, the flag vLLM itself
uses for the same purpose) and run ``torch.nn.functional.linear``.

Tensor parallelism: every rank holds a shard of every block, so a replacement linear's base
shard is on its own rank; its adapters are cut by the base layer's own weight loader and its
row-parallel partials summed by vLLM's all-reduce (layers.py). Pipeline parallelism: allowed
when every replacement block is on its base block's stage (pipeline.py, with vLLM's
``get_pp_indices``); each stage shares only its own blocks, and vLLM's loader skips the
tensors of the blocks another stage holds (``PPMissingLayer``), adapters included.

Not supported (raises NotImplementedError): quantization, vLLM's own LoRA adapters.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.distributed.utils import get_pp_indices
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from ...io.checkpoint import FLEXIGPT_CONFIG_NAME, read_manifest
from .layers import AdapterSpec, FlexiGPTSharedLinear, base_gemm_from_env
from .pipeline import check_pipeline_stages

__all__ = ["FlexiGPTLlamaForCausalLM", "FlexiGPTMistralForCausalLM", "FlexiGPTQwen2ForCausalLM", "held_weights"]

# vLLM's stacked linear (path in a decoder layer) -> the checkpoint's projections in it, in
# row order, and the sub-layer prefix their checkpoint names start with.
_STACKS = (
    ("self_attn.qkv_proj", "self_attn.", ("q_proj", "k_proj", "v_proj")),
    ("self_attn.o_proj", "self_attn.", ("o_proj",)),
    ("mlp.gate_up_proj", "mlp.", ("gate_proj", "up_proj")),
    ("mlp.down_proj", "mlp.", ("down_proj",)),
)


def read_record(model: str, revision: str | None = None) -> dict[str, Any]:
    """flexigpt.json of the checkpoint vLLM was asked to load (a local directory, or a hub
    repository through huggingface_hub)."""
    path = Path(model) / FLEXIGPT_CONFIG_NAME
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, FLEXIGPT_CONFIG_NAME, revision=revision))
        except Exception as exc:  # noqa: BLE001 - any failure means: not a FlexiGPT checkpoint
            raise FileNotFoundError(
                f"{model}: no {FLEXIGPT_CONFIG_NAME}; its config.json names a FlexiGPT "
                f"architecture, but the sharing map is missing"
            ) from exc
    return read_manifest(path)


def _check_supported(vllm_config: VllmConfig) -> None:
    if vllm_config.quant_config is not None:
        raise NotImplementedError("FlexiGPT models run in vLLM unquantized only")
    if vllm_config.lora_config is not None:
        raise NotImplementedError("vLLM LoRA adapters on a FlexiGPT model are not supported")


class FlexiGPTMixin:
    """Turns a vLLM Llama-family model into a FlexiGPT model (see the module doc). Use before
    the family's class in the bases; the family's __init__ builds every block as a plain one."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs):
        _check_supported(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        model_config = vllm_config.model_config
        self.flexigpt_record = read_record(model_config.model, getattr(model_config, "revision", None))
        self._flexigpt_tensors: dict[str, tuple[nn.Parameter, Any]] = {}
        self._share_blocks(self.flexigpt_record)

    def _share_blocks(self, record: dict[str, Any]) -> None:
        layers = self.model.layers
        shared, norms = record.get("shared", {}), record.get("output_norms", {})
        base_map = {int(i): int(j) for i, j in record.get("base_map", {}).items()}
        base_gemm = base_gemm_from_env()
        for i, j in sorted(base_map.items()):
            if i in base_map.values() or not (0 <= i < len(layers) and 0 <= j < len(layers)):
                raise ValueError(
                    f"{FLEXIGPT_CONFIG_NAME}: base_map {i} -> {j} does not fit a model of "
                    f"{len(layers)} blocks whose replacement blocks own no weights"
                )
        pp = get_pp_group()
        check_pipeline_stages(base_map, [get_pp_indices(len(layers), s, pp.world_size) for s in range(pp.world_size)])
        for i, j in sorted(base_map.items()):
            if not self.model.start_layer <= i < self.model.end_layer:
                continue  # another stage's block (its base is there too)
            for stack, sub, names in _STACKS:
                ckpt = f"model.layers.{i}.{sub}"
                specs = []
                for name in names:
                    spec = shared.get(ckpt + name)
                    if spec is None:
                        raise ValueError(
                            f"{FLEXIGPT_CONFIG_NAME}: block {i} is a replacement block but "
                            f"{ckpt + name} is not among its shared linears"
                        )
                    specs.append(AdapterSpec(name, int(spec["rank"]), float(spec["scale"]), bool(spec["own_bias"])))
                eps = norms.get(f"{ckpt}{names[0]}.output_norm")
                block, base = layers[i], layers[j].get_submodule(stack)
                if base_gemm == "op":
                    base._cpu_skip_gemm_dispatch = True  # our op reads the weight tensor (module doc)
                linear = FlexiGPTSharedLinear(base, specs, norm_eps=eps, base_gemm=base_gemm)
                parent, _, attr = stack.rpartition(".")
                setattr(block.get_submodule(parent), attr, linear)  # the block's own linear is released
                self._flexigpt_tensors.update(linear.checkpoint_tensors(ckpt))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        names = {id(p): n for n, p in self.named_parameters()}
        loaded: set[str] = set()

        def rest():
            for name, tensor in weights:
                entry = self._flexigpt_tensors.get(name)
                if entry is None:
                    yield name, tensor
                    continue
                param, cut = entry
                local = _cut_checked(name, tensor, param, cut)
                param.data.copy_(local)
                loaded.add(names[id(param)])

        loaded |= super().load_weights(rest())
        missing = sorted(n for n, (p, _) in self._flexigpt_tensors.items() if names[id(p)] not in loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks replacement-block tensors {missing[:5]}")
        return loaded


def _cut_checked(name: str, tensor: torch.Tensor, param: nn.Parameter, cut) -> torch.Tensor:
    """This rank's cut of a checkpoint tensor, with the shapes named when it does not fit."""
    try:
        local = cut(tensor)
    except (AssertionError, RuntimeError, IndexError) as exc:  # vLLM's loaders assert on shapes
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}") from exc
    if local.shape != param.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} (this rank's cut {tuple(local.shape)}), "
            f"model expects {tuple(param.shape)}"
        )
    return local


class FlexiGPTLlamaForCausalLM(FlexiGPTMixin, LlamaForCausalLM):
    """FlexiGPT checkpoint of a Llama model (SmolLM2 included)."""


class FlexiGPTMistralForCausalLM(FlexiGPTMixin, MistralForCausalLM):
    """FlexiGPT checkpoint of a Mistral model."""


class FlexiGPTQwen2ForCausalLM(FlexiGPTMixin, Qwen2ForCausalLM):
    """FlexiGPT checkpoint of a Qwen2 model (own q/k/v biases of replacement blocks kept)."""


def held_weights(model: nn.Module) -> dict[str, int]:
    """What a loaded vLLM model holds as weights: bytes and elements of its parameters, each
    storage counted once (tied embeddings, and a replacement block's shared base weight, are
    one storage), plus the linear weights that vLLM's CPU backend moved into oneDNN handles
    (their parameter is left empty), counted at their logical size; and how many replacement
    linears read their base block's own module. Buffers are not counted (vLLM's Llama holds
    only the rotary cos/sin cache, which no checkpoint stores), nor the oneDNN copy of a tied
    LM head that the CPU backend keeps beside the embedding. For ``LLM.apply_model``
    (``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` when the engine runs in its own process)."""
    storages: dict[int, int] = {}
    numel = 0
    for _, p in model.named_parameters():
        if p.numel() == 0:
            continue
        key = p.untyped_storage().data_ptr()
        if key not in storages:  # parameters that are views of one buffer count it once
            storages[key] = p.untyped_storage().nbytes()
            numel += storages[key] // p.element_size()
    packed = [m for m in model.modules() if isinstance(m, LinearBase) and m.weight.numel() == 0]
    packed_numel = sum(sum(m.output_partition_sizes) * m.input_size_per_partition for m in packed)
    packed_bytes = sum(
        sum(m.output_partition_sizes) * m.input_size_per_partition * m.weight.element_size() for m in packed
    )
    modules = {id(m) for m in model.modules()}
    shared = [m for m in model.modules() if isinstance(m, FlexiGPTSharedLinear)]
    return {
        "bytes": sum(storages.values()) + packed_bytes,
        "numel": numel + packed_numel,
        "packed_linears": len(packed),
        "replacement_linears": len(shared),
        "sharing_base_modules": sum(id(m.base) in modules for m in shared),
    }
