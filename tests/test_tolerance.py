"""What the tolerance tau means, pinned for Picard (ParaDiGMS) and SRDS.

The other tests check that tau -> 0 gives the sequential sampler and that tau = 0.1 saves rounds; a
threshold a few times looser passes both. Here:

- ``tolerance_variance`` is, value for value, the DDPM posterior variance of the step leaving each point
  (computed from the diffusers scheduler's ``alphas_cumprod`` and timesteps, not from our tables);
- Picard: a plain-loop ParaDiGMS written here (per point: mean over the sample's dimensions of its
  squared change <= tau^2 * variance, worst sample of the batch; the window slides past the converged
  prefix) gives the same rounds, errors and sample as the sampler, for several tau and windows;
- SRDS: iteration k's error is sqrt(mean squared change of the final sample / smallest positive
  variance), measured here from ``max_iters`` = k and k - 1 runs, and the sampler returns at the first
  iteration whose error is <= tau (tau just above and just below each error).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from parapolicy.samplers import make_sampler
from test_samplers import LINEAR, POLICY, inputs, net_denoiser


pytestmark = pytest.mark.usefixtures("one_thread")


def posterior_variances(name: str, config, n: int, **kwargs) -> torch.Tensor:
    """``[N]`` float64: (1 - a_to) / (1 - a_from) * (1 - a_from / a_to) for each step, where a_from is
    alpha_bar at the step's timestep and a_to at the level it lands on (DDIM: t - stride, else the next
    timestep; after the last timestep alpha_bar = 1, or DDIM's final_alpha_cumprod)."""
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}[name]
    scheduler = cls.from_config(dict(config), **kwargs)
    scheduler.set_timesteps(n)
    alphas = scheduler.alphas_cumprod.double()
    timesteps = [int(t) for t in scheduler.timesteps]
    out = []
    for i, t in enumerate(timesteps):
        if name == "ddim":
            prev = t - scheduler.config.num_train_timesteps // n
            a_to = float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        else:
            a_to = float(alphas[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        a_from = float(alphas[t])
        out.append((1 - a_to) / (1 - a_from) * (1 - a_from / a_to))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name, config, n, kwargs", [
    ("ddpm", POLICY, 100, {}),
    ("ddpm", POLICY, 15, {}),
    ("ddpm", LINEAR, 30, {"timestep_spacing": "linspace"}),
    ("ddim", POLICY, 15, {}),
    ("ddim", LINEAR, 20, {"set_alpha_to_one": False}),
    ("dpmsolver", POLICY, 15, {}),
])
def test_tolerance_variance_is_the_posterior_variance_of_each_step(name, config, n, kwargs):
    sampler = make_sampler("para" + name, config, n, scheduler_kwargs=kwargs)
    expected = posterior_variances(name, config, n, **kwargs)
    torch.testing.assert_close(sampler.tolerance_variance.double(), expected, rtol=1e-5, atol=1e-12)


# ------------------------------------------------------------------------------------------- Picard
def paradigms_reference(sampler, denoise, x_T, noise, tau: float, window: int):
    """ParaDiGMS's sliding window, one point at a time (the rule of the sampler's docstring)."""
    n = sampler.num_inference_steps
    variance = posterior_variances("ddpm", POLICY, n)
    traj = [x_T.clone() for _ in range(n + 1)]
    timesteps = sampler.timesteps
    scaled = sampler.scaled_noise(x_T, noise)
    begin, rounds, errors = 0, 0, []
    while begin < n:
        end = min(begin + window, n)
        points = torch.stack(traj[begin:end])
        out = denoise(points, timesteps[begin:end])
        drift = sampler.step_no_noise(points, out, torch.arange(begin, end)) - points + scaled[begin:end]
        new = [traj[begin] + drift[: j + 1].sum(0) for j in range(end - begin)]  # x_{b+1} .. x_e
        rounds += 1
        advance, worst = end - begin, 0.0
        for j in range(begin + 1, end):  # x_e's own change never matters this round
            change = max(float((new[j - begin - 1][s] - traj[j][s]).square().mean()) for s in range(x_T.shape[0]))
            if variance[j] > 0:
                worst = max(worst, math.sqrt(change / float(variance[j])))
            if change > tau**2 * float(variance[j]) and advance == end - begin:
                advance = j - begin
        errors.append(worst)
        traj[begin + 1 : end + 1] = new
        new_begin = begin + advance
        for j in range(end + 1, min(new_begin + window, n) + 1):  # entering points copy the window's last
            traj[j] = traj[end].clone()
        begin = new_begin
    return traj[n], rounds, errors


@pytest.mark.parametrize("window", [16, 7])
@pytest.mark.parametrize("tau", [0.003, 0.03, 0.1, 0.3, 1.0])
def test_picard_stops_where_paradigms_rule_says(window, tau):
    n = 60
    sampler = make_sampler("paraddpm", POLICY, n, window=window, tolerance=tau)
    denoise = net_denoiser()
    x_T, noise = inputs(n)
    out = sampler.sample(denoise, x_T, noise=noise)
    sample, rounds, errors = paradigms_reference(sampler, denoise, x_T, noise, tau, window)
    assert out.converged
    assert out.rounds == rounds, (out.rounds, rounds)
    assert out.errors == pytest.approx(errors, rel=1e-5, abs=1e-12)  # the tables are float32
    torch.testing.assert_close(out.sample, sample, rtol=0, atol=1e-10)


def test_picard_rounds_fall_as_tau_grows():
    n = 60
    denoise = net_denoiser()
    x_T, noise = inputs(n)
    rounds = [make_sampler("paraddpm", POLICY, n, window=16, tolerance=tau).sample(denoise, x_T, noise=noise).rounds
              for tau in (0.001, 0.01, 0.1, 1.0)]
    assert rounds == sorted(rounds, reverse=True) and rounds[0] > rounds[-1]


# --------------------------------------------------------------------------------------------- SRDS
def srds_errors(n: int, blocks: int, denoise, x_T, noise) -> list[float]:
    """Errors of iterations 2 .. B: the normalised change of the final sample between runs stopped after
    k and k - 1 iterations (max_iters), over the smallest positive posterior variance."""
    variance = posterior_variances("ddpm", POLICY, n)
    sigma2 = float(variance[variance > 0].min())
    finals = [make_sampler("parasrdsddpm", POLICY, n, num_blocks=blocks, max_iters=k, tolerance=0)
              .sample(denoise, x_T, noise=noise).sample for k in range(1, blocks + 1)]
    errors = []
    for before, after in zip(finals[:-1], finals[1:]):
        change = (after - before).square().reshape(x_T.shape[0], -1).mean(-1).max()
        errors.append(math.sqrt(float(change) / sigma2))
    return errors


def test_srds_returns_at_the_first_iteration_within_tau():
    n, blocks = 36, 6
    denoise = net_denoiser()
    x_T, noise = inputs(n)
    full = make_sampler("parasrdsddpm", POLICY, n, num_blocks=blocks, tolerance=0).sample(denoise, x_T, noise=noise)
    assert len(full.errors) == blocks
    assert full.errors[1:] == pytest.approx(srds_errors(n, blocks, denoise, x_T, noise), rel=1e-5)
    errors = full.errors
    for k in range(1, blocks):  # errors[k - 1] belongs to iteration k
        e = errors[k - 1]
        if e == 0:
            continue
        for tau in (e * 1.02, e * 0.98):
            expected = next((j for j in range(1, blocks + 1) if errors[j - 1] <= tau), blocks)
            out = make_sampler("parasrdsddpm", POLICY, n, num_blocks=blocks, tolerance=tau).sample(
                denoise, x_T, noise=noise)
            assert len(out.errors) == expected, (tau, k, errors, out.errors)
            assert out.converged
            assert out.errors == pytest.approx(errors[:expected], rel=1e-9)


@pytest.mark.parametrize("window", [2, 3])
def test_picard_at_tau_zero_is_the_sequential_sampler_for_small_windows(window):
    """tau = 0 is allowed and exact: every window checks its points, down to windows of two (a window
    that advanced past a point without checking it would end on a stale x_{N-1})."""
    n = 12
    denoise = net_denoiser()
    x_T, noise = inputs(n)
    exact = make_sampler("ddpm", POLICY, n).sample(denoise, x_T, noise=noise)
    out = make_sampler("paraddpm", POLICY, n, window=window, tolerance=0).sample(denoise, x_T, noise=noise)
    assert out.converged
    torch.testing.assert_close(out.trajectory, exact.trajectory, rtol=0, atol=1e-12)


def test_picard_windows_of_two_advance_two_points_when_the_checked_one_is_within_tau():
    n = 12
    x_T, noise = inputs(n)
    out = make_sampler("paraddpm", POLICY, n, window=2, tolerance=1e6).sample(net_denoiser(), x_T, noise=noise)
    # the last step has variance 0 (its point must not move at all): one more round there
    assert out.rounds <= n // 2 + 1
