"""ParaDiGMS (Shih et al., 2023): sliding-window Picard iteration over the whole denoising trajectory.

With the noise drawn up front, sampling is the fixed point of
    x_{j+1} = x_b + sum_{k=b..j} (step_no_noise(x_k) - x_k + std_k * noise[k]).
Each round evaluates the model once on every point of the window [b, e) (one ``[K, B, *event]``
batch), recomputes x_{b+1..e} with a cumulative sum, and slides the window past the points that
stopped moving. Point x_{b+1} is always exact, so the window advances at least one step per round
and at most N rounds are needed (``window=1`` is the sequential sampler).
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
)
from parapolicy.samplers.ddim import DDIMSampler
from parapolicy.samplers.ddpm import DDPMSampler
from parapolicy.samplers.dpmsolver import DPMSolverSampler


class PicardSampler(ParallelSampler):
    """Sliding-window Picard iteration on top of any solver class (mixed in before it).

    Options:
      window (p, default 16): trajectory points per batched model call; the batch the model sees is
        p * B. 16 fits a policy's horizon-16 U-Net on one GPU comfortably (ParaDiGMS used 20 for its
        robot tasks); the window never exceeds N.
      tolerance (tau, default 0.1, as ParaDiGMS): a point x_j counts as converged when the mean over
        the sample's dimensions of its squared change this round is <= tau^2 * tolerance_variance[j]
        (the DDPM posterior variance of the step leaving x_j; for ODE solvers too, as ParaDiGMS). Where
        that variance is 0 (the noise-free last step) the point must not change at all. A batch
        advances by the converged prefix of its worst sample (ParaDiGMS's rule: the denoiser takes
        one timestep per trajectory point, shared by the batch, so windows cannot differ per sample).
      max_rounds (default N): stop after this many rounds; ``converged=False`` if not done by then.
      deadline_ms (default None): stop after the first round that ends later than this many
        milliseconds after ``sample()`` was called; ``converged=False`` unless already done.

    Without ``init``, points entering the window start as copies of the previous window's last point
    (ParaDiGMS); with ``init`` they keep their guess. ``errors[r]`` is round r's largest normalised RMS
    change, sqrt(change / tolerance_variance), over the window points that were checked and have a
    positive variance (0.0 when none): comparable with ``tolerance``.

    Sums run in float32 or wider (the trajectory buffer's dtype) whatever the model's dtype.
    """

    def __init__(
        self,
        scheduler_config,
        num_inference_steps: int,
        *,
        window: int = 16,
        tolerance: float = 0.1,
        max_rounds: Optional[int] = None,
        deadline_ms: Optional[float] = None,
        **solver_options,
    ):
        self.window = check_positive_int("window", window)
        self._set_stopping(tolerance, deadline_ms)
        super().__init__(scheduler_config, num_inference_steps, **solver_options)
        self._set_round_budget("max_rounds", max_rounds)

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise=None, generator=None, init=None) -> SampleOutput:
        """Picard sampling. x_T ``[B, *event]``; noise ``[N, B, *event]``; init ``[N + 1, B, *event]``."""
        start = self._clock()
        self.check_x_T(x_T)
        n, p, batch = self.num_inference_steps, min(self.window, self.num_inference_steps), x_T.shape[0]
        acc = accumulation_dtype(x_T.dtype)
        device = x_T.device
        # Buffers for the whole run, allocated once.
        scaled_noise = self.scaled_noise(x_T, noise, generator, acc)  # [N, B, *event] or None
        trajectory = self.initial_trajectory(x_T, init, acc)  # [N + 1, B, *event]
        history = self.new_history(x_T, acc)  # [N, B, *event] for multistep solvers
        timesteps = self.timesteps_on(device)
        steps = torch.arange(n, device=device)
        variance = self.table("tolerance_variance", device, acc)
        threshold = self.tolerance**2 * variance
        inverse_variance = torch.where(variance > 0, 1.0 / variance, torch.zeros_like(variance))

        begin, rounds, model_evals, errors, converged = 0, 0, 0, [], False
        while True:
            end = min(begin + p, n)
            size = end - begin
            points = trajectory[begin:end]  # x_b .. x_{e-1}
            model_output = denoise(points.to(x_T.dtype), timesteps[begin:end])
            if model_output.shape != points.shape:
                raise ValueError(f"denoise returned shape {list(model_output.shape)}, expected {list(points.shape)}")
            drift = self.step_no_noise(points, model_output.to(acc), steps[begin:end], history)
            drift -= points
            if scaled_noise is not None:
                drift += scaled_noise[begin:end]
            new_points = drift.cumsum_(0).add_(trajectory[begin])  # x_{b+1} .. x_e
            rounds += 1
            model_evals += size
            if size > 1:
                # Points x_{b+1} .. x_{e-1}, each checked against the variance of the step leaving it;
                # x_e's own change never matters (the window cannot pass it this round).
                change = (new_points[:-1] - trajectory[begin + 1 : end]).square_()
                change = change.reshape(size - 1, batch, -1).mean(-1).amax(-1)  # worst sample, [K-1]
                moved = change > threshold[begin + 1 : end]
                advance = torch.where(moved.any(), moved.int().argmax() + 1, size)
                worst = (change * inverse_variance[begin + 1 : end]).amax().sqrt()
                advance, error = torch.stack([advance.to(acc), worst]).tolist()  # the round's one host sync
            else:
                advance, error = 1, 0.0
            trajectory[begin + 1 : end + 1] = new_points
            errors.append(error)

            begin = self._slide_window(trajectory, begin, end, advance, p, warm=init is not None)
            if begin >= n:
                converged = True
                break
            if self._out_of_budget(rounds, start):
                break

        out = trajectory.to(x_T.dtype)
        return SampleOutput(
            sample=out[n], rounds=rounds, model_evals=model_evals, errors=errors, converged=converged, trajectory=out
        )



class ParaDDPMSampler(PicardSampler, DDPMSampler):
    """ParaDDPM: Picard windows over DDPM steps; same trajectory as ``ddpm`` for the same noise."""

    name = "paraddpm"


class ParaDDIMSampler(PicardSampler, DDIMSampler):
    """ParaDDIM: Picard windows over DDIM steps (noise only with eta > 0)."""

    name = "paraddim"


class ParaDPMSolverSampler(PicardSampler, DPMSolverSampler):
    """ParaDPMSolver: Picard windows over DPM-Solver++ multistep.

    A point's multistep history is the data predictions of the trajectory points before it: in the
    window, this round's; before the window, those stored when they were last evaluated (converged
    points). So the fixed point is exactly the sequential solver's, and ``window=1`` is sequential.
    (ParaDiGMS restarts the history at each window's first point, first order, which changes the
    fixed point whenever the window starts past step 0.)
    """

    name = "paradpmsolver"
