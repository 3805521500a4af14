"""The real-lerobot suite (``make test-lerobot``): runs in a Python 3.12 venv holding lerobot 0.6.1, parapolicy
(--no-deps), the plugin (lerobot_plugin/) and the pusht_gym test robot (pusht_robot/). Where lerobot or the
plugin is not importable (``make test``'s venv) nothing here is collected. Nothing is downloaded
(HF_HUB_OFFLINE=1); every server and command is bounded in time and bound to 127.0.0.1."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
AVAILABLE = all(importlib.util.find_spec(m) is not None for m in ("lerobot", "lerobot_policy_parapolicy", "grpc"))

if not AVAILABLE:
    collect_ignore_glob = ["test_*.py"]
else:
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # in this process LeRobot's own loop is the reference: the plugin is imported switched off, and a test that
    # needs the swap calls parapolicy.integrations.lerobot.install itself (and uninstall after); subprocesses
    # get their PARAPOLICY_* knobs from lerobot_env
    os.environ["PARAPOLICY_SAMPLER"] = "off"
    import lerobot_policy_parapolicy  # noqa: F401


@pytest.fixture(scope="session")
def lerobot_env(tmp_path_factory):
    """Environment for LeRobot subprocesses: offline, one thread, a private HF home."""
    home = tmp_path_factory.mktemp("hf_home")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(home), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("PARAPOLICY_SAMPLER", None)
    return env


@pytest.fixture(scope="session")
def state_policy(tmp_path_factory):
    from builders import build_policy

    return build_policy(tmp_path_factory.mktemp("policies") / "state", env_state=True)


@pytest.fixture(scope="session")
def camera_policy(tmp_path_factory):
    from builders import build_policy

    return build_policy(tmp_path_factory.mktemp("policies") / "camera", camera=96, seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
