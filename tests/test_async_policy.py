"""AsyncPolicy: a 20 Hz loop that never waits for a slow planner, locally and through a loopback server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from parapolicy.realtime import AsyncPolicy
from parapolicy.realtime.planner import draw_noise
from parapolicy.serving.client import RemotePolicy
from parapolicy.serving.server import PolicyServer, ServerThread
from policy_synthetic import tiny_policy

H, A, START, S = 16, 3, 1, 8


class Config:
    horizon, action_dim, action_start, n_obs_steps, n_action_steps = H, A, START, 2, S
    obs_keys, obs_dim = ["state"], 2  # the fake envs' observation: 2 numbers


class SlowPlanner:
    """A policy whose plans take ``plan_s`` (sleeping, as a GPU call does: the GIL is free meanwhile).
    Chunk c has action[j] = (c, j, +1); ``fail_at`` raises on that call; ``threads`` records who planned."""

    config = Config()

    class sampler:  # the planner's noise draws read these
        num_inference_steps, is_stochastic = 2, False

    def __init__(self, plan_s: float, fail_at: int | None = None):
        self.plan_s, self.fail_at, self.calls, self.threads, self.kwargs = plan_s, fail_at, 0, [], []

    def predict_action(self, obs_history, **kwargs):
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


def _image_obs(policy, rng):
    """A robosuite-style obs dict for ``tiny_image_policy``: random proprio in range, random upright frames."""
    low, high = policy.normalizer.obs.min.numpy(), policy.normalizer.obs.max.numpy()
    flat = low + rng.random(low.shape).astype(np.float32) * (high - low)
    obs = {"robot0_eef_pos": flat[:3], "robot0_eef_quat": flat[3:7], "robot0_gripper_qpos": flat[7:9]}
    for key in policy.config.image_keys:
        obs[key] = rng.integers(0, 256, size=(84, 84, 3), dtype=np.uint8)
    return obs


class PlanRecorder:
    """Wraps a real policy: records what each predict_action call was given, then plans with it."""

    def __init__(self, policy):
        self.policy, self.config, self.normalizer, self.calls = policy, policy.config, policy.normalizer, []
        self.sampler, self.warm_start = policy.sampler, policy.warm_start

    def predict_action(self, obs_history, **kwargs):
        self.calls.append({"obs": obs_history.clone(), "x_T": kwargs["x_T"].clone(),
                           "images": {k: v.clone() for k, v in kwargs.get("images", {}).items()}})
        plan = self.policy.predict_action(obs_history, **kwargs)
        self.calls[-1]["chunk"] = plan["action_pred"].clone()
        return plan


@pytest.mark.parametrize("transition", ["naive", "forecast"])
def test_image_policy_plans_from_the_frames_of_its_window(one_thread, transition):
    """An image policy in the non-blocking loop: every plan sees the camera frames of the last n_obs_steps
    act() calls (not extrapolated, even under forecast) beside the low-dim window, and the first action is
    that of the policy's own plan for the first observation."""
    from policy_synthetic import tiny_image_policy

    policy = tiny_image_policy()
    recorder = PlanRecorder(policy)
    rng = np.random.default_rng(0)
    sent = []
    with AsyncPolicy(recorder, control_hz=50, transition=transition, execution_horizon=2, seed=4) as fast:
        for t in range(12):
            obs = _image_obs(policy, rng)
            sent.append(obs)
            action = fast.act(obs)
            if t == 0:
                first = action
            time.sleep(0.01)
    assert len(recorder.calls) >= 3
    cfg = policy.config
    flats = [policy.flat_observation(o) for o in sent]
    for n, call in enumerate(recorder.calls):
        images = call["images"]
        assert set(images) == set(cfg.image_keys)
        # which steps' frames: match each frame of the window to a sent observation
        for key in cfg.image_keys:
            window = images[key][0].numpy()
            assert window.shape == (cfg.n_obs_steps, 3, 84, 84) and window.dtype == np.uint8
            steps = [next(i for i, o in enumerate(sent) if np.array_equal(o[key].transpose(2, 0, 1), frame))
                     for frame in window]
            if n == 0:
                assert steps == [0] * cfg.n_obs_steps  # the first window repeats step 0
            else:  # consecutive steps, new ones (a plan starts after execution_horizon more act() calls)
                assert steps == list(range(steps[-1] - cfg.n_obs_steps + 1, steps[-1] + 1)) and steps[-1] >= 2 * n
            if transition == "naive":  # the low-dim window is of the same steps
                rows = call["obs"][0].numpy()
                assert [next(i for i, f in enumerate(flats) if np.array_equal(f, r)) for r in rows] == steps
    # the first plan, replayed directly: frames and proprio of step 0 (repeated), the seeded generator's
    # draws in the planner's order (parapolicy.realtime.planner, as the runner's)
    history = torch.from_numpy(np.stack([policy.flat_observation(sent[0])] * cfg.n_obs_steps))[None]
    frames = {key: torch.from_numpy(np.stack([sent[0][key].transpose(2, 0, 1)] * cfg.n_obs_steps))[None]
              for key in cfg.image_keys}
    x_T, noise = draw_noise(policy, [torch.Generator().manual_seed(4)])
    replay = policy.predict_action(history, x_T=x_T, noise=noise, images=frames)
    np.testing.assert_allclose(first, replay["action_pred"][0, cfg.n_obs_steps - 1].numpy(), atol=1e-6)
    # the frames matter: other pixels give another plan
    other = {key: torch.zeros_like(v) for key, v in frames.items()}
    moved = policy.predict_action(history, x_T=x_T, noise=noise, images=other)
    assert not np.allclose(moved["action_pred"].numpy(), replay["action_pred"].numpy(), atol=1e-4)


def test_image_policy_async_through_a_loopback_server(one_thread):
    """AsyncPolicy over RemotePolicy with an image policy: frames travel, and the first action equals the
    in-process AsyncPolicy's for the same seed."""
    from policy_synthetic import tiny_image_policy

    policy = tiny_image_policy()
    rng = np.random.default_rng(1)
    observations = [_image_obs(policy, rng) for _ in range(16)]
    with AsyncPolicy(policy, control_hz=50, transition="forecast", seed=7) as local:
        local_first = local.act(observations[0])
    with ServerThread(PolicyServer(policy, "127.0.0.1", 0, max_batch=1)) as server:
        remote = RemotePolicy(server.url)
        assert remote.image_keys == list(policy.config.image_keys)
        sent_windows = []
        plan_chunk = remote.plan_chunk

        def recording_plan_chunk(window, **kwargs):
            sent_windows.append(window)
            return plan_chunk(window, **kwargs)

        remote.plan_chunk = recording_plan_chunk
        with AsyncPolicy(remote, control_hz=50, transition="naive", execution_horizon=2, seed=7) as fast:
            actions = []
            for obs in observations:
                actions.append(fast.act(obs))
                time.sleep(0.02)
            assert fast.stats["plans"] >= 3
        remote.close()
    np.testing.assert_allclose(actions[0], local_first, atol=1e-5)
    assert np.isfinite(np.stack(actions)).all()
    # each request carries whole steps: step t's proprio (split back into its keys) with step t's frames
    cfg = policy.config
    assert len(sent_windows) >= fast.stats["plans"]  # (a plan in flight at close is sent, never taken)
    for n, window in enumerate(sent_windows):
        assert len(window) == cfg.n_obs_steps
        steps = []
        for step_obs in window:
            t = next(i for i, o in enumerate(observations)
                     if np.array_equal(o[cfg.image_keys[0]].transpose(2, 0, 1), step_obs[cfg.image_keys[0]]))
            steps.append(t)
            for key in cfg.image_keys:
                np.testing.assert_array_equal(step_obs[key], observations[t][key].transpose(2, 0, 1))
            for key in cfg.obs_keys:
                np.testing.assert_array_equal(np.asarray(step_obs[key]).reshape(-1),
                                              np.asarray(observations[t][key], np.float32).reshape(-1))
        assert steps == ([0] * cfg.n_obs_steps if n == 0 else list(range(steps[-1] - cfg.n_obs_steps + 1, steps[-1] + 1)))
