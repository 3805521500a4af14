"""Tiny synthetic robomimic-style HDF5 files and tiny policies shared by the policy-side tests."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from parapolicy.policy import DiffusionPolicy, DiffusionPolicyConfig

OBS_KEYS = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
KEY_DIMS = {"object": 14, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
OBS_DIM = sum(KEY_DIMS.values())  # 23, like Square
ACTION_DIM = 7


def known_demo(demo: int, length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Obs / actions whose values encode (demo, frame, feature), so windows can be checked exactly.

    obs feature j of frame t = demo * 1000 + t + j / 100 (keys concatenated in OBS_KEYS order);
    action feature j of frame t = -(demo * 1000 + t) - j / 100.
    """
    t = np.arange(length, dtype=np.float64)[:, None]
    flat = demo * 1000 + t + np.arange(OBS_DIM)[None, :] / 100
    obs, start = {}, 0
    for key in OBS_KEYS:
        obs[key] = flat[:, start : start + KEY_DIMS[key]]
        start += KEY_DIMS[key]
    actions = -(demo * 1000 + t) - np.arange(ACTION_DIM)[None, :] / 100
    return obs, actions


def learnable_demo(rng: np.random.Generator, length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Smooth trajectories whose actions are a fixed function of the observation (easy to fit)."""
    phase = rng.uniform(0, 2 * np.pi)
    t = np.linspace(0, 2, length)[:, None]
    flat = np.sin(t * np.arange(1, OBS_DIM + 1)[None, :] * 0.5 + phase)
    obs, start = {}, 0
    for key in OBS_KEYS:
        obs[key] = flat[:, start : start + KEY_DIMS[key]]
        start += KEY_DIMS[key]
    actions = np.tanh(flat[:, :ACTION_DIM] * 1.5)
    return obs, actions


def write_hdf5(path: Path, demos: dict[str, tuple[dict[str, np.ndarray], np.ndarray]],
               masks: dict[str, list[str]] | None = None) -> Path:
    """Write demos ``{name: (obs dict, actions)}`` in our / robomimic's low-dim layout."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        total = 0
        for name, (obs, actions) in demos.items():
            group = data.create_group(name)
            for key, value in obs.items():
                group.create_dataset(f"obs/{key}", data=value)
            group.create_dataset("actions", data=actions)
            group.create_dataset("states", data=np.zeros((len(actions), 5)))
            group.create_dataset("rewards", data=np.zeros(len(actions)))
            group.create_dataset("dones", data=np.zeros(len(actions)))
            group.attrs["num_samples"] = len(actions)
            total += len(actions)
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps({"env_name": "NutAssemblySquare", "type": 1, "env_kwargs": {}})
        for key, names in (masks or {}).items():
            f.create_dataset(f"mask/{key}", data=np.array([n.encode() for n in names]))
    return path


def learnable_hdf5(path: Path, n_demos: int = 6, length: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_hdf5(path, {f"demo_{i}": learnable_demo(rng, length) for i in range(n_demos)})


def tiny_config(**overrides) -> DiffusionPolicyConfig:
    kwargs = dict(obs_dim=OBS_DIM, action_dim=ACTION_DIM, obs_keys=OBS_KEYS, env="square",
                  down_dims=[16, 32], n_groups=8, diffusion_step_embed_dim=16, num_inference_steps=10)
    kwargs.update(overrides)
    return DiffusionPolicyConfig(**kwargs)


def tiny_policy(seed: int = 0, **overrides) -> DiffusionPolicy:
    """A randomly initialised tiny policy with a non-trivial normaliser."""
    import torch

    torch.manual_seed(seed)
    policy = DiffusionPolicy(tiny_config(**overrides))
    policy.normalizer.obs.set_stats(-torch.linspace(1, 3, OBS_DIM), torch.linspace(2, 5, OBS_DIM))
    policy.normalizer.action.set_stats(-torch.ones(ACTION_DIM) * 0.5, torch.ones(ACTION_DIM) * 2.0)
    return policy.eval()


CAMERAS = ["agentview_image", "robot0_eye_in_hand_image"]


def tiny_image_policy(seed: int = 0) -> DiffusionPolicy:
    """A randomly initialised small image policy: two 84x84 cameras (conv trunk, resized to 42x42,
    centre-cropped to 38x38) + 9 proprioceptive features; DDIM-4."""
    import torch

    vision = dict(backbone="conv", resize_shape=[42, 42], crop_shape=[38, 38], num_kp=8, feature_dim=16)
    config = DiffusionPolicyConfig(obs_dim=9, obs_keys=["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"],
                                   image_keys=CAMERAS, vision=vision, down_dims=[16, 32], diffusion_step_embed_dim=16,
                                   horizon=8, n_action_steps=4, num_inference_steps=4)
    torch.manual_seed(seed)
    policy = DiffusionPolicy(config).eval()
    policy.set_sampler("ddim", 4)
    return policy
