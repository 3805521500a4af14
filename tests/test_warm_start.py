"""Warm starts across control steps and the per-call latency budget (issue: warm-started sampling)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from parapolicy.policy.diffusion_policy import shift_chunk
from parapolicy.samplers import make_sampler

CONFIG = dict(DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                            prediction_type="epsilon").config)
N = 100


pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_denoiser(alphas_cumprod):
    """Exact epsilon for data x0 ~ N(0.3, 0.2^2) per dim: a smooth, input-dependent denoiser."""
    def denoise(x, t):
        a = alphas_cumprod.to(x.dtype)[t].view(-1, *([1] * (x.ndim - 1)))
        var = a * 0.04 + (1 - a)
        x0_mean = 0.3 + a.sqrt() * 0.04 * (x - a.sqrt() * 0.3) / var
        return (x - a.sqrt() * x0_mean) / (1 - a).sqrt()
    return denoise


def oracle_denoiser(alphas_cumprod, x0):
    """A denoiser that predicts the same clean sample ``x0`` everywhere."""
    def denoise(x, t):
        a = alphas_cumprod.to(x.dtype)[t].view(-1, *([1] * (x.ndim - 1)))
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return denoise


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((batch, 16, 7), generator=g, dtype=torch.float64)
    noise = torch.randn((N, batch, 16, 7), generator=g, dtype=torch.float64)
    return x_T, noise


def test_shift_chunk_drops_executed_actions_and_repeats_the_last():
    chunk = torch.arange(16.0).view(1, 16, 1).expand(2, 16, 7)
    shifted = shift_chunk(chunk, 8)
    assert shifted.shape == chunk.shape
    assert shifted[0, :, 0].tolist() == list(range(8, 16)) + [15.0] * 8
    with pytest.raises(ValueError):
        shift_chunk(chunk, 16)


@pytest.mark.parametrize("rule", ["rollout", "marginal"])
def test_guess_trajectory_shape_and_ends(rule):
    sampler = make_sampler("paraddpm", CONFIG, N)
    x_T, noise = inputs()
    x0 = torch.rand_like(x_T) * 2 - 1
    guess = sampler.guess_trajectory(x_T, x0, noise, rule=rule)
    assert guess.shape == (N + 1, *x_T.shape)
    torch.testing.assert_close(guess[0], x_T)
    if rule == "marginal":
        torch.testing.assert_close(guess[-1], x0)
    with pytest.raises(ValueError, match="unknown warm-start rule"):
        sampler.guess_trajectory(x_T, x0, noise, rule="nope")


def test_rollout_guess_is_the_fixed_point_when_the_guess_is_right():
    seq = make_sampler("ddpm", CONFIG, N)
    par = make_sampler("paraddpm", CONFIG, N, window=16, tolerance=0.1)
    x_T, noise = inputs()
    x0 = torch.rand_like(x_T) * 1.6 - 0.8
    denoise = oracle_denoiser(seq.scheduler.alphas_cumprod, x0)
    reference = seq.sample(denoise, x_T, noise=noise)
    guess = par.guess_trajectory(x_T, x0, noise)
    torch.testing.assert_close(guess, reference.trajectory, rtol=1e-9, atol=1e-9)
    warm = par.sample(denoise, x_T, noise=noise, init=guess)
    cold = par.sample(denoise, x_T, noise=noise)
    # a right guess only needs the window to sweep once over the steps to verify it (+1: the last
    # step's tolerance variance is 0, so the point entering it must be bit-exact)
    assert warm.rounds <= math.ceil(N / 16) + 1 < cold.rounds


@pytest.mark.parametrize("name", ["paraddpm", "paraddim"])
@pytest.mark.parametrize("rule", ["rollout", "marginal"])
def test_warm_start_converges_to_the_cold_result(name, rule):
    steps = N if name == "paraddpm" else 15
    sampler = make_sampler(name, CONFIG, steps, window=8, tolerance=1e-8)
    x_T, noise = inputs(1)
    noise = noise[:steps] if sampler.is_stochastic else None
    denoise = smooth_denoiser(sampler.scheduler.alphas_cumprod)
    cold = sampler.sample(denoise, x_T, noise=noise)
    previous = sampler.sample(denoise, inputs(2)[0], noise=inputs(2)[1][:steps] if noise is not None else None)
    guess = sampler.guess_trajectory(x_T, shift_chunk(previous.sample, 8), noise, rule=rule)
    warm = sampler.sample(denoise, x_T, noise=noise, init=guess)
    assert warm.converged and cold.converged
    torch.testing.assert_close(warm.sample, cold.sample, rtol=1e-6, atol=1e-6)


def test_warm_start_cuts_rounds_on_a_smooth_denoiser():
    sampler = make_sampler("paraddpm", CONFIG, N, window=16, tolerance=0.1)
    denoise = smooth_denoiser(sampler.scheduler.alphas_cumprod)
    x_T, noise = inputs(3)
    cold = sampler.sample(denoise, x_T, noise=noise)
    # the previous call's sample for another noise draw: the data are the same, the noise is not
    previous = sampler.sample(denoise, *inputs(4))
    warm = sampler.sample(denoise, x_T, noise=noise,
                          init=sampler.guess_trajectory(x_T, previous.sample, noise))
    assert warm.rounds < cold.rounds
    assert (warm.sample - cold.sample).abs().max() < 0.1


def tiny(sampler="paraddpm", **options):
    from policy_synthetic import tiny_policy

    policy = tiny_policy()
    policy.set_sampler(sampler, 20, **options)
    return policy


def test_policy_act_warm_starts_after_the_first_call_and_reset_clears_it():
    policy = tiny(warm_start=True, tolerance=0.1)
    obs = np.linspace(-1, 1, policy.config.obs_dim).astype(np.float32)
    policy.reset()
    flags = []
    for _ in range(3 * policy.config.n_action_steps):
        policy.act(obs)
        if policy.last_info["replanned"]:
            flags.append(policy.last_info["warm"])
    assert flags == [False, True, True]
    policy.reset()
    assert policy._previous_sample is None
    policy.act(obs)
    assert policy.last_info["warm"] is False


def test_policy_warm_start_keeps_the_result_within_tolerance():
    cold_policy = tiny(tolerance=1e-6)
    warm_policy = tiny(tolerance=1e-6, warm_start=True)
    history = torch.linspace(-1, 1, 2 * cold_policy.config.obs_dim).view(1, 2, -1)
    g = torch.Generator().manual_seed(0)
    x_T, noise = torch.randn((1, 16, 7), generator=g), torch.randn((20, 1, 16, 7), generator=g)
    previous = cold_policy.predict_action(history + 0.05, x_T=torch.randn((1, 16, 7), generator=g))["sample"]
    cold = cold_policy.predict_action(history, x_T=x_T, noise=noise)
    warm = warm_policy.predict_action(history, x_T=x_T, noise=noise, warm_from=previous)
    torch.testing.assert_close(warm["action"], cold["action"], rtol=1e-3, atol=1e-3)


def test_deadline_stops_early_and_flags_the_call():
    policy = tiny(deadline_ms=0.0, tolerance=1e-8)
    plan = policy.predict_action(torch.zeros(1, 2, policy.config.obs_dim))
    assert plan["converged"] is False and plan["rounds"] == 1
    assert torch.isfinite(plan["action"]).all()


def test_bad_warm_start_rule_is_rejected():
    with pytest.raises(ValueError, match="warm_start_rule"):
        tiny(warm_start=True, warm_start_rule="nope")
