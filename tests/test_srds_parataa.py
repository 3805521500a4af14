"""SRDS (pipelined Parareal) and ParaTAA against their sequential twins, their schedules and options."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch
import yaml
from diffusers import DDPMScheduler

from parapolicy.samplers import SAMPLERS, make_sampler
from test_samplers import LINEAR, POLICY, analytic_denoiser, inputs, net_denoiser, rel_err

TINY = 1e-8
NAMES = {"parasrdsddpm": "ddpm", "parasrdsddim": "ddim", "parataaddpm": "ddpm", "parataaddim": "ddim"}
# id -> (sequential name, config, num_inference_steps, options)
CASES = {
    "ddpm-policy": ("ddpm", POLICY, 100, {}),
    "ddim-policy": ("ddim", POLICY, 15, {}),
    "ddpm-linear-linspace": ("ddpm", LINEAR, 30, {"scheduler_kwargs": {"timestep_spacing": "linspace"}}),
    "ddim-eta-linear": ("ddim", LINEAR, 20, {"eta": 0.7, "scheduler_kwargs": {"set_alpha_to_one": False}}),
    "ddpm-policy-v": ("ddpm", {**POLICY, "prediction_type": "v_prediction"}, 20, {}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(method, case, **options):
    """(sequential sampler, method's sampler over the same solver) for a case."""
    name, config, n, solver_options = CASES[case]
    return make_sampler(name, config, n, **solver_options), make_sampler(method + name, config, n, **solver_options, **options)


def denoiser(kind, config):
    return analytic_denoiser(config) if kind == "analytic" else net_denoiser()


def srds_depth(bounds, iterations, warm=False):
    """Rounds until X^k_B is known for k = iterations, from the pipelining recurrence
    T(k, b) = max(T(k-1, b-1) + L_b, T(k, b-1) + 1), T(k, b) = s_b for b <= k, T(0, b) = b (0 if warm)."""
    blocks = len(bounds) - 1
    depth = {(0, b): (0 if warm else b) for b in range(blocks + 1)}
    for k in range(1, iterations + 1):
        depth[(k, 0)] = 0
        for b in range(1, blocks + 1):
            length = bounds[b] - bounds[b - 1]
            if b <= k:
                depth[(k, b)] = depth[(b - 1, b - 1)] + length if b == k else depth[(b, b)]
            else:
                depth[(k, b)] = max(depth[(k - 1, b - 1)] + length, depth[(k, b - 1)] + 1)
    return depth[(iterations, blocks)]


class Counting:
    """Wraps a denoiser; records the K of every call."""

    def __init__(self, denoise):
        self.denoise, self.calls = denoise, []

    def __call__(self, x, t):
        assert t.dtype == torch.long and t.shape == x.shape[:1]
        self.calls.append(len(t))
        return self.denoise(x, t)


# ---------------------------------------------------------------------------------------------- API
def test_registered_with_options_and_configs():
    for name, solver in NAMES.items():
        cls = SAMPLERS[name]
        assert cls.name == name and cls.is_parallel
        sampler = make_sampler(name, POLICY, 10)
        assert sampler.is_stochastic == (solver == "ddpm") and name in repr(sampler)
    assert {"num_blocks", "tolerance", "max_iters", "deadline_ms"} <= set(SAMPLERS["parasrdsddpm"].option_names())
    assert {"window", "history", "order", "unroll", "tolerance", "abs_tolerance", "ridge", "max_rounds", "deadline_ms"} <= set(
        SAMPLERS["parataaddim"].option_names()
    )
    assert "eta" in SAMPLERS["parasrdsddim"].option_names() and "eta" in SAMPLERS["parataaddim"].option_names()
    conf = pathlib.Path(__file__).resolve().parents[1] / "conf" / "sampler"
    for file in ("srds.yaml", "parataa.yaml"):
        entry = yaml.safe_load((conf / file).read_text())
        options = {k: v for k, v in entry.items() if k not in ("name", "num_inference_steps") and v is not None}
        assert set(entry) - {"name", "num_inference_steps"} <= set(SAMPLERS[entry["name"]].option_names())
        make_sampler(entry["name"], POLICY, entry["num_inference_steps"], **options)


@pytest.mark.parametrize("file", ["srds.yaml", "parataa.yaml"])
def test_constructor_defaults_are_the_config_files(file):
    """A sampler built in Python without options is the one ``sampler=<file>`` gives on the command line:
    every value the yaml sets, and the defaults its comments promise for the ones it leaves null."""
    entry = yaml.safe_load((pathlib.Path(__file__).resolve().parents[1] / "conf" / "sampler" / file).read_text())
    n = entry["num_inference_steps"]
    sampler = make_sampler(entry["name"], POLICY, n)
    for key, value in entry.items():
        if key not in ("name", "num_inference_steps", "timestep_spacing") and value is not None:
            assert getattr(sampler, key) == value, key
    if file == "srds.yaml":
        assert sampler.num_blocks == round(math.sqrt(n)) and sampler.max_iters == sampler.num_blocks
    else:
        assert sampler.order == sampler.window and sampler.abs_tolerance == sampler.tolerance / 100
        assert sampler.max_rounds == n and sampler.deadline_ms is None
        assert make_sampler(entry["name"], POLICY, n, abs_tolerance=0.002).abs_tolerance == 0.002


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("parasrdsddpm", {"num_blocks": 0}, "num_blocks must be an integer >= 1"),
        ("parasrdsddpm", {"num_blocks": 2.5}, "num_blocks must be an integer >= 1"),
        ("parasrdsddpm", {"num_blocks": 11}, "num_blocks (11) cannot exceed num_inference_steps (10)"),
        ("parasrdsddim", {"max_iters": 0}, "max_iters must be an integer >= 1"),
        ("parasrdsddpm", {"tolerance": -0.1}, "tolerance must be a finite number >= 0"),
        ("parasrdsddpm", {"tolerance": math.nan}, "tolerance must be a finite number >= 0"),
        ("parasrdsddim", {"deadline_ms": -1}, "deadline_ms must be None or a number >= 0"),
        ("parataaddpm", {"window": 0}, "window must be an integer >= 1"),
        ("parataaddpm", {"history": 0}, "history must be an integer >= 1"),
        ("parataaddim", {"order": 0}, "order must be an integer >= 1"),
        ("parataaddim", {"unroll": "euler"}, "unroll must be 'picard' or 'ddim'"),
        ("parataaddpm", {"tolerance": "0.1"}, "tolerance must be a finite number >= 0"),
        ("parataaddpm", {"abs_tolerance": -1e-3}, "abs_tolerance must be a finite number >= 0"),
        ("parataaddpm", {"ridge": math.inf}, "ridge must be a finite number >= 0"),
        ("parataaddim", {"max_rounds": 0}, "max_rounds must be an integer >= 1"),
        ("parataaddim", {"deadline_ms": "soon"}, "deadline_ms must be None or a number >= 0"),
        ("parataaddim", {"num_blocks": 3}, "does not take option(s) ['num_blocks']"),
        ("parasrdsddpm", {"window": 3}, "does not take option(s) ['window']"),
    ],
)
def test_bad_options_raise_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_sampler(name, POLICY, 10, **options)


@pytest.mark.parametrize("name", list(NAMES))
def test_bad_noise_and_init_shapes(name):
    sampler = make_sampler(name, POLICY, 10)
    x_T, noise = inputs(10)
    denoise = analytic_denoiser(POLICY)
    with pytest.raises(ValueError, match="noise must have shape"):
        sampler.sample(denoise, x_T, noise=noise[:9])
    with pytest.raises(ValueError, match="init must have shape"):
        sampler.sample(denoise, x_T, noise=noise, init=noise)


# ------------------------------------------------------------------------- levels and coarse steps
@pytest.mark.parametrize("case", list(CASES))
def test_step_alphas_match_the_solvers_tables(case):
    name, config, n, options = CASES[case]
    sampler = make_sampler(name, config, n, **options)
    alpha_from, alpha_to = sampler.step_alphas_cumprod()
    assert alpha_from.dtype == alpha_to.dtype == torch.float64
    assert torch.allclose(alpha_from.sqrt().float(), sampler._tables["sqrt_alpha"], rtol=1e-6)
    if name == "ddim":
        assert torch.allclose(alpha_to.sqrt().float(), sampler._tables["sqrt_alpha_prev"], rtol=1e-6)
    else:  # DDPM: the next timestep's level, then alpha_bar = 1
        expected = torch.cat([alpha_from[1:], torch.ones(1, dtype=torch.float64)])
        assert torch.equal(alpha_to, expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("case", ["ddpm-policy", "ddim-eta-linear", "ddim-policy"])
def test_coarse_step_over_one_step_blocks_is_the_fine_step(case, prediction_type):
    """With one step per block (num_blocks = N), G is the solver's own no-noise step."""
    name, config, n, options = CASES[case]
    config = {**config, "prediction_type": prediction_type}
    sampler = make_sampler("parasrds" + name, config, n, num_blocks=n, **options)
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(n, 2, 4, 2, generator=g, dtype=torch.float64)
    model_output = torch.randn(n, 2, 4, 2, generator=g, dtype=torch.float64)
    steps = torch.randperm(n, generator=g)
    coarse = sampler.coarse_step(x, model_output, steps)
    assert rel_err(coarse, sampler.step_no_noise(x, model_output, steps)) < 1e-6


# ------------------------------------------------------------------ exactness against sequential
@pytest.mark.parametrize("kind", ["analytic", "net"])
@pytest.mark.parametrize("method", ["parasrds", "parataa"])
@pytest.mark.parametrize("case", list(CASES))
def test_tiny_tolerance_matches_sequential(case, method, kind):
    """float64, tau = 1e-8: both converge to the sequential trajectory for the same noise."""
    sequential, parallel = build(method, case, tolerance=TINY)
    denoise = denoiser(kind, CASES[case][1])
    x_T, noise = inputs(sequential.num_inference_steps)
    expected = sequential.sample(denoise, x_T, noise=noise)
    out = parallel.sample(denoise, x_T, noise=noise)
    n = parallel.num_inference_steps
    assert out.converged and out.sample.shape == x_T.shape and out.trajectory.shape == expected.trajectory.shape
    assert torch.equal(out.trajectory[0], x_T) and torch.equal(out.trajectory[-1], out.sample)
    assert rel_err(out.sample, expected.sample) < 1e-6
    assert rel_err(out.trajectory, expected.trajectory) < 1e-6
    assert out.rounds <= n and out.model_evals >= n


@pytest.mark.parametrize(
    "n, blocks", [(1, 1), (2, 1), (2, 2), (7, 3), (10, 10), (15, None), (30, 4), (37, 6), (100, None), (100, 13)]
)
def test_srds_all_iterations_is_sequential_in_n_rounds(n, blocks):
    """tau = 0: every iteration runs; after B of them the sample is the sequential one (float64
    precision), the pipelined schedule took exactly N rounds and every solve of every iteration."""
    sequential = make_sampler("ddpm", POLICY, n)
    srds = make_sampler("parasrdsddpm", POLICY, n, num_blocks=blocks, tolerance=0)
    bounds, num_blocks = srds.boundaries, srds.num_blocks
    assert num_blocks == (blocks or max(1, round(math.sqrt(n)))) and bounds[0] == 0 and bounds[-1] == n
    assert all(0 < bounds[b + 1] - bounds[b] <= math.ceil(n / num_blocks) for b in range(num_blocks))
    denoise = Counting(net_denoiser())
    x_T, noise = inputs(n)
    out = srds.sample(denoise, x_T, noise=noise)
    expected = sequential.sample(net_denoiser(), x_T, noise=noise)
    assert out.converged and len(out.errors) == num_blocks
    assert rel_err(out.sample, expected.sample) < 1e-12
    assert rel_err(out.trajectory, expected.trajectory) < 1e-12  # blocks b <= k are the exact solves
    assert out.rounds == len(denoise.calls) == n == srds_depth(bounds, num_blocks)
    solves = sum(bounds[-1] - bounds[k - 1] for k in range(1, num_blocks + 1))  # F_b for b >= k, k = 1..B
    assert out.model_evals == sum(denoise.calls) == solves


@pytest.mark.parametrize("tolerance", [0.0, 0.1])
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("n, blocks, iterations", [(10, 3, 1), (10, 3, 2), (23, 5, 2), (50, 7, 3), (64, 8, 1)])
def test_srds_rounds_follow_the_pipeline_and_never_exceed_n(n, blocks, iterations, warm, tolerance):
    """Stopping after `iterations` (max_iters) takes exactly the pipelined depth T(k, B) <= N rounds."""
    srds = make_sampler("parasrdsddpm", POLICY, n, num_blocks=blocks, max_iters=iterations, tolerance=tolerance)
    denoise = Counting(net_denoiser())
    x_T, noise = inputs(n)
    init = torch.randn(n + 1, *x_T.shape, dtype=x_T.dtype) if warm else None
    out = srds.sample(denoise, x_T, noise=noise, init=init)
    assert out.rounds == len(denoise.calls) <= n and out.model_evals == sum(denoise.calls)
    assert max(denoise.calls) <= blocks + 1
    if tolerance == 0:
        assert len(out.errors) == iterations and not out.converged  # max_iters < B: not exact
        assert out.rounds == srds_depth(srds.boundaries, iterations, warm)
        # every solve once: F_b for b >= k in iterations k = 1..K, and for b > K the first evaluation of
        # iteration K + 1 (it gives G_b(X^K_{b-1})); no duplicated, no superfluous evaluation
        s = srds.boundaries
        assert out.model_evals == sum(n - s[k - 1] for k in range(1, iterations + 1)) + blocks - iterations


def test_srds_depth_bound_over_many_schedules():
    """rounds <= N for every (N, B, max_iters), cold or warm, measured on the sampler (not only on the
    recurrence): its block sizes differ by at most one, its rounds are the recurrence's T(k, B)."""
    denoise = net_denoiser()  # with tau = 0 the schedule does not depend on the model; a tiny sample keeps it cheap
    x_T = torch.randn(1, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(60, *x_T.shape, dtype=x_T.dtype, generator=torch.Generator().manual_seed(1))
    for n in range(1, 60, 6):
        for blocks in range(1, n + 1, max(1, n // 4)):
            bounds = [(b * n) // blocks for b in range(blocks + 1)]
            for iterations in sorted({1, (blocks + 1) // 2, blocks}):
                for warm in (False, True):
                    srds = make_sampler("parasrdsddpm", POLICY, n, num_blocks=blocks, max_iters=iterations, tolerance=0)
                    sizes = [b - a for a, b in zip(srds.boundaries[:-1], srds.boundaries[1:])]
                    assert srds.boundaries == bounds and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
                    init = torch.full((n + 1, *x_T.shape), 0.5, dtype=x_T.dtype) if warm else None
                    out = srds.sample(denoise, x_T, noise=noise[:n], init=init)
                    depth = srds_depth(bounds, iterations, warm)
                    assert out.rounds <= n, (n, blocks, iterations, warm, out.rounds)
                    if iterations < blocks:  # (all B iterations: some schedules take one round fewer, see #29)
                        assert out.rounds == depth, (n, blocks, iterations, warm, out.rounds, depth)
            assert srds_depth(bounds, blocks) == n


def test_srds_warm_start_from_the_answer_takes_one_iteration():
    sequential, srds = build("parasrds", "ddpm-policy")
    denoise = net_denoiser()
    x_T, noise = inputs(100)
    expected = sequential.sample(denoise, x_T, noise=noise)
    init = expected.trajectory.clone()
    init[0] = 5.0  # x_T is authoritative
    warm = srds.sample(denoise, x_T, noise=noise, init=init)
    assert warm.converged and len(warm.errors) == 1 and warm.errors[0] < 1e-6
    assert warm.rounds == srds_depth(srds.boundaries, 1, warm=True) == 10 + 9  # L_1 + B - 1
    assert rel_err(warm.trajectory, expected.trajectory) < 1e-12


def clocked_srds_denoiser(monkeypatch, start_s: float):
    """The parallel samplers' clock (``ParallelSampler._clock``) replaced by a fake one at ``start_s`` seconds that a model call advances by one second
    (one call per round), and that model: ``(clock, denoise)``, the clock a one-element list."""
    from parapolicy.samplers import base

    clock = [start_s]
    monkeypatch.setattr(base, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    model = net_denoiser()

    def denoise(x, t):
        clock[0] += 1.0
        return model(x, t)

    return clock, denoise


def test_srds_deadline_after_the_coarse_sweep_returns_the_coarse_sweep(monkeypatch):
    """Stopped by its deadline after round B (before iteration 1 is done), SRDS returns iteration 0, the
    coarse sweep X^0_b = G_b(X^0_{b-1}) at the block boundaries, not the initial noise. With trailing
    spacing and equal blocks, DDIM's coarse sweep is DDIM with B steps (blocks of DDIM-20 start at
    t = 99, 74, 49, 24 like DDIM-4's steps), so diffusers' DDIM-4 is the reference. A fake clock that
    advances one second per model call makes the stop deterministic."""
    clock, denoise = clocked_srds_denoiser(monkeypatch, start_s=0.0)
    n, blocks = 20, 4
    x_T, _ = inputs(n)
    srds = make_sampler("parasrdsddim", POLICY, n, num_blocks=blocks, timestep_spacing="trailing", tolerance=0,
                        deadline_ms=blocks * 1e3 - 500)
    out = srds.sample(denoise, x_T)
    coarse = make_sampler("ddim", POLICY, blocks, timestep_spacing="trailing").sample(net_denoiser(), x_T)
    assert out.rounds == blocks and not out.converged and out.errors == []
    assert rel_err(out.trajectory[srds.boundaries[1:]], coarse.trajectory[1:]) < 1e-6
    assert rel_err(out.sample, coarse.sample) < 1e-6


@pytest.mark.parametrize("name", ["parasrdsddpm", "parataaddpm"])
def test_deadline_stops_after_one_round(name):
    sampler = make_sampler(name, POLICY, 100, deadline_ms=0)
    x_T, noise = inputs(100)
    out = sampler.sample(analytic_denoiser(POLICY), x_T, noise=noise)
    assert out.rounds == 1 and not out.converged and torch.equal(out.sample, out.trajectory[-1])
    relaxed = make_sampler(name, POLICY, 100, deadline_ms=1e9)
    assert relaxed.sample(analytic_denoiser(POLICY), x_T, noise=noise).converged


# ------------------------------------------------------------------------ ParaTAA's fixed point
def plain_fixed_point(sampler, denoise, x_T, noise, order, linear):
    """Hand-written order-k fixed-point iteration over the whole trajectory (window = N) with ParaTAA's
    stopping rule and window start; returns the trajectory after every round and every round's error
    (the largest residual RMS / sigma_i over the steps with sigma_i > 0; 0.0 when there is none)."""
    n = sampler.num_inference_steps
    std = sampler.noise_std.double().view(-1, 1, 1, 1)
    sigma = sampler.tolerance_variance.double().sqrt()
    trajectory = x_T.expand(n + 1, *x_T.shape).clone()
    begin, iterates, errors = 0, [], []
    while begin < n:
        points = trajectory[begin:n]
        output = denoise(points, sampler.timesteps[begin:n])
        stepped = sampler.step_no_noise(points, output, torch.arange(begin, n)) + std[begin:n] * noise[begin:n]
        residual = (stepped - trajectory[begin + 1 :]).square().flatten(2).mean(-1).amax(-1).sqrt()
        done = (residual <= sampler.abs_tolerance) | (residual <= sampler.tolerance * sigma[begin:n])
        errors.append(max(((residual[i - begin] / sigma[i]).item() for i in range(begin, n) if sigma[i] > 0),
                          default=0.0))
        new = trajectory.clone()
        for i in range(begin, n):
            anchor = max(begin, i + 1 - order)
            value = trajectory[anchor]
            for q in range(anchor, i + 1):  # x_{q+1} = a_q x_q + (step(x_q) - a_q x_q), x_q the old iterate
                value = linear[q] * value + (stepped[q - begin] - linear[q] * trajectory[q])
            new[i + 1] = value
        trajectory = new
        iterates.append(trajectory)
        begin = begin + int(done.logical_not().int().argmax()) + 1 if not done.all() else n
    return iterates, errors


@pytest.mark.parametrize("unroll", ["picard", "ddim"])
@pytest.mark.parametrize("order", [1, 3, 12])
def test_parataa_history_one_is_plain_fixed_point_iteration(order, unroll):
    n = 12
    sampler = make_sampler("parataaddpm", POLICY, n, window=n, order=order, unroll=unroll, history=1, tolerance=0.05)
    alpha_from, alpha_to = sampler.step_alphas_cumprod()
    linear = (alpha_to / alpha_from).sqrt() if unroll == "ddim" else torch.ones(n, dtype=torch.float64)
    assert torch.allclose(sampler.linear_coefficients(), linear, rtol=1e-12)
    denoise = net_denoiser()
    x_T, noise = inputs(n)
    iterates, errors = plain_fixed_point(sampler, denoise, x_T, noise, order, linear)
    counting = Counting(denoise)
    out = sampler.sample(counting, x_T, noise=noise)
    assert out.converged and out.rounds == len(iterates) <= n
    assert out.model_evals == sum(counting.calls) and torch.allclose(torch.tensor(out.errors), torch.tensor(errors),
                                                                     rtol=1e-9, atol=0)
    if order == n and unroll == "picard":  # the window start moves by more than one step
        assert out.rounds < n
    for rounds in range(1, len(iterates) + 1):
        capped = make_sampler("parataaddpm", POLICY, n, window=n, order=order, unroll=unroll, history=1, tolerance=0.05, max_rounds=rounds)
        assert rel_err(capped.sample(denoise, x_T, noise=noise).trajectory, iterates[rounds - 1]) < 1e-12


def test_parataa_order_n_without_acceleration_is_paradigms():
    """order = window, history 1, a_i = 1: the update is ParaDiGMS's Picard update (same iterates for a
    fixed number of rounds; only the stopping rules differ)."""
    x_T, noise = inputs(15)
    denoise = net_denoiser()
    for rounds in (1, 2, 5):
        taa = make_sampler("parataaddpm", POLICY, 15, window=15, history=1, tolerance=0, max_rounds=rounds)
        picard = make_sampler("paraddpm", POLICY, 15, window=15, tolerance=0, max_rounds=rounds)
        a, b = taa.sample(denoise, x_T, noise=noise), picard.sample(denoise, x_T, noise=noise)
        assert a.rounds == b.rounds == rounds and rel_err(a.trajectory, b.trajectory) < 1e-12


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_anderson_step_solves_the_triangular_least_squares_problems(scale):
    """The correction of each step i equals (dX_i + dR_i) gamma_i with gamma_i from the ridge problem
    over the residuals of window steps b..i, each using the differences step i has (its newest
    count_i - 1): checked against explicit per-step, per-sample solves over three sliding windows.
    The ridge is relative (ridge x the mean of the Gram diagonal) at any scale: near convergence the
    residuals are small (scale 0.01), and a fixed ridge there would swamp the step."""
    m, n, batch, dims, ridge = 3, 8, 2, 6, 1e-3
    sampler = make_sampler("parataaddim", POLICY, n, history=m, ridge=ridge)
    g = torch.Generator().manual_seed(0)
    memory_x = torch.zeros(m, n, batch, dims, dtype=torch.float64)
    memory_r, count = torch.zeros_like(memory_x), torch.zeros(n, dtype=torch.long)
    history = {i: [] for i in range(n)}  # step -> [(x, R)], newest last
    for begin, end, advance in [(0, 4, 0), (0, 6, 0), (1, 6, 2), (2, 7, 1)]:
        current = scale * torch.randn(end - begin, batch, dims, generator=g, dtype=torch.float64)
        residual = scale * torch.randn(end - begin, batch, dims, generator=g, dtype=torch.float64)
        correction = sampler._anderson(
            memory_x, memory_r, count, torch.arange(m - 1), begin, end, current, residual, torch.tensor(advance)
        )
        for i in range(begin, end):
            history[i] = (history[i] + [(current[i - begin], residual[i - begin])])[-m:]
        for i in range(begin, end):
            used = len(history[i]) - 1
            expected = torch.zeros(batch, dims, dtype=torch.float64)
            if used > 0 and i - begin >= advance:
                def diffs(j, which):
                    values = [entry[which] for entry in history[j][-(used + 1) :]]
                    return torch.stack([b - a for a, b in zip(values[:-1], values[1:])], -1)  # [batch, dims, used]

                for s in range(batch):
                    a = torch.cat([diffs(j, 1)[s] for j in range(begin, i + 1)])  # [(i - b + 1) * dims, used]
                    r = torch.cat([history[j][-1][1][s] for j in range(begin, i + 1)])
                    gram, rhs = a.T @ a / dims, a.T @ r / dims
                    gram = gram + ridge * gram.diagonal().mean() * torch.eye(used, dtype=torch.float64)
                    gamma = torch.linalg.solve(gram, rhs)
                    expected[s] = (diffs(i, 0)[s] + diffs(i, 1)[s]) @ gamma
            assert torch.allclose(correction[i - begin], expected, rtol=1e-9, atol=1e-12 * scale), (begin, end, i)


@pytest.mark.parametrize("history", [2, 4])
def test_parataa_from_a_random_guess_converges_to_sequential(history):
    sequential, taa = build("parataa", "ddim-policy", history=history, window=8, tolerance=TINY)
    denoise = net_denoiser()
    x_T, _ = inputs(15)
    expected = sequential.sample(denoise, x_T)
    out = taa.sample(denoise, x_T, init=torch.randn_like(expected.trajectory))
    assert out.converged and rel_err(out.sample, expected.sample) < 1e-6 and len(out.errors) == out.rounds
    # the last step's variance is 0 (alpha_bar = 1): its point is left out of the normalised error
    assert taa.tolerance_variance[-1] == 0 and all(math.isfinite(e) for e in out.errors)


def test_anderson_acceleration_saves_rounds_over_plain_fixed_point_iteration():
    """The default history (2: one difference per step) is accelerated, not plain fixed-point iteration
    (history 1): on DDIM-15 with the small U-Net it takes 10 rounds instead of 13 (same tolerance, same
    fixed point)."""
    denoise = net_denoiser()
    x_T, _ = inputs(15)
    plain, accelerated = (make_sampler("parataaddim", POLICY, 15, history=h, tolerance=0.1).sample(denoise, x_T)
                          for h in (1, 2))
    assert plain.converged and accelerated.converged and accelerated.rounds <= plain.rounds - 2
    sequential = make_sampler("ddim", POLICY, 15).sample(denoise, x_T).sample
    assert rel_err(accelerated.sample, sequential) < 0.05 and rel_err(plain.sample, sequential) < 0.05


def test_parataa_warm_start_from_the_answer():
    sequential, taa = build("parataa", "ddpm-policy")
    denoise = net_denoiser()
    x_T, noise = inputs(100)
    expected = sequential.sample(denoise, x_T, noise=noise)
    warm = taa.sample(denoise, x_T, noise=noise, init=expected.trajectory)
    assert warm.converged and warm.rounds <= math.ceil(100 / 16) + 1
    assert rel_err(warm.sample, expected.sample) < 1e-9


# ---------------------------------------------------------------------------- speed and accuracy
@pytest.mark.parametrize(
    "name, n, bound", [("parataaddpm", 100, 30), ("parataaddim", 15, 8), ("parasrdsddpm", 100, 50), ("parasrdsddim", 15, 15)]
)
def test_tau_point_one_saves_rounds_on_the_smooth_denoiser(name, n, bound):
    """tau = 0.1, float32, Gaussian data: rounds well below N (SRDS-15's 4 blocks leave little room)."""
    sequential = make_sampler(NAMES[name], POLICY, n)
    parallel = make_sampler(name, POLICY, n, tolerance=0.1)
    denoise = analytic_denoiser(POLICY)
    x_T, noise = inputs(n, torch.float32)
    expected = sequential.sample(denoise, x_T, noise=noise)
    out = parallel.sample(denoise, x_T, noise=noise)
    assert out.converged and out.rounds < bound, out.rounds
    assert (out.sample - expected.sample).abs().max() < 0.05


def test_batch_of_samples_equals_one_at_a_time():
    for name, n in (("parasrdsddpm", 30), ("parataaddpm", 30)):
        sampler = make_sampler(name, LINEAR, n, tolerance=TINY)
        denoise = net_denoiser()
        x_T, noise = inputs(n)
        batched = sampler.sample(denoise, x_T, noise=noise).sample
        single = torch.cat([sampler.sample(denoise, x_T[i : i + 1], noise=noise[:, i : i + 1]).sample for i in range(len(x_T))])
        assert rel_err(batched, single) < 1e-6


@pytest.mark.parametrize("name", ["parasrdsddim", "parataaddim"])
def test_low_precision_model(name):
    analytic = analytic_denoiser(POLICY)
    seen = []

    def denoise(x, t):
        seen.append(x.dtype)
        return analytic(x, t)

    x_T, _ = inputs(15, torch.float32)
    out = make_sampler(name, POLICY, 15).sample(denoise, x_T.bfloat16())
    assert out.sample.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16} and out.converged
    reference = make_sampler("ddim", POLICY, 15).sample(analytic, x_T).sample
    assert (out.sample.float() - reference).abs().max() < 0.05


def test_generator_draws_the_same_noise_as_sequential():
    denoise = analytic_denoiser(POLICY)
    x_T, _ = inputs(30)
    expected = make_sampler("ddpm", POLICY, 30).sample(denoise, x_T, generator=torch.Generator().manual_seed(3))
    for name in ("parasrdsddpm", "parataaddpm"):
        out = make_sampler(name, POLICY, 30, tolerance=TINY).sample(denoise, x_T, generator=torch.Generator().manual_seed(3))
        assert rel_err(out.sample, expected.sample) < 1e-6


def test_srds_deadline_is_milliseconds_since_the_call_and_strict(monkeypatch):
    """A deadline that a round ends exactly on does not stop SRDS (it stops after the first round that
    ends *later*), the clock is read relative to the call (a clock far from 0), and in milliseconds.
    Fake clock: 1000 s at the call, one second per model call (one call per round)."""
    clock, denoise = clocked_srds_denoiser(monkeypatch, start_s=1000.0)
    x_T, _ = inputs(20)
    for deadline_ms, rounds in ((4000.0, 5), (4000.5, 5), (3999.5, 4)):
        clock[0] = 1000.0
        srds = make_sampler("parasrdsddim", POLICY, 20, num_blocks=4, timestep_spacing="trailing", tolerance=0,
                            deadline_ms=deadline_ms)
        assert srds.sample(denoise, x_T).rounds == rounds, deadline_ms
