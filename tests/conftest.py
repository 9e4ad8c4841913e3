"""Test-session settings shared by every test file."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_cpu_thread():
    """Run the suite on one CPU thread.

    The tests use tiny models whose ops are far too small to gain from intra-op parallelism, and
    CI boxes have 2 cores often shared with other jobs: OpenMP barriers under oversubscription made
    tiny convolutions ~50x slower. One thread keeps the suite fast and its timings stable.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
