"""Real-time chunking on LeRobot's own DiffusionPolicy (in this process): what ``lerobot-rollout
--inference.type=rtc`` checks and calls, with LeRobot's ``ActionQueue`` producing ``prev_chunk_left_over``."""

from __future__ import annotations

import pytest
import torch

from lerobot.policies.diffusion.modeling_diffusion import DiffusionModel, DiffusionPolicy
from lerobot.policies.rtc import ActionQueue
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.rollout.inference.rtc import _normalize_prev_actions_length, supports_rtc_inference
from parapolicy.integrations import lerobot as integ


@pytest.fixture
def swap():
    def do(sampler, **options):
        if integ.installed(DiffusionPolicy):
            integ.uninstall(DiffusionPolicy)
        integ.install(DiffusionPolicy, sampler, model_class=DiffusionModel, **options)

    yield do
    if integ.installed(DiffusionPolicy):
        integ.uninstall(DiffusionPolicy)


@pytest.fixture(scope="module")
def policy(camera_policy):
    return DiffusionPolicy.from_pretrained(str(camera_policy)).eval()


def frame(i: int) -> dict:
    g = torch.Generator().manual_seed(50 + i)
    return {"observation.state": torch.rand(1, 2, generator=g) * 2 - 1,
            "observation.images.top": torch.rand(1, 3, 96, 96, generator=g)}


def test_stock_diffusion_policy_is_refused_and_the_plugin_makes_it_answer(policy, swap):
    assert not supports_rtc_inference(policy)
    swap("paraddpm")
    assert supports_rtc_inference(policy)


@torch.no_grad()
def test_delay_prefix_through_lerobots_action_queue(policy, swap):
    """The engine's loop: chunk -> ActionQueue.merge -> some actions executed -> get_left_over, padded to the
    execution horizon -> the next chunk starts with exactly the d actions executed while it was planned."""
    swap("ddpm")
    rtc = RTCConfig(execution_horizon=10)
    queue = ActionQueue(rtc)
    policy.reset()
    torch.manual_seed(0)
    first = policy.predict_action_chunk(frame(0), inference_delay=0, prev_chunk_left_over=None)
    queue.merge(first.squeeze(0), first.squeeze(0), 0, queue.get_action_index())
    for _ in range(2):
        queue.get()
    for delay in (1, 2, 4):
        left = _normalize_prev_actions_length(queue.get_left_over(), target_steps=rtc.execution_horizon)
        chunk = policy.predict_action_chunk(frame(1), inference_delay=delay, prev_chunk_left_over=left).squeeze(0)
        assert chunk.shape == (8, 2)
        assert torch.equal(chunk[:delay], left[:delay])
        assert (chunk[delay] - left[delay]).abs().min() > 1e-4  # the first action after the delay is the model's
        assert not torch.equal(chunk[:delay], first.squeeze(0)[:delay])  # the prefix follows the left-over


@pytest.mark.parametrize("sampler,options", [
    ("paraddpm", {"window": 30, "tolerance": 1e-7}),
    ("parasrdsddpm", {"tolerance": 1e-7}),
    ("parataaddpm", {"window": 30, "tolerance": 1e-7}),
])
@torch.no_grad()
def test_rtc_chunks_of_parallel_samplers_equal_the_sequential_ones(policy, swap, sampler, options):
    left = torch.rand(10, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def chunks():
        policy.reset()
        torch.manual_seed(11)
        return torch.cat([policy.predict_action_chunk(frame(i), inference_delay=3, prev_chunk_left_over=left)
                          for i in range(3)])

    swap("ddpm")
    sequential = chunks()
    swap(sampler, **options)
    parallel = chunks()
    info = policy.diffusion.last_info
    assert info["sampler"] == sampler and info["converged"]
    assert torch.equal(parallel[:, :3], sequential[:, :3])
    assert (parallel - sequential).abs().max() < 1e-4


@torch.no_grad()
def test_rtc_history_is_the_last_n_obs_steps_frames(policy, swap):
    swap("ddpm")
    policy.reset()
    torch.manual_seed(4)
    got = [policy.predict_action_chunk(frame(i), inference_delay=0, prev_chunk_left_over=None) for i in range(3)]
    torch.manual_seed(4)
    for chunk, pair in zip(got, [(0, 0), (0, 1), (1, 2)]):
        batch = {k: torch.stack([frame(i)[k] for i in pair], dim=1) for k in ("observation.state", "observation.images.top")}
        batch["observation.images"] = batch["observation.images.top"].unsqueeze(2)
        assert torch.equal(chunk, policy.diffusion.generate_actions(batch))
