import pytest


@pytest.fixture(scope="session")
def default_model_and_tokenizer():
    """The embedded SmolLM2-135M-Instruct (fp32, CPU, eval mode) and its tokenizer, loaded
    once per test session (~20 s). Shared by every test that asks: do not modify it; call
    flexigpt_kernels.assets.load_default_model() for a private copy (a few seconds once
    the first load has happened in this process)."""
    from flexigpt_kernels.assets import load_default_model

    return load_default_model()
