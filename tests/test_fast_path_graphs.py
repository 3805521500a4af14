"""CUDA-graph fast path: what the CPU can check (the capture-failure fallback, by making the capture fail)
and what needs a GPU (replays with new inputs and conditioning each call: stale static buffers would
replay the previous call's inputs).

The existing CUDA test replays with the same observation and seed as it captured, which a graph reading
stale buffers would pass.
"""

from __future__ import annotations

import pytest
import torch

from parapolicy.policy.accel import FastPath
from policy_synthetic import OBS_DIM, tiny_policy


pytestmark = pytest.mark.usefixtures("one_thread")


def plan(policy, obs, seed):
    return policy.predict_action(obs, generator=torch.Generator(obs.device.type).manual_seed(seed))


@pytest.fixture
def failing_capture(monkeypatch):
    """Pretend the CPU is a graph device whose capture fails: the path taken is the real one up to the
    capture, which raises where ``torch.cuda.Stream`` would on a machine without a usable CUDA."""
    monkeypatch.setattr(FastPath, "_use_graph", lambda self, device: self.cuda_graph is not False)

    def no_stream(*args, **kwargs):
        raise RuntimeError("CUDA graph capture is not possible here")

    monkeypatch.setattr(torch.cuda, "Stream", no_stream)


def test_failed_capture_warns_once_per_shape_and_runs_eagerly(failing_capture):
    policy = tiny_policy(seed=3)
    policy.set_sampler("paraddpm", 8, window=4, tolerance=0.1)
    obs = torch.randn(2, 2, OBS_DIM, generator=torch.Generator().manual_seed(1))
    policy.enable_fast_path(False)
    reference = [plan(policy, obs, seed) for seed in (0, 1)]
    policy.enable_fast_path(True, backend="eager", pad=True, cuda_graph="auto")
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        first = plan(policy, obs, 0)
    stats = policy.fast_path.stats
    failures = stats.capture_failures
    assert failures == len(stats.per_bucket) >= 1 and stats.captures == 0
    second = plan(policy, obs, 1)  # the failed shapes are not tried again
    assert policy.fast_path.stats.capture_failures == failures
    for got, want in zip((first, second), reference):
        torch.testing.assert_close(got["action_pred"], want["action_pred"], rtol=0, atol=1e-5)


def test_failed_capture_raises_when_graphs_were_required(failing_capture):
    policy = tiny_policy(seed=3)
    policy.set_sampler("paraddpm", 8, window=4, tolerance=0.1)
    policy.enable_fast_path(True, backend="eager", pad=True, cuda_graph=True)
    with pytest.raises(RuntimeError, match="capture is not possible"):
        plan(policy, torch.randn(1, 2, OBS_DIM), 0)
    assert policy.fast_path.stats.capture_failures == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler, options", [("ddpm", {}), ("paraddpm", {"window": 4, "tolerance": 1e-3})])
def test_cuda_graph_replays_new_inputs_and_conditioning(sampler, options):
    """Capture on one observation and seed, replay on others: each call equals eager on its own inputs
    (and differs from the previous call's), so no static buffer replays a stale input."""
    policy = tiny_policy(seed=4).cuda()
    policy.set_sampler(sampler, 10, **options)
    gen = torch.Generator().manual_seed(5)
    observations = [torch.randn(2, 2, OBS_DIM, generator=gen).cuda() for _ in range(3)]
    policy.enable_fast_path(False)
    reference = [plan(policy, obs, seed) for seed, obs in enumerate(observations)]
    policy.enable_fast_path(cuda_graph=True)
    fast = [plan(policy, obs, seed) for seed, obs in enumerate(observations)]
    assert policy.fast_path.stats.captures >= 1 and policy.fast_path.stats.capture_failures == 0
    for got, want in zip(fast, reference):
        torch.testing.assert_close(got["action_pred"], want["action_pred"], rtol=0, atol=1e-3)
    assert (fast[1]["action_pred"] - fast[0]["action_pred"]).abs().max() > 1e-2
    # the same observation with another seed, and another observation with the same seed
    again = plan(policy, observations[0], 2)
    torch.testing.assert_close(again["action_pred"], plan_eager(policy, observations[0], 2), rtol=0, atol=1e-3)


def plan_eager(policy, obs, seed):
    fast = policy.fast_path
    policy.enable_fast_path(False)
    try:
        return plan(policy, obs, seed)["action_pred"]
    finally:
        policy.fast_path = fast
