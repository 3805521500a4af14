"""The chunk executor: the pure schedule (``ChunkSchedule``) and its two users, the simulator's runner and
``AsyncPolicy``, which must execute the same actions for the same latencies.

The schedule is checked against definitions written out here (which position runs at step t, where a
stall starts, when a plan lands, how many positions are committed and compared); the parity test runs
one scripted latency sequence (a fake clock: each plan takes the milliseconds the script says) through
``PolicyRunner(timing="async", latency="measured")`` and through ``AsyncPolicy`` with a planner thread that
finishes exactly when the script's delay has passed, for delta and absolute-pose policies.
"""

from __future__ import annotations

import threading

import gymnasium as gym
import numpy as np
import pytest
import torch

from parapolicy.observation import pose_hold_command
from parapolicy.realtime import AsyncPolicy
from parapolicy.realtime.latency import delay_steps
from parapolicy.realtime.runner import PolicyRunner
from parapolicy.realtime.schedule import LATENCY_WINDOW, ChunkSchedule
from parapolicy.realtime.transitions import pick_candidate

H, START, S = 16, 1, 8
PERIOD = 0.05
# per plan, ms (the first plan blocks): under and over one chunk's slack, a stall (700 ms = 14 steps)
LATENCIES_MS = [30.0, 120.0, 260.0, 700.0, 90.0, 180.0, 410.0, 60.0, 230.0, 520.0, 140.0, 75.0, 300.0]
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the schedule alone
def labelled_chunk(call: int, a: int = 3) -> np.ndarray:
    chunk = np.zeros((H, a), dtype=np.float32)
    chunk[:, 0], chunk[:, 1] = call, np.arange(H)
    return chunk


HOLD = np.full(3, -7.0, dtype=np.float32)


def test_the_chunk_in_force_runs_position_t_minus_its_step_plus_start_then_stalls():
    schedule = ChunkSchedule(H, START, S, "naive")
    schedule.requested(0)
    schedule.arrived(labelled_chunk(0), 0)
    assert schedule.landing_due(0)
    schedule.land(0, HOLD)
    for t in range(H - START):  # positions start .. H - 1
        action, kind = schedule.action_at(t, HOLD)
        assert kind == "chunk" and action[1] == t + START
    action, kind = schedule.action_at(H - START, HOLD)  # the first step past the chunk's end
    assert kind == "stall" and np.array_equal(action, HOLD)


def test_a_plan_lands_at_the_later_of_its_arrival_and_its_planned_step():
    schedule = ChunkSchedule(H, START, S, "forecast")
    schedule.requested(0)
    schedule.arrived(labelled_chunk(0), 0)
    schedule.land(0, HOLD)
    assert not schedule.due(S - 1) and schedule.due(S)
    schedule.requested(S, lead=3)  # planned for step S + 3
    schedule.arrived(labelled_chunk(1), S + 1)
    assert [schedule.landing_due(t) for t in range(S, S + 5)] == [False, False, False, True, True]
    delay, _ = schedule.land(S + 3, HOLD)
    assert delay == 0 and schedule.action_at(S + 3, HOLD)[0][1] == START  # from its position start
    schedule.requested(2 * S, lead=1)
    schedule.arrived(labelled_chunk(2), 2 * S + 4)  # late: lands on arrival, 3 steps past its planned step
    assert not schedule.landing_due(2 * S + 3) and schedule.landing_due(2 * S + 4)
    delay, _ = schedule.land(2 * S + 4, HOLD)
    assert delay == 3 and schedule.action_at(2 * S + 4, HOLD)[0][1] == START + 3


def test_known_actions_and_committed_positions():
    """known[j] is what runs at the new chunk's position j (request at t, delay d): executed before t,
    then the current chunk during the d planning steps and after; start + d of them are committed."""
    schedule = ChunkSchedule(H, START, S, "prefix")
    schedule.requested(0)
    schedule.arrived(labelled_chunk(0), 0)
    schedule.land(0, HOLD)
    for t in range(S):
        schedule.record(schedule.action_at(t, HOLD)[0])
    d = 3
    known = schedule.known(S, d, HOLD)
    # position j of the new chunk is step S - START + j, i.e. position S + j of chunk 0; it lasts to H - 1
    assert [int(row[1]) for row in known] == list(range(S, H))
    assert schedule.committed(d) == START + d
    prefix, weights = schedule.prefix(known, d)
    assert len(prefix) == START + d and np.array_equal(prefix, known[: START + d]) and (weights == 1).all()


def test_bid_compares_the_candidates_over_the_committed_positions_only():
    known = np.zeros((10, 2), dtype=np.float32)
    candidates = np.zeros((3, H, 2), dtype=np.float32)
    candidates[0, 3] = 5.0  # off at position 3 only
    candidates[1, :3] = 1.0  # a little off over positions 0..2
    candidates[2, 4:] = 0.5  # off beyond position 3 only
    assert pick_candidate(candidates, known, 3) == 0  # over 0..2: candidate 0 (and 2) exact
    assert pick_candidate(candidates, known, 4) == 2  # over 0..3: candidate 0 is 5 off at 3
    assert pick_candidate(candidates, known, 0) == 0
    schedule = ChunkSchedule(H, START, S, "bid:3")
    assert schedule.pick(candidates, known, 2) == 0  # delay 2: start + 2 = 3 positions compared
    assert schedule.pick(candidates, known, 3) == 2  # delay 3: 4 positions


def test_the_delay_estimate_is_the_slowest_of_the_last_plans():
    schedule = ChunkSchedule(H, START, S, "prefix")
    assert schedule.delay_estimate(PERIOD) == 0
    for ms in [400.0, 60.0, 60.0, 60.0, 60.0]:
        schedule.note_latency(ms)
    assert schedule.delay_estimate(PERIOD) == delay_steps(400.0, PERIOD) == 8
    schedule.note_latency(110.0)  # 400 leaves the window of LATENCY_WINDOW plans
    assert LATENCY_WINDOW == 5 and schedule.delay_estimate(PERIOD) == 3


def test_hold_timing_holds_for_the_delay_then_runs_the_chunk_from_its_start():
    schedule = ChunkSchedule(H, START, S, "naive", timing="hold")
    schedule.requested(0)
    schedule.arrived(labelled_chunk(0), 0)
    schedule.land(0, HOLD)
    schedule.requested(S, hold_steps=3)
    schedule.arrived(labelled_chunk(1), S)
    assert schedule.landing_due(S)
    schedule.land(S, HOLD)
    kinds = [schedule.action_at(t, HOLD) for t in range(S, S + 5)]
    assert [k for _, k in kinds] == ["hold"] * 3 + ["chunk"] * 2
    assert [int(a[1]) for a, _ in kinds[3:]] == [START, START + 1]
    assert not schedule.due(S + 3 + S - 1) and schedule.due(S + 3 + S)


# ------------------------------------------------------------------ runner = AsyncPolicy
class ScriptedClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedPolicy:
    """Plan k takes LATENCIES_MS[k] on ``clock``; its chunk depends on the noise (x_T), the observation
    window and (call, position), so a wrong draw, window or position shows in the actions. With ``gate``,
    a plan on a background thread waits until the test releases it (when its delay has passed)."""

    warm_start = False
    device = torch.device("cpu")
    sampler_name = "scripted"

    class sampler:
        num_inference_steps, is_stochastic = 2, False

    def __init__(self, clock, absolute: bool, gate: bool):
        class Config:
            horizon, n_obs_steps, n_action_steps, action_start = H, 2, S, START
            action_space = "absolute_rot6d" if absolute else "delta"
            action_dim = 10 if absolute else 3
            obs_keys = ["robot0_eef_pos", "state"] if absolute else ["state"]
            obs_dim = 5 if absolute else 2
            image_keys = None

        self.config = Config()
        self.clock, self.calls = clock, 0
        self.gate = threading.Semaphore(0) if gate else None

    def predict_action(self, obs_history, x_T=None, noise=None, **kwargs):
        if self.gate is not None and threading.current_thread() is not threading.main_thread():
            assert self.gate.acquire(timeout=30), "the test never released this plan"
        self.clock.now += LATENCIES_MS[self.calls % len(LATENCIES_MS)] / 1e3
        b, a = x_T.shape[0], self.config.action_dim
        chunk = 0.05 * x_T.clone()
        chunk[:, :, 0] += self.calls
        chunk[:, :, 1] += torch.arange(H, dtype=torch.float32)
        chunk[:, :, 2] += obs_history[:, -1, -1:].float() * 0.01 + obs_history[:, 0, :1].float() * 0.001
        if a == 10:  # a pose: position, 6D rotation near the identity, gripper
            chunk[:, :, 3:9] += torch.tensor([1.0, 0, 0, 0, 1.0, 0])
            chunk[:, :, 9] = torch.sign(chunk[:, :, 9]) + (chunk[:, :, 9] == 0)
        self.calls += 1
        return {"action": chunk[:, START : START + S], "action_pred": chunk, "rounds": 1, "model_evals": 1,
                "converged": True, "sample": chunk}


class PoseEnv(gym.Env):
    """Counts steps; with ``absolute`` the arm goes where it is commanded (a pose env: obs dicts with the
    grip site's pose, ``info["hold_action"]``). Keeps every command it receives."""

    control_period_s = PERIOD

    def __init__(self, absolute: bool, max_steps: int = 70):
        self.absolute, self.max_steps = absolute, max_steps
        if absolute:
            self.observation_space = gym.spaces.Dict({
                "robot0_eef_pos": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
                "robot0_eef_quat_site": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
                "state": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)})
            self.action_space = gym.spaces.Box(-1e9, 1e9, (7,), np.float32)
        else:
            self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
            self.action_space = gym.spaces.Box(-1e9, 1e9, (3,), np.float32)

    def _obs(self):
        state = np.array([self.t, self.seed_value], np.float32)
        if not self.absolute:
            return state
        angle = 0.02 * self.t
        quat = np.array([0.0, 0.0, np.sin(angle / 2), np.cos(angle / 2)], np.float32)
        return {"robot0_eef_pos": self.position.astype(np.float32), "robot0_eef_quat_site": quat, "state": state}

    def _info(self):
        return {"is_success": False, **({"hold_action": pose_hold_command(self._obs(), self.gripper)}
                                        if self.absolute else {})}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.seed_value, self.actions = 0, float(seed or 0), []
        self.position, self.gripper = np.array([0.1, -0.2, 0.9]), -1.0
        return self._obs(), self._info()

    def step(self, action):
        action = np.array(action, dtype=np.float32)
        self.actions.append(action)
        self.t += 1
        if self.absolute:  # the arm follows its commands part of the way
            self.position = 0.5 * self.position + 0.5 * action[:3] + 0.001 * self.t
            self.gripper = float(action[-1])
        return self._obs(), 0.0, False, self.t >= self.max_steps, self._info()


def run_in_runner(transition: str, absolute: bool, seed: int, steps: int) -> np.ndarray:
    clock = ScriptedClock()
    policy = ScriptedPolicy(clock, absolute, gate=False)
    envs = gym.vector.SyncVectorEnv([lambda: PoseEnv(absolute, steps)], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    record = PolicyRunner(envs, policy, timing="async", latency="measured", transition=transition,
                          clock=clock).run_batch([seed])[0]
    assert record["length"] == steps
    return np.stack(envs.envs[0].actions), record


def run_in_async_policy(transition: str, absolute: bool, seed: int, steps: int) -> np.ndarray:
    """The robot loop, with plan k finishing right before the step at which its delay
    ceil(LATENCIES_MS[k] / period) has passed since its request (what a clock would do at that latency)."""
    clock = ScriptedClock()
    policy = ScriptedPolicy(clock, absolute, gate=True)
    env = PoseEnv(absolute, steps)
    obs, _ = env.reset(seed=seed)
    plans, release_at = 1, None  # plan 0 is the blocking first one
    with AsyncPolicy(policy, control_hz=1 / PERIOD, transition=transition, seed=seed, clock=clock) as robot:
        for t in range(steps):
            if release_at == t:
                policy.gate.release()
                assert robot.wait_for_plan(timeout_s=30)
                release_at = None
            action = robot.act(obs)
            if robot.last_info["requested"]:
                release_at = t + delay_steps(LATENCIES_MS[plans % len(LATENCIES_MS)], PERIOD)
                plans += 1
            obs, *_ = env.step(action)
        stats = dict(robot.stats)
        if release_at is not None:
            policy.gate.release()
    return np.stack(env.actions), stats


@pytest.mark.parametrize("absolute", [False, True], ids=["delta", "absolute_pose"])
@pytest.mark.parametrize("transition", ["naive", "forecast", "prefix", "rtc", "ensemble", "bid:3", "bid_prefix:3"])
def test_the_runner_and_async_policy_execute_the_same_actions(transition, absolute):
    """Same seed, same scripted latencies (stalls included), same transition: every command sent to the env
    is the same, holds of an absolute-pose arm included (its current pose, not the last command)."""
    steps = 70
    simulated, record = run_in_runner(transition, absolute, seed=11, steps=steps)
    robot, stats = run_in_async_policy(transition, absolute, seed=11, steps=steps)
    assert record["stall_steps"] > 0 and stats["stalls"] == record["stall_steps"]  # the script stalls
    if transition == "naive":  # the delays the script gives (forecast counts them from the planned step)
        assert stats["delay_steps"] == [c["delay_steps"] for c in record["calls"][1:len(stats["delay_steps"]) + 1]]
    np.testing.assert_array_equal(robot, simulated)
