"""Models of FlexiGPT checkpoints (Hugging Face custom code; needs only torch and transformers).

Each class is the source family's ``*ForCausalLM`` whose replacement blocks are rebuilt from
``config.flexigpt`` (see configuration_flexigpt) right after construction: every linear named in
``config.flexigpt["shared"]`` becomes a :class:`SharedLinear` on its base block's linear (the
same weight tensor, held by reference, so the checkpoint stores it once), and each output norm
named in ``config.flexigpt["output_norms"]`` is added, fused after its linear or after the
architecture's own sub-layer norm (Gemma's post norms). A replacement linear computes

    y = x @ W_base.T + b + scale * (x @ A.T) @ B.T        x [..., in], A [r, in], B [out, r]
    y = gamma * (y - mean(y)) / sqrt(var(y) + eps)          (when it has an output norm)

b: its own bias when it has one, else the base's. Products and the norm accumulate in fp32 and
the result is cast to x's dtype (the plain-PyTorch specification of flexigpt_kernels'
``ops/reference.py``). When flexigpt_kernels is importable its fused op computes the same.
The stored tensors are exactly those of flexigpt_kernels' checkpoint: a replacement linear owns
``lora_a``, ``lora_b`` and an own ``bias``; an output norm owns ``weight`` (gamma).
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    OPTForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .configuration_flexigpt import (
    FlexiGPTGemma2Config,
    FlexiGPTGemma3TextConfig,
    FlexiGPTLlamaConfig,
    FlexiGPTMistralConfig,
    FlexiGPTOPTConfig,
    FlexiGPTPhi3Config,
    FlexiGPTQwen2Config,
    FlexiGPTQwen3Config,
)

try:  # the fused op, when flexigpt_kernels is installed; the plain computation below otherwise
    from flexigpt_kernels.ops import shared_lora_linear as fused_shared_lora_linear
except ImportError:
    fused_shared_lora_linear = None


def shared_lora_linear_reference(x, weight, lora_a, lora_b, scale, bias=None, norm_weight=None, eps=1e-5):
    """The replacement linear in plain PyTorch (fp32 accumulation, result in x's dtype)."""
    xf = x.float()
    y = F.linear(xf, weight.float(), None if bias is None else bias.float())
    y = y + scale * F.linear(F.linear(xf, lora_a.float()), lora_b.float())
    if norm_weight is not None:
        y = F.layer_norm(y, (y.shape[-1],), norm_weight.float(), None, eps)
    return y.to(x.dtype)


class OutputNorm(nn.Module):
    """gamma * LayerNorm_noBias(y) over the last dim; y [..., N], gamma [N]."""

    def __init__(self, hidden_size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, y):
        return F.layer_norm(y.float(), (y.shape[-1],), self.weight.float(), None, self.eps).to(y.dtype)


class PostNormThenOutputNorm(nn.Module):
    """The architecture's own sub-layer output norm followed by the FlexiGPT output norm."""

    def __init__(self, norm: nn.Module, output_norm: OutputNorm):
        super().__init__()
        self.norm = norm
        self.output_norm = output_norm

    def forward(self, x):
        return self.output_norm(self.norm(x))


class SharedLinear(nn.Module):
    """A linear on another module's weight plus its own low-rank adapter (see the module doc).

    The base nn.Linear is held by reference, not registered: its weight is stored once, by
    the block that owns it."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, own_bias: bool, output_norm: OutputNorm | None = None):
        super().__init__()
        object.__setattr__(self, "_base", base)
        w = base.weight
        self.in_features, self.out_features, self.rank, self.scale = base.in_features, base.out_features, rank, scale
        self.lora_a = nn.Parameter(torch.zeros(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=w.dtype)) if own_bias else None
        self.output_norm = output_norm

    @property
    def weight(self):
        return self._base.weight

    def forward(self, x):
        dt = x.dtype
        bias = self.bias if self.bias is not None else self._base.bias
        norm = self.output_norm
        args = (
            x,
            self.weight.to(dt),
            self.lora_a.to(dt),
            self.lora_b.to(dt),
            self.scale,
            None if bias is None else bias.to(dt),
        )
        kwargs = dict(norm_weight=None if norm is None else norm.weight.to(dt), eps=1e-5 if norm is None else norm.eps)
        if fused_shared_lora_linear is not None:
            return fused_shared_lora_linear(*args, **kwargs)
        return shared_lora_linear_reference(*args, **kwargs)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scale={self.scale}"


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def build_replacement_blocks(model: nn.Module, spec: dict) -> None:
    """Rebuild the replacement linears and output norms that `spec` (config.flexigpt) names."""
    shared, output_norms = spec.get("shared") or {}, dict(spec.get("output_norms") or {})
    modules = dict(model.named_modules())
    for name, s in shared.items():
        base = modules.get(s["base"])
        if not isinstance(base, nn.Linear):
            raise ValueError(f"config.flexigpt: {name}'s base {s['base']} is not a linear layer of the model")
        norm = None
        if s.get("output_norm"):
            norm = OutputNorm(
                base.out_features,
                output_norms.pop(f"{name}.output_norm"),
                device=base.weight.device,
                dtype=base.weight.dtype,
            )
        _set(model, name, SharedLinear(base, int(s["rank"]), float(s["scale"]), bool(s["own_bias"]), norm))
    for name, eps in output_norms.items():  # after the architecture's own sub-layer norm
        parent = name.removesuffix(".output_norm")
        own = model.get_submodule(parent)
        w = own.weight
        _set(model, parent, PostNormThenOutputNorm(own, OutputNorm(w.shape[-1], eps, device=w.device, dtype=w.dtype)))
    for block_name, base_pos in (spec.get("blocks") or {}).items():
        model.get_submodule(block_name).flexigpt_base = int(base_pos)  # marks a replacement block


def _flexigpt_model(hf_model: type, config_class: type) -> type:
    """FlexiGPT<HF class>: the family's model with the replacement blocks of config.flexigpt."""

    def __init__(self, config):
        hf_model.__init__(self, config)
        build_replacement_blocks(self, config.flexigpt)

    return type(
        f"FlexiGPT{hf_model.__name__}",
        (hf_model,),
        {"config_class": config_class, "__init__": __init__, "__module__": __name__},
    )


FlexiGPTLlamaForCausalLM = _flexigpt_model(LlamaForCausalLM, FlexiGPTLlamaConfig)
FlexiGPTMistralForCausalLM = _flexigpt_model(MistralForCausalLM, FlexiGPTMistralConfig)
FlexiGPTQwen2ForCausalLM = _flexigpt_model(Qwen2ForCausalLM, FlexiGPTQwen2Config)
FlexiGPTQwen3ForCausalLM = _flexigpt_model(Qwen3ForCausalLM, FlexiGPTQwen3Config)
FlexiGPTGemma2ForCausalLM = _flexigpt_model(Gemma2ForCausalLM, FlexiGPTGemma2Config)
FlexiGPTGemma3ForCausalLM = _flexigpt_model(Gemma3ForCausalLM, FlexiGPTGemma3TextConfig)
FlexiGPTPhi3ForCausalLM = _flexigpt_model(Phi3ForCausalLM, FlexiGPTPhi3Config)
FlexiGPTOPTForCausalLM = _flexigpt_model(OPTForCausalLM, FlexiGPTOPTConfig)
