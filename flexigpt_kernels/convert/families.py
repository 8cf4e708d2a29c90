"""The model-family table: where a causal LM keeps its decoder layers and what they call things.

One entry per supported architecture, checked against tiny random models built from configs in
transformers 5.24. Every name is relative to one decoder layer (``layer.get_submodule(name)``),
except ``layer_paths``, which are dotted attribute paths from the model passed by the user (a
``*ForCausalLM``, or its inner base model), tried in order.

Fields of :class:`Family`:

- ``attention`` / ``mlp``: the linear layers of the two sub-layers, in forward order.
- ``attn_out`` / ``mlp_out``: the linear whose output is added to the residual stream; FlexiGPT's
  output normalization (docs/method.md section 4) goes right after it.
- ``norms``: the layer's own normalization modules (kept in a replacement block).
- ``attn_out_norm`` / ``mlp_out_norm``: a norm the architecture already applies to the sub-layer
  output before the residual add (Gemma 2/3 "sandwich" norms), or None.
- ``num_layers_attr``: the config attribute holding the layer count (read from the decoder's text
  config, ``config.get_text_config(decoder=True)``). Most families loop over
  ``layers[:config.num_hidden_layers]``; OPT loops over all of ``layers``.

Nothing here imports transformers: the table is matched on ``model.config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = [
    "Family",
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "family_of",
    "decoder_layers",
    "linear_names",
    "num_layers",
]


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its decoder layers and what its projections are called."""

    name: str
    model_types: tuple[str, ...]
    layer_paths: tuple[str, ...]
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    attn_out: str
    mlp_out: str
    norms: tuple[str, ...]
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    num_layers_attr: str = "num_hidden_layers"
    notes: str = ""

    @property
    def linears(self) -> tuple[str, ...]:
        """All linear names of a layer: attention first, then MLP."""
        return self.attention + self.mlp


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_GEMMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


def _llama_like(name: str, model_types: tuple[str, ...], *, norms=_LLAMA_NORMS, **kw) -> Family:
    return Family(
        name=name,
        model_types=model_types,
        layer_paths=("model.layers", "layers"),
        attention=_LLAMA_ATTN,
        mlp=_LLAMA_MLP,
        attn_out="self_attn.o_proj",
        mlp_out="mlp.down_proj",
        norms=norms,
        **kw,
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _llama_like("llama", ("llama",)),
        _llama_like("mistral", ("mistral",)),
        _llama_like("qwen2", ("qwen2",), notes="q/k/v_proj carry a bias; o_proj does not"),
        _llama_like(
            "qwen3",
            ("qwen3",),
            norms=_LLAMA_NORMS + ("self_attn.q_norm", "self_attn.k_norm"),
            notes="per-head RMSNorm on q and k (self_attn.q_norm / k_norm, shape [head_dim])",
        ),
        _llama_like(
            "gemma2",
            ("gemma2",),
            norms=_GEMMA_NORMS,
            attn_out_norm="post_attention_layernorm",
            mlp_out_norm="post_feedforward_layernorm",
            notes="sandwich norms: post_attention_layernorm and post_feedforward_layernorm act on "
            "the sub-layer outputs before the residual add; alternating sliding-window layers",
        ),
        Family(
            name="gemma3",
            model_types=("gemma3_text", "gemma3"),
            # gemma3_text -> Gemma3ForCausalLM (model.layers); gemma3 -> the multimodal
            # Gemma3ForConditionalGeneration, whose text decoder is model.language_model.
            layer_paths=("model.layers", "layers", "model.language_model.layers", "language_model.layers"),
            attention=_LLAMA_ATTN,
            mlp=_LLAMA_MLP,
            attn_out="self_attn.o_proj",
            mlp_out="mlp.down_proj",
            norms=_GEMMA_NORMS + ("self_attn.q_norm", "self_attn.k_norm"),
            attn_out_norm="post_attention_layernorm",
            mlp_out_norm="post_feedforward_layernorm",
            notes="as gemma2 plus q/k norms; the text-only model_type is 'gemma3_text'; "
            "'gemma3' is the multimodal model (layer count in config.text_config)",
        ),
        Family(
            name="phi3",
            model_types=("phi3",),
            layer_paths=("model.layers", "layers"),
            attention=("self_attn.qkv_proj", "self_attn.o_proj"),
            mlp=("mlp.gate_up_proj", "mlp.down_proj"),
            attn_out="self_attn.o_proj",
            mlp_out="mlp.down_proj",
            norms=_LLAMA_NORMS,
            notes="fused qkv_proj [q+2kv, hidden] and gate_up_proj [2*intermediate, hidden]",
        ),
        Family(
            name="opt",
            model_types=("opt",),
            layer_paths=("model.decoder.layers", "decoder.layers"),
            attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
            mlp=("fc1", "fc2"),
            attn_out="self_attn.out_proj",
            mlp_out="fc2",
            norms=("self_attn_layer_norm", "final_layer_norm"),
            notes="LayerNorm with bias, every linear has a bias, ReLU MLP; the model loops over "
            "all of decoder.layers; do_layer_norm_before=False (OPT-350m) puts the norms after "
            "the residual adds",
        ),
    )
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES.values() for t in f.model_types)
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of ``model`` (matched on ``model.config.model_type``).

    Raises ValueError naming the model type and every supported one when it is not in the table.
    """
    model_type = _model_type(model)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise ValueError(
            f"model: unsupported model_type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(families: {', '.join(FAMILIES)})"
        )
    return family


def _resolve(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def num_layers(model: nn.Module) -> int:
    """The number of decoder layers the model's forward runs (config count, capped by the list)."""
    family = family_of(model)
    layers = _layer_list(model, family)
    text_config = model.config.get_text_config(decoder=True)
    count = getattr(text_config, family.num_layers_attr, None)
    return len(layers) if count is None else min(int(count), len(layers))


def _layer_list(model: nn.Module, family: Family) -> nn.ModuleList:
    for path in family.layer_paths:
        layers = _resolve(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"model: no decoder layer list found in {type(model).__name__} "
        f"(family {family.name!r}; tried {', '.join(family.layer_paths)})"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` holding the decoder layers of ``model`` (the live list, not a copy).

    Only the first :func:`num_layers` entries run in the model's forward.
    """
    return _layer_list(model, family_of(model))


def linear_names(model: nn.Module) -> tuple[str, ...]:
    """The linear layer names of one decoder layer of ``model`` (relative to the layer)."""
    return family_of(model).linears
