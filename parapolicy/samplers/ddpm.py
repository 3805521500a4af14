"""Ancestral DDPM sampling (diffusers ``DDPMScheduler``) with the shared noise convention."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from parapolicy.samplers.base import Sampler


class DDPMSampler(Sampler):
    """x_{i+1} = c0_i * clip(x0_i) + c1_i * x_i + std_i * noise[i]: the DDPM posterior mean plus noise.

    Options: ``timestep_spacing`` ("leading" | "trailing" | "linspace"; default: the config's),
    ``scheduler_kwargs`` (overrides applied on top of ``scheduler_config``). Variance types
    ``fixed_small`` (default), ``fixed_small_log`` and ``fixed_large`` are supported. The last step adds
    no noise (diffusers adds none at t = 0; at a last step with t > 0 it would add 1e-10 * noise).
    """

    name = "ddpm"
    scheduler_class = DDPMScheduler

    def _build_tables(self) -> dict[str, torch.Tensor]:
        scheduler = self.scheduler
        t = self.timesteps
        # DDPMScheduler.previous_timestep: the next entry of `timesteps`, -1 after the last.
        prev_t = torch.cat([t[1:], t.new_tensor([-1])])
        alphas_cumprod = scheduler.alphas_cumprod
        alpha_t = alphas_cumprod[t]
        alpha_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)], scheduler.one)
        # Same float32 expressions, in the same order, as DDPMScheduler.step / _get_variance, so the
        # coefficients are bit-identical to the sequential scheduler's.
        beta_t = 1 - alpha_t
        beta_prev = 1 - alpha_prev
        current_alpha = alpha_t / alpha_prev
        current_beta = 1 - current_alpha
        posterior_variance = (1 - alpha_prev) / (1 - alpha_t) * current_beta
        clamped = torch.clamp(posterior_variance, min=1e-20)
        variance_type = scheduler.config.variance_type
        if variance_type == "fixed_small":
            noise_std = clamped**0.5
        elif variance_type == "fixed_small_log":
            noise_std = torch.exp(0.5 * torch.log(clamped))
        elif variance_type == "fixed_large":
            noise_std = current_beta**0.5
        else:
            raise ValueError(f"{self.name}: variance_type {variance_type!r} is not supported (learned variances)")
        noise_std[-1] = 0.0
        return {
            "sqrt_alpha": alpha_t**0.5,
            "sqrt_one_minus_alpha": beta_t**0.5,
            "coef_x0": (alpha_prev**0.5 * current_beta) / beta_t,
            "coef_x": current_alpha**0.5 * beta_prev / beta_t,
            "noise_std": noise_std,
            "tolerance_variance": posterior_variance,
        }

    def step_no_noise(self, x, model_output, steps, history=None):
        """Posterior mean for each point: ``[K, B, *event]`` -> ``[K, B, *event]`` (``history`` unused)."""
        x0 = self._denoised_from_output(
            x, model_output, self.coef("sqrt_alpha", steps, x), self.coef("sqrt_one_minus_alpha", steps, x)
        )
        x0 = self._clip_denoised(x0)
        return self.coef("coef_x0", steps, x) * x0 + self.coef("coef_x", steps, x) * x

    def _scheduler_step(self, model_output, step, x, unit_noise):
        # DDPMScheduler.step adds noise it draws itself and offers no way to pass ours: keep its (clipped)
        # x0, form the posterior mean with the scheduler's own coefficients, add our noise. A scratch
        # generator absorbs its draw so that the global RNG is left alone.
        out = self.scheduler.step(model_output, int(self.timesteps[step]), x, generator=self._scratch_generator(x))
        tables = self._tables  # float32 0-dim scalars, exactly as the scheduler multiplies them
        mean = tables["coef_x0"][step] * out.pred_original_sample + tables["coef_x"][step] * x
        return mean if unit_noise is None else mean + tables["noise_std"][step] * unit_noise

    def _scratch_generator(self, x: torch.Tensor) -> torch.Generator:
        key = ("scratch_generator", x.device)
        if key not in self._cache:
            self._cache[key] = torch.Generator(device=x.device)
        return self._cache[key]
