"""What every sampler shares: the diffusers scheduler, its timesteps, per-step tables, noise and checks.

Conventions (all samplers, sequential and parallel):

- ``x_T``: ``[B, *event]``, the initial noise; dim 0 is the batch of independent samples.
- ``denoise(x, t)``: time-batched model. ``x`` is ``[K, B, *event]`` (K trajectory points stacked in
  front of the sample batch), ``t`` a LongTensor ``[K]`` of scheduler timesteps; returns the model output
  (epsilon / sample / v, as the scheduler config says) with the shape of ``x``. Sequential samplers call
  it with K = 1.
- Step ``i`` (0 <= i < N, in ``scheduler.timesteps`` order) maps trajectory point ``x_i`` (at timestep
  ``timesteps[i]``) to ``x_{i+1} = step_no_noise(x_i, eps_i, i) + noise_std[i] * noise[i]``; ``x_0 = x_T``
  and ``x_N`` is the sample. ``noise`` is ``[N, B, *event]`` of unit Gaussians; ``noise_std[N-1] = 0``.
  With the noise drawn up front the map is deterministic, so every exact parallel method converges to
  the sequential trajectory for that noise.

A sampler for a new algorithm (SRDS, ParaTAA, ...) reuses, from the solver classes:
``step_no_noise`` (batched over trajectory points with different timesteps), ``noise_std`` /
``tolerance_variance`` (per-step tables), ``scaled_noise`` (draws / validates noise),
``initial_trajectory`` (validates a warm start), ``new_history`` (multistep solvers), ``coef`` and
``step_alphas_cumprod`` (noise levels, for steps between arbitrary timesteps).
"""

from __future__ import annotations

import dataclasses
import time
import inspect
import math
from typing import Callable, ClassVar, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class SampleOutput:
    """Result of ``Sampler.sample``.

    sample: ``[B, *event]``, the final trajectory point x_N (the current estimate if not converged).
    rounds: sequential batched ``denoise`` calls, the latency-relevant depth.
    model_evals: timestep evaluations per sample, summed over rounds (N for a sequential sampler).
    errors: one entry per round, the convergence error of that round (parallel samplers; see there).
    converged: False when ``max_rounds`` or ``deadline_ms`` stopped a parallel sampler early.
    trajectory: ``[N + 1, B, *event]``, x_0 = x_T ... x_N (warm starts feed it back as ``init``).
    """

    sample: torch.Tensor
    rounds: int
    model_evals: int
    errors: list[float]
    converged: bool
    trajectory: Optional[torch.Tensor] = None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider: trajectory sums must not run in half precision even when the model does."""
    return torch.promote_types(dtype, torch.float32)


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def merge_timestep_spacing(timestep_spacing: Optional[str], scheduler_kwargs: Optional[dict]) -> dict:
    """``scheduler_kwargs`` with the ``timestep_spacing`` option folded in (the option is first-class:
    ``sampler.timestep_spacing=trailing``; ``scheduler_kwargs={timestep_spacing: ...}`` keeps working).

    diffusers' spacings for N of T train steps: "leading" (its default) starts at t = (T // N) * (N - 1),
    e.g. 84 of 100 for N = 15; "trailing" starts at T - 1 (99, 92, ..., 6); "linspace" spreads N
    points over [0, T - 1]. Raises ValueError on an unknown spacing or on two different ones.
    """
    kwargs = dict(scheduler_kwargs or {})
    for source, value in (("timestep_spacing", timestep_spacing), ("scheduler_kwargs.timestep_spacing",
                                                                  kwargs.get("timestep_spacing"))):
        if value is not None and value not in TIMESTEP_SPACINGS:
            raise ValueError(f"{source} must be one of {', '.join(TIMESTEP_SPACINGS)} (or null), got {value!r}")
    if timestep_spacing is not None:
        if kwargs.get("timestep_spacing", timestep_spacing) != timestep_spacing:
            raise ValueError(f"timestep_spacing={timestep_spacing!r} (e.g. a conf/sampler yaml's default) contradicts "
                             f"scheduler_kwargs.timestep_spacing={kwargs['timestep_spacing']!r}; give one, e.g. "
                             f"sampler.timestep_spacing={kwargs['timestep_spacing']}")
        kwargs["timestep_spacing"] = timestep_spacing
    return kwargs


class Sampler:
    """Base class: one diffusers scheduler, set to ``num_inference_steps``, plus vectorised step tables.

    Subclasses (one per solver) set ``scheduler_class``, build their per-step tables in
    ``_build_tables`` (1-D tensors of length N, derived from the scheduler object's own tables), and
    implement ``step_no_noise`` (batched, own code) and ``_scheduler_step`` (sequential, diffusers).
    Tables must contain ``noise_std`` and ``tolerance_variance``.
    """

    name: ClassVar[str] = "base"
    scheduler_class: ClassVar[type]
    is_parallel: ClassVar[bool] = False
    # Multistep solvers read earlier steps' data predictions: see `new_history`.
    is_multistep: ClassVar[bool] = False

    def __init__(
        self,
        scheduler_config,
        num_inference_steps: int,
        *,
        timestep_spacing: Optional[str] = None,
        scheduler_kwargs: Optional[dict] = None,
    ):
        check_positive_int("num_inference_steps", num_inference_steps)
        scheduler_kwargs = merge_timestep_spacing(timestep_spacing, scheduler_kwargs)
        self.scheduler = self.scheduler_class.from_config(dict(scheduler_config), **scheduler_kwargs)
        # the spacing in use (the option, else scheduler_kwargs', else the checkpoint config's)
        self.timestep_spacing = self.scheduler.config.get("timestep_spacing")
        num_train = self.scheduler.config.num_train_timesteps
        if num_inference_steps > num_train:
            raise ValueError(
                f"num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps ({num_train})"
            )
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps: torch.Tensor = self.scheduler.timesteps.to(torch.long).clone()
        self.num_inference_steps = len(self.timesteps)
        self._tables: dict[str, torch.Tensor] = self._build_tables()
        self._cache: dict = {}
        # Whether any step adds noise (DDPM, DDIM with eta > 0); if not, no noise is drawn.
        self.is_stochastic = bool((self.noise_std > 0).any())

    # ------------------------------------------------------------------ tables
    def _build_tables(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def noise_std(self) -> torch.Tensor:
        """``[N]``: standard deviation of the Gaussian added at step i (0 for ODE solvers and the last step)."""
        return self._tables["noise_std"]

    @property
    def tolerance_variance(self) -> torch.Tensor:
        """``[N]``: variance that scales the convergence error of the point leaving step i.

        The DDPM posterior variance between step i's timestep and the one it steps to, for every solver
        (ParaDiGMS's convention, ODE solvers included). It is 0 where the step lands on alpha_bar = 1
        (the last step, unless DDIM has ``set_alpha_to_one=False``): a point entering it must be
        exact, i.e. unchanged.
        """
        return self._tables["tolerance_variance"]

    def table(self, name: str, device, dtype) -> torch.Tensor:
        """Table ``name`` (``[N]``) on ``device`` in ``dtype``, cached: no host->device copy per round."""
        key = (name, torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = self._tables[name].to(device=device, dtype=dtype)
        return self._cache[key]

    def coef(self, name: str, steps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` gathered at ``steps`` ``[K]``, shaped ``[K, 1, ...]`` to broadcast against ``like``."""
        values = self.table(name, like.device, like.dtype).index_select(0, steps)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def step_alphas_cumprod(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_from, alpha_to)``, float64 ``[N]`` each: alpha_bar at step i's timestep, and at the noise
        level step i lands on, by the scheduler's own rules.

        ``DDIMScheduler`` (the scheduler has ``final_alpha_cumprod``) steps a fixed stride,
        t - num_train_timesteps // N, and ends on ``final_alpha_cumprod``; the others (DDPM; DPM-Solver
        with ``final_sigmas_type="zero"``) step to the next entry of ``timesteps`` and end on alpha_bar = 1.
        For samplers that step between arbitrary levels (SRDS's coarse step across a block, ParaTAA's
        linear part of a step); the solvers' own tables stay the reference for their steps.
        """
        key = "step_alphas_cumprod"
        if key not in self._cache:
            scheduler = self.scheduler
            alphas = scheduler.alphas_cumprod.to(torch.float64)
            t = self.timesteps
            if hasattr(scheduler, "final_alpha_cumprod"):
                prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
                final = float(scheduler.final_alpha_cumprod)
            else:
                prev_t = torch.cat([t[1:], t.new_tensor([-1])])
                final = 1.0
            alpha_to = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
            self._cache[key] = (alphas[t], alpha_to)
        return self._cache[key]

    def timesteps_on(self, device) -> torch.Tensor:
        key = ("timesteps", torch.device(device))
        if key not in self._cache:
            self._cache[key] = self.timesteps.to(device)
        return self._cache[key]

    # ------------------------------------------------------------------ stepping
    def step_no_noise(
        self,
        x: torch.Tensor,
        model_output: torch.Tensor,
        steps: torch.Tensor,
        history: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Batched deterministic part of the steps: ``x`` ``[K, B, *event]`` at step indices ``steps``
        (LongTensor ``[K]`` on ``x``'s device; positions in ``timesteps``, not timesteps) with their model
        outputs -> ``[K, B, *event]``, the next points without noise. Computed in ``x``'s dtype.
        Points may be at any steps; multistep solvers also need ``history``.
        """
        raise NotImplementedError

    def new_history(self, x_T: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Buffer ``[N, B, *event]`` of per-step data predictions for multistep solvers, else None.

        ``step_no_noise`` writes the predictions of the steps it is given into it and reads those of
        the steps before (so a step's predecessors must have been stepped earlier or in the same call).
        """
        if not self.is_multistep:
            return None
        return x_T.new_zeros((self.num_inference_steps, *x_T.shape), dtype=dtype)

    def _denoised_from_output(self, x, model_output, sqrt_alpha, sqrt_one_minus_alpha):
        """Predicted x0 ``[K, B, *event]`` from the model output, as diffusers' step computes it."""
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (x - sqrt_one_minus_alpha * model_output) / sqrt_alpha
        if kind == "sample":
            return model_output
        if kind == "v_prediction":
            return sqrt_alpha * x - sqrt_one_minus_alpha * model_output
        raise ValueError(f"prediction_type {kind!r} is not supported by {self.name}")

    def _x0_and_eps(self, x, model_output, sqrt_alpha, sqrt_one_minus_alpha):
        """(predicted x0 clipped as the scheduler's step clips it, predicted noise) ``[K, B, *event]`` each,
        for steps written in terms of both (DDIM's update, SRDS's coarse step)."""
        x0 = self._denoised_from_output(x, model_output, sqrt_alpha, sqrt_one_minus_alpha)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            eps = model_output
        elif kind == "sample":
            eps = (x - sqrt_alpha * x0) / sqrt_one_minus_alpha
        else:  # v_prediction (others were rejected by _denoised_from_output)
            eps = sqrt_alpha * model_output + sqrt_one_minus_alpha * x
        return self._clip_denoised(x0), eps

    def _clip_denoised(self, x0: torch.Tensor, allow_clip: bool = True) -> torch.Tensor:
        """Threshold or clip predicted x0 exactly when the scheduler's own step does.

        ``allow_clip=False`` for schedulers whose step ignores ``clip_sample`` (DPMSolver keeps the key of
        a DDPM config it was built from, but never clips).
        """
        config = self.scheduler.config
        if config.get("thresholding", False):
            # diffusers thresholds each sample of dim 0; fold the K trajectory points into that dim.
            flat = x0.reshape(-1, *x0.shape[2:])
            return self.scheduler._threshold_sample(flat).reshape(x0.shape)
        if allow_clip and config.get("clip_sample", False):
            limit = config.get("clip_sample_range", 1.0)
            return x0.clamp(-limit, limit)
        return x0

    # ------------------------------------------------------------------ noise / init
    def check_x_T(self, x_T: torch.Tensor) -> None:
        if not torch.is_tensor(x_T) or not x_T.is_floating_point() or x_T.ndim < 1:
            raise ValueError("x_T must be a floating-point tensor [B, *event]")

    def unit_noise(self, x_T, noise=None, generator=None) -> Optional[torch.Tensor]:
        """``[N, B, *event]`` unit Gaussians in ``x_T``'s dtype, or None for a deterministic sampler.

        A given ``noise`` is validated (and moved); otherwise it is drawn from ``generator`` with one
        ``torch.randn`` call on the generator's device.
        """
        expected = (self.num_inference_steps, *x_T.shape)
        if noise is not None:
            if tuple(noise.shape) != expected:
                raise ValueError(
                    f"noise must have shape [num_inference_steps, *x_T.shape] = {list(expected)}, "
                    f"got {list(noise.shape)}"
                )
            return noise.to(device=x_T.device, dtype=x_T.dtype) if self.is_stochastic else None
        if not self.is_stochastic:
            return None
        device = generator.device if generator is not None else x_T.device
        drawn = torch.randn(expected, generator=generator, device=device, dtype=accumulation_dtype(x_T.dtype))
        return drawn.to(device=x_T.device, dtype=x_T.dtype)

    def scaled_noise(self, x_T, noise=None, generator=None, dtype=None) -> Optional[torch.Tensor]:
        """``[N, B, *event]`` noise already scaled by each step's std (``noise_std[i] * noise[i]``), or None."""
        unit = self.unit_noise(x_T, noise, generator)
        if unit is None:
            return None
        dtype = dtype or accumulation_dtype(x_T.dtype)
        std = self.table("noise_std", x_T.device, dtype).view(-1, *([1] * x_T.ndim))
        return std * unit.to(dtype)

    def initial_trajectory(self, x_T, init=None, dtype=None) -> torch.Tensor:
        """``[N + 1, B, *event]`` starting guess in ``dtype``: ``init`` if given (with init[0] := x_T,
        since x_T is authoritative), else x_T everywhere (ParaDiGMS)."""
        dtype = dtype or accumulation_dtype(x_T.dtype)
        shape = (self.num_inference_steps + 1, *x_T.shape)
        if init is None:
            return x_T.to(dtype).expand(shape).clone()
        if tuple(init.shape) != shape:
            raise ValueError(
                f"init must have shape [num_inference_steps + 1, *x_T.shape] = {list(shape)}, got {list(init.shape)}"
            )
        trajectory = init.to(device=x_T.device, dtype=dtype, copy=True)
        trajectory[0] = x_T
        return trajectory

    def guess_trajectory(self, x_T, x0_guess, noise=None, rule: str = "rollout") -> torch.Tensor:
        """A warm-start ``init`` ``[N + 1, B, *event]`` built from a guess of the clean sample ``x0_guess``.

        ``rule="rollout"``: the trajectory this sampler would produce from ``x_T`` and ``noise`` if the
        denoiser predicted ``x0_guess`` at every step (the solver's own steps and noise, no model call),
        so a right guess is already the fixed point. ``rule="marginal"``: each point on the forward
        diffusion marginal, sqrt(a_i) x0 + sqrt(1 - a_i) x_T at step i's noise level, x_N = x0.
        ``noise`` must be the unit noise the sampler will use (None for a deterministic sampler).
        """
        acc = accumulation_dtype(x_T.dtype)
        x0 = x0_guess.to(device=x_T.device, dtype=acc)
        alpha_from, _ = self.step_alphas_cumprod()
        alpha = alpha_from.to(device=x_T.device, dtype=acc).view(-1, *([1] * x_T.ndim))  # [N, 1, ...]
        if rule == "marginal":
            points = alpha.sqrt() * x0 + (1 - alpha).sqrt() * x_T.to(acc)
            points[0] = x_T  # x_T is authoritative (alpha_bar at the first step is small, not 0)
            return torch.cat([points, x0[None]])
        if rule != "rollout":
            raise ValueError(f"unknown warm-start rule {rule!r}; use 'rollout' or 'marginal'")
        scaled = self.scaled_noise(x_T, noise, None, acc) if self.is_stochastic else None
        history = self.new_history(x_T, acc)
        kind = self.scheduler.config.prediction_type
        trajectory = x_T.new_empty((self.num_inference_steps + 1, *x_T.shape), dtype=acc)
        trajectory[0] = x_T
        steps = torch.arange(self.num_inference_steps, device=x_T.device)
        # N tiny elementwise steps, no model call (~ms on CPU); the model output that implies x0_guess
        for i in range(self.num_inference_steps):
            x, a = trajectory[i], alpha[i]
            if kind == "epsilon":
                output = (x - a.sqrt() * x0) / (1 - a).sqrt()
            elif kind == "sample":
                output = x0
            else:  # v_prediction: x0 = sqrt(a) x - sqrt(1 - a) v
                output = (a.sqrt() * x - x0) / (1 - a).sqrt()
            nxt = self.step_no_noise(x[None], output[None], steps[i : i + 1], history)[0]
            trajectory[i + 1] = nxt + scaled[i] if scaled is not None else nxt
        return trajectory

    # ------------------------------------------------------------------ sliding windows
    def _slide_window(self, trajectory, begin: int, end: int, advance: int, window: int, warm: bool) -> int:
        """Move a window [begin, end) past its ``advance`` verified points; returns the new begin.

        Points entering the window start as copies of the old window's last point (ParaDiGMS), unless
        a warm start (``warm``) already put a guess there.
        """
        new_begin = begin + int(advance)
        new_end = min(new_begin + window, self.num_inference_steps)
        if not warm and new_end > end:
            trajectory[end + 1 : new_end + 1] = trajectory[end]
        return new_begin

    # ------------------------------------------------------------------ sampling
    def _reset_scheduler(self) -> None:
        """Clear the scheduler's per-sample state (multistep history, step index) before a sequential run."""
        self.scheduler.set_timesteps(self.num_inference_steps)

    def _scheduler_step(self, model_output, step: int, x, unit_noise) -> torch.Tensor:
        """One sequential step driven by diffusers' ``scheduler.step``; ``unit_noise`` ``[B, *event]`` or None."""
        raise NotImplementedError

    def sample(self, denoise: Denoiser, x_T: torch.Tensor, noise=None, generator=None, init=None) -> SampleOutput:
        """Sequential sampling: N calls of ``denoise`` with K = 1. ``init`` is accepted and ignored."""
        self.check_x_T(x_T)
        unit = self.unit_noise(x_T, noise, generator)
        self._reset_scheduler()
        timesteps = self.timesteps_on(x_T.device)
        trajectory = x_T.new_empty((self.num_inference_steps + 1, *x_T.shape))
        trajectory[0] = x = x_T
        for i in range(self.num_inference_steps):
            model_output = denoise(x.unsqueeze(0), timesteps[i : i + 1]).squeeze(0)
            x = self._scheduler_step(model_output, i, x, None if unit is None else unit[i])
            trajectory[i + 1] = x
        n = self.num_inference_steps
        return SampleOutput(sample=x, rounds=n, model_evals=n, errors=[], converged=True, trajectory=trajectory)

    # ------------------------------------------------------------------ misc
    @classmethod
    def option_names(cls) -> list[str]:
        """Keyword options accepted by the constructor (collected over the class hierarchy)."""
        names = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                params = inspect.signature(init).parameters.values()
                names |= {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        return sorted(names)

    def __repr__(self) -> str:
        # Every constructor option that the sampler keeps under its own name (scheduler_kwargs is not kept).
        options = "".join(f", {key}={getattr(self, key)!r}" for key in self.option_names() if hasattr(self, key))
        return f"{type(self).__name__}(name={self.name!r}, num_inference_steps={self.num_inference_steps}{options})"


def check_tolerance(name: str, value) -> float:
    """A finite number >= 0 (a tolerance, a ridge), as float; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_deadline(deadline_ms) -> Optional[float]:
    """None, or a number of milliseconds >= 0."""
    if deadline_ms is not None and (
        isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)) or not deadline_ms >= 0
    ):
        raise ValueError(f"deadline_ms must be None or a number >= 0, got {deadline_ms!r}")
    return deadline_ms


class ParallelSampler(Sampler):
    """What Picard, SRDS and ParaTAA share: they solve every step at once, in rounds, until a ``tolerance``
    is met, a round budget is spent, or ``deadline_ms`` has passed since ``sample()`` began.

    A subclass calls ``_set_stopping(tolerance, deadline_ms)`` before the solver's ``__init__`` and, if it
    counts rounds (Picard, ParaTAA; SRDS counts iterations), ``_set_round_budget(name, value)`` after it
    (the default budget is N rounds, known only then); ``sample()`` takes ``started = self._clock()``
    first and asks ``_past_deadline(started)`` or ``_out_of_budget(rounds, started)`` after each round.
    """

    is_parallel: ClassVar[bool] = True
    max_rounds: int

    def _set_stopping(self, tolerance, deadline_ms) -> None:
        self.tolerance = check_tolerance("tolerance", tolerance)
        self.deadline_ms = check_deadline(deadline_ms)

    def _set_round_budget(self, name: str, value: Optional[int]) -> int:
        """``value`` checked (default: N), kept as ``max_rounds``; returns it."""
        self.max_rounds = self.num_inference_steps if value is None else check_positive_int(name, value)
        return self.max_rounds

    @staticmethod
    def _clock() -> float:
        return time.perf_counter()

    def _past_deadline(self, started: float) -> bool:
        """``deadline_ms`` passed since ``started`` (a ``_clock()`` time); a round ending exactly on it goes on."""
        return self.deadline_ms is not None and (self._clock() - started) * 1e3 > self.deadline_ms

    def _out_of_budget(self, rounds: int, started: float) -> bool:
        """``max_rounds`` reached, or ``deadline_ms`` passed since ``started``."""
        return rounds >= self.max_rounds or self._past_deadline(started)
