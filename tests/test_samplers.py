"""Sampler core: sequential solvers against diffusers, parallel (Picard) samplers against their twins."""

from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import nn

from parapolicy.samplers import SAMPLERS, SampleOutput, make_sampler

# The policy's scheduler, and one that differs in every table: linear betas, 1000 train steps, no clipping.
POLICY = DDPMScheduler(
    num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True, prediction_type="epsilon"
).config
LINEAR = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, prediction_type="epsilon").config
CLIP = {"thresholding": True, "sample_max_value": 1.0}  # DPM-Solver's way to clip to [-1, 1]

# id -> (sequential name, config, num_inference_steps, options)
CASES = {
    "ddpm-policy": ("ddpm", POLICY, 100, {}),
    "ddim-policy": ("ddim", POLICY, 15, {}),
    "dpmsolver-policy": ("dpmsolver", POLICY, 15, {}),
    "dpmsolver3-clip-policy": ("dpmsolver", POLICY, 15, {"solver_order": 3, "scheduler_kwargs": CLIP}),
    "ddpm-linear": ("ddpm", LINEAR, 50, {}),
    # uneven strides between timesteps: the previous timestep must be the next entry, not t - stride
    "ddpm-linear-linspace": ("ddpm", LINEAR, 30, {"scheduler_kwargs": {"timestep_spacing": "linspace"}}),
    "ddim-linear-final-alpha": ("ddim", LINEAR, 20, {"scheduler_kwargs": {"set_alpha_to_one": False}}),
    "ddim-eta-linear": ("ddim", LINEAR, 20, {"eta": 0.7, "scheduler_kwargs": {"set_alpha_to_one": False}}),
    "dpmsolver3-linear": ("dpmsolver", LINEAR, 10, {"solver_order": 3}),
    # "trailing" spacing (first-class option): starts at t = 99, DDIM's fixed stride lands step 0 on 93
    "ddim-policy-trailing": ("ddim", POLICY, 15, {"timestep_spacing": "trailing"}),
    "dpmsolver-policy-trailing": ("dpmsolver", POLICY, 15, {"timestep_spacing": "trailing"}),
    "ddpm-policy-trailing": ("ddpm", POLICY, 20, {"timestep_spacing": "trailing"}),
}
SCHEDULER_CLASSES = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}
BATCH, HORIZON, ACTION_DIM = 3, 8, 2
TINY = 1e-8


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class TinyTimeConv(nn.Module):
    """A ConditionalUnet1D in miniature: time embedding -> FiLM on a 1-D conv over the horizon."""

    def __init__(self, action_dim: int = ACTION_DIM, hidden: int = 16, embed: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(embed // 2) / (embed // 2)))
        self.time_mlp = nn.Sequential(nn.Linear(embed, hidden), nn.Mish(), nn.Linear(hidden, 2 * hidden))
        self.conv_in = nn.Conv1d(action_dim, hidden, 3, padding=1)
        self.conv_out = nn.Conv1d(hidden, action_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # [N, H, A], [N] -> [N, H, A]
        angles = t.to(x.dtype)[:, None] * self.freqs.to(x.dtype)
        scale, bias = self.time_mlp(torch.cat([angles.sin(), angles.cos()], -1)).chunk(2, -1)
        h = nn.functional.mish(self.conv_in(x.transpose(1, 2)))
        h = h * (1 + scale[..., None]) + bias[..., None]
        return self.conv_out(nn.functional.mish(h)).transpose(1, 2)


def net_denoiser(dtype=torch.float64, seed=0):
    """Time-batched wrapper: x [K, B, H, A], t [K] -> [K, B, H, A]."""
    torch.manual_seed(seed)
    net = TinyTimeConv().to(dtype)

    @torch.no_grad()
    def denoise(x, t):
        k, b = x.shape[:2]
        return net(x.reshape(k * b, *x.shape[2:]), t.repeat_interleave(b)).reshape(x.shape)

    return denoise


def analytic_denoiser(config, mean=0.3, std=0.4):
    """Exact model output for data x0 ~ N(mean, std^2 I), under the config's prediction type."""
    alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod.double()
    kind = config["prediction_type"]

    def denoise(x, t):
        a = alphas_cumprod.to(x.device)[t].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * std**2 + 1 - a)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]

    return denoise


def denoiser(kind, config, dtype=torch.float64):
    return analytic_denoiser(config) if kind == "analytic" else net_denoiser(dtype)


def inputs(n, dtype=torch.float64, seed=1, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, HORIZON, ACTION_DIM, generator=g, dtype=dtype)
    noise = torch.randn(n, batch, HORIZON, ACTION_DIM, generator=g, dtype=dtype)
    return x_T, noise


def reference_kwargs(options: dict) -> dict:
    """The diffusers scheduler overrides a case's sampler options stand for."""
    kwargs = dict(options.get("scheduler_kwargs", {}))
    if "timestep_spacing" in options:
        kwargs["timestep_spacing"] = options["timestep_spacing"]
    return kwargs


def pair(case, **parallel_options):
    name, config, n, options = CASES[case]
    return (
        make_sampler(name, config, n, **options),
        make_sampler("para" + name, config, n, **options, **parallel_options),
    )


# ---------------------------------------------------------------------------------------------- API
@pytest.mark.parametrize("steps", [1, 10])
def test_registry_and_attributes(steps):
    assert {"ddpm", "ddim", "dpmsolver", "paraddpm", "paraddim", "paradpmsolver"} <= set(SAMPLERS)
    x_T, _ = inputs(steps)
    for name, cls in SAMPLERS.items():
        sampler = make_sampler(name, POLICY, steps)
        assert sampler.name == name and cls.name == name
        assert sampler.is_parallel == name.startswith("para")
        assert sampler.is_stochastic == (name.endswith("ddpm") and steps > 1)
        assert sampler.num_inference_steps == steps
        assert sampler.timesteps.dtype == torch.long and sampler.timesteps.shape == (steps,)
        assert torch.all(sampler.timesteps[:-1] > sampler.timesteps[1:])
        assert sampler.noise_std[-1] == 0
        out = sampler.sample(analytic_denoiser(POLICY), x_T, generator=torch.Generator().manual_seed(0))
        assert out.converged and out.sample.shape == x_T.shape and out.trajectory.shape == (steps + 1, *x_T.shape)


def test_repr_shows_the_options_in_use():
    sampler = make_sampler("paraddim", POLICY, 10, window=4, tolerance=0.5, eta=0.3)
    assert repr(sampler) == ("ParaDDIMSampler(name='paraddim', num_inference_steps=10, deadline_ms=None, "
                             "eta=0.3, max_rounds=10, timestep_spacing='leading', tolerance=0.5, window=4)")
    assert "num_blocks=3" in repr(make_sampler("parasrdsddpm", POLICY, 10, num_blocks=3))


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("ddpmm", {}, "known samplers: ddim, ddpm, dpmsolver, paraddim, paraddpm, paradpmsolver"),
        ("paraddpm", {"window": 0}, "window must be"),
        ("paraddpm", {"window": 2.5}, "window must be"),
        ("paraddim", {"tolerance": -0.1}, "tolerance must be"),
        # a bool is an int to Python, and a string must not reach a comparison (TypeError, not a clear error)
        ("paraddim", {"tolerance": True}, "tolerance must be"),
        ("paraddim", {"tolerance": "0.1"}, "tolerance must be"),
        ("paradpmsolver", {"max_rounds": 0}, "max_rounds must be"),
        ("paraddpm", {"deadline_ms": -1}, "deadline_ms must be"),
        ("paraddpm", {"deadline_ms": True}, "deadline_ms must be"),
        ("paraddpm", {"deadline_ms": "5"}, "deadline_ms must be"),
        ("ddim", {"eta": -1.0}, "eta"),
        ("dpmsolver", {"solver_order": 4}, "solver_order"),
        ("ddpm", {"window": 4}, "does not take option(s) ['window']"),
    ],
)
def test_bad_options_raise_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_sampler(name, POLICY, 10, **options)


@pytest.mark.parametrize("steps", [0, 101])
def test_bad_num_inference_steps(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("paraddpm", POLICY, steps)


@pytest.mark.parametrize("name", ["ddpm", "paraddpm", "paraddim"])
def test_bad_noise_and_init_shapes(name):
    sampler = make_sampler(name, POLICY, 10)
    x_T, noise = inputs(10)
    denoise = analytic_denoiser(POLICY)
    with pytest.raises(ValueError, match="noise must have shape"):
        sampler.sample(denoise, x_T, noise=noise[:9])
    if sampler.is_parallel:
        with pytest.raises(ValueError, match="init must have shape"):
            sampler.sample(denoise, x_T, noise=noise, init=noise)


# ---------------------------------------------------------------- batched step vs diffusers' step
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("case", list(CASES))
def test_batched_step_matches_scheduler_step(case, prediction_type):
    """Our vectorised no-noise step over all N steps at once (in shuffled order) equals diffusers'
    scheduler.step taken one step at a time on the same inputs, noise removed."""
    name, config, n, options = CASES[case]
    config = {**config, "prediction_type": prediction_type}
    sampler = make_sampler(name, config, n, **options)
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(n, BATCH, HORIZON, ACTION_DIM, generator=g, dtype=torch.float64)
    model_output = torch.randn(n, BATCH, HORIZON, ACTION_DIM, generator=g, dtype=torch.float64)

    order = torch.randperm(n, generator=g)
    ours = torch.empty_like(x)
    ours[order] = sampler.step_no_noise(x[order], model_output[order], order)

    scheduler = SCHEDULER_CLASSES[name].from_config(config, **reference_kwargs(options))
    if name == "dpmsolver":
        scheduler = DPMSolverMultistepScheduler.from_config(
            config, **reference_kwargs(options), solver_order=options.get("solver_order", 2)
        )
    scheduler.set_timesteps(n)
    expected = torch.empty_like(x)
    for i, t in enumerate(scheduler.timesteps):
        if name == "ddpm":  # step adds noise drawn from our seeded generator: draw it again and remove it
            out = scheduler.step(model_output[i], t, x[i], generator=torch.Generator().manual_seed(i)).prev_sample
            if t > 0:
                z = torch.randn(x[i].shape, generator=torch.Generator().manual_seed(i), dtype=x.dtype)
                out = out - scheduler._get_variance(t) ** 0.5 * z
        elif name == "ddim":
            eta = options.get("eta", 0.0)
            out = scheduler.step(model_output[i], t, x[i], eta=eta, variance_noise=torch.zeros_like(x[i])).prev_sample
        else:
            out = scheduler.step(model_output[i], t, x[i]).prev_sample
        expected[i] = out
    # DPM-Solver's step runs its sample in float32 whatever the input dtype; the others are float64.
    assert rel_err(ours, expected) < (1e-6 if name == "dpmsolver" else 1e-13)


# ---------------------------------------------------------------- sequential vs diffusers' own loop
@pytest.mark.parametrize("case", [c for c in CASES if "eta" not in c])
def test_sequential_matches_diffusers_loop(case):
    """The plain diffusers sampling loop (its generator drawing DDPM's noise) equals our sequential
    sampler fed the same noise under our convention."""
    name, config, n, options = CASES[case]
    denoise = net_denoiser()
    x_T, _ = inputs(n)
    sampler = make_sampler(name, config, n, **options)
    scheduler = SCHEDULER_CLASSES[name].from_config(
        config, **reference_kwargs(options), **({"solver_order": options["solver_order"]} if "solver_order" in options else {})
    )
    scheduler.set_timesteps(n)
    generator = torch.Generator().manual_seed(7)
    x = x_T
    for t in scheduler.timesteps:
        kwargs = {"generator": generator} if name == "ddpm" else {}
        x = scheduler.step(denoise(x[None], t[None])[0], t, x, **kwargs).prev_sample

    noise = None
    if name == "ddpm":  # diffusers draws one randn per step with t > 0: all steps but the last
        generator = torch.Generator().manual_seed(7)
        draws = [torch.randn(x_T.shape, generator=generator, dtype=x_T.dtype) for _ in range(n - 1)]
        noise = torch.stack(draws + [torch.zeros_like(x_T)])
    rng_state = torch.get_rng_state()
    out = sampler.sample(denoise, x_T, noise=noise)
    assert torch.equal(torch.get_rng_state(), rng_state), "sequential sampling must leave the global RNG alone"
    assert out.rounds == out.model_evals == n and out.converged
    assert torch.equal(out.trajectory[0], x_T) and torch.equal(out.trajectory[-1], out.sample)
    if name == "ddpm":
        # a last step at t > 0 ("trailing" ends at t = 6): diffusers adds 1e-10 * noise there, we add none
        assert rel_err(out.sample, x) < (1e-13 if int(scheduler.timesteps[-1]) == 0 else 1e-9)
    else:
        assert torch.equal(out.sample, x)


# ------------------------------------------------------------------ parallel vs sequential twin
@pytest.mark.parametrize("kind", ["analytic", "net"])
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_matches_sequential(case, kind):
    """float64, tau = 1e-8: Picard converges to the sequential trajectory for the same noise."""
    sequential, parallel = pair(case, tolerance=TINY)
    denoise = denoiser(kind, CASES[case][1])
    x_T, noise = inputs(sequential.num_inference_steps)
    expected = sequential.sample(denoise, x_T, noise=noise)
    out = parallel.sample(denoise, x_T, noise=noise)
    assert isinstance(out, SampleOutput) and out.converged
    assert out.sample.shape == x_T.shape and out.trajectory.shape == expected.trajectory.shape
    assert rel_err(out.sample, expected.sample) < 1e-6
    assert rel_err(out.trajectory, expected.trajectory) < 1e-6
    assert out.rounds <= parallel.num_inference_steps and len(out.errors) == out.rounds
    assert out.model_evals >= parallel.num_inference_steps


@pytest.mark.parametrize("case", list(CASES))
def test_window_one_is_sequential(case):
    sequential, parallel = pair(case, window=1)
    denoise = net_denoiser()
    x_T, noise = inputs(sequential.num_inference_steps)
    expected = sequential.sample(denoise, x_T, noise=noise)
    out = parallel.sample(denoise, x_T, noise=noise)
    n = parallel.num_inference_steps
    assert out.rounds == out.model_evals == n and out.converged
    assert rel_err(out.trajectory, expected.trajectory) < (1e-6 if "dpmsolver" in case else 1e-13)


def test_generator_draws_the_same_noise():
    sequential, parallel = pair("ddpm-policy", tolerance=TINY)
    denoise = analytic_denoiser(POLICY)
    x_T, _ = inputs(100)
    a = sequential.sample(denoise, x_T, generator=torch.Generator().manual_seed(3))
    b = parallel.sample(denoise, x_T, generator=torch.Generator().manual_seed(3))
    c = parallel.sample(denoise, x_T, generator=torch.Generator().manual_seed(4))
    assert rel_err(b.sample, a.sample) < 1e-6
    assert rel_err(c.sample, a.sample) > 1e-2


# ---------------------------------------------------------------------------- speed and budgets
@pytest.mark.parametrize(
    "case, kind", [("ddpm-policy", "analytic"), ("ddim-policy", "analytic"), ("dpmsolver-policy", "analytic"), ("ddpm-policy", "net")]
)
def test_default_tolerance_saves_rounds(case, kind):
    """tau = 0.1, window 16, float32, smooth denoisers: far fewer rounds than steps, close to sequential.
    (A random net is no smooth denoiser for the ODE solvers: DDIM-15 needs ~13 rounds on it.)"""
    sequential, parallel = pair(case)
    denoise = denoiser(kind, POLICY, torch.float32)
    x_T, noise = inputs(sequential.num_inference_steps, torch.float32)
    expected = sequential.sample(denoise, x_T, noise=noise)
    out = parallel.sample(denoise, x_T, noise=noise)
    n = parallel.num_inference_steps
    assert out.converged
    assert out.rounds < n / 2, out.rounds
    assert n <= out.model_evals <= out.rounds * parallel.window
    assert (out.sample - expected.sample).abs().max() < 0.05


def test_rounds_and_evals_are_counted_from_denoise_calls():
    _, parallel = pair("ddpm-policy", window=8)
    calls = []
    analytic = analytic_denoiser(POLICY)

    def denoise(x, t):
        assert t.dtype == torch.long and t.shape == x.shape[:1] and x.shape[1:] == (BATCH, HORIZON, ACTION_DIM)
        calls.append(len(t))
        return analytic(x, t)

    x_T, noise = inputs(100)
    out = parallel.sample(denoise, x_T, noise=noise)
    assert out.rounds == len(calls) and out.model_evals == sum(calls) and max(calls) <= 8


@pytest.mark.parametrize("max_rounds", [1, 3, 10])
@pytest.mark.parametrize("case", ["ddpm-policy", "dpmsolver-policy"])
def test_max_rounds_is_respected(case, max_rounds):
    _, parallel = pair(case, tolerance=TINY, max_rounds=max_rounds)
    x_T, noise = inputs(parallel.num_inference_steps)
    out = parallel.sample(net_denoiser(), x_T, noise=noise)
    assert out.rounds == max_rounds and not out.converged
    assert torch.equal(out.sample, out.trajectory[-1])


def test_deadline_stops_after_one_round():
    _, parallel = pair("ddpm-policy", deadline_ms=0)
    x_T, noise = inputs(100)
    out = parallel.sample(analytic_denoiser(POLICY), x_T, noise=noise)
    assert out.rounds == 1 and out.model_evals == 16 and not out.converged
    assert torch.equal(out.sample, out.trajectory[-1])
    _, relaxed = pair("ddpm-policy", deadline_ms=1e9)
    assert relaxed.sample(analytic_denoiser(POLICY), x_T, noise=noise).converged


def test_last_step_input_must_be_exact():
    """The last step adds no noise (tolerance variance 0): with an enormous tolerance everything else
    passes at once, but the window still has to stop at the last step's input for one more round."""
    _, parallel = pair("ddim-policy", tolerance=1e6)
    assert parallel.tolerance_variance[-1] == 0 and (parallel.tolerance_variance[:-1] > 0).all()
    x_T, _ = inputs(15)
    out = parallel.sample(analytic_denoiser(POLICY), x_T)
    assert out.rounds == 2 and out.model_evals == 15 + 1 and out.converged


def test_points_entering_the_window_start_from_its_last_point():
    """ParaDiGMS: the window starts as copies of x_T; when it slides, entering points start as copies
    of the last point just computed (x_16 after round one). A warm start keeps its own guesses."""
    _, one_round = pair("ddpm-policy", max_rounds=1)
    denoise = analytic_denoiser(POLICY)
    x_T, noise = inputs(100)
    trajectory = one_round.sample(denoise, x_T, noise=noise).trajectory
    assert not torch.equal(trajectory[16], x_T)
    assert torch.equal(trajectory[17], trajectory[16]) and torch.equal(trajectory[-1], x_T)

    init = torch.randn(101, *x_T.shape, dtype=x_T.dtype)
    trajectory = one_round.sample(denoise, x_T, noise=noise, init=init).trajectory
    assert torch.equal(trajectory[17:], init[17:])


def test_batch_advances_by_its_worst_sample():
    """A sample that barely moves (mu = 0 makes the dynamics linear, and it is scaled by 1e-6) does
    not let the batch advance sooner than its hard sample alone would."""
    _, parallel = pair("ddim-policy")
    denoise = analytic_denoiser(POLICY, mean=0.0)
    x_T, _ = inputs(15, batch=1)
    alone = parallel.sample(denoise, x_T)
    both = parallel.sample(denoise, torch.cat([x_T, 1e-6 * x_T]))
    assert both.rounds == alone.rounds > 2
    assert rel_err(both.sample[:1], alone.sample) < 1e-12


# --------------------------------------------------------------------------- batching, warm starts
@pytest.mark.parametrize("case", ["ddpm-policy", "ddim-linear-final-alpha", "dpmsolver3-linear"])
def test_batch_equals_one_at_a_time(case):
    sequential, parallel = pair(case, tolerance=TINY)
    denoise = net_denoiser()
    x_T, noise = inputs(sequential.num_inference_steps)
    for sampler in (sequential, parallel):
        batched = sampler.sample(denoise, x_T, noise=noise).sample
        single = torch.cat([sampler.sample(denoise, x_T[i : i + 1], noise=noise[:, i : i + 1]).sample for i in range(BATCH)])
        assert rel_err(batched, single) < 1e-6


@pytest.mark.parametrize("case", ["ddpm-policy", "ddim-policy", "dpmsolver3-clip-policy"])
def test_init_warm_start(case):
    sequential, parallel = pair(case)
    denoise = net_denoiser()
    x_T, noise = inputs(sequential.num_inference_steps)
    expected = sequential.sample(denoise, x_T, noise=noise)
    n, p = parallel.num_inference_steps, parallel.window

    # The true trajectory (with a wrong x_0, which x_T overrides) is confirmed window by window.
    init = expected.trajectory.clone()
    init[0] = 5.0
    warm = parallel.sample(denoise, x_T, noise=noise, init=init)
    assert warm.converged and warm.rounds <= math.ceil(n / p) + 1
    assert rel_err(warm.sample, expected.sample) < 1e-6
    cold = parallel.sample(denoise, x_T, noise=noise)
    assert warm.rounds < cold.rounds

    # A random guess still converges to the same sample.
    _, exact = pair(case, tolerance=TINY)
    out = exact.sample(denoise, x_T, noise=noise, init=torch.randn_like(expected.trajectory))
    assert out.converged and rel_err(out.sample, expected.sample) < 1e-6


def test_sequential_ignores_init():
    sequential, _ = pair("ddim-policy")
    denoise = net_denoiser()
    x_T, _ = inputs(15)
    init = torch.randn(16, *x_T.shape, dtype=x_T.dtype)
    assert torch.equal(sequential.sample(denoise, x_T, init=init).sample, sequential.sample(denoise, x_T).sample)


def test_low_precision_model():
    """bfloat16 model inputs and outputs; the trajectory sums stay float32."""
    sequential, parallel = pair("ddim-policy")
    analytic = analytic_denoiser(POLICY)
    seen = []

    def denoise(x, t):
        seen.append(x.dtype)
        return analytic(x, t)

    x_T, _ = inputs(15, torch.float32)
    out = parallel.sample(denoise, x_T.bfloat16())
    assert out.sample.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16} and out.converged
    reference = sequential.sample(analytic, x_T).sample
    assert (out.sample.float() - reference).abs().max() < 0.05


@pytest.mark.parametrize("case", ["ddim-policy", "dpmsolver-policy"])
def test_low_precision_model_leaves_the_sums_in_float32(case):
    """A bfloat16 model changes only what the model sees and returns: trajectory, multistep history and
    convergence test stay float32, so the run equals a float32 run whose model rounds its input and
    output to bfloat16 (exactly: same rounds, same sample)."""
    _, parallel = pair(case)
    analytic = analytic_denoiser(POLICY)
    x_T = inputs(15, torch.float32)[0].bfloat16()
    low = parallel.sample(analytic, x_T)
    wide = parallel.sample(lambda x, t: analytic(x.bfloat16(), t).float(), x_T.float())
    assert low.sample.dtype == torch.bfloat16 and wide.sample.dtype == torch.float32
    assert low.rounds == wide.rounds and torch.equal(low.sample, wide.sample.bfloat16())


def test_deadline_counts_milliseconds_since_the_call(monkeypatch):
    """deadline_ms: stop after the first round that ends more than deadline_ms after sample() was called.
    A fake clock (each model call takes one second) makes rounds end at 1, 2, 3, 4 s: 3 s is not past
    3000 ms, 4 s is."""
    from parapolicy.samplers import base

    clock = [100.0]
    monkeypatch.setattr(base, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    model = net_denoiser()

    def denoise(x, t):
        clock[0] += 1.0
        return model(x, t)

    x_T, noise = inputs(20)
    sampler = make_sampler("paraddpm", POLICY, 20, window=4, tolerance=0, deadline_ms=3000)
    out = sampler.sample(denoise, x_T, noise=noise)
    assert out.rounds == 4 and not out.converged  # a window of 4 cannot finish 20 steps in 4 rounds


def test_a_warm_start_is_read_not_written():
    """The caller's ``init`` comes back unchanged (the sampler iterates on its own copy)."""
    _, parallel = pair("ddpm-policy", tolerance=0.1)
    x_T, noise = inputs(100)
    init = torch.randn(101, *x_T.shape, dtype=x_T.dtype, generator=torch.Generator().manual_seed(3))
    before = init.clone()
    parallel.sample(net_denoiser(), x_T, noise=noise, init=init)
    assert torch.equal(init, before)


# ------------------------------------------------------------------------------- timestep spacing
TRAILING_15 = [99, 92, 86, 79, 72, 66, 59, 52, 46, 39, 32, 26, 19, 12, 6]  # diffusers, N = 15 of T = 100


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_timestep_spacing_option_reaches_the_scheduler(name):
    """``timestep_spacing`` (first-class) and ``scheduler_kwargs.timestep_spacing`` (kept for old
    commands) both set the diffusers scheduler's spacing; the checkpoint config's ("leading") otherwise."""
    saved = {k: v for k, v in POLICY.items() if not k.startswith("_")}  # as a checkpoint stores it
    default = make_sampler(name, saved, 15)
    assert default.scheduler.config.timestep_spacing == default.timestep_spacing == "leading"
    assert int(default.timesteps[0]) < 99
    for options in ({"timestep_spacing": "trailing"}, {"scheduler_kwargs": {"timestep_spacing": "trailing"}}):
        sampler = make_sampler(name, POLICY, 15, **options)
        assert sampler.scheduler.config.timestep_spacing == sampler.timestep_spacing == "trailing"
        assert sampler.timesteps.tolist() == TRAILING_15
        assert "timestep_spacing='trailing'" in repr(sampler)
    linspace = make_sampler(name, POLICY, 15, timestep_spacing="linspace")
    assert linspace.scheduler.config.timestep_spacing == "linspace" and int(linspace.timesteps[0]) == 99


@pytest.mark.parametrize("options, message", [
    ({"timestep_spacing": "trailling"}, "timestep_spacing must be one of leading, trailing, linspace"),
    ({"scheduler_kwargs": {"timestep_spacing": "end"}}, "scheduler_kwargs.timestep_spacing must be one of"),
    ({"timestep_spacing": "trailing", "scheduler_kwargs": {"timestep_spacing": "leading"}}, "contradicts"),
])
def test_bad_timestep_spacing(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_sampler("paraddim", POLICY, 15, **options)


@pytest.mark.parametrize("kind", ["analytic", "net"])
@pytest.mark.parametrize("name, steps", [("paraddim", 15), ("paradpmsolver", 15), ("parasrdsddim", 15),
                                         ("parataaddim", 15), ("parasrdsddim", 10), ("parataaddim", 10)])
def test_parallel_matches_sequential_with_trailing_spacing(name, steps, kind):
    """float64, tau = 1e-8, "trailing": every parallel DDIM / DPM-Solver sampler converges to its
    sequential twin's trajectory (their tables follow the scheduler's own step rule for any spacing)."""
    twin = name.removeprefix("parasrds").removeprefix("parataa").removeprefix("para")
    sequential = make_sampler(twin, POLICY, steps, timestep_spacing="trailing")
    parallel = make_sampler(name, POLICY, steps, timestep_spacing="trailing", tolerance=TINY)
    assert parallel.timesteps.tolist() == sequential.timesteps.tolist() and int(parallel.timesteps[0]) == 99
    # SRDS / ParaTAA step between noise levels with these; they must match the solver's own tables
    alpha_from, alpha_to = parallel.step_alphas_cumprod()
    alphas = sequential.scheduler.alphas_cumprod.double()
    assert torch.equal(alpha_from, alphas[sequential.timesteps])
    if twin == "ddim":  # DDIMScheduler.step: t - T // N (N = 15: 99 -> 93, last step 6 -> 0; N = 10: 9 -> "1")
        prev = sequential.timesteps - 100 // steps
        final = torch.tensor(1.0, dtype=torch.float64)  # set_alpha_to_one
        assert torch.equal(alpha_to, torch.where(prev >= 0, alphas[prev.clamp(min=0)], final))
        assert (int(prev[0]), int(prev[-1])) == ((93, 0) if steps == 15 else (89, -1))
        assert torch.allclose(alpha_to.sqrt().float(), sequential._tables["sqrt_alpha_prev"])
    denoise = denoiser(kind, POLICY)
    x_T, noise = inputs(steps)
    expected = sequential.sample(denoise, x_T, noise=noise)
    out = parallel.sample(denoise, x_T, noise=noise)
    assert out.converged and out.rounds <= steps
    assert rel_err(out.sample, expected.sample) < 1e-6
    assert rel_err(out.trajectory, expected.trajectory) < 1e-6


def test_parallel_samplers_share_one_stopping_rule():
    """Picard, SRDS and ParaTAA are ParallelSamplers: one tolerance / deadline check and one clock; the
    sequential samplers have none of it."""
    from parapolicy.samplers.base import ParallelSampler

    for name in ("paraddpm", "paraddim", "paradpmsolver", "parasrdsddpm", "parasrdsddim", "parataaddpm", "parataaddim"):
        sampler = make_sampler(name, POLICY, 10)
        assert isinstance(sampler, ParallelSampler) and sampler.is_parallel, name
        for bad in ({"tolerance": -1}, {"tolerance": float("inf")}, {"deadline_ms": True}):
            with pytest.raises(ValueError, match="tolerance|deadline_ms"):
                make_sampler(name, POLICY, 10, **bad)
    for name in ("ddpm", "ddim", "dpmsolver"):
        sampler = make_sampler(name, POLICY, 10)
        assert not isinstance(sampler, ParallelSampler) and not sampler.is_parallel
        assert not hasattr(sampler, "_out_of_budget")
