"""Shared fixtures: tiny seeded models (milliseconds) and, for the few tests that need it, SmolLM2."""
import pytest
import torch


@pytest.fixture
def tiny():
    from lorabook.models import tiny_llama
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The real base model (prepared by `make test`), loaded once per test session."""
    from lorabook.models import load_base_model
    torch.manual_seed(0)
    return load_base_model()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and a busy machine makes two threads many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
