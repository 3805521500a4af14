"""DDIM sampling (diffusers ``DDIMScheduler``): deterministic by default, eta > 0 adds noise."""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler

from parapolicy.samplers.base import Sampler


class DDIMSampler(Sampler):
    """x_{i+1} = sqrt(a_prev) * clip(x0_i) + sqrt(1 - a_prev - s_i^2) * eps_i + s_i * noise[i].

    Options: ``eta`` (default 0: the ODE sampler; s_i = eta * DDPM posterior std), ``timestep_spacing``,
    ``scheduler_kwargs``.
    As ``DDIMScheduler.step``: the previous timestep is t - num_train_timesteps // N (a fixed stride),
    the last step goes to ``final_alpha_cumprod`` (1, or alphas_cumprod[0] when
    ``set_alpha_to_one=False``), eps is the raw model output even when x0 is clipped. So with "trailing"
    spacing (99, 92, ..., 6 for N = 15 of 100) step 0 lands on 99 - 100 // 15 = 93, not 92, and the last
    step on t = 0 (alphas_cumprod[0], not 1): diffusers' rule, which the tables follow. With eta > 0 the
    last step adds no noise (the shared convention), though its s_i still enters the eps coefficient.
    """

    name = "ddim"
    scheduler_class = DDIMScheduler

    def __init__(self, scheduler_config, num_inference_steps: int, *, eta: float = 0.0, **base_options):
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        self.eta = float(eta)
        super().__init__(scheduler_config, num_inference_steps, **base_options)

    def _build_tables(self) -> dict[str, torch.Tensor]:
        scheduler = self.scheduler
        t = self.timesteps
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas_cumprod = scheduler.alphas_cumprod
        alpha_t = alphas_cumprod[t]
        alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], scheduler.final_alpha_cumprod)
        # float32, in DDIMScheduler.step's order (bit-identical coefficients).
        beta_t = 1 - alpha_t
        beta_prev = 1 - alpha_prev
        variance = (beta_prev / beta_t) * (1 - alpha_t / alpha_prev)  # DDIMScheduler._get_variance
        std_dev = self.eta * variance**0.5
        noise_std = std_dev.clone()
        noise_std[-1] = 0.0
        return {
            "sqrt_alpha": alpha_t**0.5,
            "sqrt_one_minus_alpha": beta_t**0.5,
            "sqrt_alpha_prev": alpha_prev**0.5,
            "coef_eps": (1 - alpha_prev - std_dev**2) ** 0.5,
            "noise_std": noise_std,
            "tolerance_variance": variance,
        }

    def step_no_noise(self, x, model_output, steps, history=None):
        """``[K, B, *event]`` -> ``[K, B, *event]`` (``history`` unused)."""
        sqrt_alpha = self.coef("sqrt_alpha", steps, x)
        sqrt_one_minus_alpha = self.coef("sqrt_one_minus_alpha", steps, x)
        x0, eps = self._x0_and_eps(x, model_output, sqrt_alpha, sqrt_one_minus_alpha)
        return self.coef("sqrt_alpha_prev", steps, x) * x0 + self.coef("coef_eps", steps, x) * eps

    def _scheduler_step(self, model_output, step, x, unit_noise):
        variance_noise = None
        if self.eta > 0:
            last = step == self.num_inference_steps - 1
            variance_noise = torch.zeros_like(x) if last else unit_noise
        t = int(self.timesteps[step])
        return self.scheduler.step(model_output, t, x, eta=self.eta, variance_noise=variance_noise).prev_sample
