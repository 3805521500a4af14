"""CUDA checks of the fast path and the parallel samplers: skipped without a GPU; `make gpu-check` runs them.

On a GPU: the fast path (static buckets + CUDA graphs) plans what the plain path plans, one graph per
(bucket, batch); bf16 autocast stays within a bound of float32; a parallel sampler at tolerance -> 0
plans what its sequential twin plans; the shipped Square policy does all of that on CUDA. TF32 is off
in these tests (``exact_fp32``) so that the bounds measure the code, not TF32's 10-bit mantissa.
"""

import pytest
import torch

from parapolicy.policy import load_policy
from policy_synthetic import OBS_DIM, tiny_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SAMPLERS = [("ddpm", {}), ("paraddpm", {"window": 4, "tolerance": 0.1}), ("ddim", {}),
            ("paraddim", {"window": 4, "tolerance": 0.1})]


@pytest.fixture(autouse=True)
def exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def plan(policy, obs, seed=0):
    return policy.predict_action(obs, generator=torch.Generator("cuda").manual_seed(seed))


def observations(batch, obs_dim=OBS_DIM, seed=0):
    return torch.randn(batch, 2, obs_dim, generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("name, options", SAMPLERS)
def test_fast_path_matches_eager(name, options):
    """Same rounds and model evaluations, samples within 1e-4, on the capture call and on replays."""
    policy = tiny_policy().cuda()
    policy.set_sampler(name, 10, **options)
    obs = observations(3)
    policy.enable_fast_path(False)
    reference = plan(policy, obs)
    policy.enable_fast_path(cuda_graph=True)
    for _ in range(3):  # capture, then replays
        fast = plan(policy, obs)
        assert int(fast["rounds"]) == int(reference["rounds"])
        assert int(fast["model_evals"]) == int(reference["model_evals"])
        torch.testing.assert_close(fast["action_pred"], reference["action_pred"], rtol=0, atol=1e-4)
    stats = policy.fast_path.stats
    assert stats.capture_failures == 0 and stats.fallbacks == 0


def test_one_graph_per_bucket_and_batch():
    """paraddpm with window 4 over 10 steps uses bucket 4 (the last, shorter windows are padded);
    ddpm uses bucket 1. Two batch sizes: one graph per (bucket, batch), none recaptured on replay."""
    policy = tiny_policy().cuda()
    policy.enable_fast_path(cuda_graph=True, buckets=[1, 4])
    for name, options in (("ddpm", {}), ("paraddpm", {"window": 4, "tolerance": 1e-3})):
        policy.set_sampler(name, 10, **options)
        for batch in (1, 3):
            for seed in range(2):
                plan(policy, observations(batch, seed=seed), seed)
    stats = policy.fast_path.stats
    assert stats.captures == 4 and stats.capture_failures == 0  # {1, 4} x {1, 3}
    assert set(stats.per_bucket) == {1, 4} and stats.padded_rows > 0 and stats.fallbacks == 0


def test_bf16_autocast_stays_close_to_float32():
    """bf16 autocast of the model call: float32 out, finite, and within 0.05 of float32 after 10 DDPM steps
    (bf16 keeps 8 bits of mantissa: a relative error ~4e-3 per call that the steps partly average out)."""
    policy = tiny_policy().cuda()
    policy.set_sampler("ddpm", 10)
    obs = observations(4)
    policy.enable_fast_path(cuda_graph=True)
    reference = plan(policy, obs)
    policy.enable_fast_path(cuda_graph=True, dtype="bfloat16")
    half = plan(policy, obs)
    assert half["action_pred"].dtype == torch.float32 and torch.isfinite(half["action_pred"]).all()
    error = (half["action_pred"] - reference["action_pred"]).abs().max().item()
    assert 0 < error <= 0.05, error  # > 0: autocast really ran in bf16


@pytest.mark.parametrize("parallel, sequential", [("paraddpm", "ddpm"), ("paraddim", "ddim")])
@pytest.mark.parametrize("fast", [False, True])
def test_parallel_equals_sequential_at_small_tolerance(parallel, sequential, fast):
    """tau -> 0 (1e-7): the Picard iteration runs to the sequential sampler's fixed point, on the plain
    path and through the CUDA graphs."""
    policy = tiny_policy().cuda()
    policy.enable_fast_path(cuda_graph=True) if fast else policy.enable_fast_path(False)
    obs = observations(2)
    policy.set_sampler(sequential, 10)
    reference = plan(policy, obs)
    policy.set_sampler(parallel, 10, window=10, tolerance=1e-7)
    out = plan(policy, obs)
    torch.testing.assert_close(out["action_pred"], reference["action_pred"], rtol=0, atol=1e-4)
    assert int(out["rounds"]) <= 10


def test_shipped_square_policy_on_cuda():
    """The shipped checkpoint on the GPU: the same DDIM-10 plan as on the CPU for the same x_T (float
    rounding apart), fast path = plain path, and paraddpm at a small tolerance = ddpm."""
    obs = observations(8, seed=3) * 0.1
    x_T = torch.randn(8, 16, 7, generator=torch.Generator().manual_seed(1))
    cpu = load_policy("square", sampler="ddim", num_inference_steps=10, device="cpu", fast_path="off")
    gpu = load_policy("square", sampler="ddim", num_inference_steps=10, device="cuda", fast_path="off")
    on_cpu = cpu.predict_action(obs.cpu(), x_T=x_T)["action_pred"]
    on_gpu = gpu.predict_action(obs, x_T=x_T)["action_pred"]
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-3)

    gpu.set_sampler("ddpm", 20)
    plain = plan(gpu, obs)
    gpu.enable_fast_path(cuda_graph=True)
    fast = plan(gpu, obs)
    torch.testing.assert_close(fast["action_pred"], plain["action_pred"], rtol=0, atol=1e-3)
    parallel = load_policy("square", sampler="paraddpm", num_inference_steps=20, window=20, tolerance=1e-7,
                           device="cuda", fast_path="on")
    out = plan(parallel, obs)
    torch.testing.assert_close(out["action_pred"], plain["action_pred"], rtol=0, atol=1e-3)
    assert int(out["rounds"]) <= 20


def test_image_encoder_graph_matches_eager():
    """An image policy on CUDA: the encoder is captured once per batch size beside the denoiser's
    graphs, and replays with new frames plan what the plain path plans."""
    from policy_synthetic import CAMERAS, tiny_image_policy

    policy = tiny_image_policy().cuda()
    gen = torch.Generator().manual_seed(0)

    def inputs(batch):
        obs = torch.randn(batch, 2, 9, generator=gen).cuda()
        images = {k: torch.randint(0, 256, (batch, 2, 3, 84, 84), generator=gen, dtype=torch.uint8).cuda()
                  for k in CAMERAS}
        return obs, images

    calls = [inputs(batch) for batch in (1, 3, 1, 3)]
    policy.enable_fast_path(False)
    plain = [policy.predict_action(o, images=i, generator=torch.Generator("cuda").manual_seed(0)) for o, i in calls]
    policy.enable_fast_path(cuda_graph=True)
    fast = [policy.predict_action(o, images=i, generator=torch.Generator("cuda").manual_seed(0)) for o, i in calls]
    stats = policy.fast_path.stats
    assert stats.captures == 4 and stats.capture_failures == 0  # (encoder + denoiser bucket 1) x batch {1, 3}
    for got, want in zip(fast, plain):
        torch.testing.assert_close(got["action_pred"], want["action_pred"], rtol=0, atol=1e-4)
