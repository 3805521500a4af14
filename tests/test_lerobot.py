"""parapolicy.integrations.lerobot: accelerate a LeRobot DiffusionPolicy in place (on a stand-in with
LeRobot's attributes, layer layout and sampling loop: tests/lerobot_standin.py)."""

from __future__ import annotations

import pytest
import torch

from lerobot_standin import OBS_STATE, DiffusionConfig, DiffusionModel, DiffusionPolicy
from parapolicy.integrations.lerobot import accelerate, is_accelerated, restore


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small forward passes; a second thread only adds contention on a shared CPU
    yield
    torch.set_num_threads(threads)


def make_policy(seed: int = 0, **config) -> DiffusionPolicy:
    torch.manual_seed(seed)
    return DiffusionPolicy(DiffusionConfig(**config)).eval()


def cond(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 20, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def test_ddpm_swap_reproduces_the_stock_loop_exactly():
    policy = make_policy(num_inference_steps=25)
    model = policy.diffusion
    g_stock, g_ours = gen(5), gen(5)
    stock = model.conditional_sample(3, global_cond=cond(3), generator=g_stock)
    accelerate(policy, sampler="ddpm")
    assert is_accelerated(policy)
    ours = model.conditional_sample(3, global_cond=cond(3), generator=g_ours)
    assert torch.equal(ours, stock)
    # the same number of draws, in the same order: both generators end in the same state
    assert torch.equal(g_ours.get_state(), g_stock.get_state())
    assert policy.last_info == model.last_info
    assert policy.last_info["sampler"] == "ddpm" and policy.last_info["rounds"] == 25
    # noise= stays x_T; the step noise still comes from the generator
    x_T = torch.randn(2, 16, 4, generator=gen(9))
    ours = model.conditional_sample(2, global_cond=cond(2), generator=gen(6), noise=x_T)
    restore(policy)
    stock = model.conditional_sample(2, global_cond=cond(2), generator=gen(6), noise=x_T)
    assert torch.equal(ours, stock)


@torch.no_grad()
def test_paraddpm_converges_to_the_stock_loop():
    policy = make_policy(num_inference_steps=30)
    model = policy.diffusion
    stock = model.conditional_sample(2, global_cond=cond(2), generator=gen(3))
    accelerate(policy, "paraddpm", window=30, tolerance=1e-6)
    ours = model.conditional_sample(2, global_cond=cond(2), generator=gen(3))
    info = policy.last_info
    assert info["sampler"] == "paraddpm" and info["converged"]
    assert info["rounds"] < 30 and info["model_evals"] >= 30
    assert (ours - stock).abs().max() < 1e-4


@torch.no_grad()
def test_select_action_queues_untouched_and_restore():
    cfg = dict(num_inference_steps=10)
    obs = [{OBS_STATE: torch.randn(1, 10, generator=gen(i))} for i in range(10)]

    def rollout(policy):
        policy.reset()
        torch.manual_seed(123)  # select_action draws from the global generator, as LeRobot's does
        return torch.stack([policy.select_action(dict(o)) for o in obs])

    policy = make_policy(**cfg)
    stock = rollout(policy)
    accelerate(policy, "ddpm")
    assert torch.equal(rollout(policy), stock)
    accelerate(policy, "paraddpm", window=10, tolerance=1e-6)  # re-accelerating swaps the sampler
    assert (rollout(policy) - stock).abs().max() < 1e-4
    assert policy.last_info["sampler"] == "paraddpm" and policy.last_info["converged"]
    restore(policy)
    assert not is_accelerated(policy) and "conditional_sample" not in policy.diffusion.__dict__
    assert policy.diffusion.conditional_sample.__func__ is DiffusionModel.conditional_sample
    assert torch.equal(rollout(policy), stock)
    with pytest.raises(ValueError, match="not accelerated"):
        restore(policy)


@torch.no_grad()
def test_ddim_policies_use_the_ddim_family():
    policy = make_policy(noise_scheduler_type="DDIM", num_inference_steps=10)
    model = policy.diffusion
    stock = model.conditional_sample(2, global_cond=cond(2), generator=gen(2))
    accelerate(model, "ddpm")  # a DiffusionModel directly; the name maps onto the scheduler's family
    ours = model.conditional_sample(2, global_cond=cond(2), generator=gen(2))
    assert model.last_info["sampler"] == "ddim"
    assert (ours - stock).abs().max() < 1e-6
    accelerate(model, "paraddpm", window=10, tolerance=1e-6)
    ours = model.conditional_sample(2, global_cond=cond(2), generator=gen(2))
    assert model.last_info["sampler"] == "paraddim" and model.last_info["converged"] and model.last_info["rounds"] <= 10
    assert (ours - stock).abs().max() < 1e-4


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="neither a LeRobot DiffusionPolicy"):
        accelerate(torch.nn.Linear(2, 2))
    policy = make_policy()
    with pytest.raises(ValueError, match="no ddpm variant"):
        accelerate(policy, "dpmsolver")
    with pytest.raises(ValueError, match="does not take"):
        accelerate(policy, "paraddpm", no_such_option=1)
    assert not is_accelerated(policy)


# --------------------------------------------------------------- LeRobot checkpoint folder -> parapolicy
@pytest.mark.parametrize("legacy, modes", [(False, {}), (True, {"STATE": "MEAN_STD"})])
def test_lerobot_checkpoint_converts_to_the_same_actions(tmp_path, legacy, modes):
    from lerobot_standin import ACTION, lerobot_normalize, save_pretrained

    from parapolicy.convert import main
    from parapolicy.policy import load_policy

    policy = make_policy(num_inference_steps=10)
    g = gen(0)
    state, action = torch.randn(200, 10, generator=g) * 2 + 1, torch.rand(200, 4, generator=g) * 1.6 - 0.8
    stats = {key: {"min": x.min(0).values, "max": x.max(0).values, "mean": x.mean(0), "std": x.std(0)}
             for key, x in ((OBS_STATE, state), (ACTION, action))}
    folder = save_pretrained(policy, tmp_path / "lerobot", stats, modes, legacy=legacy)
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out)]) == 0
    ours = load_policy(out, sampler="ddpm")
    cfg = ours.config
    assert (cfg.obs_dim, cfg.action_dim, cfg.horizon, cfg.n_obs_steps, cfg.n_action_steps, cfg.action_start) == (10, 4, 16, 2, 8, 1)
    assert cfg.down_dims == [32, 64] and cfg.num_inference_steps == 10

    obs = torch.randn(2, 2, 10, generator=gen(3)) * 2 + 1
    with torch.no_grad():  # LeRobot: preprocessor normalises, generate_actions (global RNG), postprocessor
        torch.manual_seed(4)
        normalized = policy.diffusion.generate_actions({OBS_STATE: lerobot_normalize(obs, stats[OBS_STATE], modes.get("STATE", "MIN_MAX"))})
        reference = lerobot_normalize(normalized, stats[ACTION], "MIN_MAX", inverse=True)
    torch.manual_seed(4)  # the same draws in the stock order: x_T, then one per step with t > 0
    x_T = torch.randn(2, 16, 4)
    noise = torch.zeros(10, 2, 16, 4)
    for i, t in enumerate(ours.sampler.timesteps):
        if int(t) > 0:
            noise[i] = torch.randn(2, 16, 4)
    planned = ours.predict_action(obs, x_T=x_T, noise=noise)
    assert (planned["action"] - reference).abs().max() < 1e-5


def test_lerobot_checkpoint_refusals(tmp_path):
    import json

    from lerobot_standin import ACTION, save_pretrained

    from parapolicy.convert import convert
    from parapolicy.importers.diffusion_policy import UnsupportedCheckpointError

    stats = {key: {"min": -torch.ones(d), "max": torch.ones(d)} for key, d in ((OBS_STATE, 10), (ACTION, 4))}
    folder = save_pretrained(make_policy(use_film_scale_modulation=False), tmp_path / "bias_only", stats)
    with pytest.raises(UnsupportedCheckpointError, match="use_film_scale_modulation=False"):
        convert(folder, tmp_path / "out")
    folder = save_pretrained(make_policy(), tmp_path / "images", stats)
    config = json.loads((folder / "config.json").read_text())
    config["input_features"]["observation.images.top"] = {"type": "VISUAL", "shape": [3, 96, 96]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpointError, match="image policies"):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
