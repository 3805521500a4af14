"""Shared fixtures. ``one_thread``: tiny tensors on a shared 2-core box, so intra-op threads cost more
than they save; a test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
