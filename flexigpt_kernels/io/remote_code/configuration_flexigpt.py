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
    """"llama" -> "flexigpt_llama": the model_type of a FlexiGPT checkpoint of that family."""
    return PREFIX + base_model_type


class FlexiGPTLlamaConfig(LlamaConfig):
    model_type = "flexigpt_llama"
    base_model_type = "llama"


class FlexiGPTMistralConfig(MistralConfig):
    model_type = "flexigpt_mistral"
    base_model_type = "mistral"


class FlexiGPTQwen2Config(Qwen2Config):
    model_type = "flexigpt_qwen2"
    base_model_type = "qwen2"


class FlexiGPTQwen3Config(Qwen3Config):
    model_type = "flexigpt_qwen3"
    base_model_type = "qwen3"


class FlexiGPTGemma2Config(Gemma2Config):
    model_type = "flexigpt_gemma2"
    base_model_type = "gemma2"


class FlexiGPTGemma3TextConfig(Gemma3TextConfig):
    model_type = "flexigpt_gemma3_text"
    base_model_type = "gemma3_text"


class FlexiGPTPhi3Config(Phi3Config):
    model_type = "flexigpt_phi3"
    base_model_type = "phi3"


class FlexiGPTOPTConfig(OPTConfig):
    model_type = "flexigpt_opt"
    base_model_type = "opt"


#: source model_type -> its FlexiGPT configuration class
CONFIG_CLASSES = {
    c.base_model_type: c
    for c in (FlexiGPTLlamaConfig, FlexiGPTMistralConfig, FlexiGPTQwen2Config, FlexiGPTQwen3Config,
              FlexiGPTGemma2Config, FlexiGPTGemma3TextConfig, FlexiGPTPhi3Config, FlexiGPTOPTConfig)
}
