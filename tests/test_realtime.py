"""Real-time execution: latency in control steps, chunk transitions, stall accounting, prefix constraints.

The runner's bookkeeping is checked against an independent reference on a fake env whose policy writes
(call, position) into every action, so each executed action names the chunk and position it came from.
Prefix constraints are checked where they matter most: a parallel sampler with a constraint converges to
its sequential twin with the same constraint (float64, tau -> 0).
"""

from __future__ import annotations

import json
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

from parapolicy.realtime.latency import LatencyModel, delay_steps, read_profile
from parapolicy.realtime.transitions import Transition, forecast_history, pick_candidate, prefix_for, rtc_weights
from parapolicy.realtime.runner import PolicyRunner
from parapolicy.samplers import make_sampler
from parapolicy.samplers.constraints import PrefixConstraint
from test_samplers import POLICY, inputs, net_denoiser, rel_err

H, A, START, S = 16, 3, 1, 8  # horizon, action dim, action_start (n_obs_steps 2), n_action_steps
PERIOD = 0.05
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ fakes
class CountingEnv(gym.Env):
    """Observations count steps; ``actions`` keeps every action received. Never ends on its own."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1e9, 1e9, (A,), np.float32)
    control_period_s = PERIOD

    def __init__(self, max_steps: int = 60):
        self.max_steps, self.actions, self.t = max_steps, [], 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.actions, self.t = [], 0
        return np.array([0.0, seed or 0], np.float32), {}

    def step(self, action):
        self.actions.append(np.array(action, dtype=np.float32))
        self.t += 1
        return (np.array([self.t, 0.0], np.float32), 0.0, False, self.t >= self.max_steps,
                {"is_success": False})


class Config:
    horizon, action_dim, action_start, n_obs_steps, n_action_steps = H, A, START, 2, S
    obs_keys, obs_dim = ["state"], 2  # the fake envs' observation: 2 numbers


class LabelledPolicy:
    """Chunk of call c: action[j] = (c, j, gripper) with gripper +1; records the arguments it was given."""

    config = Config()
    warm_start = False
    device = torch.device("cpu")
    sampler_name = "fake"

    class sampler:  # draw_noise reads these
        num_inference_steps, is_stochastic = 2, False

    def __init__(self):
        self.calls, self.kwargs, self.histories = 0, [], []

    def predict_action(self, obs_history, x_T=None, noise=None, **kwargs):
        self.kwargs.append(kwargs)
        self.histories.append(obs_history.numpy().copy())
        b = obs_history.shape[0]
        chunk = torch.zeros(b, H, A)
        chunk[:, :, 0] = self.calls
        chunk[:, :, 1] = torch.arange(H, dtype=torch.float32)
        chunk[:, :, 2] = 1.0
        self.calls += 1
        return {"action": chunk[:, START : START + S], "action_pred": chunk, "rounds": 1, "model_evals": 1,
                "converged": True, "sample": chunk}


def vector_env(max_steps=60):
    return gym.vector.SyncVectorEnv([lambda: CountingEnv(max_steps)],
                                    autoreset_mode=gym.vector.AutoresetMode.DISABLED)


def reference_schedule(steps: int, d: int, s: int = S, hold: bool = False):
    """What each step executes, by the definition in the issue: [(call, position) or "hold"/"stall"].

    Calls are requested at r_0 = 0 (blocking), then every max(s, d) steps (async: the new chunk takes over
    d steps after its request, from position start + d) or, for hold, d steps of holding then s steps.
    """
    out, t, call = [], 0, 0
    current = (0, 0)  # (call, request step it counts positions from)
    next_request, landing = s, None
    while t < steps:
        if landing is not None and t >= landing[0]:
            current, landing = landing[1], None
        if landing is None and t >= next_request:
            call += 1
            if hold:
                landing = (t, (call, t + d))
                next_request = t + d + s
            else:
                landing = (t + d, (call, t))
                next_request = t + max(s, d)
            if t >= landing[0]:
                current, landing = landing[1], None
        if hold and current[1] > t:
            out.append("hold")
        else:
            j = t - current[1] + START
            out.append((current[0], j) if j < H else "stall")
        t += 1
    return out


def labels_of(env, hold_kinds: list) -> list:
    """(call, position) of every chunk action; holds and stalls as the runner counted them."""
    out = []
    for a, kind in zip(env.actions, hold_kinds):
        out.append(kind if kind in ("hold", "stall") else (int(round(a[0])), int(round(a[1]))))
    return out


def run_fake(timing, latency, steps=60, transition="naive", execution_horizon=None):
    envs = vector_env(steps)
    policy = LabelledPolicy()
    runner = PolicyRunner(envs, policy, timing=timing, latency=latency, transition=transition,
                          execution_horizon=execution_horizon)
    record = runner.run_batch([7])[0]
    env = envs.envs[0]
    return record, env, policy


def kinds_from_reference(reference):
    return [r if isinstance(r, str) else "chunk" for r in reference]


# ------------------------------------------------------------------ latency
def test_delay_steps_is_the_ceiling_of_latency_over_the_period():
    assert delay_steps(0, PERIOD) == 0
    assert delay_steps(1, PERIOD) == 1
    assert delay_steps(50, PERIOD) == 1
    assert delay_steps(100, PERIOD) == 2  # not 3: float error in 100 / 50 must not round up
    assert delay_steps(100.01, PERIOD) == 3
    assert delay_steps(450, PERIOD) == 9
    with pytest.raises(ValueError, match="latency"):
        delay_steps(-1, PERIOD)


@pytest.mark.parametrize("spec, kind, ms", [("measured", "measured", None), (0, "fixed", 0.0), ("200", "fixed", 200.0),
                                            ("150ms", "fixed", 150.0), (None, "measured", None)])
def test_latency_specs(spec, kind, ms):
    model = LatencyModel.parse(spec)
    assert model.kind == kind
    assert model.planned_ms(None) == ms


@pytest.mark.parametrize("spec", ["fast", "-5", "profile:/nonexistent.json", "nan"])
def test_bad_latency_specs_raise(spec):
    with pytest.raises((ValueError, FileNotFoundError)):
        LatencyModel.parse(spec)


def test_latency_profiles_of_every_kind(tmp_path):
    profile = tmp_path / "latency_profile.json"
    profile.write_text(json.dumps({"device": "H100", "runs": {"ddpm": {"latency_ms": [10.0, 12.0]},
                                                              "paraddpm": {"latency_ms": [3.0]}}}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"samplers": [{"label": "ddim-10", "batch": 1, "latencies_ms": [5.0, 6.0]},
                                              {"label": "ddim-10", "batch": 8, "latencies_ms": [50.0]}]}))
    episodes = tmp_path / "episodes.jsonl"
    episodes.write_text("".join(json.dumps({"run": "ddpm", "calls": [{"latency_ms": v}]}) + "\n" for v in (7.0, 9.0)))
    assert read_profile(profile) == {"ddpm": [10.0, 12.0], "paraddpm": [3.0]}
    assert read_profile(bench) == {"ddim-10": [5.0, 6.0]}  # batch 1 rows only
    assert read_profile(episodes) == {"ddpm": [7.0, 9.0]}
    summary = tmp_path / "summary.json"  # an eval's summary: its per-call latencies are in the log beside it
    summary.write_text(json.dumps({"sampler_label": "ddpm", "runs": {"ddpm": {"latency_ms": {"p50": 8.0}}}}))
    assert read_profile(summary) == {"ddpm": [7.0, 9.0]}
    model = LatencyModel.parse(f"profile:{profile}", run_label="paraddpm")
    assert model.kind == "profile" and model.samples == [3.0] and model.describe().endswith("#paraddpm")
    chosen = LatencyModel.parse(f"profile:{profile}#ddpm")
    rng_a, rng_b = chosen.generator(5), chosen.generator(5)
    assert [chosen.planned_ms(rng_a) for _ in range(20)] == [chosen.planned_ms(rng_b) for _ in range(20)]
    assert {chosen.planned_ms(rng_a) for _ in range(50)} == {10.0, 12.0}
    with pytest.raises(ValueError, match="ddpm, paraddpm"):
        LatencyModel.parse(f"profile:{profile}", run_label="ddim")


# ------------------------------------------------------------------ the runner's schedule
@pytest.mark.parametrize("latency_ms", [0, 50, 100, 200, 349, 400, 600, 900])
def test_async_executes_what_the_definition_says(latency_ms):
    """Every executed action is the (call, position) the definition gives; stalls are counted exactly."""
    d = delay_steps(latency_ms, PERIOD)
    record, env, policy = run_fake("async", latency_ms)
    reference = reference_schedule(60, d)
    kinds = kinds_from_reference(reference)
    assert labels_of(env, kinds) == reference
    assert record["stall_steps"] == sum(r == "stall" for r in reference)
    assert record["hold_steps"] == 0
    assert record["length"] == 60 and record["task_time_s"] == pytest.approx(60 * PERIOD)
    calls = record["calls"]
    assert calls[0]["blocking"] and calls[0]["delay_steps"] == 0
    assert all(c["delay_steps"] == d for c in calls[1:])
    assert len(calls) == policy.calls == 1 + len([t for t in range(1, 60) if reference_requests(60, d)[t]])
    for a, kind in zip(env.actions, kinds):  # a stall is the hold command: no arm motion, gripper kept
        if kind == "stall":
            assert (a[:2] == 0).all() and a[2] == 1.0


def reference_requests(steps, d, s=S):
    requested = [False] * steps
    t = s
    while t < steps:
        requested[t] = True
        t += max(s, d)
    return requested


def test_stalls_start_exactly_when_the_old_chunk_runs_out():
    """H = 16, s = 8, start = 1: the robot stalls from d = 8 on (start + s + d > H), never before."""
    for latency_ms, stalls in ((350, 0), (400, None)):
        record, env, _ = run_fake("async", latency_ms)
        if stalls == 0:
            assert record["stall_steps"] == 0
        else:
            assert record["stall_steps"] > 0


@pytest.mark.parametrize("latency_ms", [0, 100, 200, 450])
def test_hold_stands_still_for_d_steps_then_runs_the_chunk_from_its_start(latency_ms):
    d = delay_steps(latency_ms, PERIOD)
    record, env, _ = run_fake("hold", latency_ms)
    reference = reference_schedule(60, d, hold=True)
    assert labels_of(env, kinds_from_reference(reference)) == reference
    assert record["hold_steps"] == sum(r == "hold" for r in reference) and record["stall_steps"] == 0
    holds = [a for a, r in zip(env.actions, reference) if r == "hold"]
    assert all((a[:2] == 0).all() and a[2] == 1.0 for a in holds)  # zero arm delta, gripper as last commanded


def test_async_with_zero_latency_is_sync():
    sync_record, sync_env, _ = run_fake("sync", "measured")
    async_record, async_env, _ = run_fake("async", 0)
    assert np.array_equal(np.stack(sync_env.actions), np.stack(async_env.actions))
    assert len(sync_record["calls"]) == len(async_record["calls"])


def test_execution_horizon_sets_how_often_a_plan_starts():
    record, env, policy = run_fake("async", 100, execution_horizon=4)
    assert labels_of(env, kinds_from_reference(reference_schedule(60, 2, s=4))) == reference_schedule(60, 2, s=4)
    with pytest.raises(ValueError, match="execution_horizon"):
        PolicyRunner(vector_env(), LabelledPolicy(), timing="async", latency=0, execution_horizon=16)


def test_prefix_transition_passes_the_committed_actions():
    """transition=prefix plans each chunk knowing positions [0, start + d): executed, then to be executed."""
    record, env, policy = run_fake("async", 200, transition="prefix")  # d = 4
    second = policy.kwargs[1]  # requested at t = 8 by call 1
    prefix = second["prefix"][0].numpy()
    assert prefix.shape == (START + 4, A)
    # new position j is the step 8 - 1 + j; chunk 0 (request 0) executed those from its position 8 + j
    assert [(int(p[0]), int(p[1])) for p in prefix] == [(0, 8 + j) for j in range(START + 4)]
    assert torch.all(second["prefix_weights"] == 1)
    assert "prefix" not in policy.kwargs[0]  # the first plan has nothing to agree with


def test_rtc_transition_uses_decaying_weights():
    record, env, policy = run_fake("async", 100, transition="rtc")  # d = 2
    weights = policy.kwargs[1]["prefix_weights"][0].numpy()
    np.testing.assert_allclose(weights, rtc_weights(H, START + 2, S)[: len(weights)])
    assert (weights[: START + 2] == 1).all() and (np.diff(weights[START + 2 :]) < 0).all()


def test_ensemble_blends_old_and_new_over_the_overlap():
    _, env_naive, _ = run_fake("async", 200)
    _, env_blend, _ = run_fake("async", 200, transition="ensemble:0.5")
    # step 12: chunk 1 (requested at 8, d = 4) takes over at its position 5; chunk 0 is at its position 13
    np.testing.assert_allclose(env_naive.actions[12][:2], [1, 5])
    np.testing.assert_allclose(env_blend.actions[12][:2], [0.5 * 0 + 0.5 * 1, 0.5 * 13 + 0.5 * 5])


def test_forecast_plans_for_the_moment_the_chunk_takes_over():
    """transition=forecast: the history is extrapolated d steps at the current velocity (the fake env's
    first observation dimension counts steps, so it reads t + d), and the chunk runs from its start."""
    record, env, policy = run_fake("async", 200, transition="forecast")  # d = 4
    second = policy.histories[1][0]  # requested at step 8: observations of steps 7 and 8, seen as 11 and 12
    np.testing.assert_allclose(second[:, 0], [11.0, 12.0])
    np.testing.assert_allclose(policy.histories[0][0][:, 0], [0.0, 0.0])  # the first plan blocks: no lead
    labels = [(int(a[0]), int(a[1])) for a in env.actions]
    assert labels[11] == (0, 12) and labels[12] == (1, START)  # chunk 1 lands at 12 and starts at `start`
    assert record["stall_steps"] == 0


def test_bid_keeps_the_candidate_closest_to_the_committed_actions():
    known = np.zeros((4, 2))
    candidates = np.stack([np.full((16, 2), v) for v in (3.0, -0.5, 1.0)])
    assert pick_candidate(candidates, known, 4) == 1
    candidates[1, :4] = 9.0  # now far where it matters; only the first `committed` positions count
    assert pick_candidate(candidates, known, 4) == 2
    assert pick_candidate(candidates, known, 0) == 0


def test_transition_parsing():
    assert Transition.parse("bid:16").candidates == 16
    assert Transition.parse("bid").candidates == 8
    assert Transition.parse("ensemble").blend == pytest.approx(0.3)
    assert Transition.parse("prefix").prefix == "hard" and Transition.parse("rtc").prefix == "soft"
    for bad in ("blend", "bid:0", "ensemble:2", "prefix:3"):
        with pytest.raises(ValueError):
            Transition.parse(bad)
    with pytest.raises(ValueError, match="timing=async"):
        PolicyRunner(vector_env(), LabelledPolicy(), timing="sync", latency=200)
    with pytest.raises(ValueError, match="timing"):
        PolicyRunner(vector_env(), LabelledPolicy(), timing="later")


def test_prefix_for_hard_and_soft():
    known = np.arange(30, dtype=np.float32).reshape(10, 3)
    prefix, weights = prefix_for(Transition.parse("prefix"), known, 3, H, S)
    assert np.array_equal(prefix, known[:3]) and np.array_equal(weights, np.ones(3))
    prefix, weights = prefix_for(Transition.parse("rtc"), known, 3, H, S)
    assert len(prefix) == len(weights) and weights[0] == 1 and weights[-1] > 0
    assert prefix_for(Transition.parse("naive"), known, 3, H, S) == (None, None)


# ------------------------------------------------------------------ constraints in the samplers
def constraint(batch=3, length=5, soft=False, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(batch, length, 2, generator=g, dtype=dtype) * 0.5
    eta = torch.randn(batch, length, 2, generator=g, dtype=dtype)
    weights = torch.ones(batch, length, dtype=dtype)
    if soft:
        weights = torch.from_numpy(rtc_weights(8, 2, 4)[:length]).to(dtype).expand(batch, -1).clone()
    from diffusers import DDPMScheduler

    return PrefixConstraint(prefix, weights, eta, DDPMScheduler.from_config(POLICY).alphas_cumprod)


PAIRS = [("ddpm", "paraddpm", 30, {}), ("ddim", "paraddim", 15, {}), ("dpmsolver", "paradpmsolver", 15, {}),
         ("ddpm", "parasrdsddpm", 30, {}), ("ddim", "parasrdsddim", 15, {}), ("ddpm", "parataaddpm", 30, {}),
         ("ddim", "parataaddim", 15, {})]


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "rtc"])
@pytest.mark.parametrize("sequential, parallel, steps, options", PAIRS, ids=[p[1] for p in PAIRS])
def test_parallel_equals_sequential_under_a_prefix_constraint(sequential, parallel, steps, options, soft):
    """float64, tau -> 0: the constrained map is a fixed function of (point, step), so Picard, SRDS and
    ParaTAA converge to the constrained sequential trajectory; the constraint really changes it."""
    seq = make_sampler(sequential, POLICY, steps)
    par = make_sampler(parallel, POLICY, steps, tolerance=1e-9, **options)
    denoise = net_denoiser(torch.float64)
    x_T, noise = inputs(steps)
    x_T, noise = x_T[..., :2], noise[..., :2]
    c = constraint(soft=soft)
    wrapped = c.wrap(denoise)
    expected = seq.sample(wrapped, x_T, noise=noise)
    out = par.sample(wrapped, x_T, noise=noise)
    assert out.converged
    assert rel_err(c.finish(out.sample), c.finish(expected.sample)) < 1e-6
    # warm start from a guess: the same fixed point
    if par.is_parallel and hasattr(par, "guess_trajectory"):
        init = par.guess_trajectory(x_T, expected.sample * 0.9, noise if par.is_stochastic else None)
        warm = par.sample(wrapped, x_T, noise=noise, init=init)
        assert rel_err(c.finish(warm.sample), c.finish(expected.sample)) < 1e-6
    free = seq.sample(denoise, x_T, noise=noise)
    assert rel_err(c.finish(expected.sample)[:, 5:], free.sample[:, 5:]) > 1e-3  # the prefix steers the rest
    if not soft:
        assert torch.equal(c.finish(expected.sample)[:, :5], c.prefix)


def test_constraint_noises_the_prefix_to_each_timestep_level():
    c = constraint()
    x = torch.randn(2, 3, 8, 2, dtype=torch.float64)
    t = torch.tensor([99, 0])
    out = c.apply(x, t)
    abar = c.alphas_cumprod.double()[t]
    for k in range(2):
        expected = abar[k].sqrt() * c.prefix + (1 - abar[k]).sqrt() * c.eta
        assert torch.allclose(out[k, :, :5], expected)
    assert torch.equal(out[:, :, 5:], x[:, :, 5:]) and not torch.equal(out, x)
    with pytest.raises(ValueError, match="prefix_weights"):
        PrefixConstraint(c.prefix, torch.full((3, 5), 2.0, dtype=torch.float64), c.eta, c.alphas_cumprod)


# ------------------------------------------------------------------ through the eval CLI
def test_eval_latency_sweep_summary_and_report(tmp_path):
    """`-m timing=async latency=0,100`: every summary carries the real-time fields, the table shows them,
    latency 0 is the sync episode, and the report plots success and task time against latency."""
    import subprocess
    import sys

    common = ["env=lift", "checkpoint=checkpoints/lift", "sampler=ddim", "sampler.num_inference_steps=4",
              "max_episode_steps=20", "progress_bar=false", "torch_threads=1", "n_episodes=1", "baseline=null"]
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "parapolicy.eval", "-m", *common, "timing=async",
                           "latency=0,100", "transition=prefix", f"hydra.sweep.dir={sweep}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transition" in proc.stdout and "task s" in proc.stdout
    runs = {}
    for path in sorted(sweep.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        run = next(iter(summary["runs"].values()))
        runs[run["latency"]] = (run, [json.loads(l) for l in (path.parent / "episodes.jsonl").read_text().splitlines()])
    assert set(runs) == {"0", "100"}
    slow, slow_eps = runs["100"]
    assert slow["timing"] == "async" and slow["transition"] == "prefix" and slow["delay_steps"] == 2.0
    assert slow["task_time_s"] == pytest.approx(20 * 0.05)
    assert all(c["delay_steps"] == 2 for c in slow_eps[0]["calls"][1:])
    sync_dir = tmp_path / "sync"
    proc = subprocess.run([sys.executable, "-m", "parapolicy.eval", *common, f"hydra.run.dir={sync_dir}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sync_ep = json.loads((sync_dir / "episodes.jsonl").read_text().splitlines()[0])
    zero_ep = runs["0"][1][0]
    assert zero_ep["reward"] == sync_ep["reward"] and zero_ep["length"] == sync_ep["length"]
    assert len(zero_ep["calls"]) == len(sync_ep["calls"])
    report = subprocess.run([sys.executable, "-m", "parapolicy.report", str(sweep)], capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (sweep / "realtime.png").stat().st_size > 1000


@pytest.mark.parametrize("override, message", [
    ("timing=later", "timing must be one of sync, async, hold"),
    ("latency=200", "apply to timing=async"),
    ("timing=async latency=fast", "latency must be 'measured'"),
    ("timing=async transition=teleport", "unknown transition 'teleport'"),
    ("timing=async latency=profile:/nonexistent.json", "latency profile '/nonexistent.json' not found"),
])
def test_bad_realtime_options_fail_before_any_env_starts(override, message):
    """The driver's validate() (what runs before any simulator starts) refuses them, naming the value."""
    from hydra import compose, initialize_config_module

    from parapolicy.evaluation.driver import validate

    with initialize_config_module("parapolicy.conf", version_base=None):
        cfg = compose("eval", overrides=["env=lift", "checkpoint=checkpoints/lift", *override.split()])
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        validate(cfg)


# ------------------------------------------------------------------ every transition, every sampler family
class DriftEnv(gym.Env):
    """23-dim observations that drift smoothly with the actions (so forecasts and prefixes matter)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (23,), np.float32)
    action_space = gym.spaces.Box(-1e9, 1e9, (7,), np.float32)
    control_period_s = PERIOD

    def __init__(self):
        self.actions = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = np.random.default_rng(seed).uniform(0, 1, 23).astype(np.float32)
        self.actions = []
        return self.state.copy(), {}

    def step(self, action):
        self.actions.append(np.array(action, dtype=np.float32))
        self.state = (self.state + 0.05 * np.resize(np.asarray(action, np.float32), 23)).astype(np.float32)
        return self.state.copy(), 0.0, False, len(self.actions) >= 30, {"is_success": False}


@pytest.mark.parametrize("transition", ["naive", "prefix", "rtc", "ensemble", "bid:3", "bid_prefix:3", "forecast"])
@pytest.mark.parametrize("sequential, parallel", [("ddpm", "paraddpm"), ("ddim", "parasrdsddim"), ("ddim", "parataaddim")])
def test_every_transition_in_every_sampler_family_parallel_equals_sequential(transition, sequential, parallel):
    """Closed loop under each transition (d = 3), warm-started parallel sampler at tau -> 0 against its
    sequential twin: the same actions reach the env (float32 policy: within 1e-4)."""
    from policy_synthetic import tiny_policy

    executed = {}
    for name, options in ((sequential, {}), (parallel, {"tolerance": 1e-7, "warm_start": True})):
        policy = tiny_policy(num_inference_steps=10)
        policy.set_sampler(name, 10, **options)
        envs = gym.vector.SyncVectorEnv([DriftEnv], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        record = PolicyRunner(envs, policy, timing="async", latency=150, transition=transition).run_batch([11])[0]
        assert record["length"] == 30 and record["error"] is None
        assert all(c["converged"] for c in record["calls"])
        if name == parallel:
            assert any(c["warm"] for c in record["calls"])
        executed[name] = np.stack(envs.envs[0].actions)
    np.testing.assert_allclose(executed[parallel], executed[sequential], atol=1e-4)
    assert np.abs(executed[sequential]).max() > 0.05  # the policy really acted


class CameraEnv(gym.Env):
    """A camera task in miniature: uint8 [3, 84, 84] frames of two cameras and the proprioception."""

    cameras = ("agentview_image", "robot0_eye_in_hand_image")
    observation_space = gym.spaces.Dict({
        **{key: gym.spaces.Box(0, 255, (3, 84, 84), np.uint8) for key in cameras},
        "robot0_eef_pos": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
        "robot0_eef_quat": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
        "robot0_gripper_qpos": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)})
    action_space = gym.spaces.Box(-1e9, 1e9, (7,), np.float32)
    control_period_s = PERIOD

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.rng, self.t = np.random.default_rng(seed), 0
        return self._obs(), {}

    def _obs(self):
        obs = {key: self.rng.integers(0, 256, (3, 84, 84), dtype=np.uint8) for key in self.cameras}
        obs.update({"robot0_eef_pos": np.full(3, 0.1 * self.t, np.float32), "robot0_eef_quat": np.zeros(4, np.float32),
                    "robot0_gripper_qpos": np.zeros(2, np.float32)})
        return obs

    def step(self, action):
        self.t += 1
        return self._obs(), 0.0, False, self.t >= 12, {"is_success": False}


@pytest.mark.parametrize("timing, transition", [("sync", "naive"), ("async", "forecast"), ("async", "bid_prefix:2")])
def test_image_policies_run_closed_loop_under_real_time_execution(timing, transition):
    """The runner hands an image policy its camera frames ([B, n_obs_steps, 3, H, W]) and its low-dim keys,
    under every kind of execution; the encoder runs once per call."""
    from test_vision import _image_policy

    policy = _image_policy()
    encoder_calls = []
    policy.obs_encoder.register_forward_hook(lambda *args: encoder_calls.append(1))
    seen = []
    original = policy.predict_action
    policy.predict_action = lambda history, **kw: seen.append((history.clone(), kw.get("images"))) or original(history, **kw)
    envs = gym.vector.SyncVectorEnv([CameraEnv], autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    latency = "measured" if timing == "sync" else 100
    record = PolicyRunner(envs, policy, timing=timing, latency=latency, transition=transition).run_batch([3])[0]
    assert record["error"] is None and record["length"] == 12
    assert len(encoder_calls) == len(record["calls"]) == len(seen) >= 3
    history, images = seen[1]
    assert set(images) == set(CameraEnv.cameras) and images["agentview_image"].dtype == torch.uint8
    assert tuple(images["agentview_image"].shape[1:]) == (2, 3, 84, 84)
    expected_t = 4.0 + (2 if transition == "forecast" else 0)  # second plan at step 4 (n_action_steps 4)
    np.testing.assert_allclose(history[0, -1, :3].numpy(), [0.1 * expected_t] * 3, atol=1e-5)


def test_forecast_stays_within_the_range_the_policy_was_trained_on():
    history = np.array([[0.0, 0.5, 2.0], [1.0, 0.2, 2.0]], dtype=np.float32)  # dim 1 closes fast, dim 2 rests
    free = forecast_history(history, 4)
    np.testing.assert_allclose(free[-1], [5.0, -1.0, 2.0], atol=1e-6)
    bounded = forecast_history(history, 4, low=np.array([-10, 0.1, 0]), high=np.array([3, 1, 5]))
    np.testing.assert_allclose(bounded[-1], [3.0, 0.1, 2.0], atol=1e-6)  # clipped at the trained range
    np.testing.assert_allclose(forecast_history(history, 0), history)
    outside = forecast_history(history, 1, low=np.array([5, 5, 5]), high=np.array([6, 6, 6]))
    assert outside[0, 0] >= 0.0  # what was observed stays allowed, even outside the trained range


class ThreeCandidatesPolicy(LabelledPolicy):
    """Three candidate chunks per env (bid:3). They differ only in column 1 (the position label), by
    offsets chosen so that the candidate closest to the committed actions depends on how many positions
    count: over position 0 alone candidate 1 wins, over the first start + d = 5 candidate 2; with no
    committed positions candidate 0 is the default. (Checked: counting start, H or nothing fails.)"""

    OFFSETS = {0: (100.0, 100.0), 1: (0.0, 50.0), 2: (30.0, 0.0)}  # column 1 at position 0, at 1..4

    def predict_action(self, obs_history, x_T=None, noise=None, **kwargs):
        out = super().predict_action(obs_history, x_T, noise, **kwargs)
        b = obs_history.shape[0]
        if b == 3:  # a bid:3 request for one env: rows are its candidates
            chunk = out["action_pred"].clone()
            for row in range(3):
                first, middle = self.OFFSETS[row]
                chunk[row, 0, 1] += first
                chunk[row, 1:5, 1] += middle
                # which candidate ran, in column 2 from position 5 on: the same for every candidate's
                # distance later (their first 5 positions all hold 1 there), so it never sways a pick
                chunk[row, 5:, 2] += 1000.0 * row
            out.update(action_pred=chunk, action=chunk[:, START : START + S], sample=chunk)
        return out


def test_bid_picks_the_candidate_closest_over_the_committed_positions():
    """The runner's bidirectional decoding compares candidates with the executed / committed actions over
    positions [0, start + d): at 200 ms (d = 4) that is 5 positions, where candidate 2 is closest; a
    runner that counted only start, or the whole chunk, or nothing, would run another candidate."""
    envs = vector_env(60)
    policy = ThreeCandidatesPolicy()
    record = PolicyRunner(envs, policy, timing="async", latency=200, transition="bid:3").run_batch([7])[0]
    executed = np.stack(envs.envs[0].actions)
    calls = executed[:, 0].round().astype(int)
    later = calls > 0  # actions of chunks planned with candidates
    assert later.sum() >= 20 and record["stall_steps"] == 0
    assert (executed[later, 1] >= 5).all()  # each chunk from its position start + d on
    assert (executed[later, 2] == 2001.0).all(), executed[later, 2]  # always candidate 2
