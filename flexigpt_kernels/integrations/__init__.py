"""Integrations with serving engines. Each subpackage imports its engine; nothing here is
imported by ``import flexigpt_kernels``.

- :mod:`flexigpt_kernels.integrations.vllm`: FlexiGPT checkpoints served natively by vLLM
  (an out-of-tree model plugin registered through the ``vllm.general_plugins`` entry point).
"""
