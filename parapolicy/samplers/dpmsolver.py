"""Multistep DPM-Solver++ (diffusers ``DPMSolverMultistepScheduler``), an ODE sampler."""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler

from parapolicy.samplers.base import Sampler


class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep, order 2 by default (diffusers' default; option ``solver_order`` 1-3).

    Every update is linear in the point and the data predictions of this step and the one or two
    before: x_{i+1} = A_i x_i + B0_i m_i + B1_i m_{i-1} + B2_i m_{i-2}, m = predicted x0. The per-step
    order follows ``DPMSolverMultistepScheduler.step``: lower order for the first steps (no history
    yet) and at the end (``lower_order_final``, ``final_sigmas_type="zero"``); see ``solver_orders``.

    diffusers' DPM-Solver never clips x0, even when built from a DDPM config with ``clip_sample=True``,
    so neither does this sampler. To clip like the policy's DDPM scheduler, pass
    ``scheduler_kwargs=dict(thresholding=True, sample_max_value=1.0)``: dynamic thresholding with its
    bound clamped to [1, 1] is exactly clipping to [-1, 1], and the batched step mirrors it.
    Only ``algorithm_type="dpmsolver++"`` (diffusers' default) is supported.
    """

    name = "dpmsolver"
    scheduler_class = DPMSolverMultistepScheduler
    is_multistep = True

    def __init__(self, scheduler_config, num_inference_steps: int, *, solver_order: int = 2, scheduler_kwargs=None,
                 **base_options):
        if solver_order not in (1, 2, 3) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        scheduler_kwargs = {**(scheduler_kwargs or {}), "solver_order": solver_order}
        super().__init__(scheduler_config, num_inference_steps, scheduler_kwargs=scheduler_kwargs, **base_options)

    def _solver_orders(self) -> list[int]:
        """The order DPMSolverMultistepScheduler.step uses at each step (its own rules, step by step)."""
        config, n = self.scheduler.config, self.num_inference_steps
        orders = []
        for i in range(n):
            lower_order_nums = min(i, config.solver_order)
            lower_order_final = i == n - 1 and (
                config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
            )
            lower_order_second = i == n - 2 and config.lower_order_final and n < 15
            if config.solver_order == 1 or lower_order_nums < 1 or lower_order_final:
                orders.append(1)
            elif config.solver_order == 2 or lower_order_nums < 2 or lower_order_second:
                orders.append(2)
            else:
                orders.append(3)
        return orders

    def _build_tables(self) -> dict[str, torch.Tensor]:
        config = self.scheduler.config
        if config.algorithm_type != "dpmsolver++":
            raise ValueError(f"{self.name}: only algorithm_type='dpmsolver++' is supported, got {config.algorithm_type!r}")
        if config.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"{self.name}: prediction_type {config.prediction_type!r} is not supported")
        # alpha/sigma from the scheduler's own float32 sigmas ([N + 1], the last one the target of the
        # last step), computed as its step does; the update coefficients then in float64.
        alpha32, sigma32 = self.scheduler._sigma_to_alpha_sigma_t(self.scheduler.sigmas)
        alpha, sigma = alpha32.double(), sigma32.double()
        lam = torch.log(alpha) - torch.log(sigma)  # +inf at a zero final sigma
        n = self.num_inference_steps
        self.solver_orders = self._solver_orders()
        coef_x, coef_d0, coef_d1, coef_d2 = (torch.zeros(n, dtype=torch.float64) for _ in range(4))
        for i, order in enumerate(self.solver_orders):  # construction time only, N iterations
            alpha_t, sigma_t, sigma_s0 = alpha[i + 1], sigma[i + 1], sigma[i]
            h = lam[i + 1] - lam[i]
            phi = torch.exp(-h) - 1.0
            coef_x[i] = sigma_t / sigma_s0
            d0 = -alpha_t * phi  # first-order (DDIM-like) weight of m_i
            if order == 1:
                coef_d0[i] = d0
            elif order == 2:  # D1 = (m_i - m_{i-1}) / r0
                r0 = (lam[i] - lam[i - 1]) / h
                c = 0.5 * d0 if config.solver_type == "midpoint" else alpha_t * (phi / h + 1.0)
                coef_d0[i] = d0 + c / r0
                coef_d1[i] = -c / r0
            else:  # third order: D1, D2 from the divided differences D1_0, D1_1
                r0 = (lam[i] - lam[i - 1]) / h
                r1 = (lam[i - 1] - lam[i - 2]) / h
                q = alpha_t * (phi / h + 1.0)
                r = -alpha_t * ((phi + h) / h**2 - 0.5)
                c10 = q * (1.0 + r0 / (r0 + r1)) + r / (r0 + r1)  # weight of D1_0 = (m_i - m_{i-1}) / r0
                c11 = -(q * r0 + r) / (r0 + r1)  # weight of D1_1 = (m_{i-1} - m_{i-2}) / r1
                coef_d0[i] = d0 + c10 / r0
                coef_d1[i] = -c10 / r0 + c11 / r1
                coef_d2[i] = -c11 / r1
        alpha_bar = alpha**2
        tolerance_variance = (1 - alpha_bar[1:]) / (1 - alpha_bar[:-1]) * (1 - alpha_bar[:-1] / alpha_bar[1:])
        return {
            "convert_alpha": alpha32[:n],
            "convert_sigma": sigma32[:n],
            "coef_x": coef_x,
            "coef_d0": coef_d0,
            "coef_d1": coef_d1,
            "coef_d2": coef_d2,
            "noise_std": torch.zeros(n),
            "tolerance_variance": tolerance_variance,
        }

    def denoised(self, x, model_output, steps):
        """Data prediction m (DPMSolverMultistepScheduler.convert_model_output), ``[K, B, *event]``."""
        x0 = self._denoised_from_output(
            x, model_output, self.coef("convert_alpha", steps, x), self.coef("convert_sigma", steps, x)
        )
        return self._clip_denoised(x0, allow_clip=False)

    def step_no_noise(self, x, model_output, steps, history=None):
        """``[K, B, *event]`` -> ``[K, B, *event]``.

        ``history`` ``[N, B, *event]`` (``new_history``, dtype of ``x``): this call writes m at ``steps``
        and reads m at ``steps - 1`` and ``steps - 2``, so a step's predecessors must be in this call or
        an earlier one; ``steps`` must be distinct. If None, a scratch buffer is used and every step's
        predecessors must be in this call.
        """
        m = self.denoised(x, model_output, steps)
        if history is None:
            history = x.new_zeros((self.num_inference_steps, *x.shape[1:]))
        history.index_copy_(0, steps, m)
        out = self.coef("coef_x", steps, x) * x + self.coef("coef_d0", steps, x) * m
        order = self.scheduler.config.solver_order
        if order >= 2:  # index 0 stands in where the weight is 0 (first steps)
            out += self.coef("coef_d1", steps, x) * history.index_select(0, (steps - 1).clamp(min=0))
        if order >= 3:
            out += self.coef("coef_d2", steps, x) * history.index_select(0, (steps - 2).clamp(min=0))
        return out

    def _reset_scheduler(self) -> None:
        super()._reset_scheduler()
        self.scheduler.set_begin_index(0)  # step i is step i, even if timesteps repeat

    def _scheduler_step(self, model_output, step, x, unit_noise):
        return self.scheduler.step(model_output, int(self.timesteps[step]), x).prev_sample
