"""The drop-in PolicyServer (``python -m lerobot_policy_parapolicy.policy_server``) against LeRobot's own gRPC
stubs and its ``RobotClient``, on 127.0.0.1: each client's observation history, one client's ``Ready`` leaving
the others alone, a hostile pickle refused while another client keeps being served."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from conftest import free_port
from lerobot.async_inference.helpers import RemotePolicyConfig, TimedObservation, raw_observation_to_observation
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.factory import make_pre_post_processors
from lerobot.transport import services_pb2, services_pb2_grpc
from lerobot.transport.utils import send_bytes_in_chunks
from lerobot.utils.feature_utils import hw_to_dataset_features

SEED = 1234
ATOL = 0.05  # pixels of the 512 x 512 table: paraddpm at tolerance 1e-6 against LeRobot's loop
ROBOT_FEATURES = {"x.pos": float, "y.pos": float, "top": (96, 96, 3)}
LEROBOT_FEATURES = hw_to_dataset_features(ROBOT_FEATURES, "observation", use_video=False)


@pytest.fixture(scope="module")
def server(camera_policy, lerobot_env, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(lerobot_env, PARAPOLICY_SAMPLER="paraddpm", PARAPOLICY_TOLERANCE="1e-6")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lerobot_policy_parapolicy.policy_server", f"--port={port}", "--fps=30",
             "--inference_latency=0", "--obs_queue_timeout=2", "--max_seconds=1800", f"--seed={SEED}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 300  # importing lerobot + torch takes ~10 s idle, minutes on a loaded box
    while time.time() < deadline:
        if "PolicyServer on" in log.read_text():
            break
        assert proc.poll() is None, log.read_text()
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start:\n" + log.read_text())
    yield {"address": address, "log": log, "proc": proc, "policy": camera_policy}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def stub(address):
    # a connection per client, as separate robot processes have (channels of one process share subchannels,
    # hence one peer, unless told otherwise)
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, services_pb2_grpc.AsyncInferenceStub(channel)


def raw_observation(i: int) -> dict:
    rng = np.random.default_rng(100 + i)
    return {"x.pos": float(rng.uniform(50, 450)), "y.pos": float(rng.uniform(50, 450)),
            "top": rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), "task": ""}


def instructions(policy_path) -> services_pb2.PolicySetup:
    spec = RemotePolicyConfig("diffusion", str(policy_path), LEROBOT_FEATURES, 8, "cpu")
    return services_pb2.PolicySetup(data=pickle.dumps(spec))


def send(client, payload: bytes):
    return client.SendObservations(send_bytes_in_chunks(payload, services_pb2.Observation, silent=True))


def observe(client, i: int, timestep: int):
    send(client, pickle.dumps(TimedObservation(timestamp=time.time(), timestep=timestep,
                                               observation=raw_observation(i), must_go=True)))


def actions(client) -> torch.Tensor:
    reply = client.GetActions(services_pb2.Empty())
    assert reply.data, "the server answered no actions"
    timed = pickle.loads(reply.data)  # nosec: our own server's reply in a test
    return torch.stack([a.get_action() for a in timed])


@pytest.fixture(scope="module")
def reference(camera_policy):
    """The chunk LeRobot's DiffusionPolicy plans for a given history of raw observations (stacked here by hand),
    with the server's seeding: what a correct server must answer."""
    policy = DiffusionPolicy.from_pretrained(str(camera_policy)).eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(camera_policy))

    def chunk(history: list[int], timestep: int) -> torch.Tensor:
        frames = [pre(raw_observation_to_observation(raw_observation(i), LEROBOT_FEATURES,
                                                     policy.config.image_features)) for i in history]
        batch = {k: torch.stack([f[k] for f in frames], dim=1) for k in ("observation.state", "observation.images.top")}
        policy.reset()
        torch.manual_seed(SEED + timestep)
        with torch.no_grad():
            out = policy.predict_action_chunk(batch)
        return torch.stack([post(out[:, i]) for i in range(out.shape[1])], dim=1).squeeze(0)

    return chunk


def test_each_client_keeps_its_history_and_ready_is_per_client(server, reference):
    _, a = stub(server["address"])
    a.Ready(services_pb2.Empty())
    a.SendPolicyInstructions(instructions(server["policy"]))
    observe(a, 0, timestep=0)
    first = actions(a)
    assert first.shape == (8, 2) and torch.isfinite(first).all()
    assert torch.allclose(first, reference([0, 0], 0), atol=ATOL)  # the first frame fills the history
    # another client connects, is reset, and plans on its own history meanwhile
    _, b = stub(server["address"])
    b.Ready(services_pb2.Empty())
    b.SendPolicyInstructions(instructions(server["policy"]))
    observe(b, 5, timestep=40)
    assert torch.allclose(actions(b), reference([5, 5], 40), atol=ATOL)
    observe(a, 1, timestep=8)
    second = actions(a)
    assert torch.allclose(second, reference([0, 1], 8), atol=ATOL)  # a's history: frames 0 and 1
    assert not torch.allclose(second, reference([1, 1], 8), atol=ATOL)  # ... not frame 1 alone
    observe(b, 6, timestep=48)
    assert torch.allclose(actions(b), reference([5, 6], 48), atol=ATOL)


class Marker:
    """Unpickling it would create a file: the proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def torch_nested(path) -> bytes:
    """A pickle whose tensor storage is torch.save bytes that run code when read with weights_only=False."""
    inner = io.BytesIO()
    torch.save(Marker(path), inner)

    class Storage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (inner.getvalue(),))

    return pickle.dumps(TimedObservation(timestamp=0.0, timestep=0, observation={"x": Storage()}))


def test_hostile_pickles_are_refused_while_another_client_is_served(server, reference, tmp_path):
    _, good = stub(server["address"])
    good.Ready(services_pb2.Empty())
    good.SendPolicyInstructions(instructions(server["policy"]))
    observe(good, 2, timestep=100)
    assert torch.allclose(actions(good), reference([2, 2], 100), atol=ATOL)

    _, evil = stub(server["address"])
    evil.Ready(services_pb2.Empty())
    markers = [tmp_path / f"pwned_{i}" for i in range(4)]
    attacks = [
        lambda: send(evil, pickle.dumps(Marker(markers[0]))),
        lambda: send(evil, pickle.dumps(TimedObservation(0.0, 0, {"x.pos": Marker(markers[1])}))),
        lambda: evil.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps(Marker(markers[2])))),
        lambda: send(evil, torch_nested(markers[3])),
        lambda: evil.SendPolicyInstructions(services_pb2.PolicySetup(data=pickle.dumps({"policy_type": "diffusion"}))),
    ]
    for attack in attacks:
        with pytest.raises(grpc.RpcError) as err:
            attack()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    time.sleep(0.5)
    assert not any(m.exists() for m in markers), "a hostile payload ran code on the server"
    log = server["log"].read_text()
    assert log.count("refused") >= len(attacks) and "posix.system" in log
    observe(good, 3, timestep=108)  # the other client is still served, its history intact
    assert torch.allclose(actions(good), reference([2, 3], 108), atol=ATOL)
    assert server["proc"].poll() is None


def test_lerobots_robot_client_runs_against_the_server(server, tmp_path, monkeypatch):
    """LeRobot's own RobotClient, unchanged, with the pusht_gym robot: the executed actions are the policy's."""
    from lerobot.async_inference.configs import RobotClientConfig
    from lerobot.async_inference.robot_client import RobotClient
    from lerobot_robot_pusht_gym import PushtGymConfig

    monkeypatch.chdir(tmp_path)  # RobotClient's logger writes logs/ in the working directory
    log = tmp_path / "actions.jsonl"
    config = RobotClientConfig(
        policy_type="diffusion", pretrained_name_or_path=str(server["policy"]),
        robot=PushtGymConfig(id="test", calibration_dir=tmp_path, action_log=str(log)), actions_per_chunk=8,
        server_address=server["address"], fps=30, chunk_size_threshold=0.5)
    client = RobotClient(config)
    assert client.start()
    receiver = threading.Thread(target=client.receive_actions, daemon=True)
    loop = threading.Thread(target=client.control_loop, kwargs={"task": ""}, daemon=True)
    receiver.start()
    loop.start()
    deadline = time.time() + 300  # seconds on an idle box; the bound is for a loaded one
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 24):
        time.sleep(0.5)
    client.shutdown_event.set()
    loop.join(timeout=10)
    receiver.join(timeout=10)
    client.robot.disconnect()
    client.channel.close()
    executed = [line for line in log.read_text().splitlines()] if log.exists() else []
    assert len(executed) >= 24, f"the robot executed {len(executed)} actions in 300 s"
    assert "planning for" not in server["log"].read_text()  # no failed plan
