"""parapolicy.integrations.lerobot: accelerate a LeRobot DiffusionPolicy in place (on a stand-in with
LeRobot's attributes, layer layout and sampling loop: tests/lerobot_standin.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lerobot_standin import OBS_ENV_STATE, OBS_STATE, DiffusionConfig, DiffusionModel, DiffusionPolicy
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
    with pytest.raises(UnsupportedCheckpointError, match="no diffusion.rgb_encoder"):  # a camera without its encoder
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------- LeRobot image checkpoints -> parapolicy
CAMERAS = ("observation.images.top", "observation.images.wrist")


def image_policy(seed: int, **vision) -> DiffusionPolicy:
    """A stand-in LeRobot image policy (two 3x40x48 cameras + a 10-dim state) with every weight and
    batch-norm statistic perturbed, so that no layer is at its initial value."""
    from types import SimpleNamespace

    features = {key: SimpleNamespace(shape=(3, 40, 48)) for key in CAMERAS}
    policy = make_policy(seed, image_features=features, spatial_softmax_num_keypoints=8, num_inference_steps=6, **vision)
    g = gen(seed + 100)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in policy.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return policy


def image_stats(g: torch.Generator) -> dict:
    state, action = torch.randn(200, 10, generator=g) * 2 + 1, torch.rand(200, 4, generator=g) * 1.6 - 0.8
    env = torch.randn(200, 3, generator=g) * 0.5 - 2
    stats = {key: {"min": x.min(0).values, "max": x.max(0).values, "mean": x.mean(0), "std": x.std(0)}
             for key, x in ((OBS_STATE, state), ("action", action), (OBS_ENV_STATE, env))}
    for key in CAMERAS:  # per-channel statistics [3, 1, 1], as LeRobot's datasets store them
        mean, std = torch.rand(3, 1, 1, generator=g) * 0.4 + 0.3, torch.rand(3, 1, 1, generator=g) * 0.2 + 0.1
        stats[key] = {"mean": mean, "std": std, "min": mean - 2 * std, "max": mean + 2 * std}
    return stats


@pytest.mark.parametrize("vision, modes, legacy", [
    # GroupNorm, one encoder per camera, crop only with odd margins (torchvision's rounding: top 2, left 4),
    # an environment state (conditioning: state, cameras, environment state)
    ({"use_group_norm": True, "crop_shape": (37, 41), "env_state_dim": 3}, {}, False),
    # LeRobot's defaults: batch norm (an ImageNet start, weights saved), one encoder shared by both cameras,
    # resize then crop_ratio; MIN_MAX images; statistics as buffers (LeRobot < 0.4); DDIM
    ({"pretrained_backbone_weights": "ResNet18_Weights.IMAGENET1K_V1", "use_separate_rgb_encoder_per_camera": False,
      "resize_shape": (36, 44), "crop_ratio": 0.9, "noise_scheduler_type": "DDIM"},
     {"VISUAL": "MIN_MAX", "STATE": "MEAN_STD"}, True),
])
def test_lerobot_image_checkpoint_plans_lerobots_actions(tmp_path, vision, modes, legacy):
    """LeRobot's pipeline (normalise state and images with the dataset statistics, generate_actions,
    unnormalise) against the converted policy on the same frames and noise; for DDIM (whose only draw is
    x_T) also act() on uint8 frames against select_action on the same frames as LeRobot's float images."""
    from lerobot_standin import ACTION, OBS_IMAGES, lerobot_normalize, save_pretrained

    from parapolicy.convert import main
    from parapolicy.policy import load_policy

    policy = image_policy(1, **vision)
    stats = image_stats(gen(0))
    folder = save_pretrained(policy, tmp_path / "lerobot", stats, modes, legacy=legacy)
    assert main([str(folder), "--out", str(tmp_path / "out")]) == 0
    ours = load_policy(tmp_path / "out")  # the checkpoint's scheduler: ddpm or ddim, 6 steps
    cfg = ours.config
    ddim = vision.get("noise_scheduler_type") == "DDIM"
    assert ours.sampler_name == ("ddim" if ddim else "ddpm") and ours.num_inference_steps == 6
    env_dim = vision.get("env_state_dim", 0)
    assert cfg.image_keys == list(CAMERAS) and cfg.image_shape == [3, 40, 48]
    assert cfg.obs_keys == [OBS_STATE] + ([OBS_ENV_STATE] if env_dim else [])
    assert cfg.global_cond_dim == 2 * (10 + env_dim + 2 * 16)

    g = gen(3)
    state = torch.randn(2, 2, 10, generator=g) * 2 + 1
    env = torch.randn(2, 2, env_dim, generator=g) * 0.5 - 2
    frames = {key: torch.randint(0, 256, (2, 2, 3, 40, 48), generator=g, dtype=torch.uint8) for key in CAMERAS}
    visual, state_mode = modes.get("VISUAL", "MEAN_STD"), modes.get("STATE", "MIN_MAX")
    with torch.no_grad():
        torch.manual_seed(4)
        images = torch.stack([lerobot_normalize(frames[key].float() / 255, stats[key], visual) for key in CAMERAS], dim=2)
        batch = {OBS_STATE: lerobot_normalize(state, stats[OBS_STATE], state_mode), OBS_IMAGES: images}
        if env_dim:
            batch[OBS_ENV_STATE] = lerobot_normalize(env, stats[OBS_ENV_STATE], modes.get("ENV", "MIN_MAX"))
        normalized = policy.diffusion.generate_actions(batch)
        reference = lerobot_normalize(normalized, stats[ACTION], "MIN_MAX", inverse=True)
    torch.manual_seed(4)  # the stock draw order: x_T, then one per step with t > 0
    x_T = torch.randn(2, 16, 4)
    noise = torch.zeros(6, 2, 16, 4)
    for i, t in enumerate(ours.sampler.timesteps):
        if int(t) > 0:
            noise[i] = torch.randn(2, 16, 4)
    history = torch.cat([state, env], dim=-1)  # our low-dim vector: state, then environment state
    planned = ours.predict_action(history, images=frames, x_T=x_T, noise=None if ddim else noise)
    assert (planned["action"] - reference).abs().max() < 1e-5
    ours.enable_fast_path(backend="trace")  # the traced encoder (and denoiser) plan the same
    fast = ours.predict_action(history, images=frames, x_T=x_T, noise=None if ddim else noise)
    assert ours.fast_path.stats.backends["encoder B2"] == "trace" and (fast["action"] - reference).abs().max() < 1e-5
    ours.enable_fast_path(False)
    if not ddim:  # LeRobot's DDPM draws its step noise inside the loop, ours up front: act() draws differ
        return

    # the control loop: robosuite-style obs dicts of upright uint8 [H, W, 3] frames vs LeRobot's select_action
    steps = [{OBS_STATE: state[0, k].numpy(), **{key: frames[key][0, k].permute(1, 2, 0).numpy() for key in CAMERAS}}
             for k in range(2)] * 5
    ours.reset()
    policy.reset()
    torch.manual_seed(7)
    got = np.stack([ours.act(o) for o in steps])
    torch.manual_seed(7)  # LeRobot's select_action draws from the global generator in the same order
    with torch.no_grad():
        expected = []
        for o in steps:
            batch = {OBS_STATE: lerobot_normalize(torch.from_numpy(o[OBS_STATE])[None], stats[OBS_STATE], state_mode)}
            batch.update({key: lerobot_normalize(torch.from_numpy(o[key]).permute(2, 0, 1)[None].float() / 255,
                                                 stats[key], visual) for key in CAMERAS})
            expected.append(lerobot_normalize(policy.select_action(batch), stats[ACTION], "MIN_MAX", inverse=True)[0])
    assert np.abs(got - torch.stack(expected).numpy()).max() < 1e-5


def test_lerobot_image_checkpoint_refusals(tmp_path):
    import json

    from lerobot_standin import save_pretrained
    from safetensors.torch import load_file, save_file

    from parapolicy.convert import convert
    from parapolicy.importers.diffusion_policy import UnsupportedCheckpointError

    stats = image_stats(gen(0))
    folder = save_pretrained(image_policy(2, use_group_norm=True), tmp_path / "base", stats)
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))

    def variant(name: str, change: dict | None = None, drop_encoder: bool = False):
        target = tmp_path / name
        target.mkdir()
        for file in folder.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        (target / "config.json").write_text(json.dumps({**config, **(change or {})}))
        if drop_encoder:
            save_file({k: v for k, v in weights.items() if ".rgb_encoder." not in k}, str(target / "model.safetensors"))
        return target

    features = config["input_features"]
    cases = [
        (variant("resnet34", {"vision_backbone": "resnet34"}), "vision_backbone='resnet34'"),
        (variant("shapes", {"input_features": {**features, CAMERAS[1]: {"type": "VISUAL", "shape": [3, 40, 40]}}}),
         "different shapes"),
        (variant("gray", {"input_features": {k: ({"type": "VISUAL", "shape": [1, 40, 48]} if k in CAMERAS else v)
                                             for k, v in features.items()}}), "3-channel"),
        (variant("big_crop", {"crop_shape": [44, 41]}), r"crop_shape \[44, 41\] larger"),
        (variant("quantiles", {"normalization_mapping": {**config["normalization_mapping"], "VISUAL": "QUANTILES"}}),
         "QUANTILES for VISUAL"),
        (variant("download", {"pretrained_backbone_weights": "ResNet18_Weights.IMAGENET1K_V1"}, drop_encoder=True),
         "would need a download"),
    ]
    for source, needle in cases:
        with pytest.raises(UnsupportedCheckpointError, match=needle):
            convert(source, tmp_path / f"out_{source.name}")
        assert not (tmp_path / f"out_{source.name}").exists()
    convert(folder, tmp_path / "out")  # the unchanged folder converts
