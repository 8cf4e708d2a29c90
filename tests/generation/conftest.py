import pytest
import torch

from .helpers import PROMPT


@pytest.fixture
def prompt():
    return torch.tensor(PROMPT)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine torch's
    OpenMP threads spinning against other processes make each forward ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
