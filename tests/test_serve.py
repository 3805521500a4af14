"""Policy server, client, batching, bad input, token, shutdown and a closed-loop episode through it.

Servers are real: a ``PolicyServer`` on a free loopback port in a background thread (tiny policies), or
``python -m parapolicy.serve`` as a subprocess for the SIGTERM test (shipped Square policy).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import gymnasium as gym
import numpy as np
import pytest
import torch

from parapolicy.serving.client import RemotePolicy
from parapolicy.serving.codec import CodecError, packb, unpackb
from parapolicy.serving.server import PolicyServer, ServerThread
from policy_synthetic import ACTION_DIM, OBS_DIM, tiny_policy


pytestmark = pytest.mark.usefixtures("one_thread")


def serve(policy, **options) -> ServerThread:
    return ServerThread(PolicyServer(policy, "127.0.0.1", 0, **options))


def observations(policy, n: int, seed: int) -> np.ndarray:
    """``[n, obs_dim]`` float32 observations inside the normaliser's range."""
    gen = torch.Generator().manual_seed(seed)
    low, high = policy.normalizer.obs.min, policy.normalizer.obs.max
    return (low + torch.rand((n, policy.config.obs_dim), generator=gen) * (high - low)).numpy()


def local_actions(policy, obs: np.ndarray, seed: int) -> np.ndarray:
    """What the in-process control loop does: reset, seed torch, act() on every observation."""
    policy.reset()
    torch.manual_seed(seed)
    return np.stack([policy.act(o) for o in obs])


def raw_connect(url: str):
    """A bare websocket (no RemotePolicy checks in the way) and the server's metadata."""
    import inspect

    from websockets.sync.client import connect

    legacy = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}  # websockets >= 17
    ws = connect(url, compression=None, proxy=None, **legacy)
    metadata = unpackb(ws.recv(timeout=10))
    assert metadata["type"] == "metadata"
    return ws, metadata


# ---------------------------------------------------------------------------------------------- codec
def test_codec_round_trip_and_refusals():
    message = {"id": 3, "a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]),
               "c": torch.ones(2, dtype=torch.float64), "d": np.int64(7), "e": [np.zeros(0, np.uint8)]}
    back = unpackb(packb(message))
    assert back["a"].dtype == np.float32 and np.array_equal(back["a"], message["a"])
    assert back["b"].dtype == bool and back["c"].dtype == np.float64 and back["d"] == 7
    assert back["e"][0].shape == (0,)
    with pytest.raises(TypeError):
        packb({"x": np.array(["text"])})
    bad = [
        (b"\xc1", "malformed msgpack"),
        ({"__ndarray__": True, "dtype": "<f4", "shape": [3], "data": b"\0" * 4}, "needs 12"),
        ({"__ndarray__": True, "dtype": "|O", "shape": [1], "data": b"\0" * 8}, "not allowed"),
        ({"__ndarray__": True, "dtype": "<c8", "shape": [1], "data": b"\0" * 8}, "not allowed"),
        ({"__ndarray__": True, "dtype": "<f4", "shape": [-1], "data": b""}, "non-negative"),
        ({"__ndarray__": True, "dtype": "<f4", "shape": [0]}, "exactly the keys"),
    ]
    for payload, needle in bad:
        raw = payload if isinstance(payload, bytes) else packb(payload)
        with pytest.raises(CodecError, match=needle):
            unpackb(raw)


# ------------------------------------------------------------------------------- equality with local
def test_remote_chunks_equal_the_local_shipped_policy():
    from parapolicy import load_policy

    from parapolicy.policy.checkpoint import resolve_checkpoint

    policy = load_policy("square", sampler="ddim", num_inference_steps=4)
    obs = observations(policy, 17, seed=0)
    with serve(policy, checkpoint=resolve_checkpoint("square")) as server, RemotePolicy(server.url) as remote:
        meta = remote.metadata
        assert (meta["protocol"], meta["obs_dim"], meta["action_dim"], meta["n_action_steps"]) == (1, 23, 7, 8)
        assert meta["obs_key_dims"] == [14, 3, 4, 2] and meta["sampler"]["name"] == "ddim"
        assert len(meta["checkpoint"]["sha256"]) == 64 and meta["checkpoint"]["training"]["iterations"] > 0
        remote.reset(seed=11)
        got = []
        for o in obs:
            got.append(remote.act(o))
            assert remote.last_info["replanned"] == (len(got) % 8 == 1)
        # robosuite's own dict layout ('object-state') gives the same actions
        remote.reset(seed=11)
        splits = np.split(obs, np.cumsum(meta["obs_key_dims"])[:-1], axis=1)
        keys = ["object-state", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
        got_dict = [remote.act({k: s[i] for k, s in zip(keys, splits)}) for i in range(len(obs))]
    expected = local_actions(policy, obs, seed=11)
    assert np.array_equal(np.stack(got), expected)  # same process and threads: bit for bit
    assert np.array_equal(np.stack(got_dict), expected)


def test_remote_warm_start_equals_local_and_robots_keep_separate_histories():
    policy = tiny_policy(seed=1)
    policy.set_sampler("paraddpm", 10, window=4, tolerance=0.1, warm_start=True)
    obs_a, obs_b = observations(policy, 24, seed=1), observations(policy, 24, seed=2)
    with serve(policy) as server, RemotePolicy(server.url) as a, RemotePolicy(server.url) as b:
        a.reset(seed=5)
        b.reset(seed=6)
        got_a, got_b, warm = [], [], []
        for oa, ob in zip(obs_a, obs_b):  # interleaved step by step
            got_a.append(a.act(oa))
            got_b.append(b.act(ob))
            if a.last_info["replanned"]:
                warm.append(a.last_info["warm"])
    assert warm == [False, True, True]  # warm start from the second chunk on, per robot
    assert np.array_equal(np.stack(got_a), local_actions(policy, obs_a, seed=5))
    assert np.array_equal(np.stack(got_b), local_actions(policy, obs_b, seed=6))
    assert not np.allclose(got_a, got_b)


def run_robots(url: str, histories: np.ndarray, n_requests: int) -> tuple[list[np.ndarray], list[dict]]:
    """Robots r = 0..R-1 in threads, released together; robot r resets with seed 100 + r and sends
    ``histories[r, k]`` as its k-th request. Returns per-robot [k, n_action_steps, A] and every timing."""
    n_robots = len(histories)
    clients = [RemotePolicy(url) for _ in range(n_robots)]
    barrier = threading.Barrier(n_robots)
    actions, timings = [[] for _ in range(n_robots)], []

    def robot(r):
        barrier.wait()
        for k in range(n_requests):
            reply = clients[r].infer(histories[r, k], reset=k == 0, seed=100 + r if k == 0 else None)
            actions[r].append(reply["action"])
            timings.append(reply["timing"])

    threads = [threading.Thread(target=robot, args=(r,)) for r in range(n_robots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    return [np.stack(a) for a in actions], timings


@pytest.mark.parametrize("sampler, options, atol", [
    ("ddpm", {}, 1e-5),  # stochastic: each robot's x_T and step noise come from its own generator
    ("paraddpm", {"window": 4, "tolerance": 1e-4, "warm_start": True}, 1e-3),  # per-row warm starts
])
def test_batching_gives_each_robot_its_unbatched_actions(sampler, options, atol):
    policy = tiny_policy(seed=2)
    policy.set_sampler(sampler, 10, **options)
    histories = observations(policy, 4 * 3 * 2, seed=3).reshape(4, 3, 2, OBS_DIM)  # 4 robots, 3 requests
    with serve(policy, max_batch=4, max_wait_ms=2000) as server:
        batched, timing_on = run_robots(server.url, histories, 3)
    with serve(policy, max_batch=4, max_wait_ms=0) as server:
        alone, timing_off = run_robots(server.url, histories, 3)
    assert max(t["batch"] for t in timing_on) == 4 and {t["batch"] for t in timing_off} == {1}
    if options.get("warm_start"):
        assert any(t["warm"] and t["batch"] > 1 for t in timing_on)
    for r in range(4):
        assert batched[r].shape == (3, 8, ACTION_DIM)
        np.testing.assert_allclose(batched[r], alone[r], atol=atol, rtol=0)
    assert not np.allclose(batched[0], batched[1], atol=1e-2)


# ------------------------------------------------------------------------------------------ bad input
def test_every_bad_input_gets_its_error_and_the_connection_stays_usable():
    from websockets.exceptions import ConnectionClosed

    policy = tiny_policy(seed=3)
    policy.set_sampler("ddim", 3)
    good = observations(policy, 1, seed=4)[0]
    nan, inf = good.copy(), good.copy()
    nan[3], inf[5] = np.nan, np.inf
    cases = [
        (b"\xc1\x00junk", "bad_message", None, "malformed msgpack"),
        ("a text frame", "bad_message", None, "text frame"),
        (packb([1, 2, 3]), "bad_request", None, "msgpack map"),
        (packb({"obs": good}), "bad_request", None, "lacks 'id'"),
        (packb({"id": [1], "obs": good}), "bad_request", None, "'id' must be"),
        (packb({"id": 1, "obs": good, "observation": good}), "bad_request", 1, "unknown request keys"),
        (packb({"id": 2, "type": "train", "obs": good}), "bad_request", 2, "unknown request type"),
        (packb({"id": 3}), "bad_request", 3, "lacks 'obs'"),
        (packb({"id": 4, "obs": good[:5]}), "bad_request", 4, "shape (23,)"),
        (packb({"id": 5, "obs": np.zeros((2, 2, OBS_DIM), np.float32)}), "bad_request", 5, "shape"),
        (packb({"id": 6, "obs": {"object": good[:14]}}), "bad_request", 6, "lacks keys"),
        (packb({"id": 7, "obs": nan}), "bad_request", 7, "NaN or inf"),
        (packb({"id": 8, "obs": inf}), "bad_request", 8, "NaN or inf"),
        (packb({"id": 9, "obs": good, "seed": 3}), "bad_request", 9, "reset=true"),
        (packb({"id": 10, "obs": good, "reset": True, "seed": -1}), "bad_request", 10, "'seed'"),
        (packb({"id": 11, "obs": good, "reset": "yes"}), "bad_request", 11, "'reset'"),
        (packb({"id": 12, "obs": good, "deadline_ms": -5}), "bad_request", 12, "deadline_ms"),
        (packb({"id": 13, "obs": "pixels"}), "bad_request", 13, "obs must be"),
        (packb({"id": 14, "obs": {"__ndarray__": True, "dtype": "<f4", "shape": [23], "data": b"\0" * 8}}),
         "bad_message", None, "needs 92"),
        (packb({"id": 15, "obs": {"__ndarray__": True, "dtype": "|O", "shape": [1], "data": b"\0" * 8}}),
         "bad_message", None, "not allowed"),
    ]
    with serve(policy, max_message_bytes=4096) as server:
        ws, _ = raw_connect(server.url)
        for k, (raw, code, rid, needle) in enumerate(cases):
            ws.send(raw)
            reply = unpackb(ws.recv(timeout=10))
            assert reply["type"] == "error" and reply["code"] == code and reply["id"] == rid, (k, reply)
            assert needle in reply["error"], (k, reply)
            ws.send(packb({"id": f"good-{k}", "obs": good, "reset": True, "seed": 1}))
            ok = unpackb(ws.recv(timeout=10))
            assert ok["type"] == "action" and ok["id"] == f"good-{k}" and ok["action"].shape == (8, ACTION_DIM)
        # a message over max_message_bytes is a protocol violation: closed with 1009 and a reason
        ws.send(packb({"id": 99, "obs": np.zeros(2000, np.float32)}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1009
        # a client that leaves mid-request costs nothing else
        ws2, _ = raw_connect(server.url)
        ws2.send(packb({"id": 1, "obs": good}))
        ws2.close()
        # the client checks observations before sending, as a local policy does; the server answers on
        with RemotePolicy(server.url) as remote:
            with pytest.raises(ValueError, match="NaN or inf"):
                remote.act(nan)
            with pytest.raises(ValueError, match="server rejected request"):
                remote.infer(good[:4])
            assert remote.act(good).shape == (ACTION_DIM,)
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.server.port}/healthz", timeout=10).read())
        assert health["status"] == "ok" and health["errors"] == len(cases) + 1
    stats = server.server.stats
    assert stats.errors == len(cases) + 1 and stats.requests == len(cases) + 2  # + the abandoned one + act()


def test_deadline_is_flagged():
    policy = tiny_policy(seed=4)
    policy.set_sampler("ddim", 3)
    obs = observations(policy, 1, seed=5)[0]
    with serve(policy, deadline_ms=1e-3) as server, RemotePolicy(server.url) as remote:
        late = remote.infer(obs, reset=True, seed=0)
        relaxed = remote.infer(obs, deadline_ms=1e6)
        remote.reconnect()  # a new connection: a new robot on the server, same seed -> same chunk
        again = remote.infer(obs, reset=True, seed=0)
        assert server.server.stats.connections == 2
    np.testing.assert_array_equal(again["action"], late["action"])
    assert late["timing"]["deadline_missed"] and late["timing"]["deadline_ms"] == 1e-3
    assert not relaxed["timing"]["deadline_missed"] and "seed" not in relaxed  # the seed is echoed on resets only
    assert late["seed"] == 0 and late["timing"]["server_ms"] >= late["timing"]["plan_ms"] > 0


def test_token_is_required_before_any_work(monkeypatch):
    monkeypatch.delenv("PARAPOLICY_TOKEN", raising=False)
    policy = tiny_policy(seed=5)
    policy.set_sampler("ddim", 3)
    obs = observations(policy, 1, seed=6)[0]
    with serve(policy, token="s3cret") as server:
        with pytest.raises(PermissionError, match="token"):
            RemotePolicy(server.url)
        with pytest.raises(PermissionError, match="token"):
            RemotePolicy(server.url, token="wrong")
        assert server.server.stats.connections == 0  # refused in the handshake: no session, no model call
        with RemotePolicy(server.url, token="s3cret") as remote:
            assert remote.act(obs).shape == (ACTION_DIM,)
        monkeypatch.setenv("PARAPOLICY_TOKEN", "s3cret")
        with RemotePolicy(server.url) as remote:
            assert remote.act(obs).shape == (ACTION_DIM,)
        assert server.server.stats.connections == 2


# ------------------------------------------------------------------------------------------ shutdown
def test_cli_server_answers_in_flight_requests_on_sigterm(tmp_path):
    """The CLI on the shipped policy (ddpm-100: a call takes long enough to be caught in flight)."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "parapolicy.serve", "checkpoint=square", "sampler=ddpm", "port=0",
         "torch_threads=1", f"hydra.run.dir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            found = [m.group(1) for line in list(lines) if (m := re.search(r"listening on (ws://\S+)", line))]
            url = found[0] if found else None
            time.sleep(0.05)
        assert url, "".join(lines)
        health_url = url.replace("ws://", "http://") + "/healthz"
        assert json.loads(urllib.request.urlopen(health_url, timeout=10).read())["status"] == "ok"

        from parapolicy import load_policy

        obs = observations(load_policy("square"), 1, seed=7)[0]
        remote = RemotePolicy(url, timeout_s=120)
        replies: list = []
        worker = threading.Thread(target=lambda: replies.append(remote.infer(obs, reset=True, seed=3)))
        worker.start()
        while json.loads(urllib.request.urlopen(health_url, timeout=10).read())["inflight"] == 0:
            assert worker.is_alive(), "request finished before it could be caught in flight"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        worker.join(120)
        assert replies and replies[0]["action"].shape == (8, 7) and replies[0]["timing"]["rounds"] == 100
        assert proc.wait(timeout=60) == 0
        with pytest.raises(ConnectionError):  # the server closed this idle connection on its way out
            remote.infer(obs)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    assert "served 1 requests in 1 batches" in out and "closed after 1 requests" in out


# in-process stop with one request planning and two queued: tests/test_serve_batching.py (the model call
# is held on an event there, so the three-in-flight state does not depend on arrival times)


# ------------------------------------------------------------------------------------------ closed loop
class Recorder(gym.Wrapper):
    """Records every executed action."""

    def __init__(self, env):
        super().__init__(env)
        self.actions = []

    def step(self, action):
        self.actions.append(np.array(action, dtype=np.float32, copy=True))
        return self.env.step(action)


def served_and_local_episode(policy, task: str, seed: int, steps: int, eval_steps: int, out):
    """One ``task`` episode of ``steps`` through a server for ``policy`` (``run_episode``), then a one-episode
    eval of ``eval_steps`` through the same server (its output in ``out``), then the same episode in this
    process (``PolicyRunner``). Returns (served record, local record, served actions, local actions, the
    eval's summary); the actions are those the env received, ``[steps, action_dim]``."""
    from hydra import compose, initialize_config_module

    from parapolicy.envs import make_env
    from parapolicy.evaluation import run_eval
    from parapolicy.evaluation.remote import run_episode
    from parapolicy.realtime.runner import PolicyRunner

    env = Recorder(make_env(task, max_episode_steps=steps))
    with serve(policy) as server:
        with RemotePolicy(server.url) as remote:
            record = run_episode(env, remote, seed)
        remote_actions, env.actions = np.stack(env.actions), []
        with initialize_config_module("parapolicy.conf", version_base=None):
            cfg = compose("eval", overrides=[f"server={server.url}", "n_episodes=1", f"max_episode_steps={eval_steps}",
                                             "progress_bar=false", f"env={task}"])
        summary = run_eval(cfg, out)
    vec = gym.vector.SyncVectorEnv([lambda: env], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    (local,) = PolicyRunner(vec, policy).run_batch([seed])
    vec.close()
    return record, local, remote_actions, np.stack(env.actions), summary


@pytest.mark.slow
def test_closed_loop_episode_through_the_server_reproduces_the_in_process_eval(tmp_path):
    policy = tiny_policy(seed=7)  # Square's observation layout
    policy.set_sampler("paraddpm", 10, window=4, tolerance=0.1, warm_start=True)
    record, local, remote_actions, local_actions, summary = served_and_local_episode(
        policy, "square", 100003, 20, eval_steps=9, out=tmp_path)
    assert record["length"] == local["length"] == 20 and len(record["calls"]) == 3
    assert np.array_equal(remote_actions, local_actions)
    assert [c["rounds"] for c in record["calls"]] == [c["rounds"] for c in local["calls"]]
    assert [c["warm"] for c in record["calls"]] == [False, True, True]
    assert all(c["latency_ms"] >= c["server_ms"] > 0 for c in record["calls"])

    run = summary["runs"]["paraddpm+warm@server"]
    assert run["n_episodes"] == 1 and run["n_calls"] == 2 and run["server_latency_ms"]["p50"] > 0
    line = json.loads((tmp_path / "episodes.jsonl").read_text().splitlines()[0])
    assert line["length"] == 9 and line["seed"] == 100000


def test_fast_path_server_is_warm_for_every_batch_size_and_plans_as_the_plain_path():
    """fast_path on (CPU: traced backends): every batch size 1..max_batch is prepared before the
    server listens (metadata lists the shapes), and batched replies equal the plain path's."""
    policy = tiny_policy(seed=2)
    policy.set_sampler("paraddpm", 10, window=4, tolerance=1e-4)
    histories = observations(policy, 3 * 2 * 2, seed=5).reshape(3, 2, 2, OBS_DIM)  # 3 robots, 2 requests
    with serve(policy, max_batch=3, max_wait_ms=2000) as server:
        plain, _ = run_robots(server.url, histories, 2)
        assert server.server.metadata["fast_path"] is None
    policy.enable_fast_path(True, backend="trace")
    with serve(policy, max_batch=3, max_wait_ms=2000) as server:
        shapes = server.server.metadata["fast_path"]["backends"]
        assert {shape.split("x")[1] for shape in shapes} == {"B1", "B2", "B3"}
        prepared = dict(policy.fast_path.stats.warmup_s)
        fast, timing = run_robots(server.url, histories, 2)
        assert max(t["batch"] for t in timing) == 3
        assert dict(policy.fast_path.stats.warmup_s) == prepared  # no shape was first met by a request
    for r in range(3):
        np.testing.assert_allclose(fast[r], plain[r], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def lift_image():
    """The shipped Lift image policy (two 84x84 cameras + proprioception) with a 4-step DDIM."""
    from parapolicy import load_policy

    return load_policy("lift_image", sampler="ddim", num_inference_steps=4)


def image_observations(n: int, seed: int, channel_first: bool = False) -> list[dict]:
    """``n`` robosuite-style obs dicts: both cameras' uint8 frames, the proprioception, and a key the
    policy does not read (robosuite's ``object-state``)."""
    rng = np.random.default_rng(seed)
    shape = (3, 84, 84) if channel_first else (84, 84, 3)
    return [{"agentview_image": rng.integers(0, 256, shape, dtype=np.uint8),
             "robot0_eye_in_hand_image": rng.integers(0, 256, shape, dtype=np.uint8),
             "robot0_eef_pos": rng.normal(0.0, 0.1, 3), "robot0_eef_quat": rng.normal(0.0, 1.0, 4),
             "robot0_gripper_qpos": rng.uniform(-0.04, 0.04, 2), "object-state": rng.normal(0.0, 1.0, 10)}
            for _ in range(n)]


def test_image_policy_served_equals_the_local_policy(lift_image):
    """Protocol v1 (act) and v2 (plan_chunk) with robosuite's obs dict carrying two camera frames, upright
    [H, W, 3] or channel-first: the served actions are the local act()'s, bit for bit."""
    policy = lift_image
    obs = image_observations(17, seed=0)
    obs_chw = [{k: (np.ascontiguousarray(v.transpose(2, 0, 1)) if k.endswith("_image") else v) for k, v in o.items()}
               for o in obs]
    with serve(policy) as server, RemotePolicy(server.url) as remote:
        meta = remote.metadata
        assert meta["image_keys"] == ["agentview_image", "robot0_eye_in_hand_image"]
        assert meta["image_shape"] == [3, 84, 84] and meta["obs_dim"] == 9
        remote.reset(seed=21)
        got = np.stack([remote.act(o) for o in obs])
        remote.reset(seed=21)
        got_chw = np.stack([remote.act(o) for o in obs_chw])
        # an image request fits the server's limit with margin: n_obs_steps frames of both cameras
        request = packb({"id": 1, "obs": [remote.observation(o) for o in obs[:2]], "reset": True, "seed": 21})
        assert 2 * 2 * 84 * 84 * 3 < len(request) < meta["max_message_bytes"] / 10
        # protocol v2: the whole chunk, then two candidates with a known prefix
        remote.reset(seed=21)
        chunk = remote.plan_chunk(obs[0])
        prefix = chunk[0, :3]
        two = remote.plan_chunk(obs[1:3], prefix=prefix, candidates=2, delay_steps=3)
    expected = local_actions(policy, obs, seed=21)
    assert np.array_equal(got, expected) and np.array_equal(got_chw, expected)
    start = policy.config.action_start
    assert chunk.shape == (1, 16, 7) and np.array_equal(chunk[0, start : start + 8], expected[:8])
    assert two.shape == (2, 16, 7) and not np.allclose(two[0], two[1])
    np.testing.assert_allclose(two[:, :3], np.stack([prefix, prefix]), atol=1e-5)  # imposed exactly


def test_image_requests_of_several_robots_plan_in_one_batch(lift_image):
    """Three robots with their own cameras: batched image requests get each robot's unbatched chunk."""
    histories = [[image_observations(2, seed=10 * r + k) for k in range(3)] for r in range(3)]  # 3 robots, 3 requests

    def run(url):
        clients = [RemotePolicy(url) for _ in histories]
        barrier = threading.Barrier(len(clients))
        actions, timings = [[] for _ in clients], []

        def robot(r):
            barrier.wait()
            for k, steps in enumerate(histories[r]):
                reply = clients[r].infer([clients[r].observation(o) for o in steps], reset=k == 0,
                                         seed=100 + r if k == 0 else None)
                actions[r].append(reply["action"])
                timings.append(reply["timing"])

        threads = [threading.Thread(target=robot, args=(r,)) for r in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for c in clients:
            c.close()
        return [np.stack(a) for a in actions], timings

    with serve(lift_image, max_batch=3, max_wait_ms=2000) as server:
        batched, timing_on = run(server.url)
    with serve(lift_image, max_batch=3, max_wait_ms=0) as server:
        alone, timing_off = run(server.url)
    assert max(t["batch"] for t in timing_on) == 3 and {t["batch"] for t in timing_off} == {1}
    for r in range(3):
        assert batched[r].shape == (3, 8, 7)
        np.testing.assert_allclose(batched[r], alone[r], atol=1e-5, rtol=0)
    assert not np.allclose(batched[0], batched[1], atol=1e-2)


def test_bad_image_input_is_refused_by_name_and_oversize_requests_never_leave_the_client(lift_image):
    from websockets.exceptions import ConnectionClosed

    good = image_observations(3, seed=5)
    compact = [{k: v for k, v in o.items() if k != "object-state"} for o in good]
    cases = [
        ({k: v for k, v in compact[0].items() if k != "agentview_image"}, "lacks camera 'agentview_image'"),
        ({**compact[0], "agentview_image": compact[0]["agentview_image"].astype(np.int8)}, "must be uint8"),
        ({**compact[0], "agentview_image": compact[0]["agentview_image"][:80]}, "[3, 84, 84]"),
        (np.zeros(9, np.float32), "pass the observation dict"),
    ]
    limit = 64 << 10  # one step of two 84x84 cameras (42 KB) fits, two do not
    with serve(lift_image, max_message_bytes=limit) as server:
        ws, meta = raw_connect(server.url)
        assert meta["max_message_bytes"] == limit
        for k, (obs, needle) in enumerate(cases):
            ws.send(packb({"id": k, "obs": obs}))
            reply = unpackb(ws.recv(timeout=10))
            assert reply["type"] == "error" and reply["code"] == "bad_request" and needle in reply["error"], (k, reply)
            ws.send(packb({"id": f"good-{k}", "obs": compact[0], "reset": True, "seed": 1}))
            assert unpackb(ws.recv(timeout=10))["action"].shape == (8, 7)
        ws.send(packb({"id": 99, "obs": compact[:2]}))  # over the limit: closed with 1009
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1009
        with RemotePolicy(server.url) as remote:
            with pytest.raises(ValueError, match="lacks camera"):  # checked before sending, as act() does
                remote.act({k: v for k, v in good[0].items() if k != "robot0_eye_in_hand_image"})
            with pytest.raises(ValueError, match=r"over the server's max_message_bytes 65536"):
                remote.infer([remote.observation(o) for o in good[:2]], reset=True, seed=1)
            first = remote.infer([remote.observation(good[0])], reset=True, seed=1)  # the connection is still open
            assert first["action"].shape == (8, 7)
    assert server.server.stats.errors == len(cases)


@pytest.mark.slow
def test_image_episode_through_the_server_reproduces_the_in_process_runner(lift_image, tmp_path):
    """A rendered Lift episode (both cameras) through the server and the eval's server executor."""
    record, local, remote_actions, local_actions, summary = served_and_local_episode(
        lift_image, "lift_image", 100001, 10, eval_steps=3, out=tmp_path)
    assert record["error"] is None and record["length"] == local["length"] == 10 and len(record["calls"]) == 2
    assert np.array_equal(remote_actions, local_actions)
    run = summary["runs"]["ddim@server"]
    assert run["n_episodes"] == 1 and run["n_calls"] == 1 and run["server_latency_ms"]["p50"] > 0


def test_fast_path_image_server_prepares_the_encoder_for_every_batch_size(lift_image):
    """fast_path on: the encoder gets a backend per batch size 1..max_batch before the server listens
    (beside the denoiser's), and the served image chunks equal the plain path's."""
    import copy

    histories = [[image_observations(2, seed=40 + 10 * r + k) for k in range(2)] for r in range(2)]

    def run(url):
        clients = [RemotePolicy(url) for _ in histories]
        out = [[c.infer([c.observation(o) for o in steps], reset=k == 0, seed=200 + r if k == 0 else None)["action"]
                for k, steps in enumerate(histories[r])] for r, c in enumerate(clients)]
        for c in clients:
            c.close()
        return np.array(out)

    fast = copy.copy(lift_image)  # a shallow copy shares the weights; only its fast path differs
    fast.enable_fast_path(True, backend="trace")
    with serve(lift_image, max_batch=2, max_wait_ms=0) as server:
        plain = run(server.url)
    with serve(fast, max_batch=2, max_wait_ms=1) as server:  # batching on: sizes 1 and 2 prepared
        backends = server.server.metadata["fast_path"]["backends"]
        assert {k: v for k, v in backends.items() if k.startswith("encoder")} == {"encoder B1": "trace",
                                                                                  "encoder B2": "trace"}
        prepared = dict(fast.fast_path.stats.warmup_s)
        got = run(server.url)
        assert dict(fast.fast_path.stats.warmup_s) == prepared  # no request met an unprepared shape
    np.testing.assert_allclose(got, plain, atol=1e-5, rtol=0)
