"""SRDS (Selvam, Merchant, Ermon, NeurIPS 2024): Parareal over the denoising trajectory, pipelined.

The N fine steps are split into B blocks at fine-grid boundaries s_0 = 0 < s_1 < ... < s_B = N (sizes
differ by at most one; B = round(sqrt(N)) by default). With X^k_b the trajectory point x_{s_b} after
iteration k (X^k_0 = x_T):

    G_b(x)  one coarse step from block b's first timestep straight to the level its last step lands on
    F_b(x)  block b's own fine steps (with the shared pre-sampled noise for stochastic solvers)
    X^0_b     = G_b(X^0_{b-1})                                  (coarse sweep; or a warm start)
    X^k_b     = F_b(X^{k-1}_{b-1}) + (G_b(X^k_{b-1}) - G_b(X^{k-1}_{b-1}))

Block b is exact after iteration b (its start was exact and F is the sequential map), so iteration B
returns the sequential sample, and blocks b <= k are not solved again in later iterations.

Pipelining: nothing waits for a whole iteration. A fine solve F_b(X^{k-1}_{b-1}) starts in the round
after its start point is known, and every running solve advances one step per round, all of them in
one batched ``denoise`` call; G_b(x) needs the model at (x, t_{s_{b-1}}), which is the first
evaluation of the fine solve that starts from x, so it costs nothing extra. X^k_b is known after
round T(k, b) = max(T(k-1, b-1) + L_b, T(k, b-1) + 1), with T(0, b) = b (coarse sweep; 0 with a
warm start) and T(k, b) = s_b for b <= k, hence T(k, b) <= s_b: the pipelined schedule never takes
more rounds than the sequential sampler, and all B iterations take exactly N.
"""

from __future__ import annotations

import math
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




class _Chain:
    """One fine solve F_b(X^{k-1}_{b-1}) in progress (or, when ``coarse_only``, just its first evaluation)."""

    __slots__ = ("k", "block", "j", "length", "point", "interior", "coarse_only")

    def __init__(self, k: int, block: int, length: int, point: torch.Tensor, coarse_only: bool):
        self.k, self.block, self.j, self.length = k, block, 0, length
        self.point, self.interior, self.coarse_only = point, [], coarse_only


class SRDSSampler(ParallelSampler):
    """Pipelined Parareal (SRDS) on top of a one-step solver class (mixed in before it).

    Options:
      num_blocks (B, default round(sqrt(N))): Parareal blocks; at most N. B = 1 is the sequential
        sampler (one block, one iteration); B = N makes every block one step.
      tolerance (tau, default 0.1): stop after iteration k >= 1 when the final sample moved little:
        the mean over the sample's dimensions of ||X^k_B - X^{k-1}_B||^2 is <= tau^2 * sigma^2 for
        every sample of the batch, where sigma^2 is the smallest positive ``tolerance_variance`` (the
        variance of the last step that moves between two noise levels, the scale ParaDiGMS applies to
        the last trajectory point it lets be inexact; 1 if there is none, N = 1). tau = 0 runs all
        ``max_iters`` iterations.
      max_iters (default B): stop after this many iterations; more than B are never needed (the
        value is capped at B). ``converged`` is True after iteration B (exact) or when the
        tolerance was met, False when ``max_iters`` < B stopped it first.
      deadline_ms (default None): stop after the first round that ends later than this many
        milliseconds after ``sample()`` was called; ``converged=False`` unless done in that round.

    ``init`` (warm start ``[N + 1, B, *event]``, x_T authoritative): its block-boundary points
    init[s_b] replace the coarse sweep as iteration 0, so every block's first fine solve starts in
    round one; its other points are not used (fine solves recompute them).

    Output: ``rounds`` = batched ``denoise`` calls (the depth of the pipelined schedule);
    ``model_evals`` = evaluations per sample, speculative ones included (solves of iteration k + 1
    that were running when iteration k's final sample passed the test); ``errors[k-1]`` = iteration
    k's normalised RMS change of the final sample, sqrt(change / sigma^2), comparable with
    ``tolerance`` (one entry per completed iteration, not per round). ``trajectory``: block
    boundaries are the returned iteration's X^k_b (for b <= k the exact ones); the points inside a
    block come from the latest fine solve completed for it.

    Sums run in float32 or wider whatever the model's dtype.
    """

    def __init__(
        self,
        scheduler_config,
        num_inference_steps: int,
        *,
        num_blocks: Optional[int] = None,
        tolerance: float = 0.1,
        max_iters: Optional[int] = None,
        deadline_ms: Optional[float] = None,
        **solver_options,
    ):
        self._set_stopping(tolerance, deadline_ms)
        super().__init__(scheduler_config, num_inference_steps, **solver_options)
        n = self.num_inference_steps
        if num_blocks is None:
            num_blocks = max(1, round(math.sqrt(n)))
        check_positive_int("num_blocks", num_blocks)
        if num_blocks > n:
            raise ValueError(f"num_blocks ({num_blocks}) cannot exceed num_inference_steps ({n})")
        self.num_blocks = num_blocks
        # s_b: block b covers steps s_{b-1} .. s_b - 1 (sizes differ by at most one).
        self.boundaries = [(b * n) // num_blocks for b in range(num_blocks + 1)]
        self.max_iters = num_blocks if max_iters is None else min(check_positive_int("max_iters", max_iters), num_blocks)
        positive = self.tolerance_variance[self.tolerance_variance > 0]
        self.final_variance = float(positive.min()) if len(positive) else 1.0

    # ------------------------------------------------------------------ coarse solver
    def _coarse_coefficients(self, alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> dict[str, torch.Tensor]:
        """Coefficients ``x0`` / ``x`` / ``eps`` (float64 ``[B]``) of the solver's no-noise step between two levels."""
        raise NotImplementedError

    def _coarse_tables(self) -> dict[str, torch.Tensor]:
        if "coarse_tables" not in self._cache:
            alpha_from, alpha_to = self.step_alphas_cumprod()
            first = torch.tensor(self.boundaries[:-1])
            last = torch.tensor(self.boundaries[1:]) - 1
            a_from, a_to = alpha_from[first], alpha_to[last]
            self._cache["coarse_tables"] = {
                "sqrt_alpha": a_from.sqrt(),
                "sqrt_one_minus_alpha": (1 - a_from).sqrt(),
                **self._coarse_coefficients(a_from, a_to),
            }
        return self._cache["coarse_tables"]

    def coarse_step(self, x: torch.Tensor, model_output: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """G: points ``[K, B, *event]`` at their blocks' first steps (``blocks``: 0-based block indices
        ``[K]``) and their model outputs -> ``[K, B, *event]``, one no-noise step of the solver straight to
        the level the block's last step lands on (x0 clipped exactly as the fine steps clip it).
        For a one-step block this is ``step_no_noise`` (up to the tables' float32 rounding)."""
        key = ("coarse", x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = {k: v.to(device=x.device, dtype=x.dtype) for k, v in self._coarse_tables().items()}
        tables = self._cache[key]
        shape = (-1, *([1] * (x.ndim - 1)))

        def coef(name):
            return tables[name].index_select(0, blocks).view(shape)

        sqrt_alpha, sqrt_one_minus_alpha = coef("sqrt_alpha"), coef("sqrt_one_minus_alpha")
        x0, eps = self._x0_and_eps(x, model_output, sqrt_alpha, sqrt_one_minus_alpha)
        return coef("x0") * x0 + coef("x") * x + coef("eps") * eps

    # ------------------------------------------------------------------ sampling
    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise=None, generator=None, init=None) -> SampleOutput:
        """Pipelined SRDS. x_T ``[B, *event]``; noise ``[N, B, *event]``; init ``[N + 1, B, *event]``."""
        start_time = self._clock()
        self.check_x_T(x_T)
        n, num_blocks, max_iters = self.num_inference_steps, self.num_blocks, self.max_iters
        bounds = self.boundaries
        acc = accumulation_dtype(x_T.dtype)
        device, batch = x_T.device, x_T.shape[0]
        scaled_noise = self.scaled_noise(x_T, noise, generator, acc)  # [N, B, *event] or None
        trajectory = self.initial_trajectory(x_T, init, acc)  # [N + 1, B, *event]
        timesteps = self.timesteps_on(device)
        threshold = self.tolerance**2 * self.final_variance

        x_start = trajectory[0]
        known: dict[tuple[int, int], torch.Tensor] = {}  # (k, b) -> X^k_b, b >= 1
        coarse: dict[tuple[int, int], torch.Tensor] = {}  # (k, b) -> G_b(X^k_{b-1})
        fine: dict[tuple[int, int], torch.Tensor] = {}  # (k, b) -> F_b(X^{k-1}_{b-1})
        if init is not None:
            for b in range(1, num_blocks + 1):
                known[(0, b)] = trajectory[bounds[b]].clone()

        def boundary(k: int, b: int) -> Optional[torch.Tensor]:
            return x_start if b == 0 else known.get((k, b))

        # Solves: F_b(X^{k-1}_{b-1}) for 1 <= k <= max_iters and b >= k (blocks b < k start from an exact
        # point already solved); when max_iters < B, also the first evaluation of "iteration
        # max_iters + 1" for b > max_iters, which gives the G_b(X^{max_iters}_{b-1}) iteration max_iters needs.
        candidates = [(k, b) for k in range(1, max_iters + 1) for b in range(k, num_blocks + 1)]
        if max_iters < num_blocks:
            candidates += [(max_iters + 1, b) for b in range(max_iters + 1, num_blocks + 1)]
        pending = list(candidates)
        running: list[_Chain] = []

        def start_ready() -> None:
            nonlocal pending
            waiting = []
            for k, b in pending:
                point = boundary(k - 1, b - 1)
                if point is None:
                    waiting.append((k, b))
                    continue
                coarse_only = k > max_iters
                length = 1 if coarse_only else bounds[b] - bounds[b - 1]
                running.append(_Chain(k, b, length, point, coarse_only))
            pending = waiting

        def resolve() -> None:
            """Every boundary whose inputs are now known (one pass suffices: a new boundary only starts solves)."""
            for k in range(0, max_iters + 1):
                for b in range(max(k, 1), num_blocks + 1):
                    if (k, b) in known:
                        continue
                    if k == 0:
                        value = coarse.get((0, b))
                    elif b == k:  # started from an exact point: no correction
                        value = fine.get((k, k))
                    else:
                        f, g_new, g_old = fine.get((k, b)), coarse.get((k, b)), coarse.get((k - 1, b))
                        value = None if f is None or g_new is None or g_old is None else f + (g_new - g_old)
                    if value is not None:
                        known[(k, b)] = value

        rounds, model_evals, errors = 0, 0, []
        converged, returned, next_check = False, 0, 1
        start_ready()
        while True:
            if not running:  # cannot happen: some solve is always waiting on the last round's results
                raise RuntimeError("SRDS schedule stalled")
            points = torch.stack([chain.point for chain in running])
            steps = torch.tensor([bounds[c.block - 1] + c.j for c in running], device=device)
            model_output = denoise(points.to(x_T.dtype), timesteps[steps])
            if model_output.shape != points.shape:
                raise ValueError(f"denoise returned shape {list(model_output.shape)}, expected {list(points.shape)}")
            model_output = model_output.to(acc)
            rounds += 1
            model_evals += len(running)

            firsts = [i for i, c in enumerate(running) if c.j == 0]
            if firsts:
                index = torch.tensor(firsts, device=device)
                blocks = torch.tensor([running[i].block - 1 for i in firsts], device=device)
                predicted = self.coarse_step(points[index], model_output[index], blocks)
                for row, i in enumerate(firsts):
                    coarse[(running[i].k - 1, running[i].block)] = predicted[row]
            stepping = [i for i, c in enumerate(running) if not c.coarse_only]
            if stepping:
                index = torch.tensor(stepping, device=device)
                moved = self.step_no_noise(points[index], model_output[index], steps[index])
                if scaled_noise is not None:
                    moved += scaled_noise[steps[index]]
                for row, i in enumerate(stepping):
                    chain = running[i]
                    chain.j += 1
                    chain.point = moved[row]
                    if chain.j < chain.length:
                        chain.interior.append(chain.point)
                    else:
                        fine[(chain.k, chain.block)] = chain.point
                        first, last = bounds[chain.block - 1], bounds[chain.block]
                        if last - first > 1:
                            trajectory[first + 1 : last] = torch.stack(chain.interior)
            running = [c for c in running if not c.coarse_only and c.j < c.length]

            resolve()
            done = False
            while not done and (next_check, num_blocks) in known:
                k = next_check
                change = (known[(k, num_blocks)] - known[(k - 1, num_blocks)]).square()
                change = change.reshape(batch, -1).mean(-1).amax().item()
                errors.append(math.sqrt(change / self.final_variance))
                returned, next_check = k, k + 1
                if change <= threshold or k == max_iters:
                    converged = change <= threshold or k == num_blocks
                    done = True
            if done:
                break
            if self._past_deadline(start_time):
                break
            start_ready()

        # Boundaries of the returned iteration (exact ones for b <= k); nothing known stays as it was.
        for b in range(1, num_blocks + 1):
            value = known.get((min(returned, b), b))
            if value is not None:
                trajectory[bounds[b]] = value
        out = trajectory.to(x_T.dtype)
        return SampleOutput(
            sample=out[n], rounds=rounds, model_evals=model_evals, errors=errors, converged=converged, trajectory=out
        )



class SRDSDDPMSampler(SRDSSampler, DDPMSampler):
    """SRDS over DDPM steps (the pre-sampled noise in the fine solves; same trajectory as ``ddpm``).

    G is deterministic: the DDPM posterior mean (no noise) from the block's first timestep straight to
    the level of its end, x' = c0 * clip(x0) + c1 * x with the cumulative alpha ratio of the block. For
    Gaussian data, an exact denoiser and no clipping this is exactly the conditional mean of the
    block's fine solve, and the noise enters F additively, so G(x') - G(x) = F(x') - F(x): one
    iteration would be exact. A DDIM step across the block is a worse predictor of a DDPM block: at
    DDPM-100, tau = 0.1, it took 100 rounds instead of 64 on a random policy U-Net, 82 instead of 37
    on Gaussian data.
    """

    name = "parasrdsddpm"

    def _coarse_coefficients(self, alpha_from, alpha_to):
        ratio = alpha_from / alpha_to
        beta_t, beta_prev = 1 - alpha_from, 1 - alpha_to
        return {
            "x0": alpha_to.sqrt() * (1 - ratio) / beta_t,
            "x": ratio.sqrt() * beta_prev / beta_t,
            "eps": torch.zeros_like(alpha_from),
        }


class SRDSDDIMSampler(SRDSSampler, DDIMSampler):
    """SRDS over DDIM steps: G is one DDIM step across the block (with ``eta`` > 0, its no-noise part:
    the eps coefficient sqrt(1 - a' - s^2) with s = eta * the block's posterior std; noise enters only
    the fine solves)."""

    name = "parasrdsddim"

    def _coarse_coefficients(self, alpha_from, alpha_to):
        variance = ((1 - alpha_to) / (1 - alpha_from)) * (1 - alpha_from / alpha_to)
        std = self.eta * variance.sqrt()
        return {
            "x0": alpha_to.sqrt(),
            "x": torch.zeros_like(alpha_from),
            "eps": (1 - alpha_to - std**2).clamp(min=0).sqrt(),
        }
