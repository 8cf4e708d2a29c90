"""Suite-wide setup. TRITON_INTERPRET=1 must be set before triton decorates the kernels (at
the first import of flexigpt_kernels.ops.triton), so it is set here, before any test module
imports the package: the Triton kernels then run on CPU tensors in the interpreter when a
test asks for the "triton" backend. The default ("auto") backend on CPU stays the reference
or the C++ extension, so model-level tests do not crawl through the interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def default_model_and_tokenizer():
    """The embedded SmolLM2-135M-Instruct (fp32, CPU, eval mode) and its tokenizer, loaded
    once per test session (~20 s). Shared by every test that asks: do not modify it; call
    flexigpt_kernels.assets.load_default_model() for a private copy (a few seconds once
    the first load has happened in this process)."""
    from flexigpt_kernels.assets import load_default_model

    return load_default_model()
