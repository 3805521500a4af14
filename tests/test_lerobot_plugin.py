"""The LeRobot plugin's mechanisms on the stand-in (tests/lerobot_standin.py), without lerobot: the class-level
swap (``install``), the environment knobs, and real-time chunking through ``predict_action_chunk``'s RTC
arguments. The same paths run against the real lerobot 0.6.1 in ``make test-lerobot``
(tests/lerobot_real/)."""

from __future__ import annotations

import pytest
import torch

from lerobot_standin import OBS_STATE, DiffusionConfig, DiffusionModel, DiffusionPolicy
from parapolicy.integrations import lerobot as integ

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def installed():
    """install() on the stand-in's classes for one test, put back after it."""
    def do(sampler="paraddpm", **options):
        if integ.installed(DiffusionPolicy):
            integ.uninstall(DiffusionPolicy)
        return integ.install(DiffusionPolicy, sampler, model_class=DiffusionModel, **options)

    yield do
    if integ.installed(DiffusionPolicy):
        integ.uninstall(DiffusionPolicy)
    assert DiffusionModel.conditional_sample.__name__ == "conditional_sample"
    assert not hasattr(DiffusionPolicy, "supports_rtc")


def make_policy(seed=0, **config) -> DiffusionPolicy:
    torch.manual_seed(seed)
    config = {"num_inference_steps": 20, **config}
    return DiffusionPolicy(DiffusionConfig(**config)).eval()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cond(batch, seed=1):
    return torch.randn(batch, 20, generator=gen(seed))


@torch.no_grad()
def test_install_reaches_instances_built_before_and_after(installed):
    before = make_policy()
    stock = before.diffusion.conditional_sample(2, global_cond=cond(2), generator=gen(4))
    line = installed("ddpm")
    assert "conditional_sample -> ddpm" in line and "predict_action_chunk" in line
    after = make_policy()
    for policy in (before, after):  # the sequential swap is LeRobot's loop, draw for draw
        ours = policy.diffusion.conditional_sample(2, global_cond=cond(2), generator=gen(4))
        assert torch.equal(ours, stock)
        assert policy.diffusion.last_info["sampler"] == "ddpm"
    installed("paraddpm", window=20, tolerance=1e-6)  # re-installing swaps the sampler, also of built models
    before.diffusion.conditional_sample(2, global_cond=cond(2), generator=gen(4))
    assert before.diffusion.last_info["sampler"] == "paraddpm"
    fresh = make_policy()
    ours = fresh.diffusion.conditional_sample(2, global_cond=cond(2), generator=gen(4))
    info = fresh.diffusion.last_info
    assert info["sampler"] == "paraddpm" and info["converged"] and info["rounds"] < 20
    assert (ours - stock).abs().max() < 1e-4
    ddim = make_policy(noise_scheduler_type="DDIM")
    ddim.diffusion.conditional_sample(1, global_cond=cond(1), generator=gen(4))
    assert ddim.diffusion.last_info["sampler"] == "paraddim"


@torch.no_grad()
def test_training_mode_keeps_lerobots_loop(installed):
    installed("paraddpm", window=4, tolerance=10.0)  # a loose tolerance: any swap would show
    policy = make_policy()
    policy.train()
    g1, g2 = gen(3), gen(3)
    ours = policy.diffusion.conditional_sample(2, global_cond=cond(2), generator=g1)
    assert "last_info" not in policy.diffusion.__dict__
    integ.uninstall(DiffusionPolicy)
    stock = policy.diffusion.conditional_sample(2, global_cond=cond(2), generator=g2)
    assert torch.equal(ours, stock)


def test_select_action_unchanged_signature_and_stock_chunks(installed):
    policy = make_policy()
    obs = [{OBS_STATE: torch.randn(1, 10, generator=gen(i))} for i in range(6)]

    def rollout():
        policy.reset()
        torch.manual_seed(7)
        return torch.stack([policy.select_action(dict(o)) for o in obs])

    stock = rollout()
    installed("ddpm")
    assert policy.supports_rtc()
    assert torch.equal(rollout(), stock)  # select_action -> predict_action_chunk without RTC arguments


@pytest.mark.parametrize("env,expected", [
    ({}, ("paraddpm", {})),
    ({"PARAPOLICY_SAMPLER": "OFF"}, (None, {})),
    ({"PARAPOLICY_SAMPLER": "srds", "PARAPOLICY_TOLERANCE": "1e-3"}, ("parasrdsddpm", {"tolerance": 1e-3})),
    ({"PARAPOLICY_SAMPLER": "parataa", "PARAPOLICY_WINDOW": "8", "PARAPOLICY_MAX_ROUNDS": "30"},
     ("parataaddpm", {"window": 8, "max_rounds": 30})),
])
def test_settings_from_env(env, expected):
    assert integ.settings_from_env(env) == expected


@pytest.mark.parametrize("env,match", [
    ({"PARAPOLICY_SAMPLER": "fast"}, "PARAPOLICY_SAMPLER='fast'"),
    ({"PARAPOLICY_WINDOW": "eight"}, "PARAPOLICY_WINDOW='eight' is not an integer"),
    ({"PARAPOLICY_TOLERANCE": "-1"}, "must be > 0"),
    ({"PARAPOLICY_SAMPLER": "ddpm", "PARAPOLICY_WINDOW": "4"}, "sequential"),
])
def test_bad_settings_are_refused(env, match):
    with pytest.raises(ValueError, match=match):
        integ.settings_from_env(env)


def test_install_refuses_an_option_the_sampler_lacks():
    with pytest.raises(ValueError, match="does not take"):
        integ.install(DiffusionPolicy, "parasrdsddpm", model_class=DiffusionModel, window=8)
    assert integ.installed(DiffusionPolicy) is None


# ------------------------------------------------------------------ RTC
def rtc_frames(count, seed=0):
    return [{OBS_STATE: torch.randn(1, 10, generator=gen(seed + i))} for i in range(count)]


@torch.no_grad()
def test_rtc_prefix_is_the_executed_actions_and_the_rest_is_free(installed):
    installed("ddpm")
    policy = make_policy(n_obs_steps=2, n_action_steps=8, horizon=16)
    prev = torch.randn(10, 4, generator=gen(11)).clamp(-1, 1)  # LeRobot's [execution_horizon, A]
    for delay in (1, 3, 5):
        policy.reset()
        torch.manual_seed(0)
        chunk = policy.predict_action_chunk(rtc_frames(1)[0], inference_delay=delay, prev_chunk_left_over=prev)
        assert chunk.shape == (1, 8, 4)
        assert torch.equal(chunk[0, :delay], prev[:delay])       # executed while planning: imposed exactly
        assert (chunk[0, delay] - prev[delay]).abs().min() > 1e-3  # the next one is the model's own
    policy.reset()
    torch.manual_seed(0)
    free = policy.predict_action_chunk(rtc_frames(1)[0], inference_delay=0, prev_chunk_left_over=prev)
    assert (free[0, 0] - prev[0]).abs().min() > 1e-3
    assert torch.isfinite(free).all()


@pytest.mark.parametrize("sampler,options", [
    ("paraddpm", {"window": 20, "tolerance": 1e-7}),
    ("parasrdsddpm", {"tolerance": 1e-7}),
    ("parataaddpm", {"window": 20, "tolerance": 1e-7}),
])
@torch.no_grad()
def test_rtc_parallel_samplers_equal_the_sequential_one(installed, sampler, options):
    prev = torch.randn(10, 4, generator=gen(12)).clamp(-1, 1)

    def chunks():
        policy = make_policy(seed=3)
        torch.manual_seed(5)
        out = [policy.predict_action_chunk(f, inference_delay=2, prev_chunk_left_over=prev) for f in rtc_frames(3)]
        return torch.cat(out), policy.diffusion.last_info

    installed("ddpm")
    sequential, _ = chunks()
    installed(sampler, **options)
    parallel, info = chunks()
    assert info["sampler"] == sampler and info["converged"]
    assert torch.equal(parallel[:, :2], sequential[:, :2])
    assert (parallel - sequential).abs().max() < 1e-4


@torch.no_grad()
def test_rtc_keeps_its_own_observation_history(installed):
    """The engine passes one frame per call; the policy stacks the last n_obs_steps itself (the first one
    repeated), exactly what LeRobot's select_action queues would have given generate_actions."""
    installed("ddpm")
    policy = make_policy(n_obs_steps=3)
    frames = rtc_frames(4, seed=20)
    torch.manual_seed(9)
    got = [policy.predict_action_chunk(f, inference_delay=0, prev_chunk_left_over=None) for f in frames]
    expected_histories = [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3]]
    torch.manual_seed(9)
    for chunk, idx in zip(got, expected_histories):
        batch = {OBS_STATE: torch.stack([frames[i][OBS_STATE] for i in idx], dim=1)}
        assert torch.equal(chunk, policy.diffusion.generate_actions(batch))
    policy.reset()  # a new episode starts a new history
    torch.manual_seed(9)
    again = policy.predict_action_chunk(frames[3], inference_delay=0, prev_chunk_left_over=None)
    torch.manual_seed(9)
    assert torch.equal(again, policy.diffusion.generate_actions({OBS_STATE: frames[3][OBS_STATE].unsqueeze(1).expand(1, 3, 10)}))


def test_rtc_prefix_layout_and_refusals():
    values, weights = integ.rtc_prefix(torch.arange(20.0).reshape(10, 2), 3, batch=2, n_obs_steps=2, chunk_length=8)
    assert values.shape == (2, 4, 2) and weights.tolist() == [[0, 1, 1, 1]] * 2
    assert torch.equal(values[:, 1:], torch.arange(6.0).reshape(1, 3, 2).expand(2, 3, 2))
    assert integ.rtc_prefix(None, 3, 1, 2, 8) is None and integ.rtc_prefix(torch.zeros(10, 2), 0, 1, 2, 8) is None
    assert integ.rtc_prefix(torch.zeros(10, 2), 50, 1, 1, 8)[0].shape == (1, 8, 2)  # clamped to the chunk
    with pytest.raises(ValueError, match=">= 0"):
        integ.rtc_prefix(torch.zeros(10, 2), -1, 1, 2, 8)
    with pytest.raises(ValueError, match="prev_chunk_left_over must be"):
        integ.rtc_prefix(torch.zeros(3, 10, 2), 1, 1, 2, 8)
