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


@pytest.fixture(autouse=True, scope="session")
def fast_path_cache(tmp_path_factory):
    """Exported fast-path graphs (OpenVINO / ONNX Runtime) go to a scratch folder, not the user's cache."""
    import os

    previous = os.environ.get("PARAPOLICY_CACHE")
    os.environ["PARAPOLICY_CACHE"] = str(tmp_path_factory.mktemp("fast_path_cache"))
    yield
    if previous is None:
        os.environ.pop("PARAPOLICY_CACHE", None)
    else:
        os.environ["PARAPOLICY_CACHE"] = previous
