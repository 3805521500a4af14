"""parapolicy.integrations.lerobot_async without lerobot: the allow-list unpickler the drop-in PolicyServer reads
every payload with, the chunked-stream reader, and one client's observation history. Message classes here are
stand-ins shaped like LeRobot's (dataclasses pickled by reference); the real ones are exercised in
tests/lerobot_real/test_policy_server.py."""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from parapolicy.integrations.lerobot_async import (
    MAX_PAYLOAD_BYTES,
    FrameHistory,
    RefusedMessage,
    UnsafePickleError,
    allowed_globals,
    receive_chunks,
    safe_loads,
)


@dataclass
class TimedObservation:  # LeRobot's shape: lerobot/async_inference/helpers.py
    timestamp: float
    timestep: int
    observation: dict
    must_go: bool = False


@dataclass
class RemotePolicyConfig:
    policy_type: str
    pretrained_name_or_path: str
    lerobot_features: dict
    actions_per_chunk: int
    device: str = "cpu"
    rename_map: dict = field(default_factory=dict)


ALLOWED = allowed_globals([TimedObservation, RemotePolicyConfig])


class RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_lerobots_messages_round_trip():
    obs = TimedObservation(1.5, 7, {"x.pos": np.float64(3.0), "y.pos": 2.0, "task": "push",
                                    "top": np.arange(12, dtype=np.uint8).reshape(2, 2, 3),
                                    "t": torch.arange(4.0), "o": (1, [2, 3], {"a": None})}, must_go=True)
    back = safe_loads(pickle.dumps(obs), TimedObservation, ALLOWED)
    assert back.timestep == 7 and back.must_go and back.observation["task"] == "push"
    assert np.array_equal(back.observation["top"], obs.observation["top"])
    assert torch.equal(back.observation["t"], obs.observation["t"])
    assert back.observation["x.pos"] == 3.0 and back.observation["o"] == (1, [2, 3], {"a": None})
    spec = RemotePolicyConfig("diffusion", "/p", {"observation.state": {"dtype": "float32", "shape": (2,)}}, 8)
    assert safe_loads(pickle.dumps(spec, protocol=2), RemotePolicyConfig, ALLOWED) == spec


@pytest.mark.parametrize("make,name", [
    (lambda p: RunsCode(p), "posix.system"),
    (lambda p: TimedObservation(0.0, 0, {"x": RunsCode(p)}), "posix.system"),
    (lambda p: CallsEval(), "builtins.eval"),
    (lambda p: SimpleNamespace(a=1), "types.SimpleNamespace"),
])
def test_forbidden_globals_are_refused_before_anything_runs(tmp_path, make, name):
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError) as err:
        safe_loads(pickle.dumps(make(marker)), TimedObservation, ALLOWED)
    assert err.value.global_name == name
    assert not marker.exists()


def test_torch_storage_bytes_are_read_weights_only(tmp_path):
    """torch pickles a storage as torch.storage._load_from_bytes(torch.save bytes), which torch reads with
    weights_only=False: a sender's bytes could run code there. Ours reads them weights_only."""
    marker = tmp_path / "pwned"
    inner = io.BytesIO()
    torch.save(RunsCode(marker), inner)

    class Storage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (inner.getvalue(),))

    with pytest.raises(RefusedMessage, match="not a readable message"):
        safe_loads(pickle.dumps(TimedObservation(0.0, 0, {"x": Storage()})), TimedObservation, ALLOWED)
    assert not marker.exists()


def test_object_arrays_wrong_classes_and_junk_are_refused():
    with pytest.raises(RefusedMessage, match="holds Python objects"):
        safe_loads(pickle.dumps(np.array([1, "a"], dtype=object)), np.ndarray, ALLOWED)
    spec = RemotePolicyConfig("diffusion", "/p", {}, 8)
    with pytest.raises(RefusedMessage, match="expected a TimedObservation, got a RemotePolicyConfig"):
        safe_loads(pickle.dumps(spec), TimedObservation, ALLOWED)
    with pytest.raises(RefusedMessage, match="not a readable message"):
        safe_loads(pickle.dumps(spec)[:-5], RemotePolicyConfig, ALLOWED)
    with pytest.raises(RefusedMessage, match="is bytes"):
        safe_loads("text", TimedObservation, ALLOWED)
    with pytest.raises(RefusedMessage, match="byte limit"):
        safe_loads(b"\x80" * (MAX_PAYLOAD_BYTES + 1), TimedObservation, ALLOWED)


def test_receive_chunks_joins_lerobots_stream_and_bounds_it():
    def item(state, data):
        return SimpleNamespace(transfer_state=state, data=data)

    begin, middle, end = 1, 2, 3
    assert receive_chunks([item(begin, b"ab"), item(middle, b"cd"), item(end, b"e")], begin, middle, end) == b"abcde"
    assert receive_chunks([item(end, b"only")], begin, middle, end) == b"only"
    assert receive_chunks([item(begin, b"ab")], begin, middle, end) is None  # cut off
    with pytest.raises(RefusedMessage, match="byte limit"):
        receive_chunks([item(begin, b"x" * 6), item(end, b"y")], begin, middle, end, limit=5)
    with pytest.raises(RefusedMessage, match="unknown transfer state"):
        receive_chunks([item(9, b"x")], begin, middle, end)


def test_frame_history_stacks_the_last_n_obs_steps_frames():
    config = SimpleNamespace(n_obs_steps=3, image_features={"observation.images.a": None, "observation.images.b": None},
                             env_state_feature=None)
    history = FrameHistory(config)

    def frame(i):
        return {"observation.state": torch.full((1, 2), float(i)), "task": "x",
                "observation.images.a": torch.full((1, 3, 4, 4), float(i)),
                "observation.images.b": torch.full((1, 3, 4, 4), 10.0 + i)}

    first = history.push(frame(0))
    assert first["observation.state"][0, :, 0].tolist() == [0, 0, 0]  # the first frame fills the history
    history.push(frame(1))
    batch = history.push(frame(2))
    history2 = FrameHistory(config)
    assert history2.push(frame(9))["observation.state"][0, :, 0].tolist() == [9, 9, 9]  # histories are separate
    batch = history.push(frame(3))
    assert batch["observation.state"].shape == (1, 3, 2) and batch["observation.state"][0, :, 0].tolist() == [1, 2, 3]
    assert batch["observation.images"].shape == (1, 3, 2, 3, 4, 4)  # [B, S, cameras, C, H, W]
    assert batch["observation.images"][0, :, 1, 0, 0, 0].tolist() == [11, 12, 13]
    assert "task" not in batch
    history.clear()
    assert len(history) == 0
    with pytest.raises(ValueError, match="lacks"):
        history.push({"observation.state": torch.zeros(1, 2)})
