"""Small LeRobot Diffusion Policies, built and saved locally (nothing is downloaded): a state-only one for
``lerobot-eval --env.type=pusht`` and a state + camera one for the async client and ``lerobot-rollout`` (the
pusht_gym test robot's ``observation.state`` + ``observation.images.top``). Untrained, seeded weights: the
tests compare LeRobot's loop with parapolicy's on the same policy, not task success."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

TABLE = 512.0  # PushT's agent and action coordinates are pixels of a 512 x 512 table


def build_policy(folder: Path, *, camera: int | None = None, env_state: bool = False, seed: int = 0,
                 num_inference_steps: int = 30, scheduler: str = "DDPM") -> Path:
    """Build, seed and ``save_pretrained`` a DiffusionPolicy with its pre/post processors into ``folder``."""
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    inputs = {"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,))}
    stats = {"observation.state": {"min": torch.zeros(2), "max": torch.full((2,), TABLE)},
             "action": {"min": torch.zeros(2), "max": torch.full((2,), TABLE)}}
    if env_state:
        inputs["observation.environment_state"] = PolicyFeature(type=FeatureType.ENV, shape=(16,))
        stats["observation.environment_state"] = {"min": torch.zeros(16), "max": torch.full((16,), TABLE)}
    if camera:
        inputs["observation.images.top"] = PolicyFeature(type=FeatureType.VISUAL, shape=(3, camera, camera))
        stats["observation.images.top"] = {"mean": torch.full((3, 1, 1), 0.5), "std": torch.full((3, 1, 1), 0.25)}
    config = DiffusionConfig(
        input_features=inputs,
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        normalization_mapping={"VISUAL": NormalizationMode.MEAN_STD, "STATE": NormalizationMode.MIN_MAX,
                               "ENV": NormalizationMode.MIN_MAX, "ACTION": NormalizationMode.MIN_MAX},
        n_obs_steps=2, horizon=16, n_action_steps=8, drop_n_last_frames=7,
        down_dims=(32, 64), kernel_size=3, n_groups=8, diffusion_step_embed_dim=32,
        noise_scheduler_type=scheduler, num_train_timesteps=100, num_inference_steps=num_inference_steps,
        pretrained_backbone_weights=None, use_group_norm=True, spatial_softmax_num_keypoints=8,
        crop_shape=(camera - 8, camera - 8) if camera else None, crop_is_random=False,
        device="cpu", push_to_hub=False,
    )
    torch.manual_seed(seed)
    policy = DiffusionPolicy(config)
    with torch.no_grad():  # an untrained final layer outputs ~0: scale it so the chunks move the agent
        for p in policy.diffusion.unet.final_conv.parameters():
            p.normal_(0.0, 0.3)
    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    folder = Path(folder)
    policy.save_pretrained(folder)
    pre.save_pretrained(folder)
    post.save_pretrained(folder)
    return folder


def lerobot_bin(name: str) -> str:
    """A console script of the running interpreter's environment (lerobot-eval, lerobot-rollout, ...)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found beside {sys.executable}")
    return str(path)


def run(args: list[str], env: dict, timeout: float, log: Path) -> subprocess.CompletedProcess:
    """Run a LeRobot command, bounded in time, its output in ``log`` (and returned)."""
    with open(log, "w") as out:
        proc = subprocess.run(args, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    proc.output = Path(log).read_text()
    return proc
