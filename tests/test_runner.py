"""PolicyRunner.run_batch on real robosuite vector envs: env-to-row mapping, episodes ending at different
steps, padded seeds, the shadow deviation, and failure containment (simulator error, non-finite
observation, failing policy call).

``RowPolicy`` stands in for the policy where the point is the runner's bookkeeping: each row's plan is
an elementwise function of that row's own observation and x_T (bit for bit the same whatever the batch),
and every call is recorded. Each episode's x_T comes from its own seed's generator, so the rows of a
call can be traced back to their episode without trusting the runner's own mapping.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from parapolicy.realtime.runner import PolicyRunner, make_vector_env, with_sampler
from policy_synthetic import tiny_config

LIFT_KEYS = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
SEEDS = [100007, 100011, 100013]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # robosuite episodes, one torch thread


class RowPolicy:
    """A deterministic stand-in: action_pred row r = f(row r's last observation, row r's x_T)."""

    def __init__(self, fail_on_call: int | None = None):
        self.config = tiny_config(obs_dim=19, obs_keys=LIFT_KEYS, env="lift")
        self.sampler = SimpleNamespace(is_stochastic=False, num_inference_steps=1)
        self.sampler_name, self.warm_start, self.device = "row", False, torch.device("cpu")
        self.fail_on_call = fail_on_call
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (obs_history [b, 2, 19], x_T [b, H, A])

    def predict_action(self, obs_history, x_T, noise=None, warm_from=None, warm_shift=None, **extra):
        self.calls.append((obs_history.clone(), x_T.clone()))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("planner exploded")
        drive = torch.tanh(3 * obs_history[:, -1, :7])[:, None, :]  # [b, 1, 7]
        action_pred = (0.5 * drive + 0.4 * torch.tanh(x_T)).clamp(-1, 1)  # [b, H, 7]
        start, n = self.config.action_start, self.config.n_action_steps
        return {"action": action_pred[:, start : start + n], "action_pred": action_pred, "sample": x_T.clone(),
                "rounds": 1, "model_evals": 1, "converged": True}


def x_T_draws(seed: int, count: int, cfg) -> list[torch.Tensor]:
    """The x_T of an episode's calls 1..count (deterministic sampler: one draw per call)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((cfg.horizon, cfg.action_dim), generator=gen) for _ in range(count)]


def observations_by_episode(policy: RowPolicy, seeds: list[int]) -> dict[int, list[torch.Tensor]]:
    """Per seed, the observation windows its calls were planned from, found by matching each row's x_T
    against the seed's own draws (independently of the runner's row bookkeeping)."""
    cfg = policy.config
    draws = {s: x_T_draws(s, 8, cfg) for s in seeds}
    seen: dict[int, list[torch.Tensor]] = {s: [] for s in seeds}
    for history, x_T in policy.calls:
        for row in range(len(x_T)):
            owners = [s for s in seeds if len(seen[s]) < 8 and torch.equal(x_T[row], draws[s][len(seen[s])])]
            assert len(owners) == 1, f"row {row} of a call has no (or several) owning episode"
            seen[owners[0]].append(history[row])
    return seen


def lift_vector_env(lengths: list[int], asynchronous: bool) -> gym.vector.VectorEnv:
    """Like ``make_vector_env("lift", ...)``, with each env's own max_episode_steps."""
    from parapolicy.envs.robosuite_env import RobosuiteEnv

    fns = [partial(RobosuiteEnv, task="lift", max_episode_steps=n) for n in lengths]
    mode = gym.vector.AutoresetMode.DISABLED
    cls = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    return cls(fns, autoreset_mode=mode)


# ------------------------------------------------------------------------------------ n_envs > 1
def test_async_vector_env_rows_end_at_their_own_steps_and_match_single_env_runs():
    """Three episodes on four worker envs (the fourth padded) with 9, 14 and 20 steps: every episode
    sees, call by call, the observations it sees when run alone, so each robot got its own actions."""
    lengths = [9, 14, 20, 5]
    policy = RowPolicy()
    envs = lift_vector_env(lengths, asynchronous=True)
    try:
        finished: list[int] = []
        records = PolicyRunner(envs, policy).run_batch(SEEDS, on_episode=lambda i, rec: finished.append(i))
    finally:
        envs.close()
    assert [r["seed"] for r in records] == SEEDS
    assert [r["length"] for r in records] == lengths[:3] and finished == [0, 1, 2]
    assert all(r["error"] is None for r in records)
    # calls at steps 0 and 8 for all three, at 16 for the 20-step one only; the padded env never planned
    assert [len(r["calls"]) for r in records] == [2, 2, 3]
    assert [c["batch"] for c in records[2]["calls"]] == [3, 3, 1]
    assert [len(x) for _, x in policy.calls] == [3, 3, 1]
    batched = observations_by_episode(policy, SEEDS)

    for seed, length, rec in zip(SEEDS, lengths, records):
        alone_policy = RowPolicy()
        env = make_vector_env("lift", 1, max_episode_steps=length)
        try:
            (alone,) = PolicyRunner(env, alone_policy).run_batch([seed])
        finally:
            env.close()
        assert alone["length"] == rec["length"] and len(alone["calls"]) == len(rec["calls"])
        solo = observations_by_episode(alone_policy, [seed])[seed]
        assert len(solo) == len(batched[seed])
        for k, (a, b) in enumerate(zip(solo, batched[seed])):
            assert torch.equal(a, b), f"seed {seed}, call {k}: the batched episode saw other observations"


# ------------------------------------------------------------------------------------------ shadow
@pytest.fixture(scope="module")
def lift_policy():
    from parapolicy.policy import DiffusionPolicy

    torch.manual_seed(0)
    policy = DiffusionPolicy(tiny_config(obs_dim=19, obs_keys=LIFT_KEYS, env="lift", num_inference_steps=8))
    policy.normalizer.obs.set_stats(-torch.ones(19), torch.ones(19) * 2)
    policy.normalizer.action.set_stats(-torch.ones(7), torch.ones(7))
    return policy.eval()


def shadow_deviations(policy, shadow, seeds=(100003,), steps=16) -> list[float]:
    env = make_vector_env("lift", 1, max_episode_steps=steps)
    try:
        records = PolicyRunner(env, policy, shadow=shadow).run_batch(list(seeds))
    finally:
        env.close()
    return [c["shadow_deviation"] for r in records for c in r["calls"]]


def test_shadow_sees_the_same_noise_and_history(lift_policy):
    """Same sampler as shadow: deviation exactly 0. DDPM twin of a tight Picard: within float rounding.
    DDIM twin: a real, large deviation (the number measures something)."""
    policy = with_sampler(lift_policy, "paraddpm", 8, window=4, tolerance=1e-6)
    same = shadow_deviations(policy, with_sampler(policy, "paraddpm", 8, window=4, tolerance=1e-6))
    assert len(same) == 2 and same == [0.0, 0.0]
    twin = shadow_deviations(policy, with_sampler(policy, "ddpm", 8))
    assert len(twin) == 2 and max(twin) < 2e-5
    other = shadow_deviations(policy, with_sampler(policy, "ddim", 8))
    assert min(other) > 1e-2


# ------------------------------------------------------------------------------ failure containment
def failing_lift_env(max_episode_steps: int, fail_at: int | None = None, failure: str = "raise"):
    """A Lift env whose simulator step fails at its ``fail_at``-th step: raises, or returns a NaN
    observation (built in the worker process, so the failure happens where it would)."""
    from parapolicy.envs.robosuite_env import RobosuiteEnv

    env = RobosuiteEnv(task="lift", max_episode_steps=max_episode_steps)
    inner, count = env.robosuite_env, {"n": 0}
    original = inner.step

    def step(action):
        count["n"] += 1
        if count["n"] != fail_at:
            return original(action)
        if failure == "raise":
            raise RuntimeError("MuJoCo went unstable")
        obs, reward, done, info = original(action)
        return {**obs, "robot0_eef_pos": np.full(3, np.nan)}, reward, done, info

    inner.step = step
    return env


def two_lift_workers(**first) -> gym.vector.VectorEnv:
    fns = [partial(failing_lift_env, 20, **first), partial(failing_lift_env, 20)]
    return gym.vector.AsyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.DISABLED)


@pytest.mark.parametrize("failure, message", [("raise", "RuntimeError: MuJoCo went unstable"),
                                              ("nan", "FloatingPointError: non-finite observation")])
def test_a_failing_simulator_ends_its_episode_only(failure, message):
    envs = two_lift_workers(fail_at=5, failure=failure)
    policy = RowPolicy()
    try:
        records = PolicyRunner(envs, policy).run_batch(SEEDS[:2])
    finally:
        envs.close()
    broken, healthy = records
    assert broken["length"] == 5 and message in broken["error"] and not broken["success"]
    assert healthy["length"] == 20 and healthy["error"] is None
    assert [len(x) for _, x in policy.calls] == [2, 1, 1]  # steps 0 (both), 8 and 16 (the healthy one)


def test_a_failing_policy_call_fails_its_episodes_not_the_run():
    envs = two_lift_workers()
    policy = RowPolicy(fail_on_call=2)
    try:
        runner = PolicyRunner(envs, policy)
        failed = runner.run_batch(SEEDS[:2])
        again = runner.run_batch(SEEDS[:2])  # the same runner and envs go on
    finally:
        envs.close()
    for rec in failed:
        assert rec["length"] == 8 and rec["error"] == "policy: RuntimeError: planner exploded"
        assert len(rec["calls"]) == 1 and "wall_s" in rec
    assert [r["length"] for r in again] == [20, 20] and all(r["error"] is None for r in again)
