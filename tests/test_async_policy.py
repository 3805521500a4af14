"""AsyncPolicy: a 20 Hz loop that never waits for a slow planner, locally and through a loopback server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from parapolicy.client import RemotePolicy
from parapolicy.realtime import AsyncPolicy
from parapolicy.serving.server import PolicyServer, ServerThread
from policy_synthetic import tiny_policy

H, A, START, S = 16, 3, 1, 8


class Config:
    horizon, action_dim, action_start, n_obs_steps, n_action_steps = H, A, START, 2, S


class SlowPlanner:
    """A policy whose plans take ``plan_s`` (sleeping, as a GPU call does: the GIL is free meanwhile).
    Chunk c has action[j] = (c, j, +1); ``fail_at`` raises on that call; ``threads`` records who planned."""

    config = Config()

    def __init__(self, plan_s: float, fail_at: int | None = None):
        self.plan_s, self.fail_at, self.calls, self.threads, self.kwargs = plan_s, fail_at, 0, [], []

    def _flat_obs(self, obs):
        return np.asarray(obs, dtype=np.float32).reshape(2)

    def predict_action(self, obs_history, generator=None, **kwargs):
        self.threads.append(threading.current_thread().name)
        self.kwargs.append(kwargs)
        if self.calls == self.fail_at:
            self.calls += 1
            raise RuntimeError("planner exploded")
        time.sleep(self.plan_s)
        m = obs_history.shape[0]
        chunk = torch.zeros(m, H, A)
        chunk[:, :, 0] = self.calls
        chunk[:, :, 1] = torch.arange(H, dtype=torch.float32)
        chunk[:, :, 2] = 1.0
        self.calls += 1
        return {"action_pred": chunk}


def run_loop(policy: AsyncPolicy, steps: int, hz: float = 20.0):
    """A fixed-rate loop; returns (actions, act() durations in s, last_info per step)."""
    period = 1.0 / hz
    actions, durations, infos = [], [], []
    next_tick = time.perf_counter()
    for t in range(steps):
        begin = time.perf_counter()
        actions.append(policy.act(np.array([t, 0.0])))
        durations.append(time.perf_counter() - begin)
        infos.append(dict(policy.last_info))
        next_tick += period
        time.sleep(max(0.0, next_tick - time.perf_counter()))
    return np.stack(actions), durations, infos


def test_a_slow_planner_never_blocks_the_20hz_loop():
    planner = SlowPlanner(plan_s=0.12)  # 120 ms: d = 3 steps at 20 Hz, well inside the chunk (no stalls)
    with AsyncPolicy(planner, control_hz=20, transition="naive") as policy:
        actions, durations, infos = run_loop(policy, 60)
    assert durations[0] >= 0.1  # the first plan blocks
    later = sorted(durations[1:])
    assert later[len(later) // 2] < 0.01 and later[-1] < 0.05  # act() returns at once, never a whole period
    assert policy.stats["plans"] >= 5 and policy.stats["stalls"] == 0
    assert set(planner.threads[1:]) == {"AsyncPolicy-planner"} and planner.threads[0] != "AsyncPolicy-planner"
    assert all(2 <= d <= 6 for d in policy.stats["delay_steps"])  # measured in actions consumed
    # each executed action comes from the newest chunk that had landed, at its aligned position
    calls = actions[:, 0].astype(int)
    assert (np.diff(calls) >= 0).all() and calls[-1] >= 4
    for t in range(1, 60):
        if calls[t] == calls[t - 1]:
            assert actions[t, 1] == actions[t - 1, 1] + 1  # consecutive positions within a chunk
    switches = [t for t in range(1, 60) if calls[t] != calls[t - 1]]
    for t, delay in zip(switches, policy.stats["delay_steps"]):
        assert actions[t, 1] == START + delay  # the new chunk starts at start + d: d actions dropped
        assert infos[t]["replanned"] and infos[t]["delay_steps"] == delay


def test_a_planner_slower_than_the_chunk_stalls_and_holds():
    planner = SlowPlanner(plan_s=0.6)  # 12 steps > H - start - s = 7: the robot runs out of actions
    with AsyncPolicy(planner, control_hz=20, transition="naive") as policy:
        actions, durations, infos = run_loop(policy, 40)
    stalls = [i for i, info in enumerate(infos) if info["stall"]]
    assert policy.stats["stalls"] == len(stalls) > 0
    assert all((actions[i, :2] == 0).all() and actions[i, 2] == 1.0 for i in stalls)  # hold: gripper kept
    assert sorted(durations[1:])[-1] < 0.1


def test_planner_errors_surface_at_the_next_act_and_close_stops_the_thread():
    planner = SlowPlanner(plan_s=0.01, fail_at=1)
    policy = AsyncPolicy(planner, control_hz=100, transition="naive")
    with pytest.raises(RuntimeError, match="planner exploded"):
        run_loop(policy, 40, hz=100)
    policy.close()
    assert not policy._thread.is_alive()
    with AsyncPolicy(SlowPlanner(0.01), control_hz=100) as other:
        other.act(np.zeros(2))
    assert not other._thread.is_alive()


def test_prefix_transition_sends_the_committed_actions():
    planner = SlowPlanner(plan_s=0.12)
    with AsyncPolicy(planner, control_hz=20, transition="prefix") as policy:
        run_loop(policy, 30)
    assert planner.kwargs[1]["prefix"].shape[1] == START  # no latency measured yet: only the past is known
    sent = planner.kwargs[2]["prefix"][0].numpy()
    # the third plan (step 16) knows the second took ~120 ms (3 steps at 20 Hz): its positions 0..3 are the
    # actions chunk 1 (requested at step 8) runs at steps 15..18, i.e. chunk 1's positions 8..11
    assert (sent[:, 0] == 1).all() and [int(v) for v in sent[:, 1]] == list(range(8, 8 + len(sent)))
    assert START + 3 <= len(sent) <= START + 6


def test_bad_arguments():
    with pytest.raises(ValueError, match="control_hz"):
        AsyncPolicy(SlowPlanner(0.0), control_hz=0)
    with pytest.raises(ValueError, match="execution_horizon"):
        AsyncPolicy(SlowPlanner(0.0), execution_horizon=16)
    with pytest.raises(ValueError, match="transition"):
        AsyncPolicy(SlowPlanner(0.0), transition="teleport")


# ------------------------------------------------------------------ through a loopback server (protocol v2)
@pytest.mark.parametrize("transition", ["forecast", "bid_prefix:4"])
def test_async_policy_through_a_loopback_server(one_thread, transition):
    policy = tiny_policy()
    with ServerThread(PolicyServer(policy, "127.0.0.1", 0, max_batch=2)) as server:
        remote = RemotePolicy(server.url)
        assert 2 in remote.metadata["protocols"] and remote.metadata["protocol"] == 1
        with AsyncPolicy(remote, control_hz=50, transition=transition, seed=3) as fast:
            low, high = policy.normalizer.obs.min.numpy(), policy.normalizer.obs.max.numpy()
            rng = np.random.default_rng(0)
            for _ in range(30):
                action = fast.act(low + rng.random(low.shape) * (high - low))
                assert action.shape == (policy.config.action_dim,) and np.isfinite(action).all()
                time.sleep(0.02)
            assert fast.stats["plans"] >= 2
        remote.close()


def test_protocol_v2_chunks_prefix_and_v1_still_served(one_thread):
    """A v2 chunk request returns whole chunks with the prefix imposed; a v1 request is answered as before."""
    policy = tiny_policy()
    cfg = policy.config
    obs = policy.normalizer.obs.min.numpy() * 0.5 + policy.normalizer.obs.max.numpy() * 0.5
    prefix = np.full((3, cfg.action_dim), 0.25, dtype=np.float32)
    with ServerThread(PolicyServer(policy, "127.0.0.1", 0, max_batch=1)) as server:
        remote = RemotePolicy(server.url)
        remote.reset(seed=5)
        chunks = remote.plan_chunk(obs[None], prefix=prefix, candidates=3, delay_steps=2)
        assert chunks.shape == (3, cfg.horizon, cfg.action_dim)
        np.testing.assert_allclose(chunks[:, :3], np.broadcast_to(prefix, (3, 3, cfg.action_dim)), atol=1e-5)
        assert not np.allclose(chunks[0], chunks[1])  # candidates differ (their own noise)
        remote.reset(seed=5)
        v1 = remote.infer(obs, reset=True, seed=5)
        assert v1["action"].shape == (cfg.n_action_steps, cfg.action_dim) and "chunks" not in v1
        # the same robot seed and no v2 keys: exactly the in-process plan for that seed
        from parapolicy.runner import draw_noise

        x_T, noise = draw_noise(policy, [torch.Generator().manual_seed(5)])
        local = policy.predict_action(torch.from_numpy(np.stack([obs, obs]))[None], x_T=x_T, noise=noise)
        np.testing.assert_allclose(v1["action"], local["action"][0].numpy(), atol=1e-5)
        for bad, message in (({"candidates": 2}, "chunk"), ({"prefix": [[1.0] * (cfg.action_dim + 1)], "chunk": True}, "prefix"),
                             ({"prefix_weights": [1.0]}, "prefix"), ({"delay_steps": -1}, "delay_steps")):
            with pytest.raises(ValueError, match=message):
                remote.infer(obs, **bad)
        remote.close()


def test_forecast_chunks_start_at_their_planned_step():
    """transition=forecast: the planner sees the history extrapolated by the delay estimate, and the chunk
    takes over no earlier than the step it was planned for, from its position start + (lateness)."""
    planner = SlowPlanner(plan_s=0.12)
    with AsyncPolicy(planner, control_hz=20, transition="forecast") as policy:
        actions, durations, infos = run_loop(policy, 60)
    calls = actions[:, 0].astype(int)
    switches = [t for t in range(1, 60) if calls[t] != calls[t - 1]]
    assert len(switches) >= 4
    for t in switches:
        assert START <= actions[t, 1] <= START + 6  # never a position before start (no action for the past)
    assert policy.stats["stalls"] == 0
