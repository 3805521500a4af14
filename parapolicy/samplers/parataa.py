"""ParaTAA (Tang et al., ICML 2024): the trajectory as a triangular system, solved by fixed-point
iteration with triangular Anderson acceleration, in a sliding window.

Every step splits as x_{i+1} = a_i x_i + d_i(x_i), d_i(x) = step_no_noise(x, eps(x), i) - a_i x
+ noise_std_i * noise[i] (the model term, clipping and the pre-sampled noise), with a_i = 1 (option
``unroll="picard"``, the default) or ParaTAA's a_i = sqrt(alpha_to_i / alpha_from_i), the coefficient
of x in a DDIM or DDPM step at fixed epsilon (``unroll="ddim"``). Unrolling k steps gives the k-th
order equations, with p = max(b, i + 1 - k) and b the window start,

    x_{i+1} = (a_i ... a_p) x_p + sum_{q=p..i} (a_i ... a_{q+1}) d_q(x_q),

whose fixed point is the sequential trajectory for any k: k = 1 is plain fixed-point (Jacobi)
iteration, k >= window the Picard form (with a_i = 1 exactly ParaDiGMS's update). One round evaluates the
model on the window's points x_b .. x_{e-1} in one batch, forms the k-th order update
x_{i+1} + R_i, and applies Anderson acceleration to it:

    x_{i+1} <- x_{i+1} + R_i - (dX_i + dR_i) gamma_i,
    gamma_i = argmin sum_{j=b..i} ||R_j - dR_j gamma||^2 + lambda ||gamma||^2,

dX / dR being the differences of the last ``history`` iterates / residuals of each step. The sum runs
over the steps x_{i+1} depends on (b..i: the "triangular" part; cumulative sums over the window).
"""

from __future__ import annotations

from typing import Optional

import torch

from parapolicy.samplers.base import (
    Denoiser,
    ParallelSampler,
    SampleOutput,
    accumulation_dtype,
    check_positive_int,
    check_tolerance,
)
from parapolicy.samplers.ddim import DDIMSampler
from parapolicy.samplers.ddpm import DDPMSampler


class ParaTAASampler(ParallelSampler):
    """Sliding-window ParaTAA on top of a one-step solver class (mixed in before it).

    Options:
      window (p, default 16): trajectory points per batched model call (the batch is p * B), as
        ``paraddpm``; never more than N.
      history (m, default 2): iterates kept per step for Anderson acceleration (m - 1 difference
        columns). 1 turns acceleration off: plain fixed-point iteration of the chosen order.
      order (k, default None: the window, i.e. the Picard form, as ParaTAA's DiT script): order of the
        unrolled equations; 1 is plain fixed-point iteration, values >= window the Picard form
        anchored at the window's first point.
      unroll (default "picard"): a_i = 1, or "ddim" for ParaTAA's a_i (see the module docstring).
        Same fixed point; on the policy's schedules "picard" needs fewer rounds for DDPM-100 (e.g.
        17 vs 24 on the Gaussian denoiser) and about as many for DDIM-15.
      tolerance (tau, default 0.01) and abs_tolerance (default None: tau / 100): ParaTAA's stopping
        rule. A step is done when the RMS over the sample's dimensions of its first-order residual
        step(x_i) - x_{i+1} is <= abs_tolerance or <= tau * sigma_i, sigma_i^2 the step's
        ``tolerance_variance`` (the DDPM posterior variance, ParaTAA's noise_thr; 0 for the last
        step, which only the absolute tolerance lets through). Worst sample of the batch.
        The window then starts after the first step that is not done (its updated point counts as
        final: it was computed from points that were), at least one step per round. A residual
        bound lets more error through than ParaDiGMS's bound on the change between rounds: at the
        same tau the samples deviate from sequential ~5x more, hence the default 0.01, where they
        deviate about as much as ``paraddpm``'s at 0.1 (ParaTAA's scripts: 1e-3 absolute).
      ridge (lambda, default 1e-3): Tikhonov term, relative to the mean of the valid diagonal of the
        least-squares Gram matrix (scale-free; ParaTAA adds 1e-3 absolute to Gram matrices summed over
        16384-dim latents, which on 112-dim action sequences would swamp them near convergence and
        switch acceleration off).
      max_rounds (default N), deadline_ms (default None): as ``paraddpm``; ``converged=False`` when
        they stop it.

    Points entering the window start as copies of the previous window's last point, or keep their
    ``init`` (warm start) guess. Anderson acceleration is applied only to the points beyond the new
    window start (the finished ones take the plain k-th order update), and per sample: each sample of
    the batch solves its own least-squares problems. ``errors[r]`` is round r's largest first-order
    residual RMS / sigma_i over the window steps with sigma_i > 0 (0.0 if none): comparable with
    ``tolerance``. Sums run in float32 or wider whatever the model's dtype.
    """

    def __init__(
        self,
        scheduler_config,
        num_inference_steps: int,
        *,
        window: int = 16,
        history: int = 2,
        order: Optional[int] = None,
        unroll: str = "picard",
        tolerance: float = 0.01,
        abs_tolerance: Optional[float] = None,
        ridge: float = 1e-3,
        max_rounds: Optional[int] = None,
        deadline_ms: Optional[float] = None,
        **solver_options,
    ):
        self.window = check_positive_int("window", window)
        self.history = check_positive_int("history", history)
        self.order = self.window if order is None else check_positive_int("order", order)
        if unroll not in ("picard", "ddim"):
            raise ValueError(f"unroll must be 'picard' or 'ddim', got {unroll!r}")
        self.unroll = unroll
        self._set_stopping(tolerance, deadline_ms)
        self.abs_tolerance = self.tolerance / 100 if abs_tolerance is None else check_tolerance("abs_tolerance", abs_tolerance)
        self.ridge = check_tolerance("ridge", ridge)
        super().__init__(scheduler_config, num_inference_steps, **solver_options)
        self._set_round_budget("max_rounds", max_rounds)
        if unroll == "ddim":
            alpha_from, alpha_to = self.step_alphas_cumprod()
            log_a = 0.5 * (alpha_to / alpha_from).log()
        else:
            log_a = torch.zeros(self.num_inference_steps, dtype=torch.float64)
        # Lpad[i] = log(a_0 ... a_{i-1}): products a_p ... a_q = exp(Lpad[q + 1] - Lpad[p]), in float64.
        self._log_prod = torch.cat([torch.zeros(1, dtype=torch.float64), log_a.cumsum(0)])

    def linear_coefficients(self) -> torch.Tensor:
        """``[N]`` float64: a_i, the coefficient of x_i the unrolled equations carry (ones for "picard")."""
        return (self._log_prod[1:] - self._log_prod[:-1]).exp()

    def _unroll_weights(self, begin: int, end: int, device, dtype):
        """Window [begin, end): (anchor index [w], anchor weight [w], direction weights [w, w]) of the k-th
        order equations for x_{begin+1} .. x_{end}."""
        key = ("unroll", begin, end, torch.device(device), dtype)
        if key not in self._cache:
            size = end - begin
            log_prod = self._log_prod[begin : end + 1]  # Lpad[begin .. end]
            j = torch.arange(size)
            anchor = (j + 1 - self.order).clamp(min=0)  # relative to begin
            anchor_weight = (log_prod[j + 1] - log_prod[anchor]).exp()
            exponent = log_prod[j + 1][:, None] - log_prod[j + 1][None, :]  # [i, q]: a_i ... a_{q+1}
            inside = (j[None, :] <= j[:, None]) & (j[None, :] >= anchor[:, None])
            weights = torch.where(inside, exponent, torch.tensor(-torch.inf, dtype=torch.float64)).exp()
            self._cache[key] = (  # at most N windows per device and dtype
                (begin + anchor).to(device),
                anchor_weight.to(device=device, dtype=dtype),
                weights.to(device=device, dtype=dtype),
            )
        return self._cache[key]

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise=None, generator=None, init=None) -> SampleOutput:
        """ParaTAA sampling. x_T ``[B, *event]``; noise ``[N, B, *event]``; init ``[N + 1, B, *event]``."""
        start_time = self._clock()
        self.check_x_T(x_T)
        n, p, batch = self.num_inference_steps, min(self.window, self.num_inference_steps), x_T.shape[0]
        m = self.history
        acc = accumulation_dtype(x_T.dtype)
        device = x_T.device
        scaled_noise = self.scaled_noise(x_T, noise, generator, acc)  # [N, B, *event] or None
        trajectory = self.initial_trajectory(x_T, init, acc)  # [N + 1, B, *event]
        timesteps = self.timesteps_on(device)
        steps = torch.arange(n, device=device)
        sigma = self.table("tolerance_variance", device, acc).sqrt()
        relative = self.tolerance * sigma
        inverse_sigma = torch.where(sigma > 0, 1.0 / sigma, torch.zeros_like(sigma))
        linear = self.linear_coefficients().to(device=device, dtype=acc)
        if m > 1:
            memory_x = x_T.new_zeros((m, n, *x_T.shape), dtype=acc)  # last m iterates x_{i+1}, per step i
            memory_r = torch.zeros_like(memory_x)  # and their k-th order residuals
            count = torch.zeros(n, dtype=torch.long, device=device)  # valid entries per step (<= m)
            columns = torch.arange(m - 1, device=device)

        begin, rounds, model_evals, errors, converged = 0, 0, 0, [], False
        while True:
            end = min(begin + p, n)
            size = end - begin
            points = trajectory[begin:end]  # x_b .. x_{e-1}
            model_output = denoise(points.to(x_T.dtype), timesteps[begin:end])
            if model_output.shape != points.shape:
                raise ValueError(f"denoise returned shape {list(model_output.shape)}, expected {list(points.shape)}")
            stepped = self.step_no_noise(points, model_output.to(acc), steps[begin:end])
            if scaled_noise is not None:
                stepped += scaled_noise[begin:end]
            current = trajectory[begin + 1 : end + 1]  # x_{b+1} .. x_e

            # Stopping rule on the first-order residuals; the window restarts after the first unfinished step.
            residual_rms = (stepped - current).square_().reshape(size, batch, -1).mean(-1).amax(-1).sqrt_()
            unfinished = (residual_rms > self.abs_tolerance) & (residual_rms > relative[begin:end])
            advance = torch.where(unfinished.any(), unfinished.int().argmax() + 1, size)
            worst = (residual_rms * inverse_sigma[begin:end]).amax()

            # k-th order update.
            stepped -= linear[begin:end].view(-1, *([1] * x_T.ndim)) * points  # d_i
            anchor, anchor_weight, weights = self._unroll_weights(begin, end, device, acc)
            update = (weights @ stepped.reshape(size, -1)).reshape(stepped.shape)
            update += anchor_weight.view(-1, *([1] * x_T.ndim)) * trajectory[anchor]
            if m > 1:
                update -= self._anderson(
                    memory_x, memory_r, count, columns, begin, end, current, update - current, advance
                )
            trajectory[begin + 1 : end + 1] = update
            rounds += 1
            model_evals += size
            advance, error = torch.stack([advance.to(acc), worst]).tolist()  # the round's one host sync
            errors.append(error)

            begin = self._slide_window(trajectory, begin, end, advance, p, warm=init is not None)
            if begin >= n:
                converged = True
                break
            if self._out_of_budget(rounds, start_time):
                break

        out = trajectory.to(x_T.dtype)
        return SampleOutput(
            sample=out[n], rounds=rounds, model_evals=model_evals, errors=errors, converged=converged, trajectory=out
        )

    def _anderson(self, memory_x, memory_r, count, columns, begin, end, current, residual, advance):
        """Record (x_{i+1}, R_i) for the window's steps and return the Anderson correction
        (dX_i + dR_i) gamma_i ``[w, B, *event]`` (zero for finished steps and steps with one entry)."""
        m, size, batch = memory_x.shape[0], end - begin, current.shape[1]
        memory_x[:-1, begin:end] = memory_x[1:, begin:end].clone()
        memory_r[:-1, begin:end] = memory_r[1:, begin:end].clone()
        memory_x[-1, begin:end] = current
        memory_r[-1, begin:end] = residual
        count[begin:end] = (count[begin:end] + 1).clamp_(max=m)

        dx = (memory_x[1:, begin:end] - memory_x[:-1, begin:end]).reshape(m - 1, size, batch, -1)
        dr = (memory_r[1:, begin:end] - memory_r[:-1, begin:end]).reshape(m - 1, size, batch, -1)
        dims = dr.shape[-1]
        gram = torch.einsum("cwbd,ewbd->wbce", dr, dr).div_(dims).cumsum_(0)  # sums over steps b..i
        rhs = torch.einsum("cwbd,wbd->wbc", dr, residual.reshape(size, batch, -1)).div_(dims).cumsum_(0)
        # Step i has count_i - 1 valid columns, the newest; steps before it in the window have at least
        # as many (they entered the window earlier), so its triangular sums use only valid entries.
        valid = columns[None, :] >= (m - count[begin:end])[:, None]  # [w, m - 1]
        pair = (valid[:, :, None] & valid[:, None, :])[:, None]  # [w, 1, m-1, m-1]
        gram = torch.where(pair, gram, torch.zeros((), dtype=gram.dtype, device=gram.device))
        rhs = torch.where(valid[:, None], rhs, torch.zeros((), dtype=rhs.dtype, device=rhs.device))
        diagonal = gram.diagonal(dim1=-2, dim2=-1)  # [w, B, m - 1]
        scale = diagonal.sum(-1) / valid.sum(-1).clamp(min=1)[:, None]
        scale = torch.where(scale > 0, self.ridge * scale, torch.ones_like(scale))
        regulariser = torch.where(valid[:, None], scale[..., None], torch.ones_like(diagonal))
        gamma = torch.linalg.solve(gram + torch.diag_embed(regulariser), rhs.unsqueeze(-1)).squeeze(-1)  # [w, B, m-1]
        accelerated = torch.arange(size, device=gamma.device) >= advance  # beyond the new window start
        gamma = gamma * accelerated.view(-1, 1, 1).to(gamma.dtype)
        correction = torch.einsum("cwbd,wbc->wbd", dx + dr, gamma)
        return correction.reshape(current.shape)



class ParaTAADDPMSampler(ParaTAASampler, DDPMSampler):
    """ParaTAA over DDPM steps (pre-sampled noise inside d_i); same trajectory as ``ddpm`` for the same noise."""

    name = "parataaddpm"


class ParaTAADDIMSampler(ParaTAASampler, DDIMSampler):
    """ParaTAA over DDIM steps (noise only with eta > 0); same trajectory as ``ddim``."""

    name = "parataaddim"
