"""Fixtures for the vLLM integration tests (their own venv: `make test-vllm`).

Engine start-ups cost ~15-20 s each on 2 CPU cores, so each model gets one module-scoped LLM.
The engine runs in its own process (vLLM's default): in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) vLLM pins its OpenMP threads without the libgomp
LD_PRELOAD it gives its engine process, and every torch-threaded op (ours, F.linear) then
runs ~50x slower. LLM.apply_model sends a function to that process, which needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1 (local test processes only).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # the test process has used OpenMP
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is a local directory
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import pytest

from .helpers import SMOL_BLOCKS, pruned_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    import flexigpt_kernels as fk

    return fk.save_pretrained(pruned_tiny(), tmp_path_factory.mktemp("tiny") / "flexigpt")


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """(directory, tokenizer, dense model's parameter count) of SmolLM2-135M pruned at 0.3."""
    import flexigpt_kernels as fk
    from flexigpt_kernels.assets import load_default_model
    from flexigpt_kernels.convert.prune import prune, stored_parameters

    model, tokenizer = load_default_model()
    dense_params = stored_parameters(model)
    model, _ = prune(model, None, blocks=SMOL_BLOCKS, progress=False)
    path = fk.save_pretrained(model, tmp_path_factory.mktemp("smol") / "flexigpt", tokenizer)
    return path, tokenizer, dense_params
