"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: the test machine has 2 shared cores, and small
    convolutions run slower with two threads fighting over them."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
