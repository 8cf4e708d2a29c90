"""vLLM plugin: serve checkpoints written by :func:`flexigpt_kernels.save_pretrained` natively.

``pip install "flexigpt-kernels[vllm]"`` installs the entry point
``vllm.general_plugins: flexigpt = flexigpt_kernels.integrations.vllm:register``; vLLM calls
:func:`register` in every process it starts, which registers one model class per supported
family under the name that save_pretrained writes into config.json's ``architectures``
(``"FlexiGPT" + the Hugging Face class name``, e.g. ``FlexiGPTLlamaForCausalLM``). Then
``vllm serve DIR`` and ``vllm.LLM(model=DIR)`` load the directory as it is: the shared weights
once, the adapters and output norms per replacement block (see ``model.py``).

This module imports nothing from vLLM at import time; the model classes are registered by
"module:class" strings and imported by vLLM when a checkpoint needs them.
"""

from __future__ import annotations

from ...io.checkpoint import serving_architecture

__all__ = ["SUPPORTED_ARCHITECTURES", "register"]

# Hugging Face class name -> our vLLM class (module:attribute), one per supported family.
_MODEL_MODULE = "flexigpt_kernels.integrations.vllm.model"
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    serving_architecture(hf): f"{_MODEL_MODULE}:{serving_architecture(hf)}"
    for hf in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
}


def register() -> None:
    """Register the FlexiGPT model classes with vLLM's ModelRegistry (idempotent)."""
    from vllm import ModelRegistry

    for arch, target in SUPPORTED_ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
