"""Configurations of FlexiGPT checkpoints (Hugging Face custom code; needs only transformers).

A checkpoint with replacement blocks (pruned or extended with FlexiGPT) names its own
``model_type``, ``"flexigpt_" + the source model_type`` (e.g. ``flexigpt_llama``), so that
transformers without this code refuses it instead of building a plain model whose replacement
blocks hold random weights. Each class here is the source family's configuration plus:

- ``model_type``: the FlexiGPT name; ``base_model_type``: the source family's;
- ``flexigpt``: what rebuilding the replacement blocks needs (a dict, stored in config.json)::

      {"format_version": 2,
       "base_map": {"3": 4, ...},                                  # replacement block -> its base
       "shared": {"model.layers.3.self_attn.q_proj":                # replacement linear -> spec
                     {"base": "model.layers.4.self_attn.q_proj", "rank": 4, "scale": 1.0,
                      "own_bias": false, "output_norm": false, ...}, ...},
       "output_norms": {"model.layers.3.self_attn.o_proj.output_norm": 1e-05, ...},  # eps
       "blocks": {"model.layers.3": 4, ...}}                        # block module -> its base

This file is copied into every such checkpoint by flexigpt_kernels' save_pretrained and named
in config.json's ``auto_map``; it is also a module of flexigpt_kernels (the vLLM plugin
registers these classes with ``AutoConfig``).
"""

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

PREFIX = "flexigpt_"


def flexigpt_model_type(base_model_type: str) -> str:
    """ "llama" -> "flexigpt_llama": the model_type of a FlexiGPT checkpoint of that family."""
    return PREFIX + base_model_type


def _flexigpt_config(hf_config: type) -> type:
    """FlexiGPT<HF config class>: the family's configuration under FlexiGPT's model_type."""
    return type(
        f"FlexiGPT{hf_config.__name__}",
        (hf_config,),
        {
            "model_type": flexigpt_model_type(hf_config.model_type),
            "base_model_type": hf_config.model_type,
            "__module__": __name__,
        },
    )


FlexiGPTLlamaConfig = _flexigpt_config(LlamaConfig)
FlexiGPTMistralConfig = _flexigpt_config(MistralConfig)
FlexiGPTQwen2Config = _flexigpt_config(Qwen2Config)
FlexiGPTQwen3Config = _flexigpt_config(Qwen3Config)
FlexiGPTGemma2Config = _flexigpt_config(Gemma2Config)
FlexiGPTGemma3TextConfig = _flexigpt_config(Gemma3TextConfig)
FlexiGPTPhi3Config = _flexigpt_config(Phi3Config)
FlexiGPTOPTConfig = _flexigpt_config(OPTConfig)

#: source model_type -> its FlexiGPT configuration class
CONFIG_CLASSES = {
    c.base_model_type: c
    for c in (
        FlexiGPTLlamaConfig,
        FlexiGPTMistralConfig,
        FlexiGPTQwen2Config,
        FlexiGPTQwen3Config,
        FlexiGPTGemma2Config,
        FlexiGPTGemma3TextConfig,
        FlexiGPTPhi3Config,
        FlexiGPTOPTConfig,
    )
}
