"""The policy server's batching rules and its load test, on real servers (loopback, background threads).

- nobody waits when every connected robot is waiting, with fewer robots than ``max_batch``: a
  ``max_wait_ms`` of a minute would show as a minute's wait;
- a connected robot that is not waiting does hold the batch until ``max_wait_ms``;
- shutdown answers the requests in flight: the model call is held on an event, so "one planning, two
  queued" is a state the test makes, not one it hopes to catch;
- ``serve_bench``'s routing check (0 lost, 0 misrouted, first chunks replayed alone) on a small run.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from parapolicy.serving.client import RemotePolicy
from parapolicy.serving.server import PolicyServer, ServerThread
from policy_synthetic import OBS_DIM, tiny_policy


pytestmark = pytest.mark.usefixtures("one_thread")


def histories(policy, n: int, seed: int) -> np.ndarray:
    """``[n, n_obs_steps, obs_dim]`` float32 observation windows inside the normaliser's range."""
    gen = torch.Generator().manual_seed(seed)
    low, high = policy.normalizer.obs.min, policy.normalizer.obs.max
    return (low + torch.rand((n, 2, OBS_DIM), generator=gen) * (high - low)).numpy()


def ask_together(clients: list[RemotePolicy], obs: np.ndarray) -> list[dict]:
    """Every client sends one request at the same moment (a barrier); their replies, in client order."""
    barrier = threading.Barrier(len(clients))
    replies: list = [None] * len(clients)

    def ask(r: int) -> None:
        barrier.wait()
        replies[r] = clients[r].infer(obs[r], reset=True, seed=r)

    threads = [threading.Thread(target=ask, args=(r,)) for r in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return replies


# ------------------------------------------------------------------------------ nobody waits needlessly
@pytest.mark.parametrize("n_robots", [1, 2, 3])
def test_nobody_waits_when_every_connected_robot_is_waiting(n_robots):
    """max_batch 8, max_wait a minute: with 1-3 robots connected and all of them waiting, their batch
    goes at once (the whole test would take a minute per request otherwise)."""
    policy = tiny_policy(seed=1)
    policy.set_sampler("ddim", 4)
    obs = histories(policy, n_robots, seed=2)
    with ServerThread(PolicyServer(policy, "127.0.0.1", 0, max_batch=8, max_wait_ms=60_000)) as server:
        clients = [RemotePolicy(server.url, timeout_s=30) for _ in range(n_robots)]
        try:
            start = time.perf_counter()
            replies = ask_together(clients, obs)
            elapsed = time.perf_counter() - start
        finally:
            for c in clients:
                c.close()
    assert all(r is not None and r["type"] == "action" for r in replies), replies
    assert elapsed < 30, f"the batch waited for robots that were not coming ({elapsed:.1f} s)"
    # every robot was already waiting or arrived within the wait: one batch of all of them
    assert {r["timing"]["batch"] for r in replies} == {n_robots}
    assert server.server.stats.batches == 1


def test_a_connected_robot_that_is_not_waiting_holds_the_batch_until_max_wait():
    policy = tiny_policy(seed=1)
    policy.set_sampler("ddim", 4)
    obs = histories(policy, 2, seed=2)
    with ServerThread(PolicyServer(policy, "127.0.0.1", 0, max_batch=8, max_wait_ms=1500)) as server:
        idle = RemotePolicy(server.url, timeout_s=30)  # connected, never asks
        clients = [RemotePolicy(server.url, timeout_s=30) for _ in range(2)]
        try:
            replies = ask_together(clients, obs)
        finally:
            for c in [idle, *clients]:
                c.close()
    assert {r["timing"]["batch"] for r in replies} == {2}
    # the first request waited the full max_wait for the idle robot
    assert max(r["timing"]["queue_ms"] for r in replies) >= 1500 - 1


@pytest.mark.parametrize("n_robots", [2, 3])
def test_a_batch_waits_for_every_connected_robot_up_to_max_batch(n_robots):
    """Robots that ask one after another (each sends once the server holds the previous request) within
    max_wait end up in one batch, for max_batch = 2 as for more: the oldest request waits for the
    others as long as max_wait allows, not only until the next arrival."""
    policy = tiny_policy(seed=1)
    policy.set_sampler("ddim", 4)
    obs = histories(policy, n_robots, seed=2)
    srv = PolicyServer(policy, "127.0.0.1", 0, max_batch=n_robots, max_wait_ms=800)
    with ServerThread(srv) as server:
        clients = [RemotePolicy(server.url, timeout_s=30) for _ in range(n_robots)]
        replies: list = [None] * n_robots

        def ask(r: int) -> None:
            replies[r] = clients[r].infer(obs[r], reset=True, seed=r)

        threads = []
        try:
            for r in range(n_robots):
                threads.append(threading.Thread(target=ask, args=(r,)))
                threads[-1].start()
                deadline = time.perf_counter() + 10
                while srv._inflight < r + 1 and time.perf_counter() < deadline:  # the server holds it
                    time.sleep(0.001)
            for t in threads:
                t.join(60)
        finally:
            for c in clients:
                c.close()
    assert all(reply is not None for reply in replies)
    assert [reply["timing"]["batch"] for reply in replies] == [n_robots] * n_robots
    assert srv.stats.batches == 1


# ------------------------------------------------------------------------------ mixed requests in one batch
def test_requests_that_plan_differently_share_a_batch_but_not_a_model_call():
    """Four robots waiting at once (one batch): a v1 request, two candidates with a prefix, two candidates
    without, two candidates with a weighted prefix. Each kind is its own predict_action call (a call's
    options hold for all its rows), and every robot gets exactly what it gets when served alone."""
    policy = tiny_policy(seed=3)
    policy.set_sampler("ddpm", 5)
    obs = histories(policy, 4, seed=4)
    action_dim = policy.config.action_dim
    prefix = np.linspace(-0.4, 1.5, 3 * action_dim, dtype=np.float32).reshape(3, action_dim)
    options = [{}, {"chunk": True, "candidates": 2, "prefix": prefix},
               {"chunk": True, "candidates": 2},
               {"chunk": True, "candidates": 2, "prefix": prefix, "prefix_weights": np.float32([1.0, 0.5, 0.25])}]

    def ask(server, r: int, barrier=None) -> dict:
        client = RemotePolicy(server.url, timeout_s=30)
        try:
            if barrier is not None:
                barrier.wait()
            return client.infer(obs[r], reset=True, seed=10 + r, **options[r])
        finally:
            client.close()

    with ServerThread(PolicyServer(policy, "127.0.0.1", 0, max_batch=1)) as server:
        alone = [ask(server, r) for r in range(4)]
    batched = PolicyServer(policy, "127.0.0.1", 0, max_batch=4, max_wait_ms=60_000)
    batches, plan = [], batched._plan
    batched._plan = lambda batch: (batches.append(len(batch)), plan(batch))[1]
    with ServerThread(batched) as server:
        barrier, together = threading.Barrier(4), [None] * 4

        def run(r: int) -> None:
            together[r] = ask(server, r, barrier)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = server.server.stats
    assert all(reply is not None and reply["type"] == "action" for reply in together), together
    assert batches == [4]  # one batch (all four connected robots were waiting) ...
    assert stats.batches == 4 and stats.batch_sizes == [1, 1, 1, 1]  # ... planned in four calls of one row
    np.testing.assert_allclose(together[0]["action"], alone[0]["action"], atol=1e-5)
    for reply in together:  # what the call reports: DDPM-5 is sequential, 5 rounds of one evaluation
        timing = reply["timing"]
        assert (timing["batch"], timing["rounds"], timing["model_evals"], timing["converged"]) == (1, 5, 5, True)
        assert 0 < timing["plan_ms"] <= timing["server_ms"]
    for r in (1, 2, 3):
        assert np.asarray(together[r]["chunks"]).shape == (2, policy.config.horizon, action_dim)
        np.testing.assert_allclose(together[r]["chunks"], alone[r]["chunks"], atol=1e-5)
    # the options reached the model: a hard prefix is imposed exactly, a weighted one only where its weight is 1
    hard, soft = np.asarray(together[1]["chunks"]), np.asarray(together[3]["chunks"])
    np.testing.assert_allclose(hard[:, :3], np.broadcast_to(prefix, (2, 3, action_dim)), atol=1e-5)
    np.testing.assert_allclose(soft[:, 0], np.broadcast_to(prefix[0], (2, action_dim)), atol=1e-5)
    assert not np.allclose(soft[:, 1:3], np.broadcast_to(prefix[1:], (2, 2, action_dim)), atol=1e-3)


# ------------------------------------------------------------------------------ shutdown with queued work
class HeldPlanner:
    """Holds the server's model calls until ``release`` is set; counts calls that started."""

    def __init__(self, policy):
        self.release, self.started = threading.Event(), threading.Semaphore(0)
        self._plan = policy.predict_action
        policy.predict_action = self

    def __call__(self, *args, **kwargs):
        self.started.release()
        assert self.release.wait(60), "the test never released the model"
        return self._plan(*args, **kwargs)


def test_stop_answers_the_request_planning_and_the_two_queued_behind_it():
    policy = tiny_policy(seed=6)
    policy.set_sampler("ddpm", 5)
    planner = HeldPlanner(policy)
    obs = histories(policy, 3, seed=8)
    server = ServerThread(PolicyServer(policy, "127.0.0.1", 0, max_batch=1, max_wait_ms=0))
    clients = [RemotePolicy(server.url, timeout_s=60) for _ in range(3)]
    replies: list = []
    threads = [threading.Thread(target=lambda c=c, h=h: replies.append(c.infer(h, reset=True, seed=1)))
               for c, h in zip(clients, obs)]
    for t in threads:
        t.start()
    assert planner.started.acquire(timeout=60), "the first request never reached the model"
    # one request is held in the model; the other two can only queue behind it (max_batch 1)
    deadline = time.monotonic() + 60
    while server.server._inflight < 3:
        assert time.monotonic() < deadline, f"only {server.server._inflight} requests reached the server"
        time.sleep(0.005)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    deadline = time.monotonic() + 60
    while not server.server._stopping:  # stop requested and seen by the server: no new work accepted
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert not replies  # nothing answered while the model is held
    planner.release.set()
    for t in [*threads, stopper]:
        t.join(60)
    assert len(replies) == 3 and all(r["type"] == "action" for r in replies), replies
    assert server.server.stats.requests == 3 and server.server.stats.batches == 3
    for c in clients:
        c.close()


# ------------------------------------------------------------------------------------------ serve_bench
def test_serve_bench_small_run_has_no_lost_or_misrouted_replies(tmp_path):
    """3 robots x 3 requests against the shipped Square policy (DDIM-4), batching on and off: every reply
    comes back to the robot that asked, and a robot's first chunk replayed alone is the same."""
    from hydra import compose, initialize_config_module

    from parapolicy.bench.serving import run_bench

    with initialize_config_module("parapolicy.conf", version_base=None):
        cfg = compose("serve_bench", overrides=[
            "samplers=[ddim]", "num_inference_steps=4", "robots=[3]", "requests_per_robot=3", "warmup=1",
            "max_wait_ms=200", "obs_source=random", "n_obs=8", "timeout_s=60"])
    result = run_bench(cfg, tmp_path)
    rows = result["rows"]
    assert [(r["batching"], r["robots"], r["requests"]) for r in rows] == [(True, 3, 9), (False, 3, 9)]
    for row in rows:
        assert row["replies"] == 9 and row["lost"] == 0 and row["misrouted"] == 0, row
        assert row["solo_dev"] < 1e-5, row  # DDIM is deterministic: batched = alone up to float rounding
    assert rows[1]["mean_batch"] == 1.0 and rows[0]["mean_batch"] >= 1.0
    assert (tmp_path / "serve_bench.json").exists()
